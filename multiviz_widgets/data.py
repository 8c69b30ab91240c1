"""Datasets of multimodal instances: what the global views (stage 3 and 4, the Explorer) iterate.

A dataset is indexable (``ds[i]`` is ``{modality name: raw input}``), has a length, optional
integer labels, a short text per instance for display, and a fingerprint that changes when its
contents change (used to key on-disk caches).
"""
from __future__ import annotations

import hashlib
import operator
import threading
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from .checks import positive_int
from .display_text import and_list
from .modalities import _is_pil, _missing, is_pandas, pil_pixels


class MultimodalDataset:
    """Instances given column-wise: ``columns = {name: sequence of raw inputs}``.

    Each column may be any indexable sequence (a list, an array, a lazy object), so a dataset
    that shares one image between many questions need not copy it; pandas columns are read by
    position (``ds[i]`` is row i of the column as given, whatever its index labels). A
    DataFrame column (a table, one row per instance) gives each row as a pandas Series
    labelled by the frame's column names, so that a Tabular modality reads it by name
    whatever the frame's column order.
    labels: optional integer class indices (0..C-1), one per instance;
    descriptions: optional one-line text per instance.
    """

    def __init__(self, columns: Mapping[str, Sequence], labels: Sequence[int] | None = None,
                 descriptions: Sequence[str] | None = None, name: str = "dataset"):
        if not isinstance(columns, Mapping):
            raise TypeError(
                "A dataset is given column-wise: a dict {modality name: inputs, one per instance}, "
                f"e.g. MultimodalDataset({{'image': images, 'question': questions}}); got "
                f"{type(columns).__name__}.")
        if not columns:
            raise ValueError("A dataset needs at least one column {modality name: inputs}.")
        self.columns = {}
        for k, v in columns.items():
            if not isinstance(k, str):
                raise TypeError(f"Column names are the modalities' names (strings), got {k!r}.")
            self.columns[k] = (_FrameRows(v) if is_pandas(v, 2)
                               else _sequence(v, f"Column {k!r}", "inputs"))
        lengths = {k: len(v) for k, v in self.columns.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"All columns must have the same length, got {lengths}.")
        self.n = next(iter(lengths.values()))
        self.labels = labels
        self.descriptions = None
        if descriptions is not None:
            self.descriptions = list(_sequence(descriptions, "descriptions", "texts"))
            if len(self.descriptions) != self.n:
                raise ValueError(f"descriptions has {len(self.descriptions)} entries for "
                                 f"{self.n} instances.")
        self.name = name

    def __len__(self) -> int:
        return self.n

    @property
    def labels(self) -> np.ndarray | None:
        """The class indices [n] (int64), or None."""
        return self._labels

    @labels.setter
    def labels(self, value) -> None:
        # checked whenever set, not only by the constructor: every consumer (the EMAP gap, the
        # embedding's colours, accuracies) can then trust them
        self._labels = None if value is None else _labels(value, self.n)

    def _position(self, i) -> int:
        """Instance index i (negative counts from the end) as a position 0..n-1."""
        i = _index(i)
        if not -self.n <= i < self.n:
            raise IndexError(f"Instance {i} is out of range: the dataset has {self.n} instances.")
        return i % self.n

    def __getitem__(self, i: int) -> dict:
        i = self._position(i)
        return {k: v[i] for k, v in self.columns.items()}

    def describe(self, i: int) -> str:
        """A one-line description of instance i (for galleries and pickers)."""
        i = self._position(i)
        if self.descriptions is not None:
            return str(self.descriptions[i])
        return f"#{i}"

    def batches(self, batch_size: int = 256, indices: Sequence[int] | None = None
                ) -> Iterator[tuple[np.ndarray, list[dict]]]:
        """Yield (indices, instances) in chunks of at most batch_size."""
        batch_size = positive_int(batch_size, "batch_size")
        idx = np.arange(self.n) if indices is None else self._positions(indices)
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            yield chunk, [self[int(i)] for i in chunk]

    def _positions(self, indices) -> np.ndarray:
        """indices (integers, negative counting from the end) as positions [k]; floats, bools
        (a mask is not a list of indices) and indices out of range refused."""
        arr = np.asarray(list(indices) if not hasattr(indices, "__len__") else indices)
        if arr.ndim != 1:
            raise ValueError(f"indices must be a 1-D sequence of instance indices, got shape "
                             f"{arr.shape}.")
        if arr.size and (arr.dtype.kind not in "iu"):
            hint = (" (a boolean mask: pass np.flatnonzero(mask))" if arr.dtype.kind == "b"
                    else "")
            raise TypeError(f"indices must be integers, got dtype {arr.dtype}{hint}.")
        arr = arr.astype(np.int64)
        bad = arr[(arr < -self.n) | (arr >= self.n)]
        if bad.size:
            raise IndexError(f"Instance {int(bad[0])} is out of range: the dataset has {self.n} "
                             "instances.")
        return arr % max(self.n, 1)

    def fingerprint(self) -> str:
        """A hash of the contents (every instance, with its type and shape, and the labels).
        Computed anew at each call (one pass over the data, no forward pass), so that an edit of
        a column in place changes it too."""
        h = hashlib.sha256()
        self._hash_inputs(h)
        if self.labels is not None:
            update_hash(h, self.labels)
        return h.hexdigest()[:32]

    def inputs_fingerprint(self) -> str:
        """A hash of the inputs alone (every instance of every column, not the labels nor the
        descriptions): what tells two datasets of one name and size apart when a unit of an
        instance is named (a concepts file; relabelling keeps the instances). Computed anew at
        each call, like ``fingerprint``."""
        h = hashlib.sha256(b"inputs:")
        self._hash_inputs(h)
        return h.hexdigest()[:32]

    def _hash_inputs(self, h) -> None:
        h.update(str(self.n).encode())
        for k in sorted(self.columns):
            update_hash(h, k)
            col = self.columns[k]
            if isinstance(col, _FrameRows):       # every row at once (one by one: 45 us a row)
                update_hash(h, col.frame)
                continue
            for i in range(self.n):
                update_hash(h, col[i])


class _FrameRows:
    """The rows of a DataFrame as a sequence: ``rows[i]`` is row i by position (whatever the
    index labels), a Series labelled by the column names. (``frame.to_numpy()`` lost the
    names, so a frame whose column order differed from the modality's was silently misread.)
    The frame is referred to, not copied: an edit in place shows, in the rows and in the
    fingerprint, which hashes the frame's values and column names (what every row holds)."""

    def __init__(self, frame):
        self.frame = frame

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, i):
        return self.frame.iloc[i]

    def __repr__(self) -> str:
        return f"<rows of a DataFrame with columns {list(self.frame.columns)[:10]}>"


def _index(i) -> int:
    """An instance index: an integer (numpy integers too), never a float or a bool."""
    if isinstance(i, (bool, np.bool_)):
        raise TypeError(f"An instance index is an integer, got {i!r}.")
    try:
        return operator.index(i)
    except TypeError:
        raise TypeError(f"An instance index is an integer, got {i!r} "
                        f"({type(i).__name__}).") from None


def _sequence(v, what: str, items: str):
    """v as an indexable sequence read by position: pandas objects through .to_numpy(); a
    single string (which would be split into characters) refused."""
    if isinstance(v, (str, bytes)):
        raise TypeError(f"{what} is a single string; give a sequence of {items}, one per "
                        f"instance (e.g. a list).")
    if isinstance(v, Mapping):        # indexed by its keys, not by position
        raise TypeError(f"{what} is a {type(v).__name__}, which is indexed by its keys; give a "
                        f"sequence of {items}, one per instance (e.g. list(d.values())).")
    if is_pandas(v):                                         # pandas: by position, not label
        v = v.to_numpy()
    if getattr(v, "ndim", None) == 0 or getattr(v, "shape", None) == ():
        raise TypeError(f"{what} is a single value (a 0-d array); give a sequence of {items}, "
                        "one per instance.")
    if not (hasattr(v, "__len__") and hasattr(v, "__getitem__")):
        raise TypeError(f"{what} must be a sequence of {items}, one per instance (a list, an "
                        f"array...), got {type(v).__name__}.")
    return v


def _labels(labels, n: int) -> np.ndarray:
    """Integer class indices [n], checked."""
    # a masked array's masked labels are missing (np.asarray would read what lies under them)
    masked = (np.flatnonzero(np.ma.getmaskarray(labels)).tolist()
              if np.ma.isMaskedArray(labels) and np.ndim(labels) == 1 else [])
    arr = np.asarray(_sequence(labels, "labels", "class indices"))
    how = ("labels are integer class indices (0..C-1); map names to indices first, e.g. "
           "[class_names.index(y) for y in labels]")
    missing = masked or (_missing_labels(arr) if arr.ndim == 1 else [])
    if missing:
        raise ValueError(
            f"labels has no value (None, NaN, pandas' NA or masked) for {len(missing)} "
            f"instance{'s' if len(missing) > 1 else ''} ({_first_indices(missing)}). "
            f"{UNKNOWN_LABELS}")
    if arr.ndim != 1:
        raise ValueError(f"labels must be one class index per instance (1-D), got shape "
                         f"{arr.shape}{'; pass labels.ravel()' if arr.ndim == 2 and 1 in arr.shape else ''}.")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            bad = arr[~(np.isfinite(arr) & (arr == np.round(arr)))][:3].tolist()
            raise ValueError(f"labels must be whole numbers, got {bad}: {how}.")
    elif arr.dtype == object and arr.size and all(
            isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))
            for x in arr.tolist()):
        pass                              # Python ints (a pandas object column): fine
    elif arr.dtype.kind not in "biu":
        example = next((x for x in arr.tolist()
                        if not isinstance(x, (int, np.integer)) or isinstance(x, bool)), arr[0])
        raise TypeError(f"labels must be integers, got {example!r}: {how}.")
    if arr.size and arr.dtype.kind in "fuO" and (arr.max() > np.iinfo(np.int64).max):
        raise ValueError(f"labels must be class indices 0..C-1, got {arr.max()!r}.")
    arr = arr.astype(np.int64)
    if len(arr) != n:
        raise ValueError(f"labels has {len(arr)} entries for {n} instances.")
    if (arr < 0).any():
        negative = np.flatnonzero(arr < 0).tolist()
        raise ValueError(f"labels must be class indices >= 0, got {int(arr.min())} for "
                         f"{len(negative)} instance{'s' if len(negative) > 1 else ''} "
                         f"({_first_indices(negative)}). {UNKNOWN_LABELS}")
    return arr


#: How to mark the labels one does not know (the end of the errors about missing labels).
UNKNOWN_LABELS = ("Where an instance's label is unknown, give it a class index of at least the "
                  "number of classes (e.g. len(class_names)): the views show it as unknown; "
                  "where no label is known, pass labels=None.")


def _missing_labels(arr: np.ndarray) -> list[int]:
    """The positions of None, NaN and pandas' NA labels (a list or a pandas column with gaps,
    a nullable Int64 column's NA)."""
    if arr.dtype.kind == "f":
        return np.flatnonzero(np.isnan(arr)).tolist()
    if arr.dtype == object:
        return [i for i, x in enumerate(arr.tolist()) if _missing(x)]
    return []


def _first_indices(indices: list[int], k: int = 5) -> str:
    """'instance 3' / 'instances 3, 7 and 9' / 'instances 3, 7, 9, 11, 12, ...'."""
    if len(indices) <= k:
        return f"instance{'s' if len(indices) > 1 else ''} {and_list(map(str, indices))}"
    return f"instances {', '.join(map(str, indices[:k]))}, ..."


#: per thread, the ids of the objects whose attributes are being hashed (a cycle ends there)
_HASHING = threading.local()


def update_hash(h, v) -> None:
    """Feed v to the hash with its type, shape and length, so that different contents can never
    give the same byte stream (["ab", "c"] and ["a", "bc"]; a 3x4 and a 4x3 array)."""
    if isinstance(v, torch.Tensor):
        t = v.detach().cpu()
        try:
            v = t.numpy()
        except TypeError:                 # bfloat16, float8...: numpy has no such dtype
            t = t.contiguous()
            body = t.reshape(-1).view(torch.uint8).numpy().tobytes()
            head = f"t{t.dtype}{tuple(t.shape)}"
            h.update(f"{head}:{len(body)}:".encode())
            h.update(body)
            return
    elif isinstance(v, Mapping):          # by content, whatever the insertion order (its repr
        items = sorted(v.items(), key=lambda kv: (type(kv[0]).__qualname__, repr(kv[0])))
        h.update(f"d{len(items)}{{".encode())        # abbreviates large arrays with "...")
        for k, x in items:
            update_hash(h, k)
            update_hash(h, x)
        h.update(b"}")
        return
    elif is_pandas(v):
        # pandas Series and DataFrames: their values and their labels (a Tabular row and a
        # TimeSeries frame are read by name), not np.asarray's values alone
        h.update(f"p{type(v).__name__}{v.shape}(".encode())
        update_hash(h, [str(d) for d in ([v.dtype] if v.ndim == 1 else v.dtypes)])
        update_hash(h, list(v.index) if v.ndim == 1 else list(v.columns))
        update_hash(h, v.to_numpy())
        h.update(b")")
        return
    elif _is_pil(v):                      # its pixels as read (a palette image's colours, not
        v = np.asarray(pil_pixels(v))     # its palette indices)
    elif not isinstance(v, (np.ndarray, str, bytes, list, tuple, dict)) and (
            hasattr(v, "__array_interface__") or hasattr(v, "__array__")):   # arrays of others
        v = np.asarray(v)
    if isinstance(v, np.ndarray) and v.dtype != object:
        head, body = f"a{v.dtype.str}{v.shape}", np.ascontiguousarray(v).tobytes()
    elif isinstance(v, np.ndarray) or isinstance(v, (list, tuple)):
        h.update(f"l{len(v)}[".encode())
        for x in (v.ravel() if isinstance(v, np.ndarray) else v):
            update_hash(h, x)
        h.update(b"]")
        return
    elif isinstance(v, str):
        head, body = "s", v.encode()
    elif isinstance(v, bytes):
        head, body = "b", v
    elif isinstance(v, (set, frozenset)):   # an order that does not depend on the hash seed
        h.update(f"S{len(v)}{{".encode())
        for x in sorted(v, key=lambda x: (type(x).__qualname__, repr(x))):
            update_hash(h, x)
        h.update(b"}")
        return
    elif type(v).__repr__ is object.__repr__ and hasattr(v, "__dict__"):
        # the default repr is an address: hash the attributes (the same contents in another
        # object, or another process, give the same hash; other contents another)
        active = _HASHING.__dict__.setdefault("ids", set())
        if id(v) in active:               # an object that refers back to itself
            h.update(b"o<cycle>")
            return
        h.update(f"o{type(v).__module__}.{type(v).__qualname__}(".encode())
        active.add(id(v))
        try:
            update_hash(h, vars(v))
        finally:
            active.discard(id(v))
        h.update(b")")
        return
    else:
        head, body = f"r{type(v).__qualname__}", repr(v).encode()
    h.update(f"{head}:{len(body)}:".encode())
    h.update(body)
