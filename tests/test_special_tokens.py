"""Special tokens of a Text vocabulary ([CLS], [SEP], <s>...) written in a text: the default
tokenizer keeps them whole, with their own ids (it made "[CLS]" the word 'cls', read as [UNK],
and labelled the unit 'cls'); check() names special-looking words the vocabulary lacks."""
import torch
from torch import nn

from multiviz_widgets import Image, ModelAdapter, Text
from multiviz_widgets.annotations import unit_settings
from multiviz_widgets.doctor import check
from multiviz_widgets.modalities import Modality

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<s>", "</s>", "<|endoftext|>", "what", "color",
         "is", "the", "shape"]
PLAIN = ["[PAD]", "[UNK]", "what", "color", "is", "the", "shape"]


def ids(vocab, *tokens):
    return [vocab.index(t) for t in tokens]


def test_a_special_token_written_in_the_text_is_one_token_with_its_id():
    t = Text("question", vocab=VOCAB)
    text = "[CLS] what color is the shape"
    x = t.to_tensor(text)
    assert x.tolist() == ids(VOCAB, "[CLS]", "what", "color", "is", "the", "shape")
    assert t.describe_units(text, x)[0] == "[CLS]" and t.unit_labels(x)[0] == "[CLS]"
    # glued to words, one after another, angle-bracketed, at the end before punctuation
    assert t.tokenize("what[SEP]color") == ["what", "[SEP]", "color"]
    assert t.tokenize("[CLS][SEP]What?") == ["[CLS]", "[SEP]", "what"]
    assert t.tokenize("<s>the shape</s>") == ["<s>", "the", "shape", "</s>"]
    assert t.tokenize("what<|endoftext|>") == ["what", "<|endoftext|>"]
    assert t.tokenize("[ [CLS] ]") == ["[CLS]"]
    # drop_punctuation=False keeps the punctuation around it, not the token's own brackets
    kept = Text("question", vocab=VOCAB, drop_punctuation=False)
    assert kept.tokenize("[CLS] what?") == ["[CLS]", "what", "?"]


def test_special_tokens_are_matched_as_spelt_and_only_when_the_vocabulary_holds_them():
    t = Text("question", vocab=VOCAB)
    # case counts, as in tokenizers: "[cls]" is split into words as before
    assert t.tokenize("[cls] what") == ["cls", "what"]
    assert t.tokenize("[MASK] what") == ["mask", "what"]          # not in the vocabulary
    assert t.tokenize("<b>what</b>") == ["b", "what", "b"]


def test_texts_without_special_tokens_tokenize_as_before():
    plain, special = Text("question", vocab=PLAIN), Text("question", vocab=VOCAB)
    for text, words in [("What color is the shape?", ["what", "color", "is", "the", "shape"]),
                        ("[cls] <b> [1] a<b", ["cls", "b", "1", "a", "b"]),
                        ("don't 'red' café 👍🏽", ["don't", "red", "café"])]:
        assert plain.tokenize(text) == special.tokenize(text) == words


def test_the_padding_and_unknown_tokens_written_in_the_text_keep_their_ids():
    t = Text("question", vocab=VOCAB)
    x = t.to_tensor("[PAD] what [UNK]")
    assert x.tolist() == [t.pad_id, VOCAB.index("what"), t.unk_id]
    assert t.tokens(x) == ["[PAD]", "what", "[UNK]"]
    # a vocabulary with no other special tokens splits them into words, as it always did (its
    # signature, which keys cached features and unit concepts, did not change)
    plain = Text("question", vocab=PLAIN)
    assert plain.tokenize("[PAD] what [UNK]") == ["pad", "what", "unk"]


def test_the_signature_changes_only_for_vocabularies_with_other_special_tokens():
    plain = Text("question", vocab=PLAIN)
    # what saved concept files are keyed by: the same as before special tokens were kept whole
    assert unit_settings(plain) == "e974bb54996fcab3"
    assert plain.signature() == Modality.signature(plain) + "+words:unicode-2"
    special = Text("question", vocab=VOCAB)
    assert special.signature() == Modality.signature(special) + "+words:unicode-2+specials"
    # a tokenizer of the user's own: its texts are split as before, the signature as before
    own = Text("question", vocab=VOCAB, tokenize=str.split)
    assert "+specials" not in own.signature()


class Model(nn.Module):
    def __init__(self, n_tokens):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(n_tokens, 6)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.classifier = nn.Linear(6, 3)

    def forward(self, image, question):
        img = torch.tanh(self.conv(image)).mean((2, 3))
        return self.classifier(torch.relu(img * self.embedding(question).mean(1)))


def _check(vocab, question, **text):
    a = ModelAdapter(Model(len(vocab)).eval(),
                     [Image("image", patch=4), Text("question", vocab=vocab, **text)],
                     ["red", "green", "blue"])
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    report = check(a, {"image": image, "question": question})
    return report, [f for f in report.findings if f.code == "special-tokens"]


def test_check_names_a_special_looking_word_outside_the_vocabulary_even_once():
    report, found = _check(PLAIN, "[CLS] what color is the shape")
    assert report.ok and len(found) == 1 and found[0].severity == "warning", str(report)
    message = found[0].message
    assert "The text of 'question' holds '[CLS]', which look like special tokens but are not " \
           "read as one of its vocabulary: '[CLS]' is read as 'cls' ([UNK])" in message, message
    # the vocabulary's own spelling is named
    _, found = _check(VOCAB, "[cls] what color")
    assert "The vocabulary spells '[cls]' as '[CLS]'" in found[0].message, found[0].message
    # a tokenizer of the user's own that keeps it: the token becomes [UNK]
    _, found = _check(PLAIN, "[SEP] what color", tokenize=str.split)
    assert "'[SEP]' is read as '[SEP]' ([UNK])" in found[0].message, found[0].message
    # the vocabulary holds it: read as itself, nothing to say
    report, found = _check(VOCAB, "[CLS] what color is the shape")
    assert not found, str(report)
    # no special tokens in the vocabulary: a word in brackets, an HTML tag are text
    for text in ("what is in [the] image?", "what color is the <b>shape</b>?"):
        report, found = _check(PLAIN, text)
        assert not found, str(report)


def test_check_warns_of_the_padding_token_written_in_the_text():
    report, found = _check(VOCAB, "what color [PAD]")
    assert len(found) == 1 and "writes out the padding token '[PAD]'" in found[0].message, \
        str(report)
    _, found = _check(VOCAB, "what color is the shape")
    assert not found
    # no other special tokens: it is split into a word, which is said
    report, found = _check(PLAIN, "what color [PAD]")
    assert len(found) == 1 and "'[PAD]' is read as 'pad' ([UNK])" in found[0].message, \
        str(report)


def test_a_written_padding_token_is_said_with_a_tokenizer_of_ones_own_and_beside_a_word_pad():
    """A tokenizer of the user's own that keeps '[PAD]' (the padding id) lost its warning, and
    with 'pad' in the vocabulary a written '[PAD]', read as the word 'pad', was not said."""
    _, found = _check(PLAIN, "what color [PAD]", tokenize=str.split)
    assert len(found) == 1 and "writes out the padding token '[PAD]'" in found[0].message
    _, found = _check(PLAIN + ["pad"], "what color [PAD]")
    assert len(found) == 1 and "'[PAD]' is read as 'pad'" in found[0].message, found


def test_a_tokenizer_of_ones_own_that_splits_the_padding_token_is_said_to_split_it():
    """A tokenizer that reads '[PAD]' as the word 'pad' ([UNK]) got 'read as padding (id 0)'."""
    import re
    _, found = _check(PLAIN, "what color [PAD]",
                      tokenize=lambda s: re.findall(r"\w+", s.lower()))
    assert len(found) == 1, found
    assert "'[PAD]' is read as 'pad' ([UNK])" in found[0].message
    assert "The tokenizer splits '[PAD]'" in found[0].message
    assert "read as padding" not in found[0].message
