"""Projections for the Explorer's global views (pure numpy; no widgets).

* ``project_3d(h)``: decision-level features [N, d] to 3-D by PCA (exact, from the d x d
  covariance, for up to ``EXACT_MAX_FEATURES`` features), scaled to the unit cube, so the
  EmbeddingView only draws points.
* ``colour_groups(...)``: one group id per point (label, prediction or correctness) and the
  group names, for the EmbeddingView's colours.
* ``path_layout(path)``: the prediction path (class <- neurons <- units) as positioned nodes
  and links, for the PredictionPathView.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from ..checks import positive_int

#: The most axes project_3d returns (the EmbeddingView draws 3-D points).
MAX_DIMS = 3
#: Up to this many features project_3d computes the exact PCA, from the eigenvectors of the
#: d x d covariance (O(N d^2) time, O(d^2) memory besides the rows in hand).
EXACT_MAX_FEATURES = 2048
#: Above EXACT_MAX_FEATURES, the axes are fitted on a random sample of this many rows.
SAMPLE_ROWS = 4096
#: Rows are read in chunks of about this many values (32 MiB of float64), so that the work
#: memory stays bounded whatever N (the input is never copied whole).
_CHUNK_VALUES = 1 << 22


def _chunks(n: int, d: int) -> Iterator[slice]:
    step = max(1, _CHUNK_VALUES // max(d, 1))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def project_3d(h: np.ndarray, dims: int = 3) -> np.ndarray:
    """PCA of h [N, d] onto its first ``dims`` (1..3) principal axes, scaled into [-1, 1].

    Returns float32 [N, dims]: the centred rows' coordinates on the axes, all divided by one
    shared scale (the largest absolute coordinate, so the aspect between axes is kept). Each
    axis' sign is fixed so that its largest loading is positive (deterministic). Axes that
    the data do not span (fewer than ``dims`` features, or fewer than ``dims`` + 1 instances,
    or constant features) are zeros. h must be finite (a ValueError names the rows with NaN
    or infinity).

    Method: for d <= ``EXACT_MAX_FEATURES`` (decision layers are usually far narrower) the
    exact PCA, from the eigenvectors of the d x d covariance accumulated in float64 over
    chunks of rows: O(N d^2) time, and float64 work arrays of at most about 32 MiB whatever N
    (a random subsample of rows saved no time here and tilted the axes by degrees). Above
    that, d^2 work and memory grow large, so the axes are the top right singular vectors of
    a random (seeded) sample of ``SAMPLE_ROWS`` centred rows (all rows, so exact, when N is
    not larger), and all rows are projected on them.
    """
    dims = positive_int(dims, "dims (axes of the projection)")
    if dims > MAX_DIMS:
        raise ValueError(f"dims must be at most {MAX_DIMS} (a projection for a 3-D view), got "
                         f"{dims}.")
    h = np.asarray(h)
    if not (h.dtype.kind == "f" and h.dtype.itemsize <= 8):
        h = np.asarray(h, dtype=np.float64)       # float16/32/64 are converted chunk by chunk
    if h.ndim != 2:
        raise ValueError(f"project_3d needs a matrix [instances, features], got shape {h.shape}.")
    n, d = h.shape
    parts = list(_chunks(n, d)) if d else []
    bad, size = [], 0.0
    for part in parts:
        block = h[part]
        top = float(max(block.max(), -block.min())) if block.size else 0.0  # NaN/inf if any
        if np.isfinite(top):
            size = max(size, top)
        else:
            bad.append(np.where(~np.isfinite(block).all(1))[0] + part.start)
    bad = np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)
    if len(bad):
        raise ValueError(f"The features contain non-finite values (NaN or infinity) in {len(bad)} "
                         f"row(s), e.g. rows {bad[:10].tolist()}; drop those instances or check "
                         "the model on them.")
    out = np.zeros((n, dims), dtype=np.float32)
    if n < 2 or d == 0 or size == 0:
        return out
    # PCA is scale-free: the rows are scaled to at most 1 first, so that neither the mean nor
    # the centring of huge values (1e308) overflows, then centred and scaled again to at most
    # 1, so that the covariance of tiny spreads does not underflow
    if len(parts) == 1:                              # small enough for one float64 copy
        x = h.astype(np.float64)
        x /= size
        x -= x.sum(0) / n
        spread = float(max(x.max(), -x.min()))
        if spread == 0:
            return out
        x /= spread

        def rows(part) -> np.ndarray:
            return x[part]
    else:
        mean = np.zeros(d)
        for part in parts:
            mean += (h[part].astype(np.float64) / size).sum(0)
        mean /= n
        spread = max(float(np.abs(h[part].astype(np.float64) / size - mean).max())
                     for part in parts)
        if spread == 0:
            return out

        def rows(part) -> np.ndarray:
            return (h[part].astype(np.float64) / size - mean) / spread

    if d <= EXACT_MAX_FEATURES:
        cov = np.zeros((d, d))
        for part in parts:
            r = rows(part)
            cov += r.T @ r
        values, vectors = np.linalg.eigh(cov)        # ascending
        top = np.argsort(values, kind="stable")[::-1]
        values, axes = values[top], vectors[:, top].T
        # eigenvalues are squared singular values: their rounding is about eps * largest
        null = values <= values[0] * max(n, d) * np.finfo(np.float64).eps
    else:
        fit = np.arange(n)
        if n > SAMPLE_ROWS:
            fit = np.sort(np.random.default_rng(0).choice(n, SAMPLE_ROWS, replace=False))
        _, values, axes = np.linalg.svd(rows(fit), full_matrices=False)
        null = values <= values[0] * max(len(fit), d) * np.finfo(np.float64).eps
    k = min(dims, len(axes), int((~null).sum()))
    if k == 0:
        return out
    axes = axes[:k]
    # a deterministic sign: the largest loading of every axis is positive
    signs = np.sign(axes[np.arange(k), np.abs(axes).argmax(1)])
    signs[signs == 0] = 1
    axes = axes.T * signs
    proj = np.zeros((n, k))
    for part in parts:
        proj[part] = rows(part) @ axes
    scale = np.abs(proj).max()
    if scale > 0:
        out[:, :k] = proj / scale
    return out


#: The group of points whose label lies outside the model's classes (colouring by label or
#: correctness): shown apart, and counted neither wrong nor right.
UNKNOWN_GROUP = "unknown / unlabelled"


def colour_groups(by: str, labels: np.ndarray | None, predictions: np.ndarray,
                  class_names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """(group id per point [N], group names) for colouring by "label", "prediction" or
    "correctness" (groups "wrong", "right"; needs labels). Labels outside the classes form a
    last group named ``UNKNOWN_GROUP`` (only when there are any)."""
    if by not in ("label", "prediction", "correctness"):
        raise ValueError(f"Colour by {by!r}? Use 'label', 'prediction' or 'correctness'.")
    predictions = np.asarray(predictions, dtype=np.int64)
    if by == "prediction":
        return predictions, list(class_names)
    if by in ("label", "correctness") and labels is None:
        raise ValueError(f"Colouring by {by!r} needs the dataset's labels; this dataset has none "
                         "(colour by 'prediction' instead).")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != predictions.shape:
        raise ValueError(f"{labels.size} labels for {predictions.size} predictions; pass one "
                         "label per point (the labels of the instances that were projected).")
    if by == "label":
        groups, names = labels, list(class_names)
    elif by == "correctness":
        groups, names = (labels == predictions).astype(np.int64), ["wrong", "right"]
    else:
        raise ValueError(f"Colour by {by!r}? Use 'label', 'prediction' or 'correctness'.")
    known = (labels >= 0) & (labels < len(class_names))
    if known.all():
        return groups, names
    return np.where(known, groups, len(names)), names + [UNKNOWN_GROUP]


def path_layout(path: dict, max_units: int | None = None,
                other_classes: Sequence[tuple[int, str]] = ()) -> tuple[list[dict], list[dict]]:
    """Nodes and links of a prediction path, laid out in three columns.

    path: ``PredictionPath.to_dict()``: class ({index, name, logit} or an index with
    class_name), neurons [{index, contribution, units {modality: [(unit, label, score)]},
    pairs [(u, v, label_u, label_v, value)], pair_modalities (a, b)}].
    Returns (nodes, links): a node is {id, kind ("class"|"neuron"|"unit"), label, x, y, value,
    and class / neuron / modality+unit}; units are shared between neurons; a link is
    {source, target, value} with node positions (indices into nodes), from units to neurons
    and from neurons to the class, plus {kind: "pair"} links between the units of a pair: one
    link per two units, drawn with the value of the first (strongest) neuron that lists them
    ("neuron"), with every such neuron's [index, value] in "neurons".
    other_classes: (index, name) of further classes to show as (unlinked) class nodes, so a
    click on one can switch the target.
    """
    c = path.get("class", path.get("class_index", 0))
    if isinstance(c, dict):           # PredictionPath.to_dict(): {"index", "name", "logit"}
        cls, cls_name, logit = int(c["index"]), str(c.get("name", c["index"])), c.get("logit")
    else:
        cls, cls_name, logit = int(c), str(path.get("class_name", c)), path.get("logit")
    nodes: list[dict] = [{"id": f"class:{cls}", "kind": "class", "label": cls_name,
                          "class": cls, "value": float(logit or 0.0)}]
    for c, name in other_classes:
        if int(c) != cls:
            nodes.append({"id": f"class:{int(c)}", "kind": "class", "label": str(name),
                          "class": int(c), "value": 0.0})
    links: list[dict] = []
    unit_pos: dict[tuple[str, int], int] = {}
    neurons = list(path.get("neurons", []))
    for n in neurons:
        j = int(n["index"])
        nodes.append({"id": f"neuron:{j}", "kind": "neuron", "label": f"h{j}", "neuron": j,
                      "value": float(n.get("contribution", 0.0))})
        npos = len(nodes) - 1
        links.append({"source": npos, "target": 0, "value": float(n.get("contribution", 0.0)),
                      "kind": "contribution"})
        for modality, units in (n.get("units") or {}).items():
            for entry in list(units)[:max_units]:
                u, label, score = int(entry[0]), str(entry[1]), float(entry[2])
                key = (str(modality), u)
                if key not in unit_pos:
                    nodes.append({"id": f"unit:{modality}:{u}", "kind": "unit", "label": label,
                                  "modality": str(modality), "unit": u, "value": score})
                    unit_pos[key] = len(nodes) - 1
                links.append({"source": unit_pos[key], "target": npos, "value": score,
                              "kind": "attribution"})
    pair_links: dict[tuple[int, int], dict] = {}
    for n in neurons:
        mods = list((n.get("units") or {}).keys())
        mods = list(n.get("pair_modalities") or path.get("pair_modalities") or mods)
        for pair in n.get("pairs", []) or []:
            u, v = int(pair[0]), int(pair[1])
            if len(mods) >= 2 and (mods[0], u) in unit_pos and (mods[1], v) in unit_pos:
                ends = (unit_pos[(mods[0], u)], unit_pos[(mods[1], v)])
                value = float(pair[4]) if len(pair) > 4 else 0.0
                if ends not in pair_links:
                    # one link per pair of units (units are shared between neurons, so a link
                    # per neuron would lie on top of another): the first neuron's value, the
                    # path's strongest neuron that lists the pair; every neuron's in "neurons"
                    pair_links[ends] = {"source": ends[0], "target": ends[1], "value": value,
                                        "kind": "pair", "neuron": int(n["index"]),
                                        "neurons": []}
                    links.append(pair_links[ends])
                pair_links[ends]["neurons"].append([int(n["index"]), value])
    # three columns: units (x=0), neurons (x=1), class (x=2); rows spread evenly in [0, 1]
    for col, kind in ((0.0, "unit"), (1.0, "neuron"), (2.0, "class")):
        members = [nd for nd in nodes if nd["kind"] == kind]
        for r, nd in enumerate(members):
            nd["x"] = col
            nd["y"] = 0.5 if len(members) == 1 else 1.0 - r / (len(members) - 1)
    return nodes, links
