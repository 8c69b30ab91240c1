"""HeatmapView (bqplot): the unit x unit interaction matrix of two modalities.

Rows are the units of modality a, columns those of modality b (``Interaction.matrix``). A cell
click selects the row's unit (and so the InputView shows that unit's interactions); the row
(or column) of the selected unit is highlighted. The pair follows the selection's ``pair`` when
it has one (the Explorer's pair menu). The view only encodes: the matrix comes from
the engine (``Analyses.interaction``).
"""
from __future__ import annotations

import bqplot as bq
import ipywidgets as W
import numpy as np

from ..engine import Analyses, Engine
from ..selection import Selection
from ._common import RetryAfterCancel, text_label


#: Longest tick label (characters) on the heatmap's axes; longer unit names are shortened.
TICK_CHARS = 14


def _unique(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        n = seen.get(lab, 0)
        seen[lab] = n + 1
        out.append(lab if n == 0 else f"{lab} ({n + 1})")
    return out


def tick_labels(labels: list[str], n: int) -> list[str]:
    """``n`` distinct tick labels: the (shortened, deduplicated) unit names, then blank padding
    ("", " ", ...) for the rows or columns that are drawn but not data.

    They are the ordinal scale's domain itself, so the axis always shows the words of the matrix
    it draws: bqplot redraws the ticks when the domain changes, but a change of ``tick_labels``
    is overwritten by a pending domain transition with the previous labels. The domain is set
    explicitly, since bqplot keeps a data-driven ordinal domain whose set of values is unchanged
    in its old order.
    """
    out = _unique([lab if len(lab) <= TICK_CHARS else lab[:TICK_CHARS - 1] + "\u2026"
                   for lab in labels[:n]])
    pad = ""
    while len(out) < n:
        while pad in out:
            pad += " "
        out.append(pad)
    return out


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
        self.selected_row = -1
        self.selected_col = -1
        self.instance = -1                    # the instance whose matrix is shown
        self.rows_scale = bq.OrdinalScale()             # its domain: the rows, top one last
        self.cols_scale = bq.OrdinalScale()
        self.color_scale = bq.ColorScale(scheme="RdBu", mid=0.0, reverse=True)
        self.grid = bq.GridHeatMap(
            color=np.zeros((2, 2)),
            scales={"row": self.rows_scale, "column": self.cols_scale, "color": self.color_scale},
            # no "select" interaction: with it bqplot's GridHeatMap never sends element_click
            # to Python (checked in Chromium); the row highlight is set from Python instead
            interactions={}, selected_style={"stroke": "black", "stroke-width": 2},
            unselected_style={"opacity": 0.85}, stroke="white", null_color="white")
        self.grid.on_element_click(self._on_click)
        self.row_axis = bq.Axis(scale=self.rows_scale, side="left", label=self.pair[0],
                                label_offset="40px")
        self.col_axis = bq.Axis(scale=self.cols_scale, label=self.pair[1], tick_rotate=-45,
                                label_offset="75px")
        # -lim, -lim/2, 0, lim/2, lim with enough digits that no two ticks of the colour bar read
        # the same ("1e+1, 1e+1, 8"); bqplot's bar is the plot's height less 200 px
        self.color_axis = bq.ColorAxis(scale=self.color_scale, side="right", tick_format=".3~g",
                                       num_ticks=5)
        self.figure = bq.Figure(marks=[self.grid],
                                axes=[self.row_axis, self.col_axis, self.color_axis],
                                fig_margin={"top": 20, "bottom": 90, "left": 130, "right": 80},
                                layout=W.Layout(width="560px", height="410px"))
        self.caption = text_label(value="")
        super().__init__([self.caption, self.figure],
                         layout=W.Layout(width="566px", flex="0 0 auto"))  # figure + margins
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
        self.caption.value = f"computing {method} interactions {pair[0]} x {pair[1]} ..."

        def job(progress):
            explained = a.explained(i, target, neuron)
            inter = a.interaction(i, explained, method, pair, progress)
            return i, explained, inter

        self.engine.submit(self.slot, ("heatmap", i, target, neuron, method, pair), job,
                           self._show, lambda err: self._failed(err, i), priority=2,
                           label=f"{method} interactions")

    def _failed(self, err, instance: int | None = None) -> None:
        """Blank the matrix (nothing of an earlier selection stays shown or clickable)."""
        self.instance = -1
        self._draw(np.zeros((0, 0)), [], [])
        of = "" if instance is None else f" of #{instance}"
        again = self.retry.failed("matrix", self.refresh, err)
        self.caption.value = f"interactions{of} not shown ({type(err).__name__}{again})"

    def _show(self, result) -> None:
        i, explained, inter = result
        self.instance = int(i)
        pair = tuple(str(m) for m in (getattr(inter, "modalities", None) or self.pair))
        if pair != self.pair:
            self.pair = pair
            self.row_axis.label, self.col_axis.label = pair
        self._draw(np.asarray(inter.matrix, dtype=np.float64), inter.row_labels,
                   inter.col_labels)
        self.caption.value = (f"{inter.method} interactions {self.pair[0]} x {self.pair[1]} "
                              f"for {self.analyses.target_text(explained)}")

    def _draw(self, m: np.ndarray, row_labels, col_labels) -> None:
        self.matrix = m
        self.row_labels = [str(x) for x in row_labels]
        self.col_labels = [str(x) for x in col_labels]
        rows, cols = m.shape
        # bqplot squeezes a single row or column to 1-D: pad with an empty (NaN) one; no
        # matrix: a blank (all NaN, drawn in the null colour) 2 x 2 grid
        shown = m if m.size else np.full((2, 2), np.nan)
        if rows == 1:
            shown = np.vstack([shown, np.full((1, shown.shape[1]), np.nan)])
        if cols == 1:
            shown = np.hstack([shown, np.full((shown.shape[0], 1), np.nan)])
        row_ticks = tick_labels(self.row_labels, shown.shape[0])
        col_ticks = tick_labels(self.col_labels, shown.shape[1])
        self.rows_scale.domain = row_ticks[::-1]         # row 0 at the top
        self.cols_scale.domain = col_ticks
        with self.grid.hold_sync():
            self.grid.selected = None
            self.grid.row = None
            self.grid.column = None
            self.grid.color = shown
            self.grid.row = np.array(row_ticks, dtype=str)
            self.grid.column = np.array(col_ticks, dtype=str)
            lim = float(np.nanmax(np.abs(m))) if m.size and np.isfinite(m).any() else 1.0
            lim = lim if np.isfinite(lim) and lim > 0 else 1.0
            self.color_scale.min, self.color_scale.max = -lim, lim
        # the row axis title clear of the longest row label (about 7 px a character)
        longest = max((len(t) for t in row_ticks), default=1)
        self.row_axis.label_offset = f"{min(7 * longest + 20, 122)}px"
        self.col_axis.num_ticks = cols if cols <= 24 else 12
        self._highlight()

    def _highlight(self) -> None:
        with self.engine.lock:            # not interleaved with a matrix drawn on the worker
            self._highlight_unlocked()

    def _highlight_unlocked(self) -> None:
        s = self.selection
        rows, cols = self.matrix.shape if self.matrix.ndim == 2 else (0, 0)
        self.selected_row = self.selected_col = -1
        cells = None
        if s.unit_ref is not None:
            if s.modality == self.pair[0] and 0 <= s.unit < rows:
                self.selected_row = s.unit
                cells = np.array([[s.unit, c] for c in range(cols)])
            elif s.modality == self.pair[1] and 0 <= s.unit < cols:
                self.selected_col = s.unit
                cells = np.array([[r, s.unit] for r in range(rows)])
        self.grid.selected = cells if cells is not None and len(cells) else None

    # -- clicks --------------------------------------------------------------------------------
    def _on_click(self, _mark, content) -> None:
        data = content.get("data") or {}
        r = data.get("rowNum", data.get("row"))
        c = data.get("columnNum", data.get("column"))
        if r is None or not 0 <= int(r) < self.matrix.shape[0]:
            return                      # a padding cell, or no matrix yet
        if self.instance != self.selection.instance or tuple(self.pair) != self.wanted_pair():
            return                      # the matrix of an earlier instance or pair, still loading
        self.click(int(r), None if c is None else int(c))

    def click(self, row: int, col: int | None = None) -> None:
        """What a cell click does: select the row's unit of modality a (rows shown only)."""
        if not 0 <= int(row) < (self.matrix.shape[0] if self.matrix.ndim == 2 else 0):
            return
        self.selection.select(unit=(self.pair[0], int(row)))

    def state(self) -> dict:
        return {"pair": list(self.pair), "matrix": self.matrix.tolist(),
                "rows": list(self.row_labels), "cols": list(self.col_labels),
                "selected_row": self.selected_row, "selected_col": self.selected_col,
                "caption": self.caption.value}
