"""Faithfulness metrics: relevance mass / rank accuracy and deletion / insertion AUC."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from multiviz_widgets import Image, ModelAdapter, Tabular
from multiviz_widgets.kernels.metrics import (
    aopc, curve_auc, deletion_insertion, deletion_masks, insertion_masks, pixel_relevance,
    relevance_mass, relevance_rank)


def square_mask(h=32, w=32, r0=8, r1=20, c0=4, c1=16):
    gt = np.zeros((h, w), bool)
    gt[r0:r1, c0:c1] = True
    return gt


def test_perfect_map_scores_one_and_inverse_map_zero():
    gt = square_mask()
    assert relevance_mass(gt.astype(float), gt) == 1.0
    assert relevance_rank(gt.astype(float) * 3, gt) == 1.0
    assert relevance_mass((~gt).astype(float), gt) == 0.0
    assert relevance_rank((~gt).astype(float), gt) == 0.0


def test_random_map_scores_about_the_mask_share():
    gt = square_mask(64, 64, 10, 40, 5, 30)
    share = gt.mean()
    rng = np.random.default_rng(0)
    mass = [relevance_mass(rng.random(gt.shape), gt) for _ in range(50)]
    rank = [relevance_rank(rng.random(gt.shape), gt) for _ in range(50)]
    assert abs(np.mean(mass) - share) < 0.01
    assert abs(np.mean(rank) - share) < 0.02


def test_constant_map_ties_count_by_expectation():
    gt = square_mask()
    assert relevance_rank(np.ones(gt.shape), gt) == pytest.approx(gt.mean())
    assert relevance_mass(np.zeros(gt.shape), gt) == pytest.approx(gt.mean())
    # a map constant on 8x8 patches, half of one patch inside the mask
    r = np.zeros((16, 16))
    r[:8, :8] = 1.0
    g = np.zeros((16, 16), bool)
    g[:8, :4] = True                 # K = 32 pixels, the top-32 is a random half of the patch
    assert relevance_rank(r, g) == pytest.approx(0.5)
    assert relevance_mass(r, g) == pytest.approx(0.5)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), h=st.integers(2, 12), w=st.integers(2, 12))
def test_metrics_lie_in_unit_interval(seed, h, w):
    rng = np.random.default_rng(seed)
    gt = rng.random((h, w)) < 0.4
    gt.flat[0] = True
    r = np.round(rng.random((h, w)) * 3) * (rng.random((h, w)) < 0.7)   # many ties and zeros
    for v in (relevance_mass(r, gt), relevance_rank(r, gt)):
        assert -1e-12 <= v <= 1 + 1e-12
    # adding relevance inside the mask never lowers the mass
    assert relevance_mass(r + gt, gt) >= relevance_mass(r, gt) - 1e-12


def test_pixel_relevance_pooling():
    m = np.array([[1.0, -2.0], [0.0, 3.0]])
    np.testing.assert_array_equal(pixel_relevance(m, "clip"), [[1, 0], [0, 3]])
    np.testing.assert_array_equal(pixel_relevance(m, "abs"), [[1, 2], [0, 3]])
    with pytest.raises(ValueError, match="pooling"):
        pixel_relevance(m, "square")


def test_metric_errors():
    gt = square_mask()
    with pytest.raises(ValueError, match="shape"):
        relevance_mass(np.ones((4, 4)), gt)
    with pytest.raises(ValueError, match="non-negative"):
        relevance_rank(-np.ones(gt.shape), gt)
    with pytest.raises(ValueError, match="empty"):
        relevance_mass(np.ones(gt.shape), np.zeros(gt.shape, bool))
    with pytest.raises(ValueError, match="two points"):
        curve_auc([1.0])


def test_deletion_and_insertion_masks_follow_the_order():
    s = np.array([0.1, 5.0, -1.0, 2.0])
    d = deletion_masks(s).numpy()
    assert d.shape == (5, 4)
    np.testing.assert_array_equal(d[0], [1, 1, 1, 1])
    np.testing.assert_array_equal(d[1], [1, 0, 1, 1])
    np.testing.assert_array_equal(d[2], [1, 0, 1, 0])
    np.testing.assert_array_equal(d[4], [0, 0, 0, 0])
    np.testing.assert_array_equal(insertion_masks(s).numpy(), 1 - d)
    assert curve_auc([1, 1, 1]) == 1.0 and curve_auc([1, 0]) == 0.5


class Additive(nn.Module):
    """logit_0 = sum of the 4 tabular features; logit_1 = 0."""

    def __init__(self):
        super().__init__()
        self.out = nn.Linear(4, 2)
        with torch.no_grad():
            self.out.weight.copy_(torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 0]]))
            self.out.bias.zero_()

    def forward(self, x):
        return self.out(x)


def test_deletion_insertion_on_a_known_model():
    adapter = ModelAdapter(Additive().eval(), [Tabular("x", columns=list("abcd"))], ["pos", "neg"])
    p = adapter.prepare({"x": np.array([3.0, 0.0, 1.0, 0.0], np.float32)})
    good = np.array([3.0, 0.0, 1.0, 0.0])
    d_good, i_good, dc, ic = deletion_insertion(adapter, p, "x", good, 0)
    d_bad, i_bad, _, _ = deletion_insertion(adapter, p, "x", -good, 0)
    sig = lambda v: 1 / (1 + np.exp(-v))
    np.testing.assert_allclose(dc, sig(np.array([4, 1, 0, 0, 0.0])), rtol=1e-6)
    np.testing.assert_allclose(ic, sig(np.array([0, 3, 4, 4, 4.0])), rtol=1e-6)
    assert d_good < d_bad and i_good > i_bad
    # AOPC: the mean fall from p_0 along the deletion curve; the good order falls faster
    _, _, bad_curve, _ = deletion_insertion(adapter, p, "x", -good, 0)
    assert aopc(dc) == pytest.approx(np.mean(sig(4.0) - sig(np.array([4, 1, 0, 0, 0.0]))))
    assert aopc(dc) > aopc(bad_curve)
    with pytest.raises(ValueError, match="Unknown modality"):
        deletion_insertion(adapter, p, "y", good, 0)
    with pytest.raises(ValueError, match="scores given"):
        deletion_insertion(adapter, p, "x", good[:3], 0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=2, max_size=70))
def test_aopc_is_the_mean_fall_and_zero_for_a_flat_curve(curve):
    c = np.array(curve)
    assert aopc(c) == pytest.approx(float(np.mean(c[0] - c)))
    assert aopc(np.full(len(c), c[0])) == 0.0
    assert -1.0 <= aopc(c) <= 1.0
    with pytest.raises(ValueError, match="at least two points"):
        aopc(c[:1])


def test_deletion_keeps_other_modalities_intact():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(2, 2)

        def forward(self, image, x):
            return self.out(torch.stack([image.mean((1, 2, 3)), x.sum(1)], 1))

    adapter = ModelAdapter(Two().eval(), [Image("image", patch=2), Tabular("x", columns=["a"])],
                           ["p", "q"])
    p = adapter.prepare({"image": np.ones((4, 4, 3), np.uint8) * 255, "x": np.array([2.0], np.float32)})
    _, _, dc, ic = deletion_insertion(adapter, p, "image", np.arange(4.0), 1)
    assert len(dc) == 5 and len(ic) == 5
    assert dc[-1] == pytest.approx(ic[0]) and dc[0] == pytest.approx(ic[-1])


class LogOfColumns(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(4, 2)

    def forward(self, tab):
        return self.head(torch.log(tab))          # not finite at the zero baseline


def test_deletion_insertion_refuses_a_curve_that_is_not_finite_and_says_where():
    """The other kernels refuse a model that is not finite at their masked inputs; this one
    returned NaN AUCs and curves."""
    adapter = ModelAdapter(LogOfColumns().eval(), [Tabular("tab", columns=list("abcd"))],
                           ["no", "yes"])
    x = {"tab": np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)}
    with pytest.raises(ValueError, match=r"probability of class 'yes' is nan on the deletion "
                                         r"curve, with the 1 highest-scored units of 'tab' at "
                                         r"their baseline.*Choose another baseline"):
        deletion_insertion(adapter, x, "tab", [4.0, 3.0, 2.0, 1.0], 1)
    ones = ModelAdapter(LogOfColumns().eval(), [Tabular("tab", columns=list("abcd"),
                                                        baseline=np.ones(4, np.float32))],
                        ["no", "yes"])
    d, i, dc, ic = deletion_insertion(ones, x, "tab", [4.0, 3.0, 2.0, 1.0], 1)
    assert np.isfinite([d, i]).all() and np.isfinite(dc).all() and np.isfinite(ic).all()


def test_every_public_metric_is_exported():
    """aopc, used by the faithfulness benchmark, was missing from __all__."""
    import multiviz_widgets.kernels.metrics as metrics
    public = {n for n, v in vars(metrics).items() if callable(v) and not n.startswith("_")
              and getattr(v, "__module__", None) == metrics.__name__}
    assert public == set(metrics.__all__)
