"""Errors that name the real cause: a forward() argument the adapter never passes (a Hugging Face
model's attention_mask), and a model that adds a [CLS] id to the text before embedding it."""
import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from multiviz_widgets import AdapterError, Image, ModelAdapter, Text
from multiviz_widgets.adapter import ModelInputError
from multiviz_widgets.doctor import check
from multiviz_widgets.kernels.unimodal import attribute

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "what", "colour", "is", "it"]
INSTANCE = {"image": torch.rand(3, 8, 8), "question": "what colour is it"}
WRONG_CAUSE = "Check that the modalities give the shapes"


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(len(VOCAB), 6)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fuse = nn.Linear(6, 8)
        self.classifier = nn.Linear(8, 3)

    def logits(self, image, question, mask=None):
        img = torch.tanh(self.conv(image)).mean((2, 3))
        e = self.embedding(question)
        if mask is not None:
            e = e * mask[..., None]
        return self.classifier(torch.relu(self.fuse(img * e.mean(1))))


def make(model, **kw):
    return ModelAdapter(model.eval(), [Image("image", patch=4), Text("question", vocab=VOCAB)],
                        class_names=["red", "green", "blue"], **kw)


def wrapper_from(message: str) -> type:
    """The class Wrapped of a message's ready-made code, defined."""
    code = message[message.index("class Wrapped"):message.index("\n\nadapter = ")]
    space = {"torch": torch}
    exec(code, space)  # noqa: S102 -- the message's own code, as a user would paste it
    return space["Wrapped"]


# -- 1. required forward() arguments the adapter does not pass ------------------------------

class NeedsMask(Base):
    def forward(self, image, question, attention_mask):      # a Hugging Face style signature
        return self.logits(image, question, attention_mask)


def test_a_required_argument_that_is_no_modality_is_named_when_the_adapter_is_made():
    with pytest.raises(AdapterError) as err:
        make(NeedsMask())
    text = str(err.value)
    assert err.value.code == "forward-arguments"
    assert not isinstance(err.value, ModelInputError)
    assert "requires 'attention_mask' (no default), which is not a modality" in text
    assert "passes only the modalities' inputs (model(image, question))" in text
    assert "class Wrapped(torch.nn.Module)" in text
    assert "attention_mask=(question != 0).long()" in text
    assert "default of None" in text
    assert WRONG_CAUSE not in text
    # the ready-made wrapper works as it is
    model = NeedsMask()
    wrapped = make(wrapper_from(text)(model))
    logits = wrapped.forward(wrapped.prepare(INSTANCE).raw)
    ids = wrapped.prepare(INSTANCE).raw["question"]
    expected = model.eval()(INSTANCE["image"][None], ids, (ids != 0).long())
    assert torch.allclose(logits, expected)


def test_the_wrapper_passes_the_modalities_to_forwards_own_parameter_names():
    class OtherNames(Base):
        def forward(self, pixels, ids, attention_mask, token_type_ids, scale=1.0):
            assert torch.equal(token_type_ids, torch.zeros_like(ids))
            return self.logits(pixels, ids, attention_mask) * scale
    with pytest.raises(AdapterError, match="requires 'attention_mask', 'token_type_ids'") as err:
        make(OtherNames())
    text = str(err.value)
    assert "are not modalities" in text
    assert "pixels=image, ids=question" in text and "torch.zeros_like(question)" in text
    wrapped = make(wrapper_from(text)(OtherNames()))
    assert wrapped.forward(wrapped.prepare(INSTANCE).raw).shape == (1, 3)


def test_keyword_inputs_and_keyword_only_arguments():
    class KeywordOnly(Base):
        def forward(self, *, question, image, attention_mask, **kwargs):
            return self.logits(image, question, attention_mask)
    with pytest.raises(AdapterError, match="'attention_mask'") as err:
        make(KeywordOnly(), keyword_inputs=True)
    text = str(err.value)
    assert "model(image=..., question=...)" in text
    wrapped = make(wrapper_from(text)(KeywordOnly()))
    assert wrapped.forward(wrapped.prepare(INSTANCE).raw).shape == (1, 3)


@pytest.mark.parametrize("forward", [
    lambda self, image, question, attention_mask=None: self.logits(image, question),
    lambda self, image, question, **kwargs: self.logits(image, question),
    lambda self, *inputs: self.logits(*inputs),
    lambda self, image, *rest: self.logits(image, rest[0]),
])
def test_signatures_whose_arguments_are_all_given_are_accepted(forward):
    model = type("Fine", (Base,), {"forward": forward})()
    a = make(model)
    assert a.forward(a.prepare(INSTANCE).raw).shape == (1, 3)


def test_a_pre_hook_that_gives_the_argument_is_trusted():
    model = NeedsMask()
    model.register_forward_pre_hook(
        lambda mod, args, kwargs: (args, {**kwargs, "attention_mask": (args[1] != 0).long()}),
        with_kwargs=True)
    a = make(model)
    assert a.forward(a.prepare(INSTANCE).raw).shape == (1, 3)


def _fills_mask(forward):
    """A decorator (functools.wraps) that gives forward the mask it requires."""
    import functools

    @functools.wraps(forward)
    def with_mask(self, image, question, mask=None):
        return forward(self, image, question, torch.ones(question.shape, dtype=torch.float32)
                       if mask is None else mask)
    return with_mask


class DecoratedForward(Base):
    @_fills_mask
    def forward(self, image, question, mask):
        return self.logits(image, question, mask)


class PassesOnWithMask(nn.Module):
    """A wrapper of the user's own: forward(*args, **kwargs) adds the mask its .module needs."""

    def __init__(self):
        super().__init__()
        self.module = NeedsMask()
        self.classifier = self.module.classifier

    def forward(self, *args, **kwargs):
        image, question = args
        return self.module(image, question, torch.ones(question.shape), **kwargs)


@pytest.mark.parametrize("model", [DecoratedForward, PassesOnWithMask])
def test_a_forward_whose_arguments_a_decorator_or_wrapper_fills_in_is_accepted(model):
    """Both models work, and were refused when the adapter was made: the signature read was
    the undecorated forward's, and the wrapper's .module's (as if it were nn.DataParallel)."""
    adapter = make(model())
    assert adapter.predict(adapter.prepare(INSTANCE).raw).shape == (1, 3)


def test_the_runtime_error_names_the_argument_not_the_shapes():
    # a hook that gives nothing: the adapter cannot tell at construction, the call fails
    model = NeedsMask()
    model.register_forward_pre_hook(lambda mod, args: None)
    a = make(model)
    with pytest.raises(ModelInputError) as err:
        a.forward(a.prepare(INSTANCE).raw)
    text = str(err.value)
    assert "missing 1 required positional argument: 'attention_mask'" in text
    assert "requires 'attention_mask' (no default), which is not a modality" in text
    assert "attention_mask=(question != 0).long()" in text
    assert WRONG_CAUSE not in text


def test_the_runtime_error_of_an_argument_required_by_the_code_forward_passes_on_to():
    class PassesOn(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = NeedsMask()

        def forward(self, image, question, **kwargs):
            return self.inner(image, question, **kwargs)
    a = make(PassesOn(), embedding_layers={"question": "inner.embedding"})
    with pytest.raises(ModelInputError) as err:
        a.forward(a.prepare(INSTANCE).raw)
    text = str(err.value)
    assert "(or the code it passes its arguments on to) requires 'attention_mask'" in text
    assert "passes only the modalities' inputs" in text and "class Wrapped" in text
    assert WRONG_CAUSE not in text
    wrapped = make(wrapper_from(text)(PassesOn()),
                   embedding_layers={"question": "model.inner.embedding"})
    assert wrapped.forward(wrapped.prepare(INSTANCE).raw).shape == (1, 3)


def test_keyword_inputs_under_other_names_than_forwards_says_to_rename_them():
    class OtherKeywords(Base):
        def forward(self, pixels, ids, **kwargs):
            return self.logits(pixels, ids)
    a = make(OtherKeywords(), keyword_inputs=True)
    with pytest.raises(ModelInputError) as err:
        a.forward(a.prepare(INSTANCE).raw)
    text = str(err.value)
    assert "forward() has no parameter named 'image' (it goes to its **kwargs)" in text
    assert "lacks 'pixels', 'ids'" in text and "name the modalities after" in text
    assert WRONG_CAUSE not in text and "class Wrapped" not in text


# -- 2. a [CLS] id added to the text inside forward() --------------------------------------

class PrependsCLS(Base):
    def forward(self, image, question):
        ids = torch.cat([torch.full_like(question[:, :1], VOCAB.index("[CLS]")), question], 1)
        return self.logits(image, ids)


class AppendsSEP(Base):
    def forward(self, image, question):
        ids = torch.cat([question, torch.full_like(question[:, :1], VOCAB.index("[SEP]"))], 1)
        return self.logits(image, ids)


def _substitution_error(model) -> AdapterError:
    a = make(model)
    p = a.prepare(INSTANCE)
    with pytest.raises(AdapterError) as err:
        a.forward(p.raw, {"question": p.continuous["question"][None]})
    assert err.value.code == "embedding-substitution"
    return err.value


def test_ids_built_from_the_texts_are_said_to_be_so_not_the_layer_wrong():
    text = str(_substitution_error(PrependsCLS()))
    assert "embedding (Embedding), was called on token ids of shape (1, 5) built from" in text
    assert "the id 2 ('[CLS]') put before them" in text
    assert "The layer is the right one" in text
    assert "gradients and baselines cannot enter at the text's tokens" in text
    assert "tokenize=" in text and "('[CLS] ...')" in text
    assert ("torch.cat([self.embedding(cls_ids), self.embedding(question)], 1)" in text)
    assert "was never called" not in text and "must name the module" not in text


def test_an_appended_id_and_every_method_and_the_check_say_so():
    assert "the id 3 ('[SEP]') put after them" in str(_substitution_error(AppendsSEP()))
    a = make(PrependsCLS())
    for method in ("occlusion", "integrated_gradients"):      # batches of many rows
        with pytest.raises(AdapterError, match=re.escape("built from the (")):
            attribute(a, INSTANCE, method)
    report = check(a, INSTANCE)
    assert "embedding-substitution" in report.codes()
    assert "'[CLS]') put before them" in str(report) and "was never called" not in str(report)


def test_a_padded_batch_with_the_id_put_after_each_texts_last_token():
    class SEPAfterLast(Base):
        def forward(self, image, question):
            n = (question != 0).sum(1)
            ids = torch.cat([question, torch.zeros_like(question[:, :1])], 1)
            ids[torch.arange(len(ids)), n] = VOCAB.index("[SEP]")
            return self.logits(image, ids)
    a = make(SEPAfterLast())
    raw = a.collate([INSTANCE, {**INSTANCE, "question": "what is it"}])
    cont = a.continuous(raw)
    with pytest.raises(AdapterError, match=re.escape("built from the (2, 4) token ids")):
        a.forward(raw, cont)


@pytest.mark.parametrize("embed", [
    lambda self, q: self.embedding(q.flip(1)[:, :-1]),            # other ids, shorter
    lambda self, q: self.embedding(torch.cat([q + 1, q[:, :1]], 1).clamp(max=7)),  # unrelated
    lambda self, q: F.embedding(q, self.embedding.weight),       # the layer never called
])
def test_the_message_for_a_layer_not_called_on_the_texts_ids_is_kept(embed):
    class Other(Base):
        def forward(self, image, question):
            img = torch.tanh(self.conv(image)).mean((2, 3))
            return self.classifier(torch.relu(self.fuse(img * embed(self, question).mean(1))))
    text = str(_substitution_error(Other()))
    assert "was never called on the token ids of 'question'" in text
    assert "built from" not in text


# -- 3. which column of a tabular row is wrong ------------------------------------------------

def test_a_non_finite_or_non_numeric_column_of_a_tabular_row_is_named():
    """A NaN in one column said only "Modality 'record' holds non-finite values", and a column
    of strings "Convert or drop the non-numeric columns" (dropping a model's column fails)."""
    import pandas as pd
    from multiviz_widgets import Tabular, TimeSeries

    class Tab(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(3 + 4, 2)

        def forward(self, record, vitals):
            return self.head(torch.cat([record, vitals.mean(1)], 1))
    adapter = ModelAdapter(Tab().eval(), [Tabular("record", columns=["age", "bmi", "sex_M"]),
                                          TimeSeries("vitals", window=2, channels=list("abcd"))],
                           ["survived", "died"])
    series = torch.zeros(6, 4)
    row = pd.DataFrame({"age": [61.0], "bmi": [float("nan")], "sex_M": [1.0]}).iloc[0]
    with pytest.raises(AdapterError, match=r"holds non-finite values \(NaN or infinity\) "
                                           r"\(in column 'bmi'\)"):
        adapter.prepare({"record": row, "vitals": series})
    bad_series = series.clone()
    bad_series[2:4, 1] = float("inf")
    with pytest.raises(AdapterError, match=r"\(in channel 'b', 2 time steps\)"):
        adapter.prepare({"record": [61.0, 27.0, 1.0], "vitals": bad_series})
    row = pd.DataFrame({"age": ["61"], "bmi": [27.0], "sex_M": ["F"]}).iloc[0]
    with pytest.raises(TypeError, match=r"\) in 'sex_M'\. Convert them to the numbers the "
                                        r"model was trained on"):         # ('61' is a number)
        adapter.prepare({"record": row, "vitals": series})


# -- 4. the model's own error on an instance, after a question of another length ---------------

class RefusesShortQuestions(Base):
    """Raises an error of its own (no shape in it) on questions of under 4 tokens."""

    def forward(self, image, question):
        if question.shape[1] < 4:
            raise RuntimeError("poisoned instance: this model refuses the image")
        return self.logits(image, question)


class OwnCheckSaysExpected(Base):
    """Its own error uses words torch's use too ("expected")."""

    def forward(self, image, question):
        if question.shape[1] < 4:
            raise RuntimeError("poisoned instance: expected a clean image")
        return self.logits(image, question)


class AssertsLength(Base):
    """A bare assert on the length: no words at all."""

    def forward(self, image, question):
        assert question.shape[1] == 4
        return self.logits(image, question)


class UnpacksFourWords(Base):
    """Takes questions of 4 words by unpacking them: a shorter one is a ValueError about
    unpacking, no shape in its words."""

    def forward(self, image, question):
        a, b, c, d = question.unbind(1)
        return self.logits(image, torch.stack([a, b, c, d], 1))


class FixedLength(Base):
    """Takes questions of 4 tokens only (a view over a fixed length)."""

    def forward(self, image, question):
        e = self.embedding(question).reshape(question.shape[0], 4 * 6)
        return self.classifier(torch.relu(self.fuse(e[:, :6] * image.mean((2, 3)).sum(1)[:, None])))


def test_the_models_own_error_is_not_blamed_on_a_shorter_question():
    """A question's length changes from instance to instance: a RuntimeError of the model's own
    code (no shape or size in it) was reported as the question's shape having changed, with
    the advice to check the modalities' shapes and order; an error about shapes still is."""
    adapter = make(RefusesShortQuestions())
    adapter.predict(adapter.prepare(INSTANCE).raw)                 # 4 tokens: fine
    with pytest.raises(ModelInputError) as err:
        adapter.predict(adapter.prepare({**INSTANCE, "question": "what colour"}).raw)
    text = str(err.value)
    assert "poisoned instance" in text and "the model's own code" in text
    assert WRONG_CAUSE not in text and "where the model last took" not in text
    assert "adapter.predict(adapter.prepare(instance).raw)" in text
    # torch's words, not single ones: "expected" alone is the model's own again
    own = make(OwnCheckSaysExpected())
    own.predict(own.prepare(INSTANCE).raw)
    with pytest.raises(ModelInputError) as err:
        own.predict(own.prepare({**INSTANCE, "question": "what colour"}).raw)
    assert "the model's own code" in str(err.value) and WRONG_CAUSE not in str(err.value)
    # an assertion (no words) after a length change: the length is suspected
    asserts = make(AssertsLength())
    asserts.predict(asserts.prepare(INSTANCE).raw)
    with pytest.raises(ModelInputError) as err:
        asserts.predict(asserts.prepare({**INSTANCE, "question": "what colour"}).raw)
    assert "where the model last took (4,)" in str(err.value)
    assert "the model's own code" not in str(err.value)
    unpacks = make(UnpacksFourWords())
    unpacks.predict(unpacks.prepare(INSTANCE).raw)
    with pytest.raises(ModelInputError) as err:
        unpacks.predict(unpacks.prepare({**INSTANCE, "question": "what colour"}).raw)
    assert "values to unpack" in str(err.value) and "where the model last took (4,)" in \
        str(err.value)
    fixed = make(FixedLength())
    fixed.predict(fixed.prepare(INSTANCE).raw)
    with pytest.raises(ModelInputError) as err:
        fixed.predict(fixed.prepare({**INSTANCE, "question": "what colour"}).raw)
    text = str(err.value)
    assert "Modality 'question' has shape (2,) per instance, where the model last took (4,)" \
        in text and WRONG_CAUSE in text and "the model's own code" not in text
