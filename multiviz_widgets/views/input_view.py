"""InputView: one instance's inputs, coloured by per-unit scores, with clickable units.

The view is an anywidget (ESM in js/input_view.js, bundled into multiviz_widgets/static/). It
only renders what it is given: ``items`` (built by :func:`input_items` from an adapter and a raw
instance), ``scores`` {modality: [one float per unit]}, captions and ``concepts`` (what people
named the units: marked on them, listed when the pointer rests on one). A click in the browser
sets ``selected`` = {"modality": name, "unit": index}; Python may set it too, to highlight a unit.
"""
from __future__ import annotations

import base64
import io
import pathlib
import traceback
from typing import Any, Mapping

import numpy as np
import torch
import traitlets

import anywidget

from ..adapter import ModelAdapter, Prepared
from ..checks import is_integer
from ._common import answer_ping

#: the built JavaScript of the views (esbuild, from js/)
STATIC = pathlib.Path(__file__).resolve().parent.parent / "static"
_ESM_PATH = STATIC / "input_view.js"

#: Longest side, in screen pixels, at which images are shown (small images are scaled up).
DISPLAY_SIZE = 256


class BundleMissingError(RuntimeError):
    """The built JavaScript of a view is missing (run ``make js``)."""


def check_bundle(path: pathlib.Path, view: str) -> pathlib.Path:
    """``path``, the built JavaScript of ``view``; a BundleMissingError that says how to build
    it when it is missing."""
    if not path.is_file():
        raise BundleMissingError(
            f"The {view} JavaScript bundle {path} is missing: run `make js` (npm install "
            "and npm run build) in the repository root to build js/*.js into "
            "multiviz_widgets/static/.")
    return path


def esm_of(path: pathlib.Path):
    """A view's ``_esm``: its bundle's text, or while that is missing a placeholder, so that
    importing the view works and its ``__init__`` (``check_bundle``) can say how to build it.
    The text, not the path: anywidget turns a path into a file object of the class, whose
    change signal then holds every view ever made (manzt/anywidget#929), so that no closed
    Explorer, nor the user's model it holds, was ever freed."""
    return path.read_text(encoding="utf-8") if path.is_file() else "export default { render() {} };"


def _check_bundle() -> pathlib.Path:
    return check_bundle(_ESM_PATH, "InputView")


class InputView(anywidget.AnyWidget):
    """Inputs of one instance with score overlays (diverging colours, symmetric around 0).

    items: per-modality payloads from :func:`input_items`.
    scores: {modality name: [score per unit]}; modalities without scores are shown plain.
    score_caption: what the scores are (e.g. "gradient x input for class 'yes'").
    scales: {modality name: the |score| drawn at full colour}; a modality with scores but no
    scale is drawn to its own largest |score|. The legend prints each modality's scale. (A
    unit's interactions take the heatmap's scale, so that a weak row does not look as strong
    as the matrix's strongest pair.)
    selected: {"modality": name, "unit": index} of the highlighted unit, or {}. Where the items
    carry the instance they show (``"instance"``, as the Explorer's do), a click from the
    browser sends it too ({..., "instance": i}, in ``incoming`` while it is handled): the value
    kept drops it.
    caption: a line above the inputs (e.g. the instance and the prediction).
    concepts: {modality name: {unit index (as text, JSON's keys): [concept, ...]}}: the units
    people named (see ``multiviz_widgets.annotations``); each is marked, and its concepts are
    part of the text shown when the pointer rests on it (as text, never HTML).
    """

    _esm = esm_of(_ESM_PATH)

    items = traitlets.List(traitlets.Dict()).tag(sync=True)
    scores = traitlets.Dict().tag(sync=True)
    score_caption = traitlets.Unicode("").tag(sync=True)
    scales = traitlets.Dict().tag(sync=True)
    selected = traitlets.Dict().tag(sync=True)
    caption = traitlets.Unicode("").tag(sync=True)
    concepts = traitlets.Dict().tag(sync=True)

    #: How many state messages came from the browser, and the traceback of the last exception
    #: raised while one was handled (e.g. in an observer of ``selected``): ipywidgets shows such
    #: an exception only as a kernel error message, which a dashboard (Voila) displays nowhere.
    messages_received = 0
    last_message_error = ""
    #: The state the browser sent, while it is being handled (else None).
    incoming: dict | None = None
    #: Held while a state message from the browser is applied (the Explorer gives its engine's
    #: lock): ipywidgets keeps one set of sync bookkeeping per widget, so a click applied while
    #: a worker sends this view a result could lose one of the two.
    state_lock = None

    def __init__(self, **kwargs: Any):
        _check_bundle()
        super().__init__(**kwargs)
        self.on_msg(lambda _widget, content, _buffers: answer_ping(self, content))

    def set_state(self, sync_data):
        """A state message from the browser (a click sets ``selected``)."""
        self.messages_received += 1
        self.incoming = dict(sync_data)
        try:
            if self.state_lock is None:
                super().set_state(sync_data)
            else:
                with self.state_lock:
                    super().set_state(sync_data)
        except Exception:
            self.last_message_error = traceback.format_exc()[-4000:]
            # a refused value stays in the browser otherwise (e.g. a highlight the kernel does
            # not know): send the kernel's values of what the message set back
            keys = [k for k in sync_data if k in self.keys]
            if keys:
                try:
                    self.send_state(keys)
                except Exception:  # noqa: BLE001 - no front end (a closed comm): nothing to fix
                    pass
            raise
        finally:
            self.incoming = None

    @traitlets.validate("scores")
    def _validate_scores(self, proposal):
        out = {}
        for name, values in (proposal["value"] or {}).items():
            arr = np.asarray(values, dtype=np.float64).reshape(-1)
            # JSON has no NaN/inf: send None for them, which the view shows uncoloured.
            out[str(name)] = [float(v) if np.isfinite(v) else None for v in arr]
        return out

    @traitlets.validate("scales")
    def _validate_scales(self, proposal):
        out = {}
        for name, value in (proposal["value"] or {}).items():
            try:
                v = float(value)
            except (TypeError, ValueError):
                raise traitlets.TraitError(f"InputView scales: {name!r} must be a number (the "
                                           f"|score| drawn at full colour), got {value!r}.")
            if np.isfinite(v) and v > 0:        # else: the modality's own largest |score|
                out[str(name)] = v
        return out

    @traitlets.validate("concepts")
    def _validate_concepts(self, proposal):
        out = {}
        for name, units in (proposal["value"] or {}).items():
            if not isinstance(name, str) or not isinstance(units, Mapping):
                raise traitlets.TraitError(
                    f"concepts must be {{modality name: {{unit index: [concept, ...]}}}}, got "
                    f"{name!r}: {type(units).__name__}.")
            shown = {}
            for u, names in units.items():
                if not is_integer(u) and not (isinstance(u, str) and u.isascii()
                                              and u.isdigit()):
                    raise traitlets.TraitError(
                        f"concepts of {name!r}: a unit is named by its index, got {u!r}.")
                if (not isinstance(names, (list, tuple))
                        or not all(isinstance(c, str) for c in names)):
                    raise traitlets.TraitError(
                        f"concepts of {name!r} unit {u}: a list of texts, got {names!r}.")
                if len(names):
                    shown[str(int(u))] = list(names)
            if shown:
                out[name] = shown
        return out

    @traitlets.validate("selected")
    def _validate_selected(self, proposal):
        sel = proposal["value"] or {}
        if not sel:
            return {}
        if not isinstance(sel, dict) or "modality" not in sel or "unit" not in sel:
            raise traitlets.TraitError(
                f"selected must be {{'modality': name, 'unit': index}} or {{}}, got {sel!r}.")
        m, u = sel["modality"], sel["unit"]
        # as the Selection: a float or a bool index is refused, not truncated to another unit
        if not isinstance(m, str) or not is_integer(u):
            raise traitlets.TraitError(
                f"selected must be {{'modality': name, 'unit': index}} with a modality's name and "
                f"an integer index, got {sel!r}.")
        return {"modality": m, "unit": int(u)}

    def show(self, adapter: ModelAdapter, raw_instance: Mapping, prepared: Prepared | None = None,
             caption: str | None = None) -> None:
        """Show a new instance (clears scores and selection)."""
        with self.hold_sync():
            self.items = input_items(adapter, raw_instance, prepared)
            self.scores = {}
            self.scales = {}
            self.score_caption = ""
            self.selected = {}
            if caption is not None:
                self.caption = caption


# -- payloads -------------------------------------------------------------------------------

def _png_data_url(chw: torch.Tensor) -> str:
    """A PNG data URL of an image tensor [C, H, W] with values in [0, 1]."""
    from PIL import Image as PILImage

    arr = chw.detach().cpu().float().numpy()
    c = arr.shape[0]
    if c == 1:
        arr = np.repeat(arr, 3, axis=0)
    elif c == 2:
        arr = np.concatenate([arr, np.zeros_like(arr[:1])], axis=0)
    elif c > 3:
        arr = arr[:3]
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:  # normalised inputs: stretch to [0, 1] for display
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    img = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0)
    buf = io.BytesIO()
    PILImage.fromarray(img, "RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _image_item(m, x: torch.Tensor, labels: list[str]) -> dict:
    h, w = int(x.shape[-2]), int(x.shape[-1])
    scale = max(1.0, DISPLAY_SIZE / max(h, w))
    item = {"src": _png_data_url(x), "height": h, "width": w,
            "display_height": int(round(h * scale)), "display_width": int(round(w * scale)),
            "labels": labels}
    if getattr(m, "superpixels", None):
        seg = m.unit_index(x)[0]
        item.update(segments=[int(v) for v in seg.reshape(-1)], n_units=int(seg.max()) + 1)
    else:
        rows, cols = m.grid(x)
        item.update(rows=int(rows), cols=int(cols), patch=int(m.patch))
    return item


def _text_item(m, raw, ids: torch.Tensor, labels: list[str]) -> dict:
    ids = ids.reshape(-1)
    model_tokens = m.tokens(ids)
    n = len(model_tokens)
    words = m.tokenize(raw) if isinstance(raw, str) else None
    if words is None or len(words) != n:  # ids given, or a tokenizer that changed the length
        words = model_tokens if words is None else (list(words) + model_tokens[len(words):])[:n]
    # Trailing [PAD] of a batch of one never occurs, but keep the payload aligned to the units.
    return {"tokens": [str(t) for t in words], "model_tokens": [str(t) for t in model_tokens],
            "labels": labels}


def _tabular_item(m, x: torch.Tensor, labels: list[str]) -> dict:
    units = m.unit_index(x)
    return {"columns": [str(c) for c in m.columns],
            "values": [float(v) for v in x.detach().cpu().double().reshape(-1)],
            "units": [int(u) for u in units.reshape(-1)],
            "unit_labels": [str(g) for g in m.group_names], "labels": labels}


def _series_item(m, x: torch.Tensor, labels: list[str]) -> dict:
    names = ["+".join(m.channels[c] for c in g) for g in m.groups]
    vals = x.detach().cpu().double().numpy()
    return {"channels": [str(c) for c in m.channels], "groups": [list(map(int, g)) for g in m.groups],
            "group_names": names, "window": int(m.window), "n_windows": int(m.n_windows(x)),
            "values": [[float(v) if np.isfinite(v) else None for v in row] for row in vals],
            "labels": labels}


def input_items(adapter: ModelAdapter, raw_instance: Mapping,
                prepared: Prepared | None = None) -> list[dict]:
    """The InputView payload of one instance: one dict per modality, in the adapter's order.

    Every dict has "name", "kind" ("image", "text", "tabular", "timeseries" or the modality's
    own kind), "n_units" and "labels" (one per unit), plus what the browser needs to draw it:
    image: "src" (PNG data URL), "height", "width", "display_*", and "rows", "cols", "patch" for
    a patch grid or "segments" (unit of every pixel, row-major) for superpixels;
    text: "tokens" (the original words, e.g. the question as written, one per unit) and
    "model_tokens" (the vocabulary entries the model sees, e.g. [UNK]);
    tabular: "columns", "values", "units" (the unit of every column), "unit_labels";
    timeseries: "channels", "groups", "group_names", "window", "n_windows", "values" [T][C].
    Cost: no forward pass (prepare() is called when ``prepared`` is not given).
    """
    if prepared is None:
        prepared = adapter.prepare(raw_instance)
    items = []
    for name, m in adapter.modalities.items():
        x = prepared.raw[name][0]
        labels = [str(lab) for lab in prepared.labels[name]]
        item = {"name": name, "kind": m.kind, "n_units": int(prepared.n_units[name]),
                "labels": labels}
        if m.kind == "image":
            item.update(_image_item(m, x, labels))
        elif m.kind == "text":
            item.update(_text_item(m, raw_instance[name], x, labels))
        elif m.kind == "tabular":
            item.update(_tabular_item(m, x, labels))
        elif m.kind == "timeseries":
            item.update(_series_item(m, x, labels))
        items.append(item)
    return items
