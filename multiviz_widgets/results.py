"""Typed results of the kernels: numpy arrays plus what produced them and what it cost.

``to_dict()`` gives a result as plain, strict JSON data (lists of floats, non-finite values as
None, the target as {"kind", "index"}); ``attribution_from_dict`` and ``interaction_from_dict``
rebuild it (None as NaN), and refuse data that is not what ``to_dict`` writes (a string or a
bool for a number, a label that is not a string) with a ValueError that says what was wrong.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .adapter import Target
from .checks import is_integer, positive_int


@dataclass
class Result:
    """Metadata shared by every kernel result."""

    method: str
    target: Target
    params: dict[str, Any] = field(default_factory=dict)
    forward_passes: int = 0     # instances pushed through the model (a batch of B counts B)
    backward_passes: int = 0    # instances back-propagated (double backward counts twice)
    seconds: float = 0.0

    def _shapes(self) -> str:
        """The shapes of the result's arrays, for ``__repr__``."""
        return "no arrays"

    def __repr__(self) -> str:
        """One line: method, target, the arrays' shapes and the cost (never the arrays)."""
        return (f"{type(self).__name__}({self.method}, target={self.target}, {self._shapes()}, "
                f"forward_passes={self.forward_passes}, backward_passes={self.backward_passes}, "
                f"seconds={self.seconds:.3g})")

    def _shared_dict(self) -> dict[str, Any]:
        """The fields shared by every result as plain JSON data (see ``_plain``); private, so
        that a result type without its own ``to_dict`` cannot serialise without its arrays."""
        return {"type": type(self).__name__.lower(), "method": self.method,
                "target": _plain(self.target), "params": _plain(self.params),
                "forward_passes": int(self.forward_passes),
                "backward_passes": int(self.backward_passes), "seconds": float(self.seconds)}


def computed_units(params, pair, shape) -> tuple[np.ndarray, np.ndarray] | None:
    """(the row modality's units, the column modality's) whose cells an interaction matrix
    [shape] between ``pair`` (rows, columns) computed, from ``params["players"]`` (Shapley's
    players) or ``params["units"]`` (pairwise ablation's chosen units), {modality: units}, as
    sorted index arrays; None when the params name no valid units of both sides (then every
    cell is computed). The other cells are 0 in the matrix, no measured value: the heatmap
    greys them, the input view leaves them unscored and ``Interaction.top_pairs`` skips them,
    all through this one function."""
    if not isinstance(params, dict) or len(shape) != 2:
        return None
    chosen = params.get("players", params.get("units"))
    if not isinstance(chosen, dict):
        return None
    sides = []
    for modality, n in zip(pair, shape):
        units = chosen.get(modality)
        if units is None or isinstance(units, (str, bytes)):
            return None
        try:
            idx = np.unique(np.asarray(units, dtype=np.int64).ravel())
        except (TypeError, ValueError):
            return None
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            return None
        sides.append(idx)
    return sides[0], sides[1]


@dataclass(repr=False)
class Attribution(Result):
    """Stage 1: per-unit scores and full-resolution maps, one entry per modality."""

    scores: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [n_units]
    maps: dict[str, np.ndarray] = field(default_factory=dict)    # name -> modality.to_map shape
    labels: dict[str, list[str]] = field(default_factory=dict)   # name -> unit labels

    def _shapes(self) -> str:
        return "scores={" + ", ".join(f"{n}: {np.shape(v)}" for n, v in self.scores.items()) + "}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able plain data: scores and maps as (nested) lists of floats, the maps' shapes
        (which the lists of an empty map, such as [] for shape (0, 4), do not keep), the labels,
        the target as {"kind", "index"}, the params and the cost; ``attribution_from_dict``
        inverts it."""
        return {**self._shared_dict(),
                "scores": {n: _floats(v) for n, v in self.scores.items()},
                "maps": {n: _floats(v) for n, v in self.maps.items()},
                "map_shapes": {n: [int(d) for d in np.shape(v)] for n, v in self.maps.items()},
                "labels": {n: [str(x) for x in v] for n, v in self.labels.items()}}


@dataclass(repr=False)
class Interaction(Result):
    """Stage 2: a unit x unit interaction matrix between modalities a (rows) and b (columns)."""

    modalities: tuple[str, str] = ("", "")
    matrix: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    row_labels: list[str] = field(default_factory=list)
    col_labels: list[str] = field(default_factory=list)

    def top_pairs(self, k: int = 5, absolute: bool = True) -> list[tuple[int, int, float]]:
        """The k (row, column, value) pairs of largest (absolute) interaction among the cells
        the method computed (``computed_units``: Shapley's players, pairwise ablation's units;
        the others are 0 in the matrix, no measured value), ties in row-major order; NaN
        entries, if any, rank last."""
        k = positive_int(k, "top_pairs' k (the number of pairs)", minimum=0)
        matrix = np.asarray(self.matrix, dtype=np.float64)
        m = np.abs(matrix) if absolute else matrix
        nan = np.isnan(m).ravel()
        # sorted by NaN-or-not first, then largest first (-inf after every number, NaN after
        # -inf); lexsort is stable, so ties stay in row-major order
        order = np.lexsort((np.where(nan, 0.0, -m.ravel()), nan))
        sides = computed_units(self.params, self.modalities, matrix.shape)
        if sides is not None:
            inside = np.zeros(matrix.shape, dtype=bool)
            inside[np.ix_(*sides)] = True
            order = order[inside.ravel()[order]]
        rows, cols = np.unravel_index(order[:int(k)], m.shape)
        return [(int(r), int(c), float(matrix[r, c])) for r, c in zip(rows, cols)]

    def _shapes(self) -> str:
        a, b = self.modalities
        return f"matrix={np.shape(self.matrix)} ({a} x {b})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able plain data: the matrix as a list of rows of floats, the modalities and
        labels, the target as {"kind", "index"}, params and cost; ``interaction_from_dict``
        inverts it."""
        return {**self._shared_dict(), "modalities": [str(m) for m in self.modalities],
                "matrix": _floats(self.matrix), "row_labels": [str(x) for x in self.row_labels],
                "col_labels": [str(x) for x in self.col_labels]}


def _plain(value) -> Any:
    """value as plain JSON data: a Target as {"kind", "index"}; numpy scalars and arrays (and
    tensors) as Python numbers and lists; tuples as lists; dict keys as strings; non-finite
    floats as None; anything else as its str."""
    if isinstance(value, Target):
        return {"kind": value.kind, "index": int(value.index)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist"):                 # numpy scalars and arrays, torch tensors
        return _plain(value.tolist())
    return str(value)


def _floats(array) -> list:
    """An array as (nested) lists of Python floats, non-finite values (NaN, +-inf) as None, so
    that the data is strict JSON (``json.dumps(..., allow_nan=False)``; a browser's JSON.parse
    refuses NaN); ``*_from_dict`` reads None back as NaN."""
    arr = np.asarray(array, dtype=np.float64)
    if np.isfinite(arr).all():
        return arr.tolist()
    return np.where(np.isfinite(arr), arr, None).tolist()


def _from_dict(kind: str, build: Callable[[dict], Result], data: dict[str, Any]) -> Result:
    """``build(data)``, its mistakes on data of the wrong shape (a missing field, a list for a
    dict) told as a ValueError that names the field."""
    if not isinstance(data, dict) or data.get("type") != kind:
        got = data.get("type") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"Expected the to_dict() data of an {kind.capitalize()} "
                         f"(type {kind!r}), got {got!r}.")
    try:
        return build(data)
    except KeyError as e:
        why = f"it has no {e.args[0]!r} field"
    except OverflowError:
        why = "it has a number too large for a float"
    except (TypeError, AttributeError, ValueError) as e:
        why = str(e)
    raise ValueError(f"This is not {kind.capitalize()}.to_dict() data: "
                     f"{why.rstrip('.')}.") from None


def _shared_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of Result's fields from ``to_dict()`` data."""
    t, method = data["target"], data["method"]
    if not isinstance(t, dict):
        raise TypeError(f"\"target\" must be {{\"kind\": ..., \"index\": ...}}, got {t!r}")
    if not isinstance(method, str):
        raise TypeError(f"\"method\" must be the method's name, got {method!r}")
    passes = {f: data.get(f, 0) for f in ("forward_passes", "backward_passes")}
    for f, n in passes.items():
        if not is_integer(n) or n < 0:
            raise ValueError(f"\"{f}\" must be an integer (a count), got {n!r}")
    params, seconds = data.get("params", {}), data.get("seconds", 0.0)
    if not isinstance(params, dict):
        raise TypeError(f"\"params\" must map each parameter's name to its value, got {params!r}")
    if not _is_number(seconds):
        raise ValueError(f"\"seconds\" must be a number, got {seconds!r}")
    return {"method": method, "target": Target(t["kind"], t["index"]), "params": dict(params),
            **{f: int(n) for f, n in passes.items()}, "seconds": float(seconds)}


def _is_number(value) -> bool:
    """An int or a float (numpy's too), not a bool nor a string such as "nan" or "1e3"."""
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, (bool, np.bool_)))


def _numbers(value, what: str) -> np.ndarray:
    """``to_dict``'s (nested) lists of numbers, None for a non-finite one, as a float64 array
    (None as NaN); a string, a bool or anything else is refused (numpy would read "nan", "1e3"
    and True as numbers), and a number too large for a float too."""
    bad = _not_a_number(value)
    if bad is not _NONE:
        raise ValueError(f"{what} must hold numbers (null for NaN or an infinity), got {bad!r}")
    try:
        arr = np.asarray(value)
        if arr.dtype == object:                  # None among the numbers, or a huge int
            return np.array([np.nan if v is None else v for v in arr.ravel()],
                            dtype=np.float64).reshape(arr.shape)
        return arr.astype(np.float64)
    except OverflowError:
        raise ValueError(f"{what} has a number too large for a float") from None


_NONE = object()          # _not_a_number's "all are numbers" (None is a value it may find)
_PLAIN = {float, int, type(None)}


def _not_a_number(value):
    """The first value in nested lists that is neither a number nor None, else ``_NONE``.
    The types of a list of values are checked at once (a map's rows are long)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, (list, tuple)):
            if v and set(map(type, v)) <= _PLAIN:
                continue
            stack.extend(reversed(v))
        elif v is not None and not _is_number(v):
            return v
    return _NONE


def _strings(value, what: str) -> list[str]:
    """A list of strings (unit labels, modality names), checked."""
    if not isinstance(value, list):
        raise TypeError(f"{what} must be a list of names, got {value!r}")
    bad = [x for x in value if not isinstance(x, str)]
    if bad:
        raise ValueError(f"{what} must be strings, got {bad[0]!r}")
    return list(value)


def _per_modality(data: dict[str, Any], field: str) -> dict:
    value = data[field]
    if not isinstance(value, dict):
        raise TypeError(f"\"{field}\" must map each modality to its values, got "
                        f"{type(value).__name__}")
    return value


def attribution_from_dict(data: dict[str, Any]) -> Attribution:
    """Rebuild an Attribution from ``Attribution.to_dict()`` (arrays as float64; tuples in the
    params come back as lists)."""
    return _from_dict("attribution", _attribution, data)


def _attribution(data: dict[str, Any]) -> Attribution:
    shared = _shared_fields(data)
    scores, maps, labels = (_per_modality(data, f) for f in ("scores", "maps", "labels"))
    bad = [n for n, v in labels.items() if not isinstance(v, list)]
    if bad:
        raise TypeError(f"the labels of {bad[0]!r} must be a list of unit names, got "
                        f"{labels[bad[0]]!r}")
    labels = {n: _strings(v, f"the labels of {n!r}") for n, v in labels.items()}
    if not set(scores) == set(maps) == set(labels):
        raise ValueError(f"\"scores\", \"maps\" and \"labels\" name other modalities "
                         f"({sorted(scores)}, {sorted(maps)}, {sorted(labels)})")
    out = {key: {n: _numbers(v, f"the {key} of {n!r}") for n, v in d.items()}
           for key, d in (("scores", scores), ("maps", maps))}
    for n, v in out["scores"].items():
        if v.shape != (len(labels[n]),):
            raise ValueError(f"the scores of {n!r} have shape {v.shape} but it has "
                             f"{len(labels[n])} unit labels")
    if "map_shapes" in data:                 # (data written before it had them: as they read)
        out["maps"] = _shaped(out["maps"], _per_modality(data, "map_shapes"))
    return Attribution(**shared, **out, labels=labels)


def _shaped(maps: dict[str, np.ndarray], shapes: dict) -> dict[str, np.ndarray]:
    """The maps in the shapes ``to_dict`` wrote down (an empty map's lists lose its shape:
    [] for (0, 4)), checked against them."""
    if set(shapes) != set(maps):
        raise ValueError(f"\"map_shapes\" names other modalities than \"maps\" "
                         f"({sorted(shapes)}, {sorted(maps)})")
    for n, shape in shapes.items():
        if (not isinstance(shape, list)
                or not all(is_integer(d) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise ValueError(f"the shape of the map of {n!r} must be a list of sizes, got "
                             f"{shape!r}")
        shape = tuple(int(d) for d in shape)
        if maps[n].size == 0 and math.prod(shape) == 0:
            maps[n] = maps[n].reshape(shape)
        if maps[n].shape != shape:
            raise ValueError(f"the map of {n!r} has shape {maps[n].shape} but \"map_shapes\" "
                             f"says {shape}")
    return maps


def interaction_from_dict(data: dict[str, Any]) -> Interaction:
    """Rebuild an Interaction from ``Interaction.to_dict()`` (the matrix as float64)."""
    return _from_dict("interaction", _interaction, data)


def _interaction(data: dict[str, Any]) -> Interaction:
    shared = _shared_fields(data)
    rows, cols = data["row_labels"], data["col_labels"]
    if not isinstance(rows, list) or not isinstance(cols, list):
        raise TypeError(f"\"row_labels\" and \"col_labels\" must be lists of unit names, got "
                        f"{type(rows).__name__} and {type(cols).__name__}")
    rows, cols = _strings(rows, "\"row_labels\""), _strings(cols, "\"col_labels\"")
    matrix = _numbers(data["matrix"], "the matrix")
    if matrix.size == 0 and len(rows) * len(cols) == 0:      # no rows: written as []
        matrix = matrix.reshape(len(rows), len(cols))
    if matrix.shape != (len(rows), len(cols)):
        raise ValueError(f"the matrix has shape {matrix.shape} but there are {len(rows)} row "
                         f"labels and {len(cols)} column labels")
    mods = data["modalities"]
    if (not isinstance(mods, (list, tuple)) or len(mods) != 2
            or not all(isinstance(m, str) and m for m in mods) or mods[0] == mods[1]):
        raise ValueError(f"\"modalities\" must name the two modalities (two different names), "
                         f"got {mods!r}")
    return Interaction(**shared, modalities=(mods[0], mods[1]), matrix=matrix, row_labels=rows,
                       col_labels=cols)


class Stopwatch:
    """Times a block: ``with Stopwatch() as sw: ...; sw.seconds``."""

    def __enter__(self):
        self._t0 = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        return False
