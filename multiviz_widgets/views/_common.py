"""Small helpers shared by the views: closing the widgets a view replaces, instance titles,
asking again for what a cancel stopped, data quoted or isolated in the app's sentences."""
from __future__ import annotations

import re
import textwrap
from typing import Callable, Iterable

import ipywidgets as W
import numpy as np

from ..display_text import isolate
from ..progress import Cancelled
from ..selection import FIELDS, Selection


#: What the method menus show for each method name (the name stays the menu's value: what the
#: selection holds and the kernels take). A name without an entry is shown as it is.
METHOD_LABELS = {
    "gradient": "gradient", "grad_x_input": "gradient x input",
    "integrated_gradients": "integrated gradients", "occlusion": "occlusion", "lime": "LIME",
    "kernel_shap": "KernelSHAP", "second_order": "second-order gradients",
    "pairwise_ablation": "pairwise ablation", "shapley": "Shapley interactions",
}


def method_label(name: str) -> str:
    """The readable name of a method ("integrated gradients" for integrated_gradients)."""
    return METHOD_LABELS.get(name, str(name))


def colour_limit(values) -> float | None:
    """The largest |value| among the finite ones (the full-colour end of a symmetric scale), or
    None when there is none above 0. The heatmap's colour bar and the input view's overlay of a
    unit's interactions both take it, so the two are on one scale."""
    v = np.abs(np.asarray(values, dtype=np.float64))
    v = v[np.isfinite(v)]
    top = float(v.max()) if v.size else 0.0
    return top if top > 0 else None


def text_label(value: str = "", **kwargs) -> W.Label:
    """A ``W.Label`` whose text shows as it is. ipywidgets' Label runs the notebook's LaTeX
    typesetter over its value, so in JupyterLab a class name or a concept such as "costs $5 to
    $10" lost its dollar signs to MathJax; MathJax skips an element of class mathjax_ignore."""
    label = W.Label(value=value, **kwargs)
    label.add_class("mathjax_ignore")
    return label


class WrappedText(W.VBox):
    """Text of any length shown as text (never HTML), wrapped into lines of at most ``width``
    characters, one ``text_label`` each: a Label cuts its text at its width, and an HTML widget
    would read the text as markup. ``value`` sets the text ("" hides the widget). 80 characters
    fit 600 px of JupyterLab's 13 px font. label_style: each line's style (a colour)."""

    def __init__(self, value: str = "", width: int = 80, label_style: dict | None = None,
                 **kwargs):
        super().__init__([], **kwargs)
        self.width = int(width)
        self.label_style = dict(label_style or {})
        self._value = ""
        self.value = value

    @property
    def value(self) -> str:
        return self._value

    @value.setter
    def value(self, text: str) -> None:
        self._value = str(text)
        lines = textwrap.wrap(self._value, self.width) if self._value else []
        old = list(self.children)
        if len(old) == len(lines):          # as many lines as before: their labels kept
            for label, line in zip(old, lines):
                label.value = line
        else:
            self.children = [text_label(value=line, style=dict(self.label_style))
                             for line in lines]
            close_widgets(old)
        self.layout.display = None if lines else "none"


def answer_ping(widget: W.DOMWidget, content) -> bool:
    """Answer a view's "ping" (js/lib/kernel_link.js) with a "pong"; whether it was one. A view
    that gets no answer says so: anywidget drops every kernel message to a model whose set-up
    in the page took over 2 s, and only a reload mends it."""
    if isinstance(content, dict) and content.get("op") == "ping":
        try:
            widget.send({"op": "pong"})
        except Exception:  # noqa: BLE001 - no front end (a closed comm): nobody to answer
            pass
        return True
    return False


def failure_text(err: BaseException, limit: int = 160) -> str:
    """How a view's caption names a failure: the exception's type and the start of its
    message, on one line (the banner, which shows it whole, is cleared by the next click)."""
    name, message = type(err).__name__, " ".join(str(err).split())
    if isinstance(err, Cancelled) or not message:
        return name
    if len(message) > limit:
        message = message[:limit - 1].rstrip() + "\u2026"
    return f"{name}: {message}"


class RetryAfterCancel:
    """The requests of a view that a cancel stopped, asked again on the next change of the
    selection (whatever it is): a cancel is the person's choice, not the data's fault, and
    must not leave the view blank until "recompute". Make it after the view's own observers
    of the selection: a change that a view asks again on anyway calls ``asked`` first, and
    the request is then not made twice."""

    def __init__(self, selection: Selection):
        self.pending: dict[str, Callable[[], None]] = {}
        selection.observe(self._again, names=list(FIELDS))

    def asked(self, name: str) -> None:
        """Request ``name`` is being made (again): nothing to retry for it."""
        self.pending.pop(name, None)

    def failed(self, name: str, ask: Callable[[], None], err: BaseException) -> str:
        """Request ``name`` failed with ``err``: when it was cancelled, ``ask`` is called on
        the next change of the selection. Returns the words to add to the view's caption."""
        if isinstance(err, Cancelled):
            self.pending[name] = ask
            return "; asked again on the next click"
        self.pending.pop(name, None)
        return ""

    def _again(self, _change) -> None:
        pending, self.pending = self.pending, {}
        for ask in pending.values():
            ask()


def widget_tree(roots: Iterable[W.Widget]) -> list[W.Widget]:
    """Every widget reachable from ``roots`` through their synced traits (children, layout,
    style, a figure's marks, axes and scales, ...), each once, roots included."""
    seen: dict[int, W.Widget] = {}
    stack = [w for w in roots if isinstance(w, W.Widget)]
    while stack:
        w = stack.pop()
        if id(w) in seen:
            continue
        seen[id(w)] = w
        for name in w.keys:
            try:
                value = getattr(w, name)
            except Exception:  # noqa: BLE001 - a trait that cannot be read holds no widget
                continue
            if isinstance(value, W.Widget):
                stack.append(value)
            elif isinstance(value, (list, tuple)):
                stack.extend(v for v in value if isinstance(v, W.Widget))
            elif isinstance(value, dict):
                stack.extend(v for v in value.values() if isinstance(v, W.Widget))
    return list(seen.values())


def close_widgets(roots: Iterable[W.Widget]) -> None:
    """Close ``roots`` and every widget they hold (so no comm of them stays open in the
    kernel). Only for widgets that nothing else shows: a widget shared with a view that
    stays open must not be reachable from ``roots``."""
    for w in widget_tree(roots):
        w.close()


def describe_instance(describe: Callable[[int], object], index: int) -> str:
    """``describe(index)`` as text (a dataset's ``describe``), or, when it raises, a short note
    of why there is none: "(no description: KeyError: 'id 3')". A description is for display
    only, and a dataset whose metadata lacks a row must not stop its instance from being
    selected or shown (the note goes where the description would, e.g. in ``instance_title``)."""
    try:
        return str(describe(index))
    except Exception as e:  # noqa: BLE001 - the data's fault, said where it shows
        return f"(no description: {failure_text(e, 80)})"


def instance_title(index: int, description, isolated: bool = False) -> str:
    """"#4 a red circle", or just "#4" when the description is empty or is "#4" itself
    (a dataset without descriptions). isolated: the description as ``isolate`` gives it (for
    a line that goes on after it)."""
    desc = "" if description is None else str(description)
    if desc in ("", f"#{index}"):
        return f"#{index}"
    return f"#{index} {isolate(desc) if isolated else desc}"


#: an image patch's name, as ``Image.unit_labels`` gives it ("patch r6c0")
_PATCH_NAME = re.compile(r"patch r\d+c\d+")


#: how to read an image patch's name
PATCH_NAMES = ("a patch rRcC is the patch in row R, column C of the image's grid (counted from "
               "0, at the top left)")


def names_patches(labels) -> bool:
    """Whether ``labels`` name an image patch ("patch r6c0")."""
    return any(_PATCH_NAME.fullmatch(str(x)) for x in labels)


def patch_names_key(labels) -> str:
    """"; a patch rRcC is ..." (``PATCH_NAMES``) when ``labels`` name an image patch, for a
    caption beside them; else ""."""
    return f"; {PATCH_NAMES}" if names_patches(labels) else ""
