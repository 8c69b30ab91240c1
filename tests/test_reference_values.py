"""Kernels against independent brute-force references on small non-linear models.

Each reference is written here from the definition (plain loops over coalitions or masks of the
model's own outputs), never from the package's helpers, so a kernel that computes a plausible
but wrong quantity (a lost binomial factor, the wrong index, a wrong sampling distribution, a
wrong kernel distance, a wrong label) fails. Units are tabular columns whose baselines are not
zero, so "a unit outside the coalition" is unambiguous: its column takes its baseline value.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from multiviz_widgets import ModelAdapter, Tabular
from multiviz_widgets.kernels.interactions import interaction, interaction_type
from multiviz_widgets.kernels.unimodal import attribute


# ---------------------------------------------------------------------------------------------
# small models and their games
# ---------------------------------------------------------------------------------------------
class Fusion(nn.Module):
    """Two tabular modalities fused non-linearly (tanh, products): interactions of every order."""

    def __init__(self, na: int, nb: int, seed: int = 0, hidden: int = 4):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Linear(na, hidden)
        self.b = nn.Linear(nb, hidden)
        self.fuse = nn.Linear(2 * hidden, hidden)
        self.head = nn.Linear(hidden, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.eval()

    def forward(self, a, b):
        u, v = torch.tanh(self.a(a)), torch.tanh(self.b(b))
        return self.head(torch.tanh(self.fuse(torch.cat([u * v, u + v], 1))))


class Quadratic(nn.Module):
    """Products of affine maps of the inputs: a polynomial of degree 2 in the unit masks (within-
    and cross-modal pairs), non-linear in the inputs."""

    def __init__(self, na: int, nb: int, seed: int = 0, hidden: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Linear(na, hidden)
        self.b = nn.Linear(nb, hidden)
        self.head = nn.Linear(3 * hidden, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.eval()

    def forward(self, a, b):
        u, v = self.a(a), self.b(b)
        return self.head(torch.cat([u * v, u * u, v], 1))


def two_tables(model_cls, na: int, nb: int, seed: int = 0, scale: float = 2.0):
    """(model, adapter, instance, baselines): modalities "a" [na] and "b" [nb], one unit per
    column, with non-zero baselines."""
    rng = np.random.default_rng(seed)
    base = {"a": rng.normal(size=na).round(2), "b": rng.normal(size=nb).round(2)}
    model = model_cls(na, nb, seed)
    adapter = ModelAdapter(model, [Tabular("a", [f"a{i}" for i in range(na)],
                                           baseline=list(base["a"])),
                                   Tabular("b", [f"b{i}" for i in range(nb)],
                                           baseline=list(base["b"]))], ["no", "yes"])
    inst = {m: (rng.normal(size=len(base[m])) * scale).astype(np.float32) for m in ("a", "b")}
    return model, adapter, inst, base


def game(model, inst, base, target: int = 1) -> np.ndarray:
    """v[S] for every coalition S (a bit mask over the units of a, then of b): the model's
    target logit with the units outside S at their baseline."""
    x = np.concatenate([inst["a"], inst["b"]]).astype(np.float32)
    b = np.concatenate([base["a"], base["b"]]).astype(np.float32)
    n, na = len(x), len(inst["a"])
    present = (np.arange(2 ** n)[:, None] >> np.arange(n)[None, :]) & 1     # [2^n, n]
    rows = torch.from_numpy(np.where(present == 1, x, b))
    with torch.no_grad():
        return model(rows[:, :na], rows[:, na:])[:, target].double().numpy()


def shapley_values(v: np.ndarray, n: int) -> np.ndarray:
    """phi_i = sum over S not containing i of |S|! (n - |S| - 1)! / n! (v(S + i) - v(S))."""
    phi = np.zeros(n)
    for i in range(n):
        for s in range(2 ** n):
            if s >> i & 1:
                continue
            k = bin(s).count("1")
            weight = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
            phi[i] += weight * (v[s | 1 << i] - v[s])
    return phi


def pair_derivative(v: np.ndarray, s: int, i: int, j: int) -> float:
    """Delta_ij(S) = v(S + i + j) - v(S + i) - v(S + j) + v(S)."""
    return v[s | 1 << i | 1 << j] - v[s | 1 << i] - v[s | 1 << j] + v[s]


def pair_index(v: np.ndarray, n: int, i: int, j: int, index: str) -> float:
    """SII (= k-SII at order 2): sum_S |S|! (n - |S| - 2)! / (n - 1)! Delta_ij(S); STII (top
    order 2): (2 / n) sum_S Delta_ij(S) / C(n - 1, |S|); S over the subsets of N \\ {i, j}."""
    total = 0.0
    for s in range(2 ** n):
        if s >> i & 1 or s >> j & 1:
            continue
        k = bin(s).count("1")
        if index == "STII":
            weight = 2.0 / (n * math.comb(n - 1, k))
        else:
            weight = math.factorial(k) * math.factorial(n - k - 2) / math.factorial(n - 1)
        total += weight * pair_derivative(v, s, i, j)
    return total


def faithful_pairs(v: np.ndarray, n: int) -> dict[tuple[int, int], float]:
    """FSII of order 2 (Tsai et al. 2023): the terms E_T (1 <= |T| <= 2) minimising
    sum_S mu(S) (v(S) - v(empty) - sum_{T in S} E_T)^2 over the proper non-empty coalitions,
    mu the Shapley kernel (n - 1) / (C(n, |S|) |S| (n - |S|)), subject to the grand coalition
    being fitted exactly; solved as its KKT system. Returns the pair terms."""
    terms = [(i,) for i in range(n)] + [(i, j) for i in range(n) for j in range(i + 1, n)]
    rows, target, mu = [], [], []
    for s in range(1, 2 ** n - 1):
        k = bin(s).count("1")
        rows.append([float(all(s >> p & 1 for p in t)) for t in terms])
        target.append(v[s] - v[0])
        mu.append((n - 1) / (math.comb(n, k) * k * (n - k)))
    x, y, w = np.array(rows), np.array(target), np.array(mu)
    m = len(terms)
    kkt = np.zeros((m + 1, m + 1))
    kkt[:m, :m] = 2 * x.T @ (w[:, None] * x)
    kkt[:m, m] = kkt[m, :m] = 1.0
    rhs = np.concatenate([2 * x.T @ (w * y), [v[2 ** n - 1] - v[0]]])
    solution = np.linalg.solve(kkt, rhs)
    return {t: solution[k] for k, t in enumerate(terms) if len(t) == 2}


def scores(result) -> np.ndarray:
    return np.concatenate([result.scores["a"], result.scores["b"]])


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


# ---------------------------------------------------------------------------------------------
# KernelSHAP
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [(3, 3), (2, 3)])
def test_exact_kernel_shap_equals_brute_force_shapley_values_of_a_nonlinear_model(sizes):
    """With n_samples >= 2^U KernelSHAP enumerates every coalition and must return the Shapley
    values themselves. Guards the exact Shapley-kernel weights (a weight without its binomial
    factor C(U, |S|) still sums to f(x) - f(b), but gave values off by 0.15 on 6 units)."""
    model, adapter, inst, base = two_tables(Fusion, *sizes, seed=sum(sizes))
    n = sum(sizes)
    want = shapley_values(game(model, inst, base), n)
    r = attribute(adapter, inst, "kernel_shap", target=1, n_samples=2 ** n)
    assert r.forward_passes == 2 ** n and not r.params["underdetermined"]
    np.testing.assert_allclose(scores(r), want, rtol=1e-6, atol=1e-6)
    assert np.abs(want).max() > 0.1


def test_sampled_kernel_shap_is_close_to_brute_force_shapley_values_for_every_seed():
    """Sampled KernelSHAP (14 units, 16,000 of the 16,384 coalitions) estimates the Shapley
    values of a model with interactions of every order. Guards the sampling distribution of the
    coalition sizes (the Shapley kernel's mass per size): sizes drawn uniformly instead gave a
    relative error of 0.19 to 0.24 for each of 30 seeds, the right distribution 0.03 to
    0.07."""
    model, adapter, inst, base = two_tables(Fusion, 7, 7, seed=0)
    want = shapley_values(game(model, inst, base), 14)
    errors = [relative_error(scores(attribute(adapter, inst, "kernel_shap", target=1,
                                              n_samples=16_000, seed=seed)), want)
              for seed in range(10)]
    assert max(errors) < 0.1, errors


def test_sampled_kernel_shap_is_exact_on_a_quadratic_game_through_paired_coalitions():
    """A game of degree 2 in the masks (products of affine maps of the inputs) is fitted exactly
    by the Shapley-kernel regression when every sampled coalition comes with its complement:
    the pair's residuals (even in z - 1/2) are orthogonal to the regressors (odd). Guards the
    antithetic pairing: a coalition repeated instead of complemented was off by 32 to 81%
    (30 seeds), paired ones by 1e-7 (float32 rounding)."""
    model, adapter, inst, base = two_tables(Quadratic, 7, 7, seed=1, scale=1.0)
    want = shapley_values(game(model, inst, base), 14)
    errors = [relative_error(scores(attribute(adapter, inst, "kernel_shap", target=1,
                                              n_samples=200, seed=seed)), want)
              for seed in range(10)]
    assert max(errors) < 1e-5, errors


# ---------------------------------------------------------------------------------------------
# LIME
# ---------------------------------------------------------------------------------------------
def lime_population(v: np.ndarray, n: int, keep: float, width: float, distance: str
                    ) -> np.ndarray:
    """The regression LIME's samples estimate: weighted least squares of v on [1, z] over all
    2^n masks z, each weighted by its probability keep^|z| (1 - keep)^(n - |z|) times the kernel
    exp(-d^2 / (2 width^2)), d the distance to the all-ones mask (cosine: 1 - sqrt(|z| / n),
    hamming: 1 - |z| / n). The ridge penalty (alpha / n_samples on weights summing to 1) and
    the first sample (all ones) vanish as the samples grow. Returns the unit coefficients."""
    x, w = [], []
    for s in range(2 ** n):
        z = [float(s >> k & 1) for k in range(n)]
        kept = sum(z)
        d = 1 - math.sqrt(kept / n) if distance == "cosine" else 1 - kept / n
        w.append(keep ** kept * (1 - keep) ** (n - kept) * math.exp(-d * d / (2 * width ** 2)))
        x.append([1.0] + z)
    x, w = np.array(x), np.array(w)
    return np.linalg.solve(x.T @ (w[:, None] * x), x.T @ (w * v))[1:]


@pytest.mark.parametrize("distance, keep", [("cosine", 0.5), ("hamming", 0.7)])
def test_lime_converges_to_its_population_regression_for_every_seed(distance, keep):
    """LIME with many samples of 6 units is close to the exact population version of its
    weighted regression (every mask weighted by its sampling probability and its kernel).
    Guards the kernel's distance: measured to the all-zeros mask instead of the all-ones one,
    LIME was off by 0.67 to 0.73 of the scores' size for each of 30 seeds; right, by 0.01 to
    0.06."""
    model, adapter, inst, base = two_tables(Fusion, 3, 3, seed=2)
    want = lime_population(game(model, inst, base), 6, keep, 0.25, distance)
    errors = [relative_error(scores(attribute(adapter, inst, "lime", target=1, n_samples=5000,
                                              seed=seed, distance=distance,
                                              keep_probability=keep)), want)
              for seed in range(10)]
    assert max(errors) < 0.1, errors


# ---------------------------------------------------------------------------------------------
# Shapley interactions
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", ["k-SII", "SII", "STII", "FSII"])
def test_exact_shapley_interactions_equal_brute_force_indices(index):
    """The exact cross block of every index (6 players: all units of both modalities) equals
    its definition computed here. Guards that the index asked for is the one computed: STII
    differs from k-SII by up to 0.19 on this model, FSII by 0.018."""
    model, adapter, inst, base = two_tables(Fusion, 3, 3, seed=2)
    v = game(model, inst, base)
    if index == "FSII":
        fsii = faithful_pairs(v, 6)
        want = np.array([[fsii[(i, 3 + j)] for j in range(3)] for i in range(3)])
    else:
        want = np.array([[pair_index(v, 6, i, 3 + j, index) for j in range(3)]
                         for i in range(3)])
    r = interaction(adapter, inst, "shapley", target=1, index=index, max_players=None)
    assert r.params["exact"] and r.params["players"] == {"a": [0, 1, 2], "b": [0, 1, 2]}
    np.testing.assert_allclose(r.matrix, want, rtol=1e-6, atol=1e-8)
    assert np.abs(want).max() > 0.5


# ---------------------------------------------------------------------------------------------
# interaction types
# ---------------------------------------------------------------------------------------------
class HandSet(nn.Module):
    """logits [0, 2 a + b - 4 a b] of one column a and one column b."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[0.0, 0.0, 0.0], [2.0, 1.0, -4.0]]))
            self.head.bias.zero_()

    def forward(self, a, b):
        return self.head(torch.cat([a, b, a * b], 1))


@pytest.mark.parametrize("a, b, label, dominant, predicted", [
    (1.0, 0.5, "complement", None, 1),      # s = 0.5; parts 2 and 0.5: both say "yes"
    (-0.5, -0.5, "complement", None, 0),    # s = -2.5; parts -1 and -0.5: both say "no"
    (1.0, -1.0, "dominance", "a", 1),       # s = 5; parts 2 ("yes") and -1 ("no")
    (1.0, 1.0, "conflict", None, 0),        # s = -1; EMAP 3 says "yes"
])
def test_interaction_type_labels_hand_set_instances(a, b, label, dominant, predicted):
    """On references a, b in {-1, 1} (every combination, so both means are 0) the unimodal part
    of a is 2a, of b is b, the grand mean 0 and EMAP 2a + b, while the model adds -4ab.
    complement: both modalities alone pick the predicted class; dominance: one of them;
    conflict: EMAP's additive prediction is not the model's. Guards against calling "both
    modalities agree" dominance."""
    adapter = ModelAdapter(HandSet(), [Tabular("a", ["a"]), Tabular("b", ["b"])],
                           ["no", "yes"])
    refs = [{"a": np.array([x], np.float32), "b": np.array([y], np.float32)}
            for x in (-1, 1) for y in (-1, 1)]
    r = interaction_type(adapter, {"a": np.array([a], np.float32),
                                   "b": np.array([b], np.float32)}, reference=refs)
    assert (r["label"], r["dominant"], r["predicted"]) == (label, dominant, predicted)
    # the numbers behind the label, from the definition: mean over the references' other side
    np.testing.assert_allclose(r["grand_mean"] + r["unimodal"]["a"], [0, 2 * a], atol=1e-6)
    np.testing.assert_allclose(r["grand_mean"] + r["unimodal"]["b"], [0, b], atol=1e-6)
    np.testing.assert_allclose(r["logits"], [0, 2 * a + b - 4 * a * b], atol=1e-6)
    assert r["unimodal_predictions"] == {"a": int(a > 0), "b": int(b > 0)}
