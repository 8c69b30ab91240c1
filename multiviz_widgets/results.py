"""Typed results of the kernels: numpy arrays plus what produced them and what it cost."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .adapter import Target


@dataclass
class Result:
    """Metadata shared by every kernel result."""

    method: str
    target: Target
    params: dict[str, Any] = field(default_factory=dict)
    forward_passes: int = 0     # instances pushed through the model (a batch of B counts B)
    backward_passes: int = 0    # instances back-propagated (double backward counts twice)
    seconds: float = 0.0


@dataclass
class Attribution(Result):
    """Stage 1: per-unit scores and full-resolution maps, one entry per modality."""

    scores: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [n_units]
    maps: dict[str, np.ndarray] = field(default_factory=dict)    # name -> modality.to_map shape
    labels: dict[str, list[str]] = field(default_factory=dict)   # name -> unit labels


@dataclass
class Interaction(Result):
    """Stage 2: a unit x unit interaction matrix between modalities a (rows) and b (columns)."""

    modalities: tuple[str, str] = ("", "")
    matrix: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    row_labels: list[str] = field(default_factory=list)
    col_labels: list[str] = field(default_factory=list)

    def top_pairs(self, k: int = 5, absolute: bool = True) -> list[tuple[int, int, float]]:
        """The k (row, column, value) pairs of largest (absolute) interaction."""
        m = np.abs(self.matrix) if absolute else self.matrix
        flat = np.argsort(m, axis=None)[::-1][:k]
        rows, cols = np.unravel_index(flat, m.shape)
        return [(int(r), int(c), float(self.matrix[r, c])) for r, c in zip(rows, cols)]


class Stopwatch:
    """Times a block: ``with Stopwatch() as sw: ...; sw.seconds``."""

    def __enter__(self):
        self._t0 = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        return False
