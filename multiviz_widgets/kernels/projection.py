"""Projections for the Explorer's global views (pure numpy; no widgets).

* ``project_3d(h)``: decision-level features [N, d] to 3-D by PCA (centred SVD), scaled to
  the unit cube, so the EmbeddingView only draws points.
* ``colour_groups(...)``: one group id per point (label, prediction or correctness) and the
  group names, for the EmbeddingView's colours.
* ``path_layout(path)``: the prediction path (class <- neurons <- units) as positioned nodes
  and links, for the PredictionPathView.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..checks import positive_int

#: The most axes project_3d returns (the EmbeddingView draws 3-D points).
MAX_DIMS = 3


def project_3d(h: np.ndarray, dims: int = 3) -> np.ndarray:
    """PCA of h [N, d] onto its first ``dims`` (1..3) principal axes, scaled into [-1, 1].

    Fewer than ``dims`` features or instances pad with zeros. h must be finite (a ValueError
    names the rows with NaN or infinity). Cost: one thin SVD of [N, d] (for large N a random
    sample of 4096 rows fits the axes, then all rows are projected).
    """
    dims = positive_int(dims, "dims (axes of the projection)")
    if dims > MAX_DIMS:
        raise ValueError(f"dims must be at most {MAX_DIMS} (a projection for a 3-D view), got "
                         f"{dims}.")
    h = np.asarray(h, dtype=np.float64)
    if h.ndim != 2:
        raise ValueError(f"project_3d needs a matrix [instances, features], got shape {h.shape}.")
    bad = np.where(~np.isfinite(h).all(1))[0]
    if len(bad):
        raise ValueError(f"The features contain non-finite values (NaN or infinity) in {len(bad)} "
                         f"row(s), e.g. rows {bad[:10].tolist()}; drop those instances or check "
                         "the model on them.")
    n, d = h.shape
    out = np.zeros((n, dims), dtype=np.float32)
    if n == 0:
        return out
    # PCA is scale-free: scaled to at most 1 first, so that neither the mean nor the centring
    # of huge values (1e308) overflows
    size = np.abs(h).max() if h.size else 0.0
    if size > 0:
        h = h / size
    centred = h - h.mean(0, keepdims=True)
    spread = np.abs(centred).max() if centred.size else 0.0
    if spread > 0:
        centred = centred / spread
    fit = centred
    if n > 4096:
        rng = np.random.default_rng(0)
        fit = centred[rng.choice(n, 4096, replace=False)]
    if n > 1 and d > 0:
        _, _, vt = np.linalg.svd(fit, full_matrices=False)
        k = min(dims, vt.shape[0])
        # a deterministic sign: the largest loading of every axis is positive
        signs = np.sign(vt[np.arange(k), np.abs(vt[:k]).argmax(1)])
        signs[signs == 0] = 1
        proj = centred @ (vt[:k].T * signs)
        out[:, :k] = proj
    scale = np.abs(out).max()
    if scale > 0:
        out /= scale
    return out.astype(np.float32)


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
    and from neurons to the class, plus {kind: "pair"} links between the units of a pair.
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
    for n in neurons:
        mods = list((n.get("units") or {}).keys())
        mods = list(n.get("pair_modalities") or path.get("pair_modalities") or mods)
        for pair in n.get("pairs", []) or []:
            u, v = int(pair[0]), int(pair[1])
            if len(mods) >= 2 and (mods[0], u) in unit_pos and (mods[1], v) in unit_pos:
                links.append({"source": unit_pos[(mods[0], u)], "target": unit_pos[(mods[1], v)],
                              "value": float(pair[4]) if len(pair) > 4 else 0.0, "kind": "pair"})
    # three columns: units (x=0), neurons (x=1), class (x=2); rows spread evenly in [0, 1]
    for col, kind in ((0.0, "unit"), (1.0, "neuron"), (2.0, "class")):
        members = [nd for nd in nodes if nd["kind"] == kind]
        for r, nd in enumerate(members):
            nd["x"] = col
            nd["y"] = 0.5 if len(members) == 1 else 1.0 - r / (len(members) - 1)
    return nodes, links
