"""Concept annotation files that people edit by hand and pass around: a field written twice,
two entries of one key, a file made for another model of the same shape, a path whose folder
is not there; and a refused concept whose answer comes after the row moved elsewhere."""
from __future__ import annotations

import json
import warnings

import pytest

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
