"""ConceptTags: concepts shown as tags, each removable, and an input that adds one on Enter.

An anywidget (ESM in js/concept_tags.js, bundled into multiviz_widgets/static/). Unlike
ipywidgets' TagsInput, whose Enter JupyterLab takes for a notebook shortcut (the tag is only
added when the input loses focus), its input keeps the keys typed into it, and it can be
disabled. Tags are set as text in the browser, never as HTML.
"""
from __future__ import annotations

import pathlib
from typing import Any

import anywidget
import traitlets

from .input_view import check_bundle

_ESM_PATH = pathlib.Path(__file__).resolve().parent.parent / "static" / "concept_tags.js"


class ConceptTags(anywidget.AnyWidget):
    """value: the concepts shown (a list of strings); disabled: no editing; placeholder: the
    input's hint."""

    # Import must work without the bundle (so the error can say what to do); __init__ checks it.
    _esm = _ESM_PATH if _ESM_PATH.is_file() else "export default { render() {} };"

    value = traitlets.List(traitlets.Unicode()).tag(sync=True)
    disabled = traitlets.Bool(False).tag(sync=True)
    placeholder = traitlets.Unicode("").tag(sync=True)

    def __init__(self, **kwargs: Any):
        check_bundle(_ESM_PATH, "ConceptTags")
        super().__init__(**kwargs)
