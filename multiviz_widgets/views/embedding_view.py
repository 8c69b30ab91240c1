"""EmbeddingView (ipyvolume): the dataset's decision-level features projected to 3-D.

Points are coloured by label, prediction or correctness, or by the activation of the selected
decision-level neuron (where in the dataset it fires); a point click selects that instance; the
selected instance is highlighted. Features and the projection come from the engine
(``Analyses.features`` / ``Analyses.projection``, computed once, with a progress bar).
"""
from __future__ import annotations

import colorsys
from typing import Callable, Sequence

import ipywidgets as W
import numpy as np

from ..engine import Analyses, Engine
from ..kernels.projection import UNKNOWN_GROUP, colour_groups
from ..selection import Selection
from ._common import (RetryAfterCancel, WrappedText, close_widgets, failure_text,
                      text_label)

PALETTE = np.array([
    [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
    [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207],
    [174, 199, 232], [255, 187, 120], [152, 223, 138], [255, 152, 150], [197, 176, 213],
], dtype=np.float32) / 255.0
CORRECTNESS = np.array([[214, 39, 40], [44, 160, 44]], dtype=np.float32) / 255.0
#: The colour of points whose label is not one of the model's classes (e.g. -1, unlabelled).
UNKNOWN = np.array([200, 200, 200], dtype=np.float32) / 255.0
#: The colour menu's entry that colours points by the selected neuron's activation.
BY_NEURON = "selected neuron"
#: A sequential scale (viridis' ends and three stops between): low activations dark violet,
#: high ones yellow; perceptually ordered and readable by the colour-blind.
SEQUENTIAL = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98],
                       [253, 231, 37]], dtype=np.float32) / 255.0


def sequential_colours(values: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] [n, 3] of ``values`` on the sequential scale from their minimum to their
    maximum (all at the scale's middle when they are equal)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
    t = (v - lo) / (hi - lo) if hi > lo else np.full(v.shape, 0.5)
    position = t * (len(SEQUENTIAL) - 1)
    k = np.minimum(position.astype(np.int64), len(SEQUENTIAL) - 2)
    frac = (position - k)[:, None]
    return (SEQUENTIAL[k] * (1 - frac) + SEQUENTIAL[k + 1] * frac).astype(np.float32)


#: Colours for classes named after a colour (easy-VQA answers "red", "teal", ...): a class
#: "red" drawn green would be misread. Each is that colour, dark or light enough to be seen on
#: white (white itself is a light grey, beside the unknown group's paler one).
NAMED_COLOURS = {name: np.array(rgb, dtype=np.float32) / 255.0 for name, rgb in {
    "red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 119, 180),
    "yellow": (230, 200, 20), "orange": (255, 127, 14), "purple": (148, 103, 189),
    "violet": (148, 103, 189), "pink": (227, 119, 194), "brown": (140, 86, 75),
    "black": (25, 25, 25), "white": (225, 225, 225), "gray": (127, 127, 127),
    "grey": (127, 127, 127), "teal": (0, 128, 128), "cyan": (23, 190, 207),
    "magenta": (200, 0, 200)}.items()}
#: a palette colour this close (RGB distance, in [0, sqrt 3]) to a named class's colour is not
#: given to another class
_TOO_CLOSE = 0.25
#: The selected point's colours, by preference (``EmbeddingView._marker``): the first that no
#: point is coloured near (a class "black" is drawn black too)
MARKERS = (("black", np.zeros(3, dtype=np.float32)),
           ("magenta", NAMED_COLOURS["magenta"]),    # a class "magenta" excludes it
           ("lime", np.array([0.0, 1.0, 0.0], dtype=np.float32)))


def _named_colours(n: int, by: str, names: Sequence[str]) -> dict[int, np.ndarray]:
    """{group: its colour} of the groups named after a colour (none when two of them would
    share one, "gray" and "grey", or for the correctness groups)."""
    if by == "correctness":
        return {}
    keys = [str(x).strip().lower() for x in names][:n]
    named = {g: NAMED_COLOURS[k] for g, k in enumerate(keys) if k in NAMED_COLOURS}
    return named if len({tuple(c) for c in named.values()}) == len(named) else {}


def _hues(k: int) -> list[np.ndarray]:
    """k colours on a continuous hue scale, red .. violet, without wrapping back to red."""
    return [np.array(colorsys.hsv_to_rgb(float(h), 0.75, 0.85), dtype=np.float32)
            for h in np.linspace(0.0, 0.85, k)]


def _colour_plan(n: int, by: str, names: Sequence[str]
                 ) -> tuple[dict[int, np.ndarray], list[np.ndarray], bool]:
    """(the named groups' colours, the palette colours free for the others, whether the others
    need a hue scale): what ``group_colours`` draws and ``colour_note`` says, decided once."""
    pal = CORRECTNESS if by == "correctness" else PALETTE
    named = _named_colours(n, by, names)
    free = [c for c in pal if all(np.linalg.norm(c - m) >= _TOO_CLOSE for m in named.values())]
    return named, free, n - len(named) > len(free)


def group_colours(n: int, by: str, names: Sequence[str] = ()) -> np.ndarray:
    """RGB in [0, 1] [n, 3] of ``n`` colour groups: a group whose name is a colour (``names``,
    say a class "red") in that colour; the others the palette's distinct colours (but those
    close to a named group's) while they suffice, else colours of a continuous hue scale
    over the group index (away from the named groups' colours when it can; neighbouring
    groups look alike): ``colour_note`` says which."""
    named, free, hues = _colour_plan(n, by, names)
    rest = n - len(named)
    if hues and not named:
        free = _hues(n)
    elif hues:                                # a hue scale for the others, away from the named
        far = [c for c in _hues(4 * rest) if all(np.linalg.norm(c - m) >= _TOO_CLOSE
                                                 for m in named.values())]
        pool = far if len(far) >= rest else _hues(rest)
        free = [pool[int(k)] for k in np.linspace(0, len(pool) - 1, rest).round()]
    others = iter(free)
    return np.array([named[g] if g in named else next(others) for g in range(n)],
                    dtype=np.float32).reshape(n, 3)


def colour_note(n: int, by: str, names: Sequence[str] = ()) -> str:
    """The legend's note on the colours ``group_colours`` gives, or "" (the palette's distinct
    colours for every group)."""
    named, free, hues = _colour_plan(n, by, names)
    if hues and named:
        return ("classes named after a colour are drawn in it; more classes than distinct "
                "colours: the others on a continuous hue scale by class index (neighbouring "
                "ones look alike)")
    if hues:
        return (f"{n} classes, more than the {len(free)} distinct colours: a continuous hue "
                "scale by class index (neighbouring classes look alike)")
    return ""


def _hex(rgb) -> str:
    r, g, b = (int(round(float(v) * 255)) for v in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


#: The legend's mark of a colour (the only part of an entry drawn in that colour).
DOT = "\u25cf"


def legend_entry(rgb, text: str) -> W.HBox:
    """One legend entry: a dot in the colour ``rgb`` and ``text`` in the normal text colour.
    The name is not drawn in its colour: a class named "red" drawn green, or a pale colour
    (yellow, light blue) on white, could not be read."""
    dot = text_label(value=DOT, style={"text_color": _hex(rgb)},
                     layout=W.Layout(margin="0 3px 0 2px"))
    name = text_label(value=str(text), layout=W.Layout(margin="0 10px 0 0"))
    entry = W.HBox([dot, name])
    entry.add_class("mvz-legend-entry")
    return entry


def legend_text(widget) -> str:
    """The text of a legend entry ("\u25cf red") or of a plain label of the legend."""
    if isinstance(widget, W.Box):
        return " ".join(getattr(w, "value", "") for w in widget.children)
    return getattr(widget, "value", "")


class EmbeddingView(W.VBox):
    """3-D scatter of the dataset; colour by label, prediction or correctness."""

    slot = "embedding"

    def __init__(self, selection: Selection, engine: Engine, analyses: Analyses,
                 colour_by: str | None = None,
                 neuron_name: Callable[[int], str] | None = None):
        """neuron_name: j -> how the legend names neuron j (e.g. with its concepts)."""
        import ipyvolume as ipv

        self.selection, self.engine, self.analyses = selection, engine, analyses
        self._neuron_name = neuron_name or (lambda j: f"h{j}")
        has_labels = analyses.dataset.labels is not None
        options = (["label", "prediction", "correctness"] if has_labels
                   else ["prediction"]) + [BY_NEURON]
        self.colour_by = W.Dropdown(options=options, value=colour_by or options[0],
                                    description="colour by", layout=W.Layout(width="240px"))
        self.coords = np.zeros((0, 3), dtype=np.float32)
        self.indices = np.zeros(0, dtype=np.int64)       # dataset index of every point
        self.groups = np.zeros(0, dtype=np.int64)
        self.group_names: list[str] = []
        self._features = None
        self._caption_tail = ""         # what follows the points' caption: instances left out
        self._rows = np.zeros(0, dtype=np.int64)        # row of every point in the features
        self.scatter = ipv.Scatter(x=np.zeros(1, np.float32), y=np.zeros(1, np.float32),
                                   z=np.zeros(1, np.float32), color="grey", size=2.0,
                                   size_selected=5.0, color_selected="black", geo="sphere")
        # created visible: an ipyvolume Scatter created hidden never draws, even once shown
        self.figure = ipv.Figure(scatters=[self.scatter], width=420, height=360)
        try:
            self.figure.xlim, self.figure.ylim, self.figure.zlim = (-1, 1), (-1, 1), (-1, 1)
        except Exception:  # noqa: BLE001 - older ipyvolume: limits are traits of another form
            pass
        self.scatter.observe(self._on_click, names="clicked_index")
        self.colour_by.observe(lambda _: self.recolour(), names="value")
        self.legend = W.HBox([], layout=W.Layout(flex_flow="row wrap"))
        self.legend_note = ""                            # says when colours are a hue scale
        self.colour_range = None                         # (neuron, lowest, highest) shown
        # wrapped, never cut (a Label cut its end at the box's width, the part that says
        # what the black point is): 56 characters fit the 440 px box
        self.caption = WrappedText(width=56)
        # a fixed width: the legend wraps inside it instead of widening the view over the path
        super().__init__([self.caption, self.colour_by, self.legend, self.figure],
                         layout=W.Layout(width="440px", flex="0 0 auto"))
        self.add_class("mvz-embedding-view")
        selection.observe(lambda _: self._highlight(), names=["instance"])
        selection.observe(lambda _: self.colour_by.value == BY_NEURON and self.recolour(),
                          names=["neuron"])
        self.retry = RetryAfterCancel(selection)
        self.on_points: list = []             # called with no argument once the points show
        self._marker_name = "black"           # the selected point's colour (_choose_marker)

    def forget(self) -> None:
        """The points shown are computed again at the next ``refresh`` (the dataset or the
        model may have changed); until then they stay on screen, not clickable. A job that
        started before (on the old features) is dropped first: its result, coming in after
        this, would bring the old points back and keep ``refresh`` from asking again."""
        self.engine.drop(self.slot)
        with self.engine.lock:
            self.indices = np.zeros(0, dtype=np.int64)
            # the colours follow the new features too (a colour chosen meanwhile waits for them)
            self._features, self._rows = None, np.zeros(0, dtype=np.int64)

    def refresh(self) -> None:
        a = self.analyses
        self.retry.asked("embedding")
        if len(self.indices):
            return self._highlight()
        self.caption.value = "computing the decision-level features of the dataset ..."

        def job(progress):
            feats = a.features(progress)
            return feats, a.projection(progress)

        self.engine.submit(self.slot, ("embedding",), job, self._show, self._failed,
                           priority=6, label="dataset features", lane="background")

    def _failed(self, err) -> None:
        # a cancel (the person's, or a background job stopped with it): asked again on the
        # next selection change
        again = self.retry.failed("embedding", self.refresh, err)
        self.caption.value = f"embedding not shown ({failure_text(err)}{again})"

    def _show(self, result) -> None:
        self._show_points(result)
        for fn in self.on_points:
            fn()

    def _show_points(self, result) -> None:
        feats, (rows, coords) = result
        self._features = feats
        self._rows = np.asarray(rows, dtype=np.int64)
        self.coords = np.asarray(coords, dtype=np.float32)
        idx = getattr(feats, "indices", None)
        idx = (np.arange(len(np.asarray(feats.h))) if idx is None
               else np.asarray(idx, dtype=np.int64))
        self.indices = idx[self._rows]
        left_out = np.setdiff1d(idx, self.indices)
        with self.scatter.hold_sync():
            self.scatter.x = self.coords[:, 0].copy()
            self.scatter.y = self.coords[:, 1].copy()
            self.scatter.z = self.coords[:, 2].copy()
        self._colour()
        tail = ""
        if len(left_out):
            tail += (f"; {len(left_out)} left out, the model's output is not finite there "
                     f"({_some(left_out)})")
        skipped = sorted(getattr(feats, "skipped", None) or {})
        if skipped:   # instances that could not be prepared, or run, or gave NaN or infinity
            by_reason: dict[str, list[int]] = {}
            for i in skipped:                 # each reason with its own instances
                by_reason.setdefault(str(feats.skipped[i]), []).append(i)
            reasons = [f"{_some(ix)}: {why}" for why, ix in list(by_reason.items())[:2]]
            more = f"; {len(by_reason) - 2} more reasons" if len(by_reason) > 2 else ""
            tail += f"; {len(skipped)} left out of the features ({'; '.join(reasons)}{more})"
        self._caption_tail = tail
        self._highlight()

    def recolour(self) -> None:
        with self.engine.lock:            # the menu (kernel's thread) vs points from the worker
            self._colour()
        self._highlight()                 # the marker's colour may change with the points'

    def _colour(self) -> None:
        self._colour_points()
        self._choose_marker()

    def _colour_points(self) -> None:
        feats = self._features
        if feats is None:
            return
        a = self.analyses
        labels = a.dataset.labels
        if labels is not None:
            labels = np.asarray(labels)[self.indices]
        preds = np.asarray(feats.logits).argmax(1) if getattr(feats, "predictions", None) is None \
            else np.asarray(feats.predictions)
        preds = np.asarray(preds)[self._rows]
        by = self.colour_by.value
        if by == BY_NEURON:
            return self._colour_by_neuron(feats)
        self.colour_range = None
        groups, group_names = colour_groups(by, labels, preds, list(a.adapter.class_names))
        unknown = group_names[-1:] == [UNKNOWN_GROUP]
        n = len(group_names) - unknown
        colours = list(group_colours(n, by, group_names[:n]))
        colours += [UNKNOWN] if unknown else []
        note = colour_note(n, by, group_names[:n])
        self.groups, self.group_names = groups, group_names
        self.scatter.color = np.array(colours, dtype=np.float32)[self.groups] if len(groups) \
            else np.zeros((0, 3), np.float32)
        old = self.legend.children
        self.legend.children = ([text_label(value=note)] if note else []) + [
            legend_entry(colours[g], name) for g, name in enumerate(self.group_names)]
        self.legend_note = note
        close_widgets(old)                    # the labels replaced (each holds comms)

    def _colour_by_neuron(self, feats) -> None:
        """Points coloured by the selected neuron's activation h_j(x) (grey: none selected)."""
        j = self.selection.neuron
        h = np.asarray(feats.h)
        old = self.legend.children
        self.groups, self.group_names = np.zeros(0, dtype=np.int64), []
        self.legend_note = ""
        if not 0 <= j < (h.shape[1] if h.ndim == 2 else 0):
            self.colour_range = None
            self.scatter.color = np.tile(UNKNOWN, (len(self._rows), 1)).astype(np.float32)
            # two labels, each narrower than the view: the legend wraps between them (a label
            # does not wrap its text, it cuts it)
            self.legend.children = [text_label(value="click a neuron (a bar or a path node)"),
                                    text_label(value="to colour the dataset by its activation")]
        else:
            values = h[self._rows, j].astype(np.float64)
            self.scatter.color = sequential_colours(values)
            lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 0.0)
            self.colour_range = (j, lo, hi)
            name = self._neuron_name(j)
            self.legend.children = (
                [text_label(value=f"activation of {name}:"),
                 legend_entry(SEQUENTIAL[0], f"{lo:.3g} (lowest)"),
                 legend_entry(SEQUENTIAL[-1], f"{hi:.3g} (highest)")]
                if hi > lo else
                [text_label(value=f"{name} is {lo:.3g} on every instance shown (a constant neuron)")])
        close_widgets(old)

    def _choose_marker(self) -> None:
        """The selected point's colour, chosen when the points are coloured (not at each
        selection): black, unless a point is coloured near it (a class "black": the marker
        could not be told from it), then the first of MARKERS that no point's colour is near;
        its name (``_marker_name``) is the caption's."""
        colours = self.scatter.color
        drawn = (np.unique(np.round(np.asarray(colours, dtype=np.float32).reshape(-1, 3), 2),
                           axis=0) if not isinstance(colours, str) else np.zeros((0, 3)))
        name, rgb = next(((n, c) for n, c in MARKERS if not len(drawn) or float(
            np.sqrt(((drawn - c) ** 2).sum(1)).min()) > _TOO_CLOSE), MARKERS[0])
        css = "#" + "".join(f"{int(round(float(v) * 255)):02x}" for v in rgb)
        if self.scatter.color_selected != css:
            self.scatter.color_selected = css
        self._marker_name = name

    def _highlight(self) -> None:
        with self.engine.lock:            # not interleaved with points drawn on the worker
            rows = np.nonzero(self.indices == self.selection.instance)[0]
            self.scatter.selected = [int(r) for r in rows[:1]] or None
            if self._features is not None:          # the points' caption, once they are shown
                shown = (f"the {self._marker_name} one is the instance shown" if len(rows) else
                         f"the instance shown, #{self.selection.instance}, is not among them")
                self.caption.value = (f"{len(self.coords)} instances, placed by their "
                                      f"decision-level neurons' activations, projected to 3-D "
                                      f"(PCA: the three directions along which they vary "
                                      f"most; click a point; {shown}){self._caption_tail}")

    def _on_click(self, change) -> None:
        row = change["new"]
        if row is None:
            return
        self.click_point(int(row))
        self.scatter.clicked_index = None     # so a second click on the same point fires again

    def click_point(self, row: int) -> None:
        """What a point click does: select that instance (``row`` = point position)."""
        if not 0 <= row < len(self.indices):
            return
        self.selection.select(instance=int(self.indices[row]))

    def state(self) -> dict:
        with self.engine.lock:            # not while the points of a recompute arrive
            sel, indices = self.scatter.selected, self.indices
            row = None if sel is None or len(sel) == 0 else int(np.asarray(sel).reshape(-1)[0])
            selected = int(indices[row]) if row is not None and row < len(indices) else None
        return {"n_points": int(len(self.coords)), "colour_by": self.colour_by.value,
                "selected": selected,
                "groups": self.group_names, "legend_note": self.legend_note,
                "colour_range": None if self.colour_range is None else list(self.colour_range),
                "legend": [legend_text(w) for w in self.legend.children]}


def _some(indices) -> str:
    """'#3, #8, ...': the first five instance numbers of a list."""
    return ", ".join(f"#{int(i)}" for i in list(indices)[:5]) + (" ..." if len(indices) > 5 else "")
