"""Stage 1: unimodal importance of every unit of every modality, in one uniform call.

``attribute(adapter, instance, method=..., target=...)`` returns an :class:`Attribution` holding,
for each explained modality, per-unit scores, a full-resolution map and the cost it took.
``attribute_batch(adapter, instances, method=..., targets=...)`` returns one per instance (or
per target of one instance), the gradient methods sharing their forward and backward passes.

Methods:

* ``gradient``: d f / d x pooled to units (one forward + one backward of a batch of one);
* ``grad_x_input``: (d f / d x) * x pooled to units (same cost);
* ``integrated_gradients``: (x - b) * mean over the path b -> x of d f / d x (S forwards and
  backwards, batched; completeness: the scores sum to f(x) - f(b) up to the quadrature error).
  The rows x and b ride along in the same passes (weight 0; 2 more rows unless the rule's nodes
  include alpha = 0 and 1; their gradients are left out of the sum, so a gradient that is
  infinite there, a sqrt at a zero baseline, does not make the scores NaN where captum's are
  finite), so ``params["completeness_gap"]`` = f(x) - f(b) - sum(scores)
  (captum's convergence delta) and ``params["completeness_gap_relative"]`` (|gap| over
  |f(x) - f(b)|) are recorded, with a ``CompletenessWarning`` above ``COMPLETENESS_WARN`` for
  class targets (a neuron's gap is recorded only: see ``_warn_completeness``);
* ``occlusion``: f(x) - f(x with unit u at its baseline), for all units of all modalities in
  batched forwards (1 + U forwards);
* ``lime``: a weighted ridge regression of f on random binary unit masks (n_samples forwards;
  fewer samples than units + 1 warn and set ``params["underdetermined"]``);
* ``kernel_shap``: the Shapley-kernel regression constrained so that the scores sum exactly to
  f(x) - f(baseline) (n_samples forwards; exact Shapley values from the 2^U forwards when
  2^U <= n_samples, ``params["exact"]``; too few samples to determine the regression warn and
  set ``params["underdetermined"]``).

Gradients are taken with respect to the *continuous* inputs of all explained modalities at once
(for text: the embedding layer's output, never the token ids). The target is a class logit or a
decision-layer neuron (``Neuron(j)``); every method handles both. ``modalities=[...]`` restricts an
explanation to some modalities: the others stay as they are in the instance.

Captum: the results equal captum's (Saliency, IntegratedGradients with the same quadrature,
FeatureAblation with a unit feature mask; tests check it; one exception: captum's
"riemann_trapezoid" weights sum to (S - 1) / S, ours are the trapezoid rule's and sum to 1),
but the kernels are written directly on the adapter: captum's Lime and KernelShap build every
sample in a Python loop (about 5x slower than the vectorised sampling here), and its gradient
methods neither pool to units nor target decision neurons. ``benchmarks/kernels.py`` times each
method against captum's equivalent.

Non-finite results are refused: when the model's output on the instance, or on the masked or
interpolated inputs a method builds, is NaN or infinite, every method raises a ValueError that
says where (the instance, its baseline) instead of returning NaN scores.

Maps: gradient methods give the modality's ``to_map`` of the scalar attribution; perturbation
methods spread each unit's score evenly over its scalars before ``to_map``, so for every method
the map summed over a unit's region equals the unit's score.
"""
from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from ..notices import is_collecting, warn
from ..adapter import (INFERENCE_MODE_MESSAGE, MASKED_TARGET_NOTE, NOT_IN_NUMPY, AdapterError,
                       ModelAdapter, Prepared, Target)
from ..modalities import LOW_PRECISION, Modality
from ..progress import ProgressFn, check_progress, report
from ..results import Attribution, Stopwatch
from ..checks import positive_int
from .common import (PERTURBATION_BATCH, as_prepared, check_adapter, check_rows_independent,
                     evaluate_mask_rows, evaluate_masks, occlusion_rows, positive_number,
                     resolve_target)

__all__ = ["METHODS", "AttributionMethod", "attribute", "attribute_batch", "lime_from_function",
           "kernel_shap_from_function", "integration_rule", "CompletenessWarning",
           "COMPLETENESS_WARN", "NoGradientWarning"]

#: integrated gradients warns when |f(x) - f(b) - sum(scores)| exceeds this share of |f(x) - f(b)|
COMPLETENESS_WARN = 0.05


class NoGradientWarning(UserWarning):
    """A gradient method's scores of a modality are 0 because no gradient reached it (the model
    computes it under torch.no_grad(), detached, or through a step without a gradient)."""


class CompletenessWarning(UserWarning):
    """Integrated gradients' scores for a class miss f(x) - f(baseline) by more than
    COMPLETENESS_WARN (warned once per adapter; every result records its gap in its params)."""


_WARNED_COMPLETENESS: weakref.WeakSet = weakref.WeakSet()     # adapters warned about
_WARNED_NO_GRADIENT: weakref.WeakSet = weakref.WeakSet()      # adapters warned about


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _select(adapter: ModelAdapter | None, prepared: Prepared, modalities) -> list[str]:
    """The explained modalities, validated, in the adapter's order (each once)."""
    names = list(prepared.names)
    if modalities is None:
        return names
    if isinstance(modalities, str):
        modalities = [modalities]
    try:
        wanted = list(modalities)
    except TypeError:
        raise ValueError(f"modalities must be a list of modality names drawn from {names}, got "
                         f"{modalities!r}.") from None
    unknown = [m for m in wanted if m not in names]
    if unknown or not wanted:
        raise ValueError(f"modalities={wanted!r} is not a non-empty subset of this model's "
                         f"modalities {names}" + (f"; unknown: {unknown}" if unknown else "")
                         + ". Pass modalities=None to explain all of them.")
    return [n for n in names if n in wanted]


def _check_baselines(adapter: ModelAdapter, prepared: Prepared, names: Sequence[str],
                     method: str) -> None:
    """A ValueError when an explained modality's baseline does not have its continuous input's
    shape. Without it a wrong baseline (a custom Modality.baseline_raw, a Prepared edited by
    hand) gave integrated gradients a bare torch error and was silently broadcast by the
    perturbation methods."""
    for n in names:
        x, b = prepared.continuous[n], prepared.baseline[n]
        if tuple(b.shape) != tuple(x.shape):
            raise ValueError(
                f"{method}: the baseline of modality {n!r} has shape {tuple(b.shape)} but its "
                f"continuous input has shape {tuple(x.shape)}; the baseline must have the "
                f"input's shape (every unit removed). {type(adapter.modalities[n]).__name__}."
                "baseline_raw(x) must return a tensor of x's shape (prepare the instance with "
                "adapter.prepare(instance) rather than editing Prepared.baseline).")


#: The most memory integrated gradients may take for its quadrature and its path's rows, as
#: shapley's REGRESSION_MEMORY_LIMIT (kernels/interactions.py): beyond, integrated gradients (and
#: integration_rule) refuse with the steps that fit (steps=10**9 raised numpy's MemoryError for
#: 6.94 EiB).
PATH_MEMORY_LIMIT = 2 * 2**30
#: numpy's leggauss solves a dense [steps, steps] float64 eigenproblem: about two copies (its
#: companion matrix and LAPACK's), 16 bytes per cell (peak RSS for 2,000 steps); any rule keeps
#: about 32 bytes per step (its nodes and weights, in numpy and as tensors)
LEGGAUSS_BYTES_PER_CELL = 16
QUADRATURE_BYTES_PER_STEP = 32
#: the path's rows exist about twice while they are built (the path, then its concatenation
#: with x and the baseline)
PATH_COPIES = 2


def _ig_bytes(steps: int, rule, row_bytes: int) -> tuple[int, int]:
    """(quadrature bytes, path bytes) of integrated gradients with ``steps`` nodes of ``rule``
    and rows of ``row_bytes`` bytes (all explained modalities' scalars)."""
    quad = QUADRATURE_BYTES_PER_STEP * steps
    if rule == "gausslegendre":
        quad += LEGGAUSS_BYTES_PER_CELL * steps * steps
    return quad, PATH_COPIES * _ig_ends(steps, rule)[2] * row_bytes


def _size(n: float) -> str:
    """A number of bytes for people: '512.0 MiB', '6.9 EiB'."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024:
            return f"{n:.0f} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} EiB"


def _check_ig_memory(steps: int, rule, row_bytes: int, where: str) -> None:
    """A ValueError, before anything is computed, when ``steps`` nodes of ``rule`` (and the
    path's rows of ``row_bytes`` bytes, 0: the quadrature alone) would take more than
    PATH_MEMORY_LIMIT: what they would need and the most steps that fit."""
    quad, path = _ig_bytes(steps, rule, row_bytes)
    if quad + path <= PATH_MEMORY_LIMIT:
        return
    lo, hi = 0, steps                                  # the most steps that fit: in [lo, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if sum(_ig_bytes(mid, rule, row_bytes)) <= PATH_MEMORY_LIMIT else (
            lo, mid)
    parts = [f"{_size(quad)} for the {rule} nodes"
             + (" (numpy's leggauss solves a dense steps x steps eigenproblem)"
                if rule == "gausslegendre" else "")]
    if row_bytes:
        parts.append(f"{_size(path)} for the path's {_ig_ends(steps, rule)[2]:,} rows of "
                     f"{_size(row_bytes)}")
    fits = (f"Lower steps to at most {lo:,} (integrated gradients' default is 50; a few "
            "hundred are plenty for a smooth model, and each result's "
            "params['completeness_gap'] says how close its scores are)" if lo else
            "Even one step does not fit: explain fewer modalities (modalities=[...])")
    raise ValueError(
        f"{where}: steps={steps:,} would need about {_size(quad + path)} of memory: "
        + "; ".join(parts) + f". At most {_size(PATH_MEMORY_LIMIT)} are allowed. {fits}.")


def integration_rule(steps: int, rule: str = "gausslegendre") -> tuple[np.ndarray, np.ndarray]:
    """(alphas, weights) of a quadrature of the integral over [0, 1] with ``steps`` nodes.

    rules: "gausslegendre" (captum's default), "riemann_right" (k/S), "riemann_left",
    "riemann_middle", "riemann_trapezoid". The weights sum to 1. Steps whose nodes would take
    more than PATH_MEMORY_LIMIT (about 11,500 Gauss-Legendre nodes, whose dense eigenproblem
    also takes time cubic in steps) are refused with a ValueError.
    """
    s = positive_int(steps, "steps")
    _check_ig_memory(s, rule, 0, "integration_rule")
    if rule == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(s)
        return (x + 1) / 2, w / 2
    if rule == "riemann_right":
        return np.arange(1, s + 1) / s, np.full(s, 1.0 / s)
    if rule == "riemann_left":
        return np.arange(0, s) / s, np.full(s, 1.0 / s)
    if rule == "riemann_middle":
        return (np.arange(s) + 0.5) / s, np.full(s, 1.0 / s)
    if rule == "riemann_trapezoid":
        if s < 2:
            raise ValueError("riemann_trapezoid needs at least 2 steps.")
        w = np.full(s, 1.0 / (s - 1))
        w[0] = w[-1] = 0.5 / (s - 1)
        return np.linspace(0, 1, s), w
    raise ValueError(f"Unknown integration rule {rule!r}; use one of 'gausslegendre', "
                     "'riemann_right', 'riemann_left', 'riemann_middle', 'riemann_trapezoid'.")


def _quadrature(steps: int, rule, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """integration_rule's nodes and weights as float64 tensors on ``device``, made once per
    (steps, rule, device): on a GPU each copy from the host waits for the work queued before it.
    The tensors are shared: never modify them."""
    if not isinstance(rule, str):
        integration_rule(steps, rule)            # raises its clear error (and is not cached)
    return _quadrature_once(steps, rule, device)


@functools.lru_cache(maxsize=32)
def _quadrature_once(steps: int, rule: str, device: torch.device):
    # float64: the rows are made in the inputs' dtype (``.to(x)``) and the weights cast to the
    # outputs' (``.to(out)``), so a float32 model gets the same float32 values as before and a
    # float64 model the nodes and weights to its own precision (float32 nodes capped its
    # completeness gap at about 1e-9, where captum's reaches 1e-10 and less)
    alphas, weights = integration_rule(steps, rule)
    return (torch.as_tensor(alphas, dtype=torch.float64, device=device),
            torch.as_tensor(weights, dtype=torch.float64, device=device))


class _Gradients(dict):
    """{modality: gradient}, with ``unreached``: the modalities no gradient reached, whose
    gradient is given as 0 (autograd found no path from them to the output: the model does not
    use them, or computes them under no_grad, detached or through a non-differentiable step)."""
    unreached: tuple[str, ...] = ()


def _gradients(leaves: Mapping[str, torch.Tensor], grads) -> _Gradients:
    out = _Gradients({n: torch.zeros_like(leaves[n]) if g is None else g
                      for n, g in zip(leaves, grads)})
    out.unreached = tuple(n for n, g in zip(leaves, grads) if g is None)
    return out


def _unreached_found(unreached: Iterable[str]) -> dict:
    """The params entry of the modalities no gradient reached: ``no_gradient`` [names]."""
    names = sorted(set(unreached))
    return {"no_gradient": names} if names else {}


def _input_grads(adapter: ModelAdapter, prepared: Prepared, target: Target,
                 inputs: Mapping[str, torch.Tensor], weights: torch.Tensor | None = None,
                 one_row: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(d (sum_b weights_b f(inputs_b)) / d inputs, f(inputs) [B]) for a batch [B, ...] of
    continuous inputs; one_row: the inputs are one row without the batch dimension (the
    gradients come without it too: the backward pass drops it, not an operation after it).

    One forward and one backward of B instances; the other modalities stay at the instance.
    """
    if any(t.is_inference() for t in inputs.values()):
        # (a copy of one would work here, but the instance's other tensors fail later)
        raise AdapterError(_PREPARED_IN_INFERENCE_MODE, code="inference-mode")
    # one row: the instance's own tensors, copied (about 4 us for an image, and no step in the
    # backward pass), so that a model writing into its input under no_grad cannot change the
    # instance (ModelAdapter.model_inputs copies the other inputs of one row)
    leaves = {n: (t.detach().clone() if one_row else t.detach()).requires_grad_(True)
              for n, t in inputs.items()}
    with torch.enable_grad():
        out = adapter.scalar(prepared, ({n: t.unsqueeze(0) for n, t in leaves.items()}
                                        if one_row else leaves), target)
        if not out.requires_grad:
            _raise_not_differentiable(target)
        grad_out = torch.ones_like(out) if weights is None else weights.to(out)
        grads = torch.autograd.grad(out, list(leaves.values()), grad_outputs=grad_out,
                                    allow_unused=True)
    return _gradients(leaves, grads), out.detach()


#: the gradient methods, named in the advice of the errors below
_GRADIENT_METHODS = "gradient, grad_x_input and integrated_gradients"


def _raise_not_differentiable(target: Target,
                              methods: str = f"The gradient methods ({_GRADIENT_METHODS})",
                              instead: str = "occlusion, lime or kernel_shap"):
    """The AdapterError (a ValueError) of a gradient method whose model output does not require
    grad, though its inputs do (torch's own error says only "element 0 of tensors does not
    require grad"). Reached after the forward pass, on this path only. methods: who needs the
    gradients; instead: the methods that do not (stage 2 passes its own)."""
    if torch.is_inference_mode_enabled():
        raise AdapterError(INFERENCE_MODE_MESSAGE, code="inference-mode")
    raise AdapterError(
        f"The model's output for target {target} does not depend differentiably on its inputs "
        "(it does not require grad although the inputs do): forward() runs under "
        "torch.no_grad() (or a @torch.no_grad() decorator) or detaches its inputs (.detach(), "
        ".numpy(), .item()), and no parameter after that requires grad. "
        f"{methods} need a model whose output is differentiable in its inputs: "
        f"remove that from forward(), or use {instead}, which need no "
        "gradients (multiviz_widgets.check(adapter, instance) tests this).",
        code="no-gradient")


#: an instance prepared inside torch.inference_mode(): its tensors cannot require grad
_PREPARED_IN_INFERENCE_MODE = (
    "This prepared instance was made inside torch.inference_mode(): its tensors are inference "
    "tensors, which cannot be differentiated nor tracked for in-place changes outside it. "
    "Prepare it again outside torch.inference_mode() (adapter.prepare(instance), under "
    "torch.no_grad() if you like) and explain that.")


def _unit_sums(adapter: ModelAdapter, prepared: Prepared, name: str, attr: torch.Tensor
               ) -> torch.Tensor:
    """Per-unit sums [n_units] of one instance's scalar attribution (the modality's ``pool``).

    A modality that keeps the base class's sum-per-unit pool takes a faster path (scatter_add
    with the prepared index and unit count, no max over the index); one that overrides ``pool``
    is called as it is.
    """
    mod = adapter.modalities[name]
    if type(mod).pool is Modality.pool:
        out = torch.zeros(prepared.n_units[name], dtype=attr.dtype, device=attr.device)
        return out.scatter_add_(0, prepared.index[name].reshape(-1), attr.reshape(-1))
    return mod.pool(attr.unsqueeze(0), prepared.continuous[name], prepared.index[name])[0]


def _scores_and_maps(adapter: ModelAdapter, prepared: Prepared,
                     attrs: Mapping[str, torch.Tensor], one_transfer: bool | None = None
                     ) -> tuple[dict, dict]:
    """({name: per-unit scores}, {name: full-resolution map}) as numpy arrays, from each
    modality's scalar attribution; computed where the attributions live and, from a GPU,
    copied to the host in one transfer (each copy waits for the device). one_transfer: None
    decides by the device (tests force either way).

    Every gradient call runs this right after its backward pass, with this code out of the
    CPU's caches, so it is written as a plain loop (each call or comprehension here costs
    microseconds: see benchmarks/cold_cache.py)."""
    parts = []
    for n, a in attrs.items():
        if a.dtype in LOW_PRECISION:     # a bfloat16 sum rounds each step: ~1e-3 off the exact
            a = a.float()                # sum of the same values; float32 holds each exactly
        mod = adapter.modalities[n]
        both = mod.unit_sums_and_map(a, prepared.continuous[n], prepared.index[n])
        if both is None:
            both = _unit_sums(adapter, prepared, n, a), mod.to_map(a)
        for t in both:
            if t.dtype in NOT_IN_NUMPY:        # a bfloat16 model's map: float32 holds it
                t = t.float()
            parts.append(t.detach() if t.requires_grad else t)
    if one_transfer is None:
        one_transfer = parts[0].device.type != "cpu"
    if not one_transfer:
        arrays = [t.numpy() if t.device.type == "cpu" else t.cpu().numpy()
                  for t in parts]                                # on the CPU: no copy at all
    else:
        dtype = functools.reduce(torch.promote_types, [t.dtype for t in parts])  # no rounding
        flat = torch.cat([t.reshape(-1).to(dtype) for t in parts]).cpu().numpy()
        arrays, o = [], 0
        for t in parts:
            arrays.append(flat[o:o + t.numel()].reshape(tuple(t.shape)))
            o += t.numel()
    scores, maps = {}, {}
    for i, n in enumerate(attrs):
        scores[n], maps[n] = arrays[2 * i], arrays[2 * i + 1]
    return scores, maps


_FLOAT64 = np.dtype(np.float64)


def _float64(values) -> np.ndarray:
    """values as a float64 numpy array (as they are when they are one already)."""
    if type(values) is np.ndarray and values.dtype is _FLOAT64:
        return values
    return np.asarray(values, dtype=np.float64)


def _all_finite(arrays, small: int = 4096) -> bool:
    """Whether every value of the float arrays is finite. A NaN or an infinity makes a sum
    non-finite, so a small array is first checked through the Python sum of its values: right
    after a backward pass numpy's code is out of the CPU's caches and ``np.isfinite(v).all()``
    costs about three times as much (``benchmarks/cold_cache.py``). Only a non-finite sum (an
    overflow gives one too) is checked value by value."""
    for v in arrays:
        if v.size <= small and math.isfinite(sum((v if v.ndim == 1 else v.ravel()).tolist())):
            continue
        if not np.isfinite(v).all():
            return False
    return True


def _perturbation_map(adapter: ModelAdapter, prepared: Prepared, name: str,
                      scores: torch.Tensor) -> np.ndarray:
    """A unit score spread evenly over the unit's scalars, then the modality's to_map; in the
    input's precision, at least float32 (a float64 model's map sums to its scores exactly, a
    bfloat16 model's is one numpy holds)."""
    idx = prepared.index[name]
    dtype = torch.promote_types(prepared.continuous[name].dtype, torch.float32)
    scores = scores.to(idx.device, dtype)       # from numpy, where idx lives with the model
    counts = torch.bincount(idx.reshape(-1), minlength=scores.numel()).clamp(min=1)
    per_scalar = (scores / counts.to(scores))[idx]
    return adapter.modalities[name].to_map(per_scalar).detach().cpu().numpy()


def _units_offsets(prepared: Prepared, names: Sequence[str]) -> tuple[dict[str, int], int]:
    offsets, total = {}, 0
    for n in names:
        offsets[n] = total
        total += prepared.n_units[n]
    return offsets, total


def _split(vec: np.ndarray, n_units: Mapping[str, int]) -> dict[str, np.ndarray]:
    out, o = {}, 0
    for n, u in n_units.items():
        out[n] = np.asarray(vec[o:o + u])
        o += u
    return out


#: What to do when the model is not finite on inputs moved towards a baseline.
BASELINE_HINT = ("Choose another baseline for the modality (its baseline= argument: Image "
                 "'zero', 'white', 'mean' or 'blur'; Text 'pad' or 'zero'; Tabular 'zero', "
                 "'mean' or a vector; TimeSeries 'zero' or 'mean'), or make the model finite "
                 "there (multiviz_widgets.check(adapter, instance) tests it).")


def raise_not_finite(adapter: ModelAdapter, prepared: Prepared, target: Target,
                     names: Sequence[str], method: str, what: str = "scores"):
    """Raise the ValueError of ``method`` whose ``what`` (scores, outputs, matrix) are NaN or
    infinite. On this error path only, one forward pass of 2 + len(names) rows tells whether
    the model's output is finite on the instance, with the modalities ``names`` at their
    baselines, and with each of them alone at its baseline."""
    names = list(names)
    keep = torch.ones(2 + len(names), len(names))
    keep[1] = 0
    keep[2 + torch.arange(len(names)), torch.arange(len(names))] = 0
    masks = {n: keep[:, i:i + 1].repeat(1, prepared.n_units[n]) for i, n in enumerate(names)}
    fx, fb, *alone = (float(v) for v in evaluate_masks(adapter, prepared, masks, target))
    baselines = " and ".join(names) + (" at their baselines" if len(names) > 1 else
                                       " at its baseline")
    culprits = [f"{n} alone at its baseline gives {v}" for n, v in zip(names, alone)
                if len(names) > 1 and not math.isfinite(v)]
    if culprits:
        baselines += " (" + "; ".join(culprits) + ")"
    hint = BASELINE_HINT
    head = (f"{method}: the model produced NaN or infinite values, so the {what} would not be "
            f"finite (NaN results are never returned). Its output for target {target}")
    if not math.isfinite(fx):
        masked = MASKED_TARGET_NOTE if fx == -math.inf else ""
        raise ValueError(f"{head} is {fx} on the instance itself: check the model and the "
                         "input (a sqrt or log of a negative number, a division by zero, an "
                         "overflow), e.g. with multiviz_widgets.check(adapter, instance)."
                         + masked)
    if not math.isfinite(fb):
        bad = [n for n, v in zip(names, alone) if not math.isfinite(v)]
        hint = _division_hint(adapter, prepared, target, bad, method) or hint
        raise ValueError(f"{head} is finite on the instance ({fx:.4g}) but {fb} with {baselines}"
                         f": the masked or interpolated inputs that {method} builds from the "
                         f"baseline take the model where it is not finite. {hint}")
    raise ValueError(f"{head} is finite on the instance ({fx:.4g}) and with {baselines} "
                     f"({fb:.4g}), but not on some masked or interpolated input between them, "
                     f"or its gradient is not finite there (a sqrt at 0, say). {hint}")


#: per modality kind: a baseline that is not constant, where the modality has one
_NOT_CONSTANT = {
    "image": " or use Image(baseline='blur'), the one Image baseline that is not constant",
    "tabular": " or pass Tabular(baseline=[...]) a vector whose values are not all equal",
    "timeseries": " (both TimeSeries baselines, 'zero' and 'mean', are constant along time, so "
                  "switching between them does not help)",
    "text": " (both Text baselines, 'pad' and 'zero', repeat one vector over the tokens, so "
            "switching between them does not help)",
}


def _division_hint(adapter: ModelAdapter, prepared: Prepared, target: Target,
                   names: Sequence[str], method: str) -> str | None:
    """What to do when the model is not finite with the modalities ``names`` each alone at its
    baseline but finite with that baseline plus a little noise (one forward pass per modality,
    on this error path only): the model divides by something that is zero on the baseline,
    most often the spread or norm of an input that is constant there (a z-score of each series
    inside forward gives 0 / 0 on a 'zero' or 'mean' baseline, which another constant baseline
    does not fix). None when that does not hold (the general advice stands)."""
    found = []
    gen = torch.Generator().manual_seed(0)
    for n in names:
        x, b = prepared.continuous[n], prepared.baseline[n]
        try:
            with torch.no_grad():
                scale = float((x - b).abs().max()) or float(b.abs().max()) or 1.0
                scale = scale if math.isfinite(scale) else 1.0
                noise = torch.randn(tuple(b.shape), generator=gen, dtype=torch.float64)
                row = (b + (1e-3 * scale * noise).to(b)).unsqueeze(0)
                v = float(adapter.scalar(prepared, {n: row}, target)[0])
        except Exception:  # noqa: BLE001 -- a diagnosis only: the original error stands
            continue
        if math.isfinite(v):
            found.append(n)
    if not found:
        return None
    kinds = {getattr(adapter.modalities[n], "kind", "") for n in found}
    others = "".join(_NOT_CONSTANT.get(k, "") for k in sorted(kinds))
    where = (f"{found[0]} at its baseline" if len(found) == 1 else
             f"{' or '.join(found)} (each alone) at its baseline")
    return (f"With {where} plus a little noise (1e-3 of the input's range) the output is "
            "finite: the model divides by something that is zero on the baseline, most likely "
            "the spread or norm of an input that is constant there (a z-score of each series "
            "or image, x / x.std() or x / x.norm(), is 0 / 0 on a constant baseline such as "
            "'zero' or 'mean'). Add an epsilon to that division in the model's forward, e.g. "
            "(x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6), which leaves "
            f"other inputs as they were{others}. "
            + ("A z-score ignores each series' offset and scale, so even then integrated "
               "gradients from a constant baseline sees the whole change at alpha = 0 (a large "
               "completeness gap); occlusion, lime and kernel_shap, which remove some units "
               "only, do not. " if method == "integrated_gradients" else "")
            + "(multiviz_widgets.check(adapter, instance) tests it.)")


def _completeness_missed(r: Attribution) -> bool:
    """Whether _warn_completeness speaks of this result (a class target's gap too large)."""
    return (r.target.kind == "class"
            and r.params.get("completeness_gap_relative", 0) > COMPLETENESS_WARN)


def _warn_no_gradient(adapter: ModelAdapter, results: Sequence[Attribution]) -> None:
    """One NoGradientWarning, the first time an adapter gives gradient results with a modality
    no gradient reached (``params["no_gradient"]``), unless the completeness warning says so
    already. Its scores read 0, which a person takes for "unimportant": a frozen encoder under
    torch.no_grad() is common. In a cell only: the Explorer's caption says it beside the map."""
    if is_collecting() or adapter in _WARNED_NO_GRADIENT:
        return
    blind = [r for r in results if r.params.get("no_gradient") and not _completeness_missed(r)]
    if not blind:
        return
    _WARNED_NO_GRADIENT.add(adapter)
    names = sorted({n for r in blind for n in r.params["no_gradient"]})
    warn(f"{blind[0].method}: no gradient reaches {', '.join(map(repr, names))}, so its scores "
         "are 0 whatever the model does with it. If the model uses it (computed under "
         "torch.no_grad(), detached, or through a step without a gradient, such as a frozen "
         "encoder's), those 0s say nothing: occlusion, lime and kernel_shap, which run the model "
         "instead of its gradient, score it. (Warned once per adapter; params['no_gradient'] "
         "names such modalities.)", NoGradientWarning, stacklevel=3)


def _warn_completeness(adapter: ModelAdapter, results: Sequence[Attribution]) -> None:
    """One CompletenessWarning (pointing at the caller of attribute or attribute_batch), the
    first time an adapter gives integrated-gradients results whose relative completeness gap
    exceeds COMPLETENESS_WARN."""
    # Class targets only: a decision-layer neuron is a ReLU (or similar) unit whose value is
    # often 0 at x or at the baseline and kinked along the path, so its relative gap is large
    # routinely (on easy-VQA 15-90%, and unbounded where f(x) = f(b) = 0) and says nothing a
    # user can act on; its gap is still recorded in params.
    bad = [r for r in results if _completeness_missed(r)]
    # collected for the Explorer (``notices``): told with every result it concerns, shown
    # beside it; in a cell, once per adapter
    every = is_collecting()
    if not bad or (adapter in _WARNED_COMPLETENESS and not every):
        return
    if not every:
        _WARNED_COMPLETENESS.add(adapter)
    worst = max(bad, key=lambda r: r.params["completeness_gap_relative"])
    p = worst.params
    which = (f"{len(bad)} of {len(results)} results miss" if len(results) > 1 else
             "the scores miss")
    head = (f"integrated_gradients: {which} f(x) - f(baseline) by more than "
            f"{COMPLETENESS_WARN:.0%} (worst: a gap of {p['completeness_gap']:.4g}, "
            f"{p['completeness_gap_relative']:.0%}, with {p['steps']} {p['rule']} steps")
    more = f"Try more steps (e.g. steps={4 * int(p['steps'])})"
    if p.get("no_gradient"):
        names = ", ".join(map(repr, p["no_gradient"]))
        tail = (f"), and no gradient reaches {names}. If the model uses it (under "
                "torch.no_grad(), detached or through a step without a gradient), its scores "
                "are 0 and its part of the change is missing: no number of steps closes that "
                "gap, while occlusion, lime and kernel_shap (which run the model, not its "
                f"gradient) score it. If the model ignores it, {more[0].lower() + more[1:]}. "
                "(Warned once per adapter; params['no_gradient'] names such modalities.)")
    else:
        tail = (f"; params['completeness_gap']). {more}; if the gap stays, the model's output "
                "jumps along the path (often right at the baseline, alpha = 0) and no number "
                "of steps closes it: use a different baseline. (Warned once per adapter; each "
                "result's params hold its gap.)")
    if every:
        tail = tail.replace("Warned once per adapter; ", "")
    warn(head + tail, CompletenessWarning, stacklevel=3)


def _mask_function(adapter: ModelAdapter, prepared: Prepared, target: Target, batch_size: int,
                   names: Sequence[str], method: str
                   ) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
    """f of the masked instance, for a surrogate fitted by ``method``: raises its clear error
    when the model's output on some masked input is not finite."""
    def fn(masks):
        y = evaluate_masks(adapter, prepared, masks, target, batch_size=batch_size)
        if not torch.isfinite(y).all():
            raise_not_finite(adapter, prepared, target, names, method)
        return y
    return fn


# --------------------------------------------------------------------------------------------
# LIME and KernelSHAP on any function of unit masks (shared with DIME)
# --------------------------------------------------------------------------------------------
def _check_units(n_units: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(n_units, Mapping) or not n_units:
        raise ValueError("n_units must be a non-empty dict {modality name: number of units}.")
    out = {}
    for k, v in n_units.items():
        out[str(k)] = positive_int(v, f"n_units[{k!r}]")
    return out


def _rng(seed) -> np.random.Generator:
    """numpy's generator for a surrogate's ``seed`` (an integer >= 0, None for fresh entropy, or
    a numpy Generator / SeedSequence), or a ValueError that names the seed: numpy's own errors
    ("SeedSequence expects int...", "expected non-negative integer") do not, and a bool would
    pass as 0 or 1."""
    if isinstance(seed, (bool, np.bool_)):
        raise ValueError(f"seed must be a non-negative integer (or None), got {seed!r}.")
    try:
        return np.random.default_rng(seed)
    except (TypeError, ValueError):
        raise ValueError(f"seed must be a non-negative integer (or None), got {seed!r}.") from None


def _evaluate_in_chunks(fn, z: np.ndarray, n_units: Mapping[str, int], batch_size: int,
                        progress: ProgressFn, message: str) -> np.ndarray:
    """fn over the rows of the binary design z [n, U], batch_size rows per call: an array [n]."""
    zt = torch.from_numpy(z.astype(np.float32))
    n = z.shape[0]
    outs = []
    report(progress, 0, n, message)
    for s in range(0, n, batch_size):
        chunk = zt[s:s + batch_size]
        masks, o = {}, 0
        for name, u in n_units.items():
            masks[name] = chunk[:, o:o + u]
            o += u
        y = fn(masks)
        y = torch.as_tensor(y).detach().reshape(-1)
        if y.numel() != chunk.shape[0]:
            raise ValueError(f"The explained function returned {y.numel()} values for a batch of "
                             f"{chunk.shape[0]} masks; it must return one value per mask row.")
        outs.append(y.double().cpu().numpy())
        if not np.isfinite(outs[-1]).all():
            raise ValueError(f"The explained function returned NaN or infinite values on "
                             f"{int((~np.isfinite(outs[-1])).sum())} of the masks {s}.."
                             f"{s + chunk.shape[0] - 1} ({message}); the surrogate cannot be "
                             "fitted to them. Make it finite on masked inputs (for a model: "
                             "another baseline).")
        report(progress, min(n, s + batch_size), n, message)
    return np.concatenate(outs)


def _lime_fit(z: np.ndarray, y: np.ndarray, weights: np.ndarray, alpha: float) -> np.ndarray:
    """Weighted ridge regression of y on z with an unpenalised intercept: the coefficients.

    Solved in float64 with torch (numpy's own BLAS threads contend with torch's on small CPUs).
    """
    n, u = z.shape
    zt, yt = torch.from_numpy(z), torch.from_numpy(np.asarray(y, dtype=np.float64))
    w = torch.from_numpy(np.asarray(weights, dtype=np.float64))
    w = w / w.sum().clamp(min=1e-300)
    zc = zt - (w[:, None] * zt).sum(0)
    yc = yt - (w * yt).sum()
    zw = zc * w[:, None]
    a = zw.T @ zc
    # alpha is on the scale of sklearn's Ridge on n samples of mean weight 1 (weights sum to n):
    # with weights normalised to sum 1 it becomes alpha / n, comparable across n_samples.
    a.diagonal().add_(alpha / n)
    # without a penalty (alpha = 0) a rank-deficient design has no unique solution; solve()
    # notices only when the rounding leaves the system exactly singular (10 units and 8 to 11
    # masks gave finite coefficients off by up to 10^4), so the rank is read first
    rank = (int(torch.linalg.matrix_rank(zc * w.sqrt()[:, None])) if alpha == 0 and u else u)
    coef = None
    if rank == u:
        try:
            coef = torch.linalg.solve(a, zw.T @ yc)
        except torch.linalg.LinAlgError:
            pass
    if coef is None or not bool(torch.isfinite(coef).all()):
        # only without a penalty (alpha = 0): a penalty makes the system positive definite
        what = (f"determine only {rank} of the coefficients of its {u} units" if rank < u else
                f"do not determine the coefficients of all {u} units")
        raise ValueError(
            f"LIME's regression has no unique solution: with alpha={alpha} (no ridge penalty) "
            f"the {n} sampled masks {what} (too few masks: at least {u + 1} are needed, or a "
            "unit kept in every mask or removed in every one). Use a ridge penalty (alpha > 0; "
            "the default is 1.0) or more samples (n_samples).")
    return coef.numpy()


#: LIME's and KernelSHAP's regressions keep about this many float64 copies of their samples x
#: units design while they build and solve it (KernelSHAP's peak: 5.5 for 2,128 and 4,128 units),
#: and LIME about two units x units matrices; beyond SURROGATE_MEMORY_LIMIT they refuse, before
#: any forward pass, with what fits (8,128 units and the 24,384 samples their own warning asks
#: for ran every sample, then failed in the solve: "DefaultCPUAllocator: can't allocate memory")
SURROGATE_DESIGN_COPIES = 6
SURROGATE_MEMORY_LIMIT = PATH_MEMORY_LIMIT


def _surrogate_bytes(n_samples: int, total: int, square: bool) -> int:
    """The bytes of a surrogate's regression: its design's copies, and (``square``: LIME's
    normal equations) two units x units matrices; KernelSHAP's QR builds none."""
    return 8 * (SURROGATE_DESIGN_COPIES * n_samples * total + (2 * total * total if square
                                                              else 0))


def _check_surrogate_memory(n_samples: int, total: int, where: str, needed: int) -> None:
    """A ValueError, before any forward pass, when a LIME or KernelSHAP regression of
    ``n_samples`` samples over ``total`` units would take more than SURROGATE_MEMORY_LIMIT:
    what it would need, and the most samples that fit (and whether they are fewer than the
    ``needed`` that determine the regression)."""
    square = where == "lime"
    need = _surrogate_bytes(n_samples, total, square)
    if need <= SURROGATE_MEMORY_LIMIT:
        return
    free = SURROGATE_MEMORY_LIMIT // 8 - (2 * total * total if square else 0)
    fits = max(free // (SURROGATE_DESIGN_COPIES * total), 0) if total else 0
    few = (f", too few to determine {total:,} unit scores (about {needed:,} do): the estimate "
           f"would be a guess" if fits < needed else "")
    lower = f"fewer samples (at most {fits:,} fit{few}), " if fits >= 2 else ""
    raise ValueError(
        f"{where}: {n_samples:,} samples over {total:,} units would need about "
        f"{_size(need)} of memory for the regression (a samples x units design, several "
        f"copies while it is built and solved). At most {_size(SURROGATE_MEMORY_LIMIT)} are "
        f"allowed. Explain fewer, larger units (a larger patch, a larger window; or "
        f"modalities=[...]), {lower}or use occlusion (1 + {total:,} forward passes, memory for "
        f"one batch).")


def _lime(fn, n_units, n_samples=500, seed=0, progress=None, kernel_width=0.25,
          distance="cosine", alpha=1.0, batch_size=PERTURBATION_BATCH, keep_probability=0.5,
          stacklevel: int | None = 3) -> tuple[dict[str, np.ndarray], bool]:
    """lime_from_function's scores and whether n_samples left them underdetermined (fewer
    samples than unknowns: the units and the intercept); then a UserWarning, ``stacklevel``
    pointing at the user's call (None: no warning, the caller warns)."""
    units = _check_units(n_units)
    n_samples = positive_int(n_samples, "n_samples", 2)
    if distance not in ("cosine", "hamming"):
        raise ValueError(f"distance must be 'cosine' or 'hamming', got {distance!r}.")
    kernel_width = positive_number(kernel_width, "kernel_width (the width of LIME's kernel)")
    alpha = positive_number(alpha, "alpha (the ridge penalty; 0 for none)", allow_zero=True)
    batch_size = positive_int(batch_size, "batch_size")
    check_progress(progress, "lime")
    if (isinstance(keep_probability, (bool, np.bool_))
            or not isinstance(keep_probability, (int, float, np.integer, np.floating))
            or not 0 < keep_probability < 1):
        raise ValueError(f"keep_probability must lie strictly between 0 and 1, got "
                         f"{keep_probability!r}.")
    total = sum(units.values())
    _check_surrogate_memory(int(n_samples), total, "lime", total + 1)
    rng = _rng(seed)
    z = (rng.random((int(n_samples), total)) < keep_probability).astype(np.float64)
    z[0] = 1.0
    y = _evaluate_in_chunks(fn, z, units, batch_size, progress, "LIME samples")
    kept = z.sum(1)
    if distance == "cosine":
        d = 1.0 - np.sqrt(kept / total)
    else:
        d = 1.0 - kept / total
    weights = np.exp(-(d ** 2) / (2.0 * kernel_width ** 2))
    scores = _split(_lime_fit(z, y, weights, alpha), units)
    underdetermined = n_samples < total + 1
    if underdetermined and stacklevel is not None:
        warn(_lime_message(total, n_samples), UserWarning,
                      stacklevel=stacklevel)
    return scores, underdetermined


def _lime_message(total: int, n_samples: int, where: str = "lime") -> str:
    """The warning of a LIME of ``total`` units fitted to fewer than total + 1 samples."""
    return (f"{where}: the LIME regression fits {total} unit scores and an intercept to "
            f"only {n_samples} samples, so its estimate is underdetermined (the ridge penalty "
            f"picks one of many fits, which can be far from the model's effects: 500 samples of "
            f"1,296 units ranked a known linear function's with a Spearman correlation of 0.38). "
            f"Raise n_samples to at least {total + 1:,} (about 1.5 times that ranked it "
            f"exactly), explain fewer units (modalities=[...]), or use occlusion.")


def lime_from_function(fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
                       n_units: Mapping[str, int], n_samples: int = 500, seed: int = 0,
                       progress: ProgressFn = None, kernel_width: float = 0.25,
                       distance: str = "cosine", alpha: float = 1.0,
                       batch_size: int = PERTURBATION_BATCH,
                       keep_probability: float = 0.5) -> dict[str, np.ndarray]:
    """LIME scores of ``fn`` over the units of several modalities: {name: array [n_units]}.

    fn(masks) takes {name: float Tensor [B, n_units[name]]} of 0/1 unit masks (1 = keep) and
    returns a Tensor [B]. Masks are drawn over the concatenated units of all modalities (each unit
    kept with probability ``keep_probability``; the first mask keeps everything), weighted by
    exp(-d^2 / (2 kernel_width^2)) with d the cosine (or hamming) distance to the all-ones mask,
    and a weighted ridge regression (penalty ``alpha``) of fn on the masks gives the scores.
    Cost: n_samples evaluations of fn, batch_size masks per call.
    Fewer samples than unknowns (the U units and the intercept) leave the regression
    underdetermined: the penalty makes it solvable, not right (a known linear function of 300
    or 1,296 units: Spearman 0.4 with its effects at 0.4 U samples, 0.9 at U + 1, 1.0 at 1.5 U).
    Then a UserWarning says how many would do (``attribute`` records it as
    ``params["underdetermined"]``).
    """
    return _lime(fn, n_units, n_samples, seed, progress, kernel_width, distance, alpha,
                 batch_size, keep_probability, stacklevel=3)[0]


def _shapley_design(total: int, n_samples: int, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Coalitions z [m, U] (neither empty nor full) and their regression weights [m].

    All 2^U - 2 coalitions with their exact Shapley-kernel weights when they fit in n_samples;
    otherwise coalition sizes drawn in proportion to the kernel's mass per size, uniform subsets
    of that size, paired with their complements (antithetic), and equal weights.
    """
    if total < 2 or n_samples < 1:
        return np.zeros((0, total)), np.zeros(0)
    if total <= 20 and 2 ** total - 2 <= n_samples:
        codes = np.arange(1, 2 ** total - 1, dtype=np.int64)
        z = ((codes[:, None] >> np.arange(total)[None, :]) & 1).astype(np.float64)
        k = z.sum(1).astype(np.int64)
        log_binom = (math.lgamma(total + 1) - np.array([math.lgamma(int(i) + 1) for i in k])
                     - np.array([math.lgamma(total - int(i) + 1) for i in k]))
        w = (total - 1) / (np.exp(log_binom) * k * (total - k))
        return z, w
    sizes = np.arange(1, total)
    p = (total - 1) / (sizes * (total - sizes))
    p = p / p.sum()
    half = (n_samples + 1) // 2
    k = rng.choice(sizes, size=half, p=p)
    ranks = np.argsort(np.argsort(rng.random((half, total)), axis=1), axis=1)
    z = (ranks < k[:, None]).astype(np.float64)
    z = np.concatenate([z, 1.0 - z])[:n_samples]
    return z, np.ones(len(z))


def _shap_fit(z: np.ndarray, y: np.ndarray, w: np.ndarray, f_full: float, f_empty: float
              ) -> tuple[np.ndarray, int]:
    """Weighted least squares of y - f_empty on z subject to sum(phi) = f_full - f_empty:
    (phi, rank), rank the rank of the design, out of U - 1 free coefficients (below it the
    samples do not determine phi and lstsq's minimum-norm solution is a guess)."""
    total = z.shape[1]
    delta = f_full - f_empty
    if total == 1:
        return np.array([delta]), 0
    if len(z) == 0:
        return np.full(total, delta / total), 0
    zt = torch.from_numpy(z)
    t = (torch.from_numpy(np.asarray(y, dtype=np.float64)) - f_empty) - zt[:, -1] * delta
    x = zt[:, :-1] - zt[:, -1:]
    sw = torch.from_numpy(np.sqrt(np.asarray(w, dtype=np.float64)))[:, None]
    phi, rank = _least_squares(x * sw, t[:, None] * sw)
    phi = phi[:, 0]
    return np.concatenate([phi.numpy(), [delta - float(phi.sum())]]), rank


#: _least_squares takes a design for full rank when its smallest singular value, estimated from
#: above, exceeds this times its Frobenius norm: KernelSHAP's designs of 3 to 1,700 units had 9e-4
#: to 0.5 when full rank (from 2.5 U samples on), 5e-17 or less when not
FULL_RANK_TOLERANCE = 1e-8


def _least_squares(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(solution, rank) of min ||x s - t|| (x [m, n] float64, t [m, k]): the least-squares
    solution of a full-rank x, else the minimum-norm one and the rank that lstsq's gelsd (SVD)
    finds.

    A full-rank x (the common case, n_samples >= 2 to 3 U) is solved by Householder QR (geqrf,
    the orthogonal factor applied without being formed, and a triangular solve): on KernelSHAP's
    design of 1,700 units and 5,100 samples 0.45 s against gelsd's 1.05 to 1.27 s (2 CPU
    threads; as fast as gelsy), the same to about 1e-14. It is full rank when x has at
    least n rows and neither R's smallest diagonal entry nor ||v|| / ||R^-1 v|| (v fixed and
    random; both bound R's smallest singular value from above) falls below
    FULL_RANK_TOLERANCE ||R||_F. Anything else goes to gelsd, whose minimum-norm solution of a
    rank-deficient design is what an underdetermined KernelSHAP returns. Not lstsq's gelsy
    (pivoted QR, as fast): torch gives LAPACK its pivot array uninitialised (at::empty), so
    its pivots, and the last bits of the result, changed from call to call, and a seed must
    give the same scores. Deterministic: the same bits on every run."""
    m, n = x.shape
    if m >= n > 0:
        qr, tau = torch.geqrf(x)
        r = qr[:n].triu()
        v = torch.randn(n, 1, dtype=x.dtype, generator=torch.Generator().manual_seed(0))
        floor = FULL_RANK_TOLERANCE * float(torch.linalg.matrix_norm(r))
        if float(r.diagonal().abs().min()) > floor:
            w = torch.linalg.solve_triangular(r, v, upper=True)
            if float(v.norm() / w.norm()) > floor:           # w inf: 0, not full rank
                qt = torch.ormqr(qr, tau, t, left=True, transpose=True)[:n]
                s = torch.linalg.solve_triangular(r, qt, upper=True)
                if bool(torch.isfinite(s).all()):
                    return s, n
    fit = torch.linalg.lstsq(x, t, driver="gelsd")
    return fit.solution, int(fit.rank)


def _shap_samples_needed(total: int, n_samples: int) -> int:
    """The n_samples to suggest when n_samples left the KernelSHAP regression of ``total`` units
    underdetermined: sampled coalitions come with their complements, whose rows of the
    constrained design are the same row negated, so a pair adds at most 1 to the rank, and
    sampled coalitions repeat (those of one unit most): the U - 1 free coefficients took up to
    2.5 U samples (10 to 604 units, 3 seeds), so 3 U are suggested (twice n_samples when that
    many already fell short); never more than the 2^U that give the exact values."""
    need = 3 * total if n_samples < 3 * total else 2 * n_samples
    return min(need, 2 ** total) if total <= 20 else need


def _kernel_shap(fn, n_units, n_samples, seed, progress, batch_size, stacklevel: int
                 ) -> tuple[dict[str, np.ndarray], bool]:
    """kernel_shap_from_function's scores and whether the samples left them underdetermined
    (then warned, ``stacklevel`` pointing at the user's call)."""
    units = _check_units(n_units)
    n_samples = positive_int(n_samples, "n_samples (the full and empty masks and more)", 2)
    batch_size = positive_int(batch_size, "batch_size")
    check_progress(progress, "kernel_shap")
    total = sum(units.values())
    _check_surrogate_memory(min(int(n_samples), 2 ** min(total, 62)), total, "kernel_shap",
                            3 * total)
    rng = _rng(seed)
    zs, ws = _shapley_design(total, int(n_samples) - 2, rng)
    z = np.concatenate([np.ones((1, total)), np.zeros((1, total)), zs])
    y = _evaluate_in_chunks(fn, z, units, batch_size, progress, "KernelSHAP samples")
    # the regression is the last step, seconds for thousands of units: reported first, so that
    # a cancel stops before it
    report(progress, len(z), len(z), "KernelSHAP: fitting the regression")
    phi, rank = _shap_fit(zs, y[2:], ws, float(y[0]), float(y[1]))
    underdetermined = rank < total - 1
    if underdetermined:
        exact = (f" (exact Shapley values from {2 ** total:,})"
                 if total <= 20 and _shap_samples_needed(total, n_samples) < 2 ** total else "")
        warn(
            f"kernel_shap: the Shapley-kernel regression fits {total} unit scores from only "
            f"{n_samples} samples, whose {len(zs)} sampled coalitions determine {rank} of its "
            f"{total - 1} free coefficients, so its estimate is underdetermined (a "
            f"minimum-norm guess that can be far from the Shapley values, though the scores "
            f"still sum to f(x) - f(baseline)). Raise n_samples to at least "
            f"{_shap_samples_needed(total, n_samples):,}{exact}, explain fewer units "
            "(modalities=[...]), or use occlusion.", UserWarning, stacklevel=stacklevel)
    return _split(phi, units), underdetermined


def kernel_shap_from_function(fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
                              n_units: Mapping[str, int], n_samples: int = 500, seed: int = 0,
                              progress: ProgressFn = None, batch_size: int = PERTURBATION_BATCH
                              ) -> dict[str, np.ndarray]:
    """KernelSHAP scores of ``fn`` over the units of several modalities: {name: array [n_units]}.

    fn as in :func:`lime_from_function`. The all-ones and all-zeros masks are evaluated first;
    the scores solve the Shapley-kernel weighted regression under the efficiency constraint, so
    they sum exactly to fn(all ones) - fn(all zeros). With 2^U - 2 <= n_samples - 2 every coalition
    is evaluated and the scores are the exact Shapley values. Cost: at most n_samples evaluations.
    Too few samples to determine the regression (2 to 3 U are needed: each sampled coalition
    comes with its complement) give its minimum-norm solution and a UserWarning that says how
    many would do (``attribute`` records it as ``params["underdetermined"]``).
    """
    return _kernel_shap(fn, n_units, n_samples, seed, progress, batch_size, stacklevel=3)[0]


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------
@dataclass
class AttributionMethod:
    """One stage-1 method: ``cost`` (forward, backward passes) and ``attribute`` -> Attribution."""

    name: str
    family: str                  # "gradient" or "perturbation"
    defaults: dict
    description: str = ""
    #: whether the method reads the modalities' baselines (checked to have the inputs' shapes)
    uses_baseline = True

    def _params(self, params: Mapping) -> dict:
        unknown = sorted(set(params) - set(self.defaults) - {"modalities"}) if params else None
        if unknown:
            raise TypeError(f"{self.name} does not take {unknown}; its parameters are "
                            f"{sorted(self.defaults) + ['modalities']}.")
        out = dict(self.defaults)
        if params:
            out.update({k: v for k, v in params.items() if k != "modalities"})
        for k, least in (("steps", 1), ("internal_batch_size", 1), ("batch_size", 1),
                         ("n_samples", 2)):
            if k in out:           # stored as the Python int it was checked to be
                out[k] = positive_int(out[k], f"{self.name}: {k}", least)
        return out

    @property
    def label(self) -> str:
        """The name as words, for progress messages ("integrated gradients")."""
        return self.name.replace("_", " ")

    def cost(self, prepared: Prepared, **params) -> tuple[int, int]:
        """(forward passes, backward passes) this method needs for the instance."""
        p = self._params(params)
        # the selection attribute() makes (validated, each modality once, in the instance's
        # order): a modality named twice is explained once, so it must be counted once
        names = _select(None, prepared, params.get("modalities"))
        return self._cost(prepared, names, p)

    def _cost(self, prepared, names, p) -> tuple[int, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_size(self, prepared, names, p) -> None:
        """A ValueError, before any forward pass, when the instance would take more memory
        than the method allows (integrated gradients' path)."""

    def attribute(self, adapter: ModelAdapter, prepared: Prepared, target,
                  progress: ProgressFn = None, **params) -> Attribution:
        """The Attribution of ``target`` for a prepared instance (target None: predicted class)."""
        prepared = as_prepared(adapter, prepared)
        names = _select(adapter, prepared, params.get("modalities"))
        p = self._params(params)
        if self.uses_baseline:
            _check_baselines(adapter, prepared, names, self.name)
        self._check_size(prepared, names, p)
        extra = 0
        with Stopwatch() as sw:
            if target is None:
                target, extra = resolve_target(adapter, prepared, None), 1
            else:
                target = adapter.target(target)
            scores, maps, found = self._run(adapter, prepared, target, names, p, progress)
        fwd, bwd = self._cost(prepared, names, p)
        return self._result(adapter, prepared, target, names, p, scores, maps, fwd + extra,
                            bwd, sw.seconds, found)

    def _result(self, adapter, prepared, target, names, p, scores, maps, forward_passes: int,
                backward_passes: int, seconds: float = 0.0, found: Mapping | None = None
                ) -> Attribution:
        """The Attribution of one instance from its scores and maps (found: what the method
        measured besides, added to the params); a ValueError if the scores are not finite."""
        scores = {n: _float64(scores[n]) for n in names}
        if not _all_finite(scores.values()):
            raise_not_finite(adapter, prepared, target, names, self.name, "scores")
        return Attribution(
            method=self.name, target=target,
            params=dict(p, modalities=list(names), **(found or {})),
            forward_passes=forward_passes, backward_passes=backward_passes, seconds=seconds,
            scores=scores, maps={n: maps[n] if type(maps[n]) is np.ndarray
                                 else np.asarray(maps[n]) for n in names},
            labels={n: list(prepared.labels[n]) for n in names})

    def _run(self, adapter, prepared, target, names, p, progress):  # pragma: no cover
        """(scores, maps, found): found is a dict of measurements for the params."""
        raise NotImplementedError


class _GradientFamily(AttributionMethod):
    """A method whose attribution is a weighted sum of input gradients over rows derived from the
    instance: ``_rows`` gives those rows and weights, ``_attributions`` turns the summed gradient
    into each modality's scalar attribution (which ``_scores_and_maps`` pools and maps).
    ``_run`` explains one instance; ``attribute_batch`` stacks the rows of many instances (or
    targets) into shared forward and backward passes."""

    def _rows(self, prepared, names, p) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        raise NotImplementedError  # pragma: no cover - abstract

    def _attributions(self, prepared, names, grad_sum) -> dict[str, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover - abstract

    def _found(self, adapter, prepared, target, names, p, outputs: torch.Tensor,
               attrs: Mapping[str, torch.Tensor]) -> dict:
        """Measurements for the params from the rows' outputs f(row) [n_rows] and the scalar
        attributions (as ``_attributions`` made them)."""
        return {}

    def _rows_per_pass(self, p) -> int:
        return int(p.get("internal_batch_size", PERTURBATION_BATCH))

    def _weighted_rows(self, p) -> int:
        """How many of ``_rows``' rows, the first ones, are weighted. The rows after them
        (integrated gradients' x and baseline, weight 0) ride along for their outputs only:
        their gradients are left out of the sum, since a weight 0 times a gradient that is
        infinite there (a sqrt at 0 at a zero baseline) is NaN, and captum has no such rows."""
        return 1

    def _run(self, adapter, prepared, target, names, p, progress):
        inputs, weights = self._rows(prepared, names, p)
        n_rows, bs = len(weights), self._rows_per_pass(p)
        weighted = self._weighted_rows(p)
        total, outputs, unreached = None, [], set()
        report(progress, 0, n_rows, self.label)
        for s in range(0, n_rows, bs):
            grads, out = _input_grads(adapter, prepared, target,
                                      {n: x[s:s + bs] for n, x in inputs.items()},
                                      weights[s:s + bs])
            unreached.update(grads.unreached)
            k = min(bs, weighted - s)             # the pass's weighted rows (see _weighted_rows)
            if k > 0:
                part = {n: g[0] if k == 1 else g[:k].sum(0) for n, g in grads.items()}
                total = part if total is None else {n: total[n] + part[n] for n in names}
            outputs.append(out)
            report(progress, min(n_rows, s + bs), n_rows, self.label)
        attrs = self._attributions(prepared, names, total)
        scores, maps = _scores_and_maps(adapter, prepared, attrs)
        found = self._found(adapter, prepared, target, names, p,
                            outputs[0] if len(outputs) == 1 else torch.cat(outputs), attrs)
        return scores, maps, {**found, **_unreached_found(unreached)}


class _Gradient(_GradientFamily):
    times_input = False
    uses_baseline = False

    def _cost(self, prepared, names, p):
        return 1, 1

    def _rows(self, prepared, names, p):
        x = {n: prepared.continuous[n].unsqueeze(0) for n in names}
        # the row weight is made where the inputs live: a copy to a GPU made after the forward
        # pass was queued would wait for it
        return x, torch.ones(1, device=x[names[0]].device)

    def _attributions(self, prepared, names, grad_sum):
        return {n: grad_sum[n] * prepared.continuous[n] if self.times_input else grad_sum[n]
                for n in names}

    def _run(self, adapter, prepared, target, names, p, progress):
        """One row, so the rows machinery of the family (weights, sums over passes, outputs
        concatenated) is skipped: every step after the backward pass runs on caches it has
        evicted and costs several times what it does warm (benchmarks/cold_cache.py)."""
        if progress is not None:
            report(progress, 0, 1, self.label)
        x = prepared.continuous
        grads, out = _input_grads(adapter, prepared, target, {n: x[n] for n in names},
                                  one_row=True)
        if not math.isfinite(float(out)):       # one value: one read, no kernel launched
            # an infinite target (a class masked by -inf) has finite, meaningless gradients
            raise_not_finite(adapter, prepared, target, names, self.name, "scores")
        scores, maps = _scores_and_maps(adapter, prepared, self._attributions(prepared, names,
                                                                              grads))
        if progress is not None:
            report(progress, 1, 1, self.label)
        return scores, maps, _unreached_found(grads.unreached)


class _GradXInput(_Gradient):
    times_input = True


def _ig_ends(steps: int, rule) -> tuple[int, int, int]:
    """(row of x, row of the baseline, number of rows) of integrated gradients: the rule's nodes,
    then x and the baseline as extra rows (weight 0) unless a node is alpha = 1 or 0."""
    s = int(steps)
    if rule == "riemann_trapezoid" and s >= 2:
        return s - 1, 0, s
    if rule == "riemann_right":
        return s - 1, s, s + 1
    if rule == "riemann_left":
        return s, 0, s + 1
    return s, s + 1, s + 2


class _IntegratedGradients(_GradientFamily):
    def _cost(self, prepared, names, p):
        n = _ig_ends(p["steps"], p["rule"])[2]
        return n, n

    def _weighted_rows(self, p):
        return int(p["steps"])                    # the rule's nodes; then x and b (weight 0)

    def _check_size(self, prepared, names, p):
        row = sum(prepared.continuous[n].numel() * prepared.continuous[n].element_size()
                  for n in names)
        _check_ig_memory(int(p["steps"]), p["rule"], row, self.name)

    def _rows(self, prepared, names, p):
        a, weights = _quadrature(int(p["steps"]), p["rule"], prepared.continuous[names[0]].device)
        ix, ib, n_rows = _ig_ends(p["steps"], p["rule"])
        rows = {}
        for n in names:
            x, b = prepared.continuous[n], prepared.baseline[n]
            path = b.unsqueeze(0) + a.view(-1, *([1] * x.dim())).to(x) * (x - b).unsqueeze(0)
            ends = [e for i, e in sorted({ix: x, ib: b}.items()) if i >= len(a)]
            rows[n] = torch.cat([path] + [e.unsqueeze(0).to(path) for e in ends])
        weights = torch.cat([weights, weights.new_zeros(n_rows - len(a))])
        return rows, weights

    def _attributions(self, prepared, names, grad_sum):
        return {n: (prepared.continuous[n] - prepared.baseline[n]) * grad_sum[n] for n in names}

    def _found(self, adapter, prepared, target, names, p, outputs, attrs):
        """The completeness gap f(x) - f(b) - sum of the attributions, absolute and relative to
        |f(x) - f(b)| (or to 1e-3 of the larger |f| when that difference is smaller). The sum
        runs over the scalars (as captum's convergence delta), so a modality whose pool is not
        a sum does not count as a gap; it equals the sum of the scores otherwise."""
        ix, ib, _ = _ig_ends(p["steps"], p["rule"])
        total = sum(attrs[n].double().sum() for n in names)
        fx, fb, s = torch.cat([outputs[[ix, ib]].double(), total.reshape(1)]).cpu().tolist()
        if not (math.isfinite(fx) and math.isfinite(fb)):
            raise_not_finite(adapter, prepared, target, names, self.name)
        gap = fx - fb - s
        scale = max(abs(fx - fb), 1e-3 * max(abs(fx), abs(fb)), 1e-12)
        return {"completeness_gap": gap, "completeness_gap_relative": abs(gap) / scale}


class _Occlusion(AttributionMethod):
    def _cost(self, prepared, names, p):
        return 1 + sum(prepared.n_units[n] for n in names), 0

    def _run(self, adapter, prepared, target, names, p, progress):
        offsets, total = _units_offsets(prepared, names)
        units = {n: prepared.n_units[n] for n in names}        # in the order of the offsets
        y = evaluate_mask_rows(adapter, prepared, 1 + total,
                               lambda s, e: occlusion_rows(units, s, e), target,
                               batch_size=int(p["batch_size"]), progress=progress,
                               message="occlusion")
        y = y.double()          # a bfloat16 model's outputs: their difference rounds in bfloat16
        diff = y[0] - y[1:]
        scores = {n: diff[offsets[n]:offsets[n] + prepared.n_units[n]] for n in names}
        maps = {n: _perturbation_map(adapter, prepared, n, scores[n]) for n in names}
        return {n: v.cpu().numpy() for n, v in scores.items()}, maps, {}


class _Lime(AttributionMethod):
    """A surrogate fitted to the model on sampled unit masks (``fit``: LIME's weighted ridge,
    returning the scores and whether they were underdetermined); ``params["underdetermined"]``:
    whether n_samples was below the regression's unknowns (warned)."""

    fit = staticmethod(_lime)

    def _cost(self, prepared, names, p):
        return int(p["n_samples"]), 0

    def _fit(self, fn, units, progress, p) -> tuple[dict, dict]:
        """(scores, found): the surrogate's scores and what it measured besides."""
        # the warning points at the caller of attribute / attribute_batch: through
        # AttributionMethod.attribute, _run and this
        scores, under = self.fit(fn, units, progress=progress, stacklevel=6, **p)
        return scores, self._found(units, p, under)

    def _found(self, units, p, underdetermined: bool) -> dict:
        """What the fit measured besides the scores (``params``)."""
        return {"underdetermined": underdetermined}

    def _run(self, adapter, prepared, target, names, p, progress):
        fn = _mask_function(adapter, prepared, target, int(p["batch_size"]), names, self.name)
        scores, found = self._fit(fn, {n: prepared.n_units[n] for n in names}, progress, p)
        maps = {n: _perturbation_map(adapter, prepared, n, torch.as_tensor(scores[n]))
                for n in names}
        return scores, maps, found


class _KernelShap(_Lime):
    """The same with the Shapley kernel and the efficiency constraint (exact for few units);
    ``params["underdetermined"]``: whether n_samples was too few to determine the regression
    (warned)."""

    fit = staticmethod(_kernel_shap)

    def _cost(self, prepared, names, p):
        total = sum(prepared.n_units[n] for n in names)
        n = int(p["n_samples"])
        if total <= 20 and 2 ** total <= n:
            return 2 ** total, 0
        return n, 0

    def _found(self, units, p, underdetermined: bool) -> dict:
        """As LIME's, and ``exact``: whether every coalition was evaluated (2^U of them, fewer
        than n_samples: the scores are the Shapley values, and n_samples, kept as asked, is
        not what ran; forward_passes is)."""
        total = sum(units.values())
        return {"underdetermined": underdetermined,
                "exact": bool(total <= 20 and 2 ** total <= int(p["n_samples"]))}


METHODS: dict[str, AttributionMethod] = {
    m.name: m for m in [
        _Gradient("gradient", "gradient", {},
                  "d f / d x, pooled to units (1 forward, 1 backward)"),
        _GradXInput("grad_x_input", "gradient", {},
                    "(d f / d x) * x, pooled to units (1 forward, 1 backward)"),
        _IntegratedGradients("integrated_gradients", "gradient",
                             {"steps": 50, "rule": "gausslegendre", "internal_batch_size": 128},
                             "(x - b) * path-averaged gradient, and its completeness gap "
                             "(steps + 2 forwards and backwards)"),
        _Occlusion("occlusion", "perturbation", {"batch_size": PERTURBATION_BATCH},
                   "f(x) - f(x with one unit at baseline) (1 + units forwards)"),
        _Lime("lime", "perturbation",
              {"n_samples": 500, "seed": 0, "kernel_width": 0.25, "distance": "cosine",
               "alpha": 1.0, "batch_size": PERTURBATION_BATCH, "keep_probability": 0.5},
              "weighted ridge regression on random unit masks (n_samples forwards)"),
        _KernelShap("kernel_shap", "perturbation",
                    {"n_samples": 500, "seed": 0, "batch_size": PERTURBATION_BATCH},
                    "Shapley-kernel regression with exact efficiency (n_samples forwards)"),
    ]
}


def _method(method) -> AttributionMethod:
    if isinstance(method, AttributionMethod):
        return method
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"Unknown stage-1 method {method!r}; the methods are "
                         f"{', '.join(METHODS)}.")
    return METHODS[method]


def attribute(adapter: ModelAdapter, instance, method: str = "integrated_gradients",
              target=None, progress: ProgressFn = None, **params) -> Attribution:
    """Stage-1 attribution of one instance: an Attribution with per-unit scores and maps.

    instance: a dict {modality: raw input} or a Prepared instance. target: None (the predicted
    class, one extra forward pass), a class index or name, or Neuron(j). method: one of
    ``METHODS`` ("gradient", "grad_x_input", "integrated_gradients", "occlusion", "lime",
    "kernel_shap"). params: the method's parameters (``METHODS[name].defaults``) and
    ``modalities=[...]`` to explain only some modalities. Cost: ``METHODS[name].cost(prepared)``
    forward/backward passes, recorded in the result with the seconds it took.
    """
    check_adapter(adapter, "attribute")
    check_progress(progress, "attribute")
    m = _method(method)
    prepared = as_prepared(adapter, instance)
    check_rows_independent(adapter, prepared)
    result = m.attribute(adapter, prepared, target, progress=progress, **params)
    _warn_completeness(adapter, [result])
    _warn_no_gradient(adapter, [result])
    return result


# --------------------------------------------------------------------------------------------
# many instances (or targets) at once
# --------------------------------------------------------------------------------------------
def attribute_batch(adapter: ModelAdapter, instances, method: str = "integrated_gradients",
                    targets=None, progress: ProgressFn = None, rows_per_pass: int | None = None,
                    **params) -> list[Attribution]:
    """Stage-1 attributions of many instances, or of one instance for many targets: a list with
    one Attribution each, the same (to float rounding) as one ``attribute`` call each.

    instances: a list of instance dicts or Prepared instances, a MultimodalDataset, or one
    instance (repeated for every target). targets: None (each instance's predicted class; the
    forward passes that find them are batched), one target for all (a class index or name,
    ``Neuron(j)`` or a pair ("class" or "neuron", j), as for ``attribute``), or a list with one
    target per instance (None items: the predicted class).
    method and params: as for ``attribute``.

    Gradient methods (gradient, grad_x_input, integrated_gradients) stack the rows of all
    instances whose inputs have the same shapes (for text: the same number of tokens, so no
    padding changes what the model sees) into shared forward and backward passes of up to
    ``rows_per_pass`` rows (default: the method's internal_batch_size, else 128; integrated
    gradients' params record the rows used as internal_batch_size). An instance then costs
    about one row of a large batch instead of a whole batch of one. Like every batched kernel
    this needs batch rows that do not affect each other (a model in eval mode).
    Other methods already batch their perturbations; they explain one instance at a time.

    Cost: the same forward and backward passes as one ``attribute`` call per instance, in
    fewer, larger batches; each result records its own passes, and as ``seconds`` its share of
    the call's time (in proportion to its rows). Progress counts rows (instances for
    perturbation methods).
    """
    check_adapter(adapter, "attribute_batch")
    check_progress(progress, "attribute_batch")
    m = _method(method)
    p = m._params(params)
    if rows_per_pass is not None:
        rows_per_pass = positive_int(rows_per_pass, "rows_per_pass")
    with Stopwatch() as sw:
        preps = _prepared_list(adapter, instances, targets)
        with Stopwatch() as checking:         # a check of the model: not the method's time
            check_rows_independent(adapter, preps[0])
        names = _select(adapter, preps[0], params.get("modalities"))
        if m.uses_baseline:
            for pr in preps:
                _check_baselines(adapter, pr, names, m.name)
        for pr in preps:
            m._check_size(pr, names, p)
        chosen, extra = _batch_targets(adapter, preps, targets,
                                       rows_per_pass or PERTURBATION_BATCH)
        if isinstance(m, _GradientFamily):
            rows = rows_per_pass or m._rows_per_pass(p)
            if "internal_batch_size" in p:    # the rows its passes had, as attribute's
                p = dict(p, internal_batch_size=rows)
            out = _gradient_batch(adapter, m, preps, chosen, names, p, rows, progress)
            weight = np.array([r.forward_passes for r in out], dtype=np.float64)   # its rows
        else:
            out = []
            report(progress, 0, len(preps), m.label)
            for k, (pr, t) in enumerate(zip(preps, chosen)):
                # the instance's own batches report (k, n) too: the callback is called
                # between batches, as every kernel's is, so a cancel (Cancelled raised by
                # the callback) stops the work within one batch instead of after the whole
                # instance
                inner = (None if progress is None else
                         lambda done, total, message, k=k: report(progress, k, len(preps),
                                                                  m.label))
                out.append(m.attribute(adapter, pr, t, progress=inner, **params))
                report(progress, k + 1, len(preps), m.label)
            weight = np.array([r.seconds for r in out], dtype=np.float64)
    shares = weight / weight.sum() if weight.sum() > 0 else np.full(len(out), 1.0 / len(out))
    for r, share, more in zip(out, shares, extra):
        r.seconds = float(max(0.0, sw.seconds - checking.seconds) * share)
        r.forward_passes += more
    _warn_completeness(adapter, out)
    _warn_no_gradient(adapter, out)
    return out


def _prepared_list(adapter: ModelAdapter, instances, targets) -> list[Prepared]:
    """The instances as Prepared objects (one instance is repeated once per target)."""
    from ..data import MultimodalDataset

    if isinstance(instances, (Mapping, Prepared)):
        one = as_prepared(adapter, instances)
        listed = _target_list(targets)
        preps = [one] * (1 if listed is None else len(listed))
    elif isinstance(instances, MultimodalDataset):
        many = len(instances) > 1           # errors about an input name its instance
        preps = [adapter.prepare(instances[k], number=k if many else None)
                 for k in range(len(instances))]
    else:
        try:
            items = list(instances)
        except TypeError:
            raise ValueError("attribute_batch takes a list of instances (dicts or Prepared), a "
                             f"MultimodalDataset or one instance; got {type(instances).__name__}."
                             ) from None
        many = len(items) > 1
        preps = [as_prepared(adapter, x, number=k if many else None)
                 for k, x in enumerate(items)]
    if not preps:
        raise ValueError("attribute_batch needs at least one instance (and, for one instance, "
                         "at least one target).")
    return preps


def _target_list(targets) -> list | None:
    """targets as a list when it holds one target per instance (a list, tuple, array or 1-D
    tensor), else None (one target for all: None, an index, a name, a Target or a pair
    ("class" or "neuron", index))."""
    if isinstance(targets, (np.ndarray, torch.Tensor)):
        return [t.item() for t in targets.reshape(-1)] if targets.ndim > 0 else None
    if _target_pair(targets):
        return None
    if isinstance(targets, Sequence) and not isinstance(targets, str):
        return list(targets)
    return None


def _target_pair(targets) -> bool:
    """Whether targets is one target given as a pair ("class" or "neuron", index)."""
    return (isinstance(targets, tuple) and len(targets) == 2 and targets[0] in ("class", "neuron")
            and isinstance(targets[1], (int, np.integer)) and not isinstance(targets[1], bool))


def _batch_targets(adapter: ModelAdapter, preps: Sequence[Prepared], targets, rows: int
                   ) -> tuple[list[Target], list[int]]:
    """One Target per instance, and the forward passes spent finding it (1 for a prediction)."""
    n = len(preps)
    wanted = _target_list(targets)
    if wanted is not None:
        if len(wanted) != n:
            raise ValueError(f"targets has {len(wanted)} entries for {n} instances; pass one "
                             "target per instance, one target for all, or None.")
    else:
        wanted = [targets] * n
    out: list[Target | None] = [None if t is None else adapter.target(t) for t in wanted]
    todo = [k for k, t in enumerate(out) if t is None]
    for group in _shape_groups(adapter, [preps[k] for k in todo]):
        for s in range(0, len(group), rows):
            ks = [todo[g] for g in group[s:s + rows]]
            raw = {name: torch.cat([preps[k].raw[name] for k in ks]) for name in adapter.names}
            with torch.no_grad():
                predicted = adapter.forward(raw).argmax(1).tolist()
            for k, c in zip(ks, predicted):
                out[k] = adapter.target(int(c))
    return out, [int(t is None) for t in wanted]


def _shape_groups(adapter: ModelAdapter, preps: Sequence[Prepared]) -> list[list[int]]:
    """Positions of the instances whose model inputs have the same shapes, group by group."""
    groups: dict[tuple, list[int]] = {}
    for k, pr in enumerate(preps):
        key = tuple((name, tuple(pr.raw[name].shape), tuple(pr.continuous[name].shape))
                    for name in adapter.names)
        groups.setdefault(key, []).append(k)
    return list(groups.values())


def _gradient_batch(adapter: ModelAdapter, m: _GradientFamily, preps: Sequence[Prepared],
                    targets: Sequence[Target], names: Sequence[str], p: dict, rows: int,
                    progress: ProgressFn) -> list[Attribution]:
    """The rows of every instance in passes of up to ``rows`` rows, within each shape group."""
    n_rows = [m._cost(pr, names, p)[0] for pr in preps]   # a row = a forward + a backward
    weighted = m._weighted_rows(p)                         # the first rows of each instance
    total_rows, done = sum(n_rows), 0
    results: list[Attribution | None] = [None] * len(preps)
    report(progress, 0, total_rows, m.label)
    for group in _shape_groups(adapter, preps):
        pending: dict[int, tuple[dict, torch.Tensor]] = {}   # instance -> its rows, weights
        carried: dict[int, dict[str, torch.Tensor]] = {}     # sums of an instance's earlier passes
        outputs: dict[int, list[torch.Tensor]] = {}          # instance -> f of its rows so far
        unreached: set[str] = set()       # modalities no gradient reached (the same for all)
        for chunk in _chunks(group, n_rows, rows):
            for k, a, b in chunk:
                if k not in pending:
                    pending[k] = m._rows(preps[k], names, p)
            grads, out = _rows_grads(adapter, preps, targets, names, pending, chunk)
            unreached.update(grads.unreached)
            # each summed row's slot in the chunk: an instance's rows after its weighted ones
            # (integrated gradients' x and baseline, there for their outputs) are left out, as
            # in _run (a weight 0 times an infinite gradient is NaN)
            # (they go to one more slot, dropped: no copy of the kept rows)
            owner = []
            for slot, (_, a, b) in enumerate(chunk):
                w = max(0, min(b, weighted) - a)
                owner += [slot] * w + [len(chunk)] * (b - a - w)
            owner = torch.tensor(owner, dtype=torch.long)
            sums = {n: torch.zeros(len(chunk) + 1, *g.shape[1:], dtype=g.dtype, device=g.device)
                    .index_add_(0, owner.to(g.device), g)[:len(chunk)]
                    for n, g in grads.items()}
            o = 0
            for slot, (k, a, b) in enumerate(chunk):
                outputs.setdefault(k, []).append(out[o:o + b - a])
                o += b - a
                part = {n: sums[n][slot] for n in names}
                if k in carried:
                    before = carried.pop(k)
                    part = {n: before[n] + part[n] for n in names}
                if b < n_rows[k]:                    # more of its rows come in the next pass
                    carried[k] = part
                    continue
                attrs = m._attributions(preps[k], names, part)
                scores, maps = _scores_and_maps(adapter, preps[k], attrs)
                del pending[k]
                found = {**m._found(adapter, preps[k], targets[k], names, p,
                                    torch.cat(outputs.pop(k)), attrs),
                         **_unreached_found(unreached)}
                results[k] = m._result(adapter, preps[k], targets[k], names, p, scores, maps,
                                       n_rows[k], n_rows[k], found=found)
            done += o
            report(progress, done, total_rows, m.label)
    return results


def _chunks(group: Sequence[int], n_rows: Sequence[int], rows: int):
    """Passes of up to ``rows`` rows over the instances of a group, in order: each a list of
    (instance, first row, end row); an instance with more rows than a pass spans several."""
    chunk, room = [], rows
    for k in group:
        a = 0
        while a < n_rows[k]:
            b = min(n_rows[k], a + room)
            chunk.append((k, a, b))
            room -= b - a
            a = b
            if room == 0:
                yield chunk
                chunk, room = [], rows
    if chunk:
        yield chunk


def _rows_grads(adapter: ModelAdapter, preps: Sequence[Prepared], targets: Sequence[Target],
                names: Sequence[str], pending: Mapping[int, tuple[dict, torch.Tensor]],
                parts: Sequence[tuple[int, int, int]]
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(d (sum_r w_r f_{target(r)}(row r)) / d rows: [R, ...] per explained modality, the
    outputs f_{target(r)}(row r) [R]) for one pass."""
    # model inputs: the explained modalities' continuous rows replace the raw inputs of all but
    # text (whose ids still go through the embedding layer), so one raw row stands in for them
    raw = {name: (preps[parts[0][0]].raw[name]
                  if name in names and name not in adapter.embedding_layers else
                  torch.cat([preps[k].raw[name].expand(b - a, *preps[k].raw[name].shape[1:])
                             for k, a, b in parts])) for name in adapter.names}
    leaves = {n: torch.cat([pending[k][0][n][a:b] for k, a, b in parts]).detach()
              .requires_grad_(True) for n in names}
    weights = torch.cat([pending[k][1][a:b] for k, a, b in parts])
    row_targets = [targets[k] for k, a, b in parts for _ in range(b - a)]
    with torch.enable_grad():
        features = any(t.kind == "neuron" for t in row_targets)
        res = adapter.forward(raw, leaves, features=features)
        logits, h = res if features else (res, None)
        pieces, rows_of = [], []                 # each distinct target's rows, then row order
        for t in dict.fromkeys(row_targets):
            rows_t = torch.tensor([r for r, u in enumerate(row_targets) if u == t],
                                  device=logits.device)
            pieces.append(adapter.output(logits, h, t)[rows_t])
            rows_of.append(rows_t)
        out = torch.cat(pieces)[torch.argsort(torch.cat(rows_of))]
        if not out.requires_grad:
            _raise_not_differentiable(row_targets[0])
        grads = torch.autograd.grad(out, list(leaves.values()), grad_outputs=weights.to(out),
                                    allow_unused=True)
    return _gradients(leaves, grads), out.detach()
