"""Stage 2: cross-modal interactions between the units of two modalities.

``interaction(adapter, instance, method=..., modalities=(a, b), target=...)`` returns an
:class:`~multiviz_widgets.results.Interaction`: a matrix [U_a, U_b] (rows: units of a, columns:
units of b) with its cost. Methods (see METHODS.md):

* ``second_order``: the mixed Hessian block d^2 f / dx_a dx_b summed over the scalars of each
  pair of units. Exact and batched: one forward and one backward (create_graph) give the
  first-order attribution a_u of every unit u of the contracted side r (by default the side
  with fewer units); the U_r second backward passes d a_u / dx_c run as one vmapped batch
  (``is_grads_batched``). Cost: 1 forward, 1 + U_r backwards. ``mode="replicate"`` instead
  replicates the instance U_r times along the batch (row k contracted to its own unit k, one
  double backward): U_r forwards, 2 U_r backwards. MultiViz's variant contracts side a first with
  phi = |.| (``phi="abs"``) and/or grad x input (``attribution="grad_x_input"``).
  The model must treat batch rows independently (eval mode, no batch statistics).
* ``pairwise_ablation``: D[u, v] = f(x) - f(x\\u) - f(x\\v) + f(x\\{u, v}); 1 + U_a + U_b +
  U_a U_b forwards, batched.
* ``shapley``: order-2 Shapley interaction indices (k-SII, STII, FSII or SII, computed by
  shapiq) over the players "units of a and of b"; the cross block [U_a, U_b] is reported.
  Exact when 2^players <= budget, otherwise shapiq's approximator under the budget.

Dataset-level functions: ``emap`` (EMAP of N instances from one batched N x N logit matrix;
each modality is encoded once and only the pairs are fused, with the split the model declares
(``encode_modality``/``fuse_encodings``) or one traced by ``kernels.factorize``),
``emap_gap``, ``dime`` (UC = EMAP(f) and MI = f - UC, each explained per modality with LIME) and
``interaction_type`` (dominance / complement / conflict from EMAP's unimodal parts).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ..adapter import AdapterError, ModelAdapter, Prepared, Target
from ..data import MultimodalDataset
from ..progress import ProgressFn, report
from ..results import Interaction, Result, Stopwatch
from .common import (PERTURBATION_BATCH, as_prepared, evaluate_masks, masked_continuous,
                     resolve_target)
from .factorize import FactorizationError, reject_factorization, trace_factorization

__all__ = ["INTERACTION_METHODS", "interaction", "second_order", "pairwise_ablation", "shapley",
           "EmapResult", "emap", "emap_gap", "emap_matrix", "pairwise_masks", "DimeResult", "dime", "interaction_type",
           "interaction_types", "SHAPLEY_INDICES"]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _pair(adapter: ModelAdapter, modalities) -> tuple[str, str]:
    """The two modalities (a, b) of a stage-2 method, validated."""
    names = adapter.names
    if len(names) < 2:
        raise ValueError(f"Cross-modal interactions need two modalities; the adapter has only "
                         f"{names}. Use stage 1 (kernels.unimodal.attribute) for one modality.")
    if modalities is None:
        return names[0], names[1]
    if isinstance(modalities, str):
        raise ValueError(f"modalities must be a pair of names such as ({names[0]!r}, "
                         f"{names[1]!r}), got the single string {modalities!r}.")
    try:
        pair = tuple(modalities)
    except TypeError:
        raise ValueError(f"modalities must be a pair of modality names drawn from {names}, got "
                         f"{modalities!r}.") from None
    if len(pair) != 2:
        raise ValueError(f"modalities must name exactly two modalities (rows, columns), got "
                         f"{list(pair)}.")
    unknown = [m for m in pair if m not in names]
    if unknown:
        raise ValueError(f"Unknown modalities {unknown}; the adapter's modalities are {names}.")
    if pair[0] == pair[1]:
        raise ValueError(f"The two modalities must differ, got {pair[0]!r} twice; interactions "
                         "are between units of two different modalities.")
    return pair  # type: ignore[return-value]


def _scalar(adapter: ModelAdapter, raw, continuous, target: Target) -> torch.Tensor:
    """f_target [B] for model inputs raw (batch B or 1) with some continuous inputs replaced."""
    if target.kind == "class":
        return adapter.forward(raw, continuous)[:, target.index]
    logits, h = adapter.forward(raw, continuous, features=True)
    return adapter.output(logits, h, target)


def _positive_int(value, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{what} must be an integer of at least {minimum}, got {value!r}.")
    return int(value)


# --------------------------------------------------------------------------------------------
# second-order gradients
# --------------------------------------------------------------------------------------------
def second_order(adapter: ModelAdapter, prepared: Prepared, a: str, b: str, target: Target,
                 progress: ProgressFn = None, phi: str = "identity",
                 attribution: str = "auto", times_input: bool | None = None,
                 batch_size: int = 64, mode: str = "auto") -> tuple[np.ndarray, int, int, dict]:
    """Second-order interaction matrix [U_a, U_b] (see the module docstring); returns
    (matrix, forwards, backwards, params).

    phi: "identity" (exact mixed Hessian, contracted to units) or "abs" (MultiViz: |a_u|).
    attribution: the first-order attribution a_u of side a: "gradient" or "grad_x_input"
    ((x - baseline) * gradient). times_input: multiply the b side by (x_b - baseline) too.
    Defaults ("auto" / None): each side moves its units along the modality's own direction,
    I[u, v] = d_u' H d_v, with d_u the indicator of u's scalars, or (x_u - baseline) where the
    modality says so (``Modality.weigh_units_by_input``, true for embedded tokens, whose
    coordinates are an arbitrary basis: summing them would differentiate along a meaningless
    direction, and a bag-of-words encoder would give every token the same row).
    mode: "vmap" (one forward and one backward of the instance, then the U_r second backward
    passes batched with torch's vmapped ``is_grads_batched``; cost 1 forward, 1 + U_r
    backwards), "replicate" (the instance replicated U_r times along the batch; cost U_r
    forwards, 2 U_r backwards) or "auto" (vmap, falling back to replicate for models whose
    operations vmap does not support). Both are exact and need batch rows to be independent.
    """
    if phi not in ("identity", "abs"):
        raise ValueError(f"phi must be 'identity' or 'abs', got {phi!r}.")
    if attribution not in ("auto", "gradient", "grad_x_input"):
        raise ValueError(f"attribution must be 'auto', 'gradient' or 'grad_x_input', got "
                         f"{attribution!r}.")
    if mode not in ("auto", "vmap", "replicate"):
        raise ValueError(f"mode must be 'auto', 'vmap' or 'replicate', got {mode!r}.")
    batch_size = _positive_int(batch_size, "batch_size")
    ua, ub = prepared.n_units[a], prepared.n_units[b]
    # The exact identity-phi matrix is symmetric in its two sides: contract the smaller one.
    auto = attribution == "auto" and times_input is None
    if attribution == "auto" and not auto:
        attribution = "grad_x_input" if adapter.modalities[a].weigh_units_by_input else "gradient"
    symmetric = phi == "identity" and (auto or (attribution == "grad_x_input") == bool(times_input))
    swap = symmetric and ub < ua
    r, c = (b, a) if swap else (a, b)
    if auto:
        attribution = "grad_x_input" if adapter.modalities[r].weigh_units_by_input else "gradient"
        times_input = adapter.modalities[c].weigh_units_by_input if phi == "identity" else False
    args = (adapter, prepared, r, c, target, progress, phi, attribution, times_input, batch_size)
    used = mode
    if mode in ("auto", "vmap"):
        try:
            m, fwd, bwd = _sog_vmap(*args)
            used = "vmap"
        except RuntimeError:
            if mode == "vmap":
                raise
            used = "replicate"
    if used == "replicate":
        m, fwd, bwd = _sog_replicate(*args)
    if swap:
        m = m.T
    params = {"phi": phi, "attribution": attribution, "times_input": bool(times_input),
              "contracted": r, "batch_size": batch_size, "mode": used}
    return np.ascontiguousarray(m), fwd, bwd, params


def _own_units(index: torch.Tensor, start: int, k: int, dtype) -> torch.Tensor:
    """[k, *index.shape]: row i is the indicator of unit start + i."""
    units = torch.arange(start, start + k, device=index.device)
    return (index.unsqueeze(0) == units.view(-1, *([1] * index.dim()))).to(dtype)


def _sog_vmap(adapter, prepared, r, c, target, progress, phi, attribution, times_input,
              batch_size):
    xr, xc = prepared.continuous[r], prepared.continuous[c]
    ir, ic = prepared.index[r], prepared.index[c]
    n_rows = prepared.n_units[r]
    xr1 = xr.detach().unsqueeze(0).clone().requires_grad_(True)
    xc1 = xc.detach().unsqueeze(0).clone().requires_grad_(True)
    report(progress, 0, n_rows, "second-order gradients")
    with torch.enable_grad():
        f = _scalar(adapter, prepared.raw, {r: xr1, c: xc1}, target)
        g, = torch.autograd.grad(f.sum(), xr1, create_graph=True)
        g = g[0]
        if attribution == "grad_x_input":
            g = g * (xr - prepared.baseline[r])
        own = _own_units(ir, 0, n_rows, g.dtype)
        a_u = (g.unsqueeze(0) * own).reshape(n_rows, -1).sum(1)      # every unit's attribution
        if phi == "abs":
            a_u = a_u.abs()
        rows = []
        for s in range(0, n_rows, batch_size):
            k = min(batch_size, n_rows - s)
            if a_u.requires_grad:
                eye = torch.zeros(k, n_rows, dtype=a_u.dtype, device=a_u.device)
                eye[torch.arange(k), s + torch.arange(k)] = 1
                h, = torch.autograd.grad(a_u, xc1, grad_outputs=eye, is_grads_batched=True,
                                         retain_graph=True, allow_unused=True)
            else:
                h = None
            h = torch.zeros(k, *xc.shape, dtype=xc.dtype) if h is None else h.reshape(k, *xc.shape)
            if times_input:
                h = h * (xc - prepared.baseline[c])
            rows.append(adapter.modalities[c].pool(h.detach(), xc, ic))
            report(progress, s + k, n_rows, "second-order gradients")
    return torch.cat(rows).double().cpu().numpy(), 1, 1 + n_rows


def _sog_replicate(adapter, prepared, r, c, target, progress, phi, attribution, times_input,
                   batch_size):
    xr, xc = prepared.continuous[r], prepared.continuous[c]
    ir, ic = prepared.index[r], prepared.index[c]
    wr = (xr - prepared.baseline[r]) if attribution == "grad_x_input" else None
    wc = (xc - prepared.baseline[c]) if times_input else None
    n_rows = prepared.n_units[r]
    rows = []
    report(progress, 0, n_rows, "second-order gradients")
    for s in range(0, n_rows, batch_size):
        k = min(batch_size, n_rows - s)
        xr_b = xr.detach().unsqueeze(0).repeat(k, *([1] * xr.dim())).requires_grad_(True)
        xc_b = xc.detach().unsqueeze(0).repeat(k, *([1] * xc.dim())).requires_grad_(True)
        with torch.enable_grad():
            f = _scalar(adapter, prepared.raw, {r: xr_b, c: xc_b}, target)
            g, = torch.autograd.grad(f.sum(), xr_b, create_graph=True)
            if wr is not None:
                g = g * wr
            a_u = (g * _own_units(ir, s, k, g.dtype)).reshape(k, -1).sum(1)  # row i: unit s + i
            if phi == "abs":
                a_u = a_u.abs()
            h = None
            if a_u.requires_grad:
                h, = torch.autograd.grad(a_u.sum(), xc_b, allow_unused=True)
        if h is None:                                        # no path from x_c: no interaction
            h = torch.zeros_like(xc_b)
        if wc is not None:
            h = h * wc
        rows.append(adapter.modalities[c].pool(h.detach(), xc, ic))
        report(progress, s + k, n_rows, "second-order gradients")
    return torch.cat(rows).double().cpu().numpy(), n_rows, 2 * n_rows


# --------------------------------------------------------------------------------------------
# pairwise ablation
# --------------------------------------------------------------------------------------------
def pairwise_masks(ua: int, ub: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks for 1 + U_a + U_b + U_a U_b forwards: full, each u removed, each v, each pair (u, v)."""
    n = 1 + ua + ub + ua * ub
    ma, mb = torch.ones(n, ua), torch.ones(n, ub)
    ar_a, ar_b = torch.arange(ua), torch.arange(ub)
    ma[1 + ar_a, ar_a] = 0
    mb[1 + ua + ar_b, ar_b] = 0
    o = 1 + ua + ub
    uu, vv = torch.meshgrid(ar_a, ar_b, indexing="ij")
    rows = o + (uu * ub + vv).reshape(-1)
    ma[rows, uu.reshape(-1)] = 0
    mb[rows, vv.reshape(-1)] = 0
    return ma, mb


def pairwise_ablation(adapter: ModelAdapter, prepared: Prepared, a: str, b: str, target: Target,
                      progress: ProgressFn = None, batch_size: int = PERTURBATION_BATCH
                      ) -> tuple[np.ndarray, int, int, dict]:
    """D[u, v] = f(x) - f(x\\u) - f(x\\v) + f(x\\{u,v}) as a matrix [U_a, U_b] (removed units take
    the baseline). Cost: 1 + U_a + U_b + U_a U_b forwards in batches of batch_size."""
    batch_size = _positive_int(batch_size, "batch_size")
    ua, ub = prepared.n_units[a], prepared.n_units[b]
    ma, mb = pairwise_masks(ua, ub)
    f = evaluate_masks(adapter, prepared, {a: ma, b: mb}, target, batch_size, progress,
                       "pairwise ablations").double().cpu().numpy()
    f0, fa, fb = f[0], f[1:1 + ua], f[1 + ua:1 + ua + ub]
    fab = f[1 + ua + ub:].reshape(ua, ub)
    d = f0 - fa[:, None] - fb[None, :] + fab
    return d, len(f), 0, {"batch_size": batch_size}


# --------------------------------------------------------------------------------------------
# Shapley interactions (shapiq)
# --------------------------------------------------------------------------------------------
SHAPLEY_INDICES = ("k-SII", "STII", "FSII", "SII")
#: Exact computation (all 2^n coalitions) up to this many players, when the budget allows.
EXACT_MAX_PLAYERS = 12


def _shapiq_approximator(index: str, n: int, seed: int, budget: int):
    """shapiq's approximator for an order-2 index: permutation sampling (unbiased, and exactly 0
    on pairs that never interact) when the budget buys at least two permutations, else a
    regression / stratified estimator; FSII always by its regression."""
    import shapiq
    if index == "FSII":
        return shapiq.RegressionFSII(n=n, max_order=2, random_state=seed)
    perm = (shapiq.PermutationSamplingSII(n=n, max_order=2, index=index, random_state=seed)
            if index in ("k-SII", "SII") else
            shapiq.PermutationSamplingSTII(n=n, max_order=2, random_state=seed))
    if budget >= 2 * perm.iteration_cost + n + 2:
        return perm
    if index in ("k-SII", "SII"):
        return shapiq.KernelSHAPIQ(n=n, max_order=2, index=index, random_state=seed)
    return shapiq.SVARMIQ(n=n, max_order=2, index="STII", random_state=seed)


def shapley(adapter: ModelAdapter, prepared: Prepared, a: str, b: str, target: Target,
            progress: ProgressFn = None, index: str = "k-SII", budget: int = 4096,
            max_players: int | None = 24, seed: int = 0, batch_size: int = PERTURBATION_BATCH
            ) -> tuple[np.ndarray, int, int, dict]:
    """Cross block [U_a, U_b] of order-2 Shapley interactions computed by shapiq.

    Players are the units of a and b (a unit "absent" takes its baseline; other modalities stay).
    Exact (shapiq.ExactComputer) when 2^players <= budget and players <= EXACT_MAX_PLAYERS;
    otherwise shapiq's approximator for the index with ``budget`` evaluations: permutation
    sampling for k-SII/SII/STII (unbiased; pairs that never interact get exactly 0) when the
    budget buys two permutations, else KernelSHAPIQ / SVARMIQ; RegressionFSII for FSII (FSII is
    a least-squares fit, so within-modality higher-order effects can leak into cross pairs).
    max_players (default 24; None = every unit): when the two modalities have more units, keep
    only those with the largest occlusion effect (split between the modalities in proportion
    to their units; 2 + U_a + U_b extra forwards); the other units stay present and their cells
    are 0 (``params["players"]`` lists the players). A few thousand evaluations cannot estimate
    the ~U_a U_b pairs of 70 players, so keep it small. Cost: at most budget forwards (plus the
    occlusion pass).
    """
    if index not in SHAPLEY_INDICES:
        raise ValueError(f"Unknown Shapley interaction index {index!r}; choose one of "
                         f"{list(SHAPLEY_INDICES)}.")
    budget = _positive_int(budget, "budget", 4)
    batch_size = _positive_int(batch_size, "batch_size")
    import shapiq
    ua, ub = prepared.n_units[a], prepared.n_units[b]
    pa, pb = np.arange(ua), np.arange(ub)
    forwards = 0
    if max_players is not None:
        max_players = _positive_int(max_players, "max_players", 2)
        if ua + ub > max_players:
            ka = int(np.clip(round(max_players * ua / (ua + ub)), 1, max(1, max_players - 1)))
            kb = max(1, max_players - ka)
            occ = {}
            for name, u in ((a, ua), (b, ub)):
                m = torch.ones(1 + u, u)
                m[1 + torch.arange(u), torch.arange(u)] = 0
                f = evaluate_masks(adapter, prepared, {name: m}, target, batch_size)
                occ[name] = (f[0] - f[1:]).abs().double().cpu().numpy()
                forwards += 1 + u
            pa = np.sort(np.argsort(-occ[a], kind="stable")[:min(ka, ua)])
            pb = np.sort(np.argsort(-occ[b], kind="stable")[:min(kb, ub)])
    na, nb = len(pa), len(pb)
    n = na + nb
    evaluated = [0]

    def game(coalitions: np.ndarray) -> np.ndarray:
        z = torch.from_numpy(np.atleast_2d(np.asarray(coalitions, dtype=np.float32)))
        ma, mb = torch.ones(z.shape[0], ua), torch.ones(z.shape[0], ub)
        ma[:, torch.from_numpy(pa)] = z[:, :na]
        mb[:, torch.from_numpy(pb)] = z[:, na:]
        out = evaluate_masks(adapter, prepared, {a: ma, b: mb}, target, batch_size)
        evaluated[0] += z.shape[0]
        report(progress, min(evaluated[0], budget), budget, "Shapley coalitions")
        return out.double().cpu().numpy()

    exact = n <= EXACT_MAX_PLAYERS and 2 ** n <= budget
    if exact:
        approximator = "ExactComputer"
        iv = shapiq.ExactComputer(game, n_players=n)(index, order=2)
    else:
        ap = _shapiq_approximator(index, n, seed, budget)
        approximator = type(ap).__name__
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*budget.*", category=UserWarning)
            kw = {}
            if hasattr(ap, "iteration_cost"):      # permutations evaluated per game call
                kw["batch_size"] = max(1, batch_size // max(1, ap.iteration_cost))
            iv = ap.approximate(budget=budget, game=game, **kw)
    lookup = iv.interaction_lookup
    values = np.asarray(iv.values, dtype=np.float64)
    m = np.zeros((ua, ub))
    for i, u in enumerate(pa):
        for j, v in enumerate(pb):
            pos = lookup.get((i, na + j))
            if pos is not None:
                m[u, v] = values[pos]
    params = {"index": index, "budget": budget, "exact": exact, "approximator": approximator,
              "seed": seed,
              "max_players": max_players, "players": {a: pa.tolist(), b: pb.tolist()}}
    return m, forwards + evaluated[0], 0, params


# --------------------------------------------------------------------------------------------
# the uniform entry point
# --------------------------------------------------------------------------------------------
INTERACTION_METHODS: dict[str, Callable] = {
    "second_order": second_order,
    "pairwise_ablation": pairwise_ablation,
    "shapley": shapley,
}


def interaction(adapter: ModelAdapter, instance, method: str = "second_order", modalities=None,
                target=None, progress: ProgressFn = None, **params) -> Interaction:
    """The unit x unit interaction matrix between modalities (a, b) of one instance.

    instance: a dict {modality: raw input} or a Prepared; modalities: (rows, columns), default
    the adapter's first two; target: None (predicted class), a class index or name, or Neuron(j).
    Extra params go to the method (see ``INTERACTION_METHODS``). The result states its cost.
    """
    if method not in INTERACTION_METHODS:
        raise ValueError(f"Unknown interaction method {method!r}; choose one of "
                         f"{list(INTERACTION_METHODS)}.")
    a, b = _pair(adapter, modalities)
    with Stopwatch() as sw:
        prepared = as_prepared(adapter, instance)
        t = resolve_target(adapter, prepared, target)
        matrix, fwd, bwd, used = INTERACTION_METHODS[method](
            adapter, prepared, a, b, t, progress=progress, **params)
    return Interaction(method=method, target=t, params=used,
                       forward_passes=int(fwd) + (1 if target is None else 0),
                       backward_passes=int(bwd), seconds=sw.seconds, modalities=(a, b),
                       matrix=np.asarray(matrix, dtype=np.float64),
                       row_labels=list(prepared.labels[a]), col_labels=list(prepared.labels[b]))


# --------------------------------------------------------------------------------------------
# EMAP
# --------------------------------------------------------------------------------------------
@dataclass
class EmapResult(Result):
    """EMAP of N instances: their outputs and the additive projection fhat of those outputs.

    logits [N, K] (K = classes, or 1 for a neuron target), emap_logits [N, K];
    unimodal {modality: [N, K]}: each modality's centred unimodal part (E_others f(x_m, .) -
    grand mean); grand_mean [K]; matrix [N, N, K] with matrix[i, j] = f(x_a^i, x_b^j) (two
    modalities, when kept); indices: the dataset indices of the N instances (or 0..N-1).
    """

    modalities: tuple[str, ...] = ()
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    logits: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    emap_logits: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    unimodal: dict[str, np.ndarray] = field(default_factory=dict)
    grand_mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    matrix: np.ndarray | None = None
    output_names: list[str] = field(default_factory=list)

    @property
    def interaction(self) -> np.ndarray:
        """f - fhat: the part of the outputs that the additive projection cannot explain."""
        return self.logits - self.emap_logits


def _instances(dataset_or_list, indices=None) -> tuple[list[dict], np.ndarray]:
    if isinstance(dataset_or_list, MultimodalDataset):
        idx = np.arange(len(dataset_or_list)) if indices is None else np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1:
            raise ValueError(f"indices must be a 1-D list of instance numbers, got shape {idx.shape}.")
        return [dataset_or_list[int(i)] for i in idx], idx
    if isinstance(dataset_or_list, Mapping):
        raise ValueError("Expected several instances (a list of dicts or a MultimodalDataset), "
                         "got a single instance dict.")
    items = list(dataset_or_list)
    if indices is not None:
        idx = np.asarray(indices, dtype=np.int64)
        items = [items[int(i)] for i in idx]
    else:
        idx = np.arange(len(items))
    return items, idx


def _output_fn(adapter: ModelAdapter, target) -> tuple[Callable, Target | None, list[str]]:
    """(raw batch -> outputs [B, K], normalised target, output names)."""
    t = None if target is None else adapter.target(target)
    if t is not None and t.kind == "neuron":
        def out(raw):
            logits, h = adapter.forward(raw, features=True)
            return adapter.output(logits, h, t)[:, None]
        return out, t, [f"neuron {t.index}"]
    return (lambda raw: adapter.forward(raw)), t, list(adapter.class_names)


def _index_raw(raw: Mapping[str, torch.Tensor], idx: Mapping[str, torch.Tensor]) -> dict:
    return {n: raw[n][idx[n]] for n in raw}


@torch.no_grad()
def emap(adapter: ModelAdapter, instances, target=None, progress: ProgressFn = None,
         indices: Sequence[int] | None = None, batch_size: int = PERTURBATION_BATCH, keep_matrix: bool = True,
         factorized: bool | str | None = None) -> EmapResult:
    """EMAP (Hessel & Lee 2020) of N instances against themselves as the reference set.

    instances: a list of instance dicts or a MultimodalDataset (with optional ``indices``).
    Two modalities: one batched N x N output matrix M[i, j] = f(x_a^i, x_b^j) gives
    fhat[t] = mean_j M[t, j] + mean_i M[i, t] - mean M (cost N^2 forwards, chunked).
    M > 2 modalities: the first-order functional-ANOVA projection with the other modalities kept
    together, fhat[t] = sum_m mean_j f(x_m^t, x_{-m}^j) - (M - 1) grand mean (cost M N^2
    forwards); it is exact on additive models and idempotent, like the two-modality formula.
    target: None or a class (all logits, K = C), or Neuron(j) (K = 1).

    factorized: with two modalities most of each pair's forward pass encodes one modality alone,
    so the encodings of the N instances are computed once and only the N^2 pairs are fused:
    the same numbers for a fraction of the cost. Two ways to split the model:
    "declared": the model defines ``encode_modality(name, x)`` and ``fuse_encodings({name:
    encoding})`` with model(*inputs) == fuse_encodings({m: encode_modality(m, x_m)});
    "traced": ``kernels.factorize.trace_factorization`` cuts the model's torch.fx graph where
    the modalities meet (any fx-traceable model). Either way fused pairs are checked against
    plain forward passes (the N own pairs and a few others) before they are used.
    None (default): declared if the model defines both methods, else traced when the model
    traces and the check passes, else N^2 full forward passes (``params["factorization"]``
    says which was used and why). True: declared or traced, an error if neither works.
    False: full forward passes.
    """
    batch_size = _positive_int(batch_size, "batch_size")
    items, idx = _instances(instances, indices)
    n = len(items)
    if n < 2:
        raise ValueError(f"EMAP needs at least 2 instances (the reference set), got {n}.")
    names = adapter.names
    if len(names) < 2:
        raise ValueError(f"EMAP needs two or more modalities; the adapter has only {names}.")
    _check_factorized(factorized)
    out_fn, t, out_names = _output_fn(adapter, target)
    with Stopwatch() as sw:
        raw = adapter.collate(items)
        groups = [names[0]] if len(names) == 2 else list(names)   # modality m vs all others
        total = len(groups) * n * n
        report(progress, 0, total, "EMAP pairs")
        mats, kinds, notes = [], [], []
        for g, m in enumerate(groups):
            mat, kind, why = _with_split(adapter, factorized, m, lambda split: _emap_fused(
                adapter, split, raw, n, t, out_fn, batch_size, progress, g * n * n, total))
            kinds.append(kind)
            if mat is not None:
                mats.append(mat)
                continue
            if why:
                notes.append(why if len(groups) == 1 else f"{m}: {why}")
            rows = []
            for s in range(0, n * n, batch_size):
                k = torch.arange(s, min(n * n, s + batch_size), device=adapter.device)
                i, j = k // n, k % n     # x_m from instance i, the others from instance j
                sel = {name: (i if name == m else j) for name in names}
                rows.append(out_fn(_index_raw(raw, sel)).double())
                report(progress, g * n * n + int(k[-1]) + 1, total, "EMAP pairs")
            mats.append(torch.cat(rows).reshape(n, n, -1).cpu().numpy())
        logits = np.ascontiguousarray(np.diagonal(mats[0], axis1=0, axis2=1).T)
        if len(names) == 2:
            mat = mats[0]
            grand = mat.mean((0, 1))
            unimodal = {names[0]: mat.mean(1) - grand, names[1]: mat.mean(0) - grand}
        else:
            grand = np.mean([mm.mean((0, 1)) for mm in mats], axis=0)
            unimodal = {m: mm.mean(1) - grand for m, mm in zip(groups, mats)}
        emap_logits = grand + sum(unimodal.values())
    fused = [k != "none" for k in kinds]
    params = {"n": n, "batch_size": batch_size, "factorized": all(fused),
              "factorization": kinds[0] if len(set(kinds)) == 1 else dict(zip(groups, kinds))}
    if notes:
        params["factorization_note"] = "; ".join(notes)
    checks = sum(fused) * (n + min(n, _EMAP_CHECK_PAIRS))
    return EmapResult(method="emap", target=t, params=params,
                      forward_passes=total + checks,
                      backward_passes=0, seconds=sw.seconds,
                      modalities=tuple(names), indices=idx, logits=logits,
                      emap_logits=emap_logits, unimodal=unimodal, grand_mean=grand,
                      matrix=mats[0] if (keep_matrix and len(names) == 2) else None,
                      output_names=out_names)


#: off-diagonal pairs (i, i + 1) compared with plain forward passes before fused pairs are used
_EMAP_CHECK_PAIRS = 8


@dataclass
class _Split:
    """How to encode each modality of a batch once and fuse pairs of encodings."""

    kind: str                                          # "declared" or "traced"
    side: str                                          # the modality split from the others
    encode: Callable[[Mapping[str, torch.Tensor]], tuple]
    from_side: tuple[bool, ...]                        # per encoded value: from the split-off modality
    fuse: Callable[[Sequence[torch.Tensor]], torch.Tensor]


def _check_factorized(factorized) -> None:
    if factorized not in (None, True, False, "declared", "traced"):
        raise ValueError(f"factorized must be None, True, False, 'declared' or 'traced', got "
                         f"{factorized!r}.")


def _with_split(adapter: ModelAdapter, factorized, side: str, build: Callable[[_Split], object]
                ) -> tuple[object | None, str, str]:
    """(build(split), its kind, "") with the model's split of ``side`` from the others, or
    (None, "none", why not) when there is none or (for a traced split and factorized=None) when
    build finds that the split disagrees with forward passes; the rejection is remembered."""
    split, why = _model_split(adapter, factorized, side)
    if split is None:
        return None, "none", why
    try:
        return build(split), split.kind, ""
    except FactorizationError as e:
        if factorized is not None or split.kind == "declared":
            raise
        reject_factorization(adapter.model, adapter.names, adapter.keyword_inputs, side, str(e))
        return None, "none", f"traced split rejected: {e}"


def _model_split(adapter: ModelAdapter, factorized, side: str) -> tuple[_Split | None, str]:
    """(the split of modality ``side`` from the others, or None and why) for
    ``factorized=...`` of ``emap`` and ``dime``."""
    if factorized is False:
        return None, ""
    model, names = adapter.model, adapter.names
    declared = len(names) == 2 and all(callable(getattr(model, k, None))
                                       for k in ("encode_modality", "fuse_encodings"))
    if factorized == "declared" and not declared:
        raise ValueError("factorized='declared' needs two modalities and a model with "
                         "encode_modality(name, x) and fuse_encodings(encodings) methods.")
    if declared and factorized != "traced":
        a, b = names
        return _Split("declared", a,
                      lambda raw: (model.encode_modality(a, raw[a]), model.encode_modality(b, raw[b])),
                      (True, False), lambda rows: model.fuse_encodings({a: rows[0], b: rows[1]})), ""
    try:
        f = adapter.run(lambda: trace_factorization(model, names, adapter.keyword_inputs, side))
    except FactorizationError as e:
        if factorized is None:
            return None, f"not traced: {e}"
        raise ValueError(f"factorized={factorized!r}: the model cannot be split where {side!r} "
                         f"meets the other modalities: {e}.") from None
    return _Split("traced", side, f.encode, f.from_side, f.fuse), ""


class _Fused:
    """A split model in use: encodings of batches, and outputs of fused pairs of encodings.

    reduce(logits, h) -> the outputs wanted ([B, K] or [B]); h is None unless ``features``.
    """

    def __init__(self, adapter: ModelAdapter, split: _Split, batch_size: int, features: bool,
                 reduce: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]):
        self.adapter, self.split, self.batch_size = adapter, split, batch_size
        self.features, self.reduce = features, reduce

    def encode(self, raw: Mapping[str, torch.Tensor],
               continuous: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The split's values for a batch (raw inputs, optionally with continuous ones)."""
        args = self.adapter.model_inputs(raw, continuous)
        b, bs = next(iter(args.values())).shape[0], self.batch_size
        parts = [self.adapter.run(lambda s=s: self.split.encode({m: x[s:s + bs] for m, x in args.items()}),
                                  None if continuous is None else
                                  {m: x[s:s + bs] for m, x in continuous.items()})
                 for s in range(0, b, bs)]
        return [torch.cat([p[k] for p in parts]) for k in range(len(self.split.from_side))]

    def pairs(self, side: Sequence[torch.Tensor], others: Sequence[torch.Tensor],
              i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Outputs of the pairs (row i of the side's values, row j of the others'), in batches."""
        bs, out = self.batch_size, []
        for s in range(0, len(i), bs):
            rows = [x[i[s:s + bs]] if own else y[j[s:s + bs]]
                    for x, y, own in zip(side, others, self.split.from_side)]
            if self.features:
                try:
                    logits, h = self.adapter.run(lambda: self.split.fuse(rows), features=True)
                except AdapterError:
                    raise FactorizationError("the decision layer is not called where the "
                                             "modalities meet") from None
            else:
                logits, h = self.adapter.run(lambda: self.split.fuse(rows)), None
            out.append(self.reduce(logits, h).double())
        return torch.cat(out)

    def check(self, raw: Mapping[str, torch.Tensor], enc: Sequence[torch.Tensor],
              out_fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor]) -> None:
        """Raise FactorizationError unless fused pairs equal forward passes (``out_fn``): every
        instance with itself (batched), and a few with their neighbour, each alone (a batch of
        one, so that a model whose batch rows are not independent is caught too)."""
        side, bs = self.split.side, self.batch_size
        n = next(iter(raw.values())).shape[0]
        own = torch.arange(n, device=self.adapter.device)
        ci = own[:min(n, _EMAP_CHECK_PAIRS)]
        cj = (ci + 1) % n
        direct = torch.cat([out_fn({m: x[s:s + bs] for m, x in raw.items()}).double()
                            for s in range(0, n, bs)]
                           + [out_fn({m: x[(i if m == side else j)][None] for m, x in raw.items()}).double()
                              for i, j in zip(ci.tolist(), cj.tolist())])
        got = torch.cat([self.pairs(enc, enc, own, own), self.pairs(enc, enc, ci, cj)])
        _same_or_reject(self.split, got, direct)


def _same_or_reject(split: _Split, got: torch.Tensor, direct: torch.Tensor) -> None:
    tol = 1e-4 * max(1.0, float(direct.abs().max()))
    if not torch.allclose(got, direct, atol=tol, rtol=1e-4):
        how = ("encode_modality/fuse_encodings disagree" if split.kind == "declared"
               else "traced split (kernels.factorize) disagrees")
        raise FactorizationError(
            f"The model's {how} with its forward pass (largest difference "
            f"{float((got - direct).abs().max()):.3g}); fix them or pass factorized=False.")


def _emap_fused(adapter: ModelAdapter, split: _Split, raw: Mapping[str, torch.Tensor], n: int,
                target: Target | None, out_fn: Callable, batch_size: int,
                progress: ProgressFn, done: int, total: int) -> np.ndarray:
    """The N x N x K pair matrix M[i, j] = f(x_side^i, x_others^j) from encodings fused
    pairwise (see ``emap``); raises FactorizationError when fused pairs differ from plain
    forward passes (checked before the N^2 pairs). done, total: where these pairs stand in the
    whole job, for progress."""
    neuron = target is not None and target.kind == "neuron"
    fused = _Fused(adapter, split, batch_size, neuron,
                   (lambda logits, h: adapter.output(logits, h, target)[:, None]) if neuron
                   else (lambda logits, h: logits))
    enc = fused.encode(raw)
    fused.check(raw, enc, out_fn)
    rows = []
    for s in range(0, n * n, batch_size):
        k = torch.arange(s, min(n * n, s + batch_size), device=adapter.device)
        rows.append(fused.pairs(enc, enc, k // n, k % n))
        report(progress, done + int(k[-1]) + 1, total, "EMAP pairs (fused encodings)")
    return torch.cat(rows).reshape(n, n, -1).cpu().numpy()


def emap_matrix(matrix: np.ndarray) -> np.ndarray:
    """The EMAP projection of a whole pair matrix M [N, N, ...] (M[i, j] = f(x_a^i, x_b^j)):
    fhat[i, j] = mean_j' M[i, j'] + mean_i' M[i', j] - mean M. Its diagonal is EMAP's output;
    the operator is idempotent and leaves additive matrices (r_i + c_j) unchanged."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim < 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"EMAP needs a square pair matrix [N, N, ...], got shape {m.shape}.")
    return m.mean(1, keepdims=True) + m.mean(0, keepdims=True) - m.mean((0, 1), keepdims=True)


def _sample_indices(n_total: int, n: int | None, seed: int) -> np.ndarray:
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, size=int(n), replace=False))


def emap_gap(adapter: ModelAdapter, dataset: MultimodalDataset, indices: Sequence[int] | None = None,
             n: int | None = 100, seed: int = 0, batch_size: int = PERTURBATION_BATCH,
             progress: ProgressFn = None) -> dict:
    """How much a model relies on cross-modal interactions: accuracy(f) - accuracy(EMAP(f)).

    Uses ``indices`` (or ``n`` instances drawn with ``seed``; n=None: all) as both the evaluated
    instances and the reference set; cost: N^2 forwards (one EMAP). Returns a dict with
    ``gap_predictions`` (1 - agreement of argmax fhat with the model's predictions) and, when the
    dataset has labels, ``accuracy_model``, ``accuracy_emap`` and ``gap_labels``; ``gap`` is the
    label gap when labels exist, else the prediction gap (fractions; ``gap_points`` = 100 gap).
    """
    if not isinstance(dataset, MultimodalDataset):
        raise ValueError(f"emap_gap needs a MultimodalDataset, got {type(dataset).__name__}.")
    idx = _sample_indices(len(dataset), n, seed) if indices is None else np.asarray(indices)
    r = emap(adapter, dataset, indices=idx, batch_size=batch_size, progress=progress,
             keep_matrix=False)
    pred, pred_hat = r.logits.argmax(1), r.emap_logits.argmax(1)
    out = {"n": int(len(idx)), "indices": [int(i) for i in idx],
           "agreement": float((pred == pred_hat).mean()),
           "gap_predictions": float(1.0 - (pred == pred_hat).mean()),
           "forward_passes": r.forward_passes, "seconds": r.seconds}
    if dataset.labels is not None:
        y = dataset.labels[idx]
        out["accuracy_model"] = float((pred == y).mean())
        out["accuracy_emap"] = float((pred_hat == y).mean())
        out["gap_labels"] = out["accuracy_model"] - out["accuracy_emap"]
    out["gap"] = out.get("gap_labels", out["gap_predictions"])
    out["gap_points"] = 100.0 * out["gap"]
    return out


# --------------------------------------------------------------------------------------------
# DIME
# --------------------------------------------------------------------------------------------
@dataclass
class DimeResult(Result):
    """DIME of one instance: LIME scores per unit of UC = EMAP(f) and of MI = f - UC.

    uc, mi: {modality: [n_units]}; f_value, uc_value, mi_value: the three functions at the
    instance; reference_indices: the reference set of the EMAP averages.
    """

    modalities: tuple[str, str] = ("", "")
    uc: dict[str, np.ndarray] = field(default_factory=dict)
    mi: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, list[str]] = field(default_factory=dict)
    f_value: float = 0.0
    uc_value: float = 0.0
    mi_value: float = 0.0
    reference_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


class _DimeForwards:
    """DIME's terms from full forward passes: f(x^z), and each masked modality against the
    reference set's other modality (the remaining modalities, if any, kept as the instance's)."""

    def __init__(self, adapter, prepared, target, ref_raw, pair, batch_size, cost):
        self.adapter, self.p, self.t, self.ref = adapter, prepared, target, ref_raw
        self.pair, self.bs, self.cost = pair, batch_size, cost
        self.n = next(iter(ref_raw.values())).shape[0]
        a, b = pair
        k = torch.arange(self.n * self.n, device=adapter.device)
        sel = {a: k // self.n, b: k % self.n}
        self.grand = self._run({m: (ref_raw[m][sel[m]] if m in sel else prepared.raw[m])
                                for m in adapter.names}, {}).mean()

    @torch.no_grad()
    def _run(self, raw, cont) -> torch.Tensor:
        rows = max(x.shape[0] for x in [*raw.values(), *cont.values()])
        out = [_scalar(self.adapter, {m: x[s:s + self.bs] if x.shape[0] == rows else x
                                      for m, x in raw.items()},
                       {m: x[s:s + self.bs] for m, x in cont.items()}, self.t).double()
               for s in range(0, rows, self.bs)]
        self.cost[0] += rows
        return torch.cat(out)

    def uc_and_f(self, cont):
        """(UC(z) [B], f(x^z) [B]) for the masked continuous inputs of a batch of masks."""
        n, p = self.n, self.p
        bsz = next(iter(cont.values())).shape[0]
        f = self._run(p.raw, cont)
        rows = torch.arange(bsz, device=self.adapter.device).repeat_interleave(n)
        refs = torch.arange(n, device=self.adapter.device).repeat(bsz)
        parts = []
        for mod, other in (self.pair, self.pair[::-1]):   # masked mod, reference for the other
            raw = {m: (self.ref[m][refs] if m == other else p.raw[m].expand(len(rows), *p.raw[m].shape[1:]))
                   for m in self.adapter.names}
            parts.append(self._run(raw, {mod: cont[mod][rows]}).reshape(bsz, n).mean(1))
        return parts[0] + parts[1] - self.grand, f


class _DimeFused:
    """DIME's terms from a split model (two modalities): the reference set and each batch of
    masked instances are encoded once, and only the pairs are fused. The split is checked
    against forward passes when it is built (FactorizationError when they differ)."""

    def __init__(self, adapter, prepared, target, ref_raw, split, batch_size, cost):
        self.adapter, self.p, self.split, self.cost = adapter, prepared, split, cost
        neuron = target.kind == "neuron"
        self.fused = _Fused(adapter, split, batch_size, neuron,
                            lambda logits, h: adapter.output(logits, h, target))
        self.n = n = next(iter(ref_raw.values())).shape[0]
        with torch.no_grad():
            self.ref = self.fused.encode(ref_raw)
            self.fused.check(ref_raw, self.ref, lambda raw: _scalar(adapter, raw, {}, target))
            k = torch.arange(n * n, device=adapter.device)
            self.grand = self.fused.pairs(self.ref, self.ref, k // n, k % n).mean()
            # masked inputs enter the encoders through the continuous inputs: check that path
            # on the instance and two random masks of it against full forward passes
            g = torch.Generator().manual_seed(0)
            masks = {m: torch.cat([torch.ones(1, prepared.n_units[m]),
                                   (torch.rand(2, prepared.n_units[m], generator=g) < 0.5).float()])
                     for m in adapter.names}
            cont = masked_continuous(prepared, masks, adapter)
            direct = _scalar(adapter, prepared.raw, cont, target).double()
            _, f = self.uc_and_f(cont)
            _same_or_reject(split, f, direct)
        cost[0] += n * n + n + min(n, _EMAP_CHECK_PAIRS) + len(direct)

    @torch.no_grad()
    def uc_and_f(self, cont):
        """(UC(z) [B], f(x^z) [B]) for the masked continuous inputs of a batch of masks."""
        n = self.n
        bsz = next(iter(cont.values())).shape[0]
        enc = self.fused.encode(self.p.raw, cont)
        own = torch.arange(bsz, device=self.adapter.device)
        f = self.fused.pairs(enc, enc, own, own)
        rows, refs = own.repeat_interleave(n), torch.arange(n, device=own.device).repeat(bsz)
        side_masked = self.fused.pairs(enc, self.ref, rows, refs).reshape(bsz, n).mean(1)
        others_masked = self.fused.pairs(self.ref, enc, refs, rows).reshape(bsz, n).mean(1)
        self.cost[0] += bsz * (1 + 2 * n)
        return side_masked + others_masked - self.grand, f


def dime(adapter: ModelAdapter, dataset: MultimodalDataset, index, reference_indices=None,
         target=None, n_samples: int = 500, n_reference: int = 50, modalities=None, seed: int = 0,
         batch_size: int = PERTURBATION_BATCH, progress: ProgressFn = None,
         factorized: bool | str | None = None, **lime_params) -> DimeResult:
    """DIME (Lyu et al. 2022): explain UC = EMAP(f) and MI = f - UC of one instance with LIME.

    index: an instance number of ``dataset`` (or an instance dict); the reference set is
    ``reference_indices`` or ``n_reference`` instances drawn with ``seed``. For a unit mask z,
    UC(z) = mean_j f(x_a^z, x_b^j) + mean_i f(x_a^i, x_b^z) - mean_ij f(x_a^i, x_b^j) and
    MI(z) = f(x^z) - UC(z); both are explained over the units of a and b (one shared LIME design).
    Cost: N^2 + n_samples (2 N + 1) model evaluations (N = reference size), in batches of
    batch_size. factorized: as in ``emap`` (two-modality models): the reference set and each
    masked instance are encoded once, and only the pairs are fused.
    """
    from .unimodal import lime_from_function
    if not isinstance(dataset, MultimodalDataset):
        raise ValueError(f"dime needs a MultimodalDataset for its reference set, got "
                         f"{type(dataset).__name__}.")
    a, b = _pair(adapter, modalities)
    batch_size = _positive_int(batch_size, "batch_size")
    n_samples = _positive_int(n_samples, "n_samples", 2)
    _check_factorized(factorized)
    instance = index if isinstance(index, Mapping) else dataset[int(index)]
    if reference_indices is None:
        ref_idx = _sample_indices(len(dataset), _positive_int(n_reference, "n_reference", 2), seed)
    else:
        ref_idx = np.asarray(reference_indices, dtype=np.int64)
    if len(ref_idx) < 2:
        raise ValueError(f"DIME needs a reference set of at least 2 instances, got {len(ref_idx)}.")
    with Stopwatch() as sw:
        p = adapter.prepare(instance)
        t = resolve_target(adapter, p, target)
        ref_raw = adapter.collate([dataset[int(i)] for i in ref_idx])
        n = len(ref_idx)
        cost = [1 if target is None else 0]
        if len(adapter.names) == 2:
            terms, kind, note = _with_split(adapter, factorized, a, lambda split: _DimeFused(
                adapter, p, t, ref_raw, split, batch_size, cost))
        elif factorized not in (None, False):
            raise ValueError(f"factorized={factorized!r}: DIME splits only two-modality models "
                             f"(the adapter has {adapter.names}).")
        else:
            terms, kind, note = None, "none", "DIME splits only two-modality models"
        if terms is None:
            terms = _DimeForwards(adapter, p, t, ref_raw, (a, b), batch_size, cost)

        cache: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}

        def evaluate(masks):
            key = masks[a].cpu().numpy().tobytes() + masks[b].cpu().numpy().tobytes()
            if key not in cache:
                cache[key] = terms.uc_and_f(masked_continuous(p, {a: masks[a], b: masks[b]},
                                                              adapter))
            return cache[key]

        units = {a: p.n_units[a], b: p.n_units[b]}
        lime_kw = dict(n_samples=n_samples, seed=seed, batch_size=batch_size, **lime_params)

        def step_progress(phase):
            if progress is None:
                return None
            return lambda done, total, msg: progress(done + phase * total, 2 * total,
                                                     f"DIME {'UC' if phase == 0 else 'MI'}: {msg}")

        uc = lime_from_function(lambda m: evaluate(m)[0], units, progress=step_progress(0),
                                **lime_kw)
        mi = lime_from_function(lambda m: evaluate(m)[1] - evaluate(m)[0], units,
                                progress=step_progress(1), **lime_kw)
        ones = {a: torch.ones(1, units[a]), b: torch.ones(1, units[b])}
        uc_full, f_full = evaluate(ones)
    return DimeResult(method="dime", target=t,
                      params={"n_samples": n_samples, "n_reference": n, "seed": seed,
                              "batch_size": batch_size, "factorization": kind,
                              **({"factorization_note": note} if note else {}), **lime_params},
                      forward_passes=cost[0], backward_passes=0, seconds=sw.seconds,
                      modalities=(a, b), uc={k: np.asarray(v) for k, v in uc.items()},
                      mi={k: np.asarray(v) for k, v in mi.items()},
                      labels={a: list(p.labels[a]), b: list(p.labels[b])},
                      f_value=float(f_full[0]), uc_value=float(uc_full[0]),
                      mi_value=float(f_full[0] - uc_full[0]), reference_indices=ref_idx)


# --------------------------------------------------------------------------------------------
# interaction type (M2Lens vocabulary)
# --------------------------------------------------------------------------------------------
def _margin(v: np.ndarray, c: int) -> float:
    others = np.delete(v, c)
    return float(v[c] - others.max()) if len(others) else float(v[c])


def _label(logits: np.ndarray, parts: Mapping[str, np.ndarray], grand: np.ndarray,
           class_names: Sequence[str]) -> dict:
    """Label one instance from its outputs [C], centred unimodal parts {m: [C]} and grand mean."""
    c = int(np.argmax(logits))
    emap_out = grand + sum(parts.values())
    names = list(parts)
    uni_pred = {m: int(np.argmax(grand + parts[m])) for m in names}
    agree = {m: uni_pred[m] == c for m in names}
    emap_pred = int(np.argmax(emap_out))
    if emap_pred != c:                    # the additive parts alone would decide otherwise
        label, dominant = "conflict", None
    elif any(agree.values()) and not all(agree.values()):
        label = "dominance"
        # the agreeing modality whose part pushes the prediction hardest
        dominant = max((m for m in names if agree[m]), key=lambda m: _margin(parts[m], c))
    else:                                 # all agree, or none alone but together they decide
        label, dominant = "complement", None
    inter = logits - emap_out
    return {
        "label": label, "dominant": dominant, "predicted": c,
        "predicted_name": class_names[c] if c < len(class_names) else str(c),
        "unimodal_predictions": uni_pred, "emap_prediction": emap_pred,
        "margins": {**{m: _margin(parts[m], c) for m in names},
                    "interaction": _margin(inter, c), "emap": _margin(emap_out, c),
                    "model": _margin(logits, c)},
        "logits": np.asarray(logits), "emap_logits": np.asarray(emap_out),
        "unimodal": {m: np.asarray(parts[m]) for m in names}, "grand_mean": np.asarray(grand),
        "interaction": np.asarray(inter),
    }


def interaction_types(result: EmapResult, class_names: Sequence[str] | None = None) -> list[dict]:
    """interaction_type for every instance of an EMAP result (no forward passes)."""
    if result.target is not None and result.target.kind == "neuron":
        raise ValueError("Interaction types label the predicted class: compute the EMAP with a "
                         "class target (or None), not a neuron.")
    names = list(class_names) if class_names is not None else list(result.output_names)
    return [_label(result.logits[i], {m: u[i] for m, u in result.unimodal.items()},
                   result.grand_mean, names) for i in range(len(result.logits))]


@torch.no_grad()
def interaction_type(adapter: ModelAdapter, instance, reference=None, reference_indices=None,
                     n_reference: int = 50, seed: int = 0, batch_size: int = 1024,
                     progress: ProgressFn = None) -> dict:
    """Dominance, complement or conflict for one instance, with the numbers behind the label.

    Unimodal part of modality m: the model's logits averaged over the reference set for the
    other modalities (EMAP's row / column means). conflict: the additive EMAP prediction differs
    from the model's, so the interaction f - EMAP decides; otherwise dominance when some but not
    all modalities' parts alone pick the predicted class (``dominant`` names the strongest), and
    complement when all do (or none alone but together they do). ``margins`` give each part's logit margin
    of the predicted class over the runner-up.

    reference: a MultimodalDataset (``reference_indices``, or ``n_reference`` drawn with
    ``seed``), a list of instances, or an EmapResult that contains the instance, given then as
    its dataset index (no forwards). Cost otherwise: N^2 + 2 N + 1 forwards in batches.
    """
    if reference is None:
        raise ValueError("interaction_type needs a reference set for EMAP's averages: pass "
                         "reference=a MultimodalDataset, a list of instances or an EmapResult.")
    if isinstance(reference, EmapResult):
        if isinstance(instance, Mapping):
            raise ValueError("With an EmapResult as reference, give the instance as its dataset "
                             "index (one of result.indices).")
        pos = np.nonzero(reference.indices == int(instance))[0]
        if not len(pos):
            raise ValueError(f"Instance {instance} is not among the EMAP result's instances; "
                             "pass a dataset as the reference instead.")
        return interaction_types(reference, adapter.class_names)[int(pos[0])] | {"reference_size": len(reference.indices)}
    batch_size = _positive_int(batch_size, "batch_size")
    if isinstance(reference, MultimodalDataset):
        idx = (_sample_indices(len(reference), _positive_int(n_reference, "n_reference", 2), seed)
               if reference_indices is None else np.asarray(reference_indices, dtype=np.int64))
        if not isinstance(instance, Mapping):
            instance = reference[int(instance)]
        refs = [reference[int(i)] for i in idx]
    else:
        if not isinstance(instance, Mapping):
            raise ValueError("Give the instance as a dict {modality: input} when the reference is "
                             "a list of instances.")
        refs, _ = _instances(reference, reference_indices)
    names = adapter.names
    if len(names) < 2:
        raise ValueError(f"Interaction types need two or more modalities; the adapter has {names}.")
    n = len(refs)
    if n < 2:
        raise ValueError(f"The reference set needs at least 2 instances, got {n}.")
    # the instance joins the reference batch as its last row, so one collate pads them together
    raw = adapter.collate(refs + [instance])
    dev = adapter.device
    total = n * n + len(names) * n + 1
    done = 0
    grand_rows = []
    ref_pairs = [names[0]] if len(names) == 2 else names
    grands = []
    for m in ref_pairs:
        grand_rows = []
        for s in range(0, n * n, batch_size):
            k = torch.arange(s, min(n * n, s + batch_size), device=dev)
            sel = {name: (k // n if name == m else k % n) for name in names}
            grand_rows.append(adapter.forward(_index_raw(raw, sel)).double())
            done += len(k)
            report(progress, done, total, "interaction type: reference pairs")
        grands.append(torch.cat(grand_rows).mean(0))
    grand = torch.stack(grands).mean(0).cpu().numpy()
    parts = {}
    for m in names:
        k = torch.arange(n, device=dev)
        sel = {name: (torch.full_like(k, n) if name == m else k) for name in names}
        parts[m] = adapter.forward(_index_raw(raw, sel)).double().mean(0).cpu().numpy() - grand
        done += n
        report(progress, done, total, "interaction type: unimodal parts")
    logits = adapter.forward(_index_raw(raw, {name: torch.tensor([n], device=dev)
                                              for name in names}))[0].double().cpu().numpy()
    report(progress, total, total, "interaction type")
    return _label(logits, parts, grand, adapter.class_names) | {"reference_size": n}
