"""Concept annotations: what a person says a decision-level neuron or an input unit stands for.

A neuron ("h12 responds to red shapes"), a unit of one instance ("patch 27 of #5 is the
circle") or a feature, a unit that is the same in every instance ("the column hr is a vital
sign"), gets a list of concepts, short texts. They are kept in an :class:`Annotations` store that
saves to a JSON file, to share and to open again:

    ann = Annotations("concepts.json")          # reads the file if it exists; saves on each change
    ann.add(neuron_key(12), "red")
    ann.add(unit_key(5, "image", 27), "circle")
    ann.concepts(neuron_key(12))                # ('red',)
    ann.find("red")                             # [('neuron', 12)]
    ann.merge("colleague.json")                 # their concepts added to ours

``Explorer(..., annotations="concepts.json")`` shows and edits them beside the clicked neuron
and unit. Nothing a person saved is lost:

* a file that cannot be read as annotations (not JSON, another format, a newer version, values of
  the wrong kind, made for another model) raises :class:`AnnotationError` and is never written
  over;
* a save writes a temporary file beside the target and renames it (a crash leaves the old file
  or the new one, never half of one);
* a file changed on disk by someone else since this store read or wrote it is not written over:
  the save raises :class:`AnnotationConflict`; ``merge(path)`` takes their concepts in, after
  which a save goes through;
* a store that saves on each change and cannot (a read-only folder, a conflict) keeps every
  change in memory, says why in ``save_error`` and tells its observers; the next save that works
  writes them all.

Within one Python process, ``Annotations.open(path)`` gives every caller the same store for the
same file, so two Explorers on one file see each other's concepts at once.

Concepts are plain text: the views render them as text, never as HTML. This module imports no
widget library (the engine layer).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import unicodedata
import weakref
from pathlib import Path
from typing import Callable, Iterable

from .atomic_file import write_atomically
from .checks import is_integer

__all__ = ["Annotations", "AnnotationError", "AnnotationConflict", "neuron_key", "unit_key",
           "feature_key",
           "model_signature", "dataset_signature", "FORMAT", "VERSION", "MAX_CONCEPT_LENGTH"]

FORMAT = "multiviz-annotations"
VERSION = 2        # 2: "features" (version 1 had neurons and units; it is read as well)
MAX_CONCEPT_LENGTH = 200
# what a signature compares: two models that differ here cannot share neuron or unit concepts
SIGNATURE_FIELDS = ("modalities", "classes", "neurons", "features")


class AnnotationError(ValueError):
    """A concept, key or annotations file that cannot be taken; the message says how to fix it."""


class AnnotationConflict(AnnotationError):
    """The file changed on disk since this store read or wrote it; it was not written over."""


# ---------------------------------------------------------------------------------------------
# keys and concepts
# ---------------------------------------------------------------------------------------------
def _index(value, what: str) -> int:
    """``value`` as an index of at least 0 (``what`` says what it indexes, in the error)."""
    if not is_integer(value) or int(value) < 0:
        raise AnnotationError(f"{what} is an index of at least 0, got {value!r}.")
    return int(value)


def _modality(name) -> str:
    if not isinstance(name, str) or not name:
        raise AnnotationError(f"A modality is its name (a non-empty string), got {name!r}.")
    return name


def neuron_key(neuron) -> tuple:
    """The key of a decision-level neuron: ("neuron", j)."""
    return ("neuron", _index(neuron, "A neuron"))


def unit_key(instance, modality, unit) -> tuple:
    """The key of a unit of one instance: ("unit", instance, modality, unit)."""
    return ("unit", _index(instance, "An instance (a dataset index)"), _modality(modality),
            _index(unit, "A unit"))


def feature_key(modality, unit) -> tuple:
    """The key of a unit that is the same feature in every instance (a tabular column):
    ("feature", modality, unit)."""
    return ("feature", _modality(modality), _index(unit, "A unit"))


def _key(key) -> tuple:
    """``key`` checked: ("neuron", j), ("unit", instance, modality, unit) or ("feature",
    modality, unit)."""
    if isinstance(key, (tuple, list)) and key:
        if key[0] == "neuron" and len(key) == 2:
            return neuron_key(key[1])
        if key[0] == "unit" and len(key) == 4:
            return unit_key(*key[1:])
        if key[0] == "feature" and len(key) == 3:
            return feature_key(*key[1:])
    raise AnnotationError(f"A key is ('neuron', j), ('unit', instance, modality, unit) or "
                          f"('feature', modality, unit) (see neuron_key, unit_key and "
                          f"feature_key), got {key!r}.")


def _concept(text) -> str:
    """``text`` checked and tidied (outer spaces stripped): a short line of printable text."""
    if not isinstance(text, str):
        raise AnnotationError(f"A concept is a string, got {type(text).__name__} {text!r}.")
    text = text.strip()
    if not text:
        raise AnnotationError("A concept cannot be empty or only spaces.")
    if len(text) > MAX_CONCEPT_LENGTH:
        raise AnnotationError(f"A concept has at most {MAX_CONCEPT_LENGTH} characters, got "
                              f"{len(text)} ({text[:40]!r}...); keep it to a short name.")
    # control and format characters, line breaks, and lone surrogates (which no file can hold)
    bad = [c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp")]
    if bad:
        raise AnnotationError(f"A concept is one line of printable text; {text[:60]!r} holds "
                              f"the control character {bad[0]!r}.")
    return text


def _concepts(values) -> tuple[str, ...]:
    """A list of concepts checked, duplicates dropped (the first kept), order kept."""
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise AnnotationError(f"Concepts are a list of strings, got {values!r}.")
    out: list[str] = []
    for v in values:
        v = _concept(v)
        if v not in out:
            out.append(v)
    return tuple(out)


def model_signature(adapter, n_neurons: int | None = None) -> dict:
    """What a file of annotations records of the model it was made for: its name (informative)
    and what must match to share concepts: modality names, class names, decision neurons, and
    the units of each modality whose units are the same feature in every instance
    (``Modality.shared_units``, e.g. a tabular modality's columns), by their labels."""
    features = {}
    for name, m in adapter.modalities.items():
        if getattr(m, "shared_units", False):
            try:
                features[name] = [str(u) for u in m.unit_labels()]
            except TypeError:      # labels that need an instance: the units are not compared
                features[name] = None
    return {"model": str(getattr(adapter, "name", "")), "modalities": list(adapter.names),
            "classes": [str(c) for c in adapter.class_names],
            "neurons": None if n_neurons is None else int(n_neurons), "features": features}


def dataset_signature(dataset) -> dict:
    """What a file records of the dataset whose instances its unit concepts name (neuron
    concepts belong to the model and carry over to any dataset)."""
    return {"name": str(getattr(dataset, "name", "") or ""), "instances": len(dataset)}


#: What to do when unit concepts belong to another dataset.
_OWN_FILE = ("Give this dataset its own file; neuron and feature concepts carry over "
             "(Annotations.load(path), then copy keys('neuron') and keys('feature')).")


def _dataset_text(d: dict) -> str:
    return f"{d.get('name') or 'a dataset'!r} ({d.get('instances')} instances)"


def _mismatch(saved: dict | None, ours: dict | None) -> str | None:
    """Why two signatures cannot share concepts, or None when they can (a field either side
    leaves unknown is not compared)."""
    if not saved or not ours:
        return None
    for f in SIGNATURE_FIELDS:
        a, b = saved.get(f), ours.get(f)
        if a is not None and b is not None and a != b:
            return f"{f}: the file's {a!r}, this model's {b!r}"
    return None


# ---------------------------------------------------------------------------------------------
# the store
# ---------------------------------------------------------------------------------------------
_OPEN: "weakref.WeakValueDictionary[str, Annotations]" = weakref.WeakValueDictionary()
_OPEN_LOCK = threading.Lock()


class Annotations:
    """Concepts of neurons and units, optionally saved to ``path`` on each change.

    path: a JSON file; read now if it exists (an :class:`AnnotationError` if it cannot be, and
    the file is left as it is). autosave: save to ``path`` after each change (default: when a
    path is given). signature: the model's (``model_signature``); a file made for a model with
    other modalities, classes, number of neurons or shared units is refused. dataset: the
    dataset's (``dataset_signature``), whose instances the unit keys name: a file with unit
    concepts of another dataset is refused (its neuron and feature concepts carry over:
    ``Annotations.load`` and copy them). n_instances: the dataset's size, to check the instances of unit keys (default: the
    dataset's).
    """

    def __init__(self, path: str | os.PathLike | None = None, *, autosave: bool | None = None,
                 signature: dict | None = None, n_instances: int | None = None,
                 dataset: dict | None = None):
        self._lock = threading.RLock()
        self._data: dict[tuple, tuple[str, ...]] = {}
        self._observers: list[Callable[[tuple | None], None]] = []
        # resolved now: a later os.chdir does not move the file, and a link keeps pointing at it
        self.path = None if path is None else Path(path).expanduser().resolve()
        self.autosave = (self.path is not None) if autosave is None else bool(autosave)
        if self.autosave and self.path is None:
            raise AnnotationError("autosave=True needs a path to save to.")
        self.signature = dict(signature) if signature else None
        self.n_instances = None if n_instances is None else int(n_instances)
        self.dataset = None
        if dataset:
            self._take_dataset(dataset)
        self._bound_dataset: dict | None = None  # the dataset of the Explorer(s) showing it
        self._bound = 0                          # how many Explorers show it (bind - unbind)
        self.save_error: str | None = None
        self.unsaved = False          # changes that no save has written yet
        self._disk_digest: str | None = None     # the file as last read or written here...
        self._disk_entries: dict[tuple, tuple[str, ...]] = {}   # ...and its concepts
        if self.path is not None and self.path.exists():
            self._read_into_empty(self.path)

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, *, signature: dict | None = None,
             n_instances: int | None = None, dataset: dict | None = None) -> "Annotations":
        """The store of ``path`` in this process (made, and the file read, on first use), saving
        on each change. A later caller gets what was changed in the file since the store read it
        (``merge``), and its signature and dataset checked against the store's (a viewer of the
        store, like the Explorer, then calls ``bind`` with its dataset). (A store made with
        ``Annotations(path)`` is its own, not shared: two such stores on one file are kept from
        writing over each other's changes by the conflict check of ``save``.)"""
        resolved = str(Path(path).expanduser().resolve())
        with _OPEN_LOCK:
            store = _OPEN.get(resolved)
            if store is None:
                store = cls(path, signature=signature, n_instances=n_instances, dataset=dataset)
                _OPEN[resolved] = store
                return store
        # replaced or edited on disk meanwhile: merged (which takes the store's lock itself, and
        # tells the observers after releasing it: an observer, such as an Explorer's view, may
        # take a lock under which another thread reads this store)
        with store._lock:
            changed = (store.path.exists()
                       and _digest(_read_bytes(store.path)) != store._disk_digest)
        if changed:
            store.merge(store.path)
        store.check(signature, dataset)
        return store

    @classmethod
    def load(cls, path: str | os.PathLike, *, signature: dict | None = None,
             n_instances: int | None = None, dataset: dict | None = None) -> "Annotations":
        """A store with the concepts of ``path`` that does not save (``save(path)`` does)."""
        path = Path(path).expanduser()
        if not path.exists():
            raise AnnotationError(f"No annotations file at {path}.")
        store = cls(None, signature=signature, n_instances=n_instances, dataset=dataset)
        store._read_into_empty(path)
        return store

    def check(self, signature: dict | None, dataset: dict | None = None) -> None:
        """An AnnotationError when this store cannot be shown for that model (``signature``) and
        dataset; changes nothing."""
        why = _mismatch(self.signature, signature)
        if why:
            raise AnnotationError(
                f"These annotations{self._where()} belong to another model ({why}). Open a new "
                f"file for this model, or Annotations.load(path) and copy what applies.")
        if dataset:
            with self._lock:
                if self._bound_dataset is not None and self._bound_dataset != dataset:
                    raise AnnotationError(
                        f"These annotations{self._where()} are shown for the instances of "
                        f"{_dataset_text(self._bound_dataset)} in this kernel; their unit "
                        f"concepts cannot also name instances of {_dataset_text(dataset)}. "
                        f"{_OWN_FILE}")
                self._check_dataset(self.dataset, dataset, self._data, self._where())

    def bind(self, signature: dict | None, n_instances: int | None = None,
             dataset: dict | None = None) -> None:
        """A viewer (an Explorer) of this model and dataset is to show this store: ``check``,
        then keep the first signature given (recorded in the file from the next save) and, with a
        dataset, count the viewer until its ``unbind``: meanwhile no other dataset may bind."""
        dataset = dict(dataset) if dataset else None
        with self._lock:
            self.check(signature, dataset)
            if n_instances is None and dataset:
                n_instances = dataset.get("instances")
            self._check_ranges(self._data, signature, n_instances)
            if signature and not self.signature:
                self.signature = dict(signature)
            elif signature:            # fill in what the first signature left unknown
                for f, v in signature.items():
                    if self.signature.get(f) is None:
                        self.signature[f] = v
            if n_instances is not None:
                self.n_instances = int(n_instances)
            if dataset:
                self.dataset = self._bound_dataset = dataset
                self._bound += 1

    def unbind(self) -> None:
        """An Explorer that showed this store (``bind`` with a dataset) no longer does; when none
        does, another dataset may bind it."""
        with self._lock:
            self._bound = max(0, self._bound - 1)
            if self._bound == 0:
                self._bound_dataset = None

    def _take_dataset(self, dataset: dict) -> None:
        """Adopt ``dataset`` (given, or the one unit concepts come with), and its size when no
        other was given."""
        self.dataset = dict(dataset)
        if self.n_instances is None and is_integer(self.dataset.get("instances")):
            self.n_instances = int(self.dataset["instances"])

    def _check_dataset(self, named: dict | None, other: dict | None, entries: dict,
                       where: str) -> None:
        """An AnnotationError when ``entries`` hold unit concepts, which name instances of the
        dataset ``named``, and ``other`` is another dataset (neuron concepts belong to the model
        and go with any dataset)."""
        if not named or not other or named == other or not any(k[0] == "unit" for k in entries):
            return
        raise AnnotationError(
            f"The unit concepts{where} name instances of {_dataset_text(named)}, and this is "
            f"{_dataset_text(other)}. {_OWN_FILE}")

    # -- reading and editing --------------------------------------------------------------
    def concepts(self, key) -> tuple[str, ...]:
        """The concepts of ``key`` (none: an empty tuple)."""
        key = _key(key)
        with self._lock:
            return self._data.get(key, ())

    def set(self, key, concepts: Iterable[str]) -> tuple[str, ...]:
        """Replace the concepts of ``key`` (an empty list removes them); returns them tidied."""
        if not isinstance(concepts, (str, list, tuple)):
            concepts = list(concepts)
        return self._update(key, lambda now: concepts)

    def add(self, key, concept: str) -> tuple[str, ...]:
        """Add one concept to ``key`` (nothing when it is there already)."""
        concept = _concept(concept)
        return self._update(key, lambda now: now + (concept,))

    def remove(self, key, concept: str) -> tuple[str, ...]:
        """Remove one concept from ``key`` (an AnnotationError when it is not there)."""
        concept = _concept(concept)

        def without(now):
            if concept not in now:
                raise AnnotationError(f"{_key(key)} has no concept {concept!r}; it has "
                                      f"{list(now)}.")
            return [c for c in now if c != concept]
        return self._update(key, without)

    def _update(self, key, make: Callable[[tuple], Iterable[str]]) -> tuple[str, ...]:
        """Set the concepts of ``key`` to ``make(its concepts now)`` under the lock; save and tell
        the observers after it (outside it)."""
        key = _key(key)
        with self._lock:
            now = self._data.get(key, ())
            new = _concepts(make(now))
            self._check_ranges({key: new}, self.signature, self.n_instances)
            if now == new:
                return new
            if new:
                self._data[key] = new
            else:
                self._data.pop(key, None)
            self.unsaved = True
        self._changed(key)
        return new

    def keys(self, kind: str | None = None) -> list[tuple]:
        """Every annotated key ("neuron", "unit" or "feature" only, when ``kind`` says),
        sorted."""
        if kind not in (None, "neuron", "unit", "feature"):
            raise AnnotationError(f"kind is 'neuron', 'unit', 'feature' or None, got {kind!r}.")
        with self._lock:
            keys = [k for k in self._data if kind is None or k[0] == kind]
        return sorted(keys, key=_sort_key)

    def find(self, concept: str) -> list[tuple]:
        """The keys that carry ``concept`` (compared without regard to case), sorted."""
        want = _concept(concept).casefold()
        with self._lock:
            keys = [k for k, cs in self._data.items() if any(c.casefold() == want for c in cs)]
        return sorted(keys, key=_sort_key)

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def __contains__(self, key) -> bool:
        try:
            key = _key(key)
        except AnnotationError:
            return False
        with self._lock:
            return key in self._data

    def __repr__(self) -> str:
        with self._lock:
            n_n = sum(k[0] == "neuron" for k in self._data)
            n_f = sum(k[0] == "feature" for k in self._data)
            n_u = len(self._data) - n_n - n_f
        return f"Annotations({n_n} neurons, {n_u} units, {n_f} features{self._where()})"

    # -- observers ------------------------------------------------------------------------
    def observe(self, fn: Callable[[tuple | None], None]) -> None:
        """Call ``fn(key)`` after each change (``key`` None: many keys, as after a merge), and
        ``fn(None)`` when a save fails or succeeds after a failure (see ``save_error``)."""
        with self._lock:
            self._observers.append(fn)

    def unobserve(self, fn: Callable[[tuple | None], None]) -> None:
        with self._lock:
            if fn in self._observers:
                self._observers.remove(fn)

    def _notify(self, key) -> None:
        with self._lock:
            observers = list(self._observers)
        for fn in observers:
            try:
                fn(key)
            except Exception:  # noqa: BLE001 - an observer's failure must not lose the change
                pass

    def _changed(self, key) -> None:
        if self.autosave:
            try:
                self.save()
            except (OSError, AnnotationError):
                pass                           # recorded in save_error; the change is kept
        self._notify(key)

    # -- files ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The JSON document a save writes (sorted, so equal stores write equal files)."""
        with self._lock:
            items = sorted(self._data.items(), key=lambda kv: _sort_key(kv[0]))
            sig = dict(self.signature) if self.signature else None
        return {"format": FORMAT, "version": VERSION, "model": sig,
                "dataset": dict(self.dataset) if self.dataset else None,
                "neurons": [{"neuron": k[1], "concepts": list(v)}
                            for k, v in items if k[0] == "neuron"],
                "units": [{"instance": k[1], "modality": k[2], "unit": k[3], "concepts": list(v)}
                          for k, v in items if k[0] == "unit"],
                "features": [{"modality": k[1], "unit": k[2], "concepts": list(v)}
                             for k, v in items if k[0] == "feature"]}

    def save(self, path: str | os.PathLike | None = None, *, overwrite: bool = False) -> Path:
        """Write the store to ``path`` (default: its own) atomically; returns the path.

        To its own path: refused (:class:`AnnotationConflict`) when the file changed on disk since
        this store read or wrote it (``merge(path)`` takes those changes in; a save then goes
        through), unless ``overwrite=True`` (which replaces them). To another path: refused when a
        file is there, unless ``overwrite=True``. On failure the concepts stay in memory and
        ``save_error`` says why."""
        target = self.path if path is None else Path(path).expanduser()
        if target is None:
            raise AnnotationError("This store has no file: give save() a path.")
        own = path is None or (self.path is not None and target.resolve() == self.path.resolve())
        try:
            with self._lock:           # the text and the write together: no older text wins
                doc = self.to_dict()
                text = json.dumps(doc, indent=1, ensure_ascii=False) + "\n"
                if own and not overwrite:
                    self._check_unchanged(target)
                elif not own and target.exists() and not overwrite:
                    raise AnnotationError(f"{target} exists; save(path, overwrite=True) replaces "
                                          f"it, or choose another name.")
                _atomic_write(target, text)
                if own:
                    self._disk_digest = _digest(text.encode("utf-8"))
                    self._disk_entries = dict(self._data)
                    self.unsaved = False
        except (OSError, AnnotationError) as e:
            err = e if isinstance(e, AnnotationError) else OSError(
                f"Could not save the annotations to {target} ({e.strerror or e}); they are kept "
                f"in memory: save(another_path) writes them elsewhere.")
            if own:
                failed_before, self.save_error = self.save_error, str(err)
                if failed_before != self.save_error:
                    self._notify(None)
            if err is e:
                raise
            raise err from e
        if own and self.save_error is not None:
            self.save_error = None
            self._notify(None)
        return target

    def merge(self, other: "Annotations | str | os.PathLike") -> int:
        """Take in the concepts of ``other`` (a store or a file); returns how many concepts came
        in.

        Another store or file: its concepts are added to this store's (a union: a concept that
        either has stays). The file this store saves to: a three-way merge against the file as
        this store last read or wrote it, so that what was changed there since (concepts added,
        and concepts removed) is taken in beside this store's own changes; the file is then
        saved again when it lacks any of them. (Fields of the file that this format does not
        know are not kept.)"""
        with self._lock:               # the file read, and the merge, in step with any save
            if isinstance(other, Annotations):
                incoming, sig, digest, source = other.to_dict(), other.signature, None, None
            else:
                source = Path(other).expanduser()
                raw = _read_bytes(source)
                incoming, digest = _parse(raw, source), _digest(raw)
                sig = incoming.get("model")
            why = _mismatch(sig, self.signature)
            what = source if source is not None else "the store merged"
            if why:
                raise AnnotationError(f"The annotations of {what} belong to another model "
                                      f"({why}); nothing was merged.")
            theirs = _entries(incoming, what)
            self._check_dataset(incoming.get("dataset"), self.dataset, theirs, f" of {what}")
            self._check_ranges(theirs, self.signature, self.n_instances)
            own_file = (source is not None and self.path is not None
                        and source.resolve() == self.path.resolve())
            base = self._disk_entries if own_file else {}
            merged, added = {}, 0
            for key in set(self._data) | set(theirs):
                ours, their, was = self._data.get(key, ()), theirs.get(key, ()), base.get(key, ())
                # kept: what both have, and what either added since the base; so a concept that
                # either removed since the base stays removed
                cs = tuple(c for c in ours if c in their or c not in was) + tuple(
                    c for c in their if c not in ours and c not in was)
                added += sum(c not in ours for c in cs)
                if cs:
                    merged[key] = cs
            changed = merged != self._data
            self._data = merged
            if (incoming.get("dataset") and not self.dataset
                    and any(k[0] == "unit" for k in theirs)):
                self._take_dataset(incoming["dataset"])
            resolved = False
            if own_file:           # its changes on disk are taken in: a save may now replace it
                self._disk_digest, self._disk_entries = digest, dict(theirs)
                self.unsaved = merged != theirs          # the file lacks some of ours
                resolved = not self.unsaved and self.save_error is not None
                if resolved:
                    self.save_error = None
            elif changed:
                self.unsaved = True
        if changed or (own_file and self.unsaved):
            self._changed(None)
        elif resolved:
            self._notify(None)
        return added

    # -- internals ------------------------------------------------------------------------
    def _where(self) -> str:
        return f" in {self.path}" if self.path is not None else ""

    def _read_into_empty(self, path: Path) -> None:
        raw = _read_bytes(path)
        doc = _parse(raw, path)
        why = _mismatch(doc.get("model"), self.signature)
        if why:
            raise AnnotationError(
                f"{path} holds annotations of another model ({why}); it was not changed. Give "
                f"this model another file, or Annotations.load(path) and copy what applies.")
        found = _entries(doc, path)
        self._check_dataset(doc.get("dataset"), self.dataset, found, f" in {path}")
        self._check_ranges(found, self.signature, self.n_instances, path)
        self._data = found
        if doc.get("dataset") and not self.dataset:
            self._take_dataset(doc["dataset"])
        if doc.get("model") and not self.signature:
            self.signature = dict(doc["model"])
        if self.path is not None and path.resolve() == self.path.resolve():
            self._disk_digest, self._disk_entries = _digest(raw), dict(found)

    def _check_unchanged(self, target: Path) -> None:
        if not target.exists():
            if self._disk_digest is not None:  # deleted on disk: writing it again loses nothing
                self._disk_digest, self._disk_entries = None, {}
            return
        raw = _read_bytes(target)
        if _digest(raw) != self._disk_digest:
            raise AnnotationConflict(
                f"{target} changed on disk since these annotations were read or saved (another "
                f"program or notebook wrote it); it was not written over. merge({str(target)!r}) "
                f"takes its changes in (concepts added and removed there), then saves both; "
                f"save(another_path) keeps both files; save(overwrite=True) replaces theirs.")

    @staticmethod
    def _check_ranges(entries: dict, signature: dict | None, n_instances: int | None,
                      path: Path | None = None) -> None:
        where = f" in {path}" if path is not None else ""
        d = (signature or {}).get("neurons")
        mods = (signature or {}).get("modalities")
        shared = (signature or {}).get("features")      # {modality: unit labels} or None
        for key in entries:
            if key[0] == "neuron" and d is not None and key[1] >= d:
                raise AnnotationError(f"neuron {key[1]}{where} is out of range: the decision "
                                      f"layer has {d} neurons (0..{d - 1}).")
            modality = key[2] if key[0] == "unit" else key[1] if key[0] == "feature" else None
            if modality is not None and mods is not None and modality not in mods:
                raise AnnotationError(f"modality {modality!r}{where} is not one of the model's "
                                      f"{list(mods)}.")
            if modality is not None and isinstance(shared, dict):
                if key[0] == "unit" and modality in shared:
                    raise AnnotationError(
                        f"{key}{where}: a unit of {modality!r} is the same feature in every "
                        f"instance, so its concepts are named for all of them: use "
                        f"('feature', {modality!r}, {key[3]}).")
                if key[0] == "feature" and modality not in shared:
                    raise AnnotationError(
                        f"{key}{where}: the units of {modality!r} differ from one instance to "
                        f"another, so a concept names one instance's: use ('unit', instance, "
                        f"{modality!r}, {key[2]}).")
                labels = shared.get(modality) if key[0] == "feature" else None
                if labels is not None and key[2] >= len(labels):
                    raise AnnotationError(
                        f"{key}{where}: unit {key[2]} is out of range: {modality!r} has "
                        f"{len(labels)} units (0..{len(labels) - 1}).")
            if key[0] == "unit":
                if n_instances is not None and key[1] >= n_instances:
                    raise AnnotationError(f"instance {key[1]}{where} is out of range: the dataset "
                                          f"has {n_instances} instances (0..{n_instances - 1}).")


def _sort_key(key: tuple) -> tuple:
    if key[0] == "neuron":
        return (0, key[1], "", 0)
    if key[0] == "feature":
        return (1, 0, key[1], key[2])
    return (2, key[1], key[2], key[3])


def _digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except IsADirectoryError:
        raise AnnotationError(f"{path} is a folder; give the path of a .json file.") from None
    except OSError as e:
        raise AnnotationError(f"Could not read {path} ({e.strerror or e}).") from e


def _parse(raw: bytes, path) -> dict:
    """The document of an annotations file, its outer shape checked."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AnnotationError(f"{path} is not an annotations file: not UTF-8 JSON ({e}). It was "
                              f"not changed.") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise AnnotationError(f"{path} is not an annotations file (no \"format\": \"{FORMAT}\"). "
                              f"It was not changed; give annotations another file name.")
    v = doc.get("version")
    if not is_integer(v) or not 1 <= v <= VERSION:
        raise AnnotationError(f"{path} is annotations format version {v!r}; this multiviz_widgets "
                              f"reads versions up to {VERSION} (a newer file needs a newer "
                              f"multiviz_widgets). It was not changed.")
    for f in ("model", "dataset"):
        if doc.get(f) is not None and not isinstance(doc[f], dict):
            raise AnnotationError(f"{path}: \"{f}\" must be an object or null, got {doc[f]!r}.")
    for f in ("neurons", "units", "features"):
        if not isinstance(doc.get(f, []), list):
            raise AnnotationError(f"{path}: \"{f}\" must be a list, got {doc.get(f)!r}.")
    return doc


def _entries(doc: dict, path) -> dict[tuple, tuple[str, ...]]:
    """{key: concepts} of a parsed document; each entry checked (its position in the message)."""
    out: dict[tuple, tuple[str, ...]] = {}
    for field, fields in (("neurons", ("neuron",)),
                          ("units", ("instance", "modality", "unit")),
                          ("features", ("modality", "unit"))):
        for n, e in enumerate(doc.get(field, [])):
            try:
                if not isinstance(e, dict) or any(f not in e for f in fields + ("concepts",)):
                    raise AnnotationError(f"each entry needs {list(fields + ('concepts',))}")
                key = (neuron_key(e["neuron"]) if field == "neurons"
                       else unit_key(e["instance"], e["modality"], e["unit"]) if field == "units"
                       else feature_key(e["modality"], e["unit"]))
                cs = _concepts(e["concepts"])
            except AnnotationError as err:
                raise AnnotationError(f"{path}: {field}[{n}] = {e!r}: {str(err).rstrip('.')}. "
                                      f"It was not changed.") from None
            if cs:
                now = out.get(key, ())
                out[key] = now + tuple(c for c in cs if c not in now)
    return out


def _atomic_write(target: Path, text: str) -> None:
    """Write ``text`` to ``target`` through a temporary file in its folder and a rename."""
    write_atomically(target, lambda f: f.write(text), binary=False)
