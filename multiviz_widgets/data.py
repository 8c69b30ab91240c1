"""Datasets of multimodal instances: what the global views (stage 3 and 4, the Explorer) iterate.

A dataset is indexable (``ds[i]`` is ``{modality name: raw input}``), has a length, optional
integer labels, a short text per instance for display, and a fingerprint that changes when its
contents change (used to key on-disk caches).
"""
from __future__ import annotations

import hashlib
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch


class MultimodalDataset:
    """Instances given column-wise: ``columns = {name: sequence of raw inputs}``.

    Each column may be any indexable sequence (a list, an array, a lazy object), so a dataset
    that shares one image between many questions need not copy it.
    labels: optional integer labels; descriptions: optional one-line text per instance.
    """

    def __init__(self, columns: Mapping[str, Sequence], labels: Sequence[int] | None = None,
                 descriptions: Sequence[str] | None = None, name: str = "dataset"):
        if not columns:
            raise ValueError("A dataset needs at least one column {modality name: inputs}.")
        lengths = {k: len(v) for k, v in columns.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"All columns must have the same length, got {lengths}.")
        self.columns = dict(columns)
        self.n = next(iter(lengths.values()))
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        if self.labels is not None and len(self.labels) != self.n:
            raise ValueError(f"labels has {len(self.labels)} entries for {self.n} instances.")
        self.descriptions = None if descriptions is None else list(descriptions)
        self.name = name
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not -self.n <= int(i) < self.n:
            raise IndexError(f"Instance {i} is out of range: the dataset has {self.n} instances.")
        return {k: v[int(i)] for k, v in self.columns.items()}

    def describe(self, i: int) -> str:
        """A one-line description of instance i (for galleries and pickers)."""
        if self.descriptions is not None:
            return str(self.descriptions[int(i)])
        return f"#{int(i)}"

    def batches(self, batch_size: int = 256, indices: Sequence[int] | None = None
                ) -> Iterator[tuple[np.ndarray, list[dict]]]:
        """Yield (indices, instances) in chunks of at most batch_size."""
        idx = np.arange(self.n) if indices is None else np.asarray(indices)
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            yield chunk, [self[int(i)] for i in chunk]

    def fingerprint(self) -> str:
        """A hash of the contents (every instance and label); computed once and remembered."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(str(self.n).encode())
            for k in sorted(self.columns):
                h.update(k.encode())
                col = self.columns[k]
                for i in range(self.n):
                    h.update(_bytes(col[i]))
            if self.labels is not None:
                h.update(self.labels.tobytes())
            self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint


def _bytes(v) -> bytes:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().contiguous().numpy().tobytes()
    if isinstance(v, np.ndarray):
        return np.ascontiguousarray(v).tobytes()
    if isinstance(v, str):
        return v.encode()
    return repr(v).encode()
