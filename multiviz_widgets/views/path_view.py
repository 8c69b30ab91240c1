"""PredictionPathView (bqplot Graph): class <- neurons <- units, every node clickable.

The path comes from the engine (``Analyses.path``: prediction.prediction_path(...).to_dict())
and its layout from ``kernels.projection.path_layout``; the view only draws. A class node click
sets the target (everywhere), a neuron node selects the neuron, a unit node selects the unit.
The path's pairs are those of ``Analyses.path_params`` (the Explorer sets them to the
heatmap's pair): a change of the selection's ``pair`` asks for the path again. A second line
names the concepts people gave the path's neurons (``annotations``), as text.
"""
from __future__ import annotations

import bqplot as bq
import ipywidgets as W
import numpy as np

from ..annotations import Annotations
from ..display_text import quoted
from ..engine import Analyses, Engine, params_key
from ..kernels.projection import path_layout
from ..selection import Selection
from ._common import (RetryAfterCancel, WrappedText, failure_text, method_label,
                      patch_names_key)

_COLOURS = {"class": "#d62728", "neuron": "#1f77b4", "unit": "#2ca02c"}
#: The classes shown beside the path's own (a click follows their path): grey, not its red.
_OTHER_CLASS = "#9e9e9e"
#: how far left of its node (in x units) a unit's name ends
UNIT_LABEL_GAP = 0.12
#: the longest unit name drawn in full (about 100 px of 12 px text, the room left of the units)
UNIT_NAME_CHARS = 16
#: The most characters of a class's name drawn in its 70 px box (the tooltip has it whole).
CLASS_NAME_CHARS = 9


def _short_unit_name(name: str) -> str:
    """A unit's name as the path draws it: in full up to UNIT_NAME_CHARS, else cut in the
    middle, its last word kept ("ecg+respi\u2026 t8-15": the windows of one channel group must
    not all read alike); the node's tooltip has it whole."""
    if len(name) <= UNIT_NAME_CHARS:
        return name
    head, _, last = name.rpartition(" ")
    if head and len(last) <= UNIT_NAME_CHARS - 4:
        return name[:UNIT_NAME_CHARS - len(last) - 2] + "\u2026 " + last
    return name[:UNIT_NAME_CHARS - 1] + "\u2026"


def _short_class_name(name: str) -> str:
    """A class's name as its box on the path shows it: in full up to CLASS_NAME_CHARS, else
    cut with an ellipsis (a long answer ran out of its box and off the figure's edge)."""
    return name if len(name) <= CLASS_NAME_CHARS else name[:CLASS_NAME_CHARS - 1] + "\u2026"


def path_methods(path: dict) -> str:
    """"units by integrated gradients, pairs by second-order gradients" (or "no pairs"): what
    a path (``PredictionPath.to_dict``'s) was computed with, for its caption."""
    units = path.get("unimodal_method")
    pairs = path.get("interaction_method")
    said = f"units by {method_label(units)}" if units else "units by their attributions"
    return f"{said}, " + (f"pairs by {method_label(pairs)}" if pairs else "no pairs")


def silent_neurons_note(path: dict, silent) -> str:
    """The caption's words on the path's neurons that no input unit moves at the instance
    (``params["units_silent"]``): no unit is drawn for them; those at 0 (inactive here) that
    still contribute, through a sparse model's standardisation, are said apart."""
    names = ", ".join(f"h{int(j)}" for j in silent)
    text = (f"; no input unit moves {names} here (every "
            f"{method_label(path.get('unimodal_method'))} score is 0), so no unit is drawn for "
            f"{'it' if len(silent) == 1 else 'them'}")
    activation = {int(n.get("index", -1)): n.get("activation") for n in path.get("neurons", [])}
    off = [j for j in silent if activation.get(int(j)) == 0]
    if off and path.get("source") == "sparse_model":
        text += (f"; {', '.join(f'h{int(j)}' for j in off)} "
                 f"{'is' if len(off) == 1 else 'are'} 0 here (inactive) and "
                 f"contribute{'s' if len(off) == 1 else ''} all the same: the sparse model "
                 "reads each neuron against its mean over the data")
    return text


def pair_colours(path: dict) -> str:
    """What a red link between two units means, by the method of the path's pairs: removing
    units (ablation, Shapley) measures whether they reinforce each other; second-order
    gradients measure a local curvature, whose sign can differ (as the heatmap's legend says)."""
    if path.get("interaction_method") == "second_order":
        return ("red: raising the two together raises the neuron more than each alone, a local "
                "curvature whose sign can differ from removing them")
    return "red: they reinforce each other"


def signed_link_values(links: list[dict]) -> list[float]:
    """Each link's value over the largest |value| of its kind (contribution, attribution,
    pair), in [-1, 1]: the kinds are in different units (logits, attribution scores,
    interactions), so each is drawn on its own scale; the sign says raises (+) or lowers (-)."""
    largest: dict = {}
    for link in links:
        v = float(link["value"])
        if np.isfinite(v):
            kind = link.get("kind")
            largest[kind] = max(largest.get(kind, 0.0), abs(v))
    out = []
    for link in links:
        v, top = float(link["value"]), largest.get(link.get("kind"), 0.0)
        out.append(v / top if np.isfinite(v) and top > 0 else 0.0)
    return out


def shared_pairs_note(nodes: list[dict], links: list[dict]) -> str:
    """"; the link 'red'-'circle' is drawn as h3's interaction: h4's has the other sign" for
    pair links (``path_layout``: one per two units, the first neuron's value) that several
    neurons list with interactions of opposite signs; empty when none does."""
    mixed = [l for l in links if l.get("kind") == "pair" and l["value"]
             and len({np.sign(v) for _, v in l.get("neurons", []) if v}) > 1]
    if not mixed:
        return ""
    l = mixed[0]
    ends = "-".join(quoted(str(nodes[l[k]]["label"])) for k in ("source", "target"))
    others = [f"h{int(j)}" for j, v in l["neurons"] if v and np.sign(v) != np.sign(l["value"])]
    more = len(mixed) - 1
    more = f" (and {more} more such link{'s' * (more > 1)})" if more else ""
    return (f"; the link {ends} is drawn as h{int(l['neuron'])}'s interaction, the strongest "
            f"neuron's: {', '.join(others)} give{'s' * (len(others) == 1)} it the other "
            f"sign{more}")


class PathView(W.VBox):
    """The prediction path of the selected instance for the selected (or predicted) class."""

    slot = "path"

    def __init__(self, selection: Selection, engine: Engine, analyses: Analyses,
                 annotations: Annotations | None = None):
        self.selection, self.engine, self.analyses = selection, engine, analyses
        self.annotations = annotations
        self.nodes: list[dict] = []
        self.links: list[dict] = []
        self.path: dict = {}
        self.instance = -1                    # the instance whose path is shown
        # room left of the units (x = 0) for their names, drawn there (UNIT_LABEL_GAP)
        self.xs = bq.LinearScale(min=-0.62, max=2.3)
        self.ys = bq.LinearScale(min=-0.1, max=1.1)
        # edges: red raises the node on their right, blue lowers it; a link between two units:
        # red, they reinforce each other, blue, they counteract (as the heatmap's colours)
        self.link_colours = bq.ColorScale(scheme="RdBu", mid=0.0, min=-1.0, max=1.0,
                                          reverse=True)
        # one tooltip for every graph drawn (each redraw makes a new graph: bqplot#1155)
        self.node_tip = bq.Tooltip(fields=["name"])      # a node's whole name
        self.graph = self._new_graph([], [], [], [], [])
        # the units' names: text right-aligned just left of their nodes (a Label mark: text,
        # never markup), where no edge crosses them; updated in place on each draw
        self.unit_names = bq.Label(x=[], y=[], text=[], scales={"x": self.xs, "y": self.ys},
                                   align="end", default_size=12, y_offset=4, colors=["#333333"],
                                   font_weight="normal")
        self.figure = bq.Figure(marks=[self.graph, self.unit_names],
                                layout=W.Layout(width="620px", height="360px"),
                                fig_margin={"top": 20, "bottom": 20, "left": 10, "right": 60})
        self.caption = WrappedText(width=84)      # long: wrapped, never cut
        # the concepts of the path's neurons: wrapped, never cut
        self.concepts = WrappedText(width=84)
        # its own width, never squeezed by the views beside it (they wrap below instead)
        super().__init__([self.caption, self.concepts, self.figure],
                         layout=W.Layout(width="626px", flex="0 0 auto",
                                         margin="0 12px 8px 0"))
        self.add_class("mvz-path-view")
        selection.observe(lambda _: self.refresh(),
                          names=["instance", "target", "pair", "method", "interaction_method"])
        selection.observe(lambda _: self._highlight(), names=["neuron", "modality", "unit"])
        self.retry = RetryAfterCancel(selection)
        if annotations is not None:
            annotations.observe(self._on_concepts)

    def _new_graph(self, node_data, link_data, x, y, colors) -> bq.Graph:
        graph = bq.Graph(node_data=node_data, link_data=link_data, x=x, y=y,
                         colors=colors or ["#7f7f7f"],
                         scales={"x": self.xs, "y": self.ys, "link_color": self.link_colours},
                         # no arrowheads: they piled up over the neurons' names; the caption
                         # and the left-to-right layout say the direction
                         link_type="line", directed=False, static=True, charge=0,
                         highlight_links=True,
                         interactions={"click": "select", "hover": "tooltip"},
                         # a node's full name (a unit's drawn name may be shortened)
                         tooltip=self.node_tip,
                         selected_style={"stroke": "black", "stroke-width": 3})
        graph.on_element_click(self._on_click)
        return graph

    def refresh(self) -> None:
        s = self.selection
        i, target, a = s.instance, s.target, self.analyses
        self.retry.asked("path")
        params = a.path_params            # replaced (never changed in place) on a new pair

        def job(progress):
            cls = a.class_index(i, target)
            path = a.path(i, cls, progress, params)   # the pairs captured here, key and all
            nodes, links = path_layout(path, other_classes=a.top_classes(i, 3))
            ready = a.sparse_note_key()             # read before the note it stands for
            return cls, path, nodes, links, i, a.sparse_model_note(i), ready

        # the "main" lane: the path is about the selected instance and needs no dataset-wide
        # work, so it never waits for the dataset's features
        key = ("path", i, target, params_key(params), a.sparse_note_key())
        with self.engine.lock:     # the caption not overwritten by a path applied meanwhile
            self.caption.value = "computing the prediction path ..."
            self.engine.submit(self.slot, key, job, self._show,
                               lambda err: self._failed(err, i), priority=3,
                               label="prediction path")

    def _failed(self, err, instance: int | None = None) -> None:
        """Blank the graph (no nodes of an earlier selection stay shown or clickable)."""
        self._draw(-1, {}, [], [])
        self.concepts.value = ""
        of = "" if instance is None else f" of #{instance}"
        again = self.retry.failed("path", self.refresh, err)
        self.caption.value = f"prediction path{of} not shown ({failure_text(err)}{again})"

    def _show(self, result) -> None:
        cls, path, nodes, links, i, sparse_note, ready = result
        self._draw(i, path, nodes, links)
        name = self.analyses.adapter.class_names[cls]
        note = str(path.get("note") or "") if not path.get("neurons") else ""
        cls_text = quoted(name)
        self.caption.value = (f"prediction path to class {cls_text}: no neurons ({note})" if note
                              else f"prediction path to class {cls_text} (red box): units -> "
                                   "neurons -> class, left to right; red edges raise the node on "
                                   "their right, blue lower it, paler is weaker; a link between "
                                   f"two units: their interaction ({pair_colours(path)}); grey "
                                   "boxes: other likely classes (click a node)")
        if not note:
            self.caption.value += f"; {path_methods(path)}"
        ablated = (path.get("params") or {}).get("pairs_by_ablation") or []
        if ablated and not note:
            self.caption.value += (
                f"; the pairs of {', '.join(f'h{int(j)}' for j in ablated)} come from pairwise "
                f"ablation: second-order gradients cannot see their interactions here (the "
                f"model is piecewise linear at this instance, or cuts a modality off autograd's "
                f"graph; the heatmap's note says which)")
        narrowed = (path.get("params") or {}).get("ablation_candidates") or {}
        if narrowed and not note:
            self.caption.value += (
                "; pairwise ablation looked for the pairs among the "
                + ", ".join(f"{int(k)} units of {quoted(m)}" for m, k in narrowed.items())
                + " of largest stage-1 score (every pair of so many units would take a "
                "forward pass each)")
        whole = (path.get("params") or {}).get("ablation_whole") or []
        if whole and not note:
            self.caption.value += (
                "; pairwise ablation tried every unit of "
                + ", ".join(quoted(m) for m in whole)
                + " (the path's stage-1 method explains other modalities only, so nothing "
                "ranked them: a slow search)")
        silent = (path.get("params") or {}).get("units_silent") or []
        if silent and not note:
            self.caption.value += silent_neurons_note(path, silent)
        if not note:
            self.caption.value += shared_pairs_note(nodes, links)
        if sparse_note:
            self.caption.value += f"; {sparse_note}"
        self.caption.value += patch_names_key(n["label"] for n in nodes if n["kind"] == "unit")
        self.concepts.value = self.concept_line()
        if not ready and self.analyses.sparse_note_key():
            self.refresh()       # its note was made before the dataset's features came

    def concept_line(self) -> str:
        """"concepts on this path: h12 red things, circle; h5 ..." for the shown neurons that
        people named (empty when none is)."""
        if self.annotations is None:
            return ""
        named = []
        for n in self.nodes:
            if n["kind"] == "neuron":
                cs = self.annotations.concepts(("neuron", int(n["neuron"])))
                if cs:
                    named.append(f"h{int(n['neuron'])} {', '.join(cs)}")
        return "concepts on this path: " + "; ".join(named) if named else ""

    def _on_concepts(self, key) -> None:
        if key is None or key[0] == "neuron":
            with self.engine.lock:        # the nodes are replaced on the worker
                self.concepts.value = self.concept_line()

    def _draw(self, instance: int, path: dict, nodes: list, links: list) -> None:
        self.instance = int(instance)
        self.path, self.nodes, self.links = path, nodes, links
        node_data = [{"label": (_short_class_name(str(n["label"])) if n["kind"] == "class"
                                else str(n["label"])), "name": str(n["label"]),
                      "shape": "rect" if n["kind"] == "class" else
                      "circle", "shape_attrs": {"r": 12} if n["kind"] != "class" else
                      {"width": 70, "height": 26}, "node_id": n["id"], "kind": n["kind"],
                      # a unit's name left of it (self.unit_names), not over its edges
                      "label_display": "none" if n["kind"] == "unit" else "center"}
                     for n in nodes]
        # link_data is sent as JSON, which has no NaN or infinity; each kind of edge on its
        # own scale (signed_link_values), coloured by sign and strength
        link_data = [{"source": int(l["source"]), "target": int(l["target"]), "value": v}
                     for l, v in zip(links, signed_link_values(links))]
        shown = nodes[0]["class"] if nodes and nodes[0]["kind"] == "class" else None
        # a new mark each time: bqplot's Graph does not redraw changed nodes (bqplot#1155)
        old = self.graph
        self.graph = self._new_graph(node_data, link_data,
                                     np.array([n["x"] for n in nodes], dtype=float),
                                     np.array([n["y"] for n in nodes], dtype=float),
                                     [_OTHER_CLASS if n["kind"] == "class"
                                      and n["class"] != shown else
                                      _COLOURS.get(n["kind"], "#7f7f7f") for n in nodes])
        units = [n for n in nodes if n["kind"] == "unit"]
        with self.unit_names.hold_sync():
            self.unit_names.x = np.array([n["x"] - UNIT_LABEL_GAP for n in units], dtype=float)
            self.unit_names.y = np.array([n["y"] for n in units], dtype=float)
            self.unit_names.text = [_short_unit_name(str(n["label"])) for n in units]
        self.figure.marks = [self.graph, self.unit_names]
        old.close()
        self._highlight()

    def _highlight(self) -> None:
        with self.engine.lock:            # not interleaved with a path drawn on the worker
            self._highlight_unlocked()

    def _highlight_unlocked(self) -> None:
        s = self.selection
        sel = [p for p, n in enumerate(self.nodes)
               if (n["kind"] == "neuron" and n["neuron"] == s.neuron)
               or (n["kind"] == "unit" and s.unit_ref == (n["modality"], n["unit"]))]
        self.graph.selected = sel or None

    def _on_click(self, _mark, content) -> None:
        data = content.get("data") or {}
        node_id = data.get("node_id")
        if node_id is not None:
            for p, n in enumerate(self.nodes):
                if n["id"] == node_id:
                    return self.click(p)
        if data.get("index") is not None:
            self.click(int(data["index"]))

    def click(self, position: int) -> None:
        """What a node click does (by node position)."""
        if not 0 <= position < len(self.nodes):
            return
        n = self.nodes[position]
        if n["kind"] == "unit" and self.instance != self.selection.instance:
            return                  # a unit of an earlier instance (its path still loading)
        if n["kind"] == "class":
            self.selection.select(target=int(n["class"]), neuron=-1)
        elif n["kind"] == "neuron":
            self.selection.select(neuron=int(n["neuron"]))
        elif n["kind"] == "unit":
            self.selection.select(unit=(n["modality"], int(n["unit"])))

    def click_node(self, node_id: str) -> None:
        """Click the node with this id ("class:3", "neuron:12", "unit:question:2")."""
        for p, n in enumerate(self.nodes):
            if n["id"] == node_id:
                return self.click(p)
        raise KeyError(f"No node {node_id!r} in the path; nodes are "
                       f"{[n['id'] for n in self.nodes]}.")

    def state(self) -> dict:
        return {"nodes": [{k: v for k, v in n.items()} for n in self.nodes],
                "links": [dict(l) for l in self.links], "caption": self.caption.value,
                "concepts": self.concepts.value}

    def close(self) -> None:
        if self.annotations is not None:
            self.annotations.unobserve(self._on_concepts)
        super().close()
