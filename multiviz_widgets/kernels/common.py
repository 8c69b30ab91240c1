"""Pieces every kernel shares: instances, targets, masked inputs and chunked evaluation."""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from ..adapter import ModelAdapter, Prepared, Target
from ..progress import ProgressFn, report

#: Default rows per forward pass for perturbation kernels. Small batches keep activations in
#: the CPU caches: on the easy-VQA model a batch of 64-256 costs 0.075-0.085 ms per sample, a
#: batch of 512 0.17 ms and 1024 0.24 ms (2 cores, torch 2.13).
PERTURBATION_BATCH = 128


def as_prepared(adapter: ModelAdapter, instance) -> Prepared:
    """Accept an instance dict or an already prepared instance."""
    return instance if isinstance(instance, Prepared) else adapter.prepare(instance)


@torch.no_grad()
def resolve_target(adapter: ModelAdapter, prepared: Prepared, target=None) -> Target:
    """None means the model's predicted class; otherwise see ModelAdapter.target (1 forward if None)."""
    if target is None:
        return adapter.target(int(adapter.forward(prepared.raw).argmax(1)[0]))
    return adapter.target(target)


def masked_continuous(prepared: Prepared, masks: Mapping[str, torch.Tensor],
                      adapter: ModelAdapter) -> dict[str, torch.Tensor]:
    """Continuous inputs [B, ...] in which units with mask 0 take the baseline.

    masks: {modality: [B, n_units]} (values in [0, 1]); modalities without a mask keep the
    instance as it is (expanded to B).
    """
    b = next(iter(masks.values())).shape[0]
    out = {}
    for name in prepared.names:
        x = prepared.continuous[name]
        if name in masks:
            out[name] = adapter.modalities[name].apply_mask(
                x, masks[name], prepared.baseline[name], prepared.index[name])
        else:
            out[name] = x.unsqueeze(0).expand(b, *x.shape)
    return out


@torch.no_grad()
def evaluate_masks(adapter: ModelAdapter, prepared: Prepared, masks: Mapping[str, torch.Tensor],
                   target: Target, batch_size: int = PERTURBATION_BATCH, progress: ProgressFn = None,
                   message: str = "forward passes") -> torch.Tensor:
    """f_target of the masked instance for every row of the masks: a tensor [B].

    Cost: B forward passes, in chunks of batch_size (progress is reported per chunk).
    """
    total = next(iter(masks.values())).shape[0]
    outs = []
    for s in range(0, total, batch_size):
        chunk = {k: v[s:s + batch_size] for k, v in masks.items()}
        outs.append(adapter.scalar(prepared, masked_continuous(prepared, chunk, adapter), target))
        report(progress, min(total, s + batch_size), total, message)
    return torch.cat(outs)


def modality_pair(adapter: ModelAdapter, modalities) -> tuple[str, str]:
    """The two modalities (a, b) of a stage-2 method, validated (default: the first two)."""
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


def positive_int(value, what: str, minimum: int = 1) -> int:
    """value, checked to be an integer of at least ``minimum`` (``what`` names it in the error)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{what} must be an integer of at least {minimum}, got {value!r}.")
    return int(value)


def sample_indices(n_total: int, n: int | None, seed: int) -> np.ndarray:
    """n of range(n_total) drawn with ``seed``, sorted (all of them when n is None or >= n_total)."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, size=int(n), replace=False))
