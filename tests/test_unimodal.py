"""Stage 1 kernels: the checks of METHODS.md on small hand-built multimodal models."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from multiviz_widgets import AdapterError, Image, ModelAdapter, Neuron, Tabular, Text, TimeSeries
from multiviz_widgets.kernels.unimodal import (
    METHODS, attribute, integration_rule, kernel_shap_from_function, lime_from_function)
from multiviz_widgets.progress import Cancelled

ALL = list(METHODS)
VOCAB = ["[PAD]", "[UNK]", "what", "shape", "is", "the", "red", "circle", "color"]


# ---------------------------------------------------------------------------------------------
# small models
# ---------------------------------------------------------------------------------------------
class ImageTextNet(nn.Module):
    """Image [3, 8, 8] + question tokens, smooth (tanh) so IG's quadrature converges fast."""

    def __init__(self, seed=0, classes=3, hidden=6):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(len(VOCAB), 4)
        self.img = nn.Linear(3 * 8 * 8, 8)
        self.txt = nn.Linear(4, 8)
        self.fuse = nn.Linear(16, hidden)
        self.out = nn.Linear(hidden, classes)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def from_embedding(self, image, e):
        a = torch.tanh(self.img(image.flatten(1)))
        t = torch.tanh(self.txt(e.mean(1)))
        h = torch.tanh(self.fuse(torch.cat([a * t, a + t], 1)))
        return self.out(h), h

    def forward(self, image, question):
        return self.from_embedding(image, self.emb(question))[0]


class TabSeriesNet(nn.Module):
    """Tabular [3] + time series [6, 2]: a nonlinear fusion with a decision layer."""

    def __init__(self, seed=1, classes=2):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Linear(3, 5)
        self.b = nn.Linear(12, 5)
        self.fuse = nn.Linear(10, 4)
        self.out = nn.Linear(4, classes)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.6)

    def forward(self, vitals, series):
        a = torch.tanh(self.a(vitals))
        b = torch.tanh(self.b(series.flatten(1)))
        return self.out(torch.tanh(self.fuse(torch.cat([a * b, a - b], 1))))


class LinearNet(nn.Module):
    """f = w . [vitals, series] + c: every method must agree with the exact contributions."""

    def __init__(self, w, c):
        super().__init__()
        self.out = nn.Linear(len(w), 2)
        with torch.no_grad():
            self.out.weight.copy_(torch.stack([torch.as_tensor(w), -torch.as_tensor(w)]).float())
            self.out.bias.copy_(torch.tensor([c, -c]).float())

    def forward(self, vitals, series):
        return self.out(torch.cat([vitals, series.flatten(1)], 1))


def image_text():
    torch.manual_seed(0)
    model = ImageTextNet().eval()
    adapter = ModelAdapter(model, [Image("image", patch=4, baseline="zero"),
                                   Text("question", VOCAB)], ["a", "b", "c"])
    rng = np.random.default_rng(0)
    inst = {"image": (rng.random((8, 8, 3)) * 255).astype(np.uint8),
            "question": "what shape is the red circle"}
    return model, adapter, inst


def tab_series():
    model = TabSeriesNet().eval()
    adapter = ModelAdapter(model, [Tabular("vitals", columns=["hr", "bp", "t"]),
                                   TimeSeries("series", window=2, channels=["x", "y"])],
                           ["no", "yes"])
    rng = np.random.default_rng(1)
    inst = {"vitals": rng.normal(size=3).astype(np.float32),
            "series": rng.normal(size=(6, 2)).astype(np.float32)}
    return model, adapter, inst


@pytest.fixture(scope="module")
def it():
    return image_text()


@pytest.fixture(scope="module")
def ts():
    return tab_series()


def f_at(adapter, prepared, target, continuous):
    with torch.no_grad():
        return float(adapter.scalar(prepared, {k: v.unsqueeze(0) for k, v in continuous.items()},
                                    target)[0])


def total(attr):
    return sum(float(v.sum()) for v in attr.scores.values())


# ---------------------------------------------------------------------------------------------
# result shape and metadata
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ALL)
def test_result_holds_scores_maps_and_cost(it, method):
    _, adapter, inst = it
    p = adapter.prepare(inst)
    r = attribute(adapter, p, method=method, target=1)
    assert r.method == method and r.target.kind == "class" and r.target.index == 1
    assert set(r.scores) == {"image", "question"}
    assert r.scores["image"].shape == (4,) and r.scores["question"].shape == (6,)
    assert r.maps["image"].shape == (8, 8) and r.maps["question"].shape == (6,)
    assert r.labels["question"] == ["what", "shape", "is", "the", "red", "circle"]
    assert (r.forward_passes, r.backward_passes) == METHODS[method].cost(p)
    assert r.seconds >= 0 and r.params["modalities"] == ["image", "question"]
    for v in list(r.scores.values()) + list(r.maps.values()):
        assert np.all(np.isfinite(v))


@pytest.mark.parametrize("method", ["occlusion", "lime", "kernel_shap", "integrated_gradients",
                                    "grad_x_input"])
def test_map_summed_over_a_unit_is_its_score(it, method):
    _, adapter, inst = it
    r = attribute(adapter, inst, method=method, target=0)
    m = r.maps["image"]
    pooled = np.array([m[r0:r0 + 4, c0:c0 + 4].sum() for r0 in (0, 4) for c0 in (0, 4)])
    np.testing.assert_allclose(pooled, r.scores["image"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(r.maps["question"], r.scores["question"], rtol=1e-4, atol=1e-5)


def test_predicted_class_is_default_target_and_costs_one_forward(it):
    model, adapter, inst = it
    p = adapter.prepare(inst)
    pred = int(adapter.predict(p.raw).argmax(1)[0])
    r = attribute(adapter, p, method="gradient")
    assert r.target.index == pred
    assert r.forward_passes == 2


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------
def test_gradient_equals_autograd_pooled_through_the_embedding(it):
    model, adapter, inst = it
    p = adapter.prepare(inst)
    img = p.raw["image"].clone().requires_grad_(True)
    e = model.emb(p.raw["question"]).detach().requires_grad_(True)
    logits, _ = model.from_embedding(img, e)
    gi, ge = torch.autograd.grad(logits[0, 2], [img, e])
    for method, (ai, ae) in {"gradient": (gi[0], ge[0]),
                             "grad_x_input": (gi[0] * img[0], ge[0] * e[0])}.items():
        r = attribute(adapter, p, method=method, target="c")
        want_img = torch.stack([ai[:, r0:r0 + 4, c0:c0 + 4].sum()
                                for r0 in (0, 4) for c0 in (0, 4)])
        np.testing.assert_allclose(r.scores["image"], want_img.detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r.scores["question"], ae.sum(1).detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r.maps["image"], ai.sum(0).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_text_is_differentiated_through_the_embedding_output(it):
    model, adapter, inst = it
    p = adapter.prepare(inst)
    assert p.continuous["question"].shape == (6, 4)          # [T, E], floats
    r = attribute(adapter, p, method="gradient", target=0)
    assert np.abs(r.scores["question"]).sum() > 0            # ids have no gradient; embeddings do


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_middle", "riemann_trapezoid"])
def test_ig_completeness_all_modalities(it, ts, rule):
    for _, adapter, inst in (it, ts):
        p = adapter.prepare(inst)
        for target in (0, Neuron(1)):
            r = attribute(adapter, p, method="integrated_gradients", target=target, steps=64,
                          rule=rule, internal_batch_size=20)
            t = adapter.target(target)
            want = f_at(adapter, p, t, p.continuous) - f_at(adapter, p, t, p.baseline)
            assert abs(total(r) - want) <= 0.01 * abs(want) + 1e-5, (rule, target, total(r), want)


def test_ig_chunking_does_not_change_the_result(ts):
    _, adapter, inst = ts
    a = attribute(adapter, inst, method="integrated_gradients", target=1, steps=30)
    b = attribute(adapter, inst, method="integrated_gradients", target=1, steps=30,
                  internal_batch_size=7)
    for n in a.scores:
        np.testing.assert_allclose(a.scores[n], b.scores[n], rtol=1e-5, atol=1e-6)


def test_integration_rules_weights_sum_to_one():
    for rule in ["gausslegendre", "riemann_right", "riemann_left", "riemann_middle",
                 "riemann_trapezoid"]:
        a, w = integration_rule(10, rule)
        assert len(a) == 10 and abs(w.sum() - 1) < 1e-12 and a.min() >= 0 and a.max() <= 1
    with pytest.raises(ValueError, match="integration rule"):
        integration_rule(5, "simpson")
    with pytest.raises(ValueError, match="steps"):
        integration_rule(0)


# ---------------------------------------------------------------------------------------------
# perturbations
# ---------------------------------------------------------------------------------------------
def test_occlusion_equals_manual_ablation_in_model_inputs(it):
    model, adapter, inst = it
    p = adapter.prepare(inst)
    img, q = p.raw["image"], p.raw["question"]
    for target, pick in ((2, lambda x: model(*x)[:, 2]),
                         (Neuron(3), lambda x: model.from_embedding(x[0], model.emb(x[1]))[1][:, 3])):
        r = attribute(adapter, p, method="occlusion", target=target)
        with torch.no_grad():
            full = float(pick((img, q))[0])
            for u, (r0, c0) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
                im = img.clone()
                im[:, :, r0:r0 + 4, c0:c0 + 4] = 0
                assert r.scores["image"][u] == pytest.approx(full - float(pick((im, q))[0]), abs=1e-5)
            for t in range(q.shape[1]):
                qq = q.clone()
                qq[0, t] = 0                                  # [PAD]
                assert r.scores["question"][t] == pytest.approx(full - float(pick((img, qq))[0]),
                                                                abs=1e-5)


def test_occlusion_tabular_and_series_units(ts):
    model, adapter, inst = ts
    p = adapter.prepare(inst)
    r = attribute(adapter, p, method="occlusion", target=1, batch_size=4)
    v, s = p.raw["vitals"], p.raw["series"]
    with torch.no_grad():
        full = float(model(v, s)[0, 1])
        for c in range(3):
            vv = v.clone()
            vv[0, c] = 0
            assert r.scores["vitals"][c] == pytest.approx(full - float(model(vv, s)[0, 1]), abs=1e-5)
        for w in range(3):
            for ch in range(2):
                ss = s.clone()
                ss[0, 2 * w:2 * w + 2, ch] = 0
                assert r.scores["series"][2 * w + ch] == pytest.approx(
                    full - float(model(v, ss)[0, 1]), abs=1e-5)


@pytest.mark.parametrize("target", [0, Neuron(2)])
def test_kernel_shap_efficiency_sampled_and_exact(it, ts, target):
    for _, adapter, inst in (it, ts):
        p = adapter.prepare(inst)
        t = adapter.target(target)
        want = f_at(adapter, p, t, p.continuous) - f_at(adapter, p, t, p.baseline)
        for n_samples in (60, 5000):                       # 60: sampled; 5000 > 2^10 or 2^12: exact
            r = attribute(adapter, p, method="kernel_shap", target=target, n_samples=n_samples)
            assert abs(total(r) - want) < 1e-4


def test_kernel_shap_exact_equals_brute_force_shapley(ts):
    model, adapter, inst = ts
    p = adapter.prepare(inst)
    r = attribute(adapter, p, method="kernel_shap", target=0, n_samples=2 ** 9,
                  modalities=["vitals"])
    # brute-force Shapley over the 3 tabular units, the series kept as it is
    import itertools
    import math

    def f(keep):
        v = p.raw["vitals"].clone()
        for c in range(3):
            if c not in keep:
                v[0, c] = 0
        with torch.no_grad():
            return float(model(v, p.raw["series"])[0, 0])
    phi = np.zeros(3)
    for i in range(3):
        others = [j for j in range(3) if j != i]
        for k in range(3):
            for s in itertools.combinations(others, k):
                w = math.factorial(k) * math.factorial(3 - k - 1) / math.factorial(3)
                phi[i] += w * (f(set(s) | {i}) - f(set(s)))
    np.testing.assert_allclose(r.scores["vitals"], phi, atol=1e-5)
    assert set(r.scores) == {"vitals"}
    assert r.forward_passes == 8


def test_lime_and_shap_are_reproducible_with_a_seed(ts):
    """The same seed, the same scores; another seed, another sample (and other scores: a
    generator that ignored the seed passed the first half alone)."""
    _, adapter, inst = ts
    for m in ("lime", "kernel_shap"):
        a = attribute(adapter, inst, method=m, target=0, n_samples=100, seed=3)
        b = attribute(adapter, inst, method=m, target=0, n_samples=100, seed=3)
        c = attribute(adapter, inst, method=m, target=0, n_samples=100, seed=4)
        for n in a.scores:
            np.testing.assert_array_equal(a.scores[n], b.scores[n])
        assert any(not np.array_equal(a.scores[n], c.scores[n]) for n in a.scores), m


def test_lime_from_function_recovers_a_linear_function():
    w = {"a": np.array([1.0, -2.0, 0.5]), "b": np.array([3.0, 0.0])}

    def fn(masks):
        return masks["a"] @ torch.tensor(w["a"]).float() + masks["b"] @ torch.tensor(w["b"]).float() + 7

    for distance in ("cosine", "hamming"):
        s = lime_from_function(fn, {"a": 3, "b": 2}, n_samples=200, alpha=1e-6, distance=distance)
        for k in w:
            np.testing.assert_allclose(s[k], w[k], atol=1e-4)
    s = kernel_shap_from_function(fn, {"a": 3, "b": 2}, n_samples=200)
    for k in w:
        np.testing.assert_allclose(s[k], w[k], atol=1e-5)


def test_lime_from_function_calls_in_batches_and_reports_progress():
    calls, seen = [], []

    def fn(masks):
        calls.append(masks["x"].shape)
        return masks["x"].sum(1)

    lime_from_function(fn, {"x": 4}, n_samples=50, batch_size=16,
                       progress=lambda d, t, m: seen.append((d, t)))
    assert [c[0] for c in calls] == [16, 16, 16, 2] and all(c[1] == 4 for c in calls)
    assert seen[-1] == (50, 50)


def test_lime_from_function_errors():
    with pytest.raises(ValueError, match="n_units"):
        lime_from_function(lambda m: None, {})
    with pytest.raises(ValueError, match=r"n_units\['x'\] must be an integer of at least 1"):
        lime_from_function(lambda m: None, {"x": 0})
    with pytest.raises(ValueError, match="one value per mask"):
        lime_from_function(lambda m: torch.zeros(1), {"x": 3}, n_samples=10)
    with pytest.raises(ValueError, match="distance"):
        lime_from_function(lambda m: m["x"].sum(1), {"x": 3}, distance="l2")


# ---------------------------------------------------------------------------------------------
# neuron targets and modality subsets
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ALL)
def test_neuron_target_works_for_every_method(it, method):
    model, adapter, inst = it
    p = adapter.prepare(inst)
    r = attribute(adapter, p, method=method, target=Neuron(4), n_samples=2 ** 11) \
        if method in ("lime", "kernel_shap") else attribute(adapter, p, method=method, target=Neuron(4))
    assert r.target == Neuron(4)
    if method == "gradient":
        e = model.emb(p.raw["question"]).detach().requires_grad_(True)
        _, h = model.from_embedding(p.raw["image"], e)
        (ge,) = torch.autograd.grad(h[0, 4], [e])
        np.testing.assert_allclose(r.scores["question"], ge[0].sum(1).numpy(), rtol=1e-5, atol=1e-6)
    if method == "kernel_shap":
        t = Neuron(4)
        want = f_at(adapter, p, t, p.continuous) - f_at(adapter, p, t, p.baseline)
        assert abs(total(r) - want) < 1e-4


def test_neuron_out_of_range_is_a_clear_error(it):
    _, adapter, inst = it
    with pytest.raises(AdapterError, match="out of range"):
        attribute(adapter, inst, method="gradient", target=Neuron(99))


def test_modality_subset_keeps_the_others_fixed(it):
    _, adapter, inst = it
    p = adapter.prepare(inst)
    r = attribute(adapter, p, method="integrated_gradients", target=0, modalities=["image"],
                  steps=64)
    assert set(r.scores) == {"image"} and set(r.maps) == {"image"}
    t = adapter.target(0)
    part = dict(p.continuous, image=p.baseline["image"])
    want = f_at(adapter, p, t, p.continuous) - f_at(adapter, p, t, part)
    assert abs(total(r) - want) <= 0.01 * abs(want) + 1e-5
    r = attribute(adapter, p, method="occlusion", target=0, modalities="question")
    assert set(r.scores) == {"question"} and r.forward_passes == 7
    full = attribute(adapter, p, method="occlusion", target=0)
    np.testing.assert_allclose(r.scores["question"], full.scores["question"], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# a linear model: every method is exact
# ---------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(w=st.lists(st.floats(-3, 3), min_size=15, max_size=15),
       x=st.lists(st.floats(-2, 2), min_size=15, max_size=15),
       c=st.floats(-1, 1))
def test_linear_model_all_methods_agree_with_the_exact_contributions(w, x, c):
    w, x = np.array(w, dtype=np.float32), np.array(x, dtype=np.float32)
    adapter = ModelAdapter(LinearNet(w, c).eval(),
                           [Tabular("vitals", columns=["a", "b", "c"]),
                            TimeSeries("series", window=2, channels=["x", "y"])], ["pos", "neg"])
    inst = {"vitals": x[:3], "series": x[3:].reshape(6, 2)}
    contrib = w * x                                      # zero baselines
    exact = {"vitals": contrib[:3],
             "series": contrib[3:].reshape(3, 2, 2).sum(1).reshape(-1)}   # window of 2 steps
    p = adapter.prepare(inst)
    for method, params in [("integrated_gradients", {"steps": 3}), ("grad_x_input", {}),
                           ("occlusion", {}), ("kernel_shap", {"n_samples": 100}),
                           ("lime", {"n_samples": 300, "alpha": 1e-7})]:
        r = attribute(adapter, p, method=method, target=0, **params)
        for n in exact:
            np.testing.assert_allclose(r.scores[n], exact[n], atol=2e-3, err_msg=method)
    g = attribute(adapter, p, method="gradient", target=1)
    np.testing.assert_allclose(g.scores["vitals"], -w[:3], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# errors, progress, cancellation
# ---------------------------------------------------------------------------------------------
def test_unknown_method_lists_the_valid_names(it):
    _, adapter, inst = it
    with pytest.raises(ValueError) as e:
        attribute(adapter, inst, method="deeplift")
    for name in ALL:
        assert name in str(e.value)


@pytest.mark.parametrize("target", ["zebra", 7, -1, 2.5])
def test_bad_target_is_a_clear_error(it, target):
    _, adapter, inst = it
    with pytest.raises(AdapterError):
        attribute(adapter, inst, method="gradient", target=target)


@pytest.mark.parametrize("subset", [["audio"], [], 5, ["image", "sound"]])
def test_bad_modality_subset_is_a_clear_error(it, subset):
    _, adapter, inst = it
    with pytest.raises(ValueError, match="modalities"):
        attribute(adapter, inst, method="occlusion", target=0, modalities=subset)


def test_unknown_parameter_names_the_valid_ones(it):
    _, adapter, inst = it
    with pytest.raises(TypeError, match="n_samples"):
        attribute(adapter, inst, method="lime", target=0, steps=5)


def test_bad_instance_is_a_clear_error(it):
    _, adapter, _ = it
    with pytest.raises(AdapterError, match="missing"):
        attribute(adapter, {"image": np.zeros((8, 8, 3), np.uint8)}, method="gradient")


@pytest.mark.parametrize("method", ALL)
def test_progress_is_reported_and_cancel_propagates(it, method):
    _, adapter, inst = it
    p = adapter.prepare(inst)
    seen = []
    attribute(adapter, p, method=method, target=0, progress=lambda d, t, m: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1] and seen[-1][1] > 0

    def cancel(done, total, message):
        raise Cancelled()

    with pytest.raises(Cancelled):
        attribute(adapter, p, method=method, target=0, progress=cancel)


def test_a_modality_that_overrides_pool_is_respected(ts):
    model, adapter, inst = ts

    class MaxTabular(Tabular):
        def pool(self, attr, x, index=None):
            return super().pool(attr, x, index) * 0 + 42.0

    custom = ModelAdapter(model, [MaxTabular("vitals", columns=["hr", "bp", "t"]),
                                  adapter.modalities["series"]], ["no", "yes"])
    r = attribute(custom, inst, method="integrated_gradients", target=0, steps=4)
    np.testing.assert_array_equal(r.scores["vitals"], [42.0, 42.0, 42.0])
    plain = attribute(adapter, inst, method="integrated_gradients", target=0, steps=4)
    np.testing.assert_allclose(r.scores["series"], plain.scores["series"], rtol=1e-6)


@pytest.mark.parametrize("method,params", [("integrated_gradients", {"steps": 0}),
                                           ("integrated_gradients", {"internal_batch_size": -1}),
                                           ("occlusion", {"batch_size": 0}),
                                           ("lime", {"n_samples": 1}),
                                           ("kernel_shap", {"n_samples": 2.5})])
def test_bad_parameter_values_are_clear_errors(it, method, params):
    _, adapter, inst = it
    with pytest.raises(ValueError, match=list(params)[0]):
        attribute(adapter, inst, method=method, target=0, **params)


def test_agrees_with_captum_on_the_same_forward_function(it):
    import captum.attr as captum
    _, adapter, inst = it
    p = adapter.prepare(inst)
    names = p.names
    inputs = tuple(p.continuous[n].unsqueeze(0) for n in names)
    baselines = tuple(p.baseline[n].unsqueeze(0) for n in names)

    def forward(*xs):
        return adapter.forward(p.raw, dict(zip(names, xs)))

    def pooled(attrs):
        return {n: adapter.modalities[n].pool(a.detach(), p.continuous[n], p.index[n])[0].numpy()
                for n, a in zip(names, attrs)}

    ig = pooled(captum.IntegratedGradients(forward).attribute(
        inputs, baselines=baselines, target=1, n_steps=20, method="gausslegendre"))
    sal = pooled(captum.Saliency(forward).attribute(inputs, target=1, abs=False))
    offset, masks = 0, []
    for n in names:
        masks.append((p.index[n] + offset).unsqueeze(0))
        offset += p.n_units[n]
    abl = captum.FeatureAblation(forward).attribute(inputs, baselines=baselines, target=1,
                                                    feature_mask=tuple(masks))
    # captum spreads a unit's ablation score over all its scalars: read one scalar per unit
    abl = {n: np.array([a[0][p.index[n] == u].reshape(-1)[0].item() for u in range(p.n_units[n])])
           for n, a in zip(names, abl)}
    for method, ref, params in [("integrated_gradients", ig, {"steps": 20}), ("gradient", sal, {}),
                                ("occlusion", abl, {})]:
        r = attribute(adapter, p, method=method, target=1, **params)
        for n in names:
            np.testing.assert_allclose(r.scores[n], ref[n], rtol=1e-4, atol=1e-5, err_msg=method)


def test_cost_of_a_subset_and_of_an_unknown_modality(it):
    _, adapter, inst = it
    p = adapter.prepare(inst)
    assert METHODS["occlusion"].cost(p, modalities=["image"]) == (5, 0)
    assert METHODS["integrated_gradients"].cost(p, steps=7) == (9, 9)         # + x and b
    assert METHODS["integrated_gradients"].cost(p, steps=7, rule="riemann_trapezoid") == (7, 7)
    assert METHODS["integrated_gradients"].cost(p, steps=7, rule="riemann_right") == (8, 8)
    assert METHODS["kernel_shap"].cost(p, n_samples=100) == (100, 0)
    with pytest.raises(ValueError, match="audio"):
        METHODS["occlusion"].cost(p, modalities=["audio"])


def test_scores_and_maps_are_the_same_from_one_transfer(it, ts):
    """From a GPU the scores and maps of all modalities come back in one copy; that path, forced
    on the CPU, gives the same arrays (shapes and values) as one array per tensor."""
    from multiviz_widgets.kernels.unimodal import _scores_and_maps
    for _, adapter, inst in (it, ts):
        p = adapter.prepare(inst)
        g = torch.Generator().manual_seed(0)
        attrs = {n: torch.randn(x.shape, generator=g) for n, x in p.continuous.items()}
        a = _scores_and_maps(adapter, p, attrs, one_transfer=False)
        b = _scores_and_maps(adapter, p, attrs, one_transfer=True)
        for part_a, part_b in zip(a, b):
            assert set(part_a) == set(part_b) == set(attrs)
            for n in attrs:
                assert part_a[n].shape == part_b[n].shape
                np.testing.assert_array_equal(part_a[n], part_b[n])


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------
def test_lime_alpha_and_kernel_width_are_checked(it):
    _, adapter, inst = it
    f = lambda m: m["x"].sum(1)                              # noqa: E731
    for kw, words in [(dict(alpha=-1), "alpha .* must be a non-negative number, got -1"),
                      (dict(alpha=-1e-3), "got -0.001"), (dict(alpha="1"), "got '1'"),
                      (dict(alpha=float("nan")), "got nan"), (dict(alpha=True), "got True"),
                      (dict(kernel_width=0), "kernel_width .* must be a positive number, got 0"),
                      (dict(kernel_width=-0.5), "got -0.5"), (dict(kernel_width="wide"), "'wide'"),
                      (dict(kernel_width=float("inf")), "got inf")]:
        with pytest.raises(ValueError, match=words):
            lime_from_function(f, {"x": 3}, n_samples=10, **kw)
        with pytest.raises(ValueError, match=words):
            attribute(adapter, inst, "lime", n_samples=10, target=0, **kw)
    plain = lime_from_function(f, {"x": 3}, n_samples=50, alpha=0)      # no penalty: exact
    np.testing.assert_allclose(plain["x"], [1, 1, 1], atol=1e-9)
    attribute(adapter, inst, "lime", n_samples=10, target=0, alpha=np.float32(0.5), kernel_width=1)


def test_attribute_batch_takes_one_target_given_as_a_pair(it):
    from multiviz_widgets.kernels.unimodal import attribute_batch
    _, adapter, inst = it
    other = dict(inst, question="what color is the circle")
    for pair, target in [(("class", 2), 2), (("neuron", 1), Neuron(1))]:
        got = attribute_batch(adapter, [inst, other], "gradient", targets=pair)
        want = attribute_batch(adapter, [inst, other], "gradient", targets=target)
        assert [r.target for r in got] == [r.target for r in want] == [adapter.target(pair)] * 2
        for g, w in zip(got, want):
            np.testing.assert_allclose(g.scores["image"], w.scores["image"])
        one = attribute_batch(adapter, inst, "gradient", targets=pair)
        assert len(one) == 1 and one[0].target == adapter.target(pair)
    # two targets, one per instance, are still a list
    assert [r.target.index for r in attribute_batch(adapter, [inst, other], "gradient",
                                                    targets=("a", 2))] == [0, 2]


def test_an_instance_prepared_by_another_adapter_is_a_clear_error(it, ts):
    from multiviz_widgets.kernels.unimodal import attribute_batch
    _, adapter, inst = it
    _, other, other_inst = ts
    foreign = other.prepare(other_inst)
    with pytest.raises(AdapterError, match=r"modalities \['vitals', 'series'\], but the adapter's "
                                           r"are \['image', 'question'\].*another adapter"):
        attribute(adapter, foreign, "gradient")
    with pytest.raises(AdapterError, match="another adapter"):
        attribute_batch(adapter, [adapter.prepare(inst), foreign], "gradient")
    assert attribute(adapter, adapter.prepare(inst), "gradient").scores["image"].shape == (4,)


# ---------------------------------------------------------------------------------------------
# integrated gradients' completeness gap, and non-finite outputs
# ---------------------------------------------------------------------------------------------
def _identity_head() -> nn.Linear:
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
        head.bias.zero_()
    return head


class JumpNet(nn.Module):
    """f = w . vitals + series . v + 1[vitals != 0]: the indicator jumps by 1 at alpha = 0 of a
    zero baseline and has no gradient, so integrated gradients misses exactly 1 at any steps."""

    def __init__(self):
        super().__init__()
        self.head = _identity_head()

    def forward(self, vitals, series):
        smooth = vitals @ torch.tensor([0.5, -1.0, 2.0]) + series.flatten(1).sum(1) * 0.1
        jump = (vitals.abs().sum(1) > 0).to(vitals)
        return self.head(torch.stack([smooth + jump, -smooth], 1))


def jump_adapter():
    return ModelAdapter(JumpNet(), [Tabular("vitals", columns=["hr", "bp", "t"]),
                                    TimeSeries("series", window=2, channels=["x", "y"])],
                        ["no", "yes"])


def test_ig_records_the_completeness_gap_from_its_own_passes(it, ts):
    import warnings
    for _, adapter, inst in (it, ts):
        p = adapter.prepare(inst)
        for rule, extra in (("gausslegendre", 2), ("riemann_trapezoid", 0), ("riemann_left", 1)):
            with warnings.catch_warnings():
                warnings.simplefilter("error")               # small gap: no warning
                r = attribute(adapter, p, "integrated_gradients", target=0, steps=64, rule=rule)
            t = adapter.target(0)
            delta = f_at(adapter, p, t, p.continuous) - f_at(adapter, p, t, p.baseline)
            gap = r.params["completeness_gap"]
            assert gap == pytest.approx(delta - total(r), abs=1e-5)
            assert r.params["completeness_gap_relative"] == pytest.approx(abs(gap) / abs(delta))
            assert r.params["completeness_gap_relative"] < 0.05
            assert (r.forward_passes, r.backward_passes) == (64 + extra, 64 + extra)


def test_ig_warns_once_per_adapter_about_a_jump_at_the_baseline():
    import warnings
    from multiviz_widgets.kernels.unimodal import CompletenessWarning, attribute_batch
    rng = np.random.default_rng(0)
    insts = [{"vitals": rng.normal(size=3).astype(np.float32),
              "series": rng.normal(size=(6, 2)).astype(np.float32)} for _ in range(3)]
    for rule in ("gausslegendre", "riemann_trapezoid"):
        adapter = jump_adapter()
        with pytest.warns(CompletenessWarning, match="more steps.*different baseline") as rec:
            r = attribute(adapter, insts[0], "integrated_gradients", target=0, steps=200,
                          rule=rule)
        assert len(rec) == 1 and rec[0].filename == __file__
        assert r.params["completeness_gap"] == pytest.approx(1.0, abs=1e-4)    # the jump
        assert r.params["completeness_gap_relative"] > 0.05
        with warnings.catch_warnings():
            warnings.simplefilter("error")                 # once per adapter
            again = attribute(adapter, insts[1], "integrated_gradients", target=0, rule=rule)
        assert again.params["completeness_gap"] == pytest.approx(1.0, abs=1e-4)
    with pytest.warns(CompletenessWarning, match="3 of 3 results") as rec:
        many = attribute_batch(jump_adapter(), insts, "integrated_gradients", targets=0,
                               steps=20)
    assert len(rec) == 1 and rec[0].filename == __file__
    assert [m.params["completeness_gap"] for m in many] == pytest.approx([1.0] * 3, abs=1e-4)


def test_ig_tells_the_explorer_of_every_result_that_misses_completeness():
    """Inside ``collecting()`` (the Explorer's workers) the caveat comes with every result it
    concerns, shown beside it: after one in a cell, and twice in a row; the cell's once per
    adapter still holds afterwards."""
    import warnings

    from multiviz_widgets.kernels.unimodal import CompletenessWarning
    from multiviz_widgets.notices import collecting
    rng = np.random.default_rng(0)
    insts = [{"vitals": rng.normal(size=3).astype(np.float32),
              "series": rng.normal(size=(6, 2)).astype(np.float32)} for _ in range(3)]
    adapter = jump_adapter()
    with pytest.warns(CompletenessWarning):
        attribute(adapter, insts[0], "integrated_gradients", target=0)
    for inst in insts[1:]:
        with collecting() as told:
            attribute(adapter, inst, "integrated_gradients", target=0)
        assert [n.category for n in told] == ["CompletenessWarning"]
        assert "different baseline" in told[0].text and "once per adapter" not in told[0].text
    fresh = jump_adapter()
    with collecting() as told:
        attribute(fresh, insts[0], "integrated_gradients", target=0)
    assert len(told) == 1
    with pytest.warns(CompletenessWarning):        # the cell is still told, once
        attribute(fresh, insts[1], "integrated_gradients", target=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attribute(fresh, insts[2], "integrated_gradients", target=0)


def test_ig_records_but_does_not_warn_about_a_neuron_s_gap():
    """A decision-layer neuron is often 0 at x or at the baseline (ReLU), so its relative gap is
    routinely large (15-90% on easy-VQA); the Explorer's prediction path explains neurons, and a
    warning there was noise in the demo notebook. The gap is still in params."""
    import warnings
    from multiviz_widgets.demos import easy_vqa
    from multiviz_widgets.kernels.unimodal import CompletenessWarning
    adapter, ds = easy_vqa.load("test")
    gaps = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompletenessWarning)
        for i in range(3):
            for j in (0, 7, 14):
                r = attribute(adapter, ds[i], "integrated_gradients", target=Neuron(j))
                gaps.append(r.params["completeness_gap_relative"])
    assert max(gaps) > 0.05                       # large gaps were there, and not warned about


class LogNet(nn.Module):
    """f = sum log(vitals) + ...: finite on positive vitals, -inf at the zero baseline; with
    sqrt=True, NaN on the instance itself (sqrt of a negative)."""

    def __init__(self, sqrt=False):
        super().__init__()
        self.sqrt = sqrt
        self.head = _identity_head()

    def forward(self, vitals, series):
        s = series.flatten(1).sum(1, keepdim=True)
        v = torch.sqrt(vitals - 10.0) if self.sqrt else torch.log(vitals)
        return self.head(torch.cat([v.sum(1, keepdim=True) + s, -s], 1))


def log_adapter(sqrt=False):
    return ModelAdapter(LogNet(sqrt), [Tabular("vitals", columns=["hr", "bp", "t"]),
                                       TimeSeries("series", window=2, channels=["x", "y"])],
                        ["no", "yes"])


LOG_INSTANCE = {"vitals": np.array([1.0, 2.0, 3.0], np.float32),
                "series": np.ones((6, 2), np.float32)}


@pytest.mark.parametrize("method", ["integrated_gradients", "occlusion", "lime", "kernel_shap"])
def test_outputs_not_finite_at_the_baseline_are_a_clear_error(method):
    from multiviz_widgets.kernels.unimodal import attribute_batch
    adapter = log_adapter()
    kw = {"n_samples": 20} if method in ("lime", "kernel_shap") else {}
    match = (rf"^{method}: the model produced NaN or infinite values.*finite on the instance "
             r".*-inf with vitals and series at their baselines \(vitals alone at its "
             r"baseline gives -inf\).*another baseline")
    with pytest.raises(ValueError, match=match):
        attribute(adapter, LOG_INSTANCE, method, target=0, **kw)
    with pytest.raises(ValueError, match=match):
        attribute_batch(adapter, [LOG_INSTANCE, LOG_INSTANCE], method, targets=0, **kw)
    ok = attribute(adapter, LOG_INSTANCE, method, target=0, modalities=["series"], **kw)
    assert np.isfinite(ok.scores["series"]).all()


@pytest.mark.parametrize("method", ALL)
def test_outputs_not_finite_on_the_instance_are_a_clear_error(method):
    adapter = log_adapter(sqrt=True)
    kw = {"n_samples": 20} if method in ("lime", "kernel_shap") else {}
    with pytest.raises(ValueError, match=rf"^{method}: the model produced NaN.*is nan on the "
                                         r"instance itself"):
        attribute(adapter, LOG_INSTANCE, method, target=0, **kw)


def test_surrogates_of_a_function_refuse_non_finite_values():
    def fn(masks):
        y = masks["a"].sum(1)
        return torch.where(y == 0, torch.tensor(float("nan")), y)     # NaN on the empty mask
    for fit in (lime_from_function, kernel_shap_from_function):
        with pytest.raises(ValueError, match=r"NaN or infinite values on \d+ of the masks"):
            fit(fn, {"a": 3}, n_samples=16)
