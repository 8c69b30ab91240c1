"""Faithfulness metrics of stage-1 maps: relevance mass / rank accuracy, deletion / insertion AUC.

* Relevance mass accuracy (CLEVR-XAI, Arras et al. 2022): pool the heatmap to R >= 0 per pixel;
  mass = sum_{p in GT} R_p / sum_p R_p.
* Relevance rank accuracy: |top-K(R) and GT| / K with K = |GT| (ties broken uniformly at random,
  computed as the expectation, so the result is deterministic).
* Deletion / insertion (Petsiuk et al. 2018): remove (insert) the units of one modality in
  attribution order and integrate the class probability over the fraction of units changed
  (trapezoid rule on [0, 1]); deletion: lower is better, insertion: higher is better.

A random map scores about |GT| / (H W) on both relevance metrics.
"""
from __future__ import annotations

import numpy as np
import torch

from ..adapter import ModelAdapter, Prepared
from ..checks import positive_int
from .common import as_prepared, masked_continuous

__all__ = ["pixel_relevance", "relevance_mass", "relevance_rank", "deletion_masks",
           "insertion_masks", "curve_auc", "deletion_insertion", "aopc"]

POOLINGS = {"clip": "sum over channels, then max(R, 0)",
            "abs": "sum over channels, then |R|"}


def pixel_relevance(heatmap, pooling: str = "clip") -> np.ndarray:
    """R >= 0 per pixel from a (channel-summed) heatmap [H, W]: "clip" max(R, 0) or "abs" |R|."""
    r = np.asarray(heatmap, dtype=np.float64)
    if pooling == "clip":
        return np.maximum(r, 0.0)
    if pooling == "abs":
        return np.abs(r)
    raise ValueError(f"Unknown pooling {pooling!r}; use one of {list(POOLINGS)}.")


def _check(r, gt) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(r, dtype=np.float64)
    gt = np.asarray(gt, dtype=bool)
    if r.shape != gt.shape:
        raise ValueError(f"The relevance map has shape {r.shape} but the ground-truth mask has "
                         f"shape {gt.shape}; they must match pixel for pixel.")
    if not np.isfinite(r).all():
        raise ValueError(f"The relevance map holds {int((~np.isfinite(r)).sum())} non-finite "
                         "value(s) (NaN or infinity): the metric would be NaN or meaningless. "
                         "Check the attribution that made it (e.g. a model output that is NaN).")
    if (r < 0).any():
        raise ValueError("Relevance must be non-negative; pool the heatmap first with "
                         "pixel_relevance(heatmap, 'clip' or 'abs').")
    if not gt.any():
        raise ValueError("The ground-truth mask is empty: relevance accuracy is undefined.")
    return r.ravel(), gt.ravel()


def relevance_mass(relevance, gt) -> float:
    """Share of the total relevance inside the ground-truth mask (a map of zeros scores |GT|/N)."""
    r, g = _check(relevance, gt)
    s = r.sum()
    if s <= 0:
        return float(g.mean())
    return float(r[g].sum() / s)


def relevance_rank(relevance, gt) -> float:
    """|top-K(R) and GT| / K with K = |GT|; tied pixels at the cut-off count by expectation."""
    r, g = _check(relevance, gt)
    k = int(g.sum())
    order = np.argsort(-r, kind="stable")
    rs, gs = r[order], g[order]
    cut = rs[k - 1]
    above = rs > cut
    tie = rs == cut
    hits = float(gs[above].sum())
    need = k - int(above.sum())
    if need > 0:
        hits += need * float(gs[tie].sum()) / float(tie.sum())
    return hits / k


def _order(scores) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.ndim != 1 or len(s) == 0:
        raise ValueError("Unit scores must be a non-empty 1-D array.")
    if not np.isfinite(s).all():
        raise ValueError("Unit scores contain NaN or infinity, so they give no order to remove "
                         "or insert units in; check the attribution that made them.")
    return np.argsort(-s, kind="stable")


def deletion_masks(scores) -> torch.Tensor:
    """Masks [U + 1, U]: row k removes the k highest-scoring units (1 = kept)."""
    order = _order(scores)
    u = len(order)
    ranks = np.empty(u, dtype=np.int64)
    ranks[order] = np.arange(u)
    return torch.from_numpy((ranks[None, :] >= np.arange(u + 1)[:, None]).astype(np.float32))


def insertion_masks(scores) -> torch.Tensor:
    """Masks [U + 1, U]: row k keeps only the k highest-scoring units (the rest at baseline)."""
    return 1.0 - deletion_masks(scores)


def curve_auc(curve) -> float:
    """Area under a curve sampled at equally spaced fractions 0, 1/U, ..., 1 (trapezoid rule)."""
    c = np.asarray(curve, dtype=np.float64)
    if c.ndim != 1 or len(c) < 2:
        raise ValueError("A deletion/insertion curve needs at least two points.")
    return float(((c[1:] + c[:-1]) / 2).sum() / (len(c) - 1))


def aopc(deletion_curve) -> float:
    """AOPC (Samek et al. 2017) of a deletion curve p_0, ..., p_U (the class probability with
    the k highest-scored units removed): the mean over k = 0..U of p_0 - p_k. Higher is better:
    the probability falls faster when the units the map ranks first go first."""
    c = np.asarray(deletion_curve, dtype=np.float64)
    if c.ndim != 1 or len(c) < 2:
        raise ValueError("A deletion curve needs at least two points.")
    return float((c[0] - c).mean())


@torch.no_grad()
def deletion_insertion(adapter: ModelAdapter, prepared: Prepared, modality: str, scores,
                       class_index: int, batch_size: int = 512
                       ) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(deletion AUC, insertion AUC, deletion curve, insertion curve) of class probabilities.

    Units of ``modality`` are removed / inserted in the order of ``scores`` (highest first); the
    other modalities stay intact. ``prepared``: a prepared instance or the instance dict.
    Cost: 2 (U + 1) forward passes, batched.
    """
    prepared = as_prepared(adapter, prepared)
    if modality not in prepared.names:
        raise ValueError(f"Unknown modality {modality!r}; the instance has {prepared.names}.")
    batch_size = positive_int(batch_size, "batch_size")
    target = adapter.target(class_index)        # refuses bools, floats, names not among classes
    if target.kind != "class":                  # and indices out of range (no counting from the end)
        raise ValueError(f"deletion_insertion follows a class probability; give a class index "
                         f"or name, not {target}.")
    class_index = target.index
    if adapter.n_classes < 2:
        raise ValueError(
            f"deletion_insertion follows the class's softmax probability, but the model has one "
            f"output ({list(adapter.class_names)}), whose softmax is always 1: both curves "
            f"would be flat. A binary model returning one logit z takes "
            f"class_names=[negative, positive]: its logit is then read as two classes' logits.")
    masks = torch.cat([deletion_masks(scores), insertion_masks(scores)])
    if masks.shape[1] != prepared.n_units[modality]:
        raise ValueError(f"{len(np.ravel(scores))} scores given for {prepared.n_units[modality]} "
                         f"units of {modality!r}.")
    probs = []
    for s in range(0, len(masks), batch_size):
        cont = masked_continuous(prepared, {modality: masks[s:s + batch_size]}, adapter)
        logits = adapter.forward(prepared.raw, cont)
        probs.append(torch.softmax(logits.double(), 1)[:, class_index])
    p = torch.cat(probs).cpu().numpy()
    n = masks.shape[0] // 2
    bad = np.flatnonzero(~np.isfinite(p))
    if len(bad):                               # an AUC of NaN says nothing: say where instead
        from .unimodal import BASELINE_HINT
        k = int(bad[0])
        curve, step = ("deletion", k) if k < n else ("insertion", k - n)
        did = (f"with the {step} highest-scored units of {modality!r} at their baseline"
               if curve == "deletion" else
               f"with only the {step} highest-scored units of {modality!r} kept (the others at "
               f"their baseline)")
        raise ValueError(
            f"deletion_insertion: the model's probability of class "
            f"{adapter.class_names[class_index]!r} is {p[k]} on the {curve} curve, {did} "
            f"({len(bad)} of the {2 * n} points are not finite), so the AUCs would be NaN. "
            f"{BASELINE_HINT}")
    return curve_auc(p[:n]), curve_auc(p[n:]), p[:n], p[n:]
