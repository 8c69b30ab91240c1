"""How the modalities and datasets read inputs given in common forms other than plain arrays:
pandas rows, frames, means and missing values, PIL images of every colour mode, grayscale
arrays in either layout, and text in scripts with combining marks or with emoji. Each test
says what a user got before."""
import random
import re
from collections import UserDict
import string
import unicodedata
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from multiviz_widgets import (Image, ModelAdapter, MultimodalDataset, Tabular, Text, TimeSeries,
                              check)

COLUMNS = ["age", "bmi", "glucose"]
#: a frame whose column order is not the modality's
FRAME = pd.DataFrame({"glucose": [90.0, 150.0], "age": [30.0, 70.0], "bmi": [22.0, 32.0]},
                     index=[10, 11])


def fp(columns, **kw):
    return MultimodalDataset(columns, **kw).fingerprint()


# ---------------------------------------------------------------------------------------------
# Tabular: means and baselines (defect 1)
# ---------------------------------------------------------------------------------------------
def test_tabular_means_and_baseline_given_by_name_follow_the_columns():
    """means=df.mean() raised "could not determine the shape of object type 'Series'",
    means={...} a TypeError "must be real number, not dict", and baseline=df.mean() was read
    by position: [120, 50, 27] for the columns age, bmi, glucose."""
    want = [50.0, 27.0, 120.0]
    for kw in (dict(baseline="mean", means=FRAME.mean()),
               dict(baseline="mean", means={"glucose": 120, "age": 50, "bmi": 27}),
               dict(baseline=FRAME.mean()),
               dict(baseline={"bmi": 27.0, "glucose": 120.0, "age": 50.0})):
        tab = Tabular("vitals", columns=COLUMNS, **kw)
        assert tab.baseline_raw(torch.zeros(3)).tolist() == want, kw


def test_tabular_means_as_a_plain_sequence_are_read_in_column_order_as_before():
    """Arrays, lists and Series without column labels (0..F-1) keep their position."""
    for means in ([1.0, 2.0, 3.0], np.array([1.0, 2.0, 3.0]), pd.Series([1.0, 2.0, 3.0]),
                  torch.tensor([1.0, 2.0, 3.0])):
        tab = Tabular("vitals", columns=COLUMNS, baseline="mean", means=means)
        assert tab.baseline_raw(torch.zeros(3)).tolist() == [1.0, 2.0, 3.0]
        assert tab.baseline_raw(torch.zeros(3)).dtype == torch.float32


def test_tabular_means_missing_a_column_name_are_refused_with_its_name():
    with pytest.raises(ValueError, match=r"means \(a dict\) has no value for the columns "
                                         r"\['glucose'\]; its keys that are not column names "
                                         r"are \['gluc'\]"):
        Tabular("vitals", columns=COLUMNS, baseline="mean",
                means={"age": 50, "bmi": 27, "gluc": 120})
    with pytest.raises(ValueError, match=r"baseline \(a pandas Series\) has no value for the "
                                         r"columns \['bmi'\]"):
        Tabular("vitals", columns=COLUMNS, baseline=FRAME.mean().drop("bmi"))


# ---------------------------------------------------------------------------------------------
# Tabular rows from pandas (defect 2)
# ---------------------------------------------------------------------------------------------
def test_a_dataframe_column_of_a_dataset_is_read_by_column_name():
    """MultimodalDataset({"vitals": df}) turned the frame into a bare array: with the frame's
    columns in another order than Tabular.columns, every row was silently misread
    ([90, 30, 22] for age 30, bmi 22, glucose 90)."""
    tab = Tabular("vitals", columns=COLUMNS)
    ds = MultimodalDataset({"vitals": FRAME})
    assert len(ds) == 2
    assert tab.to_tensor(ds[0]["vitals"]).tolist() == [30.0, 22.0, 90.0]
    assert tab.to_tensor(ds[-1]["vitals"]).tolist() == [70.0, 32.0, 150.0]   # by position
    batch = tab.batch([inst["vitals"] for _, insts in ds.batches(2) for inst in insts])
    assert batch.tolist() == [[30.0, 22.0, 90.0], [70.0, 32.0, 150.0]]


def test_the_fingerprint_of_a_dataframe_column_follows_its_values_and_column_names():
    """Rows are read by name, so two frames with the same numbers under other column names
    give other inputs: their fingerprints must differ (a hash of the values alone, as
    np.asarray gives them, would serve one's cached features for the other)."""
    base = fp({"vitals": FRAME})
    assert fp({"vitals": FRAME.copy()}) == base
    assert fp({"vitals": FRAME.set_axis(["age", "glucose", "bmi"], axis=1)}) != base
    assert fp({"vitals": FRAME.rename(columns={"bmi": "bmi_kg_m2"})}) != base
    assert fp({"vitals": FRAME.to_numpy()}) != base
    frame = FRAME.copy()
    ds = MultimodalDataset({"vitals": frame})
    before = ds.fingerprint()
    frame.iloc[1, 2] = 33.0                                   # an edit in place shows
    assert ds.fingerprint() != before
    # a Series (a row given as an instance) is hashed with its labels too
    row = FRAME.iloc[0]
    assert fp({"vitals": [row]}) != fp({"vitals": [row.set_axis(["age", "bmi", "glucose"])]})
    assert fp({"vitals": [row]}) == fp({"vitals": [row.copy()]})


def test_a_pandas_row_naming_some_columns_but_not_all_is_refused():
    """With one column renamed (glucose -> glucose_mg_dl) the row fell back silently to
    position: age read 90 (the glucose), bmi 30 (the age)."""
    tab = Tabular("vitals", columns=COLUMNS)
    renamed = FRAME.rename(columns={"glucose": "glucose_mg_dl"}).iloc[0]
    with pytest.raises(ValueError, match=r"no value for the columns \['glucose'\]; its labels "
                                         r"that are not column names are \['glucose_mg_dl'\]"):
        tab.to_tensor(renamed)
    # integer labels, none a column name (a RangeIndex): by position, as before
    assert tab.to_tensor(pd.Series([1.0, 2.0, 3.0])).tolist() == [1.0, 2.0, 3.0]
    # extra labels (a label column) are fine when every column is named
    row = FRAME.assign(label=[1, 0]).iloc[1]
    assert tab.to_tensor(row).tolist() == [70.0, 32.0, 150.0]


def test_numpy_rows_read_as_before():
    """Rows given as arrays or lists, in column order, give what they gave (dtype included)."""
    tab = Tabular("vitals", columns=COLUMNS)
    assert tab.to_tensor(np.array([1.0, 2.0, 3.0])).dtype == torch.float64
    assert tab.to_tensor(np.array([1, 2, 3])).dtype == torch.float32
    assert tab.to_tensor([1.5, 2.0, 3.0]).tolist() == [1.5, 2.0, 3.0]
    assert tab.to_tensor(FRAME.astype("float32").iloc[0]).dtype == torch.float32
    assert tab.to_tensor(FRAME.iloc[0]).dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# Image: grayscale channels-first, PIL colour modes (defects 3 and 5)
# ---------------------------------------------------------------------------------------------
def test_a_grayscale_array_is_one_channel_in_either_layout():
    """With channels_last_raw=False an H x W array became [H, W, 1]: 28 "channels" of a
    20 x 1 image, with 5 units instead of 35."""
    gray = (np.arange(28 * 20) % 256).astype(np.uint8).reshape(28, 20)
    want = torch.from_numpy(gray).float().div(255).unsqueeze(0)
    for channels_last in (True, False):
        m = Image("image", patch=4, channels_last_raw=channels_last)
        t = m.to_tensor(gray)
        assert tuple(t.shape) == m.input_shape(gray) == (1, 28, 20)
        assert torch.equal(t, want)
        assert m.n_units(t) == 35
    chw = np.zeros((3, 6, 5), np.uint8)                       # 3-D arrays as before
    assert Image("image", channels_last_raw=False).input_shape(chw) == (3, 6, 5)
    assert Image("image").input_shape(np.zeros((6, 5, 3), np.uint8)) == (3, 6, 5)


def _two_colours() -> np.ndarray:
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 2] = 255
    rgb[4:12, 4:12] = [255, 0, 0]
    return rgb


def test_a_palette_image_is_read_as_its_colours():
    """A mode-P image was read as one channel of palette indices (grey levels 15/255 and
    190/255 for a red square on blue)."""
    import PIL.Image as PIL
    rgb = _two_colours()
    m = Image("image")
    palette = PIL.fromarray(rgb).convert("P")
    assert torch.equal(m.to_tensor(palette), m.to_tensor(rgb))
    # with a transparent palette entry: RGBA, that entry's alpha 0
    transparent = palette.copy()
    transparent.info["transparency"] = int(np.asarray(palette)[0, 0])
    t = m.to_tensor(transparent)
    assert t.shape == (4, 16, 16)
    assert torch.equal(t[:3], m.to_tensor(rgb)) and t[3, 0, 0] == 0 and t[3, 8, 8] == 1


@pytest.mark.parametrize("mode", ["CMYK", "YCbCr", "HSV", "LAB", "RGBX"])
def test_images_in_other_colour_spaces_are_read_as_rgb(mode):
    """CMYK gave four channels (ink amounts), YCbCr, HSV and LAB three channels that were
    taken for red, green and blue."""
    import PIL.Image as PIL
    rgb = _two_colours()
    t = Image("image").to_tensor(PIL.fromarray(rgb).convert(mode))
    assert t.shape == (3, 16, 16)
    # the colour as PIL converts back (LAB round-trips loosely): red square, blue around
    assert t[0, 8, 8] > 0.7 and t[2, 8, 8] < 0.3 and t[2, 0, 0] > 0.7 and t[0, 0, 0] < 0.3


def test_rgb_and_grey_pil_images_read_and_hash_as_before():
    """RGB, L and RGBA images are not converted: the same tensor and fingerprint as their
    arrays."""
    import PIL.Image as PIL
    rgb = _two_colours()
    for arr in (rgb, rgb[..., 0], np.dstack([rgb, np.full((16, 16), 200, np.uint8)])):
        img = PIL.fromarray(arr)
        assert torch.equal(Image("image").to_tensor(img), Image("image").to_tensor(arr))
        assert fp({"image": [img]}) == fp({"image": [arr]})


def test_palette_images_differing_only_in_their_palette_have_different_fingerprints():
    """The fingerprint hashed the palette indices: two palette images of other colours (the
    same indices) had one fingerprint, so one's cached features were served for the other."""
    import PIL.Image as PIL
    a = PIL.fromarray(_two_colours()).convert("P")
    b = a.copy()
    i, j = map(int, np.unique(np.asarray(a)))                  # the two entries used
    pal = a.getpalette()
    pal[3 * i:3 * i + 3], pal[3 * j:3 * j + 3] = pal[3 * j:3 * j + 3], pal[3 * i:3 * i + 3]
    b.putpalette(pal)                                          # their colours swapped
    assert np.array_equal(np.asarray(a), np.asarray(b))       # the same indices
    assert not torch.equal(Image("image").to_tensor(a), Image("image").to_tensor(b))
    assert fp({"image": [a]}) != fp({"image": [b]})
    assert fp({"image": [a]}) == fp({"image": [a.copy()]})


# ---------------------------------------------------------------------------------------------
# Text: combining marks, NFC, emoji (defect 4)
# ---------------------------------------------------------------------------------------------
SCRIPTS = ["हिन्दी", "नमस्ते", "ไทย", "عَرَبِيّ", "café"]


def test_words_with_combining_marks_are_one_token():
    """\\w excludes combining marks (Unicode M*): हिन्दी was split into ह, न, द (its vowel
    signs and virama dropped as punctuation), عَرَبِيّ lost its harakat, and every piece was
    [UNK]."""
    t = Text("q", vocab=["[PAD]", "[UNK]"] + SCRIPTS)
    for word in SCRIPTS:
        assert t.tokenize(word) == [word]
        assert t.to_tensor(word).tolist() == [t.token_to_id[word]]
    assert t.tokenize("नमस्ते, हिन्दी!") == ["नमस्ते", "हिन्दी"]


def test_a_decomposed_accent_is_the_same_word_as_the_composed_one():
    """'café' written as e + a combining accent (NFD, as macOS file names and some inputs
    give it) became 'cafe' (the accent dropped as punctuation): [UNK]."""
    t = Text("q", vocab=["[PAD]", "[UNK]", "what", "is", "café"])
    nfd = unicodedata.normalize("NFD", "What is café?")
    assert t.tokenize(nfd) == ["what", "is", "café"]
    assert t.to_tensor(nfd).tolist() == t.to_tensor("What is café?").tolist() == [2, 3, 4]
    assert t.tokenize("İ") == ["i"]                           # lower() adds a combining dot


def test_emoji_in_the_vocabulary_are_kept():
    """Emoji were dropped as punctuation even when in the vocabulary; a text of emoji only
    raised "has no tokens"."""
    t = Text("q", vocab=["[PAD]", "[UNK]", "naïve", "👍", "❤", "👨‍👩‍👧"])
    assert t.tokenize("naïve 👍") == ["naïve", "👍"]
    assert t.to_tensor("👍").tolist() == [3]
    assert t.tokenize("👍🏽 ❤️") == ["👍", "❤"]                 # skin tone, variation selector
    assert t.tokenize("👨‍👩‍👧!") == ["👨‍👩‍👧"]                    # one joined emoji, one token
    # punctuation and symbols outside the vocabulary are still dropped
    assert t.tokenize("naïve?! 🙂") == ["naïve"]
    assert Text("q", vocab=["[PAD]", "[UNK]"], drop_punctuation=False).tokenize(
        "👍🏽 ok!") == ["👍🏽", "ok", "!"]
    with pytest.raises(ValueError, match="no tokens.*outside the vocabulary.*drop_punctuation"):
        t.to_tensor("🙂?")


def _old_tokenize(text: str, drop_punctuation: bool) -> list[str]:
    """The default tokenizer as it was, for ASCII text (which it handled right)."""
    text = text.lower().translate(str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"}))
    toks = re.findall(r"\w+(?:'\w+)*|[^\w\s]", text)
    return [t for t in toks if re.match(r"\w", t)] if drop_punctuation else toks


@pytest.mark.parametrize("drop_punctuation", [True, False])
def test_ascii_text_is_tokenised_exactly_as_before(drop_punctuation):
    """The Unicode rules must not move one ASCII token (easy-VQA's trained model depends on
    its questions' token ids)."""
    rng = random.Random(0)
    texts = ["What is the red shape?", "Is there a blue circle in the image?", "don't 'red'",
             "dogs' c'est", "x_y 1,000.5 e.g. can't!", "it\u2019s a--b"]
    texts += ["".join(rng.choice(string.printable) for _ in range(rng.randint(0, 30)))
              for _ in range(3000)]
    # a vocabulary from a real tokenizer holds every ASCII mark: they are dropped all the same
    vocab = ["[PAD]", "[UNK]", "what", "is"] + list(string.punctuation)
    t = Text("q", vocab=vocab, drop_punctuation=drop_punctuation)
    for text in texts:
        assert t.tokenize(text) == _old_tokenize(text, drop_punctuation), text


# ---------------------------------------------------------------------------------------------
# TimeSeries from a DataFrame (defect 6)
# ---------------------------------------------------------------------------------------------
def test_a_timeseries_dataframe_is_read_by_channel_name():
    """A frame ordered spo2, hr was read by position: the unit labelled 'hr' held SpO2."""
    ts = TimeSeries("vitals", window=2, channels=["hr", "spo2"])
    df = pd.DataFrame({"spo2": [97.0, 96.0, 95.0, 94.0], "hr": [60.0, 61.0, 62.0, 63.0]})
    t = ts.to_tensor(df)
    assert t[:, 0].tolist() == [60.0, 61.0, 62.0, 63.0]
    assert t[:, 1].tolist() == [97.0, 96.0, 95.0, 94.0]
    assert ts.to_tensor(df.assign(note=1.0)).tolist() == t.tolist()       # other columns
    # no column label a channel name (pd.DataFrame(array)): by position, as before
    assert ts.to_tensor(pd.DataFrame(df.to_numpy())).tolist() == df.to_numpy().tolist()
    with pytest.raises(ValueError, match=r"no column for the channels \['spo2'\]; its columns "
                                         r"that are not channel names are \['SpO2'\]"):
        ts.to_tensor(df.rename(columns={"spo2": "SpO2"}))


# ---------------------------------------------------------------------------------------------
# Missing values and read-only arrays (defect 7)
# ---------------------------------------------------------------------------------------------
def test_pd_na_in_a_row_is_reported_as_a_missing_value():
    """pd.NA (nullable Float64 columns) gave "float() argument must be a string or a real
    number, not 'NAType'" where NaN gave the clear "impute missing values" finding."""
    tab = Tabular("vitals", columns=["age", "bmi"])
    adapter = ModelAdapter(nn.Sequential(nn.Linear(2, 2)), [tab], ["a", "b"])
    df = pd.DataFrame({"age": [30.0, None], "bmi": [22.0, 31.0]}).astype("Float64")
    for row in (df.iloc[1], df.astype(float).iloc[1], {"age": pd.NA, "bmi": 3.0},
                {"age": None, "bmi": 3.0}):
        finding = str(check(adapter, {"vitals": row}).findings[0])
        assert "impute missing values" in finding, (row, finding)
    assert tab.to_tensor(df.iloc[0]).tolist() == [30.0, 22.0]
    series = pd.DataFrame({"hr": [60.0, None]}, dtype="Float64")
    t = TimeSeries("s", channels=["hr"]).to_tensor(series)
    assert t[0, 0] == 60 and torch.isnan(t[1, 0])


def test_read_only_arrays_from_pandas_are_copied():
    """pandas hands out read-only views of a frame, and torch.from_numpy shared them: it
    warned "The given NumPy array is not writable" (once per process), and writing to the
    tensor wrote into the user's DataFrame."""
    ts = TimeSeries("s", channels=["hr", "spo2"])
    tab = Tabular("vitals", columns=COLUMNS)
    frame = pd.DataFrame({"hr": [60.0, 61.0], "spo2": [97.0, 96.0]})
    read_only = np.array([1.0, 2.0, 3.0])
    read_only.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensors = [tab.to_tensor(FRAME.iloc[0]), tab.to_tensor(read_only), ts.to_tensor(frame),
                   Tabular("vitals", columns=COLUMNS, baseline=FRAME.mean()).baseline_raw(
                       torch.zeros(3))]
    for t in tensors:
        t.fill_(-1.0)
    assert frame.to_numpy().tolist() == [[60.0, 97.0], [61.0, 96.0]]
    assert read_only.tolist() == [1.0, 2.0, 3.0]
    assert FRAME["age"].tolist() == [30.0, 70.0]


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8, torch.int32])
def test_token_ids_of_any_integer_type_are_read(dtype):
    """Before: int16 or uint8 ids (a compact corpus) were refused as 'not an integer tensor'."""
    text = Text("q", vocab=["[PAD]", "[UNK]", "a", "b"])
    assert text.to_tensor(torch.tensor([2, 3], dtype=dtype)).tolist() == [2, 3]
    for bad in (torch.tensor([2.0]), torch.tensor([True])):
        with pytest.raises(ValueError, match="1-D integer tensor"):
            text.to_tensor(bad)


@pytest.mark.parametrize("dtype", [">u1", ">i2", ">f4", ">f8"])
def test_big_endian_arrays_are_read_with_their_values_and_precision(dtype):
    """Before: big-endian integers (FITS images) raised torch's byte-order error, and
    big-endian float64 was rounded to float32."""
    values = np.array([[0, 1], [1, 0]]) * (0.5 if dtype[1] == "f" else 7)
    got = Image("im", channels_last_raw=False).to_tensor(values[None].astype(dtype))
    want = Image("im", channels_last_raw=False).to_tensor(
        values[None].astype(np.dtype(dtype).newbyteorder("=")))
    assert got.dtype == want.dtype and torch.equal(got, want)
    series = TimeSeries("s", window=1, channels=["x"]).to_tensor(
        np.array([[0.25], [0.5]], dtype=">f8"))
    assert series.dtype == torch.float64 and series[:, 0].tolist() == [0.25, 0.5]


@pytest.mark.parametrize("missing", [float("nan"), None, np.float32("nan"), pd.NA, pd.NaT])
def test_a_missing_text_is_called_missing(missing):
    """Before: an empty DataFrame cell gave 'expected a string ..., got float'."""
    with pytest.raises(ValueError, match="the text is missing"):
        Text("q", vocab=["[PAD]", "[UNK]", "a"]).to_tensor(missing)


# ---------------------------------------------------------------------------------------------
# Text: a vocabulary that spells its special tokens otherwise
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pad, unk", [("<pad>", "<unk>"), ("<PAD>", "<UNK>"), ("[pad]", "[unk]"),
                                      ("<|pad|>", "<|unk|>")])
def test_a_vocabulary_with_other_special_spellings_says_which_tokens_to_pass(pad, unk):
    """Text(vocab=[..., '<pad>', '<unk>', ...]) said "add '[PAD]' to the vocabulary", which
    gives it an id beyond the model's embedding rows."""
    vocab = ["hello", pad, unk, "world"]
    with pytest.raises(ValueError, match=re.escape(f"pass pad_token={pad!r}, unk_token={unk!r}")):
        Text("q", vocab=vocab)
    with pytest.raises(ValueError, match=re.escape(f"pass unk_token={unk!r}")) as err:
        Text("q", vocab=vocab, pad_token=pad)
    assert "pad_token=" not in str(err.value).split("pass ")[1]
    t = Text("q", vocab=vocab, pad_token=pad, unk_token=unk)         # the advice works
    assert (t.pad_id, t.unk_id) == (1, 2)


def test_plain_words_pad_and_unk_are_not_taken_for_special_tokens():
    """A vocabulary holding the words "pad" and "unk" (a shoulder pad) gets no advice to pad
    with them."""
    with pytest.raises(ValueError, match="Pass the vocabulary's own") as err:
        Text("q", vocab=["a", "pad", "unk"])
    assert "pad_token='pad'" not in str(err.value)


def test_a_vocabulary_with_its_pad_but_no_unk_names_both_findings():
    with pytest.raises(ValueError, match=r"pass pad_token='<pad>' to Text\(\.\.\.\); unk_token "
                                         r"must also name a token"):
        Text("q", vocab=["<pad>", "a"])
    with pytest.raises(ValueError, match=r"must contain pad_token '\[PAD\]' and unk_token "
                                         r"'\[UNK\]'\. Pass the vocabulary's own"):
        Text("q", vocab=["a", "b"])


# ---------------------------------------------------------------------------------------------
# Reviewed defects: tokenizers' return types, image layouts and depths, pandas labels, pd.NA
# ---------------------------------------------------------------------------------------------
VQA_VOCAB = ["[PAD]", "[UNK]", "what", "colour", "is", "the", "car"]


@pytest.mark.parametrize("container", [dict, UserDict])
def test_a_tokenizer_returning_a_dict_of_ids_is_refused_with_the_fix(container):
    """A HuggingFace tokenizer called on the text gives a BatchEncoding (a UserDict): its key
    names were read as the tokens, ids all [UNK] and labels ['input_ids', 'attention_mask'],
    and check() said OK."""
    ids = {t: i for i, t in enumerate(VQA_VOCAB)}

    def hf_like(s):
        words = s.split()
        return container(input_ids=[ids.get(w, 1) for w in words], attention_mask=[1] * len(words))
    text = Text("q", vocab=VQA_VOCAB, tokenize=hf_like)
    with pytest.raises(TypeError, match=r"tokenize returned a \w+ with the keys \['input_ids', "
                                        r"'attention_mask'\]") as err:
        text.to_tensor("what colour is the car")
    assert "must return the list of token strings" in str(err.value)
    assert "tokenize=tokenizer.tokenize" in str(err.value)
    adapter = ModelAdapter(nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(8, 2)),
                           [text], ["no", "yes"])
    report = check(adapter, {"q": "what colour"})
    assert not report.ok and "tokenize=tokenizer.tokenize" in str(report)


@pytest.mark.parametrize("tokenize", [lambda s: map(str.lower, s.split()),
                                      lambda s: (w for w in s.lower().split()),
                                      lambda s: tuple(s.lower().split())])
def test_a_tokenizer_returning_a_generator_or_map_is_read(tokenize):
    """Before: the type check consumed a generator or map, and the text 'had no tokens'."""
    text = Text("q", vocab=VQA_VOCAB, tokenize=tokenize)
    assert text.to_tensor("What colour is the car").tolist() == [2, 3, 4, 5, 6]
    assert text.tokenize("What colour") == ["what", "colour"]
    with pytest.raises(TypeError, match="tokenize must return a list of token strings, got "
                                        "NoneType"):
        Text("q", vocab=VQA_VOCAB, tokenize=lambda s: None).to_tensor("what")


def test_a_pil_image_is_height_width_channels_whatever_channels_last_raw():
    """With channels_last_raw=False (a dataset of C x H x W arrays) a 32 x 48 RGB PIL image
    became a (32, 48, 3) image: 32 channels of 48 x 3."""
    from PIL import Image as PILImage
    rng = np.random.default_rng(0)
    pixels = (rng.random((32, 48, 3)) * 255).astype(np.uint8)
    first = Image("image", channels_last_raw=False)
    want = Image("image").to_tensor(pixels)
    assert want.shape == (3, 32, 48)
    assert torch.equal(first.to_tensor(PILImage.fromarray(pixels)), want)
    assert torch.equal(first.to_tensor(pixels.transpose(2, 0, 1)), want)
    grey = PILImage.fromarray(pixels[..., 0])
    assert first.to_tensor(grey).shape == (1, 32, 48)


def test_a_channels_last_array_is_refused_when_the_modality_reads_channels_first():
    """The mirror of the channels-last check: an H x W x C array given to a modality with
    channels_last_raw=False was read as C x H x W, shape (32, 48, 3)."""
    first = Image("image", channels_last_raw=False)
    with pytest.raises(ValueError, match=r"channels_last_raw=False, so an image array must be C "
                                         r"x H x W, and shape \(32, 48, 3\) looks like H x W x "
                                         r"C: pass array.transpose\(2, 0, 1\)"):
        first.to_tensor(np.zeros((32, 48, 3), np.float32))
    assert first.to_tensor(np.zeros((3, 32, 3), np.uint8)).shape == (3, 32, 3)   # ambiguous
    assert first.to_tensor(np.zeros((4, 32, 48), np.uint8)).shape == (4, 32, 48)


@pytest.mark.parametrize("make", [
    lambda a: a, lambda a: a.astype(np.uint32), lambda a: a.astype(">u2"),
    lambda a: torch.from_numpy(a.astype(np.int32)).to(torch.uint16)[None],
])
def test_wide_unsigned_pixels_are_refused_whatever_their_values(make):
    """A dim 16-bit scan (values 0..199 of 0..65535) was divided by 255: its brightest pixel
    read 0.78 where it is 0.003, while a brighter scan of the same dataset was refused."""
    dark = np.random.default_rng(0).integers(0, 200, (16, 16)).astype(np.uint16)
    with pytest.raises(ValueError, match=r"pixels are not 8-bit levels \(0\.\.255\), whatever "
                                         r"the values of this image") as err:
        Image("image").to_tensor(make(dark))
    assert "pass pixels / 65535 as floats" in str(err.value)
    # 8-bit levels in a signed wider type (np.array of Python ints) are read as before
    assert float(Image("image").to_tensor(dark.astype(np.int64)).max()) == pytest.approx(
        int(dark.max()) / 255)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_pil_images_of_16_or_32_bit_pixels_are_refused(mode):
    """PIL's 16-bit modes (a 16-bit PNG) were divided by 255 when their values were small."""
    from PIL import Image as PILImage
    img = PILImage.new(mode, (8, 6), 199)
    with pytest.raises(ValueError, match=f"a PIL image of mode {re.escape(repr(mode))} holds 16- "
                                         "or 32-bit integer pixels") as err:
        Image("image").to_tensor(img)
    assert "np.asarray(img) / 65535" in str(err.value)


@pytest.mark.parametrize("kind", ["pil", "tensor"])
def test_an_image_label_pair_is_named_as_such(kind):
    """An (image, label) pair from a torchvision dataset gave numpy's "setting an array element
    with a sequence ... inhomogeneous shape", naming neither the modality nor the pair."""
    from PIL import Image as PILImage
    image = (PILImage.fromarray(np.zeros((8, 8, 3), np.uint8)) if kind == "pil"
             else torch.rand(3, 8, 8))
    with pytest.raises(TypeError, match=r"photo: an image must be one array of numbers .* "
                                        r"It looks like an \(image, label\) pair") as err:
        Image("photo").to_tensor((image, 3))
    assert "labels=" in str(err.value)


def test_complex_image_tensors_are_refused_as_complex_arrays_are():
    """A complex tensor lost its imaginary parts (with torch's warning) and its real parts
    were read as 0..255 pixels; a complex array was refused."""
    with pytest.raises(TypeError, match=r"img: an image must hold real pixel values, got a "
                                        r"torch.complex64 tensor; pass the magnitude"):
        Image("img").to_tensor(torch.full((3, 4, 4), 200 + 5j))
    with pytest.raises(TypeError, match="array of numbers"):
        Image("img").to_tensor(np.full((4, 4, 3), 0.5 + 1j))
    with pytest.raises(TypeError, match="expected real numbers, got complex"):
        Tabular("t", columns=["a"]).to_tensor(np.array([1 + 2j]))


def test_pandas_labels_that_name_no_column_are_refused_not_read_by_position():
    """A frame with the columns BP, HR for Tabular(columns=['hr', 'bp']) was read by position:
    hr = 120 (the blood pressure), bp = 60; a dict with those keys was refused."""
    tab = Tabular("vitals", columns=["hr", "bp"])
    df = pd.DataFrame({"BP": [120.0, 130.0], "HR": [60.0, 70.0]})
    row = MultimodalDataset({"vitals": df})[0]["vitals"]
    message = (r"vitals: the row \(a {}\) has no value for the columns \['hr', 'bp'\]; its {} "
               r"that are not column names are \['{}', '{}'\]\. Names are case-sensitive: "
               r"'HR' is not 'hr'\. Name the values by the columns")
    with pytest.raises(ValueError, match=message.format("pandas Series", "labels", "BP", "HR")):
        tab.to_tensor(row)
    with pytest.raises(ValueError, match=message.format("dict", "keys", "HR", "BP")):
        tab.to_tensor({"HR": 60.0, "BP": 120.0})       # as a dict row already was
    with pytest.raises(ValueError, match=r"no value for the columns \['hr', 'bp'\]"):
        tab.to_tensor(pd.Series([1.0, 2.0], index=["x", "y"]))
    assert tab.to_tensor(df.rename(columns=str.lower).iloc[0]).tolist() == [60.0, 120.0]
    assert tab.to_tensor(pd.Series([60.0, 120.0])).tolist() == [60.0, 120.0]     # RangeIndex
    ts = TimeSeries("ecg", window=2, channels=["lead1", "lead2"])
    frame = pd.DataFrame({"Lead2": [5.0, 6.0], "Lead1": [1.0, 2.0]})
    with pytest.raises(ValueError, match=r"no column for the channels \['lead1', 'lead2'\].*"
                                         r"Names are case-sensitive"):
        ts.to_tensor(frame)
    assert ts.to_tensor(pd.DataFrame(frame.to_numpy())).tolist() == [[5.0, 1.0], [6.0, 2.0]]


@pytest.mark.parametrize("missing", [pd.NA, pd.NaT, None])
def test_pd_na_and_nat_in_lists_and_object_arrays_are_missing_values(missing):
    """pd.NA or pd.NaT in a list or an object array (df.to_numpy() of a nullable column) gave
    "float() argument must be a string or a real number, not 'NAType'", not the "impute
    missing values" of NaN."""
    tab = Tabular("vitals", columns=["age", "bmi"])
    adapter = ModelAdapter(nn.Sequential(nn.Linear(2, 2)), [tab], ["a", "b"])
    for row in ([30.0, missing], np.array([30.0, missing], dtype=object)):
        t = tab.to_tensor(row)
        assert t[0] == 30 and torch.isnan(t[1])
        finding = str(check(adapter, {"vitals": row}).findings[0])
        assert "impute missing values" in finding, finding
    frame = pd.DataFrame({"age": [30.0, None], "bmi": [22.0, 31.0]}, dtype="Float64")
    finding = str(check(adapter, MultimodalDataset({"vitals": frame.to_numpy()})[1]).findings[0])
    assert "impute missing values" in finding, finding
    series = TimeSeries("s", channels=["hr"]).to_tensor([[60.0], [missing]])
    assert series[0, 0] == 60 and torch.isnan(series[1, 0])
    with pytest.raises(TypeError, match="expected numbers"):
        tab.to_tensor(np.array([30.0, "high"], dtype=object))


def test_pre_tokenised_text_and_ids_in_a_list_say_how_to_pass_them():
    """The CMU-MOSEI SDK gives words as a list, and ids often come as numpy arrays: the refusal
    says what to pass instead."""
    from multiviz_widgets import Text
    t = Text("question", ["[PAD]", "[UNK]", "what", "is", "red"])
    with pytest.raises(TypeError, match=r"got list\. A list of words .*' '\.join\(words\)"):
        t.to_tensor(["what", "is", "red"])
    for ids in ([2, 3], np.array([2, 3])):
        with pytest.raises(TypeError, match=r"torch\.as_tensor\(ids, dtype=torch\.long\)"):
            t.to_tensor(ids)
    assert t.to_tensor(" ".join(["what", "is", "red"])).tolist() == [2, 3, 4]
    assert t.to_tensor(torch.as_tensor(np.array([2, 3]), dtype=torch.long)).tolist() == [2, 3]
    with pytest.raises(TypeError, match=r"got dict\.$"):
        t.to_tensor({"a": 1})


@pytest.mark.parametrize("modality, batched", [
    (lambda: Tabular("vitals", columns=["hr", "bp", "t"]), np.zeros((1, 3), np.float32)),
    (lambda: TimeSeries("ecg", window=2, channels=["a", "b"]), np.zeros((1, 6, 2), np.float32)),
    (lambda: Text("question", vocab=["[PAD]", "[UNK]", "red"]),
     torch.zeros(1, 4, dtype=torch.long)),
    (lambda: Image("image", patch=2), np.zeros((1, 4, 4, 3), np.float32)),
    (lambda: Image("image", patch=2), torch.zeros(1, 3, 4, 4)),
])
def test_a_batch_of_one_given_for_an_instance_says_to_pass_the_instance(modality, batched):
    """A row of shape (1, 20), a series (1, 200, 3) or ids (1, T) were refused with the shape
    only; a leftover batch dimension now gets its fix."""
    with pytest.raises(ValueError, match=r"It looks like a batch of one \(shape \[1, \.\.\.\]\): "
                                         r"pass the instance itself, x\[0\]"):
        modality().to_tensor(batched)
    assert modality().to_tensor(batched[0]).shape[0] > 0


def test_the_batch_of_one_hint_fits_what_was_given():
    """A one-row DataFrame was told to pass x[0] (a KeyError on a frame: x.iloc[0] it is), and
    a row of the wrong width in a batch of one was told to pass x[0], which fails too."""
    tab = Tabular("vitals", columns=["hr", "bp", "t"])
    frame = pd.DataFrame([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], columns=["hr", "bp", "t"])
    with pytest.raises(ValueError, match=r"pass the instance itself, x\.iloc\[0\]"):
        tab.to_tensor(frame.iloc[[0]])
    assert tab.to_tensor(frame.iloc[0]).tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError) as e:
        tab.to_tensor(np.zeros((1, 5), np.float32))
    assert "batch of one" not in str(e.value)
    with pytest.raises(ValueError) as e:
        TimeSeries("ecg", window=2, channels=["a", "b"]).to_tensor(np.zeros((1, 6, 3)))
    assert "batch of one" not in str(e.value)
