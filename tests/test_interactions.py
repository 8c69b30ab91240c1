"""Stage 2 kernels: the checks of METHODS.md (additive twin, planted pair, EMAP, DIME) and the
properties that pin each method to its definition on small hand-built models."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from multiviz_widgets import (MultimodalDataset, ModelAdapter, Neuron, Tabular, Text,
                              TimeSeries)
from multiviz_widgets.demos import synthetic
from multiviz_widgets.kernels.common import evaluate_masks, resolve_target
from multiviz_widgets.kernels.interactions import (
    INTERACTION_METHODS, dime, emap, emap_gap, emap_matrix, interaction,
    interaction_type, interaction_types, pairwise_masks)
from multiviz_widgets.progress import Cancelled

VOCAB = ["[PAD]", "[UNK]", "what", "shape", "is", "the", "red", "circle"]


# ---------------------------------------------------------------------------------------------
# small models
# ---------------------------------------------------------------------------------------------
def _seeded(module: nn.Module, seed: int, scale: float = 0.6) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


class TinyFusion(nn.Module):
    """tabular [4] + series [8, 2] (4 units each), smooth, with a multiplicative fusion."""

    def __init__(self, seed=0, additive=False):
        super().__init__()
        self.additive = additive
        self.t = nn.Linear(4, 5)
        self.s = nn.Linear(16, 5)
        self.fuse = nn.Linear(10, 6)
        self.head = nn.Linear(6, 3)
        _seeded(self, seed)

    def forward(self, tabular, series):
        a = torch.tanh(self.t(tabular))
        b = torch.tanh(self.s(series.flatten(1)))
        if self.additive:
            return self.head(torch.cat([a, b], 1))
        return self.head(torch.tanh(self.fuse(torch.cat([a * b, a + b], 1))))


def tiny_adapter(seed=0, additive=False):
    mods = [Tabular("tabular", columns=["c0", "c1", "c2", "c3"]),
            TimeSeries("series", window=4, channels=["x", "y"])]
    return ModelAdapter(TinyFusion(seed, additive), mods, ["k0", "k1", "k2"])


def tiny_instance(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"tabular": torch.randn(4, generator=g), "series": torch.randn(8, 2, generator=g)}


class TextTab(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        self.emb = nn.Embedding(len(VOCAB), 3)
        self.q = nn.Linear(3, 4)
        self.t = nn.Linear(2, 4)
        self.head = nn.Linear(4, 2)
        _seeded(self, seed)

    def forward(self, question, tabular):
        e = self.emb(question)                                   # [B, T, 3]
        q = torch.tanh(self.q(e)).sum(1)
        return self.head(torch.tanh(q * torch.tanh(self.t(tabular)) + q))


def text_adapter(seed=0):
    return ModelAdapter(TextTab(seed), [Text("question", vocab=VOCAB),
                                        Tabular("tabular", columns=["u", "v"])], ["no", "yes"])


def dense_sog(adapter, prepared, a, b, target, weigh_a=False):
    """Reference: the full Hessian by autograd, then a double loop over unit pairs.

    weigh_a: move side a's units along (x - baseline) instead of all-ones (embedded tokens)."""
    xa, xb = prepared.continuous[a], prepared.continuous[b]

    def f(za, zb):
        return adapter.scalar(prepared, {a: za.unsqueeze(0), b: zb.unsqueeze(0)}, target)[0]

    h = torch.autograd.functional.hessian(f, (xa, xb))[0][1].reshape(xa.numel(), xb.numel())
    if weigh_a:
        h = h * (xa - prepared.baseline[a]).reshape(-1, 1)
    ia, ib = prepared.index[a].reshape(-1), prepared.index[b].reshape(-1)
    out = np.zeros((prepared.n_units[a], prepared.n_units[b]))
    for u in range(out.shape[0]):
        for v in range(out.shape[1]):
            out[u, v] = h[ia == u][:, ib == v].sum().item()
    return out, torch.autograd.functional.jacobian(f, (xa, xb))[0]


# ---------------------------------------------------------------------------------------------
# second-order gradients
# ---------------------------------------------------------------------------------------------
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), cls=st.integers(0, 2))
def test_sog_equals_dense_hessian_reference(seed, cls):
    adapter = tiny_adapter(seed % 7)
    p = adapter.prepare(tiny_instance(seed))
    t = adapter.target(cls)
    ref, _ = dense_sog(adapter, p, "tabular", "series", t)
    r = interaction(adapter, p, "second_order", target=cls)
    np.testing.assert_allclose(r.matrix, ref, rtol=1e-4, atol=1e-5)
    assert r.params["mode"] == "vmap" and r.forward_passes == 1 and r.backward_passes == 5
    # the unit attributions summed by index (as for a side of many units) give the same
    from unittest import mock
    from multiviz_widgets.kernels import interactions
    with mock.patch.object(interactions, "SMALL_INDICATOR", 0):
        by_index = interaction(adapter, p, "second_order", target=cls)
    np.testing.assert_allclose(by_index.matrix, r.matrix, rtol=1e-6, atol=1e-9)
    rep = interaction(adapter, p, "second_order", target=cls, mode="replicate")
    np.testing.assert_allclose(rep.matrix, ref, rtol=1e-4, atol=1e-5)
    assert rep.forward_passes == 4 and rep.backward_passes == 8
    # the same with rows and columns swapped, and in small chunks
    r2 = interaction(adapter, p, "second_order", modalities=("series", "tabular"), target=cls,
                     batch_size=3)
    np.testing.assert_allclose(r2.matrix, ref.T, rtol=1e-4, atol=1e-5)


def test_sog_through_the_embedding_matches_reference():
    adapter = text_adapter()
    p = adapter.prepare({"question": "what is the red circle", "tabular": [0.5, -1.0]})
    t = adapter.target(1)
    # tokens move along their own embedding (minus the [PAD] baseline) by default
    ref, _ = dense_sog(adapter, p, "question", "tabular", t, weigh_a=True)
    r = interaction(adapter, p, "second_order", target=1)
    rep = interaction(adapter, p, "second_order", target=1, mode="replicate")
    np.testing.assert_allclose(rep.matrix, ref, rtol=1e-4, atol=1e-6)
    assert r.matrix.shape == (5, 2)
    assert r.row_labels == ["what", "is", "the", "red", "circle"]
    np.testing.assert_allclose(r.matrix, ref, rtol=1e-4, atol=1e-6)
    assert np.abs(ref).max() > 1e-3
    # rows and columns swapped: the same matrix transposed
    swapped = interaction(adapter, p, "second_order", modalities=("tabular", "question"), target=1)
    np.testing.assert_allclose(swapped.matrix, ref.T, rtol=1e-4, atol=1e-6)
    # the plain indicator contraction on request
    plain_ref, _ = dense_sog(adapter, p, "question", "tabular", t)
    plain = interaction(adapter, p, "second_order", target=1, attribution="gradient")
    np.testing.assert_allclose(plain.matrix, plain_ref, rtol=1e-4, atol=1e-6)


def test_sog_rows_differ_per_token_for_a_bag_of_words_encoder():
    """Summed embeddings share one gradient; the default contraction still tells tokens apart."""
    from multiviz_widgets.demos import easy_vqa
    adapter, ds = easy_vqa.load()
    r = interaction(adapter, ds[0], "second_order", modalities=("question", "image"))
    rows = r.matrix / np.abs(r.matrix).max()
    assert r.matrix.shape[0] == len(r.row_labels) >= 4
    assert np.abs(rows[0] - rows[1]).max() > 1e-3


def test_sog_multiviz_variants_match_their_definition():
    adapter = tiny_adapter(3)
    p = adapter.prepare(tiny_instance(1))
    t = adapter.target(0)
    ref, grad_a = dense_sog(adapter, p, "tabular", "series", t)
    a_u = grad_a.numpy()                       # tabular units are single columns
    xa = (p.continuous["tabular"] - p.baseline["tabular"]).numpy()
    for mode in ("vmap", "replicate"):
        r = interaction(adapter, p, "second_order", target=0, phi="abs", mode=mode)
        assert r.params["contracted"] == "tabular"
        np.testing.assert_allclose(r.matrix, np.sign(a_u)[:, None] * ref, rtol=1e-4, atol=1e-5)
        # grad x input on side a: d/dx_b of (x_a - b_a) * df/dx_a
        r = interaction(adapter, p, "second_order", target=0, attribution="grad_x_input",
                        mode=mode)
        np.testing.assert_allclose(r.matrix, xa[:, None] * ref, rtol=1e-4, atol=1e-5)
        # ... and times_input on side b: symmetric again, the smaller side is contracted
        r2 = interaction(adapter, p, "second_order", target=0, attribution="grad_x_input",
                         times_input=True, mode=mode, modalities=("series", "tabular"))
        r1 = interaction(adapter, p, "second_order", target=0, attribution="grad_x_input",
                         times_input=True, mode=mode)
        np.testing.assert_allclose(r2.matrix, r1.matrix.T, rtol=1e-4, atol=1e-6)


def test_sog_neuron_target_and_progress():
    adapter = tiny_adapter(1)
    calls = []
    r = interaction(adapter, tiny_instance(2), "second_order", target=Neuron(2),
                    progress=lambda d, n, m: calls.append((d, n)))
    assert r.target == Neuron(2) and r.matrix.shape == (4, 4)
    assert calls and calls[-1][0] == calls[-1][1]
    with pytest.raises(Cancelled):
        interaction(adapter, tiny_instance(2), "second_order",
                    progress=lambda d, n, m: (_ for _ in ()).throw(Cancelled()))


# ---------------------------------------------------------------------------------------------
# pairwise ablation
# ---------------------------------------------------------------------------------------------
@settings(max_examples=8, deadline=None)
@given(ua=st.integers(1, 5), ub=st.integers(1, 5))
def test_pairwise_masks_remove_exactly_the_named_units(ua, ub):
    ma, mb = pairwise_masks(ua, ub)
    assert ma.shape == (1 + ua + ub + ua * ub, ua) and mb.shape[1] == ub
    assert ma[0].all() and mb[0].all()
    for u in range(ua):
        for v in range(ub):
            row = 1 + ua + ub + u * ub + v
            assert ma[row].sum() == ua - 1 and ma[row, u] == 0
            assert mb[row].sum() == ub - 1 and mb[row, v] == 0


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_pairwise_matrix_matches_its_definition(seed):
    adapter = tiny_adapter(seed % 5)
    p = adapter.prepare(tiny_instance(seed))
    t = resolve_target(adapter, p)
    r = interaction(adapter, p, "pairwise_ablation")
    assert r.forward_passes == 1 + 1 + 4 + 4 + 16

    def f(drop_a=(), drop_b=()):
        ma, mb = torch.ones(1, 4), torch.ones(1, 4)
        ma[0, list(drop_a)] = 0
        mb[0, list(drop_b)] = 0
        return float(evaluate_masks(adapter, p, {"tabular": ma, "series": mb}, t)[0])

    rng = np.random.default_rng(seed)
    for u, v in rng.integers(0, 4, size=(3, 2)):
        d = f() - f([u]) - f((), [v]) + f([u], [v])
        assert r.matrix[u, v] == pytest.approx(d, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# the additive twin: every interaction vanishes, EMAP is exact and idempotent
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def additive():
    return synthetic.load("additive")


@pytest.fixture(scope="module")
def planted():
    return synthetic.load("planted")


def _scale(adapter, instance):
    p = adapter.prepare(instance)
    return float(adapter.predict(p.raw).abs().max())


@pytest.mark.parametrize("method,params", [("second_order", {}), ("pairwise_ablation", {}),
                                           ("shapley", {"budget": 1024}),
                                           ("shapley", {"index": "STII", "budget": 2048})])
def test_additive_twin_has_no_interactions(additive, method, params):
    adapter, ds = additive
    for i in (0, 1):
        r = interaction(adapter, ds[i], method, **params)
        assert r.matrix.shape == (6, 12)
        assert np.abs(r.matrix).max() <= 1e-5 * _scale(adapter, ds[i]), (method, r.matrix)


def test_additive_twin_emap_reproduces_logits_and_is_idempotent(additive):
    adapter, ds = additive
    rows = []                          # every row through the decision layer is a forward
    hook = adapter.decision_layer.register_forward_pre_hook(
        lambda _m, inp: rows.append(inp[0].shape[0]))
    try:
        r = emap(adapter, ds, indices=range(40))
    finally:
        hook.remove()
    scale = np.abs(r.logits).max()
    np.testing.assert_allclose(r.emap_logits, r.logits, atol=1e-5 * scale)
    # the N^2 fused pairs and the split's check: 40 own pairs and 8 neighbours, fused and full
    assert r.forward_passes == 40 * 40 + 2 * (40 + 8) == sum(rows)
    assert r.matrix.shape == (40, 40, 2)
    # logits equal the model's own logits (the diagonal of the pair matrix)
    direct = adapter.predict(adapter.collate([ds[i] for i in range(40)])).double().numpy()
    np.testing.assert_allclose(r.logits, direct, atol=1e-5)
    gap = emap_gap(adapter, ds, n=60)
    assert gap["gap_predictions"] == 0.0 and abs(gap["gap_labels"]) <= 1e-9


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 7), k=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_emap_operator_is_idempotent_and_exact_on_additive_matrices(n, k, seed):
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((n, n, k))
    once = emap_matrix(m)
    np.testing.assert_allclose(emap_matrix(once), once, atol=1e-12)
    additive = rng.standard_normal((n, 1, k)) + rng.standard_normal((1, n, k))
    np.testing.assert_allclose(emap_matrix(additive), additive, atol=1e-12)


class EmapModel(nn.Module):
    """fhat of a model over a fixed reference set, as a model: to test EMAP(EMAP(f)) = EMAP(f)."""

    def __init__(self, inner, ref_tab, ref_series):
        super().__init__()
        self.inner, self.rt, self.rs = inner, ref_tab, ref_series
        self.head = nn.Linear(1, 3)           # the adapter needs a decision layer; unused

    def forward(self, tabular, series):
        n, b = len(self.rt), len(tabular)
        tb = tabular.repeat_interleave(n, 0)
        sb = series.repeat_interleave(n, 0)
        row = self.inner(tb, self.rs.repeat(b, 1, 1)).reshape(b, n, -1).mean(1)
        col = self.inner(self.rt.repeat(b, 1), sb).reshape(b, n, -1).mean(1)
        grand = self.inner(self.rt.repeat_interleave(n, 0), self.rs.repeat(n, 1, 1)).mean(0)
        return row + col - grand


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 1000))
def test_emap_of_emap_is_emap_on_a_random_model(seed):
    adapter = tiny_adapter(seed % 11)
    items = [tiny_instance(seed + i) for i in range(8)]
    r = emap(adapter, items)
    raw = adapter.collate(items)
    inner = adapter.model.double()
    fhat = EmapModel(inner, raw["tabular"].double(), raw["series"].double())
    a2 = ModelAdapter(fhat, list(adapter.modalities.values()), adapter.class_names,
                      decision_layer=fhat.head)
    items64 = [{k: v.double() for k, v in it.items()} for it in items]
    r2 = emap(a2, items64)
    np.testing.assert_allclose(r2.logits, r.emap_logits, atol=1e-5)
    np.testing.assert_allclose(r2.emap_logits, r2.logits, atol=1e-9)
    adapter.model.float()


class Additive3(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(2, 4), nn.Linear(8, 4)
        self.head = nn.Linear(12, 2)
        _seeded(self, seed)

    def forward(self, t1, t2, series):
        return self.head(torch.cat([torch.tanh(self.a(t1)), torch.tanh(self.b(t2)),
                                    torch.tanh(self.c(series.flatten(1)))], 1))


def test_emap_with_three_modalities_is_exact_on_additive_models():
    mods = [Tabular("t1", columns=["a", "b", "c"]), Tabular("t2", columns=["d", "e"]),
            TimeSeries("series", window=2, channels=["x", "y"])]
    adapter = ModelAdapter(Additive3(1), mods, ["n", "p"])
    g = torch.Generator().manual_seed(0)
    items = [{"t1": torch.randn(3, generator=g), "t2": torch.randn(2, generator=g),
              "series": torch.randn(4, 2, generator=g)} for _ in range(6)]
    r = emap(adapter, items)
    # M N^2 pairs, + each split's check, + the N instances' own outputs (no mixed reference
    # is an instance itself)
    assert r.forward_passes == 3 * 36 + 3 * 2 * (6 + 6) + 6 and r.matrix is None
    assert set(r.unimodal) == {"t1", "t2", "series"}
    assert r.params["seed"] == 0 and r.params["anova"].startswith("product of the marginals")
    # exact, not approximate: each permutation takes every instance once, whatever the seed
    for seed in (0, 1, 7):
        r = emap(adapter, items, seed=seed)
        np.testing.assert_allclose(r.emap_logits, r.logits, rtol=1e-5,
                                   atol=1e-5 * np.abs(r.logits).max())
    with pytest.raises(ValueError, match="two modalities"):     # it was silently ignored
        emap(adapter, items, keep_matrix=True)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="seed must be an integer of at least 0"):
            emap(adapter, items, seed=bad)


# -- M > 2: the product-of-marginals projection, sampled -------------------------------------
class Interacting3(nn.Module):
    """Three modalities with pairwise and three-way interactions (float64)."""

    def __init__(self, seed=0):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(2, 4), nn.Linear(8, 4)
        self.head = nn.Linear(8, 3)
        _seeded(self, seed)
        self.double()

    def forward(self, t1, t2, series):
        a, b = torch.tanh(self.a(t1)), torch.tanh(self.b(t2))
        c = torch.tanh(self.c(series.flatten(1)))
        return self.head(torch.cat([a * b + b * c, a * b * c + a + c], 1))


def three_modalities(model, n, seed=0):
    mods = [Tabular("t1", columns=["a", "b", "c"]), Tabular("t2", columns=["d", "e"]),
            TimeSeries("series", window=2, channels=["x", "y"])]
    g = torch.Generator().manual_seed(seed)
    items = [{"t1": torch.randn(3, generator=g, dtype=torch.float64),
              "t2": torch.randn(2, generator=g, dtype=torch.float64),
              "series": torch.randn(4, 2, generator=g, dtype=torch.float64)} for _ in range(n)]
    return ModelAdapter(model, mods, ["k0", "k1", "k2"]), items


@torch.no_grad()
def product_projection(adapter, items) -> np.ndarray:
    """The exact first-order functional-ANOVA projection under the product of the three
    marginals, by brute force over all N^3 combinations: f0 + sum_m (E[f | x_m] - f0)."""
    n, names = len(items), adapter.names
    raw = adapter.collate(items)
    k = torch.arange(n)
    i1, i2, i3 = torch.meshgrid(k, k, k, indexing="ij")
    grid = adapter.forward({names[0]: raw[names[0]][i1.reshape(-1)],
                            names[1]: raw[names[1]][i2.reshape(-1)],
                            names[2]: raw[names[2]][i3.reshape(-1)]}).double().numpy()
    t = grid.reshape(n, n, n, -1)
    f0 = t.mean((0, 1, 2))
    return f0 + (t.mean((1, 2)) - f0) + (t.mean((0, 2)) - f0) + (t.mean((0, 1)) - f0)


def test_three_modality_emap_is_an_unbiased_estimate_of_the_product_projection():
    """The mean over seeds of EMAP's fhat is the exact projection under the product of the
    marginals (brute force over all N^3 combinations), within a few standard errors; one seed
    alone is not it (a sample), and the seed is recorded."""
    adapter, items = three_modalities(Interacting3(1), 6, seed=2)
    exact = product_projection(adapter, items)
    runs = []
    for seed in range(30):
        r = emap(adapter, items, seed=seed)
        assert r.params["seed"] == seed and f"(seed {seed})" in r.params["anova"]
        runs.append(r.emap_logits)
    runs = np.stack(runs)
    se = runs.std(0, ddof=1) / np.sqrt(len(runs))
    assert float(se.min()) > 0                                   # it is a sample
    z = np.abs(runs.mean(0) - exact) / se
    assert float(z.max()) < 4.5, z
    # the mean of the seeds is much closer to the projection than one seed
    one = np.abs(runs[0] - exact).max()
    assert np.abs(runs.mean(0) - exact).max() < 0.5 * one
    # the joint pairing (references' other modalities kept together) is another quantity
    from tests.test_emap_lengths import pair_matrix
    mats = [pair_matrix(adapter, items, m) for m in adapter.names]
    means = [m.mean((0, 1)) for m in mats]
    joint = np.mean(means, 0) + sum(m.mean(1) - g for m, g in zip(mats, means))
    assert float((np.abs(joint - exact) / se).max()) > 6


class LookupAdditive(nn.Module):
    """An additive model on N stored instances: c + sum_m parts[m][k], k the stored instance
    whose modality m the input's is (an EMAP result as a model: EMAP(fhat) must be fhat)."""

    def __init__(self, refs: dict, parts: dict, grand):
        super().__init__()
        self.refs, self.parts = refs, {m: torch.as_tensor(p) for m, p in parts.items()}
        self.grand = torch.as_tensor(grand)
        self.head = nn.Linear(1, 3)               # the adapter needs a decision layer; unused

    def forward(self, t1, t2, series):
        out = self.grand.expand(len(t1), -1).clone()
        for m, x in (("t1", t1), ("t2", t2), ("series", series)):
            d = (x.flatten(1)[:, None] - self.refs[m].flatten(1)[None]).abs().sum(-1)
            out = out + self.parts[m][d.argmin(1)]
        return out


def test_three_modality_emap_is_idempotent_and_its_parts_are_centred():
    adapter, items = three_modalities(Interacting3(3), 7, seed=4)
    r = emap(adapter, items, seed=5)
    for part in r.unimodal.values():
        np.testing.assert_allclose(part.mean(0), 0.0, atol=1e-12)
    raw = adapter.collate(items)
    fhat = LookupAdditive(raw, r.unimodal, r.grand_mean)
    again = ModelAdapter(fhat, list(adapter.modalities.values()), adapter.class_names,
                         decision_layer=fhat.head)
    for seed in (0, 5, 11):
        r2 = emap(again, items, seed=seed, factorized=False)
        np.testing.assert_allclose(r2.logits, r.emap_logits, atol=1e-12)
        np.testing.assert_allclose(r2.emap_logits, r.emap_logits, atol=1e-12)


def test_two_modality_emap_takes_no_seed_and_no_sample():
    """With two modalities nothing is sampled: every seed gives the same numbers, bit for bit,
    those of the N x N pair matrix."""
    adapter = tiny_adapter(2)
    items = [tiny_instance(40 + i) for i in range(7)]
    r = emap(adapter, items)
    assert r.params["anova"].startswith("two modalities") and r.params["seed"] == 0
    for seed in (1, 9):
        other = emap(adapter, items, seed=seed)
        assert np.array_equal(other.emap_logits, r.emap_logits)
        assert all(np.array_equal(other.unimodal[m], r.unimodal[m]) for m in r.unimodal)
    want = np.stack([emap_matrix(r.matrix)[i, i] for i in range(7)])
    np.testing.assert_allclose(r.emap_logits, want, rtol=1e-12, atol=1e-12)


class IgnoresThird(nn.Module):
    """Two tabular modalities a, b that interact (u * v, the same encoder on both); the third, c,
    is ignored (its encoder's weights are zero)."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Linear(4, 4), nn.Linear(3, 4)
        self.head = nn.Linear(8, 3)
        _seeded(self, 3)
        with torch.no_grad():
            self.c.weight.zero_()
            self.c.bias.zero_()
        self.double()

    def forward(self, a, b, c):
        u, v = torch.tanh(self.a(a)), torch.tanh(self.a(b))
        return self.head(torch.cat([u * v + self.c(c), u + v], 1))


def test_three_modality_emap_of_a_model_ignoring_one_is_the_two_modality_emap():
    """A model that ignores modality c gets the two-modality EMAP of (a, b) plus one offset, the
    same at every instance: (R - mean M) / 3, with M[i, j] = f(a^i, b^j) and R the mean of the N
    pairs M[pi(j), pi'(j)] that c's mixed references take (pi, pi' its permutations). R is the
    mean of M over a random permutation, so it is unbiased and (Hoeffding's combinatorial
    CLT) has variance sum_ij D_ij^2 / (N^2 (N - 1)), D = M - row means - column means + mean
    (the interaction of M): the offset must be within 4 of its standard deviations / 3. The
    joint pairing used before gave (mean of the diagonal - mean M) / 3 instead, which is
    biased on matched data (b is a noisy copy of a) and fails that bound."""
    mods = [Tabular("a", columns=list("pqrs")), Tabular("b", columns=list("tuvw")),
            Tabular("c", columns=list("xyz"))]
    adapter = ModelAdapter(IgnoresThird(), mods, ["k0", "k1", "k2"])
    g = torch.Generator().manual_seed(1)
    n, items = 30, []
    for _ in range(n):
        a = torch.randn(4, generator=g, dtype=torch.float64) * 1.5
        items.append({"a": a, "b": a + 0.1 * torch.randn(4, generator=g, dtype=torch.float64),
                      "c": torch.randn(3, generator=g, dtype=torch.float64)})
    with torch.no_grad():
        raw = adapter.collate(items)
        k = torch.arange(n)
        i, j = k.repeat_interleave(n), k.repeat(n)
        pairs = adapter.forward({"a": raw["a"][i], "b": raw["b"][j],
                                 "c": raw["c"][:1].expand(n * n, -1)}).double().numpy()
    mat = pairs.reshape(n, n, -1)
    two = np.stack([emap_matrix(mat)[t, t] for t in range(n)])
    d = emap_matrix(mat) - mat                                  # minus the interaction of M
    bound = 4 * np.sqrt((d ** 2).sum((0, 1)) / (n - 1)) / n / 3
    old = (np.einsum("iik->k", mat) / n - mat.mean((0, 1))) / 3  # the joint pairing's offset
    assert (np.abs(old) > bound).any(), (old, bound)
    from tests.test_emap_lengths import mixing
    for seed in (0, 1, 2):
        r = emap(adapter, items, seed=seed)
        offset = r.emap_logits - two
        np.testing.assert_allclose(offset, offset[:1].repeat(n, 0), atol=1e-12)
        assert (np.abs(offset[0]) <= bound).all(), (offset[0], bound)
        perms = mixing(adapter.names, n, seed)["c"]
        sampled = mat[perms["a"], perms["b"]].mean(0)
        np.testing.assert_allclose(offset[0], (sampled - mat.mean((0, 1))) / 3, atol=1e-12)
        np.testing.assert_allclose(r.unimodal["c"], 0.0, atol=1e-12)
        np.testing.assert_allclose(r.unimodal["a"], mat.mean(1) - mat.mean((0, 1)), atol=1e-12)
        np.testing.assert_allclose(r.unimodal["b"], mat.mean(0) - mat.mean((0, 1)), atol=1e-12)


@pytest.mark.parametrize("kind", synthetic.KINDS)
def test_factorized_emap_equals_pairwise_forwards(kind):
    adapter, ds = synthetic.load(kind)
    fast = emap(adapter, ds, indices=range(30))
    slow = emap(adapter, ds, indices=range(30), factorized=False)
    assert fast.params["factorized"] and not slow.params["factorized"]
    np.testing.assert_allclose(fast.matrix, slow.matrix, atol=1e-5)
    np.testing.assert_allclose(fast.emap_logits, slow.emap_logits, atol=1e-5)


class BrokenFactors(TinyFusion):
    def encode_modality(self, name, x):
        return x

    def fuse_encodings(self, enc):
        return super().forward(enc["tabular"], enc["series"]) + 1.0


def test_factorized_emap_checks_the_model_methods():
    mods = list(tiny_adapter().modalities.values())
    adapter = ModelAdapter(BrokenFactors(0), mods, ["k0", "k1", "k2"])
    with pytest.raises(ValueError, match="disagree with its forward"):
        emap(adapter, [tiny_instance(i) for i in range(3)])


def test_emap_neuron_target_and_progress():
    adapter = tiny_adapter(2)
    items = [tiny_instance(i) for i in range(5)]
    calls = []
    r = emap(adapter, items, target=Neuron(1), batch_size=7,
             progress=lambda d, n, m: calls.append((d, n)))
    assert r.logits.shape == (5, 1) and r.output_names == ["neuron 1"]
    assert calls[-1] == (25, 25) and len(calls) >= 4


# ---------------------------------------------------------------------------------------------
# the planted model: the planted pair ranks first; the EMAP gap is large
# ---------------------------------------------------------------------------------------------
def _informative(ds, k=4):
    """Instances where both planted units are clearly away from their baseline (zero)."""
    tab = np.stack(ds.columns["tabular"])
    ser = np.stack(ds.columns["series"]).reshape(len(ds), synthetic.N_WINDOWS, synthetic.WINDOW, -1)
    s = ser.mean(2).reshape(len(ds), -1)
    ok = ((np.abs(tab[:, synthetic.PLANTED_UNITS["tabular"]]) > 0.5)
          & (np.abs(s[:, synthetic.PLANTED_UNITS["series"]]) > 0.5))
    return np.nonzero(ok)[0][:k]


@pytest.mark.parametrize("method,params", [("second_order", {}), ("pairwise_ablation", {}),
                                           ("shapley", {"budget": 4096})])
def test_planted_pair_ranks_first(planted, method, params):
    adapter, ds = planted
    want = (synthetic.PLANTED_UNITS["tabular"], synthetic.PLANTED_UNITS["series"])
    total = 0
    for i in _informative(ds):
        r = interaction(adapter, ds[int(i)], method, **params)
        assert r.top_pairs(1)[0][:2] == want, (i, r.top_pairs(3))
        total = total + np.abs(r.matrix)
    assert np.unravel_index(np.argmax(total), total.shape) == want


def test_planted_emap_gap_is_large(planted):
    adapter, ds = planted
    gap = emap_gap(adapter, ds, n=100)
    assert gap["n"] == 100 and gap["forward_passes"] >= 100 * 100
    assert gap["gap_labels"] >= 0.20, gap
    assert gap["gap_points"] == pytest.approx(100 * gap["gap_labels"])
    assert gap["gap_predictions"] >= 0.20


def test_interaction_types(planted, additive):
    adapter, ds = planted
    r = emap(adapter, ds, indices=range(60))
    types = interaction_types(r)
    labels = [t["label"] for t in types]
    assert set(labels) <= {"dominance", "complement", "conflict"}
    assert labels.count("conflict") >= 6            # the planted interaction decides often
    for t in types:
        if t["label"] == "conflict":
            assert t["emap_prediction"] != t["predicted"]
        if t["label"] == "dominance":
            assert t["dominant"] in ("tabular", "series")
            assert t["unimodal_predictions"][t["dominant"]] == t["predicted"]
    # one instance against a dataset reference equals the row of the EMAP result
    one = interaction_type(adapter, 3, ds, reference_indices=range(60))
    assert one["label"] == types[3]["label"]
    np.testing.assert_allclose(one["emap_logits"], r.emap_logits[3], atol=1e-5)
    assert interaction_type(adapter, 3, r)["label"] == types[3]["label"]
    adapter2, ds2 = additive
    r2 = emap(adapter2, ds2, indices=range(60))
    assert "conflict" not in [t["label"] for t in interaction_types(r2)]


# ---------------------------------------------------------------------------------------------
# DIME on f = g(x_1) + h(x_2) + k(x_1, x_2) with known supports
# ---------------------------------------------------------------------------------------------
G_SUPPORT, H_SUPPORT, K_SUPPORT = [0, 1], [2, 3], (5, 7)


class KnownSupports(nn.Module):
    """tabular [8] + series [16, 2] (window 4: 8 units): f = g(t0, t1) + h(s2, s3) + 3 t5 s7."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.head.bias.zero_()

    def forward(self, tabular, series):
        s = series.reshape(len(series), 4, 4, 2).mean(2).reshape(len(series), 8)
        g = 2.0 * tabular[:, 0] - 1.5 * tabular[:, 1]
        h = 2.0 * s[:, 2] + 1.5 * s[:, 3]
        k = 3.0 * tabular[:, 5] * s[:, 7]
        return self.head((g + h + k)[:, None])


@pytest.mark.parametrize("design", ["per_modality", "joint"])
def test_dime_recovers_the_known_supports(design):
    mods = [Tabular("tabular", columns=[f"c{i}" for i in range(8)]),
            TimeSeries("series", window=4, channels=["x", "y"])]
    adapter = ModelAdapter(KnownSupports().eval(), mods, ["pos", "neg"])
    rng = np.random.default_rng(0)
    n = 80
    tab = rng.standard_normal((n, 8)).astype(np.float32)
    levels = rng.standard_normal((n, 4, 1, 2))
    strong = [0, 1, 2]
    for i in strong:      # supported units clearly away from their baseline (0), random signs
        tab[i, [0, 1, 5]] = rng.choice([-1.5, 1.5], 3)
        for u in (2, 3, 7):
            levels[i, u // 2, 0, u % 2] = rng.choice([-1.5, 1.5])
    ser = np.repeat(levels, 4, axis=2).reshape(n, 16, 2).astype(np.float32)
    ds = MultimodalDataset({"tabular": list(tab), "series": list(ser)})
    hits_uc = hits_mi = 0
    for i in strong:
        r = dime(adapter, ds, i, reference_indices=range(3, 33), target=0, n_samples=300,
                 design=design)
        assert r.f_value == pytest.approx(r.uc_value + r.mi_value)
        uc = np.concatenate([np.abs(r.uc["tabular"]), np.abs(r.uc["series"])])
        mi = np.concatenate([np.abs(r.mi["tabular"]), np.abs(r.mi["series"])])
        uc_truth = set(G_SUPPORT) | {8 + u for u in H_SUPPORT}
        mi_truth = {K_SUPPORT[0], 8 + K_SUPPORT[1]}
        hits_uc += len(set(np.argsort(-uc)[:4]) & uc_truth)
        hits_mi += len(set(np.argsort(-mi)[:2]) & mi_truth)
    assert hits_uc / (4 * len(strong)) >= 0.9
    assert hits_mi / (2 * len(strong)) >= 0.9
    lime = 2 * 300 * (30 + 1) if design == "per_modality" else 300 * (2 * 30 + 1)
    assert r.forward_passes >= 30 * 30 + lime


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_errors_say_what_is_wrong():
    adapter = tiny_adapter()
    inst = tiny_instance()
    one = ModelAdapter(nn.Sequential(nn.Linear(4, 2)), [Tabular("tabular", columns=list("abcd"))],
                       ["x", "y"])
    with pytest.raises(ValueError, match="need two modalities"):
        interaction(one, {"tabular": torch.zeros(4)})
    with pytest.raises(ValueError, match="Unknown interaction method"):
        interaction(adapter, inst, "hessian")
    with pytest.raises(ValueError, match="Unknown modalities"):
        interaction(adapter, inst, modalities=("tabular", "image"))
    with pytest.raises(ValueError, match="must differ"):
        interaction(adapter, inst, modalities=("tabular", "tabular"))
    with pytest.raises(ValueError, match="exactly two"):
        interaction(adapter, inst, modalities=("tabular",))
    with pytest.raises(ValueError, match="single string"):
        interaction(adapter, inst, modalities="tabular")
    with pytest.raises(ValueError, match="ordered pair"):
        interaction(adapter, inst, modalities={"tabular", "series"})
    with pytest.raises(ValueError, match="Unknown Shapley interaction index"):
        interaction(adapter, inst, "shapley", index="banzhaf")
    with pytest.raises(ValueError, match="budget"):
        interaction(adapter, inst, "shapley", budget=0)
    with pytest.raises(ValueError, match="phi"):
        interaction(adapter, inst, "second_order", phi="square")
    with pytest.raises(ValueError, match="at least 2 instances"):
        emap(adapter, [inst])
    with pytest.raises(ValueError, match="two or more modalities"):
        emap(one, [{"tabular": torch.zeros(4)}] * 3)
    with pytest.raises(ValueError, match="single instance"):
        emap(adapter, inst)
    with pytest.raises(ValueError, match="MultimodalDataset"):
        emap_gap(adapter, [inst, inst])
    ds = MultimodalDataset({"tabular": [inst["tabular"]] * 3, "series": [inst["series"]] * 3})
    r = emap(adapter, ds, target=Neuron(0))
    with pytest.raises(ValueError, match="class target"):
        interaction_types(r)
    with pytest.raises(ValueError, match="needs a reference set"):
        interaction_type(adapter, inst)
    with pytest.raises(ValueError, match="not among"):
        interaction_type(adapter, 99, emap(adapter, ds))


def test_shapley_exact_for_few_players_and_max_players():
    adapter = tiny_adapter(4)
    inst = tiny_instance(5)
    r = interaction(adapter, inst, "shapley", budget=256)      # 8 players: exact
    assert r.params["exact"] and r.params["approximator"] == "ExactComputer"
    assert r.forward_passes == 256 + 1
    # k-SII of order 2 for a pair = SII = the Shapley-weighted mean of pairwise discrete derivatives;
    # with pairwise ablation it shares the sign of the strongest pair on this smooth model.
    r2 = interaction(adapter, inst, "shapley", budget=64, max_players=4)
    chosen = r2.params["players"]
    assert len(chosen["tabular"]) + len(chosen["series"]) == 4
    mask = np.zeros((4, 4), bool)
    mask[np.ix_(chosen["tabular"], chosen["series"])] = True
    assert np.all(r2.matrix[~mask] == 0)



def test_shapley_keeps_by_default_as_many_players_as_the_budget_computes_exactly():
    """max_players="auto": 2^players <= budget (at most EXACT_MAX_PLAYERS), so the default is the
    index itself, not a sample of it; the number kept is recorded."""
    from multiviz_widgets.kernels.interactions import EXACT_MAX_PLAYERS, auto_max_players
    assert [auto_max_players(b) for b in (4, 15, 16, 64, 100, 4096, 1 << 20)] == \
        [2, 3, 4, 6, 6, 12, EXACT_MAX_PLAYERS]
    adapter, inst = tiny_adapter(4), tiny_instance(5)           # 8 players
    r = interaction(adapter, inst, "shapley", budget=64)        # 6 of them, exactly
    assert r.params["exact"] and r.params["max_players"] == 6
    assert sum(len(v) for v in r.params["players"].values()) == 6
    assert r.params["relative_noise"] is None
    assert interaction(adapter, inst, "shapley").params["exact"]         # all 8 at 4096
    for bad in ("all", "", "AUTO"):
        with pytest.raises(ValueError, match="max_players must be 'auto', a number of players"):
            interaction(adapter, inst, "shapley", max_players=bad)


class WideFusion(nn.Module):
    """tabular [7] + series [6, 1]: 13 units, more than Shapley computes exactly."""

    def __init__(self, additive=False):
        super().__init__()
        self.additive = additive
        self.t, self.s = nn.Linear(7, 5), nn.Linear(6, 5)
        self.head = nn.Linear(10 if additive else 5, 2)
        _seeded(self, 3)

    def forward(self, tabular, series):
        a, b = torch.tanh(self.t(tabular)), torch.tanh(self.s(series.flatten(1)))
        return self.head(torch.cat([a, b], 1) if self.additive else a * b)


def test_shapley_sampled_reports_its_noise_from_two_independent_halves():
    """Sampled k-SII is KernelSHAPIQ run as two halves (independent seeds drawn from seed): the
    result is their mean, every pair estimated, relative_noise (the error of that mean) shrinks
    as the budget grows, the second half spends what the first left (the budget exactly); an
    additive model's cross cells are near 0 and reported as noise."""
    from multiviz_widgets.kernels.interactions import _half_seeds, _mean_and_noise
    mods = [Tabular("tabular", columns=[f"c{i}" for i in range(7)]),
            TimeSeries("series", window=1, channels=["x"])]
    g = torch.Generator().manual_seed(0)
    inst = {"tabular": torch.randn(7, generator=g), "series": torch.randn(6, 1, generator=g)}
    adapter = ModelAdapter(WideFusion(), mods, ["k0", "k1"])
    small, large = (interaction(adapter, inst, "shapley", budget=b, max_players=None)
                    for b in (800, 12800))
    for r, budget in ((small, 800), (large, 12800)):
        assert r.params["approximator"] == "KernelSHAPIQ" and not r.params["exact"]
        assert not r.params["underdetermined"]
        assert r.params["coalitions"] == budget
        assert r.forward_passes == r.params["coalitions"] + 1        # + the predicted class
    assert 0 < large.params["relative_noise"] < 0.5 * small.params["relative_noise"]
    # the noise is what it says: the two estimates differ by about their reported errors
    gap = np.linalg.norm(small.matrix - large.matrix) / np.linalg.norm(large.matrix)
    assert gap < 3 * small.params["relative_noise"]
    # a regression also fits the within-modality effects of an additive model, so its cross
    # cells are not exactly 0 as permutation sampling's were: small, and reported as noise
    additive = interaction(ModelAdapter(WideFusion(additive=True), mods, ["k0", "k1"]), inst,
                           "shapley", max_players=None)
    assert additive.params["approximator"] == "KernelSHAPIQ"
    assert np.linalg.norm(additive.matrix) < 0.1 * np.linalg.norm(
        interaction(adapter, inst, "shapley", max_players=None).matrix)
    assert additive.params["relative_noise"] > 0.5
    again = interaction(adapter, inst, "shapley", budget=800, max_players=None)
    np.testing.assert_array_equal(again.matrix, small.matrix)        # a seed fixes the sample
    other = interaction(adapter, inst, "shapley", budget=800, max_players=None, seed=1)
    assert not np.array_equal(other.matrix, small.matrix)
    # the halves of seeds 0 and 1 are four different streams (seed, seed + 1 shared one)
    assert len(set(_half_seeds(0)) | set(_half_seeds(1))) == 4
    assert _half_seeds(0) == _half_seeds(0)
    # the mean weighs the halves by their samples; its error from their difference
    mean, noise = _mean_and_noise(np.array([[1.0]]), np.array([[3.0]]))
    assert mean[0, 0] == 2.0 and noise == pytest.approx(0.5)       # (|1 - 3| / 2) / 2
    mean, noise = _mean_and_noise(np.array([[1.0]]), np.array([[4.0]]), 1, 2)
    assert mean[0, 0] == 3.0 and noise == pytest.approx(3 * np.sqrt(2) / 3 / 3)
    assert _mean_and_noise(np.ones((2, 2)), np.ones((2, 2)))[1] == 0.0
    assert _mean_and_noise(np.zeros((2, 2)), np.zeros((2, 2)))[1] == 0.0
    assert _mean_and_noise(np.array([[1.0]]), np.array([[-1.0]]))[1] == np.inf   # all noise
    assert np.isnan(_mean_and_noise(np.array([[np.nan, 1.0]]), np.ones((1, 2)))[1])


def test_shapley_warns_when_a_regression_estimate_is_underdetermined():
    """Below 1 + n + n(n-1)/2 coalitions KernelSHAPIQ / RegressionFSII solve an underdetermined
    system: the user is told, with the budget that would do, and params record it."""
    adapter, inst = tiny_adapter(), tiny_instance(9)          # 8 players: 37 terms, not exact
    with pytest.warns(UserWarning, match=r"fits 37 interaction terms of 8 players from only "
                                         r"30 coalitions.*at least 37 \(at least 74 to measure "
                                         r"its noise\) or lower max_players"):
        r = interaction(adapter, inst, "shapley", budget=30, max_players=None)
    assert r.params["approximator"] == "KernelSHAPIQ" and r.params["underdetermined"]
    assert r.params["relative_noise"] is None                        # one run: no halves
    with warnings.catch_warnings():        # determined, but too few coalitions for two halves
        warnings.simplefilter("error")
        r = interaction(adapter, inst, "shapley", budget=50, max_players=None)
    assert r.params["approximator"] == "KernelSHAPIQ" and not r.params["underdetermined"]
    assert r.params["relative_noise"] is None and r.params["coalitions"] == 50
    with pytest.warns(UserWarning, match="at least 37 or lower max_players"):
        interaction(adapter, inst, "shapley", index="FSII", budget=30, max_players=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = interaction(adapter, inst, "shapley", index="FSII", budget=40, max_players=None)
    assert not r.params["underdetermined"]


def test_shapley_refuses_a_regression_too_large_for_memory(monkeypatch):
    """KernelSHAPIQ builds a coalitions x terms least-squares problem: 70 players and 2^17
    coalitions would take about 8 GiB. It is refused before any coalition is evaluated, with
    the budget that fits."""
    import multiviz_widgets.kernels.interactions as mod
    adapter, inst = tiny_adapter(), tiny_instance(9)          # 8 players: 37 terms
    # the coalitions x terms matrices and the terms x terms normal matrix (2 copies)
    monkeypatch.setattr(mod, "REGRESSION_MEMORY_LIMIT", 24 * 37 * 100 + 16 * 37 ** 2)
    calls = []
    forward = adapter.forward
    monkeypatch.setattr(adapter, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    with pytest.raises(ValueError, match=r"KernelSHAPIQ would fit 37 interaction terms of 8 "
                                         r"players to 101 coalitions.*Lower max_players \(at "
                                         r"most 7 fit with this budget\), or the budget \(at "
                                         r"most 100 for 8 players"):
        interaction(adapter, inst, "shapley", budget=101, max_players=None)
    n_before = len(calls)
    r = interaction(adapter, inst, "shapley", budget=100, max_players=None)
    assert r.params["approximator"] == "KernelSHAPIQ" and len(calls) > n_before


def test_shapley_counts_the_normal_matrix_in_its_memory_and_says_its_fit(monkeypatch):
    """KernelSHAPIQ also builds the terms x terms matrix X'WX: 150 players' peak was 3.2 GiB
    where the guard counted 1.0, and 726 players, at the budget it advised, failed with a raw
    MemoryError of 516 GiB. The fit runs after the last coalition, where a cancel cannot stop
    it: the progress says it begins (a cancel meanwhile stops there), and one estimated long
    is warned."""
    import multiviz_widgets.kernels.interactions as mod
    adapter, inst = tiny_adapter(), tiny_instance(9)          # 8 players: 37 terms
    monkeypatch.setattr(mod, "REGRESSION_MEMORY_LIMIT", 24 * 37 * 100 + 16 * 37 ** 2 - 1)
    with pytest.raises(ValueError, match=r"at most 7 fit with this budget"):
        interaction(adapter, inst, "shapley", budget=100, max_players=None)  # only by X'WX
    monkeypatch.undo()
    said = []
    r = interaction(adapter, inst, "shapley", budget=100, max_players=None,
                    progress=lambda done, total, message="": said.append(message))
    assert r.params["approximator"] == "KernelSHAPIQ"
    fits = [m for m in said if m.startswith("Shapley: fitting 37 interaction terms")]
    assert len(fits) == 2                                     # before each half's fit
    monkeypatch.setattr(mod, "REGRESSION_FLOPS_PER_SECOND", 1.0)
    with pytest.warns(UserWarning, match=r"after its 100 coalitions, KernelSHAPIQ fits 37 "
                                         r"interaction terms of 8 players, about .* a cancel "
                                         r"cannot stop"):
        interaction(adapter, inst, "shapley", budget=100, max_players=None)


def test_a_budget_that_auto_players_cannot_spend_is_said():
    """README's {"shapley": {"budget": 8192}} gave the same 12 exact players as 4,096 and
    said nothing: the budget bought nothing. It is warned, with max_players= to pass."""
    adapter = ModelAdapter(TinyFusion(0), [Tabular("tabular", columns=["c0", "c1", "c2", "c3"]),
                                           TimeSeries("series", window=1, channels=["x", "y"])],
                           ["k0", "k1", "k2"])                # 4 + 16 units
    inst = tiny_instance(3)
    with pytest.warns(UserWarning, match=r"max_players='auto' computes 12 players exactly from "
                                         r"4,096 of the 8,192 coalitions.*of the 20 units, pass "
                                         r"max_players="):
        r = interaction(adapter, inst, "shapley", budget=8192)
    assert r.params["exact"] and r.params["coalitions"] == 4096
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        interaction(adapter, inst, "shapley")                 # 4,096: all spent
        interaction(adapter, inst, "shapley", budget=8192, max_players=12)   # asked for


def test_shapley_player_choice_ignores_rounding():
    """Equal occlusion effects (a repeated word) are ties broken by unit order, also when the
    model's rounding (CPU or GPU) makes them differ in the last bits."""
    from multiviz_widgets.kernels.interactions import _top_units
    base = np.array([1.0, 0.3, 2.9, 15.2, 0.8, 2.9, 1.1])
    for jitter in (0.0, 1e-9, -1e-9):
        effect = base.copy()
        effect[5] += jitter * effect[5]
        assert _top_units(effect, 2).tolist() == [2, 3]
    assert _top_units(np.array([0.0, 0.0, 0.0]), 2).tolist() == [0, 1]
    assert _top_units(np.array([0.5, 0.2, 0.9]), 3).tolist() == [0, 1, 2]


def test_methods_registry():
    assert set(INTERACTION_METHODS) == {"second_order", "pairwise_ablation", "shapley"}


# ---------------------------------------------------------------------------------------------
# the stage-2 benchmark runs end to end on a tiny sample (no timing is asserted)
# ---------------------------------------------------------------------------------------------
def test_stage2_benchmark_writes_its_json(tmp_path):
    import importlib.util
    import json
    import sys
    from pathlib import Path
    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location("bench_kernels_stage2", bench / "kernels_stage2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "s2.json"
    threads = torch.get_num_threads()
    try:
        mod.main(["--n", "1", "--emap-n", "6", "--emap-repeats", "1", "--dime-instances", "1",
                  "--dime-samples", "20", "--threads", str(threads), "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    d = json.loads(out.read_text())["stage2"]
    assert d["second_order"]["max_relative_difference_to_loop"] < 1e-4
    assert d["emap"]["generic"]["max_abs_difference_to_reference"] < 1e-4
    for k in ("speedup", "ratio_to_floor"):
        assert d["second_order"][k] > 0 and d["emap"]["generic"][k] > 0
    assert d["pairwise_ablation"]["ratio_to_floor"] > 0
    # the measured part of the work that no exact second-order method avoids
    assert 0 < d["second_order"]["image_gradient_rows_median_ms"]
    assert d["second_order"]["speedup_bound"] > 0 and d["second_order"]["kernel_to_bound"] > 0
    assert "every round" in d["second_order"]["bound_statistic"]     # paired, not a minimum
    # the criterion's loop is the original MultiViz one (shared graph); the loop that redoes
    # the forward per token is timed too; both match the kernel; every order once per cycle
    so = d["second_order"]
    assert so["shared_graph_loop_median_ms"] > 0 and so["speedup_over_recomputing_loop"] > 0
    assert so["rounds_per_instance"] == 6 and so["agrees"] and so["meets"]["agrees"]
    lo, hi = so["speedup_ci95"]
    assert lo <= so["speedup"] <= hi
    # EMAP: the faster of two references (through the adapter, the model called directly), and
    # the traced split's first call with its tracing; the floor checks the generic variant only
    e = d["emap"]
    assert e["plain_reference_max_abs_difference"] < 1e-4
    assert e["traced"]["first_call_s"] > 0 and e["traced"]["meets"]["floor"] is None
    assert e["generic"]["meets"]["floor"] in (True, False) and e["generic"]["meets"]["agrees"]
    for variant in ("generic", "declared", "traced"):
        assert d["emap"][variant]["max_abs_difference_to_reference"] < 1e-4
        assert d["dime"][variant]["median_s"] > 0


def test_emap_scale_benchmark_writes_its_json(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "scale.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "emap_scale.py"), "--n", "21", "30",
                    "--threads", "1", "--out", str(out)], check=True, cwd=root,
                   capture_output=True, text=True)
    runs = json.loads(out.read_text())["runs"]
    assert [r["n"] for r in runs] == [21, 30] and [r["pairs"] for r in runs] == [441, 900]
    for r in runs:
        assert r["seconds"] > 0 and r["pair_matrix_mib"] > 0 and 0 <= r["agreement"] <= 1


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 1000), batch=st.integers(1, 40), factorized=st.sampled_from([None, False]))
def test_emap_sums_pairs_chunk_by_chunk_exactly_as_the_whole_matrix(seed, batch, factorized):
    """The pairs are summed as they come (memory O(N K)); any chunking gives EMAP of the whole
    matrix, computed here from the kept matrix with emap_matrix."""
    adapter = tiny_adapter(seed % 7)
    items = [tiny_instance(seed + i) for i in range(7)]
    r = emap(adapter, items, batch_size=batch, factorized=factorized, keep_matrix=True)
    whole = emap_matrix(r.matrix)
    np.testing.assert_allclose(r.emap_logits, np.diagonal(whole, axis1=0, axis2=1).T, atol=1e-9)
    np.testing.assert_allclose(r.logits, np.diagonal(r.matrix, axis1=0, axis2=1).T, atol=0)
    np.testing.assert_allclose(r.grand_mean, r.matrix.mean((0, 1)), atol=1e-12)
    streamed = emap(adapter, items, batch_size=batch, factorized=factorized, keep_matrix=False)
    assert streamed.matrix is None and "keep_matrix=False" in streamed.params["matrix_note"]
    np.testing.assert_allclose(streamed.emap_logits, r.emap_logits, atol=1e-9)


def test_emap_keeps_a_large_matrix_only_when_asked(monkeypatch):
    from multiviz_widgets.kernels import emap as emap_module
    monkeypatch.setattr(emap_module, "KEPT_MATRIX_BYTES", 100)
    adapter = tiny_adapter(1)
    items = [tiny_instance(i) for i in range(5)]
    r = emap(adapter, items)                        # 5 x 5 x 3 x 8 bytes > 100
    assert r.matrix is None and "would take 0.0 MiB" in r.params["matrix_note"]
    kept = emap(adapter, items, keep_matrix=True)
    assert kept.matrix.shape == (5, 5, 3) and "matrix_note" not in kept.params
    np.testing.assert_allclose(r.emap_logits, kept.emap_logits, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# argument checks of the stage-2 entry points
# ---------------------------------------------------------------------------------------------
def test_shapley_stii_with_a_small_budget_uses_svarmiq():
    """Below two permutations STII falls back to SVARMIQ, whose approximate() takes no
    batch_size: only the permutation samplers get one."""
    adapter, inst = tiny_adapter(), tiny_instance(3)          # 8 players, not exact
    r = interaction(adapter, inst, "shapley", index="STII", budget=64, max_players=None)
    assert r.params["approximator"] == "SVARMIQ" and np.isfinite(r.matrix).all()
    r = interaction(adapter, inst, "shapley", index="STII", budget=240, batch_size=7,
                    max_players=None)
    assert r.params["approximator"] == "PermutationSamplingSTII"


def test_emap_gap_checks_n_and_indices(planted):
    adapter, ds = planted
    for n, words in [(-3, "n must be an integer of at least 2"), (2.5, "got 2.5"),
                     (True, "got True")]:
        with pytest.raises(ValueError, match=words):
            emap_gap(adapter, ds, n=n)
    for indices, words in [([0.5, 1.7], r"integers \(instance numbers\), got 0.5"),
                           (np.arange(len(ds)) < 3, "boolean mask.*np.flatnonzero"),
                           ([0, -1], "-1 is out of range; the dataset has 600 instances"),
                           ([0, 600], "600 is out of range"), ([[0, 1], [2, 3]], "1-D"),
                           ("01", "1-D list of instance numbers")]:
        with pytest.raises(ValueError, match=words):
            emap_gap(adapter, ds, indices=indices)
    assert emap_gap(adapter, ds, indices=np.array([4, 0, 2]))["indices"] == [4, 0, 2]


def test_dime_and_interaction_type_take_integer_indices_only(planted):
    adapter, ds = planted
    kw = dict(n_samples=20, n_reference=5)
    for index, words in [(1.7, r"index must be an instance number \(an integer\), got 1.7"),
                         ("3", "got '3'"), (None, "got None"),
                         (10_000, "index: 10000 is out of range; the dataset has 600")]:
        with pytest.raises(ValueError, match=words):
            dime(adapter, ds, index, **kw)
    for ref, words in [([1.5, 2.5], "reference_indices must be integers"),
                       ([1, 9999], "reference_indices: 9999 is out of range")]:
        with pytest.raises(ValueError, match=words):
            dime(adapter, ds, 0, reference_indices=ref, n_samples=20)
        with pytest.raises(ValueError, match=words):
            interaction_type(adapter, ds[0], ds, reference_indices=ref)
    for instance, words in [(1.7, "got 1.7"), (9999, "9999 is out of range")]:
        with pytest.raises(ValueError, match=words):
            interaction_type(adapter, instance, ds, n_reference=5)
    assert dime(adapter, ds, np.int64(3), **kw).f_value == dime(adapter, ds, ds[3], **kw).f_value
    for design in ("per-modality", "both", None):
        with pytest.raises(ValueError, match=r"design must be one of \['per_modality', 'joint'\]"):
            dime(adapter, ds, 0, design=design, **kw)


def test_dime_per_modality_leaves_the_other_modality_intact(planted):
    """Each modality's LIME masks only its own units: its first mask (every unit kept) is the
    instance, and the two designs agree on f, UC and MI at the instance."""
    adapter, ds = planted
    kw = dict(n_samples=40, n_reference=6)
    per, joint = dime(adapter, ds, 2, **kw), dime(adapter, ds, 2, design="joint", **kw)
    assert per.params["design"] == "per_modality" and joint.params["design"] == "joint"
    for v in ("f_value", "uc_value", "mi_value"):
        # float32 model: the intact modality's term comes from a batch of its own
        assert getattr(per, v) == pytest.approx(getattr(joint, v), rel=1e-6, abs=1e-6)
    # per modality: twice the LIME masks, each with 1 + N evaluations (the intact modality's
    # N pairs are evaluated once per design); joint: one design, 1 + 2 N per mask
    assert per.forward_passes - joint.forward_passes == 2 * (40 * (1 + 6) + 6) - 40 * (1 + 2 * 6)


def test_stage2_needs_an_adapter_and_an_instance_prepared_by_it():
    from multiviz_widgets.adapter import AdapterError
    adapter, inst = tiny_adapter(), tiny_instance()
    for call, name in [(lambda: interaction(None, inst), "interaction"),
                       (lambda: emap(None, [inst, inst]), "emap"),
                       (lambda: dime(None, MultimodalDataset({"tabular": [inst["tabular"]] * 3,
                                                              "series": [inst["series"]] * 3}), 0),
                        "dime")]:
        with pytest.raises(AdapterError, match=rf"{name}\(\) needs a ModelAdapter, got NoneType"):
            call()
    foreign = text_adapter().prepare({"question": "what shape", "tabular": torch.zeros(2)})
    with pytest.raises(AdapterError, match=r"prepared by another adapter.*adapter.prepare"):
        interaction(adapter, foreign)
    assert interaction(adapter, adapter.prepare(inst)).matrix.shape == (4, 4)


def test_non_finite_or_unfit_inputs_are_named_not_blamed_on_the_split(planted):
    """A NaN instance or a series of the wrong length used to reach the split model's check
    (FactorizationError: 'largest difference nan') or its encoder (a raw torch error)."""
    from multiviz_widgets.adapter import AdapterError, ModelInputError
    adapter, ds = planted
    bad = dict(ds[1], tabular=np.array([0, 0, np.nan, 0, 0, 0], np.float32))
    with pytest.raises(AdapterError, match="'tabular' of instance 1 holds non-finite"):
        emap(adapter, [ds[0], bad, ds[2]])
    with pytest.raises(AdapterError, match="'tabular' holds non-finite"):
        dime(adapter, ds, bad, n_samples=20, n_reference=5)
    longer = [dict(ds[i], series=np.zeros((33, 3), np.float32)) for i in range(3)]
    with pytest.raises(ModelInputError, match=r"series: \(1, 33, 3\)"):
        emap(adapter, longer)
    assert emap(adapter, [ds[i] for i in range(3)]).params["factorization"] == "declared"


# ---------------------------------------------------------------------------------------------
# non-finite outputs are a clear error, never a NaN matrix
# ---------------------------------------------------------------------------------------------
class _NonFinite(nn.Module):
    """log(tabular) (-inf at the zero baseline) or sqrt(tabular - 10) (NaN on the instance)."""

    def __init__(self, sqrt=False):
        super().__init__()
        self.sqrt = sqrt
        self.head = nn.Linear(1, 2)

    def forward(self, tabular, series):
        v = torch.sqrt(tabular - 10.0) if self.sqrt else torch.log(tabular)
        return self.head((v.sum(1, keepdim=True) * series.flatten(1).sum(1, keepdim=True)))


@pytest.mark.parametrize("sqrt,method,match", [
    (False, "pairwise_ablation", r"finite on the instance .* but nan with tabular and series at "
                                 r"their baselines \(tabular alone at its baseline gives -?inf\)"),
    (False, "shapley", r"finite on the instance .* but nan with tabular and series"),
    (True, "second_order", r"is nan on the instance itself"),
    (True, "pairwise_ablation", r"is nan on the instance itself")])
def test_non_finite_model_outputs_are_a_clear_error(sqrt, method, match):
    adapter = ModelAdapter(_NonFinite(sqrt).eval(),
                           [Tabular("tabular", columns=["c0", "c1", "c2", "c3"]),
                            TimeSeries("series", window=4, channels=["x", "y"])], ["k0", "k1"])
    inst = {"tabular": torch.tensor([1.0, 2.0, 3.0, 4.0]), "series": torch.ones(8, 2)}
    with pytest.raises(ValueError, match=rf"^{method}: the model produced NaN or infinite values"
                                         rf", so the matrix would not be finite.*{match}"):
        interaction(adapter, inst, method, target=0)
    if not sqrt:                  # finite on the instance: the gradient method is fine
        assert np.isfinite(interaction(adapter, inst, "second_order", target=0).matrix).all()


@pytest.mark.parametrize("params", [{"budget": 1 << 12, "max_players": 5},  # exact, 4 + 4 units
                                    {"budget": 200, "max_players": None}])   # sampled, 8 players
def test_shapley_of_the_pair_the_other_way_round_is_the_transpose(params):
    """Players, their split and the sampled coalitions follow the adapter's order of the two
    modalities, not the order the pair is named in."""
    adapter = tiny_adapter(4)
    inst = tiny_instance(5)
    ab = interaction(adapter, inst, "shapley", modalities=("tabular", "series"), **params)
    ba = interaction(adapter, inst, "shapley", modalities=("series", "tabular"), **params)
    assert ba.modalities == ("series", "tabular") and ba.matrix.shape == ab.matrix.T.shape
    np.testing.assert_array_equal(ba.matrix, ab.matrix.T)
    assert ba.params["players"] == ab.params["players"]
    assert list(ba.params["players"]) == ["series", "tabular"]
    assert ab.params["exact"] == (params["max_players"] is not None)


@pytest.mark.parametrize("ua,ub,most,want", [
    (64, 7, 24, (17, 7)),      # every word beside the image's top patches
    (7, 64, 24, (7, 17)),
    (64, 30, 24, (12, 12)),    # both large: half each
    (4, 4, 5, (2, 3)),         # odd: the second of equal modalities gets the extra player
    (3, 40, 2, (1, 1)),
    (30, 2, 10, (8, 2))])
def test_shapley_players_leave_both_modalities_a_fair_share(ua, ub, most, want):
    from multiviz_widgets.kernels.interactions import _split_players
    got = _split_players(ua, ub, most)
    assert got == want and sum(got) == min(most, ua + ub)
    assert 1 <= got[0] <= ua and 1 <= got[1] <= ub


class AttentionVQA(nn.Module):
    """A transformer text encoder (scaled_dot_product_attention, a padding mask) and a small
    CNN: the most common text encoder."""

    VOCAB = ["[PAD]", "[UNK]", "is", "there", "a", "red", "square"]

    def __init__(self, d: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(len(self.VOCAB), d, padding_idx=0)
        layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.cnn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, d))
        self.classifier = nn.Linear(d, 3)

    def forward(self, image, question):
        mask = question == 0
        t = self.enc(self.embed(question), src_key_padding_mask=mask).mean(1)
        return self.classifier(torch.tanh(self.cnn(image) * t))


def test_second_order_gradients_go_through_a_transformers_attention():
    """Before: torch's fused attention has no second derivative, and the default heatmap (and
    the prediction path) of such a model failed with torch's 'derivative ... not implemented'."""
    from multiviz_widgets import Image, check
    model = AttentionVQA().eval()
    adapter = ModelAdapter(model, [Image("image", patch=4), Text("question",
                                                                vocab=AttentionVQA.VOCAB)],
                           ["a", "b", "c"], decision_layer=model.classifier,
                           embedding_layers={"question": model.embed})
    instance = {"image": np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8),
                "question": "is there a red square"}
    r = interaction(adapter, instance, "second_order", modalities=("question", "image"))
    assert r.matrix.shape == (5, 4) and np.isfinite(r.matrix).all() and np.abs(r.matrix).max() > 0
    report = check(adapter, instance)
    assert report.stages["interaction_gradient"], str(report)


def test_math_attention_holds_while_any_thread_needs_it_and_then_restores_the_flags():
    """Two engine lanes (or the doctor beside the Explorer) inside at once: the first one out
    must not turn the fused backends back on under the other, and the last one out restores
    them (before: the flags ended at 'math only' for the whole process)."""
    import threading

    import torch.nn.functional as F

    from multiviz_widgets.kernels.common import math_attention

    def flags():
        return (torch.backends.cuda.flash_sdp_enabled(),
                torch.backends.cuda.mem_efficient_sdp_enabled(),
                torch.backends.cuda.math_sdp_enabled())
    before = flags()
    a_in, b_in, a_out, result = threading.Event(), threading.Event(), threading.Event(), []

    def first():
        with math_attention():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def second():
        a_in.wait(10)
        with math_attention():
            b_in.set()
            a_out.wait(10)
            q = torch.randn(1, 2, 5, 8, requires_grad=True)
            g, = torch.autograd.grad(F.scaled_dot_product_attention(q, q, q).sum(), q,
                                     create_graph=True)
            result.append(torch.autograd.grad(g.sum(), q)[0].shape)
    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert result == [torch.Size([1, 2, 5, 8])] and flags() == before


def test_a_three_modality_emap_gap_says_how_far_one_run_may_be_off():
    """With three modalities EMAP is a sample (its permutations): repeats=R averages R
    independent runs' fhat and gives each run's gap, their spread and the reported gap's
    jackknife error (it was the error of the runs' mean gap, another estimator: about half the
    reported gap's); the first run is the one seed alone gives, the others' seeds are spawned
    from it (seed + k made seeds 4 and 5 share three runs). Two modalities are exact: repeats is
    refused."""
    from multiviz_widgets import MultimodalDataset
    from multiviz_widgets.kernels.emap import emap, emap_gap
    adapter, items = three_modalities(Interacting3(1), 12, seed=2)
    ds = MultimodalDataset({k: [it[k] for it in items] for k in items[0]},
                           labels=[i % 3 for i in range(12)])
    one = emap_gap(adapter, ds, n=None, seed=4)
    seen = []
    many = emap_gap(adapter, ds, n=None, seed=4, repeats=4,
                    progress=lambda d, t, m="": seen.append((d, t)))
    assert many["gap_runs"][0] == one["gap"] and len(many["gap_runs"]) == 4
    assert many["gap_spread"] == pytest.approx(np.std(many["gap_runs"], ddof=1))
    seeds = [4] + [int(c.generate_state(1)[0]) for c in np.random.SeedSequence(4).spawn(3)]
    runs = [emap(adapter, ds, seed=s, keep_matrix=False) for s in seeds]
    labels, pred = np.asarray(ds.labels), runs[0].logits.argmax(1)

    def gap(fhat):
        return float((pred == labels).mean() - (fhat.argmax(1) == labels).mean())
    assert [gap(r.emap_logits) for r in runs] == many["gap_runs"]
    total = sum(r.emap_logits for r in runs)
    assert many["gap"] == pytest.approx(gap(total / 4))
    left_out = np.array([gap((total - r.emap_logits) / 3) for r in runs])
    assert many["gap_se"] == pytest.approx(np.sqrt(0.75 * ((left_out - left_out.mean()) ** 2)
                                                   .sum()))
    assert many["forward_passes"] == 4 * one["forward_passes"]
    assert all(t == seen[-1][1] for _, t in seen) and seen[-1][0] == seen[-1][1]
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert "gap_runs" not in one
    two = tiny_adapter(0)
    ds2 = MultimodalDataset({k: [tiny_instance(s)[k] for s in range(4)] for k in ("tabular",
                                                                                "series")})
    with pytest.raises(ValueError, match="two modalities EMAP is exact"):
        emap_gap(two, ds2, n=None, repeats=2)


class _Linear3(nn.Module):
    """Two logits [0, w . (t1[0], t2[0], series[0, 0])]: additive, the weights chosen."""

    def __init__(self, weights):
        super().__init__()
        self.head = nn.Linear(3, 2).double()
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[0.0, 0.0, 0.0], weights]))
            self.head.bias.zero_()

    def forward(self, t1, t2, series):
        return self.head(torch.stack([t1[:, 0], t2[:, 0], series[:, 0, 0]], 1))


def test_dominance_is_one_modality_deciding_and_two_of_three_complement():
    """With three modalities, two that each pick the prediction were called "dominance" by one
    of them (the one of the widest margin; with equal weights, whichever the references
    favoured)."""
    from multiviz_widgets.kernels.emap import interaction_type
    _, items = three_modalities(Additive3(), 16, seed=3)
    for it in items:
        it["t1"][0], it["t2"][0], it["series"][0, 0] = (float(torch.randn(1)) * 0.1
                                                        for _ in range(3))
    instance = {"t1": torch.tensor([1.0, 0, 0], dtype=torch.float64),
                "t2": torch.tensor([1.0, 0], dtype=torch.float64),
                "series": torch.tensor([[1.0, 0], [0, 0], [0, 0], [0, 0]], dtype=torch.float64)}
    mods = list(three_modalities(Additive3(), 1)[0].modalities.values())
    two = interaction_type(ModelAdapter(_Linear3([1.0, 1.0, -0.5]), mods, ["neg", "pos"]),
                           instance, items, seed=0)
    assert two["unimodal_predictions"] == {"t1": 1, "t2": 1, "series": 0}
    assert two["label"] == "complement" and two["dominant"] is None
    one = interaction_type(ModelAdapter(_Linear3([2.0, -0.5, -0.5]), mods, ["neg", "pos"]),
                           instance, items, seed=0)
    assert one["unimodal_predictions"] == {"t1": 1, "t2": 0, "series": 0}
    assert one["label"] == "dominance" and one["dominant"] == "t1"


def test_a_pair_that_does_not_interact_is_zero_not_rounding_noise_and_says_so():
    """An additive float32 model's ablation and exact Shapley cells were rounding (6e-8), which
    the heatmap's scale drew at full colour and the prediction path drew as pairs."""
    _, items = three_modalities(Additive3(), 4, seed=1)
    adapter = ModelAdapter(Additive3().eval(), list(_.modalities.values()), ["k0", "k1"])
    for method in ("pairwise_ablation", "shapley"):
        r = interaction(adapter, items[0], method, modalities=("t1", "series"))
        assert not np.any(r.matrix), method
        assert "'t1' and 'series' do not interact here beyond float rounding" in r.params["note"]
        assert not r.params.get("blind")
    from multiviz_widgets.kernels.prediction import prediction_path
    path = prediction_path(adapter, items[0], interaction_method="pairwise_ablation",
                           unimodal_method="gradient", modalities=("t1", "series"))
    assert path.neurons and not any(n.pairs for n in path.neurons)     # no links of 0
    interacting, items = three_modalities(Interacting3(1), 4, seed=1)
    real = interaction(interacting, items[0], "pairwise_ablation", modalities=("t1", "t2"))
    assert np.all(real.matrix != 0) and "note" not in real.params
