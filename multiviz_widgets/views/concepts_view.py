"""ConceptsView: the concepts of the clicked neuron and of the clicked unit, to read and edit.

Two rows of tags (:class:`~.concept_tags.ConceptTags`, which shows each tag as text, never as
HTML): one for the selected decision-level neuron, one for the selected unit of the shown
instance (or, for a modality whose units are the same feature in every instance, a tabular
column, for that feature in all of them). Typing a concept and pressing Enter adds it to the
:class:`~multiviz_widgets.annotations.Annotations` store, for the neuron or unit shown when it
was typed; the tag's cross removes it. A concept the store refuses (too long, a control
character) is not added, and the reason is shown. A menu lists every named neuron and unit;
choosing one selects it (``goto``). A line says where the concepts are saved, or why the last
save failed (they stay in memory then); when it failed because another notebook or program
changed the file meanwhile, a button takes that file's changes in beside these
(``Annotations.merge``) and saves both, and the status line then says, by name, which concepts
came in and which went (a file of another lineage, made by another store, copied over this one
is joined with these: none of these go; a copy of this same file saved over it, an older backup
or a teacher's handout, removes what it lacks, named there, and undo puts it back). An "undo"
button undoes the last edit (``Annotations.undo``; after a merge that removed concepts, those
removals) and says what it undid,
and what it skipped (a neuron or unit that a merge changed since), or why it could not. Another
line, when the file was made for another model of the same shape (``Annotations.model_note``,
also after a merge), says that its neuron concepts may not fit. A concept typed again in another
case ("STRASSE" beside "Stra\u00dfe") is said to be there already. A named unit that its
instance does not have (a hand-edited file's) cannot be gone to: a button then removes its
concepts.
"""
from __future__ import annotations

import json
import threading
from typing import Callable

import ipywidgets as W

from ..annotations import (AnnotationError, Annotations, feature_key, key_name,
                           neuron_key, same_concept, tidy_concept, unit_key)
from ..display_text import embed
from ..selection import Selection
from .concept_tags import ConceptTags
from ._common import WrappedText, text_label


class ConceptsView(W.VBox):
    """Concept tags of the selected neuron and unit, kept in ``annotations``."""

    def __init__(self, selection: Selection, annotations: Annotations,
                 unit_name: Callable[[int, str, int], str] | None = None,
                 goto: Callable[[tuple], None] | None = None, shared_units=()):
        self.selection, self.annotations = selection, annotations
        # modalities whose units are the same feature in every instance (tabular columns):
        # their concepts are named once for all instances (a feature key)
        self.shared_units = frozenset(shared_units)
        self._unit_name = unit_name
        self._goto = goto
        self._lock = threading.RLock()
        # set while the kernel itself rewrites the menu, on that thread only: such a change of
        # its value is never a person's choice
        self._listing = threading.local()
        # layouts given at construction: one set later would leave the default one open.
        # The labels are at least 260 px wide (the prompts fit in it, so the two rows' tags
        # line up) and grow for a longer text (a unit's name) rather than cutting it.
        self.neuron_label = text_label(value="", layout=_label_layout())
        self.neuron_tags = ConceptTags(layout=W.Layout(flex="1 1 300px"))
        self.unit_label = text_label(value="", layout=_label_layout())
        self.unit_tags = ConceptTags(layout=W.Layout(flex="1 1 300px"))
        # what was refused and why, and where the concepts are saved (or why they are not):
        # wrapped lines, never cut (a Label ends its text with "..." at its width)
        self.message = WrappedText("", width=110, label_style={"text_color": "#a00000"})
        self.status = WrappedText("", width=110)
        # shown only while the last save failed on a conflict (the file changed on disk)
        self.merge_button = W.Button(
            description="take in the file's changes and save",
            tooltip="Another notebook or program changed the concepts file since it was read "
                    "here: take its changes (concepts added and removed there) in beside "
                    "these, then save both",
            icon="code-fork", layout=W.Layout(width="auto", display="none"))
        self.merge_button.add_class("mvz-concepts-merge")
        self.merge_button.on_click(self._merge_file)
        # undoes the store's last edit (a tag's cross clicked by mistake); shown while there is
        # one, its tooltip says which
        self.undo_button = W.Button(description="undo", icon="undo",
                                    layout=W.Layout(width="auto", display="none"))
        self.undo_button.add_class("mvz-concepts-undo")
        self.undo_button.on_click(self._undo)
        # removes the concepts of a named key that cannot be gone to (a unit its instance does
        # not have, from a hand-edited file): shown after such a key was chosen in the menu
        self._unreachable: tuple | None = None
        self.drop_button = W.Button(description="", icon="trash",
                                    layout=W.Layout(width="auto", display="none"))
        self.drop_button.add_class("mvz-concepts-drop")
        self.drop_button.on_click(self._drop_unreachable)
        # the file was made for another model of this shape (another name or weights): said
        # for the model the store was last bound to, the one this view is made for
        self.model_line = WrappedText(_model_line(annotations.model_note), width=110,
                                      label_style={"text_color": "#8a4b00"})
        # the prompt is the first option, shown (index 0) but not a place to go (value None)
        self.named = W.Dropdown(options=[(GOTO_PROMPT, None)], index=0,
                                layout=W.Layout(width="420px"))
        self.named.observe(self._on_named, names="value")
        self.neuron_row = W.HBox([self.neuron_label, self.neuron_tags])
        self.unit_row = W.HBox([self.unit_label, self.unit_tags])
        super().__init__([W.HBox([text_label(value="concepts"), self.named]), self.neuron_row,
                          self.unit_row, self.model_line, self.message, self.status,
                          W.HBox([self.undo_button, self.merge_button, self.drop_button])])
        self.add_class("mvz-concepts-view")
        self.neuron_tags.add_class("mvz-neuron-concepts")
        self.unit_tags.add_class("mvz-unit-concepts")
        self.neuron_tags.on_edit(self._edited)
        self.unit_tags.on_edit(self._edited)
        selection.observe(lambda _: self.show(), names=["instance", "neuron", "modality", "unit"])
        annotations.observe(self._on_store)
        self.show()
        self._list_named()

    # -- what is shown ---------------------------------------------------------------------
    def neuron_key(self) -> tuple | None:
        n = self.selection.neuron
        return neuron_key(n) if n >= 0 else None

    def unit_key(self) -> tuple | None:
        """The key of the clicked unit: a feature key for a modality of shared units, else the
        unit of the shown instance."""
        ref = self.selection.unit_ref
        if ref is None:
            return None
        if ref[0] in self.shared_units:
            return feature_key(ref[0], ref[1])
        return unit_key(self.selection.instance, ref[0], ref[1])

    def show(self) -> None:
        """Write the selected neuron's and unit's concepts (and the save status) into the view."""
        with self._lock:
            s = self.selection
            nk, uk = self.neuron_key(), self.unit_key()
            self.neuron_label.value = f"neuron h{nk[1]}:" if nk else NEURON_PROMPT
            if uk is None:
                self.unit_label.value = UNIT_PROMPT.format(instance=s.instance)
            elif uk[0] == "feature":
                self.unit_label.value = (f"{self._describe_unit(s.instance, *uk[1:], every=True)}"
                                         f":")
            else:
                self.unit_label.value = f"{self._describe_unit(*uk[1:])}:"
            for tags, key in ((self.neuron_tags, nk), (self.unit_tags, uk)):
                with tags.hold_sync():
                    tags.key = _key_text(key)
                    tags.value = list(self.annotations.concepts(key)) if key else []
                    tags.disabled = key is None
                    tags.placeholder = "a concept, then Enter" if key else ""
            self._show_status()

    def _show_status(self) -> None:
        """The save status line, the model line, the merge button while a conflict stops the
        saves, and the undo button while there is an edit to undo."""
        self.status.value = self._status()
        a = self.annotations
        self.model_line.value = _model_line(a.model_note)     # a merge may have changed it
        conflicted = bool(a.save_error) and a.save_conflict and a.path is not None
        self.merge_button.layout.display = None if conflicted else "none"
        last = a.can_undo
        self.undo_button.layout.display = None if last else "none"
        self.undo_button.tooltip = f"undo the last edit: {last}" if last else ""
        self.drop_button.layout.display = None if self._unreachable is not None else "none"

    def _describe_unit(self, instance: int, modality: str, unit: int,
                       every: bool = False) -> str:
        """"#4 question unit 2 (red)", or for a feature "vitals unit 0 (hr), every instance"."""
        name = None
        if self._unit_name is not None:
            try:
                name = self._unit_name(instance, modality, unit)
            except Exception:  # noqa: BLE001 - a unit without a label is shown by its index
                name = None
        base = f"{modality} unit {unit}" if every else f"#{instance} {modality} unit {unit}"
        # the name embedded (bidi): a RIGHT-TO-LEFT OVERRIDE in a token must not reverse the
        # "), every instance:" after it
        base = f"{base} ({embed(name)})" if name else base
        return f"{base}, every instance" if every else base

    def _status(self) -> str:
        a = self.annotations
        n = len(a)
        count = f"{n} annotated" if n != 1 else "1 annotated"
        if a.save_error:
            return f"{count}; NOT SAVED (kept in memory): {a.save_error}"
        if a.unsaved and a.autosave and a.path is not None:
            # (a save that never finished and left no error: said all the same)
            return (f"{count}; NOT SAVED (kept in memory): the last save to {a.path} did not "
                    f"finish; the next change, or annotations.save(), writes them")
        if a.change_note:
            count = f"{count} ({a.change_note})"
        if a.path is None:
            return (f"{count}; kept in memory only: explorer.annotations.save('concepts.json') "
                    f"writes them to a file, and each change there from then on")
        if a.autosave:
            return f"{count}; saved to {a.path} on each change"
        return f"{count}; from {a.path} (not saved automatically: annotations.save())"

    # -- edits -----------------------------------------------------------------------------
    def _edited(self, op: str, key_text: str, text: str) -> bool:
        """An edit from the browser, for the key the row showed when it was made: whether it
        was taken (a refused one stays in the input, to correct)."""
        taken, key = True, None
        try:
            key = _key_of(key_text)
            if key is None:
                raise AnnotationError("nothing is selected to name: click a neuron or a unit "
                                      "first")
            said = ""
            if op == "add":
                before = self.annotations.concepts(key)
                after = self.annotations.add(key, text)
                if after == before:            # nothing added: said, not silent
                    said = _already(text, after, key)
            elif text in self.annotations.concepts(key):
                self.annotations.remove(key, text)
            self.message.value = said
        except AnnotationError as e:
            # typed for a neuron or unit the rows no longer show (a click elsewhere came
            # first): which one, since its row cannot take the text back
            shown = key_text in (self.neuron_tags.key, self.unit_tags.key)
            where = "" if shown or key is None else f" for {_key_name(key)}"
            self.message.value = f"not taken{where}: {e}"
            taken = False
        self.show()        # the store's (tidied) concepts, or the old ones when refused
        return taken

    def _merge_file(self, _button=None) -> None:
        """The merge button: the store's file, changed on disk by another program, merged in
        (``Annotations.merge``: concepts added and removed there are taken, these kept), then
        saved. What cannot be merged (the file is now unreadable, or made for another model) is
        said, and these concepts stay in memory."""
        a = self.annotations
        try:
            if a.path is None:
                raise AnnotationError("these concepts have no file to merge")
            a.merge(a.path)            # its change_note says what came in and what went
            if a.unsaved:                  # a store that does not save each change
                a.save()
            self.message.value = ""
        except (AnnotationError, OSError) as e:
            self.message.value = f"not merged: {e}"
        self.show()

    def _undo(self, _button=None) -> None:
        """The undo button: the store's last edit undone (``Annotations.undo``); the status
        line says what it undid."""
        try:
            self.annotations.undo()
            self.message.value = ""
        except (AnnotationError, OSError) as e:
            self.message.value = f"not undone: {e}"
        self.show()          # (the menu follows the store: its observer lists it again)

    def _drop_unreachable(self, _button=None) -> None:
        """The button shown after a named key that cannot be gone to was chosen: its concepts
        removed (undo puts them back)."""
        key, self._unreachable = self._unreachable, None
        if key is not None:
            try:
                self.annotations.set(key, [])
                self.message.value = ""
            except (AnnotationError, OSError) as e:
                self.message.value = f"not removed: {e}"
        self.show()          # (the menu follows the store: its observer lists it again)

    def _on_store(self, key) -> None:
        if key is None or key in (self.neuron_key(), self.unit_key()):
            self.show()
        else:
            with self._lock:
                self._show_status()
        self._list_named()

    # -- the menu of named neurons and units -------------------------------------------------
    def _list_named(self) -> None:
        """The menu's options: every annotated key with its concepts (as text)."""
        with self._lock:           # read and shown in one go: an older list never comes last
            options = [(GOTO_PROMPT, None)]
            for key in self.annotations.keys():
                label = f"{_key_name(key)}: {', '.join(self.annotations.concepts(key))}"
                options.append((label if len(label) <= 90 else label[:89] + "\u2026", key))
            self._listing.on = True
            try:
                self.named.options = options
                self._show_prompt()
            finally:
                self._listing.on = False

    def goto(self, key) -> None:
        """Select what ``key`` names (what choosing it in the menu does)."""
        if self._goto is None:
            return
        key = tuple(key)
        try:
            self._goto(key)
            self.message.value = ""
            self._unreachable = None
        except (ValueError, IndexError) as e:
            concepts = self.annotations.concepts(key) if key in self.annotations else ()
            self._unreachable = key if concepts else None
            what = (f"; its concepts ({', '.join(concepts)}) stay in the file until the button "
                    f"below removes them" if concepts else "")
            self.message.value = f"cannot go to {_key_name(key)}: {e}{what}"
            self.drop_button.description = f"remove the concepts of {_key_name(key)}"
        with self._lock:
            self._show_status()

    def _on_named(self, change) -> None:
        if getattr(self._listing, "on", False) or change["new"] is None:
            return
        self.goto(change["new"])
        with self._lock:
            self._listing.on = True
            try:
                self._show_prompt()                # the menu is for going, not a state
            finally:
                self._listing.on = False

    def _show_prompt(self) -> None:
        """Show the menu's prompt: its first option, by index. A value of None alone leaves no
        option selected (index None: a blank menu in the browser); and ipywidgets turns an
        index of 0 set over another option into None (its value, None, reads as "no
        selection"), so the value is cleared first and the index set after it."""
        with self.named.hold_sync():
            self.named.value = None
            self.named.index = 0

    def state(self) -> dict:
        return {"neuron": list(self.neuron_tags.value), "unit": list(self.unit_tags.value),
                "neuron_label": self.neuron_label.value, "unit_label": self.unit_label.value,
                "message": self.message.value, "status": self.status.value,
                "model_note": self.model_line.value}

    def close(self) -> None:
        self.annotations.unobserve(self._on_store)
        super().close()


GOTO_PROMPT = "go to a named neuron or unit"
#: What the concept rows say while nothing is selected (short: they fit their 260 px label).
NEURON_PROMPT = "neuron: click a bar to name it"
UNIT_PROMPT = "unit: click a unit of #{instance} to name it"


def _label_layout() -> W.Layout:
    return W.Layout(min_width="260px", max_width="50%", flex="0 1 auto")


def _model_line(note: str | None) -> str:
    """The line of a store's ``model_note`` ("" for none)."""
    return f"These concepts were {note} (check a few)." if note else ""


def _key_name(key: tuple) -> str:
    """A key as the menu and the messages name it (the store's ``key_name``: "h3", "#5 image
    unit 27", "vitals unit 0 (every instance)"); what is not a key, quoted and cut."""
    if (key[:1], len(key)) in ((("neuron",), 2), (("feature",), 3), (("unit",), 4)):
        return key_name(key)
    text = repr(key)                        # not a key (refused as such): quoted, cut
    return text if len(text) <= 60 else f"{text[:59]}\u2026"


def _already(text: str, concepts: tuple, key: tuple) -> str:
    """What to say when an add added nothing: the concept is there already, maybe in another
    spelling ("'STRASSE' is there already as 'Stra\u00dfe'")."""
    try:
        typed = tidy_concept(text)         # tidied as the store tidies it
    except AnnotationError:
        return ""
    there = next((c for c in concepts if same_concept(c) == same_concept(typed)), None)
    if there is None:
        return ""
    if there == typed:
        return f"{there!r} is there already on {_key_name(key)}: nothing added"
    return (f"{typed!r} is there already on {_key_name(key)} as {there!r} (concepts "
            f"are the same whatever their case or spaces): nothing added; to respell it, "
            f"remove {there!r} first")


def _key_text(key: tuple | None) -> str:
    """The key as the browser carries it (JSON), "" for none."""
    return "" if key is None else json.dumps(list(key))


def _key_of(text: str) -> tuple | None:
    """The key a browser edit names (checked by the store when used), None for none."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise AnnotationError(f"the edit names no key the Explorer knows ({text[:60]!r})") from None
    return tuple(value) if isinstance(value, list) else (value,)
