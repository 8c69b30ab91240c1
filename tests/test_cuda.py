"""Every stage on a model that lives on a GPU gives what it gives on the CPU.

The kernels never say "cuda": they follow the model's device (``ModelAdapter.device``). These
tests put a copy of the shipped easy-VQA model (and of the synthetic planted model) on the GPU
and compare each kernel's result with the same call on the CPU model.

Skipped where torch sees no CUDA device, as in CI. ``MVZ_TEST_DEVICE=cpu`` runs the same
comparisons against a second CPU copy of the model, which checks this file itself on a machine
without a GPU. TF32 (on by default for cuDNN convolutions) is switched off while the results are
compared, so that float32 is compared with float32; ``test_ig_completeness_with_default_tf32``
keeps the defaults and checks what a user of a GPU gets: completeness within 1%.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from multiviz_widgets import Neuron
from multiviz_widgets.demos import easy_vqa, synthetic
from multiviz_widgets.kernels.emap import emap, emap_gap
from multiviz_widgets.kernels.dime import dime
from multiviz_widgets.kernels.interactions import interaction
from multiviz_widgets.kernels.prediction import prediction_path
from multiviz_widgets.kernels.representations import (decision_contributions, extract_features,
                                                      neuron_extremes)
from multiviz_widgets.kernels.unimodal import METHODS, attribute, attribute_batch

DEVICE = os.environ.get("MVZ_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(
    DEVICE is None, reason="no CUDA device (MVZ_TEST_DEVICE=cpu runs these against a CPU copy)")

QUESTIONS = 3          # easy-VQA test questions compared per kernel


def close(got, want, rtol: float = 1e-3, what: str = "") -> None:
    """got equals want up to rtol of want's largest magnitude (float32 on two devices)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = max(float(np.abs(want).max(initial=0.0)), 1e-6)
    err = float(np.abs(got - want).max(initial=0.0)) / scale
    assert err <= rtol, f"{what}: largest difference {err:.2e} of the largest value (> {rtol})"


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 off during a test (restored after)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="module")
def vqa():
    """(CPU adapter, device adapter, dataset, indices of a few shape or colour questions)."""
    model, meta = easy_vqa.load_model()
    cpu = easy_vqa.make_adapter(model, meta["vocab"], meta["answers"])
    dev = easy_vqa.make_adapter(copy.deepcopy(model).to(DEVICE), meta["vocab"], meta["answers"])
    dataset = easy_vqa.load_dataset("test")
    kinds = [easy_vqa.question_kind(q) for q in dataset.questions[:400]]
    indices = [i for i, k in enumerate(kinds) if k in ("shape", "color")][:QUESTIONS]
    return cpu, dev, dataset, indices


@pytest.fixture(scope="module")
def planted():
    """(CPU adapter, device adapter, test dataset) of the synthetic planted model."""
    cpu, dataset = synthetic.load("planted", split="test")
    dev = synthetic.make_adapter(copy.deepcopy(cpu.model).to(DEVICE), "planted")
    return cpu, dev, dataset


def test_the_model_runs_where_it_lives(vqa):
    cpu, dev, dataset, idx = vqa
    assert dev.device.type == torch.device(DEVICE).type
    raw_cpu, raw_dev = cpu.collate([dataset[i] for i in idx]), dev.collate([dataset[i] for i in idx])
    assert all(x.device.type == dev.device.type for x in raw_dev.values())
    close(dev.predict(raw_dev).cpu(), cpu.predict(raw_cpu), what="logits")


@pytest.mark.parametrize("method", list(METHODS))
def test_stage1_on_the_device_equals_the_cpu(vqa, method):
    cpu, dev, dataset, idx = vqa
    for i in idx:
        for target in (None, Neuron(3)):
            want = attribute(cpu, dataset[i], method, target=target)
            got = attribute(dev, dataset[i], method, target=target)
            assert got.target == want.target
            assert (got.forward_passes, got.backward_passes) == (want.forward_passes,
                                                                 want.backward_passes)
            for n in want.scores:
                close(got.scores[n], want.scores[n], what=f"{method} {n} scores")
                close(got.maps[n], want.maps[n], what=f"{method} {n} map")


@pytest.mark.parametrize("method", ["gradient", "integrated_gradients", "occlusion"])
def test_attribute_batch_on_the_device_equals_one_cpu_call_each(vqa, method):
    cpu, dev, dataset, idx = vqa
    instances = [dataset[i] for i in idx]
    got = attribute_batch(dev, instances, method)
    for inst, g in zip(instances, got):
        want = attribute(cpu, inst, method)
        assert g.target == want.target
        for n in want.scores:
            close(g.scores[n], want.scores[n], what=f"{method} {n}")


@pytest.mark.parametrize("method,params", [
    ("second_order", {"mode": "vmap"}), ("second_order", {"mode": "replicate"}),
    ("second_order", {"phi": "abs", "attribution": "grad_x_input"}),
    ("pairwise_ablation", {}),
    ("shapley", {"budget": 256, "max_players": 8}),            # exact
    ("shapley", {"budget": 1024})])                            # permutation sampling, 24 players
def test_stage2_on_the_device_equals_the_cpu(vqa, method, params):
    pytest.importorskip("shapiq") if method == "shapley" else None
    cpu, dev, dataset, idx = vqa
    for i in idx[:2]:
        want = interaction(cpu, dataset[i], method, modalities=("image", "question"), **params)
        got = interaction(dev, dataset[i], method, modalities=("image", "question"), **params)
        assert got.target == want.target
        if method == "second_order" and "mode" not in params:   # "auto": replicate on a GPU
            assert got.params.pop("mode") == ("replicate" if DEVICE == "cuda" else "vmap")
            want.params.pop("mode")
        assert got.params == want.params
        close(got.matrix, want.matrix, what=f"{method} {params}")


@pytest.mark.parametrize("factorized", [False, "declared", "traced"])
def test_emap_on_the_device_equals_the_cpu(vqa, factorized):
    cpu, dev, dataset, _ = vqa
    indices = list(range(40))
    want = emap(cpu, dataset, indices=indices, factorized=factorized)
    got = emap(dev, dataset, indices=indices, factorized=factorized)
    assert got.params["factorization"] == want.params["factorization"]
    close(got.logits, want.logits, what="logits")
    close(got.emap_logits, want.emap_logits, what="EMAP logits")


def test_emap_gap_and_dime_on_the_device_equal_the_cpu(vqa):
    cpu, dev, dataset, idx = vqa
    want, got = emap_gap(cpu, dataset, n=60, seed=1), emap_gap(dev, dataset, n=60, seed=1)
    assert abs(got["gap"] - want["gap"]) <= 1 / 60 + 1e-12      # at most one flipped argmax
    want = dime(cpu, dataset, idx[0], n_samples=120, n_reference=12)
    got = dime(dev, dataset, idx[0], n_samples=120, n_reference=12)
    close([got.f_value, got.uc_value, got.mi_value], [want.f_value, want.uc_value, want.mi_value],
          what="f, UC, MI")
    for n in want.uc:
        close(got.uc[n], want.uc[n], rtol=5e-3, what=f"DIME UC {n}")
        close(got.mi[n], want.mi[n], rtol=5e-3, what=f"DIME MI {n}")


def test_stages_3_and_4_on_the_device_equal_the_cpu(vqa):
    cpu, dev, dataset, idx = vqa
    indices = list(range(200))
    want = extract_features(cpu, dataset, indices=indices, cache=False)
    got = extract_features(dev, dataset, indices=indices, cache=False)
    close(got.h, want.h, what="decision features")
    close(got.logits, want.logits, what="logits")
    ext_want = neuron_extremes(cpu, dataset, k=4, indices=indices)
    ext_got = neuron_extremes(dev, dataset, k=4, indices=indices)
    close(ext_got.top_values, ext_want.top_values, what="top activations")
    c_want, c_got = decision_contributions(cpu, dataset[idx[0]]), decision_contributions(dev, dataset[idx[0]])
    close(c_got.contributions, c_want.contributions, what="contributions")
    p_want = prediction_path(cpu, dataset[idx[0]], k_neurons=2, unimodal_method="gradient")
    p_got = prediction_path(dev, dataset[idx[0]], k_neurons=2, unimodal_method="gradient")
    assert [n.index for n in p_got.neurons] == [n.index for n in p_want.neurons]
    close(p_got.logit, p_want.logit, what="path logit")


def test_the_planted_model_on_the_device_equals_the_cpu(planted):
    cpu, dev, dataset = planted
    inst = dataset[0]
    for method in ("integrated_gradients", "kernel_shap"):
        want, got = attribute(cpu, inst, method), attribute(dev, inst, method)
        for n in want.scores:
            close(got.scores[n], want.scores[n], what=f"planted {method} {n}")
    want = interaction(cpu, inst, "second_order")
    got = interaction(dev, inst, "second_order")
    close(got.matrix, want.matrix, what="planted second order")


def test_ig_completeness_with_default_tf32(vqa):
    """With the GPU's default settings (TF32 convolutions) IG still sums to f(x) - f(baseline)."""
    cpu, dev, dataset, idx = vqa
    torch.backends.cudnn.allow_tf32 = True
    for i in idx:
        p = dev.prepare(dataset[i])
        r = attribute(dev, p, "integrated_gradients", steps=64)
        with torch.no_grad():
            f = [float(dev.scalar(p, {n: x.unsqueeze(0) for n, x in c.items()}, r.target)[0])
                 for c in (p.continuous, p.baseline)]
        total = sum(float(s.sum()) for s in r.scores.values())
        assert abs(total - (f[0] - f[1])) <= 0.01 * abs(f[0] - f[1]) + 1e-4, (total, f)


def test_the_explorer_on_a_gpu_model_links_its_views(vqa, tmp_path, monkeypatch):
    """The whole Explorer on the device model: clicks on a token, a patch, a neuron, a class node
    and a 3D point reach the real kernels and come back as they do on the CPU."""
    pytest.importorskip("ipywidgets")
    from multiviz_widgets.explorer import Explorer
    cpu, dev, dataset, idx = vqa
    monkeypatch.setenv("MULTIVIZ_CACHE", str(tmp_path))          # decision features cached here
    ex = Explorer(dev, dataset)
    try:
        assert ex.wait(300)
        st = ex.state()
        assert st["error"] == "" and st["pair"] == ["question", "image"]
        ex.input_panel.click("question", 1)
        assert ex.wait(120)
        st = ex.state()
        assert np.allclose(st["input_scores"]["image"], np.asarray(st["heatmap"])[1])
        want = interaction(cpu, dataset[ex.selection.instance], "second_order",
                           modalities=("question", "image"))
        close(np.asarray(st["heatmap"]), want.matrix, what="Explorer heatmap")
        ex.input_panel.click("image", 27)
        assert ex.wait(120)
        assert ex.state()["error"] == ""
        ex.select(neuron=ex.neuron_view.shown[0])
        assert ex.wait(300)
        st = ex.state()
        assert st["error"] == "" and st["gallery_neuron"] == ex.neuron_view.shown[0]
        assert len(st["gallery"]) > 0 and st["path"]["nodes"]
        cls = next(n for n in st["path"]["nodes"] if n["kind"] == "class")
        ex.path_view.click_node(cls["id"])
        assert ex.wait(120) and ex.state()["error"] == ""
        ex.embedding_view.scatter.clicked_index = 5
        assert ex.wait(120)
        st = ex.state()
        assert st["error"] == "" and st["input_instance"] == int(ex.embedding_view.indices[5])
    finally:
        ex.close()


def test_a_traced_split_follows_the_model_to_the_device_and_bfloat16_is_explained_there():
    """model.to(device) after an emap on the CPU replaces the buffers the traced split read: the
    split is traced again (it kept the CPU tensors); a bfloat16 model on the device gets float32
    maps on the host."""
    from torch import nn

    from multiviz_widgets import ModelAdapter, Tabular, TimeSeries

    class Centred(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.t, self.s, self.head = nn.Linear(4, 5), nn.Linear(16, 5), nn.Linear(10, 3)
            self.register_buffer("centre", torch.full((4,), 0.25))

        def forward(self, tabular, series):
            a = torch.tanh(self.t(tabular - self.centre))
            b = torch.tanh(self.s(series.flatten(1)))
            return self.head(torch.cat([a * b, a + b], 1))

    g = torch.Generator().manual_seed(0)
    items = [{"tabular": torch.randn(4, generator=g), "series": torch.randn(8, 2, generator=g)}
             for _ in range(6)]
    model = Centred().eval()
    adapter = ModelAdapter(model, [Tabular("tabular", columns=["c0", "c1", "c2", "c3"]),
                                   TimeSeries("series", window=4, channels=["x", "y"])],
                           ["a", "b", "c"])
    on_cpu = emap(adapter, items)
    model.to(DEVICE)
    there = emap(adapter, items)
    assert there.params["factorization"] == "traced", there.params
    close(there.matrix, on_cpu.matrix, what="emap after model.to(device)")
    model.bfloat16()
    for method in ("gradient", "integrated_gradients", "occlusion"):
        r = attribute(adapter, items[0], method, target=1)
        assert r.maps["series"].dtype == np.float32 and np.isfinite(r.scores["tabular"]).all()


@pytest.mark.parametrize("dtype, tf32", [(torch.float32, False), (torch.float32, True),
                                         (torch.bfloat16, False), (torch.float16, False)])
def test_the_doctor_passes_the_shipped_model_on_the_device_in_every_precision(dtype, tf32):
    """A GPU may sum a batch of two in another order than two batches of one (another
    convolution algorithm): in bfloat16, or in float32 with cuDNN's TF32 (on by default), that
    is a few roundoffs, not batch dependence."""
    from multiviz_widgets.doctor import check
    torch.backends.cudnn.allow_tf32 = tf32          # (the fixture restores it)
    model, meta = easy_vqa.load_model()
    adapter = easy_vqa.make_adapter(copy.deepcopy(model).to(DEVICE, dtype), meta["vocab"],
                                    meta["answers"])
    dataset = easy_vqa.load_dataset("test")
    report = check(adapter, dataset[0])
    assert report.ok and all(report.stages.values()), str(report)
