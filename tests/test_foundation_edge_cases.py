"""Edge cases of the foundation layer (modalities, datasets, checks, the adapter doctor) found in
a bug hunt: each was a crash, a confusing error or a silently wrong result."""
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from multiviz_widgets import Image, ModelAdapter, MultimodalDataset, Tabular, Text, TimeSeries
from multiviz_widgets.checks import is_integer, positive_int
from multiviz_widgets.doctor import check

VOCAB = ["[PAD]", "[UNK]", "what", "is", "the", "red", "shape", "don't"]


# ---------------------------------------------------------------------------------------------
# Image
# ---------------------------------------------------------------------------------------------
def test_16bit_pixels_are_a_clear_error_not_a_crash():
    """uint16 arrays (16-bit PNGs, PIL 'I;16') crashed in torch's min() (NotImplementedError)."""
    from PIL import Image as PILImage
    m = Image("image")
    # refused whatever their values: 200 of 0..65535 is not 200 of 0..255
    for raw in (np.full((4, 5, 3), 200, np.uint16), np.full((4, 5, 3), 1000, np.uint16),
                PILImage.fromarray(np.full((4, 5), 1000, np.uint16))):
        with pytest.raises(ValueError, match="65535"):
            m.to_tensor(raw)


def test_nan_pixels_are_named_as_such():
    with pytest.raises(ValueError, match="NaN"):
        Image("image").to_tensor(np.full((4, 4, 3), np.nan, np.float32))


def test_a_channels_first_array_is_refused_with_the_fix():
    """A C x H x W array read as H x W x C became a [32, 3, 32] image (tensors were checked)."""
    arr = np.zeros((3, 32, 32), np.uint8)
    with pytest.raises(ValueError, match="transpose"):
        Image("image").to_tensor(arr)
    assert Image("image", channels_last_raw=False).to_tensor(arr).shape == (3, 32, 32)
    assert Image("image").to_tensor(np.zeros((3, 32, 3), np.uint8)).shape == (3, 3, 32)


@pytest.mark.parametrize("baseline, match", [
    (float("nan"), "in \\[0, 1\\]"), (True, "number"), ([0.1, 0.2, 0.3], "number"),
    (128, "0.502"), ("grey", "not one of"),
])
def test_image_numeric_baselines_are_checked_at_construction(baseline, match):
    with pytest.raises(ValueError, match=match):
        Image("image", baseline=baseline)
    assert float(Image("image", baseline=0.5).baseline_raw(torch.rand(3, 2, 2)).max()) == 0.5


@pytest.mark.parametrize("shape", [(3, 1, 20), (3, 20, 1), (1, 1, 7)])
def test_superpixels_of_images_one_pixel_thin(shape):
    """An image thinner than half a superpixel step had no centres (argmin of an empty array)."""
    m = Image("image", superpixels=5)
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    idx = m.unit_index(x)
    n = m.n_units(x)
    assert idx.shape == x.shape and n >= 1
    assert (torch.bincount(idx.reshape(-1), minlength=n) > 0).all()


def test_superpixels_follow_the_pixels_not_the_tensor_address():
    """The cache was keyed by address, shape and sum: a flipped copy written into the same
    tensor kept the segments of the unflipped image."""
    m = Image("image", superpixels=6)
    x = torch.zeros(3, 16, 16)
    x[:, :, :5] = 1.0
    before = m.unit_index(x).clone()
    x.copy_(x.flip(-1))
    assert torch.equal(m.unit_index(x), Image("image", superpixels=6).unit_index(x))
    assert not torch.equal(m.unit_index(x), before)


def test_read_only_arrays_convert_without_a_warning():
    from PIL import Image as PILImage
    img = PILImage.fromarray(np.full((4, 5), 0.5, np.float32))          # mode F: read-only array
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = Image("image").to_tensor(img)
    assert t.shape == (1, 4, 5)


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------
def test_a_tokenizer_returning_a_string_or_ids_is_a_clear_error():
    """A string was split into characters and ids were looked up as tokens: all [UNK]."""
    for tok in (lambda s: s, lambda s: [2, 3]):
        with pytest.raises(TypeError, match="list of token strings"):
            Text("q", vocab=VOCAB, tokenize=tok).to_tensor("what is")
    assert Text("q", vocab=VOCAB, tokenize=str.split).to_tensor("what is").tolist() == [2, 3]


def test_quoted_words_and_typographic_apostrophes_find_their_tokens():
    m = Text("q", vocab=VOCAB)
    assert m.tokenize("What is 'red'?") == ["what", "is", "red"]
    assert m.to_tensor("don\u2019t").tolist() == [7]
    assert m.tokenize("dogs' don't") == ["dogs", "don't"]
    assert Text("q", vocab=VOCAB, drop_punctuation=False).tokenize("'red'") == ["'", "red", "'"]


def test_bad_vocabularies_are_clear_errors():
    with pytest.raises(TypeError, match="single string"):
        Text("q", vocab="[PAD] [UNK] red")
    with pytest.raises(ValueError, match="twice"):
        Text("q", vocab=["[PAD]", "[UNK]", "a", "a"])
    with pytest.raises(TypeError, match="strings"):
        Text("q", vocab=["[PAD]", "[UNK]", 3])


def test_a_vocab_dict_is_ordered_by_its_ids():
    """tokenizer.get_vocab() is {token: id} in no particular order: its keys were taken as the
    list (index = id), so every id was wrong."""
    m = Text("q", vocab={"red": 2, "[UNK]": 1, "[PAD]": 0, "shape": 3})
    assert m.vocab == ["[PAD]", "[UNK]", "red", "shape"]
    assert m.to_tensor("red shape").tolist() == [2, 3]
    with pytest.raises(ValueError, match="0..2"):
        Text("q", vocab={"[PAD]": 0, "[UNK]": 1, "red": 5})


@pytest.mark.parametrize("modality", [Text("q", vocab=VOCAB), Image("image"),
                                      Tabular("t", columns=["a"])])
def test_a_batch_of_no_instances_is_a_clear_error(modality):
    with pytest.raises(ValueError, match="at least one instance"):
        modality.batch([])


def test_text_zero_baseline_has_a_continuous_form():
    """Text(baseline="zero") promised zero embeddings; the hook that gives them (the adapter
    must call it, see the report) maps the [PAD] embedding to zeros."""
    emb = torch.ones(3, 4)
    assert torch.equal(Text("q", vocab=VOCAB, baseline="zero").continuous_baseline(emb),
                       torch.zeros(3, 4))
    assert Text("q", vocab=VOCAB).continuous_baseline(emb) is emb
    assert Tabular("t", columns=["a"]).continuous_baseline(emb) is emb


# ---------------------------------------------------------------------------------------------
# Tabular and TimeSeries
# ---------------------------------------------------------------------------------------------
def test_tabular_rows_with_names_are_read_by_name():
    """A pandas row in another column order (or with a label column) was read by position:
    silently wrong values (or a wrong-count error); a dict was refused."""
    tab = Tabular("t", columns=["a", "b", "c"])
    want = torch.tensor([1.0, 2.0, 3.0])
    df = pd.DataFrame({"c": [3.0], "label": [1], "a": [1.0], "b": [2.0]})
    assert torch.equal(tab.to_tensor(df.iloc[0]), want)
    assert torch.equal(tab.to_tensor({"b": 2, "a": 1, "c": 3}), want)
    assert torch.equal(tab.to_tensor(pd.Series([1.0, 2.0, 3.0])), want)     # labels 0..2: by position
    with pytest.raises(ValueError, match=r"no value for the columns \['c'\]"):
        tab.to_tensor({"a": 1, "b": 2})


@pytest.mark.parametrize("make, error, match", [
    (lambda: Tabular("t", columns="abc"), TypeError, "single string"),
    (lambda: Tabular("t", columns=["a", "a"]), ValueError, "twice"),
    (lambda: Tabular("t", columns=["a", "b"], groups={"g": [0, 1], "h": []}), ValueError, "empty"),
    (lambda: Tabular("t", columns=["a", "b"], groups={"g": [0.0, 1.0]}), ValueError, "indices"),
    (lambda: Tabular("t", columns=["a", "b"], baseline=[0.0, float("nan")]), ValueError, "NaN"),
    (lambda: Tabular("t", columns=["a", "b"], baseline="mean", means=[0.0, np.inf]), ValueError, "infinite"),
    (lambda: TimeSeries("s", channels="ab"), TypeError, "single string"),
    (lambda: TimeSeries("s", channels=["a", "b"], channel_groups=[[0, 1], []]), ValueError, "empty"),
    (lambda: TimeSeries("s", channels=["a", "b"], channel_groups=[[0.0], [1]]), ValueError, "indices"),
])
def test_bad_tabular_and_series_definitions_say_what_to_fix(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_groups_may_name_their_columns_and_channels():
    tab = Tabular("t", columns=["hr", "bp", "t"], groups={"vitals": ["hr", "bp"], "temp": [2]})
    assert tab.unit_index(torch.zeros(3)).tolist() == [0, 0, 1]
    ts = TimeSeries("s", window=2, channels=["a", "b"], channel_groups=[["b"], ["a"]])
    assert ts.unit_index(torch.zeros(2, 2)).tolist() == [[1, 0], [1, 0]]


def test_series_shape_errors_give_the_fix():
    with pytest.raises(ValueError, match=r"series\[:, None\]"):
        TimeSeries("s", channels=["a"]).to_tensor(np.zeros(10))
    with pytest.raises(ValueError, match=r"series\.T"):
        TimeSeries("s", channels=["a", "b"]).to_tensor(np.zeros((2, 10)))


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------
def test_describe_takes_indices_as_getitem_does():
    ds = MultimodalDataset({"q": ["a", "b", "c"]})
    assert ds.describe(-1) == "#2"                    # was "#-1"
    with pytest.raises(IndexError, match="out of range"):
        ds.describe(7)                                # was "#7"


def test_batches_check_and_normalise_their_indices():
    ds = MultimodalDataset({"q": ["a", "b", "c"]})
    assert [i.tolist() for i, _ in ds.batches(2, indices=[-1, 0])] == [[2, 0]]
    with pytest.raises(TypeError, match="integers"):
        list(ds.batches(2, indices=[0.5]))            # was instance 0, named 0.5
    with pytest.raises(TypeError, match="flatnonzero"):
        list(ds.batches(2, indices=[True, False, True]))
    with pytest.raises(ValueError, match="1-D"):
        list(ds.batches(2, indices=[[0, 1]]))
    with pytest.raises(IndexError, match="out of range"):
        list(ds.batches(2, indices=[3]))


def test_labels_of_python_ints_in_an_object_array_and_huge_labels():
    ds = MultimodalDataset({"q": ["a", "b"]}, labels=np.array([0, 1], dtype=object))
    assert ds.labels.tolist() == [0, 1]
    for huge in (np.array([2**63 + 5, 1], np.uint64), [1e30, 1.0]):
        with pytest.raises(ValueError, match="0..C-1"):
            MultimodalDataset({"q": ["a", "b"]}, labels=huge)


@pytest.mark.parametrize("column, match", [({"0": "a"}, "indexed by its keys"),
                                           (np.array(5), "single value")])
def test_columns_that_are_not_sequences_by_position(column, match):
    with pytest.raises(TypeError, match=match):
        MultimodalDataset({"q": column})


def fp(columns, **kw):
    return MultimodalDataset(columns, **kw).fingerprint()


def test_fingerprints_of_dicts_follow_their_contents():
    """A dict was hashed by its repr, which abbreviates large arrays ("...") and follows the
    insertion order: different contents collided, equal ones differed."""
    a = np.arange(2000)
    b = a.copy()
    b[1000] = -1
    assert fp({"x": [{"f": a}]}) != fp({"x": [{"f": b}]})
    assert fp({"x": [{"p": 1, "q": 2}]}) == fp({"x": [{"q": 2, "p": 1}]})


class Record:
    def __init__(self, value):
        self.value = value
        self.me = self                # a reference cycle


def test_fingerprints_of_plain_objects_follow_their_attributes():
    """Objects with the default repr were hashed by their address."""
    assert fp({"x": [Record(np.zeros(3))]}) == fp({"x": [Record(np.zeros(3))]})
    assert fp({"x": [Record(1)]}) != fp({"x": [Record(2)]})


def test_fingerprints_of_bfloat16_tensors():
    z = torch.zeros(3, dtype=torch.bfloat16)
    assert fp({"x": [z]}) == fp({"x": [z.clone()]}) != fp({"x": [z + 1]})
    assert fp({"x": [z]}) != fp({"x": [torch.zeros(3, dtype=torch.float16)]})


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------
def test_bool_tensors_are_not_integers_and_integer_kinds_are():
    assert not is_integer(torch.tensor(True)) and not is_integer(np.array(True))
    assert positive_int(np.array(3), "n") == 3 and positive_int(torch.tensor(2), "n") == 2
    for bad in (True, 2.0, "3", 0):
        with pytest.raises(ValueError, match="integer of at least 1"):
            positive_int(bad, "n")


# ---------------------------------------------------------------------------------------------
# The adapter doctor
# ---------------------------------------------------------------------------------------------
def _doctor_setup():
    from tests.test_doctor import INSTANCE, Healthy, adapter
    return Healthy, adapter, INSTANCE


def test_a_submodule_left_in_training_mode_is_run_in_eval_mode_and_reported_once():
    """model.eval() then model.drop.train(): the adapter used to run such a model as it is (only
    a root in training mode was switched), so dropout made every explanation random, and check()
    gave three errors with wrong advice (nondeterminism, embedding_layers, batch dependence)."""
    Healthy, adapter, INSTANCE = _doctor_setup()
    model = Healthy(dropout=0.5).eval()
    model.drop.train()
    a = adapter(model, eval=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = check(a, INSTANCE)
        p = a.prepare(INSTANCE)
        first, second = a.predict(p.raw), a.predict(p.raw)
    assert r.ok and r.codes() == {"training-submodule"}, str(r)
    assert "drop (Dropout)" in str(r) and "model.eval()" in str(r)
    torch.testing.assert_close(first, second)                    # dropout off: deterministic
    assert any("submodules in training mode" in str(w.message) for w in caught)
    assert not model.training and model.drop.training            # modes left as they were


def test_a_zero_text_baseline_is_zero_embeddings_and_baselines_take_the_inputs_dtype():
    """Text(baseline="zero") was documented but ignored: the baseline was the [PAD] embedding.
    A custom baseline_raw in float64 for float32 inputs failed later, inside occlusion."""
    from tests.test_doctor import VOCAB, Healthy
    model = Healthy().eval()
    with torch.no_grad():
        model.embedding.weight[0] = 1.0                                # a [PAD] embedding that is not 0
    pad = ModelAdapter(model, [Image("image"), Text("question", vocab=VOCAB)], ["a", "b", "c"])
    zero = ModelAdapter(model, [Image("image"), Text("question", vocab=VOCAB, baseline="zero")],
                        ["a", "b", "c"])
    inst = {"image": torch.rand(3, 8, 8), "question": "what colour is it"}
    assert torch.all(pad.prepare(inst).baseline["question"] == 1)
    assert torch.all(zero.prepare(inst).baseline["question"] == 0)

    class Float64Baseline(Image):
        def baseline_raw(self, x):
            return torch.zeros(x.shape, dtype=torch.float64)

    a = ModelAdapter(model, [Float64Baseline("image"), Text("question", vocab=VOCAB)], ["a", "b", "c"])
    p = a.prepare(inst)
    assert p.baseline["image"].dtype == p.continuous["image"].dtype == torch.float32
    from multiviz_widgets.kernels.unimodal import attribute
    assert np.isfinite(attribute(a, inst, "occlusion", target=0).scores["image"]).all()


def test_training_mode_without_dropout_or_batch_norm_does_not_blame_batch_norm():
    Healthy, adapter, INSTANCE = _doctor_setup()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)     # the adapter's own (once) warning
        r = check(adapter(Healthy().train(), eval=False), INSTANCE)
    assert r.ok and "training-mode" in r.codes()
    assert "batch norm would" not in str(r) and "no dropout or batch norm" in str(r)


def test_a_random_model_is_reported_once_as_random():
    Healthy, adapter, INSTANCE = _doctor_setup()

    class Noisy(Healthy):
        def forward(self, image, question):
            return super().forward(image, question) + torch.randn(image.shape[0], 3)
    r = check(adapter(Noisy()), INSTANCE)
    assert r.codes() == {"nondeterministic"}, str(r)


def test_a_zero_gradient_is_not_called_a_detached_input():
    Healthy, adapter, INSTANCE = _doctor_setup()

    class Dead(Healthy):
        def forward(self, image, question):
            h = torch.tanh(self.conv(image)).mean((2, 3)) * self.embedding(question).mean(1)
            return self.classifier(torch.relu(self.fuse(h) - 100))    # every ReLU is off
    r = check(adapter(Dead()), INSTANCE)
    assert r.codes() == {"zero-gradient"}, str(r)
    assert "detaches" not in str(r) and "another instance" in str(r)
    # a warning: it may hold at this instance only, so the gradient stages stay available
    assert r.ok and r.stages["unimodal_gradient"] and r.stages["unimodal_perturbation"]


def test_an_instance_error_with_a_foreign_code_attribute_is_reported_as_an_instance_error():
    Healthy, adapter, INSTANCE = _doctor_setup()

    class Coded(Exception):
        code = 404

    class Picky(Image):
        def to_tensor(self, raw):
            raise Coded("not found")
    from tests.test_doctor import VOCAB as DV
    a = adapter(Healthy(), modalities=[Picky("image", patch=4), Text("question", vocab=DV)])
    r = check(a, INSTANCE)
    assert r.codes() == {"instance"} and "Coded: not found" in str(r), str(r)
