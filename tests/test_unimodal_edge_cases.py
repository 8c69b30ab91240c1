"""Regression tests for bugs found in the stage-1 kernels (kernels/unimodal.py)."""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from multiviz_widgets import ModelAdapter, Tabular, TimeSeries
from multiviz_widgets.kernels.unimodal import (
    METHODS, CompletenessWarning, attribute, attribute_batch, kernel_shap_from_function,
    lime_from_function)
from multiviz_widgets.progress import Cancelled

from .test_unimodal import TabSeriesNet, tab_series


@pytest.fixture(scope="module")
def ts():
    return tab_series()


def _linear_fn(masks):
    return masks["a"].double() @ torch.arange(1.0, 5.0, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# cost() must count what attribute() does
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,params", [("occlusion", {}), ("kernel_shap", {"n_samples": 64}),
                                           ("integrated_gradients", {"steps": 4})])
def test_cost_counts_a_modality_named_twice_once(ts, method, params):
    _, adapter, inst = ts
    p = adapter.prepare(inst)
    twice = ["vitals", "vitals"]
    r = attribute(adapter, p, method, target=0, modalities=twice, **params)
    assert list(r.scores) == ["vitals"]
    assert METHODS[method].cost(p, modalities=twice, **params) == (r.forward_passes,
                                                                   r.backward_passes)


def test_cost_refuses_an_empty_modality_list_as_attribute_does(ts):
    _, adapter, inst = ts
    p = adapter.prepare(inst)
    with pytest.raises(ValueError, match="non-empty subset"):
        attribute(adapter, p, "occlusion", target=0, modalities=[])
    with pytest.raises(ValueError, match="non-empty subset"):
        METHODS["occlusion"].cost(p, modalities=[])


# ---------------------------------------------------------------------------------------------
# bad arguments: clear errors that name them
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [["gradient"], {"gradient": 1}])
def test_an_unhashable_method_is_a_clear_error(ts, method):
    _, adapter, inst = ts
    with pytest.raises(ValueError, match="Unknown stage-1 method"):
        attribute(adapter, inst, method=method, target=0)
    with pytest.raises(ValueError, match="Unknown stage-1 method"):
        attribute_batch(adapter, [inst], method=method, targets=0)


@pytest.mark.parametrize("method", ["lime", "kernel_shap"])
@pytest.mark.parametrize("seed", [1.5, -1, "a", True])
def test_a_bad_seed_is_a_clear_error(ts, method, seed):
    _, adapter, inst = ts
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        attribute(adapter, inst, method, target=0, n_samples=16, seed=seed)


@pytest.mark.filterwarnings("ignore:kernel_shap.*underdetermined")   # 16 samples, 9 units
def test_seed_none_and_numpy_seeds_still_work(ts):
    _, adapter, inst = ts
    a = attribute(adapter, inst, "lime", target=0, n_samples=16, seed=np.int64(3))
    b = attribute(adapter, inst, "lime", target=0, n_samples=16, seed=3)
    c = attribute(adapter, inst, "lime", target=0, n_samples=16, seed=4)
    np.testing.assert_array_equal(a.scores["vitals"], b.scores["vitals"])
    assert not np.array_equal(a.scores["vitals"], c.scores["vitals"])
    # no seed: fresh entropy each call (two draws of 16 samples that agree exactly would be
    # a generator that ignores its seed)
    fresh = [attribute(adapter, inst, "kernel_shap", target=0, n_samples=16, seed=None)
             .scores["vitals"] for _ in range(2)]
    assert not np.array_equal(*fresh)


@pytest.mark.parametrize("fit", [lime_from_function, kernel_shap_from_function])
@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_surrogates_of_a_function_check_their_batch_size(fit, batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        fit(_linear_fn, {"a": 4}, n_samples=8, batch_size=batch_size)


@pytest.mark.parametrize("keep", ["0.5", None, True])
def test_lime_keep_probability_of_the_wrong_type_is_a_clear_error(keep):
    with pytest.raises(ValueError, match="keep_probability"):
        lime_from_function(_linear_fn, {"a": 4}, n_samples=8, keep_probability=keep)


def test_n_units_given_as_a_bool_is_refused():
    with pytest.raises(ValueError, match="n_units"):
        lime_from_function(_linear_fn, {"a": True}, n_samples=8)


def test_lime_without_a_penalty_on_too_few_samples_says_what_to_change(ts):
    _, adapter, inst = ts
    with pytest.raises(ValueError, match="alpha > 0"):
        attribute(adapter, inst, "lime", target=0, alpha=0, n_samples=3)
    # enough samples: the unpenalised fit still works
    r = attribute(adapter, inst, "lime", target=0, alpha=0, n_samples=200)
    assert all(np.isfinite(v).all() for v in r.scores.values())


# ---------------------------------------------------------------------------------------------
# baselines of the wrong shape
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2,), (6,), (6, 1)])
@pytest.mark.parametrize("method", ["integrated_gradients", "occlusion", "lime", "kernel_shap"])
def test_a_baseline_of_the_wrong_shape_is_a_clear_error(ts, shape, method):
    _, adapter, inst = ts
    p = adapter.prepare(inst)
    bad = dataclasses.replace(p, baseline=dict(p.baseline, series=torch.zeros(shape)))
    params = {"n_samples": 16} if method in ("lime", "kernel_shap") else {}
    with pytest.raises(ValueError, match=r"baseline of modality 'series' has shape"):
        attribute(adapter, bad, method, target=0, **params)
    with pytest.raises(ValueError, match=r"baseline of modality 'series' has shape"):
        attribute_batch(adapter, [p, bad], method, targets=0, **params)
    # the gradient methods do not read the baseline; a subset without the modality is fine
    attribute(adapter, bad, "gradient", target=0)
    attribute(adapter, bad, method, target=0, modalities=["vitals"], **params)


def test_a_modality_whose_baseline_raw_has_the_wrong_shape_is_named(ts):
    model, adapter, inst = ts

    class OneValueBaseline(Tabular):
        def baseline_raw(self, x):
            return torch.zeros(1)

    custom = ModelAdapter(model, [OneValueBaseline("vitals", columns=["hr", "bp", "t"]),
                                  adapter.modalities["series"]], ["no", "yes"])
    with pytest.raises(ValueError, match="OneValueBaseline.baseline_raw"):
        attribute(custom, inst, "integrated_gradients", target=0, steps=4)
    # caught when the instance is prepared, so stage 2 and the views get the same message
    with pytest.raises(ValueError, match=r"OneValueBaseline.baseline_raw returned shape \(1,\)"):
        custom.prepare(inst)


# ---------------------------------------------------------------------------------------------
# integrated gradients on a float64 model
# ---------------------------------------------------------------------------------------------
def test_ig_on_a_float64_model_is_complete_to_float64_precision():
    model = TabSeriesNet().double().eval()
    adapter = ModelAdapter(model, [Tabular("vitals", columns=["hr", "bp", "t"]),
                                   TimeSeries("series", window=2, channels=["x", "y"])],
                           ["no", "yes"])
    rng = np.random.default_rng(1)
    inst = {"vitals": rng.normal(size=3), "series": rng.normal(size=(6, 2))}
    p = adapter.prepare(inst)
    assert p.continuous["vitals"].dtype == torch.float64
    with torch.no_grad():
        fx = float(adapter.forward(p.raw)[0, 1])
        fb = float(adapter.forward(p.raw, {n: p.baseline[n][None] for n in p.names})[0, 1])
    r = attribute(adapter, p, "integrated_gradients", target=1, steps=50)
    total = sum(float(v.sum()) for v in r.scores.values())
    # Gauss-Legendre with 50 nodes on a smooth model: the quadrature error is far below 1e-12;
    # float32 nodes and weights left a gap of about 3e-9
    assert abs(r.params["completeness_gap"]) < 1e-12
    assert abs(fx - fb - total) < 1e-12
    many = attribute_batch(adapter, [p, p], "integrated_gradients", targets=1, steps=50,
                           rows_per_pass=7)
    assert all(abs(m.params["completeness_gap"]) < 1e-12 for m in many)


@pytest.mark.parametrize("method", ["occlusion", "lime", "kernel_shap"])
def test_a_float64_models_perturbation_maps_sum_to_its_scores_in_float64(method):
    """The maps were made in float32, so a unit's map missed its score by about 1e-9."""
    model = TabSeriesNet().double().eval()
    adapter = ModelAdapter(model, [Tabular("vitals", columns=["hr", "bp", "t"]),
                                   TimeSeries("series", window=2, channels=["x", "y"])],
                           ["no", "yes"])
    rng = np.random.default_rng(1)
    p = adapter.prepare({"vitals": rng.normal(size=3), "series": rng.normal(size=(6, 2))})
    r = attribute(adapter, p, method, target=1)
    for name in p.names:
        idx = p.index[name].numpy()
        assert r.maps[name].dtype == np.float64
        sums = np.array([r.maps[name][idx == u].sum() for u in range(p.n_units[name])])
        np.testing.assert_allclose(sums, r.scores[name], rtol=1e-13, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# attribute_batch: a perturbation method can be cancelled within an instance
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["occlusion", "lime", "kernel_shap"])
def test_attribute_batch_of_a_perturbation_method_cancels_between_batches(ts, method):
    model, adapter, inst = ts
    rows = []
    handle = model.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    calls = []

    def cancel_on_the_third_call(done, total, message):
        calls.append((done, total))
        assert 0 <= done <= total == 2
        if len(calls) == 3:
            raise Cancelled()

    params = {"batch_size": 2} if method == "occlusion" else {"batch_size": 4, "n_samples": 64}
    try:
        with pytest.raises(Cancelled):
            attribute_batch(adapter, [inst, inst], method, targets=0,
                            progress=cancel_on_the_third_call, **params)
    finally:
        handle.remove()
    per_instance = METHODS[method].cost(adapter.prepare(inst), **params)[0]
    # before: the first call came after the whole first instance (all its forward passes)
    assert sum(rows) < per_instance


def test_attribute_batch_progress_of_a_perturbation_method_still_counts_instances(ts):
    _, adapter, inst = ts
    seen = []
    attribute_batch(adapter, [inst, inst, inst], "lime", targets=0, n_samples=16, batch_size=4,
                    progress=lambda d, t, m: seen.append((d, t)))
    done = [d for d, _ in seen]
    assert done == sorted(done) and seen[-1] == (3, 3) and {t for _, t in seen} == {3}


# ---------------------------------------------------------------------------------------------
# the one-row gradient path and the cheap finiteness check (written for a cold cache)
# ---------------------------------------------------------------------------------------------
def test_all_finite_agrees_with_numpy_on_nan_inf_overflow_and_shapes():
    """The Python-sum shortcut must never call non-finite values finite, nor an overflowing
    sum of finite values non-finite."""
    from multiviz_widgets.kernels.unimodal import _all_finite
    rng = np.random.default_rng(0)
    cases = [np.array([1e308, 1e308, -1e308]),            # the sum overflows; all finite
             np.array([np.inf, -np.inf]), np.array([np.nan]), np.zeros(0),
             rng.normal(size=(8, 8)), rng.normal(size=5000)]   # 2-D; above the shortcut's size
    for n in (1, 7, 64, 4096, 5000):
        for bad in (np.nan, np.inf, -np.inf):
            v = rng.normal(size=n)
            v[rng.integers(n)] = bad
            cases.append(v)
    for v in cases:
        assert _all_finite([v]) == bool(np.isfinite(v).all()), v
    assert _all_finite([np.ones(3), np.array([1.0, np.nan])]) is False


@pytest.mark.parametrize("method", ["gradient", "grad_x_input"])
def test_one_row_gradient_path_matches_the_batched_rows(ts, method):
    _, adapter, inst = ts
    one = attribute(adapter, inst, method, target=1)
    (batched,) = attribute_batch(adapter, [inst], method, targets=1)
    for n in one.scores:
        assert one.scores[n].dtype == np.float64
        np.testing.assert_allclose(one.scores[n], batched.scores[n], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(one.maps[n], batched.maps[n], rtol=1e-6, atol=1e-7)


def test_text_scores_and_map_of_a_gradient_result_do_not_share_memory():
    """A token's score is its map entry; editing one array must not change the other."""
    from .explorer_support import tiny_vqa
    adapter, dataset = tiny_vqa()
    r = attribute(adapter, dataset[0], "gradient")
    before = r.maps["question"].copy()
    r.scores["question"] += 1.0
    np.testing.assert_array_equal(r.maps["question"], before)
    assert r.scores["image"].dtype == np.float64 and r.scores["question"].dtype == np.float64


def test_a_bool_is_refused_as_a_number_of_steps_or_samples():
    """True is not one step (bools are ints to Python); the shared check refuses them."""
    from multiviz_widgets.kernels.unimodal import integration_rule
    with pytest.raises(ValueError, match="steps must be an integer"):
        integration_rule(True)
    for fit in (lime_from_function, kernel_shap_from_function):
        with pytest.raises(ValueError, match="n_samples"):
            fit(_linear_fn, {"a": 4}, n_samples=True)
    assert len(integration_rule(np.int64(3))[0]) == 3


def test_one_transfer_keeps_every_part_at_its_own_precision():
    """The one-copy path (a GPU's) concatenates the parts in the widest dtype among them: a
    float32 part first must not round an Image's float64 unit sums after it."""
    from types import SimpleNamespace

    from multiviz_widgets import Image, Tabular
    from multiviz_widgets.kernels.unimodal import _scores_and_maps
    tab, img = Tabular("t", columns=["a", "b", "c"]), Image("i", patch=4)
    x_t, x_i = torch.zeros(3), torch.rand(3, 8, 8)
    prepared = SimpleNamespace(continuous={"t": x_t, "i": x_i},
                               index={"t": tab.unit_index(x_t), "i": img.unit_index(x_i)},
                               n_units={"t": 3, "i": 4})
    adapter = SimpleNamespace(modalities={"t": tab, "i": img})
    g = torch.Generator().manual_seed(0)
    attrs = {"t": torch.randn(3, generator=g),
             "i": torch.randn(3, 8, 8, generator=g) * 1e3 + 1e-3}
    apart = _scores_and_maps(adapter, prepared, attrs, one_transfer=False)
    once = _scores_and_maps(adapter, prepared, attrs, one_transfer=True)
    for a, b in zip(apart, once):
        for n in attrs:
            np.testing.assert_array_equal(a[n], b[n])


# ---------------------------------------------------------------------------------------------
# review of stage 1: models captum explains, models without gradients, inference mode, params
# ---------------------------------------------------------------------------------------------
class _SqrtNet(torch.nn.Module):
    """sqrt of the inputs: its input gradient is infinite at a zero baseline."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, a, b):
        return self.lin(torch.sqrt(torch.cat([a, b], 1)))


def _sqrt_case():
    model = _SqrtNet().eval()
    adapter = ModelAdapter(model, [Tabular("a", columns=["x", "y"]), Tabular("b", columns=["z"])],
                           ["n", "p"])
    inst = {"a": np.array([1.0, 2.0], np.float32), "b": np.array([3.0], np.float32)}
    return model, adapter, inst


@pytest.mark.filterwarnings("ignore::multiviz_widgets.kernels.unimodal.CompletenessWarning")
@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_middle", "riemann_right"])
def test_ig_with_an_infinite_gradient_at_the_baseline_equals_captum(rule):
    """IG's rows for x and the baseline (weight 0, there for f(x) and f(b)) were summed with
    the others: 0 * the infinite gradient of sqrt at 0 is NaN, so IG refused a model that none
    of the rule's nodes takes to alpha = 0, and that captum explains."""
    import captum.attr as captum
    model, adapter, inst = _sqrt_case()
    p = adapter.prepare(inst)
    x = (p.continuous["a"][None], p.continuous["b"][None])
    ref = captum.IntegratedGradients(model).attribute(
        x, tuple(torch.zeros_like(t) for t in x), target=0, n_steps=50, method=rule)
    one = attribute(adapter, inst, "integrated_gradients", target=0, rule=rule)
    many = attribute_batch(adapter, [inst, inst], "integrated_gradients", targets=0, rule=rule)
    many += attribute_batch(adapter, [inst], "integrated_gradients", targets=0, rule=rule,
                            rows_per_pass=1)           # the x and b rows in passes of their own
    chunked = attribute(adapter, inst, "integrated_gradients", target=0, rule=rule,
                        internal_batch_size=7)
    for r in [one, chunked] + many:
        for n, c in zip(["a", "b"], ref):
            np.testing.assert_allclose(r.scores[n], c[0].numpy(), rtol=1e-4, atol=1e-6)
        assert np.isfinite(r.params["completeness_gap"])


class _NoGradNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)

    @torch.no_grad()
    def forward(self, a, b):
        return self.lin(torch.cat([a, b], 1))


class _DetachedNet(_NoGradNet):
    def forward(self, a, b):
        return self.lin(torch.cat([a, b], 1).detach())


@pytest.mark.parametrize("net", [_NoGradNet, _DetachedNet])
@pytest.mark.parametrize("method", ["gradient", "grad_x_input", "integrated_gradients"])
def test_a_model_without_input_gradients_is_a_clear_error(net, method):
    """torch's "element 0 of tensors does not require grad" said nothing of what to do."""
    model = net().eval()
    if net is _DetachedNet:
        model.requires_grad_(False)              # frozen: nothing in the output requires grad
    adapter = ModelAdapter(model, [Tabular("a", columns=["x", "y"]),
                                   Tabular("b", columns=["z"])], ["n", "p"])
    inst = {"a": np.array([1.0, 2.0], np.float32), "b": np.array([3.0], np.float32)}
    for call in (lambda: attribute(adapter, inst, method, target=0),
                 lambda: attribute_batch(adapter, [inst, inst], method, targets=0)):
        with pytest.raises(ValueError, match="does not depend differentiably") as err:
            call()
        assert "occlusion, lime or kernel_shap" in str(err.value)
    assert np.isfinite(attribute(adapter, inst, "occlusion", target=0).scores["a"]).all()


@pytest.mark.parametrize("method", list(METHODS))
def test_inference_mode_is_a_clear_error(ts, method):
    """Every method failed with "Inference tensors do not track version counter"."""
    _, adapter, inst = ts
    params = {"n_samples": 16} if method in ("lime", "kernel_shap") else {}
    with torch.inference_mode():
        with pytest.raises(ValueError, match=r"outside torch\.inference_mode\(\)"):
            attribute(adapter, inst, method, target=0, **params)
        with pytest.raises(ValueError, match=r"outside torch\.inference_mode\(\)"):
            attribute_batch(adapter, [inst], method, targets=0, **params)


def test_an_instance_prepared_in_inference_mode_says_to_prepare_it_again(ts):
    _, adapter, inst = ts
    with torch.inference_mode():
        p = adapter.prepare(inst)
    for method in ("gradient", "grad_x_input"):
        with pytest.raises(ValueError, match="Prepare it again outside"):
            attribute(adapter, p, method, target=0)
    again = adapter.prepare(inst)
    r = attribute(adapter, again, "gradient", target=0)
    assert np.isfinite(r.scores["vitals"]).all()
    # the paths that build new rows from the inference tensors work, and give the same numbers
    for method in ("integrated_gradients", "occlusion"):
        ref = attribute(adapter, again, method, target=0, steps=8) if method[0] == "i" else \
            attribute(adapter, again, method, target=0)
        params = {"steps": 8} if method[0] == "i" else {}
        for got in (attribute(adapter, p, method, target=0, **params),
                    attribute_batch(adapter, [p], method, targets=0, **params)[0]):
            for n in ref.scores:
                np.testing.assert_allclose(got.scores[n], ref.scores[n], atol=1e-5)   # float32 batches


def test_attribute_batch_records_the_rows_per_pass_it_used(ts):
    _, adapter, inst = ts
    r = attribute_batch(adapter, [inst, inst], "integrated_gradients", targets=0, steps=8,
                        rows_per_pass=7)
    assert all(x.params["internal_batch_size"] == 7 for x in r)
    r = attribute_batch(adapter, [inst], "integrated_gradients", targets=0, steps=8,
                        internal_batch_size=5)
    assert r[0].params["internal_batch_size"] == 5


def test_integer_params_are_stored_as_the_python_ints_they_were_checked_to_be(ts):
    """steps=torch.tensor([8]) was stored as the tensor, and came back from to_dict as [8]."""
    import json

    from multiviz_widgets.results import attribution_from_dict
    _, adapter, inst = ts
    for steps in (torch.tensor([8]), np.int64(8), torch.tensor(8)):
        r = attribute(adapter, inst, "integrated_gradients", target=0, steps=steps,
                      internal_batch_size=np.int32(64))
        assert type(r.params["steps"]) is int and r.params["steps"] == 8
        assert type(r.params["internal_batch_size"]) is int
        back = attribution_from_dict(json.loads(json.dumps(r.to_dict())))
        assert back.params == r.params
    r = attribute(adapter, inst, "lime", target=0, n_samples=np.int64(16))
    assert type(r.params["n_samples"]) is int


class _ZScoreNet(torch.nn.Module):
    """z-scores each series inside forward (common for ECG and audio): 0 / 0 on a constant
    series."""

    def __init__(self, eps=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.eps = eps
        self.lin = torch.nn.Linear(16, 2)

    def forward(self, ecg):
        z = (ecg - ecg.mean(1, keepdim=True)) / (ecg.std(1, keepdim=True) + self.eps)
        return self.lin(z.reshape(len(z), -1))


@pytest.mark.parametrize("baseline", ["zero", "mean"])
def test_nan_at_a_constant_baseline_advises_an_epsilon_not_another_constant_baseline(baseline):
    """The advice was "TimeSeries 'zero' or 'mean'": both are constant along time, so a model
    that z-scores each series is NaN on either."""
    inst = {"ecg": np.random.default_rng(0).normal(size=(8, 2)).astype(np.float32)}

    def adapter(eps):
        return ModelAdapter(_ZScoreNet(eps).eval(), [
            TimeSeries("ecg", window=4, channels=["i", "ii"], baseline=baseline)], ["a", "b"])

    with pytest.raises(ValueError, match="nan with ecg at its baseline") as err:
        attribute(adapter(0.0), inst, "integrated_gradients", target=0)
    msg = str(err.value)
    assert "epsilon" in msg and "+ 1e-6" in msg
    assert "switching between them does not help" in msg
    assert "TimeSeries 'zero' or 'mean'" not in msg            # the advice that did not work
    assert "occlusion, lime and kernel_shap" in msg           # IG from a constant: a jump at 0
    with pytest.raises(ValueError, match="nan with ecg at its baseline") as err:
        attribute(adapter(0.0), inst, "lime", target=0, n_samples=64)
    assert "+ 1e-6" in str(err.value) and "occlusion, lime" not in str(err.value)
    with pytest.warns(CompletenessWarning):                   # the advice works: finite
        r = attribute(adapter(1e-6), inst, "integrated_gradients", target=0)
    assert np.isfinite(r.scores["ecg"]).all()


def test_nan_at_the_baseline_for_another_cause_keeps_the_general_advice():
    """log of the input at a zero baseline: not finite near the baseline either, so the model
    does not merely divide by a spread that a constant baseline makes zero."""
    class Log(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, t):
            return self.lin(torch.log(t))

    adapter = ModelAdapter(Log().eval(), [Tabular("t", columns=["u", "v"])], ["a", "b"])
    with pytest.raises(ValueError, match="with t at its baseline") as err:
        attribute(adapter, {"t": np.array([1.0, 2.0], np.float32)}, "occlusion", target=0)
    assert "Choose another baseline" in str(err.value) and "epsilon" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# bfloat16 models: superpixels, and sums taken wider than the attributions
# ---------------------------------------------------------------------------------------------
def _bf16_image_text(patch=4, superpixels=None):
    from multiviz_widgets import Image, Text

    from .test_unimodal import VOCAB, ImageTextNet
    model = ImageTextNet().eval().bfloat16()
    adapter = ModelAdapter(model, [Image("image", patch=patch, superpixels=superpixels,
                                         baseline="zero"), Text("question", VOCAB)],
                           ["a", "b", "c"])
    rng = np.random.default_rng(0)
    inst = {"image": (rng.random((8, 8, 3)) * 255).astype(np.uint8),
            "question": "what shape is the red circle"}
    return adapter, inst


def test_a_bfloat16_model_with_superpixels_is_explained():
    """SLIC ran on the image as numpy, which has no bfloat16: prepare() raised a TypeError."""
    from multiviz_widgets.modalities import slic_superpixels
    adapter, inst = _bf16_image_text(superpixels=4)
    p = adapter.prepare(inst)
    assert p.continuous["image"].dtype == torch.bfloat16
    want = slic_superpixels(p.continuous["image"].float().numpy(), 4)
    np.testing.assert_array_equal(p.index["image"][0].numpy(), want)
    assert p.n_units["image"] == want.max() + 1 > 1
    for method in ("occlusion", "gradient"):
        r = attribute(adapter, p, method, target=1)
        assert r.scores["image"].shape == (p.n_units["image"],)
        assert np.isfinite(r.scores["image"]).all()


@pytest.mark.parametrize("patch", [4, 3])          # an exact patch grid, and a ragged one
def test_a_bfloat16_models_gradient_scores_are_exact_sums_of_its_gradients(patch):
    """The channels (image) and embedding dimensions (text) were summed in bfloat16 before the
    scores became float64: off by up to ~2e-3 of the sums of the very same gradients."""
    adapter, inst = _bf16_image_text(patch)
    p = adapter.prepare(inst)
    leaves = {n: p.continuous[n][None].clone().requires_grad_(True) for n in p.names}
    out = adapter.target_output(p.raw, leaves, adapter.target(1))
    grads = dict(zip(leaves, torch.autograd.grad(out.sum(), list(leaves.values()))))
    r = attribute(adapter, p, "gradient", target=1)
    for n, g in grads.items():
        assert g.dtype == torch.bfloat16
        want = adapter.modalities[n].pool(g.double(), p.continuous[n], p.index[n])[0].numpy()
        np.testing.assert_allclose(r.scores[n], want, rtol=1e-6, atol=1e-9, err_msg=n)
        # a modality's own pool adds up bfloat16 values in float32 too
        wide = adapter.modalities[n].pool(g, p.continuous[n], p.index[n])
        assert wide.dtype == torch.float32
        np.testing.assert_allclose(wide[0].double().numpy(), want, rtol=1e-6, atol=1e-9)
    # the image map: the channels' exact sums
    np.testing.assert_allclose(r.maps["image"], grads["image"][0].double().sum(0).numpy(),
                               rtol=1e-6, atol=1e-9)


class _Bf16Linear(torch.nn.Module):
    """One bfloat16 linear layer, weights and instance found where f(x) - f(x without unit)
    rounds in bfloat16 (14.125 for the exact 14.109375)."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[4.625, -0.87890625, -6.53125],
                                                 [1.703125, -3.25, -4.1875]]))

    def forward(self, x):
        return self.head(x)


def test_a_bfloat16_models_occlusion_scores_are_exact_differences_of_its_outputs():
    """f(x) - f(x without unit u) was taken in bfloat16 (rounded) before becoming float64."""
    from multiviz_widgets.kernels.common import evaluate_masks
    adapter = ModelAdapter(_Bf16Linear().eval().bfloat16(),
                           [Tabular("x", columns=["a", "b", "c"])], ["n", "p"])
    p = adapter.prepare({"x": np.array([1.2109375, 2.515625, -2.15625], dtype=np.float32)})
    r = attribute(adapter, p, "occlusion", target=0)
    # occlusion's rows: the instance, then each unit at the baseline (zero)
    y = evaluate_masks(adapter, p, {"x": torch.tensor([[1.0, 1, 1], [0, 1, 1], [1, 0, 1],
                                                       [1, 1, 0]])}, adapter.target(0))
    assert y.dtype == torch.bfloat16
    np.testing.assert_array_equal(r.scores["x"], (y[0].double() - y[1:].double()).numpy())
    assert r.scores["x"][2] == 14.109375


# ---------------------------------------------------------------------------------------------
# surrogates that the samples do not determine
# ---------------------------------------------------------------------------------------------
def test_kernel_shap_on_too_few_samples_warns_and_records_it(ts):
    """9 units, 8 samples: the 6 sampled coalitions (3 with their complements) determine at
    most 3 of the 8 free coefficients; lstsq's minimum-norm guess came back silently (10 units
    and 10 samples gave -0.89 where the Shapley value is -0.004). As shapley's underdetermined
    regression: a UserWarning with the samples that would do, and params["underdetermined"]."""
    _, adapter, inst = ts
    with pytest.warns(UserWarning, match=r"kernel_shap: the Shapley-kernel regression fits 9 "
                                         r"unit scores from only 8 samples, whose 6 sampled "
                                         r"coalitions determine [0-3] of its 8 free coefficients"
                                         r".*underdetermined.*Raise n_samples to at least 27 "
                                         r"\(exact Shapley values from 512\)"):
        r = attribute(adapter, inst, "kernel_shap", target=0, n_samples=8)
    assert r.params["underdetermined"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = attribute(adapter, inst, "kernel_shap", target=0, n_samples=512)
        [batched] = attribute_batch(adapter, [inst], "kernel_shap", targets=0, n_samples=512)
    assert exact.params["underdetermined"] is False
    assert batched.params["underdetermined"] is False
    # every coalition evaluated (2^9 = 512): exact, said, whatever n_samples asked beyond it
    more = attribute(adapter, inst, "kernel_shap", target=0, n_samples=2000)
    assert exact.params["exact"] is batched.params["exact"] is more.params["exact"] is True
    assert more.params["n_samples"] == 2000 and more.forward_passes == 512
    assert r.params["exact"] is False
    # attribute_batch records it too, and warns at its caller
    with pytest.warns(UserWarning, match="underdetermined") as record:
        [few] = attribute_batch(adapter, [inst], "kernel_shap", targets=0, n_samples=8)
    assert few.params["underdetermined"] is True
    assert record[0].filename == __file__


def test_kernel_shap_of_a_function_warns_below_the_rank_of_its_regression():
    """Sampled (not exact) designs: 30 units need about 2.5 x 30 samples; the function itself
    (used without attribute) warns too, and a determined fit recovers a linear function."""
    w = torch.arange(1.0, 31.0, dtype=torch.float64)

    def fn(m):
        return m["a"].double() @ w

    with pytest.warns(UserWarning, match=r"fits 30 unit scores from only 40 samples.*at least "
                                         r"90, explain fewer units \(modalities=\[\.\.\.\]\), "
                                         r"or use occlusion") as record:
        kernel_shap_from_function(fn, {"a": 30}, n_samples=40)
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = kernel_shap_from_function(fn, {"a": 30}, n_samples=120)
    np.testing.assert_allclose(s["a"], w.numpy(), atol=1e-8)


@pytest.mark.parametrize("seed", range(4))
def test_lime_without_a_penalty_refuses_a_rank_deficient_design_that_solve_misses(seed):
    """10 units and 8 masks: the unpenalised system is singular, but rounding let solve()
    return finite coefficients off by up to 10^4; the rank is read first now."""
    w = torch.arange(1.0, 11.0, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"with alpha=0.0 \(no ridge penalty\) the 8 sampled "
                                         r"masks determine only \d of the coefficients of its "
                                         r"10 units \(too few masks: at least 11 are needed.*"
                                         r"alpha > 0"):
        lime_from_function(lambda m: m["a"].double() @ w, {"a": 10}, n_samples=8, alpha=0,
                           seed=seed)
    s = lime_from_function(lambda m: m["a"].double() @ w, {"a": 10}, n_samples=30, alpha=0,
                           seed=seed)
    np.testing.assert_allclose(s["a"], w.numpy(), atol=1e-8)


# ---------------------------------------------------------------------------------------------
# progress that is not a callable
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["gradient", "integrated_gradients", "occlusion", "lime",
                                    "kernel_shap"])
def test_a_progress_that_is_not_callable_is_a_clear_error_before_any_work(ts, method):
    """progress=5 gave "'int' object is not callable" from inside the kernel (or nothing at
    all, from a method that skips the report without a callback), after forward passes."""
    model, adapter, inst = ts
    rows = []
    handle = model.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    try:
        with pytest.raises(TypeError, match=r"attribute: progress must be None or a callable "
                                            r"progress\(done, total, message\), got 5 \(int\)"):
            attribute(adapter, inst, method, target=0, progress=5)
        with pytest.raises(TypeError, match="attribute_batch: progress must be None or a "
                                            "callable"):
            attribute_batch(adapter, [inst], method, targets=0, progress="bar")
    finally:
        handle.remove()
    assert rows == []


def test_surrogates_and_report_refuse_a_progress_that_is_not_callable():
    from multiviz_widgets.progress import report
    for fit in (lime_from_function, kernel_shap_from_function):
        with pytest.raises(TypeError, match="progress must be None or a callable"):
            fit(_linear_fn, {"a": 4}, n_samples=8, progress=[])
    with pytest.raises(TypeError, match=r"got 5 \(int\)"):
        report(5, 0, 1, "x")
    report(None, 0, 1)                                    # None: nothing to call


# ---------------------------------------------------------------------------------------------
# integrated gradients' steps beyond memory
# ---------------------------------------------------------------------------------------------
def test_integrated_gradients_refuses_steps_beyond_memory_before_any_work(ts):
    """steps=10**9 raised numpy's MemoryError (6.94 EiB, leggauss' dense eigenproblem); now a
    ValueError up front that says what it would take and the most steps that fit."""
    from multiviz_widgets.kernels.unimodal import integration_rule
    model, adapter, inst = ts
    rows = []
    handle = model.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    words = (r"integrated_gradients: steps=1,000,000,000 would need about 13\.9 EiB of memory: "
             r"13\.9 EiB for the gausslegendre nodes .*; 111\.8 GiB for the path's "
             r"1,000,000,002 rows of 60 bytes\. At most 2\.0 GiB are allowed\. Lower steps to "
             r"at most 11,5\d\d")
    try:
        with pytest.raises(ValueError, match=words):
            attribute(adapter, inst, "integrated_gradients", target=None, steps=10**9)
        with pytest.raises(ValueError, match=words):
            attribute_batch(adapter, [inst, inst], "integrated_gradients", steps=10**9)
    finally:
        handle.remove()
    assert rows == []                     # not even the forward pass that finds the target
    with pytest.raises(ValueError, match=r"integration_rule: steps=100,000,000 would need about "
                                         r"3\.0 GiB .*riemann_right nodes\. .*at most "
                                         r"67,108,864"):
        integration_rule(10**8, "riemann_right")


def test_integrated_gradients_memory_limit_counts_the_path_and_what_it_suggests_fits(
        ts, monkeypatch):
    """The path's rows count too (a large input), and the steps the error suggests run."""
    import re

    from multiviz_widgets.kernels import unimodal
    _, adapter, inst = ts
    monkeypatch.setattr(unimodal, "PATH_MEMORY_LIMIT", 64 * 2**10)
    with pytest.raises(ValueError, match=r"path's 1,001 rows of 60 bytes\..*At most 64\.0 KiB"
                                         r".*Lower steps to at most ([\d,]+)") as e:
        attribute(adapter, inst, "integrated_gradients", target=0, steps=1000,
                  rule="riemann_right")
    fits = int(re.search(r"at most ([\d,]+) \(", str(e.value)).group(1).replace(",", ""))
    assert 100 < fits < 1000
    r = attribute(adapter, inst, "integrated_gradients", target=0, steps=fits,
                  rule="riemann_right")
    assert r.params["steps"] == fits
    with pytest.raises(ValueError, match="Lower steps to at most"):
        attribute(adapter, inst, "integrated_gradients", target=0, steps=fits + 1,
                  rule="riemann_right")


# ---------------------------------------------------------------------------------------------
# LIME below its unknowns; KernelSHAP's regression step
# ---------------------------------------------------------------------------------------------
def test_lime_on_fewer_samples_than_unknowns_warns_and_records_it(ts):
    """9 units and an intercept, 9 samples: the ridge penalty makes the regression solvable, not
    determined (1,296 units at the default 500 samples ranked a known linear function's effects
    with a Spearman correlation of 0.38), and nothing said so. As KernelSHAP: a UserWarning
    with the samples that would do, and params["underdetermined"], which the Explorer's overlay
    caption reads ("an estimate from too few samples")."""
    _, adapter, inst = ts
    with pytest.warns(UserWarning, match=r"lime: the LIME regression fits 9 unit scores and an "
                                         r"intercept to only 9 samples, so its estimate is "
                                         r"underdetermined.*Raise n_samples to at least 10 "
                                         r".*modalities=\[\.\.\.\]\), or use occlusion") as record:
        r = attribute(adapter, inst, "lime", target=0, n_samples=9)
    assert r.params["underdetermined"] is True and record[0].filename == __file__
    with pytest.warns(UserWarning, match="underdetermined") as record:
        [few] = attribute_batch(adapter, [inst], "lime", targets=0, n_samples=9)
    assert few.params["underdetermined"] is True and record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enough = attribute(adapter, inst, "lime", target=0, n_samples=10)
        one = attribute(adapter, inst, "lime", target=0, n_samples=10, modalities=["vitals"])
    assert enough.params["underdetermined"] is False and one.params["underdetermined"] is False
    with pytest.warns(UserWarning, match=r"fits 4 unit scores.*only 4 samples.*at least 5") as w:
        lime_from_function(_linear_fn, {"a": 4}, n_samples=4)
    assert w[0].filename == __file__


def test_the_explorers_lime_on_more_units_than_its_samples_is_flagged_for_its_caption():
    """The Explorer's own kernel call (engine.Kernels, LIME's default 500 samples) on 600 units:
    the result carries what the overlay caption reads."""
    from torch import nn

    from multiviz_widgets.engine import Kernels

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(602, 2)

        def forward(self, table, series):
            return self.out(torch.cat([table, series.flatten(1)], 1))

    adapter = ModelAdapter(Wide().eval(), [Tabular("table", columns=[f"c{i}" for i in range(600)]),
                                           TimeSeries("series", window=1, channels=["x"])],
                           ["a", "b"])
    p = adapter.prepare({"table": torch.randn(600), "series": torch.randn(2, 1)})
    with pytest.warns(UserWarning, match="602 unit scores .* 500 samples.*at least 603"):
        r = Kernels().attribute(adapter, p, "lime", adapter.target(0))
    assert r.params["underdetermined"] is True


def test_kernel_shap_reports_its_regression_before_solving_it_so_a_cancel_stops_there(
        ts, monkeypatch):
    """The least-squares fit came after the last progress report: seconds for thousands of
    units that a cancel could not stop. It is reported ("fitting") first."""
    from multiviz_widgets.kernels import unimodal
    _, adapter, inst = ts
    seen = []
    attribute(adapter, inst, "kernel_shap", target=0, n_samples=64,
              progress=lambda d, t, m: seen.append((d, t, m)))
    assert seen[-1] == (64, 64, "KernelSHAP: fitting the regression")
    assert seen[-2] == (64, 64, "KernelSHAP samples")
    fits = []
    monkeypatch.setattr(unimodal, "_shap_fit", lambda *a: fits.append(a))

    def cancel(done, total, message):
        if "fitting" in message:
            raise Cancelled()

    with pytest.raises(Cancelled):
        attribute(adapter, inst, "kernel_shap", target=0, n_samples=64, progress=cancel)
    assert fits == []


def _shap_design(units, n_samples, seed=0):
    """KernelSHAP's weighted, constrained design for ``units`` and a response: (x, t)."""
    from multiviz_widgets.kernels.unimodal import _shapley_design
    rng = np.random.default_rng(seed)
    z, w = _shapley_design(units, n_samples, rng)
    x = torch.from_numpy((z[:, :-1] - z[:, -1:]) * np.sqrt(w)[:, None])
    return x, torch.from_numpy(rng.normal(size=(len(z), 1)))


def test_kernel_shaps_regression_agrees_with_gelsd_without_it_and_gives_the_same_bits(
        monkeypatch):
    """A full-rank design is solved by QR (2.4 times faster than lstsq's gelsd at 1,700 units):
    the same solution to 1e-6 (here 1e-12), the same bits on every call (lstsq's gelsy, as
    fast, is given an uninitialised pivot array by torch and varied in its last bits), and no
    gelsd. A rank-deficient one still goes to gelsd: its minimum-norm solution and rank."""
    from multiviz_widgets.kernels.unimodal import _least_squares
    gelsd = torch.linalg.lstsq
    x, t = _shap_design(60, 300)                                # 300 rows, 59 free coefficients
    want = gelsd(x, t, driver="gelsd")
    assert int(want.rank) == 59
    calls = []
    monkeypatch.setattr(torch.linalg, "lstsq", lambda *a, **k: calls.append(k) or gelsd(*a, **k))
    got, rank = _least_squares(x, t)
    assert rank == 59 and calls == []
    np.testing.assert_allclose(got.numpy(), want.solution.numpy(), rtol=1e-12, atol=0)
    for _ in range(5):
        assert torch.equal(_least_squares(x.clone(), t.clone())[0], got)
    few_x, few_t = _shap_design(60, 80)                         # 40 pairs: rank 40 at most
    few = gelsd(few_x, few_t, driver="gelsd")
    s, rank = _least_squares(few_x, few_t)
    assert rank == int(few.rank) < 59 and calls == [{"driver": "gelsd"}]
    assert torch.equal(s, few.solution)
    dependent = torch.cat([x, x[:, :1]], 1)                      # more rows, a repeated column
    s, rank = _least_squares(dependent, t)
    assert rank == 59 and len(calls) == 2
    assert torch.equal(s, gelsd(dependent, t, driver="gelsd").solution)


def test_a_kernels_caveat_is_collected_on_a_collecting_thread_and_a_warning_elsewhere(ts):
    """KernelSHAP's underdetermined-fit caveat: a Python warning from a cell (at the caller's
    line), a notice and no warning inside ``collecting()``, as on the Explorer's workers."""
    from multiviz_widgets.notices import collecting
    _, adapter, inst = ts
    with pytest.warns(UserWarning, match="underdetermined") as record:
        attribute(adapter, inst, "kernel_shap", target=0, n_samples=8)
    assert record[0].filename == __file__
    with warnings.catch_warnings(record=True) as said, collecting() as told:
        warnings.simplefilter("always")
        r = attribute(adapter, inst, "kernel_shap", target=0, n_samples=8)
    assert r.params["underdetermined"] is True
    assert not [w for w in said if "underdetermined" in str(w.message)]
    assert [n.category for n in told] == ["UserWarning"]
    assert "underdetermined" in told[0].text and "Raise n_samples" in told[0].text


@pytest.mark.parametrize("method", ["lime", "kernel_shap"])
def test_a_surrogate_too_large_for_memory_is_refused_before_any_sample(monkeypatch, method):
    """8,128 units and the 24,384 samples KernelSHAP's own warning asked for ran every sample,
    then failed in the solve with the allocator's bare error. Now: refused first, with what it
    would need, what fits and what to do instead; nothing is evaluated."""
    import multiviz_widgets.kernels.unimodal as unimodal
    calls = []

    def fn(masks):
        calls.append(1)
        return masks["x"].sum(1)
    # 300 units x 900 samples: 8 x (6 x 900 x 300 + 2 x 300^2) bytes = 14.4 MB
    monkeypatch.setattr(unimodal, "SURROGATE_MEMORY_LIMIT", 10 * 2**20)
    run = (unimodal.lime_from_function if method == "lime"
           else unimodal.kernel_shap_from_function)
    # LIME: (10 MiB / 8 - 2 x 300^2) / (6 x 300) = 628 samples fit, enough for its 301
    # unknowns; KernelSHAP (no units x units system): 10 MiB / 8 / 1800 = 728, not its 3 U
    need, fits = ("13.7", 628) if method == "lime" else ("12.4", 728)
    few = (r"" if method == "lime" else r", too few to determine 300 unit scores \(about 900 "
           r"do\): the estimate would be a guess")
    with pytest.raises(ValueError, match=rf"{method}: 900 samples over 300 units would need "
                                         rf"about {need} MiB of memory .* At most 10\.0 MiB are "
                                         r"allowed\. Explain fewer, larger units .*\(at most "
                                         rf"{fits} fit{few}\), or use occlusion \(1 \+ 300 "
                                         r"forward passes"):
        run(fn, {"x": 300}, n_samples=900)
    assert calls == []
    run(fn, {"x": 300}, n_samples=500)                  # what fits runs
    assert calls


def test_occlusion_builds_each_batchs_masks_when_it_runs(monkeypatch, ts):
    """Its [1 + U, U] masks were built at once (1 GB for 16,000 units): now batch by batch, the
    same rows as the whole (row 0 keeps all, row 1 + k removes unit k alone), the same scores."""
    import multiviz_widgets.kernels.common as common
    from multiviz_widgets.kernels.common import occlusion_rows
    units = {"a": 3, "b": 4}
    whole = occlusion_rows(units, 0, 8)
    assert whole["a"].shape == (8, 3) and whole["b"].shape == (8, 4)
    flat = torch.cat([whole["a"], whole["b"]], 1)
    assert torch.equal(flat, torch.cat([torch.ones(1, 7), 1 - torch.eye(7)]))
    for s, e in [(0, 3), (3, 8), (5, 6)]:
        part = occlusion_rows(units, s, e)
        assert all(torch.equal(part[k], whole[k][s:e]) for k in units)
    _, adapter, inst = ts
    ref = attribute(adapter, inst, "occlusion", target=0)
    seen, scalar = [], common.ModelAdapter.scalar

    def spy(self, prepared, continuous, target):
        seen.append(next(iter(continuous.values())).shape[0])
        return scalar(self, prepared, continuous, target)
    monkeypatch.setattr(common.ModelAdapter, "scalar", spy)
    got = attribute(adapter, inst, "occlusion", target=0, batch_size=3)
    assert max(seen) == 3 and sum(seen) == got.forward_passes
    for n in ref.scores:
        np.testing.assert_allclose(got.scores[n], ref.scores[n], atol=1e-5)   # float32 batches


def test_kernel_shap_of_many_units_and_few_samples_is_not_refused():
    """LIME's units x units system was counted for KernelSHAP too, whose QR builds none: 12,000
    units were refused whatever the samples (300 ran in 0.6 s and 162 MiB)."""
    from multiviz_widgets.kernels.unimodal import _check_surrogate_memory
    _check_surrogate_memory(300, 12_000, "kernel_shap", 36_000)
    with pytest.raises(ValueError, match="lime: 300 samples over 12,000 units"):
        _check_surrogate_memory(300, 12_000, "lime", 12_001)


class _HostMemoryBound(TabSeriesNet):
    """Runs batches of up to 4 rows; a larger one meets torch's host allocator refusing (its
    own message, raised here rather than asked of a real allocator: overcommit would differ
    between machines)."""

    def forward(self, vitals, series):
        if vitals.shape[0] > 4:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. "
                               "DefaultCPUAllocator: can't allocate memory: you tried to "
                               "allocate 2250000000000 bytes. Error code 12 (Cannot allocate "
                               "memory)")
        return super().forward(vitals, series)


@pytest.mark.parametrize("method, lower", [("occlusion", {"batch_size": 4}),
                                           ("integrated_gradients", {"internal_batch_size": 4})])
def test_running_out_of_host_memory_says_which_batch_to_lower(ts, method, lower):
    """The host allocator's refusal was read as the model's fault: 'The model runs this
    instance alone but not as a batch of 45 ... make forward() take any batch size', where
    batch_size=4 was the fix. It now says memory ran out and which parameters to lower."""
    from multiviz_widgets.adapter import ModelOutOfMemory
    _, _, inst = ts
    adapter = ModelAdapter(_HostMemoryBound().eval(),
                           [Tabular("vitals", columns=["hr", "bp", "t"]),
                            TimeSeries("series", window=2, channels=["x", "y"])], ["no", "yes"])
    with pytest.raises(ModelOutOfMemory, match=r"^The model ran out of memory on a batch of "
                                               r"\d+ instance\(s\)") as e:
        attribute(adapter, inst, method, target=0)
    text = str(e.value)
    assert "not about the inputs' values" in text and "batch_size=" in text
    assert "internal_batch_size=" in text and "runs this instance alone" not in text
    assert isinstance(e.value, MemoryError) and "can't allocate" in str(e.value.__cause__)
    assert attribute(adapter, inst, method, target=0, **lower).scores["vitals"].shape == (3,)
