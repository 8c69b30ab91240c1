"""HeatmapView (bqplot): the unit x unit interaction matrix of two modalities.

Rows are the units of modality a, columns those of modality b (``Interaction.matrix``). A cell
click selects the row's unit (and so the InputView shows that unit's interactions); the row
(or column) of the selected unit is outlined. The pair follows the selection's ``pair`` when
it has one (the Explorer's pair menu). Hovering a cell shows the full names of its two units
and its value. Cells the method did not compute (the units that are not Shapley players) are
grey, and a note above the matrix says which units are players. The view only encodes: the
matrix comes from the engine (``Analyses.interaction``).
"""
from __future__ import annotations

import math
import numbers

import anywidget
import bqplot as bq
import ipywidgets as W
import numpy as np
import traitlets

from ..adapter import class_name
from ..display_text import and_list, quoted
from ..engine import Analyses, Cancelled, Engine, left_out_text
from ..selection import Selection
from .input_view import STATIC, check_bundle, esm_of
from ..results import computed_units
from ._common import (PATCH_NAMES, RetryAfterCancel, WrappedText, colour_limit, failure_text,
                      method_label, names_patches, text_label)


#: Longest tick label (characters) on the heatmap's axes; longer unit names are cut in the
#: middle, keeping their end (a series window "…t16-23", a patch's column).
TICK_CHARS = 14
#: At most this many tick labels along the columns (rotated: about 20 px apart) and the rows.
MOST_COL_TICKS = 16
MOST_ROW_TICKS = 20
#: Blue (negative) .. white (0) .. red (positive): ColorBrewer RdBu, reversed, with a white
#: middle so that a zero cell reads as "no interaction" and the grey of a cell not computed
#: stands apart. Given as a list (not scheme="RdBu", reverse=True): bqplot's ``reverse`` turns
#: the colour bar's axis upside down (negative at the top) instead of the colours.
COLOURS = ["#053061", "#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#ffffff",
           "#fddbc7", "#f4a582", "#d6604d", "#b2182b", "#67001f"]
#: The colour of a cell the method did not compute. Such cells are the grid's ``selected``
#: ones, filled by ``selected_style``: bqplot's ``null_color`` is unreachable from Python (a NaN
#: cell is sent as NaN, not null, and drawn black).
NOT_COMPUTED = "#c8c8c8"
#: At most this many rows and this many columns are drawn: bqplot draws an SVG rectangle and a
#: text per cell, and 2,000 audio windows x 128 words (256,000 cells) froze the page for a
#: minute at every new matrix. A larger side shows its units of strongest interaction.
MOST_SHOWN = 64
#: What a coalition is, for the note of an exact Shapley matrix.
COALITIONS = " (a coalition: a set of players kept, the others removed)"
#: Units of a modality kind, for the players note: (one, several).
UNIT_WORDS = {"image": ("patch", "patches"), "text": ("word", "words"),
              "tabular": ("column", "columns"), "timeseries": ("unit", "units")}


def _unique(labels: list[str]) -> list[str]:
    """``labels`` made distinct: a label seen before gets the first suffix " (2)", " (3)", ...
    that makes it a label neither given nor made already (["a", "a", "a (2)"] -> "a", "a (3)",
    "a (2)"): the labels are an ordinal scale's domain, where two equal ones are one tick."""
    taken = set(labels)
    used: set[str] = set()
    count: dict[str, int] = {}
    out = []
    for lab in labels:
        name = lab
        if lab in used:
            n = count.get(lab, 1)
            while name in used or name in taken:
                n += 1
                name = f"{lab} ({n})"
            count[lab] = n
        used.add(name)
        out.append(name)
    return out


def common_prefix(labels: list[str]) -> str:
    """The words (up to a space) that every one of two or more labels starts with, when each
    label has more after them: "patch " of "patch r0c0", "patch r0c1", ...; else ""."""
    if len(labels) < 2:
        return ""
    first, last = min(labels), max(labels)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    prefix = first[:first.rfind(" ", 0, n) + 1]
    return prefix if prefix.strip() and all(len(lab) > len(prefix) for lab in labels) else ""


def shorten(label: str, most: int = TICK_CHARS) -> str:
    """``label`` cut in the middle to at most ``most`` characters, keeping its end: its last
    word when that is short ("respiration t16-23" -> "respir… t16-23"), else its last few
    characters. A label of at most ``most`` characters is returned as it is."""
    if len(label) <= most:
        return label
    cut = label.rfind(" ")
    tail = label[cut:] if 0 < cut and len(label) - cut <= most - 4 else ""
    if not tail:
        tail = label[len(label) - (most - 1) // 2:]
    return label[:most - 1 - len(tail)].rstrip() + "\u2026" + tail


def tick_labels(labels: list[str], n: int) -> list[str]:
    """``n`` distinct tick labels: the (shortened, deduplicated) unit names, then blank padding
    ("", " ", ...) for the rows or columns that are drawn but not data. A prefix common to all
    the names ("patch ") is left out, and a long name keeps its end ("respir… t16-23"): the part
    that tells the units apart. Hovering a cell shows the full names.

    They are the ordinal scale's domain itself, so the axis always shows the words of the matrix
    it draws: bqplot redraws the ticks when the domain changes, but a change of ``tick_labels``
    is overwritten by a pending domain transition with the previous labels. The domain is set
    explicitly, since bqplot keeps a data-driven ordinal domain whose set of values is unchanged
    in its old order.
    """
    names = [str(lab) for lab in labels[:n]]
    drop = len(common_prefix(names))
    out = _unique([shorten(lab[drop:]) for lab in names])
    pad = ""
    while len(out) < n:
        while pad in out:
            pad += " "
        out.append(pad)
    return out


def num_ticks(n: int, most: int) -> int | None:
    """bqplot's ``num_ticks`` for an ordinal axis of ``n`` labels showing at most about
    ``most``: None (every label) when they fit. bqplot then labels every k-th one, k =
    n // (num_ticks - 1); k divides n when it can (64 patches: every 8th, one per patch row)."""
    if n <= most:
        return None
    need = math.ceil(n / most)
    step = next((s for s in range(need, 2 * need) if n % s == 0), need)
    return n // step + 1


def _plural(k: int, words: tuple[str, str]) -> str:
    return words[0] if k == 1 else words[1]


#: a sampled Shapley matrix whose estimated relative error reaches this is called mostly noise
NOISY = 0.5


def _count(value) -> int | None:
    """value as an int when it is a whole number (numpy's too), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def shapley_estimate_note(params) -> str:
    """Words saying whether Shapley interactions are exact or sampled, and how noisy a sample
    is (``params["relative_noise"]``: the estimated error of the mean of two independent halves
    of the sample, relative to its size); "" for the other methods (their params have no
    ``approximator``)."""
    if not isinstance(params, dict) or not isinstance(params.get("approximator"), str):
        return ""
    players = params.get("players")
    n = None
    if isinstance(players, dict) and all(isinstance(v, (list, tuple, range))
                                         for v in players.values()):
        n = sum(len(v) for v in players.values())
    if params.get("exact") or params["approximator"] == "ExactComputer":
        return (f"Exact: all {2 ** n:,} coalitions of the {n} players{COALITIONS}." if n
                else f"Exact: every coalition of the players{COALITIONS}.")
    used = _count(params.get("coalitions"))
    used = used if used is not None else _count(params.get("budget"))
    text = (f"Estimated from {used:,} sampled coalitions" if used is not None
            else "Estimated from sampled coalitions") + f" ({params['approximator']})"
    noise = params.get("relative_noise")
    noise = (float(noise) if isinstance(noise, numbers.Real) and not isinstance(noise, bool)
             else None)
    if noise is not None and math.isinf(noise):
        text += ("; two independent halves of the sample cancel out: the estimate is noise. "
                 "Raise the budget or lower max_players.")
    elif noise is not None and math.isfinite(noise):
        text += (f"; its error, estimated from two independent halves of the sample, is about "
                 f"{noise:.0%} of the matrix's size: "
                 + ("trust its strongest cells, not the weak ones." if noise < NOISY else
                    "read it as mostly noise, and raise the budget or lower max_players."))
    else:
        text += "; its noise is not measured: compare with another seed or a larger budget."
    if params.get("underdetermined"):
        text += (" Too few coalitions for the terms it fits: the estimate is unreliable "
                 "(Explorer(..., method_params={'shapley': {'budget': ...}}) raises it).")
    return text


_ESM_PATH = STATIC / "cell_tip.js"


class CellTip(anywidget.AnyWidget):
    """The heatmap's hover tooltip: ``tip`` = {"row", "col", "text"}, the text the kernel wrote
    for cell (row, col) (bqplot's rowNum, columnNum); {} for none. The browser shows it only
    while that cell is the one hovered (js/cell_tip.js)."""

    _esm = esm_of(_ESM_PATH)
    tip = traitlets.Dict().tag(sync=True)

    def __init__(self, **kwargs):
        check_bundle(_ESM_PATH, "CellTip")
        super().__init__(**kwargs)
        self.add_class("mathjax_ignore")          # a "$" in a unit's name stays a "$"

    @property
    def value(self) -> str:
        """The text of the cell hovered last ("" for none)."""
        return str(self.tip.get("text", ""))

    def show(self, row: int, col: int, text: str) -> None:
        self.tip = {"row": int(row), "col": int(col), "text": str(text)}


def combination_text(kind, class_names) -> str:
    """One line on how the modalities combine at an instance, from ``Analyses.interaction_type``
    (M2Lens' words: dominance, complement, conflict; or undecided): the model's prediction, what
    each modality alone predicts (with the others' inputs averaged over the reference
    instances) and what their effects added up (EMAP) predict. Names from data (classes,
    modalities) are quoted and shown as text."""
    def name(c) -> str:
        if c is None:
            return "no class (a tie)"
        return quoted(class_name(class_names, c))
    c, label, alone = kind["predicted"], kind["label"], kind["unimodal_predictions"]
    predicted = name(c)
    if label == "dominance":
        why = (f"The model predicts {predicted}; on its own, {quoted(kind['dominant'])} already "
               "does")
    elif label == "complement":
        agreeing = [m for m, v in alone.items() if v == c]
        if len(agreeing) == len(alone):
            who = "so does each modality on its own, and so do their effects added up"
        elif agreeing:
            who = (f"so do {and_list(map(quoted, agreeing))} on their own, and their effects "
                   "added up")
        else:
            who = "no modality on its own does, their effects added up do"
        why = f"The model predicts {predicted}; {who}"
    elif label == "conflict":
        emap = kind["emap_prediction"]
        why = (f"The model predicts {predicted}; added up, the modalities' separate effects "
               + ("would pick no class (a tie)" if emap is None else
                  f"would predict {name(emap)}")
               + ": their interaction decides")
    else:
        why = "The model's top two classes tie: there is no prediction to explain"
    parts = [f"{quoted(m)} alone {'predicts ' if k == 0 else ''}{name(v)}"
             for k, (m, v) in enumerate(alone.items())]
    each = and_list(parts)
    others = "the other modality's input" if len(alone) == 2 else "the other modalities' inputs"
    n, left = kind["reference_size"], int(kind.get("reference_left_out", 0) or 0)
    reasons = kind.get("reference_left_out_why") or {"output": left}
    out = f" ({left} more left out: {left_out_text(reasons)})" if left else ""
    return (f"How the modalities combine: {label}. {why} (with {others} averaged over {n} "
            f"instances of the dataset{out}, {each}).")


class HeatmapView(W.VBox):
    """Interaction matrix of ``pair`` = (rows modality, columns modality); cells clickable.

    ``pair`` is that of the matrix shown; a new one (the selection's ``pair``) is drawn when its
    matrix arrives."""

    slot = "heatmap"

    def __init__(self, selection: Selection, engine: Engine, analyses: Analyses,
                 pair: tuple[str, str]):
        self.selection, self.engine, self.analyses = selection, engine, analyses
        self.pair = (str(pair[0]), str(pair[1]))
        self.matrix = np.zeros((0, 0))
        self.row_labels: list[str] = []
        self.col_labels: list[str] = []
        self.computed: np.ndarray | None = None   # bool [rows, cols]: None = every cell
        self.method = ""                          # the method of the matrix shown
        # the units of the rows and columns drawn (None: all, in order; see MOST_SHOWN)
        self.row_units: np.ndarray | None = None
        self.col_units: np.ndarray | None = None
        self.selected_row = -1
        self.selected_col = -1
        self.instance = -1                    # the instance whose matrix is shown
        self._shown_shape = (2, 2)            # the grid drawn: the matrix and its padding
        self.rows_scale = bq.OrdinalScale()             # its domain: the rows, top one last
        self.cols_scale = bq.OrdinalScale()
        self.color_scale = bq.ColorScale(colors=COLOURS, mid=0.0)
        # the hover tooltip: the full names of the cell's two units and its value, written
        # from Python on bqplot's hover message (the tick labels are shortened), shown by the
        # browser only over the cell it is for (CellTip)
        self.tip = CellTip()
        self._hovered: tuple[int, int] | None = None     # (rowNum, columnNum) hovered last
        self.grid = bq.GridHeatMap(
            color=np.zeros((2, 2)),
            scales={"row": self.rows_scale, "column": self.cols_scale, "color": self.color_scale},
            # no "select" interaction: with it bqplot's GridHeatMap never sends element_click
            # to Python (checked in Chromium); the selected row is outlined from Python instead
            interactions={"hover": "tooltip"}, tooltip=self.tip,
            tooltip_style={"opacity": 0.95, "padding": "2px 6px"},
            # "selected" cells: those not computed, in grey (the selected unit's row is
            # outlined instead: a black border on each of its 64 narrow cells hid their values)
            selected_style={"fill": NOT_COMPUTED}, unselected_style={},
            stroke="white", null_color="white")
        self.grid.on_element_click(self._on_click)
        self.grid.on_hover(self._on_hover)
        # one outline around the selected row (or column): a rectangle on linear scales whose
        # unit is one cell (the figure and these scales unpadded, so that they meet the grid's)
        self.outline_x = bq.LinearScale(min=0.0, max=2.0, allow_padding=False)
        self.outline_y = bq.LinearScale(min=0.0, max=2.0, allow_padding=False)
        self.outline = bq.Lines(x=[0.0, 1.0], y=[0.0, 1.0], visible=False,
                                scales={"x": self.outline_x, "y": self.outline_y},
                                colors=["#111111"], stroke_width=2.5, apply_clip=False,
                                interactions={}, enable_hover=False)
        # no axis line left of the rows: the cells' edge is one, and d3 ends the line with an
        # outer tick that reads as a stray "-" above the first row (the colour is the line's
        # and, unless tick_style says otherwise, the labels')
        self.row_axis = bq.Axis(scale=self.rows_scale, side="left", label=self.pair[0],
                                label_offset="40px", color="transparent",
                                tick_style={"fill": "var(--bq-axis-tick-text-fill)"})
        # rotated labels end at their tick and hang below the axis (text-anchor end; the CSS
        # transform moves the end under the tick), never over the cells
        self.col_axis = bq.Axis(scale=self.cols_scale, label=self.pair[1], tick_rotate=-45,
                                label_offset="75px",
                                tick_style={"text-anchor": "end",
                                            "transform": "translate(-12px, 2px) rotate(-45deg)"})
        # -lim, -lim/2, 0, lim/2, lim with enough digits that no two ticks of the colour bar read
        # the same ("1e+1, 1e+1, 8"); bqplot's bar is the plot's height less 200 px, its title
        # above it and its ticks right of it, inside the right margin
        self.color_axis = bq.ColorAxis(scale=self.color_scale, side="right", tick_format=".3~g",
                                       num_ticks=5, label="interaction")
        self.figure = bq.Figure(marks=[self.grid, self.outline],
                                axes=[self.row_axis, self.col_axis, self.color_axis],
                                fig_margin={"top": 20, "bottom": 100, "left": 130, "right": 140},
                                padding_x=0.0, padding_y=0.0,
                                layout=W.Layout(width="610px", height="430px"))
        self.caption = text_label(value="")
        # how the modalities combine at the instance (its interaction type), under the caption
        self.combination = WrappedText(layout=W.Layout(width="600px"))
        self.combination_label = ""           # the type shown ("" while none is)
        self._combination_asked: int | None = None
        # what the grey cells are (Shapley players), above the matrix; what the colours mean,
        # below it (text in wrapped lines: a Label cuts its text)
        self.note = WrappedText(layout=W.Layout(width="600px"))
        self.legend = WrappedText(layout=W.Layout(width="600px"))
        self._set_legend("")
        self._set_note("")
        super().__init__([self.caption, self.combination, self.note, self.figure, self.legend],
                         layout=W.Layout(width="616px", flex="0 0 auto"))  # figure + margins
        self.add_class("mvz-heatmap-view")
        selection.observe(lambda _: self.refresh(), names=["instance", "target", "neuron",
                                                          "interaction_method", "pair"])
        selection.observe(lambda _: self._highlight(), names=["modality", "unit"])
        self.retry = RetryAfterCancel(selection)

    # -- requests ------------------------------------------------------------------------------
    def wanted_pair(self) -> tuple[str, str]:
        """The pair asked for: the selection's, else the one given at construction."""
        return tuple(self.selection.pair or self.pair)

    def refresh(self) -> None:
        s = self.selection
        i, target, neuron, method = s.instance, s.target, s.neuron, s.interaction_method
        a, pair = self.analyses, self.wanted_pair()
        self.retry.asked("matrix")

        def job(progress):
            explained = a.explained(i, target, neuron)
            inter = a.interaction(i, explained, method, pair, progress)
            return i, explained, inter, a.target_text(explained, i)

        with self.engine.lock:     # the caption not overwritten by a result applied meanwhile
            self.caption.value = f"computing {method_label(method)} {pair[0]} x {pair[1]} ..."
            self.engine.submit(self.slot, ("heatmap", i, target, neuron, method, pair), job,
                               self._show, lambda err: self._failed(err, i, pair), priority=2,
                               label=f"{method} interactions")
        self._refresh_combination()

    def _refresh_combination(self) -> None:
        """Ask for the instance's interaction type: once per instance (the method, target and
        pair do not change it) and cache (a recompute asks again), after the click's other
        jobs. A click's job (the main lane: the cancel button stops it), last in its lane, that
        gives way to any later click's job (``Engine.submit``'s ``yields``: its N^2 pairs,
        thousands of full passes for a model that does not split, would hold up a change of
        target or method); the dataset's features, in the other lane, never wait for it."""
        i, a = self.selection.instance, self.analyses
        with self.engine.lock:
            asked = (i, self.engine.cache_epoch)
            if asked == self._combination_asked:
                return
            self._combination_asked = asked
        self.retry.asked("combination")
        if not a.interaction_type_references():      # none wanted, or none to say: no line
            missing = a.interaction_type_missing()      # ... or a dataset too small: said
            self._set_combination("", missing and "How the modalities combine: not computed "
                                                  f"({missing})")
            return

        def job(progress):
            try:
                return i, a.interaction_type(i, progress), None
            except Cancelled:
                raise
            except Exception as err:  # noqa: BLE001 -- said on its own line (below)
                # a line beside the matrix, not the page's error: a model that is not finite
                # on one reference instance would otherwise hide the error that matters there
                return i, None, err

        with self.engine.lock:
            self._set_combination("", f"How the modalities combine at #{i}: computing ...")
            self.engine.submit("interaction_type", None, job, self._show_combination,
                               lambda err: self._combination_failed(err, i), priority=9,
                               label="how the modalities combine", yields=True)

    def _set_combination(self, label: str, text: str) -> None:
        self.combination_label = label
        self.combination.value = text

    def _show_combination(self, result) -> None:
        i, kind, err = result
        if err is not None:           # said; asked again for another instance or a recompute
            self._say_not_computed(err, i)
            return
        # (never None: _refresh_combination asks only where a line is wanted)
        self._set_combination(str(kind["label"]),
                              combination_text(kind, self.analyses.adapter.class_names))

    def _combination_failed(self, err, i: int) -> None:
        """A cancel (or the engine's own failure): asked again at the next click."""
        self._combination_asked = None
        self._say_not_computed(err, i, self.retry.failed("combination",
                                                          self._refresh_combination, err))

    def _say_not_computed(self, err, i: int, again: str = "") -> None:
        # whole (the page's banner, which shows a failure whole, does not show this one)
        text = " ".join(str(err).split())
        said = type(err).__name__ + (f": {text}" if text and not again else "")
        self._set_combination("", f"How the modalities combine at #{i}: not computed "
                                  f"({said}{again})")

    def _failed(self, err, instance: int | None = None,
                pair: tuple[str, str] | None = None) -> None:
        """Blank the matrix (nothing of an earlier selection stays shown or clickable): the
        axes name the pair asked for (``pair``, else the one wanted now), and no legend speaks
        of the previous matrix's method and target."""
        self.instance = -1
        self.pair = tuple(str(m) for m in (pair or self.wanted_pair()))
        self.row_axis.label, self.col_axis.label = self.pair
        self.row_units = self.col_units = None
        self._draw(np.zeros((0, 0)), [], [])
        self._set_note("")
        self.legend_text = self.legend.value = ""
        of = "" if instance is None else f" of #{instance}"
        again = self.retry.failed("matrix", self.refresh, err)
        self.caption.value = f"interactions{of} not shown ({failure_text(err)}{again})"

    def _show(self, result) -> None:
        i, explained, inter, what = result        # what: the target, said at this instance
        self.instance = int(i)
        self.pair = tuple(str(m) for m in (getattr(inter, "modalities", None) or self.pair))
        self.row_axis.label, self.col_axis.label = self.pair     # (a failure may have set others)
        m = np.asarray(inter.matrix, dtype=np.float64)
        params = getattr(inter, "params", None) or {}
        self.method = str(inter.method)
        computed, note = self._players(params, m.shape, inter.method)
        rows, cols, labels, shown_note = self._strongest(m, computed, inter.row_labels,
                                                         inter.col_labels)
        if rows is not None or cols is not None:
            cut = np.ix_(np.arange(m.shape[0]) if rows is None else rows,
                         np.arange(m.shape[1]) if cols is None else cols)
            m = m[cut]
            computed = None if computed is None else computed[cut]
        self.row_units, self.col_units = rows, cols
        self._draw(m, *labels, computed)
        # the kernel's own note (second-order gradients blind to a piecewise-linear model)
        # first: it says the whole matrix cannot be read as it looks
        kernel_note = params.get("note") if isinstance(params.get("note"), str) else ""
        self._set_note(" ".join(part for part in (kernel_note, note, shown_note,
                                                  shapley_estimate_note(params)) if part))
        target = self.analyses.target_text(explained)
        self._set_legend(target, grey=computed is not None, method=inter.method)
        self.caption.value = (f"{method_label(inter.method)} {self.pair[0]} x {self.pair[1]} "
                              f"for {what}")
        if names_patches([*inter.row_labels, *inter.col_labels]):
            self.legend_text += f" {PATCH_NAMES[0].upper()}{PATCH_NAMES[1:]}."
            self.legend.value = self.legend_text

    # -- the units drawn ------------------------------------------------------------------------
    def _strongest(self, m: np.ndarray, computed: np.ndarray | None, row_labels, col_labels):
        """(row units, column units, (row labels, column labels), note): for a side of more
        than MOST_SHOWN units, its MOST_SHOWN units of strongest interaction (largest |value|
        in their row or column, cells not computed counting 0), in their order, the selected
        unit among them; None for a side drawn whole."""
        strength = np.where(np.isfinite(m), np.abs(m), 0.0)
        if computed is not None:
            strength = np.where(computed, strength, 0.0)
        s = self.selection
        kept, parts, cut = [], [], []
        for axis, (modality, labels) in enumerate(zip(self.pair, (row_labels, col_labels))):
            n = m.shape[axis]
            if n <= MOST_SHOWN:
                kept.append(None)
                continue
            score = strength.max(axis=1 - axis) if strength.size else np.zeros(n)
            most = MOST_SHOWN
            if computed is not None:         # units with no cell computed: not drawn at all,
                has = computed.any(axis=1 - axis)          # and ranked after every unit with
                score = np.where(has, score, -1.0)         # one (whose cells may all be 0)
                most = max(1, min(MOST_SHOWN, int(has.sum())))
            order = np.argsort(-score, kind="stable")
            chosen = list(order[:most])
            added = (s.unit_ref is not None and s.modality == modality and 0 <= s.unit < n
                     and s.unit not in chosen)
            if added:                                     # the selected unit stays drawn:
                if most < MOST_SHOWN:                     # beside every unit computed
                    chosen.append(s.unit)
                else:                                     # in place of the weakest
                    chosen[-1] = s.unit
            kept.append(np.sort(np.asarray(chosen, dtype=np.int64)))
            one, many = self._unit_words(modality)
            kind = "computed" if most < MOST_SHOWN else "strongest"
            if kind == "strongest":
                cut.append(axis)
            shown = len(chosen) - int(added)           # the selected unit is said apart
            parts.append((kind, f"the {shown} of the {n} {_plural(n, (one, many))}", added))
        labels = [list(lab) if k is None else [str(lab[int(u)]) if int(u) < len(lab) else
                                               str(int(u)) for u in k]
                  for k, lab in zip(kept, (row_labels, col_labels))]
        said = []
        for kind, words in (("computed", " with cells computed"),
                            ("strongest", " with the strongest interactions")):
            mine = [p for p in parts if p[0] == kind]
            if mine:
                said.append(" and ".join(text for _, text, _ in mine) + words
                            + (" and the unit selected" if any(a for *_, a in mine) else ""))
        where = " or ".join(("row", "column")[axis] for axis in cut)
        why = (f" (the largest |value| in their {where}, in their order; the others are left "
               "out: every cell of so large a matrix would take the browser minutes to draw)"
               if cut else "")
        others = "; the others have no cell computed" if len(said) == 1 and not cut else ""
        note = ("" if not parts else
                f"Drawn: {', and '.join(said)}{why}{others}. Click a unit in the input view to "
                f"see all its interactions there.")
        return kept[0], kept[1], labels, note

    def _position(self, units: np.ndarray | None, unit: int, n: int) -> int:
        """Where unit ``unit`` is drawn among ``n`` rows (or columns) showing ``units``; -1
        when it is not drawn."""
        if units is None:
            return unit if 0 <= unit < n else -1
        at = int(np.searchsorted(units, unit))
        return at if at < len(units) and units[at] == unit else -1

    # -- Shapley players -----------------------------------------------------------------------
    def _unit_words(self, modality: str) -> tuple[str, str]:
        try:
            kind = self.analyses.adapter.modalities[modality].kind
        except Exception:  # noqa: BLE001 - an adapter without modality kinds: "units"
            kind = ""
        one, many = UNIT_WORDS.get(kind, ("unit", "units"))
        return f"{modality} {one}", f"{modality} {many}"

    def _players(self, params: dict, shape, method: str = "shapley"
                 ) -> tuple[np.ndarray | None, str]:
        """(computed, note): which cells the method computed (None: all of them) and the words
        saying so, from ``params["players"]`` (Shapley's max_players) or ``params["units"]``
        (pairwise ablation's units=) when some units of the pair are left out; their cells are
        0 in the matrix."""
        sides = computed_units(params, self.pair, shape)
        if sides is None or all(len(idx) == n for idx, n in zip(sides, shape)):
            return None, ""
        computed = np.zeros(shape, dtype=bool)
        computed[np.ix_(sides[0], sides[1])] = True
        shapley = method == "shapley"
        how = "of largest occlusion effect" if shapley else "chosen (units=)"
        parts = []
        for modality, idx, n in zip(self.pair, sides, shape):
            words = self._unit_words(modality)
            parts.append(f"all {n} {_plural(n, words)}" if len(idx) == n else
                         f"the {len(idx)} of the {n} {_plural(n, words)} {how}")
        if shapley:
            most = params.get("max_players")
            most = f" (at most {most} players)" if isinstance(most, (int, np.integer)) else ""
            note = (f"Shapley interactions are computed only between the players: {parts[0]} "
                    f"and {parts[1]}{most}.")
        else:
            note = (f"{method_label(method)[:1].upper()}{method_label(method)[1:]} is computed "
                    f"only between {parts[0]} and {parts[1]}.")
        note += " The grey cells, of the other units, are not computed (0 in the matrix)."
        if any("occlusion" in p for p in parts):
            note += (" A unit's occlusion effect: how much the output changes when that unit "
                     "alone is removed.")
        return computed, note

    def _set_note(self, text: str) -> None:
        self.note_text = text
        self.note.value = text

    def _set_legend(self, target: str, grey: bool = False, method: str | None = None) -> None:
        """What the colours mean. Pairwise ablation and Shapley interactions remove units: a
        positive cell means the two units together raise the explained output more than the sum
        of their separate effects. Second-order gradients are the mixed second derivative at
        the input, along each unit's direction: a local curvature, whose sign can differ from
        theirs (along a patch's or a column's own direction it does not depend on the sign of
        the unit's values; embedded tokens move along x - baseline, so for them it does)."""
        of = f" ({target})" if target else ""
        if method == "second_order":
            meaning = (
                f"Colour: the second-order gradient of the row's unit with the column's unit, "
                f"at this input. Red: increasing the two units together raises the explained "
                f"output{of} more than increasing each alone would; blue: less; white: no "
                f"interaction. It is a local curvature: its sign can differ from pairwise "
                f"ablation's and Shapley's, which remove the units.")
        else:
            meaning = (
                f"Colour: the interaction of the row's unit with the column's unit. Red: they "
                f"reinforce each other (together they raise the explained output{of} more than "
                f"the sum of their separate effects); blue: they counteract each other "
                f"(together less than that sum); white: no interaction.")
        self.legend_text = (
            meaning
            + (" Grey: not computed." if grey else "")
            + " Hover a cell for its units' full names.")
        self.legend.value = self.legend_text

    # -- drawing -------------------------------------------------------------------------------
    def _draw(self, m: np.ndarray, row_labels, col_labels,
              computed: np.ndarray | None = None) -> None:
        self.matrix = m
        self.tip.tip = {}                 # no text of the previous matrix over the new one
        self.row_labels = [str(x) for x in row_labels]
        self.col_labels = [str(x) for x in col_labels]
        finite = np.isfinite(m)
        if not finite.all():                      # a kernel's NaN: grey too, never "0"
            computed = finite if computed is None else computed & finite
        self.computed = computed
        rows, cols = m.shape
        # bqplot squeezes a single row or column to 1-D: pad with an empty one (0: white, on the
        # white stroke); no matrix: a blank (all 0) 2 x 2 grid. Never NaN: bqplot draws it black.
        shown = np.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0) if m.size else np.zeros((2, 2))
        if rows == 1:
            shown = np.vstack([shown, np.zeros((1, shown.shape[1]))])
        if cols == 1:
            shown = np.hstack([shown, np.zeros((shown.shape[0], 1))])
        self._shown_shape = shown.shape
        row_ticks = tick_labels(self.row_labels, shown.shape[0])
        col_ticks = tick_labels(self.col_labels, shown.shape[1])
        # The scales and the grid are separate widgets, so the browser gets their changes one
        # after the other: a grid row (or column) missing from its scale's domain meanwhile is
        # placed at "undefined" (a console error per row). Each domain first holds the old and
        # the new ticks, and is cut to the new ones after the grid has them.
        for scale, ticks in ((self.rows_scale, row_ticks[::-1]), (self.cols_scale, col_ticks)):
            new = set(ticks)
            scale.domain = list(ticks) + [t for t in (scale.domain or []) if t not in new]
        with self.grid.hold_sync():
            self.grid.selected = None
            self.grid.row = None
            self.grid.column = None
            self.grid.color = shown
            self.grid.row = np.array(row_ticks, dtype=str)
            self.grid.column = np.array(col_ticks, dtype=str)
            grey = np.argwhere(~computed) if computed is not None else np.zeros((0, 2))
            self.grid.selected = grey.astype(np.int32) if len(grey) else None
            values = m[computed] if computed is not None else m
            lim = colour_limit(values) or 1.0
            self.color_scale.min, self.color_scale.max = -lim, lim
        self.rows_scale.domain = row_ticks[::-1]         # row 0 at the top
        self.cols_scale.domain = col_ticks
        # the row axis title clear of the longest row label (about 7 px a character); the
        # columns' title below their rotated labels (about 4.6 px down a character)
        longest = max((len(t) for t in row_ticks), default=1)
        self.row_axis.label_offset = f"{min(7 * longest + 20, 122)}px"
        longest = max((len(t) for t in col_ticks), default=1)
        self.col_axis.label_offset = f"{min(round(4.6 * longest) + 26, 92)}px"
        self.col_axis.num_ticks = num_ticks(cols, MOST_COL_TICKS)
        self.row_axis.num_ticks = num_ticks(rows, MOST_ROW_TICKS)
        self._highlight()
        # a pointer resting on a cell gets no new hover when the cells are redrawn in place:
        # the last hovered cell's new text (the browser shows it only if still over that cell)
        hovered = self._hovered
        if hovered is not None and hovered[0] < rows and hovered[1] < cols:
            self.tip.show(*hovered, self.cell_text(*hovered) or "")

    def _highlight(self) -> None:
        with self.engine.lock:            # not interleaved with a matrix drawn on the worker
            self._highlight_unlocked()

    def _highlight_unlocked(self) -> None:
        s = self.selection
        rows, cols = self.matrix.shape if self.matrix.ndim == 2 else (0, 0)
        self.selected_row = self.selected_col = -1
        if s.unit_ref is not None:
            if s.modality == self.pair[0]:
                self.selected_row = self._position(self.row_units, s.unit, rows)
            elif s.modality == self.pair[1]:
                self.selected_col = self._position(self.col_units, s.unit, cols)
        self._outline()

    def _outline(self) -> None:
        """The rectangle around the selected row or column, in cells (y up from the bottom
        of the grid drawn: row r spans [R - r - 1, R - r])."""
        rows, cols = self.matrix.shape if self.matrix.ndim == 2 else (0, 0)
        big_r, big_c = self._shown_shape
        if self.selected_row >= 0:
            top, bottom = big_r - self.selected_row, big_r - self.selected_row - 1
            x0, x1 = 0, cols
        elif self.selected_col >= 0:
            top, bottom = big_r, big_r - rows
            x0, x1 = self.selected_col, self.selected_col + 1
        else:
            self.outline.visible = False
            return
        with self.outline.hold_sync():
            self.outline_x.min, self.outline_x.max = 0.0, float(big_c)
            self.outline_y.min, self.outline_y.max = 0.0, float(big_r)
            self.outline.x = np.array([x0, x1, x1, x0, x0], dtype=float)
            self.outline.y = np.array([top, top, bottom, bottom, top], dtype=float)
            self.outline.visible = True

    # -- hover ---------------------------------------------------------------------------------
    def cell_text(self, row: int, col: int) -> str:
        """What the tooltip of cell (row, col) says: its units' full names and its value; ""
        for a padding cell."""
        m, rows, cols, computed = self.matrix, self.row_labels, self.col_labels, self.computed
        if m.ndim != 2 or not (0 <= row < m.shape[0] and 0 <= col < m.shape[1]):
            return ""
        a, b = self.pair
        # quoted: a unit named "the" or "x" must not read as part of the sentence
        names = (f"{a} {quoted(rows[row]) if row < len(rows) else f'unit {row}'} x "
                 f"{b} {quoted(cols[col]) if col < len(cols) else f'unit {col}'}")
        if not np.isfinite(m[row, col]):
            return f"{names}: {float(m[row, col])}"
        if computed is not None and not computed[row, col]:
            why = ("not both Shapley players" if self.method == "shapley" else
                   "not both among the units computed")
            return f"{names}: not computed ({why})"
        return f"{names}: {float(m[row, col]) + 0.0:.3g}"       # + 0.0: never "-0"

    def _on_hover(self, _mark, content) -> None:
        data = content.get("data") or {}
        try:
            r = int(data.get("rowNum", -1))
            c = int(data.get("columnNum", -1))
        except (TypeError, ValueError):
            return
        with self.engine.lock:        # not interleaved with a matrix drawn on the worker
            # the text and the cell it is for in one message (the browser compares the cell)
            self._hovered = (r, c)
            self.tip.show(r, c, self.cell_text(r, c) or "")

    # -- clicks --------------------------------------------------------------------------------
    def _on_click(self, _mark, content) -> None:
        data = content.get("data") or {}
        r = data.get("rowNum", data.get("row"))
        c = data.get("columnNum", data.get("column"))
        if r is None:
            return
        # bqplot sends the row's tick and the cell's value as the browser drew them: a click on
        # the previous matrix, arriving after a new one was drawn, is told apart by them
        tick = data.get("row") if "rowNum" in data else None
        value = data.get("color")
        self.click(int(r), None if c is None else int(c),
                   row_tick=None if tick is None else str(tick),
                   value=value if isinstance(value, (int, float)) else None)

    def click(self, row: int, col: int | None = None, row_tick: str | None = None,
              value: float | None = None) -> None:
        """What a cell click does: select the row's unit of modality a. Nothing for a padding
        row, or while the matrix shown is of an earlier instance or pair (the new one still
        loading: its row may not exist in the instance selected), or when ``row_tick`` (the
        row's tick in the browser) or ``value`` (the cell's) is not that of the cell drawn now:
        the click was on an earlier matrix of the same instance and pair, whose row ``row`` was
        another unit (a side cut to its MOST_SHOWN strongest units differs between targets;
        ticks are names, and two words may read the same)."""
        if not 0 <= int(row) < (self.matrix.shape[0] if self.matrix.ndim == 2 else 0):
            return
        if self.instance != self.selection.instance or tuple(self.pair) != self.wanted_pair():
            return
        with self.engine.lock:       # the units of the rows drawn now, not half-replaced
            units = self.row_units
            if units is not None and not int(row) < len(units):
                return
            ticks = self.grid.row
            if row_tick is not None and (ticks is None or not int(row) < len(ticks)
                                         or str(ticks[int(row)]) != row_tick):
                return
            if value is not None and col is not None:
                shown = np.asarray(self.grid.color, dtype=np.float64)
                if not (shown.ndim == 2 and 0 <= int(col) < shown.shape[1]
                        and math.isclose(float(shown[int(row), int(col)]), float(value),
                                         rel_tol=1e-6, abs_tol=1e-12)):
                    return
            unit = int(row) if units is None else int(units[int(row)])
        self.selection.select(unit=(self.pair[0], unit))

    def state(self) -> dict:
        return {"pair": list(self.pair), "matrix": self.matrix.tolist(),
                "rows": list(self.row_labels), "cols": list(self.col_labels),
                "row_ticks": list(self.grid.row) if self.grid.row is not None else [],
                "col_ticks": list(self.grid.column) if self.grid.column is not None else [],
                "computed": None if self.computed is None else self.computed.tolist(),
                "row_units": None if self.row_units is None else self.row_units.tolist(),
                "col_units": None if self.col_units is None else self.col_units.tolist(),
                "selected_row": self.selected_row, "selected_col": self.selected_col,
                "outline": ({"x": list(map(float, self.outline.x)),
                             "y": list(map(float, self.outline.y))}
                            if self.outline.visible else None),
                "caption": self.caption.value, "note": self.note_text,
                "legend": self.legend_text, "combination": self.combination.value,
                "combination_label": self.combination_label}
