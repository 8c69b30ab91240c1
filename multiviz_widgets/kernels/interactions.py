"""Stage 2: cross-modal interactions between the units of two modalities.

``interaction(adapter, instance, method=..., modalities=(a, b), target=...)`` returns an
:class:`~multiviz_widgets.results.Interaction`: a matrix [U_a, U_b] (rows: units of a, columns:
units of b) with its cost. Methods:

* ``second_order``: the mixed Hessian block d^2 f / dx_a dx_b summed over the scalars of each
  pair of units. Exact and batched: one forward and one backward (create_graph) give the
  first-order attribution a_u of every unit u of the contracted side r (by default the side
  with fewer units); the U_r second backward passes d a_u / dx_c run as one vmapped batch
  (``is_grads_batched``). Cost: 1 forward, 1 + U_r backwards. ``mode="replicate"`` instead
  replicates the instance U_r times along the batch (row k contracted to its own unit k, one
  double backward): U_r forwards, 2 U_r backwards. MultiViz's variant contracts side a first with
  phi = |.| (``phi="abs"``) and/or grad x input (``attribution="grad_x_input"``).
  The model must treat batch rows independently (eval mode, no batch statistics). A
  piecewise-linear model (ReLU) has no second derivatives to see, nor has a modality that
  forward() cuts off autograd's graph (detach, no_grad, round): its all-zero matrix says so in
  ``params["note"]`` (and ``params["blind"]``).
* ``pairwise_ablation``: D[u, v] = f(x) - f(x\\u) - f(x\\v) + f(x\\{u, v}); 1 + U_a + U_b +
  U_a U_b forwards, batched (each batch's masks built when it runs; a UserWarning with the
  cost above PAIRWISE_WARN_PAIRS pairs).
* ``shapley``: order-2 Shapley interaction indices (k-SII, STII, FSII or SII, computed by
  shapiq) over the players "units of a and of b"; the cross block [U_a, U_b] is reported.
  Exact when 2^players <= budget, otherwise shapiq's approximator under the budget
  (KernelSHAPIQ for k-SII and SII).

Dataset-level measures live beside this module and are re-exported here: ``emap``,
``emap_gap``, ``emap_matrix``, ``interaction_type`` and ``interaction_types`` in
``kernels.emap``; ``dime`` in ``kernels.dime``.
"""
from __future__ import annotations

import functools
import inspect
import math
import time
import warnings
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ..notices import warn
from ..adapter import MASKED_TARGET_NOTE, ModelAdapter, Prepared, Target
from ..progress import ProgressFn, check_progress, duration_words, report
from ..results import Interaction, Stopwatch
from ..checks import positive_int
from .common import (PERTURBATION_BATCH, as_prepared, check_adapter, check_rows_independent,
                     evaluate_mask_rows, evaluate_masks, math_attention, modality_pair,
                     occlusion_rows, resolve_target)
from .dime import DimeResult, dime
from .emap import EmapResult, emap, emap_gap, emap_matrix, interaction_type, interaction_types
from .unimodal import _raise_not_differentiable, raise_not_finite

__all__ = ["INTERACTION_METHODS", "interaction", "second_order", "pairwise_ablation", "shapley",
           "pairwise_masks", "SHAPLEY_INDICES",
           # re-exported from kernels.emap and kernels.dime
           "EmapResult", "emap", "emap_gap", "emap_matrix", "interaction_type",
           "interaction_types", "DimeResult", "dime"]


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
    forwards, 2 U_r backwards) or "auto": on the CPU vmap, falling back to replicate for models
    whose operations vmap does not support (``params["vmap_error"]`` says why; the failed
    attempt's forward and backward are counted); on a GPU replicate (on an H100 the easy-VQA matrix
    took 4.0 ms replicated against 5.4 ms vmapped, median of 20, ``kernels_gpu.json``: vmap runs
    the convolution backward one row at a time). Both are exact and need batch rows to be
    independent. A side the output does not depend on through a second derivative gives zeros
    (and fewer backwards); an output that does not require grad at all (forward() under
    torch.no_grad()) raises the AdapterError of stage 1's gradient methods. A matrix of zeros
    (float rounding) from a model piecewise linear at the instance (a ReLU network: its second
    derivatives are 0 almost everywhere), whose interactions second-order gradients cannot see,
    carries ``params["note"]`` saying so and what to use instead, and ``params["blind"]``;
    telling it from a model whose sides do not interact costs one more backward (vmap) or 1
    forward and 2 backwards (replicate), counted, and only when every cell is 0 (``_flat``).
    An all-zero matrix that ``_flat`` does not explain costs one forward of 4 rows more
    (``_hidden``): where removing the two modalities together shows an interaction (a side
    detached, computed under torch.no_grad() or rounded, whose derivatives are None or 0), it
    is marked blind the same way, its note naming the side and why (1 forward and 1 backward
    more).
    """
    if phi not in ("identity", "abs"):
        raise ValueError(f"phi must be 'identity' or 'abs', got {phi!r}.")
    if attribution not in ("auto", "gradient", "grad_x_input"):
        raise ValueError(f"attribution must be 'auto', 'gradient' or 'grad_x_input', got "
                         f"{attribution!r}.")
    if mode not in ("auto", "vmap", "replicate"):
        raise ValueError(f"mode must be 'auto', 'vmap' or 'replicate', got {mode!r}.")
    if times_input is not None and not isinstance(times_input, (bool, np.bool_)):
        raise ValueError(f"times_input must be None, True or False, got {times_input!r}.")
    batch_size = positive_int(batch_size, "batch_size")
    ua, ub = prepared.n_units[a], prepared.n_units[b]
    # The exact identity-phi matrix is symmetric in its two sides: contract the smaller one.
    auto = attribution == "auto" and times_input is None
    if attribution == "auto" and not auto:
        attribution = "grad_x_input" if adapter.modalities[a].weigh_units_by_input else "gradient"
    if times_input is None and not auto:         # side b along its own direction, as by default
        times_input = phi == "identity" and adapter.modalities[b].weigh_units_by_input
    symmetric = phi == "identity" and (auto or (attribution == "grad_x_input") == bool(times_input))
    swap = symmetric and ub < ua
    r, c = (b, a) if swap else (a, b)
    if auto:
        attribution = "grad_x_input" if adapter.modalities[r].weigh_units_by_input else "gradient"
        times_input = adapter.modalities[c].weigh_units_by_input if phi == "identity" else False
    args = (adapter, prepared, r, c, target, progress, phi, attribution, times_input, batch_size)
    used, fell_back = mode, None
    with math_attention():               # a transformer's attention, twice differentiable
        if mode == "auto" and adapter.device.type == "cuda":
            used = "replicate"
        elif mode in ("auto", "vmap"):
            try:
                m, fwd, bwd, flat = _sog_vmap(*args)
                used = "vmap"
            except RuntimeError as e:
                if mode == "vmap":
                    raise
                used, fell_back = "replicate", str(e).strip().splitlines()[0][:200]
        if used == "replicate":
            m, fwd, bwd, flat = _sog_replicate(*args)
            if fell_back is not None:    # the vmap attempt's forward and first backward count
                fwd, bwd = fwd + 1, bwd + 1
    if swap:
        m = m.T
        # the matrix is symmetric in its two sides: say what moved side a (the rows) and side b
        # (the columns), so that these params passed back with modalities=(a, b) give it again
        attribution, times_input = ("grad_x_input" if times_input else "gradient",
                                    attribution == "grad_x_input")
    params = {"phi": phi, "attribution": attribution, "times_input": bool(times_input),
              "contracted": r, "batch_size": batch_size, "mode": used}
    if fell_back is not None:
        params["vmap_error"] = fell_back
    note = FLAT_NOTE.format(r=r, c=c) if flat else None
    if not flat and not np.any(m):
        note, more_f, more_b = _hidden(adapter, prepared, a, b, target)
        fwd, bwd = fwd + more_f, bwd + more_b
    if note is not None:
        # blind: what the prediction path reads (the note is for people)
        params["note"], params["blind"] = note, True
    return np.ascontiguousarray(m), fwd, bwd, params


#: Largest [units, scalars] unit indicator the vmapped second-order gradients build (elements).
SMALL_INDICATOR = 1 << 16


def _first_gradient(f: torch.Tensor, x: torch.Tensor, target: Target) -> torch.Tensor | None:
    """df.sum()/dx with its graph kept (for the second derivative); None when f does not depend
    on x in autograd's graph (a modality the model ignores, or one it detaches: ``_hidden``
    tells them apart). An AdapterError, as stage 1's gradient methods raise, when f does not
    require grad at all (forward() under torch.no_grad(), or detaching every input): read as
    "no interaction", that gave an all-zero matrix where pairwise ablation found the pairs."""
    if not f.requires_grad:
        _raise_not_differentiable(target, "Second-order gradients (interaction method "
                                  "second_order)", "pairwise_ablation or shapley")
    if bool(torch.isinf(f).any()):
        # (a NaN output gives a NaN matrix, which the kernel's own check explains; an infinite
        # one, a class masked by -inf, gives finite derivatives of what came before the mask)
        value = float(f.detach().reshape(-1)[torch.isinf(f.detach().reshape(-1))][0])
        raise ValueError(
            f"second_order: the model's output for target {target} is {value} on the instance, "
            "so its derivatives say nothing (NaN results are never returned): check the model "
            "on this instance, e.g. with multiviz_widgets.check(adapter, instance)."
            + (MASKED_TARGET_NOTE if value == -math.inf else ""))
    g, = torch.autograd.grad(f.sum(), x, create_graph=True, allow_unused=True)
    return g


def _own_units(index: torch.Tensor, start: int, k: int, dtype) -> torch.Tensor:
    """[k, *index.shape]: row i is the indicator of unit start + i."""
    units = torch.arange(start, start + k, device=index.device)
    return (index.unsqueeze(0) == units.view(-1, *([1] * index.dim()))).to(dtype)


def _unit_attributions(adapter, prepared, r, c, target, phi, attribution):
    """One forward and one backward (create_graph) of the instance, under enable_grad: (f, xr1,
    xc1, a_u), a_u [U_r] the first-order attribution of every unit of side r with its graph kept
    for the second derivatives, or None when the output does not depend on x_r at all."""
    xr, xc, ir = prepared.continuous[r], prepared.continuous[c], prepared.index[r]
    n_rows = prepared.n_units[r]
    xr1 = xr.detach().unsqueeze(0).clone().requires_grad_(True)
    xc1 = xc.detach().unsqueeze(0).clone().requires_grad_(True)
    f = adapter.scalar(prepared, {r: xr1, c: xc1}, target)
    g = _first_gradient(f, xr1, target)
    if g is None:
        return f, xr1, xc1, None
    g = g[0]
    if attribution == "grad_x_input":
        g = g * (xr - prepared.baseline[r])
    # every unit's attribution. Through a [U_r, numel] indicator when that is small (its
    # batched second backward is about 5% faster than index_add's for a question's words),
    # else summed by index: the indicator's second backward builds [U_r, U_r, numel], 4 GB
    # and 30 s for a 96 x 96 image of 576 patches
    if n_rows * g.numel() <= SMALL_INDICATOR:
        own = _own_units(ir, 0, n_rows, g.dtype)
        a_u = (g.unsqueeze(0) * own).reshape(n_rows, -1).sum(1)
    else:
        a_u = g.new_zeros(n_rows).index_add(0, ir.reshape(-1), g.reshape(-1))
    return f, xr1, xc1, (a_u.abs() if phi == "abs" else a_u)


#: Second derivatives that move the first-order attributions by less than this many epsilons of
#: the model's dtype (relative to the largest attribution) are float rounding.
ROUNDING_EPS = 16

#: params["note"] of a second-order matrix that cannot show interactions (see ``_flat``)
FLAT_NOTE = ("Second-order gradients cannot see this model's interactions here: its second "
             "derivatives with respect to {r!r} are 0 at this instance (the model is piecewise "
             "linear here, e.g. a ReLU network, or forward() cuts {c!r} off autograd's graph: "
             ".detach(), torch.no_grad() or a step such as torch.round around its use), so "
             "every cell is 0 whether or not the units interact. Use pairwise ablation or "
             "Shapley interactions.")


#: params["note"] of a second-order matrix of zeros where removing the two modalities together
#: shows an interaction (see ``_hidden``); {why}: what cuts the derivatives off
HIDDEN_NOTE = ("Second-order gradients cannot see this model's interactions here: every cell "
               "is 0, but removing {a!r} and {b!r} together does not change the output by the "
               "sum of removing each (f(x) - f(x\\{a}) - f(x\\{b}) + f(x\\both) = {d:.3g}), "
               "and {why}. Use pairwise ablation or Shapley interactions.")


def _hidden(adapter, prepared, a, b, target) -> tuple[str | None, int, int]:
    """(note or None, forwards, backwards) for an all-zero second-order matrix that ``_flat``
    did not explain. Zeros are the answer when the modalities do not interact; they are a
    blind spot when a side is cut off from autograd's graph (forward() detaches it, runs it
    under torch.no_grad(), or passes it through a step such as torch.round, whose derivative is
    0), which left every cell 0 while pairwise ablation found the pairs. One forward of 4 rows
    tells them apart: removing both modalities (each to its baseline) against removing each,
    f(x) - f(x\\a) - f(x\\b) + f(x\\ab), rounding or not. Only when it is not does one more
    forward and backward find each side's first-order gradient, to say which side is cut off
    and how."""
    keep = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    masks = {n: keep[:, i:i + 1].repeat(1, prepared.n_units[n]) for i, n in enumerate((a, b))}
    with torch.no_grad():
        out = evaluate_masks(adapter, prepared, masks, target)
    f = out.double().cpu()
    d = float(f[0] - f[1] - f[2] + f[3])
    scale = float(f.abs().max())
    # the four outputs are rounded in the model's own dtype (not at most float32's, as the
    # derivatives' check is): a bfloat16 late-fusion model's contrast of 0.025 on outputs of
    # about 3 is its rounding, not an interaction
    eps = torch.finfo(out.dtype if out.is_floating_point() else torch.float32).eps
    if not (math.isfinite(d) and math.isfinite(scale)) or abs(d) <= ROUNDING_EPS * eps * scale:
        return None, 4, 0
    xs = {n: prepared.continuous[n].detach().unsqueeze(0).clone().requires_grad_(True)
          for n in (a, b)}
    with torch.enable_grad():
        out = adapter.scalar(prepared, xs, target)
        grads = (torch.autograd.grad(out.sum(), [xs[a], xs[b]], allow_unused=True)
                 if out.requires_grad else (None, None))
    why = []
    for n, g in zip((a, b), grads):
        if g is None:
            why.append(f"the output has no gradient with respect to {n!r}: forward() cuts it "
                       "off autograd's graph (.detach(), .numpy(), .item(), or torch.no_grad() "
                       "around its use)")
        elif not bool(g.detach().ne(0).any()):
            why.append(f"the output's gradient with respect to {n!r} is 0: forward() passes it "
                       "through a step (torch.round, a threshold, an argmax or an index) or "
                       "through ReLUs all inactive here")
    if not why:
        why = ["its mixed second derivatives are 0 at this instance"]
    return HIDDEN_NOTE.format(a=a, b=b, d=d, why="; ".join(why)), 5, 1


def _span(x: torch.Tensor, baseline: torch.Tensor) -> float:
    """How far the side's scalars are from their baseline (the largest |x - baseline|; 1 when
    x is its baseline): what turns a second derivative into a change of a first-order one."""
    span = float((x - baseline).abs().max()) if x.numel() else 0.0
    return span if span > 0 else 1.0


def _negligible(second: float, span: float, first: float, dtype: torch.dtype) -> bool:
    """Whether second derivatives of largest magnitude ``second``, over inputs that move by
    ``span``, change first-order attributions of largest magnitude ``first`` by float rounding
    only (ROUNDING_EPS epsilons of dtype, at most float32's: a piecewise-linear model's second
    derivatives are exactly 0 in any dtype, while bfloat16's 16 epsilons, 0.125, took a GELU
    model's real curvature of 5% for rounding)."""
    eps = min(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
    return second * span <= ROUNDING_EPS * eps * first


def _flat(adapter, prepared, r, c, m, first, times_input, a_u=None, xr1=None, phi="identity",
          attribution="gradient", target=None) -> tuple[bool, int, int]:
    """(flat, forwards, backwards): whether second-order gradients are blind at this instance.
    The cross block m is 0 (float rounding of the first-order attributions, of largest
    magnitude ``first``) while those attributions are not, and so is the block of side r with
    itself: the model is piecewise linear here (a ReLU network: its second derivatives are 0
    almost everywhere), where a model whose sides do not interact (late fusion: f = g(x_r) +
    h(x_c)) still curves in x_r. The within-r block is read along one random combination of
    the rows (0 along it: 0, almost surely) with one backward pass of a_u's graph, or, when the
    caller has no graph left (``a_u`` None), one forward and two backward passes (counted)."""
    if not first > 0 or not math.isfinite(first):
        return False, 0, 0
    dtype = prepared.continuous[r].dtype
    span_c = 1.0 if times_input else _span(prepared.continuous[c], prepared.baseline[c])
    if not _negligible(float(np.abs(m).max(initial=0.0)), span_c, first, dtype):
        return False, 0, 0
    fwd = bwd = 0
    if a_u is None:                   # replicated: the attributions of one instance again
        with torch.enable_grad():
            f, xr1, _, a_u = _unit_attributions(adapter, prepared, r, c, target, phi, attribution)
        fwd, bwd = 1, int(f.requires_grad)
        if a_u is None:
            return False, fwd, bwd
    if not a_u.requires_grad:         # the attributions do not depend on the inputs
        return True, fwd, bwd
    w = torch.randn(a_u.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h, = torch.autograd.grad(a_u, xr1, grad_outputs=w.to(a_u.dtype).to(a_u.device),
                             allow_unused=True)
    second = 0.0 if h is None else float(h.detach().abs().max())
    return _negligible(second, _span(prepared.continuous[r], prepared.baseline[r]), first,
                       dtype), fwd, bwd + 1


def _sog_vmap(adapter, prepared, r, c, target, progress, phi, attribution, times_input,
              batch_size):
    xc, ic = prepared.continuous[c], prepared.index[c]
    n_rows = prepared.n_units[r]
    report(progress, 0, n_rows, "second-order gradients")
    with torch.enable_grad():
        f, xr1, xc1, a_u = _unit_attributions(adapter, prepared, r, c, target, phi, attribution)
        if a_u is None:                              # no path from x_r: no interaction
            report(progress, n_rows, n_rows, "second-order gradients")
            return np.zeros((n_rows, prepared.n_units[c])), 1, int(f.requires_grad), False
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
            h = xc.new_zeros(k, *xc.shape) if h is None else h.reshape(k, *xc.shape)
            if times_input:
                h = h * (xc - prepared.baseline[c])
            rows.append(adapter.modalities[c].pool(h.detach(), xc, ic))
            report(progress, s + k, n_rows, "second-order gradients")
        m = torch.cat(rows).double().cpu().numpy()
        # the second backward passes run only where the attributions depend on the inputs
        backwards = 1 + (n_rows if a_u.requires_grad else 0)
        flat, _, more = _flat(adapter, prepared, r, c, m, float(a_u.detach().abs().max()),
                              times_input, a_u, xr1)
    return m, 1, backwards + more, flat


def _sog_replicate(adapter, prepared, r, c, target, progress, phi, attribution, times_input,
                   batch_size):
    xr, xc = prepared.continuous[r], prepared.continuous[c]
    ir, ic = prepared.index[r], prepared.index[c]
    wr = (xr - prepared.baseline[r]) if attribution == "grad_x_input" else None
    wc = (xc - prepared.baseline[c]) if times_input else None
    n_rows = prepared.n_units[r]
    rows, backwards, first = [], 0, 0.0
    report(progress, 0, n_rows, "second-order gradients")
    for s in range(0, n_rows, batch_size):
        k = min(batch_size, n_rows - s)
        xr_b = xr.detach().unsqueeze(0).repeat(k, *([1] * xr.dim())).requires_grad_(True)
        xc_b = xc.detach().unsqueeze(0).repeat(k, *([1] * xc.dim())).requires_grad_(True)
        with torch.enable_grad():
            f = adapter.scalar(prepared, {r: xr_b, c: xc_b}, target)
            g = _first_gradient(f, xr_b, target)
            backwards += k if f.requires_grad else 0
            h = None
            if g is not None:                        # else no path from x_r: no interaction
                if wr is not None:
                    g = g * wr
                a_u = (g * _own_units(ir, s, k, g.dtype)).reshape(k, -1).sum(1)  # row i: unit s + i
                if phi == "abs":
                    a_u = a_u.abs()
                # a running maximum on the device: read once, after the loop (no sync per batch)
                first = torch.maximum(torch.as_tensor(first, dtype=a_u.dtype, device=a_u.device),
                                      a_u.detach().abs().max())
                if a_u.requires_grad:
                    h, = torch.autograd.grad(a_u.sum(), xc_b, allow_unused=True)
                    backwards += k
        if h is None:                                        # no path from x_c: no interaction
            h = torch.zeros_like(xc_b)
        if wc is not None:
            h = h * wc
        rows.append(adapter.modalities[c].pool(h.detach(), xc, ic))
        report(progress, s + k, n_rows, "second-order gradients")
    m = torch.cat(rows).double().cpu().numpy()
    flat, more_f, more_b = _flat(adapter, prepared, r, c, m, float(first), times_input, phi=phi,
                                 attribution=attribution, target=target)
    return m, n_rows + more_f, backwards + more_b, flat


# --------------------------------------------------------------------------------------------
# pairwise ablation
# --------------------------------------------------------------------------------------------
#: pairwise_ablation warns (UserWarning, with its cost) above this many pairs of units: each pair
#: is a forward pass (784 image patches x 512 tokens are 401,408 of them)
PAIRWISE_WARN_PAIRS = 100_000
#: ... or when its first batches say it will take longer than this (seconds)
PAIRWISE_WARN_SECONDS = 60.0


def _pairwise_rows(ua: int, ub: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows start..stop - 1 of ``pairwise_masks(ua, ub)``, built alone: one batch's masks
    ((stop - start) x (U_a + U_b) values, whatever the number of pairs)."""
    r = torch.arange(start, stop)
    k = torch.arange(len(r))
    ma, mb = torch.ones(len(r), ua), torch.ones(len(r), ub)
    o = 1 + ua + ub
    alone_a = (r >= 1) & (r <= ua)               # row 1 + u: unit u of a removed
    ma[k[alone_a], r[alone_a] - 1] = 0
    alone_b = (r > ua) & (r < o)                 # row 1 + U_a + v: unit v of b removed
    mb[k[alone_b], r[alone_b] - 1 - ua] = 0
    pair = r >= o                                # row o + u U_b + v: both removed
    q = r[pair] - o
    ma[k[pair], q // ub] = 0
    mb[k[pair], q % ub] = 0
    return ma, mb


def pairwise_masks(ua: int, ub: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks for 1 + U_a + U_b + U_a U_b forwards: full, each u removed, each v, each pair
    (u, v). All of them at once ((1 + U_a + U_b + U_a U_b) x (U_a + U_b) floats: about 2 GB for
    784 x 512 units); pairwise_ablation builds them one batch at a time."""
    return _pairwise_rows(ua, ub, 0, 1 + ua + ub + ua * ub)


#: shapley warns (UserWarning, with its cost) when its first batches say the whole will take
#: longer than this (seconds), as pairwise ablation does
SHAPLEY_WARN_SECONDS = 60.0


def _warn_pairwise(ua: int, ub: int, n: int, seconds: float | None) -> None:
    """The UserWarning of a pairwise ablation of many pairs: its cost (``seconds``: estimated
    from its first batches, None when not measured) and what costs less."""
    took = f", about {duration_words(seconds)} at the rate of its first batches" if seconds else ""
    warn(
        f"pairwise_ablation: {ua} x {ub} units make {ua * ub:,} pairs, one forward pass each: "
        f"{n:,} forward passes in all{took}. Use fewer, larger units (a larger patch for an "
        f"image, a larger window for a series), or second_order (1 forward and "
        f"{1 + min(ua, ub):,} backward passes) or shapley (a budget of coalitions, 4,096 by "
        "default).", UserWarning, stacklevel=4)


def pairwise_ablation(adapter: ModelAdapter, prepared: Prepared, a: str, b: str, target: Target,
                      progress: ProgressFn = None, batch_size: int = PERTURBATION_BATCH,
                      units: Mapping[str, Sequence[int]] | None = None
                      ) -> tuple[np.ndarray, int, int, dict]:
    """D[u, v] = f(x) - f(x\\u) - f(x\\v) + f(x\\{u,v}) as a matrix [U_a, U_b] (removed units take
    the baseline). Cost: 1 + U_a + U_b + U_a U_b forwards in batches of batch_size, each
    batch's masks built when it runs (memory: batch_size x (U_a + U_b) mask values, and one
    output per forward). Above PAIRWISE_WARN_PAIRS pairs, or when its second batch says the
    whole will take more than PAIRWISE_WARN_SECONDS (50,176 pairs of a large model: hours), a
    UserWarning gives the cost: the forwards, and the time the second batch took times the
    number of batches.
    units: {modality: unit indices} to compute only the pairs among those units (a modality not
    named: all its units); the other cells are 0 and ``params["units"]`` lists the units used.
    Cost then 1 + k_a + k_b + k_a k_b forwards (the prediction path's candidates)."""
    batch_size = positive_int(batch_size, "batch_size")
    full_a, full_b = prepared.n_units[a], prepared.n_units[b]
    if units is not None and (not isinstance(units, Mapping)
                              or set(units) - set(prepared.n_units)):
        # (a modality outside the pair is left alone: Explorer(method_params=) gives one units=
        # for every pair of a three-modality model)
        raise ValueError(f"units must be a dict naming units of the model's modalities "
                         f"{list(prepared.n_units)}, got {units!r}.")
    sel = {m: _unit_subset(units, m, prepared.n_units[m]) for m in (a, b)}
    ua, ub = len(sel[a]), len(sel[b])
    n = 1 + ua + ub + ua * ub
    many = ua * ub > PAIRWISE_WARN_PAIRS
    timed = n > 2 * batch_size                            # a second batch to time
    if many and not timed:
        _warn_pairwise(ua, ub, n, None)
    outs, clock = [], 0.0
    for s in range(0, n, batch_size):
        ma, mb = _pairwise_rows(ua, ub, s, min(n, s + batch_size))
        if units is not None:           # the chosen units' masks, the others kept
            ma = torch.ones(len(ma), full_a).index_copy_(1, torch.as_tensor(sel[a]), ma)
            mb = torch.ones(len(mb), full_b).index_copy_(1, torch.as_tensor(sel[b]), mb)
        outs.append(evaluate_masks(adapter, prepared, {a: ma, b: mb}, target, batch_size))
        if timed and s <= batch_size:
            # the second batch timed (the first warms up): read one output, so that a device
            # has finished the batch (no wait per batch otherwise)
            float(outs[-1][-1])
            if s == 0:
                clock = time.perf_counter()
            else:
                seconds = (time.perf_counter() - clock) * -(-n // batch_size)
                if many or seconds > PAIRWISE_WARN_SECONDS:
                    _warn_pairwise(ua, ub, n, seconds)
        report(progress, min(n, s + batch_size), n, "pairwise ablations")
    raw = torch.cat(outs)
    f = raw.double().cpu().numpy()
    f0, fa, fb = f[0], f[1:1 + ua], f[1 + ua:1 + ua + ub]
    fab = f[1 + ua + ub:].reshape(ua, ub)
    with np.errstate(invalid="ignore"):          # inf - inf: interaction() raises its error
        d = f0 - fa[:, None] - fb[None, :] + fab
    params = {"batch_size": batch_size}
    d = _rounding_floor(d, f, raw.dtype, a, b, params)
    if units is None:
        return d, len(f), 0, params
    out = np.zeros((full_a, full_b))
    out[np.ix_(sel[a], sel[b])] = d
    return out, len(f), 0, {**params, "units": {a: sel[a].tolist(), b: sel[b].tolist()}}


#: params["note"] of an ablation or exact Shapley matrix that was float rounding only
ROUNDING_NOTE = ("{a!r} and {b!r} do not interact here beyond float rounding: every cell was "
                 "within rounding of the model's outputs (at most {tol:.1g}), and is shown as 0.")


def _rounding_floor(m: np.ndarray, outputs: np.ndarray, dtype: torch.dtype, a: str, b: str,
                    params: dict) -> np.ndarray:
    """m with the cells that are float rounding of the model's outputs (ROUNDING_EPS epsilons
    of their dtype, at most float32's, times their largest magnitude) set to 0: a pair of
    modalities that does not interact gave cells of 2e-8 that the heatmap's scale drew at full
    colour, and the prediction path drew as pairs. When that leaves no cell, params["note"]
    says so."""
    finite = outputs[np.isfinite(outputs)]
    if not finite.size or not np.isfinite(m).all():
        return m
    eps = min(torch.finfo(dtype).eps if dtype.is_floating_point else 0.0,
              torch.finfo(torch.float32).eps)
    tol = ROUNDING_EPS * eps * float(np.abs(finite).max())
    small = np.abs(m) <= tol
    if not small.any():
        return m
    if small.all() and np.any(m):
        params["note"] = ROUNDING_NOTE.format(a=a, b=b, tol=tol)
    return np.where(small, 0.0, m)


def _unit_subset(units, m: str, n: int) -> np.ndarray:
    """The sorted unit indices of modality ``m`` named in ``units`` (all n when None or not
    named there); a ValueError for an index out of range, repeated or not an integer."""
    if units is None or m not in units:
        return np.arange(n)
    idx = np.asarray(list(units[m]))
    if idx.ndim != 1 or not len(idx) or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"units[{m!r}] must be a non-empty list of unit indices (integers), "
                         f"got {units[m]!r}.")
    if idx.min() < 0 or idx.max() >= n or len(np.unique(idx)) != len(idx):
        raise ValueError(f"units[{m!r}] must name distinct units of {m!r} in 0..{n - 1}, got "
                         f"{idx.tolist()[:10]}.")
    return np.sort(idx)


# --------------------------------------------------------------------------------------------
# Shapley interactions (shapiq)
# --------------------------------------------------------------------------------------------
SHAPLEY_INDICES = ("k-SII", "STII", "FSII", "SII")
#: Exact computation (all 2^n coalitions) up to this many players, when the budget allows.
EXACT_MAX_PLAYERS = 12


#: shapiq approximators that fit all interaction terms by least squares
REGRESSION_APPROXIMATORS = ("KernelSHAPIQ", "RegressionFSII")
#: A regression estimator's peak memory per cell of its coalitions x terms matrix (float64, about
#: three copies while shapiq builds and solves it), and the most it may take: beyond, shapley
#: refuses with how to lower the budget (70 players and 2^17 coalitions would need 8 GiB).
REGRESSION_BYTES_PER_CELL = 24
REGRESSION_MEMORY_LIMIT = 2 * 2**30
#: ... and per cell of its terms x terms normal matrix (X'WX, float64, and the copy that
#: np.linalg.solve factors): 150 players' 11,326 terms took 2 GiB more than the coalitions
REGRESSION_BYTES_PER_TERM_PAIR = 16
#: A regression's arithmetic rate (flops per second) for the estimate of its fit's time, which
#: runs in shapiq after the last coalition, where a cancel cannot stop it: 150 players' fit
#: (about 3e12 flops, the two halves' X'WX and solves) took 37 s on this project's 2 CPU cores
REGRESSION_FLOPS_PER_SECOND = 8e10
#: shapiq approximators that average over sampled permutations
PERMUTATION_APPROXIMATORS = ("PermutationSamplingSTII",)
#: shapley warns when a sampled matrix's ``relative_noise`` reaches this: mostly noise (the
#: heatmap's caption says so from the same value, ``views.heatmap_view.NOISY``)
NOISE_WARN = 0.5


def _regression_terms(n: int) -> int:
    """The terms of an order-2 regression of n players: the empty set, n singles, the pairs."""
    return 1 + n + n * (n - 1) // 2


def _regression_bytes(n: int, budget: int) -> int:
    """A regression estimator's peak memory for n players and ``budget`` coalitions: its
    coalitions x terms matrices and its terms x terms normal matrix."""
    terms = _regression_terms(n)
    return REGRESSION_BYTES_PER_CELL * budget * terms + REGRESSION_BYTES_PER_TERM_PAIR * terms ** 2


def _regression_seconds(n: int, budget: int) -> float:
    """About how long a regression estimator's fit of n players to ``budget`` coalitions takes
    (both halves: X'WX, 2 coalitions x terms^2 flops in all, and two solves, 2/3 terms^3
    each), at REGRESSION_FLOPS_PER_SECOND."""
    terms = _regression_terms(n)
    return (2.0 * budget * terms ** 2 + 4.0 / 3.0 * terms ** 3) / REGRESSION_FLOPS_PER_SECOND


def auto_max_players(budget: int) -> int:
    """The players that ``max_players="auto"`` keeps: as many as the budget computes exactly
    (2^players <= budget), at most EXACT_MAX_PLAYERS and at least 2.

    Why exact by default: on easy-VQA, 24 players (a question's 4 to 9 words, the rest
    patches) sampled with 4,096 coalitions by KernelSHAPIQ gave a matrix off by a median 0.18
    of its norm (0.12 to 0.51 over 6 questions and 4 seeds, against 131,072 coalitions), with
    the strongest cell the reference's in 22 of 24 runs (``benchmarks/shapley_accuracy.py``;
    permutation sampling, used before, was off by 0.60). The same 4,096 coalitions compute 12
    players exactly: fewer units, but what is shown is the index itself, not an estimate."""
    return max(2, min(EXACT_MAX_PLAYERS, int(budget).bit_length() - 1))


def _mean_and_noise(m1: np.ndarray, m2: np.ndarray, w1: float = 1.0, w2: float = 1.0
                    ) -> tuple[np.ndarray, float]:
    """(mean, relative standard error of the mean) of two independent estimates of a matrix,
    each the average of w1 and w2 samples (coalitions): the mean weighs them by w, and the
    error follows from their difference, ||m1 - m2|| sqrt(w1 w2) / (w1 + w2), divided by the
    mean's norm (two equal halves: ||m1 - m2|| / ||m1 + m2||). 0 when both are 0; infinite when
    they differ and their mean is 0 (the estimate is all noise); NaN for non-finite values."""
    mean = (w1 * m1 + w2 * m2) / (w1 + w2)
    if not (np.isfinite(m1).all() and np.isfinite(m2).all()):
        return mean, float("nan")
    error = float(np.linalg.norm(m1 - m2)) * math.sqrt(w1 * w2) / (w1 + w2)
    size = float(np.linalg.norm(mean))
    if size > 0:
        return mean, error / size
    return mean, 0.0 if error == 0 else float("inf")


def _half_seeds(seed: int) -> tuple[int, int]:
    """Two seeds for the two halves of a sample, from independent streams of ``seed`` (seed and
    seed + 1 would make the second half of seed s the first half of seed s + 1)."""
    return tuple(int(child.generate_state(1)[0]) for child in np.random.SeedSequence(seed).spawn(2))


def _shapiq_approximator(index: str, n: int, seed: int, budget: int):
    """shapiq's approximator for an order-2 index: KernelSHAPIQ for k-SII and SII, RegressionFSII
    for FSII (regressions: every pair estimated from every coalition); for STII permutation
    sampling when the budget buys at least two permutations, else SVARMIQ.

    Why not permutation sampling for k-SII / SII: it estimates a pair only from the
    permutations in which its two players are adjacent, about 2 / n of them (pairs no sampled
    permutation visited came back as exactly 0).
    With 24 easy-VQA players and 4,096 coalitions its matrix was off by a median 0.59 of the
    norm of a 131,072-coalition reference, KernelSHAPIQ's by 0.20 (2 questions, 4 seeds, both
    run as two halves), in 0.9 s per matrix against 0.8 s (2 CPU threads); on a planted model
    of 18 players (median of 18 runs against exact k-SII), 0.17 against KernelSHAPIQ's 0.041
    at 2,048 coalitions and 0.115 against 0.026 at 4,096."""
    import shapiq
    if index == "FSII":
        return shapiq.RegressionFSII(n=n, max_order=2, random_state=seed)
    if index in ("k-SII", "SII"):
        return shapiq.KernelSHAPIQ(n=n, max_order=2, index=index, random_state=seed)
    perm = _permutation_sampler(n, seed)
    if budget >= _two_permutations(perm, n):
        return perm
    return shapiq.SVARMIQ(n=n, max_order=2, index="STII", random_state=seed)


def _split_players(ua: int, ub: int, max_players: int) -> tuple[int, int]:
    """How many players of each modality (ua + ub > max_players >= 2): the modality with fewer
    units keeps up to half of max_players (all its units when they fit), the other the rest.
    A cross-modal matrix needs both sides: a split in proportion to the units gave a
    question of 7 words 2 of 24 players beside 22 image patches."""
    small = min(ua, ub, max(1, max_players // 2))
    large = min(max(ua, ub), max_players - small)
    small = min(min(ua, ub), max_players - large)      # what the larger one cannot use
    return (small, large) if ua <= ub else (large, small)


def _top_units(effect: np.ndarray, k: int) -> np.ndarray:
    """The k units of largest effect, in unit order. Effects equal to 1e-6 of the largest are
    ties, broken by unit order: two units with the same effect (a repeated word) must not swap
    places with the model's rounding, for example between CPU and GPU."""
    q = np.round(effect / max(float(effect.max(initial=0.0)), 1e-30) * 1e6)
    return np.sort(np.argsort(-q, kind="stable")[:k])


def _permutation_sampler(n: int, seed: int):
    """STII's permutation sampler (the only index still sampled by permutations)."""
    import shapiq
    return shapiq.PermutationSamplingSTII(n=n, max_order=2, random_state=seed)


def _takes_batch_size(approximator) -> bool:
    """Whether the approximator's approximate() has a batch_size parameter (shapiq's permutation
    samplers do; SVARMIQ, KernelSHAPIQ and RegressionFSII do not)."""
    try:
        return "batch_size" in inspect.signature(approximator.approximate).parameters
    except (TypeError, ValueError):
        return False


def _two_permutations(perm, n: int) -> int:
    """The budget at which permutation sampling takes over (two permutations and the ends)."""
    return 2 * perm.iteration_cost + n + 2


def shapley(adapter: ModelAdapter, prepared: Prepared, a: str, b: str, target: Target,
            progress: ProgressFn = None, index: str = "k-SII", budget: int = 4096,
            max_players: int | str | None = "auto", seed: int = 0,
            batch_size: int = PERTURBATION_BATCH) -> tuple[np.ndarray, int, int, dict]:
    """Cross block [U_a, U_b] of order-2 Shapley interactions computed by shapiq.

    Players are the units of a and b (a unit "absent" takes its baseline; other modalities stay).
    Exact (shapiq.ExactComputer) when 2^players <= budget and players <= EXACT_MAX_PLAYERS;
    otherwise shapiq's approximator for the index with ``budget`` evaluations
    (``_shapiq_approximator``): KernelSHAPIQ for k-SII/SII, RegressionFSII for FSII (FSII is a
    least-squares fit, so within-modality higher-order effects can leak into cross pairs), for
    STII permutation sampling when the budget buys two permutations, else SVARMIQ. Each
    estimates every pair (a regression from every coalition, STII's sampler from every
    permutation; shapiq's k-SII/SII sampler, used before KernelSHAPIQ, visits a pair only in the
    permutations where its two players are adjacent, and gave 0 for pairs none visited).
    max_players ("auto", the default: as many as the budget computes exactly, 12 for 4,096, see
    ``auto_max_players``; a number; None = every unit): when the two modalities have more units,
    keep only those with the largest occlusion effect (2 + U_a + U_b extra forwards), split
    between the modalities by ``_split_players`` (the one with fewer units keeps up to half); the
    other units stay present and their cells are 0 (``params["players"]`` lists the players).
    A few thousand evaluations cannot estimate the ~U_a U_b pairs of 70 players well.
    KernelSHAPIQ with a budget of at least twice its terms (1 + n + n(n - 1) / 2 for n players),
    and STII's permutation sampling with a budget for at least four permutations, run as two
    halves with independent seeds drawn from ``seed`` and report their mean, weighted by each
    half's coalitions; ``params["relative_noise"]`` is the relative standard error of that
    mean, from the halves' difference (``_mean_and_noise``; None when exact, or when run as one:
    FSII, or a smaller budget), and from NOISE_WARN on (mostly noise) a UserWarning says so;
    ``params["coalitions"]``: the coalitions evaluated (at most the budget; permutation
    sampling stops at whole permutations). Cost: at most budget forwards (plus the occlusion
    pass); a regression also builds and solves a weighted least-squares problem of coalitions x
    terms, per half: about 0.2 s in all for 24 players and 4,096 coalitions (0.7 s of easy-VQA
    forwards on 2 CPU threads), 2.3 s for 70 players, 37 s for 150 (a fit a cancel cannot stop:
    the progress says when it begins, and one estimated over SHAPLEY_WARN_SECONDS is warned),
    and a peak of about 3 x 8 bytes x coalitions x terms plus 2 x 8 bytes x terms^2 of memory
    (1 GB for a run of 16,384 coalitions of 70 players; over REGRESSION_MEMORY_LIMIT it is
    refused, with the max_players that fits). A budget that ``max_players="auto"`` cannot
    spend (exact stops at EXACT_MAX_PLAYERS players) is warned, with max_players= to pass. The
    players (and the split of max_players) are chosen, and the coalitions sampled, in the
    adapter's order of the two modalities, so that (b, a) gives exactly the transpose of (a, b).
    """
    if adapter.names.index(a) > adapter.names.index(b):
        m, forwards, backwards, params = shapley(adapter, prepared, b, a, target, progress, index,
                                                 budget, max_players, seed, batch_size)
        players = params["players"]
        return (m.T.copy(), forwards, backwards,
                dict(params, players={a: players[a], b: players[b]}))
    if index not in SHAPLEY_INDICES:
        raise ValueError(f"Unknown Shapley interaction index {index!r}; choose one of "
                         f"{list(SHAPLEY_INDICES)}.")
    budget = positive_int(budget, "budget", 4)
    auto = isinstance(max_players, str)
    if auto:
        if max_players != "auto":
            raise ValueError(f"max_players must be 'auto', a number of players (at least 2) or "
                             f"None (every unit), got {max_players!r}.")
        max_players = auto_max_players(budget)
    batch_size = positive_int(batch_size, "batch_size")
    seed = positive_int(seed, "seed", 0)
    import shapiq
    ua, ub = prepared.n_units[a], prepared.n_units[b]
    pa, pb = np.arange(ua), np.arange(ub)
    forwards = 0
    if max_players is not None:
        max_players = positive_int(max_players, "max_players", 2)
        if ua + ub > max_players:
            ka, kb = _split_players(ua, ub, max_players)
            occ = {}
            for name, u in ((a, ua), (b, ub)):
                f = evaluate_mask_rows(adapter, prepared, 1 + u,
                                       lambda s, e, name=name, u=u: occlusion_rows({name: u}, s,
                                                                                    e),
                                       target, batch_size, progress,
                                       f"choosing the Shapley players: occlusion of {name}")
                occ[name] = (f[0] - f[1:]).abs().double().cpu().numpy()
                forwards += 1 + u
            pa, pb = _top_units(occ[a], min(ka, ua)), _top_units(occ[b], min(kb, ub))
    na, nb = len(pa), len(pb)
    n = na + nb
    exact = n <= EXACT_MAX_PLAYERS and 2 ** n <= budget
    if auto and exact and ua + ub > n and budget >= 2 * 2 ** n:
        # a budget raised for more players ({"shapley": {"budget": 8192}}) bought none
        warn(f"shapley: max_players='auto' computes {n} players exactly from {2 ** n:,} of the "
             f"{budget:,} coalitions of the budget (exact Shapley interactions stop at "
             f"{EXACT_MAX_PLAYERS} players). To spend it on more of the {ua + ub} units, pass "
             f"max_players= too (e.g. 24: sampled, with the estimate's error said).",
             UserWarning, stacklevel=3)
    total = 2 ** n if exact else budget                # coalitions the game is asked for
    evaluated = [0]

    clock = [time.perf_counter(), False]     # when the game began; whether its cost was said

    def chunk_done(done: int, _rows: int, _message: str) -> None:
        # per chunk of batch_size coalitions, counted over the whole game: shapiq's exact
        # computer asks for all 2^n coalitions in one call, and a progress report is where a
        # cancelled job stops
        so_far = min(evaluated[0] + done, total)
        if not clock[1] and so_far >= 2 * batch_size and so_far < total:
            # its cost from its first batches, said once when long (as pairwise ablation's)
            clock[1] = True
            seconds = (time.perf_counter() - clock[0]) * total / so_far
            if seconds > SHAPLEY_WARN_SECONDS:
                warn(f"shapley: {total:,} coalitions of {n} players, one forward pass each: "
                     f"about {duration_words(seconds)} at the rate of its first batches. Lower the "
                     "budget or max_players, or use second_order (1 forward and as many "
                     "backward passes as the smaller side has units).", UserWarning)
        report(progress, so_far, total, "Shapley coalitions")

    largest = [0.0, torch.float32]           # the game's largest |value| and its dtype
    fitting = [0]                            # a regression's terms, once it is chosen

    def game(coalitions: np.ndarray) -> np.ndarray:
        z = torch.from_numpy(np.atleast_2d(np.asarray(coalitions, dtype=np.float32)))
        ma, mb = torch.ones(z.shape[0], ua), torch.ones(z.shape[0], ub)
        ma[:, torch.from_numpy(pa)] = z[:, :na]
        mb[:, torch.from_numpy(pb)] = z[:, na:]
        out = evaluate_masks(adapter, prepared, {a: ma, b: mb}, target, batch_size, chunk_done)
        evaluated[0] += z.shape[0]
        if fitting[0]:     # a regression's coalitions come in one call: its fit follows, where
            # a cancel cannot stop it, so the last stop is here, and the bar says what runs
            report(progress, min(evaluated[0], total), total,
                   f"Shapley: fitting {fitting[0]:,} interaction terms to the coalitions")
        values = out.double().cpu().numpy()
        finite = values[np.isfinite(values)]
        largest[:] = [max(largest[0], float(np.abs(finite).max(initial=0.0))), out.dtype]
        return values

    def cross_block(iv) -> np.ndarray:
        lookup = iv.interaction_lookup
        values = np.asarray(iv.values, dtype=np.float64)
        m = np.zeros((ua, ub))
        for i, u in enumerate(pa):
            for j, v in enumerate(pb):
                pos = lookup.get((i, na + j))
                if pos is not None:
                    m[u, v] = values[pos]
        return m

    underdetermined, noise = False, None
    if exact:
        approximator = "ExactComputer"
        m = cross_block(shapiq.ExactComputer(game, n_players=n)(index, order=2))
    else:
        ap = _shapiq_approximator(index, n, seed, budget)
        approximator = type(ap).__name__
        terms = _regression_terms(n)                  # what a regression estimator solves for
        regression = approximator in REGRESSION_APPROXIMATORS
        need = _regression_bytes(n, budget)
        if regression and need > REGRESSION_MEMORY_LIMIT:
            fits = max((k for k in range(2, n) if _regression_bytes(k, budget)
                        <= REGRESSION_MEMORY_LIMIT), default=None)
            room = REGRESSION_MEMORY_LIMIT - REGRESSION_BYTES_PER_TERM_PAIR * terms ** 2
            lower_budget = (room // (REGRESSION_BYTES_PER_CELL * terms)) if room > 0 else 0
            raise ValueError(
                f"shapley: {approximator} would fit {terms:,} interaction terms of {n} players "
                f"to {budget:,} coalitions, a least-squares problem of about "
                f"{need / 2**30:.1f} GiB (at most {REGRESSION_MEMORY_LIMIT / 2**30:.0f} GiB are "
                "allowed). Lower max_players"
                + (f" (at most {fits} fit with this budget)" if fits else "")
                + (f", or the budget (at most {lower_budget:,} for {n} players, though fewer "
                   f"coalitions than its {terms:,} terms leave it underdetermined)"
                   if lower_budget >= 4 else "") + ".")
        fit_seconds = _regression_seconds(n, budget) if regression else 0.0
        if fit_seconds > SHAPLEY_WARN_SECONDS:
            warn(f"shapley: after its {budget:,} coalitions, {approximator} fits {terms:,} "
                 f"interaction terms of {n} players, about {duration_words(fit_seconds)} of "
                 "arithmetic that a cancel cannot stop once it has begun. Lower max_players "
                 "(the fit grows with its cube).", UserWarning, stacklevel=3)
        underdetermined = regression and budget < terms
        fitting[0] = terms if regression else 0
        if underdetermined:
            halves = (f" (at least {2 * terms} to measure its noise)"
                      if approximator == "KernelSHAPIQ" else "")
            warn(
                f"shapley: {approximator} fits {terms} interaction terms of {n} players from "
                f"only {budget} coalitions, so its estimate is underdetermined and can change "
                f"a lot with the model's rounding (for example between CPU and GPU). Raise "
                f"budget to at least {terms}{halves} or lower max_players.", UserWarning,
                stacklevel=3)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*budget.*", category=UserWarning)
            kw = {}
            if _takes_batch_size(ap):              # permutations evaluated per game call
                kw["batch_size"] = max(1, batch_size // max(1, getattr(ap, "iteration_cost", 1)))
            if (approximator in PERMUTATION_APPROXIMATORS
                    and budget >= 2 * _two_permutations(ap, n)
                    or approximator == "KernelSHAPIQ" and budget // 2 >= terms):
                # two independent halves (the second spends what the first left), each able to
                # estimate every pair, weighed by their coalitions: the halves' difference says
                # how good their mean is
                first, second = (_shapiq_approximator(index, n, s, budget)
                                 for s in _half_seeds(seed))
                m1 = cross_block(first.approximate(budget=budget // 2, game=game, **kw))
                used = evaluated[0]
                m2 = cross_block(second.approximate(budget=budget - used, game=game, **kw))
                m, noise = _mean_and_noise(m1, m2, used, evaluated[0] - used)
            else:
                m = cross_block(ap.approximate(budget=budget, game=game, **kw))
    if evaluated[0] < total:            # permutation sampling stops at whole permutations
        report(progress, total, total, "Shapley coalitions")
    if noise is not None and noise >= NOISE_WARN:             # NaN: a non-finite matrix, refused
        what = ("two independent halves of the sample cancel out" if math.isinf(noise) else
                f"its error, estimated from two independent halves of the sample, is about "
                f"{noise:.0%} of the matrix's size")
        warn(
            f"shapley: {approximator}'s estimate from {evaluated[0]:,} coalitions of {n} players "
            f"is mostly noise: {what}. Raise the budget (now {budget:,}) or lower max_players.",
            UserWarning, stacklevel=3)
    params = {"index": index, "budget": budget, "exact": exact, "approximator": approximator,
              "underdetermined": underdetermined, "relative_noise": noise,
              "coalitions": evaluated[0], "seed": seed,
              "max_players": max_players, "players": {a: pa.tolist(), b: pb.tolist()}}
    if exact:                         # (a sampled estimate's own noise is far above rounding)
        m = _rounding_floor(m, np.array([largest[0]]), largest[1], a, b, params)
    return m, forwards + evaluated[0], 0, params


# --------------------------------------------------------------------------------------------
# the uniform entry point
# --------------------------------------------------------------------------------------------
INTERACTION_METHODS: dict[str, Callable] = {
    "second_order": second_order,
    "pairwise_ablation": pairwise_ablation,
    "shapley": shapley,
}


@functools.lru_cache(maxsize=64)
def _method_params(fn: Callable) -> list[str] | None:
    """The parameters an interaction method takes besides those ``interaction`` passes; None
    when it takes any (**kwargs)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params
            if p.name not in ("adapter", "prepared", "a", "b", "target", "progress")]


def interaction(adapter: ModelAdapter, instance, method: str = "second_order", modalities=None,
                target=None, progress: ProgressFn = None, **params) -> Interaction:
    """The unit x unit interaction matrix between modalities (a, b) of one instance.

    instance: a dict {modality: raw input} or a Prepared; modalities: (rows, columns), default
    the adapter's first two; target: None (predicted class), a class index or name, or Neuron(j).
    Extra params go to the method (see ``INTERACTION_METHODS``). The result states its cost.
    A ValueError, never a NaN matrix, when the model's outputs (on the instance, or on the
    masked inputs or gradients the method needs) are not finite.
    """
    check_adapter(adapter, "interaction")
    check_progress(progress, "interaction")
    if not isinstance(method, str) or method not in INTERACTION_METHODS:
        raise ValueError(f"Unknown interaction method {method!r}; choose one of "
                         f"{list(INTERACTION_METHODS)}.")
    known = _method_params(INTERACTION_METHODS[method])
    unknown = [] if known is None else [k for k in params if k not in known]
    if unknown:
        raise ValueError(f"interaction method {method!r} got unknown parameters {unknown}; it "
                         f"takes {known}.")
    a, b = modality_pair(adapter, modalities)
    prepared = as_prepared(adapter, instance)
    check_rows_independent(adapter, prepared)          # (a check of the model: not timed)
    with Stopwatch() as sw:
        t = resolve_target(adapter, prepared, target)
        matrix, fwd, bwd, used = INTERACTION_METHODS[method](
            adapter, prepared, a, b, t, progress=progress, **params)
        matrix = np.asarray(matrix, dtype=np.float64)
        if not np.isfinite(matrix).all():
            raise_not_finite(adapter, prepared, t, (a, b), method, "matrix")
    return Interaction(method=method, target=t, params=used,
                       forward_passes=int(fwd) + (1 if target is None else 0),
                       backward_passes=int(bwd), seconds=sw.seconds, modalities=(a, b),
                       matrix=matrix,
                       row_labels=list(prepared.labels[a]), col_labels=list(prepared.labels[b]))
