"""Models as users write them, which the package used to handle wrongly: a model left in training
mode (raced by the Explorer's worker threads), a forward that changes its input in place, logits
of a non-floating dtype, weights on the meta device, a modality computed under torch.no_grad(),
batch statistics in forward, transient failures kept in the feature cache, and forward passes
raising AssertionError or KeyError."""
from __future__ import annotations

import importlib
import math
import threading
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from multiviz_widgets import AdapterError, ModelAdapter, MultimodalDataset, Tabular, TimeSeries
from multiviz_widgets import check
from multiviz_widgets.adapter import mark_worker_thread
from multiviz_widgets.engine import Analyses, Engine
from multiviz_widgets.kernels.dime import dime
from multiviz_widgets.kernels.emap import emap, emap_gap, interaction_type
from multiviz_widgets.kernels.interactions import interaction
from multiviz_widgets.kernels.representations import extract_features
from multiviz_widgets.kernels.unimodal import CompletenessWarning, attribute, attribute_batch

COLUMNS = ["hr", "bp", "temp", "age"]
CHANNELS = ["ecg", "spo2"]
CLASSES = ["healthy", "sick"]
GRADIENT_METHODS = ["gradient", "grad_x_input", "integrated_gradients"]


class TabSeries(nn.Module):
    """vitals [4] + series [16, 2] -> logits [2]; optional dropout and batch norm."""

    def __init__(self, dropout: float = 0.0, bn: bool = False):
        super().__init__()
        torch.manual_seed(1)
        self.tab = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8) if bn else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.ser = nn.Linear(16 * 2, 8)
        self.head = nn.Linear(16, 2)

    def encode(self, vitals, series):
        a = torch.tanh(self.bn(self.tab(vitals)))
        b = torch.tanh(self.ser(series.flatten(1)))
        return torch.cat([a, a * b], 1)

    def forward(self, vitals, series):
        return self.head(self.drop(self.encode(vitals, series)))


def modalities():
    return [Tabular("vitals", columns=COLUMNS), TimeSeries("series", window=4, channels=CHANNELS)]


def make_adapter(model: nn.Module) -> ModelAdapter:
    return ModelAdapter(model, modalities(), CLASSES, decision_layer="head")


def make_data(n: int = 8, seed: int = 0) -> MultimodalDataset:
    rng = np.random.default_rng(seed)
    return MultimodalDataset(
        {"vitals": [rng.normal(size=4).astype(np.float32) for _ in range(n)],
         "series": [rng.normal(size=(16, 2)).astype(np.float32) for _ in range(n)]},
        labels=[i % 2 for i in range(n)], name=f"tab-series-{seed}")


def instance():
    return make_data(1)[0]


def modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def healthy_features(ds: MultimodalDataset):
    """(h, logits) of the healthy TabSeries on every instance, computed directly."""
    model = TabSeries().eval()
    vitals = torch.tensor(np.stack([ds[i]["vitals"] for i in range(len(ds))]))
    series = torch.tensor(np.stack([ds[i]["series"] for i in range(len(ds))]))
    with torch.no_grad():
        h = model.encode(vitals, series)
        return h.numpy(), model.head(h).numpy()


@pytest.fixture(scope="module")
def explorer_class():
    """The Explorer class, with the plotting library its embedding view imports on first use
    loaded once (an import of about a second, a cost of no one test)."""
    importlib.import_module("ipyvolume")
    from multiviz_widgets.explorer import Explorer
    return Explorer


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    """The default feature cache ($MULTIVIZ_CACHE) in a temporary folder."""
    folder = tmp_path / "default-cache"
    monkeypatch.setenv("MULTIVIZ_CACHE", str(folder))
    return folder


# ---------------------------------------------------------------------------------------------
# 1. Training mode
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dropout, bn", [(0.5, False), (0.0, True), (0.5, True)])
def test_an_explorer_refuses_a_model_in_training_mode_and_leaves_its_modes(
        dropout, bn, cache_env, explorer_class):
    Explorer = explorer_class
    model = TabSeries(dropout=dropout, bn=bn).train()
    before = modes(model)
    with pytest.raises(AdapterError) as caught:
        Explorer(make_adapter(model), make_data())
    assert caught.value.code == "training-mode"
    assert "model.eval()" in str(caught.value)
    assert modes(model) == before and model.training


def test_a_submodule_in_training_mode_is_refused_by_the_explorer_too(cache_env, explorer_class):
    Explorer = explorer_class
    model = TabSeries(dropout=0.5).eval()
    model.drop.train()
    with pytest.raises(AdapterError) as caught:
        Explorer(make_adapter(model), make_data())
    assert caught.value.code == "training-mode" and "model.eval()" in str(caught.value)
    assert not model.training and model.drop.training


def test_a_training_model_without_dropout_or_batch_norm_is_refused_too(cache_env,
                                                                        explorer_class):
    """Attention and recurrent layers' dropout, or the model's own code reading self.training,
    act on the mode without a dropout or batch norm module: the Explorer refuses any model in
    training mode (it cannot switch it on its workers)."""
    Explorer = explorer_class

    class OwnDropout(TabSeries):
        def forward(self, vitals, series):
            h = nn.functional.dropout(self.encode(vitals, series), 0.5, self.training)
            return self.head(h)
    model = OwnDropout().train()
    with pytest.raises(AdapterError) as caught:
        Explorer(make_adapter(model), make_data())
    assert caught.value.code == "training-mode" and model.training


def _on_a_worker_thread(fn):
    """(fn's result or the exception it raised), run on a thread marked as an engine worker."""
    out = {}

    def run():
        mark_worker_thread()
        try:
            out["result"] = fn()
        except Exception as e:  # noqa: BLE001 - handed back to the test
            out["error"] = e
    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out


@pytest.mark.parametrize("call", [
    lambda ad, inst: attribute(ad, inst, "gradient", target=1),
    lambda ad, inst: attribute(ad, inst, "occlusion", target=1),
    lambda ad, inst: ad.predict(ad.prepare(inst).raw),
], ids=["gradient", "occlusion", "predict"])
def test_a_worker_thread_refuses_a_training_model_without_touching_its_modes(call):
    model = TabSeries(dropout=0.5, bn=True).train()
    model.ser.eval()                                  # a mixture, to see each flag kept
    before = modes(model)
    bn_mean = model.bn.running_mean.clone()
    ad = make_adapter(model)
    out = _on_a_worker_thread(lambda: call(ad, instance()))
    assert "result" not in out
    assert isinstance(out["error"], AdapterError), out
    assert out["error"].code == "training-mode" and "model.eval()" in str(out["error"])
    assert modes(model) == before
    assert torch.equal(model.bn.running_mean, bn_mean)


def test_the_main_thread_runs_a_training_model_in_eval_mode_warning_once():
    model = TabSeries(dropout=0.5, bn=True).train()
    model.ser.eval()
    before = modes(model)
    bn_mean = model.bn.running_mean.clone()
    ad = make_adapter(model)
    inst = instance()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = attribute(ad, inst, "gradient", target=1)
        second = attribute(ad, inst, "gradient", target=1)
        z1, z2 = ad.predict(ad.prepare(inst).raw), ad.predict(ad.prepare(inst).raw)
    mode_warnings = [w for w in caught if issubclass(w.category, UserWarning)
                     and "training mode" in str(w.message)]
    assert len(mode_warnings) == 1, [str(w.message) for w in caught]
    assert "model.eval()" in str(mode_warnings[0].message)
    # run in eval mode: dropout off (deterministic), batch norm's running stats untouched
    for name in first.scores:
        np.testing.assert_array_equal(first.scores[name], second.scores[name])
    assert torch.equal(z1, z2)
    eval_ad = make_adapter(TabSeries(dropout=0.5, bn=True).eval())
    np.testing.assert_allclose(z1.detach().numpy(),
                               eval_ad.predict(eval_ad.prepare(inst).raw).detach().numpy(),
                               rtol=1e-6, atol=1e-7)
    assert modes(model) == before
    assert torch.equal(model.bn.running_mean, bn_mean)


def test_an_eval_model_switched_to_training_after_the_explorer_shows_the_error(
        cache_env, explorer_class):
    Explorer = explorer_class
    model = TabSeries(dropout=0.5, bn=True).eval()
    ex = Explorer(make_adapter(model), make_data(), delay=0.01)
    try:
        assert ex.wait(60) and ex.engine.error == ""
        model.train()                              # the user's next cell
        ex.select(instance=3, method="occlusion")
        assert ex.wait(60)
        assert "training mode" in ex.engine.error and "model.eval()" in ex.engine.error
        assert model.training and all(modes(model).values())     # not switched behind the user
    finally:
        ex.close()


# ---------------------------------------------------------------------------------------------
# 2. In-place changes of the input
# ---------------------------------------------------------------------------------------------
class Normalising(TabSeries):
    """Subtracts 0.5 from its vitals in forward; ``how`` chooses how."""

    def __init__(self, how: str | None):
        super().__init__()
        self.how = how

    def forward(self, vitals, series):
        if self.how == "no_grad":
            with torch.no_grad():
                vitals -= 0.5
        elif self.how == "numpy":
            vitals.numpy()[...] -= 0.5                # preprocessing written with numpy
        elif self.how == "data":
            vitals.data.sub_(0.5)                     # bypasses autograd's version counter
        else:
            vitals = vitals - 0.5
        return super().forward(vitals, series)


@pytest.mark.parametrize("method", ["gradient", "occlusion", "integrated_gradients", None])
def test_a_refused_in_place_model_leaves_the_prepared_instance_as_it_was(method):
    ad = make_adapter(Normalising("no_grad").eval())
    inst = instance()
    p = ad.prepare(inst)
    raw = {n: v.clone() for n, v in p.raw.items()}
    continuous = {n: v.clone() for n, v in p.continuous.items()}
    with pytest.raises(AdapterError) as caught:
        if method is None:
            ad.predict(p.raw)
        else:
            attribute(ad, p, method, target=1)
    assert caught.value.code == "input-in-place"
    for n in raw:
        assert torch.equal(p.raw[n], raw[n]), n
        assert torch.equal(p.continuous[n], continuous[n]), n
    np.testing.assert_array_equal(p.raw["vitals"][0].numpy(), inst["vitals"])
    # once forward is fixed, the same Prepared gives what a fresh one gives
    ad.model.how = None
    again = attribute(ad, p, "occlusion", target=1)
    fresh = attribute(ad, ad.prepare(inst), "occlusion", target=1)
    np.testing.assert_array_equal(again.scores["vitals"], fresh.scores["vitals"])


@pytest.mark.parametrize("how", ["numpy", "data"])
def test_a_model_writing_through_numpy_or_data_sees_the_instance_unchanged(how):
    ad = make_adapter(Normalising(how).eval())
    reference = make_adapter(Normalising(None).eval())
    inst = instance()
    p = ad.prepare(inst)
    raw = {n: v.clone() for n, v in p.raw.items()}
    first, second = ad.predict(p.raw), ad.predict(p.raw)
    assert torch.equal(first, second)
    np.testing.assert_allclose(first.detach().numpy(),
                               reference.predict(reference.prepare(inst).raw).detach().numpy(),
                               rtol=1e-6, atol=1e-7)
    for n in raw:
        assert torch.equal(p.raw[n], raw[n]), n
    occl = attribute(ad, p, "occlusion", target=1)
    want = attribute(reference, inst, "occlusion", target=1)
    np.testing.assert_allclose(occl.scores["vitals"], want.scores["vitals"], rtol=1e-5,
                               atol=1e-6)
    report = check(ad, inst)
    assert "nondeterministic" not in report.codes(), str(report)
    np.testing.assert_array_equal(p.raw["vitals"][0].numpy(), inst["vitals"])


# ---------------------------------------------------------------------------------------------
# 3. Logits of a non-floating dtype
# ---------------------------------------------------------------------------------------------
class Cast(TabSeries):
    """TabSeries whose logits go through ``post`` (a cast, an activation)."""

    def __init__(self, post):
        super().__init__()
        self.post = post

    def forward(self, vitals, series):
        return self.post(super().forward(vitals, series))


CASTS = {"bool": lambda z: z > 0, "int64": lambda z: (z * 1000).long(),
         "complex64": lambda z: z.to(torch.complex64)}


@pytest.mark.parametrize("dtype", list(CASTS))
@pytest.mark.parametrize("method", ["gradient", "occlusion"])
def test_logits_of_a_non_floating_dtype_are_an_output_dtype_error(dtype, method):
    ad = make_adapter(Cast(CASTS[dtype]).eval())
    with pytest.raises(AdapterError) as caught:
        attribute(ad, instance(), method, target=1)
    assert caught.value.code == "output-dtype"
    assert "floating-point" in str(caught.value)


@pytest.mark.parametrize("dtype", list(CASTS))
def test_check_reports_logits_of_a_non_floating_dtype(dtype):
    report = check(make_adapter(Cast(CASTS[dtype]).eval()), instance())    # does not raise
    assert not report.ok
    assert "output-dtype" in {f.code for f in report.errors}, str(report)


def test_floating_logits_of_another_precision_are_accepted():
    ad = make_adapter(Cast(lambda z: z.double()).eval())
    assert "output-dtype" not in check(ad, instance()).codes()
    assert np.isfinite(attribute(ad, instance(), "gradient", target=1).scores["vitals"]).all()


# ---------------------------------------------------------------------------------------------
# 4. The meta device
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("on_meta", ["all", "ser"])
def test_a_model_on_the_meta_device_is_refused_with_the_fix(on_meta):
    model = TabSeries()
    (model if on_meta == "all" else model.ser).to("meta")
    with pytest.raises(AdapterError) as caught:
        make_adapter(model.eval())
    assert caught.value.code == "meta-device"
    text = str(caught.value)
    assert "to_empty" in text and "load_state_dict" in text
    if on_meta == "ser":
        assert "'ser." in text                    # names the parameter on the meta device


# ---------------------------------------------------------------------------------------------
# 5. A modality that no gradient reaches
# ---------------------------------------------------------------------------------------------
class FrozenSeries(TabSeries):
    """The series branch runs under torch.no_grad() (a frozen encoder)."""

    def forward(self, vitals, series):
        a = torch.tanh(self.tab(vitals))
        with torch.no_grad():
            b = torch.tanh(self.ser(series.flatten(1)))
        return self.head(torch.cat([a, a * b], 1))


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_gradient_methods_name_the_modality_no_gradient_reaches(method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompletenessWarning)
        frozen = attribute(make_adapter(FrozenSeries().eval()), instance(), method, target=1)
        flowing = attribute(make_adapter(TabSeries().eval()), instance(), method, target=1)
    assert frozen.params["no_gradient"] == ["series"]
    assert not np.any(frozen.scores["series"])
    assert np.any(frozen.scores["vitals"])
    assert "no_gradient" not in flowing.params
    assert np.any(flowing.scores["series"])


def test_perturbation_methods_do_not_report_missing_gradients():
    a = attribute(make_adapter(FrozenSeries().eval()), instance(), "occlusion", target=1)
    assert "no_gradient" not in (a.params or {})
    assert np.any(a.scores["series"])


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_attribute_batch_names_the_modality_no_gradient_reaches(method):
    ds = make_data(3)
    instances = [ds[i] for i in range(len(ds))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompletenessWarning)
        frozen = attribute_batch(make_adapter(FrozenSeries().eval()), instances, method,
                                 targets=1)
        flowing = attribute_batch(make_adapter(TabSeries().eval()), instances, method,
                                  targets=1)
    assert [r.params.get("no_gradient") for r in frozen] == [["series"]] * 3
    assert all("no_gradient" not in r.params for r in flowing)


@pytest.mark.parametrize("method", ["gradient", "grad_x_input"])
def test_a_gradient_method_warns_once_that_no_gradient_reaches_a_modality(method):
    """Its scores were all 0 with no word outside params (a frozen encoder is common, and 0 reads
    as "unimportant" while occlusion finds it the strongest): a warning now says why and what
    scores it, once per adapter; a perturbation method says nothing."""
    from multiviz_widgets.kernels.unimodal import NoGradientWarning
    ad = make_adapter(FrozenSeries().eval())
    with pytest.warns(NoGradientWarning, match=rf"^{method}: no gradient reaches 'series', so "
                                               "its scores are 0") as caught:
        attribute(ad, instance(), method, target=1)
    assert "occlusion, lime and kernel_shap" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoGradientWarning)
        attribute(ad, instance(), method, target=1)                  # once per adapter
        attribute(make_adapter(FrozenSeries().eval()), instance(), "occlusion", target=1)
        attribute(make_adapter(TabSeries().eval()), instance(), method, target=1)


def test_the_completeness_warning_says_no_gradient_reaches_the_modality():
    ad = make_adapter(FrozenSeries().eval())
    with pytest.warns(CompletenessWarning) as caught:
        attribute(ad, instance(), "integrated_gradients", target=1)
    text = " ".join(str(w.message) for w in caught if issubclass(w.category,
                                                                   CompletenessWarning))
    assert "no gradient reaches 'series'" in text


def test_the_explorer_overlay_says_no_gradient_reaches_the_modality(cache_env, explorer_class):
    Explorer = explorer_class
    ex = Explorer(make_adapter(FrozenSeries().eval()), make_data(), delay=0.01)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CompletenessWarning)
            assert ex.wait(60)
            ex.select(instance=0, method="integrated_gradients")
            assert ex.wait(60)
        caption = ex.input_view.score_caption
        assert "no gradient reaches" in caption and "series" in caption, caption
        assert ex.engine.error == ""
        ex.select(method="occlusion")
        assert ex.wait(60)
        assert "no gradient reaches" not in ex.input_view.score_caption
    finally:
        ex.close()


# ---------------------------------------------------------------------------------------------
# 6. Batch dependence
# ---------------------------------------------------------------------------------------------
class Centred(TabSeries):
    """Centres its decision features over the batch."""

    def forward(self, vitals, series):
        h = self.encode(vitals, series)
        return self.head(h - h.mean(0, keepdim=True))


class BatchStatistics(TabSeries):
    """BatchNorm1d without running statistics: the batch's statistics even in eval mode."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(8, track_running_stats=False)


@pytest.mark.parametrize("model_class", [Centred, BatchStatistics])
@pytest.mark.parametrize("batch_size", [4, 256])
def test_a_batch_dependent_model_is_refused_by_extract_features(model_class, batch_size):
    ad = make_adapter(model_class().eval())
    with pytest.raises(AdapterError) as caught:
        extract_features(ad, make_data(), batch_size=batch_size, cache=False)
    assert caught.value.code == "batch-dependent"
    assert "independently" in str(caught.value)


@pytest.mark.parametrize("batch_size, passes", [(1, 8), (3, 14), (4, 16), (256, 24)])
def test_a_healthy_model_costs_one_pass_per_instance_and_one_check(batch_size, passes):
    """8 instances, and the check of the first batch of several rows: min(B, 8) of its rows,
    and as many copies of one of them."""
    ds = make_data(8)
    f = extract_features(make_adapter(TabSeries().eval()), ds, batch_size=batch_size,
                         cache=False)
    assert f.forward_passes == passes
    h, logits = healthy_features(ds)
    np.testing.assert_allclose(f.h, h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f.logits, logits, rtol=1e-5, atol=1e-6)
    assert f.skipped == {}


# ---------------------------------------------------------------------------------------------
# 7. Recompute after a transient fault
# ---------------------------------------------------------------------------------------------
class Flaky(TabSeries):
    """Raises RuntimeError on its first ``failures`` calls only (a device busy for a while)."""

    def __init__(self, failures: int):
        super().__init__()
        self.calls: list[int] = []        # lists: not part of the cache's fingerprint
        self.failures = [failures]

    def forward(self, vitals, series):
        self.calls.append(len(vitals))
        if len(self.calls) <= self.failures[0]:
            raise RuntimeError("transient: device busy")
        return super().forward(vitals, series)


def test_refresh_runs_the_instances_a_transient_fault_left_out_again(tmp_path):
    ds = make_data(8)
    ad = make_adapter(Flaky(5).eval())
    with pytest.warns(RuntimeWarning, match="left out"):
        first = extract_features(ad, ds, batch_size=8, cache_dir=tmp_path)
    assert not first.from_cache and first.skipped
    assert all(why.startswith("ModelInputError") for why in first.skipped.values())
    assert len(first.indices) + len(first.skipped) == len(ds)

    with pytest.warns(RuntimeWarning, match=r"refresh=True"):
        cached = extract_features(ad, ds, batch_size=8, cache_dir=tmp_path)
    assert cached.from_cache and cached.skipped == first.skipped
    calls = len(ad.model.calls)

    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # nothing skipped: no warning
        again = extract_features(ad, ds, batch_size=8, cache_dir=tmp_path, refresh=True)
        assert len(ad.model.calls) > calls
        assert not again.from_cache and again.skipped == {}
        np.testing.assert_array_equal(again.indices, np.arange(len(ds)))
        h, logits = healthy_features(ds)
        np.testing.assert_allclose(again.h, h, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(again.logits, logits, rtol=1e-5, atol=1e-6)
        # the refreshed features replaced the cached ones
        later = extract_features(ad, ds, batch_size=8, cache_dir=tmp_path)
    assert later.from_cache and later.skipped == {}
    np.testing.assert_array_equal(later.h, again.h)


def test_the_engines_forget_computes_the_features_again(cache_env):
    ds = make_data(8)
    ad = make_adapter(Flaky(5).eval())
    engine, other, third = Engine(), Engine(), Engine()
    try:
        analyses = Analyses(engine, ad, ds)
        ad.model.calls.clear()          # (the check of the output when it opens: its faults too)
        with pytest.warns(RuntimeWarning, match="left out"):
            first = analyses.features()
        assert not first.from_cache and first.skipped
        assert analyses.features() is first                 # memoised until forgotten
        # the skipped instances are in the on-disk cache: a new Analyses reads them back
        with pytest.warns(RuntimeWarning, match="refresh=True"):
            cached = Analyses(other, ad, ds).features()
        assert cached.from_cache and cached.skipped == first.skipped

        analyses.forget()                                   # the Explorer's recompute
        calls = len(ad.model.calls)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = analyses.features()
        assert len(ad.model.calls) > calls
        assert not again.from_cache and again.skipped == {}
        np.testing.assert_array_equal(again.indices, np.arange(len(ds)))
        # the recomputed features are what the disk cache holds now
        assert Analyses(third, ad, ds).features().skipped == {}
    finally:
        for e in (engine, other, third):
            e.close()


def test_a_recompute_computes_what_the_cache_key_cannot_see(cache_env):
    """forget() (the recompute button) computes the features again: the disk cache's key does
    not cover a model's integer attribute, which changed them; forget(recompute_features=False)
    and a second Analyses read the cache."""
    class Scaled(TabSeries):
        k = 1

        def encode(self, vitals, series):
            return super().encode(vitals, series) * self.k
    ds, model = make_data(8), Scaled().eval()
    ad = make_adapter(model)
    engine, other = Engine(), Engine()
    try:
        first = Analyses(engine, ad, ds).features()
        analyses = Analyses(other, ad, ds)
        assert analyses.features().from_cache                # a second Explorer: read
        analyses.forget(recompute_features=False)
        assert analyses.features().from_cache
        model.k = 3                                          # not in the cache's key
        analyses.forget()
        again = analyses.features()
        assert not again.from_cache
        np.testing.assert_allclose(again.h, 3 * first.h, rtol=1e-5, atol=1e-6)
    finally:
        engine.close()
        other.close()


def test_an_explorer_reads_the_features_its_predecessor_cached(cache_env, explorer_class):
    Explorer = explorer_class
    ds, model = make_data(8), TabSeries().eval()
    for opened in range(2):
        ex = Explorer(make_adapter(model), ds, delay=0.01)
        try:
            assert ex.wait(60)
            assert ex.analyses.features().from_cache == (opened == 1)
        finally:
            ex.close()


# ---------------------------------------------------------------------------------------------
# 8. AssertionError and KeyError in forward
# ---------------------------------------------------------------------------------------------
class Picky(TabSeries):
    """Raises ``error`` on any batch holding the instance whose first vital is ``bad``."""

    def __init__(self, error: type[Exception], bad: float):
        super().__init__()
        self.error, self.bad = error, bad
        self.sizes: list[int] = []

    def forward(self, vitals, series):
        self.sizes.append(len(vitals))
        if (vitals[:, 0] == self.bad).any():
            raise self.error("a value this model does not expect")
        return super().forward(vitals, series)


@pytest.mark.parametrize("error", [AssertionError, KeyError])
def test_assertion_and_key_errors_leave_only_the_failing_instance_out(error):
    ds = make_data(8)
    bad = 5
    model = Picky(error, float(ds[bad]["vitals"][0])).eval()
    with pytest.warns(RuntimeWarning, match="1 of 8 instances"):
        f = extract_features(make_adapter(model), ds, batch_size=8, cache=False)
    assert list(f.skipped) == [bad]
    reason = f.skipped[bad]
    assert reason.startswith("ModelInputError") and error.__name__ in reason
    kept = [i for i in range(len(ds)) if i != bad]
    np.testing.assert_array_equal(f.indices, kept)
    h, logits = healthy_features(ds)
    np.testing.assert_allclose(f.h, h[kept], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f.logits, logits[kept], rtol=1e-5, atol=1e-6)
    # the failing batch was halved (not dropped, nor run one instance at a time)
    assert model.sizes[0] == 8 and 4 in model.sizes and 2 in model.sizes
    assert model.sizes.count(1) < len(ds) - 1


@pytest.mark.parametrize("error", [AssertionError, KeyError])
def test_assertion_and_key_errors_are_model_input_errors_in_a_kernel_call(error):
    from multiviz_widgets.adapter import ModelInputError
    ds = make_data(2)
    ad = make_adapter(Picky(error, float(ds[0]["vitals"][0])).eval())
    with pytest.raises(ModelInputError) as caught:
        attribute(ad, ds[0], "occlusion", target=1)
    assert isinstance(caught.value, RuntimeError)
    assert isinstance(caught.value.__cause__, error)
    assert np.isfinite(attribute(ad, ds[1], "occlusion", target=1).scores["vitals"]).all()


# ---------------------------------------------------------------------------------------------
# 9. A head that is not one nn.Linear per class
# ---------------------------------------------------------------------------------------------
class FunctionalHead(TabSeries):
    """Logits from F.linear(h, W): no nn.Linear has one output per class, so the default
    decision layer is the last nn.Linear (``ser``, 8 outputs), whose weights are not the
    classes'."""

    def __init__(self):
        super().__init__()
        self.head = None
        self.W = nn.Parameter(torch.randn(2, 16))

    def forward(self, vitals, series):
        return nn.functional.linear(self.encode(vitals, series), self.W)


def test_a_default_decision_layer_that_is_not_the_head_is_refused_for_stage_4():
    from multiviz_widgets.kernels.prediction import prediction_path
    from multiviz_widgets.kernels.representations import decision_contributions
    adapter = ModelAdapter(FunctionalHead().eval(), modalities(), CLASSES)
    assert adapter.decision_layer is adapter.model.ser
    for fn in (adapter.decision_weights,
               lambda: decision_contributions(adapter, instance(), 0),
               lambda: prediction_path(adapter, instance(), target=0)):
        with pytest.raises(AdapterError) as caught:
            fn()
        assert caught.value.code == "decision-not-logits"
        message = str(caught.value)
        assert "ser (Linear)" in message and "not one per class (2)" in message
        assert "nn.Identity" in message and "fit_sparse_model_for" in message
    # stages 1 and 2 do not need its weights
    assert attribute(adapter, instance(), method="gradient").scores["vitals"].shape == (4,)


def test_a_decision_layer_that_is_not_linear_says_to_pass_a_sparse_model():
    adapter = ModelAdapter(TabSeries().eval(), modalities(), CLASSES, decision_layer="drop")
    with pytest.raises(AdapterError) as caught:
        adapter.decision_weights()
    assert caught.value.code == "decision-not-linear"
    assert "drop (Dropout)" in str(caught.value)
    assert "sparse_model=fit_sparse_model_for(adapter, train_set)" in str(caught.value)


def test_the_explorer_counts_the_neurons_of_a_default_layer_and_shows_stage_4_refused(
        cache_env, explorer_class):
    Explorer = explorer_class
    ex = Explorer(ModelAdapter(FunctionalHead().eval(), modalities(), CLASSES), make_data(),
                  delay=0.01)
    try:
        assert ex.wait(60)
        assert ex.analyses.n_neurons() == 32        # the inputs of ``ser``, the layer taken
        ex.select(instance=0, method="occlusion")
        assert ex.wait(60)
        state = ex.state()
        assert len(state["input_scores"]["vitals"]) == 4      # stage 1 is shown
        assert "decision-not-logits" in repr(state["path"]) or "not one per class" in (
            repr(state["path"]) + state["error"]), (state["path"], state["error"])
    finally:
        ex.close()


class IdentityOnH(FunctionalHead):
    """F.linear(h, W) with h passed through an nn.Identity: the README's decision layer for a
    head that is no nn.Linear, given with a sparse model."""

    def __init__(self):
        super().__init__()
        self.h = nn.Identity()

    def forward(self, vitals, series):
        return nn.functional.linear(self.h(self.encode(vitals, series)), self.W)


def test_the_explorer_counts_the_neurons_of_an_identity_layer_from_its_sparse_model(
        cache_env, explorer_class):
    """select(neuron=j) promises a ValueError, and no change, for a neuron out of range: with an
    nn.Identity as the decision layer the count was unknown, so neuron 20 of 16 was taken and
    every view failed in the banner."""
    from multiviz_widgets.kernels.prediction import fit_sparse_model_for
    adapter = ModelAdapter(IdentityOnH().eval(), modalities(), CLASSES,
                           decision_layer="h")
    data = make_data(40)
    ex = explorer_class(adapter, data, delay=0.01,
                        sparse_model=fit_sparse_model_for(adapter, data, cache=False))
    try:
        assert ex.wait(60)
        assert ex.analyses.n_neurons() == 16
        before = ex.state()["neuron"]
        with pytest.raises(ValueError, match=r"neuron 20 is out of range: .* 16 inputs"):
            ex.select(neuron=20)
        assert ex.state()["neuron"] == before
        ex.select(neuron=15)
        assert ex.wait(60) and ex.state()["neuron"] == 15 and not ex.state()["error"]
    finally:
        ex.close()


class ChannelsFirst(nn.Module):
    """A Conv1d over the series as [batch, channels, time], without the transpose."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3)
        self.head = nn.Linear(4 + 4, 2)

    def forward(self, vitals, series):
        return self.head(torch.cat([vitals, self.conv(series).mean(2)], 1))


def test_a_conv1d_given_time_first_is_told_the_layout_and_the_transpose():
    adapter = make_adapter(ChannelsFirst().eval())
    with pytest.raises(AdapterError) as caught:
        adapter.predict(adapter.prepare(instance()).raw)
    message = str(caught.value)
    assert "reaches forward() as [batch, time, channels]" in message
    assert "x.transpose(1, 2)" in message and "'series'" in message


class OneRowOnly(TabSeries):
    """Runs a batch of one only (a reshape that assumes one row)."""

    def forward(self, vitals, series):
        return super().forward(vitals.reshape(1, 4), series.reshape(1, 16, 2))


@pytest.mark.parametrize("method", ["occlusion", "integrated_gradients"])
def test_a_model_that_runs_one_row_only_is_told_to_take_any_batch_size(method):
    from multiviz_widgets.adapter import ModelInputError
    adapter = make_adapter(OneRowOnly().eval())
    adapter.predict(adapter.prepare(instance()).raw)             # alone, it runs
    with pytest.raises(ModelInputError, match=r"runs this instance alone but not as a batch of "
                                              r"\d+ .*take any batch size"):
        attribute(adapter, instance(), method=method)


def test_messages_name_what_was_given_wrongly():
    """means= of the wrong length is named as means=; a channels= list longer than the data's
    columns is named as the cause."""
    with pytest.raises(ValueError, match=r"'vitals' means= must have one value per column"):
        Tabular("vitals", columns=COLUMNS, baseline="mean", means=[0.0, 1.0])
    series = TimeSeries("series", window=4, channels=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"channels= names 3 channels but the series has 2 "):
        series.to_tensor(np.zeros((16, 2)))


class TwoTables(nn.Module):
    def __init__(self, n_tables: int):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(10, 4) for _ in range(n_tables))
        self.weight = nn.Parameter(torch.randn(10, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, text):
        return self.head(nn.functional.embedding(text, self.weight).mean(1))


@pytest.mark.parametrize("n_tables, says", [
    (2, r"cannot be guessed: 'tables.0', 'tables.1'"),
    (0, r"has no nn.Embedding \(a table read by F.embedding .*nn.Embedding.from_pretrained")])
def test_a_text_embedding_that_cannot_be_found_is_named_or_explained(n_tables, says):
    from multiviz_widgets import Text
    with pytest.raises(AdapterError, match=says):
        ModelAdapter(TwoTables(n_tables), [Text("text", vocab=["[PAD]", "[UNK]", "a", "b"])],
                     CLASSES)


def test_the_path_caption_reads_second_order_links_as_curvature():
    from multiviz_widgets.views.path_view import pair_colours
    assert "curvature" in pair_colours({"interaction_method": "second_order"})
    assert pair_colours({"interaction_method": "pairwise_ablation"}) == (
        "red: they reinforce each other")


class MaskedClass(TabSeries):
    """Three classes, the last masked by -inf (valid logits: its probability is 0)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 3)

    def forward(self, vitals, series):
        z = super().forward(vitals, series)
        return z.masked_fill(torch.tensor([False, False, True]), -math.inf)


def masked_adapter() -> ModelAdapter:
    return ModelAdapter(MaskedClass().eval(), modalities(), ["a", "b", "masked"],
                        decision_layer="head")


def test_logits_masked_by_minus_infinity_are_told_to_use_a_finite_mask():
    from multiviz_widgets.engine import Engine as _Engine
    adapter = masked_adapter()
    report = check(adapter, instance())
    assert "non-finite" in report.codes()
    assert "masked_fill(mask, -1e4)" in str(report)
    engine = _Engine()
    try:
        with pytest.raises(ValueError, match=r"-inf logits look like masked classes"):
            Analyses(engine, adapter, make_data()).logits(0)
    finally:
        engine.close()


@pytest.mark.parametrize("method", ["gradient", "grad_x_input", "integrated_gradients"])
def test_explaining_a_class_masked_by_minus_infinity_is_refused(method):
    with pytest.raises(ValueError, match=r"masked by -inf has nothing to explain"):
        attribute(masked_adapter(), instance(), method=method, target=2)


def test_second_order_of_a_class_masked_by_minus_infinity_is_refused():
    from multiviz_widgets.kernels.interactions import interaction
    with pytest.raises(ValueError, match=r"second_order: .* is -inf .*masked by -inf"):
        interaction(masked_adapter(), instance(), "second_order", target=2)


def test_a_model_offloaded_by_accelerate_hooks_is_told_to_load_on_one_device():
    model = TabSeries().to("meta").eval()
    model.tab._hf_hook = object()            # what accelerate's offloading leaves on a module
    with pytest.raises(AdapterError, match=r"accelerate's offloading hooks .*device_map='cpu'"):
        make_adapter(model)


class InPlaceWithGrad(TabSeries):
    """Subtracts in place with autograd on: torch refuses it for a leaf before it happens."""

    def forward(self, vitals, series):
        vitals.sub_(0.5)
        return super().forward(vitals, series)


@pytest.mark.parametrize("method", ["gradient", "integrated_gradients"])
def test_an_in_place_change_torch_refuses_is_the_packages_clear_error(method):
    with pytest.raises(AdapterError) as caught:
        attribute(make_adapter(InPlaceWithGrad().eval()), instance(), method=method)
    assert caught.value.code == "input-in-place" and "'vitals'" in str(caught.value)
    assert "x = (x - mu) / s" in str(caught.value)


def test_a_helper_forward_sets_itself_keeps_the_cache_key():
    """A function forward assigns on the module (self.act = lambda ...) is not in the key: its
    code is hashed with forward's, and the key must not change after the first pass."""
    from multiviz_widgets.kernels.representations import features_key

    class Lazy(TabSeries):
        def forward(self, vitals, series):
            self.post = lambda z: z * 2
            return self.post(super().forward(vitals, series))
    ad, ds = make_adapter(Lazy().eval()), make_data(4)
    before = features_key(ad, ds)
    extract_features(ad, ds, cache=False)
    assert features_key(ad, ds) == before


class SumOfHeads(TabSeries):
    """Late fusion that sums two per-modality heads: no one layer's output is the logits."""

    def __init__(self):
        super().__init__()
        self.head_a, self.head_b = nn.Linear(8, 2), nn.Linear(8, 2)

    def forward(self, vitals, series):
        h = self.encode(vitals, series)
        return self.head_a(h[:, :8]) + self.head_b(h[:, 8:])


def test_check_names_a_sum_of_heads_and_the_one_layer_that_replaces_it():
    report = check(ModelAdapter(SumOfHeads().eval(), modalities(), CLASSES), instance())
    text = str(report)
    assert "decision-not-last" in report.codes()
    assert "2 layers of one output per class run in the pass (head_a, head_b)" in text
    assert "one nn.Linear over the concatenated encodings" in text


def test_a_recurrent_submodule_left_in_training_mode_is_named_and_refused(cache_env,
                                                                         explorer_class):
    """An LSTM's dropout acts on its own mode, without a dropout module."""
    class Recurrent(TabSeries):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(2, 4, num_layers=2, dropout=0.5, batch_first=True)
    model = Recurrent().eval()
    model.rnn.train()
    adapter = make_adapter(model)
    assert "submodules in training mode" in adapter.training_mode()
    report = check(adapter, instance())
    assert "training-submodule" in report.codes() and "rnn" in str(report)
    with pytest.raises(AdapterError) as caught:
        explorer_class(adapter, make_data())
    assert caught.value.code == "training-mode"


def test_a_function_given_to_the_constructor_is_in_the_cache_key():
    from multiviz_widgets.kernels.representations import features_key

    def soft(z):
        return torch.tanh(z)

    def hard(z):
        return torch.relu(z)

    ds = make_data(4)
    keys = {features_key(make_adapter(Cast(act).eval()), ds) for act in (soft, hard)}
    assert len(keys) == 2


def test_the_first_recompute_of_an_explorer_made_without_start_computes_the_features(
        cache_env, explorer_class):
    ds, model = make_data(8), TabSeries().eval()
    extract_features(make_adapter(model), ds)                  # in the disk cache
    ex = explorer_class(make_adapter(model), ds, delay=0.01, start=False)
    try:
        ex.refresh()                                           # the user's recompute
        assert ex.wait(60)
        assert not ex.analyses.features().from_cache
    finally:
        ex.close()


class Pausing(TabSeries):
    """Pauses inside the first forward pass on an engine worker, so that the user's own pass
    (the main thread, a cell) runs while the worker's hooks sit on the model."""

    def __init__(self):
        super().__init__()
        self.inside, self.go_on = threading.Event(), threading.Event()

    def forward(self, vitals, series):
        z = self.encode(vitals, series)
        if threading.current_thread() is not threading.main_thread() and not self.inside.is_set():
            self.inside.set()
            assert self.go_on.wait(30)
        return self.head(self.drop(z))


def test_the_users_own_forward_pass_during_a_workers_computation_touches_neither():
    """The Explorer's hooks fired for a pass the user ran in a cell meanwhile: its decision
    layer was counted twice ("called 2 times in one forward pass: late fusion?") and the
    worker's computation failed."""
    model = Pausing().eval()
    adapter = make_adapter(model)
    raw = adapter.collate([instance()])
    with torch.no_grad():
        expected = model.head(model.encode(*raw.values())).numpy()

    def features():
        return adapter.features(raw)
    out = {}
    worker = threading.Thread(target=lambda: out.update(_on_a_worker_thread(features)))
    worker.start()
    assert model.inside.wait(30)
    with torch.no_grad():                       # the user's cell, on the main thread
        mine = model(*raw.values()).numpy()
    model.go_on.set()
    worker.join(30)
    assert "error" not in out, out.get("error")
    logits, h = out["result"]
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(mine, expected, rtol=1e-6)
    assert h.shape == (1, 16)


class _AlwaysFirst:
    """A stand-in sparse model that answers class 0 whatever h, counting its predictions."""

    def __init__(self, fit_to: str):
        self.fit_to, self.test_fidelity, self.val_fidelity, self.calls = fit_to, 0.99, 0.99, 0

    def predict(self, h):
        self.calls += 1
        return np.zeros(len(np.atleast_2d(h)), dtype=np.int64)

    def fidelity(self, h, y):
        return float(np.mean(self.predict(h) == np.asarray(y).argmax(1)))


def test_the_sparse_model_note_compares_like_with_like_and_once_per_features(cache_env):
    """Fit to the labels, a sparse model's fidelity is its accuracy: the note said "the model
    changed since" of a model that never changed. And its dataset-wide agreement was computed
    again in every path and bars job (1 s a click at 50k x 1024)."""
    ds = make_data(40)
    ad = make_adapter(TabSeries().eval())
    engine = Engine()
    try:
        analyses = Analyses(engine, ad, ds)
        feats = analyses.features()
        answers = np.asarray(feats.logits).argmax(1)
        i = int(np.nonzero(answers != 0)[0][0])          # where the model does not answer 0
        analyses.sparse_model = _AlwaysFirst("labels")
        note = analyses.sparse_model_note(i)
        assert "changed since" not in note and "here the sparse linear model answers" in note
        analyses.sparse_model = sm = _AlwaysFirst("predictions")
        first = analyses.sparse_model_note(i)
        assert f"agrees with the model on {np.mean(answers == 0):.1%}" in first
        calls = sm.calls
        assert analyses.sparse_model_note(i) == first and sm.calls == calls   # memoised
    finally:
        engine.close()


# ---------------------------------------------------------------------------------------------
# A model whose rows depend on each other
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("run", [
    lambda ad: attribute(ad, instance(), "occlusion", target=1),
    lambda ad: attribute(ad, instance(), "integrated_gradients", target=1),
    lambda ad: attribute_batch(ad, [instance()] * 2, "occlusion", targets=1),
    lambda ad: interaction(ad, instance(), "pairwise_ablation", target=1)])
def test_a_model_whose_rows_depend_on_each_other_is_refused_by_the_kernels(run):
    """A BatchNorm without running statistics gave occlusion scores that changed 2.9x with
    batch_size, and pairwise ablation 3.5x, with no word (only check() and the dataset's
    features said so). The kernels now refuse it, saying what to change."""
    from multiviz_widgets.kernels.common import check_rows_independent
    ad = make_adapter(BatchStatistics().eval())
    with pytest.raises(AdapterError, match=r"^The model's logits for an instance depend on the "
                                           r"other instances in its batch") as e:
        run(ad)
    assert e.value.code == "batch-dependent" and "track_running_stats" in str(e.value)
    with pytest.raises(AdapterError):
        check_rows_independent(ad, ad.prepare(instance()))         # every time, not once


@pytest.mark.parametrize("run", [
    lambda ad, ds: emap(ad, ds),
    lambda ad, ds: emap_gap(ad, ds, n=None),
    lambda ad, ds: dime(ad, ds, 0, n_samples=20),
    lambda ad, ds: interaction_type(ad, 0, reference=ds)])
def test_a_model_whose_rows_depend_on_each_other_is_refused_by_emap_dime_and_the_type(run):
    """Before: EMAP batches pairs of different instances, so with a BatchNorm without running
    statistics its averages (and the gap, DIME's scores, the interaction type) depended on the
    batch size, with no word; now they refuse it as the other kernels do."""
    ad = make_adapter(BatchStatistics().eval())
    ds = make_data(6)
    with pytest.raises(AdapterError, match=r"^The model's logits for an instance depend on the "
                                           r"other instances in its batch") as e:
        run(ad, ds)
    assert e.value.code == "batch-dependent" and "EMAP batches pairs" in str(e.value)
    assert "track_running_stats" in str(e.value)


def _zero_vitals_first(n: int = 6) -> MultimodalDataset:
    ds = make_data(n)
    vitals = [np.zeros(4, np.float32)] + [ds[i]["vitals"] for i in range(1, n)]
    return MultimodalDataset({"vitals": vitals, "series": [ds[i]["series"] for i in range(n)]},
                             labels=ds.labels)


def test_an_instance_equal_to_its_baseline_in_one_modality_does_not_pass_the_rows_check():
    """Before: instance 0's vitals were all 0, its baseline's too, so beside its baseline it
    showed nothing of a BatchNorm over the vitals: the check passed and was kept for the
    adapter. EMAP's averages then changed with batch_size (by 0.45), and later explanations of
    other instances were not refused. EMAP now pairs the instance with another instance, and
    a modality equal in both rows leaves the check open."""
    from multiviz_widgets.kernels import common
    ds = _zero_vitals_first()
    ad = make_adapter(BatchStatistics().eval())
    with pytest.raises(AdapterError, match="beside another instance") as e:
        emap(ad, ds, factorized=False)
    assert e.value.code == "batch-dependent"
    ad = make_adapter(BatchStatistics().eval())
    attribute(ad, ds[0], "occlusion", target=1)        # nothing to see beside its baseline
    assert ad not in common._ROWS_INDEPENDENT
    with pytest.raises(AdapterError, match="beside its baseline"):
        attribute(ad, ds[1], "occlusion", target=1)


def test_a_model_with_running_statistics_passes_emap_s_rows_check():
    ad = make_adapter(TabSeries(bn=True).eval())
    ds = make_data(6)
    r = emap(ad, ds, batch_size=4)
    np.testing.assert_allclose(r.emap_logits, emap(ad, ds, batch_size=64).emap_logits,
                               rtol=1e-5, atol=1e-6)


def test_the_rows_check_runs_once_per_adapter_and_passes_a_model_with_running_statistics():
    model = TabSeries(bn=True).eval()                 # BatchNorm with running statistics
    calls = []
    model.register_forward_pre_hook(lambda _m, args: calls.append(int(args[0].shape[0])))
    ad = make_adapter(model)
    first = attribute(ad, instance(), "occlusion", target=1)
    assert calls[:3] == [2, 2, 2] and sum(calls[3:]) == first.forward_passes  # 2 rows, thrice
    calls.clear()
    again = attribute(ad, instance(), "occlusion", target=1)
    assert sum(calls) == again.forward_passes                       # no check the second time
    np.testing.assert_allclose(again.scores["vitals"], first.scores["vitals"])


class _FirstRowScale(TabSeries):
    """Every row scaled by a statistic of the batch's first row (a 'batch of one' habit)."""

    def forward(self, vitals, series):
        return super().forward(vitals / (1.0 + vitals[:1].abs().max()), series)


def test_the_rows_check_sees_a_statistic_of_the_first_row_and_never_passes_on_no_evidence():
    """The check compared the instance's row when first in its batch only: a model scaling every
    row by the first row's statistic passed, and its occlusion scores changed with batch_size.
    An instance equal to its baseline (the two batches then the same) passed the adapter for
    good, as did one whose output was NaN; a later, ordinary instance was not checked."""
    import dataclasses

    from multiviz_widgets.kernels.common import _ROWS_INDEPENDENT, check_rows_independent
    with pytest.raises(AdapterError, match="depend on the other instances in its batch"):
        attribute(make_adapter(_FirstRowScale().eval()), instance(), "occlusion", target=1)
    ad = make_adapter(BatchStatistics().eval())
    p = ad.prepare(instance())
    check_rows_independent(ad, dataclasses.replace(p, continuous=dict(p.baseline)))
    nan = {n: torch.full_like(v, float("nan")) for n, v in p.continuous.items()}
    check_rows_independent(ad, dataclasses.replace(p, continuous=nan))
    assert ad not in _ROWS_INDEPENDENT
    with pytest.raises(AdapterError, match="depend on the other instances in its batch"):
        check_rows_independent(ad, p)


class SlowTabSeries(TabSeries):
    """1 ms per row: the dataset's features take a while, as on a real model."""

    def forward(self, vitals, series):
        import time
        time.sleep(0.001 * len(vitals))
        return super().forward(vitals, series)


def test_after_a_recompute_the_bars_and_the_path_say_the_sparse_model_no_longer_agrees(
        cache_env, explorer_class):
    """New weights, then "recompute": the bars and the path were computed before the dataset's
    features, said only whether the sparse model agrees at the instance (it did), and kept
    that caption cached. They are asked again once the features come, and say it."""
    from multiviz_widgets.kernels.prediction import fit_sparse_model_for
    model = SlowTabSeries().eval()
    adapter = make_adapter(model)
    data = make_data(300)
    sparse = fit_sparse_model_for(adapter, data, n_lambdas=8, cache=False)
    ex = explorer_class(adapter, data, delay=0.01, sparse_model=sparse,
                        path_params={"unimodal_method": "gradient", "interaction_method": None,
                                     "k_neurons": 1},
                        method_params={"interaction_type": {"n_reference": 0}})
    try:
        assert ex.wait(120)
        with torch.no_grad():                                 # trained further
            torch.manual_seed(5)
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.8)
        logits, h = adapter.features(adapter.collate([data[i] for i in range(len(data))]))
        same = logits.argmax(1).numpy() == sparse.predict(h.detach().numpy())
        assert same.mean() < sparse.val_fidelity - 0.1          # it no longer stands for it
        ex.select(instance=int(np.flatnonzero(same)[0]))       # where the two still agree
        assert ex.wait(120)
        ex.refresh()
        assert ex.wait(120)
        said = "agrees with the model on"
        assert said in ex.state()["path"]["caption"] and said in ex.neuron_view.caption.value
    finally:
        ex.close()


def test_a_path_still_computing_when_the_features_come_is_not_started_over(cache_env,
                                                                          explorer_class):
    """The features' arrival asked the path again under its new key, which cancelled the path
    being computed and began it anew (seconds lost, with a sparse model: the demo's setup). A
    view still computing is left to finish, and asks again only when its note was made before
    the features came. Here the path waits, once under way, until the features are shown."""
    import time

    from multiviz_widgets.engine import Kernels
    from multiviz_widgets.kernels.prediction import fit_sparse_model_for
    import threading
    ended, shown, path_began = [], [], threading.Event()

    class WaitsForTheFeatures(Kernels):
        def features(self, *args, **kwargs):
            path_began.wait(60)              # the features come while the path computes
            return super().features(*args, **kwargs)

        def prediction_path(self, *args, **kwargs):
            if not ended:                    # the first path: under way as the features come
                path_began.set()
                deadline = time.monotonic() + 60
                while not (shown and shown[0].embedding_view._features is not None):
                    assert time.monotonic() < deadline, "the features never came"
                    time.sleep(0.01)
                time.sleep(0.1)              # the features' callbacks have run
            try:
                out = super().prediction_path(*args, **kwargs)
            except BaseException as e:
                ended.append(type(e).__name__)
                raise
            ended.append("done")
            return out
    adapter = make_adapter(TabSeries().eval())
    data = make_data(60)
    sparse = fit_sparse_model_for(adapter, data, n_lambdas=8, cache=False)
    ex = explorer_class(adapter, data, kernels=WaitsForTheFeatures(), delay=0.01,
                        sparse_model=sparse,
                        path_params={"unimodal_method": "integrated_gradients",
                                     "interaction_method": None, "k_neurons": 2},
                        method_params={"interaction_type": {"n_reference": 0}})
    shown.append(ex)
    try:
        assert ex.wait(120)
        assert ended and "Cancelled" not in ended, ended
        assert "prediction path to class" in ex.state()["path"]["caption"]
    finally:
        ex.close()
