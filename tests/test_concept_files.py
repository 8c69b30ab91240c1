"""Concept annotation files that people edit by hand and pass around: a field written twice,
two entries of one key, a file made for another model of the same shape, a path whose folder
is not there; and a refused concept whose answer comes after the row moved elsewhere."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import warnings

import pytest
import torch

from multiviz_widgets.annotations import AnnotationError, Annotations, key_name, neuron_key
from multiviz_widgets.explorer import Explorer

from .explorer_support import FakeKernels, tiny_vqa
from .test_annotations import as_sets

SIG = {"model": "m", "modalities": ["image", "question"], "classes": ["a", "b"], "neurons": 8}
HEAD = '"format": "multiviz-annotations", "version": 2'


def _explorer(annotations):
    adapter, ds = tiny_vqa()
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05, annotations=annotations)
    assert ex.wait(60)
    return ex


def _explorer_naming(path, neuron: int, concept: str):
    """(An Explorer on ``path``, its concepts row) after the row named ``neuron`` ``concept``,
    as typed (closed again if that fails)."""
    ex = _explorer(str(path))
    try:
        ex.select(neuron=neuron)
        ex.concepts_view.neuron_tags.edit("add", concept)
    except BaseException:
        ex.close()
        raise
    return ex, ex.concepts_view


# -- a field written twice --------------------------------------------------------------------
@pytest.mark.parametrize("text, twice", [
    # two files pasted together, or a merge conflict resolved by keeping both sides
    (f'{{{HEAD}, "neurons": [{{"neuron": 1, "concepts": ["mine"]}}], '
     f'"neurons": [{{"neuron": 2, "concepts": ["theirs"]}}]}}', "neurons"),
    (f'{{{HEAD}, "units": [], "units": [{{"instance": 0, "modality": "image", "unit": 1, '
     f'"concepts": ["x"]}}]}}', "units"),
    (f'{{{HEAD}, "features": [], "features": []}}', "features"),
    # within an entry: which neuron is meant cannot be told
    (f'{{{HEAD}, "neurons": [{{"neuron": 1, "neuron": 2, "concepts": ["red"]}}]}}', "neuron"),
    (f'{{{HEAD}, "neurons": [{{"neuron": 1, "concepts": ["a"], "concepts": ["b"]}}]}}',
     "concepts"),
    (f'{{{HEAD}, "model": {{"model": "a", "model": "b"}}}}', "model"),
], ids=["neurons", "units", "features", "an entry's neuron", "an entry's concepts", "model"])
def test_a_file_with_a_field_written_twice_is_refused_and_left_as_it_is(tmp_path, text, twice):
    path = tmp_path / "c.json"
    path.write_text(text)
    for open_it in (lambda: Annotations(path), lambda: Annotations.load(path),
                    lambda: Annotations(signature=SIG).merge(path)):
        with pytest.raises(AnnotationError, match=f"the field '{twice}' appears more than once"):
            open_it()
    assert path.read_text() == text


def test_an_explorer_given_a_file_with_a_list_written_twice_stops_and_writes_nothing(tmp_path):
    path = tmp_path / "c.json"
    text = (f'{{{HEAD},\n "neurons": [{{"neuron": 1, "concepts": ["mine"]}}],\n'
            f' "neurons": [{{"neuron": 2, "concepts": ["theirs"]}}]}}\n')
    path.write_text(text)
    with pytest.raises(AnnotationError, match="'neurons' appears more than once.*not changed"):
        _explorer(str(path))
    assert path.read_text() == text


# -- two entries of one key -------------------------------------------------------------------
def test_two_entries_of_one_key_keep_every_value_their_fields_give(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({
        "format": "multiviz-annotations", "version": 2,
        "neurons": [{"neuron": 3, "concepts": ["red"], "comment": "Ana: fires on red squares",
                     "by": "lab"},
                    {"neuron": 3, "concepts": ["round"], "comment": "Bo: maybe circles",
                     "by": "lab"}]}))
    store = Annotations(path, signature=SIG)
    assert store.concepts(neuron_key(3)) == ("red", "round")
    store.add(neuron_key(3), "blue")                    # a save rewrites the file
    (entry,) = json.loads(path.read_text())["neurons"]
    assert entry["concepts"] == ["red", "round", "blue"]
    # both comments, in the file's order; a value the entries agree on, once
    assert entry["comment"] == ["Ana: fires on red squares", "Bo: maybe circles"]
    assert entry["by"] == "lab"


# -- a file made for another model of the same shape ------------------------------------------
def _made_for(tmp_path, **model) -> tuple:
    """A file with a neuron concept, made for ``SIG`` with ``model``'s fields changed."""
    path = tmp_path / "c.json"
    Annotations(path, signature={**SIG, **model}).add(neuron_key(3), "glucose detector")
    return path


@pytest.mark.parametrize("theirs, ours, says", [
    ({"model": "planted"}, {"model": "additive"},
     "made for model 'planted'; this is model 'additive': the neuron concepts may not fit"),
    ({"weights": "0123456789abcdef"}, {"weights": "fedcba9876543210"},
     "made for model 'm' (weights 0123456789ab); this is model 'm' (weights fedcba987654)"),
], ids=["another name", "other weights"])
def test_a_file_of_another_model_of_the_same_shape_is_taken_with_a_warning(tmp_path, theirs,
                                                                            ours, says):
    path = _made_for(tmp_path, **theirs)
    # a retrained or fine-tuned model may keep its concepts: taken, but said
    with pytest.warns(UserWarning, match=f"were {says}".replace("(", r"\(").replace(")", r"\)")):
        store = Annotations.load(path, signature={**SIG, **ours})
    assert store.concepts(neuron_key(3)) == ("glucose detector",)
    assert says in store.model_note
    # a store that read the file without a model learns of it when a viewer binds it
    plain = Annotations(path)
    assert plain.model_note is None
    with pytest.warns(UserWarning, match="the neuron concepts may not fit"):
        plain.bind({**SIG, **ours})
    assert says in plain.model_note
    # the model it was made for: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = Annotations.load(path, signature={**SIG, **theirs})
        same.bind({**SIG, **theirs})
    assert same.model_note is None


def test_the_concepts_row_says_when_the_file_was_made_for_another_model(tmp_path):
    path = tmp_path / "c.json"
    ex = _explorer(str(path))
    ex.annotations.add(neuron_key(1), "red shapes")
    ex.close()
    assert ex.concepts_view.state()["model_note"] == ""
    doc = json.loads(path.read_text())
    doc["model"]["model"] = "another-vqa"          # the same shape, another model's name
    path.write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match=f"The annotations in {path} were made for model "
                                         f"'another-vqa'; this is model 'TinyVQA'"):
        ex = _explorer(str(path))
    try:
        assert ex.annotations.concepts(neuron_key(1)) == ("red shapes",)   # not refused
        assert ex.concepts_view.state()["model_note"] == (
            "These concepts were made for model 'another-vqa'; this is model 'TinyVQA': the "
            "neuron concepts may not fit (check a few).")
    finally:
        ex.close()


# -- a path whose folder is not there ---------------------------------------------------------
def test_a_path_in_a_folder_that_is_not_there_is_refused_when_opened(tmp_path):
    path = tmp_path / "no_such_folder" / "concepts.json"
    for open_it in (lambda: Annotations(path), lambda: Annotations.open(path),
                    lambda: _explorer(str(path))):
        with pytest.raises(AnnotationError, match=f"the folder {path.parent} does not exist"):
            open_it()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(AnnotationError, match="is a file, not a folder"):
        Annotations(tmp_path / "a_file" / "concepts.json")
    assert not path.parent.exists() and (tmp_path / "a_file").read_text() == "x"


def test_a_path_under_a_file_says_to_correct_it_or_move_the_file_not_to_make_the_folder(
        tmp_path):
    """The advice was os.makedirs(folder), which fails (FileExistsError) where a file is."""
    results = tmp_path / "results"
    results.write_text("data")
    for path in (results / "c.json", results / "sub" / "c.json"):
        with pytest.raises(AnnotationError) as opened:
            Annotations(path)
        a = Annotations(signature=SIG)
        a.add(neuron_key(1), "x")
        with pytest.raises(NotADirectoryError) as saved:
            a.save(path)
        for says in (str(opened.value), str(saved.value)):
            assert "Correct the path" in says and "makedirs" not in says
            assert f"move or rename the file {results} (no folder can be made" in says
        assert a.path is None and a.concepts(neuron_key(1)) == ("x",)
    assert f"the folder {results / 'sub'} cannot be made: {results} is a file" in str(
        opened.value)
    assert results.read_text() == "data"


@pytest.mark.parametrize("name, says", [
    ("loop.json", "is a symbolic link that leads back to itself \\(a link loop\\)"),
    ("x" * 300 + ".json", "the name 'x+'... is 305 bytes long, more than the file system takes "
                          "for one name"),
    ("a\0.json", "holds a NUL character"),
], ids=["link loop", "name too long", "NUL"])
def test_a_path_no_file_can_have_gives_an_annotation_error_that_says_why(tmp_path, name, says):
    """A link loop, a name too long or a NUL byte raised RuntimeError, OSError or ValueError
    from every way of opening or saving; load() of a link loop said "No annotations file"."""
    (tmp_path / "loop.json").symlink_to("loop.json")
    path = tmp_path / name
    store = Annotations(signature=SIG)
    store.add(neuron_key(1), "red")
    before = sorted(os.listdir(tmp_path))
    for call in (lambda: Annotations(path), lambda: Annotations.open(path),
                 lambda: Annotations.load(path), lambda: store.save(path),
                 lambda: store.merge(path)):
        with pytest.raises(AnnotationError, match=says) as refused:
            call()
        assert "No annotations file" not in str(refused.value)
        assert isinstance(refused.value.__cause__, (RuntimeError, OSError, ValueError))
    assert sorted(os.listdir(tmp_path)) == before
    assert store.path is None and store.concepts(neuron_key(1)) == ("red",)


# -- a refused add answered after the row moved -------------------------------------------------
def test_a_refused_add_answered_after_the_row_moved_names_the_key_it_was_typed_for(tmp_path):
    ex = _explorer(None)
    try:
        cv, tags = ex.concepts_view, ex.concepts_view.neuron_tags
        ex.select(neuron=3)
        typed_for = tags.key                    # the key the browser sent with the text
        ex.select(neuron=5)                     # a click that reached the kernel first
        tags.edit("add", "x" * 201, key=typed_for)
        # the answer names its key: the browser puts the text back only into h3's input
        assert tags.last_answer == {"op": "answer", "key": typed_for, "text": "x" * 201,
                                    "taken": False}
        assert tags.key != typed_for
        assert cv.state()["message"].startswith("not taken for h3: A concept has at most 200")
        # refused for the key shown: the row takes the text back, no key said
        tags.edit("add", "y" * 201)
        assert tags.last_answer["key"] == tags.key
        assert cv.state()["message"].startswith("not taken: A concept has at most 200")
    finally:
        ex.close()


# -- a misspelled field ----------------------------------------------------------------------
def test_a_misspelled_top_level_field_is_kept_and_said_with_the_field_it_probably_means(
        tmp_path):
    """A hand edit that wrote "Neurons" or "unit" opened silently without those concepts."""
    path = tmp_path / "c.json"
    path.write_text("{" + HEAD + ', "Neurons": [{"neuron": 1, "concepts": ["red shapes"]}], '
                    '"unit": [{"instance": 0, "modality": "image", "unit": 3, "concepts": '
                    '["circle"]}], "Model": null, "description": "ours", "notes": "x", '
                    # fields kept on purpose, named after known ones: no typo
                    '"neurons_v1": [], "neurons2": [], "models": "x", "datasets": "y", '
                    '"versions": 1}')
    with pytest.warns(UserWarning) as said:
        a = Annotations(path, signature=SIG)
    texts = [str(w.message) for w in said]
    assert texts == [
        f"{path}: the field {field!r} is not one this format knows (did you mean {meant!r}?), "
        f"so {what}. It is kept in the file as it is; rename it to {meant!r} there{both}, then "
        f"open the file again."
        for field, meant, what, both in [
            ("Neurons", "neurons", "its entries were not read: none of their concepts are in "
                                   "the store",
             " (its entries joined to those of 'neurons' where the file has both)"),
            ("unit", "units", "its entries were not read: none of their concepts are in the "
                              "store",
             " (its entries joined to those of 'units' where the file has both)"),
            ("Model", "model", "it was not read", "")]]
    assert a.keys() == []
    a.add(neuron_key(2), "blue")                 # unknown fields are kept, written back
    doc = json.loads(path.read_text())
    assert doc["Neurons"] == [{"neuron": 1, "concepts": ["red shapes"]}]
    assert doc["unit"][0]["concepts"] == ["circle"] and doc["description"] == "ours"
    with pytest.warns(UserWarning) as merged:
        Annotations(signature=SIG).merge(path)
    assert [str(w.message) for w in merged] == texts


# -- a file copied over the store's file (an e-mailed copy saved over it) ---------------------
def test_a_file_copied_over_the_stores_file_is_joined_and_removes_none_of_its_concepts(tmp_path):
    """The three-way merge took the file as it was last read for the common base, so a
    colleague's file copied over it read as "they removed all of yours": merge (the row's
    button) and Annotations.open (a cell run again) deleted the student's concepts from memory
    and disk, and said only "took in 1 concept"."""
    path, teachers = tmp_path / "concepts.json", tmp_path / "teacher.json"
    Annotations(teachers, signature=SIG).add(neuron_key(1), "teacher: colour")
    mine = Annotations.open(path, signature=SIG)
    for j, c in [(2, "my circles"), (3, "my red"), (4, "my yes/no")]:
        mine.add(neuron_key(j), c)
    path.write_bytes(teachers.read_bytes())             # "Replace?" - yes
    mine.add(neuron_key(5), "my new one")               # refused: the file changed
    assert mine.save_conflict
    assert mine.merge(path) == 1
    want = {neuron_key(1): {"teacher: colour"}, neuron_key(2): {"my circles"},
            neuron_key(3): {"my red"}, neuron_key(4): {"my yes/no"},
            neuron_key(5): {"my new one"}}
    assert as_sets(mine) == want and as_sets(Annotations.load(path)) == want
    assert "the file was replaced by another file" in mine.change_note
    assert "and was joined with these: none of these removed" in mine.change_note
    assert "took in 1 concept from the file: h1 'teacher: colour'" in mine.change_note
    assert "removed" not in mine.change_note.replace("none of these removed", "")
    # the cell run again on a file copied over it: joined too, and said
    path.write_bytes(teachers.read_bytes())
    with pytest.warns(UserWarning, match="changed on disk.*was replaced"):
        again = Annotations.open(path, signature=SIG)
    assert again is mine and as_sets(mine) == want and as_sets(Annotations.load(path)) == want


def test_an_older_backup_of_the_same_file_put_back_names_what_it_removes(tmp_path):
    """An older backup of the same file (its lineage) put back is a version of it: what it
    lacks reads as removed, as in a three-way merge (accepted); the note names each, so that
    the person can add back what to keep. (Content ids of versions repeated after an undo, and
    a backup taken while a concept was removed removed it silently as a "later version".)"""
    path, backup = tmp_path / "c.json", tmp_path / "backup.json"
    mine = Annotations(path, signature=SIG)
    mine.set(neuron_key(1), ["red shapes"])
    mine.add(neuron_key(2), "circles")
    mine.remove(neuron_key(1), "red shapes")            # a misclick, saved
    backup.write_bytes(path.read_bytes())               # a backup taken now
    mine.undo()                                         # put back, saved
    mine.add(neuron_key(3), "new")
    path.write_bytes(backup.read_bytes())               # the backup restored over it
    mine.add(neuron_key(4), "newest")                   # conflict
    mine.merge(path)
    assert as_sets(mine) == {neuron_key(2): {"circles"}, neuron_key(4): {"newest"}}
    assert "replaced" not in mine.change_note
    assert mine.change_note == (
        "took in 0 concepts from the file; removed 2 concepts that the file no longer has "
        "(removed there since this kernel read or saved it, or a copy of this same file saved "
        "over it: an older backup, a teacher's handout): h1 'red shapes', h3 'new' (undo() puts "
        "them back)")
    assert as_sets(Annotations.load(path)) == as_sets(mine)


def test_removals_in_a_later_version_of_the_file_are_taken_and_named(tmp_path):
    path = tmp_path / "c.json"
    mine = Annotations(path, signature=SIG)
    mine.set(neuron_key(1), ["keep", "wrong guess"])
    theirs = Annotations(path)                          # another kernel, on the same file
    theirs.remove(neuron_key(1), "wrong guess")
    theirs.add(neuron_key(2), "theirs")
    theirs.add(neuron_key(2), "more")                   # several saves since mine read it
    mine.add(neuron_key(3), "mine")                     # conflict
    assert mine.merge(path) == 2
    assert as_sets(mine) == {neuron_key(1): {"keep"}, neuron_key(2): {"theirs", "more"},
                              neuron_key(3): {"mine"}}
    assert mine.change_note == ("took in 2 concepts from the file: h2 'theirs', h2 'more'; "
                                "removed 1 concept that the file no longer has (removed there "
                                "since this kernel read or saved it, or a copy of this same file "
                                "saved over it: an older backup, a teacher's handout): h1 'wrong "
                                "guess' (undo() puts them back)")


def test_the_row_says_what_a_merge_took_in_and_removed_by_name(tmp_path):
    path, teachers = tmp_path / "concepts.json", tmp_path / "teacher.json"
    Annotations(teachers).add(neuron_key(1), "colour")      # (made with no model)
    ex = _explorer(str(path))
    try:
        cv = ex.concepts_view
        for j in (2, 3):
            ex.select(neuron=j)
            cv.neuron_tags.edit("add", f"mine {j}")
        path.write_bytes(teachers.read_bytes())
        cv.neuron_tags.edit("add", "newest")
        assert cv.merge_button.layout.display is None
        cv.merge_button.click()
        assert as_sets(ex.annotations) == {neuron_key(1): {"colour"}, neuron_key(2): {"mine 2"},
                                            neuron_key(3): {"mine 3", "newest"}}
        status = cv.status.value
        assert "was replaced by another file" in status and "was joined" in status
        assert "took in 1 concept from the file: h1 'colour'" in status
    finally:
        ex.close()


# -- an interrupted save -----------------------------------------------------------------------
def test_an_interrupted_save_is_said_and_the_next_edit_saves(tmp_path, monkeypatch):
    """KeyboardInterrupt while a save waited for the file's lock left unsaved=True with no
    save_error: the row said "saved to ... on each change", typing the concept again changed
    nothing and retried nothing, and the concept was lost with the kernel."""
    import multiviz_widgets.annotations as annotations_module
    path = tmp_path / "c.json"
    ex, cv = _explorer_naming(path, 3, "saved before")
    try:

        def interrupted(*_a, **_k):
            raise KeyboardInterrupt
        monkeypatch.setattr(annotations_module, "file_lock", interrupted)
        with pytest.raises(KeyboardInterrupt):          # the interrupt goes on
            cv.neuron_tags.edit("add", "typed while the lock was held")
        a = ex.annotations
        assert a.unsaved and "interrupted (KeyboardInterrupt)" in a.save_error
        cv.show()
        assert "NOT SAVED" in cv.status.value and "interrupted" in cv.status.value
        monkeypatch.undo()
        cv.neuron_tags.edit("add", "typed while the lock was held")     # the same again
        assert not a.unsaved and a.save_error is None
        assert "saved to" in cv.status.value and "NOT SAVED" not in cv.status.value
        assert json.loads(path.read_text())["neurons"] == [
            {"neuron": 3, "concepts": ["saved before", "typed while the lock was held"]}]
    finally:
        ex.close()


# -- fields written into "model" and "dataset" by hand -----------------------------------------
def test_fields_written_into_the_model_and_dataset_objects_are_kept(tmp_path):
    path = tmp_path / "c.json"
    ex = _explorer(str(path))
    ex.annotations.add(neuron_key(1), "x")
    ex.close()
    doc = json.loads(path.read_text())
    doc["model"]["checkpoint"] = "lesson 3, epoch 12"
    doc["dataset"]["source"] = "test split"
    path.write_text(json.dumps(doc))
    ex = _explorer(str(path))
    try:
        ex.annotations.add(neuron_key(2), "y")
        after = json.loads(path.read_text())
        assert after["model"]["checkpoint"] == "lesson 3, epoch 12"
        assert after["dataset"]["source"] == "test split"
        assert after["model"]["weights"] == doc["model"]["weights"]
    finally:
        ex.close()
    plain = Annotations.load(path)
    plain.save(tmp_path / "copy.json")
    copied = json.loads((tmp_path / "copy.json").read_text())
    assert copied["model"]["checkpoint"] == "lesson 3, epoch 12"


# -- undo, and a rename onto a concept there is --------------------------------------------------
def test_undo_takes_back_a_remove_a_rename_and_an_add_in_turn(tmp_path):
    path = tmp_path / "c.json"
    a = Annotations(path)
    long = "fires on the word 'red' and on red pixels; checked on 40 images"
    a.set(neuron_key(7), ["red shapes", long, "bright"])
    a.add(neuron_key(8), "circles")
    a.remove(neuron_key(7), long)                               # the misclick
    assert a.can_undo == f"removed h7 {long!r}"
    said = a.undo()
    assert said.startswith(f"undid: removed h7 {long!r}") and a.change_note == said
    assert a.concepts(neuron_key(7)) == ("red shapes", long, "bright")      # in its place
    assert Annotations.load(path).concepts(neuron_key(7)) == ("red shapes", long, "bright")
    # a rename onto a concept there is: refused, unless asked to join them
    with pytest.raises(AnnotationError, match="'red shapes' is a concept already \\(h7\\).*"
                                              "merge=True"):
        a.rename("circles", "red shapes")
    assert a.concepts(neuron_key(8)) == ("circles",)
    a.rename("circles", "red shapes", merge=True)
    assert a.find("red shapes") == [neuron_key(7), neuron_key(8)]
    a.undo()                                                    # separated again
    assert a.concepts(neuron_key(8)) == ("circles",) and a.find("red shapes") == [neuron_key(7)]
    assert as_sets(Annotations.load(path)) == as_sets(a)
    a.undo()                                                    # then the edit before it
    assert a.concepts(neuron_key(8)) == ()
    a.undo()
    with pytest.raises(AnnotationError, match="no edit of these concepts to undo"):
        a.undo()


def test_undo_skips_a_key_that_a_merge_changed_since(tmp_path):
    """Undo fought the merge: undoing an add removed the same concept that the other side had
    added too, and undoing a rename put "old" back where the other kernel had removed "new".
    (Another file joined, which the merge does not change, keeps it: undo goes on there.)"""
    shared = tmp_path / "shared.json"
    Annotations(shared).add(neuron_key(3), "base")
    a, b = Annotations(shared), Annotations(shared)
    b.add(neuron_key(1), "red")                                 # another kernel adds it too
    a.add(neuron_key(1), "red")                                 # conflicts
    a.add(neuron_key(2), "mine")
    a.merge(shared)
    assert a.undo() == ("undid: added h2 'mine' (removed h2 'mine')")
    said = a.undo()
    assert said.startswith("did not undo: added h1 'red': skipped h1: changed by a merge since")
    assert "undo() again undoes the edit before it" in said and a.change_note == said
    assert a.concepts(neuron_key(1)) == ("red",)                # theirs too: kept
    with pytest.raises(AnnotationError, match="no edit of these concepts to undo"):
        a.undo()
    c = Annotations()
    c.add(neuron_key(1), "red")
    other = Annotations()
    other.add(neuron_key(1), "red")                             # another store's: joined
    c.merge(other)
    assert c.undo() == "undid: added h1 'red' (removed h1 'red')"
    assert c.merge(other) == 1 and c.concepts(neuron_key(1)) == ("red",)
    # a rename undone after the other kernel removed the new name: not put back
    path = tmp_path / "c.json"
    mine = Annotations(path, signature=SIG)
    mine.set(neuron_key(1), ["old", "stale"])
    mine.set(neuron_key(2), ["old"])
    theirs = Annotations(path, signature=SIG)
    mine.rename("old", "new")
    theirs.add(neuron_key(5), "b")
    theirs.merge(path)
    theirs.set(neuron_key(1), [])                               # they removed 'stale' and 'new'
    mine.add(neuron_key(6), "a")                                # conflict
    mine.merge(path)
    assert mine.concepts(neuron_key(1)) == ()
    assert mine.can_undo == "removed by the merge: h1 'new', h1 'stale'"
    mine.undo()                                                 # the merge's removals
    assert set(mine.concepts(neuron_key(1))) == {"stale", "new"}
    mine.undo()                                                 # the add of 'a'
    said = mine.undo()                                          # the rename: h2 only
    assert said == ("undid: renamed 'old' to 'new' on h1, h2 (added h2 'old'; removed h2 "
                    "'new'); skipped h1: changed by a merge since (undoing the edit there would "
                    "undo the merge's change too; it is kept, edit it by hand if need be)")
    assert set(mine.concepts(neuron_key(1))) == {"stale", "new"}
    assert mine.concepts(neuron_key(2)) == ("old",)
    assert as_sets(Annotations.load(path)) == as_sets(mine)


def test_the_undo_button_says_what_it_undid(tmp_path):
    ex = _explorer(str(tmp_path / "c.json"))
    try:
        cv = ex.concepts_view
        assert cv.undo_button.layout.display == "none"
        ex.select(neuron=2)
        cv.neuron_tags.edit("add", "<b>red</b>")
        cv.neuron_tags.edit("remove", "<b>red</b>")
        assert cv.undo_button.layout.display is None
        assert cv.undo_button.tooltip == "undo the last edit: removed h2 '<b>red</b>'"
        cv.undo_button.click()
        assert cv.neuron_tags.value == ["<b>red</b>"]
        assert "(undid: removed h2 '<b>red</b>' (added h2 '<b>red</b>'))" in cv.status.value
        cv.neuron_tags.edit("add", "next")
        assert "undid" not in cv.status.value
    finally:
        ex.close()


# -- the weights fingerprint's method ------------------------------------------------------------
def test_an_older_files_fingerprint_of_the_same_weights_gives_no_warning(tmp_path):
    """Files written before the fingerprint changed method (ModelAdapter.fingerprint, then
    weights_fingerprint) said "may not fit" beside the very model they were made for."""
    from multiviz_widgets.annotations import WEIGHTS_METHOD, model_signature
    adapter, _ = tiny_vqa()
    sig = model_signature(adapter, 12)
    assert sig["weights_method"] == WEIGHTS_METHOD
    path = tmp_path / "c.json"

    def older_file(weights, method=None):
        model = {k: v for k, v in sig.items() if k != "weights_method"}
        model["weights"] = weights
        if method:
            model["weights_method"] = method
        path.write_text(json.dumps({"format": "multiviz-annotations", "version": 2,
                                    "model": model,
                                    "neurons": [{"neuron": 1, "concepts": ["red"]}]}))
    older_file(adapter.fingerprint())               # how files were fingerprinted before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Annotations.load(path, signature=sig).model_note is None
    older_file("0123456789abcdef0123456789abcdef")   # other weights, by the older method
    with pytest.warns(UserWarning, match="may not fit"):
        Annotations.load(path, signature=sig)
    older_file("0123456789abcdef0123456789abcdef", "another-method")
    with pytest.warns(UserWarning, match="cannot be compared"):
        store = Annotations.load(path, signature=sig)
    assert "may not fit" not in store.model_note


def test_a_save_records_the_weights_as_they_are_now(tmp_path):
    from multiviz_widgets.annotations import model_signature
    adapter, _ = tiny_vqa()
    path = tmp_path / "c.json"
    store = Annotations(path, signature=model_signature(adapter, 12))
    store.add(neuron_key(1), "before the fine-tune")
    before = json.loads(path.read_text())["model"]["weights"]
    with torch.no_grad():                            # a fine-tune within the session
        for p in adapter.model.parameters():
            p.add_(0.01)
    store.add(neuron_key(2), "after it")
    after = json.loads(path.read_text())["model"]["weights"]
    assert after != before and after == adapter.weights_fingerprint()


def test_the_row_shows_the_other_model_note_after_a_merge(tmp_path):
    path = tmp_path / "c.json"
    ex, cv = _explorer_naming(path, 1, "mine")
    try:
        assert cv.state()["model_note"] == ""
        other = Annotations.load(path)
        other.signature["weights"] = "0123456789abcdef"      # a fine-tuned copy's store
        other.add(neuron_key(2), "theirs")
        with pytest.warns(UserWarning):
            other.save(path, overwrite=True)
            cv.neuron_tags.edit("add", "mine too")           # conflict
            cv.merge_button.click()
        assert "(weights 0123456789ab)" in cv.state()["model_note"]
        assert "may not fit" in cv.state()["model_note"]
    finally:
        ex.close()


# -- messages that say what is wrong -------------------------------------------------------------
def _good_file(tmp_path) -> bytes:
    path = tmp_path / "good.json"
    Annotations(path, signature=SIG).add(neuron_key(1), "red")
    return path.read_bytes()


@pytest.mark.parametrize("spoil, says", [
    (lambda raw: raw[:len(raw) // 2], "it ends before its JSON does .*cut short"),
    (lambda raw: raw.decode().encode("utf-16"), "UTF-16 text .*save it again as UTF-8"),
    (lambda raw: b"\0" * len(raw), "only zero bytes"),
    (lambda raw: b"<html><pre>" + raw + b"</pre></html>", "HTML or XML"),
    (lambda raw: raw.replace(b'"red"', b'"red",\n<<<<<<< HEAD\n"mine"\n=======\n"theirs"\n'
                                       b'>>>>>>> student'),
     "git's merge conflict markers .*line \\d+.*keeps both sides' entries.*then open it again"
     ".*Only to drop one side's concepts: `git checkout --ours.*throwing away the other "
     "branch's concepts"),
], ids=["truncated", "utf-16", "zeros", "html", "git conflict"])
def test_a_spoilt_file_says_what_is_wrong_and_how_to_fix_it(tmp_path, spoil, says):
    raw = spoil(_good_file(tmp_path))
    path = tmp_path / "c.json"
    path.write_bytes(raw)
    with pytest.raises(AnnotationError, match=says):
        Annotations(path)
    assert path.read_bytes() == raw


def test_a_save_to_a_folder_or_into_a_missing_folder_says_so(tmp_path):
    a = Annotations(signature=SIG)
    a.add(neuron_key(1), "x")
    for target in (tmp_path, str(tmp_path) + "/"):
        with pytest.raises(AnnotationError, match="it is a folder; give the path of a file in "
                                                  "it"):
            a.save(target)
        with pytest.raises(AnnotationError, match="it is a folder"):
            a.save(target, overwrite=True)
    missing = tmp_path / "no" / "such" / "c.json"
    with pytest.raises(FileNotFoundError, match=f"the folder {missing.parent} does not exist"):
        a.save(missing)
    assert a.path is None and a.concepts(neuron_key(1)) == ("x",)


# -- look-alikes and silent no-ops ----------------------------------------------------------------
def test_a_concept_typed_again_in_another_case_is_said_to_be_there(tmp_path):
    ex = _explorer(None)
    try:
        cv = ex.concepts_view
        ex.select(neuron=5)
        cv.neuron_tags.edit("add", "Straße")
        cv.neuron_tags.edit("add", "STRASSE")
        assert cv.neuron_tags.value == ["Straße"]
        assert cv.message.value.startswith("'STRASSE' is there already on h5 as 'Straße'")
        cv.neuron_tags.edit("add", "next")
        assert cv.message.value == ""
    finally:
        ex.close()


@pytest.mark.parametrize("bad, says", [
    ("re\u200dd", "U\\+200D ZERO WIDTH JOINER.*between 'e' and 'd'.*look-alike of 'red'"),
    ("re\u200cd", "U\\+200C ZERO WIDTH NON-JOINER"),
    ("\u0301" * 150, "no letter|has none \\(only combining marks\\)"),
    ("a\u200bb", "U\\+200B ZERO WIDTH SPACE: an invisible format character"),
])
def test_look_alikes_and_labels_without_a_letter_are_refused(bad, says):
    a = Annotations()
    a.add(neuron_key(1), "red")
    with pytest.raises(AnnotationError, match=says):
        a.add(neuron_key(1), bad)
    assert a.concepts(neuron_key(1)) == ("red",)


def test_a_named_unit_its_instance_lacks_can_be_removed_from_the_row(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"format": "multiviz-annotations", "version": 2, "units": [
        {"instance": 5, "modality": "image", "unit": 9999, "concepts": ["beyond the image"]}]}))
    ex = _explorer(str(path))
    try:
        cv = ex.concepts_view
        key = ("unit", 5, "image", 9999)
        assert cv.drop_button.layout.display == "none"
        cv.goto(key)
        assert cv.message.value.startswith("cannot go to #5 image unit 9999: ")
        assert "stay in the file until the button below removes them" in cv.message.value
        assert cv.drop_button.layout.display is None
        assert cv.drop_button.description == "remove the concepts of #5 image unit 9999"
        cv.drop_button.click()
        assert ex.annotations.keys() == [] and cv.drop_button.layout.display == "none"
        assert json.loads(path.read_text())["units"] == []
        assert [o[1] for o in cv.named.options] == [None]
    finally:
        ex.close()


# -- the file's lineage: a version of the same file, or another file copied over it ------------
def _older_writer(path, neurons: dict, keep_lineage: bool = False) -> None:
    """Write ``path`` as a multiviz_widgets of before "lineage" did: no lineage of its own
    (``keep_lineage``: the one the file had kept, as an unknown field is)."""
    before = json.loads(path.read_text()) if path.exists() else {}
    doc = {"format": "multiviz-annotations", "version": 2, "model": SIG,
           "neurons": [{"neuron": j, "concepts": cs} for j, cs in sorted(neurons.items())]}
    if keep_lineage and "lineage" in before:
        doc["lineage"] = before["lineage"]
    path.write_text(json.dumps(doc, indent=1))


def test_removals_by_another_kernel_hold_however_many_times_it_saved(tmp_path):
    """The ids of the versions a file came from were kept to 32: after 40 saves by another
    kernel, its file read as "replaced", was joined, and its removals came back."""
    path = tmp_path / "c.json"
    Annotations(path, signature=SIG).set(neuron_key(1), ["wrong guess", "keep"])
    a = Annotations(path, signature=SIG)
    b = Annotations(path, signature=SIG)
    b.remove(neuron_key(1), "wrong guess")
    for i in range(40):
        b.add(neuron_key(2 + i % 5), f"b{i}")
    a.add(neuron_key(7), "a's")                        # conflict
    assert a.save_conflict
    a.merge(path)
    assert a.concepts(neuron_key(1)) == ("keep",)
    assert "replaced" not in a.change_note and "h1 'wrong guess'" in a.change_note
    assert Annotations.load(path).concepts(neuron_key(1)) == ("keep",)
    assert Annotations.load(path).concepts(neuron_key(7)) == ("a's",)


def test_the_lineage_is_one_stable_field_and_a_copy_gets_its_own(tmp_path):
    path = tmp_path / "c.json"
    a = Annotations(path, signature=SIG)
    a.add(neuron_key(1), "x")
    doc = json.loads(path.read_text())
    lineage = doc["lineage"]
    assert re.fullmatch("[0-9a-f]{32}", lineage) and list(doc)[:3] == ["format", "version",
                                                                        "lineage"]
    for i in range(3):
        a.add(neuron_key(2), f"y{i}")
    assert json.loads(path.read_text())["lineage"] == lineage
    assert Annotations(path).to_dict()["lineage"] == lineage
    a.save(tmp_path / "copy.json")                      # another file: its own lineage
    assert json.loads((tmp_path / "copy.json").read_text())["lineage"] != lineage


def test_a_file_written_before_lineage_and_edited_by_hand_is_merged_three_way(tmp_path):
    """An older file (no lineage: a store that read it derives one from its bytes), edited by
    hand: a concept removed and a typo fixed. It was joined as a file
    copied over it: the removal and the typo came back, in memory and on disk."""
    path = tmp_path / "c.json"
    _older_writer(path, {1: ["rde shapes", "wrong guess"], 2: ["circles"]})
    store = Annotations.open(path, signature=SIG)
    doc = json.loads(path.read_text())                   # in a text editor
    doc["neurons"][0]["concepts"] = ["red shapes"]
    path.write_text(json.dumps(doc, indent=1))
    store.add(neuron_key(3), "mine")                     # conflict
    store.merge(path)
    want = {neuron_key(1): {"red shapes"}, neuron_key(2): {"circles"}, neuron_key(3): {"mine"}}
    assert as_sets(store) == want and as_sets(Annotations.load(path)) == want
    assert "replaced" not in store.change_note
    assert "h1 'rde shapes', h1 'wrong guess'" in store.change_note
    assert json.loads(path.read_text())["lineage"]       # given at this save


def test_an_older_multiviz_widgets_writing_the_file_is_merged_three_way(tmp_path):
    path = tmp_path / "c.json"
    _older_writer(path, {1: ["keep", "wrong guess"]})
    ours = Annotations(path, signature=SIG)             # this version opens it
    _older_writer(path, {1: ["keep"]})                   # a colleague's older kernel removes
    ours.add(neuron_key(2), "mine")
    ours.merge(path)
    assert as_sets(ours) == {neuron_key(1): {"keep"}, neuron_key(2): {"mine"}}
    assert "replaced" not in ours.change_note
    # once it has a lineage, the older kernel keeps it (an unknown field): still its versions
    _older_writer(path, {1: ["keep"], 2: ["mine"], 4: ["theirs"]}, keep_lineage=True)
    _older_writer(path, {2: ["mine"], 4: ["theirs"]}, keep_lineage=True)
    ours.add(neuron_key(5), "more")
    ours.merge(path)
    assert as_sets(ours) == {neuron_key(2): {"mine"}, neuron_key(4): {"theirs"},
                              neuron_key(5): {"more"}}
    assert "replaced" not in ours.change_note


def test_a_file_of_the_development_format_with_revisions_opens_and_loses_them(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"format": "multiviz-annotations", "version": 2,
                                "neurons": [{"neuron": 1, "concepts": ["red"]}],
                                "revisions": ["0123456789abcdef", "fedcba9876543210"]}))
    store = Annotations(path)
    assert store.concepts(neuron_key(1)) == ("red",)
    doc = store.to_dict()
    assert "revisions" not in doc
    store.add(neuron_key(2), "x")
    assert "revisions" not in json.loads(path.read_text())


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_two_git_branches_that_name_other_neurons_merge_without_a_conflict(tmp_path):
    """Each save appended its id to "revisions", the file's last lines: every git merge of
    two branches that had both saved the file conflicted there."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True,
                              env=dict(os.environ, GIT_CONFIG_GLOBAL=os.devnull,
                                       GIT_CONFIG_NOSYSTEM="1"))
    assert git("init", "-q", ".").returncode == 0
    git("config", "user.email", "a@b.c")
    git("config", "user.name", "t")
    path = tmp_path / "c.json"
    base = Annotations(path, signature=SIG)
    for j in range(8):
        base.add(neuron_key(j), f"n{j}")
    git("add", "c.json")
    git("commit", "-qm", "base")
    main = git("rev-parse", "--abbrev-ref", "HEAD").stdout.strip()
    git("checkout", "-qb", "x")
    Annotations(path, signature=SIG).add(neuron_key(1), "x on branch x")
    git("commit", "-qam", "x")
    git("checkout", "-q", main)
    Annotations(path, signature=SIG).add(neuron_key(6), "y on main")
    git("commit", "-qam", "y")
    merged = git("merge", "x", "-m", "merge")
    assert merged.returncode == 0, merged.stdout + merged.stderr
    store = Annotations(path, signature=SIG)
    assert store.concepts(neuron_key(1)) == ("n1", "x on branch x")
    assert store.concepts(neuron_key(6)) == ("n6", "y on main")


# -- what a file holds that typing refuses --------------------------------------------------------
@pytest.mark.parametrize("odd", ["?", "???", "--", "re\u200dd"])
def test_concepts_of_a_file_that_typing_now_refuses_open_merge_and_stay(tmp_path, odd):
    """The refusals of a concept of no letter, and of a joiner between Latin letters, applied
    to files too: a file holding "?" (a neuron not understood yet) could not be opened or
    merged any more."""
    path, other = tmp_path / "c.json", tmp_path / "other.json"
    for p in (path, other):
        p.write_text(json.dumps({"format": "multiviz-annotations", "version": 2, "neurons": [
            {"neuron": 1, "concepts": ["red", odd]}, {"neuron": 2, "concepts": ["circles"]}]}))
    store = Annotations(path)
    assert store.concepts(neuron_key(1)) == ("red", odd)
    store.add(neuron_key(1), "bright")                  # an edit of that key keeps it
    store.add(neuron_key(3), "x")
    assert store.merge(other) == 0 and store.merge(Annotations.load(other)) == 0
    assert Annotations.load(path).concepts(neuron_key(1)) == ("red", odd, "bright")
    assert store.find(odd) == [neuron_key(1)]
    with pytest.raises(AnnotationError):                # typed, it is refused still
        store.add(neuron_key(2), odd)
    with pytest.raises(AnnotationError):
        store.set(neuron_key(2), ["circles", odd])
    store.rename(odd, "not understood yet")
    assert store.concepts(neuron_key(1)) == ("red", "not understood yet", "bright")
    store.undo()
    store.remove(neuron_key(1), odd)
    assert Annotations.load(path).concepts(neuron_key(1)) == ("red", "bright")


# -- undo where the edit would not be taken now ---------------------------------------------------
def test_an_undo_that_puts_a_concept_where_it_cannot_be_now_is_refused(tmp_path):
    """undo() skipped the range, dataset and key checks of an edit: a unit concept removed on
    one dataset came back naming another's instance, a neuron beyond the model's range was
    saved (and the file could no longer be opened for the model)."""
    from multiviz_widgets.annotations import unit_key
    d1 = {"name": "vqa-train", "instances": 100, "fingerprint": "a" * 32}
    d2 = {"name": "vqa-test", "instances": 50, "fingerprint": "b" * 32}
    path = tmp_path / "c.json"
    s = Annotations(path, signature=SIG)
    s.bind(SIG, dataset=d1)
    s.add(neuron_key(1), "kept")
    s.add(unit_key(7, "image", 3), "dog's ear")
    s.remove(unit_key(7, "image", 3), "dog's ear")
    s.unbind(d1)
    s.bind(SIG, dataset=d2)
    with pytest.raises(AnnotationError, match=(
            r"Could not undo the last edit \(removed #7 image unit 3 \"dog's ear\"\): .*name "
            r"instances of 'vqa-train' \(100 instances\).*shown for 'vqa-test'.*taken off the "
            r"undo list")):
        s.undo()
    assert s.keys() == [neuron_key(1)] and json.loads(path.read_text())["units"] == []
    assert s.can_undo == "added #7 image unit 3 \"dog's ear\""    # the stack goes on
    s.undo()
    assert s.undo().startswith("undid: added h1 'kept'") and s.keys() == []
    # a neuron the model bound since does not have
    path = tmp_path / "d.json"
    s = Annotations(path)
    s.add(neuron_key(6), "fine")
    s.add(neuron_key(60), "x")
    s.remove(neuron_key(60), "x")
    s.bind(dict(SIG, neurons=12))
    with pytest.raises(AnnotationError, match=(
            "Could not undo the last edit \\(removed h60 'x'\\): neuron 60 is out of range: "
            "the decision layer has 12")):
        s.undo()
    assert 60 not in {k[1] for k in Annotations.load(path).keys()}
    s.undo()                                             # the add of h60: nothing to change
    # a key a viewer's check refuses
    s.set(neuron_key(6), [])
    checks = []

    def refuse(key):
        checks.append(key)
        raise AnnotationError(f"{key_name(key)} is not a neuron of this view")
    s.add_key_check(refuse)
    with pytest.raises(AnnotationError, match=(
            "Could not undo the last edit \\(removed h6 'fine'\\): h6 is not a neuron of this "
            "view")):
        s.undo()
    assert checks == [neuron_key(6)] and s.keys() == []
    assert s.undo().startswith("undid: added h6 'fine'")


def test_the_row_says_what_an_undo_skipped(tmp_path):
    path = tmp_path / "c.json"
    ex, cv = _explorer_naming(path, 2, "red")
    try:
        other = Annotations(path)                        # another kernel
        other.add(neuron_key(2), "theirs")
        cv.neuron_tags.edit("add", "mine")               # conflict
        cv.merge_button.click()
        cv.undo_button.click()                           # 'mine' is h2's, which the merge
        assert "did not undo: added h2 'mine': skipped h2: changed by a merge since" in \
            cv.status.value
        assert set(ex.annotations.concepts(neuron_key(2))) == {"red", "mine", "theirs"}
    finally:
        ex.close()


# -- the weights' fingerprint ---------------------------------------------------------------------
def test_a_file_opened_before_its_explorer_keeps_its_fingerprints_method(tmp_path):
    """A store opened from a file written before "weights_method" (Annotations.open(p), then
    given to an Explorer): bind labelled the file's older fingerprint with the new method, and
    the very model it was made for was then said to have other weights ("may not fit")."""
    from multiviz_widgets.annotations import WEIGHTS_METHOD, model_signature
    adapter, ds = tiny_vqa()
    sig = model_signature(adapter, 12)
    path = tmp_path / "c.json"
    model = {k: v for k, v in sig.items() if k != "weights_method"}
    model["weights"] = adapter.fingerprint()             # as older versions recorded it
    path.write_text(json.dumps({"format": "multiviz-annotations", "version": 2, "model": model,
                                "neurons": [{"neuron": 1, "concepts": ["red"]}]}))
    store = Annotations.open(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05, annotations=store)
    try:
        assert ex.wait(60)
        assert store.model_note is None
        assert store.signature.get("weights_method") is None     # never relabelled
        store.add(neuron_key(2), "new")                  # records the weights as they are
        saved = json.loads(path.read_text())["model"]
        assert saved["weights"] == adapter.weights_fingerprint()
        assert saved["weights_method"] == WEIGHTS_METHOD
    finally:
        ex.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Annotations.load(path, signature=model_signature(adapter, 12)).model_note is None


@pytest.mark.parametrize("cast", ["half", "double", "to"])
def test_a_save_records_the_weights_after_a_cast(tmp_path, cast):
    """model.half(), .double() and .to(dtype) set param.data without counting a version: the
    saves kept recording the weights as they were before the cast."""
    from multiviz_widgets.annotations import model_signature
    adapter, _ = tiny_vqa()
    path = tmp_path / "c.json"
    store = Annotations(path, signature=model_signature(adapter, 12))
    store.add(neuron_key(0), "before")
    before = json.loads(path.read_text())["model"]["weights"]
    m = adapter.model
    m.half() if cast == "half" else m.double() if cast == "double" else m.to(torch.float64)
    store.add(neuron_key(1), "after the cast")
    after = json.loads(path.read_text())["model"]["weights"]
    assert after != before and after == adapter.weights_fingerprint()


# -- saves that must not fail after they wrote -----------------------------------------------------
def test_a_signature_with_keys_of_two_kinds_saves(tmp_path):
    """The id of a version's content sorted its dicts' keys: a signature with a dict of int
    and str keys made each save raise IndexError after it had written the file."""
    path = tmp_path / "c.json"
    a = Annotations(path, signature=dict(SIG, labels_map={0: "a", "b": 1}))
    a.add(neuron_key(1), "x")
    a.add(neuron_key(2), "y")
    assert not a.unsaved and a.save_error is None
    assert as_sets(Annotations.load(path)) == {neuron_key(1): {"x"}, neuron_key(2): {"y"}}


def _interrupt_after_the_write(monkeypatch) -> None:
    """Saves write the file, then a KeyboardInterrupt comes (before the store's bookkeeping)."""
    import multiviz_widgets.annotations as annotations_module
    real = annotations_module._atomic_write

    def write_then_interrupt(target, raw):
        real(target, raw)
        raise KeyboardInterrupt
    monkeypatch.setattr(annotations_module, "_atomic_write", write_then_interrupt)


def test_an_interrupt_after_the_write_says_so_and_is_no_conflict(tmp_path, monkeypatch):
    """An interrupt after the file was written said "interrupted before it wrote", and the
    next edit was refused as a conflict with "another program"."""
    path = tmp_path / "c.json"
    a = Annotations(path, signature=SIG)
    a.add(neuron_key(1), "first")
    _interrupt_after_the_write(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        a.add(neuron_key(2), "second")
    monkeypatch.undo()
    assert "interrupted (KeyboardInterrupt) while it wrote the annotations (they may have " \
           "been written or not)" in a.save_error
    a.add(neuron_key(3), "third")
    assert not a.save_conflict and a.save_error is None and not a.unsaved
    assert as_sets(Annotations.load(path)) == {neuron_key(1): {"first"},
                                                neuron_key(2): {"second"},
                                                neuron_key(3): {"third"}}
    # the same seen by a merge (the row's button, or Annotations.open): nothing to take in
    _interrupt_after_the_write(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        a.add(neuron_key(4), "fourth")
    monkeypatch.undo()
    a.merge(path)
    assert a.change_note == "took in 0 concepts from the file" and not a.save_conflict


# -- files without a lineage, copies of the same file, undo after a merge ----------------------
def _old_file(path, neurons: dict) -> None:
    path.write_text(json.dumps({"format": "multiviz-annotations", "version": 2,
                                "neurons": [{"neuron": j, "concepts": cs}
                                            for j, cs in sorted(neurons.items())]}))


def test_a_file_without_a_lineage_in_two_kernels_keeps_both_kernels_removals(tmp_path):
    """The first save gave the older file a random lineage, so the other kernel's merge was a
    join: both kernels' removals and renames came back, and were written back."""
    path = tmp_path / "c.json"
    _old_file(path, {1: ["x", "keep"], 2: ["y", "keep2"], 3: ["old"]})
    a, b = Annotations(path), Annotations(path)
    assert a.to_dict()["lineage"] == b.to_dict()["lineage"]       # derived from the same bytes
    assert Annotations.load(path).to_dict()["lineage"] == a.to_dict()["lineage"]
    a.remove(neuron_key(1), "x")
    a.rename("old", "new")
    b.remove(neuron_key(2), "y")                                  # conflict
    assert b.save_conflict
    b.merge(path)
    want = {neuron_key(1): {"keep"}, neuron_key(2): {"keep2"}, neuron_key(3): {"new"}}
    assert as_sets(b) == want and "replaced" not in b.change_note
    a.add(neuron_key(4), "z")                                     # conflict
    a.merge(path)
    want[neuron_key(4)] = {"z"}
    assert as_sets(a) == want and as_sets(Annotations.load(path)) == want
    # another store creating a file gives it a random lineage
    c, d = Annotations(tmp_path / "n1.json"), Annotations(tmp_path / "n2.json")
    c.add(neuron_key(1), "x")
    d.add(neuron_key(1), "x")
    assert c.to_dict()["lineage"] != d.to_dict()["lineage"]


def test_kernels_that_read_other_versions_of_a_file_without_a_lineage_agree_on_one(tmp_path):
    """Each kernel derived a lineage from the version it read: when the file changed between
    two kernels opening it (a hand edit, a kernel of an older multiviz_widgets), they joined
    each other's saves for ever, and every removal either made came back. A derived lineage is
    provisional until this store writes it: the file's, when it has one, is taken."""
    path = tmp_path / "c.json"
    _old_file(path, {1: ["x", "k1"], 2: ["y", "k2"], 3: ["z"]})
    a = Annotations(path)
    _old_file(path, {1: ["x", "k1"], 2: ["y", "k2"], 3: ["z"], 5: ["hand"]})    # edited by hand
    b = Annotations(path)
    assert a.to_dict()["lineage"] != b.to_dict()["lineage"]
    a.remove(neuron_key(1), "x")                                  # conflict (the hand edit)
    a.merge(path)
    b.remove(neuron_key(2), "y")                                  # conflict
    b.merge(path)
    a.remove(neuron_key(3), "z")                                  # conflict
    a.merge(path)
    b.add(neuron_key(6), "b6")                                    # conflict
    b.merge(path)
    want = {neuron_key(1): {"k1"}, neuron_key(2): {"k2"}, neuron_key(5): {"hand"},
            neuron_key(6): {"b6"}}
    assert as_sets(b) == want and as_sets(Annotations.load(path)) == want
    assert "replaced" not in a.change_note + b.change_note
    assert a.to_dict()["lineage"] == b.to_dict()["lineage"]


def test_a_file_on_disk_without_a_lineage_is_a_version_of_the_stores_file(tmp_path):
    """A hand edit that deleted the lineage line (or an older version writing the file) after
    this store saved it was joined: its removals came back."""
    path = tmp_path / "c.json"
    store = Annotations(path)
    store.set(neuron_key(1), ["a", "unwanted"])
    doc = json.loads(path.read_text())
    del doc["lineage"]
    doc["neurons"][0]["concepts"] = ["a"]
    path.write_text(json.dumps(doc))
    store.add(neuron_key(2), "b")                                 # conflict
    store.merge(path)
    want = {neuron_key(1): {"a"}, neuron_key(2): {"b"}}
    assert as_sets(store) == want and as_sets(Annotations.load(path)) == want
    assert "replaced" not in store.change_note


@pytest.mark.parametrize("old_file", [True, False])
def test_the_lineage_an_interrupted_first_save_wrote_counts_as_ours(tmp_path, monkeypatch,
                                                                   old_file):
    path = tmp_path / "c.json"
    if old_file:
        _old_file(path, {1: ["x"]})
        store = Annotations(path)
    else:
        store = Annotations(path, autosave=False)
        store.add(neuron_key(1), "x")
    _interrupt_after_the_write(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        if old_file:
            store.add(neuron_key(2), "y")
        else:
            store.add(neuron_key(2), "y")
            store.save()
    monkeypatch.undo()
    other = Annotations(path)                                     # read after that write
    other.remove(neuron_key(1), "x")
    store.add(neuron_key(3), "z")
    if not store.autosave:
        with pytest.raises(AnnotationError):
            store.save()
    store.merge(path)
    want = {neuron_key(2): {"y"}, neuron_key(3): {"z"}}
    assert as_sets(store) == want and "replaced" not in store.change_note
    store.save()
    assert as_sets(Annotations.load(path)) == want


def test_a_copy_of_the_same_file_saved_over_it_removes_what_it_lacks_and_undo_puts_it_back(
        tmp_path):
    """A teacher's handout (the same lineage) e-mailed again and saved over the student's
    file removed her concepts, and undo could not put them back."""
    teacher, student = tmp_path / "teacher.json", tmp_path / "student.json"
    t = Annotations(teacher)
    t.add(neuron_key(0), "teacher-0")
    shutil.copy(teacher, student)
    s = Annotations.open(student)
    for j in range(1, 4):
        s.add(neuron_key(j), f"student-{j}")
    t.add(neuron_key(9), "teacher-9")
    shutil.copy(teacher, student)                                 # saved over hers
    with pytest.warns(UserWarning, match="changed on disk"):
        again = Annotations.open(student)
    assert again is s
    assert "h1 'student-1', h2 'student-2', h3 'student-3'" in s.change_note
    assert "undo() puts them back" in s.change_note
    assert s.can_undo == "removed by the merge: h1 'student-1', h2 'student-2', h3 'student-3'"
    s.undo()
    want = {neuron_key(0): {"teacher-0"}, neuron_key(9): {"teacher-9"},
            **{neuron_key(j): {f"student-{j}"} for j in range(1, 4)}}
    assert as_sets(s) == want and as_sets(Annotations.load(student)) == want
    # a merge that took a concept in and removed one on the same key: undo keeps the new one
    o = Annotations(student)
    o.set(neuron_key(1), ["theirs"])
    s.add(neuron_key(5), "conflict")
    s.merge(student)
    assert s.concepts(neuron_key(1)) == ("theirs",)
    s.undo()
    assert set(s.concepts(neuron_key(1))) == {"theirs", "student-1"}


def test_undo_after_a_merge_skips_only_the_keys_the_merge_changed(tmp_path):
    path = tmp_path / "c.json"
    store = Annotations(path)
    store.set(neuron_key(1), ["red", "blue"])
    store.add(neuron_key(2), "x")
    store.remove(neuron_key(1), "red")                            # a misclick
    colleague = Annotations()
    colleague.add(neuron_key(1), "blue")
    colleague.add(neuron_key(9), "theirs")
    colleague.save(tmp_path / "col.json")
    store.merge(tmp_path / "col.json")                            # h1 unchanged by it
    assert "skipped" not in store.undo()
    assert store.concepts(neuron_key(1)) == ("red", "blue")
    store.remove(neuron_key(2), "x")
    store.merge(colleague)                                        # no h2 there
    store.undo()
    assert store.concepts(neuron_key(2)) == ("x",)


def test_a_loaded_store_saved_to_another_path_gives_that_file_its_own_lineage(tmp_path):
    path = tmp_path / "c.json"
    Annotations(path).add(neuron_key(1), "a")
    lineage = json.loads(path.read_text())["lineage"]
    Annotations.load(path).save(tmp_path / "b.json")            # as store.save(other) does
    loaded = json.loads((tmp_path / "b.json").read_text())["lineage"]
    Annotations(path).save(tmp_path / "b.json", overwrite=True)
    assert loaded == json.loads((tmp_path / "b.json").read_text())["lineage"] != lineage
    Annotations.load(path).save(path, overwrite=True)             # its own file again
    assert json.loads(path.read_text())["lineage"] == lineage
