"""ConceptTags: concepts shown as tags, each removable, and an input that adds one on Enter.

An anywidget (ESM in js/concept_tags.js, bundled into multiviz_widgets/static/). Unlike
ipywidgets' TagsInput, whose Enter JupyterLab takes for a notebook shortcut (the tag is only
added when the input loses focus), its input keeps the keys typed into it, and it can be
disabled. Tags are set as text in the browser, never as HTML.

The browser never sets ``value``: an edit comes as a message {"op": "add" | "remove", "key",
"text"} naming the ``key`` the row showed when the person typed, and goes to the callbacks
registered with :meth:`on_edit`; the kernel answers by setting ``value``. So an edit sent just
before a click on another neuron still lands on the neuron it was typed for, and changes only
the concept typed or removed. An "add" is answered too, {"op": "answer", "key", "text",
"taken"} (key: the one the add named; taken: no callback returned False): the browser puts a
refused text back into its emptied input, to be corrected rather than typed again, when the
row still shows that key (else the text would land on another neuron's or unit's input; the
owner's message says which key refused it).
"""
from __future__ import annotations

from typing import Any, Callable

import anywidget
import traitlets

from ._common import answer_ping
from .input_view import STATIC, check_bundle, esm_of

_ESM_PATH = STATIC / "concept_tags.js"

EditCallback = Callable[[str, str, str], "bool | None"]


class ConceptTags(anywidget.AnyWidget):
    """value: the concepts shown (a list of strings); key: what they belong to (a string the
    owner chooses, sent back with each edit); disabled: no editing; placeholder: the input's
    hint."""

    _esm = esm_of(_ESM_PATH)

    value = traitlets.List(traitlets.Unicode()).tag(sync=True)
    key = traitlets.Unicode("").tag(sync=True)
    disabled = traitlets.Bool(False).tag(sync=True)
    placeholder = traitlets.Unicode("").tag(sync=True)

    def __init__(self, **kwargs: Any):
        check_bundle(_ESM_PATH, "ConceptTags")
        super().__init__(**kwargs)
        self._edit_callbacks: list[EditCallback] = []
        self.last_answer: dict | None = None    # what the last "add" was answered
        self.on_msg(self._on_message)

    def on_edit(self, callback: EditCallback) -> None:
        """Call ``callback(op, key, text)`` for each edit from the browser (op "add"/"remove");
        a callback that refuses the edit returns False."""
        self._edit_callbacks.append(callback)

    def edit(self, op: str, text: str, key: str | None = None) -> None:
        """What the browser sends when a person types ``text`` + Enter (op "add") or clicks a
        tag's cross (op "remove"), for ``key`` (default: the one shown now)."""
        self._on_message(self, {"op": op, "key": self.key if key is None else key,
                                "text": text}, [])

    def _on_message(self, _widget, content, _buffers) -> None:
        if answer_ping(self, content):
            return
        if not isinstance(content, dict) or content.get("op") not in ("add", "remove"):
            return                          # not an edit (anything else the front end sends)
        op, key, text = content["op"], content.get("key"), content.get("text")
        if not isinstance(key, str) or not isinstance(text, str):
            return
        taken = True
        for callback in list(self._edit_callbacks):
            taken = callback(op, key, text) is not False and taken
        if op == "add":
            self.last_answer = {"op": "answer", "key": key, "text": text, "taken": taken}
            self.send(self.last_answer)
