"""Every stage-1 and stage-2 method accepts a decision-layer neuron as its target.

Two hand-built models (tabular + time series, image + text) have decision-level neurons that each
read known units of each modality:

* neuron 0 = 2 a[u0] + 2 b[v0]          (additive: no interaction),
* neuron 1 = 2 a[u1] * b[v1]            (a product: the one interacting pair is (u1, v1)),
* neuron 2 = a[u2] * b[v2]              (another product).

The class logits are dominated by neurons 0 and 1, so a method that ignored the neuron target and
explained the class would point at the wrong units for neuron 2.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from multiviz_widgets import (Image, ModelAdapter, MultimodalDataset, Neuron, Tabular, Text,
                              TimeSeries)

from multiviz_widgets.kernels import interactions, unimodal  # noqa: E402

STEPS, WINDOW, CH = 16, 4, 2


def _classifier():
    head = nn.Linear(3, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[3.0, 0.0, 0.1], [0.0, 3.0, 0.1]]))
        head.bias.zero_()
    return head


class TabSeriesNeurons(nn.Module):
    """a = tabular columns, b = series units (window w, channel c) -> unit w * CH + c."""

    UNITS = {0: (0, 3 * CH + 1), 1: (1, 0 * CH + 1), 2: (2, 1 * CH + 0)}

    def __init__(self):
        super().__init__()
        self.classifier = _classifier()

    def forward(self, tab, series):
        s = series.reshape(series.shape[0], STEPS // WINDOW, WINDOW, CH).mean(2)   # [B, W, CH]
        u = s.reshape(series.shape[0], -1)                                        # [B, units]
        (a0, b0), (a1, b1), (a2, b2) = (self.UNITS[j] for j in range(3))
        h = torch.stack([2 * tab[:, a0] + 2 * u[:, b0], 2 * tab[:, a1] * u[:, b1],
                         tab[:, a2] * u[:, b2]], 1)
        return self.classifier(h)


def tab_series_case():
    adapter = ModelAdapter(TabSeriesNeurons().eval(),
                           [Tabular("tab", columns=["c0", "c1", "c2", "c3"]),
                            TimeSeries("series", window=WINDOW, channels=["x", "y"])],
                           ["first", "second"], decision_layer="classifier")
    rng = np.random.default_rng(0)
    tab = np.array([1.5, 1.2, 2.0, 0.3], dtype=np.float32)
    units = rng.uniform(0.2, 0.4, size=(STEPS // WINDOW, CH)).astype(np.float32)
    for j, (_, v) in TabSeriesNeurons.UNITS.items():
        units[v // CH, v % CH] = 1.5
    series = np.repeat(units, WINDOW, axis=0)
    return adapter, {"tab": tab, "series": series}, TabSeriesNeurons.UNITS


VOCAB = ["[PAD]", "[UNK]", "what", "color", "is", "the", "shape", "red", "circle"]


class ImageTextNeurons(nn.Module):
    """a = image patches (8x8 on 16x16 -> 4 patches), b = tokens (positions)."""

    UNITS = {0: (0, 3), 1: (3, 1), 2: (1, 2)}

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(len(VOCAB), 1, padding_idx=0)
        with torch.no_grad():
            self.embedding.weight.copy_(torch.linspace(0.5, 1.5, len(VOCAB))[:, None])
            self.embedding.weight[0] = 0.0
        self.classifier = _classifier()

    def forward(self, image, question):
        p = image.mean(1).reshape(image.shape[0], 2, 8, 2, 8).mean((2, 4)).reshape(-1, 4)
        t = self.embedding(question)[..., 0]                          # [B, T]
        (a0, b0), (a1, b1), (a2, b2) = (self.UNITS[j] for j in range(3))
        h = torch.stack([2 * p[:, a0] + 2 * t[:, b0], 2 * p[:, a1] * t[:, b1],
                         p[:, a2] * t[:, b2]], 1)
        return self.classifier(h)


def image_text_case():
    adapter = ModelAdapter(ImageTextNeurons().eval(),
                           [Image("image", patch=8), Text("question", VOCAB)],
                           ["first", "second"], decision_layer="classifier")
    img = np.full((16, 16, 3), 0.3, dtype=np.float32)
    for a, _ in ImageTextNeurons.UNITS.values():
        r, c = divmod(a, 2)
        img[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = 1.0
    return adapter, {"image": img, "question": "what color is the shape"}, ImageTextNeurons.UNITS


CASES = {"tabular+series": tab_series_case, "image+text": image_text_case}
FAST = {"integrated_gradients": {"steps": 32}, "lime": {"n_samples": 400},
        "kernel_shap": {"n_samples": 400}}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    return CASES[request.param]()


@pytest.mark.parametrize("method", list(unimodal.METHODS))
def test_every_stage1_method_finds_the_units_a_neuron_reads(case, method):
    adapter, inst, units = case
    a, b = adapter.names
    for j, (ua, ub) in units.items():
        att = unimodal.attribute(adapter, inst, method, target=Neuron(j), **FAST.get(method, {}))
        assert att.target == Neuron(j)
        top_a = int(np.argmax(np.abs(att.scores[a])))
        top_b = int(np.argmax(np.abs(att.scores[b])))
        assert (top_a, top_b) == (ua, ub), (method, j, att.scores)


@pytest.mark.parametrize("method", list(interactions.INTERACTION_METHODS))
def test_every_stage2_method_finds_the_pair_a_neuron_reads(case, method):
    adapter, inst, units = case
    for j in (1, 2):                      # the product neurons
        inter = interactions.interaction(adapter, inst, method, target=Neuron(j))
        assert inter.target == Neuron(j)
        u, v, value = inter.top_pairs(1)[0]
        assert (u, v) == units[j], (method, j, inter.matrix)
        assert abs(value) > 1e-3
    # the additive neuron has no interaction at all
    inter = interactions.interaction(adapter, inst, method, target=Neuron(0))
    assert np.abs(inter.matrix).max() < 1e-4, (method, inter.matrix)


def test_a_neuron_out_of_range_is_a_clear_error(case):
    adapter, inst, _ = case
    with pytest.raises(Exception, match="out of range"):
        unimodal.attribute(adapter, inst, "gradient", target=Neuron(7))
    with pytest.raises(Exception, match="out of range"):
        interactions.interaction(adapter, inst, "pairwise_ablation", target=Neuron(7))


def _reference_set(case, n=24, seed=0):
    """Variations of the case's instance: every unit is rescaled at random (units stay units)."""
    adapter, inst, _ = case
    rng = np.random.default_rng(seed)
    cols = {name: [] for name in adapter.names}
    texts = ["what color is the shape", "what shape is red circle", "red circle the shape is",
             "the shape color what red"]
    for i in range(n):
        for name, value in inst.items():
            if isinstance(value, str):
                cols[name].append(texts[i % len(texts)])
            else:                               # (pixels stay in [0, 1])
                top = 1.0 if name == "image" else 1.7
                cols[name].append((np.asarray(value) * rng.uniform(0.3, top, size=np.shape(value)))
                                  .astype(np.float32))
    return MultimodalDataset(cols)


def test_emap_with_a_neuron_target_separates_additive_and_product_neurons(case):
    adapter, _, _ = case
    ds = _reference_set(case)
    additive = interactions.emap(adapter, ds, target=Neuron(0))
    np.testing.assert_allclose(additive.emap_logits, additive.logits, atol=1e-4)
    product = interactions.emap(adapter, ds, target=Neuron(2))
    gap = np.abs(product.logits - product.emap_logits).max()
    assert gap > 1e-3 and product.logits.shape == (len(ds), 1)


def test_dime_with_a_neuron_target_puts_the_product_in_mi(case):
    adapter, inst, units = case
    ds = _reference_set(case)
    a, b = adapter.names
    res = interactions.dime(adapter, ds, inst, target=Neuron(2), n_samples=400, n_reference=16)
    assert res.target == Neuron(2)
    ua, ub = units[2]
    assert int(np.argmax(np.abs(res.mi[a]))) == ua and int(np.argmax(np.abs(res.mi[b]))) == ub
    add = interactions.dime(adapter, ds, inst, target=Neuron(0), n_samples=400, n_reference=16)
    u0, v0 = units[0]
    assert int(np.argmax(np.abs(add.uc[a]))) == u0 and int(np.argmax(np.abs(add.uc[b]))) == v0
    assert abs(add.mi_value) < 1e-4
