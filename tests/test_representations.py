"""Stage 3: decision features, their on-disk cache, hooks, streaming extremes, local view."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from multiviz_widgets import ModelAdapter, MultimodalDataset, Tabular, TimeSeries
from multiviz_widgets.kernels import representations as rep
from multiviz_widgets.kernels.representations import (
    ROWS_CHECKED, StreamingExtremes, decision_contributions, extract_features, neuron_extremes)

F, T, CH, D, C = 4, 8, 2, 6, 3


class TinyFusion(nn.Module):
    """tabular [F] + series [T, CH] -> h = relu(A tab + B series) [D] -> classifier -> [C]."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.tab = nn.Linear(F, D)
        self.ts = nn.Linear(T * CH, D)
        self.classifier = nn.Linear(D, C)
        self.fail = False
        self.calls = 0

    def forward(self, tab, series):
        self.calls += 1
        h = torch.relu(self.tab(tab) + self.ts(series.flatten(1)))
        if self.fail:
            raise RuntimeError("boom")
        return self.classifier(h)


def make_adapter(seed=0):
    model = TinyFusion(seed).eval()
    mods = [Tabular("tab", columns=[f"c{i}" for i in range(F)]),
            TimeSeries("series", window=4, channels=["a", "b"])]
    return ModelAdapter(model, mods, [f"k{i}" for i in range(C)], decision_layer="classifier")


def make_dataset(n=37, seed=0):
    rng = np.random.default_rng(seed)
    tab = [rng.normal(size=F).astype(np.float32) for _ in range(n)]
    ser = [rng.normal(size=(T, CH)).astype(np.float32) for _ in range(n)]
    return MultimodalDataset({"tab": tab, "series": ser}, labels=rng.integers(0, C, n))


def direct_h(adapter, ds):
    raw = adapter.collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        m = adapter.model
        h = torch.relu(m.tab(raw["tab"]) + m.ts(raw["series"].flatten(1)))
        return h.numpy(), m.classifier(h).numpy()


def rows_check(first_batch: int) -> int:
    """The rows of the two passes that check that the model treats the rows of its first batch
    of several rows independently (representations._check_rows_independent): that batch's
    first ROWS_CHECKED rows, and as many copies of one of them."""
    return 2 * min(first_batch, ROWS_CHECKED) if first_batch > 1 else 0


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


# -- extraction -----------------------------------------------------------------------------------
def test_features_equal_a_direct_computation_for_any_batch_size(cache):
    adapter, ds = make_adapter(), make_dataset()
    h, logits = direct_h(adapter, ds)
    for bs in (1, 5, 64):
        seen = []
        f = extract_features(adapter, ds, batch_size=bs, cache=False,
                             progress=lambda d, t, m: seen.append((d, t)))
        np.testing.assert_allclose(f.h, h, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(f.logits, logits, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(f.indices, np.arange(len(ds)))
        np.testing.assert_array_equal(f.predictions, logits.argmax(1))
        # one pass per instance, and one more of an instance alone that checks the first
        # batch of several rows treats them independently
        assert f.forward_passes == len(ds) + rows_check(min(bs, len(ds))) and not f.from_cache
        assert seen[-1] == (len(ds), len(ds)) and len(seen) >= -(-len(ds) // bs)


def test_a_plain_list_of_instances_is_extracted_without_the_cache(cache):
    """Before: the default cache=True raised AttributeError ('list' has no fingerprint)."""
    adapter, ds = make_adapter(), make_dataset()
    items = [ds[i] for i in range(len(ds))]
    f = extract_features(adapter, items, cache_dir=cache)
    np.testing.assert_allclose(f.h, direct_h(adapter, ds)[0], rtol=1e-5, atol=1e-6)
    assert not f.from_cache and not cache.exists()


def test_features_of_chosen_indices(cache):
    adapter, ds = make_adapter(), make_dataset()
    h, _ = direct_h(adapter, ds)
    idx = [30, 2, 7]
    f = extract_features(adapter, ds, indices=idx, cache_dir=cache)
    np.testing.assert_allclose(f.h, h[idx], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(f.indices, idx)


def test_reopening_reads_the_cache_without_running_the_model(cache):
    adapter, ds = make_adapter(), make_dataset()
    first = extract_features(adapter, ds, batch_size=8, cache_dir=cache)
    assert not first.from_cache and os.path.exists(first.path)
    calls = adapter.model.calls

    def boom(*args):
        raise RuntimeError("a forward pass")
    # any forward pass would now raise (the model itself unchanged: a forward set on it is
    # in the key, test_the_cache_key_covers_a_forward_set_on_the_model_instance)
    adapter.forward = boom
    again = extract_features(adapter, ds, batch_size=8, cache_dir=cache)
    assert again.from_cache and again.forward_passes == 0 and adapter.model.calls == calls
    np.testing.assert_array_equal(again.h, first.h)
    np.testing.assert_array_equal(again.logits, first.logits)
    assert [p for p in os.listdir(cache) if p.endswith(".tmp")] == []


def test_a_change_of_weights_invalidates_the_cache(cache):
    adapter, ds = make_adapter(), make_dataset()
    first = extract_features(adapter, ds, cache_dir=cache)
    with torch.no_grad():
        adapter.model.tab.weight.add_(0.5)
    second = extract_features(adapter, ds, cache_dir=cache)
    assert not second.from_cache and second.key != first.key
    np.testing.assert_allclose(second.h, direct_h(adapter, ds)[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(second.h, first.h)
    assert extract_features(adapter, ds, cache_dir=cache).from_cache


def test_features_whose_model_changed_during_the_pass_are_never_cached(cache):
    """A checkpoint loaded in a cell while the Explorer's dataset pass ran: the rows mixed two
    models and were written under the first one's key, read back later as its features."""
    adapter, ds = make_adapter(), make_dataset()
    before = adapter.fingerprint()
    checkpoint = {k: v.clone() for k, v in adapter.model.state_dict().items()}

    def train_a_step(done, total, message):
        if 0 < done < total:
            with torch.no_grad():
                adapter.model.tab.weight.add_(0.25)
    with pytest.warns(RuntimeWarning, match="model changed while its decision features"):
        mixed = extract_features(adapter, ds, batch_size=8, cache_dir=cache,
                                 progress=train_a_step)
    assert mixed.key == "" and mixed.path is None and not list(cache.glob("*.npz"))
    adapter.model.load_state_dict(checkpoint)     # back to the weights the pass began with
    assert adapter.fingerprint() == before
    again = extract_features(adapter, ds, batch_size=8, cache_dir=cache)
    assert not again.from_cache and again.path is not None
    np.testing.assert_allclose(again.h, direct_h(adapter, ds)[0], rtol=1e-5, atol=1e-6)


class FillsACache(TinyFusion):
    """Fills a non-persistent buffer in its first pass (a rotary embedding's cache): its
    outputs never depend on it."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.zeros(0), persistent=False)

    def forward(self, tab, series):
        if self.table.numel() == 0:
            self.table = torch.arange(8.0)
        return super().forward(tab, series)


def test_a_buffer_the_model_fills_in_its_first_pass_is_no_change_of_the_model(cache):
    import warnings
    model = FillsACache().eval()
    mods = [Tabular("tab", columns=[f"c{i}" for i in range(F)]),
            TimeSeries("series", window=4, channels=["a", "b"])]
    adapter = ModelAdapter(model, mods, [f"k{i}" for i in range(C)], decision_layer="classifier")
    weights = adapter.weights_fingerprint()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        first = extract_features(adapter, make_dataset(), batch_size=8, cache_dir=cache)
    assert first.path is not None and first.key
    assert adapter.weights_fingerprint() == weights      # what an annotations file records

    model.register_buffer("last", torch.zeros(3), persistent=False)
    original = model.forward

    def keeps_its_last(tab, series):               # its last activation in a buffer
        out = original(tab, series)
        model.last = out[0, :3].detach().clone()
        return out
    model.forward = keeps_its_last
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        extract_features(adapter, make_dataset(seed=2), batch_size=8, cache_dir=cache)
    model.forward = original

    def set_a_scale(done, total, message):         # a setting changed mid-pass: caught
        if 0 < done < total:
            model.scale = 2.0
    with pytest.warns(RuntimeWarning, match="model changed while its decision features"):
        extract_features(adapter, make_dataset(seed=1), batch_size=8, cache_dir=cache,
                         progress=set_a_scale)


def test_a_change_of_data_invalidates_the_cache(cache):
    adapter = make_adapter()
    a = extract_features(adapter, make_dataset(seed=0), cache_dir=cache)
    b = extract_features(adapter, make_dataset(seed=1), cache_dir=cache)
    assert not b.from_cache and a.key != b.key


def test_a_corrupt_cache_file_is_ignored_and_rewritten(cache):
    adapter, ds = make_adapter(), make_dataset()
    first = extract_features(adapter, ds, cache_dir=cache)
    with open(first.path, "wb") as f:
        f.write(b"not a zip file at all")
    with pytest.warns(RuntimeWarning, match="unreadable feature cache"):
        again = extract_features(adapter, ds, cache_dir=cache)
    assert not again.from_cache
    np.testing.assert_allclose(again.h, first.h)
    assert extract_features(adapter, ds, cache_dir=cache).from_cache


def test_cache_location_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MULTIVIZ_CACHE", str(tmp_path / "env"))
    f = extract_features(make_adapter(), make_dataset())
    assert f.path.startswith(str(tmp_path / "env"))
    assert rep.default_cache_dir() == tmp_path / "env"


def test_a_cache_folder_under_a_file_says_only_that_it_could_not_write(tmp_path, monkeypatch):
    """MULTIVIZ_CACHE under a regular file: one warning, that the cache could not be written
    (there was a first one about an 'unreadable feature cache' that never existed)."""
    import warnings
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("MULTIVIZ_CACHE", str(tmp_path / "afile" / "cache"))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        f = extract_features(make_adapter(), make_dataset())
    texts = [str(w.message) for w in said if issubclass(w.category, RuntimeWarning)]
    assert len(texts) == 1 and texts[0].startswith("Could not write the feature cache"), texts
    assert f.path is None and len(f.h)


def test_cache_false_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MULTIVIZ_CACHE", str(tmp_path / "env"))
    f = extract_features(make_adapter(), make_dataset(), cache=False)
    assert f.path is None and not (tmp_path / "env").exists()


def _hook_count(adapter):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in adapter.model.modules())


def test_no_hook_outlives_its_call_even_when_the_model_raises(cache):
    adapter, ds = make_adapter(), make_dataset()
    assert _hook_count(adapter) == 0
    extract_features(adapter, ds, cache=False)
    assert _hook_count(adapter) == 0
    adapter.model.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        extract_features(adapter, ds, cache_dir=cache)
    assert _hook_count(adapter) == 0
    with pytest.raises(RuntimeError, match="boom"):
        neuron_extremes(adapter, ds, k=2)
    assert _hook_count(adapter) == 0
    assert not cache.exists() or os.listdir(cache) == []     # nothing half-written


def test_bad_inputs_get_clear_errors(cache):
    adapter, ds = make_adapter(), make_dataset()
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(adapter, ds, batch_size=0)
    with pytest.raises(ValueError, match="99 is out of range"):
        extract_features(adapter, ds, indices=[0, 99], cache=False)
    with pytest.raises(ValueError, match="not a boolean mask"):
        extract_features(adapter, ds, indices=[True] * len(ds), cache=False)
    with pytest.raises(ValueError, match="empty"):
        extract_features(adapter, ds, indices=[], cache=False)
    with pytest.raises(ValueError, match=r"k \(instances kept per neuron\) must be an integer"):
        StreamingExtremes(0)
    s = StreamingExtremes(2)
    with pytest.raises(ValueError, match="No instances"):
        s.result()
    s.update(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="4"):
        s.update(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        s.update(np.full((1, 4), np.nan))
    one = np.zeros((2, 4))
    one[1, 2] = np.nan
    with pytest.raises(ValueError, match="1 values; the first at instance 17, neuron 2"):
        s.update(one, indices=[16, 17])
    with pytest.raises(ValueError, match=r"\[B, d\]"):
        s.update(np.zeros(4))
    with pytest.raises(ValueError, match="adapter and a dataset"):
        neuron_extremes(None, None)
    feats = extract_features(adapter, ds, cache=False)
    with pytest.raises(ValueError, match="indices="):
        neuron_extremes(None, k=2, features=feats, indices=[1, 2])


# -- streaming extremes -----------------------------------------------------------------------------
def full_sort(h, k):
    top = np.argsort(-h, axis=0, kind="stable")[:k].T
    bot = np.argsort(h, axis=0, kind="stable")[:k].T
    return top, bot


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), d=st.integers(1, 5), k=st.integers(1, 8),
       sizes=st.lists(st.integers(1, 17), min_size=1, max_size=12),
       ties=st.booleans(), seed=st.integers(0, 10_000))
def test_streaming_extremes_equal_a_full_sort(n, d, k, sizes, ties, seed):
    rng = np.random.default_rng(seed)
    h = (rng.integers(-3, 4, size=(n, d)) if ties else rng.normal(size=(n, d))).astype(np.float32)
    ext = StreamingExtremes(k)
    s, i = 0, 0
    while s < n:                               # arbitrary batch boundaries
        b = sizes[i % len(sizes)]
        ext.update(h[s:s + b], np.arange(s, min(n, s + b)))
        s, i = s + b, i + 1
    res = ext.result()
    top, bot = full_sort(h, k)
    kk = min(k, n)
    assert res.top_indices.shape == (d, kk) and res.n_instances == n
    np.testing.assert_array_equal(res.top_indices, top)
    np.testing.assert_array_equal(res.bottom_indices, bot)
    np.testing.assert_array_equal(res.top_values, np.take_along_axis(h.T, top, 1))
    np.testing.assert_array_equal(res.bottom_values, np.take_along_axis(h.T, bot, 1))


def test_streaming_memory_stays_k_by_d():
    ext = StreamingExtremes(5)
    rng = np.random.default_rng(0)
    for s in range(0, 10_000, 500):
        ext.update(rng.normal(size=(500, 7)), np.arange(s, s + 500))
        for t in (ext._top_v, ext._top_i, ext._bot_v, ext._bot_i):
            assert tuple(t.shape) == (5, 7)
    assert ext.result().n_instances == 10_000


def test_neuron_extremes_over_the_model_equal_a_full_sort(cache):
    adapter, ds = make_adapter(), make_dataset(n=50)
    feats = extract_features(adapter, ds, cache=False)
    top, bot = full_sort(feats.h, 4)
    for res in (neuron_extremes(adapter, ds, k=4, batch_size=7),
                neuron_extremes(None, k=4, batch_size=9, features=feats)):
        np.testing.assert_array_equal(res.top_indices, top)
        np.testing.assert_array_equal(res.bottom_indices, bot)
        j = 2
        assert res.top(j)[0] == (int(top[j, 0]), pytest.approx(float(feats.h[top[j, 0], j])))
        assert [i for i, _ in res.bottom(j)] == bot[j].tolist()
    assert neuron_extremes(adapter, ds, k=4).forward_passes == 50 + rows_check(50)


# -- local view and two adapters ----------------------------------------------------------------------
def test_decision_contributions_are_weight_times_activation():
    adapter, ds = make_adapter(), make_dataset()
    h, logits = direct_h(adapter, ds)
    dc = decision_contributions(adapter, ds[3])
    c = int(logits[3].argmax())
    assert dc.class_index == c and dc.class_name == f"k{c}"
    W = adapter.model.classifier.weight.detach().numpy()
    np.testing.assert_allclose(dc.contributions, W[c] * h[3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dc.contributions.sum() + adapter.model.classifier.bias[c].item(),
                               logits[3, c], rtol=1e-4, atol=1e-5)
    assert dc.top(2) == list(np.argsort(-W[c] * h[3], kind="stable")[:2])
    other = decision_contributions(adapter, ds[3], target="k0")
    assert other.class_index == 0
    with pytest.raises(ValueError, match=r"explain a class .*target=Neuron\("):
        decision_contributions(adapter, ds[3], target=("neuron", 1))


def test_two_adapters_side_by_side_do_not_share_state(cache):
    a, b = make_adapter(0), make_adapter(1)
    ds = make_dataset()
    ha, hb = direct_h(a, ds)[0], direct_h(b, ds)[0]
    # interleave: a, b, a from cache, b from cache, streaming on both
    fa = extract_features(a, ds, cache_dir=cache)
    fb = extract_features(b, ds, cache_dir=cache)
    assert fa.key != fb.key
    np.testing.assert_allclose(fa.h, ha, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fb.h, hb, rtol=1e-5, atol=1e-6)
    assert extract_features(a, ds, cache_dir=cache).from_cache
    np.testing.assert_allclose(extract_features(b, ds, cache_dir=cache).h, hb, rtol=1e-5, atol=1e-6)
    # alternate batches of the two streams in one loop
    sa, sb = StreamingExtremes(3), StreamingExtremes(3)
    for (ia, _, h1), (ib, _, h2) in zip(rep.stream_features(a, ds, 5), rep.stream_features(b, ds, 5)):
        sa.update(h1, ia)
        sb.update(h2, ib)
    np.testing.assert_array_equal(sa.result().top_indices, full_sort(ha, 3)[0])
    np.testing.assert_array_equal(sb.result().top_indices, full_sort(hb, 3)[0])
    assert _hook_count(a) == 0 and _hook_count(b) == 0


def test_models_with_zero_dimensional_buffers_are_cached_and_invalidated(cache):
    """BatchNorm keeps a 0-d ``num_batches_tracked`` buffer; the weights hash must handle it."""
    adapter, ds = make_adapter(), make_dataset()
    adapter.model.norm = nn.BatchNorm1d(3).eval()      # registered, unused by forward
    extract_features(adapter, ds, cache_dir=cache)
    assert extract_features(adapter, ds, cache_dir=cache).from_cache
    with torch.no_grad():
        adapter.model.norm.running_mean.add_(1.0)
    assert not extract_features(adapter, ds, cache_dir=cache).from_cache


def test_a_cancelled_extraction_leaves_no_hook_and_no_cache(cache):
    from multiviz_widgets.progress import Cancelled
    adapter, ds = make_adapter(), make_dataset()

    def cancel_after_first_batch(done, total, message):
        if done > 0:
            raise Cancelled()

    with pytest.raises(Cancelled):
        extract_features(adapter, ds, batch_size=8, cache_dir=cache,
                         progress=cancel_after_first_batch)
    with pytest.raises(Cancelled):
        neuron_extremes(adapter, ds, k=2, batch_size=8, progress=cancel_after_first_batch)
    assert _hook_count(adapter) == 0
    assert not cache.exists() or os.listdir(cache) == []
    assert not extract_features(adapter, ds, cache_dir=cache).from_cache


# -- cache key and cache contents ---------------------------------------------------------------------
class ActFusion(TinyFusion):
    """TinyFusion with an extra (parameter-free) module: same weights, another module tree."""

    def __init__(self, act):
        super().__init__(0)
        self.act = act


def test_the_cache_key_covers_the_modalities_preprocessing_and_the_module_tree(cache):
    ds = make_dataset()
    base = make_adapter()
    assert rep.CACHE_VERSION != "features-v1"          # files keyed the old way are not trusted
    other_window = ModelAdapter(base.model, [Tabular("tab", columns=[f"c{i}" for i in range(F)]),
                                             TimeSeries("series", window=2, channels=["a", "b"])],
                                base.class_names, decision_layer="classifier")
    other_columns = ModelAdapter(base.model, [Tabular("tab", columns=list("wxyz")),
                                              TimeSeries("series", window=4, channels=["a", "b"])],
                                 base.class_names, decision_layer="classifier")
    keys = {rep.features_key(a, ds) for a in (base, other_window, other_columns)}
    assert len(keys) == 3
    first = extract_features(base, ds, cache_dir=cache)
    assert not extract_features(other_window, ds, cache_dir=cache).from_cache
    assert extract_features(base, ds, cache_dir=cache).key == first.key

    mods = lambda: [Tabular("tab", columns=[f"c{i}" for i in range(F)]),  # noqa: E731
                    TimeSeries("series", window=4, channels=["a", "b"])]
    sigmoid = ModelAdapter(ActFusion(nn.Sigmoid()).eval(), mods(), base.class_names,
                           "classifier")
    tanh = ModelAdapter(ActFusion(nn.Tanh()).eval(), mods(), base.class_names, "classifier")
    assert sigmoid.fingerprint() == tanh.fingerprint()       # the weights alone cannot tell
    assert rep.features_key(sigmoid, ds) != rep.features_key(tanh, ds)


@pytest.mark.parametrize("damage, why", [
    ("h_columns", "features but the decision layer takes"), ("rows", "instances, not the"),
    ("other_indices", "instances, not the"), ("int_h", "dtypes h int64"),
    ("logits_columns", "logits are of 1 classes, the adapter's 3"),
    ("no_skipped", "KeyError")])
def test_a_cache_file_with_the_right_key_but_wrong_contents_is_recomputed(cache, damage, why):
    adapter, ds = make_adapter(), make_dataset()
    first = extract_features(adapter, ds, cache_dir=cache)
    h, logits, idx = first.h, first.logits, first.indices
    if damage == "h_columns":
        h = h[:, :3]
    elif damage == "rows":
        h, logits, idx = h[:5], logits[:5], idx[:5]
    elif damage == "other_indices":
        idx = idx[::-1].copy()
    elif damage == "int_h":
        h = h.astype(np.int64)
    elif damage == "logits_columns":          # a one-logit model's file, now read as 3 classes
        logits = logits[:, :1]
    skipped = {} if damage == "no_skipped" else {
        "skipped_indices": np.array([], np.int64), "skipped_reasons": np.array([], str)}
    np.savez(first.path, key=np.array(first.key), h=h, logits=logits, indices=idx, **skipped)
    with pytest.warns(RuntimeWarning, match="unreadable feature cache") as got:
        again = extract_features(adapter, ds, cache_dir=cache)
    assert why in str(got[0].message), got[0].message
    assert not again.from_cache
    np.testing.assert_allclose(again.h, first.h)
    np.testing.assert_array_equal(again.indices, np.arange(len(ds)))
    assert extract_features(adapter, ds, cache_dir=cache).from_cache     # rewritten


# -- errors of the extremes and the local view ----------------------------------------------------------
def test_extremes_of_no_instances_plain_arrays_and_negative_indices_get_clear_errors():
    adapter, ds = make_adapter(), make_dataset()
    empty = MultimodalDataset({"tab": [], "series": []})
    for call in (lambda: neuron_extremes(adapter, ds, k=3, indices=[]),
                 lambda: neuron_extremes(adapter, empty, k=3)):
        with pytest.raises(ValueError, match="no instances") as err:
            call()
        assert "update()" not in str(err.value)
    feats = extract_features(adapter, ds, cache=False)
    with pytest.raises(TypeError, match="Features object from extract_features"):
        neuron_extremes(None, features=feats.h, k=2)
    with pytest.raises(ValueError, match=r"k \(instances kept per neuron\) must be an integer"):
        StreamingExtremes(True)
    res = neuron_extremes(None, features=feats, k=2)
    assert res.top(D - 1) and res.bottom(0)
    for bad in (-1, D, 1.0):
        with pytest.raises(IndexError, match=f"0..{D - 1}"):
            res.top(bad)
        with pytest.raises(IndexError, match=f"0..{D - 1}"):
            res.bottom(bad)
    dc = decision_contributions(adapter, ds[0])
    assert dc.top(0) == [] and len(dc.top(D)) == D
    with pytest.raises(ValueError, match="k"):
        dc.top(-1)


# -- projection of the decision features ------------------------------------------------------------
def test_project_3d_names_non_finite_rows_and_checks_dims():
    from multiviz_widgets.kernels.projection import project_3d
    h = np.random.default_rng(0).normal(size=(6, 4))
    for value in (np.nan, np.inf, -np.inf):
        bad = h.copy()
        bad[4, 1] = value
        with pytest.raises(ValueError, match=r"non-finite.*rows \[4\]"):
            project_3d(bad)
    for dims in (0, -1, 2.0, True, "3", 4):
        with pytest.raises(ValueError, match="dims"):
            project_3d(h, dims=dims)
    assert project_3d(h, dims=2).shape == (6, 2) and project_3d(h, dims=1).shape == (6, 1)
    huge = project_3d(np.array([[1e200, 0.0], [0.0, 1.0], [2.0, 2.0]]))
    assert np.isfinite(huge).all() and np.abs(huge).max() == pytest.approx(1.0)


# -- batches of equal shapes: no padding, instances of several sizes, unpreparable instances --------
VOCAB = ["[PAD]", "[UNK]"] + "the movie was good bad very not boring great".split()


class MeanPool(nn.Module):
    """Token embeddings averaged with no pad mask: [PAD] tokens would change the mean."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.emb = nn.Embedding(len(VOCAB), 8)
        self.mid = nn.Linear(8, 5)
        self.head = nn.Linear(5, 2)
        self.shapes = []

    def forward(self, review):
        self.shapes.append(tuple(review.shape))
        return self.head(torch.tanh(self.mid(self.emb(review).mean(1))))


REVIEWS = ["the movie was good", "very bad", "not boring", "great", "the movie was not very good",
           "bad", "very very good", "boring", "not good", "the movie"]


def one_by_one(adapter, ds):
    """(h [N, d], logits [N, C]) of each instance's own forward pass."""
    out = [adapter.features(adapter.collate([ds[i]])) for i in range(len(ds))]
    return (torch.cat([h for _, h in out]).numpy(), torch.cat([lg for lg, _ in out]).numpy())


def test_texts_of_different_lengths_are_never_padded(cache):
    from multiviz_widgets import Text
    adapter = ModelAdapter(MeanPool().eval(), [Text("review", VOCAB)], ["neg", "pos"])
    ds = MultimodalDataset({"review": REVIEWS})
    h, logits = one_by_one(adapter, ds)
    for bs in (1, 2, 3, 256):
        adapter.model.shapes.clear()
        f = extract_features(adapter, ds, batch_size=bs, cache=False)
        np.testing.assert_array_equal(f.indices, np.arange(len(ds)))
        np.testing.assert_allclose(f.h, h, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(f.logits, logits, rtol=1e-5, atol=1e-6)
        first = next((b for b, _ in adapter.model.shapes if b > 1), 1)
        assert f.forward_passes == len(ds) + rows_check(first) and f.skipped == {}
        assert all(b <= bs for b, _ in adapter.model.shapes)
        ext = neuron_extremes(adapter, ds, k=3, batch_size=bs)
        top, bot = full_sort(h, 3)
        np.testing.assert_array_equal(ext.top_indices, top)
        np.testing.assert_array_equal(ext.bottom_indices, bot)
    # dataset order is kept for chosen indices too, whatever the groups
    idx = [9, 0, 3, 4, 1, 3]
    f = extract_features(adapter, ds, indices=idx, batch_size=2, cache_dir=cache)
    np.testing.assert_array_equal(f.indices, idx)
    np.testing.assert_allclose(f.h, h[idx], rtol=1e-5, atol=1e-6)
    assert extract_features(adapter, ds, indices=idx, batch_size=2, cache_dir=cache).from_cache


def test_many_shapes_come_out_once_each_in_batches_of_one_shape():
    """Many text lengths: every instance comes out exactly once, each batch holds one shape
    (no padding), and the features equal single forwards."""
    from multiviz_widgets import Text
    adapter = ModelAdapter(MeanPool().eval(), [Text("review", VOCAB)], ["neg", "pos"])
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(VOCAB[2:], rng.integers(1, 7))) for _ in range(60)]
    ds = MultimodalDataset({"review": texts})
    h, _ = one_by_one(adapter, ds)
    chunks = list(rep.stream_features(adapter, ds, batch_size=4))
    got = np.concatenate([i for i, _, _ in chunks])
    assert sorted(got.tolist()) == list(range(60)) and len(chunks) > 1
    lengths = [len(t.split()) for t in texts]
    assert all(len({lengths[i] for i in c}) == 1 and len(c) <= 4 for c, _, _ in chunks)
    np.testing.assert_allclose(torch.cat([c for _, _, c in chunks]).numpy(), h[got], rtol=1e-5,
                               atol=1e-6)


def test_extremes_break_ties_by_instance_whatever_the_batch_order():
    """StreamingExtremes gives the same result for batches in any order: ties go to the lower
    instance index (stream_features yields batches shape group by shape group)."""
    rng = np.random.default_rng(0)
    h = rng.integers(0, 3, size=(40, 5)).astype(np.float32)       # many ties
    want = rep.StreamingExtremes(4)
    want.update(h, np.arange(40))
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(40)
        got = rep.StreamingExtremes(4)
        for part in np.array_split(order, 7):
            got.update(h[part], part)
        a, b = want.result(), got.result()
        np.testing.assert_array_equal(a.top_indices, b.top_indices)
        np.testing.assert_array_equal(a.bottom_indices, b.bottom_indices)


class VarLen(nn.Module):
    """Series of any length (convolution, then a mean over time) + an image of any size."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.pix = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, ecg, image):
        a = torch.relu(self.conv(ecg.transpose(1, 2))).mean(2)
        return self.head(a + torch.tanh(self.pix(image.mean((2, 3)))))


def test_series_and_images_of_different_sizes_are_extracted(cache):
    from multiviz_widgets import Image
    adapter = ModelAdapter(VarLen().eval(), [TimeSeries("ecg", window=8, channels=["I", "II"]),
                                             Image("image", patch=4)], ["ok", "bad"])
    rng = np.random.default_rng(0)
    lens, sizes = [20, 33, 7, 50, 20, 3, 41, 20], [8, 8, 12, 8, 16, 8, 12, 8]
    ds = MultimodalDataset({
        "ecg": [rng.normal(size=(n, 2)).astype(np.float32) for n in lens],
        "image": [rng.integers(0, 256, size=(s, s + 4, 3), dtype=np.uint8) for s in sizes]})
    h, logits = one_by_one(adapter, ds)
    f = extract_features(adapter, ds, batch_size=4, cache_dir=cache)
    np.testing.assert_array_equal(f.indices, np.arange(len(ds)))
    np.testing.assert_allclose(f.h, h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f.logits, logits, rtol=1e-5, atol=1e-6)
    ext = neuron_extremes(adapter, ds, k=2, batch_size=3)
    np.testing.assert_array_equal(ext.top_indices, full_sort(h, 2)[0])


def test_instances_that_cannot_be_prepared_are_left_out_and_named(cache):
    from multiviz_widgets import Text
    adapter = ModelAdapter(MeanPool().eval(), [Text("review", VOCAB)], ["neg", "pos"])
    texts = list(REVIEWS)
    texts[3] = "?!"                     # no tokens
    texts[7] = "?"
    ds = MultimodalDataset({"review": texts})
    kept = [i for i in range(len(ds)) if i not in (3, 7)]
    h, _ = one_by_one(adapter, MultimodalDataset({"review": [texts[i] for i in kept]}))
    with pytest.warns(RuntimeWarning, match=r"2 of 10 instances could not be prepared.*#3 "
                                            r"\(ValueError: review: the text '\?!' has no tokens"):
        f = extract_features(adapter, ds, batch_size=3, cache_dir=cache)
    np.testing.assert_array_equal(f.indices, kept)
    np.testing.assert_allclose(f.h, h, rtol=1e-5, atol=1e-6)
    assert sorted(f.skipped) == [3, 7] and "no tokens" in f.skipped[7]
    assert f.forward_passes == len(kept) + rows_check(3)
    with pytest.warns(RuntimeWarning, match="2 of 10"):
        again = extract_features(adapter, ds, batch_size=3, cache_dir=cache)
    assert again.from_cache and again.skipped == f.skipped
    np.testing.assert_array_equal(again.indices, kept)
    ext = neuron_extremes(None, k=20, features=again)
    assert set(ext.top_indices.ravel()) == set(kept)
    with pytest.warns(RuntimeWarning, match="2 of 10"):
        ext = neuron_extremes(adapter, ds, k=20, batch_size=4)
    assert set(ext.top_indices.ravel()) == set(kept) and ext.n_instances == len(kept)
    with pytest.raises(ValueError, match="no tokens"):     # nothing left: the error itself
        extract_features(adapter, ds, indices=[3, 7], cache=False)


class Calibrated(TinyFusion):
    """Reads a non-persistent buffer (left out of the state_dict) and a plain float setting."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(D), persistent=False)
        self.temperature = 1.0

    def forward(self, tab, series):
        self.calls += 1                          # a counter: must not defeat the cache
        h = torch.relu(self.tab(tab) + self.ts(series.flatten(1))) * self.scale / self.temperature
        return self.classifier(h)


def test_the_cache_sees_non_persistent_buffers_and_float_settings_but_not_counters(cache):
    mods = [Tabular("tab", columns=[f"c{i}" for i in range(F)]),
            TimeSeries("series", window=4, channels=["a", "b"])]
    model = Calibrated().eval()
    adapter = ModelAdapter(model, mods, [f"k{i}" for i in range(C)], decision_layer="classifier")
    ds = make_dataset()
    first = extract_features(adapter, ds, cache_dir=cache)
    assert extract_features(adapter, ds, cache_dir=cache).from_cache   # calls changed: a hit
    for change in (lambda: model.scale.fill_(3.0), lambda: setattr(model, "temperature", 5.0)):
        change()
        again = extract_features(adapter, ds, cache_dir=cache)
        assert not again.from_cache
        np.testing.assert_allclose(again.h, extract_features(adapter, ds, cache=False).h)
    assert not np.allclose(again.h, first.h)


def test_the_cache_key_covers_a_forward_set_on_the_model_instance(cache):
    """model.forward = patched (a closure over the old one) runs instead of the class's: a
    patch that made one instance's logits NaN kept the unpatched model's cached features."""
    adapter, ds = make_adapter(), make_dataset()
    plain_key = rep.features_key(adapter, ds)
    forward = adapter.model.forward

    def negated(*args):
        return -forward(*args)
    adapter.model.forward = negated
    assert rep.features_key(adapter, ds) != plain_key
    del adapter.model.forward
    assert rep.features_key(adapter, ds) == plain_key


def test_the_cache_key_covers_how_the_model_is_called_and_a_functions_code(cache):
    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.classifier = nn.Linear(2, 2)

        def forward(self, b, a):                 # its arguments in the other order
            return self.classifier(torch.cat([a, b], 1))
    mods = lambda: [Tabular("a", columns=["x"]), Tabular("b", columns=["y"])]  # noqa: E731
    model = Named().eval()
    # the modalities' names in another order than forward()'s: the adapter calls by name by
    # itself (by position each input would reach the other argument), so both adapters call
    # the model alike and share the cached features; with the arguments in the modalities'
    # order under other names, the call is by position and its key differs
    by_order = ModelAdapter(model, mods(), ["n", "p"])
    by_name = ModelAdapter(model, mods(), ["n", "p"], keyword_inputs=True)
    assert by_order.keyword_inputs and by_order.fingerprint() == by_name.fingerprint()
    ds = MultimodalDataset({"a": [np.array([1.0]), np.array([2.0])],
                            "b": [np.array([5.0]), np.array([7.0])]})
    assert rep.features_key(by_order, ds) == rep.features_key(by_name, ds)
    extract_features(by_order, ds, cache_dir=cache)
    named = extract_features(by_name, ds, cache_dir=cache)
    assert named.from_cache
    np.testing.assert_allclose(named.h, extract_features(by_name, ds, cache=False).h)

    class Unnamed(Named):            # by position: (a, b); by keyword: b=..., a=...
        def forward(self, *inputs, **named):
            return super().forward(*(inputs or (named["b"], named["a"])))
    plain = Unnamed().eval()
    positional = ModelAdapter(plain, mods(), ["n", "p"])
    keywords = ModelAdapter(plain, mods(), ["n", "p"], keyword_inputs=True)
    assert rep.features_key(positional, ds) != rep.features_key(keywords, ds)
    assert not np.allclose(extract_features(positional, ds, cache=False).h,
                           extract_features(keywords, ds, cache=False).h)
    # two tokenizers that are both "<lambda>" are two tokenizers
    from multiviz_widgets import Text
    vocab = ["[PAD]", "[UNK]", "red", "blue"]
    first, last = (Text("q", vocab=vocab, tokenize=lambda s: s.split()),
                   Text("q", vocab=vocab, tokenize=lambda s: s.split()[-1:]))
    assert first.signature() != last.signature()
    same = Text("q", vocab=vocab, tokenize=lambda s: s.split())
    assert same.signature() == first.signature()             # the same code: the same key


def test_instances_whose_output_is_not_finite_are_left_out_and_named(cache):
    """A NaN or infinite h or logit: the instance has no row (its features could not be ranked,
    projected or fit, nor its prediction read) and ``skipped`` says which values; when every
    instance's output is not finite, a clear error."""
    adapter, ds = make_adapter(), make_dataset(12)
    bad = {4: float("nan"), 9: float("inf")}
    rows = {i: torch.as_tensor(ds[i]["tab"]) for i in bad}
    forward = adapter.model.forward

    def broken(tab, series):
        out = forward(tab, series)
        for i, v in bad.items():
            hit = (tab == rows[i]).all(1)
            out = torch.where(hit[:, None], torch.full_like(out, v), out)
        return out
    adapter.model.forward = broken
    with pytest.warns(RuntimeWarning, match=r"2 of 12 instances could not be given "
                                            r"finite outputs .*#4 \(model output not finite: "
                                            r"logits 3 of 3 values NaN or infinite\)"):
        f = extract_features(adapter, ds, batch_size=5, cache_dir=cache)
    assert f.indices.tolist() == [i for i in range(12) if i not in bad]
    assert np.isfinite(f.h).all() and np.isfinite(f.logits).all()
    assert sorted(f.skipped) == [4, 9]
    # the model ran the 12 rows, the two left out after it included (it counted 10)
    assert f.forward_passes == 12 + rows_check(5)
    with pytest.warns(RuntimeWarning, match="2 of 12 instances"):
        ext = neuron_extremes(adapter, ds, k=3, batch_size=5)
    assert ext.forward_passes == 12 + rows_check(5) and ext.n_instances == 10
    with pytest.warns(RuntimeWarning, match="2 of 12 instances"):       # said again
        again = extract_features(adapter, ds, batch_size=5, cache_dir=cache)
    assert again.from_cache and again.skipped == f.skipped
    assert neuron_extremes(None, features=f).n_instances == 10
    bad.update({i: float("nan") for i in range(12)})
    rows.update({i: torch.as_tensor(ds[i]["tab"]) for i in range(12)})
    with pytest.raises(ValueError, match=r"not finite for every instance it ran \(12; instance "
                                         r"0: logits 3 of 3 values NaN.*Check the model"):
        extract_features(adapter, ds, cache=False)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 20), k=st.integers(1, 6), ties=st.booleans(), seed=st.integers(0, 99))
def test_gallery_rows_show_each_instance_once_and_the_lowest_of_the_others(n, k, ties, seed):
    rng = np.random.default_rng(seed)
    h = (rng.integers(0, 2, (n, 2)) if ties else rng.normal(size=(n, 2))).astype(np.float64)
    ext = StreamingExtremes(k)
    ext.update(h)
    ext = ext.result()
    for j in range(2):
        top, bottom = rep.gallery_rows(ext, j, h[:, j])
        shown = [i for i, _ in top + bottom]
        assert len(shown) == len(set(shown)) == min(n, len(top) + len(bottom))
        assert [i for i, _ in top] == [i for i, _ in ext.top(j)]
        rest = sorted((v, i) for i, v in enumerate(h[:, j]) if i not in dict(top))
        if n < 2 * k:                       # every instance is in one row
            assert sorted(shown) == list(range(min(n, 2 * k)))
        # the lowest of the others (also when the bottom list overlaps the top one: a tie)
        assert [i for i, _ in bottom] == [i for _, i in rest][:k]


def test_the_skipped_warning_says_only_what_went_wrong():
    text = rep._skipped_text
    model, nan = rep._MODEL_FAILED + "raised", rep._NOT_FINITE + "logits"
    assert "could not be prepared and are" in text({1: "ValueError: no tokens"}, 5)
    assert "could not be run by the model and" in text({1: model}, 5)
    assert "could not be given finite outputs and" in text({1: nan}, 5)
    assert "could not be prepared, run by the model or given finite outputs" in text(
        {1: "ValueError: x", 2: model, 3: nan}, 5)
    assert "could not be prepared or given finite outputs" in text({1: "TypeError: x", 2: nan}, 5)


MODEL_CELL = """
import torch
from torch import nn


def act(x):
    return torch.{act}(x)


class M(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(2, 3)
        self.classifier = nn.Linear(3, 2)

    def encode(self, a, b):
        return {encode}

    def forward(self, a, b):
        mode = "x"
        return self.classifier(act(self.encode(a, b)) if mode in {{"x", "y"}} else a)
"""


def model_from_cell(run: int, act: str = "tanh", encode: str = "self.enc(torch.cat([a, b], 1))"):
    """The model of a notebook cell's ``run``-th execution (each run its own file name)."""
    scope: dict = {}
    exec(compile(MODEL_CELL.format(act=act, encode=encode), f"/tmp/ipykernel_7/{run}.py",
                 "exec"), scope)
    return scope["M"]().eval()


def test_the_cache_key_covers_the_models_code_and_its_number_of_classes(cache):
    """An edit of forward (or of a method or a module-level function it calls) in a notebook
    cell is another key, the same code run again is the same; a one-logit model read as one
    class or as two (logits [N, 1] or [N, 2]) is two keys."""
    mods = lambda: [Tabular("a", columns=["x"]), Tabular("b", columns=["y"])]  # noqa: E731
    ds = MultimodalDataset({"a": [np.array([1.0]), np.array([-2.0])],
                            "b": [np.array([5.0]), np.array([-7.0])]})
    key = lambda model: rep.features_key(ModelAdapter(model, mods(), ["n", "p"]), ds)  # noqa
    first = key(model_from_cell(1))
    assert key(model_from_cell(2)) == first                   # the cell run again
    edits = [key(model_from_cell(3, act="relu")),             # the helper forward calls
             key(model_from_cell(4, encode="self.enc(torch.cat([b, a], 1))"))]  # a method
    assert len({first, *edits}) == 3
    old = extract_features(ModelAdapter(model_from_cell(1), mods(), ["n", "p"]), ds,
                           cache_dir=cache)
    new = extract_features(ModelAdapter(model_from_cell(3, act="relu"), mods(), ["n", "p"]), ds,
                           cache_dir=cache)
    assert not new.from_cache and (old.h < 0).any() and (new.h >= 0).all()
    # the code's constants are hashed in an order that does not follow the process's string
    # hashing (the set {"x", "y"} in forward is a frozenset constant)
    import subprocess
    import sys
    probe = ("import sys; sys.path.insert(0, 'tests'); from test_representations import "
             "model_from_cell; from multiviz_widgets.kernels.representations import "
             "model_code_digest; print(model_code_digest(model_from_cell(1)))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digests = {subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                              check=True, cwd=root, env={**os.environ, "PYTHONHASHSEED": seed}
                              ).stdout.strip() for seed in ("1", "2")}
    assert digests == {rep.model_code_digest(model_from_cell(1))}

    class OneLogit(nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = nn.Linear(2, 1)

        def forward(self, a, b):
            return self.classifier(torch.cat([a, b], 1))
    model = OneLogit().eval()
    as_one = ModelAdapter(model, mods(), ["score"])
    as_two = ModelAdapter(model, mods(), ["neg", "pos"])
    assert rep.features_key(as_one, ds) != rep.features_key(as_two, ds)
    assert extract_features(as_one, ds, cache_dir=cache).logits.shape == (2, 1)
    two = extract_features(as_two, ds, cache_dir=cache)
    assert two.logits.shape == (2, 2) and not two.from_cache


DECORATED_CELL = """
import functools
import torch
from torch import nn


def plain(f):                       # a decorator without functools.wraps: f only in its closure
    def run(*args):
        return f(*args)
    return run


def wrapped(f):
    @functools.wraps(f)
    def run(*args):
        return f(*args)
    return run


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    @{decorator}
    def forward(self, x):
        return torch.{act}(self.fc(x))
"""


def test_the_code_digest_follows_decorated_methods_and_libraries_named_like_torch():
    """A decorated forward (torch.no_grad's, autocast's or a user's wrapper) was hashed as the
    wrapper's code, and a module whose name only began with "torch" (torchvision, torch_utils)
    was taken for torch's and not hashed: an edit of tanh to relu kept the cache key."""
    def digest(decorator="plain", act="tanh", module="__main__"):
        scope: dict = {"__name__": module}
        exec(compile(DECORATED_CELL.format(decorator=decorator, act=act),
                     f"/tmp/ipykernel_7/{module}.py", "exec"), scope)
        return rep.model_code_digest(scope["M"]())
    for decorator in ("torch.no_grad()", 'torch.autocast("cpu", enabled=False)', "plain",
                      "wrapped", "functools.lru_cache(maxsize=None)",
                      "functools.cached_property"):
        assert digest(decorator) == digest(decorator), decorator
        assert digest(decorator) != digest(decorator, act="relu"), decorator
    for module in ("torch_utils", "torchvision.models.mine", "torch_geometric.nn.mine"):
        assert digest(module=module) != digest(module=module, act="relu"), module
    # torch's own code is left to torch's version, which the key has too
    assert rep.model_code_digest(nn.Linear(2, 2)) == rep.model_code_digest(nn.Linear(3, 2))


def test_a_float64_models_features_keep_their_precision_and_rank_their_extremes():
    """h = 1 + 1e-9 x: rounded to float32 every instance tied, and the extremes were the first
    instances by index."""
    class Fine(nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = nn.Linear(1, 2).double()

        def forward(self, x):
            return self.classifier(1.0 + 1e-9 * x)
    adapter = ModelAdapter(Fine().eval(), [Tabular("x", columns=["v"])], ["a", "b"])
    ds = MultimodalDataset({"x": [np.array([float(v)]) for v in (0, 1, 2, 5, 4, 3)]})
    feats = extract_features(adapter, ds, cache=False)
    assert feats.h.dtype == np.float64 and len(np.unique(feats.h)) == 6
    ext = neuron_extremes(adapter, ds, k=3)
    assert [i for i, _ in ext.top(0)] == [3, 4, 5]
    dc = decision_contributions(adapter, ds[3])
    assert dc.h.dtype == np.float64


STOP = {"a"}


def _drop_stop(s):
    return [w for w in s.split() if w not in STOP]


def test_a_tokenizer_is_keyed_by_what_it_reads_sets_patterns_globals_and_objects():
    """Closures over a set or a compiled pattern, and a module global set, were keyed by their
    type alone (so two tokenizers shared cached features); an object was keyed by id(), which
    another object gets once the first is freed."""
    import re as re_module

    from multiviz_widgets import Text
    vocab = ["[PAD]", "[UNK]", "a", "b"]

    def sig(tokenize):
        return Text("q", vocab=vocab, tokenize=tokenize).signature()

    def dropping(words):
        return lambda s: [w for w in s.split() if w not in words]

    def splitting(pattern):
        return lambda s: pattern.findall(s)
    assert sig(dropping({"a"})) != sig(dropping({"b"}))
    assert sig(dropping({"a", "b"})) == sig(dropping({"b", "a"}))
    assert sig(splitting(re_module.compile(r"\w+"))) != sig(splitting(re_module.compile(r"\S+")))
    before = sig(_drop_stop)
    STOP.add("b")
    try:
        assert sig(_drop_stop) != before
    finally:
        STOP.discard("b")

    class Tok:
        def __init__(self, lower):
            self.lower = lower

        def __call__(self, s):
            return (s.lower() if self.lower else s).split()
    seen = set()
    for k in range(6):                    # freed at once: CPython reuses the ids
        seen.add(sig(Tok(bool(k % 2))))
    assert len(seen) == 6
    tok = Tok(True)
    assert sig(tok) == sig(tok) and sig(tok.__call__) == sig(tok.__call__)


# -- instances the model cannot run are left out and named, like unprepared ones ---------------
class ConvSeries(nn.Module):
    """tab [F] + series [T, CH] through Conv1d(kernel 5): a series shorter than 5 steps makes
    the model raise; so does a row whose first column is above 50 (``strict``)."""

    def __init__(self, strict=False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(CH, D, kernel_size=5)
        self.tab = nn.Linear(F, D)
        self.classifier = nn.Linear(D, C)
        self.strict = strict
        self.calls = 0

    def forward(self, tab, series):
        self.calls += 1
        if self.strict and bool((tab[:, 0] > 50).any()):
            raise ValueError("tab[0] is out of the model's range")
        s = torch.relu(self.conv(series.transpose(1, 2))).amax(-1)
        return self.classifier(torch.tanh(self.tab(tab)) + s)


def conv_case(n=12, short=(), big=(), strict=False, model=None):
    """(adapter, dataset): series of 8 or 10 steps, 3 steps at ``short``; tab[0] = 99 at ``big``."""
    model = (model or ConvSeries(strict)).eval()
    adapter = ModelAdapter(model, [Tabular("tab", columns=[f"c{i}" for i in range(F)]),
                                   TimeSeries("series", window=4, channels=["a", "b"])],
                           [f"k{i}" for i in range(C)], decision_layer="classifier")
    rng = np.random.default_rng(1)
    tab = [rng.normal(size=F).astype(np.float32) for _ in range(n)]
    ser = [rng.normal(size=(8 if i % 3 else 10, CH)).astype(np.float32) for i in range(n)]
    for i in short:
        ser[i] = ser[i][:3]
    for i in big:
        tab[i][0] = 99.0
    return adapter, MultimodalDataset({"tab": tab, "series": ser},
                                      labels=rng.integers(0, C, n))


def test_instances_the_model_cannot_run_are_left_out_and_named(cache):
    """One series shorter than the model's conv kernel used to stop extract_features,
    neuron_extremes and so the Explorer's embedding and gallery, with an error naming no
    instance."""
    adapter, ds = conv_case(short=(4, 9))
    kept = [i for i in range(len(ds)) if i not in (4, 9)]
    h, logits = one_by_one(adapter, MultimodalDataset(
        {"tab": [ds[i]["tab"] for i in kept], "series": [ds[i]["series"] for i in kept]}))
    with pytest.warns(RuntimeWarning, match=r"2 of 12 instances could not be run by "
                                            r"the model .*#4 \(ModelInputError: the model raised "
                                            r"RuntimeError on its inputs \(tab \(4,\), series "
                                            r"\(3, 2\)\): .*Kernel size"):
        f = extract_features(adapter, ds, batch_size=4, cache_dir=cache)
    np.testing.assert_array_equal(f.indices, kept)
    np.testing.assert_allclose(f.h, h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f.logits, logits, rtol=1e-5, atol=1e-6)
    # the 10 it ran, and the calls that found the two it could not: their batch of 2 (the
    # same shapes), then each alone; the rows' check runs on the first batch, the three
    # series of 10 steps (0, 3 and 6)
    assert (sorted(f.skipped) == [4, 9]
            and f.forward_passes == len(kept) + 2 + 1 + 1 + rows_check(3))
    assert all(r.startswith("ModelInputError: the model raised RuntimeError") and
               "Check that the modalities" not in r for r in f.skipped.values())   # brief
    with pytest.warns(RuntimeWarning, match="2 of 12"):          # the cache keeps them too
        again = extract_features(adapter, ds, batch_size=4, cache_dir=cache)
    assert again.from_cache and again.skipped == f.skipped
    np.testing.assert_array_equal(again.indices, kept)
    with pytest.warns(RuntimeWarning, match=r"2 of 12 .*#4 .*#9"):
        ext = neuron_extremes(adapter, ds, k=20, batch_size=4)
    assert set(ext.top_indices.ravel()) == set(kept) and ext.n_instances == len(kept)
    skipped = {}
    with pytest.warns(RuntimeWarning, match="1 of 6"):
        got = [i for b, _, _ in rep.stream_features(adapter, ds, indices=range(6), skipped=skipped)
               for i in b]
    assert sorted(got) == [0, 1, 2, 3, 5] and list(skipped) == [4]


def test_a_batch_the_model_cannot_run_is_halved_only_on_failure(cache):
    """Instances of one shape group that the model rejects by value are found by halving the
    batch; when every batch runs, there is one forward pass per batch, nothing more."""
    adapter, ds = conv_case(n=16, strict=True)
    model = adapter.model
    extract_features(adapter, ds, batch_size=16, cache=False)
    # two shape groups (8 and 10 steps), one batch each
    assert model.calls == 2 + 2                 # and the two passes of the rows' check
    adapter, ds = conv_case(n=16, big=(5,), strict=True)
    model = adapter.model
    with pytest.warns(RuntimeWarning, match=r"1 of 16 .*#5 \(ModelInputError: the model raised "
                                            r"ValueError .*out of the model's range"):
        f = extract_features(adapter, ds, batch_size=16, cache=False)
    assert list(f.skipped) == [5] and 5 not in f.indices and len(f) == 15
    # instance 5 is in the group of 10 instances of 8 steps: halved about log2(10) times
    assert model.calls <= 2 + 2 * 4 + 1 + 2
    h, _ = one_by_one(adapter, MultimodalDataset(
        {"tab": [ds[i]["tab"] for i in f.indices], "series": [ds[i]["series"] for i in f.indices]}))
    np.testing.assert_allclose(f.h, h, rtol=1e-5, atol=1e-6)


def test_when_the_model_runs_no_instance_its_error_is_raised():
    adapter, ds = conv_case(n=6, short=range(6))
    from multiviz_widgets.adapter import ModelInputError
    with pytest.raises(ModelInputError, match=r"series: \(1, 3, 2\)\): .*Kernel size"):
        extract_features(adapter, ds, cache=False)


class _Raising(ConvSeries):
    def __init__(self, error):
        super().__init__()
        self.error = error

    def forward(self, tab, series):
        self.calls += 1
        raise self.error


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory")])
def test_errors_about_memory_are_raised_as_they_are_not_blamed_on_instances(error):
    """Out of memory (raised by the adapter as it is, or wrapped as a ModelInputError on the
    host) stops the extraction at once: no halving, no instance left out."""
    adapter, ds = conv_case(n=8, model=_Raising(error))
    with pytest.raises(RuntimeError, match="memory") as e:
        extract_features(adapter, ds, batch_size=8, cache=False)
    assert e.value is error or e.value.__cause__ is error
    assert adapter.model.calls == 1


def test_a_model_that_runs_no_instance_fails_fast_without_halving_the_whole_dataset():
    """A misconfigured model (it raises on every instance) is not searched batch by batch for
    the instances it cannot run: after GIVE_UP_AFTER instances, none run, its error comes."""
    from multiviz_widgets.adapter import ModelInputError
    from multiviz_widgets.kernels.common import GIVE_UP_AFTER
    from multiviz_widgets.kernels.emap import emap
    model = _Raising(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    adapter, ds = conv_case(n=600, model=model)
    with pytest.raises(ModelInputError, match="mat1 and mat2"):
        extract_features(adapter, ds, batch_size=128, cache=False)
    # halving one batch down to GIVE_UP_AFTER single instances: far fewer calls than 2 x 600
    assert model.calls <= 4 * GIVE_UP_AFTER + 16, model.calls
    model.calls = 0
    with pytest.raises(ModelInputError, match=r"cannot run any of the \d+ instances it tried alone"
                                              r" \(of 600\)"):
        emap(adapter, ds, factorized=False, batch_size=128)
    assert model.calls <= 4 * GIVE_UP_AFTER + 16, model.calls


def test_a_whole_input_shape_the_model_cannot_run_is_left_out_without_stopping_the_others():
    """Batches come one input shape at a time: when the first GIVE_UP_AFTER instances of a
    shape all fail (a series shorter than the kernel), the rest of that shape is left out
    untried and named, and the other shapes still run, in whatever order they come."""
    from multiviz_widgets.kernels.common import GIVE_UP_AFTER
    n_short = GIVE_UP_AFTER + 20
    model = ConvSeries()
    adapter, ds = conv_case(n=n_short + 30, short=range(n_short), model=model)
    with pytest.warns(RuntimeWarning, match=r"could not be run by the model"):
        f = extract_features(adapter, ds, batch_size=8, cache=False)
    assert sorted(f.indices.tolist()) == list(range(n_short, n_short + 30))
    assert sorted(f.skipped) == list(range(n_short))
    untried = [why for why in f.skipped.values() if "not tried" in why]
    assert untried and all(f"ran none of the first {GIVE_UP_AFTER}" in why for why in untried)
    # the failing shape was not halved instance by instance to its end
    assert model.calls < 4 * GIVE_UP_AFTER + 2 * 30


class _OutOfRange(Exception):
    """A model's own exception class (not a RuntimeError or ValueError)."""


class _Guarded(ConvSeries):
    def __init__(self, error):
        super().__init__()
        self.error = error

    def forward(self, tab, series):
        if bool((tab[:, 0] > 50).any()):
            raise self.error("tab[0] is out of the model's range")
        return super().forward(tab, series)


@pytest.mark.parametrize("error", [ZeroDivisionError, _OutOfRange, NotImplementedError])
def test_an_instance_the_model_refuses_with_any_exception_is_left_out_and_named(error):
    """Only RuntimeError, ValueError, TypeError, IndexError, KeyError and AssertionError were
    read as the model refusing an instance: one instance raising ZeroDivisionError (or the
    model's own exception class) stopped the whole dataset's features, naming no instance, and
    the Explorer's embedding was empty. Any exception now leaves out that instance only."""
    adapter, ds = conv_case(n=12, big=[3], model=_Guarded(error))
    with pytest.warns(RuntimeWarning, match=r"#3 \(") as w:
        f = extract_features(adapter, ds, batch_size=8, cache=False)
    assert sorted(f.skipped) == [3] and len(f.indices) == 11
    assert error.__name__ in str(w[0].message) and "out of the model's range" in f.skipped[3]


class _Misspelt(ConvSeries):
    def forward(self, tab, series):
        self.calls += 1
        return self.clasifier(tab)                    # a typo: an error of the model's code


def test_an_error_of_the_models_own_code_is_raised_as_it_is_at_once():
    """An AttributeError (a typo in forward) is not an instance the model refuses: it was
    wrapped with advice about input shapes after halving every batch (62 model calls)."""
    model = _Misspelt()
    adapter, ds = conv_case(n=12, model=model)
    with pytest.raises(AttributeError, match="clasifier"):
        extract_features(adapter, ds, batch_size=8, cache=False)
    assert model.calls == 1


# -- the cache key: hooks and globals; the cache folder: ~, temporaries, bound, clearing -------
def test_forward_hooks_and_pre_hooks_are_in_the_cache_key(cache):
    """Before: the key left out hooks, so a hook-based ablation (a pre-hook that scales the
    decision layer's input, a forward hook that shifts a module's output, torch's global
    hooks) was served the features computed without it."""
    from torch.nn.modules.module import register_module_forward_hook
    adapter, ds = make_adapter(), make_dataset()
    plain = extract_features(adapter, ds, cache_dir=cache)
    model = adapter.model
    for register in (
            lambda: model.classifier.register_forward_pre_hook(lambda m, inp: (inp[0] * 2,)),
            lambda: model.tab.register_forward_hook(lambda m, inp, out: out + 1),
            lambda: model.tab.register_forward_hook(lambda m, a, k, out: out + 1,
                                                    with_kwargs=True),
            lambda: register_module_forward_hook(
                lambda m, inp, out: out * 3 if m is model.ts else None)):
        handle = register()
        try:
            hooked = extract_features(adapter, ds, cache_dir=cache)
            fresh = extract_features(adapter, ds, cache=False)
        finally:
            handle.remove()
        assert not hooked.from_cache and hooked.key != plain.key
        np.testing.assert_allclose(hooked.h, fresh.h)
        assert not np.allclose(hooked.h, plain.h)
        # the hook gone, the first features are served again
        assert extract_features(adapter, ds, cache_dir=cache).key == plain.key
    # the same hook code registered again gives the same key (no ids or addresses in it)
    keys = set()
    for _ in range(2):
        handle = model.tab.register_forward_hook(lambda m, inp, out: out + 1)
        keys.add(rep.features_key(adapter, ds))
        handle.remove()
    assert len(keys) == 1


GLOBALS_CELL = """
import torch
from torch import nn

SCALE = {scale}
BIG = torch.zeros(1 << 17)
CALLS = 0


class M(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(2, 3)
        self.classifier = nn.Linear(3, 2)

    def forward(self, a, b):
        global CALLS
        CALLS += 1
        return self.classifier(torch.relu(self.enc(torch.cat([a, b], 1)) * SCALE + BIG[0]))
"""


def test_plain_globals_the_models_code_reads_are_in_the_cache_key(cache):
    """Before: ``SCALE = 3.0`` read in forward was not in the key, so changing it kept the
    features of SCALE = 1.0. A global the code writes (a call counter) and a large array
    are left out (the counter would give a new key at every extraction)."""
    mods = lambda: [Tabular("a", columns=["x"]), Tabular("b", columns=["y"])]  # noqa: E731
    ds = MultimodalDataset({"a": [np.array([1.0]), np.array([-2.0])],
                            "b": [np.array([5.0]), np.array([-7.0])]})

    def adapter(scale):
        scope: dict = {"__name__": "notebook_cell"}
        exec(compile(GLOBALS_CELL.format(scale=scale), "/tmp/ipykernel_9/cell.py", "exec"),
             scope)
        return ModelAdapter(scope["M"]().eval(), mods(), ["n", "p"]), scope
    one, scope = adapter(1.0)
    first = extract_features(one, ds, cache_dir=cache)
    again = extract_features(one, ds, cache_dir=cache)         # CALLS changed meanwhile
    assert again.from_cache and scope["CALLS"] > 0
    scope["BIG"][1] = 5.0                                      # not read through a key
    assert rep.features_key(one, ds) == first.key
    scope["SCALE"] = 3.0
    changed = extract_features(one, ds, cache_dir=cache)
    assert not changed.from_cache
    np.testing.assert_allclose(changed.h, extract_features(one, ds, cache=False).h)
    assert rep.features_key(adapter(3.0)[0], ds) == changed.key     # the same in a new cell
    scope["SCALE"] = 1.0
    assert extract_features(one, ds, cache_dir=cache).key == first.key


def test_a_tilde_in_the_cache_location_is_the_home_folder(tmp_path, monkeypatch):
    """Before: cache_dir="~/c" and MULTIVIZ_CACHE="~/e" made a folder named ~ in the current
    folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert rep.default_cache_dir("~/c") == tmp_path / "home" / "c"
    monkeypatch.setenv("MULTIVIZ_CACHE", "~/e")
    assert rep.default_cache_dir() == tmp_path / "home" / "e"
    f = extract_features(make_adapter(), make_dataset())
    assert f.path.startswith(str(tmp_path / "home" / "e"))
    assert not (tmp_path / "~").exists()


def test_a_truncated_cache_file_is_closed_after_it_is_found_unreadable(cache):
    """Before: np.load opened the file itself and left it open when it could not read it: a
    ResourceWarning "unclosed file" at the next garbage collection."""
    import gc
    import warnings
    adapter, ds = make_adapter(), make_dataset()
    first = extract_features(adapter, ds, cache_dir=cache)
    data = open(first.path, "rb").read()
    with open(first.path, "wb") as f:
        f.write(data[: len(data) // 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = extract_features(adapter, ds, cache_dir=cache)
        gc.collect()
    assert not again.from_cache
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], \
        [str(w.message) for w in caught]
    assert any("unreadable feature cache" in str(w.message) for w in caught)


def test_a_save_removes_the_temporaries_of_writers_killed_over_an_hour_ago(cache):
    """Before: a writer killed mid-write left its .<key>.npz.XXXX.tmp in the folder forever.
    Only the cache's own temporaries older than an hour go (a live writer's is younger)."""
    cache.mkdir(parents=True)
    key = "0123456789abcdef0123456789abcdef01234567"
    old, young = cache / f".{key}.npz.abc_12xy.tmp", cache / f".{key}.npz.zz9_8765.tmp"
    other = cache / ".notes.txt.abc_12xy.tmp"
    for p in (old, young, other):
        p.write_bytes(b"partial")
    hours_ago = time.time() - 7200
    for p in (old, other):
        os.utime(p, (hours_ago, hours_ago))
    extract_features(make_adapter(), make_dataset(), cache_dir=cache)
    assert not old.exists() and young.exists() and other.exists()


def _cache_files(folder):
    return sorted(p for p in os.listdir(folder) if p.endswith(".npz"))


def test_the_cache_folder_is_bounded_by_removing_the_least_recently_used(cache, monkeypatch):
    """Before: one full-dataset file per model change, kept forever. After a save the least
    recently used files (a hit renews a file) beyond $MULTIVIZ_CACHE_MAX_MB go, never the
    file just written."""
    ds = make_dataset()
    a, b, c = (make_adapter(seed) for seed in (1, 2, 3))
    fa = extract_features(a, ds, cache_dir=cache)
    size = os.path.getsize(fa.path)
    monkeypatch.setenv("MULTIVIZ_CACHE_MAX_MB", str(2.5 * size / 1e6))    # two files fit
    fb = extract_features(b, ds, cache_dir=cache)
    now = time.time()
    os.utime(fa.path, (now - 100, now - 100))
    os.utime(fb.path, (now - 50, now - 50))
    assert extract_features(a, ds, cache_dir=cache).from_cache   # a used after b
    fc = extract_features(c, ds, cache_dir=cache)
    assert _cache_files(cache) == sorted(os.path.basename(f.path) for f in (fa, fc))
    monkeypatch.setenv("MULTIVIZ_CACHE_MAX_MB", "0")            # the new file stays alone
    fb = extract_features(b, ds, cache_dir=cache)
    assert _cache_files(cache) == [os.path.basename(fb.path)]
    monkeypatch.setenv("MULTIVIZ_CACHE_MAX_MB", "lots")
    with pytest.warns(RuntimeWarning, match="MULTIVIZ_CACHE_MAX_MB='lots'"):
        extract_features(a, ds, cache_dir=cache)
    assert len(_cache_files(cache)) == 2                        # the default: both kept


def test_clear_feature_cache_removes_the_cache_files_and_nothing_else(cache, monkeypatch):
    adapter, ds = make_adapter(), make_dataset()
    f = extract_features(adapter, ds, cache_dir=cache)
    extract_features(make_adapter(1), ds, cache_dir=cache)
    (cache / "mine.npz").write_bytes(b"a user's file")
    freed = rep.clear_feature_cache(cache)
    assert freed > os.path.getsize(cache / "mine.npz")
    assert os.listdir(cache) == ["mine.npz"]
    assert not extract_features(adapter, ds, cache_dir=cache).from_cache
    monkeypatch.setenv("MULTIVIZ_CACHE", str(cache))
    assert rep.clear_feature_cache() > 0 and not os.path.exists(f.path)
    assert rep.clear_feature_cache(cache / "missing") == 0


def test_what_a_hook_or_the_models_code_fills_as_it_runs_keeps_the_key(cache):
    """Before: a hook that records activations into a dict, and a module-level memo dict that
    forward fills, were hashed by content: every forward pass gave a new key, so the features
    were extracted again (and one more file left in the cache) after any other computation."""
    adapter, ds = make_adapter(), make_dataset()
    acts: dict = {}
    handle = adapter.model.tab.register_forward_hook(
        lambda m, inp, out: acts.__setitem__("tab", out.detach()))
    try:
        first = extract_features(adapter, ds, cache_dir=cache)
        assert acts                                           # the hook ran, filling its dict
        from multiviz_widgets.kernels.unimodal import attribute
        attribute(adapter, ds[3], "gradient", target=0)       # another computation meanwhile
        again = extract_features(adapter, ds, cache_dir=cache)
        assert again.from_cache and again.key == first.key
    finally:
        handle.remove()
    memo_cell = GLOBALS_CELL.replace("CALLS = 0", "CALLS = 0\nMEMO = dict()")
    scope: dict = {"__name__": "notebook_cell"}
    exec(compile(memo_cell.format(scale=1.0).replace(
        "global CALLS", "global CALLS\n        MEMO[CALLS] = 1"), "/tmp/ipykernel_9/c.py",
        "exec"), scope)
    mods = [Tabular("a", columns=["x"]), Tabular("b", columns=["y"])]
    tiny = ModelAdapter(scope["M"]().eval(), mods, ["n", "p"])
    small = MultimodalDataset({"a": [np.array([1.0]), np.array([-2.0])],
                               "b": [np.array([5.0]), np.array([-7.0])]})
    one = extract_features(tiny, small, cache_dir=cache)
    assert scope["MEMO"]                                      # forward filled it
    assert extract_features(tiny, small, cache_dir=cache).from_cache
    assert rep.features_key(tiny, small) == one.key


def test_a_hook_holding_a_bfloat16_tensor_is_keyed_by_its_bytes(cache):
    """Before: hashing a hook's closed-over bfloat16 tensor (a steering vector) raised numpy's
    "unsupported ScalarType BFloat16" out of extract_features."""
    adapter, ds = make_adapter(), make_dataset()
    shift = torch.full((1,), 0.5, dtype=torch.bfloat16)
    handle = adapter.model.tab.register_forward_hook(lambda m, inp, out: out + shift.float())
    try:
        hooked = extract_features(adapter, ds, cache_dir=cache)
        key = hooked.key
        shift.fill_(1.0)                                      # another vector: another key
        assert rep.features_key(adapter, ds) != key
    finally:
        handle.remove()


def test_a_kernels_passing_hooks_on_another_thread_are_not_in_the_key():
    """Before: the key was read without the model's lock, so it took in the input hooks that
    a kernel on the other lane keeps for the length of its passes: features saved under a key
    no later run computes."""
    import threading
    adapter, ds = make_adapter(), make_dataset()
    idle = rep.features_key(adapter, ds)
    ready, done = threading.Event(), threading.Event()

    def kernel_pass():
        with adapter._lock:                    # as a kernel's passes hold it, hooks and all
            h = adapter.model.tab.register_forward_hook(lambda m, inp, out: out)
            ready.set()
            done.wait(0.3)
            h.remove()
    t = threading.Thread(target=kernel_pass)
    t.start()
    assert ready.wait(5)
    try:
        assert rep.features_key(adapter, ds) == idle
    finally:
        done.set()
        t.join()


def test_a_hooks_recording_dict_is_not_kept_alive_by_the_key():
    """Before (today): a dict a hook reads was keyed by an identity token, which kept the dict,
    and the activations it recorded, alive for the life of the process (dicts cannot be weakly
    referenced): every re-run of a notebook cell leaked its recordings."""
    import gc
    import weakref
    adapter, ds = make_adapter(), make_dataset()
    recorded = torch.zeros(1000, 100)
    alive = weakref.ref(recorded)
    store = {"acts": recorded}
    handle = adapter.model.tab.register_forward_hook(
        lambda m, inp, out: store.__setitem__("last", out.detach()))
    key = rep.features_key(adapter, ds)
    store = {"acts": None}                         # a new dict, as a re-run cell makes
    assert rep.features_key(adapter, ds) == key    # its type is what the key holds
    handle.remove()
    del recorded
    store = None                                   # the hook gone, nothing holds the dicts
    gc.collect()
    assert alive() is None
