"""DIME (Lyu et al. 2022): one instance's output split into UC = EMAP(f) and MI = f - UC, each
explained per modality with LIME (the original code explained f instead of MI: a bug).

By default each modality gets its own LIME, over its units only, with the other modality left
intact (as the original DIME code does: ``design="per_modality"``); ``design="joint"`` fits one
LIME over the units of both modalities at once and splits its scores by modality.

With a two-modality model that can be split (``kernels.split_model``), the reference set and
each batch of masked instances are encoded once and only the pairs are fused. References of
different input shapes (texts of different token counts) are never padded to one length: they
are batched (and encoded) shape group by shape group, and the masked instance keeps its own
shape, so a model that pools over [PAD] tokens gets its own numbers.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch

from ..notices import warn
from ..adapter import ModelAdapter
from ..data import MultimodalDataset
from ..progress import ProgressFn
from ..results import Result, Stopwatch
from ..checks import positive_int
from .common import (PERTURBATION_BATCH, ShapeGroups, block_pairs, check_adapter,
                     check_instance_rows_independent, check_model_takes, dataset_index,
                     dataset_indices, leave_out_refused, leave_out_unrunnable,
                     masked_continuous, modality_pair, reference_texts, resolve_target,
                     sample_indices, ResumedProgress)
from .split_model import (FusedPairs, check_factorized, same_or_reject, steady_progress,
                          with_split)

__all__ = ["DimeResult", "dime"]


# --------------------------------------------------------------------------------------------
# DIME
# --------------------------------------------------------------------------------------------
@dataclass(repr=False)            # Result's one-line repr, never the arrays
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

    def _shapes(self) -> str:
        return ("uc={" + ", ".join(f"{n}: {np.shape(v)}" for n, v in self.uc.items()) + "}, "
                f"references={len(self.reference_indices)}")


#: About how many bytes of gathered inputs DIME's full-forward path builds at a time: batches
#: are gathered a few at a time (fewer, larger copies run faster with glibc's default malloc),
#: never all masks x references at once (for 224 x 224 images that was gigabytes).
GATHER_BYTES = 64 << 20

#: the progress message while the N^2 reference pairs of the grand mean are evaluated
REFERENCE_PAIRS = "DIME: pairs of the reference instances"


class _DimeForwards:
    """DIME's terms from full forward passes: f(x^z), and each masked modality against the
    reference set's other modality (the remaining modalities, if any, kept as the instance's).
    Each batch takes a reference modality from references of one input shape (``ShapeGroups``:
    one group when they share one), so nothing is padded. step(done, message): progress of the
    N^2 reference pairs (``dime``)."""

    def __init__(self, adapter, prepared, target, refs: ShapeGroups, pair, batch_size, cost,
                 step):
        self.adapter, self.p, self.t, self.refs = adapter, prepared, target, refs
        self.pair, self.bs, self.cost = pair, batch_size, cost
        self.n = refs.n
        self.constant: dict[str, torch.Tensor] = {}       # terms of intact modalities
        a, b = pair
        total, done = 0.0, 0
        for _, xa in refs.by([a]):
            for _, xb in refs.by([b]):
                for i, j in block_pairs(len(xa[a]), len(xb[b]), batch_size, adapter.device):
                    sel = {a: xa[a][i], b: xb[b][j]}
                    total = total + self._run({m: sel.get(m, prepared.raw[m])
                                               for m in adapter.names}, {}).sum()
                    done += len(i)
                    step(done, REFERENCE_PAIRS)
        self.grand = total / (self.n * self.n)

    @torch.no_grad()
    def _run(self, raw, cont) -> torch.Tensor:
        rows = max(x.shape[0] for x in [*raw.values(), *cont.values()])
        out = [self.adapter.target_output({m: x[s:s + self.bs] if x.shape[0] == rows else x
                                           for m, x in raw.items()},
                                          {m: x[s:s + self.bs] for m, x in cont.items()},
                                          self.t).double()
               for s in range(0, rows, self.bs)]
        self.cost[0] += rows
        return torch.cat(out)

    def uc_and_f(self, cont, intact=()):
        """(UC(z) [B], f(x^z) [B]) for the masked continuous inputs of a batch of masks.
        intact: modalities that every mask of the batch keeps whole (their term against the
        references is the instance's, computed once per DIME)."""
        f = self._run(self.p.raw, cont)
        parts = []
        for mod, other in (self.pair, self.pair[::-1]):   # masked mod, reference for the other
            if mod in intact:                             # every row is the instance: row 0
                if mod not in self.constant:
                    self.constant[mod] = self._against_references(mod, other, cont[mod][:1])
                parts.append(self.constant[mod])
            else:
                parts.append(self._against_references(mod, other, cont[mod]))
        return parts[0] + parts[1] - self.grand, f

    def _against_references(self, mod, other, masked) -> torch.Tensor:
        """mean_j f(masked rows of ``mod``, reference j's ``other``) [rows]."""
        p, dev = self.p, self.adapter.device
        rows = masked.shape[0]
        part = torch.zeros(rows, dtype=torch.float64, device=dev)
        for _, xo in self.refs.by([other]):           # references of one shape of ``other``
            # (mask row i, reference j) pairs, gathered GATHER_BYTES at a time (at least a
            # batch): memory does not grow with masks x references
            row = xo[other][0].nbytes + masked[0].nbytes
            chunk = max(self.bs, min(8 * self.bs, GATHER_BYTES // max(row, 1)))
            for i, j in block_pairs(rows, len(xo[other]), chunk, dev):
                raw = {m: (xo[m][j] if m == other
                           else p.raw[m].expand(len(i), *p.raw[m].shape[1:]))
                       for m in self.adapter.names}
                part.index_add_(0, i, self._run(raw, {mod: masked[i]}))
        return part / self.n


class _DimeFused:
    """DIME's terms from a split model (two modalities): the reference set and each batch of
    masked instances are encoded once, and only the pairs are fused, batch_size pairs at a time
    (memory does not grow with the N^2 pairs). The split is checked against forward passes when
    it is built (FactorizationError when they differ). step(done, message): progress of the
    N^2 reference pairs (``dime``); cost: [count] of forward passes, added to as they run."""

    def __init__(self, adapter, prepared, target, refs: ShapeGroups, split, batch_size, cost,
                 step):
        self.adapter, self.p, self.split, self.cost = adapter, prepared, split, cost
        neuron = target.kind == "neuron"
        self.constant: dict[str, torch.Tensor] = {}       # terms of intact modalities
        # the split's check (its N own pairs and a few neighbours, each fused and run in full)
        # counts its forward passes in cost
        self.fused = FusedPairs(adapter, split, batch_size, neuron,
                                lambda logits, h: adapter.output(logits, h, target), cost,
                                status=lambda what: step(0, f"DIME: {what}"))
        self.n = n = refs.n
        with torch.no_grad():
            # each shape group of the references encoded on its own (one group: one batch)
            self.ref = self.fused.encode_groups(refs)
            self.fused.check(refs, self.ref, lambda raw: adapter.target_output(raw, {}, target))
            total, done = 0.0, 0
            for ps, sv, po, ov in self.ref.blocks():
                for i, j in block_pairs(len(ps), len(po), batch_size, adapter.device):
                    total = total + self.fused.pairs(sv, ov, i, j).sum()
                    done += len(i)
                    cost[0] += len(i)
                    cost[1] += len(i)
                    step(done, REFERENCE_PAIRS)
            self.grand = total / (n * n)
            # masked inputs enter the encoders through the continuous inputs: check that path
            # on the instance and two random masks of it against full forward passes
            g = torch.Generator().manual_seed(0)
            masks = {m: torch.cat([torch.ones(1, prepared.n_units[m]),
                                   (torch.rand(2, prepared.n_units[m], generator=g) < 0.5).float()])
                     for m in adapter.names}
            cont = masked_continuous(prepared, masks, adapter)
            direct = adapter.target_output(prepared.raw, cont, target).double()
            cost[0] += len(direct)
            _, f = self.uc_and_f(cont)
            same_or_reject(split, f, direct)

    @torch.no_grad()
    def uc_and_f(self, cont, intact=()):
        """(UC(z) [B], f(x^z) [B]) for the masked continuous inputs of a batch of masks.
        intact: modalities that every mask of the batch keeps whole (their term against the
        references is the instance's, computed once per DIME)."""
        bsz = next(iter(cont.values())).shape[0]
        enc = self.fused.encode(self.p.raw, cont)
        own = torch.arange(bsz, device=self.adapter.device)
        f = self.fused.pairs(enc, enc, own, own)
        self.cost[0] += bsz
        self.cost[1] += bsz
        side = self.split.side
        other = next(m for m in self.adapter.names if m != side)
        parts = []
        # the masked side against each reference's others, then each reference's side against
        # the masked others
        for groups, masked_side, mod in ((self.ref.others, True, side),
                                         (self.ref.side, False, other)):
            if mod in intact:                             # every row is the instance: row 0
                if mod not in self.constant:
                    self.constant[mod] = self._against_references(enc, groups, masked_side, 1)
                parts.append(self.constant[mod])
            else:
                parts.append(self._against_references(enc, groups, masked_side, bsz))
        return (parts[0] + parts[1]) / self.n - self.grand, f

    def _against_references(self, enc, groups, masked_side: bool, rows: int) -> torch.Tensor:
        """sum_j of the fused pairs (masked row i, reference j) [rows], over the first ``rows``
        rows of ``enc``; per group of references whose encodings have one size (one group: all
        of them), batch_size pairs at a time (memory does not grow with masks x references)."""
        dev = self.adapter.device
        part = torch.zeros(rows, dtype=torch.float64, device=dev)
        for pos, values in groups:
            for i, j in block_pairs(rows, len(pos), self.fused.batch_size, dev):
                out = (self.fused.pairs(enc, values, i, j) if masked_side
                       else self.fused.pairs(values, enc, j, i))
                part.index_add_(0, i, out.reshape(len(i)))
        self.cost[0] += rows * self.n
        self.cost[1] += rows * self.n
        return part


#: dime's ways of explaining UC and MI: one LIME per modality (the other intact), or one over both
DESIGNS = ("per_modality", "joint")

#: lime_from_function's parameters that dime sets itself (the others are ``lime_params``)
_DIME_SETS = ("fn", "n_units", "n_samples", "seed", "progress", "batch_size")


def _check_lime_params(lime_params: Mapping, lime_from_function) -> None:
    """A ValueError naming the parameters LIME takes, before any model evaluation, when
    ``lime_params`` holds one it does not."""
    known = [n for n in inspect.signature(lime_from_function).parameters if n not in _DIME_SETS]
    unknown = [k for k in lime_params if k not in known]
    if unknown:
        raise ValueError(f"dime got unknown parameters {unknown}; besides its own it passes "
                         f"only LIME's {known} on to LIME.")


def dime(adapter: ModelAdapter, dataset: MultimodalDataset, index, reference_indices=None,
         target=None, n_samples: int = 500, n_reference: int = 50, modalities=None, seed: int = 0,
         batch_size: int = PERTURBATION_BATCH, progress: ProgressFn = None,
         factorized: bool | str | None = None, design: str = "per_modality",
         **lime_params) -> DimeResult:
    """DIME (Lyu et al. 2022): explain UC = EMAP(f) and MI = f - UC of one instance with LIME.

    index: an instance number of ``dataset`` (or an instance dict); the reference set is
    ``reference_indices`` or ``n_reference`` instances drawn with ``seed``. modalities: the
    pair (a, b) explained (default: the first two); with three or more modalities, the others
    stay at the instance's own values in every evaluation. For a unit mask z,
    UC(z) = mean_j f(x_a^z, x_b^j) + mean_i f(x_a^i, x_b^z) - mean_ij f(x_a^i, x_b^j) and
    MI(z) = f(x^z) - UC(z). design: "per_modality" (the default, as the original DIME code)
    explains UC and MI over the units of a with b intact, then over the units of b with a intact,
    one LIME of ``n_samples`` masks per modality (UC and MI share its masks); "joint" explains
    both over the units of a and b at once, one LIME of ``n_samples`` masks over all of them.
    Cost: N^2 + 2 n_samples (N + 1) + 2 N model evaluations per modality, or N^2 + n_samples
    (2 N + 1) joint (N = reference size), in batches of batch_size. factorized: as in ``emap``
    (two-modality models): the reference set and each masked instance are encoded once, and only
    the pairs are fused. progress(done, total, message): after each batch, the N^2 pairs of the
    reference set first, then LIME's masks (each counted as N pairs); a callback that raises
    (to cancel) stops DIME within a batch. Fewer masks than a LIME fit's unknowns (its units
    and an intercept) give one UserWarning, and ``params["underdetermined"]`` (with
    ``params["underdetermined_modalities"]``) says so.
    A drawn reference whose input the adapter refuses (a shape its modality does not take, a
    NaN), or that the model cannot run alone (after a failure, ``leave_out_unrunnable``), is
    left out with one UserWarning naming it, DIME's averages taken over the others
    (``params["n_reference"]``, ``reference_indices``); ``params["left_out"]`` lists those left
    out, ``params["left_out_why"]`` {index: the adapter's error}. One given in
    ``reference_indices`` is an error (remove it from them), as is the explained instance's own
    input refused; fewer than 2 left: a ValueError. The model's own errors are raised.
    """
    from .unimodal import _lime, _lime_message, lime_from_function
    check_adapter(adapter, "dime")
    if not isinstance(dataset, MultimodalDataset):
        raise ValueError(f"dime needs a MultimodalDataset for its reference set, got "
                         f"{type(dataset).__name__}.")
    a, b = modality_pair(adapter, modalities)
    batch_size = positive_int(batch_size, "batch_size")
    n_samples = positive_int(n_samples, "n_samples", 2)
    seed = positive_int(seed, "seed", 0)
    check_factorized(factorized)
    if design not in DESIGNS:
        raise ValueError(f"design must be one of {list(DESIGNS)} (one LIME per modality, with "
                         f"the other modality intact, or one LIME over both), got {design!r}.")
    _check_lime_params(lime_params, lime_from_function)
    instance = (index if isinstance(index, Mapping) else
                dataset[dataset_index(index, len(dataset), "index")])
    if reference_indices is None:
        ref_idx = sample_indices(len(dataset), positive_int(n_reference, "n_reference", 2), seed)
    else:
        ref_idx = dataset_indices(reference_indices, len(dataset), "reference_indices")
    if len(ref_idx) < 2:
        raise ValueError(f"DIME needs a reference set of at least 2 instances, got {len(ref_idx)}.")
    check_instance_rows_independent(                        # (the model's; not timed)
        adapter, instance, (dataset[int(i)] for i in ref_idx))
    with Stopwatch() as sw:
        p = adapter.prepare(instance)               # the instance's own error first
        # a reference whose input the adapter refuses: left out (said) when drawn, an error
        # when given in reference_indices=
        texts = reference_texts(len(dataset), reference_indices, n_reference, seed,
                                "DIME's averages", 'params["left_out"]')
        ref_idx, left = leave_out_refused(adapter, dataset, ref_idx, "dime",
                                          choose="pass reference_indices=", **texts)
        t = resolve_target(adapter, p, target)
        if len(adapter.names) != 2 and factorized not in (None, False):
            raise ValueError(f"factorized={factorized!r}: DIME splits only two-modality models "
                             f"(the adapter has {adapter.names}).")
        cost = [1 if target is None else 0, 0]      # forward passes; fused pairs among them
        progress = None if progress is None else ResumedProgress(progress)

        def reference_terms(ref_idx):
            """(the references' ShapeGroups, N, the progress total and step, and the terms
            (terms, kind, note) against them; the N^2 reference pairs are computed here)."""
            # the references grouped by input shapes: one group (one batch) when they share one
            refs = ShapeGroups(adapter, [dataset[int(i)] for i in ref_idx], ref_idx)
            n = len(ref_idx)
            # progress counts the N^2 reference pairs, then LIME's masks, each mask about N
            # pairs (UC's terms cost N per mask, or 2N with design="joint"; MI takes them from
            # UC's)
            phases = 4 if design == "per_modality" else 2
            total = n * n + phases * n_samples * n
            step = steady_progress(progress, total)
            step(0, REFERENCE_PAIRS)
            if len(adapter.names) == 2:
                try:
                    terms, kind, note = with_split(adapter, factorized, a, lambda split: (
                        _DimeFused(adapter, p, t, refs, split, batch_size, cost, step)))
                except RuntimeError:
                    check_model_takes(adapter, p.raw)     # the instance's own inputs first
                    raise
            else:
                terms, kind, note = None, "none", "DIME splits only two-modality models"
            if terms is None:
                terms = _DimeForwards(adapter, p, t, refs, (a, b), batch_size, cost, step)
            return refs, n, total, step, (terms, kind, note)
        try:
            refs, n, total, step, (terms, kind, note) = reference_terms(ref_idx)
        except RuntimeError as e:
            # a reference the model cannot run alone: left out (said) when drawn, an error
            # when given in reference_indices= (and the model's own error when it runs them
            # all alone, or none)
            try:
                ref_idx, more = leave_out_unrunnable(adapter, dataset, ref_idx, e, "dime",
                                                     batch_size, **texts)
            except RuntimeError as again:
                if again is e:               # none runs alone: say which inputs do not fit
                    check_model_takes(adapter, *ShapeGroups(
                        adapter, [dataset[int(i)] for i in ref_idx], ref_idx).raws)
                raise
            left = {**left, **more}
            if progress is not None:
                progress.resume()        # (the retry goes on from where the first stopped)
            refs, n, total, step, (terms, kind, note) = reference_terms(ref_idx)

        cache: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        at_instance: list[tuple[float, float]] = []     # (UC, f) at the all-ones mask

        def evaluate(masks, intact=()):
            key = masks[a].cpu().numpy().tobytes() + masks[b].cpu().numpy().tobytes()
            if key not in cache:
                cache[key] = terms.uc_and_f(masked_continuous(p, {a: masks[a], b: masks[b]},
                                                              adapter), intact)
                if not at_instance and all(bool(masks[m][0].all()) for m in (a, b)):
                    at_instance.append((float(cache[key][0][0]), float(cache[key][1][0])))
            return cache[key]

        # the modalities in the adapter's order: the same masks (and so the same scores)
        # whichever way round ``modalities`` names the pair
        units = {m: p.n_units[m] for m in adapter.names if m in (a, b)}
        designs = ([{m: u} for m, u in units.items()] if design == "per_modality"
                   else [units])
        lime_kw = dict(n_samples=n_samples, seed=seed, batch_size=batch_size, **lime_params)

        def step_progress(phase, part):
            if progress is None:
                return None
            what = "UC" if phase % 2 == 0 else "MI"
            over = "" if len(part) == 2 else f" over {next(iter(part))}"
            # LIME counts its masks (n_samples of them): each phase is n_samples * n of total
            return lambda done, of, msg: step(
                n * n + round((phase + done / max(of, 1)) * n_samples * n),
                f"DIME {what}{over}: {msg}")

        uc, mi = {}, {}
        short: list[str] = []          # the modalities of the fits with too few masks
        for k, part in enumerate(designs):
            intact = tuple(m for m in units if m not in part)

            def terms_of(masks, intact=intact):
                """(UC, f) of a batch of the design's masks (its intact modalities all ones)."""
                rows = next(iter(masks.values())).shape[0]
                return evaluate({m: masks[m] if m in masks else torch.ones(rows, units[m])
                                 for m in units}, intact)

            # LIME's own warning of too few samples is given once, below, for all the fits
            scores, under_uc = _lime(lambda m: terms_of(m)[0], part,
                                     progress=step_progress(2 * k, part), stacklevel=None,
                                     **lime_kw)
            uc.update(scores)
            scores, under_mi = _lime(lambda m: (lambda u, f: f - u)(*terms_of(m)), part,
                                     progress=step_progress(2 * k + 1, part), stacklevel=None,
                                     **lime_kw)
            mi.update(scores)
            if under_uc or under_mi:        # fewer masks than the fit's units and intercept
                short.extend(part)
        if not at_instance:     # LIME's first mask keeps every unit: this is a safeguard
            evaluate({m: torch.ones(1, u) for m, u in units.items()})
        uc_full, f_full = at_instance[0]
    if short:
        warn(_lime_message(max(sum(part.values()) for part in designs), n_samples,
                                    "dime"), UserWarning, stacklevel=2)
    return DimeResult(method="dime", target=t,
                      params={"n_samples": n_samples, "n_reference": n, "seed": seed,
                              "batch_size": batch_size, "design": design,
                              "factorization": kind, "fused_pairs": cost[1],
                              "underdetermined": bool(short),
                              "underdetermined_modalities": short,
                              "left_out": list(left), "left_out_why": left,
                              **({"factorization_note": note} if note else {}), **lime_params},
                      forward_passes=cost[0], backward_passes=0, seconds=sw.seconds,
                      modalities=(a, b), uc={k: np.asarray(uc[k]) for k in (a, b)},
                      mi={k: np.asarray(mi[k]) for k in (a, b)},
                      labels={a: list(p.labels[a]), b: list(p.labels[b])},
                      f_value=f_full, uc_value=uc_full, mi_value=f_full - uc_full,
                      reference_indices=ref_idx)
