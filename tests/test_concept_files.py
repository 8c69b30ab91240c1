"""Concept annotation files that people edit by hand and pass around: a field written twice,
two entries of one key, a file made for another model of the same shape, a path whose folder
is not there; and a refused concept whose answer comes after the row moved elsewhere."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from multiviz_widgets.annotations import AnnotationError, Annotations, neuron_key
from multiviz_widgets.explorer import Explorer

from .explorer_support import FakeKernels, tiny_vqa

SIG = {"model": "m", "modalities": ["image", "question"], "classes": ["a", "b"], "neurons": 8}
HEAD = '"format": "multiviz-annotations", "version": 2'


def _explorer(annotations):
    adapter, ds = tiny_vqa()
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05, annotations=annotations)
    assert ex.wait(60)
    return ex


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


def _as_sets(store) -> dict:
    return {k: set(store.concepts(k)) for k in store.keys()}


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
    assert _as_sets(mine) == want and _as_sets(Annotations.load(path)) == want
    assert "was replaced by one that is not a later version" in mine.change_note
    assert "took in 1 concept from the file: h1 'teacher: colour'" in mine.change_note
    assert "removed" not in mine.change_note.replace("none of these removed", "")
    # the cell run again on a file copied over it: joined too, and said
    path.write_bytes(teachers.read_bytes())
    with pytest.warns(UserWarning, match="changed on disk.*was replaced"):
        again = Annotations.open(path, signature=SIG)
    assert again is mine and _as_sets(mine) == want and _as_sets(Annotations.load(path)) == want


def test_an_older_copy_of_the_same_file_put_back_removes_nothing_added_since(tmp_path):
    path, backup = tmp_path / "c.json", tmp_path / "backup.json"
    mine = Annotations(path, signature=SIG)
    mine.add(neuron_key(1), "old")
    backup.write_bytes(path.read_bytes())
    mine.add(neuron_key(2), "new")
    mine.remove(neuron_key(1), "old")
    path.write_bytes(backup.read_bytes())               # the backup restored over it
    mine.merge(path)
    assert _as_sets(mine) == {neuron_key(1): {"old"}, neuron_key(2): {"new"}}


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
    assert _as_sets(mine) == {neuron_key(1): {"keep"}, neuron_key(2): {"theirs", "more"},
                              neuron_key(3): {"mine"}}
    assert mine.change_note == ("took in 2 concepts from the file: h2 'theirs', h2 'more'; "
                                "removed 1 concept that its later version removed: h1 'wrong "
                                "guess' (to keep one, add it again)")


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
        assert _as_sets(ex.annotations) == {neuron_key(1): {"colour"}, neuron_key(2): {"mine 2"},
                                            neuron_key(3): {"mine 3", "newest"}}
        status = cv.status.value
        assert "was replaced by one that is not a later version" in status
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
    ex = _explorer(str(path))
    try:
        cv = ex.concepts_view
        ex.select(neuron=3)
        cv.neuron_tags.edit("add", "saved before")

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
    assert _as_sets(Annotations.load(path)) == _as_sets(a)
    a.undo()                                                    # then the edit before it
    assert a.concepts(neuron_key(8)) == ()
    a.undo()
    with pytest.raises(AnnotationError, match="no edit of these concepts to undo"):
        a.undo()


def test_undo_keeps_what_a_merge_changed_since(tmp_path):
    a = Annotations()
    a.add(neuron_key(1), "mine")
    other = Annotations()
    other.add(neuron_key(1), "theirs")
    a.merge(other)
    a.undo()                                                    # undoes the add only
    assert a.concepts(neuron_key(1)) == ("theirs",)
    with pytest.raises(AnnotationError, match="no edit of these concepts to undo"):
        a.undo()


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
    ex = _explorer(str(path))
    try:
        cv = ex.concepts_view
        ex.select(neuron=1)
        cv.neuron_tags.edit("add", "mine")
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
     "git's merge conflict markers .*line \\d+.*keep both sides' entries.*git checkout --ours"),
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
