"""Modalities: units partition the input, masks round-trip, baselines have the right shapes."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from multiviz_widgets import Image, Tabular, Text, TimeSeries

VOCAB = ["[PAD]", "[UNK]", "what", "is", "the", "red", "shape"]


def _image(draw):
    c = draw(st.integers(1, 3))
    h = draw(st.integers(4, 20))
    w = draw(st.integers(4, 20))
    patch = draw(st.integers(1, 8))
    baseline = draw(st.sampled_from(["zero", "white", "mean", "blur", 0.5]))
    m = Image("image", patch=patch, baseline=baseline)
    return m, torch.rand(c, h, w)


def _text(draw):
    n = draw(st.integers(1, 12))
    e = draw(st.integers(1, 6))
    return Text("question", vocab=VOCAB), torch.randn(n, e)


def _tabular(draw):
    f = draw(st.integers(1, 10))
    cols = [f"c{i}" for i in range(f)]
    grouped = draw(st.booleans()) and f >= 2
    groups = {"first": list(range(f // 2)), "rest": list(range(f // 2, f))} if grouped else None
    return Tabular("tab", columns=cols, groups=groups), torch.randn(f)


def _series(draw):
    t = draw(st.integers(1, 30))
    c = draw(st.integers(1, 4))
    window = draw(st.integers(1, 10))
    groups = [[i] for i in range(c)] if draw(st.booleans()) or c == 1 else [list(range(c))]
    return (TimeSeries("series", window=window, channels=[f"ch{i}" for i in range(c)],
                       channel_groups=groups, baseline=draw(st.sampled_from(["zero", "mean"]))),
            torch.randn(t, c))


modality_and_input = st.one_of(*[st.composite(lambda draw, f=f: f(draw))()
                                 for f in (_image, _text, _tabular, _series)])


@settings(max_examples=120, deadline=None)
@given(modality_and_input)
def test_every_scalar_belongs_to_exactly_one_unit(mx):
    m, x = mx
    idx = m.unit_index(x)
    assert idx.shape == x.shape
    n = m.n_units(x)
    assert int(idx.min()) >= 0 and int(idx.max()) == n - 1
    counts = torch.bincount(idx.reshape(-1), minlength=n)
    assert (counts > 0).all(), "a unit without scalars"
    assert int(counts.sum()) == x.numel()
    # pooling ones counts each scalar once
    pooled = m.pool(torch.ones(1, *x.shape), x)
    assert torch.equal(pooled[0], counts.to(pooled.dtype))
    assert len(m.unit_labels(x)) == n if m.kind != "text" else True


@settings(max_examples=120, deadline=None)
@given(modality_and_input, st.integers(0, 2**31 - 1))
def test_masks_round_trip(mx, seed):
    m, x = mx
    base = m.baseline_raw(x) if m.kind != "text" else torch.zeros_like(x)
    n = m.n_units(x)
    g = torch.Generator().manual_seed(seed)
    masks = torch.cat([torch.ones(1, n), torch.zeros(1, n),
                       (torch.rand(3, n, generator=g) > 0.5).float()])
    out = m.apply_mask(x, masks, base)
    assert out.shape == (5, *x.shape)
    assert torch.allclose(out[0], x) and torch.allclose(out[1], base)
    idx = m.unit_index(x)
    for b in range(2, 5):
        keep = masks[b][idx].bool()
        assert torch.equal(out[b][keep], x[keep])
        assert torch.equal(out[b][~keep], base[~keep])
    # expand then pool gives per-unit value x unit size
    vals = torch.randn(n)
    counts = torch.bincount(idx.reshape(-1), minlength=n).float()
    assert torch.allclose(m.pool(m.expand(vals, x).unsqueeze(0), x)[0], vals * counts, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(modality_and_input)
def test_baselines_have_the_input_shape(mx):
    m, x = mx
    if m.kind == "text":
        ids = torch.tensor([2, 3, 4])
        b = m.baseline_raw(ids)
        assert b.shape == ids.shape and (b == m.pad_id).all()
    else:
        b = m.baseline_raw(x)
        assert b.shape == x.shape and b.dtype == x.dtype and torch.isfinite(b).all()


def test_image_patch_grid_layout_and_superpixels():
    m = Image("image", patch=8)
    x = torch.rand(3, 64, 64)
    idx = m.unit_index(x)
    assert m.n_units(x) == 64 and m.grid(x) == (8, 8)
    assert int(idx[0, 0, 0]) == 0 and int(idx[0, 0, 63]) == 7 and int(idx[2, 63, 63]) == 63
    sp = Image("image", superpixels=12)
    x = torch.zeros(3, 32, 32)
    x[0, :16] = 1.0
    sidx = sp.unit_index(x)
    assert sidx.shape == x.shape and 2 <= sp.n_units(x) <= 20
    # segments respect the colour edge: no segment spans both halves
    top, bottom = set(sidx[0, :16].unique().tolist()), set(sidx[0, 16:].unique().tolist())
    assert not top & bottom


def test_image_raw_conversions():
    m = Image("image")
    arr = (np.random.rand(10, 12, 3) * 255).astype(np.uint8)
    t = m.to_tensor(arr)
    assert t.shape == (3, 10, 12) and 0 <= float(t.min()) and float(t.max()) <= 1
    assert m.batch([arr, arr]).shape == (2, 3, 10, 12)
    with pytest.raises(ValueError, match="HxWxC"):
        m.to_tensor(np.zeros((2, 2, 2, 2)))


def test_text_tokens_batching_and_labels():
    m = Text("question", vocab=VOCAB)
    ids = m.to_tensor("What is the RED shape?")
    assert m.tokens(ids) == ["what", "is", "the", "red", "shape"]
    assert m.to_tensor("what is purple").tolist() == [2, 3, 1]
    assert m.describe_units("what is purple", m.to_tensor("what is purple")) == ["what", "is", "purple"]
    b = m.batch(["what is", "the red shape"])
    assert b.shape == (2, 3) and b[0, 2] == m.pad_id
    with pytest.raises(ValueError, match="no tokens"):
        m.to_tensor("?!")
    with pytest.raises(ValueError, match="must contain"):
        Text("q", vocab=["a"])


@pytest.mark.parametrize("make, match", [
    (lambda: Image("image", patch=0), "patch"),
    (lambda: Image("image", baseline="grey"), "baseline"),
    (lambda: Image("not a name"), "identifier"),
    (lambda: Tabular("t", columns=[]), "column names"),
    (lambda: Tabular("t", columns=["a", "b"], groups={"g": [0]}), "in no group"),
    (lambda: Tabular("t", columns=["a", "b"], groups={"g": [0, 1], "h": [1]}), "two groups"),
    (lambda: Tabular("t", columns=["a"], baseline="mean"), "means="),
    (lambda: TimeSeries("s", channels=["a"], window=0), "window"),
    (lambda: TimeSeries("s", channels=["a"], window=2.5), "window"),
    (lambda: Image("image", patch=2.5), "patch"),         # not silently truncated to 2
    (lambda: Image("image", patch="8"), "patch"),
    (lambda: Image("image", superpixels=1), "superpixels"),
    (lambda: TimeSeries("s", channels=[]), "channel names"),
    (lambda: TimeSeries("s", channels=["a", "b"], channel_groups=[[0]]), "exactly one"),
])
def test_bad_modality_definitions_say_what_to_fix(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_raw_inputs_say_what_to_fix():
    with pytest.raises(ValueError, match="3 values"):
        Tabular("t", columns=["a", "b", "c"]).to_tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="2 channels"):
        TimeSeries("s", channels=["a", "b"]).to_tensor(np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"masks must have shape"):
        Tabular("t", columns=["a", "b"]).apply_mask(torch.zeros(2), torch.ones(1, 3), torch.zeros(2))


def test_every_pixel_type_reaches_the_model_in_0_1():
    """uint8, other integer types, nested lists and torch integer tensors are all 0..255 pixels
    (divided by 255); float pixels are taken as they are. All give the same model input."""
    m = Image("image")
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (6, 5, 3)).astype(np.uint8)
    want = m.to_tensor(u8)
    assert 0 <= float(want.min()) and float(want.max()) <= 1 and want.shape == (3, 6, 5)
    for raw in (u8.astype(np.int64), u8.tolist(), u8.astype(np.float32) / 255,
                torch.from_numpy(u8).permute(2, 0, 1), torch.from_numpy(u8).permute(2, 0, 1).long()):
        assert torch.allclose(m.to_tensor(raw), want, atol=1e-6), type(raw)
    assert torch.equal(m.batch([u8, torch.from_numpy(u8).permute(2, 0, 1)])[1], want)


@pytest.mark.parametrize("raw, match", [
    (np.full((4, 4, 3), 200.0, dtype=np.float32), "divide by 255"),   # 0..255 floats
    (np.full((4, 4, 3), -1.5), "normalise inside"),                   # normalised pixels
    (np.full((4, 4, 3), 300, dtype=np.int64), "0..255"),
    (np.array([[["a"]]]), "array of numbers"),
    (np.zeros((0, 0, 3), dtype=np.uint8), "empty"),
    (torch.zeros(64, 64, 3), "looks like H x W x C"),
    (np.zeros((16, 32, 32), dtype=np.uint8), r"16 planes of 32 x 32 first.*video"),  # frames
])
def test_bad_pixels_say_what_to_fix(raw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Image("image").to_tensor(raw)


def test_many_channel_images_that_are_not_planes_first_are_kept():
    """A multispectral picture (13 bands of 32 x 32, or 200 of 128 x 64) is H x W x C: not taken
    for a stack. One that reads as planes first (8 x 9 x 16) is refused with the way to pass
    it anyway: a [C, H, W] tensor."""
    image = Image("image")
    assert image.to_tensor(np.zeros((32, 32, 13), dtype=np.uint8)).shape == (13, 32, 32)
    assert image.to_tensor(np.zeros((128, 64, 200), dtype=np.uint8)).shape == (200, 128, 64)
    ambiguous = np.zeros((8, 9, 16), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"\[C, H, W\] tensor: torch.from_numpy\(array\)"):
        image.to_tensor(ambiguous)
    as_tensor = torch.from_numpy(ambiguous).permute(2, 0, 1)
    assert image.to_tensor(as_tensor).shape == (16, 8, 9)


def test_tensor_inputs_get_the_same_checks_as_arrays():
    """Tensors used to skip to_tensor in batch(): a wrong series shape, out-of-vocabulary ids or
    an integer tabular row reached the model and failed (or succeeded wrongly) there."""
    series = TimeSeries("s", channels=["a", "b"], window=4)
    with pytest.raises(ValueError, match="2 channels"):
        series.batch([torch.zeros(3, 32)])
    with pytest.raises(ValueError, match="at least one time step"):
        series.batch([torch.zeros(0, 2)])
    text = Text("q", vocab=VOCAB)
    with pytest.raises(ValueError, match=r"0\.\.6"):
        text.batch([torch.tensor([2, 300])])
    with pytest.raises(ValueError, match="empty"):
        text.batch([torch.zeros(0, dtype=torch.long)])
    with pytest.raises(ValueError, match="integer tensor"):
        text.batch([torch.tensor([2.9, 3.9])])                       # not truncated to ids 2, 3
    tab = Tabular("t", columns=["a", "b"])
    assert tab.batch([torch.tensor([1, 2])]).dtype == torch.float32
    with pytest.raises(TypeError, match="expected numbers"):
        tab.to_tensor(["x", "y"])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 5),
       st.integers(0, 2**31 - 1))
def test_image_grid_fast_masking_equals_the_generic_gather(c, rows, cols, p, seed):
    from multiviz_widgets.modalities import Modality
    m = Image("image", patch=p, baseline="blur")
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(c, rows * p, cols * p, generator=g)
    masks = torch.rand(4, rows * cols, generator=g)
    masks[0] = (masks[0] > 0.5).float()
    base = m.baseline_raw(x)
    fast = m.apply_mask(x, masks, base)
    slow = Modality.apply_mask(m, x, masks, base)
    assert torch.equal(fast, slow)


def test_float64_values_keep_their_precision_and_other_numbers_give_float32():
    img = np.full((4, 4, 3), 0.1)                                   # float64 array
    assert Image("image").to_tensor(img).dtype == torch.float64
    assert Image("image").to_tensor(img.astype(np.float32)).dtype == torch.float32
    assert Image("image").to_tensor(torch.full((3, 4, 4), 0.5, dtype=torch.float64)).dtype == torch.float64
    series = TimeSeries("s", channels=["a"])
    assert series.to_tensor(np.zeros((3, 1))).dtype == torch.float64
    assert series.to_tensor(np.zeros((3, 1), np.int64)).dtype == torch.float32
    assert series.batch([torch.zeros(3, 1, dtype=torch.float64)]).dtype == torch.float64
    assert Tabular("t", columns=["a", "b"]).to_tensor([0.1, 0.3000001]).dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_model_explains_the_values_it_was_given_at_its_own_precision(dtype):
    """A float64 model saw float32 roundings of float64 arrays (0.1 -> 0.10000000149...)."""
    from multiviz_widgets import ModelAdapter
    model = torch.nn.Linear(3, 2).to(dtype).eval()
    adapter = ModelAdapter(model, [Tabular("t", columns=["a", "b", "c"])], ["x", "y"])
    row = np.array([0.1, 0.2, 0.3000001])
    p = adapter.prepare({"t": row})
    assert p.raw["t"].dtype == dtype
    want = row if dtype == torch.float64 else row.astype(np.float32)
    assert np.array_equal(p.raw["t"][0].numpy(), want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", [dict(baseline=np.array([0.1, 1 / 3])),
                                dict(baseline=[0.1, 1 / 3]),
                                dict(baseline="mean", means={"b": 1 / 3, "a": 0.1}),
                                dict(baseline=torch.tensor([0.1, 1 / 3], dtype=torch.float64))])
def test_a_tabular_baseline_keeps_the_precision_it_was_given(dtype, kw):
    """Tabular baselines and means were rounded to float32 before baseline_raw cast them to
    the input's dtype: a float64 model got 0.10000000149... for 0.1."""
    from multiviz_widgets import ModelAdapter
    adapter = ModelAdapter(torch.nn.Linear(2, 2).to(dtype).eval(),
                           [Tabular("t", columns=["a", "b"], **kw)], ["x", "y"])
    p = adapter.prepare({"t": np.array([1.0, 2.0])})
    want = torch.tensor([0.1, 1 / 3], dtype=torch.float64).to(dtype)
    assert p.baseline["t"].dtype == dtype and torch.equal(p.baseline["t"], want)


@pytest.mark.parametrize("modality, raw", [
    (Image("image"), np.zeros((6, 5, 3), np.uint8)),
    (Image("image"), np.zeros((6, 5), np.float32)),
    (Image("image", channels_last_raw=False), np.zeros((3, 6, 5), np.uint8)),
    (Image("image"), torch.zeros(3, 4, 4)),
    (Text("q", vocab=VOCAB), "what is the red shape?"),
    (Text("q", vocab=VOCAB), torch.tensor([2, 3])),
    (Tabular("t", columns=["a", "b"]), [1.0, 2.0]),
    (TimeSeries("s", channels=["a"]), np.zeros((7, 1))),
])
def test_input_shape_is_the_shape_of_the_model_input(modality, raw):
    assert modality.input_shape(raw) == tuple(modality.to_tensor(raw).shape)


def test_unit_sums_and_map_agree_with_pool_and_to_map():
    """The fused unit sums and map of Image (patch grid) and Text are pool's and to_map's
    numbers, in separate tensors (editing one never changes the other)."""
    from multiviz_widgets.modalities import Modality
    image, text = Image("image", patch=8), Text("q", vocab=["[PAD]", "[UNK]", "a", "b"])
    cases = [(image, torch.rand(3, 64, 64)), (text, torch.randn(5, 16))]
    for mod, x in cases:
        attr = torch.randn(*x.shape)
        index = mod.unit_index(x)
        sums, m = mod.unit_sums_and_map(attr, x, index)
        assert sums.dtype == torch.float64        # on the CPU, in the scores' dtype already
        torch.testing.assert_close(sums, Modality.pool(mod, attr[None], x, index)[0].double(),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m, mod.to_map(attr))
        before = m.clone()
        sums.add_(1.0)
        torch.testing.assert_close(m, before)
    for shape, patch in [((1, 32, 48), 16), ((4, 16, 16), 4)]:       # other exact grids
        image, x = Image("image", patch=patch), torch.rand(*shape)
        attr = torch.randn(*shape)
        sums, _ = image.unit_sums_and_map(attr, x, image.unit_index(x))
        torch.testing.assert_close(sums, Modality.pool(image, attr[None], x,
                                                       image.unit_index(x))[0].double(),
                                   rtol=1e-5, atol=1e-5)
    assert Image("image", patch=8, superpixels=4).unit_sums_and_map(
        torch.zeros(3, 16, 16), torch.rand(3, 16, 16), None) is None
    assert Image("image", patch=8).unit_sums_and_map(              # a ragged edge: not a grid
        torch.zeros(3, 30, 30), torch.rand(3, 30, 30), None) is None


def test_unit_sums_and_map_leave_subclasses_with_their_own_units_or_pooling_alone():
    """A subclass that pools or groups units its own way gets its own pool (the fused path
    would ignore it): the stage-1 scores follow the subclass."""
    from multiviz_widgets.modalities import Modality

    class AbsImage(Image):
        def pool(self, attr, x, index=None):
            return Modality.pool(self, attr, x, index).abs()

    class PairedText(Text):
        def unit_index(self, x):
            return super().unit_index(x) // 2

    x = torch.rand(3, 16, 16)
    assert AbsImage("image", patch=8).unit_sums_and_map(torch.zeros(3, 16, 16), x, None) is None
    t = PairedText("q", vocab=["[PAD]", "[UNK]", "a"])
    assert t.unit_sums_and_map(torch.zeros(4, 2), torch.zeros(4, 2), None) is None


def test_channel_and_column_names_come_from_any_sequence_of_names():
    """A DataFrame's columns or a numpy array of names work as channels, as they do as Tabular
    columns; a number of channels or an empty list gets a message saying what to give."""
    import pandas as pd
    frame = pd.DataFrame(np.zeros((4, 3)), columns=["pitch", "energy", "mfcc1"])
    for names in (frame.columns, np.array(frame.columns), tuple(frame.columns)):
        assert TimeSeries("audio", window=2, channels=names).channels == list(frame.columns)
        assert Tabular("vitals", columns=names).columns == list(frame.columns)
    paired = TimeSeries("audio", window=2, channels=["a", "b", "c", "d"],
                        channel_groups=np.array([[0, 1], [2, 3]]))
    assert paired.groups == [[0, 1], [2, 3]]
    for bad, words in [(3, r"channels must be a list of names.*got int 3"),
                       ({"a": 0}, "channels must be a list of names")]:
        with pytest.raises(TypeError, match=words):
            TimeSeries("audio", channels=bad)
    with pytest.raises(TypeError, match=r"columns must be a list of names.*got int 4"):
        Tabular("vitals", columns=4)
    for empty in ([], np.array([]), frame.columns[:0]):
        with pytest.raises(ValueError, match="TimeSeries needs the channel names"):
            TimeSeries("audio", channels=empty)
    with pytest.raises(ValueError, match="channel_groups is empty"):
        TimeSeries("audio", channels=["a"], channel_groups=[])


def test_a_tokenize_that_is_not_a_function_is_refused_at_construction():
    """tokenize="split" was taken and failed on the first text: 'str' object is not callable."""
    with pytest.raises(TypeError, match=r"tokenize must be a function.*got str 'split'"):
        Text("q", vocab=VOCAB, tokenize="split")
    assert Text("q", vocab=VOCAB, tokenize=str.split).tokenize("what is") == ["what", "is"]


def test_superpixels_are_computed_in_chunks_with_the_same_segments():
    """The pixel-to-centre distances of a 224 x 224 image and 800 segments took 1 GB at once;
    now a chunk of pixels at a time, and each centre's mean by one sort: the same segments
    whatever the chunk (against the direct computation written out here)."""
    import math

    import multiviz_widgets.modalities as mods

    def direct(img, n_segments, compactness=10.0, iterations=6):
        c, h, w = img.shape
        step = max(1.0, math.sqrt(h * w / n_segments))
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        feats = np.concatenate([img.reshape(c, -1).T * compactness,
                                np.stack([ys.ravel(), xs.ravel()], 1) / step], axis=1)
        cy = np.arange(min(step, h) / 2, h, step)
        cx = np.arange(min(step, w) / 2, w, step)
        centers = feats[[int(min(h - 1, y)) * w + int(min(w - 1, x))
                         for y in cy for x in cx]].copy()
        for _ in range(iterations):
            labels = ((feats[:, None, :] - centers[None]) ** 2).sum(-1).argmin(1)
            for k in range(len(centers)):
                if (labels == k).any():
                    centers[k] = feats[labels == k].mean(0)
        return np.unique(labels, return_inverse=True)[1].reshape(h, w)

    rng = np.random.default_rng(3)
    for shape, k in [((3, 40, 32), 30), ((1, 24, 24), 10)]:
        img = rng.random(shape).astype(np.float32)
        want = direct(img, k)
        for chunk in (mods.SLIC_CHUNK_ELEMENTS, 1000, 7):
            mods_chunk = mods.SLIC_CHUNK_ELEMENTS
            mods.SLIC_CHUNK_ELEMENTS = chunk
            try:
                np.testing.assert_array_equal(mods.slic_superpixels(img, k), want)
            finally:
                mods.SLIC_CHUNK_ELEMENTS = mods_chunk
