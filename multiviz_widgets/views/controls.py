"""The control panel (instance, target, methods, pair), the progress bar and the error banner.

All strings from data (class names, instance descriptions, error messages) go into widgets
that render text (Label, Dropdown options, Button descriptions), never HTML.
"""
from __future__ import annotations

from typing import Callable, Sequence

import ipywidgets as W

from ..engine import Engine
from ..selection import Selection
from ._common import WrappedText, close_widgets, describe_instance, method_label, text_label

DEFAULT_METHODS = ("gradient", "grad_x_input", "integrated_gradients", "occlusion", "lime",
                   "kernel_shap")
DEFAULT_INTERACTION_METHODS = ("second_order", "pairwise_ablation", "shapley")
def _names(module: str, attr: str, default: Sequence[str]) -> list[str]:
    try:
        mod = __import__(f"multiviz_widgets.kernels.{module}", fromlist=[attr])
        return list(getattr(mod, attr))
    except Exception:  # noqa: BLE001 - a kernel module not present yet: use the known names
        return list(default)


class Controls(W.VBox):
    """Picks the instance, the target class, the methods and (with ``pairs``: more than one
    (rows, columns) pair of modalities) the heatmap's pair; shows the neuron and unit. With
    ``n_neurons`` (the decision layer's inputs) a neuron is picked by its number too (typed,
    then Enter, or the "show neuron" button): what a click on its bar does, for a keyboard.
    The number box always holds the selected neuron, -1 while there is none: the browser sends
    a number box's value only when it changes (it has no Enter event), so a box that kept a
    number no longer selected could not select it again. "show neuron" selects the typed
    number, or while none is selected the one selected last.

    Every change goes through ``selection.select`` (the same path as a click elsewhere), and
    every selection change is reflected here, the pair menu included (the selection's ``pair``).
    """

    def __init__(self, selection: Selection, n_instances: int, class_names: Sequence[str],
                 describe=None, methods: Sequence[str] | None = None,
                 interaction_methods: Sequence[str] | None = None, on_refresh=None,
                 pairs: Sequence[tuple[str, str]] | None = None, n_neurons: int | None = None):
        self.selection = selection
        self._syncing = False
        self._describe = describe or (lambda i: f"#{i}")
        self.instance = W.BoundedIntText(value=selection.instance, min=0,
                                         max=max(0, n_instances - 1), description="instance",
                                         layout=W.Layout(width="170px"))
        self.prev = W.Button(description="<", layout=W.Layout(width="32px"), tooltip="previous")
        self.next = W.Button(description=">", layout=W.Layout(width="32px"), tooltip="next")
        self.description = text_label(value="")
        self.n_instances = int(n_instances)
        self.class_names = [str(c) for c in class_names]
        # widths that fit the row in a 1280 px wide notebook (about 845 px of output); the
        # descriptions take their own width, not the default 80 px each
        self.target = W.Dropdown(options=self._target_options(), value=selection.target,
                                 description="target", style={"description_width": "initial"},
                                 layout=W.Layout(width="210px"))
        self.methods = list(methods or _names("unimodal", "METHODS", DEFAULT_METHODS))
        self.interaction_methods = list(interaction_methods or _names(
            "interactions", "INTERACTION_METHODS", DEFAULT_INTERACTION_METHODS))
        # options are (readable label, method name) pairs: the value is the method's name
        self.method = W.Dropdown(options=self._with(self.methods, selection.method),
                                 value=selection.method, description="method",
                                 style={"description_width": "initial"},
                                 layout=W.Layout(width="230px"))
        self.interaction_method = W.Dropdown(
            options=self._with(self.interaction_methods, selection.interaction_method),
            value=selection.interaction_method, description="interaction",
            style={"description_width": "initial"}, layout=W.Layout(width="270px"))
        # the heatmap's (rows, columns) modalities: a menu only when there is a choice
        self.pair = None
        if pairs is not None and len(pairs) > 1:
            options = [self._pair_option(p) for p in pairs]
            self.pair = W.Dropdown(options=options, value=selection.pair,
                                   description="pair", tooltip="heatmap rows x columns",
                                   layout=W.Layout(width="300px"))
            self.pair.observe(lambda c: self._pick(pair=c["new"]), names="value")
        self.neuron_label = text_label(value="")
        self.clear_neuron = W.Button(description="clear neuron", layout=W.Layout(width="110px"))
        # a neuron by its number (the bars and the path's nodes are for the pointer only)
        self.neuron_pick = self.neuron_go = None
        self._last_neuron = selection.neuron         # the neuron selected last (-1: none yet)
        if n_neurons is not None and int(n_neurons) > 0:
            self.neuron_pick = W.BoundedIntText(
                value=selection.neuron, min=-1, max=int(n_neurons) - 1,
                description="neuron h", style={"description_width": "initial"},
                tooltip=f"a neuron's number (0..{int(n_neurons) - 1}), then Enter; -1: none",
                layout=W.Layout(width="150px"))
            self.neuron_go = W.Button(description="show neuron", layout=W.Layout(width="110px"),
                                      tooltip="select the neuron whose number is typed (none "
                                              "typed: the one selected last), as a click on "
                                              "its bar does")
            self.neuron_pick.observe(lambda c: self._pick(neuron=c["new"]), names="value")
            self.neuron_go.on_click(lambda _: self._show_neuron())
        self.unit_label = text_label(value="")
        self.clear_unit = W.Button(description="clear unit", layout=W.Layout(width="100px"))
        # not shrunk when the row is narrow (it was cut to "recomp..."): the row wraps instead
        self.refresh_button = W.Button(
            description="recompute", layout=W.Layout(width="104px", flex="0 0 auto"),
            tooltip="compute the views again, from the model and the dataset as they are now")

        self.instance.observe(lambda c: self._pick(instance=c["new"]), names="value")
        self.prev.on_click(lambda _: self._step(-1))
        self.next.on_click(lambda _: self._step(+1))
        self.target.observe(lambda c: self._pick(target=c["new"]), names="value")
        self.method.observe(lambda c: self._pick(method=c["new"]), names="value")
        self.interaction_method.observe(lambda c: self._pick(interaction_method=c["new"]),
                                        names="value")
        self.clear_neuron.on_click(lambda _: selection.select(neuron=-1))
        self.clear_unit.on_click(lambda _: selection.select(unit=None))
        if on_refresh is not None:
            self.refresh_button.on_click(lambda _: on_refresh())
        selection.observe(self._sync, names=["instance", "target", "method",
                                             "interaction_method", "neuron", "modality", "unit",
                                             "pair"])
        self._sync(None)
        super().__init__([
            W.HBox([self.prev, self.instance, self.next, self.description]),
            W.HBox([self.target, self.method, self.interaction_method, self.refresh_button],
                   layout=W.Layout(flex_flow="row wrap")),
            W.HBox([self.neuron_label]
                   + ([self.neuron_pick, self.neuron_go] if self.neuron_pick is not None else [])
                   + [self.clear_neuron, self.unit_label, self.clear_unit]
                   + ([self.pair] if self.pair is not None else []),
                   layout=W.Layout(flex_flow="row wrap")),
        ])

    @staticmethod
    def _pair_option(pair) -> tuple[str, tuple[str, str]]:
        return f"{pair[0]} x {pair[1]}", (str(pair[0]), str(pair[1]))

    def _target_options(self):
        return [("predicted class", -1)] + [(name, i) for i, name in enumerate(self.class_names)]

    @staticmethod
    def _with(names: list, value: str) -> list[tuple[str, str]]:
        """The menu's (label, name) options of ``names``, and of ``value`` when it is not one
        of them."""
        names = list(names) if value in names else list(names) + [value]
        return [(method_label(n), n) for n in names]

    @staticmethod
    def _values(menu: W.Dropdown) -> list:
        return [v for _, v in menu.options]

    def _pick(self, **kw) -> None:
        if self._syncing:       # a menu whose options _sync replaces passes by its first one
            return
        if any(getattr(self.selection, k) != v for k, v in kw.items()):
            self.selection.select(**kw)

    def _show_neuron(self) -> None:
        """The "show neuron" button: the typed neuron, or (the box at -1) the last one."""
        j = self.neuron_pick.value
        self._pick(neuron=j if j >= 0 else self._last_neuron)

    def _step(self, d: int) -> None:
        i = min(max(0, self.selection.instance + d), self.n_instances - 1)
        self._pick(instance=i)

    def _sync(self, _change) -> None:
        self._syncing = True
        try:
            self._show_selection()
        finally:
            self._syncing = False

    def _show_selection(self) -> None:
        s = self.selection
        if 0 <= s.instance < self.n_instances:
            self.instance.value = s.instance
            # (a description that fails is a note: the selection's other observers still run)
            self.description.value = describe_instance(self._describe, s.instance)
        if s.target in dict((v, k) for k, v in self._target_options()):
            self.target.value = s.target
        for menu, name in ((self.method, s.method),
                           (self.interaction_method, s.interaction_method)):
            if name not in self._values(menu):
                menu.options = self._with(self._values(menu), name)
            menu.value = name
        pair = s.pair
        if self.pair is not None and pair is not None:
            if pair not in [v for _, v in self.pair.options]:   # e.g. select(pair=) reversed
                self.pair.options = list(self.pair.options) + [self._pair_option(pair)]
            self.pair.value = pair
        self.neuron_label.value = f"neuron: h{s.neuron}" if s.neuron >= 0 else "neuron: none"
        if s.neuron >= 0:
            self._last_neuron = s.neuron
        if self.neuron_pick is not None and s.neuron <= self.neuron_pick.max:
            # the neuron clicked elsewhere, or -1 for none: never a number not selected, which
            # typed again (no change of the box's value) would not reach the kernel
            self.neuron_pick.value = s.neuron
        if self.neuron_go is not None:
            self.neuron_go.disabled = s.neuron < 0 and self._last_neuron < 0
        self.clear_neuron.disabled = s.neuron < 0
        self.unit_label.value = (f"unit: {s.unit} of {s.modality}" if s.unit_ref else "unit: none")
        self.clear_unit.disabled = s.unit_ref is None


class ProgressPanel(W.HBox):
    """A progress bar, what runs and a cancel button, shown only while the engine has been
    busy for longer than its delay (0.3 s). Hidden, it keeps its place (visibility, not
    display): appearing for every slow click, it moved every view below it by its height, just
    as the user's pointer was on its way to the next cell."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.bar = W.FloatProgress(value=0.0, min=0.0, max=1.0, layout=W.Layout(width="220px"))
        self.label = text_label(value="")
        self.cancel = W.Button(description="Cancel", button_style="warning",
                               layout=W.Layout(width="80px"))
        self.cancel.on_click(lambda _: engine.cancel())
        super().__init__([self.bar, self.label, self.cancel],
                         layout=W.Layout(visibility="hidden"))
        engine.observe(self._update, names=["show_progress", "progress", "message"])
        self._update(None)

    @property
    def visible(self) -> bool:
        return self.layout.visibility != "hidden"

    def _update(self, _change) -> None:
        e = self.engine
        self.layout.visibility = "visible" if e.show_progress else "hidden"
        self.bar.value = float(e.progress)
        self.label.value = e.message


class _Banner(W.HBox):
    """Text the engine's trait ``trait`` gives (``text``: the widget showing it), framed in
    ``colour``, with a dismiss button that calls ``dismiss``; hidden when there is none."""

    def __init__(self, engine: Engine, text: W.Widget, trait: str, colour: str,
                 dismiss: Callable[[], None]):
        self.engine = engine
        self.text = text
        self.dismiss = W.Button(description="dismiss", layout=W.Layout(width="80px"))
        self.dismiss.on_click(lambda _: dismiss())
        super().__init__([self.text, self.dismiss],
                         layout=W.Layout(display="none", border=f"1px solid {colour}",
                                         padding="2px 6px"))
        engine.observe(self._update, names=trait)
        self._update(None)

    @property
    def visible(self) -> bool:
        return self.layout.display != "none"

    def _update(self, _change) -> None:  # pragma: no cover - each banner has its own
        raise NotImplementedError


class NoticeBanner(_Banner):
    """The caveats of the results shown (``Engine.notices``: what the kernels warned while
    computing them, such as integrated gradients that miss completeness), one line per caveat
    with the views that show it, as text; a dismiss button; hidden when there are none."""

    def __init__(self, engine: Engine):
        # one WrappedText per caveat
        super().__init__(engine, W.VBox([]), "notices", "#d9a400", engine.clear_notices)

    @property
    def lines(self) -> list[str]:
        """One line per caveat: "label, label: text" (a caveat several views share, such as one
        of the dataset's features, once, with each view's label)."""
        with self.engine.lock:
            shown = self.engine.notices
        by_text: dict[str, list[str]] = {}
        for entries in shown.values():
            for n in entries:
                labels = by_text.setdefault(n["text"], [])
                if n["label"] not in labels:
                    labels.append(n["label"])
        return [f"{', '.join(labels)}: {_without_method(text, labels)}"
                for text, labels in by_text.items()]

    def _update(self, _change) -> None:
        with self.engine.lock:          # (as the error banner: the latest value is shown last)
            lines = self.lines
            old = list(self.text.children)
            if [t.value for t in old] != lines:
                self.text.children = [WrappedText(line, width=110,
                                                  label_style={"text_color": "#7a4a00"})
                                      for line in lines]
                close_widgets(old)
            self.layout.display = "flex" if lines else "none"


def _without_method(text: str, labels: Sequence[str]) -> str:
    """``text`` without its leading "method_name: " when a label already names that method
    ("integrated gradients: integrated_gradients: ..." read twice)."""
    head, sep, rest = text.partition(": ")
    named = {part.strip().casefold() for label in labels for part in label.split(" + ")}
    if sep and head.replace("_", " ").casefold() in named:
        return rest
    return text


class ErrorBanner(_Banner):
    """The engine's last error as text (wrapped: a Label would cut the advice at the end of a
    long message), with a dismiss button; hidden when there is none."""

    def __init__(self, engine: Engine):
        super().__init__(engine, WrappedText("", width=110, label_style={"text_color": "#a00000"}),
                         "error", "#d33", engine.clear_error)

    def _update(self, _change) -> None:
        # under the engine's lock: a failure sets the error on the worker (holding it) while a
        # click clears it on the kernel's thread, and the text's lines are replaced, not set in
        # one go; the error read under the lock is the latest, so the last update shows it
        with self.engine.lock:
            msg = self.engine.error
            self.text.value = msg
            self.layout.display = "flex" if msg else "none"
