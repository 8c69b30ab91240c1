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
  the wrong kind, a field written twice in one object, made for another model) raises
  :class:`AnnotationError` and is never written over; two entries of one key are joined (a
  field they give different values, such as a "comment", keeps them all, as a list);
* a file made for a model of the same shape under another name (a retrained or fine-tuned
  model's) is read, with a warning and ``model_note`` saying that its neuron concepts may not
  fit;
* a path whose folder is not there (a typo) is refused when the store opens it;
* a save writes a temporary file beside the target and renames it (a crash leaves the old file
  or the new one, never half of one);
* a file changed on disk by someone else since this store read or wrote it is not written over:
  the save raises :class:`AnnotationConflict`; ``merge(path)`` takes their concepts in, after
  which a save goes through. A file gets a "lineage" at its first save here (a random id, one
  line that every later save keeps, so that git merges two branches' versions as their
  entries). The file on disk of the lineage this store read or wrote (or without one: an
  older or hand-edited file) is a version of the same file: a three-way merge against the file
  as last read or written takes in what was added and what was removed there; so does an
  older backup of the same file put back, whose missing concepts read as removed (said by
  name, and ``undo()`` puts them back). A copy of the same file (a backup, a teacher's
  handout, a colleague's ``cp``) has its lineage, so it too is a version: what it lacks is
  removed, named, and ``undo()`` puts it back. Only a file of another lineage (made by
  another store) copied over it is joined, removing none of ours. A file read without a
  lineage (written before lineages) gets one derived from its bytes, the same in every
  kernel and git branch that read it. ``change_note`` names what came in and what went;
* ``undo()`` undoes the last edits (a remove clicked by mistake, a rename), one per call,
  skipping (and saying so) a key that a merge changed since;
* a store that saves on each change and cannot (a read-only folder, a conflict) keeps every
  change in memory, says why in ``save_error`` (``save_conflict`` when it is such a conflict)
  and tells its observers; the next save that works writes them all.

Within one Python process, ``Annotations.open(path)`` gives every caller the same store for the
same file, so two Explorers on one file see each other's concepts at once.

Concepts are plain text: the views render them as text, never as HTML. This module imports no
widget library (the engine layer).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import sys
import threading
import unicodedata
import uuid
import weakref
from pathlib import Path
from typing import Callable, Iterable

from .notices import warn
from .atomic_file import LockTimeout, file_lock, remove_stale_temporaries, write_atomically
from .checks import is_integer

__all__ = ["Annotations", "AnnotationError", "AnnotationConflict", "neuron_key", "unit_key",
           "feature_key", "model_signature", "dataset_signature", "DatasetSignature", "FORMAT",
           "VERSION", "MAX_CONCEPT_LENGTH", "MAX_CONCEPTS_PER_KEY", "same_concept",
           "tidy_concept"]

FORMAT = "multiviz-annotations"
VERSION = 2        # 2: "features" (version 1 had neurons and units; it is read as well)
MAX_CONCEPT_LENGTH = 200
#: The most concepts one key may have: a key's concepts are a few short names (shown in a row
#: beside it), and a bound keeps the work of reading a file, or of an edit, small whatever a
#: file holds (a file beyond it is refused, an add beyond it too).
MAX_CONCEPTS_PER_KEY = 1000
#: The largest annotations file read (bytes): a concepts file is kilobytes, and one a stranger
#: shared may be anything (a million entries, 44 MB, took 18 s and 1 GB of memory to read);
#: a larger one is refused before it is read.
MAX_FILE_BYTES = 16 * 2**20
#: How deeply a file's JSON may nest (an entry is 4 deep): a field nested about a thousand
#: times, taken in by a merge, made later saves of the user's own file fail, and its reading
#: depend on the depth of the call stack. A deeper file is refused, the field named.
MAX_NESTING = 64
# what a signature compares: two models that differ here cannot share neuron or unit concepts
SIGNATURE_FIELDS = ("modalities", "classes", "neurons", "features")
# what tells two models of the same shape apart: the model's name and, where a signature
# records one, a fingerprint of its weights. Not refused (a retrained or fine-tuned model
# keeps its file), but said: its neuron concepts may name other neurons (``model_note``)
IDENTITY_FIELDS = ("model", "weights")
#: How ``model_signature`` fingerprints the weights (``ModelAdapter.weights_fingerprint``: a hash
#: of the state_dict), recorded beside them as "weights_method": a file without it was written
#: before it was recorded, when the weights were ``ModelAdapter.fingerprint`` (state_dict and
#: module settings); two fingerprints of different methods cannot be compared.
WEIGHTS_METHOD = "state_dict-sha256"
#: How old (in seconds) a temporary file of a save of an annotations file must be for another
#: save of that file to remove it as left by a save that was killed (``save``; a save takes
#: under a second)
_STALE_TEMPORARY_SECONDS = 600.0
#: The fields of a model signature and of a dataset signature that this format knows; others
#: (a "checkpoint" written in by hand) are kept as they are and written back.
MODEL_FIELDS = ("model", "modalities", "classes", "neurons", "features", "weights",
                "weights_method", "units")
DATASET_FIELDS = ("name", "instances", "fingerprint")


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
    _no_surrogates(name, "A modality name")
    return name


def _no_surrogates(text: str, what: str) -> None:
    """An AnnotationError when ``text`` holds a lone surrogate (half of a UTF-16 pair, as a
    JSON escape such as \\udc80 can give): no file can hold it, so every save would fail."""
    bad = [c for c in text if unicodedata.category(c) == "Cs"]
    if bad:
        raise AnnotationError(f"{what} {text[:60]!r} holds the lone surrogate {bad[0]!r} (half "
                              f"of a UTF-16 pair), which is not text and cannot be saved; write "
                              f"the whole character instead.")


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


#: Format characters that printable text needs: the zero-width non-joiner (Persian, Hindi...)
#: and joiner (emoji sequences such as a family). Other format characters (bidirectional
#: overrides, the zero-width space...) can hide or reorder what a concept shows, and are refused.
_JOINERS = frozenset("\u200c\u200d")


#: a run of spaces of any kind (no-break, em, ideographic...) inside a concept
_SPACES = re.compile(r"\s+")


def same_concept(text: str) -> str:
    """What two concepts that are the same compare equal by: without regard to case (and,
    as ``tidy_concept`` tidies them, to spaces). "Red Shapes" and "red shapes" are one concept:
    a key keeps the first it was given, and ``find``, ``remove`` and ``rename`` take either.
    Unicode's canonical caseless match: normalised again after case folding, which can undo
    NFC ("\u0390" folds to "\u03b9\u0308\u0301", its capital to "\u03ca\u0301"), so
    that a text and its capitals are one concept; the text kept is the one typed."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", text).casefold())


def _strip_outer(text: str) -> str:
    """``text`` without the spaces and joiners (which join nothing there) at either end."""
    text = text.strip()
    start, end = 0, len(text)
    while start < end and (text[start].isspace() or text[start] in _JOINERS):
        start += 1
    while end > start and (text[end - 1].isspace() or text[end - 1] in _JOINERS):
        end -= 1
    return text[start:end]


def tidy_concept(text, typed: bool = True) -> str:
    """``text`` checked and tidied (outer spaces stripped, every run of spaces inside one plain
    space, so that "red  shapes" and "red\u00a0shapes" pasted from a web page are "red
    shapes"; NFC-normalised so that "e" + a combining acute and "\u00e9" are one concept): a
    short line of printable text.

    ``typed``: a concept a person adds or renames to now, which is also refused when it holds
    a joiner that joins nothing ("re\u200dd", a look-alike of "red") or no letter, digit or
    symbol ("?"). A concept read from a file, or one there is already (``typed=False``), is
    not: files written before those checks hold such concepts ("?" for a neuron not
    understood yet), and they open, merge and stay as they are."""
    if not isinstance(text, str):
        raise AnnotationError(f"A concept is a string, got {type(text).__name__} {text!r}.")
    text = _strip_outer(unicodedata.normalize("NFC", text))
    if not text:
        raise AnnotationError("A concept cannot be empty or only spaces.")
    # the length of the concept as kept: every run of spaces inside it one space
    tidied = _SPACES.sub(" ", text)
    if len(tidied) > MAX_CONCEPT_LENGTH:
        raise AnnotationError(f"A concept has at most {MAX_CONCEPT_LENGTH} characters, got "
                              f"{len(tidied)} ({tidied[:40]!r}...); keep it to a short name.")
    # control and format characters, line breaks, and lone surrogates (which no file can hold)
    bad = [c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp")
           and c not in _JOINERS]
    if bad:
        c = bad[0]
        kind = ("an invisible format character, which can make a look-alike of another "
                "concept or reorder what it shows" if unicodedata.category(c) == "Cf"
                else "a line break or tab" if c in "\n\r\t\u2028\u2029" else "not text")
        raise AnnotationError(f"A concept is one line of printable text; {text[:60]!r} holds "
                              f"the control character {c!r} ({_char_name(c)}: {kind}); "
                              f"remove it.")
    if typed:
        _check_typed(text)
    return tidied


def _check_typed(text: str) -> None:
    """The checks of a concept that a person types (``tidy_concept``'s ``typed``): an
    AnnotationError for a needless joiner, or for a concept of no letter, digit or symbol."""
    joiner = _needless_joiner(text)
    if joiner is not None:
        raise AnnotationError(
            f"A concept is one line of printable text; {text[:60]!r} holds the control "
            f"character {text[joiner]!r} ({_char_name(text[joiner])}: an invisible format "
            f"character) between {text[joiner - 1]!r} and {text[joiner + 1]!r}, which it "
            f"does not join (it would make a look-alike of {_no_joiners(text)!r}); remove "
            f"it. (Joiners are kept where a script or an emoji sequence needs them.)")
    if not any(unicodedata.category(c)[0] in "LNS" for c in text):
        raise AnnotationError(
            f"A concept names something with letters, digits or symbols; {text[:60]!r} has "
            f"none (only {_kinds(text)}); type the name itself.")


def _char_name(c: str) -> str:
    """"U+200D ZERO WIDTH JOINER": a character as a message names it."""
    names = {"\n": "LINE FEED", "\r": "CARRIAGE RETURN", "\t": "TAB", "\0": "NULL"}
    return f"U+{ord(c):04X} {unicodedata.name(c, names.get(c, 'a control character'))}"


#: Scripts whose letters never need a joiner between them (nor digits and ASCII).
_PLAIN_SCRIPTS = ("LATIN", "GREEK", "CYRILLIC", "DIGIT", "FULLWIDTH LATIN")


def _plain_letter(c: str) -> bool:
    """Whether ``c`` is a letter, digit or mark of a script that no joiner changes (Latin,
    Greek, Cyrillic), or ASCII, or a space: a joiner beside such characters on both sides
    joins nothing and only makes a look-alike ("re\u200dd" of "red")."""
    if c.isascii() or c.isspace() or unicodedata.category(c) == "Mn":
        return True
    return unicodedata.name(c, "").startswith(_PLAIN_SCRIPTS)


def _needless_joiner(text: str) -> int | None:
    """The index of the first joiner (ZWJ, ZWNJ) inside ``text`` between two characters that
    it cannot join (``_plain_letter`` both, or another joiner), or None."""
    for i, c in enumerate(text):
        if c in _JOINERS and 0 < i < len(text) - 1:
            before, after = text[i - 1], text[i + 1]
            if (before in _JOINERS or after in _JOINERS
                    or (_plain_letter(before) and _plain_letter(after))):
                return i
    return None


def _no_joiners(text: str) -> str:
    return "".join(c for c in text if c not in _JOINERS)


def _kinds(text: str) -> str:
    """What ``text``'s characters are, for a message: "combining marks", "punctuation"."""
    names = {"M": "combining marks", "P": "punctuation", "Z": "spaces", "C": "joiners"}
    kinds = dict.fromkeys(names.get(unicodedata.category(c)[0], "other characters")
                          for c in text)
    return " and ".join(kinds)


#: How to keep a key's concepts under MAX_CONCEPTS_PER_KEY: in a store, and in a file.
_FEWER = "remove some first (remove(key, concept), or set(key, a shorter list))"
_FEWER_IN_FILE = "keep the ones that say most and remove the others from the file"


def _concepts(values, who: str = "A key", fewer: str = _FEWER,
              typed: bool = True) -> tuple[str, ...]:
    """A list of concepts checked, duplicates (``same_concept``) dropped (the first kept), order
    kept: at most MAX_CONCEPTS_PER_KEY, else an AnnotationError that names ``who`` and says to
    keep ``fewer``. Each is looked up once in a dict (a list's ``in`` would make a long list cost
    its square), and a list that has too many is refused as soon as that shows. ``typed``: as
    ``tidy_concept``'s (False for concepts read from a file, or there already)."""
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise AnnotationError(f"Concepts are a list of strings, got {_brief(values)}.")
    out: dict[str, str] = {}                 # same_concept(c): c, the first of its spellings
    for v in values:
        c = tidy_concept(v, typed)
        out.setdefault(same_concept(c), c)
        if len(out) > MAX_CONCEPTS_PER_KEY:
            raise _too_many(who, fewer)
    return tuple(out.values())


def _too_many(who: str, fewer: str) -> AnnotationError:
    return AnnotationError(f"{who} would have more than {MAX_CONCEPTS_PER_KEY} concepts, the "
                           f"most one key can have (MAX_CONCEPTS_PER_KEY): a key's concepts are "
                           f"a few short names; {fewer}.")


def _brief(value, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message quotes what was wrong without
    copying a whole file's list into it."""
    try:
        text = repr(value)
    except RecursionError:
        return f"a {type(value).__name__} nested too deep to show"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def model_signature(adapter, n_neurons: int | None = None) -> dict:
    """What a file of annotations records of the model it was made for: its name (a file of
    another name is taken, with a warning: ``Annotations.model_note``) and what must match to
    share concepts: modality names, class names, decision neurons, and the units of each
    modality whose units are the same feature in every instance (``Modality.shared_units``,
    e.g. a tabular modality's columns), by their labels."""
    features = {}
    for name, m in adapter.modalities.items():
        if getattr(m, "shared_units", False):
            try:
                features[name] = [str(u) for u in m.unit_labels()]
            except TypeError:      # labels that need an instance: the units are not compared
                features[name] = None
    fingerprint = getattr(adapter, "weights_fingerprint", None)
    sig = ModelSignature(
        {"model": str(getattr(adapter, "name", "")), "modalities": list(adapter.names),
         "classes": [str(c) for c in adapter.class_names],
         "neurons": None if n_neurons is None else int(n_neurons), "features": features,
         "weights": fingerprint() if callable(fingerprint) else None,
         "weights_method": WEIGHTS_METHOD if callable(fingerprint) else None,
         "units": {name: unit_settings(m) for name, m in adapter.modalities.items()}})
    if callable(fingerprint):
        sig.live_weights = _live_weights(adapter, sig["weights"])
        older = getattr(adapter, "fingerprint", None)
        if callable(older):
            sig.older_weights = _weak_call(adapter, "fingerprint")
    return sig


class ModelSignature(dict):
    """A model signature (a dict, as a file records it) that also knows, while its adapter
    lives, how to fingerprint the model's weights now (``live_weights``: a save records the
    weights the concepts were made on, also after a fine-tune in the session) and by the method
    used before "weights_method" was recorded (``older_weights``: an older file's fingerprint
    of the same weights is recognised). Neither is written to a file; equal as a dict."""

    live_weights: Callable[[], str | None] | None = None
    older_weights: Callable[[], str | None] | None = None


def _weak_call(obj, method: str) -> Callable[[], str | None]:
    """``obj.method()`` while ``obj`` lives (a store that outlives its Explorer does not keep
    the model alive), else None."""
    try:
        ref = weakref.ref(obj)
    except TypeError:
        def ref():
            return obj

    def call():
        alive = ref()
        return None if alive is None else str(getattr(alive, method)())
    return call


def _live_weights(adapter, value: str) -> Callable[[], str | None]:
    """``adapter.weights_fingerprint()`` now, computed again only when a tensor of the model's
    state_dict was replaced or changed in place since (torch counts each in-place change in a
    tensor's ``_version``: an optimizer step, ``load_state_dict``, an edit under no_grad), or
    cast or moved (``model.half()``, ``.double()``, ``.to(...)``: another dtype, device or
    memory), so that each save can afford to ask. (A limitation: an in-place edit through
    ``param.data``, such as ``param.data.mul_(0.5)``, is not counted; the fingerprint is then
    taken again at the next ``Explorer`` made for the model.)"""
    fingerprint = _weak_call(adapter, "weights_fingerprint")
    try:
        adapter_ref = weakref.ref(adapter)
    except TypeError:
        def adapter_ref():
            return adapter

    def state_key(alive) -> tuple | None:
        # a tensor's version counts its in-place changes; a cast or a move (``model.half()``,
        # ``.double()``, ``.to(dtype or device)``) sets ``param.data`` without counting, and
        # shows in its dtype, device and memory (``data_ptr``)
        try:
            state = alive.model.state_dict(keep_vars=True)
            return tuple((k, id(v), getattr(v, "_version", None), str(v.dtype), str(v.device),
                          v.data_ptr(), tuple(v.shape)) for k, v in state.items())
        except Exception:  # noqa: BLE001 - not a torch module: fingerprinted each time
            return None
    memo = {"key": state_key(adapter), "value": value}

    def now():
        alive = adapter_ref()
        if alive is None:
            return None
        key = state_key(alive)
        if key is not None and memo["key"] == key:
            return memo["value"]
        memo.update(key=key, value=fingerprint())
        return memo["value"]
    return now


def unit_settings(modality) -> str:
    """A short fingerprint of what makes a modality's units (its patch size or superpixels,
    vocabulary and tokenizer, window, columns): ``Modality.signature`` without the baselines,
    which change what a unit is replaced by, not which part of the input it is."""
    return hashlib.sha256(modality.signature(baselines=False).encode()).hexdigest()[:16]


def dataset_signature(dataset, *, lazy: bool = False) -> dict:
    """What a file records of the dataset whose instances its unit concepts name (neuron
    concepts belong to the model and carry over to any dataset): its name, its size and a
    fingerprint of its inputs (``inputs_fingerprint()``, a hash of every instance; absent for a
    dataset that has no such method), so that a dataset of the same name and size with other
    contents is told apart.

    lazy: the fingerprint (one pass over the data) is computed only when it is first needed (a
    file with unit concepts compared, or written): what the Explorer passes, to open fast."""
    base = {"name": str(getattr(dataset, "name", "") or ""), "instances": len(dataset)}
    try:                  # a store that outlives its Explorer does not keep the dataset alive
        ref = weakref.ref(dataset)
    except TypeError:     # an object that cannot be referred to weakly
        def ref():
            return dataset

    def compute():
        alive = ref()
        return None if alive is None else _inputs_fingerprint(alive)
    sig = DatasetSignature(base, compute)
    if not lazy:
        sig.fingerprint()
    return sig


def _inputs_fingerprint(dataset) -> str | None:
    """The dataset's ``inputs_fingerprint()``, or None when it has none (or it fails: the
    dataset is then told apart by its name and size alone)."""
    method = getattr(dataset, "inputs_fingerprint", None)
    if not callable(method):
        return None
    try:
        return str(method())
    except Exception:  # noqa: BLE001 - a lazy column that cannot be read: not compared
        return None


class DatasetSignature(dict):
    """A dataset signature (a dict: name, instances and, once computed, fingerprint) that
    computes its fingerprint when first asked (``fingerprint()``)."""

    def __init__(self, base: dict, compute: Callable[[], str | None] | None = None):
        super().__init__(base)
        self._compute = None if "fingerprint" in base else compute

    def fingerprint(self) -> str | None:
        """The fingerprint of the dataset's inputs (computed now if not yet), or None."""
        compute = self._compute
        if compute is not None:
            value = compute()
            if value is not None:
                self["fingerprint"] = value
            self._compute = None
        return self.get("fingerprint")


def _fingerprint(d: dict) -> str | None:
    return d.fingerprint() if isinstance(d, DatasetSignature) else d.get("fingerprint")


def _same_dataset(a: dict | None, b: dict | None) -> bool:
    """Whether two dataset signatures may be the same dataset: the same name and size, and the
    same fingerprint where both have one (a file written before fingerprints were recorded is
    told apart by its name and size)."""
    if not a or not b:
        return True
    if a.get("name") != b.get("name") or a.get("instances") != b.get("instances"):
        return False
    fa = _fingerprint(a)
    if fa is None:
        return True
    fb = _fingerprint(b)
    return fb is None or fa == fb


def _as_dataset(d: dict | None) -> dict | None:
    """A signature to keep: a DatasetSignature as it is (its fingerprint may be computed
    later), any other dict copied; its values made plain (``_plain``) and checked, so that
    every save can write them (an AnnotationError says what is wrong)."""
    if not d:
        return None
    if not isinstance(d, dict):
        raise AnnotationError(f"A dataset signature is a dict (dataset_signature(dataset) makes "
                              f"one), got {_brief(d)}.")
    if isinstance(d, DatasetSignature):
        for f, v in list(d.items()):
            d[f] = _plain(v)
    else:
        d = _plain(d)
    _check_signature(d, _bad_dataset_fields(d), "dataset", "dataset_signature(dataset)")
    return d


def _as_signature(sig: dict | None) -> dict | None:
    """A model signature to keep: copied, its values made plain (``_plain``) and checked, so
    that every save can write it (an AnnotationError says what is wrong)."""
    if not sig:
        return None
    if not isinstance(sig, dict):
        raise AnnotationError(f"A model signature is a dict (model_signature(adapter) makes "
                              f"one), got {_brief(sig)}.")
    out = ModelSignature(_plain(sig))
    _check_signature(out, _bad_model_fields(out), "model", "model_signature(adapter, n_neurons)")
    out.live_weights = getattr(sig, "live_weights", None)
    out.older_weights = getattr(sig, "older_weights", None)
    return out


def _plain(value):
    """``value`` as a JSON file holds it: numpy's scalars (and other one-element arrays, such as
    a tensor's) as Python's (``np.int64(10)`` as 10, e.g. a count taken from an array's shape),
    tuples as lists, within lists and dicts too; anything else as it is."""
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "shape", None) == ():
        try:
            return item()
        except Exception:  # noqa: BLE001 - not a scalar after all: refused by the caller
            return value
    return value


def _check_signature(sig: dict, why: str | None, what: str, maker: str) -> None:
    """An AnnotationError when a signature given by code has a field of the wrong kind
    (``why``, from ``_bad_model_fields`` or ``_bad_dataset_fields``) or a value that a JSON file
    cannot hold: it would be saved with the concepts, and every save would fail."""
    if why is None:
        try:
            json.dumps(sig)
            return
        except (TypeError, ValueError, RecursionError) as e:
            why = f"it holds a value that a JSON file cannot hold ({str(e)[:200]})"
    raise AnnotationError(f"The {what} signature {_brief(sig)}: {why}. Give text, whole numbers "
                          f"(int(n), str(name)), lists and dicts, as {maker} does.")


#: What to do when unit concepts belong to another dataset.
_OWN_FILE = ("Give this dataset its own file; neuron and feature concepts carry over "
             "(Annotations.load(path), then copy keys('neuron') and keys('feature')).")
#: ...and when the dataset is the same, its inputs edited in place
_SAME_INSTANCES = ("If it is the same dataset, edited, with its instances in the same order, "
                   "the concepts still apply: store = Annotations.load(path); store.dataset = "
                   "dataset_signature(dataset); store.save(path, overwrite=True).")


def _dataset_text(d: dict) -> str:
    return f"{d.get('name') or 'a dataset'!r} ({d.get('instances')} instances)"


def _other_model(saved: dict | None, ours: dict | None, keys=()) -> str | None:
    """What to say when two signatures that may share concepts (``_mismatch`` finds nothing)
    name different models (``IDENTITY_FIELDS``: the model's name, or the fingerprint of its
    weights where both record one), or None: "made for model 'a'; this is model 'b': the
    neuron concepts may not fit"; else, for the modalities that ``keys`` name units or
    features of, other unit settings (a patch size, a vocabulary): "made with other unit
    settings for 'image' ...". A field either side leaves unknown (or empty) is not
    compared."""
    if not saved or not ours:
        return None
    for f in IDENTITY_FIELDS:
        a, b = saved.get(f), ours.get(f)
        if a and b and a != b:
            def named(sig):
                text = f"model {sig.get('model')!r}" if sig.get("model") else "a model"
                return f"{text} (weights {sig[f][:12]})" if f == "weights" else text
            if f == "weights":
                how = _weights_compared(saved, ours)
                if how == "same":
                    continue
                if how is not None:
                    return (f"made for {named(saved)}, whose weights fingerprint was taken "
                            f"{how}: the two cannot be compared, so whether the neuron "
                            f"concepts fit this model's weights is not known")
            return (f"made for {named(saved)}; this is {named(ours)}: the neuron concepts may "
                    f"not fit")
    # other unit settings matter to the unit and feature concepts there are (``keys``)
    named = {k[2] if k[0] == "unit" else k[1] for k in keys if k[0] in ("unit", "feature")}
    a, b = saved.get("units") or {}, ours.get("units") or {}
    other = [m for m in a if m in named and a[m] and b.get(m) and a[m] != b[m]]
    if other:
        names = ", ".join(repr(m) for m in other)
        return (f"made with other unit settings for {names} (patch size, vocabulary, "
                f"tokenizer, window or columns): the unit concepts there may name other units")
    return None


def _weights_compared(saved: dict, ours: dict) -> str | None:
    """For two signatures whose "weights" differ: "same" when they fingerprint the same weights
    by two methods (a file written before "weights_method" was recorded, whose fingerprint
    this model's older method gives again), how the file's was taken when its method is
    another than ours (then they cannot be compared), or None (the same method: other
    weights)."""
    theirs, mine = saved.get("weights_method"), ours.get("weights_method")
    if theirs == mine:
        return None
    if theirs is None and mine == WEIGHTS_METHOD:
        older = getattr(ours, "older_weights", None)
        try:
            again = older() if callable(older) else None
        except Exception:  # noqa: BLE001 - not computable: not compared
            again = None
        if again is not None:
            # the older method reproduced: the same weights, or truly other ones
            return "same" if again == saved.get("weights") else None
        return ("by an older multiviz_widgets (before the method was recorded), which this "
                "model cannot reproduce")
    return f"by another method ({theirs!r}; this model's: {mine!r})"


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
    the file is left as it is, or if its folder does not exist). autosave: save to ``path``
    after each change (default: when a path is given). signature: the model's
    (``model_signature``); a file made for a model with other modalities, classes, number of
    neurons or shared units is refused. dataset: the
    dataset's (``dataset_signature``), whose instances the unit keys name: a file with unit
    concepts of another dataset is refused (its neuron and feature concepts carry over:
    ``Annotations.load`` and copy them). n_instances: the dataset's size, to check the
    instances of unit keys (default: the dataset's).

    A version-1 file, written before feature keys, may name a unit of a modality whose units
    are the same feature in every instance (a tabular column) per instance; once the model's
    signature is known, such concepts are read as the feature's, those of every instance
    together (the file is rewritten, as version 2, at the next change only).

    A file made for a model of the same shape but another name (or, where both signatures
    record one, other weights: a "weights" fingerprint) is taken, as a retrained or fine-tuned
    model's may be, with a warning; ``model_note`` then says so ("made for model 'a'; this is
    model 'b': the neuron concepts may not fit"), for the signature given last (here or to
    ``bind``), and the Explorer's concepts row shows it.
    """

    #: The most seconds a save waits for the file's lock (held by another program's save):
    #: then it fails into ``save_error`` rather than freezing the kernel.
    lock_timeout: float = 5.0

    def __init__(self, path: str | os.PathLike | None = None, *, autosave: bool | None = None,
                 signature: dict | None = None, n_instances: int | None = None,
                 dataset: dict | None = None):
        self._lock = threading.RLock()
        # counts the changes to what to_dict writes (made under the lock), so that a save that
        # waited for the file's lock sees whether its text is still the newest without building
        # the document again (``_edited``)
        self._edits = 0
        self._data: dict[tuple, tuple[str, ...]] = {}
        self._observers: list[Callable[[tuple | None], None]] = []
        # resolved now: a later os.chdir does not move the file, and a link keeps pointing at it
        self.path = None if path is None else _usable_path(path)
        self.autosave = (self.path is not None) if autosave is None else bool(autosave)
        self._autosave_given = autosave is not None     # kept when save() adopts a file
        if self.autosave and self.path is None:
            raise AnnotationError("autosave=True needs a path to save to.")
        self.signature = _as_signature(signature)
        self.n_instances = None if n_instances is None else int(n_instances)
        self.dataset = None
        if dataset:
            self._take_dataset(dataset)
        # the dataset of each viewer (Explorer) showing it, one entry per bind until its unbind
        self._viewers: list[dict] = []
        # checks a viewer adds for keys that get concepts (e.g. that the unit exists)
        self._key_checks: list[Callable[[tuple], None]] = []
        # read from a version-1 file: unit keys of shared-unit modalities may still be there,
        # to be read as feature keys once a signature says which modalities those are
        self._version_1_units = False
        self.save_error: str | None = None
        # whether save_error is a conflict (the file changed on disk): merge(path) resolves it
        self.save_conflict = False
        self.unsaved = False          # changes that no save has written yet
        self._disk_digest: str | None = None     # the file as last read or written here...
        self._disk_entries: dict[tuple, tuple[str, ...]] = {}   # ...and its concepts
        # ...and its lineage ("lineage"): a random id that a file this store makes gets at its
        # first save and keeps at every later save (a file read without one: an id derived
        # from its bytes, the same in every kernel that read it), so that ``merge`` tells a
        # version of the file (the same lineage, or none on disk: a three-way merge, whose
        # removals are real, and undoable) from another store's file copied over it (another
        # lineage: joined, none of ours removed). None: no file was read or written yet
        self._lineage: str | None = None
        # a lineage derived from a file read without one, not yet written by this store: another
        # kernel that read another version of that file derived another, so a file on disk of
        # another lineage is then a version of it too (three-way; its lineage is taken)
        self._provisional = False
        self._new_lineage: str | None = None     # the one a first save gives (``_document``)
        self._read_from: Path | None = None      # the file read into it (``load``'s), if any
        # what a save interrupted while it wrote was writing: (the text's digest, the concepts,
        # the lineage); a file on disk that holds that very text was written
        # (``_settle_interrupted``), and is no conflict
        self._writing: tuple | None = None
        # the last edits, to undo (``undo``): (what was done, {key: concepts before}, {key:
        # concepts after}, its number in ``_seq``, the dataset then), newest last; and, by key,
        # the number of the last merge that changed the key (``_merged_at``): an edit of a key
        # that a merge changed since is not undone (it would undo the merge's change too)
        self._undo: list[tuple] = []
        self._seq = 0
        self._merged_at: dict[tuple, int] = {}
        #: What the last merge of a file (or an undo) did, by name, until the next edit: the
        #: concepts it took in and removed ("took in 1 concept from the file: h2 'theirs'").
        self.change_note: str | None = None
        self._merge_news = False      # whether the last merge took in or removed anything
        # fields of the file that this format does not know (a "description", an entry's
        # "comment"), written back as they were: the document's, and each entry's by its key
        self._extra: dict = {}
        self._entry_extra: dict[tuple, dict] = {}
        # ...and those of its "model" and "dataset" objects (a "checkpoint", a "source")
        self._model_extra: dict = {}
        self._dataset_extra: dict = {}
        # the model signature recorded in the file read (None: none read, or none recorded),
        # and what tells it from this store's model (``_other_model``), for its views to show
        self._made_for: dict | None = None
        self.model_note: str | None = None
        if self.path is not None:
            self._check_folder()
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
        resolved = str(_usable_path(path))
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
            if store.change_note and store._merge_news:
                warn(f"The annotations file {store.path} changed on disk since this kernel "
                     f"read or saved it: {store.change_note}.", UserWarning,
                     stacklevel=_caller_level())
        store.check(signature, dataset)
        return store

    @classmethod
    def load(cls, path: str | os.PathLike, *, signature: dict | None = None,
             n_instances: int | None = None, dataset: dict | None = None) -> "Annotations":
        """A store with the concepts of ``path`` that does not save (``save(path)`` does)."""
        path = _usable_path(path, resolve=False)
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
                # unit concepts held: they name the instances of self.dataset (the dataset of
                # every viewer, when any shows the store); none: any dataset may show it
                data, _, _ = self._as_read_for(signature)
                self._check_dataset(self.dataset, dataset, data, self._where())

    def _as_read_for(self, signature: dict | None) -> tuple[dict, dict, dict]:
        """The concepts, those of the file as last read or written, and the entries' unknown
        fields, for a model of ``signature`` (nothing changed): read from a version-1 file, the
        unit keys of its shared-unit modalities are feature keys (``_units_as_features``)."""
        shared = _shared_modalities(signature)
        if self._version_1_units and shared:
            return (_units_as_features(self._data, shared),
                    _units_as_features(self._disk_entries, shared),
                    _extras_as_features(self._entry_extra, shared))
        return self._data, self._disk_entries, self._entry_extra

    def bind(self, signature: dict | None, n_instances: int | None = None,
             dataset: dict | None = None) -> None:
        """A viewer (an Explorer) of this model and dataset is to show this store: ``check``,
        then keep the first signature given (recorded in the file from the next save) and, with a
        dataset, count the viewer until its ``unbind(dataset)``. While the store holds unit
        concepts only their dataset may bind; while viewers of two datasets show it (possible
        when it holds none), a unit concept cannot be added (it would name an instance of one
        of them)."""
        dataset, signature = _as_dataset(dataset), _as_signature(signature)
        with self._lock:
            self.check(signature, dataset)
            said = self.model_note
            if signature:
                self.model_note = _other_model(self._made_for or self.signature, signature,
                                               self._data)
            if n_instances is None and dataset:
                n_instances = dataset.get("instances")
            data, disk, extra = self._as_read_for(signature)
            self._check_ranges(data, signature, n_instances)
            self._data, self._disk_entries, self._entry_extra = data, disk, extra
            if _says_shared(signature):
                self._version_1_units = False
            if signature and not self.signature:
                self.signature = signature
            elif signature:
                self._fill_signature(signature)
            if n_instances is not None:
                self.n_instances = int(n_instances)
            if dataset:
                self.dataset = dataset
                self._viewers.append(dataset)
            self._edited()        # its concepts read anew, its signature or dataset taken
            note = self.model_note if self.model_note != said else None
        if note:                  # (not said again when reading the file said it already)
            self._warn_model(note)

    def _fill_signature(self, signature: ModelSignature) -> None:
        """Fill in what the store's signature (the first given, or the file's) leaves unknown
        from ``signature``'s (a viewer's); under the lock. The weights and the method of their
        fingerprint go together: a file's fingerprint without "weights_method" was taken by the
        older method, and is never labelled with another. The viewer's model, which lives,
        fingerprints the weights at each save from then on (``ModelSignature.live_weights``)."""
        if not isinstance(self.signature, ModelSignature):
            self.signature = ModelSignature(self.signature)
        for f, v in signature.items():
            if f == "weights_method":
                continue                       # with "weights" only
            if self.signature.get(f) is None:
                self.signature[f] = v
                if f == "weights":
                    self.signature["weights_method"] = signature.get("weights_method")
        if callable(signature.live_weights):
            self.signature.live_weights = signature.live_weights
            self.signature.older_weights = signature.older_weights

    def unbind(self, dataset: dict | None = None) -> None:
        """A viewer that showed this store (``bind`` with ``dataset``; None: the last to bind)
        no longer does. When the viewers left all show one dataset, unit concepts name its
        instances again."""
        with self._lock:
            if not self._viewers:
                return
            if dataset is None:
                self._viewers.pop()
            else:
                same = [n for n, d in enumerate(self._viewers) if d is dataset] or [
                    n for n, d in enumerate(self._viewers) if d == dataset]
                if same:
                    del self._viewers[same[0]]
            left = self._viewer_datasets()
            if len(left) == 1:
                self.dataset = left[0]
                self._edited()
                if is_integer(left[0].get("instances")):
                    self.n_instances = int(left[0]["instances"])

    def _viewer_datasets(self) -> list[dict]:
        """The distinct datasets of the viewers showing the store."""
        out: list[dict] = []
        for d in self._viewers:
            if not any(_same_dataset(d, o) for o in out):
                out.append(d)
        return out

    def _check_one_dataset(self, where: str = "") -> None:
        """An AnnotationError when viewers of two datasets show this store: a unit concept
        would name an instance of one of them."""
        shown = self._viewer_datasets()
        if len(shown) > 1:
            names = " and ".join(_dataset_text(d) for d in shown[:2])
            raise AnnotationError(
                f"A unit concept{where} names an instance of one dataset, and these annotations"
                f"{self._where()} are shown for two in this kernel ({names}, by two Explorers), "
                f"so none can be added now. Close the Explorer of one dataset "
                f"(explorer.close()), or give each dataset its own file "
                f"(Explorer(..., annotations='other.json')).")

    def add_key_check(self, check: Callable[[tuple], None]) -> None:
        """Call ``check(key)`` before a key that has no concepts gets some (``add``, ``set``, and
        ``merge``, of a file or a store, which then takes nothing): it raises an AnnotationError
        (or a ValueError) to refuse the key, e.g. a unit that its instance does not have. Called
        outside the store's lock."""
        with self._lock:
            self._key_checks.append(check)

    def remove_key_check(self, check: Callable[[tuple], None]) -> None:
        with self._lock:
            if check in self._key_checks:
                self._key_checks.remove(check)

    def _take_dataset(self, dataset: dict) -> None:
        """Adopt ``dataset`` (given, or the one unit concepts come with), and its size when no
        other was given."""
        self.dataset = _as_dataset(dataset)
        self._edited()
        if self.n_instances is None and is_integer(self.dataset.get("instances")):
            self.n_instances = int(self.dataset["instances"])

    def _check_dataset(self, named: dict | None, other: dict | None, entries: dict,
                       where: str) -> None:
        """An AnnotationError when ``entries`` hold unit concepts, which name instances of the
        dataset ``named``, and ``other`` is another dataset (neuron concepts belong to the model
        and go with any dataset). A signature without a fingerprint (an older file) is told
        apart by its name and size only."""
        if not any(k[0] == "unit" for k in entries) or _same_dataset(named, other):
            return
        if named.get("name") == other.get("name") and named.get("instances") == other.get(
                "instances"):
            raise AnnotationError(
                f"The unit concepts{where} name instances of {_dataset_text(named)}, and this is "
                f"another dataset of that name and size: its inputs differ (fingerprint "
                f"{str(_fingerprint(other))[:12]}, the unit concepts' "
                f"{str(_fingerprint(named))[:12]}). {_OWN_FILE} {_SAME_INSTANCES}")
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
            try:
                concepts = list(concepts)
            except TypeError:                # None, a number: not a list of concepts
                raise AnnotationError(
                    f"Concepts are a list of strings, got {_brief(concepts)}: pass "
                    f"set(key, ['red shapes']), or set(key, []) to remove the key's "
                    f"concepts.") from None
        return self._update(key, lambda now: concepts)

    def add(self, key, concept: str) -> tuple[str, ...]:
        """Add one concept to ``key`` (nothing when it is there already)."""
        concept = tidy_concept(concept)
        return self._update(key, lambda now: now + (concept,))

    def remove(self, key, concept: str) -> tuple[str, ...]:
        """Remove one concept from ``key``, whatever its case (an AnnotationError when it is not
        there)."""
        concept = tidy_concept(concept, typed=False)     # one there is: as the file wrote it
        gone = same_concept(concept)

        def without(now):
            if not any(same_concept(c) == gone for c in now):
                raise AnnotationError(f"{_key(key)} has no concept {concept!r}; it has "
                                      f"{list(now)}.")
            return [c for c in now if same_concept(c) != gone]
        return self._update(key, without)

    def rename(self, old: str, new: str, *, merge: bool = False) -> list[tuple]:
        """Rename the concept ``old`` (whatever its case) to ``new`` on every key that carries
        it, as one change (one save; ``undo()`` takes it back). Returns the keys renamed (none:
        an AnnotationError naming the concepts there are).

        When ``new`` is a concept already (of any key), the rename would join the two concepts
        into one, which renaming back cannot separate: it is refused (an AnnotationError that
        names the keys that have it) unless ``merge=True``, which joins them (a key that has
        both keeps ``new`` once)."""
        old, new = tidy_concept(old, typed=False), tidy_concept(new)
        was, will = same_concept(old), same_concept(new)
        with self._lock:
            keys = [k for k, cs in self._data.items() if any(same_concept(c) == was for c in cs)]
            if not keys:
                known = sorted({c for cs in self._data.values() for c in cs}, key=str.casefold)
                raise AnnotationError(f"No key has the concept {old!r}; the concepts are "
                                      f"{_brief(known)}.")
            taken = [k for k, cs in self._data.items()
                     if will != was and any(same_concept(c) == will for c in cs)]
            if taken and not merge:
                raise AnnotationError(
                    f"{new!r} is a concept already ({_names(taken)}): renaming {old!r} to it "
                    f"would join the two into one, which renaming back could not separate. "
                    f"Nothing was renamed; choose another name, or pass merge=True to join "
                    f"them (undo() separates them again).")
            renamed = {k: _concepts([new if same_concept(c) == was else c
                                     for c in self._data[k]], str(k), typed=False)
                       for k in keys}
            if all(renamed[k] == self._data[k] for k in keys):
                return sorted(keys, key=_sort_key)           # new is the spelling kept already
            before = {k: self._data[k] for k in keys}
            self._apply(renamed)
            joined = " (joined with the concept of that name)" if taken else ""
            self._push_undo(f"renamed {old!r} to {new!r} on {_names(keys)}{joined}", before,
                            renamed)
        self._changed(None)
        return sorted(keys, key=_sort_key)

    def _update(self, key, make: Callable[[tuple], Iterable[str]]) -> tuple[str, ...]:
        """Set the concepts of ``key`` to ``make(its concepts now)`` under the lock; save and tell
        the observers after it (outside it). A key that has no concepts yet is first checked
        by the viewers' key checks (``add_key_check``), outside the lock: a check may take a
        lock under which another thread reads this store."""
        key = _key(key)
        with self._lock:
            self._check_ranges({key: ()}, self.signature, self.n_instances)
            # a key that gets its first concepts (``make`` is called again below, on what the
            # concepts are then)
            named = key not in self._data and bool(_concepts(make(()), str(key), typed=False))
            if named and key[0] == "unit":
                self._check_one_dataset()
            checks = list(self._key_checks) if named else []
        _run_key_checks(checks, [key])
        dataset = self.dataset
        if key[0] == "unit" and dataset is not None:
            _fingerprint(dataset)     # to be saved with it: computed (when lazy) outside the lock
        with self._lock:
            now = self._data.get(key, ())
            new = _concepts(make(now), str(key), typed=False)
            there = set(now)
            for c in new:             # what the person adds now is checked as typed text
                if c not in there:
                    _check_typed(c)
            self._check_ranges({key: new}, self.signature, self.n_instances)
            retry = now == new and self.unsaved and self.autosave
            if now == new and not retry:
                return new
            if now != new:
                if key[0] == "unit" and key not in self._data:
                    self._check_one_dataset()
                self._apply({key: new})
                self._push_undo(_describe_change({key: now}, {key: new}), {key: now},
                                {key: new})
        # nothing changed, but a change is not saved yet (an interrupted save): saved now
        self._changed(key)
        return new

    def _apply(self, values: dict) -> None:
        """Set the concepts of each key of ``values`` (none: the key goes); an edit, under the
        lock: not saved yet, and what the last merge did is no longer the news."""
        for key, cs in values.items():
            if cs:
                self._data[key] = tuple(cs)
            else:
                self._data.pop(key, None)
        self._edited()
        self.unsaved = True
        self.change_note = None

    def _push_undo(self, what: str, before: dict, after: dict) -> None:
        self._undo.append((what, before, after, self._seq, self.dataset))
        self._seq += 1
        del self._undo[:-UNDO_KEPT]

    @property
    def can_undo(self) -> str | None:
        """What ``undo`` would undo ("removed 'red' from h7"), or None when nothing."""
        with self._lock:
            return self._undo[-1][0] if self._undo else None

    def undo(self) -> str:
        """Undo the last edit of this store (``add``, ``remove``, ``set`` or ``rename``; of a
        merge, only the concepts it removed: "removed by the merge: h1 'x'" puts them back),
        saved as any change; returns what it did ("undid: removed h7 'red' (added h7
        'red')"), also kept in ``change_note``. The last 100 edits can be undone, newest first,
        one per call; an AnnotationError when there is none.

        A key that a merge changed since the edit (concepts another kernel or a colleague's
        file added or removed there, taken in by ``merge``) is skipped, and the note says so
        ("skipped h1: changed by a merge since"): undoing the edit there would undo the
        merge's change too (remove a concept the other side added as well, or put back one it
        removed). An edit that every key of is skipped is taken off the list, nothing
        changed ("did not undo: ..."); the next call undoes the one before it.
        The merge's own step is the exception, and it comes first (it is the newest): it puts
        back what the merge removed, whether another kernel removed it on purpose or a copy
        of the file saved over this one lacked it (the two cannot be told apart); ``can_undo``
        and the row's undo button say so before it is done.

        An undo that would put concepts where they cannot be now is refused, as the edit
        would be (an AnnotationError that says why, nothing changed): a neuron beyond the
        model's (after ``bind`` to another model), a unit concept of another dataset than the
        one the store is now shown for, a key a viewer's check refuses (``add_key_check``).
        That edit is taken off the list too, so that undo() goes on with the one before it."""
        checked: set[tuple] = set()
        while True:
            with self._lock:
                if not self._undo:
                    raise AnnotationError("There is no edit of these concepts to undo (undo() "
                                          "undoes the adds, removes, sets and renames made "
                                          "here since they were opened).")
                entry = self._undo[-1]
                then, shown = entry[4], self.dataset
            if then is not None and shown is not None and then is not shown and any(
                    k[0] == "unit" for k in entry[1]):
                _fingerprint(then)      # compared below: computed (when lazy) outside the lock
                _fingerprint(shown)
            with self._lock:
                if not self._undo or self._undo[-1] is not entry:
                    continue                        # undone meanwhile by another thread
                what, before, after, seq, then = entry
                values, skipped = self._undone(before, after, seq)
                # the keys that get concepts back, checked as an edit's would be
                gains = {k: cs for k, cs in values.items()
                         if {same_concept(c) for c in cs}
                         - {same_concept(c) for c in self._data.get(k, ())}}
                try:
                    self._check_ranges(gains, self.signature, self.n_instances)
                    units = [k for k in gains if k[0] == "unit"]
                    if units and any(k not in self._data for k in units):
                        self._check_one_dataset()
                    if units and then is not None and self.dataset is not None and \
                            not _same_dataset(then, self.dataset):
                        raise AnnotationError(
                            f"its unit concepts name instances of {_dataset_text(then)}, and "
                            f"these annotations are shown for {_dataset_text(self.dataset)} "
                            f"now: put back, they would name this dataset's instances")
                except AnnotationError as e:
                    self._undo.pop()
                    raise _not_undone(what, e) from None
                unchecked = [k for k in gains if k not in self._data and k not in checked]
                checks = list(self._key_checks) if unchecked else []
                if not checks:
                    self._undo.pop()
                    note = self._take_undone(what, values, skipped)
                    break
            try:
                _run_key_checks(checks, unchecked)       # outside the lock, as an add's are
            except AnnotationError as e:
                with self._lock:
                    if self._undo and self._undo[-1] is entry:
                        self._undo.pop()
                raise _not_undone(what, e) from None
            checked.update(unchecked)
        if values:
            self._changed(None)
        else:
            self._notify(None)
        return note

    def _undone(self, before: dict, after: dict, seq: int) -> tuple[dict, list]:
        """What undoing an edit (``before`` -> ``after``, made as edit ``seq``) sets each key
        to, and the keys skipped: changed by a merge since (``_merged_at``); under the lock. A
        key edited since otherwise keeps those edits: only what the edit added is taken off
        and what it removed put back."""
        values, skipped = {}, []
        for key in sorted(set(before) | set(after), key=_sort_key):
            if self._merged_at.get(key, -1) > seq:
                skipped.append(key)
                continue
            was, made = before.get(key, ()), after.get(key, ())
            now = self._data.get(key, ())
            if now == made:
                values[key] = was
                continue
            was_f, made_f = {same_concept(c) for c in was}, {same_concept(c) for c in made}
            values[key] = _concepts(
                [c for c in now if same_concept(c) in was_f or same_concept(c) not in made_f]
                + [c for c in was if same_concept(c) not in made_f], str(key), typed=False)
        return values, skipped

    def _take_undone(self, what: str, values: dict, skipped: list) -> str:
        """An undo's ``values`` made the store's, and its note (``change_note``); under the
        lock."""
        merged = (f"{_names(skipped)}: changed by a merge since (undoing the edit there would "
                  f"undo the merge's change too; it is kept, edit it by hand if need be)")
        if not values:
            self.change_note = (f"did not undo: {what}: skipped {merged}; nothing changed, "
                                f"and undo() again undoes the edit before it")
            return self.change_note
        now = {k: self._data.get(k, ()) for k in values}
        done = _describe_change(now, values) or "nothing left to change"
        self._apply(values)
        self.change_note = f"undid: {what} ({done})" + (f"; skipped {merged}" if skipped
                                                         else "")
        return self.change_note

    def keys(self, kind: str | None = None) -> list[tuple]:
        """Every annotated key ("neuron", "unit" or "feature" only, when ``kind`` says),
        sorted."""
        if kind not in (None, "neuron", "unit", "feature"):
            raise AnnotationError(f"kind is 'neuron', 'unit', 'feature' or None, got {kind!r}.")
        with self._lock:
            keys = [k for k in self._data if kind is None or k[0] == kind]
        return sorted(keys, key=_sort_key)

    def find(self, concept: str) -> list[tuple]:
        """The keys that carry ``concept`` (compared as ``same_concept`` does), sorted."""
        want = same_concept(tidy_concept(concept, typed=False))
        with self._lock:
            keys = [k for k, cs in self._data.items()
                    if any(same_concept(c) == want for c in cs)]
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
        try:
            if self.autosave:
                try:
                    self.save()
                except (OSError, AnnotationError):
                    pass                       # recorded in save_error; the change is kept
        finally:                               # (an interrupt too: the views show the change)
            self._notify(key)

    # -- files ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The JSON document a save writes (sorted, so equal stores write equal files). A key
        without concepts whose entry has fields this format does not know (a colleague's
        "comment": "TODO" on a neuron not named yet, or a key whose last concept was removed)
        is written with no concepts, its fields kept; it is no concept's key (``keys``, ``find``
        and the views do not show it)."""
        return self._document()[0]

    def _edited(self) -> None:
        """Count a change to what ``to_dict`` writes; called under the store's lock."""
        self._edits += 1

    def _current(self, doc: dict, edits: int) -> bool:
        """Whether ``doc`` (``_document``'s, made at ``edits``) is what to_dict would write now;
        under the lock. The signature and dataset are compared too (small dicts): a user may
        set or edit them by hand (``store.dataset = ...``), which no count sees."""
        return (edits == self._edits and doc["model"] == self._model_doc()
                and doc["dataset"] == _with_extra(self.dataset, self._dataset_extra))

    def _document(self) -> tuple[dict, int]:
        """``to_dict``'s document, and the count of changes (``_edits``) it holds."""
        with self._lock:
            edits = self._edits
            noted = [(k, ()) for k, fields in self._entry_extra.items()
                     if fields and k not in self._data]
            items = sorted([*self._data.items(), *noted], key=lambda kv: _sort_key(kv[0]))
            sig = self._model_doc()
            dataset = self.dataset
            dataset_extra = dict(self._dataset_extra)
            if self._lineage is None and self._new_lineage is None:
                self._new_lineage = uuid.uuid4().hex
            lineage = self._lineage or self._new_lineage
            units = any(k[0] == "unit" for k, _ in items)
            # read from a version-1 file, with no model yet to say which of its unit keys name
            # a feature (a tabular column): written as version 1 still, to be read so again
            version = 1 if self._version_1_units and units else VERSION
            extra, entry_extra = dict(self._extra), dict(self._entry_extra)
        if dataset is not None and units:
            _fingerprint(dataset)      # recorded with the unit concepts (computed when lazy)

        def entry(k, fields: dict, v) -> dict:
            return {**fields, "concepts": list(v), **entry_extra.get(k, {})}
        # the lineage near the top, one line that no save changes: two branches' versions of
        # the file merge in git as the entries they changed do
        doc = {"format": FORMAT, "version": version, "lineage": lineage, "model": sig,
               "dataset": _with_extra(dataset, dataset_extra),
               "neurons": [entry(k, {"neuron": k[1]}, v) for k, v in items if k[0] == "neuron"],
               "units": [entry(k, {"instance": k[1], "modality": k[2], "unit": k[3]}, v)
                         for k, v in items if k[0] == "unit"],
               "features": [entry(k, {"modality": k[1], "unit": k[2]}, v)
                            for k, v in items if k[0] == "feature"]}
        doc.update((f, v) for f, v in extra.items() if f not in doc)
        return doc, edits

    def _model_doc(self) -> dict | None:
        """The "model" object a save writes: the signature, with the fields of the file's that
        this format does not know; under the lock."""
        if not self.signature and not self._model_extra:
            return None
        return _with_extra(self.signature or {}, self._model_extra)

    def _take_live_weights(self) -> None:
        """The signature's weights fingerprint as the model's weights are now
        (``ModelSignature.live_weights``): a save records the weights the concepts were made
        on, also after a fine-tune within the session (then ``explorer.refresh()``)."""
        live = getattr(self.signature, "live_weights", None)
        if not callable(live):
            return
        try:
            now = live()
        except Exception:  # noqa: BLE001 - the model cannot be read now: what was recorded
            return
        with self._lock:
            if now and self.signature is not None and self.signature.get("weights") != now:
                self.signature["weights"] = now
                self.signature["weights_method"] = WEIGHTS_METHOD
                self._edited()

    def save(self, path: str | os.PathLike | None = None, *, overwrite: bool = False) -> Path:
        """Write the store to ``path`` (default: its own) atomically; returns the path.

        To its own path: refused (:class:`AnnotationConflict`) when the file changed on disk since
        this store read or wrote it (``merge(path)`` takes those changes in; a save then goes
        through), unless ``overwrite=True`` (which replaces them). To another path: refused when a
        file is there, unless ``overwrite=True``. A store without a file (made without a path)
        takes the file it saved to as its own, as ``Annotations.open`` of that path would: a link
        is followed to its file, each change is saved there from then on (unless the store was
        made with ``autosave=False``), observers hear it, and a later ``Annotations.open`` of the
        file (an Explorer given it) gets this store. On failure the concepts stay in memory and
        ``save_error`` says why; a save fails so too when another program holds the file's lock
        (``.NAME.lock``, taken by each save) for more than ``lock_timeout`` seconds, rather than
        freeze the kernel (reads of the store never wait for it)."""
        target = self.path if path is None else Path(path).expanduser()
        if target is None:
            raise AnnotationError("This store has no file: give save() a path.")
        adopt = self.path is None
        # the file a link points at (its own file: not needed, and never resolved, so that a
        # store whose file became a link loop still says why in save_error)
        resolved = None if path is None else _usable_path(target)
        if adopt:          # a link: the file it points at, as Annotations(path) would read it
            target = resolved
        own = path is None or (self.path is not None and resolved == self.path.resolve())
        if own:
            # its own file by another name (a link, a relative path): the file itself is
            # written, not the link replaced by a copy
            target = self.path
        done = writing = False
        # a copy saved to another file is another file: a lineage of its own, derived from this
        # store's and that path, the same at each save there (put back over this one, it is
        # joined, removing none of these). So too a store that read a file and has none of its
        # own (``load``): saved to another path, that file gets its own; saved over the file
        # it read, it keeps that file's
        copy_lineage = None
        derive = not own and (not adopt or (
            self._lineage is not None and resolved != self._read_from))
        try:
            if target.is_dir():
                raise AnnotationError(
                    f"Could not save the annotations to {target}: it is a folder; give the "
                    f"path of a file in it (save({str(target / 'concepts.json')!r})). They are "
                    f"kept in memory.")
            self._take_live_weights()       # the weights the concepts were made on, now
            # the text first (a value that JSON cannot hold fails here, before the disk is
            # touched), with no lock held while it is encoded (to_dict copies under the lock)
            doc, edits = self._document()
            if derive:
                copy_lineage = hashlib.sha256(
                    f"{doc['lineage']}\0{resolved}".encode()).hexdigest()[:32]
                doc["lineage"] = copy_lineage
            raw = _encoded(doc, target)
            # then the file's lock, with the store's not held: while another program holds it
            # (another kernel's save, stalled), this store is read and edited as usual, and the
            # wait ends after lock_timeout seconds in save_error. Under it, the check and the
            # write: another store saving the file meanwhile (in this kernel or another) waits,
            # then sees this write as a change
            with file_lock(target, timeout=self.lock_timeout):
                with self._lock:       # the text and the write together: no older text wins
                    adopt = adopt and self.path is None  # else adopted by another save meanwhile
                    if not self._current(doc, edits):
                        # changed while this save waited: the newest is written (built again
                        # only then: a save after each change built it twice)
                        doc = self._document()[0]
                        if copy_lineage is not None:
                            doc["lineage"] = copy_lineage
                        raw = _encoded(doc, target)
                    if own and not overwrite:
                        self._check_unchanged(target)
                    elif not own and target.exists() and not overwrite:
                        raise self._exists(target)
                    if own or adopt:
                        # what is being written: an interrupt from here on may come after the
                        # file was written, which the next save or merge then sees
                        self._writing = (_digest(raw), dict(self._data), doc["lineage"])
                    writing = True
                    _atomic_write(target, raw)
                    if adopt:
                        self.path = target
                        self.autosave = self.autosave if self._autosave_given else True
                    if own or adopt:
                        self._disk_digest, self._disk_entries, self._lineage = self._writing
                        self._writing = None
                        self._provisional = False
                        self.unsaved = False
                    done = True
                # the temporary files of saves of this file killed before their rename (a
                # SIGKILL, a crash), removed with the file's lock still held (the store's is
                # not: its readers do not wait for the folder to be listed). Holding the lock
                # does not make every other temporary a dead save's: a process that cannot open
                # the lock file (a colleague's, read-only to it) or a file system whose locks
                # are local (NFS mounted nolock) writes without it. So only those older than
                # any save takes go (a save stalled longer would fail into its save_error,
                # keeping its concepts in memory). Other files' temporaries are not touched.
                remove_stale_temporaries(target, _STALE_TEMPORARY_SECONDS)
        except BaseException as e:
            if done:
                raise
            if not isinstance(e, Exception):
                # an interrupt (the kernel's Interrupt button while the save waited for the
                # file's lock): said in save_error, so that the row says NOT saved; raised on
                if own:
                    when = ("while it wrote the annotations (they may have been written or "
                            "not)" if writing else "before it wrote the annotations")
                    self._failed(f"The save to {target} was interrupted ({type(e).__name__}) "
                                 f"{when}; they are kept in memory. The next change, or "
                                 f"annotations.save(), writes them.", False)
                raise
            if not isinstance(e, (OSError, AnnotationError, UnicodeError)):
                raise
            if isinstance(e, AnnotationError):
                err = e
            elif isinstance(e, LockTimeout) and e.in_process:
                # this kernel's own lock: no other program is involved, and fuser would show
                # this process only
                err = TimeoutError(
                    f"Could not save the annotations to {target}: another thread of this "
                    f"kernel is still saving that file, for more than {e.waited:g} s (a slow "
                    f"disk or network file system); they are kept in memory. The next change, "
                    f"or save(), writes them once that save ends; save(another_path) writes "
                    f"them elsewhere.")
            elif isinstance(e, LockTimeout):
                lock = e.lock_path
                err = TimeoutError(
                    f"Could not save the annotations to {target}: another program (a notebook "
                    f"or kernel saving that file, stopped or hung while it saved) has held its "
                    f"lock file {lock} for more than {e.waited:g} s; they are kept in memory. "
                    f"The next change, or save(), writes them once it lets go (`fuser {lock}` "
                    f"shows which process of this machine holds it); save(another_path) "
                    f"writes them elsewhere.")
            elif isinstance(e, UnicodeError):
                bad = getattr(e, "object", "")[getattr(e, "start", 0):getattr(e, "end", 0)]
                err = AnnotationError(
                    f"Could not save the annotations to {target}: they hold {bad!r}, which is "
                    f"not text that a file can hold ({getattr(e, 'reason', e)}); they are kept "
                    f"in memory. Remove or rename what holds it (a name in the model's or the "
                    f"dataset's signature, or a key: keys() lists them), then save again.")
            elif (isinstance(e, (FileNotFoundError, NotADirectoryError))
                  and not target.parent.is_dir()):
                why, in_the_way = _folder_problem(target.parent)
                fix = (f"Create the folder (os.makedirs({str(target.parent)!r})), then save "
                       f"again, or save(another_path) writes them elsewhere."
                       if in_the_way is None else
                       f"Correct the path (save(corrected_path) writes them there), or move "
                       f"or rename the file {in_the_way} (no folder can be made where a file "
                       f"is), then save again.")
                err = type(e)(
                    f"Could not save the annotations to {target}: the folder "
                    f"{target.parent} {why}; they are kept in memory. {fix}")
            else:
                err = OSError(
                    f"Could not save the annotations to {target} ({e.strerror or e}); they are "
                    f"kept in memory: save(another_path) writes them elsewhere.")
            if own:
                self._failed(str(err), isinstance(err, AnnotationConflict))
            if err is e:
                raise
            raise err from e
        if adopt:
            with _OPEN_LOCK:       # shared from now on, as a store opened on the file is
                if _OPEN.get(str(target)) is None:
                    _OPEN[str(target)] = self
            self._notify(None)
        elif own and self.save_error is not None:
            self.save_error, self.save_conflict = None, False
            self._notify(None)
        return target

    def _exists(self, target: Path) -> AnnotationError:
        """The error of a save to another file that is there already (under the lock): how to
        keep both its concepts (a colleague's, saved there since this store read it) and
        this store's, and what overwrite=True alone does."""
        also = (f" (and, as it saves each change, into its own file {self.path})"
                if self.path is not None and self.autosave else "")
        return AnnotationError(
            f"{target} exists; a save does not write over another file unless asked. To keep "
            f"its concepts and these: merge({str(target)!r}) takes its concepts into this "
            f"store{also}, then save({str(target)!r}, overwrite=True) writes them all there. "
            f"overwrite=True alone replaces the file's concepts with this store's (what was "
            f"saved there, by a colleague too, is lost); or save to another name.")

    def _failed(self, why: str, conflict: bool) -> None:
        """A save of its own file failed (``why``): recorded in ``save_error``, observers told
        when that changed."""
        failed_before, self.save_error = self.save_error, why
        self.save_conflict = conflict
        if failed_before != self.save_error:
            self._notify(None)

    def merge(self, other: "Annotations | str | os.PathLike") -> int:
        """Take in the concepts of ``other`` (a store or a file); returns how many concepts came
        in.

        Another store or file: its concepts are added to this store's (a union: a concept that
        either has stays). The file this store saves to, when it is of the lineage this store
        last read or wrote (its "lineage" field, kept by every save; a file read without one
        gets one derived from its bytes, the same in every kernel that read it), or has no
        lineage (an older multiviz_widgets wrote it, or a hand edit deleted the line): a
        three-way merge against the file as this store last read or wrote it, so that what was
        changed there since (concepts added, and concepts removed) is taken in beside this
        store's own changes; the file is then saved again when it lacks any of them. Any copy
        of that same file saved over it (an older backup, a teacher's handout e-mailed again,
        a colleague's ``cp`` of it) is such a version too: a lineage cannot tell a copy from
        a later version, so the concepts it lacks are removed here; ``change_note`` names
        them, and one step of ``undo`` ("removed by the merge: h1 'x'") puts them back and
        saves. Only a file of another lineage (made by another store) copied over it is joined
        as another file is, none of this store's concepts removed, and saved again with this
        store's lineage; ``change_note`` says that it was replaced and joined. Fields that
        this format does not know (a document's "description", an entry's "comment") are
        kept: this store's win, except over its own file's, whose edits are newer. A key that
        gets its first concepts from it is checked by the viewers' checks (``add_key_check``)
        as an add's is: one refused, and nothing is merged."""
        if not isinstance(other, (Annotations, str, os.PathLike)):
            raise AnnotationError(
                f"merge takes a store (an Annotations) or the path of an annotations file, got "
                f"{type(other).__name__} {_brief(other, 80)}.")
        checked: set[tuple] = set()          # keys the viewers' checks took
        parsed: dict[str, dict] = {}           # the file's document by its digest: parsed once
        while True:
            with self._lock:           # the file read, and the merge, in step with any save
                if isinstance(other, Annotations):
                    incoming, sig, digest, source = other.to_dict(), other.signature, None, None
                else:
                    source = _usable_path(other, resolve=False)
                    raw = _read_bytes(source)
                    digest = _digest(raw)
                    if self.path is not None and source.resolve() == self.path.resolve():
                        self._settle_interrupted(digest)    # a save's, interrupted: it wrote
                    incoming = parsed[digest] if digest in parsed else _parse(raw, source)
                    parsed = {digest: incoming}
                    sig = incoming.get("model")
                what = source if source is not None else "the store merged"
                (merged, added, removed, theirs, their_extra, own_file, replaced,
                 touched) = self._merged(incoming, sig, what, source)
                # keys that get their first concepts are checked by the viewers' checks
                # (add_key_check), as an add's are: outside the lock (a check may take a lock
                # under which another thread reads this store), then all is read again
                unchecked = [k for k in merged if k not in self._data and k not in checked]
                checks = list(self._key_checks) if unchecked else []
                if not checks:
                    changed, resolved = self._take_merged(merged, theirs, incoming, their_extra,
                                                          own_file, digest, touched)
                    self._undoable_removals(merged, removed)
                    self.change_note = _merge_text(
                        added, removed, replaced,
                        "the file" if own_file else str(source) if source else "the store")
                    news = bool(added or removed or replaced)
                    break
            _run_key_checks(checks, unchecked, f"It is in {what}, so nothing was merged; "
                                               f"correct or remove that entry there, then "
                                               f"merge again.")
            checked.update(unchecked)
        # concepts of another model of this shape (another name or weights): taken, but said
        note = _other_model(sig, self.signature, theirs) if isinstance(sig, dict) else None
        if note:
            with self._lock:
                self.model_note = note
                if own_file:                   # its file is now what the other model made
                    self._made_for = dict(sig)
        if (changed and not own_file) or (own_file and self.unsaved):
            self._changed(None)
        elif changed or resolved:      # the file holds all of them already: not written again
            self._notify(None)
        if note:
            self._warn_model(note, f"The annotations in {source}" if own_file
                             else f"The annotations merged from {source}" if source
                             else "The annotations of the store merged")
        self._merge_news = news
        return len(added)

    def _merged(self, incoming: dict, sig: dict | None, what, source: Path | None) -> tuple:
        """What ``merge`` makes of a document (``to_dict``'s, or a file's) under the lock,
        nothing changed yet: (the concepts merged, how many came in, the document's concepts
        and its entries' unknown fields, whether it is this store's own file); an
        AnnotationError when it cannot be taken."""
        why = _mismatch(sig, self.signature)
        if why:
            raise AnnotationError(f"The annotations of {what} belong to another model "
                                  f"({why}); nothing was merged.")
        their_extra: dict[tuple, dict] = {}
        theirs = _entries(incoming, what, _shared_modalities(self.signature or sig),
                          their_extra)
        if any(k[0] == "unit" and k not in self._data for k in theirs):
            self._check_one_dataset(f" of {what}")
        self._check_dataset(incoming.get("dataset"), self.dataset, theirs, f" of {what}")
        self._check_ranges(theirs, self.signature, self.n_instances)
        own_file = (source is not None and self.path is not None
                    and source.resolve() == self.path.resolve())
        # a three-way merge against the file as this store last read or wrote it when the file
        # is of its lineage: its removals are real (any copy of this same file saved over it
        # too, a backup or a handout: what it lacks is removed, said, and undoable). A file of
        # another lineage (made by another store) copied over it is joined: nothing of ours
        # removed.
        # A file on disk without a lineage (an older multiviz_widgets wrote it, or a hand
        # edit deleted the line) is a version of it too; so is one of the lineage that a first
        # save, interrupted while it wrote, was writing (another kernel may have edited it
        # since): its base is what that save wrote
        their_lineage = _lineage_of(incoming)
        base = self._disk_entries
        read = own_file and self._disk_digest is not None
        if (own_file and self._writing is not None and their_lineage is not None
                and their_lineage == self._writing[2] and their_lineage != self._lineage):
            read, base = True, self._writing[1]
        same = read and (their_lineage is None or self._lineage is None or self._provisional
                         or their_lineage in (self._lineage, self._writing_lineage()))
        replaced = read and not same
        base = base if same else {}
        merged, added, removed, touched = {}, [], [], []
        for key in set(self._data) | set(theirs):
            ours, their = self._data.get(key, ()), theirs.get(key, ())
            # sets to look concepts up in (a tuple's ``in`` would cost the square of a long
            # list), the tuples for the order
            # (compared as same_concept does: "Red Shapes" there is "red shapes" here)
            in_ours, in_theirs = {same_concept(c) for c in ours}, {same_concept(c) for c in their}
            was = {same_concept(c) for c in base.get(key, ())}
            # kept: what both have, and what either added since the base; so a concept that
            # either removed since the base stays removed
            new = tuple(c for c in their
                        if same_concept(c) not in in_ours and same_concept(c) not in was)
            cs = tuple(c for c in ours
                       if same_concept(c) in in_theirs or same_concept(c) not in was) + new
            if len(cs) > MAX_CONCEPTS_PER_KEY:
                raise _too_many(f"{key}, with the concepts of {what} merged in,",
                                f"nothing was merged; remove some of its concepts here or in "
                                f"{what} first")
            added += [(key, c) for c in new]
            kept = {same_concept(c) for c in cs}
            removed += [(key, c) for c in ours if same_concept(c) not in kept]
            if cs:
                merged[key] = cs
            # changed by the merge: the merge changes ours, or (a version of this file) the
            # other side changed the key since the base (an undo of an earlier edit there
            # would fight it, and write over their change); a key of another file joined that
            # the merge left as it was is undone as usual
            if kept != in_ours or (same and in_theirs != was):
                touched.append(key)
        added.sort(key=lambda kc: _sort_key(kc[0]))
        removed.sort(key=lambda kc: _sort_key(kc[0]))
        return merged, added, removed, theirs, their_extra, own_file, replaced, touched

    def _undoable_removals(self, merged: dict, removed: list) -> None:
        """The concepts a merge removed (``removed``: (key, concept) pairs), one step of
        ``undo`` that puts them back: a copy of this same file saved over it (a backup, a
        teacher's handout) reads as a later version, and what it lacks is removed; under the
        lock."""
        if not removed:
            return
        before: dict[tuple, tuple] = {}
        for key, c in removed:
            before[key] = before.get(key, merged.get(key, ())) + (c,)
        after = {key: merged.get(key, ()) for key in before}
        self._push_undo(f"removed by the merge: {_pairs(removed)}", before, after)

    def _take_merged(self, merged: dict, theirs: dict, incoming: dict, their_extra: dict,
                     own_file: bool, digest: str | None,
                     touched: Iterable[tuple]) -> tuple[bool, bool]:
        """``merge``'s result made the store's (under the lock): (whether its concepts changed,
        whether a failed save of its own file is resolved by it)."""
        changed = merged != self._data
        self._data = merged
        self._edited()
        mark = self._seq            # the edits before it are not undone on the keys it changed
        self._seq += 1
        for key in touched:
            self._merged_at[key] = mark
        _take_extras(self._extra, _document_extras(incoming), own_file)
        for key, fields in their_extra.items():
            _take_extras(self._entry_extra.setdefault(key, {}), fields, own_file)
        _take_extras(self._model_extra, _unknown(incoming.get("model"), MODEL_FIELDS), own_file)
        _take_extras(self._dataset_extra, _unknown(incoming.get("dataset"), DATASET_FIELDS),
                     own_file)
        if (incoming.get("dataset") and not self.dataset
                and any(k[0] == "unit" for k in theirs)):
            self._take_dataset(_known(incoming["dataset"], DATASET_FIELDS))
        resolved = False
        if own_file:           # its changes on disk are taken in: a save may now replace it
            self._disk_digest, self._disk_entries = digest, dict(theirs)
            theirs_lineage = _lineage_of(incoming)
            if self._lineage is None or (self._provisional and theirs_lineage is not None):
                # this store gave the file none yet (or only one derived from the version it
                # read): the file's is taken (another kernel's first save of the file both
                # read; or, the file having none, one derived from it), the base of the next
                # merge
                self._provisional = theirs_lineage is None and self._provisional
                self._lineage = theirs_lineage or (_derived_lineage(digest) if digest else None)
                self._writing = None
            # the file lacks some of ours, or is of another lineage than this store's (a copy
            # joined): saved again, so that its next version is merged against this
            self.unsaved = merged != theirs or theirs_lineage != self._lineage
            resolved = not self.unsaved and self.save_error is not None
            if resolved:
                self.save_error, self.save_conflict = None, False
        elif changed:
            self.unsaved = True
        return changed, resolved

    # -- internals ------------------------------------------------------------------------
    def _writing_lineage(self) -> str | None:
        """The lineage a save interrupted while it wrote was writing (None: no such save)."""
        return self._writing[2] if self._writing is not None else None

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
        shared = _shared_modalities(self.signature)
        entry_extra: dict[tuple, dict] = {}
        found = _entries(doc, path, shared, entry_extra)
        self._check_dataset(doc.get("dataset"), self.dataset, found, f" in {path}")
        self._check_ranges(found, self.signature, self.n_instances, path)
        self._data = found
        self._extra, self._entry_extra = _document_extras(doc), entry_extra
        self._model_extra = _unknown(doc.get("model"), MODEL_FIELDS)
        self._dataset_extra = _unknown(doc.get("dataset"), DATASET_FIELDS)
        self._made_for = dict(doc["model"]) if doc.get("model") else None
        self.model_note = _other_model(self._made_for, self.signature, found)
        self._edited()
        # which units are shared is not known yet: read as features when a signature says
        self._version_1_units = doc.get("version") == 1 and not _says_shared(self.signature)
        if doc.get("dataset") and not self.dataset:
            self._take_dataset(_known(doc["dataset"], DATASET_FIELDS))
        if doc.get("model") and not self.signature:
            self.signature = _known(doc["model"], MODEL_FIELDS)
            self._edited()
        # the file's lineage, kept at the saves of its file (and of a store that loaded it,
        # to the file it saves to: its file again, overwritten, is the same file)
        # (one read without a lineage, as every file written before lineages was, gets one
        # derived from the bytes read: each kernel, and each git branch, that read that same
        # file gives it the same lineage, so that their saves are versions of one file)
        digest, own = _digest(raw), _lineage_of(doc)
        self._lineage = own or _derived_lineage(digest)
        self._provisional = own is None
        self._read_from = path.resolve()
        if self.path is not None and self._read_from == self.path.resolve():
            self._disk_digest, self._disk_entries = digest, dict(found)
        if self.model_note:
            self._warn_model(self.model_note, f"The annotations in {path}")

    def _warn_model(self, note: str, what: str | None = None) -> None:
        """Warn that ``what`` (default: this store's annotations) were made for another model
        of the same shape (``note``, ``_other_model``'s): taken, but maybe not fitting."""
        what = what or f"The annotations{self._where()}"
        warn(f"{what} were {note} (a retrained or fine-tuned model may keep them: "
                      f"check a few; else give this model its own file).",
                      UserWarning, stacklevel=_caller_level())

    def _check_folder(self) -> None:
        """An AnnotationError when the folder of the store's file is not there (a typo in the
        path): else the store would say it saves each change there until the first save
        failed."""
        folder = self.path.parent
        if not folder.is_dir():
            why, in_the_way = _folder_problem(folder)
            fix = (f"create the folder first (os.makedirs({str(folder)!r}))" if in_the_way is None
                   else f"move or rename the file {in_the_way} (no folder can be made where a "
                        f"file is)")
            raise AnnotationError(
                f"Cannot keep annotations in {self.path}: the folder {folder} {why}. Correct "
                f"the path, or {fix}.")

    def _check_unchanged(self, target: Path) -> None:
        if not target.exists():
            if self._disk_digest is not None:  # deleted on disk: writing it again loses nothing
                self._disk_digest, self._disk_entries = None, {}
            return
        raw = _read_bytes(target)
        digest = _digest(raw)
        if digest != self._disk_digest:
            self._settle_interrupted(digest)
        if digest != self._disk_digest:
            raise AnnotationConflict(
                f"{target} changed on disk since these annotations were read or saved (another "
                f"program or notebook wrote it); it was not written over. merge({str(target)!r}) "
                f"takes its changes in (concepts added and removed there), then saves both; "
                f"save(another_path) keeps both files; save(overwrite=True) replaces theirs.")

    def _settle_interrupted(self, digest: str) -> None:
        """The file on disk holds ``digest``: when that is the text a save was writing when it
        was interrupted (``_writing``), that save did write it, and the file is as this store
        wrote it (no conflict, and what the file was is known again); under the lock."""
        if self._writing is not None and self._writing[0] == digest:
            self._disk_digest, self._disk_entries, self._lineage = self._writing
            self._writing = None
            self._provisional = False

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


def _usable_path(path, resolve: bool = True) -> Path:
    """``path`` with ``~`` expanded and, with ``resolve``, its links followed (as a store keeps
    its file's), or an AnnotationError that says what is wrong with a path that no file can
    have: a link loop, a name longer than the file system takes, a NUL character (the error
    raised is its ``__cause__``). A file or folder that is not there is not refused here:
    opening and saving say what to do then."""
    given = Path(path).expanduser()
    try:
        out = given.resolve() if resolve else given
        os.stat(out)
    except (FileNotFoundError, NotADirectoryError):
        return out
    except RuntimeError as e:                   # Path.resolve of a link loop (Python < 3.13)
        raise AnnotationError(_bad_path(given, errno.ELOOP)) from e
    except ValueError as e:                     # a NUL character (os.stat refuses it)
        raise AnnotationError(_bad_path(given, None, str(e))) from e
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENAMETOOLONG):
            raise AnnotationError(_bad_path(given, e.errno)) from e
        # another error (a folder that may not be read): said by what reads or writes it
    return out


def _bad_path(path: Path, code: int | None, detail: str = "") -> str:
    """What is wrong with ``path`` (``_usable_path``'s error: ``code``, an errno, or None with
    ``detail``), and how to fix it."""
    start = f"The path {str(path)!r} cannot hold annotations"
    if code == errno.ELOOP:
        return (f"{start}: it is a symbolic link that leads back to itself (a link loop), so no "
                f"file can be read or saved there. Correct or remove the link (`ls -l` shows "
                f"where it points), or give another path.")
    if code == errno.ENAMETOOLONG:
        name = max(path.parts, key=lambda part: len(os.fsencode(part)))
        size = len(os.fsencode(name))
        if size > 255:
            return (f"{start}: the name {name[:40]!r}... is {size} bytes long, more than the "
                    f"file system takes for one name (255 bytes on most); give a shorter "
                    f"file name.")
        return (f"{start}: it is {len(os.fsencode(str(path)))} bytes long, more than the file "
                f"system takes for a path; give a shorter one (fewer or shorter folders).")
    if "\0" in str(path):
        return (f"{start}: it holds a NUL character ('\\x00'), which no file name can hold; "
                f"give the path without it.")
    return f"{start} ({detail}); give another path."


def _folder_problem(folder: Path) -> tuple[str, Path | None]:
    """Why the folder of a file to keep annotations in, which is not a folder, cannot hold it
    ("is a file, not a folder"; "does not exist"), and the file in the way of making it (it, or
    a folder above it that is a file: os.makedirs would fail), or None."""
    there = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if there is None or there.is_dir():
        return "does not exist (a typo in the path, or moved or deleted)", None
    if there == folder:
        return "is a file, not a folder", there
    return f"cannot be made: {there} is a file, not a folder", there


def _caller_level() -> int:
    """The stacklevel, for warnings.warn called by this function's caller, of the first frame
    outside this package: the user's line that opened the file (an Explorer's, or a store's)."""
    own = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(own):
        frame, level = frame.f_back, level + 1
    return level


def _run_key_checks(checks: list, keys: list, then: str | None = None) -> None:
    """Each viewer's check (``add_key_check``) of each of ``keys``, called with no lock held:
    an AnnotationError for the first key refused (a check's ValueError or IndexError said as
    one), followed by ``then`` (what came of it, and what to do) when given."""
    for key in keys:
        for check in checks:
            try:
                check(key)
            except AnnotationError as e:
                if then is None:
                    raise
                raise AnnotationError(f"{str(e).rstrip('.')}. {then}") from None
            except (ValueError, IndexError) as e:
                why = f"{key} cannot be named: {str(e).rstrip('.')}."
                raise AnnotationError(why if then is None else f"{why} {then}") from None


#: How many edits ``Annotations.undo`` can undo.
UNDO_KEPT = 100


def _not_undone(what: str, why: Exception) -> AnnotationError:
    """The error of an undo refused (``why``): said, and that the edit left the undo list."""
    return AnnotationError(
        f"Could not undo the last edit ({what}): {str(why).rstrip('.')}. Nothing was changed; "
        f"that edit was taken off the undo list (undo() again undoes the one before it); add "
        f"back by hand what still applies.")


def key_name(key: tuple) -> str:
    """A key as messages name it: "h3", "#5 image unit 27", "vitals unit 0 (every
    instance)"."""
    if key[0] == "neuron":
        return f"h{key[1]}"
    if key[0] == "feature":
        return f"{key[1]} unit {key[2]} (every instance)"
    return f"#{key[1]} {key[2]} unit {key[3]}"


def _names(keys, most: int = 5) -> str:
    """Keys named (``key_name``), the first ``most``, then how many more."""
    keys = sorted(keys, key=_sort_key)
    text = ", ".join(key_name(k) for k in keys[:most])
    return f"{text} and {len(keys) - most} more" if len(keys) > most else text


def _pairs(pairs: list[tuple], most: int = 6) -> str:
    """(key, concept) pairs named: "h2 'theirs', h3 'x'", the first ``most``, then how many
    more."""
    text = ", ".join(f"{key_name(k)} {c!r}" for k, c in pairs[:most])
    return f"{text} and {len(pairs) - most} more" if len(pairs) > most else text


def _merge_text(added: list, removed: list, replaced: bool, source: str) -> str:
    """What a merge did, by name: "took in 1 concept from the file: h2 'theirs'; removed 1
    that the file no longer has: h1 'mine'"."""
    def count(n):
        return "1 concept" if n == 1 else f"{n} concepts"
    parts = []
    if replaced:
        parts.append(f"{source} was replaced by another file (made by another store, not a "
                     f"version of this one) and was joined with these: none of these removed")
    parts.append(f"took in {count(len(added))} from {source}"
                 + (f": {_pairs(added)}" if added else ""))
    if removed:
        parts.append(f"removed {count(len(removed))} that {source} no longer has (removed "
                     f"there since this kernel read or saved it, or a copy of this same file "
                     f"saved over it: an older backup, a teacher's handout): {_pairs(removed)} "
                     f"(undo() puts them back)")
    return "; ".join(parts)


def _describe_change(before: dict, after: dict) -> str:
    """What going from ``before`` to ``after`` ({key: concepts}) did, by name: "added 'red' to
    h7; removed 'blue' from h8"."""
    added, removed = [], []
    for key in sorted(set(before) | set(after), key=_sort_key):
        b, a = before.get(key, ()), after.get(key, ())
        bf, af = {same_concept(c) for c in b}, {same_concept(c) for c in a}
        added += [(key, c) for c in a if same_concept(c) not in bf]
        removed += [(key, c) for c in b if same_concept(c) not in af]
    out = []
    if added:
        out.append("added " + _pairs(added))
    if removed:
        out.append("removed " + _pairs(removed))
    if not out and before != after:
        out.append("changed the spelling or order on " + _names(set(before) | set(after)))
    return "; ".join(out)


def _sort_key(key: tuple) -> tuple:
    if key[0] == "neuron":
        return (0, key[1], "", 0)
    if key[0] == "feature":
        return (1, 0, key[1], key[2])
    return (2, key[1], key[2], key[3])


def _digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _read_bytes(path: Path) -> bytes:
    """The bytes of an annotations file: only a regular file (a named pipe froze the kernel,
    waiting for a writer, and a link to /dev/zero read until memory ran out), of at most
    MAX_FILE_BYTES."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)              # non-blocking: a pipe opens, and is refused
    except IsADirectoryError:
        raise AnnotationError(f"{path} is a folder; give the path of a .json file.") from None
    except OSError as e:
        raise AnnotationError(f"Could not read {path} ({e.strerror or e}).") from e
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise AnnotationError(f"{path} is a folder; give the path of a .json file.")
        if not stat.S_ISREG(st.st_mode):
            raise AnnotationError(
                f"{path} is not a file but a {_file_kind(st.st_mode)}: annotations are read "
                "from a .json file (a link to something else is not followed into it). It "
                "was not read nor changed; give the path of a .json file.")
        chunks, size = [], 0
        while size <= MAX_FILE_BYTES:
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        raw = b"".join(chunks)
    except OSError as e:
        raise AnnotationError(f"Could not read {path} ({e.strerror or e}).") from e
    finally:
        os.close(fd)
    if len(raw) > MAX_FILE_BYTES:
        raise AnnotationError(
            f"{path} holds over {MAX_FILE_BYTES // 2**20} MB, more than an annotations file "
            "does (a few short names per neuron or unit: kilobytes). It was not read nor "
            "changed; give the path of an annotations file.")
    return raw


def _file_kind(mode: int) -> str:
    """Words for a file that is not regular (what ``_read_bytes`` refuses)."""
    for test, words in ((stat.S_ISFIFO, "named pipe"), (stat.S_ISCHR, "character device"),
                        (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return words
    return "special file"


def _nested_too_deep(doc: dict) -> str | None:
    """The top-level field of ``doc`` whose value nests deeper than MAX_NESTING (counted
    without recursion), or None."""
    for field, value in doc.items():
        stack = [(value, 2)]
        while stack:
            v, depth = stack.pop()
            if isinstance(v, (dict, list)):
                if depth > MAX_NESTING:
                    return field
                stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return None


#: The smallest annotations file: what an empty file can be replaced by.
_EMPTY_DOCUMENT = f'{{"format": "{FORMAT}", "version": {VERSION}}}'


def _parse(raw: bytes, path) -> dict:
    """The document of an annotations file, its outer shape checked. Whatever the bytes, a
    file that cannot be taken gives an AnnotationError (a hostile or broken file: JSON nested
    deeper than Python's recursion limit, a number of more digits than ``int`` reads), never
    another exception."""
    try:
        text = raw.decode("utf-8-sig")          # a byte-order mark (Notepad) is read too
        if not text.strip():
            raise AnnotationError(
                f"{path} is empty (no annotations, not even the format's header; a `touch` or "
                f"an interrupted copy makes such a file). It was not changed; delete it (a "
                f"new file is then made there at the first save), or write "
                f"{_EMPTY_DOCUMENT} in it.")
        doc = json.loads(text, object_pairs_hook=_one_of_each(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AnnotationError(f"{path} is not an annotations file: {_unreadable(raw, e, path)} It "
                              f"was not changed.") from None
    except RecursionError:
        raise _too_deep(path) from None
    except AnnotationError:
        raise
    except ValueError as e:                      # e.g. a number of thousands of digits
        raise AnnotationError(f"{path} is not an annotations file (a value in it cannot be read: "
                              f"{str(e).split(';')[0]}); it was not changed. Give annotations "
                              f"another file name.") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise AnnotationError(f"{path} is not an annotations file (no \"format\": \"{FORMAT}\"). "
                              f"It was not changed; give annotations another file name.")
    deep = _nested_too_deep(doc)
    if deep is not None:
        raise AnnotationError(
            f"{path}: its field {deep!r} nests lists or objects within each other more than "
            f"{MAX_NESTING} times, far beyond what annotations hold (an entry is 4 deep). It was "
            "not changed; remove that field, or give annotations another file name.")
    v = doc.get("version")
    if not is_integer(v) or v < 1:
        raise AnnotationError(f"{path}: \"version\" must be a whole number from 1 to {VERSION} "
                              f"(the format's version), got {v!r}. It was not changed.")
    if v > VERSION:
        raise AnnotationError(f"{path} is annotations format version {v!r}; this multiviz_widgets "
                              f"reads versions up to {VERSION} (a newer file needs a newer "
                              f"multiviz_widgets). It was not changed.")
    for f in ("model", "dataset"):
        if doc.get(f) is not None and not isinstance(doc[f], dict):
            raise AnnotationError(f"{path}: \"{f}\" must be an object or null, got {doc[f]!r}.")
    for f, check in (("model", _bad_model_fields), ("dataset", _bad_dataset_fields)):
        why = check(doc.get(f) or {})
        if why:
            raise AnnotationError(f"{path}: \"{f}\": {why}. It was not changed; correct the "
                                  f"field, or set it to null (then it is not compared).")
    for f in ("neurons", "units", "features"):
        if not isinstance(doc.get(f, []), list):
            raise AnnotationError(f"{path}: \"{f}\" must be a list, got {_brief(doc.get(f))}.")
    try:
        _check_no_surrogates(doc, path, "")      # recursive, as deep as the JSON
    except RecursionError:
        raise _too_deep(path) from None
    _warn_misspelled_fields(doc, path)
    return doc


#: The fields of a document that an unknown field of a name close to theirs was probably meant
#: to be ("revisions", known only to be dropped, is none of them).
_MEANT_FIELDS = ("format", "version", "lineage", "model", "dataset", "neurons", "units",
                 "features")


def _typo_of(field: str, known: str) -> bool:
    """Whether ``field`` is ``known`` typed wrong: the same but for case, or one character
    left out, changed or added inside it, or two neighbours swapped ("Neurons", "unit",
    "fomat", "versoin"). A name that goes on after the known one ("neurons_v1", "neurons2",
    "models", "datasets") is another field kept on purpose (a backup, a note), not a typo."""
    a, b = field.casefold(), known.casefold()
    if a == b:
        return True
    if a.startswith(b) or abs(len(a) - len(b)) > 1 or min(len(a), len(b)) < 4:
        return False
    if len(a) == len(b):
        diff = [k for k in range(len(a)) if a[k] != b[k]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                  and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    return any(long_[:k] + long_[k + 1:] == short for k in range(len(long_)))


def _warn_misspelled_fields(doc: dict, path) -> None:
    """A warning for each field of the document that this format does not know whose name is
    close to one it knows ("Neurons", "unit"): kept and written back as any unknown field is
    (a newer version's), but not read, so a hand edit that misspelled "neurons" would else open
    silently without its concepts."""
    for field in _document_extras(doc):
        meant = next((f for f in _MEANT_FIELDS if _typo_of(field, f)), None)
        if meant is None:
            continue
        entries = meant in ("neurons", "units", "features")
        what = ("its entries were not read: none of their concepts are in the store"
                if entries else "it was not read")
        both = (f" (its entries joined to those of {meant!r} where the file has both)"
                if entries else "")
        warn(f"{path}: the field {field!r} is not one this format knows (did you mean "
             f"{meant!r}?), so {what}. It is kept in the file as it is; rename it to {meant!r} "
             f"there{both}, then open the file again.", UserWarning,
             stacklevel=_caller_level())


#: The lines git writes around the two sides of a merge conflict
_CONFLICT = re.compile(rb"^(<{7}|={7}|>{7})( |\r?$)", re.MULTILINE)


def _unreadable(raw: bytes, e: Exception, path) -> str:
    """What is wrong with a file that is not UTF-8 JSON, and how to fix it (``_parse``'s
    message): git's conflict markers, a file cut short, UTF-16 text, zero bytes, HTML."""
    markers = _CONFLICT.findall(raw)
    if any(m[0].startswith(b"<") for m in markers) and any(m[0].startswith(b">")
                                                            for m in markers):
        line = raw[:_CONFLICT.search(raw).start()].count(b"\n") + 1
        return (f"it holds git's merge conflict markers (<<<<<<<, ======= and >>>>>>>, the "
                f"first on line {line}): a git merge or pull left both sides of a change in it. "
                f"Resolve them by editing the file so that it keeps both sides' entries: delete "
                f"the three marker lines, keep the lines of both sides, and put a comma between "
                f"two entries or concepts where JSON needs one; then open it again. (Only to "
                f"drop one side's concepts: `git checkout --ours -- {path}` takes yours whole "
                f"and `git checkout --theirs -- {path}` the branch merged in whole, each "
                f"throwing away the other branch's concepts.)")
    if raw and not raw.strip(b"\0"):
        return (f"it holds only zero bytes ({len(raw)} of them): a disk that filled up, or a "
                f"crash while it was written. Restore it from a backup or from git, or delete "
                f"it (a new file is then made there at the first save).")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or (
            len(raw) >= 4 and raw[1::2].count(0) > len(raw) // 4):
        return ("it is UTF-16 text (Notepad's \"Unicode\" encoding), not UTF-8; save it again "
                "as UTF-8 (in Notepad: Save As, Encoding: UTF-8), or in Python: "
                "open(path, 'w', encoding='utf-8').write(open(path, encoding='utf-16').read()).")
    if raw.lstrip()[:1] == b"<":
        return ("it is HTML or XML (a web page, or an e-mail's HTML copy of the file), not "
                "JSON; save the attachment or the download itself (the .json file), not the "
                "page that shows it.")
    if isinstance(e, UnicodeDecodeError):
        return (f"it is not UTF-8 text ({e.reason} at byte {e.start}); save it again as "
                f"UTF-8.")
    text = raw.decode("utf-8", "replace").strip()
    if isinstance(e, json.JSONDecodeError) and (
            not e.doc[e.pos:].strip() or text.startswith("{") and not text.endswith("}")):
        return (f"it ends before its JSON does (at line {e.lineno}, column {e.colno}): it was "
                f"cut short (an interrupted copy or download, a full disk). Copy it again, or "
                f"restore it from a backup or git.")
    where = (f"line {e.lineno}, column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError)
             else str(e))
    return (f"not valid JSON ({where}). Correct it there (a missing comma or quote?), or "
            f"restore it from a backup or git.")


def _one_of_each(path) -> Callable[[list], dict]:
    """json.loads' object_pairs_hook for the file at ``path``: an object as a dict, or an
    AnnotationError when a field name appears twice in it. json.loads alone keeps the last
    value and drops the others silently (two files pasted together, a merge conflict resolved
    by keeping both sides: two "neurons" lists), and the next save would take the dropped
    concepts off the disk."""
    def hook(pairs: list) -> dict:
        obj = dict(pairs)
        if len(obj) == len(pairs):
            return obj
        seen: set = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        where = ("the document" if "format" in obj
                 else f"an object with the fields {_brief(list(obj), 120)}")
        raise AnnotationError(
            f"{path}: the field {twice!r} appears more than once in {where} (two files pasted "
            f"together, or a merge conflict resolved by keeping both sides?); read as it is, "
            f"only its last value would be kept and the next save would lose the others. It "
            f"was not changed; keep one {twice!r} there (two lists joined into one list, or "
            f"the value that is right), then open it again.")
    return hook


def _too_deep(path) -> AnnotationError:
    return AnnotationError(f"{path} is not an annotations file (its JSON is nested deeper than "
                           f"Python can read: lists or objects within each other about a "
                           f"thousand times or more); it was not changed. Give annotations "
                           f"another file name.")


def _bad_model_fields(model: dict) -> str | None:
    """What is wrong with the fields of a file's model signature (``model_signature``'s), or
    None; a field that is absent or null is not compared, so it is not checked."""
    def texts(v):
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    name, mods, classes = model.get("model"), model.get("modalities"), model.get("classes")
    neurons, features = model.get("neurons"), model.get("features")
    weights, units = model.get("weights"), model.get("units")
    if units is not None and not (isinstance(units, dict) and all(
            isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in units.items())):
        return (f'"units" must map each modality to a fingerprint of its unit settings (text), '
                f'got {_brief(units)}')
    if name is not None and not isinstance(name, str):
        return f'"model" must be text, got {name!r}'
    if weights is not None and not isinstance(weights, str):
        return f'"weights" must be text (a fingerprint of the weights), got {weights!r}'
    method = model.get("weights_method")
    if method is not None and not isinstance(method, str):
        return f'"weights_method" must be text (how "weights" was computed), got {method!r}'
    if mods is not None and not texts(mods):
        return f'"modalities" must be a list of names, got {mods!r}'
    if classes is not None and not texts(classes):
        return f'"classes" must be a list of names, got {classes!r}'
    if neurons is not None and (not is_integer(neurons) or neurons < 0):
        return f'"neurons" must be a whole number (how many), got {neurons!r}'
    if features is not None and not (
            isinstance(features, dict)
            and all(v is None or texts(v) for v in features.values())):
        return (f'"features" must map each modality to a list of unit labels (or null), got '
                f'{features!r}')
    return None


def _bad_dataset_fields(dataset: dict) -> str | None:
    """What is wrong with the fields of a file's dataset signature (``dataset_signature``'s),
    or None."""
    name, n, fp = dataset.get("name"), dataset.get("instances"), dataset.get("fingerprint")
    if name is not None and not isinstance(name, str):
        return f'"name" must be text, got {name!r}'
    if n is not None and (not is_integer(n) or n < 0):
        return f'"instances" must be a whole number (how many), got {n!r}'
    if fp is not None and not isinstance(fp, str):
        return f'"fingerprint" must be text, got {fp!r}'
    return None


def _check_no_surrogates(value, path, where: str) -> None:
    """An AnnotationError when a string of a parsed file (a key or a value, anywhere) holds a
    lone surrogate: a JSON escape such as \\udc80 without its pair is valid JSON but not
    text, and no save could write it back."""
    if isinstance(value, str):
        bad = [c for c in value if unicodedata.category(c) == "Cs"]
        if bad:
            raise AnnotationError(
                f"{path}: {where or 'the document'} = {value[:60]!r} holds the lone surrogate "
                f"{bad[0]!r} (a \\u escape of half of a UTF-16 pair), which is not text. It was "
                f"not changed; edit that string in the file (write the whole character, or "
                f"remove the escape), then open it again.")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_no_surrogates(k, path, f"a field name of {where or 'the document'}")
            _check_no_surrogates(v, path, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for n, v in enumerate(value):
            _check_no_surrogates(v, path, f"{where}[{n}]")


def _shared_modalities(signature: dict | None) -> frozenset[str]:
    """The modalities whose units are the same feature in every instance, by a model
    signature ("features"; none when it does not say)."""
    features = (signature or {}).get("features")
    return frozenset(features) if isinstance(features, dict) else frozenset()


def _says_shared(signature: dict | None) -> bool:
    """Whether a model signature says which modalities have shared units ("features")."""
    return isinstance((signature or {}).get("features"), dict)


def _units_as_features(entries: dict, shared: frozenset[str]) -> dict:
    """``entries`` with the unit keys of the ``shared`` modalities read as feature keys: a
    version-1 file named a tabular column per instance. The concepts of one column in every
    instance are put together, in the order of the instances, each once."""
    out: dict[tuple, dict[str, str]] = {}   # same_concept(c): c, its first spelling
    for key in sorted(entries, key=_sort_key):
        new = feature_key(key[2], key[3]) if key[0] == "unit" and key[2] in shared else key
        now = out.setdefault(new, {})
        for c in entries[key]:
            now.setdefault(same_concept(c), c)
        if len(now) > MAX_CONCEPTS_PER_KEY:
            raise _too_many(f"{new} (the concepts of its unit in every instance together, as a "
                            f"version-1 file named them)", _FEWER_IN_FILE)
    return {key: tuple(cs.values()) for key, cs in out.items()}


def _entries(doc: dict, path, shared: frozenset[str] = frozenset(),
             extras: dict[tuple, dict] | None = None) -> dict[tuple, tuple[str, ...]]:
    """{key: concepts} of a parsed document; each entry checked (its position in the message).
    Of a version-1 file, the unit keys of the ``shared`` modalities are read as feature keys
    (``_units_as_features``). extras: filled with {key: the entry's fields that this format
    does not know} (a field that two entries of one key give different values: the list of
    them)."""
    out: dict[tuple, dict[str, None]] = {}      # a dict of concepts: each joined in once
    found_extras: dict[tuple, dict] = {}
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
                cs = _concepts(e["concepts"], str(key), _FEWER_IN_FILE, typed=False)
                if cs:
                    now = out.setdefault(key, {})
                    now.update(dict.fromkeys(cs))
                    if len(now) > MAX_CONCEPTS_PER_KEY:
                        raise _too_many(f"{key}, with the entries before it of that key,",
                                        _FEWER_IN_FILE)
            except AnnotationError as err:
                raise AnnotationError(f"{path}: {field}[{n}] = {_brief(e)}: "
                                      f"{str(err).rstrip('.')}. It was not changed.") from None
            unknown = {f: v for f, v in e.items() if f not in fields + ("concepts",)}
            if unknown:
                gathered = found_extras.setdefault(key, {})
                for f, v in unknown.items():
                    # each value once, looked up by its JSON text (linear work however many
                    # entries a key has; a list's ``in`` would cost their square)
                    gathered.setdefault(f, {}).setdefault(_json_text(v), v)
    found = {key: _concepts(list(cs), str(key), _FEWER_IN_FILE, typed=False)
             for key, cs in out.items()}
    # two entries of one key (two people's lines pasted together) that give a field different
    # values ("comment": "Ana: ..." and "comment": "Bo: ..."): the list of them, in the file's
    # order, so that a save writes both back (a field given once, or alike, keeps its value)
    found_extras = {key: {f: _one_or_list(list(vs.values())) for f, vs in fs.items()}
                    for key, fs in found_extras.items()}
    if doc.get("version") == 1 and shared:
        found = _units_as_features(found, shared)
        found_extras = _extras_as_features(found_extras, shared)
    if extras is not None:
        extras.update(found_extras)
    return found


def _json_text(value) -> str:
    """A parsed JSON value as text, equal for equal values (a dict's fields in any order)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _one_or_list(values: list):
    """The value of a field that entries gave: the one value, or the list of several."""
    return values[0] if len(values) == 1 else values


#: The fields of an annotations document that this format knows.
#: ("revisions": a list of the ids of a file's versions, which saves of one day's development
#: version wrote in place of "lineage"; read as known, so dropped at the next save.)
_DOCUMENT_FIELDS = ("format", "version", "lineage", "model", "dataset", "neurons", "units",
                    "features", "revisions")


def _derived_lineage(digest: str) -> str:
    """The lineage of a file read without one (written before lineages, or by hand): derived
    from its bytes (their ``_digest``), so the same in every kernel (and git branch) that read
    that file."""
    return hashlib.sha256(f"multiviz-annotations lineage\0{digest}".encode()).hexdigest()[:32]


def _lineage_of(doc: dict) -> str | None:
    """A parsed document's lineage (the "lineage" a save gives a file and keeps), or None
    (none, or a value that is not text: then the file is taken as one without)."""
    lineage = doc.get("lineage")
    return lineage if isinstance(lineage, str) and lineage else None


def _unknown(obj, known: tuple) -> dict:
    """The fields of a file's "model" or "dataset" object that this format does not know."""
    return {f: v for f, v in obj.items() if f not in known} if isinstance(obj, dict) else {}


def _known(obj: dict, known: tuple) -> dict:
    """A file's "model" or "dataset" object without the fields this format does not know."""
    return {f: v for f, v in obj.items() if f in known}


def _with_extra(obj: dict | None, extra: dict) -> dict | None:
    """A signature as written: its fields, then the unknown ones a file gave (``_unknown``)."""
    if not obj and not extra:
        return None
    out = dict(obj or {})
    out.update((f, v) for f, v in extra.items() if f not in out)
    return out


def _document_extras(doc: dict) -> dict:
    """The fields of a document that this format does not know."""
    return {f: v for f, v in doc.items() if f not in _DOCUMENT_FIELDS}


def _take_extras(ours: dict, theirs: dict, theirs_win: bool) -> None:
    """Unknown fields of another version of a document or entry taken into ``ours``."""
    for f, v in theirs.items():
        if theirs_win or f not in ours:
            ours[f] = v


def _extras_as_features(extras: dict[tuple, dict], shared: frozenset[str]) -> dict:
    """``extras`` with the unit keys of the ``shared`` modalities as feature keys (as
    ``_units_as_features`` reads a version-1 file's concepts): a field that several instances
    of one column gave different values gets the list of them, in the instances' order."""
    gathered: dict[tuple, dict[str, list]] = {}
    for key in sorted(extras, key=_sort_key):
        new = feature_key(key[2], key[3]) if key[0] == "unit" and key[2] in shared else key
        fields = gathered.setdefault(new, {})
        for f, v in extras[key].items():
            if v not in fields.setdefault(f, []):
                fields[f].append(v)
    return {key: {f: vs[0] if len(vs) == 1 else vs for f, vs in fields.items()}
            for key, fields in gathered.items()}


def _encoded(doc: dict, target: Path) -> bytes:
    """The bytes a save of ``doc`` (``to_dict``'s) writes; a value that JSON cannot hold (a
    numpy number put in ``signature`` or ``dataset`` by hand, a field of the file nested too
    deep) gives an AnnotationError, which the save records in ``save_error``."""
    try:
        text = json.dumps(doc, indent=1, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise AnnotationError(
            f"Could not save the annotations to {target}: they hold a value that a JSON file "
            f"cannot hold ({type(e).__name__}: {str(e)[:200]}); they are kept in memory. Make "
            f"the model's signature (store.signature) and the dataset's (store.dataset) plain "
            f"text, whole numbers (int(n), str(name)), lists and dicts, then save again.") from e
    raw = (text + "\n").encode("utf-8")
    if len(raw) > MAX_FILE_BYTES:
        # a file this store could not open again (``_read_bytes`` refuses it)
        raise AnnotationError(
            f"Could not save the annotations to {target}: they would take "
            f"{len(raw) / 2**20:.1f} MB, more than an annotations file may hold "
            f"({MAX_FILE_BYTES // 2**20} MB, the most that is read back); they are kept in "
            "memory. Remove concepts (a few short names per neuron or unit are kilobytes), then "
            "save again.")
    return raw


def _atomic_write(target: Path, raw: bytes) -> None:
    """Write ``raw`` to ``target`` through a temporary file in its folder and a rename; a
    PermissionError when ``target`` is write-protected (no write permission for anybody, or
    none for its owner when that is this user): the rename would replace it all the same. (A
    colleague's file in a shared folder, writable by its owner only, is replaced, as a save in
    that folder always did.)"""
    try:
        st = target.stat()
    except OSError:
        st = None
    if st is not None and (not st.st_mode & 0o222
                           or (st.st_uid == os.geteuid() and not st.st_mode & 0o200)):
        raise PermissionError(13, "the file is write-protected; make it writable (chmod u+w) "
                                  "to save there", str(target))
    write_atomically(target, lambda f: f.write(raw), binary=True)
