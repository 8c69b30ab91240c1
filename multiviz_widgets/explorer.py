"""The Explorer: linked views of one model and one dataset, around one Selection.

    explorer = Explorer(adapter, dataset)       # or demo("easy_vqa") / demo("synthetic")
    explorer                                    # displays (an ipywidgets.VBox)
    explorer.select(instance=3, unit=("question", 1), neuron=7, target=2)
    explorer.wait(); explorer.state()           # what every view shows now
    Explorer(adapter, dataset, annotations="concepts.json")   # concepts of neurons and units

A click in a view changes the Selection; every view observes the Selection and asks the
engine (two worker threads, a lane for clicks and one for dataset-wide work; LRU cache, progress
bar, cancel, error banner) for what it needs.
"""
from __future__ import annotations

import inspect
import os
import re
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import ipywidgets as W
import torch

from .notices import warn
from .results import computed_units
from .adapter import ModelAdapter, class_name
from .annotations import AnnotationError, Annotations, dataset_signature, model_signature
from .checks import is_integer
from .data import MultimodalDataset
from .engine import Analyses, Engine, Kernels, short_repr
from .selection import FIELDS, Selection, unit_ref_of
from .display_text import isolate, quoted
from .views._common import (close_widgets, colour_limit, describe_instance, failure_text,
                            instance_title, method_label, text_label,
                            widget_tree)
from .views.concepts_view import ConceptsView
from .views.controls import Controls, ErrorBanner, NoticeBanner, ProgressPanel
from .views.embedding_view import BY_NEURON, EmbeddingView
from .views.heatmap_view import HeatmapView
from .views.neuron_view import NeuronView
from .views.path_view import PathView

#: Which modality gives the rows of the interaction matrix (smaller first: tokens, columns...).
_ROW_ORDER = {"text": 0, "tabular": 1, "timeseries": 2, "image": 3}

#: {notebook cell id: [(its execution count, a weak reference to an Explorer it made)]}: when
#: a run of a cell ends, the Explorers its earlier runs made that no name holds any more are
#: closed (``_close_earlier_runs``)
_MADE_BY_CELL: dict[str, list[tuple[int, weakref.ref]]] = {}
_MADE_BY_CELL_LOCK = threading.Lock()


@dataclass(frozen=True)
class RunningCell:
    """The notebook cell running now: its id, its execution count, and the IPython shell."""

    cell_id: str
    count: int
    shell: object


def running_cell() -> RunningCell | None:
    """The notebook cell running now, or None: on a thread other than the kernel's main one
    (a thread started by one cell may run while another cell runs), and outside a Jupyter
    kernel that says which cell runs (JupyterLab and Notebook 7 send the cell's id with every
    execution; plain Python, tests and Voila say nothing)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        from IPython import get_ipython
        shell = get_ipython()
        kernel = getattr(shell, "kernel", None)
        if kernel is None:
            return None
        parent = kernel.get_parent("shell") or {}
        cell = (parent.get("metadata") or {}).get("cellId")
        count = shell.execution_count
    except Exception:  # noqa: BLE001 -- any kernel that cannot say: nothing is closed
        return None
    if not isinstance(cell, str) or not cell or not is_integer(count):
        return None
    return RunningCell(cell, int(count), shell)


#: IPython's own names in a notebook's namespace: its input and output history (``Out``,
#: ``_``, ``_12`` keep what a cell displayed), not names of the user's
_IPYTHON_NAMES = re.compile(r"_{1,3}|_\d+|_i{1,3}|_i\d+|_ih|_oh|_dh|In|Out|exit|quit|get_ipython")

#: how far (objects within objects) and how many objects ``_named`` looks
_NAMED_DEPTH, _NAMED_MOST = 4, 20_000


def _named(explorers: list["Explorer"], shell) -> set[int]:
    """The ids of those of ``explorers`` that a name of the notebook still holds: a variable,
    or what one holds up to _NAMED_DEPTH objects in (items of dicts, lists, tuples and sets,
    the children of a widget, such as a Tab the Explorer was put in, attributes of the user's
    objects and classes: ``app.explorers["train"]``), at most _NAMED_MOST objects looked at.
    IPython's own names (``_IPYTHON_NAMES`` and its hidden ones) do not count. A value that
    cannot be looked into (a lazy object that raises) is passed over."""
    wanted = {id(e) for e in explorers}
    namespace = getattr(shell, "user_ns", None) or {}
    hidden = getattr(shell, "user_ns_hidden", None) or {}
    level = [v for k, v in list(namespace.items())
             if not (isinstance(k, str) and (_IPYTHON_NAMES.fullmatch(k) or k in hidden))]
    seen: set[int] = set()
    found: set[int] = set()
    for _ in range(_NAMED_DEPTH + 1):
        below = []
        for value in level:
            if id(value) in seen or len(seen) >= _NAMED_MOST:
                continue
            seen.add(id(value))
            if id(value) in wanted:
                found.add(id(value))
                if found == wanted:
                    return found
                continue
            try:
                below.extend(_held_by(value))
            except Exception:  # noqa: BLE001 -- a value that cannot be looked into
                continue
        level = below
    return found


def _held_by(value) -> list:
    """What ``_named`` looks into: the items of containers, a widget's children, the
    attributes of an object or a class of the user's (not of modules, functions, arrays, an
    Explorer's own parts)."""
    if isinstance(value, dict):
        return list(value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(value)
    if isinstance(value, Explorer):
        return []
    if isinstance(value, W.Widget):
        return list(getattr(value, "children", ()) or ())
    if isinstance(value, (str, bytes, int, float, complex, np.ndarray, torch.Tensor,
                          type(None))) or inspect.ismodule(value) or inspect.isroutine(value):
        return []
    if isinstance(value, type):
        if not value.__module__.startswith("__main__"):
            return []
        return list(vars(value).values())
    attributes = getattr(value, "__dict__", None)
    return list(attributes.values()) if isinstance(attributes, dict) else []


def _close_earlier_runs(cell: RunningCell) -> None:
    """When a run of a notebook cell ends: close the Explorers that earlier runs of the cell
    made and that no name holds any more. A cell run again clears its output, and the Explorer
    shown there stayed open, out of reach (``ex = Explorer(...)``: ``ex`` names the new one),
    with its two threads, its caches and its claim on a concepts file (a unit concept could then
    not be added: two datasets showed the file). One still named (``ex_test`` kept beside a new
    ``ex_train``, ``explorers[split] = ...``) stays open, as do those of this run and of other
    cells; so does every Explorer when the new one could not be made (``ex`` still names the
    old one)."""
    with _MADE_BY_CELL_LOCK:
        made = [(count, ref) for count, ref in _MADE_BY_CELL.get(cell.cell_id, [])
                if ref() is not None]
    earlier = [e for count, ref in made if count < cell.count and (e := ref()) is not None]
    named = _named(earlier, cell.shell)
    unnamed = [e for e in earlier if id(e) not in named]
    for explorer in unnamed:
        try:
            explorer.close()
        except Exception as e:  # noqa: BLE001 -- the cell's own work is done all the same
            warn(f"An Explorer that an earlier run of this cell made could not be closed "
                 f"({type(e).__name__}: {e}); it keeps its threads until the kernel ends.",
                 RuntimeWarning)
    with _MADE_BY_CELL_LOCK:
        closed = {id(e) for e in unnamed}
        _MADE_BY_CELL[cell.cell_id] = [
            (count, ref) for count, ref in _MADE_BY_CELL.get(cell.cell_id, [])
            if ref() is not None and id(ref()) not in closed]


def _made_by(cell: RunningCell | None, explorer: "Explorer") -> None:
    """Remember that this run of the cell made ``explorer``, and (once per run) close, when the
    run ends, the Explorers of its earlier runs that no name holds (``_close_earlier_runs``)."""
    if cell is None:
        return
    with _MADE_BY_CELL_LOCK:
        made = _MADE_BY_CELL.setdefault(cell.cell_id, [])
        first_of_run = not any(count == cell.count for count, _ in made)
        made.append((cell.count, weakref.ref(explorer)))
    if first_of_run:
        _after_cell(cell, lambda: _close_earlier_runs(cell))


def _after_cell(cell: RunningCell, fn: Callable[[], None]) -> None:
    """Call ``fn`` once, when the running cell has ended (IPython's post_run_cell event)."""
    events = getattr(cell.shell, "events", None)
    if events is None:
        return

    def once(*_result):
        try:
            events.unregister("post_run_cell", once)
        except ValueError:
            pass
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- never a traceback after the user's cell
            warn(f"The Explorers that earlier runs of this cell opened could not be looked "
                 f"at ({type(e).__name__}: {e}); they stay open (explorer.close() closes one).",
                 RuntimeWarning)
    events.register("post_run_cell", once)


def _rows_first(adapter: ModelAdapter, a: str, b: str) -> tuple[str, str]:
    """(a, b) in heatmap order: rows = text/tabular before series before image."""
    first = [a, b]
    first.sort(key=lambda n: _ROW_ORDER.get(adapter.modalities[n].kind, 9))
    return first[0], first[1]


def default_pair(adapter: ModelAdapter) -> tuple[str, str] | None:
    """The two modalities of the HeatmapView: rows = text/tabular before series before image."""
    names = adapter.names
    if len(names) < 2:
        return None
    return _rows_first(adapter, names[0], names[1])


def pair_options(adapter: ModelAdapter, pair: tuple[str, str] | None) -> list[tuple[str, str]]:
    """Every unordered pair of the adapter's modalities once, as (rows, columns) of the heatmap
    (``pair``'s own order for ``pair``), ``pair`` first."""
    out = [_rows_first(adapter, a, b) for a, b in combinations(adapter.names, 2)]
    if pair is not None:
        out = [tuple(pair)] + [p for p in out if set(p) != set(pair)]
    return out


def _check_dataset(dataset, adapter: ModelAdapter | None = None) -> None:
    """A clear TypeError for anything but a MultimodalDataset (or an object that offers the
    same: len, [i], labels, describe, batches); with the adapter, a ValueError when the
    dataset's columns are not the adapter's modalities (said now, not as a failure of every
    view). Labels outside the classes are allowed: the views show them as unknown (-1 is a
    common mark of an unlabelled instance)."""
    needs = ("__len__", "__getitem__", "labels", "describe", "batches")
    if isinstance(dataset, MultimodalDataset) or all(hasattr(dataset, n) for n in needs):
        if adapter is not None:
            _check_dataset_fits(dataset, adapter)
        return
    raise TypeError(
        f"The Explorer needs a MultimodalDataset, got {type(dataset).__name__}. Wrap your data: "
        "MultimodalDataset({'image': images, 'question': questions}, labels=labels), one "
        "sequence per modality of the adapter (a list of instance dicts d: "
        "MultimodalDataset({k: [x[k] for x in d] for k in d[0]})).")


def _check_dataset_fits(dataset, adapter: ModelAdapter) -> None:
    columns = getattr(dataset, "columns", None)
    if isinstance(columns, Mapping) and set(columns) != set(adapter.names):
        missing = [n for n in adapter.names if n not in columns]
        unknown = [n for n in columns if n not in adapter.names]
        raise ValueError(
            f"The dataset's columns {list(columns)} are not the adapter's modalities "
            f"{list(adapter.names)} (missing {missing}, unknown {unknown}): name each column "
            f"as its modality, MultimodalDataset({{'{adapter.names[0]}': ..., ...}}).")


def _path_method_defaults() -> dict:
    """prediction_path's default methods (its unimodal_method and interaction_method)."""
    import inspect

    from .kernels.prediction import prediction_path
    sig = inspect.signature(prediction_path).parameters
    return {k: sig[k].default for k in ("unimodal_method", "interaction_method")}


#: the methods the path uses when path_params give a method's parameters but not the method
_PATH_METHOD_DEFAULTS = _path_method_defaults()


class InputPanel:
    """Drives the InputView (the anywidget of the instance's inputs) from the Selection.

    The InputView shows the stage-1 attribution of the explained target (a neuron when one is
    selected, else the class). When a unit is selected, the other modality of the pair is
    coloured by its interaction with that unit (a row or a column of the interaction matrix).
    The pair is the selection's ``pair`` when it has one, else ``pair``.
    """

    items_slot, scores_slot = "items", "input"

    def __init__(self, view, selection: Selection, engine: Engine, analyses: Analyses,
                 pair: tuple[str, str] | None):
        self.view, self.selection, self.engine, self.analyses = view, selection, engine, analyses
        self.pair = pair
        self.items_instance = -1
        self.on_items: list = []              # called with no argument once an instance shows
        self.concepts_of = None               # instance -> the view's ``concepts`` (Explorer)
        self._want = None                     # the key of the overlay asked for last
        self._latest: tuple | None = None     # (key, instance, payload) received last
        self._computing: tuple | None = None  # (instance, caption) of the overlay on its way
        self.payload: dict = {}
        # the last changes of the view's ``selected`` and what was done with them (diagnostics)
        # (appended on whichever thread changes ``selected``: the kernel's or the engine's)
        self.clicks: deque[dict] = deque(maxlen=8)
        self._clicks_lock = threading.Lock()
        # set while the kernel itself changes ``selected`` (a highlight, or the blanking of a
        # failed or cancelled instance), on that thread only: such a change is never a click
        self._kernel_set = threading.local()
        selection.observe(lambda _: self.refresh_items(), names=["instance"])
        selection.observe(lambda _: self.refresh_scores(),
                          names=["instance", "target", "neuron", "method", "interaction_method",
                                 "modality", "unit", "pair"])
        selection.observe(lambda _: self._highlight(), names=["modality", "unit"])
        view.observe(self._on_view_click, names="selected")

    def refresh(self) -> None:
        # an overlay received before a recompute is not shown over the inputs that come back
        # first (under the same key, it would look current while the new one is computed)
        with self.engine.lock:
            self._latest = None
        self.refresh_items()
        self.refresh_scores()

    def current_pair(self) -> tuple[str, str] | None:
        return self.selection.pair or self.pair

    # -- the instance ----------------------------------------------------------------------------
    def refresh_items(self) -> None:
        i, a = self.selection.instance, self.analyses

        def job(progress):
            from .views.input_view import input_items
            p = a.prepared(i)
            items = input_items(a.adapter, a.raw(i), p)
            pred = a.class_index(i, -1)
            label = a.label(i)
            # each piece of data isolated (bidi): a description or class name that holds a
            # RIGHT-TO-LEFT OVERRIDE must not reverse "| predicted: ..." after it
            desc = describe_instance(a.dataset.describe, i)     # a failing one: a note
            cap = (f"{instance_title(i, desc, isolated=True)} | predicted: "
                   f"{isolate(a.adapter.class_names[pred])}")
            if label is not None:         # one of C or more: unknown (as the embedding says)
                cap += " | label: " + (isolate(class_name(a.adapter.class_names, label))
                                       if label < a.adapter.n_classes else f"unknown ({label})")
            return i, items, cap

        self.engine.submit(self.items_slot, ("items", i), job, self._show_items,
                           lambda err: self._items_failed(i, err), priority=0, label="instance")

    def _items_failed(self, i: int, err) -> None:
        """The instance cannot be shown: blank the view (no inputs of the previous instance
        stay on screen or clickable) and say which instance failed."""
        title = instance_title(i, describe_instance(self.analyses.dataset.describe, i),
                               isolated=True)
        with self.view.hold_sync():
            self.view.items = []
            self.view.scores = {}
            self.view.scales = {}
            self._set_selected({})            # the highlight only: the selection keeps its unit
            self.view.caption = f"{title} | not shown ({failure_text(err)})"
            self.view.score_caption = ""
            self.view.concepts = {}
            self.items_instance = -1
            self.payload = {}

    def _show_items(self, result) -> None:
        i, items, caption = result
        with self.view.hold_sync():
            # each item says its instance, which a click sends back (see _on_view_click)
            self.view.items = [{**item, "instance": i} for item in items]
            self.view.caption = caption
            self.view.scores = {}
            self.view.scales = {}
            # the overlay of this instance still on its way: said so until it comes
            computing = self._computing
            self.view.score_caption = computing[1] if computing and computing[0] == i else ""
            self.view.concepts = self._concepts(i)
            self.items_instance = i
            self._highlight()
        for fn in self.on_items:
            fn()
        # the overlay of this instance may have come first (or from the cache, e.g. on
        # "recompute" after the LRU dropped the items): show it over the new items
        if self._latest is not None and self._latest[:2] == (self._want, i):
            self._apply_scores(self._latest[2])

    def _concepts(self, i: int) -> dict:
        return self.concepts_of(i) if self.concepts_of is not None else {}

    def show_concepts(self) -> None:
        """Mark the named units of the shown instance anew (after the concepts changed)."""
        with self.engine.lock:            # not interleaved with an instance shown on the worker
            i = self.items_instance
            self.view.concepts = self._concepts(i) if i >= 0 else {}

    # -- the overlay -----------------------------------------------------------------------------
    def refresh_scores(self) -> None:
        s = self.selection
        i, target, neuron, method, imethod = (s.instance, s.target, s.neuron, s.method,
                                              s.interaction_method)
        unit = s.unit_ref
        a, pair = self.analyses, self.current_pair()
        in_pair = unit is not None and pair is not None and unit[0] in pair
        if self.items_instance != i:
            # the overlay is shown over the instance's inputs only: when they are not shown (a
            # cancel or a failure blanked them) ask for them again, else the overlay would say
            # "computing ..." for ever (a request already on its way is not queued twice)
            self.refresh_items()

        def job(progress):
            explained = a.explained(i, target, neuron)
            what = a.target_text(explained, i)
            attr = a.attribution(i, explained, method, progress)
            scores = {k: np.asarray(v, dtype=np.float64).tolist() for k, v in attr.scores.items()}
            scales = {}                    # each modality to its own largest |score|, but ...
            caption = f"{method_label(method)} attribution for {what}"
            blind = (attr.params or {}).get("no_gradient")
            if scores and not blind and not any(np.any(np.asarray(v)) for v in scores.values()):
                # no colour anywhere: say it is the answer, not a view that failed to draw
                caption += ": every score is 0 (nothing in the input moves it at this instance)"
            if blind:
                # a modality cut off from autograd (a frozen encoder under no_grad): its 0s
                # are not the model's answer
                caption += (f" (no gradient reaches {', '.join(map(quoted, blind))}: the model "
                            "ignores it, or computes it without one, under no_grad or "
                            "detached, and then its 0s say nothing; occlusion, LIME and "
                            "KernelSHAP tell which)")
            if (attr.params or {}).get("underdetermined"):
                # KernelSHAP with fewer samples than its regression needs (a large input)
                caption += (" (an estimate from too few samples for this many units, "
                            "unreliable: Explorer(..., method_params={"
                            f"{method!r}: {{'n_samples': ...}}}}) takes more)")
            if unit is not None and not in_pair and pair is not None:
                caption += (f" ({unit[0]} is not in the heatmap's pair {pair[0]} x {pair[1]}, "
                            f"so no interactions of its unit: choose a pair with {unit[0]} in "
                            "the controls' pair menu)")
            if in_pair:
                m, u = unit
                n = a.prepared(i).n_units.get(m, 0)
                if not 0 <= u < n:
                    raise IndexError(f"Unit {u} of {m!r} is out of range: instance {i} has {n} "
                                     f"units there (0..{n - 1}).")
                inter = a.interaction(i, explained, imethod, pair, progress)
                mat = np.asarray(inter.matrix, dtype=np.float64)
                other = pair[1] if m == pair[0] else pair[0]
                vec = (mat[u, :] if m == pair[0] else mat[:, u]).tolist()
                # Shapley's cells outside its players are not computed (0 in the matrix): no
                # score, not a measured 0 (the heatmap greys them)
                sides = computed_units(inter.params, pair, mat.shape)
                outside = False
                if sides is not None:
                    mine, kept = (sides if m == pair[0] else sides[::-1])
                    outside, kept = u not in set(mine.tolist()), set(kept.tolist())
                    vec = [None if outside or k not in kept else v for k, v in enumerate(vec)]
                scores[other] = vec
                # ... a unit's interactions on the heatmap's scale (its largest |cell|): a weak
                # row must not look as strong as the matrix's strongest pair
                lim = colour_limit(mat)
                if lim is not None:
                    scales[other] = lim
                labels = inter.row_labels if m == pair[0] else inter.col_labels
                said = f"{m} unit {u}"
                name = quoted(labels[u]) if u < len(labels) else ""      # when the matrix names it
                if outside:
                    why = (f"it is not a player of the {method_label(imethod)} (they are the "
                           f"units of largest occlusion effect" if imethod == "shapley" else
                           f"it is not among the units the {method_label(imethod)} computed "
                           f"(units=")
                    caption = (f"{other}: no interactions with {said}"
                               + (f" ({name})" if name else "")
                               + f": {why}; the heatmap greys the others, or leaves them "
                               f"out); {m}: {method_label(method)} attribution; for {what}")
                else:
                    caption = (f"{other}: interaction with {said} ("
                               + (f"{name}, " if name else "")
                               + f"{method_label(imethod)}); {m}: {method_label(method)} "
                               f"attribution; for {what}")
            return i, {"scores": scores, "scales": scales, "score_caption": caption}, key

        key = ("input", i, target, neuron, method, imethod, unit,
               pair if unit is not None else None)
        self._want = key
        # the progress bar names all this job computes (a unit's interactions may take seconds)
        label = (f"{method_label(method)} + {method_label(imethod)}" if in_pair
                 else method_label(method))
        with self.engine.lock:           # not interleaved with a result shown on the worker
            self._computing = (i, f"computing {label} ...")
            self.view.score_caption = self._computing[1]
            self.engine.submit(self.scores_slot, key, job, self._got_scores, self._failed,
                               priority=1, label=label)

    def _failed(self, err) -> None:
        self._latest, self.payload, self._computing = None, {}, None
        with self.view.hold_sync():
            self.view.scores = {}             # no overlay of an earlier selection stays
            self.view.scales = {}
            self.view.score_caption = f"not computed ({failure_text(err)})"

    def _got_scores(self, result) -> None:
        i, payload, key = result
        self._latest, self._computing = (key, i, payload), None
        if i == self.items_instance:
            self._apply_scores(payload)

    def _apply_scores(self, payload: dict) -> None:
        self.payload = payload
        with self.view.hold_sync():
            self.view.scores = payload["scores"]
            self.view.scales = payload.get("scales", {})
            self.view.score_caption = payload["score_caption"]

    # -- clicks ------------------------------------------------------------------------------
    def _highlight(self) -> None:
        with self.engine.lock:            # not interleaved with inputs shown on the worker
            ref = self.selection.unit_ref
            want = {"modality": ref[0], "unit": ref[1]} if ref else {}
            if dict(self.view.selected) != want:
                self._set_selected(want)

    def _set_selected(self, value: dict) -> None:
        """Set the view's ``selected`` from the kernel: what it shows, never a click (blanking
        a failed instance must not clear the selection's unit, nor start jobs after a cancel)."""
        self._kernel_set.active = True
        try:
            self.view.selected = value
        finally:
            self._kernel_set.active = False

    def _on_view_click(self, change) -> None:
        sel = change["new"] or {}
        ref = (sel["modality"], int(sel["unit"])) if sel else None
        # what happened to it, for Explorer.diagnostics()
        sent = (getattr(self.view, "incoming", None) or {}).get("selected", ...)
        drawn = sent.get("instance") if isinstance(sent, dict) else None
        if isinstance(sent, dict):            # the instance it was drawn for is not kept
            sent = {k: v for k, v in sent.items() if k != "instance"}
        click = {"unit": list(ref) if ref else None, "at": round(time.time(), 3),
                 "from": "browser" if sent == change["new"] else "kernel",
                 "thread": threading.current_thread().name, "instance": self.selection.instance,
                 "items_instance": self.items_instance, "drawn_for": drawn,
                 "action": "selecting"}
        with self._clicks_lock:
            self.clicks.append(click)
        if getattr(self._kernel_set, "active", False):   # the kernel's own highlight or blank
            click["action"] = ("already selected" if ref == self.selection.unit_ref
                               else "shown by the kernel, not a click")
            return
        shown = self.items_instance        # -1: blank (a cancel or a failure), said below
        if ref is not None and drawn is not None and shown >= 0 and drawn != shown:
            # clicked on the units of an instance shown before (the page had not yet drawn
            # this one): unit k of this instance is another word, patch or value
            click["action"] = f"ignored: a click on #{drawn}'s inputs, no longer shown"
            self._highlight()
            return
        if ref is not None and not self._shows(ref):
            click["action"] = "ignored: the view does not show this unit"
            self._highlight()                 # a unit not on screen (e.g. the view is blank)
            return
        if ref != self.selection.unit_ref:
            self.selection.select(unit=ref)
            click["action"] = "selected"
        else:
            click["action"] = "already selected"

    def _shows(self, ref: tuple[str, int]) -> bool:
        """Whether the view shows unit ``ref`` of the selected instance."""
        if self.items_instance != self.selection.instance:
            return False
        return any(it.get("name") == ref[0] and 0 <= ref[1] < int(it.get("n_units", 0))
                   for it in self.view.items)

    def click(self, modality: str, unit: int) -> None:
        """What a click on a unit in the browser does (sets the view's ``selected``)."""
        self.view.selected = {"modality": modality, "unit": int(unit)}


class Explorer(W.VBox):
    """Linked views of ``adapter`` on ``dataset``.

    sparse_model: the stage-4 sparse linear model (prediction.fit_sparse_model), used for the
    contributions and the prediction path (default: the decision layer's weights).
    cache_size: results kept in the LRU. features: precomputed extract_features(...) output.
    pair: the two modalities of the interaction matrix (default: text/tabular rows); with more
    than two modalities the controls' "pair" menu (or ``select(pair=...)``) changes it.
    kernels: a ``Kernels`` object (tests pass fakes). gallery_k: instances per gallery row.
    path_params: ``prediction_path``'s parameters for the path view (k_neurons, k_units,
    interaction_method, ...); the path follows the menus (its units the method's, its pairs the
    interaction method's between the pair menu's modalities) where they name no
    ``unimodal_method``, ``interaction_method`` (None: no pairs) or ``modalities``; parameters
    of a method (``unimodal_params``, ``interaction_params``) without it keep prediction_path's
    default method, which they were written for.
    method_params: {method: {parameter: value}} for the views' stage-1 and stage-2 methods (and
    the path's, unless ``path_params`` give their own), e.g. ``{"lime": {"n_samples": 3000},
    "shapley": {"max_players": 24, "budget": 8192}}``: an instance of thousands of units needs
    more LIME samples than the default 500, and more Shapley players than the 12 computed
    exactly, and the menus have no place for numbers. Unknown methods or
    parameters are refused at once; a value a method refuses is said in the banner.
    ``"interaction_type"`` sets the line on how the modalities combine (``n_reference``, 50 by
    default, 0 for no line; ``seed``, ``batch_size``, ``factorized``: checked at once, and a
    failure is said on the line).
    annotations: the concepts people give neurons and units (``explorer.annotations``): a JSON
    file's path (read if it exists, saved on each change; a file that cannot be read, or was
    made for a model of another shape, raises an AnnotationError and is left as it is), an
    ``Annotations`` store, or None (kept in memory; ``explorer.annotations.save(path)``).
    """

    def __init__(self, adapter: ModelAdapter, dataset: MultimodalDataset, *, sparse_model=None,
                 cache_size: int = 256, features=None, pair: tuple[str, str] | None = None,
                 kernels: Kernels | None = None, gallery_k: int = 4, delay: float = 0.3,
                 path_params: dict | None = None, annotations=None, start: bool = True,
                 method_params: dict | None = None):
        _check_dataset(dataset, adapter)
        self.engine = Engine(cache_size=cache_size, delay=delay)
        try:
            self._build(adapter, dataset, sparse_model, features, pair, kernels, gallery_k,
                        path_params, annotations, method_params)
            if start:
                self._opening = True          # this refresh reads the features' disk cache
                self.refresh()
        except BaseException:
            # no worker threads left behind, nor a claim on a concepts file, nor the views built
            # so far: open widgets, and observers of a concepts store that the caller shares
            try:
                self.close()
            except Exception:  # noqa: BLE001 - the constructor's own error is the one to see
                pass
            raise
        _made_by(running_cell(), self)

    def _build(self, adapter, dataset, sparse_model, features, pair, kernels, gallery_k,
               path_params, annotations, method_params=None) -> None:
        self.analyses = Analyses(self.engine, adapter, dataset, kernels=kernels,
                                 sparse_model=sparse_model, features=features,
                                 gallery_k=gallery_k, path_params=path_params,
                                 method_params=method_params)
        self.adapter, self.dataset = adapter, dataset
        self.annotations = self._open_annotations(annotations)
        # out-of-range instances and targets, unknown modalities and bad pairs are rejected
        # (a ValueError, or an IndexError for the instance) even when set on the Selection
        self.selection = Selection(n_instances=len(dataset), n_classes=adapter.n_classes,
                                   modalities=adapter.names,
                                   pair=pair if pair is not None else default_pair(adapter))
        pair = self.selection.pair
        # a new selection clears the banner first: observers run in the order they were added,
        # and a view's job may fail on the worker before a later observer would clear it
        self.selection.observe(lambda _: self.engine.clear_error(), names=list(FIELDS))
        # the path follows the menus (its units the method's, its pairs the interaction
        # method's between the heatmap's pair; none: no pairs), except where path_params name
        # their own (unimodal_method=, interaction_method= or None for no pairs, modalities=);
        # its other parameters (k_neurons, ...) are kept
        self._own_path_params = dict(path_params or {})
        self._follow_menus()
        # before the path view's own observer, so that it asks with the new parameters
        self.selection.observe(lambda _: self._follow_menus(),
                               names=["pair", "method", "interaction_method"])
        from .views.input_view import InputView
        # the input view takes what the heatmap leaves (at least 360 px); rows wrap rather than
        # overflow the output area or push views over each other (a layout given here: one set
        # later would leave the default one open)
        self.input_view = InputView(layout=W.Layout(flex="1 1 360px", margin="0 12px 8px 0"))
        self.input_view.state_lock = self.engine.lock
        self.input_panel = InputPanel(self.input_view, self.selection, self.engine,
                                      self.analyses, pair)
        self.heatmap_view = (HeatmapView(self.selection, self.engine, self.analyses, pair)
                             if pair else None)
        self.neuron_view = NeuronView(self.selection, self.engine, self.analyses)
        self.path_view = PathView(self.selection, self.engine, self.analyses, self.annotations)
        self.embedding_view = EmbeddingView(self.selection, self.engine, self.analyses,
                                            neuron_name=self._neuron_name)
        self.controls = Controls(self.selection, len(dataset), adapter.class_names,
                                 describe=dataset.describe, on_refresh=self.refresh,
                                 pairs=pair_options(adapter, pair) if pair else None,
                                 n_neurons=self._n_neurons())
        self.concepts_view = ConceptsView(
            self.selection, self.annotations, unit_name=self._unit_name, goto=self._goto,
            shared_units=[n for n, m in adapter.modalities.items() if m.shared_units])
        # the unit's name (its word, its patch) is known once the input view has the instance
        self.input_panel.on_items.append(self.concepts_view.show)
        # the dataset's features come: the bars' and the path's notes on the sparse model
        # become the dataset's agreement (before, the instance's answer)
        self.embedding_view.on_points.append(self._sparse_notes_again)
        # the input view marks the named units of its instance (and names them on hover)
        self.input_panel.concepts_of = self._unit_concepts
        self.annotations.observe(self._on_concepts)
        self.progress_panel = ProgressPanel(self.engine)
        self.banner = ErrorBanner(self.engine)
        self.notices_banner = NoticeBanner(self.engine)
        title = text_label(value=f"MultiViz Explorer: {adapter.name} on "
                                 f"{getattr(dataset, 'name', '')} ({len(dataset)} instances)")
        top = [self.input_view] + ([self.heatmap_view] if self.heatmap_view else [])
        self.input_view.add_class("mvz-input-view")
        wrap = dict(flex_flow="row wrap", align_items="flex-start")
        super().__init__([title, self.controls, self.concepts_view, self.progress_panel,
                          self.banner, self.notices_banner,
                          W.HBox(top, layout=W.Layout(**wrap)), self.neuron_view,
                          W.HBox([self.path_view, self.embedding_view],
                                 layout=W.Layout(**wrap))])

    def _open_annotations(self, annotations) -> Annotations:
        """The concepts store (see the class docstring), checked against this model."""
        sig = model_signature(self.adapter, self._n_neurons())
        # its fingerprint (a pass over the data) is computed only when unit concepts need it
        data = self._annotated_dataset = dataset_signature(self.dataset, lazy=True)
        if annotations is None:
            store = Annotations(signature=sig, dataset=data)
        elif isinstance(annotations, Annotations):
            store = annotations
        elif isinstance(annotations, (str, os.PathLike)):
            store = Annotations.open(annotations, signature=sig, dataset=data)
        else:
            raise TypeError(f"annotations must be a JSON file's path, an Annotations store or "
                            f"None, got {type(annotations).__name__}.")
        store.bind(sig, dataset=data)          # until close(): _release_annotations
        store.add_key_check(self._check_annotation_key)
        return store

    def _check_annotation_key(self, key: tuple) -> None:
        """The store's check of a key about to be named (``Annotations.add_key_check``): an
        AnnotationError for a unit that its instance does not have (a feature: that the shown
        instance does not have). Neuron ranges, instance ranges and modality names are the
        store's own checks."""
        if key[0] == "neuron":
            return
        modality, unit = (key[2], key[3]) if key[0] == "unit" else (key[1], key[2])
        if modality not in self.adapter.modalities:
            return
        selection = self.__dict__.get("selection")        # (none while the Explorer is built)
        instance = (key[1] if key[0] == "unit"
                    else selection.instance if selection is not None else 0)
        try:
            self._check_unit(modality, unit, instance)
        except ValueError as e:
            raise AnnotationError(f"{key} names no unit: {str(e).rstrip('.')}; name a unit "
                                  f"that the instance has.") from None

    def _n_neurons(self) -> int | None:
        """The decision layer's inputs, or None where they are not counted (a decision layer
        that is not linear: checked when used)."""
        try:
            return self.analyses.n_neurons()
        except Exception:  # noqa: BLE001
            return None

    def _release_annotations(self) -> None:
        """This Explorer no longer shows its concepts store (once, however often called)."""
        annotations = self.__dict__.get("annotations")
        if annotations is not None and not self.__dict__.get("_unbound"):
            self._unbound = True
            annotations.unobserve(self._on_concepts)
            annotations.remove_key_check(self._check_annotation_key)
            annotations.unbind(self.__dict__.get("_annotated_dataset"))

    def _unit_concepts(self, instance: int) -> dict:
        """The input view's ``concepts`` for ``instance``: the concepts of its units, and of the
        features (a unit of every instance, such as a tabular column) of its modalities."""
        shown: dict = {}
        store = self.annotations
        for key in store.keys():
            if key[0] == "feature":
                modality, unit = key[1], key[2]
            elif key[0] == "unit" and key[1] == instance:
                modality, unit = key[2], key[3]
            else:
                continue
            names = shown.setdefault(modality, {}).setdefault(str(unit), [])
            names.extend(c for c in store.concepts(key) if c not in names)
        return shown

    def _on_concepts(self, key) -> None:
        """The store changed: mark the shown instance's named units anew when it concerns them,
        and name the neuron the embedding is coloured by anew (``key`` None: many keys)."""
        if (key is None or key[0] == "feature"
                or (key[0] == "unit" and key[1] == self.input_panel.items_instance)):
            self.input_panel.show_concepts()
        if (key is None or key == ("neuron", self.selection.neuron)) \
                and self.embedding_view.colour_by.value == BY_NEURON:
            self.embedding_view.recolour()

    def _neuron_name(self, j: int) -> str:
        """"h7", or with its concepts "h7 (red shapes; circles)" (shortened past 80 characters)."""
        concepts = self.annotations.concepts(("neuron", j))
        name = f"h{j} ({'; '.join(concepts)})" if concepts else f"h{j}"
        return name if len(name) <= 80 else name[:79] + "\u2026"

    def _goto(self, key: tuple) -> None:
        """Select the neuron or the unit (and its instance) that an annotation key names (a
        feature: that unit of the instance shown)."""
        if key[0] == "neuron":
            self.select(neuron=key[1])
        elif key[0] == "feature":
            self.select(unit=(key[1], key[2]))
        else:
            self.select(instance=key[1], unit=(key[2], key[3]))

    def _unit_name(self, instance: int, modality: str, unit: int) -> str | None:
        """The input view's label of a unit of the instance it shows (a word, a patch), or
        None when it shows another instance."""
        if self.input_panel.items_instance != instance:
            return None
        for item in self.input_view.items:
            if item.get("name") == modality and 0 <= unit < len(item.get("labels", [])):
                return str(item["labels"][unit])
        return None

    def _follow_menus(self) -> None:
        """The prediction path's parameters: ``path_params``' own, and the menus' for what
        they leave open: the units by the stage-1 method, the pairs by the stage-2 method
        between the heatmap's pair (none: no pairs). A new dict, so that a path job that
        started with the old one can tell (PathView)."""
        own, s = self._own_path_params, self.selection
        # parameters given for a method (unimodal_params={"steps": 16}) but no method: that of
        # prediction_path's default, which they were written for, not the menu's
        pinned = {k: v for k, v in _PATH_METHOD_DEFAULTS.items()
                  if f"{k.split('_')[0]}_params" in own}
        params = {"unimodal_method": s.method, **pinned, **own}
        if own.get("interaction_method", "") is not None:
            params.setdefault("interaction_method", s.interaction_method)
            if "modalities" not in own:
                params.update({"modalities": tuple(s.pair)} if s.pair
                              else {"interaction_method": None})
        # the methods' own parameters (method_params=), where path_params give none
        given = self.analyses.method_params
        for kind in ("unimodal", "interaction"):
            if f"{kind}_params" not in own and params.get(f"{kind}_method") in given:
                params[f"{kind}_params"] = given[params[f"{kind}_method"]]
        # and pairwise ablation's where it stands in for blind second-order gradients
        if (params.get("interaction_method") == "second_order" and "ablation_params" not in own
                and "pairwise_ablation" in given and self.analyses.path_takes("ablation_params")):
            params["ablation_params"] = given["pairwise_ablation"]
        if params != self.analyses.path_params:
            self.analyses.path_params = params

    @property
    def pair(self) -> tuple[str, str] | None:
        """The heatmap's two modalities (rows, columns) now; None for a one-modality model."""
        return self.selection.pair

    @property
    def views(self) -> list:
        return [v for v in (self.heatmap_view, self.neuron_view, self.path_view,
                            self.embedding_view) if v is not None]

    def refresh(self) -> None:
        """Compute what every view shows again (the "recompute" button; e.g. after a cancel):
        the results cached in this kernel are dropped first, so that an edit of the dataset in
        place or new weights of the model are seen. The dataset's decision features are
        computed again too: the on-disk cache that the Explorer's first computation reads
        covers model and data, but not a model's integer, list or plain-tensor attributes (see
        ``ModelAdapter.fingerprint``), nor a fault since fixed that made the model fail on
        some instances. (The constructor's own first computation reads that cache.)"""
        self._check_open()
        opening = self.__dict__.pop("_opening", False)
        self.analyses.forget(recompute_features=not opening)
        self.embedding_view.forget()
        self.input_panel.refresh()
        for v in self.views:
            v.refresh()
        self.neuron_view.refresh_gallery()
        self._check_baselines()

    def _sparse_notes_again(self) -> None:
        """Ask the bars and the path again once the dataset's features are computed, where a
        sparse model is shown: their note on it is then the dataset's agreement. One still
        computing is left to finish (asked again, it started over: a path's seconds lost); its
        view asks again when its result shows a note made before the features came."""
        if self.analyses.sparse_model is None or self.engine.closed:
            return
        for view in (self.neuron_view, self.path_view):
            if not self.engine.slot_pending(view.slot):
                view.refresh()

    def _check_baselines(self) -> None:
        """Say beside the views, as a caveat, a Tabular or TimeSeries baseline that lies outside
        the data's values (``doctor.check_baselines``: what every removal method sets a removed
        unit to): after the views' first jobs, in the background lane, and again after a
        recompute (the data may have been edited). A failure of the check says nothing: each
        instance the adapter refuses is said where it is used."""
        if not any(m.kind in ("tabular", "timeseries") for m in self.adapter.modalities.values()):
            return
        from .doctor import check_baselines
        adapter, dataset = self.adapter, self.dataset

        def job(_progress):
            try:
                found = check_baselines(adapter, dataset)
            except Exception:  # noqa: BLE001 -- a check beside the views, never their error
                return
            for text in found:
                warn(text)

        self.engine.submit("baselines", None, job, priority=8, label="baselines",
                           lane="background")

    def select(self, instance: int = ..., unit=..., neuron: int = ..., target=...,
               method: str = ..., interaction_method: str = ..., pair=...) -> "Explorer":
        """Do what clicks do: ``unit`` is (modality, index) or None; ``target`` a class index,
        a class name or -1/None (the predicted class); ``neuron`` an index or -1/None;
        ``pair`` the heatmap's (rows, columns) modalities. A value that does not fit raises a
        ValueError (an IndexError for an instance out of range) and changes nothing."""
        self._check_open()
        kw = {k: v for k, v in dict(instance=instance, unit=unit, neuron=neuron, target=target,
                                    method=method, interaction_method=interaction_method,
                                    pair=pair).items()
              if v is not ...}
        # the Selection's validators check the instance and target ranges, the unit's modality
        # and the pair; what they cannot know is checked here: the methods, class names, the
        # unit's range on its instance and the neuron's on the decision layer
        for name, valid in (("method", self.controls.methods),
                            ("interaction_method", self.controls.interaction_methods)):
            if name in kw and kw[name] not in valid:
                raise ValueError(f"Unknown {name} {kw[name]!r}; choose one of {list(valid)}.")
        if isinstance(kw.get("target"), str):
            names = self.adapter.class_names
            if kw["target"] not in names:
                raise ValueError(f"Unknown class {kw['target']!r}; the classes are {names}.")
            kw["target"] = names.index(kw["target"])
        u = kw.get("unit")
        # (the Selection also takes an index alone; a click gives a pair)
        if u is not None and not isinstance(u, (tuple, list)):
            raise ValueError(f"unit must be (modality, index) with a modality of "
                             f"{self.adapter.names}, or None; got {u!r}.")
        if u is not None:
            m, i = unit_ref_of(u)
            if m in self.adapter.modalities:          # (another: the Selection refuses it)
                self._check_unit(m, i, kw.get("instance", self.selection.instance))
        n = kw.get("neuron")
        if n is not None and is_integer(n) and int(n) >= 0:     # (else the Selection says)
            d = self._n_neurons()
            if d is not None and int(kw["neuron"]) >= d:
                raise ValueError(f"neuron {kw['neuron']} is out of range: the decision layer has "
                                 f"{d} inputs (0..{d - 1}).")
        self.selection.select(**kw)
        return self

    def _check_open(self) -> None:
        """A clear RuntimeError once ``close()`` was called, before anything changes (else the
        selection changed, and then each view's request failed inside its observer)."""
        engine = self.__dict__.get("engine")
        if engine is None or engine.closed:
            raise RuntimeError("This Explorer is closed (its worker threads stopped and its "
                               "widgets closed): create a new one, e.g. Explorer(adapter, "
                               "dataset), to explore again.")

    def _check_unit(self, modality: str, unit: int, instance: int) -> None:
        """A ValueError when instance ``instance`` has no unit ``unit`` of ``modality``."""
        try:
            n = int(self.analyses.prepared(instance).n_units[modality])
        except Exception:  # noqa: BLE001 - an instance that cannot be prepared: its views say so
            return
        if unit >= n:
            raise ValueError(f"unit {unit} of {modality!r} is out of range: instance {instance} "
                             f"has {n} units there (0..{n - 1}).")

    def wait(self, timeout: float | None = 120.0) -> bool:
        """Block until no job is pending (for tests and benchmarks); False on timeout."""
        return self.engine.wait(timeout)

    def state(self) -> dict:
        """The selection and what every view shows now, as plain Python values."""
        s = self.selection
        out = s.as_dict()
        out["items"] = [it.get("name") for it in self.input_view.items]
        out["input_instance"] = self.input_panel.items_instance
        out["input_scores"] = {k: list(v) for k, v in self.input_view.scores.items()}
        out["input_scales"] = dict(self.input_view.scales)
        out["score_caption"] = self.input_view.score_caption
        out["input_selected"] = dict(self.input_view.selected)
        out["input_concepts"] = {m: {u: list(c) for u, c in units.items()}
                                 for m, units in self.input_view.concepts.items()}
        if self.heatmap_view is not None:
            hm = self.heatmap_view.state()
            out["heatmap"] = hm["matrix"]
            out["heatmap_rows"], out["heatmap_cols"] = hm["rows"], hm["cols"]
            out["heatmap_selected_row"] = hm["selected_row"]
            out["heatmap_selected_col"] = hm["selected_col"]
            out["interaction_type"] = hm["combination_label"]
            out["interaction_type_text"] = hm["combination"]
        nv = self.neuron_view.state()
        out["neurons"] = nv["neurons"]
        out["gallery_neuron"] = nv["gallery_neuron"]
        out["gallery"] = nv["gallery"]
        out["path"] = self.path_view.state()
        out["embedding"] = self.embedding_view.state()
        out["concepts"] = self.concepts_view.state()
        out["busy"] = self.engine.busy
        out["progress_visible"] = self.progress_panel.visible
        out["error"] = self.engine.error
        out["notices"] = self.notices_banner.lines
        return out

    def diagnostics(self) -> dict:
        """The kernel-side state behind what the page shows, as plain values (for a bug report,
        or a browser test that fails): the selection; what the input view holds and why (the
        overlay asked for last, received last and shown; the last changes of its ``selected``,
        a click from the browser or the kernel's own highlight, and what was done with each;
        the last error raised while a message from the browser was handled); the engine's jobs
        (``Engine.snapshot``) and the threads alive."""
        p, v = self.input_panel, self.input_view
        with p._clicks_lock:
            clicks = [dict(c) for c in p.clicks]
        latest = p._latest                    # read once: a worker may reset it meanwhile
        sel = self.selection.as_dict()
        return {
            "selection": sel,
            "input_view": {
                "model_id": getattr(v, "model_id", None), "selected": dict(v.selected),
                "caption": v.caption, "score_caption": v.score_caption,
                "items_instance": p.items_instance,
                "overlay_wanted": short_repr(p._want),
                "overlay_received": short_repr(latest[0]) if latest else None,
                "overlay_shown": p.payload.get("score_caption"),
                "recent_clicks": clicks,
                "messages_from_browser": v.messages_received,
                "last_message_error": v.last_message_error},
            "engine": self.engine.snapshot(),
            "threads": sorted(t.name for t in threading.enumerate())}

    def close(self) -> None:
        """Stop the engine's worker threads and close the widget and every widget it holds
        (the views, their figures, gallery items, layouts: none keeps a comm open)."""
        engine = self.__dict__.get("engine")   # absent when the constructor failed early
        if engine is not None:
            engine.close()
        self._release_annotations()
        # the views are this widget's children, except when the constructor failed before it
        # could make them so: those built by then are closed too (a view's close() also lets
        # go of the concepts store, which the caller may share with another Explorer)
        built = [w for w in self.__dict__.values() if isinstance(w, W.Widget)]
        close_widgets(w for w in widget_tree([self, *built]) if w is not self)
        super().close()

    def __repr__(self) -> str:
        return (f"Explorer({self.adapter.name} on {getattr(self.dataset, 'name', 'dataset')}, "
                f"{len(self.dataset)} instances, {self.selection!r})")


def demo(kind: str = "easy_vqa", task: str | None = None, **kwargs) -> Explorer:
    """An Explorer on an embedded demo: "easy_vqa" (image + question) or "synthetic"
    (tabular + time series; ``task`` "planted", the default, or its "additive" twin). The
    easy-VQA demo's prediction path and neuron contributions come from the shipped stage-4
    sparse linear model (``easy_vqa.load_sparse_model``; pass ``sparse_model=None`` for the
    decision layer's own weights). Other keyword arguments go to ``Explorer``."""
    if kind not in ("easy_vqa", "synthetic"):
        raise ValueError(f"Unknown demo {kind!r}; use 'easy_vqa' or 'synthetic'.")
    if task is not None and kind != "synthetic":
        raise ValueError(f"task= chooses a synthetic task ('planted' or 'additive'); the "
                         f"{kind!r} demo has none.")
    if kind == "easy_vqa":
        from .demos.easy_vqa import WeightsError, load, load_sparse_model
        adapter, dataset = load(split="test")
        if "sparse_model" not in kwargs:
            try:
                kwargs["sparse_model"] = load_sparse_model(adapter=adapter)
            except WeightsError as e:        # the demo still opens, on the dense weights
                warn(f"{e} The demo uses the decision layer's weights meanwhile.",
                              RuntimeWarning, stacklevel=2)
    else:                                 # "synthetic" (the names are checked above)
        from .demos.synthetic import load
        adapter, dataset = load("planted" if task is None else task)
    return Explorer(adapter, dataset, **kwargs)
