"""NeuronView (bqplot): decision-level activations h_j(x) and contributions W_cj h_j(x) to the
target class, bars clickable; and a gallery of the dataset instances that activate the selected
neuron most and least, each with its neuron-targeted heatmap. A gallery item click selects
that instance.
"""
from __future__ import annotations

import bqplot as bq
import ipywidgets as W
import numpy as np

from ..adapter import Neuron
from ..display_text import embed, quoted
from ..engine import Analyses, Engine
from ..kernels.representations import gallery_rows, tied_extremes
from ..selection import Selection
from ._common import (RetryAfterCancel, WrappedText, close_widgets, describe_instance,
                      failure_text, instance_title, text_label)
from ._encode import image_overlay, png, strip_png


def _short(text: str, n: int = 38) -> str:
    text = str(text)
    return text if len(text) <= n else text[:n - 1] + "…"


#: The bar charts' titles: words first, the quantity after (h_j: neuron j of the decision layer).
ACTIVATION_TITLE = "how strongly each neuron fires, h_j(x)"
#: Characters per line of the view's captions: its two 380 px figures side by side, and the
#: 588 px a 1,024 px screen left it (80 characters fit 600 px of JupyterLab's font)
CAPTION_CHARS = 76
#: The bars' font size: the contribution title names the class and must fit the 380 px figure.
TITLE_STYLE = {"font-size": "13px"}


def contribution_title(class_name: str | None = None) -> str:
    """"what each neuron adds to 'red'" (the class name shortened to fit the figure); the
    caption says what a bar is (``contribution_source``)."""
    of = "the class" if class_name is None else quoted(_short(class_name, 12))
    return f"what each neuron adds to {of}"


def contribution_source(sparse: bool) -> str:
    """What a contribution bar is, in words: the weight of the class for the neuron times the
    neuron's activation, from the decision layer or, with a sparse linear model, from that
    model (which weighs activations standardised by their mean and spread over the data it was
    fit on, not necessarily the dataset shown)."""
    if sparse:
        return ("each bar: the sparse linear model's weight of the class for the neuron x the "
                "neuron's activation, standardised over the data the sparse model was fit on")
    return "each bar: the decision layer's weight of the class for the neuron x its activation"


def thumbnail_key(modalities) -> tuple[str, set]:
    """(how to read the gallery's strip thumbnails, the modalities drawn as strips): a time
    series is one row per channel group and one square per window, a table one square per
    unit; images draw as pictures, texts not at all."""
    parts, names = [], set()
    for name, m in modalities.items():
        if m.kind == "timeseries":
            rows = ["+".join(str(m.channels[c]) for c in g) for g in m.groups]
            parts.append(f"{name}: a row per {', '.join(rows)} (top to bottom), a square per "
                         f"window of {m.window} steps (left to right)")
        elif m.kind not in ("image", "text"):
            units = getattr(m, "group_names", None)
            parts.append(f"{name}: a square per {', '.join(map(str, units))} (left to right)"
                         if units else f"{name}: a square per unit (left to right)")
        else:
            continue
        names.add(name)
    if not parts:
        return "", names
    return ("Thumbnails, coloured by what drives the neuron (red raises it, blue lowers it): "
            + "; ".join(parts) + ".", names)


class NeuronView(W.VBox):
    """Bars of the instance's top neurons (by |contribution|) and the selected neuron's gallery."""

    slot = "neurons"
    gallery_slot = "gallery"

    def __init__(self, selection: Selection, engine: Engine, analyses: Analyses,
                 n_bars: int = 12, thumb_size: int = 96):
        self.selection, self.engine, self.analyses = selection, engine, analyses
        self.n_bars = int(n_bars)
        self.thumb_size = int(thumb_size)
        self.shown: list[int] = []            # neuron index of every bar
        self._top: list[int] = []             # the top neurons of the instance (their bars)
        self.activations = np.zeros(0)
        self.contributions = np.zeros(0)
        self.gallery: list[dict] = []
        self.gallery_neuron = -1

        x = bq.OrdinalScale()
        self.act_bars = bq.Bars(x=[], y=[], scales={"x": x, "y": bq.LinearScale()},
                                colors=["#7f7f7f"], interactions={"click": "select"},
                                selected_style={"fill": "#ff7f0e"})
        xc = bq.OrdinalScale()
        self.contrib_bars = bq.Bars(x=[], y=[], scales={"x": xc, "y": bq.LinearScale()},
                                    colors=["#1f77b4"], interactions={"click": "select"},
                                    selected_style={"fill": "#ff7f0e"})
        for mark in (self.act_bars, self.contrib_bars):
            mark.on_element_click(self._on_click)
        # the bars' x are their neurons' names ("h5"), and the x scales' domain (set here, in
        # the bars' order) is what the axes show: no tick_labels, whose change bqplot loses to a
        # pending redraw of the domain (see heatmap_view.tick_labels)
        self.act_axis = bq.Axis(scale=x)
        self.contrib_axis = bq.Axis(scale=xc)
        lay = W.Layout(width="380px", height="240px")
        self.act_figure = bq.Figure(marks=[self.act_bars], title=ACTIVATION_TITLE,
                                    title_style=dict(TITLE_STYLE),
                                    axes=[self.act_axis, bq.Axis(scale=self.act_bars.scales["y"],
                                                                 side="left")],
                                    layout=lay, fig_margin={"top": 40, "bottom": 30, "left": 50,
                                                            "right": 10})
        self.contrib_figure = bq.Figure(
            marks=[self.contrib_bars], title=contribution_title(),
            title_style=dict(TITLE_STYLE),
            axes=[self.contrib_axis, bq.Axis(scale=self.contrib_bars.scales["y"],
                                             side="left")],
            layout=W.Layout(width="380px", height="240px"),
            fig_margin={"top": 40, "bottom": 30, "left": 50, "right": 10})
        # wrapped, never cut: a Label cut "... (each bar: the sparse linear model's weight of
        # the class for the neuron x th" at the view's edge, the part that says what bars mean
        self.caption = WrappedText(width=CAPTION_CHARS)
        # the caption's second line: the selected neuron's values in words when it is not one
        # of the top neurons (its bar, added last, may be too small to see); hidden otherwise
        self.selected_caption = WrappedText(width=CAPTION_CHARS, layout=W.Layout(display="none"))
        self.gallery_caption = WrappedText("click a bar to see what its neuron responds to",
                                           width=CAPTION_CHARS)
        # how to read the strip thumbnails (tabular columns, series windows): shown with them
        self.thumb_key, self.strip_modalities = thumbnail_key(analyses.adapter.modalities)
        self.gallery_key = WrappedText(layout=W.Layout(display="none"))
        self.top_row = W.HBox([], layout=W.Layout(flex_flow="row wrap"))
        self.bottom_row = W.HBox([], layout=W.Layout(flex_flow="row wrap"))
        # hidden until a gallery shows instances under them
        self.top_label = WrappedText("top activating", width=CAPTION_CHARS)
        self.bottom_label = WrappedText("bottom activating", width=CAPTION_CHARS)
        for heading in (self.top_label, self.bottom_label):
            heading.layout.display = "none"        # (setting a text shows a WrappedText)
        self._caption_base: str | None = None   # the bars' caption, without the selected one
        self._class_name: str | None = None     # the class the contributions are to
        super().__init__([self.caption, self.selected_caption,
                          W.HBox([self.act_figure, self.contrib_figure],
                                 layout=W.Layout(flex_flow="row wrap")),
                          self.gallery_caption, self.gallery_key, self.top_label, self.top_row,
                          self.bottom_label, self.bottom_row])
        self.add_class("mvz-neuron-view")
        selection.observe(lambda _: self.refresh(), names=["instance", "target"])
        selection.observe(lambda _: self._on_neuron(), names=["neuron"])
        selection.observe(lambda _: self.refresh_gallery(), names=["method"])
        self.retry = RetryAfterCancel(selection)

    # -- bars ----------------------------------------------------------------------------------
    def refresh(self) -> None:
        s = self.selection
        i, target, a = s.instance, s.target, self.analyses
        self.retry.asked("bars")

        def job(progress):
            cls = a.class_index(i, target)
            dc = a.contributions(i, cls)
            # no bar for a neuron that adds exactly 0 (inactive, or left out by the sparse
            # model): a bar of height 0 says nothing and cannot be clicked
            c = np.asarray(dc.contributions).reshape(-1)
            order = [int(j) for j in dc.top(self.n_bars, absolute=True) if c[j] != 0]
            sparse = getattr(dc, "source", "") == "sparse_model"
            ready = a.sparse_note_key()             # read before the note it stands for
            return cls, dc, order, a.sparse_model_note(i) if sparse else "", ready

        with self.engine.lock:     # the caption not overwritten by bars applied meanwhile
            self._caption_base = None
            self.caption.value = "computing decision-level contributions ..."
            self.engine.submit(self.slot, ("neurons", i, target, self.n_bars,
                                           a.sparse_note_key()), job,
                               self._show_bars, lambda err: self._bars_failed(err, i, target),
                               priority=2, label="neuron contributions")

    def _bars_failed(self, err, instance: int | None = None, target: int = -1) -> None:
        """Blank the bars (no bars of an earlier selection stay shown or clickable), under a
        title naming the class asked for (``target``; -1, the predicted class: not known when
        the instance fails), not the previous bars' class."""
        self._h, self._c = np.zeros(0), np.zeros(0)
        self._top = []
        self._caption_base = None
        names = self.analyses.adapter.class_names
        self._class_name = str(names[target]) if 0 <= target < len(names) else None
        self.contrib_figure.title = contribution_title(self._class_name)
        self._draw_bars()
        of = "" if instance is None else f" of #{instance}"
        again = self.retry.failed("bars", self.refresh, err)
        self.caption.value = f"contributions{of} not shown ({failure_text(err)}{again})"

    def _show_bars(self, result) -> None:
        cls, dc, order, sparse_note, ready = result
        h = np.asarray(dc.h, dtype=np.float64).reshape(-1)
        c = np.asarray(dc.contributions, dtype=np.float64).reshape(-1)
        self._h, self._c = h, c
        self._top = list(order)
        sparse = getattr(dc, "source", "") == "sparse_model"
        source = f" ({contribution_source(sparse)})"
        self._class_name = str(self.analyses.adapter.class_names[cls])
        self._caption_base = (f"top {len(order)} of {len(h)} neurons by |contribution| to "
                              f"class {quoted(self._class_name)}{source}")
        silent = int((c == 0).sum())
        if not order:
            self._caption_base = (f"no neuron adds anything to class {quoted(self._class_name)} "
                                  f"here{source}: all {len(h)} contributions are exactly 0")
        elif len(order) < self.n_bars and silent:
            self._caption_base += f"; the other {silent} add exactly 0 here"
        if sparse_note:
            self._caption_base += f"; {sparse_note}"
        self.contrib_figure.title = contribution_title(self._class_name)
        self._draw_bars()
        if sparse and not ready and self.analyses.sparse_note_key():
            self.refresh()       # its note was made before the dataset's features came

    def _draw_bars(self) -> None:
        h, c = getattr(self, "_h", np.zeros(0)), getattr(self, "_c", np.zeros(0))
        # the top neurons, and the selected one after them when it is not among them (only
        # the one selected now: a neuron selected before and left is not kept)
        shown = list(self._top)
        j = self.selection.neuron
        if 0 <= j < len(h) and j not in shown:
            shown.append(j)
        self.shown = shown
        self.activations = h[shown] if len(h) else np.zeros(0)
        self.contributions = c[shown] if len(c) else np.zeros(0)
        names = np.array([f"h{n}" for n in shown], dtype=str)
        sel = [shown.index(j)] if j in shown else None
        for mark, y in ((self.act_bars, self.activations),
                        (self.contrib_bars, self.contributions)):
            mark.scales["x"].domain = names.tolist()
            with mark.hold_sync():
                mark.x = names
                mark.y = y
                mark.selected = sel
        self._write_caption()

    def _write_caption(self) -> None:
        """The bars' caption ("top 12 of 64 ...": the top neurons only), and under it, for a
        selected neuron that is not one of them, its values in words: its bar, added last,
        may be too small to see."""
        j = self.selection.neuron
        note = ""
        if self._caption_base is not None:      # else computing, or failed: that caption stays
            self.caption.value = self._caption_base
            if j >= 0 and j not in self._top and j in self.shown:
                k = self.shown.index(j)
                where = (f"not in the top {len(self._top)}, the last bar" if self._top else
                         "the only bar")
                note = (f"selected h{j} ({where}): "
                        f"activation {self.activations[k] + 0.0:.3g}, contribution "  # no "-0"
                        f"{self.contributions[k] + 0.0:.3g} to {quoted(self._class_name)}")
        self.selected_caption.value = note
        self.selected_caption.layout.display = None if note else "none"

    def _on_click(self, _mark, content) -> None:
        data = content.get("data") or {}
        p = data.get("index", data.get("key", data.get("x")))
        if isinstance(p, str):            # the bar's name ("h5") rather than its position
            names = [f"h{n}" for n in self.shown]
            p = names.index(p) if p in names else None
        if p is None:
            return
        self.click_bar(int(p))

    def click_bar(self, position: int) -> None:
        """What a bar click does: select that bar's neuron."""
        if not 0 <= position < len(self.shown):
            return
        self.selection.select(neuron=self.shown[position])

    # -- gallery -------------------------------------------------------------------------------
    def _on_neuron(self) -> None:
        with self.engine.lock:            # not interleaved with bars arriving on the worker
            self._draw_bars()
        self.refresh_gallery()

    def refresh_gallery(self) -> None:
        j, method, a = self.selection.neuron, self.selection.method, self.analyses
        self.retry.asked("gallery")
        if j < 0:
            with self.engine.lock:        # not while a gallery is set on the worker
                self.engine.drop(self.gallery_slot)
                self._set_gallery(-1, [])
                self.gallery_caption.value = "click a bar to see what its neuron responds to"
            return
        size = self.thumb_size

        def job(progress):
            ext = a.extremes(progress)
            if not 0 <= j < ext.top_indices.shape[0]:
                raise IndexError(f"Neuron {j} is out of range: the decision layer has "
                                 f"{ext.top_indices.shape[0]} neurons.")
            feats = a.ranked_features(progress)          # the rows the extremes rank
            h_j = np.asarray(feats.h)[:, j]
            # each instance shown (and explained) once, also in a dataset smaller than the rows
            top, bottom = gallery_rows(ext, j, h_j, getattr(feats, "indices", None))
            entries = [("top", i, v) for i, v in top] + [("bottom", i, v) for i, v in bottom]
            ties = {side: tied_extremes(h_j, [e[2] for e in entries if e[0] == side])
                    for side in ("top", "bottom")}
            items = []
            for n, (side, idx, value) in enumerate(entries):
                attr = a.attribution(idx, Neuron(j), method)
                progress(n + 1, len(entries), f"h{j} heatmaps")
                items.append(self._item(side, idx, value, attr, size))
            return j, items, ties

        with self.engine.lock:     # the caption not overwritten by a gallery set meanwhile
            self.gallery_caption.value = f"finding the instances that activate h{j} ..."
            self.engine.submit(self.gallery_slot, ("gallery", j, method), job,
                               lambda r: self._set_gallery(*r), self._gallery_failed,
                               priority=4, label=f"gallery of h{j}", lane="background")

    def _item(self, side: str, idx: int, value: float, attr, size: int) -> dict:
        """One gallery entry: text, and a thumbnail per modality (encoded here, off the UI)."""
        a = self.analyses
        prepared = a.prepared(idx)
        thumbs = {}
        for name, m in a.adapter.modalities.items():
            scores = np.asarray(attr.scores.get(name, []), dtype=np.float64)
            if m.kind == "image" and name in attr.maps:
                x = prepared.raw[name][0].detach().cpu().float().numpy()
                thumbs[name] = png(image_overlay(x, np.asarray(attr.maps[name])), size)
            elif m.kind == "timeseries" and scores.size:
                groups = len(m.groups)            # units are window-major: [windows, groups]
                thumbs[name] = strip_png(scores.reshape(-1, groups).T, size)
            elif m.kind != "text" and scores.size:   # tabular and other kinds: one strip
                thumbs[name] = strip_png(scores[None, :], size)
        return {"side": side, "index": idx, "value": value,
                "description": describe_instance(a.dataset.describe, idx),
                "label": a.label(idx), "thumbs": thumbs}

    def _gallery_failed(self, err) -> None:
        """Blank the gallery (no instances of an earlier neuron stay shown or clickable)."""
        self._set_gallery(-1, [])
        again = self.retry.failed("gallery", self.refresh_gallery, err)
        self.gallery_caption.value = f"gallery not shown ({failure_text(err)}{again})"

    def _set_gallery(self, j: int, items: list[dict], ties: dict | None = None) -> None:
        self.gallery_neuron = j
        self.gallery = items
        rows = {"top": [], "bottom": []}
        for it in items:
            rows[it["side"]].append(self._item_widget(it))
        # the items replaced are closed: each holds comms (image, button, label, layouts)
        old = list(self.top_row.children) + list(self.bottom_row.children)
        self.top_row.children = rows["top"]
        self.bottom_row.children = rows["bottom"]
        close_widgets(old)
        for side, label in (("top", self.top_label), ("bottom", self.bottom_label)):
            tie = (ties or {}).get(side)
            label.value = (f"{side} activating" if tie is None else
                           f"{side} activating: {tie[0]} instances tie at h = "
                           f"{tie[1] + 0.0:.3g} (no ranking among them), showing "
                           f"{len(rows[side])} of them"
                           if tie[2] == len(rows[side]) else
                           f"{side} activating: the last {tie[2]} shown tie at h = "
                           f"{tie[1] + 0.0:.3g} with {tie[0] - tie[2]} more instances (no ranking "
                           f"among them)")
            # a heading over nothing (no neuron clicked yet, a failed gallery) is not shown
            label.layout.display = None if rows[side] else "none"
        strips = any(name in self.strip_modalities for it in items for name in it["thumbs"])
        self.gallery_key.value = self.thumb_key if strips else ""
        self.gallery_key.layout.display = None if strips else "none"
        if j >= 0:
            self.gallery_caption.value = (f"h{j}: dataset instances with the largest and smallest "
                                          f"activation, each coloured by what drives neuron "
                                          f"h{j} in it")

    def _item_widget(self, it: dict) -> W.Widget:
        parts = [W.Image(value=b, format="png", layout=W.Layout(width=f"{self.thumb_size}px"))
                 for b in it["thumbs"].values()]
        # the description embedded (bidi): a stray RIGHT-TO-LEFT OVERRIDE in it must not
        # reverse the "(h = ...)" after it. It is cut to fit the title's 38 characters before
        # it is embedded, so that the cut never drops the end of its isolate.
        index, desc = it["index"], str(it["description"])
        short = _short(desc, 36 - len(str(index)))          # "#12 " + 34 characters
        button = W.Button(description=instance_title(index, embed(short)),
                          tooltip=f"{embed(desc)} (h = {it['value'] + 0.0:.3g})",
                          layout=W.Layout(width="180px"))
        button.on_click(lambda _b, idx=it["index"]: self.click_item(idx))
        value = text_label(value=f"h = {it['value'] + 0.0:.3g}")
        return W.VBox(parts + [button, value], layout=W.Layout(margin="2px", width="184px"))

    def click_item(self, index: int) -> None:
        """What a gallery click does: select that instance."""
        self.selection.select(instance=int(index))

    def state(self) -> dict:
        return {"neurons": [{"neuron": int(n), "activation": float(h), "contribution": float(c)}
                            for n, h, c in zip(self.shown, self.activations, self.contributions)],
                "caption": self.caption.value, "selected_caption": self.selected_caption.value,
                "gallery_neuron": self.gallery_neuron,
                "gallery": [{k: v for k, v in it.items() if k != "thumbs"} | {
                    "thumbnails": sorted(it["thumbs"])} for it in self.gallery]}
