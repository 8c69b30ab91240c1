"""The Selection: one shared state, several traits set at once, the linking rules of a click."""
import pytest
import torch

from multiviz_widgets.selection import Selection


def test_update_sets_all_fields_before_observers_run():
    s = Selection()
    seen = []
    s.observe(lambda c: seen.append((c["name"], s.instance, s.modality, s.unit)),
              names=["instance", "unit"])
    s.update(instance=4, modality="question", unit=2)
    assert seen and all(v[1:] == (4, "question", 2) for v in seen)


def test_update_rejects_unknown_fields():
    with pytest.raises(ValueError, match="Unknown selection field"):
        Selection().update(colour="red")


def test_select_accepts_unit_tuples_and_none():
    s = Selection()
    s.select(unit=("image", 5))
    assert (s.modality, s.unit) == ("image", 5) and s.unit_ref == ("image", 5)
    s.select(unit=None)
    assert s.unit_ref is None and s.unit == -1 and s.modality == ""


def test_new_instance_clears_the_unit_unless_given():
    s = Selection()
    s.select(unit=("question", 1))
    s.select(instance=3)
    assert s.instance == 3 and s.unit_ref is None
    s.select(instance=4, unit=("question", 0))
    assert s.unit_ref == ("question", 0)


def test_new_target_clears_the_neuron_unless_given():
    s = Selection()
    s.select(neuron=7)
    s.select(target=2)
    assert s.target == 2 and s.neuron == -1
    s.select(target=1, neuron=3)
    assert s.neuron == 3
    s.select(target=1)          # unchanged target keeps the neuron
    assert s.neuron == 3


def test_select_rejects_bad_values():
    s = Selection()
    with pytest.raises(ValueError):
        s.select(unit=("image",))
    with pytest.raises(ValueError):
        s.select(instance="three")
    assert s.as_dict()["instance"] == 0


def test_bounds_reject_an_out_of_range_instance_or_target_and_keep_the_selection():
    import traitlets
    s = Selection(n_instances=3, n_classes=2)
    seen = []
    s.observe(lambda c: seen.append(c["name"]))
    with pytest.raises(traitlets.TraitError, match=r"Instance 3 is out of range.*\(0\.\.2\)"):
        s.instance = 3
    with pytest.raises(traitlets.TraitError, match="Instance -1 is out of range"):
        s.update(instance=-1, modality="question", unit=1)
    with pytest.raises(traitlets.TraitError, match=r"target 2 is out of range.*0\.\.1"):
        s.select(target=2)
    assert (s.instance, s.target, s.unit_ref) == (0, -1, None) and seen == []
    s.select(instance=2, target=1)
    assert (s.instance, s.target) == (2, 1)
    Selection().instance = 10 ** 6          # no bounds given: anything goes


def test_the_pair_is_a_field_checked_against_the_modalities():
    import traitlets
    s = Selection(modalities=["image", "question", "meta"], pair=("question", "image"))
    assert s.pair == ("question", "image") and s.as_dict()["pair"] == ["question", "image"]
    seen = []
    s.observe(lambda c: seen.append((c["name"], c["new"], s.unit_ref)), names=["pair", "unit"])
    s.update(pair=["meta", "image"], modality="meta", unit=1)     # one change, both set first
    assert s.pair == ("meta", "image") and seen[0][2] == ("meta", 1)
    assert ("pair", ("meta", "image"), ("meta", 1)) in seen
    for bad in (("meta", "meta"), ("meta", "audio"), ("meta",), None, "meta"):
        with pytest.raises(ValueError, match="pair must name two different modalities of"):
            s.select(pair=bad)
    with pytest.raises(traitlets.TraitError, match="two different modalities"):
        s.pair = ("image", "image")               # set directly: rejected too
    assert s.pair == ("meta", "image")
    with pytest.raises(ValueError, match=r"with a modality of \['image', 'question', 'meta'\]"):
        s.select(unit=("audio", 0))
    assert s.unit_ref == ("meta", 1)
    assert "pair=('meta', 'image')" in repr(s)


def test_a_one_modality_selection_has_no_pair_and_an_unchecked_one_takes_any_two():
    s = Selection(modalities=["row"], pair=None)
    assert s.pair is None and s.as_dict()["pair"] is None
    with pytest.raises(ValueError, match=r"one modality \(\['row'\]\): there is no pair"):
        s.select(pair=("row", "other"))
    free = Selection()                            # no modalities given: two different names
    free.select(pair=("a", "b"), unit=("c", 2))
    assert free.pair == ("a", "b") and free.unit_ref == ("c", 2)
    with pytest.raises(ValueError, match="pair must name two different modalities as"):
        free.select(pair=("a", "a"))
    free.pair = None
    assert free.pair is None


def test_out_of_range_errors_are_also_the_usual_python_errors():
    s = Selection(n_instances=3, n_classes=2)
    with pytest.raises(IndexError, match="Instance 5 is out of range"):
        s.select(instance=5)
    with pytest.raises(ValueError, match="target 9 is out of range"):
        s.select(target=9)


def test_a_pair_set_to_none_directly_is_checked_like_any_other_value():
    s = Selection(modalities=["image", "question", "meta"], pair=("meta", "image"))
    seen = []
    s.observe(lambda c: seen.append(c["new"]), names=["pair"])
    with pytest.raises(ValueError, match="pair must name two different modalities"):
        s.pair = None                 # (traitlets.Any would take None without the validator)
    assert s.pair == ("meta", "image") and not seen
    one = Selection(modalities="row")                   # a name alone is one modality
    assert one.modalities == ["row"]
    one.select(pair=None)                               # none to choose: None is fine
    one.pair = None
    assert one.pair is None


def test_the_current_pair_given_as_a_list_is_no_change():
    s = Selection(modalities=["image", "question", "meta"], pair=("meta", "image"))
    seen = []
    s.observe(lambda c: seen.append(c["new"]), names=["pair"])
    s.select(pair=["meta", "image"])
    s.update(pair=["meta", "image"])
    assert not seen and s.pair == ("meta", "image")


@pytest.mark.parametrize("unit, words", [
    (("", 3), "a modality's name first"), ((None, 3), "a modality's name first"),
    ((["question"], 1), "a modality's name first"), (("question", 1.7), "must be an integer"),
    (("question", "x"), "must be an integer"), (("question", None), "must be an integer"),
    (("question", -2), "non-negative"), (("question", 1, 2), "unit must be (modality, index)"),
    (("question", torch.tensor(1.7)), "must be an integer"),
])
def test_a_malformed_unit_is_refused_not_truncated_or_cleared(unit, words):
    s = Selection(modalities=["image", "question"])
    s.select(unit=("question", 1))
    with pytest.raises(ValueError) as e:
        s.select(unit=unit)
    assert words in str(e.value)
    assert s.unit_ref == ("question", 1)


def test_a_selection_told_two_or_more_modalities_starts_with_a_pair():
    s = Selection(modalities=["image", "question", "meta"])
    assert s.pair == ("image", "question")
    s.select(unit=("question", torch.tensor(2)))          # an integer tensor is an index
    assert s.as_dict()["unit_ref"] == ["question", 2]


@pytest.mark.parametrize("how", ["direct", "select"])
@pytest.mark.parametrize("field, value, says", [
    ("instance", True, "must be an integer"), ("target", True, "must be an integer"),
    ("neuron", False, "must be an integer"), ("neuron", -7, "or -1 for none"),
    ("unit", -5, "or -1 for none"),
])
def test_a_value_is_refused_the_same_way_set_directly_or_selected(how, field, value, says):
    s = Selection(n_instances=5, n_classes=3, modalities=["image", "question"])
    before = s.as_dict()
    kw = {field: value} if field != "unit" else {"modality": "image", "unit": value}
    with pytest.raises(ValueError, match=says):
        if how == "direct":
            setattr(s, field, value)
        else:
            s.select(**kw)
    assert s.as_dict() == before


def test_a_unit_index_without_a_modality_says_how_to_name_it():
    s = Selection(n_instances=5, n_classes=3, modalities=["image", "question"])
    with pytest.raises(ValueError, match=r"unit=\('image', 3\)"):
        s.select(unit=3)
    s.select(unit=("question", 1))
    s.select(unit=2)                         # the clicked modality is kept: its unit 2
    assert s.unit_ref == ("question", 2)


def test_a_new_instance_keeps_the_unit_the_call_sets_and_no_index_it_does_not():
    s = Selection(n_instances=10, modalities=["image", "question"])
    s.select(unit=("question", 4))
    s.select(instance=2, unit=1)             # the call sets the unit: of the clicked modality
    assert (s.instance, s.unit_ref) == (2, ("question", 1))
    s.select(unit=("question", 7))
    s.select(instance=3, modality="question")    # a modality names no unit of instance 3
    assert s.instance == 3 and s.unit_ref is None and s.unit == -1
    s.select(unit=("image", 2))
    s.select(instance=4, unit=("question", 0))
    assert s.unit_ref == ("question", 0)


def test_another_modality_alone_clears_the_unit_and_the_same_one_keeps_it():
    s = Selection(n_instances=10, modalities=["image", "question"])
    s.select(unit=("image", 7))
    s.select(modality="question")            # image unit 7 is not question unit 7
    assert s.unit_ref is None and (s.modality, s.unit) == ("question", -1)
    s.select(unit=("question", 2))
    s.select(modality="question")            # the same modality: its unit stays
    assert s.unit_ref == ("question", 2)
    s.select(modality="image", unit=5)       # a modality and its unit together
    assert s.unit_ref == ("image", 5)


def test_the_traits_set_directly_never_hold_a_unit_without_its_modality():
    s = Selection(modalities=["image", "question"])
    with pytest.raises(ValueError, match=r"unit 5 names no modality.*unit=\('image', 5\)"):
        s.unit = 5
    assert s.as_dict()["unit"] == -1
    s.modality, s.unit = "question", 2
    assert s.unit_ref == ("question", 2)
    seen = []
    s.observe(lambda c: seen.append(c["name"]), names=["modality", "unit"])
    with pytest.raises(ValueError, match="would leave unit 2 without its modality"):
        s.modality = ""
    with pytest.raises(ValueError, match="without its modality|names no modality"):
        s.update(modality="", unit=3)
    assert (s.modality, s.unit) == ("question", 2) and not seen
    s.update(unit=-1, modality="")           # both at once, in either order
    assert s.as_dict()["unit"] == -1 and s.unit_ref is None
    s.update(unit=3, modality="image")
    assert s.unit_ref == ("image", 3)
    s.select(modality="")                    # a click's empty modality clears the unit
    assert (s.modality, s.unit, s.unit_ref) == ("", -1, None)
