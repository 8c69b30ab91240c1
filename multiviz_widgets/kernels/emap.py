"""Dataset-level interaction measures built on EMAP (Hessel & Lee 2020).

``emap`` computes the EMAP projection of N instances from the outputs of all N x N pairs (with
M > 2 modalities, the functional-ANOVA projection under the product of the marginals, sampled:
M N^2 pairs against references whose other modalities come from random permutations),
evaluated in batches and summed as they come (each modality encoded once and only the pairs
fused, through ``kernels.split_model``, when the model can be split); ``emap_matrix`` projects a
whole pair matrix; ``emap_gap`` is accuracy(f) - accuracy(EMAP(f)) over a dataset;
``interaction_type`` / ``interaction_types`` label instances dominance, complement or conflict
(M2Lens; undecided when the model ties) from EMAP's unimodal parts (``interaction_type``'s pairs
take the same split, or the same full forward passes, as ``emap``'s).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ..adapter import ModelAdapter, ModelInputError, Target, class_name
from ..data import MultimodalDataset
from ..display_text import and_list
from ..notices import warn
from ..progress import ProgressFn, duration_words, report
from ..results import Result, Stopwatch
from ..checks import is_integer, positive_int
from .common import (PERTURBATION_BATCH, ShapeGroups, block_pairs, check_adapter,
                     check_instance_rows_independent, dataset_index, dataset_indices,
                     leave_out_refused, leave_out_unrunnable, memory_error, reference_texts,
                     sample_indices, unrunnable_found, ResumedProgress)
from .split_model import (Encodings, FusedPairs, Split, check_factorized, same_or_reject,
                          steady_progress, with_split)

__all__ = ["EmapResult", "emap", "emap_gap", "emap_matrix", "interaction_type",
           "interaction_types", "paired_difference_interval", "wilson_interval"]


# --------------------------------------------------------------------------------------------
# EMAP
# --------------------------------------------------------------------------------------------
@dataclass(repr=False)            # Result's one-line repr, never the arrays
class EmapResult(Result):
    """EMAP of N instances: their outputs and the additive projection fhat of those outputs.

    logits [N, K] (K = classes, or 1 for a neuron target), emap_logits [N, K];
    unimodal {modality: [N, K]}: each modality's unimodal part, centred (mean over the
    references j of f(x_m, x_{-m}^j), minus its mean g_m over the N instances; with M > 2
    modalities reference j's other modalities come from independently permuted instances, see
    ``emap``); grand_mean [K]: the mean of the g_m (one mean of the N^2 pairs with two
    modalities), so that emap_logits = grand_mean + the sum of the unimodal parts;
    matrix [N, N, K] with matrix[i, j] = f(x_a^i, x_b^j) (two modalities, when kept); indices:
    the dataset indices of the N instances (or 0..N-1).
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

    def _shapes(self) -> str:
        m = "none" if self.matrix is None else str(np.shape(self.matrix))
        return f"logits={np.shape(self.logits)}, matrix={m}"


def _instances(dataset_or_list, indices=None) -> tuple[list[dict], np.ndarray]:
    if isinstance(dataset_or_list, MultimodalDataset):
        idx = (np.arange(len(dataset_or_list)) if indices is None else
               dataset_indices(indices, len(dataset_or_list)))
        return [dataset_or_list[int(i)] for i in idx], idx
    if isinstance(dataset_or_list, Mapping):
        raise ValueError("Expected several instances (a list of dicts or a MultimodalDataset), "
                         "got a single instance dict.")
    items = list(dataset_or_list)
    if indices is not None:
        idx = dataset_indices(indices, len(items))
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


def _pair_batches(groups: ShapeGroups, side: Sequence[str], others: Sequence[str],
                  batch_size: int, device):
    """Yield (i [B], j [B], model inputs of the pairs) for all pairs (the modalities ``side`` of
    instance i, ``others`` of instance j) of the instances of ``groups``, in batches of up to
    batch_size whose every modality has one input shape (nothing is padded): block by block of
    (a group of equal shapes of side, one of others), each block row-major. One block, the N x N
    pairs in row-major order, when the instances share one shape."""
    for ps, xs in groups.by(side):
        for po, xo in groups.by(others):
            for i, j in block_pairs(len(ps), len(po), batch_size, device):
                yield ps[i], po[j], {**{m: xs[m][i] for m in side},
                                     **{m: xo[m][j] for m in others}}


@torch.no_grad()
def emap(adapter: ModelAdapter, instances, target=None, progress: ProgressFn = None,
         indices: Sequence[int] | None = None, batch_size: int = PERTURBATION_BATCH,
         keep_matrix: bool | None = None, factorized: bool | str | None = None,
         seed: int = 0) -> EmapResult:
    """EMAP (Hessel & Lee 2020) of N instances against themselves as the reference set.

    instances: a list of instance dicts or a MultimodalDataset (with optional ``indices``).
    Two modalities: the N x N outputs M[i, j] = f(x_a^i, x_b^j) (batched) give
    fhat[t] = mean_j M[t, j] + mean_i M[i, t] - mean M (cost N^2 forwards, chunked; exact, no
    sampling: ``seed`` is not used).
    M > 2 modalities: the first-order functional-ANOVA projection under the product of the M
    marginals (METHODS.md), fhat(x) = f0 + sum_m f_m(x_m) with f_m(x_m) = E f(x_m, X_-m) - f0,
    X_-m's modalities drawn independently, each from its own marginal (the N instances'
    values), and f0 = E f. Its exact value takes N^M forwards; it is estimated, unbiased, from
    M N^2: for each modality m, N mixed references whose modality k != m is that of instance
    pi_{m,k}(j), the M (M - 1) permutations pi drawn independently from
    ``numpy.random.default_rng(seed)`` (for m, then k, in the adapter's order); then
    U_m(t) = mean_j f(x_m^t, mixed reference j), g_m = mean_t U_m(t) (each an estimate of f0),
    g = mean_m g_m and fhat[t] = g + sum_m (U_m(t) - g_m). As each permutation takes every
    instance once, it is exact on additive models (and so idempotent), and its unimodal parts
    are centred; a model that ignores a modality k gets (with M = 3) the two-modality EMAP of
    the other two plus (g_k - their mean of pairs) / 3, the same at every t, where g_k is a mean
    of N of their pairs drawn at random (its sampling error). Pairing each reference's other
    modalities as observed (their joint values) would instead project under the measure that
    keeps the others together: it does not reduce to two-modality EMAP, and on matched data (a
    question and its own image) their joint mean differs systematically from the product's.
    ``params["anova"]`` says which was computed, ``params["seed"]`` with what seed. The outputs
    themselves (``logits``) take N more forwards with M > 2 (a mixed reference is no instance).
    target: None or a class (all logits, K = C), or Neuron(j) (K = 1).

    The pairs are evaluated in chunks and summed as they come (row sums, column sums and the
    diagonal), so memory grows with N, not N^2: a whole test split works. Instances of
    different input shapes (texts of different token counts) are never padded to one length: a
    batch of pairs takes each modality from instances of one shape, and a split model encodes
    each shape group on its own, so a model that pools over [PAD] tokens still gets its own
    numbers (instances of one shape: one group, batched as they come). With M > 2 the mixed
    references are grouped by their own shapes (each modality's from the instance it comes
    from), and a split is checked on them, the pairs it fuses. keep_matrix: also
    return the N x N x K matrix (two modalities); None (default) keeps it when it takes at most
    KEPT_MATRIX_BYTES (``params["matrix_note"]`` says when it was not kept).

    factorized: most of each pair's forward pass encodes one modality alone, so the encodings
    of the N instances are computed once and only the N^2 pairs are fused (with three or more
    modalities, N^2 per modality, each split from the others): the same numbers for a fraction
    of the cost. Two ways to split the model:
    "declared": the model defines ``encode_modality(name, x)`` and ``fuse_encodings({name:
    encoding})`` with model(*inputs) == fuse_encodings({m: encode_modality(m, x_m)});
    "traced": ``kernels.factorize.trace_factorization`` cuts the model's torch.fx graph where
    the modalities meet (any fx-traceable model). Either way fused pairs are checked against
    plain forward passes (the N own pairs and a few others) before they are used.
    None (default): declared if the model defines both methods, else traced when the model
    traces and the check passes, else N^2 full forward passes (``params["factorization"]``
    says which was used and why). True: declared or traced, an error if neither works.
    False: full forward passes.
    ``forward_passes`` counts every row the model (or a part of it) ran: with a split, each
    fused pair as one (it runs the fusion and the head only: ``params["fused_pairs"]`` of them),
    besides the encodings and the split's check; so it can exceed the N^2 of full passes while
    the work is a fraction of theirs.

    A pair whose output is NaN or infinite is a ValueError naming it (EMAP would not be finite).

    When the first batches of pairs say the whole will take more than EMAP_WARN_SECONDS, one
    UserWarning gives the estimate, why (the N^2 pairs; the model not split, and why not) and
    what costs less.
    """
    return _emap(adapter, instances, target, progress, indices, batch_size, keep_matrix,
                 factorized, seed, _PairCost("emap", progress))


def _emap(adapter: ModelAdapter, instances, target, progress: ProgressFn, indices,
          batch_size: int, keep_matrix: bool | None, factorized, seed: int,
          cost: "_PairCost") -> EmapResult:
    """``emap``'s work; cost: what times its pairs and warns once when they are long (one
    per call: ``emap_gap`` shares one among its repeats)."""
    check_adapter(adapter, "emap")
    batch_size = positive_int(batch_size, "batch_size")
    seed = None if seed is None else positive_int(seed, "seed", 0)   # None: fresh
    items, idx = _instances(instances, indices)
    n = len(items)
    if n < 2:
        raise ValueError(f"EMAP needs at least 2 instances (the reference set), got {n}.")
    names = adapter.names
    if len(names) < 2:
        raise ValueError(f"EMAP needs two or more modalities; the adapter has only {names}.")
    check_factorized(factorized)
    if keep_matrix and len(names) > 2:
        raise ValueError(f"keep_matrix=True keeps the N x N pair matrix of two modalities; this "
                         f"adapter has {len(names)} ({names}), whose functional-ANOVA EMAP has "
                         "no such matrix. Leave keep_matrix unset.")
    check_instance_rows_independent(adapter, items[0], items[1:])   # (the model's; not timed)
    out_fn, t, out_names = _output_fn(adapter, target)
    matrix_bytes = n * n * (1 if t is not None and t.kind == "neuron" else adapter.n_classes) * 8
    keep = len(names) == 2 and (keep_matrix or (keep_matrix is None
                                                and matrix_bytes <= KEPT_MATRIX_BYTES))
    many = len(names) > 2
    dataset, subset = isinstance(instances, MultimodalDataset), indices is not None
    with Stopwatch() as sw:
        shapes = ShapeGroups(adapter, items, idx)     # one group unless the shapes differ
        groups = list(names) if many else [names[0]]   # modality m vs all others
        # M > 2: the instances' own outputs first (no pair is an instance itself)
        start = n if many else 0
        total = len(groups) * n * n + start
        step = steady_progress(progress, total)
        step(0, "EMAP pairs")
        cost.start(n, len(groups), total)
        # forward passes run, fused or full: a split's checks, and the pairs of a split
        # abandoned part way, included; then the fused pairs among them
        passes = [0, 0]
        own = None
        mixing = _mixing(n, names, seed) if many else {}
        if many:
            try:
                own = _own_outputs(shapes, out_fn, batch_size, step, passes)
            except RuntimeError as e:
                _raise_unrunnable(e, shapes, out_fn, batch_size, idx, dataset, subset,
                                  cost.caller)
                raise
            _raise_own_not_finite(own, idx)
        sums, kinds, notes = [], [], []
        for g, m in enumerate(groups):
            # the pairs' instances: the N instances, or (M > 2) N mixed references, each with
            # its own modality m and the others of independently permuted instances
            pairs = (ShapeGroups(adapter, _mixed_items(items, m, mixing[m]), idx) if many
                     else shapes)
            done = start + g * n * n
            try:
                acc, kind, why = with_split(adapter, factorized, m, lambda split: _emap_fused(
                    adapter, split, pairs, t, out_fn, batch_size, keep, step, done, passes,
                    cost))
                if acc is None:                  # no split: full forward passes of the pairs
                    cost.how("none", why)
                    acc = _forward_sums(adapter, pairs, m, out_fn, batch_size, keep, step,
                                        done, passes, "EMAP pairs", cost)
            except RuntimeError as e:
                # inputs the model cannot take: an error naming the instances
                _raise_unrunnable(e, shapes, out_fn, batch_size, idx, dataset, subset,
                                  cost.caller)
                raise
            kinds.append(kind)
            if why:                   # why not split, or what to know about the split used
                notes.append(why if len(groups) == 1 else f"{m}: {why}")
            sums.append(acc)
            if acc.not_finite is not None:
                _raise_not_finite(acc, m, [x for x in names if x != m], idx, mixing.get(m))
        logits = own if many else sums[0].diagonal.numpy()
        # g_m: the mean of modality m's pairs (with two modalities, one mean of the N^2 pairs)
        means = [a.row_sums.sum(0).numpy() / (n * n) for a in sums]
        grand = np.mean(means, axis=0)
        unimodal = {m: a.row_sums.numpy() / n - g for m, a, g in zip(groups, sums, means)}
        if len(names) == 2:
            unimodal[names[1]] = sums[0].column_sums.numpy() / n - means[0]
        emap_logits = grand + sum(unimodal.values())
    params = {"n": n, "batch_size": batch_size, **_factorization(groups, kinds, notes),
              "anova": _anova_note(many, seed), "seed": seed, "fused_pairs": passes[1]}
    if len(names) == 2 and not keep:
        params["matrix_note"] = ("not kept (keep_matrix=False)" if keep_matrix is False else
                                 f"not kept: it would take {_size(matrix_bytes)}; pass "
                                 "keep_matrix=True to keep it anyway")
    return EmapResult(method="emap", target=t, params=params,
                      forward_passes=passes[0],
                      backward_passes=0, seconds=sw.seconds,
                      modalities=tuple(names), indices=idx, logits=logits,
                      emap_logits=emap_logits, unimodal=unimodal, grand_mean=grand,
                      matrix=sums[0].matrix() if keep else None,
                      output_names=out_names)


def _factorization(groups, kinds: list[str], notes: list[str]) -> dict:
    """What the results record of the splits used: ``factorized`` (every group fused),
    ``factorization`` (one kind, or a kind per group) and ``factorization_note`` (when any
    group has one)."""
    out = {"factorized": all(k != "none" for k in kinds),
           "factorization": kinds[0] if len(set(kinds)) == 1 else dict(zip(groups, kinds))}
    if notes:
        out["factorization_note"] = "; ".join(notes)
    return out


def _anova_note(many: bool, seed: int) -> str:
    """``params["anova"]``: what EMAP computed."""
    if not many:
        return "two modalities: all N x N pairs (exact, no sampling)"
    return ("product of the marginals, sampled: for each modality, N references whose other "
            f"modalities come from M - 1 independent permutations of the N instances "
            f"(seed {seed})")


def _mixing(n: int, names: Sequence[str], seed: int) -> dict[str, dict[str, np.ndarray]]:
    """{m: {k: pi_{m,k}}} for every modality m and k != m: the independent permutations of
    0..n-1 whose instances give the mixed references of modality m their modality k (reference
    j takes x_k of instance pi_{m,k}(j)), drawn in that order (m, then k, in ``names``' order)
    from ``numpy.random.default_rng(seed)``. EMAP's and interaction_type's M > 2 projection."""
    rng = np.random.default_rng(seed)
    return {m: {k: rng.permutation(n) for k in names if k != m} for m in names}


def _mixed_items(items: Sequence[Mapping], side: str,
                 perms: Mapping[str, np.ndarray]) -> list[dict]:
    """The mixed references of modality ``side``: item j keeps instance j's ``side`` (so that row
    t of their pairs is x_side^t) and takes each other modality k from instance perms[k][j]."""
    return [{**item, **{k: items[int(p[j])][k] for k, p in perms.items()}}
            for j, item in enumerate(items)]


def _own_outputs(shapes: ShapeGroups, out_fn: Callable, batch_size: int,
                 step: Callable[[int, str], None], passes: list[int]) -> np.ndarray:
    """The outputs [N, K] (float64) of the N instances themselves, shape group by shape group,
    batch_size at a time (progress and passes as ``_emap_fused``'s, from 0)."""
    out, done = [None] * shapes.n, 0
    for pos, raw in zip(shapes.positions, shapes.raws):
        ks = pos.tolist()
        for s in range(0, len(ks), batch_size):
            v = out_fn({m: x[s:s + batch_size] for m, x in raw.items()}).detach().double().cpu()
            for k, row in zip(ks[s:s + batch_size], v.numpy()):
                out[k] = row
            done += len(v)
            passes[0] += len(v)
            step(done, "EMAP: the instances' own outputs")
    return np.stack(out)


def _raise_unrunnable(error: RuntimeError, shapes: ShapeGroups, out_fn: Callable,
                      batch_size: int, idx: np.ndarray, dataset: bool, subset: bool,
                      caller: str = "emap") -> None:
    """After the pairs (or a split's encoding of the instances) failed with ``error``: raise a
    ModelInputError naming the instances whose own inputs the model cannot run, which EMAP
    cannot use (every instance meets every other), and saying to leave them out. Returns
    (the caller re-raises ``error``) when the error is about memory, or when the model runs
    every instance alone (then the failure is the split's or a pair's own).
    idx: the instances' dataset indices (dataset), indices into the list (subset) or 0..N-1.
    Cost: one forward pass per instance (in batches), only after a failure."""
    if memory_error(error):
        return
    bad, ran = shapes.unrunnable(out_fn, batch_size)
    if not bad:
        return
    names = [int(idx[k]) for k in bad]
    first = next(iter(bad.values()))
    found = {i: f.error for i, f in zip(names, bad.values())}     # (for a retry without them)
    if not ran:                       # none runs: the inputs do not fit the model at all
        tried = (f"any of the {shapes.n} instances given" if len(bad) == shapes.n else
                 f"any of the {len(bad)} instances it tried alone (of {shapes.n})")
        raise unrunnable_found(ModelInputError(
            f"{caller}: the model cannot run {tried}; on instance {names[0]}: {first.error}"),
            found, ran) from first.error
    what = ("dataset indices" if dataset else "indices in the list" if subset
            else "positions in the list")
    shown = ", ".join(map(str, names[:10])) + (f", ... ({len(names)} in all)"
                                               if len(names) > 10 else "")
    one = len(names) == 1
    if (dataset or subset) and len(names) <= 10:
        left = "{" + ", ".join(map(str, names)) + "}"
        hint = (f"pass indices= without {'it' if one else 'them'}, e.g. indices=[i for i in "
                f"{'indices' if subset else f'range({shapes.n})'} if i not in {left}]")
    elif dataset or subset:
        hint = "pass indices= without them"
    else:
        hint = f"pass a list without {'it' if one else 'them'}"
    raise unrunnable_found(ModelInputError(
        f"{caller}: the model cannot run {len(names)} of the {shapes.n} instances given ({what} "
        f"{shown}): EMAP pairs every instance with every other, so it needs all of them; leave "
        f"{'it' if one else 'them'} out of the set ({hint}), or make the model take "
        f"{'its' if one else 'their'} inputs. On instance {names[0]}: {first.error}"),
        found, ran) from first.error


def _raise_not_finite(acc: "_PairSums", side: str, others: Sequence[str],
                      idx: np.ndarray, mixed: Mapping[str, np.ndarray] | None = None) -> None:
    """The clear error for pairs (``side`` of instance i, ``others`` of instance j) whose output
    is NaN or infinite (an instance itself when its own output is): EMAP's averages would not be
    finite (stage 2 never returns NaN). mixed: {k: permutation} when the pairs' others come from
    mixed references (M > 2: modality k of reference j is instance mixed[k][j]'s); no pair is
    then an instance itself."""
    i, j, value = acc.not_finite
    own = (~torch.isfinite(acc.diagonal)).any(1).nonzero() if mixed is None else []
    if len(own):
        i = j = int(own[0, 0])
        value = float(acc.diagonal[i][~torch.isfinite(acc.diagonal[i])][0])
    if i == j and mixed is None:
        where = f"on instance {int(idx[i])} itself"
    elif mixed is None:
        where = (f"with {side!r} of instance {int(idx[i])} and {', '.join(map(repr, others))} "
                 f"of instance {int(idx[j])}")
    else:
        parts = [f"{side!r} of instance {int(idx[i])}"] + [
            f"{k!r} of instance {int(idx[int(mixed[k][j])])}" for k in others]
        where = f"with {and_list(parts)}"
    _not_finite_error(value, where)


def _raise_own_not_finite(own: np.ndarray, idx: np.ndarray) -> None:
    """The clear error when an instance's own output [N, K] is NaN or infinite."""
    bad = ~np.isfinite(own)
    if bad.any():
        i = int(bad.any(1).nonzero()[0][0])
        _not_finite_error(float(own[i][bad[i]][0]), f"on instance {int(idx[i])} itself")


def _not_finite_error(value: float, where: str) -> None:
    raise ValueError(
        f"emap: the model produced NaN or infinite values ({value}) {where}, so EMAP's averages "
        "would not be finite (NaN results are never returned). Leave the instances where the "
        "model is not finite out of the set (indices=...), or make the model finite there.")


#: emap keeps its N x N x K pair matrix by default up to this size (bytes).
KEPT_MATRIX_BYTES = 512 * 2**20


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


#: emap, emap_gap and interaction_type warn (UserWarning, with the estimate) when the first
#: batches of their pairs say the whole will take longer than this (seconds), as shapley and
#: pairwise ablation do
EMAP_WARN_SECONDS = 60.0

#: what each caller takes to have fewer instances, hence a quarter of the pairs for half of them
_FEWER = {"emap": "fewer instances (indices=, or a shorter list)",
          "emap_gap": "fewer instances (n=, or indices=)",
          "interaction_type": "fewer references (n_reference=, reference_indices=, or a shorter "
                              "list)"}


class _PairCost:
    """Times the pairs of one call of ``caller`` (emap, emap_gap, interaction_type) and warns
    once when they are long: in each loop of pairs, the first batch warms up and the next one
    gives the rate (a loop of one batch: its own time, an upper bound); the rest of the call's
    rows at that rate, plus the time it has taken, is the whole, said (UserWarning through
    ``notices.warn``) when above EMAP_WARN_SECONDS, unless less than half of that is left.
    Progress is left as it is: the warning is
    given with or without a progress callback, as shapley's is (the Explorer shows it beside
    its view). runs: the EMAPs of the call (emap_gap's repeats), one ``start`` each."""

    def __init__(self, caller: str, progress: ProgressFn, runs: int = 1, said: bool = False):
        self.caller, self.progress, self.runs = caller, progress, runs
        self.began = time.perf_counter()
        self.run, self.n, self.loops, self.total = -1, 0, 1, 0
        self.kind, self.why = "none", ""
        self.said = said                   # (a retry's: said already by the first attempt)
        self._begin_loop()

    def start(self, n: int, loops: int, total: int) -> None:
        """A run begins: n instances, ``loops`` sets of N^2 pairs, ``total`` rows in all (its
        progress total: the pairs and the other forward passes)."""
        self.run += 1
        self.n, self.loops, self.total = n, loops, total

    def how(self, kind: str, why: str) -> None:
        """A loop of pairs begins: fused from encodings ("fused") or full forward passes
        ("none", ``why`` not split)."""
        self.kind, self.why = kind, why
        self._begin_loop()

    def _begin_loop(self) -> None:
        self.warm, self.measured, self.timed, self.seconds = False, False, 0, 0.0
        self.last = time.perf_counter()

    def batch(self, rows: int, done: int) -> None:
        """A batch of ``rows`` pairs has run (its outputs read back: a device has finished it);
        ``done``: the run's rows so far (its progress)."""
        now = time.perf_counter()
        if self.said or self.measured:
            return
        if not self.warm:                  # the loop's first batch warms up
            self.warm = True
            if rows < self.n * self.n:     # more batches follow: the next one is timed
                self.last = now
                return
            # a loop of one batch (N^2 <= batch_size): its own time, warm-up and all (an
            # upper bound), gives the rate of the loops and runs after it
            self.timed, self.seconds = rows, now - self.last
        else:
            self.timed += rows
            self.seconds += now - self.last
            self.last = now
        self.measured = True               # once a loop: a late warning would say nothing
        left = max(self.total - done, 0) + (self.runs - 1 - self.run) * self.total
        more = self.seconds / self.timed * left
        whole = now - self.began + more
        # (nothing said when most of it has run: the warning would come with the result)
        if whole > EMAP_WARN_SECONDS and more >= EMAP_WARN_SECONDS / 2:
            self.said = True
            self._warn(more, whole)

    def _warn(self, more: float, whole: float) -> None:
        n, loops = self.n, self.loops
        who = "references" if self.caller == "interaction_type" else "instances"
        pairs = (f"{loops * n * n:,} pairs (N^2 = {n * n:,} for each of its {loops} modalities)"
                 if loops > 1 else f"{n * n:,} pairs (N^2)")
        runs = f", {self.runs} times (repeats={self.runs})" if self.runs > 1 else ""
        if self.kind == "none":
            why = self.why or "factorized=False"
            how = (f"one full forward pass each, as the model is not split ({why}). A model "
                   "that defines encode_modality(name, x) and fuse_encodings({name: "
                   "encoding}), or whose forward torch.fx can trace (factorized=None tries "
                   "it), is split: each modality is encoded once and only the pairs are fused, "
                   "for a fraction of the cost. ")
        else:
            how = "each fused from the modalities' encodings (the model is split). "
        follow = ("Pass progress= (a callable progress(done, total, message)) to follow it; "
                  "the Explorer shows its progress as it runs. " if self.progress is None
                  else "")
        warn(f"{self.caller}: {n:,} {who} make {pairs}{runs}, {how}"
             f"About {duration_words(more)} more at the rate of its first batches "
             f"({duration_words(whole)} in all). {follow}Use {_FEWER[self.caller]}: the cost "
             "grows as N^2, so half as many take a quarter of the time.", UserWarning)


class _PairSums:
    """What EMAP needs of an N x N x K pair matrix M, summed chunk by chunk: row sums
    sum_j M[i, j], column sums sum_i M[i, j] and the diagonal (float64); M itself only when
    kept."""

    def __init__(self, n: int, keep: bool):
        self.n, self.keep = n, keep
        self.row_sums = self.column_sums = self.diagonal = self._matrix = None
        #: (i, j, value) of the first pair whose output is NaN or infinite, else None
        self.not_finite: tuple[int, int, float] | None = None

    def add(self, i: torch.Tensor, j: torch.Tensor, values: torch.Tensor) -> None:
        """Pairs (i, j) [B] (in any order, each pair once) and their outputs [B, K]."""
        v = values.detach().double().cpu()
        i, j = i.cpu(), j.cpu()
        if self.row_sums is None:
            shape = (self.n, v.shape[1])
            self.row_sums = torch.zeros(shape, dtype=torch.float64)
            self.column_sums = torch.zeros(shape, dtype=torch.float64)
            self.diagonal = torch.zeros(shape, dtype=torch.float64)
            if self.keep:
                self._matrix = torch.empty(self.n * self.n, v.shape[1], dtype=torch.float64)
        if self.not_finite is None:
            finite = torch.isfinite(v)
            if not bool(finite.all()):
                k = int((~finite.all(1)).nonzero()[0, 0])
                self.not_finite = (int(i[k]), int(j[k]), float(v[k][~finite[k]][0]))
        self.row_sums.index_add_(0, i, v)
        self.column_sums.index_add_(0, j, v)
        own = i == j
        self.diagonal[i[own]] = v[own]
        if self.keep:
            self._matrix[i * self.n + j] = v

    def matrix(self) -> np.ndarray | None:
        return None if self._matrix is None else self._matrix.reshape(self.n, self.n, -1).numpy()


def _emap_fused(adapter: ModelAdapter, split: Split, shapes: ShapeGroups,
                target: Target | None, out_fn: Callable, batch_size: int, keep: bool,
                step: Callable[[int, str], None], done: int, passes: list[int],
                cost: "_PairCost") -> _PairSums:
    """The sums of the N x N pairs M[i, j] = f(x_side^i, x_others^j), from encodings fused
    pairwise (see ``emap``; each shape group of the instances encoded on its own, see
    ``FusedPairs.encode_groups``); raises FactorizationError when fused pairs differ from plain
    forward passes (checked before the N^2 pairs). step(done, message): progress, where done
    starts (these pairs' place in the whole job); passes: [count], the forward passes run
    (the check's and the pairs') added as they run; cost: the call's _PairCost."""
    neuron = target is not None and target.kind == "neuron"
    fused = FusedPairs(adapter, split, batch_size, neuron,
                       (lambda logits, h: adapter.output(logits, h, target)[:, None]) if neuron
                       else (lambda logits, h: logits), passes,
                       status=lambda what: step(done, f"EMAP: {what}"))
    enc = fused.encode_groups(shapes)
    fused.check(shapes, enc, out_fn)
    return _fused_sums(fused, enc, shapes.n, keep, step, done, passes,
                       "EMAP pairs (fused encodings)", cost)


def _fused_sums(fused: FusedPairs, enc: Encodings, n: int, keep: bool,
                step: Callable[[int, str], None], done: int, passes: list[int],
                message: str, cost: "_PairCost") -> "_PairSums":
    """The sums of the N x N pairs fused from the (checked) encodings ``enc`` of N instances,
    batch_size pairs at a time; progress, passes and cost as ``_emap_fused``'s."""
    acc = _PairSums(n, keep)
    cost.how("fused", "")
    for ps, sv, po, ov in enc.blocks():     # one block unless the encodings' sizes differ
        for i, j in block_pairs(len(ps), len(po), fused.batch_size, fused.adapter.device):
            acc.add(ps[i], po[j], fused.pairs(sv, ov, i, j))
            done += len(i)
            passes[0] += len(i)
            passes[1] += len(i)
            cost.batch(len(i), done)
            step(done, message)
    return acc


def _forward_sums(adapter: ModelAdapter, shapes: ShapeGroups, side: str, out_fn: Callable,
                  batch_size: int, keep: bool, step: Callable[[int, str], None], done: int,
                  passes: list[int], message: str,
                  cost: "_PairCost") -> "_PairSums":
    """The sums of the N x N pairs M[i, j] = f(x_side^i, x_others^j) from full forward passes
    (``out_fn``), batch_size pairs at a time (the path of a model with no split); progress,
    passes and cost as ``_emap_fused``'s (its loop begun by the caller, ``cost.how``, which
    says why the model is not split)."""
    acc = _PairSums(shapes.n, keep)
    others = [name for name in adapter.names if name != side]
    # x_side from instance i, the others from instance j
    for i, j, raw in _pair_batches(shapes, [side], others, batch_size, adapter.device):
        acc.add(i, j, out_fn(raw))
        del raw    # before the next batch is gathered: one batch in memory
        done += len(i)
        passes[0] += len(i)
        cost.batch(len(i), done)
        step(done, message)
    return acc


def emap_matrix(matrix: np.ndarray) -> np.ndarray:
    """The EMAP projection of a whole pair matrix M [N, N, ...] (M[i, j] = f(x_a^i, x_b^j)):
    fhat[i, j] = mean_j' M[i, j'] + mean_i' M[i', j] - mean M. Its diagonal is EMAP's output;
    the operator is idempotent and leaves additive matrices (r_i + c_j) unchanged."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim < 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"EMAP needs a square pair matrix [N, N, ...], got shape {m.shape}.")
    return m.mean(1, keepdims=True) + m.mean(0, keepdims=True) - m.mean((0, 1), keepdims=True)


def emap_gap(adapter: ModelAdapter, dataset: MultimodalDataset,
             indices: Sequence[int] | None = None, n: int | None = 100, seed: int = 0,
             batch_size: int = PERTURBATION_BATCH, progress: ProgressFn = None,
             repeats: int = 1) -> dict:
    """How much a model relies on cross-modal interactions: accuracy(f) - accuracy(EMAP(f)).

    Uses ``indices`` (or ``n`` instances drawn with ``seed``; n=None: all) as both the evaluated
    instances and the reference set (with M > 2 modalities ``seed`` also draws EMAP's
    permutations, see ``emap``); cost: N^2 forwards (one EMAP, M N^2 + N with M > 2; pairs of
    encodings when the model splits, about 110,000 pairs a second for easy-VQA on two cores at
    N = 1,000 and 3,000: benchmarks/results/emap_scale.json), memory linear in N (the pairs
    are summed as they come, never stored). Returns a dict with
    ``gap_predictions`` (1 - agreement of argmax fhat with the model's predictions) and, when the
    dataset has labels, ``accuracy_model``, ``accuracy_emap`` and ``gap_labels``; ``gap`` is the
    label gap when labels exist, else the prediction gap (fractions; ``gap_points`` = 100 gap).
    Each gap comes with a 95% interval (``gap_ci95``, ``gap_points_ci95``,
    ``gap_predictions_ci95``, ``gap_labels_ci95``) of how far another draw of N instances could
    move it: Wilson's for the prediction gap (a proportion of disagreements), Newcombe's paired
    interval for the label gap (``paired_difference_interval``). It takes EMAP's projection as
    computed: its averages over the N references vary too, far less at N = 100 and more.
    A drawn instance (indices=None) whose input the adapter refuses (``common.refused_inputs``:
    a shape its modality does not take, a NaN), or that the model cannot run alone (after a
    failure, ``common.leave_out_unrunnable``), is left out with one UserWarning naming it, and
    everything is computed on the others (``n``, ``indices``); ``left_out`` lists those left
    out, ``left_out_why`` {index: the adapter's error}. One given in ``indices`` is an error
    (remove it from them). Fewer than 2 left: a ValueError. The model's own errors are raised.
    The labels of the instances used are checked (class indices 0..C-1; the dataset checks one
    per instance), and a model with one output is refused: the argmax of one column says
    nothing.
    repeats (M > 2 modalities, whose EMAP is a sampled estimate): EMAP ``repeats`` times with
    independent permutations (the first run's seed is ``seed``, as with repeats=1; the others'
    are spawned from it, so that calls with other seeds share no run; cost times repeats), fhat
    their mean; then ``gap_runs`` holds each run's gap, ``gap_spread`` their standard deviation
    (how far one run's gap may be off) and ``gap_se`` the jackknife error, over the runs, of the
    ``gap`` reported (that of the mean fhat: the mean of the runs' gaps has another error). With
    two modalities EMAP is exact and repeats > 1 is refused.
    Long runs warn once, as ``emap``'s do (the estimate covers all the repeats).
    """
    check_adapter(adapter, "emap_gap")
    if not isinstance(dataset, MultimodalDataset):
        raise ValueError(f"emap_gap needs a MultimodalDataset, got {type(dataset).__name__}.")
    _needs_two_outputs(adapter.n_classes, adapter.class_names, "emap_gap")
    seed = None if seed is None else positive_int(seed, "seed", 0)   # None: fresh
    if indices is None:
        idx = sample_indices(len(dataset), None if n is None else positive_int(n, "n", 2), seed)
    else:
        idx = dataset_indices(indices, len(dataset))
    # an instance whose input the adapter refuses: left out (said) when drawn, an error when
    # given in indices=
    drawn = ("instances of the dataset" if indices is not None or n is None
             or n >= len(dataset) else f"instances drawn (n={n}, seed={seed})")
    after = 'The gap is taken over the other {kept} ("left_out" lists those left out).'
    idx, left = leave_out_refused(
        adapter, dataset, idx, "emap_gap", given=None if indices is None else "indices",
        drawn=drawn, after=after, choose="pass indices=")
    labels = dataset.labels                 # checked by the dataset whenever they are set
    # only the labels of the instances used count: a label elsewhere is none of this gap's
    used = None if labels is None else np.asarray(labels)[idx]
    if used is not None and len(used) and used.max() >= adapter.n_classes:
        k = int(np.argmax(used))
        raise ValueError(
            f"emap_gap: the label of instance {int(idx[k])} is class index {int(used[k])}, but "
            f"the model has {adapter.n_classes} classes ({adapter.class_names}); labels are "
            "class indices 0..C-1 in the order of the adapter's class_names. An instance whose "
            "label is unknown (C or more, as the Explorer shows it) cannot count in the "
            "accuracies: pass indices= the labelled ones, e.g. "
            f"indices=np.flatnonzero(dataset.labels < {adapter.n_classes}).")
    repeats = positive_int(repeats, "repeats")
    if repeats > 1 and len(adapter.names) == 2:
        raise ValueError("emap_gap: with two modalities EMAP is exact (all N x N pairs), so "
                         "repeats would give the same gap; leave repeats at 1.")
    seeds = [seed] + ([None] * (repeats - 1) if seed is None else [
        int(child.generate_state(1)[0]) for child in np.random.SeedSequence(seed).spawn(
            repeats - 1)])

    progress = None if progress is None else ResumedProgress(progress)

    def run_all(idx, cost: _PairCost) -> list[EmapResult]:
        runs = []
        for k in range(repeats):
            step = None if progress is None else (
                lambda d, t, m="", k=k: report(progress, k * t + d, repeats * t, m))
            with torch.no_grad():           # (emap's decorator)
                runs.append(_emap(adapter, dataset, target=None, progress=step, indices=idx,
                                  batch_size=batch_size, keep_matrix=False, factorized=None,
                                  seed=seeds[k], cost=cost))
        return runs
    cost = _PairCost("emap_gap", progress, repeats)     # one warning for all the runs
    try:
        runs = run_all(idx, cost)
    except RuntimeError as e:
        if indices is not None:       # given: the error names them (emap's)
            raise
        # an instance the model cannot run alone: left out (said), as one the adapter refuses
        idx, more = leave_out_unrunnable(adapter, dataset, idx, e, "emap_gap", batch_size,
                                         given=None, drawn=drawn, after=after)
        left = {**left, **more}
        used = None if labels is None else np.asarray(labels)[idx]
        if progress is not None:
            progress.resume()            # (the retry goes on from where the first stopped)
        runs = run_all(idx, _PairCost("emap_gap", progress, repeats, said=cost.said))
    r = runs[0]
    pred = r.logits.argmax(1)
    pred_hat = np.mean([run.emap_logits for run in runs], axis=0).argmax(1)
    out = _gaps(pred, pred_hat, used)
    out.update({"n": int(len(idx)), "indices": [int(i) for i in idx], "left_out": list(left),
                "left_out_why": left,
                "forward_passes": sum(run.forward_passes for run in runs),
                "seconds": sum(run.seconds for run in runs)})
    if repeats > 1:
        gaps = [_gaps(pred, run.emap_logits.argmax(1), used)["gap"] for run in runs]
        out["gap_runs"] = gaps
        out["gap_spread"] = float(np.std(gaps, ddof=1))
        # the jackknife over the runs: the gap of the mean fhat of all runs but one, each in turn
        total = np.sum([run.emap_logits for run in runs], axis=0)
        left_out = [_gaps(pred, ((total - run.emap_logits) / (repeats - 1)).argmax(1),
                          used)["gap"] for run in runs]
        out["gap_se"] = float(math.sqrt((repeats - 1) / repeats
                                        * np.sum((np.asarray(left_out) - np.mean(left_out)) ** 2)))
    return out


def _gaps(pred: np.ndarray, pred_hat: np.ndarray, labels: np.ndarray | None) -> dict:
    """emap_gap's figures for the model's predictions and EMAP's (and the labels, if any), each
    gap with its 95% interval over the choice of instances (see ``emap_gap``)."""
    same = pred == pred_hat
    out = {"agreement": float(same.mean()),
           "gap_predictions": float(1.0 - same.mean()),
           "gap_predictions_ci95": wilson_interval(int((~same).sum()), len(same))}
    if labels is not None:
        out["accuracy_model"] = float((pred == labels).mean())
        out["accuracy_emap"] = float((pred_hat == labels).mean())
        out["gap_labels"] = out["accuracy_model"] - out["accuracy_emap"]
        out["gap_labels_ci95"] = paired_difference_interval(pred == labels, pred_hat == labels)
    labelled = labels is not None
    out["gap"] = out["gap_labels" if labelled else "gap_predictions"]
    out["gap_ci95"] = out["gap_labels_ci95" if labelled else "gap_predictions_ci95"]
    out["gap_points"] = 100.0 * out["gap"]
    out["gap_points_ci95"] = [100.0 * v for v in out["gap_ci95"]]
    return out


#: the normal quantile of a two-sided 95% interval
_Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = _Z95) -> list[float]:
    """Wilson's score interval [low, high] (95% by default) of a proportion k / n: unlike
    p +- z se, it stays inside [0, 1] and is not empty at k = 0 or k = n (about [0, 3.8 / n]
    at k = 0), where EMAP's prediction gap often is. The formula written out, tested against
    scipy's ``binomtest(k, n).proportion_ci(method="wilson")``, which takes about 430 us a call
    here (it computes the test's p-value too) against 2 us."""
    if not (is_integer(k) and is_integer(n)) or n < 1 or not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs integers 0 <= k <= n and n >= 1, got k={k!r}, "
                         f"n={n!r}.")
    k, n = int(k), int(n)
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # the ends are exact at k = 0 and k = n (rounding left 3e-18 below the centre)
    return [0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half)]


def paired_difference_interval(first, second, z: float = _Z95) -> list[float]:
    """A 95% interval [low, high] of mean(first) - mean(second) for two yes/no outcomes of the
    same instances (here: the model right, EMAP right), by Newcombe's method 10 (Statistics in
    Medicine 17, 1998): each proportion's Wilson interval, combined through the correlation phi
    of the pairs, so that the many instances both get right (or both wrong) narrow it, and it
    stays inside [-1, 1] with a few discordant pairs, where mean +- z se (0 when no pair is
    discordant) claims far too much. phi is Newcombe's corrected one: ad - bc less n / 2 when
    positive (0 if that is negative), as it is when negative; uncorrected, a table of no
    discordant pair and as many right as wrong gave [0, 0]."""
    first, second = (np.asarray(v) for v in (first, second))
    if first.shape != second.shape or first.ndim != 1 or not len(first):
        raise ValueError("paired_difference_interval needs two 1-d yes/no arrays of the same "
                         f"non-zero length, got shapes {first.shape} and {second.shape}.")
    if not all(v.dtype == bool or np.isin(v, (0, 1)).all() for v in (first, second)):
        raise ValueError("paired_difference_interval takes yes/no outcomes (booleans, or 0 and "
                         "1), such as pred == labels; got other values (class indices?).")
    first, second = first.astype(bool), second.astype(bool)
    n = len(first)
    a, b = int((first & second).sum()), int((first & ~second).sum())
    c, d = int((~first & second).sum()), int((~first & ~second).sum())
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(a + b, n, z)
    l2, u2 = wilson_interval(a + c, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c
    cross = max(cross - n / 2, 0.0) if cross > 0 else cross      # Newcombe's correction
    phi = 0.0 if margins == 0 else cross / math.sqrt(margins)
    below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    diff = p1 - p2
    return [max(-1.0, diff - below), min(1.0, diff + above)]


# --------------------------------------------------------------------------------------------
# interaction type (M2Lens vocabulary)
# --------------------------------------------------------------------------------------------
def _needs_two_outputs(k: int, names: Sequence[str], what: str) -> None:
    """A clear error when the outputs have one column: their argmax is always 0, so predictions
    (and agreement with them) would say nothing."""
    if k < 2:
        raise ValueError(
            f"{what} compares predicted classes (the argmax of the logits), but the model has one "
            f"output ({list(names)}), whose argmax is always 0. A binary model returning one "
            "logit z takes class_names=[negative, positive]: its logit is then read as two "
            "classes' logits.")


def _margin(v: np.ndarray, c: int) -> float:
    others = np.delete(v, c)
    return float(v[c] - others.max()) if len(others) else float(v[c])


#: Margins within this share of the top two logits' size are ties: float32 rounding of averages
#: over N^2 pairs reaches about 1e-7 of it, and argmax would break the tie toward class 0.
TIE_TOLERANCE = 1e-6


def _decided(v: np.ndarray, context: Sequence[np.ndarray]) -> int | None:
    """The class a vector of logits picks, or None when its top two tie: their margin is within
    TIE_TOLERANCE of the size of those two classes' entries in ``context`` (the outputs, the
    grand mean and the parts, whose rounding ``v`` carries). Only those two classes count: a
    class the model rules out, at -1e9, must not make a margin of 0.04 a tie."""
    c = int(np.argmax(v))
    if len(v) < 2:
        return c
    two = [c, int(np.argmax(np.where(np.arange(len(v)) == c, -np.inf, v)))]
    size = max(float(np.abs(np.asarray(u)[two]).max()) for u in (v, *context))
    return c if _margin(v, c) > TIE_TOLERANCE * max(size, np.finfo(np.float32).tiny) else None


def _label(logits: np.ndarray, parts: Mapping[str, np.ndarray], grand: np.ndarray,
           class_names: Sequence[str]) -> dict:
    """Label one instance from its outputs [C], centred unimodal parts {m: [C]} and grand mean.

    A vector whose top two logits are within TIE_TOLERANCE of their size picks no
    class (None), rather than the lower-numbered one: a modality the model ignores then agrees
    with no prediction, whichever class it is, and a model with no margin of its own is
    "undecided"."""
    c = int(np.argmax(logits))
    emap_out = grand + sum(parts.values())
    names = list(parts)
    context = (logits, grand, *parts.values())
    uni_pred = {m: _decided(grand + parts[m], context) for m in names}
    agree = {m: uni_pred[m] == c for m in names}
    emap_pred = _decided(emap_out, context)
    if _decided(logits, context) is None:     # the model itself picks no class
        label, dominant = "undecided", None
    elif emap_pred != c:                  # the additive parts alone would decide otherwise
        label, dominant = "conflict", None
    elif sum(agree.values()) == 1:
        # one modality alone picks the prediction (with three or more, two that each do are
        # not one dominating: they complement each other against the rest)
        label, dominant = "dominance", next(m for m in names if agree[m])
    else:                                 # all agree, several do, or none alone but together
        label, dominant = "complement", None
    inter = logits - emap_out
    return {
        "label": label, "dominant": dominant, "predicted": c,
        "predicted_name": class_name(class_names, c),
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
    _needs_two_outputs(np.shape(result.logits)[1], names, "interaction_types")
    return [_label(result.logits[i], {m: u[i] for m, u in result.unimodal.items()},
                   result.grand_mean, names) for i in range(len(result.logits))]


#: interaction_type's progress messages
_TYPE_PAIRS = "interaction type: reference pairs"
_TYPE_PARTS = "interaction type: unimodal parts"
_FUSED = " (fused encodings)"


@torch.no_grad()
def interaction_type(adapter: ModelAdapter, instance, reference=None, reference_indices=None,
                     n_reference: int = 50, seed: int = 0, batch_size: int = PERTURBATION_BATCH,
                     progress: ProgressFn = None,
                     factorized: bool | str | None = None) -> dict:
    """Dominance, complement, conflict (or undecided) for one instance, with the numbers behind
    the label.

    Unimodal part of modality m: the model's logits averaged over the reference set for the
    other modalities (EMAP's row / column means). conflict: the additive EMAP prediction differs
    from the model's, so the interaction f - EMAP decides (whether the modalities agree with each
    other or not: the interaction then conflicts with what they say); otherwise dominance when
    exactly one modality's part alone (grand mean + part) picks the predicted class
    (``dominant`` names it), and complement when several or all do (with three modalities or
    more, two that each pick it complement each other), or none alone but together they do.
    undecided: the model's own top two logits tie (within ``TIE_TOLERANCE`` of those two
    classes' logits), so there is no prediction to explain.
    A part whose top two logits tie picks no class (``unimodal_predictions`` holds None; so
    can ``emap_prediction``), never the lower-numbered one by default. ``margins`` give each
    centred part's logit margin of the predicted class over the runner-up.

    reference: a MultimodalDataset (``reference_indices``, or ``n_reference`` drawn with
    ``seed``), a list of instances, or an EmapResult that contains the instance, given then as
    its dataset index (no forwards). Cost otherwise: N^2 + 2 N + 1 model outputs in batches of
    batch_size for two modalities (M N^2 + M N + 1 for M > 2).
    M > 2: as ``emap``'s, the product-of-marginals projection sampled with ``seed``: modality
    m's part and mean of pairs are taken against N mixed references whose modality k != m is
    that of reference pi_{m,k}(j), the permutations drawn as ``emap`` draws them (so with the
    instance among the same references, in the same order, and the same seed, its numbers are
    emap's). ``seed`` also draws the ``n_reference`` references of a dataset.
    A drawn reference whose input the adapter refuses (a shape its modality does not take, a
    NaN), or that the model cannot run alone (after a failure, ``leave_out_unrunnable``), is
    left out with one UserWarning naming it, the averages taken over the others
    (``reference_size``); ``left_out`` lists those left out (with a dataset as reference),
    ``left_out_why`` {index: the adapter's error}. One given in ``reference_indices`` is an
    error (remove it from them), as is the instance's own input refused; fewer than 2 left: a
    ValueError. The model's own errors are raised.

    factorized: as ``emap``'s, with the same default (None) and the same split: the references
    and the instance are each encoded once and only the pairs are fused (checked first against
    forward passes: the references' own pairs, a few others and the instance itself), else full
    forward passes; ``factorized`` / ``factorization`` (/ ``factorization_note``) in the result
    say which was used, as ``emap``'s params do. Long pairs warn once, as ``emap``'s do.
    """
    check_adapter(adapter, "interaction_type")
    _needs_two_outputs(adapter.n_classes, adapter.class_names, "interaction_type")
    check_factorized(factorized)
    if reference is None:
        raise ValueError("interaction_type needs a reference set for EMAP's averages: pass "
                         "reference=a MultimodalDataset, a list of instances or an EmapResult.")
    if isinstance(reference, EmapResult):
        if isinstance(instance, Mapping):
            raise ValueError("With an EmapResult as reference, give the instance as its dataset "
                             "index (one of result.indices).")
        if not is_integer(instance):
            raise ValueError(f"With an EmapResult as reference, the instance is its dataset index "
                             f"(an integer, one of result.indices), got {instance!r}.")
        pos = np.nonzero(reference.indices == int(instance))[0]
        if not len(pos):
            raise ValueError(f"Instance {instance} is not among the EMAP result's instances; "
                             "pass a dataset as the reference instead.")
        how = {k: reference.params[k] for k in ("factorized", "factorization",
                                                "factorization_note") if k in reference.params}
        return (interaction_types(reference, adapter.class_names)[int(pos[0])]
                | {"reference_size": len(reference.indices)} | how)
    batch_size = positive_int(batch_size, "batch_size")
    seed = None if seed is None else positive_int(seed, "seed", 0)   # None: fresh
    left = None                      # {dataset index: why} of the references left out
    if isinstance(reference, MultimodalDataset):
        idx = (sample_indices(len(reference), positive_int(n_reference, "n_reference", 2), seed)
               if reference_indices is None else
               dataset_indices(reference_indices, len(reference), "reference_indices"))
        if not isinstance(instance, Mapping):
            instance = reference[dataset_index(instance, len(reference), "the instance index")]
        own = adapter.collate([instance])       # the instance's own error first
        # a reference whose input the adapter refuses: left out (said) when drawn, an error
        # when given in reference_indices=
        texts = reference_texts(len(reference), reference_indices, n_reference, seed,
                                "EMAP's averages", '"left_out"')
        idx, left = leave_out_refused(adapter, reference, idx, "interaction_type",
                                      choose="pass reference_indices=", stacklevel=3, **texts)
        # (stacklevel 3: torch.no_grad's frame)
        refs = [reference[int(i)] for i in idx]
    else:
        if not isinstance(instance, Mapping):
            raise ValueError("Give the instance as a dict {modality: input} when the reference is "
                             "a list of instances.")
        refs, idx = _instances(reference, reference_indices)
        own = None
    progress = None if progress is None else ResumedProgress(progress)
    cost = _PairCost("interaction_type", progress)
    run = (lambda refs, idx, cost: _typed_against(adapter, instance, own, refs, idx, seed,
                                                  batch_size, factorized, progress, cost))
    try:
        out = run(refs, idx, cost)
    except RuntimeError as e:
        if left is None:             # a list of references: the model's error, as it is
            raise
        # a reference the model cannot run alone: left out (said) when drawn, an error when
        # given in reference_indices=
        idx, more = leave_out_unrunnable(adapter, reference, idx, e, "interaction_type",
                                         batch_size, stacklevel=3, **texts)
        left = {**left, **more}
        if progress is not None:
            progress.resume()            # (the retry goes on from where the first stopped)
        out = run([reference[int(i)] for i in idx], idx,
                  _PairCost("interaction_type", progress, said=cost.said))
    return out | ({"left_out": list(left), "left_out_why": left} if left is not None else {})


def _typed_against(adapter: ModelAdapter, instance, own, refs: Sequence[Mapping], idx,
                   seed, batch_size: int, factorized, progress: ProgressFn,
                   cost: "_PairCost") -> dict:
    """``interaction_type``'s label of ``instance`` (own: its collated inputs, or None)
    against the references ``refs`` (idx: their indices); cost: the call's _PairCost."""
    names = adapter.names
    if len(names) < 2:
        raise ValueError(f"Interaction types need two or more modalities; the adapter has {names}.")
    n = len(refs)
    if n < 2:
        raise ValueError(f"The reference set needs at least 2 instances, got {n}.")
    check_instance_rows_independent(adapter, instance, refs)
    # the references grouped by input shapes (one group when they share one), the instance
    # alone: nothing is padded to another instance's length
    shapes = ShapeGroups(adapter, refs, idx)
    own = adapter.collate([instance]) if own is None else own
    # with two modalities one split (names[0] from the other) gives the N^2 pairs and both
    # parts; with M > 2 the split of each modality m gives its N^2 pairs and m's part, against
    # emap's mixed references (the others from permutations drawn with ``seed``)
    ref_pairs = [names[0]] if len(names) == 2 else list(names)
    mixing = _mixing(n, names, seed) if len(names) > 2 else {}
    total = len(ref_pairs) * n * n + len(names) * n + 1
    step = steady_progress(progress, total)
    step(0, _TYPE_PAIRS)
    cost.start(n, len(ref_pairs), total)
    logits = adapter.forward(own).double()           # [1, K]; the split's check uses it too
    passes = [1, 0]                  # forward passes, fused pairs among them (as emap's)
    grands, sums, kinds, notes = [], {}, [], []
    for g, m in enumerate(ref_pairs):
        mine = list(names) if len(ref_pairs) == 1 else [m]    # the parts this split gives
        start = g * (n * n + n)
        pairs = (ShapeGroups(adapter, _mixed_items(refs, m, mixing[m]), idx) if mixing
                 else shapes)
        res, kind, why = with_split(adapter, factorized, m, lambda split: _typed_fused(
            adapter, split, pairs, own, logits, batch_size, step, start, passes, mine, cost))
        if res is None:                  # no split: full forward passes, as emap's
            cost.how("none", why)
            acc = _forward_sums(adapter, pairs, m, adapter.forward, batch_size, False, step,
                                start, passes, _TYPE_PAIRS, cost)
            res = acc, {p: _forward_part(adapter, pairs, own, p, batch_size, step,
                                         start + n * n + k * n, passes, _TYPE_PARTS)
                        for k, p in enumerate(mine)}
        acc, parts_of = res
        grands.append(acc.row_sums.sum(0) / (n * n))
        sums.update(parts_of)
        kinds.append(kind)
        if why:
            notes.append(why if len(ref_pairs) == 1 else f"{m}: {why}")
    grand = torch.stack(grands).mean(0).cpu().numpy()
    # each unimodal part is centred by its own modality's mean of pairs, as emap's (two
    # modalities: one mean for both)
    own_mean = {m: grands[0 if len(ref_pairs) == 1 else ref_pairs.index(m)].cpu().numpy()
                for m in names}
    parts = {m: (sums[m] / n).cpu().numpy() - own_mean[m] for m in names}
    logits = logits[0].cpu().numpy()
    # the reference pairs first: a part is not finite whenever the grand mean is not
    bad = [what for what, v in [("pairs of the reference instances", grand),
                                ("the instance itself", logits),
                                *((f"the instance's {m!r} with the references' other modalities",
                                   parts[m]) for m in names)]
           if not np.isfinite(v).all()]
    if bad:
        raise ValueError(
            f"interaction_type: the model produced NaN or infinite values on {bad[0]}, so EMAP's "
            "averages would not be finite (NaN results are never returned). Leave the instances "
            "where the model is not finite out of the reference set, or make the model finite "
            "there.")
    step(total, "interaction type")
    how = _factorization(ref_pairs, kinds, notes)
    return _label(logits, parts, grand, adapter.class_names) | {"reference_size": n} | how


def _typed_fused(adapter: ModelAdapter, split: Split, shapes: ShapeGroups,
                 own: Mapping[str, torch.Tensor], logits: torch.Tensor, batch_size: int,
                 step: Callable[[int, str], None], done: int, passes: list[int],
                 mine: Sequence[str], cost: "_PairCost"
                 ) -> tuple["_PairSums", dict[str, torch.Tensor]]:
    """interaction_type's sums from a split model: (the sums of the N x N reference pairs
    f(x_side^i, x_others^j), {m: sum_j f(x_m of the instance, the other modalities of reference
    j)} for the modalities ``mine``), from the references' encodings (encoded once, each shape
    group on its own, as ``emap``'s) and the instance's (own: its inputs, a batch of one), fused
    batch_size pairs at a time. Before the pairs, the split is checked against forward passes as
    ``emap``'s (the references' own pairs and a few others) and on the instance itself (against
    ``logits`` [1, K], its forward pass): FactorizationError when they differ. step(done,
    message): progress, from done; passes: [count] of outputs computed, added to as they run;
    cost: the call's _PairCost, which times the pairs."""
    n, dev = shapes.n, adapter.device
    fused = FusedPairs(adapter, split, batch_size, False, lambda out, h: out, passes,
                       status=lambda what: step(done, f"interaction type: {what}"))
    enc = fused.encode_groups(shapes)
    fused.check(shapes, enc, adapter.forward)
    inst = fused.encode(own)
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    same_or_reject(split, fused.pairs(inst, inst, zero, zero), logits)
    passes[0] += 1
    acc = _fused_sums(fused, enc, n, False, step, done, passes, _TYPE_PAIRS + _FUSED, cost)
    done += n * n
    sums = {}
    for m in mine:
        mine_side = m == split.side   # the instance's side against the references' others
        total = torch.zeros(logits.shape[1], dtype=torch.float64, device=dev)
        for pos, values in (enc.others if mine_side else enc.side):
            for i, j in block_pairs(1, len(pos), batch_size, dev):
                out = (fused.pairs(inst, values, i, j) if mine_side
                       else fused.pairs(values, inst, j, i))
                total += out.sum(0)
                done += len(i)
                passes[0] += len(i)
                step(done, _TYPE_PARTS + _FUSED)
        sums[m] = total
    return acc, sums


def _forward_part(adapter: ModelAdapter, shapes: ShapeGroups, own: Mapping[str, torch.Tensor],
                  m: str, batch_size: int, step: Callable[[int, str], None], done: int,
                  passes: list[int], message: str) -> torch.Tensor:
    """sum_j f(x_m of the instance, the other modalities of reference j) [K] from full forward
    passes, batch_size at a time (the references grouped by the shapes of those modalities)."""
    names, dev = adapter.names, adapter.device
    part = 0.0
    for pos, xo in shapes.by([name for name in names if name != m]):
        for s in range(0, len(pos), batch_size):
            rows = torch.zeros(min(batch_size, len(pos) - s), dtype=torch.long, device=dev)
            part = part + adapter.forward(
                {name: (own[name][rows] if name == m else xo[name][s:s + batch_size])
                 for name in names}).double().sum(0)
            done += len(rows)
            passes[0] += len(rows)
            step(done, message)
    return part
