"""Concept annotations: the store's invariants (property tests), its files (round trip, atomic
writes, conflicts, files it must not write over), and the Explorer's concepts row."""
from __future__ import annotations

import json
import os
import re
import stat
import threading
import time
import unicodedata
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multiviz_widgets.annotations import (MAX_CONCEPT_LENGTH, AnnotationConflict, AnnotationError,
                                          WEIGHTS_METHOD, Annotations, tidy_concept, feature_key,
                                          model_signature, neuron_key, same_concept, unit_key,
                                          unit_settings)
from multiviz_widgets.explorer import Explorer

from .explorer_support import FakeKernels, tiny_tab_series, tiny_vqa

SIG = {"model": "m", "modalities": ["image", "question"], "classes": ["a", "b"], "neurons": 8}

# what a concept loses at either end: whitespace (every character str.strip() removes) and
# the joiners ZWNJ and ZWJ
OUTER = "".join(chr(c) for c in range(0x110000) if chr(c).isspace()) + "\u200c\u200d"


def _tidy(t: str) -> str:
    """As a store keeps a concept: NFC, no outer spaces, one plain space for a run inside, and
    (so that two generated concepts are the same exactly when they are equal) case-folded."""
    t = unicodedata.normalize("NFC", unicodedata.normalize("NFD", t).casefold())
    return re.sub(r"\s+", " ", t.strip(OUTER))


def _taken(t: str) -> bool:
    """Whether the store takes ``t`` as it is (a joiner only where it joins, a letter, digit
    or symbol somewhere)."""
    try:
        return tidy_concept(t) == t
    except AnnotationError:
        return False


# one printable line, already tidy (_tidy), a joiner (ZWNJ, ZWJ) allowed where it joins
concept_text = st.text(st.one_of(
    st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Zl", "Zp")),
    st.sampled_from(["\u200c", "\u200d"])), min_size=1, max_size=40).map(_tidy).filter(
        lambda t: t and _tidy(t) == t and t.casefold() == t and _taken(t))
keys = st.one_of(st.builds(neuron_key, st.integers(0, 7)),
                 st.builds(unit_key, st.integers(0, 20), st.sampled_from(["image", "question"]),
                           st.integers(0, 70)),
                 st.builds(feature_key, st.sampled_from(["image", "question"]),
                           st.integers(0, 70)))
contents = st.dictionaries(keys, st.lists(concept_text, min_size=1, max_size=4), max_size=12)


def store_with(content: dict, **kw) -> Annotations:
    a = Annotations(signature=SIG, **kw)
    for k, cs in content.items():
        a.set(k, cs)
    return a


def as_sets(a: Annotations) -> dict:
    return {k: set(a.concepts(k)) for k in a.keys()}


# -- invariants -------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=contents)
def test_save_then_load_gives_the_same_store_and_the_same_bytes(tmp_path, content):
    a = store_with(content)
    path = a.save(tmp_path / "c.json", overwrite=True)
    b = Annotations.load(path, signature=SIG)
    assert b.to_dict() == a.to_dict()
    assert {k: b.concepts(k) for k in b.keys()} == {
        k: tuple(dict.fromkeys(cs)) for k, cs in content.items()}
    first = path.read_bytes()
    b.save(tmp_path / "c.json", overwrite=True)
    assert path.read_bytes() == first                  # equal stores write equal files


@settings(max_examples=60, deadline=None)
@given(x=contents, y=contents)
def test_merge_is_a_union_idempotent_and_commutative(x, y):
    a, b = store_with(x), store_with(y)
    added = a.merge(b)
    union = {k: set(x.get(k, ())) | set(y.get(k, ())) for k in set(x) | set(y)}
    assert as_sets(a) == union
    assert added == sum(len(v) for v in union.values()) - sum(len(set(v)) for v in x.values())
    assert a.merge(b) == 0 and as_sets(a) == union                       # idempotent
    b.merge(store_with(x))
    assert as_sets(b) == as_sets(a)                                      # commutative
    for k in x:                                    # a store's own concepts keep their order
        assert a.concepts(k)[:len(set(x[k]))] == tuple(dict.fromkeys(x[k]))


@settings(max_examples=40, deadline=None)
@given(content=contents, concept=concept_text)
def test_find_returns_exactly_the_keys_that_carry_a_concept(content, concept):
    a = store_with(content)
    want = sorted(k for k, cs in content.items() if concept.casefold() in
                  {c.casefold() for c in cs})
    assert sorted(a.find(concept)) == want
    assert sorted(a.find(concept.upper())) == sorted(
        k for k, cs in content.items() if concept.upper().casefold() in
        {c.casefold() for c in cs})


def test_find_ignores_case_as_unicode_folds_it():
    """The hypothesis test above rarely draws a concept in another case than one stored: a
    case-sensitive find passed it."""
    a = Annotations()
    a.add(neuron_key(1), "Red shapes")
    a.add(neuron_key(2), "Straße")
    assert a.find("red SHAPES") == a.find("RED SHAPES") == [neuron_key(1)]
    assert a.find("STRASSE") == a.find("strasse") == [neuron_key(2)]
    assert a.find("blue") == []


def test_a_concept_and_its_capitals_are_one_concept_where_folding_undoes_nfc():
    """same_concept compared str.casefold() alone: "\u0390" folds to three characters, its
    capital (NFC) to two, so "\u03b4\u0390" and its capitals were two concepts of a key."""
    low = "\u03b4\u0390"
    cap = unicodedata.normalize("NFC", low.upper())
    assert cap != low and same_concept(cap) == same_concept(low)
    a = Annotations(signature=SIG)
    a.add(neuron_key(1), low)
    assert a.add(neuron_key(1), cap) == (low,)              # one concept, kept as first typed
    assert a.find(cap) == [neuron_key(1)]
    assert a.remove(neuron_key(1), cap) == ()
    assert a.add(neuron_key(2), cap) == (cap,) and a.find(low) == [neuron_key(2)]


def test_the_length_limit_counts_a_concept_with_its_runs_of_spaces_collapsed():
    """The 200 characters were counted before runs of spaces became one: a short concept pasted
    from a laid-out PDF was refused as too long."""
    a = Annotations(signature=SIG)
    pasted = "red" + " " * 120 + "\u00a0" * 90 + "shapes"
    assert a.add(neuron_key(1), pasted) == ("red shapes",)
    too_long = "x" * 150 + "\u2003 \u00a0" + "y" * 50                 # 201 characters, tidied
    with pytest.raises(AnnotationError, match=f"at most {MAX_CONCEPT_LENGTH} characters, got "
                                              f"{MAX_CONCEPT_LENGTH + 1} "):
        a.add(neuron_key(1), too_long)
    assert a.concepts(neuron_key(1)) == ("red shapes",)


def test_concepts_are_tidied_and_editing_is_consistent():
    a = Annotations()
    k = neuron_key(3)
    assert a.set(k, ["  red ", "red", "circle"]) == ("red", "circle")
    assert a.add(k, "red") == ("red", "circle")
    assert a.add(k, " big ") == ("red", "circle", "big")
    assert a.remove(k, "circle") == ("red", "big")
    assert a.set(k, (c for c in ["x"])) == ("x",)         # any iterable of strings
    assert a.set(k, []) == () and k not in a and len(a) == 0
    assert a.keys() == [] and a.find("x") == []


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, says", [
    ("", "cannot be empty"), ("   ", "cannot be empty"), (3, "is a string"),
    ("a\nb", "control character"), ("a\x00b", "control character"),
    ("x" * (MAX_CONCEPT_LENGTH + 1), f"at most {MAX_CONCEPT_LENGTH}"),
])
def test_a_bad_concept_is_refused_and_changes_nothing(bad, says):
    a = Annotations(signature=SIG)
    a.add(neuron_key(1), "kept")
    with pytest.raises(AnnotationError, match=says):
        a.add(neuron_key(1), bad)
    with pytest.raises(AnnotationError, match=says):
        a.set(neuron_key(1), ["fine", bad])
    assert a.concepts(neuron_key(1)) == ("kept",)


@pytest.mark.parametrize("key, says", [
    (("neuron", -1), "at least 0"), (("neuron", 1.0), "at least 0"),
    (("neuron", True), "at least 0"),
    (("neuron", 8), "out of range: the decision layer has 8"),
    (("unit", 0, "audio", 1), "not one of the model's"), (("unit", 30, "image", 1), "out of range"),
    (("unit", 0, "", 1), "non-empty"), (("unit", 0, "image", -2), "at least 0"),
    (("cell", 1), "A key is"), ("neuron", "A key is"), ((), "A key is"),
    (("feature", "audio", 1), "not one of the model's"), (("feature", "image", -1), "at least 0"),
    (("feature", "image"), "A key is"),
])
def test_a_bad_key_is_refused(key, says):
    a = Annotations(signature=SIG, n_instances=30)
    with pytest.raises(AnnotationError, match=says):
        a.add(key, "x")
    assert len(a) == 0 and key not in a


def test_remove_of_a_missing_concept_and_other_misuse_say_what_to_do(tmp_path):
    a = Annotations()
    with pytest.raises(AnnotationError, match=r"has no concept 'red'; it has \[\]"):
        a.remove(neuron_key(0), "red")
    with pytest.raises(AnnotationError, match="give save\\(\\) a path"):
        a.save()
    with pytest.raises(AnnotationError, match="needs a path"):
        Annotations(autosave=True)
    with pytest.raises(AnnotationError, match="kind is"):
        a.keys("neurons")
    with pytest.raises(AnnotationError, match="No annotations file"):
        Annotations.load(tmp_path / "absent.json")
    with pytest.raises(AnnotationError, match="is a folder"):
        Annotations.load(tmp_path)


def _valid_doc(**over) -> dict:
    doc = {"format": "multiviz-annotations", "version": 1, "model": SIG,
           "neurons": [{"neuron": 2, "concepts": ["red"]}],
           "units": [{"instance": 1, "modality": "image", "unit": 3, "concepts": ["circle"]}]}
    doc.update(over)
    return doc


@pytest.mark.parametrize("text, says", [
    ("{", "ends before its JSON does"), (b"\xff\xfe", "UTF-16 text"),
    (b"{\"a\": \xe9}", "not UTF-8 text"), ("{'a': 1}", "not valid JSON \\(line 1, column 2"),
    ("[]", "no \"format\""),
    (json.dumps({"format": "other"}), "no \"format\""),
    (json.dumps(_valid_doc(version=3)), "version 3; this multiviz_widgets reads versions up to 2"),
    (json.dumps(_valid_doc(version="1")), "\"version\" must be a whole number from 1 to 2.*'1'"),
    (json.dumps(_valid_doc(version=0)), "\"version\" must be a whole number from 1 to 2.* 0"),
    (json.dumps(_valid_doc(version=2.0)), "\"version\" must be a whole number.* 2.0"),
    (json.dumps(_valid_doc(model=dict(SIG, neurons="64"))), "\"neurons\" must be a whole"),
    (json.dumps(_valid_doc(model=dict(SIG, modalities="image"))), "\"modalities\" must be a list"),
    (json.dumps(_valid_doc(model=dict(SIG, classes=[1, 2]))), "\"classes\" must be a list"),
    (json.dumps(_valid_doc(model=dict(SIG, features={"tab": 5}))), "\"features\" must map"),
    (json.dumps(_valid_doc(dataset={"name": "d", "instances": "10"})),
     "\"dataset\": \"instances\" must be a whole number"),
    (json.dumps(_valid_doc(neurons={"2": ["red"]})), "\"neurons\" must be a list"),
    (json.dumps(_valid_doc(model=[1])), "\"model\" must be an object"),
    (json.dumps(_valid_doc(neurons=[{"neuron": 2}])), r"neurons\[0\].*needs"),
    (json.dumps(_valid_doc(neurons=[{"neuron": 2, "concepts": "red"}])), "a list of strings"),
    (json.dumps(_valid_doc(neurons=[{"neuron": 2, "concepts": ["a\tb"]}])), "control character"),
    (json.dumps(_valid_doc(units=[{"instance": -1, "modality": "image", "unit": 0,
                                   "concepts": ["x"]}])), r"units\[0\]"),
    (json.dumps(_valid_doc(neurons=[{"neuron": 9, "concepts": ["x"]}])), "neuron 9 in"),
    (json.dumps(_valid_doc(model=dict(SIG, classes=["a", "c"]))), "another model .classes"),
])
def test_a_file_that_cannot_be_taken_is_refused_and_never_written_over(tmp_path, text, says):
    path = tmp_path / "c.json"
    raw = text if isinstance(text, bytes) else text.encode()
    path.write_bytes(raw)
    with pytest.raises(AnnotationError, match=says):
        Annotations(path, signature=SIG)
    with pytest.raises(AnnotationError, match=says):
        Annotations.open(path, signature=SIG)
    target = Annotations(signature=SIG)
    with pytest.raises(AnnotationError):
        target.merge(path)
    assert len(target) == 0
    assert path.read_bytes() == raw


# -- files ------------------------------------------------------------------------------------
def test_autosave_writes_each_change_atomically_with_a_shareable_mode(tmp_path):
    path = tmp_path / "c.json"
    a = Annotations(path, signature=SIG)
    assert a.autosave and not path.exists()
    a.add(neuron_key(2), "red")
    assert json.loads(path.read_text())["neurons"] == [{"neuron": 2, "concepts": ["red"]}]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    os.chmod(path, 0o600)
    a.add(unit_key(1, "image", 3), "<b>circle</b>")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600          # the mode it had is kept
    # no temporary file left; the lock file that serializes saves stays (it is made once)
    assert sorted(os.listdir(tmp_path)) == [".c.json.lock", "c.json"]
    assert not a.unsaved and a.save_error is None
    b = Annotations(path)
    assert b.to_dict() == a.to_dict() and b.signature == SIG


def test_save_to_another_path_does_not_replace_a_file_unless_asked(tmp_path):
    a = Annotations(signature=SIG)
    a.add(neuron_key(0), "x")
    other = tmp_path / "theirs.json"
    other.write_text("their work")
    with pytest.raises(AnnotationError, match="overwrite=True"):
        a.save(other)
    assert other.read_text() == "their work"
    a.save(other, overwrite=True)
    assert Annotations.load(other).concepts(neuron_key(0)) == ("x",)


def test_a_save_over_a_file_says_how_to_keep_both_and_that_way_keeps_both(tmp_path):
    """A store that loaded a shared file, saved back to it, was refused with only "save(path,
    overwrite=True) replaces it", which erased what a colleague saved there since."""
    path = tmp_path / "c.json"
    colleague = Annotations(path, signature=SIG)
    colleague.add(neuron_key(1), "red")
    mine = Annotations.load(path)
    colleague.add(neuron_key(2), "theirs, later")
    mine.add(neuron_key(3), "mine")
    with pytest.raises(AnnotationError) as refused:
        mine.save(path)
    says = str(refused.value)
    assert f"merge({str(path)!r}) takes its concepts into this store, then " \
           f"save({str(path)!r}, overwrite=True) writes them all there" in says
    assert "overwrite=True alone replaces the file's concepts with this store's" in says
    assert mine.path is None and len(Annotations.load(path)) == 2      # nothing written
    mine.merge(path)                                                    # as it says
    mine.save(path, overwrite=True)
    both = {neuron_key(1): {"red"}, neuron_key(2): {"theirs, later"}, neuron_key(3): {"mine"}}
    assert as_sets(Annotations.load(path)) == as_sets(mine) == both
    colleague.add(neuron_key(4), "more")      # their store: the file changed, said and kept
    assert colleague.save_conflict
    colleague.merge(path)
    assert colleague.save_error is None
    assert as_sets(Annotations.load(path)) == {**both, neuron_key(4): {"more"}}
    own = Annotations(tmp_path / "own.json", signature=SIG)         # a store with its own file
    own.add(neuron_key(5), "x")
    with pytest.raises(AnnotationError, match=re.escape(
            f"into this store (and, as it saves each change, into its own file "
            f"{tmp_path / 'own.json'})")):
        own.save(path)


def test_a_file_changed_on_disk_is_not_written_over_and_merge_takes_it_in(tmp_path):
    path = tmp_path / "c.json"
    seen = []
    a = Annotations(path, signature=SIG)
    a.observe(seen.append)
    a.add(neuron_key(1), "mine")
    theirs = Annotations.load(path)
    theirs.add(neuron_key(2), "theirs")
    theirs.save(path, overwrite=True)                     # another notebook saves meanwhile
    on_disk = path.read_bytes()
    a.add(neuron_key(3), "mine too")                      # the autosave must not replace it
    assert path.read_bytes() == on_disk
    assert a.unsaved and "changed on disk" in a.save_error
    assert a.concepts(neuron_key(3)) == ("mine too",)     # kept in memory
    assert None in seen                                   # observers were told the save failed
    with pytest.raises(AnnotationConflict):
        a.save()
    assert a.merge(path) == 1                             # their neuron 2 comes in
    assert a.concepts(neuron_key(2)) == ("theirs",)
    assert a.save_error is None and not a.unsaved         # and the save wrote the union
    assert as_sets(Annotations.load(path)) == {neuron_key(1): {"mine"}, neuron_key(2): {"theirs"},
                                               neuron_key(3): {"mine too"}}


def test_merge_of_its_own_file_after_an_outside_edit_writes_the_union(tmp_path):
    path = tmp_path / "c.json"
    a = Annotations(path, signature=SIG)
    a.add(neuron_key(1), "mine")
    doc = json.loads(path.read_text())
    doc["neurons"].append({"neuron": 2, "concepts": ["theirs"]})
    path.write_text(json.dumps(doc))
    a.add(neuron_key(1), "again")
    assert "changed on disk" in a.save_error
    assert a.merge(path) == 1
    assert a.save_error is None and not a.unsaved
    assert as_sets(Annotations.load(path)) == {neuron_key(1): {"mine", "again"},
                                               neuron_key(2): {"theirs"}}


def test_a_failing_autosave_keeps_every_change_and_a_later_save_writes_them(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.mkdir()
    a = Annotations(blocker / "c.json", signature=SIG)
    blocker.rmdir()
    blocker.write_text("x")                              # its folder is now a file: saves fail
    a.add(neuron_key(1), "red")
    a.add(neuron_key(2), "blue")
    assert a.unsaved and a.save_error.startswith(f"Could not save the annotations to {blocker}")
    assert "kept in memory" in a.save_error
    with pytest.raises(OSError, match="kept in memory"):
        a.save()
    assert as_sets(a) == {neuron_key(1): {"red"}, neuron_key(2): {"blue"}}
    out = a.save(tmp_path / "rescued.json")
    assert as_sets(Annotations.load(out)) == as_sets(a)


def test_open_shares_one_store_per_file_and_checks_the_model(tmp_path, monkeypatch):
    path = tmp_path / "c.json"
    a = Annotations.open(path, signature=SIG)
    monkeypatch.chdir(tmp_path)
    b = Annotations.open("c.json", signature=SIG)
    assert a is b
    with pytest.raises(AnnotationError, match="another model"):
        Annotations.open(path, signature=dict(SIG, neurons=9))


def test_observers_hear_each_change_and_a_failing_one_loses_nothing():
    a = Annotations()
    heard = []
    a.observe(lambda k: 1 / 0)
    a.observe(heard.append)
    a.add(neuron_key(1), "x")
    a.add(neuron_key(1), "x")                       # no change: no notice
    a.merge(store_with({neuron_key(2): ["y"]}))
    assert heard == [neuron_key(1), None]
    assert a.concepts(neuron_key(1)) == ("x",)
    a.unobserve(heard.append)
    a.add(neuron_key(3), "z")
    assert len(heard) == 2


def test_concurrent_edits_from_threads_all_land(tmp_path):
    a = Annotations(tmp_path / "c.json", signature=SIG)

    def work(t):
        for n in range(20):
            a.add(neuron_key(t), f"c{n}")
    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(a.concepts(neuron_key(t))) == 20 for t in range(4))
    assert Annotations.load(tmp_path / "c.json").to_dict() == a.to_dict()


def test_model_signature_records_what_must_match():
    adapter, _ = tiny_vqa()
    sig = model_signature(adapter, 12)
    assert sig == {"model": adapter.name, "modalities": ["image", "question"],
                   "classes": list(adapter.class_names), "neurons": 12, "features": {},
                   "weights": adapter.weights_fingerprint(), "weights_method": WEIGHTS_METHOD,
                   "units": {m: unit_settings(adapter.modalities[m]) for m in adapter.names}}
    tab, _ = tiny_tab_series()
    assert model_signature(tab)["features"] == {"vitals": ["hr", "bp", "temp", "age"]}


def test_a_retrained_model_or_other_unit_settings_are_said_when_a_file_is_opened(tmp_path):
    """A colleague's retrained model (the same class, so the same name) took the file's neuron
    concepts with no word, and a patch size changed moved unit concepts to other patches: the
    signature recorded neither the weights nor the units' settings."""
    from multiviz_widgets import Image
    adapter, _ = tiny_vqa()
    path = tmp_path / "lab.json"
    mine = Annotations(path, signature=model_signature(adapter, 12))
    mine.add(neuron_key(3), "red shapes")
    other, _ = tiny_vqa()
    other.modalities["image"].patch *= 2      # other patches, but no unit concept yet: silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Annotations(path, autosave=False, signature=model_signature(other, 12))
    mine.add(unit_key(0, "image", 2), "corner")
    retrained, _ = tiny_vqa()
    with torch.no_grad():
        for p in retrained.model.parameters():
            p.add_(0.01)
    with pytest.warns(UserWarning, match="weights .*the neuron concepts may not fit"):
        theirs = Annotations(path, autosave=False, signature=model_signature(retrained, 12))
    assert "may not fit" in theirs.model_note and theirs.concepts(neuron_key(3)) == ("red shapes",)
    other, _ = tiny_vqa()
    image = other.modalities["image"]
    assert isinstance(image, Image)
    same = unit_settings(image)
    image.baseline = "mean"                   # what a unit is replaced by: not its place
    assert unit_settings(image) == same
    image.patch = image.patch * 2             # other patches: unit concepts would move
    with pytest.warns(UserWarning, match="other unit settings for 'image'"):
        Annotations(path, autosave=False, signature=model_signature(other, 12))
    # merged in: only the merged file's own unit concepts are its to say about
    neurons_only = Annotations(signature=model_signature(other, 12))
    neurons_only.add(neuron_key(5), "round")
    mine.add(unit_key(1, "image", 0), "edge")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mine.merge(neurons_only)


# -- the Explorer -----------------------------------------------------------------------------
def _explorer(annotations, **kw):
    adapter, ds = tiny_vqa()
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05, annotations=annotations, **kw)
    assert ex.wait(60)
    return ex


def test_the_concepts_row_edits_the_file_and_a_new_explorer_shows_them(tmp_path):
    path = tmp_path / "concepts.json"
    ex = _explorer(str(path))
    try:
        cv = ex.concepts_view
        assert cv.neuron_tags.disabled and cv.unit_tags.disabled      # nothing selected yet
        ex.select(neuron=3, unit=("question", 1))
        assert not cv.neuron_tags.disabled and not cv.unit_tags.disabled
        assert "(color)" in cv.unit_label.value                    # the unit's word
        cv.neuron_tags.edit("add", "colour detector")               # what typing + Enter sends
        cv.neuron_tags.edit("add", "<img src=x onerror=alert(1)>")
        cv.unit_tags.edit("add", " question word ")
        st_ = ex.state()["concepts"]
        assert st_["neuron"] == ["colour detector", "<img src=x onerror=alert(1)>"]
        assert "saved to" in st_["status"] and "2 annotated" in st_["status"]
        saved = json.loads(path.read_text())
        assert saved["neurons"] == [{"neuron": 3, "concepts": st_["neuron"]}]
        assert saved["units"] == [{"instance": 0, "modality": "question", "unit": 1,
                                   "concepts": ["question word"]}]
        # another instance: the unit row empties (its unit is cleared); the neuron row stays
        ex.select(instance=2)
        assert cv.unit_tags.value == [] and cv.unit_tags.disabled
        assert cv.neuron_tags.value == st_["neuron"]
    finally:
        ex.close()
    again = _explorer(path)
    try:
        again.select(neuron=3, unit=("question", 1), instance=0)
        assert again.state()["concepts"]["neuron"] == st_["neuron"]
        assert again.state()["concepts"]["unit"] == ["question word"]
    finally:
        again.close()


def test_a_refused_tag_is_taken_back_with_the_reason(tmp_path):
    path = tmp_path / "concepts.json"
    ex = _explorer(path)
    try:
        ex.select(neuron=1)
        cv = ex.concepts_view
        cv.neuron_tags.edit("add", "ok")
        before = path.read_bytes()
        for bad in ("x" * 500, "\ud83d", "a\u2028b"):
            cv.neuron_tags.edit("add", bad)
            assert cv.neuron_tags.value == ["ok"]
            assert cv.message.value.startswith("not taken: A concept")
            assert path.read_bytes() == before
            # the browser is told, and puts the text back into its input to be corrected
            assert cv.neuron_tags.last_answer == {"op": "answer", "key": cv.neuron_tags.key,
                                                  "text": bad, "taken": False}
        cv.neuron_tags.edit("add", "fine")                          # the next edit goes through
        assert cv.message.value == "" and ex.annotations.concepts(("neuron", 1)) == ("ok", "fine")
        assert cv.neuron_tags.last_answer == {"op": "answer", "key": cv.neuron_tags.key,
                                              "text": "fine", "taken": True}
        cv.neuron_tags.edit("remove", "ok")                          # a tag's cross
        cv.neuron_tags.edit("remove", "ok")                          # (twice: nothing more)
        assert cv.neuron_tags.value == ["fine"] and cv.message.value == ""
        cv.neuron_tags.edit("add", "x", key='["neuron", 99]')        # a key the model lacks
        assert "out of range" in cv.message.value
    finally:
        ex.close()


def test_the_concepts_row_takes_in_a_file_another_notebook_changed(tmp_path):
    """A save refused on a conflict (another notebook wrote the file) shows a button that
    merges the file's changes in and saves both; nothing either side typed is lost."""
    path = tmp_path / "concepts.json"
    ex = _explorer(path)
    try:
        ex.select(neuron=1)
        cv = ex.concepts_view
        cv.neuron_tags.edit("add", "mine")
        assert cv.merge_button.layout.display == "none"
        other = Annotations(path)                     # another notebook's store of the file
        other.add(neuron_key(2), "theirs")
        other.remove(neuron_key(1), "mine")           # ...which also dropped one of ours
        cv.neuron_tags.edit("add", "mine too")        # refused: kept in memory
        assert "NOT SAVED" in cv.status.value and "changed on disk" in cv.status.value
        assert cv.merge_button.layout.display is None
        cv.merge_button.click()
        assert cv.merge_button.layout.display == "none" and cv.message.value == ""
        assert "NOT SAVED" not in cv.status.value
        assert "took in 1 concept from the file" in cv.status.value
        want = {neuron_key(1): {"mine too"}, neuron_key(2): {"theirs"}}
        assert as_sets(ex.annotations) == want and as_sets(Annotations.load(path)) == want
        assert cv.neuron_tags.value == ["mine too"]
        cv.neuron_tags.edit("add", "again")           # saving each change goes on
        assert "took in" not in cv.status.value and ex.annotations.save_error is None
        assert as_sets(Annotations.load(path))[neuron_key(1)] == {"mine too", "again"}
        # the file spoilt meanwhile: said, the button stays, the concepts stay in memory
        path.write_text("{ not json")
        cv.neuron_tags.edit("add", "kept")
        assert cv.merge_button.layout.display is None
        cv.merge_button.click()
        assert cv.message.value.startswith("not merged: ")
        assert cv.merge_button.layout.display is None
        assert ex.annotations.concepts(neuron_key(1)) == ("mine too", "again", "kept")
        assert path.read_text() == "{ not json"
    finally:
        ex.close()


def test_edits_from_code_show_in_the_row_and_on_the_path(tmp_path):
    ex = _explorer(None)
    try:
        assert ex.annotations.path is None and "kept in memory only" in ex.state()["concepts"][
            "status"]
        node = next(n for n in ex.path_view.nodes if n["kind"] == "neuron")
        j = int(node["neuron"])
        ex.select(neuron=j)
        ex.annotations.add(("neuron", j), "shape")
        assert ex.concepts_view.neuron_tags.value == ["shape"]
        assert ex.path_view.state()["concepts"] == f"concepts on this path: h{j} shape"
        ex.annotations.set(("neuron", j), [])
        assert ex.path_view.state()["concepts"] == ""
    finally:
        ex.close()


def test_a_store_without_a_file_adopts_the_one_it_saves_to_and_the_status_says_so(tmp_path):
    """The status line's own advice, followed: save('concepts.json') writes the file, the
    status says so, later changes are saved there, and saving again goes through."""
    ex = _explorer(None)
    try:
        a = ex.annotations
        a.add(("neuron", 0), "shape")
        heard = []
        a.observe(heard.append)
        target = tmp_path / "concepts.json"
        assert a.save(target) == target
        assert a.path == target.resolve() and a.autosave and not a.unsaved
        assert heard == [None]
        assert ex.state()["concepts"]["status"] == f"1 annotated; saved to {target.resolve()} " \
                                                   f"on each change"
        a.add(("neuron", 1), "colour")                               # saved on the change
        saved = json.loads(target.read_text(encoding="utf-8"))
        assert sorted(tuple(u["concepts"]) for u in saved["neurons"]) == [("colour",),
                                                                          ("shape",)]
        a.save()                                                     # again: its own file
        a.save(target)
        # a store with a file of its own still writes a copy elsewhere and keeps its own
        copy = tmp_path / "copy.json"
        a.save(copy)
        assert a.path == target.resolve() and copy.exists()
        # shared from now on, as a store opened on the file: a second Explorer gets this one
        assert Annotations.open(target) is a
    finally:
        ex.close()


def test_adopting_a_link_writes_the_file_it_points_at_and_autosave_false_stays(tmp_path):
    real = tmp_path / "real.json"
    Annotations(real).save()
    link = tmp_path / "link.json"
    link.symlink_to(real)
    a = Annotations()
    a.add(neuron_key(1), "w")
    a.save(link, overwrite=True)
    assert link.is_symlink() and a.path == real.resolve()
    saved = json.loads(real.read_text(encoding="utf-8"))
    assert [n["concepts"] for n in saved["neurons"]] == [["w"]] and a.autosave
    b = Annotations(autosave=False)                      # said: no saves on each change
    b.add(neuron_key(2), "v")
    b.save(tmp_path / "b.json")
    assert b.path == (tmp_path / "b.json").resolve() and not b.autosave
    b.add(neuron_key(3), "u")
    saved = json.loads((tmp_path / "b.json").read_text(encoding="utf-8"))
    assert b.unsaved and [n["concepts"] for n in saved["neurons"]] == [["v"]]


def test_an_unreadable_file_stops_the_explorer_and_is_left_as_it_was(tmp_path):
    path = tmp_path / "concepts.json"
    path.write_text("my notes, not JSON")
    with pytest.raises(AnnotationError, match="not an annotations file"):
        _explorer(path)
    assert path.read_text() == "my notes, not JSON"

    def engine_threads():
        return sum(t.name.startswith("multiviz-engine") for t in threading.enumerate())
    deadline = time.monotonic() + 10
    while engine_threads() and time.monotonic() < deadline:   # the workers stop on their own
        time.sleep(0.02)
    assert engine_threads() == 0


def test_annotations_of_another_model_are_refused(tmp_path):
    path = tmp_path / "concepts.json"
    ex = _explorer(path)
    ex.select(neuron=0)
    ex.annotations.add(("neuron", 0), "x")
    ex.close()
    adapter, ds = tiny_tab_series()
    with pytest.raises(AnnotationError, match="another model"):
        Explorer(adapter, ds, kernels=FakeKernels(), annotations=path, start=False)
    with pytest.raises(TypeError, match="annotations must be"):
        _explorer(42)


def test_a_shared_store_updates_two_explorers_at_once(tmp_path):
    store = Annotations(tmp_path / "c.json")
    a, b = _explorer(store), _explorer(store)
    try:
        a.select(neuron=2)
        b.select(neuron=2)
        a.concepts_view.neuron_tags.edit("add", "both see it")
        assert b.concepts_view.neuron_tags.value == ["both see it"]
    finally:
        a.close()
        b.close()
    assert store._observers == []                    # closed views no longer listen


# -- the tags widget ----------------------------------------------------------------------------
def test_the_tags_bundle_keeps_keys_from_jupyterlab_and_sets_text_only():
    from multiviz_widgets.views import concept_tags as ct
    src = ct._ESM_PATH.read_text()
    assert "data-lm-suppress-shortcuts" in src         # Enter reaches the input in JupyterLab
    assert not any(w in src for w in ("innerHTML", "outerHTML", "insertAdjacentHTML"))
    assert "textContent" in src
    assert "isComposing" in src                        # Enter that ends an IME composition
    w = ct.ConceptTags(value=["a"])
    try:
        assert w._esm == src and w.value == ["a"] and not w.disabled
    finally:
        w.close()


def test_a_missing_tags_bundle_says_to_run_make_js(monkeypatch, tmp_path):
    from multiviz_widgets.views import concept_tags as ct
    from multiviz_widgets.views.input_view import BundleMissingError
    monkeypatch.setattr(ct, "_ESM_PATH", tmp_path / "missing.js")
    with pytest.raises(BundleMissingError, match="ConceptTags.*make js"):
        ct.ConceptTags()


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch):
    import functools
    import pathlib
    import re
    text = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text("utf-8")
    block = re.search(r"## Naming neurons.*?```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    adapter, ds = tiny_vqa()
    colleague = Annotations(signature=model_signature(adapter, 12))
    colleague.add(unit_key(0, "question", 1), "colour word")
    colleague.save("colleague.json")
    ns = {"adapter": adapter, "dataset": ds,
          "Explorer": functools.partial(Explorer, kernels=FakeKernels(), start=False)}
    try:
        exec(compile(block, "README.md", "exec"), ns)
        ann = ns["explorer"].annotations
        assert ann.find("red things") == [("neuron", 7)] and ann.find("red shapes") == []
        assert ann.concepts(unit_key(0, "question", 1)) == ("colour word",)
        assert as_sets(Annotations.load("concepts.json")) == as_sets(ann)
    finally:
        if "explorer" in ns:
            ns["explorer"].close()


def test_an_edit_sent_before_a_click_elsewhere_lands_on_the_key_it_was_typed_for(tmp_path):
    ex = _explorer(tmp_path / "c.json")
    try:
        ex.annotations.set(("neuron", 1), ["red"])
        ex.annotations.set(("neuron", 2), ["circle", "big"])
        ex.select(neuron=1)
        tags = ex.concepts_view.neuron_tags
        typed_for = tags.key                          # the row shows h1 while the person types
        ex.select(neuron=2)                           # a click on h2 reaches the kernel first
        tags.edit("add", "shiny", key=typed_for)
        tags.edit("remove", "red", key=typed_for)
        assert ex.annotations.concepts(("neuron", 1)) == ("shiny",)
        assert ex.annotations.concepts(("neuron", 2)) == ("circle", "big")
        assert tags.value == ["circle", "big"]        # the row still shows h2
    finally:
        ex.close()


def test_the_unit_row_names_the_unit_once_the_input_view_has_the_instance(tmp_path):
    ex = _explorer(None)
    try:
        ex.select(instance=3, unit=("question", 0))
        assert ex.wait(30)
        assert ex.concepts_view.unit_label.value == "#3 question unit 0 (what):"
    finally:
        ex.close()


def test_a_save_writes_the_newest_concepts_when_edits_race(tmp_path, monkeypatch):
    import multiviz_widgets.annotations as an
    path = tmp_path / "c.json"
    a = Annotations(path, signature=SIG)
    a.add(neuron_key(0), "first")
    writing, release = threading.Event(), threading.Event()
    real = an._atomic_write
    calls = []

    def slow_write(target, text):
        calls.append(text)
        if len(calls) == 1:                  # the first save (A's) waits inside its write; a
            writing.set()                    # second one that got past the lock would write
            release.wait(10)                 # B's newer text first, and A's older one last
        real(target, text)
    monkeypatch.setattr(an, "_atomic_write", slow_write)
    t = threading.Thread(target=a.add, args=(neuron_key(1), "from A"))
    t.start()
    assert writing.wait(10)
    b = threading.Thread(target=a.add, args=(neuron_key(2), "from B"))
    b.start()
    time.sleep(0.1)
    release.set()
    t.join(10)
    b.join(10)
    assert not a.unsaved and a.save_error is None
    assert as_sets(Annotations.load(path)) == as_sets(a) == {
        neuron_key(0): {"first"}, neuron_key(1): {"from A"}, neuron_key(2): {"from B"}}


def test_merge_of_its_own_file_keeps_removals_made_on_either_side(tmp_path):
    path = tmp_path / "c.json"
    mine = Annotations(path, signature=SIG)
    mine.set(neuron_key(1), ["keep", "wrong guess", "mine to drop"])
    theirs = Annotations(path)                          # another notebook on the same file
    theirs.remove(neuron_key(1), "wrong guess")         # they remove one and add one
    theirs.add(neuron_key(1), "their idea")
    mine.remove(neuron_key(1), "mine to drop")          # conflict: kept in memory
    mine.add(neuron_key(3), "new here")
    assert "changed on disk" in mine.save_error
    assert mine.merge(path) == 1                        # "their idea"
    assert mine.concepts(neuron_key(1)) == ("keep", "their idea")
    assert mine.concepts(neuron_key(3)) == ("new here",)
    assert mine.save_error is None
    assert as_sets(Annotations.load(path)) == as_sets(mine)


def test_the_store_keeps_its_file_across_chdir_and_open_sees_a_replaced_file(tmp_path,
                                                                             monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    s = Annotations.open("c.json", signature=SIG)
    s.add(neuron_key(1), "x")
    monkeypatch.chdir(tmp_path / "b")
    s.add(neuron_key(2), "y")
    assert not (tmp_path / "b" / "c.json").exists()
    assert as_sets(Annotations.load(tmp_path / "a" / "c.json")) == as_sets(s)
    other = Annotations.load(tmp_path / "a" / "c.json")
    other.set(neuron_key(1), [])
    other.add(neuron_key(5), "replaced")
    other.save(tmp_path / "a" / "c.json", overwrite=True)
    again = Annotations.open(tmp_path / "a" / "c.json", signature=SIG)
    assert again is s and as_sets(s) == {neuron_key(2): {"y"}, neuron_key(5): {"replaced"}}


def test_a_concept_with_a_lone_surrogate_is_refused_and_saving_goes_on(tmp_path):
    a = Annotations(tmp_path / "c.json", signature=SIG)
    with pytest.raises(AnnotationError, match="control character"):
        a.add(neuron_key(0), "smile \ud83d")
    a.add(neuron_key(0), "smile \U0001f600")
    assert a.save_error is None
    assert Annotations.load(tmp_path / "c.json").concepts(neuron_key(0)) == ("smile \U0001f600",)
    (tmp_path / "bad.json").write_text(json.dumps(_valid_doc(
        neurons=[{"neuron": 1, "concepts": ["\ud83d"]}])))
    with pytest.raises(AnnotationError, match=r"neurons\[0\]"):
        Annotations.load(tmp_path / "bad.json")


def test_the_menu_lists_named_neurons_and_units_and_goes_to_them(tmp_path):
    ex = _explorer(None)
    try:
        cv = ex.concepts_view
        assert cv.named.options == (("go to a named neuron or unit", None),)
        ex.annotations.add(("neuron", 4), "<b>red</b>")
        ex.annotations.add(("unit", 5, "question", 2), "the shape word")
        ex.annotations.add(("unit", 6, "question", 3), "the last word")
        labels = [label for label, _ in cv.named.options]
        assert labels[1:] == ["h4: <b>red</b>", "#5 question unit 2: the shape word",
                              "#6 question unit 3: the last word"]
        cv.named.value = ("unit", 5, "question", 2)
        assert ex.selection.instance == 5 and ex.selection.unit_ref == ("question", 2)
        assert cv.named.value is None and cv.unit_tags.value == ["the shape word"]
        cv.named.value = ("neuron", 4)
        assert ex.selection.neuron == 4 and cv.neuron_tags.value == ["<b>red</b>"]
        cv.goto(("unit", 6, "question", 40))              # a unit the instance lacks (a file's)
        assert "cannot go to" in cv.message.value and "out of range" in cv.message.value
        assert ex.selection.instance == 5                          # nothing changed
    finally:
        ex.close()


def _explorer_on(n: int, annotations):
    adapter, ds = tiny_vqa(n)
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05, annotations=annotations,
                  start=False)
    return ex


def test_unit_concepts_stay_with_their_dataset_and_neuron_concepts_go_anywhere(tmp_path):
    units, neurons = tmp_path / "units.json", tmp_path / "neurons.json"
    a = _explorer_on(12, units)
    a.annotations.add(("unit", 3, "question", 1), "colour word")
    a.annotations.add(("neuron", 2), "red")
    assert json.loads(units.read_text())["dataset"] == {
        "name": "tiny-vqa", "instances": 12, "fingerprint": a.dataset.inputs_fingerprint()}
    b = _explorer_on(12, neurons)
    b.annotations.add(("neuron", 2), "red")
    a.close()
    b.close()
    before = units.read_bytes()
    with pytest.raises(AnnotationError, match=r"name instances of 'tiny-vqa' \(12 instances\), "
                                              r"and this is 'tiny-vqa' \(8 instances\)"):
        _explorer_on(8, units)                                  # another split of the data
    assert units.read_bytes() == before
    other = _explorer_on(8, neurons)                            # neurons only: they carry over
    try:
        assert other.annotations.concepts(("neuron", 2)) == ("red",)
        other.annotations.add(("unit", 1, "image", 0), "corner")
        assert json.loads(neurons.read_text())["dataset"]["instances"] == 8
        with pytest.raises(AnnotationError, match="name instances of"):
            other.annotations.merge(units)                      # their units name other instances
        assert other.annotations.concepts(("unit", 3, "question", 1)) == ()
    finally:
        other.close()


def test_two_explorers_on_other_datasets_share_a_file_until_it_holds_unit_concepts(tmp_path):
    path = tmp_path / "c.json"
    a = _explorer_on(12, path)
    try:
        a.annotations.add(("unit", 3, "question", 1), "colour word")
        with pytest.raises(AnnotationError, match=r"name instances of 'tiny-vqa' "
                                                  r"\(12 instances\), and this is 'tiny-vqa' "
                                                  r"\(8 instances\)"):
            _explorer_on(8, path)
        b = _explorer_on(12, path)                              # the same dataset: shared
        assert b.annotations is a.annotations
        b.close()
    finally:
        a.close()


def test_a_closed_or_failed_explorer_lets_another_dataset_open_the_file(tmp_path, monkeypatch):
    path = tmp_path / "c.json"
    store = Annotations.open(path)
    a = _explorer_on(12, store)
    a.close()
    a.close()                                               # twice: released once
    b = _explorer_on(8, store)                              # no unit concepts: any dataset
    b.close()
    import multiviz_widgets.explorer as explorer_module

    def broken(*args, **kwargs):
        raise RuntimeError("a view failed")
    monkeypatch.setattr(explorer_module, "PathView", broken)
    with pytest.raises(RuntimeError, match="a view failed"):
        _explorer_on(12, store)
    monkeypatch.undo()
    c = _explorer_on(8, store)                              # the failed one holds no claim
    c.close()
    assert store._viewers == [] and store._key_checks == []


def test_a_failed_open_leaves_no_claim_and_no_other_dataset(tmp_path):
    path = tmp_path / "c.json"
    d12, d8 = {"name": "d", "instances": 12}, {"name": "d", "instances": 8}
    store = Annotations.open(path, signature=SIG, dataset=d12)
    store.bind(SIG, dataset=d12)
    store.add(unit_key(3, "image", 1), "x")
    with pytest.raises(AnnotationError, match="name instances of 'd' \\(12"):
        Annotations.open(path, signature=SIG, dataset=d8)
    assert store.dataset == d12 and store._viewers == [d12]
    path.write_text("not JSON")                                 # replaced on disk meanwhile
    with pytest.raises(AnnotationError, match="not an annotations file"):
        Annotations.open(path, signature=SIG, dataset=d12)
    assert store._viewers == [d12] and store.concepts(unit_key(3, "image", 1)) == ("x",)
    store.unbind()
    assert store._viewers == []


def test_merge_brings_the_dataset_of_the_unit_concepts_it_takes_in(tmp_path):
    d1 = {"name": "d", "instances": 12}
    theirs = Annotations(signature=SIG, dataset=d1)
    theirs.add(unit_key(3, "image", 1), "corner")
    theirs.save(tmp_path / "theirs.json")
    mine = Annotations(tmp_path / "mine.json", signature=SIG)        # no dataset yet
    mine.merge(tmp_path / "theirs.json")
    assert mine.dataset == d1 and mine.n_instances == 12
    with pytest.raises(AnnotationError, match="name instances of 'd' \\(12 instances\\), and "
                                              "this is 'd' \\(8 instances\\)"):
        mine.bind(SIG, dataset={"name": "d", "instances": 8})
    with pytest.raises(AnnotationError, match="out of range"):      # its size is checked too
        mine.add(unit_key(50, "image", 1), "y")
    again = Annotations(tmp_path / "mine.json")                       # as saved: opens again
    assert again.n_instances == 12 and again.dataset == d1


def test_opening_a_file_edited_only_in_its_layout_does_not_rewrite_it(tmp_path):
    path = tmp_path / "c.json"
    store = Annotations.open(path, signature=SIG)
    store.add(neuron_key(1), "x")
    doc = json.loads(path.read_text())
    path.write_text(json.dumps(doc, indent=4))                      # same concepts, new layout
    laid_out = path.read_bytes()
    assert Annotations.open(path, signature=SIG) is store
    assert path.read_bytes() == laid_out and not store.unsaved
    store.add(neuron_key(2), "y")                                   # and saving goes on
    assert store.save_error is None


def test_a_save_to_an_alias_of_its_own_file_clears_the_error(tmp_path, monkeypatch):
    path = tmp_path / "c.json"
    a = Annotations(path, signature=SIG)
    a.add(neuron_key(1), "x")
    path.write_text(path.read_text() + " ")                          # a conflict...
    a.add(neuron_key(2), "y")
    assert a.save_error
    monkeypatch.chdir(tmp_path)
    a.save("c.json", overwrite=True)                                 # ...resolved by choice
    assert a.save_error is None and not a.unsaved
    a.add(neuron_key(3), "z")                                        # autosave works again
    assert a.save_error is None
    assert as_sets(Annotations.load(path)) == as_sets(a)


def test_merge_of_its_own_file_after_it_was_deleted_or_a_key_went_away(tmp_path):
    path = tmp_path / "c.json"
    a = Annotations(path, signature=SIG)
    a.set(neuron_key(1), ["x", "y"])
    a.set(neuron_key(2), ["z"])
    other = Annotations(path)
    other.set(neuron_key(2), [])                                     # they drop a whole key
    a.add(neuron_key(1), "w")                                        # conflict, kept in memory
    assert a.merge(path) == 0
    assert as_sets(a) == {neuron_key(1): {"x", "y", "w"}}
    assert as_sets(Annotations.load(path)) == as_sets(a)
    path.unlink()                                                    # deleted on disk
    a.add(neuron_key(4), "v")                                        # written again, all of it
    assert as_sets(Annotations.load(path)) == as_sets(a) and a.save_error is None


def test_a_tabular_column_is_named_once_for_every_instance(tmp_path):
    adapter, ds = tiny_tab_series()
    path = tmp_path / "c.json"
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05, annotations=path)
    try:
        assert ex.wait(60)
        cv = ex.concepts_view
        ex.select(instance=0, unit=("vitals", 0))
        assert ex.wait(30)
        assert cv.unit_label.value == "vitals unit 0 (hr), every instance:"
        cv.unit_tags.edit("add", "vital sign")
        ex.select(instance=4, unit=("vitals", 0))                  # another instance: the same
        assert cv.unit_tags.value == ["vital sign"]
        ex.select(unit=("series", 1))                               # a time window: this one only
        cv.unit_tags.edit("add", "a spike here")
        assert ex.annotations.keys() == [("feature", "vitals", 0), ("unit", 4, "series", 1)]
        ex.select(instance=2, unit=("series", 1))
        assert cv.unit_tags.value == []
        saved = json.loads(path.read_text())
        assert saved["features"] == [{"modality": "vitals", "unit": 0, "concepts": ["vital sign"]}]
        assert [o[0] for o in cv.named.options][1] == "vitals unit 0 (every instance): vital sign"
        cv.named.value = ("feature", "vitals", 0)                    # goes to it on this instance
        assert ex.selection.instance == 2 and ex.selection.unit_ref == ("vitals", 0)
    finally:
        ex.close()
    assert Annotations.load(path).concepts(feature_key("vitals", 0)) == ("vital sign",)


def test_a_units_kind_follows_its_modality_and_features_are_checked_by_label(tmp_path):
    adapter, _ = tiny_tab_series()
    sig = model_signature(adapter, 10)
    a = Annotations(tmp_path / "c.json", signature=sig)
    with pytest.raises(AnnotationError, match=r"same feature in every instance.*"
                                              r"use \('feature', 'vitals', 0\)"):
        a.add(unit_key(0, "vitals", 0), "x")
    with pytest.raises(AnnotationError, match=r"differ from one instance to another.*"
                                              r"use \('unit', instance, 'series', 1\)"):
        a.add(feature_key("series", 1), "x")
    with pytest.raises(AnnotationError, match="unit 9 is out of range: 'vitals' has 4 units"):
        a.add(feature_key("vitals", 9), "x")
    a.add(feature_key("vitals", 0), "vital sign")
    assert json.loads((tmp_path / "c.json").read_text())["version"] == 2
    renamed = dict(sig, features={"vitals": ["pulse", "bp", "temp", "age"]})
    with pytest.raises(AnnotationError, match="another model .features"):
        Annotations(tmp_path / "c.json", signature=renamed)


def test_a_version_1_file_is_still_read(tmp_path):
    doc = _valid_doc()
    assert doc["version"] == 1 and "features" not in doc
    (tmp_path / "old.json").write_text(json.dumps(doc))
    old = Annotations.load(tmp_path / "old.json", signature=SIG)
    assert old.concepts(neuron_key(2)) == ("red",)
    assert old.concepts(unit_key(1, "image", 3)) == ("circle",)


def test_the_input_view_marks_the_named_units_of_the_shown_instance(tmp_path):
    adapter, ds = tiny_tab_series()
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05, annotations=tmp_path / "c.json")
    try:
        assert ex.wait(60)
        a = ex.annotations
        a.add(unit_key(0, "series", 1), "a spike here")
        a.add(unit_key(3, "series", 2), "flat")                    # another instance: not shown
        a.add(feature_key("vitals", 0), "<b>vital</b> sign")        # every instance
        a.add(neuron_key(1), "alarm")                              # a neuron: not a unit
        want0 = {"series": {"1": ["a spike here"]}, "vitals": {"0": ["<b>vital</b> sign"]}}
        assert ex.state()["input_concepts"] == want0
        ex.select(instance=3)
        assert ex.wait(30)
        assert ex.state()["input_concepts"] == {"series": {"2": ["flat"]},
                                                "vitals": {"0": ["<b>vital</b> sign"]}}
        # typed in the concepts row: marked at once; removed: unmarked
        ex.select(unit=("series", 0))
        assert ex.wait(30)
        ex.concepts_view.unit_tags.edit("add", "rising")
        assert ex.input_view.concepts["series"] == {"0": ["rising"], "2": ["flat"]}
        ex.concepts_view.unit_tags.edit("remove", "rising")
        assert ex.input_view.concepts["series"] == {"2": ["flat"]}
        a.merge(Annotations())                                     # many keys at once: redone
        ex.select(instance=0)
        assert ex.wait(30)
        assert ex.state()["input_concepts"] == want0
    finally:
        ex.close()
    assert ex._on_concepts not in a._observers                     # a closed Explorer lets go
    a.add(unit_key(0, "series", 3), "after close")                # and is not called


def test_an_instance_that_cannot_be_shown_keeps_no_marks_of_the_one_before(tmp_path):
    ex = _explorer(None)
    try:
        ex.annotations.add(unit_key(0, "question", 1), "colour word")
        assert ex.input_view.concepts == {"question": {"1": ["colour word"]}}
        ex.input_panel._items_failed(0, RuntimeError("gone"))
        assert ex.input_view.concepts == {}
        ex.input_panel.show_concepts()                             # nothing shown: nothing marked
        assert ex.input_view.concepts == {}
    finally:
        ex.close()


@pytest.mark.parametrize("bad, says", [
    ({"question": ["a"]}, "modality name: {unit index"),
    ({"question": {"x": ["a"]}}, "a unit is named by its index"),
    ({"question": {"1": "a"}}, "a list of texts"),
    ({"question": {"1": [3]}}, "a list of texts"),
])
def test_the_input_views_concepts_refuse_what_is_not_a_list_of_texts_per_unit(bad, says):
    from multiviz_widgets.views.input_view import InputView
    import traitlets
    view = InputView()
    view.concepts = {"question": {1: ["ok"], "2": []}}
    assert view.concepts == {"question": {"1": ["ok"]}}              # empty lists dropped
    with pytest.raises(traitlets.TraitError, match=says):
        view.concepts = bad
    assert view.concepts == {"question": {"1": ["ok"]}}
    view.close()


def test_opening_a_file_changed_on_disk_tells_the_views_outside_the_stores_lock(tmp_path):
    """A second open of a file changed meanwhile merges it and tells the open Explorer's views,
    which take the engine's lock; a worker holding that lock reads the store. Telling them under
    the store's lock deadlocked the kernel."""
    from multiviz_widgets.annotations import dataset_signature
    path = tmp_path / "c.json"
    adapter, ds = tiny_vqa()
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05, annotations=path)
    try:
        assert ex.wait(60)
        ex.annotations.add(neuron_key(1), "red")
        doc = json.loads(path.read_text())
        doc["neurons"].append({"neuron": 2, "concepts": ["theirs"]})
        path.write_text(json.dumps(doc))                     # another program writes the file
        holding = threading.Event()

        def worker():                                        # a result applied on the worker
            with ex.engine.lock:
                holding.set()
                time.sleep(0.3)
                ex.path_view.concept_line()                  # reads the store
        t = threading.Thread(target=worker, daemon=True)
        t.start()
        holding.wait(10)
        opened = []
        o = threading.Thread(target=lambda: opened.append(Annotations.open(
            path, signature=model_signature(adapter, ex._n_neurons()),
            dataset=dataset_signature(ds))), daemon=True)
        o.start()
        t.join(10)
        o.join(10)
        assert not t.is_alive() and not o.is_alive(), "deadlock"
        assert opened == [ex.annotations]
        assert ex.annotations.concepts(neuron_key(2)) == ("theirs",)
    finally:
        ex.close()


# -- a version-1 file that named a tabular column per instance -----------------------------------
def _version_1_tabular_doc(adapter, ds) -> dict:
    sig = model_signature(adapter)
    sig.pop("features")                                # version 1 had no "features"
    return {"format": "multiviz-annotations", "version": 1, "model": sig,
            "dataset": {"name": ds.name, "instances": len(ds)},
            "neurons": [{"neuron": 1, "concepts": ["fever"]}],
            "units": [{"instance": 0, "modality": "vitals", "unit": 0, "concepts": ["high hr"]},
                      {"instance": 2, "modality": "series", "unit": 1, "concepts": ["spike"]},
                      {"instance": 3, "modality": "vitals", "unit": 0,
                       "concepts": ["low hr", "high hr"]},
                      {"instance": 3, "modality": "vitals", "unit": 2, "concepts": ["fever"]}]}


def test_a_version_1_file_naming_a_tabular_column_per_instance_opens_as_its_feature(tmp_path):
    adapter, ds = tiny_tab_series()
    path = tmp_path / "c.json"
    path.write_text(json.dumps(_version_1_tabular_doc(adapter, ds)))
    before = path.read_bytes()
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05, annotations=path, start=False)
    try:
        a = ex.annotations
        assert a.keys() == [("neuron", 1), ("feature", "vitals", 0), ("feature", "vitals", 2),
                            ("unit", 2, "series", 1)]
        # the concepts of every instance together, in the order of the instances, each once
        assert a.concepts(feature_key("vitals", 0)) == ("high hr", "low hr")
        assert a.concepts(unit_key(2, "series", 1)) == ("spike",)       # not a shared unit
        assert path.read_bytes() == before and not a.unsaved             # not rewritten yet
        a.add(neuron_key(2), "calm")                                     # a change: version 2
        saved = json.loads(path.read_text())
        assert saved["version"] == 2 and saved["features"] == [
            {"modality": "vitals", "unit": 0, "concepts": ["high hr", "low hr"]},
            {"modality": "vitals", "unit": 2, "concepts": ["fever"]}]
        assert [u["modality"] for u in saved["units"]] == ["series"]
    finally:
        ex.close()


def test_a_version_1_tabular_file_is_read_as_features_by_merge_and_by_a_later_bind(tmp_path):
    adapter, ds = tiny_tab_series()
    old = tmp_path / "old.json"
    old.write_text(json.dumps(_version_1_tabular_doc(adapter, ds)))
    sig = model_signature(adapter, 10)
    mine = Annotations(tmp_path / "mine.json", signature=sig)
    mine.merge(old)
    assert mine.concepts(feature_key("vitals", 0)) == ("high hr", "low hr")
    assert mine.keys("unit") == [unit_key(2, "series", 1)]
    # opened before the model is known (no signature), then shown by an Explorer
    store = Annotations.open(old)
    assert unit_key(0, "vitals", 0) in store                      # which units are shared: unknown
    store.add(neuron_key(2), "calm")                 # saved as version 1 still: read so again
    assert json.loads(old.read_text())["version"] == 1
    before = old.read_bytes()
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05, annotations=store, start=False)
    try:
        assert store.keys("feature") == [feature_key("vitals", 0), feature_key("vitals", 2)]
        assert store.concepts(feature_key("vitals", 0)) == ("high hr", "low hr")
        assert old.read_bytes() == before and not store.unsaved
        store.add(neuron_key(3), "x")                              # saves without a conflict
        assert store.save_error is None and json.loads(old.read_text())["version"] == 2
    finally:
        ex.close()


def test_a_version_1_file_of_a_model_without_shared_units_is_saved_as_version_2(tmp_path):
    adapter, ds = tiny_vqa()
    sig = model_signature(adapter)
    sig.pop("features")
    path = tmp_path / "c.json"
    path.write_text(json.dumps({
        "format": "multiviz-annotations", "version": 1, "model": sig,
        "dataset": {"name": ds.name, "instances": len(ds)},
        "units": [{"instance": 1, "modality": "question", "unit": 0, "concepts": ["what"]}]}))
    ex = Explorer(adapter, ds, kernels=FakeKernels(), annotations=path, start=False)
    try:
        assert ex.annotations.keys() == [unit_key(1, "question", 0)]
        ex.annotations.add(neuron_key(1), "x")
        saved = json.loads(path.read_text())
        assert saved["version"] == 2 and saved["units"][0]["concepts"] == ["what"]
    finally:
        ex.close()


# -- unit concepts of a dataset of the same name and size ----------------------------------------
def _same_name_dataset(words: str):
    import numpy as np

    from multiviz_widgets.data import MultimodalDataset
    rng = np.random.default_rng(5)
    return MultimodalDataset({"image": [rng.random((8, 8, 3)).astype(np.float32)
                                        for _ in range(12)],
                              "question": [words] * 12}, labels=[0] * 12)


def test_unit_concepts_are_refused_beside_a_dataset_of_the_same_name_and_size(tmp_path):
    adapter, _ = tiny_vqa(12)
    path = tmp_path / "c.json"
    a, b = _same_name_dataset("what color is the shape"), _same_name_dataset("is the circle red")
    ex = Explorer(adapter, a, kernels=FakeKernels(), annotations=path, start=False)
    ex.annotations.add(("unit", 5, "question", 3), "the word shape")
    ex.close()
    saved = json.loads(path.read_text())["dataset"]
    assert saved == {"name": "dataset", "instances": 12, "fingerprint": a.inputs_fingerprint()}
    before = path.read_bytes()
    with pytest.raises(AnnotationError, match=r"another dataset of that name and size: its "
                                              r"inputs differ.*its own file.*same dataset, "
                                              r"edited"):
        Explorer(adapter, b, kernels=FakeKernels(), annotations=path, start=False)
    assert path.read_bytes() == before
    a.labels = [1] * 12                             # relabelled: the same instances, still opens
    again = Explorer(adapter, a, kernels=FakeKernels(), annotations=path, start=False)
    assert again.annotations.concepts(("unit", 5, "question", 3)) == ("the word shape",)
    again.close()
    # a file written before fingerprints were recorded: told apart by its name and size
    doc = json.loads(before)
    del doc["dataset"]["fingerprint"]
    older = tmp_path / "older.json"
    older.write_text(json.dumps(doc))
    opened = Explorer(adapter, b, kernels=FakeKernels(), annotations=older, start=False)
    try:
        assert opened.annotations.concepts(("unit", 5, "question", 3)) == ("the word shape",)
        opened.annotations.add(("neuron", 1), "x")                 # saved with the fingerprint
        assert json.loads(older.read_text())["dataset"]["fingerprint"] == b.inputs_fingerprint()
    finally:
        opened.close()


def test_the_explorer_computes_the_fingerprint_only_when_unit_concepts_need_it(tmp_path):
    adapter, ds = tiny_vqa(12)
    calls = []
    real = ds.inputs_fingerprint
    ds.inputs_fingerprint = lambda: calls.append(1) or real()
    path = tmp_path / "c.json"
    ex = Explorer(adapter, ds, kernels=FakeKernels(), annotations=path, start=False)
    try:
        ex.annotations.add(("neuron", 1), "red")
        assert calls == []                                # no unit concepts: not needed
        ex.annotations.add(("unit", 1, "question", 0), "what")
        ex.annotations.add(("unit", 2, "question", 0), "what")
        assert len(calls) == 1                            # once, for the file
        assert json.loads(path.read_text())["dataset"]["fingerprint"] == real()
    finally:
        ex.close()


# -- a save to a link to its own file ------------------------------------------------------------
def test_a_save_to_a_link_to_its_own_file_writes_the_file_and_keeps_the_link(tmp_path):
    real, link = tmp_path / "concepts.json", tmp_path / "link.json"
    Annotations(real).add(neuron_key(1), "red")
    link.symlink_to(real)
    a = Annotations(real, autosave=False)
    a.add(neuron_key(2), "blue")
    assert a.save(link) == real
    assert link.is_symlink() and not a.unsaved
    assert as_sets(Annotations.load(real)) == {neuron_key(1): {"red"}, neuron_key(2): {"blue"}}
    a.add(neuron_key(3), "green")
    a.save()                                             # no false conflict
    assert as_sets(Annotations.load(real)) == as_sets(a) and a.save_error is None


def test_a_store_whose_own_file_became_a_link_loop_still_saves_or_says_why(tmp_path):
    """save() with no path resolved its own file's path, outside its error handling: a link
    loop there raised from every add(), and save_error stayed empty."""
    path = tmp_path / "f.json"
    a = Annotations(path)
    a.add(neuron_key(1), "red")
    path.unlink()
    path.symlink_to(path.name)                     # f.json -> f.json
    a.add(neuron_key(2), "blue")                   # saved as any change: over the link
    assert a.save_error is None and not a.unsaved and not path.is_symlink()
    assert as_sets(Annotations.load(path)) == {neuron_key(1): {"red"}, neuron_key(2): {"blue"}}


# -- the Explorer refuses units that do not exist ------------------------------------------------
def test_the_explorer_refuses_to_name_a_unit_its_instance_does_not_have(tmp_path):
    path = tmp_path / "c.json"
    ex = _explorer(path)
    try:
        a = ex.annotations
        for key in [("unit", 0, "image", 10 ** 6), ("unit", 0, "question", 500)]:
            with pytest.raises(AnnotationError, match=r"names no unit: unit \d+ of '\w+' is out "
                                                      r"of range: instance 0 has \d+ units"):
                a.add(key, "x")
        a.add(("unit", 0, "question", 2), "fine")
        assert a.keys("unit") == [("unit", 0, "question", 2)]
        assert [u["unit"] for u in json.loads(path.read_text())["units"]] == [2]
        assert [k for _, k in ex.concepts_view.named.options][1:] == [("unit", 0, "question", 2)]
        ex.concepts_view.unit_tags.key = json.dumps(["unit", 0, "image", 10 ** 6])
        ex.concepts_view._edited("add", ex.concepts_view.unit_tags.key, "from the browser")
        assert "names no unit" in ex.concepts_view.message.value
    finally:
        ex.close()
    # a dead key read from a file can still be emptied; a store no Explorer shows takes any unit
    doc = json.loads(path.read_text())
    doc["units"].append({"instance": 1, "modality": "image", "unit": 999, "concepts": ["old"]})
    path.write_text(json.dumps(doc))
    ex = _explorer(path)
    try:
        ex.annotations.remove(("unit", 1, "image", 999), "old")
        assert ("unit", 1, "image", 999) not in ex.annotations
    finally:
        ex.close()
    assert ex._check_annotation_key not in ex.annotations._key_checks


def test_the_explorer_checks_a_feature_whose_labels_are_not_recorded(tmp_path):
    adapter, ds = tiny_tab_series()
    ex = Explorer(adapter, ds, kernels=FakeKernels(), annotations=None, start=False)
    try:
        ex.annotations.signature["features"]["vitals"] = None      # labels that need an instance
        with pytest.raises(AnnotationError, match="names no unit: unit 7 of 'vitals'"):
            ex.annotations.add(feature_key("vitals", 7), "x")
        ex.annotations.add(feature_key("vitals", 3), "age")
    finally:
        ex.close()


# -- explorers on two datasets, one file ---------------------------------------------------------
def test_explorers_on_two_datasets_share_a_file_that_holds_no_unit_concepts(tmp_path):
    path = tmp_path / "c.json"
    train = _explorer_on(12, path)
    train.annotations.add(("neuron", 2), "red shapes")
    test = _explorer_on(10, path)                       # no unit concepts: may share it
    try:
        assert test.annotations is train.annotations
        test.annotations.add(("neuron", 3), "circles")             # neurons go anywhere
        for ex in (train, test):
            with pytest.raises(AnnotationError, match=r"shown for two in this kernel "
                                                      r"\('tiny-vqa' \(12 instances\) and "
                                                      r"'tiny-vqa' \(10 instances\).*Close the "
                                                      r"Explorer of one dataset"):
                ex.annotations.add(("unit", 1, "question", 0), "what")
        assert train.annotations.keys("unit") == []
        with pytest.raises(AnnotationError, match="shown for two"):    # nor by a merge
            other = Annotations(signature=train.annotations.signature,
                                dataset={"name": "tiny-vqa", "instances": 12})
            other.add(("unit", 1, "question", 0), "what")
            train.annotations.merge(other)
    finally:
        test.close()
    # the test split closed: units name the training split's instances again (all 12 of them)
    try:
        train.annotations.add(("unit", 11, "question", 0), "what")
        assert json.loads(path.read_text())["dataset"]["instances"] == 12
        with pytest.raises(AnnotationError, match=r"name instances of 'tiny-vqa' \(12 instances\)"
                                                  r", and this is 'tiny-vqa' \(10 instances\)"):
            _explorer_on(10, path)
    finally:
        train.close()


# -- text: joiners, normalisation, surrogates ----------------------------------------------------
def test_joiners_are_allowed_and_concepts_are_compared_in_nfc(tmp_path):
    a = Annotations(tmp_path / "c.json", signature=SIG)
    persian, family = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", \
        "\U0001F468\u200D\U0001F469\u200D\U0001F467"
    a.add(neuron_key(0), persian)
    a.add(neuron_key(0), family)
    for bad in ["a\u202eb", "a\u200bb", "a\u2066b", "a\ufeffb"]:      # bidi, zero-width space
        with pytest.raises(AnnotationError, match="control character"):
            a.add(neuron_key(0), bad)
    with pytest.raises(AnnotationError, match="cannot be empty"):
        a.add(neuron_key(0), " \u200d\u200c ")                        # joiners alone: nothing
    assert a.add(neuron_key(1), "\u200dred\u200c") == ("red",)      # joining nothing: dropped
    assert a.add(neuron_key(0), "e\u0301") == (persian, family, "\u00e9")
    assert a.add(neuron_key(0), "\u00e9") == (persian, family, "\u00e9")     # one concept
    assert a.find("e\u0301") == [neuron_key(0)]
    assert a.remove(neuron_key(0), "e\u0301") == (persian, family)
    assert Annotations.load(tmp_path / "c.json").concepts(neuron_key(0)) == (persian, family)
    (tmp_path / "nfd.json").write_text(json.dumps(_valid_doc(
        neurons=[{"neuron": 1, "concepts": ["caf\u00e9", "cafe\u0301"]}])))
    assert Annotations.load(tmp_path / "nfd.json").concepts(neuron_key(1)) == ("caf\u00e9",)


@pytest.mark.parametrize("where, doc", [
    ("features[0].modality", {"version": 2, "model": None, "features": [
        {"modality": "vit\udc80als", "unit": 0, "concepts": ["hr"]}]}),
    ("units[0].modality", {"units": [{"instance": 0, "modality": "im\ud800", "unit": 0,
                                      "concepts": ["x"]}]}),
    ("model.classes[1]", {"model": dict(SIG, classes=["a", "b\udfff"])}),
    ("dataset.name", {"dataset": {"name": "d\udc80", "instances": 3}}),
    ("a field name of model", {"model": dict(SIG, **{"x\udc80": 1})}),
])
def test_a_file_with_a_lone_surrogate_in_any_string_is_refused_and_left_as_it_is(tmp_path,
                                                                                  where, doc):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(_valid_doc(**doc)))             # \udc80 escapes: valid JSON
    before = path.read_bytes()
    with pytest.raises(AnnotationError, match=re.escape(where) + r" = .* lone surrogate.*It was "
                                              r"not changed; edit that string"):
        Annotations(path)
    assert path.read_bytes() == before
    mine = Annotations(tmp_path / "mine.json")
    with pytest.raises(AnnotationError, match="lone surrogate"):
        mine.merge(path)
    with pytest.raises(AnnotationError, match="A modality name .* lone surrogate"):
        mine.add(("unit", 0, "vit\udc80als", 0), "x")


def test_a_save_that_cannot_encode_the_text_keeps_the_changes_and_says_why(tmp_path):
    sig = dict(SIG, classes=["a", "b\udc80"])          # given from code: not checked by a file
    a = Annotations(tmp_path / "c.json", signature=sig)
    heard = []
    a.observe(heard.append)
    a.add(neuron_key(1), "red")                          # autosave fails; the change is kept
    assert a.concepts(neuron_key(1)) == ("red",) and a.unsaved
    assert "Could not save" in a.save_error and "'\\udc80'" in a.save_error
    assert None in heard
    assert os.listdir(tmp_path) == []                    # no file, no temporary file
    with pytest.raises(AnnotationError, match="kept in memory"):
        a.save()
    a.signature["classes"] = ["a", "b"]
    a.add(neuron_key(2), "blue")                         # the next save that works writes all
    assert a.save_error is None and not a.unsaved
    assert as_sets(Annotations.load(tmp_path / "c.json")) == as_sets(a)


def test_two_stores_saving_one_file_at_once_lose_no_concept(tmp_path, monkeypatch):
    """Two kernels with a store each on one file: the check 'changed on disk?' and the rename
    are one step under the folder's lock, so the second writer is told of the first's save
    (a conflict) instead of writing over it; its merge then keeps both concepts."""
    path = tmp_path / "c.json"
    Annotations(path).add(neuron_key(0), "seed")
    a, b = Annotations(path), Annotations(path)
    fsync = os.fsync

    def slow_fsync(fd):                    # a slow disk: each save takes 0.2 s to reach it
        time.sleep(0.2)
        fsync(fd)
    monkeypatch.setattr(os, "fsync", slow_fsync)
    ta = threading.Thread(target=a.add, args=(neuron_key(1), "from a"))
    tb = threading.Thread(target=lambda: (time.sleep(0.05), b.add(neuron_key(2), "from b")))
    ta.start()
    tb.start()
    ta.join()
    tb.join()
    monkeypatch.setattr(os, "fsync", fsync)
    refused = [s for s in (a, b) if s.save_error is not None]
    assert len(refused) == 1 and "changed on disk" in refused[0].save_error
    refused[0].merge(path)
    on_disk = Annotations.load(path)
    assert {k: on_disk.concepts(k) for k in on_disk.keys()} == {
        neuron_key(0): ("seed",), neuron_key(1): ("from a",), neuron_key(2): ("from b",)}


def test_fields_the_format_does_not_know_are_written_back(tmp_path):
    path = tmp_path / "c.json"
    doc = _valid_doc(version=2, description="colour neurons, checked by Ana",
                     neurons=[{"neuron": 2, "concepts": ["red"], "comment": "strong"}])
    path.write_text(json.dumps(doc))
    store = Annotations(path, signature=SIG)
    store.add(neuron_key(3), "blue")                           # autosaved
    saved = json.loads(path.read_text())
    assert saved["description"] == "colour neurons, checked by Ana"
    assert saved["neurons"] == [{"neuron": 2, "concepts": ["red"], "comment": "strong"},
                                {"neuron": 3, "concepts": ["blue"]}]
    # a hand edit of the file's fields is newer than this store's: merge takes it in
    edited = dict(saved, description="checked twice")
    edited["neurons"][1]["comment"] = "weak"
    path.write_text(json.dumps(edited))
    store.merge(path)
    copy = store.save(tmp_path / "copy.json")
    again = json.loads(copy.read_text())
    assert again["description"] == "checked twice"
    assert [n.get("comment") for n in again["neurons"]] == ["strong", "weak"]
    # another file's fields do not replace this store's own
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_valid_doc(version=2, description="theirs", units=[])))
    store.merge(other)
    assert json.loads(path.read_text())["description"] == "checked twice"


def test_a_version_1_files_unknown_fields_follow_its_columns_to_their_feature_keys(tmp_path):
    """check() changes nothing (the units and their comments are written back as units);
    bind() reads a column's units as its feature, with every instance's comment kept."""
    sig = {"model": "m", "modalities": ["img", "tab"], "classes": ["a", "b"], "neurons": 4,
           "features": {"tab": ["age", "height"]}}
    dataset = {"name": "d", "instances": 3}
    doc = {"format": "multiviz-annotations", "version": 1, "model": None, "dataset": dataset,
           "neurons": [], "units": [
               {"instance": i, "modality": "tab", "unit": 1, "concepts": ["tall"],
                "comment": f"note {i}"} for i in (0, 1)]}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    store = Annotations(path)
    store.check(sig, dataset)
    store.add(neuron_key(0), "red")
    saved = json.loads(path.read_text())
    assert saved["version"] == 1 and [u["comment"] for u in saved["units"]] == ["note 0",
                                                                                 "note 1"]
    store.bind(sig, dataset=dataset)
    store.add(neuron_key(1), "blue")
    saved = json.loads(path.read_text())
    assert saved["version"] == 2 and saved["units"] == []
    assert saved["features"] == [{"modality": "tab", "unit": 1, "concepts": ["tall"],
                                  "comment": ["note 0", "note 1"]}]


def test_a_file_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "c.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(_valid_doc()).encode())
    assert Annotations.load(path).concepts(neuron_key(2)) == ("red",)


def test_a_new_file_gets_the_permissions_the_umask_gives(tmp_path):
    old = os.umask(0o077)
    try:
        Annotations(tmp_path / "private.json").add(neuron_key(0), "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o444, 0o464])      # nobody may write; its owner may not
def test_a_write_protected_file_is_not_replaced_and_the_concepts_are_kept(tmp_path, mode):
    path = tmp_path / "c.json"
    store = Annotations(path)
    store.add(neuron_key(0), "red")
    before = path.read_bytes()
    path.chmod(mode)
    store.add(neuron_key(1), "blue")
    assert path.read_bytes() == before
    assert "write-protected" in store.save_error and "kept in memory" in store.save_error
    assert store.concepts(neuron_key(1)) == ("blue",) and store.unsaved
    path.chmod(0o644)
    store.save()
    assert store.save_error is None
    assert Annotations.load(path).concepts(neuron_key(1)) == ("blue",)


def test_the_lock_file_gets_the_files_permissions_so_a_group_can_share_it(tmp_path):
    path = tmp_path / "c.json"
    store = Annotations(path)
    store.add(neuron_key(0), "red")
    os.unlink(tmp_path / ".c.json.lock")
    path.chmod(0o660)                                   # a group shares the file
    store.add(neuron_key(1), "blue")
    assert stat.S_IMODE((tmp_path / ".c.json.lock").stat().st_mode) == 0o660


# -- bounds, hostile files, locks, viewers' checks, notes, plain values -----------------------
class _Counted(str):
    """A concept that counts the comparisons made with it: a measure of the work of a dedupe
    or a merge that does not depend on how busy the machine is."""
    compared = 0

    def __eq__(self, other):
        _Counted.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_a_keys_concepts_are_joined_in_linear_work_however_many_there_are(tmp_path,
                                                                           monkeypatch):
    """Concepts are deduplicated through a dict, not a list's ``in``: at the bound of a key's
    concepts (MAX_CONCEPTS_PER_KEY), a set, a file's entries of one key and a merge each compare
    a few concepts per concept, where a list's ``in`` made hundreds of thousands of
    comparisons (28 s to open a 614 KB file, 19 s per add)."""
    import multiviz_widgets.annotations as an
    real = an.tidy_concept
    monkeypatch.setattr(an, "tidy_concept", lambda text, *a, **k: _Counted(real(text, *a, **k)))
    n = an.MAX_CONCEPTS_PER_KEY
    names = [f"c{i}" for i in range(n)]

    def comparisons(work) -> int:
        _Counted.compared = 0
        work()
        return _Counted.compared
    a = Annotations(signature=SIG)
    assert comparisons(lambda: a.set(neuron_key(0), names)) < 5 * n
    assert a.concepts(neuron_key(0)) == tuple(names)
    a.remove(neuron_key(0), "c7")
    assert comparisons(lambda: a.add(neuron_key(0), "c7")) < 5 * n   # back, last
    path = tmp_path / "c.json"                     # one key in two entries: joined, in order
    path.write_text(json.dumps(_valid_doc(version=2, units=[], neurons=[
        {"neuron": 1, "concepts": names[:600]}, {"neuron": 1, "concepts": names[400:]}])))
    loaded = []
    assert comparisons(lambda: loaded.append(Annotations.load(path))) < 5 * n
    assert loaded[0].concepts(neuron_key(1)) == tuple(names)
    mine = store_with({neuron_key(2): names[:500]})
    theirs = store_with({neuron_key(2): names[250:750]})
    assert comparisons(lambda: mine.merge(theirs)) < 5 * n
    assert mine.concepts(neuron_key(2)) == tuple(names[:750])


def test_more_concepts_than_a_key_can_have_are_refused_at_once(tmp_path):
    """A file or an edit beyond MAX_CONCEPTS_PER_KEY is refused, with what to do, as soon as
    the bound is passed: a file of 100,000 concepts of one neuron (a minute to open before)
    is refused in well under a second; so is a file that names one neuron 100,000 times."""
    import multiviz_widgets.annotations as an
    n = an.MAX_CONCEPTS_PER_KEY
    for name, entries in (
            ("one_entry", [{"neuron": 0, "concepts": [f"c{i}" for i in range(100_000)]}]),
            ("one_key_per_entry", [{"neuron": 0, "concepts": [f"c{i}"]}
                                   for i in range(100_000)])):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(_valid_doc(version=2, units=[], neurons=entries)))
        raw = path.read_bytes()
        start = time.monotonic()
        with pytest.raises(AnnotationError) as e:
            Annotations(path, signature=SIG)
        assert time.monotonic() - start < 10                     # linear: ~0.1 s
        said = str(e.value)
        assert "('neuron', 0)" in said and f"more than {n} concepts" in said
        assert "remove the others from the file" in said and "It was not changed" in said
        assert len(said) < 1000                        # the entry quoted, not the whole list
        assert path.read_bytes() == raw
    a = Annotations(tmp_path / "c.json", signature=SIG)
    a.set(neuron_key(1), [f"c{i}" for i in range(n)])
    with pytest.raises(AnnotationError, match=rf"\('neuron', 1\) would have more than {n} "
                                              rf"concepts.*remove some first"):
        a.add(neuron_key(1), "one more")
    with pytest.raises(AnnotationError, match=f"more than {n} concepts"):
        a.set(neuron_key(2), [f"c{i}" for i in range(n + 1)])
    assert len(a.concepts(neuron_key(1))) == n and neuron_key(2) not in a
    other = store_with({neuron_key(1): ["theirs"]})
    with pytest.raises(AnnotationError, match="nothing was merged; remove some"):
        a.merge(other)
    assert "theirs" not in a.concepts(neuron_key(1))


@pytest.mark.parametrize("text, says", [
    ('{"format": "multiviz-annotations", "version": 2, "x": ' + "[" * 100_000
     + "]" * 100_000 + "}", "nested deeper than Python can read"),
    ('{"format": "multiviz-annotations", "version": 2, "neurons": [{"neuron": ' + "9" * 5000
     + ', "concepts": ["x"]}]}', r"a value in it cannot be read: Exceeds the limit"),
    ("", "is empty"), (" \n", "is empty"), ("\ufeff", "is empty"),
])
def test_a_hostile_or_empty_file_gives_an_annotation_error_and_is_left_as_it_is(tmp_path, text,
                                                                                says):
    """Whatever the bytes (JSON nested 100,000 deep, a number of 5,000 digits), opening or
    merging a file raises an AnnotationError that says what is wrong and what to do; never a
    RecursionError or a bare ValueError (whose advice was to raise Python's digit limit)."""
    path = tmp_path / "c.json"
    path.write_text(text, encoding="utf-8")
    raw = path.read_bytes()
    for read in (lambda: Annotations(path), lambda: Annotations.load(path),
                 lambda: Annotations.open(path), lambda: Annotations().merge(path)):
        with pytest.raises(AnnotationError, match=says) as e:
            read()
        assert "not changed" in str(e.value)
        assert "set_int_max_str_digits" not in str(e.value)
    assert path.read_bytes() == raw
    if "empty" in says:           # the advice works: the smallest file it names opens
        assert "delete it" in str(e.value)
        path.write_text(re.search(r"(\{.*\}) in it", str(e.value)).group(1))
        Annotations(path).add(neuron_key(0), "red")
        assert Annotations.load(path).concepts(neuron_key(0)) == ("red",)


def test_a_file_nested_past_the_limit_is_refused_with_its_field_named(tmp_path):
    """A field nested 991 deep was read (Python could), taken in by a merge, and then made
    every later save of the user's own file fail, and its reading depend on the depth of the
    call stack. A fixed limit refuses it, whatever the stack, and names the field."""
    from multiviz_widgets.annotations import MAX_NESTING
    head = '{"format": "multiviz-annotations", "version": 2, "neurons": [{"neuron": 2, ' \
           '"concepts": ["theirs"]}], "x": '
    theirs, mine = tmp_path / "theirs.json", tmp_path / "mine.json"
    theirs.write_text(head + "[" * (MAX_NESTING + 5) + "]" * (MAX_NESTING + 5) + "}")
    own = Annotations(mine)
    own.add(neuron_key(1), "mine")
    for read in (lambda: Annotations.load(theirs), lambda: own.merge(theirs)):
        with pytest.raises(AnnotationError, match=r"its field 'x' nests lists or objects "
                                                  rf"within each other more than {MAX_NESTING}"):
            read()
    assert own.concepts(neuron_key(2)) == () and not own.save_error
    theirs.write_text(head + "[" * (MAX_NESTING - 2) + "]" * (MAX_NESTING - 2) + "}")
    assert own.merge(theirs) == 1 and not own.save_error      # within it: taken, and saved
    assert Annotations.load(mine).concepts(neuron_key(2)) == ("theirs",)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_pipe_a_device_or_an_oversized_file_is_refused_before_it_is_read(tmp_path,
                                                                          monkeypatch):
    """A concepts "file" that is a named pipe froze the kernel (reading waits for a writer),
    and one linked to /dev/zero read until memory ran out; one of a million entries took 18 s
    and a GB. Each is refused at once, saying what it is."""
    import threading

    import multiviz_widgets.annotations as mod
    pipe = tmp_path / "pipe.json"
    os.mkfifo(pipe)
    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")
    for path, says in ((pipe, "not a file but a named pipe"),
                       (zero, "not a file but a character device")):
        got = []
        reader = threading.Thread(target=lambda: got.append(_error_of(Annotations.load, path)),
                                  daemon=True)
        reader.start()
        reader.join(20)
        assert not reader.is_alive(), f"reading {path} hangs"
        assert says in got[0] and "not read nor changed" in got[0], got
    big = tmp_path / "big.json"
    big.write_text('{"format": "multiviz-annotations", "version": 2, "neurons": []}' + " " * 200)
    monkeypatch.setattr(mod, "MAX_FILE_BYTES", 100)
    with pytest.raises(AnnotationError, match=r"holds over 0 MB, more than an annotations"):
        Annotations.load(big)
    monkeypatch.undo()
    # a store never writes a file it could not read back: the save is refused, kept in memory
    own = tmp_path / "own.json"
    store = Annotations(own)
    store.add(neuron_key(1), "short")
    before = own.read_bytes()
    monkeypatch.setattr(mod, "MAX_FILE_BYTES", len(before) + 20)
    store.add(neuron_key(2), "x" * 150)
    assert "more than an annotations file may hold" in store.save_error
    assert own.read_bytes() == before and store.concepts(neuron_key(2)) == ("x" * 150,)
    monkeypatch.undo()
    assert len(Annotations.load(big)) == 0
    store.save()
    assert Annotations.load(own).concepts(neuron_key(2)) == ("x" * 150,)


def _error_of(fn, *args) -> str:
    try:
        fn(*args)
    except AnnotationError as e:
        return str(e)
    return "no error"


def test_an_explorer_given_a_hostile_file_says_so(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"format": "multiviz-annotations", "version": 2, "x": ' + "[" * 50_000
                    + "]" * 50_000 + "}")
    adapter, ds = tiny_vqa()
    with pytest.raises(AnnotationError, match="nested deeper"):
        Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05, annotations=path, start=False)


_HOLD_LOCK = """
import fcntl, os, select, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("held", flush=True)
select.select([sys.stdin], [], [], 20)      # until told, or for 20 s at most
"""


@pytest.mark.skipif(os.name != "posix", reason="fcntl locks: POSIX only")
def test_a_lock_held_by_another_process_blocks_no_read_and_fails_into_save_error(tmp_path,
                                                                              monkeypatch):
    """Another kernel stalled while it holds the file's lock: this store is read as usual
    meanwhile (the lock is waited for with no lock of the store held), and the save gives up
    after ``lock_timeout`` seconds into ``save_error``, naming the lock file; the change is
    kept, and the next save once the lock is free writes it."""
    import subprocess
    import sys

    from multiviz_widgets.atomic_file import LockTimeout, file_lock
    monkeypatch.setattr(Annotations, "lock_timeout", 2.0)
    path = tmp_path / "c.json"
    store = Annotations(path)
    store.add(neuron_key(0), "red")
    lock = tmp_path / ".c.json.lock"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(lock)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        edit = threading.Thread(target=store.add, args=(neuron_key(1), "blue"))
        edit.start()
        time.sleep(0.3)                               # the edit's save waits for the lock
        assert edit.is_alive()
        assert store.concepts(neuron_key(0)) == ("red",)    # not held up by the wait
        assert store.keys() == [neuron_key(0), neuron_key(1)]
        assert edit.is_alive()                       # still waiting: the read did not wait
        edit.join(30)
        assert not edit.is_alive()
        assert store.unsaved and str(lock) in store.save_error
        assert "kept in memory" in store.save_error and "fuser" in store.save_error
        with pytest.raises(LockTimeout, match=re.escape(str(lock))):
            with file_lock(path, timeout=0.2):
                pass
    finally:
        holder.communicate("\n", timeout=30)          # the other kernel lets go
    store.add(neuron_key(2), "green")
    assert store.save_error is None and not store.unsaved
    assert as_sets(Annotations.load(path)) == {neuron_key(0): {"red"}, neuron_key(1): {"blue"},
                                               neuron_key(2): {"green"}}


def _hold_file_lock(path, until: threading.Event) -> threading.Thread:
    """Another thread of this kernel saving ``path``: it holds the file's locks until told."""
    from multiviz_widgets.atomic_file import file_lock
    held = threading.Event()

    def hold():
        with file_lock(path):
            held.set()
            until.wait(30)
    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)
    return holder


def test_a_save_that_waits_for_another_thread_of_the_kernel_says_so(tmp_path, monkeypatch):
    """The lock of this process (not the file's) timed out: the message blamed "another
    program, stopped or hung" and sent the user to fuser, which shows only this kernel."""
    from multiviz_widgets.atomic_file import LockTimeout, file_lock
    monkeypatch.setattr(Annotations, "lock_timeout", 0.3)
    path = tmp_path / "c.json"
    store = Annotations(path)
    release = threading.Event()
    holder = _hold_file_lock(path, release)
    try:
        store.add(neuron_key(0), "red")
        assert store.unsaved and "another thread of this kernel is still saving" in (
            store.save_error)
        assert "kept in memory" in store.save_error
        assert "fuser" not in store.save_error and "another program" not in store.save_error
        with pytest.raises(LockTimeout) as e:
            with file_lock(path, timeout=0.1):
                pass
        assert e.value.in_process and "another thread of this process" in str(e.value)
    finally:
        release.set()
        holder.join(30)
    store.add(neuron_key(1), "blue")
    assert store.save_error is None and not store.unsaved


def test_a_save_builds_the_document_again_only_when_it_changed_while_it_waited(tmp_path,
                                                                             monkeypatch):
    """Each save built the document twice (before the file's lock, and under it to compare);
    a count of the store's changes now says whether the one built first is still the newest."""
    built = []
    document = Annotations._document
    monkeypatch.setattr(Annotations, "_document",
                        lambda self: built.append(1) or document(self))
    path = tmp_path / "c.json"
    store = Annotations(path, autosave=False)
    store.add(neuron_key(0), "red")
    store.save()
    assert len(built) == 1

    def change_while_saving(change) -> None:
        built.clear()
        release = threading.Event()
        holder = _hold_file_lock(path, release)
        saver = threading.Thread(target=store.save)
        try:
            saver.start()
            time.sleep(0.2)                           # the save built its text and waits
            assert saver.is_alive() and len(built) == 1
            change()
        finally:
            release.set()
            holder.join(30)
        saver.join(30)
        assert len(built) == 2 and store.save_error is None and not store.unsaved
    change_while_saving(lambda: store.add(neuron_key(1), "blue"))
    assert as_sets(Annotations.load(path)) == {neuron_key(0): {"red"}, neuron_key(1): {"blue"}}
    # set by hand (as the advice for an edited dataset says): no count sees it, the check does
    change_while_saving(lambda: setattr(store, "dataset", {"name": "mine", "instances": 10}))
    assert json.loads(path.read_text())["dataset"] == {"name": "mine", "instances": 10}


def test_merge_runs_the_viewers_key_checks_outside_the_lock(tmp_path):
    """A key a merge (or an open of a file changed on disk) brings in is checked by the viewers'
    checks (``add_key_check``) as an add's is: a colleague's unit that the instance does not
    have is refused, nothing is merged or saved, and the message says where it is and what to
    do. The check runs with the store's lock free (another thread reads the store meanwhile)."""
    path = tmp_path / "mine.json"
    store = Annotations.open(path, signature=SIG)
    store.add(neuron_key(0), "red")
    saved = path.read_bytes()
    read_meanwhile = []

    def check(key):                   # another thread reads the store while it runs
        reader = threading.Thread(target=lambda: len(store))
        reader.start()
        reader.join(5)
        read_meanwhile.append(not reader.is_alive())
        if key[0] == "unit" and key[3] >= 4:
            raise AnnotationError(f"{key} names no unit: instance {key[1]} has 4 units there; "
                                  f"name a unit that the instance has.")
    store.add_key_check(check)
    theirs = tmp_path / "colleague.json"
    theirs.write_text(json.dumps(_valid_doc(version=2, neurons=[], units=[
        {"instance": 0, "modality": "image", "unit": 9999, "concepts": ["ghost"]}])))
    with pytest.raises(AnnotationError) as e:
        store.merge(theirs)
    said = str(e.value)
    assert "names no unit" in said and str(theirs) in said and "nothing was merged" in said
    assert "correct or remove that entry" in said
    assert store.keys() == [neuron_key(0)] and path.read_bytes() == saved
    assert read_meanwhile and all(read_meanwhile) and not store.unsaved
    edited = json.loads(path.read_text())             # another kernel writes one in the file
    edited["units"] = [{"instance": 1, "modality": "image", "unit": 50, "concepts": ["x"]}]
    path.write_text(json.dumps(edited))
    with pytest.raises(AnnotationError, match="names no unit"):     # nor through open
        Annotations.open(path, signature=SIG)
    assert store.keys() == [neuron_key(0)]
    theirs.write_text(json.dumps(_valid_doc(version=2, neurons=[], units=[
        {"instance": 0, "modality": "image", "unit": 3, "concepts": ["circle"]}])))
    assert store.merge(theirs) == 1                  # a unit the check takes comes in
    assert store.concepts(unit_key(0, "image", 3)) == ("circle",)


def test_an_entry_without_concepts_keeps_its_notes_and_names_nothing(tmp_path):
    """Fields this format does not know are written back, those of an entry with no concepts
    too (a colleague's "comment": "TODO" on a neuron not named yet; a key whose last concept
    was removed): the entry stays in the file, and shows as no concept anywhere."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps(_valid_doc(version=2, units=[], neurons=[
        {"neuron": 0, "concepts": ["red"], "comment": "kept"},
        {"neuron": 3, "concepts": [], "comment": "TODO: name this one"}])))
    store = Annotations(path, signature=SIG)
    assert store.keys() == [neuron_key(0)] and neuron_key(3) not in store
    assert store.concepts(neuron_key(3)) == () and len(store) == 1
    store.add(neuron_key(1), "blue")                            # autosaved
    assert json.loads(path.read_text())["neurons"] == [
        {"neuron": 0, "concepts": ["red"], "comment": "kept"},
        {"neuron": 1, "concepts": ["blue"]},
        {"neuron": 3, "concepts": [], "comment": "TODO: name this one"}]
    store.remove(neuron_key(0), "red")                          # its last concept
    assert store.keys() == [neuron_key(1)] and store.find("red") == []
    saved = json.loads(path.read_text())["neurons"]
    assert saved[0] == {"neuron": 0, "concepts": [], "comment": "kept"}
    store.add(neuron_key(3), "green")
    assert json.loads(path.read_text())["neurons"][-1] == {
        "neuron": 3, "concepts": ["green"], "comment": "TODO: name this one"}
    assert Annotations.load(path).keys() == [neuron_key(1), neuron_key(3)]


def test_numpy_values_of_a_signature_are_made_plain_and_what_json_cannot_hold_is_said(tmp_path):
    """A count from an array (np.int64) in a signature given by code is saved as a number; a
    value no JSON file can hold is refused where it is given, and one put there later fails
    the save into ``save_error`` (the change kept), not into an exception of the add."""
    import numpy as np
    path = tmp_path / "c.json"
    store = Annotations(path, signature=dict(SIG, neurons=np.int64(8)),
                        dataset={"name": np.str_("mine"), "instances": np.int64(10)})
    store.add(unit_key(2, "image", 3), "circle")
    assert store.save_error is None
    saved = json.loads(path.read_text())
    assert saved["dataset"] == {"name": "mine", "instances": 10}
    assert saved["model"]["neurons"] == 8 and type(store.n_instances) is int
    with pytest.raises(AnnotationError, match=r"dataset signature.*\"instances\" must be a "
                                              r"whole number.*int\(n\)"):
        Annotations(dataset={"name": "d", "instances": 10.5})
    with pytest.raises(AnnotationError, match="a JSON file cannot hold.*int\\(n\\), str"):
        Annotations(signature=dict(SIG, note=object()))
    with pytest.raises(AnnotationError, match="model signature"):
        store.bind(dict(SIG, classes=[1, 2]))
    heard = []
    store.observe(heard.append)
    store.dataset = {"name": "mine", "instances": 10, "when": object()}    # set by hand
    assert store.add(neuron_key(1), "blue") == ("blue",)          # no exception: kept
    assert store.unsaved and "a JSON file cannot hold" in store.save_error
    assert "store.dataset" in store.save_error and None in heard
    store.dataset = {"name": "mine", "instances": 10}
    store.save()
    assert store.save_error is None
    assert Annotations.load(path).concepts(neuron_key(1)) == ("blue",)


def test_a_write_is_made_durable_by_flushing_its_folder_too(tmp_path, monkeypatch):
    """After the rename, the folder is flushed (fsync), so that a power loss cannot bring the
    old file back; where a folder cannot be flushed, the write stands."""
    from multiviz_widgets.atomic_file import write_atomically
    synced = []
    fsync = os.fsync

    def recording(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        fsync(fd)
    monkeypatch.setattr(os, "fsync", recording)
    write_atomically(tmp_path / "f.txt", lambda f: f.write("x"), binary=False)
    assert synced == [False, True]                    # the file, then its folder

    def failing(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")
        fsync(fd)
    monkeypatch.setattr(os, "fsync", failing)
    write_atomically(tmp_path / "f.txt", lambda f: f.write("y"), binary=False)
    assert (tmp_path / "f.txt").read_text() == "y"


_KILLED_SAVE = """
import sys, time
import multiviz_widgets.annotations as an
real = an.write_atomically

def slow(path, write, **kw):
    def w(f):
        f.write(b"{"); f.flush(); print("writing", flush=True); time.sleep(60); write(f)
    return real(path, w, **kw)
an.write_atomically = slow
an.Annotations(sys.argv[1]).add(("neuron", 2), "being saved")
"""


@pytest.mark.skipif(os.name != "posix", reason="fcntl locks and SIGKILL: POSIX only")
def test_the_next_save_removes_the_temporary_file_a_killed_save_left_and_no_other(
        tmp_path, monkeypatch):
    """A save killed while it wrote left its hidden temporary file (.c.json.XXXXXXXX.tmp) in
    the folder for ever. A later save removes it once it is older than any save takes (10 min):
    a younger one may be another process's save in progress, which may write without the lock
    (a lock file it cannot open); the temporary files of other files, and other files, stay."""
    import signal
    import subprocess
    import sys
    path = tmp_path / "c.json"
    store = Annotations(path, signature=SIG)
    store.add(neuron_key(1), "saved before")
    killed = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(path)],
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert killed.stdout.readline() == "writing\n"
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.communicate(timeout=30)
    left = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert len(left) == 1 and left[0].startswith(".c.json.")
    others = [".d.json.abcdefgh.tmp", ".c.json.bak.abcdefgh.tmp", "c.json.tmp", "notes.txt"]
    for name in others:
        (tmp_path / name).write_text("theirs")
        os.utime(tmp_path / name, (time.time() - 7200, time.time() - 7200))
    store.add(neuron_key(2), "soon after")       # the killed save's file is young: it stays
    assert store.save_error is None and (tmp_path / left[0]).exists()
    os.utime(tmp_path / left[0], (time.time() - 700, time.time() - 700))
    store.add(neuron_key(3), "after")                     # a save 10 min later
    assert store.save_error is None
    assert sorted(os.listdir(tmp_path)) == sorted([".c.json.lock", "c.json"] + others)
    assert as_sets(Annotations.load(path)) == {neuron_key(1): {"saved before"},
                                               neuron_key(2): {"soon after"},
                                               neuron_key(3): {"after"}}
    # a lock file that cannot be locked (a file system without locks): the same rule
    import multiviz_widgets.atomic_file as atomic_file

    def no_lock_file(_):
        raise OSError(37, "No locks available")
    monkeypatch.setattr(atomic_file, "_open_lock_file", no_lock_file)
    young, old = tmp_path / ".c.json.young123.tmp", tmp_path / ".c.json.old45678.tmp"
    young.write_text("{")
    old.write_text("{")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    store.add(neuron_key(4), "unlocked")
    assert store.save_error is None and young.exists() and not old.exists()


def test_set_and_merge_refuse_what_they_cannot_take_with_an_annotation_error(tmp_path):
    """set(key, None) raised "'NoneType' object is not iterable" and merge(42) pathlib's
    TypeError; set(key, []) removes the key's concepts."""
    a = Annotations()
    a.set(("neuron", 5), ["red shapes"])
    for bad in (None, 7):
        with pytest.raises(AnnotationError, match=r"Concepts are a list of strings, got "
                                                  rf"{bad}.*set\(key, \[\]\) to remove"):
            a.set(("neuron", 5), bad)
    assert a.concepts(("neuron", 5)) == ("red shapes",)
    assert a.set(("neuron", 5), []) == () and ("neuron", 5) not in a
    for bad, shown in ((42, "int 42"), ({"format": "multiviz-annotations"}, "dict {'format'")):
        with pytest.raises(AnnotationError, match=r"merge takes a store \(an Annotations\) or "
                                                  rf"the path of an annotations file, got {shown}"):
            a.merge(bad)
    other = Annotations()
    other.add(("neuron", 1), "blue")
    assert a.merge(other) == 1 and a.concepts(("neuron", 1)) == ("blue",)


def test_concepts_that_differ_in_case_or_spaces_are_one_concept_everywhere(tmp_path):
    """One neuron kept "red shapes", "Red Shapes" and "red\\u00a0shapes" (pasted from a web
    page) as three concepts; find() folded case but not spaces, and remove() needed the exact
    case, so a rename loop over find() failed half-way with the file half renamed."""
    a = Annotations(tmp_path / "c.json")
    for spelling in ("red shapes", "Red Shapes", "red\u00a0shapes", " red \u2003 shapes "):
        a.add(neuron_key(1), spelling)
    assert a.concepts(neuron_key(1)) == ("red shapes",)
    a.add(neuron_key(4), "Red  shapes")
    a.add(neuron_key(7), "red\u00a0Shapes")
    assert a.concepts(neuron_key(4)) == ("Red shapes",)       # its own case kept
    assert a.find("RED SHAPES") == [neuron_key(1), neuron_key(4), neuron_key(7)]
    assert a.remove(neuron_key(4), "red shapes") == ()
    a.add(neuron_key(4), "Red shapes")
    a.add(neuron_key(7), "round")
    assert a.rename("red shapes", "red things") == [neuron_key(1), neuron_key(4), neuron_key(7)]
    saved = Annotations.load(tmp_path / "c.json")
    assert saved.concepts(neuron_key(7)) == ("red things", "round")
    assert saved.find("red shapes") == [] and len(saved.find("red things")) == 3
    a.add(neuron_key(2), "round")
    a.add(neuron_key(2), "circle")
    with pytest.raises(AnnotationError, match="'Round' is a concept already"):
        a.rename("circle", "Round")                             # would join two concepts
    assert a.rename("circle", "Round", merge=True) == [neuron_key(2)]   # once, in its place
    assert a.concepts(neuron_key(2)) == ("round",)
    with pytest.raises(AnnotationError, match="No key has the concept 'square'"):
        a.rename("square", "box")
    with pytest.raises(AnnotationError, match="only spaces"):
        a.rename("round", "   ")
    assert Annotations.load(tmp_path / "c.json").to_dict() == a.to_dict()


def test_merges_and_files_join_concepts_under_the_same_rule_as_add(tmp_path):
    """A conflict merge kept 'red shapes' and 'Red  Shapes' on one key (and saved both), and
    remove() of one then removed both; two entries of a key in a file, and a version-1 file's
    column concepts put together, kept 'Tall' and 'tall' as two."""
    path = tmp_path / "c.json"
    a = Annotations(path)
    a.add(neuron_key(1), "shape")
    b = Annotations(path)                                 # another kernel's store
    a.add(neuron_key(1), "red shapes")
    b.add(neuron_key(1), "Red  Shapes")
    assert b.save_conflict
    b.merge(path)
    assert b.concepts(neuron_key(1)) == ("shape", "Red Shapes") and not b.save_error
    c, d = Annotations(), Annotations()
    c.add(neuron_key(2), "Circle")
    d.add(neuron_key(2), "circle")
    assert c.merge(d) == 0 and c.concepts(neuron_key(2)) == ("Circle",)
    doc = {"format": "multiviz-annotations", "version": 2, "model": None, "dataset": None,
           "neurons": [{"neuron": 3, "concepts": ["Tall"]}, {"neuron": 3, "concepts": ["tall"]}],
           "units": [], "features": []}
    (tmp_path / "two.json").write_text(json.dumps(doc))
    assert Annotations.load(tmp_path / "two.json").concepts(neuron_key(3)) == ("Tall",)
    v1 = {"format": "multiviz-annotations", "version": 1, "model": None, "dataset": None,
          "neurons": [], "units": [{"instance": 0, "modality": "vitals", "unit": 1,
                                    "concepts": ["Tall"]},
                                   {"instance": 1, "modality": "vitals", "unit": 1,
                                    "concepts": ["tall", "big"]}]}
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    adapter, _ = tiny_tab_series()
    old = Annotations.load(tmp_path / "v1.json", signature=model_signature(adapter))
    assert old.concepts(feature_key("vitals", 1)) == ("Tall", "big")
