"""EMAP, the EMAP gap, interaction types and the split model: bugs found by a hunt, each pinned.

* a neuron target whose decision layer runs outside the fusion used to get the split rejected
  for good (class targets of the model then lost it too), and a declared split raised;
* a model that is NaN or infinite on some instances got its (correct) split rejected for good
  and EMAP returned NaN (emap_gap and interaction_type then gave made-up labels);
* an infinite output made the split check's tolerance infinite, so any split passed;
* emap_gap read labels set after the dataset was built without checking them;
* one-output models got an EMAP gap of 0 and 'complement' labels (argmax of one column).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from multiviz_widgets import ModelAdapter, MultimodalDataset, Neuron
from multiviz_widgets.kernels.common import check_instance_rows_independent
from multiviz_widgets.kernels.factorize import FactorizationError
from multiviz_widgets.kernels.interactions import (dime, emap, emap_gap, interaction_type,
                                                   interaction_types)
from multiviz_widgets.kernels.split_model import Split, same_or_reject
from tests.test_emap_lengths import assert_emap_is_brute, brute_emap
from tests.test_factorize import MODALITIES, Bilinear, OneLogit, _seeded, instances


def dataset(items, labels=None):
    return MultimodalDataset({k: [it[k] for it in items] for k in items[0]}, labels=labels)


# -- neuron targets whose decision layer is not in the fusion ---------------------------------
class HeadFirst(nn.Module):
    """The decision layer reads the tabular side only; the series gates its output afterwards:
    the split holds, but fused pairs never call the decision layer."""

    def __init__(self):
        super().__init__()
        self.t, self.s, self.head = nn.Linear(4, 5), nn.Linear(16, 3), nn.Linear(5, 3)
        _seeded(self)

    def forward(self, tabular, series):
        return self.head(torch.tanh(self.t(tabular))) * torch.tanh(self.s(series.flatten(1)))


class DeclaredHeadFirst(HeadFirst):
    def encode_modality(self, name, x):
        return (self.head(torch.tanh(self.t(x))) if name == "tabular"
                else torch.tanh(self.s(x.flatten(1))))

    def fuse_encodings(self, enc):
        return enc["tabular"] * enc["series"]


def test_a_neuron_target_outside_the_fusion_does_not_reject_the_split_for_classes():
    adapter = ModelAdapter(HeadFirst(), MODALITIES, ["a", "b", "c"], decision_layer="head")
    items = instances(5)
    r = emap(adapter, items, target=Neuron(1), keep_matrix=True)
    assert r.params["factorization"] == "none" and "neuron target" in r.params["factorization_note"]
    assert_emap_is_brute(r, brute_emap(adapter, items, Neuron(1)))
    again = emap(adapter, items)                      # class targets keep the traced split
    assert again.params["factorization"] == "traced", again.params
    assert_emap_is_brute(again, brute_emap(adapter, items))


def test_a_declared_split_falls_back_for_a_neuron_target_it_cannot_give():
    adapter = ModelAdapter(DeclaredHeadFirst(), MODALITIES, ["a", "b", "c"], decision_layer="head")
    items = instances(4)
    r = emap(adapter, items, target=Neuron(0))       # factorized=None: used to raise
    assert r.params["factorization"] == "none"
    assert_emap_is_brute(r, brute_emap(adapter, items, Neuron(0)))
    assert emap(adapter, items).params["factorization"] == "declared"
    with pytest.raises(ValueError, match="factorized=False"):
        emap(adapter, items, target=Neuron(0), factorized=True)


# -- models that are not finite on some instances ----------------------------------------------
class SqrtModel(nn.Module):
    """NaN for an instance whose tabular values sum below zero."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(1, 2)
        _seeded(self)

    def forward(self, tabular, series):
        v = torch.sqrt(tabular.sum(1, keepdim=True))
        return self.head(v * series.flatten(1).sum(1, keepdim=True))


def _sqrt_items():
    g = torch.Generator().manual_seed(0)
    good = [{"tabular": torch.rand(4, generator=g) + 0.1, "series": torch.randn(8, 2, generator=g)}
            for _ in range(4)]
    bad = good[:3] + [{"tabular": -torch.rand(4, generator=g) - 0.1,
                       "series": torch.randn(8, 2, generator=g)}]
    return good, bad


def test_non_finite_outputs_are_a_clear_error_and_leave_the_split_alone():
    adapter = ModelAdapter(SqrtModel(), MODALITIES, ["n", "p"])
    good, bad = _sqrt_items()
    with pytest.raises(ValueError, match=r"emap: the model produced NaN or infinite values "
                                         r"\(nan\) on instance 3 itself"):
        emap(adapter, bad)
    with pytest.raises(ValueError, match="on instance 7 itself"):      # dataset numbering
        emap(adapter, dataset(bad + bad), indices=[0, 1, 7])
    with pytest.raises(ValueError, match="NaN or infinite"):
        emap(adapter, bad, factorized=False)
    with pytest.raises(ValueError, match="NaN or infinite"):
        emap_gap(adapter, dataset(bad, [0, 1, 0, 1]), n=None)
    with pytest.raises(ValueError, match="interaction_type: the model produced NaN"):
        interaction_type(adapter, good[0], bad)
    r = emap(adapter, good)             # the split was not rejected because of the NaN
    assert r.params["factorization"] == "traced", r.params
    assert np.isfinite(r.emap_logits).all()


def test_non_finite_cross_pairs_are_named():
    """Every instance finite on its own, one pair (tabular of 0, series of 1) not."""

    class Ratio(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(1, 2)
            _seeded(self)

        def forward(self, tabular, series):
            return self.head(tabular[:, :1] / (series[:, 0, :1] - tabular[:, 1:2]))

    adapter = ModelAdapter(Ratio(), MODALITIES, ["n", "p"])
    items = [{"tabular": torch.tensor([1.0, 0.0, 0, 0]), "series": torch.full((8, 2), 2.0)},
             {"tabular": torch.tensor([1.0, 2.0, 0, 0]), "series": torch.full((8, 2), 0.0)}]
    with pytest.raises(ValueError, match="with 'tabular' of instance 0 and 'series' of instance 1"):
        emap(adapter, items)


def test_an_infinite_output_does_not_make_every_split_pass_the_check():
    split = Split("traced", "tabular", lambda raw: (), (), lambda rows: None)
    direct = torch.tensor([[1.0, float("inf")], [2.0, 3.0]], dtype=torch.float64)
    with pytest.raises(FactorizationError, match="largest difference 5"):
        same_or_reject(split, direct + torch.tensor([[5.0, 0.0], [0.0, 0.0]]), direct)
    same_or_reject(split, direct.clone(), direct)                   # the same numbers pass
    nan = torch.tensor([[float("nan"), 1.0]], dtype=torch.float64)
    same_or_reject(split, nan.clone(), nan)                         # NaN where the model is NaN
    with pytest.raises(FactorizationError):
        same_or_reject(split, torch.tensor([[1.0, 1.0]], dtype=torch.float64), nan)


# -- emap_gap's labels and one-output models -----------------------------------------------------
def test_emap_gap_gets_labels_checked_also_when_set_after_the_dataset_was_built():
    """Labels are checked whenever they are set (a list or a tensor becomes the int64 array,
    strings and a wrong length are refused at once); emap_gap checks them against the classes."""
    adapter = ModelAdapter(Bilinear(), MODALITIES, ["a", "b", "c"])
    ds = dataset(instances(6), [0, 1, 2, 0, 1, 2])
    want = emap_gap(adapter, ds, n=None)
    ds.labels = [0, 1, 2, 0, 1, 2]                     # a list: stored as the checked array
    assert emap_gap(adapter, ds, n=None)["accuracy_model"] == want["accuracy_model"]
    ds.labels = torch.tensor([0, 1, 2, 0, 1, 2])
    assert ds.labels.dtype == np.int64
    assert emap_gap(adapter, ds, n=None)["accuracy_model"] == want["accuracy_model"]
    with pytest.raises(TypeError, match="labels must be integers"):
        ds.labels = ["a", "b", "c", "a", "b", "c"]
    with pytest.raises(ValueError, match="labels has 3 entries for 6 instances"):
        ds.labels = [0, 1, 2]
    ds.labels = [0, 1, 2, 0, 1, 7]
    with pytest.raises(ValueError, match="class index 7, but the model has 3 classes") as e:
        emap_gap(adapter, ds, n=None)
    # an unknown label (C or more, as the Explorer shows it): the advice given works
    fix = "indices=np.flatnonzero(dataset.labels < 3)"
    assert fix in str(e.value)
    kept = emap_gap(adapter, ds, indices=np.flatnonzero(ds.labels < 3))
    assert 0 <= kept["accuracy_model"] <= 1


def test_emap_gap_checks_only_the_labels_of_the_instances_it_uses():
    """A label >= C at an instance outside ``indices`` (or not drawn) is none of the gap's: it
    used to be refused from labels.max() over the whole dataset."""
    adapter = ModelAdapter(Bilinear(), MODALITIES, ["a", "b", "c"])
    ds = dataset(instances(8), [0, 1, 2, 0, 1, 2, 0, 5])
    got = emap_gap(adapter, ds, indices=[0, 1, 2, 3])
    want = emap_gap(adapter, dataset(instances(8)[:4], [0, 1, 2, 0]), n=None)
    for k in ("accuracy_model", "accuracy_emap", "gap", "gap_predictions"):
        assert got[k] == want[k], k
    with pytest.raises(ValueError, match="label of instance 7 is class index 5, but the model"):
        emap_gap(adapter, ds, indices=[0, 7])
    with pytest.raises(ValueError, match="label of instance 7 is class index 5"):
        emap_gap(adapter, ds, n=None)


def test_a_seed_of_none_draws_afresh_as_numpy_takes_it():
    """seed=None (fresh randomness, numpy's default_rng(None)) was taken by emap_gap and
    interaction_type, then refused for a while when the seed was first checked."""
    adapter = ModelAdapter(Bilinear(), MODALITIES, ["a", "b", "c"])
    ds = dataset(instances(8), [0, 1, 2, 0, 1, 2, 0, 1])
    gap = emap_gap(adapter, ds, n=4, seed=None)
    assert 0 <= gap["accuracy_model"] <= 1
    t = interaction_type(adapter, ds[0], reference=ds, n_reference=4, seed=None)
    assert t["label"] in ("dominance", "complement", "conflict", "undecided")
    with pytest.raises(ValueError, match="seed"):
        emap_gap(adapter, ds, n=4, seed=-1)


class PairNaN3(nn.Module):
    """Three tabular modalities; infinite when t2[0] - t1[0] == 1 (never on an instance itself,
    whose t1[0] == t2[0]), NaN on an instance whose t3[0] is negative."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(2, 2)

    def forward(self, t1, t2, t3):
        gate = 1.0 / (t1[:, :1] - t2[:, :1] + 1.0) + torch.sqrt(t3[:, :1])
        return self.head(torch.cat([gate, t1[:, 1:2]], 1))


def test_three_modality_non_finite_pairs_name_the_instance_of_each_modality():
    from multiviz_widgets import Tabular
    mods = [Tabular(m, columns=["x", "y"]) for m in ("t1", "t2", "t3")]
    adapter = ModelAdapter(PairNaN3(), mods, ["a", "b"])
    items = [{m: torch.tensor([float(k), 0.5]) for m in ("t1", "t2", "t3")} for k in range(5)]
    with pytest.raises(ValueError, match="NaN or infinite") as e:
        emap(adapter, items, factorized=False)
    import re
    found = re.search(r"with 't1' of instance (\d), 't2' of instance (\d) and 't3' of "
                      r"instance \d", str(e.value))
    assert found and int(found[2]) == int(found[1]) + 1, str(e.value)
    items[3]["t3"] = torch.tensor([-1.0, 0.5])
    with pytest.raises(ValueError, match=r"\(nan\) on instance 3 itself"):
        emap(adapter, items, factorized=False)


def test_one_output_models_get_no_gap_or_labels_from_an_argmax_of_one_column():
    adapter = ModelAdapter(OneLogit(), MODALITIES, ["yes"], decision_layer="head")
    items = instances(5)
    ds = dataset(items, [0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match=r"one output.*class_names=\[negative, positive\]"):
        emap_gap(adapter, ds, n=None)
    r = emap(adapter, items)                           # EMAP itself is fine: one logit
    assert r.emap_logits.shape == (5, 1)
    with pytest.raises(ValueError, match="argmax is always 0"):
        interaction_types(r)
    with pytest.raises(ValueError, match="argmax is always 0"):
        interaction_type(adapter, items[0], items)


# -- the traced split's message for sides that meet only in place --------------------------------
class InPlaceMix(nn.Module):
    def __init__(self):
        super().__init__()
        self.t, self.s, self.head = nn.Linear(4, 5), nn.Linear(16, 5), nn.Linear(10, 3)
        _seeded(self)

    def forward(self, tabular, series):
        a, b = torch.tanh(self.t(tabular)), torch.tanh(self.s(series.flatten(1)))
        c = a.clone()
        c.add_(b)                   # the only place the modalities meet: in place
        return self.head(torch.cat([a * 2, c], 1))


def test_sides_that_meet_only_in_place_fall_back_and_say_so():
    adapter = ModelAdapter(InPlaceMix(), MODALITIES, ["a", "b", "c"])
    items = instances(4)
    r = emap(adapter, items, keep_matrix=True)
    assert r.params["factorization"] == "none" and "in-place" in r.params["factorization_note"]
    assert_emap_is_brute(r, brute_emap(adapter, items))
    with pytest.raises(ValueError, match="in-place operations"):
        emap(adapter, items, factorized=True)


# -- instances the model cannot run are named, not a bare model error --------------------------
@pytest.mark.parametrize("factorized", [False, None])
def test_an_instance_the_model_cannot_run_is_named_with_how_to_leave_it_out(factorized):
    """A series shorter than the model's conv kernel used to stop EMAP with the model's error on
    a batch of pairs, naming no instance."""
    from multiviz_widgets.adapter import ModelInputError
    from tests.test_representations import conv_case
    adapter, ds = conv_case(n=8, short=(5,))
    with pytest.raises(ModelInputError, match=r"emap: the model cannot run 1 of the 8 instances "
                                              r"given \(dataset indices 5\): .*leave it out .*"
                                              r"indices=\[i for i in range\(8\) if i not in \{5\}\]"
                                              r".*On instance 5: .*series: \(1, 3, 2\).*Kernel"):
        emap(adapter, ds, factorized=factorized)
    kept = [i for i in range(8) if i != 5]
    r = emap(adapter, ds, indices=kept, factorized=factorized)     # as the message says
    np.testing.assert_array_equal(r.indices, kept)
    with pytest.raises(ModelInputError, match=r"\(dataset indices 5\).*indices=\[i for i in "
                                              r"indices if i not in \{5\}\]"):
        emap(adapter, ds, indices=[1, 5, 6], factorized=factorized)
    with pytest.raises(ModelInputError, match=r"^emap_gap: the model cannot run 1 of the 8 .*"
                                              r"\(dataset indices 5\)"):
        emap_gap(adapter, ds, indices=range(8))
    # drawn (n=None: every instance), it is left out, as one the adapter refuses
    with pytest.warns(UserWarning, match="the model cannot run instance 5 alone"):
        assert emap_gap(adapter, ds, n=None)["left_out"] == [5]
    items = [ds[i] for i in range(8)]
    with pytest.raises(ModelInputError, match=r"\(positions in the list 5\).*pass a list "
                                              r"without it"):
        emap(adapter, items, factorized=factorized)


def test_when_no_instance_runs_or_only_pairs_fail_the_model_error_is_kept():
    from multiviz_widgets.adapter import ModelInputError
    from tests.test_representations import ConvSeries, conv_case
    adapter, ds = conv_case(n=4, short=range(4))
    with pytest.raises(ModelInputError, match=r"cannot run any of the 4 instances given; on "
                                              r"instance 0: .*series: \(1, 3, 2\)"):
        emap(adapter, ds)

    class SameLength(ConvSeries):
        """Runs every instance alone, but not the tab of one with the series of another length."""

        def forward(self, tab, series):
            if bool((tab[:, 0] != series.shape[1]).any()):
                raise ValueError("tab[0] must be the series' length")
            return super().forward(tab, series)

    adapter, ds = conv_case(n=6, model=SameLength())
    for i in range(6):
        ds.columns["tab"][i][0] = len(ds.columns["series"][i])
    with pytest.raises(ModelInputError, match=r"^The model raised ValueError .*series' length") as e:
        emap(adapter, ds, factorized=False)
    assert isinstance(e.value.__cause__, ValueError)


def test_errors_about_memory_leave_emap_at_once_as_they_are():
    from tests.test_representations import _Raising, conv_case
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate")
    adapter, ds = conv_case(n=6, model=_Raising(error))
    with pytest.raises(torch.OutOfMemoryError) as e:
        emap(adapter, ds, factorized=False)
    assert e.value is error and adapter.model.calls == 1      # no instance run alone after it


def test_interaction_type_runs_its_unimodal_parts_in_batches_too():
    """Before: each of the instance's unimodal parts went through the model as one batch of
    all the references, whatever batch_size said."""
    model = Bilinear()
    sizes = []
    model.register_forward_pre_hook(lambda _m, args: sizes.append(int(args[0].shape[0])))
    adapter = ModelAdapter(model, MODALITIES, ["a", "b", "c"])
    items = instances(40)
    typed = interaction_type(adapter, items[0], items, batch_size=7)
    assert max(sizes) <= 7, sorted(set(sizes))
    assert typed["label"] == interaction_type(adapter, items[0], items)["label"]


def test_progress_never_goes_back_when_a_split_fails_part_way(monkeypatch):
    """A traced split that fails after some of its pairs (a RuntimeError: the forward passes
    explain the model this time) left progress at those pairs, and the forward passes then
    reported from zero again; forward_passes left out the check and the abandoned pairs."""
    from multiviz_widgets.kernels.factorize import Factorization
    real, calls = Factorization.fuse, [0]

    def fuse(self, rows):
        calls[0] += 1
        if calls[0] == 7:                 # after the check (4 calls) and two batches of pairs
            raise RuntimeError("a tensor the trace could not follow")
        return real(self, rows)
    monkeypatch.setattr(Factorization, "fuse", fuse)
    adapter = ModelAdapter(Bilinear(), MODALITIES, ["a", "b", "c"])
    items = instances(6)
    check_instance_rows_independent(adapter, items[0])     # once per adapter, not EMAP's rows
    rows, progress = [], []
    adapter.decision_layer.register_forward_pre_hook(lambda _m, inp: rows.append(len(inp[0])))
    r = emap(adapter, items, batch_size=4, progress=lambda *a: progress.append(a))
    assert "not used this time" in r.params["factorization_note"]
    done = [d for d, _, _ in progress]
    pairs = [d for d, _, m in progress if m.startswith("EMAP pairs")]
    assert pairs[:3] == [0, 4, 8] and done == sorted(done) and done[-1] == progress[-1][1] == 36
    assert r.forward_passes == sum(rows) == 2 * (6 + 6) + 2 * 4 + 36
    # (the same batches of pairs as the forward passes the split fell back to: float32 sums of
    # other batch sizes differ in their last bits)
    np.testing.assert_allclose(r.matrix,
                               emap(adapter, items, factorized=False, batch_size=4).matrix)


# -- interaction types at ties -----------------------------------------------------------------
class SeriesOnly(nn.Module):
    """Two logits from the series alone; the tabular input is ignored (its part is 0, and the
    grand mean is a tie when the series' mean effect is 0)."""

    def __init__(self, sign: float):
        super().__init__()
        self.head = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[-sign], [sign]]))

    def forward(self, tabular, series):
        return self.head(series[:, 0, :1] + 0 * tabular[:, :1])


def test_an_ignored_modality_agrees_with_neither_class_so_the_label_does_not_depend_on_it():
    """argmax broke a tied part's tie toward class 0: the ignored modality 'agreed' when the
    model answered class 0 (complement) and not when it answered class 1 (dominance)."""
    items = instances(6)
    for i in range(len(items)):                      # series means 0: the grand mean ties
        items[i]["series"] = items[i]["series"] - items[i]["series"].mean(0)
    reference = [dict(it) for it in items]
    for k, it in enumerate(reference):
        it["series"] = torch.zeros(8, 2)
        it["series"][0, 0] = (-1.0) ** k                # mean 0 over the six references
    labels = {}
    for sign in (1.0, -1.0):                        # the same instance answered 1, then 0
        adapter = ModelAdapter(SeriesOnly(sign), MODALITIES, ["no", "yes"])
        inst = {"tabular": items[0]["tabular"], "series": torch.zeros(8, 2)}
        inst["series"][0, 0] = 2.0
        t = interaction_type(adapter, inst, reference)
        labels[t["predicted_name"]] = t
    assert set(labels) == {"no", "yes"}
    for t in labels.values():
        assert t["label"] == "dominance" and t["dominant"] == "series", t
        assert t["unimodal_predictions"]["tabular"] is None


def test_a_model_with_no_margin_is_undecided_whatever_class_argmax_names():
    class Zero(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

        def forward(self, tabular, series):
            return self.head(tabular * series.sum((1, 2))[:, None])

    adapter = ModelAdapter(Zero(), MODALITIES, ["no", "yes"])
    items = instances(4)
    t = interaction_type(adapter, items[0], items)
    assert t["label"] == "undecided" and t["dominant"] is None
    assert t["emap_prediction"] is None
    assert set(t["unimodal_predictions"].values()) == {None}


def test_a_class_the_model_rules_out_does_not_make_a_real_margin_a_tie():
    """The tie tolerance was 1e-6 of the largest logit of any class: a third class at -1e9 made
    a margin of 0.04 between the other two "undecided"."""
    from multiviz_widgets.kernels.emap import _label
    for third in (-1.0, -1e5, -1e9):
        logits = np.array([0.02, -0.02, third])
        parts = {"a": np.array([0.02, -0.02, 0.0]), "b": np.zeros(3)}
        t = _label(logits, parts, np.array([0.0, 0.0, third]), ["yes", "no", "never"])
        assert t["label"] == "dominance" and t["dominant"] == "a", (third, t["label"])
        assert t["unimodal_predictions"] == {"a": 0, "b": None}


# -- interaction_type through emap's split ----------------------------------------------------
def _typed_cases():
    """(adapter, instance, references) for models with a traced split, a declared one, a
    token-level cut over texts of several lengths (an instance of a length no reference has)
    and three modalities."""
    from tests.test_emap_lengths import (DeclaredMeanPool, MeanPool, TokenLevel, TwoTexts,
                                         adapter_for, items_of)
    items = instances(9, seed=3)
    texts = items_of(10, seed=4)
    odd = dict(texts[0], question="is the red circle what shape is the")
    three = items_of(7, seed=5, answers=True)
    return {"traced": (ModelAdapter(Bilinear(), MODALITIES, ["a", "b", "c"]), items[0], items[1:]),
            "declared": (adapter_for(DeclaredMeanPool()), texts[0], texts[1:]),
            "pooled lengths": (adapter_for(MeanPool()), odd, texts[1:]),
            "token level": (adapter_for(TokenLevel()), odd, texts[1:]),
            "three": (adapter_for(TwoTexts(), ("question", "answer")), three[0], three[1:])}


def _assert_same_type(fast: dict, slow: dict) -> None:
    assert (fast["label"], fast["dominant"], fast["predicted"]) == (
        slow["label"], slow["dominant"], slow["predicted"])
    assert fast["unimodal_predictions"] == slow["unimodal_predictions"]
    for k in ("logits", "emap_logits", "grand_mean", "interaction"):
        np.testing.assert_allclose(fast[k], slow[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for m in slow["unimodal"]:
        np.testing.assert_allclose(fast["unimodal"][m], slow["unimodal"][m], rtol=1e-5,
                                   atol=1e-6, err_msg=m)
    for k, v in slow["margins"].items():
        assert fast["margins"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("case", ["traced", "declared", "pooled lengths", "token level", "three"])
def test_interaction_type_takes_emaps_split_by_default_with_the_full_forwards_numbers(case):
    """interaction_type used to run all N^2 reference pairs as full forward passes (batches of
    1024 instances) where emap fuses encodings: now the same split as emap's, same numbers."""
    adapter, instance, refs = _typed_cases()[case]
    kind = emap(adapter, refs).params["factorization"]
    assert kind == ("declared" if case == "declared" else "traced")
    fast = interaction_type(adapter, instance, refs)
    slow = interaction_type(adapter, instance, refs, factorized=False)
    assert (fast["factorized"], fast["factorization"]) == (True, kind)
    assert (slow["factorized"], slow["factorization"]) == (False, "none")
    assert "factorization_note" not in fast
    _assert_same_type(fast, slow)
    small = interaction_type(adapter, instance, refs, batch_size=3)     # batches cut anywhere
    assert small["factorization"] == kind
    _assert_same_type(small, slow)
    if case == "declared":
        _assert_same_type(interaction_type(adapter, instance, refs, factorized="declared"), slow)
    else:
        _assert_same_type(interaction_type(adapter, instance, refs, factorized="traced"), slow)
        with pytest.raises(ValueError, match="factorized='declared' needs"):
            interaction_type(adapter, instance, refs, factorized="declared")


def test_interaction_type_runs_no_full_forward_pass_per_pair_when_split():
    """Full forward passes with the split: the references' own pairs and a few neighbours (the
    check, as emap's) and the instance; without it, N^2 + 2 N + 1 of them."""
    from multiviz_widgets.kernels.split_model import CHECKED_PAIRS
    model = Bilinear()
    rows = []
    model.register_forward_pre_hook(      # full forward passes only (not while traced)
        lambda _m, args: rows.append(args[0].shape[0]) if torch.is_tensor(args[0]) else None)
    adapter = ModelAdapter(model, MODALITIES, ["a", "b", "c"])
    items = instances(21)
    emap(adapter, items[1:])                          # traced (and cached) before counting
    rows.clear()
    interaction_type(adapter, items[0], items[1:])
    assert sum(rows) == 20 + CHECKED_PAIRS + 1, rows
    rows.clear()
    interaction_type(adapter, items[0], items[1:], factorized=False)
    assert sum(rows) == 20 * 20 + 2 * 20 + 1


def test_interaction_type_batches_as_emap_does():
    import inspect
    from multiviz_widgets.kernels.common import PERTURBATION_BATCH
    sig = inspect.signature
    assert (sig(interaction_type).parameters["batch_size"].default
            == sig(emap).parameters["batch_size"].default == PERTURBATION_BATCH)
    assert sig(interaction_type).parameters["factorized"].default is None


def test_interaction_type_falls_back_where_emap_does_and_says_why():
    adapter = ModelAdapter(InPlaceMix(), MODALITIES, ["a", "b", "c"])
    items = instances(6)
    r = emap(adapter, items)
    t = interaction_type(adapter, items[0], items)
    assert t["factorization"] == r.params["factorization"] == "none"
    assert t["factorized"] is False and "in-place" in t["factorization_note"]
    _assert_same_type(t, interaction_type(adapter, items[0], items, factorized=False))
    with pytest.raises(ValueError, match="in-place operations"):
        interaction_type(adapter, items[0], items, factorized=True)
    with pytest.raises(ValueError, match="factorized must be None, True, False"):
        interaction_type(adapter, items[0], items, factorized="fused")
    # an EmapResult as the reference: its own factorization, no forwards
    t = interaction_type(adapter, 2, r)
    assert (t["factorized"], t["factorization"]) == (False, "none")


class DeclaredWrongFar(Bilinear):
    """A declared split that is right near the references and wrong for a tabular input far
    from them (the instance): only the check on the instance itself can see it."""

    def encode_modality(self, name, x):
        if name == "tabular":
            return torch.tanh(self.t(x)) + (x.abs().amax(1, keepdim=True) > 50).float()
        return torch.tanh(self.s(x.flatten(1)))

    def fuse_encodings(self, enc):
        a, b = enc["tabular"], enc["series"]
        return self.head(torch.cat([a * b, a + b], 1))


def test_interaction_type_checks_the_split_on_the_instance_too():
    adapter = ModelAdapter(DeclaredWrongFar(), MODALITIES, ["a", "b", "c"])
    items = instances(6)
    far = dict(items[0], tabular=torch.tensor([100.0, 0.0, 0.0, 0.0]))
    assert interaction_type(adapter, items[0], items)["factorization"] == "declared"
    with pytest.raises(FactorizationError, match="encode_modality/fuse_encodings disagree"):
        interaction_type(adapter, far, items)
    assert interaction_type(adapter, far, items, factorized=False)["factorization"] == "none"


@pytest.mark.parametrize("factorized", [None, False])
def test_cancelling_interaction_type_stops_it_within_a_batch(factorized):
    from multiviz_widgets.progress import Cancelled
    model = Bilinear()
    adapter = ModelAdapter(model, MODALITIES, ["a", "b", "c"])
    items = instances(12)
    seen = []

    def progress(done, total, message):
        seen.append((done, total, message))
        if done > 0:
            raise Cancelled()
    with pytest.raises(Cancelled):
        interaction_type(adapter, items[0], items[1:], batch_size=5, progress=progress,
                         factorized=factorized)
    # (a split reports its encoding and check before the pairs, at 0 done)
    pairs = [s for s in seen if "reference pairs" in s[2]]
    assert [d for d, _, _ in pairs] == [0, 5] and pairs[1][1] == 11 * 11 + 2 * 11 + 1, seen
    assert all(d == 0 for d, _, _ in seen[:-1])
    fused = "(fused encodings)" in pairs[1][2]
    assert fused == (factorized is None)


def test_a_split_reports_its_encoding_and_check_before_the_pairs():
    """The encodings of the references and the split's check (N forward passes) came before
    the first pair's progress: a large reference set of a large encoder showed 0 pairs for
    minutes. They are said, counted, at 0 pairs done."""
    adapter = ModelAdapter(Bilinear(), MODALITIES, ["a", "b", "c"])
    items, seen = instances(10), []
    r = emap(adapter, items, batch_size=4, progress=lambda *a: seen.append(a))
    assert r.params["factorization"] == "traced"
    before = [m for d, _, m in seen if not m.startswith("EMAP pairs")]
    assert before == [f"EMAP: encoding the instances ({k} of 10)" for k in (0, 4, 8, 10)] + [
        f"EMAP: checking the split against forward passes ({k} of 18)"
        for k in (0, 4, 8, 10, 18)]
    first_pair = next(k for k, (d, _, m) in enumerate(seen) if d > 0)
    assert all(not m.startswith("EMAP:") for _, _, m in seen[first_pair:])
    d = dime(adapter, dataset(items), 0, reference_indices=range(1, 10), n_samples=20, batch_size=4,
             progress=lambda *a: seen.append(a), target=0)
    assert d.params["factorization"] == "traced"
    assert "DIME: encoding the instances (9 of 9)" in [m for _, _, m in seen]


def test_cancelling_during_the_encoding_stops_before_any_pair():
    from multiviz_widgets.progress import Cancelled
    adapter = ModelAdapter(Bilinear(), MODALITIES, ["a", "b", "c"])
    items = instances(10)
    check_instance_rows_independent(adapter, items[0])    # once per adapter, not EMAP's rows
    encoded, fused = [], []
    adapter.model.s.register_forward_hook(lambda _m, inp, _o: encoded.append(len(inp[0])))
    adapter.decision_layer.register_forward_pre_hook(lambda _m, inp: fused.append(len(inp[0])))

    def progress(done, total, message):
        if message.endswith("(4 of 10)"):
            raise Cancelled()
    with pytest.raises(Cancelled):
        emap(adapter, items, batch_size=4, progress=progress)
    assert encoded == [4] and fused == []


def test_interaction_type_falls_back_part_way_as_emap_does(monkeypatch):
    """A traced split that fails after some of its fused pairs (a RuntimeError): the full
    forward passes give the numbers, and progress never goes back."""
    from multiviz_widgets.kernels.factorize import Factorization
    adapter = ModelAdapter(Bilinear(), MODALITIES, ["a", "b", "c"])
    items = instances(7)
    slow = interaction_type(adapter, items[0], items[1:], factorized=False)
    real, calls = Factorization.fuse, [0]

    def fuse(self, rows):
        calls[0] += 1
        if calls[0] == 7:                # after the check (5 calls) and a batch of pairs
            raise RuntimeError("a tensor the trace could not follow")
        return real(self, rows)
    monkeypatch.setattr(Factorization, "fuse", fuse)
    seen = []
    t = interaction_type(adapter, items[0], items[1:], batch_size=4,
                         progress=lambda *a: seen.append(a))
    assert t["factorization"] == "none" and "not used this time" in t["factorization_note"]
    _assert_same_type(t, slow)
    done = [d for d, _, _ in seen]
    pairs = [d for d, _, m in seen if "reference pairs" in m]
    assert pairs[:2] == [0, 4] and done == sorted(done) and seen[-1][:2] == (49, 49), seen
