"""Stage-2 results that say what they cannot show: second-order gradients of a piecewise-linear
(ReLU) model, which are 0 whether or not the modalities interact, and the pairs that sampled
Shapley interactions never estimated, which are 0 without being measured."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from multiviz_widgets import ModelAdapter, Tabular, TimeSeries
from multiviz_widgets.kernels.interactions import interaction

from .test_interactions import _seeded


def _modalities(steps=4):
    # tabular: 6 units; series: `steps` steps / window 1 x 1 channel = `steps` units
    return [Tabular("tabular", columns=[f"c{i}" for i in range(6)]),
            TimeSeries("series", window=1, channels=["x"])]


def _instance(steps=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"tabular": torch.randn(6, generator=g), "series": torch.randn(steps, 1, generator=g)}


class ReluFusion(nn.Module):
    """Concatenation, then a ReLU MLP: the commonest fusion head. Its modalities interact (the
    ReLUs switch with both), yet its second derivatives are 0 almost everywhere."""

    def __init__(self):
        super().__init__()
        self.fuse = nn.Sequential(nn.Linear(6 + 4, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        self.head = nn.Linear(16, 2)
        _seeded(self, 0)

    def forward(self, tabular, series):
        return self.head(self.fuse(torch.cat([tabular, series.flatten(1)], 1)))


class LateFusion(nn.Module):
    """f = W [g(tabular); h(series)] + b with smooth encoders: no interaction at all."""

    def __init__(self):
        super().__init__()
        self.t, self.s = nn.Linear(6, 5), nn.Linear(4, 5)
        self.head = nn.Linear(10, 2)
        _seeded(self, 1)

    def forward(self, tabular, series):
        return self.head(torch.cat([torch.tanh(self.t(tabular)),
                                    torch.tanh(self.s(series.flatten(1)))], 1))


# ---------------------------------------------------------------------------------------------
# second-order gradients of a piecewise-linear model
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["vmap", "replicate"])
@pytest.mark.parametrize("phi, contracted", [("identity", "series"), ("abs", "tabular")])
def test_second_order_of_a_relu_model_says_it_cannot_see_interactions(mode, phi, contracted):
    """The matrix of a ReLU fusion MLP is exactly 0 while pairwise ablation finds the
    interaction: the result says why, and what to use instead, and counts the pass that tells
    it from a model without interactions."""
    adapter = ModelAdapter(ReluFusion(), _modalities(), ["no", "yes"], decision_layer="head")
    sog = interaction(adapter, _instance(), "second_order", target=1, mode=mode, phi=phi)
    assert np.all(sog.matrix == 0)
    assert np.abs(interaction(adapter, _instance(), "pairwise_ablation",
                              target=1).matrix).max() > 1e-3
    note = sog.params["note"]
    assert "piecewise linear" in note and f"{contracted!r}" in note
    assert "pairwise ablation" in note and "Shapley" in note
    # the contracted side's U units: vmap runs 1 forward and 1 + U backwards, + 1 to read the
    # side's own second derivatives on the graph kept; replicate U forwards and 2 U backwards,
    # + one forward and two backwards of the instance
    u = {"series": 4, "tabular": 6}[sog.params["contracted"]]
    assert sog.params["contracted"] == contracted
    assert (sog.forward_passes, sog.backward_passes) == ((1, 1 + u + 1) if mode == "vmap" else
                                                         (u + 1, 2 * u + 2))


@pytest.mark.parametrize("mode", ["vmap", "replicate"])
def test_second_order_of_modalities_that_do_not_interact_is_zero_without_a_note(mode):
    """Late fusion with smooth encoders: the zeros are the answer (no interaction), not a blind
    spot, as the side's own second derivatives show."""
    adapter = ModelAdapter(LateFusion(), _modalities(), ["no", "yes"], decision_layer="head")
    sog = interaction(adapter, _instance(), "second_order", target=1, mode=mode)
    assert np.all(sog.matrix == 0)
    assert "note" not in sog.params


def test_second_order_of_an_interacting_smooth_model_has_no_note_and_no_extra_pass():
    """A GELU fusion MLP: a matrix that is not 0, no note, and the cost of the method alone."""
    model = ReluFusion()
    model.fuse[1], model.fuse[3] = nn.GELU(), nn.GELU()
    adapter = ModelAdapter(model, _modalities(), ["no", "yes"], decision_layer="head")
    sog = interaction(adapter, _instance(), "second_order", target=1, mode="vmap")
    assert np.abs(sog.matrix).max() > 1e-4 and "note" not in sog.params
    assert (sog.forward_passes, sog.backward_passes) == (1, 1 + 4)


# ---------------------------------------------------------------------------------------------
# pairs that sampled Shapley interactions did not estimate
# ---------------------------------------------------------------------------------------------
#: W[u, v]: the interaction of tabular unit u with series unit v in ``Bilinear``
W = torch.tensor(np.random.default_rng(0).choice([-1.0, 1.0], (6, 12))
                 * np.random.default_rng(1).uniform(1.0, 2.0, (6, 12)), dtype=torch.float32)


class ScalarHead(nn.Module):
    """Two logits: 0 and ``scalar(tabular, series)`` [B, 1], through a decision layer ``head``
    (a model with a known closed form, for tests)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[0.0], [1.0]]))
            self.head.bias.zero_()

    def forward(self, tabular, series):
        return self.head(self.scalar(tabular, series))


class Bilinear(ScalarHead):
    """logit 1 = t' W s on an instance of ones (baselines 0): every coalition's discrete
    derivative of the pair (u, v) is W[u, v], so its Shapley interaction is W[u, v] and every
    permutation that visits the pair measures it exactly."""

    def scalar(self, tabular, series):
        return ((tabular @ W) * series.flatten(1)).sum(1, keepdim=True)


def _bilinear():
    adapter = ModelAdapter(Bilinear(), _modalities(12), ["no", "yes"], decision_layer="head")
    return adapter, {"tabular": torch.ones(6), "series": torch.ones(12, 1)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_k_sii_estimates_every_pair_within_its_reported_noise(seed):
    """18 players and 2,048 coalitions: KernelSHAPIQ (a regression on every coalition) estimates
    every pair, where permutation sampling, visiting a pair only when its two players are
    adjacent, left some pairs at 0 unestimated and missed the index by about a third. The matrix
    is close to the index, within the noise it reports, and the modalities the other way round
    give its transpose."""
    adapter, inst = _bilinear()
    r = interaction(adapter, inst, "shapley", target=1, max_players=None, budget=2048, seed=seed)
    assert r.params["approximator"] == "KernelSHAPIQ" and not r.params["exact"]
    assert r.params["coalitions"] == 2048 and (r.matrix != 0).all()
    error = np.linalg.norm(r.matrix - W.numpy()) / np.linalg.norm(W.numpy())
    noise = r.params["relative_noise"]
    assert error < 0.1 and 0 < noise < 0.1
    assert error < 2 * noise                                  # the noise says how far it is
    swapped = interaction(adapter, inst, "shapley", modalities=("series", "tabular"), target=1,
                          max_players=None, budget=2048, seed=seed)
    np.testing.assert_array_equal(swapped.matrix, r.matrix.T)
    assert swapped.params["relative_noise"] == noise


def test_every_pair_is_estimated_by_stii_and_by_a_large_sample():
    """STII's permutation sampling uses every permutation for every pair, and a large budget
    estimates the index closely."""
    adapter, inst = _bilinear()
    stii = interaction(adapter, inst, "shapley", target=1, index="STII", max_players=None,
                       budget=2048)
    assert stii.params["approximator"] == "PermutationSamplingSTII"
    assert (stii.matrix != 0).all()
    large = interaction(adapter, inst, "shapley", target=1, max_players=None, budget=16384)
    assert (large.matrix != 0).all()
    assert np.linalg.norm(large.matrix - W.numpy()) < 0.01 * np.linalg.norm(W.numpy())


def test_the_prediction_path_of_a_relu_model_takes_its_pairs_from_pairwise_ablation():
    """Its second-order matrix is all 0, so the path's pairs were three arbitrary cells of 0:
    they come from pairwise ablation instead, and the path says for which neurons."""
    from multiviz_widgets.kernels.prediction import prediction_path
    adapter = ModelAdapter(ReluFusion(), _modalities(), ["a", "b"], decision_layer="head")
    path = prediction_path(adapter, _instance(), k_neurons=2, k_pairs=2)
    assert path.neurons and path.params["pairs_by_ablation"] == [n.index for n in path.neurons]
    ablation = interaction(adapter, _instance(), "pairwise_ablation", target=("neuron",
                                                                            path.neurons[0].index))
    u, v, x = ablation.top_pairs(1)[0]
    assert path.neurons[0].pairs[0][:2] == (u, v) and path.neurons[0].pairs[0][4] == x
    assert all(p[4] != 0 for n in path.neurons for p in n.pairs)
    assert path.to_dict()["params"]["pairs_by_ablation"] == path.params["pairs_by_ablation"]
    # a smooth model keeps its second-order pairs
    smooth = ModelAdapter(LateFusion(), _modalities(), ["a", "b"], decision_layer="head")
    assert prediction_path(smooth, _instance(), k_neurons=2).params["pairs_by_ablation"] == []


def test_the_paths_stand_in_ablation_takes_its_own_parameters(monkeypatch):
    """Where second-order gradients are blind, the path's pairs come from pairwise ablation,
    which took only its candidates: Explorer(method_params={"pairwise_ablation": ...}) (a
    batch size for a large model, say) never reached it. ablation_params= gives them, the
    Explorer passes its method_params' own, and a wrong type says what to pass."""
    from multiviz_widgets import MultimodalDataset
    from multiviz_widgets.explorer import Explorer
    from multiviz_widgets.kernels import interactions, prediction
    adapter = ModelAdapter(ReluFusion(), _modalities(), ["a", "b"], decision_layer="head")
    seen = []
    real = interactions.interaction

    def spy(*args, **kw):
        seen.append((args[2], kw))
        return real(*args, **kw)
    monkeypatch.setattr(interactions, "interaction", spy)
    path = prediction.prediction_path(adapter, _instance(), k_neurons=1, k_pairs=1,
                                      ablation_params={"batch_size": 3})
    assert path.params["pairs_by_ablation"] == [path.neurons[0].index]
    assert [kw.get("batch_size") for m, kw in seen if m == "pairwise_ablation"] == [3]
    with pytest.raises(TypeError, match="ablation_params must be a dict of pairwise_ablation"):
        prediction.prediction_path(adapter, _instance(), ablation_params=[3])
    items = [_instance(seed=s) for s in range(4)]
    ds = MultimodalDataset({k: [it[k] for it in items] for k in items[0]})
    ex = Explorer(adapter, ds, delay=0.05,
                  method_params={"pairwise_ablation": {"batch_size": 5}})
    try:
        assert ex.wait(120)
        assert ex.analyses.path_params["ablation_params"] == {"batch_size": 5}
        assert ex.path_view.path["params"]["pairs_by_ablation"]
        assert 5 in [kw.get("batch_size") for m, kw in seen if m == "pairwise_ablation"]
    finally:
        ex.close()


@pytest.mark.parametrize("candidates", [None, 2])
def test_the_path_view_says_which_neurons_pairs_come_from_pairwise_ablation(candidates,
                                                                            monkeypatch):
    """...and, when its ablation looked among each side's strongest units only (more units
    than PATH_ABLATION_UNITS), among how many."""
    from multiviz_widgets import MultimodalDataset
    from multiviz_widgets.explorer import Explorer
    from multiviz_widgets.kernels import prediction
    if candidates:
        monkeypatch.setattr(prediction, "PATH_ABLATION_UNITS", candidates)
    adapter = ModelAdapter(ReluFusion(), _modalities(), ["a", "b"], decision_layer="head")
    items = [_instance(seed=s) for s in range(6)]
    ds = MultimodalDataset({k: [it[k] for it in items] for k in items[0]})
    ex = Explorer(adapter, ds, delay=0.05)
    try:
        assert ex.wait(120)
        path = ex.path_view.path
        ablated = path["params"]["pairs_by_ablation"]
        assert ablated, path["params"]
        cap = ex.path_view.caption.value
        assert (f"the pairs of {', '.join(f'h{j}' for j in ablated)} come from pairwise "
                "ablation: second-order gradients cannot see their interactions here") in cap, cap
        narrowed = path["params"].get("ablation_candidates")
        if candidates:
            assert narrowed and set(narrowed.values()) == {2}, path["params"]
            said = ", ".join(f"2 units of '{m}'" for m in narrowed)
            assert f"pairwise ablation looked for the pairs among the {said} of largest" in cap
        else:
            assert narrowed is None and "looked for the pairs among" not in cap
    finally:
        ex.close()


def test_a_smooth_half_precision_model_gets_no_blind_note():
    """The rounding threshold was 16 epsilons of the model's dtype: in bfloat16 (0.125) a GELU
    late-fusion model's own curvature of 5% passed for rounding, and its correct zero matrix
    was said to hide interactions."""
    from multiviz_widgets.demos import synthetic
    adapter, ds = synthetic.load("additive")
    adapter.model.to(torch.bfloat16)
    for i in range(8):
        r = interaction(adapter, ds[i], "second_order")
        assert "note" not in r.params, (i, r.params.get("note"))


def test_the_path_view_says_a_side_was_searched_whole(monkeypatch):
    """The path's stage 1 restricted to one modality: the other's ablation cannot be narrowed,
    and the caption says that search was every unit."""
    from multiviz_widgets import MultimodalDataset
    from multiviz_widgets.explorer import Explorer
    from multiviz_widgets.kernels import prediction
    monkeypatch.setattr(prediction, "PATH_ABLATION_UNITS", 2)
    adapter = ModelAdapter(ReluFusion(), _modalities(), ["a", "b"], decision_layer="head")
    first, second = adapter.names[:2]
    items = [_instance(seed=s) for s in range(4)]
    ds = MultimodalDataset({k: [it[k] for it in items] for k in items[0]})
    ex = Explorer(adapter, ds, delay=0.05, path_params={
        "interaction_method": "pairwise_ablation", "modalities": (first, second),
        "unimodal_params": {"modalities": [first]}})
    try:
        assert ex.wait(120)
        path = ex.path_view.path
        assert path["params"]["ablation_whole"] == [second], path["params"]
        cap = ex.path_view.caption.value
        assert f"pairwise ablation tried every unit of '{second}' (the path's stage-1 method " \
               "explains other modalities only" in cap, cap
    finally:
        ex.close()
