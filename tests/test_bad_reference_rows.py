"""A row of a dataset whose input the adapter refuses (a series given [channels, time], a row of
the wrong length, a NaN) among the instances that emap_gap, interaction_type and dime draw from
the dataset: it is left out with one UserWarning naming it, the result records it
(``left_out``, ``left_out_why``) and equals the result on the dataset without that row. Before,
one such row made each of them fail whole ("Instance 5: series: ..."), while extract_features
and the Explorer left it out. One given by index (``indices=``, ``reference_indices=``) is an
error saying so; the explained instance's own input, and the model's errors, still raise."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from multiviz_widgets import ModelAdapter, MultimodalDataset
from multiviz_widgets.adapter import ModelInputError
from multiviz_widgets.kernels.common import sample_indices
from multiviz_widgets.kernels.interactions import dime, emap_gap, interaction_type
from tests.test_emap_lengths import TwoTexts, adapter_for, items_of
from tests.test_factorize import MODALITIES, Bilinear, instances

N = 12
BAD = 5


def dataset(items, labels=None) -> MultimodalDataset:
    return MultimodalDataset({k: [it[k] for it in items] for k in items[0]}, labels=labels)


def adapter(model=None) -> ModelAdapter:
    return ModelAdapter(model if model is not None else Bilinear(), MODALITIES, ["a", "b", "c"],
                        decision_layer="head")


def labels_of(n: int) -> list[int]:
    return [k % 3 for k in range(n)]


def with_bad_rows(bad=(BAD,), how="channels first", n=N):
    """(the dataset with the rows ``bad`` refused by the adapter, the same dataset without
    them, the kept rows' indices in the first)."""
    items, labels = instances(n, seed=3), labels_of(n)
    spoilt = [dict(it) for it in items]
    for b in bad:
        if how == "channels first":
            spoilt[b]["series"] = items[b]["series"].T.contiguous()       # [2, 8]: refused
        else:
            spoilt[b]["tabular"] = torch.tensor([1.0, float("nan"), 0.0, 0.0])
    kept = [k for k in range(n) if k not in bad]
    return (dataset(spoilt, labels), dataset([items[k] for k in kept], [labels[k] for k in kept]),
            kept)


def left_out_warnings(record) -> list[str]:
    return [str(w.message) for w in record
            if issubclass(w.category, UserWarning) and "left out" in str(w.message)]


def run_recording(fn):
    """(fn(), the texts of the UserWarnings that leave instances out)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = fn()
    return out, left_out_warnings(record)


def same_gap(a: dict, b: dict) -> None:
    skip = {"indices", "left_out", "left_out_why", "seconds"}
    assert set(a) == set(b)
    for key in set(a) - skip:
        np.testing.assert_equal(a[key], b[key], err_msg=key)


# -- emap_gap -----------------------------------------------------------------------------------
def test_emap_gap_leaves_a_refused_row_out_and_equals_the_gap_without_it():
    ad = adapter()
    bad, clean, kept = with_bad_rows()
    r, said = run_recording(lambda: emap_gap(ad, bad, n=None))
    assert len(said) == 1
    assert said[0].startswith(f"emap_gap: 1 of the {N} instances of the dataset is left out, as "
                              f"the adapter refuses the input of instance {BAD}: series: ")
    assert f"over the other {N - 1}" in said[0] and "Instance" not in said[0]
    assert r["left_out"] == [BAD] and list(r["left_out_why"]) == [BAD]
    assert r["left_out_why"][BAD].startswith(f"Instance {BAD}: series:")
    assert r["n"] == N - 1 and r["indices"] == kept
    # the same instances, in the same order: the same gap, intervals and accuracies
    same_gap(r, emap_gap(ad, clean, n=None))
    same_gap(r, emap_gap(ad, bad, indices=kept))
    assert emap_gap(ad, clean, n=None)["left_out"] == []


def test_emap_gap_with_a_refused_row_drawn_keeps_the_others_of_the_draw():
    ad = adapter()
    bad, _, _ = with_bad_rows()
    seed = next(s for s in range(50) if BAD in sample_indices(N, 6, s))
    drawn = sample_indices(N, 6, seed)
    r, said = run_recording(lambda: emap_gap(ad, bad, n=6, seed=seed))
    assert len(said) == 1 and f"instances drawn (n=6, seed={seed})" in said[0]
    kept = [int(i) for i in drawn if i != BAD]
    assert r["indices"] == kept and r["n"] == 5 and r["left_out"] == [BAD]
    same_gap(r, emap_gap(ad, bad, indices=kept))


def test_emap_gap_with_three_modalities_draws_its_permutations_over_the_rows_kept():
    """M > 2: EMAP's permutations are drawn over the N instances kept, so the seed gives the
    numbers of the dataset without the row (repeats too)."""
    ad = adapter_for(TwoTexts(), ("question", "answer"))
    items = items_of(9, seed=1, answers=True)
    spoilt = [dict(it) for it in items]
    spoilt[4]["tabular"] = torch.tensor([1.0, 0.0])                     # 2 values of 4
    labels = labels_of(9)
    kept = [k for k in range(9) if k != 4]
    r, said = run_recording(lambda: emap_gap(ad, dataset(spoilt, labels), n=None, seed=3,
                                             repeats=3))
    assert len(said) == 1 and "instance 4: tabular: a row must have 4 values" in said[0]
    clean = emap_gap(ad, dataset([items[k] for k in kept], [labels[k] for k in kept]), n=None,
                     seed=3, repeats=3)
    same_gap(r, clean)
    assert r["left_out"] == [4] and r["n"] == 8


def test_emap_gap_with_a_refused_row_in_indices_raises_naming_it_as_given():
    ad = adapter()
    bad, _, _ = with_bad_rows()
    with pytest.raises(ValueError, match=rf"^Instance {BAD}: series: .* \(instance {BAD} is one "
                                         r"of the indices given: remove it from them"):
        emap_gap(ad, bad, indices=[0, BAD, 6])


def test_a_row_with_a_nan_is_left_out_as_refused_too():
    ad = adapter()
    bad, clean, _ = with_bad_rows(how="nan")
    r, said = run_recording(lambda: emap_gap(ad, bad, n=None))
    assert len(said) == 1 and "holds non-finite values" in said[0]
    same_gap(r, emap_gap(ad, clean, n=None))


def test_many_refused_rows_are_named_a_few_then_counted_in_one_warning():
    ad = adapter()
    rows = (1, 2, 4, 5, 7, 8, 10)
    bad, clean, kept = with_bad_rows(rows, n=16)
    r, said = run_recording(lambda: emap_gap(ad, bad, n=None))
    assert len(said) == 1
    assert ("7 of the 16 instances of the dataset are left out, as the adapter refuses the "
            "inputs of instances 1, 2, 4, 5, 7 and 2 more (on instance 1: series: ") in said[0]
    assert r["left_out"] == list(rows) and r["indices"] == kept
    same_gap(r, emap_gap(ad, clean, n=None))


def test_fewer_than_two_rows_left_is_a_clear_error():
    ad = adapter()
    bad, _, _ = with_bad_rows((0, 2), n=3)
    with pytest.raises(ValueError, match=r"^emap_gap: of the 3 instances of the dataset, 1 has "
                                         r"an input the adapter takes, and at least 2 are needed; "
                                         r"the adapter refuses the inputs of instances 0 and 2"):
        emap_gap(ad, bad, n=None)
    with pytest.raises(ValueError, match=r"^dime: of the 3 references .* 1 has an input"):
        dime(ad, bad, 1, n_samples=8)


# -- interaction_type ---------------------------------------------------------------------------
def test_interaction_type_leaves_a_refused_reference_out_and_equals_it_without_it():
    ad = adapter()
    bad, clean, kept = with_bad_rows()
    t, said = run_recording(lambda: interaction_type(ad, 0, reference=bad))
    assert len(said) == 1 and said[0].startswith(
        f"interaction_type: 1 of the {N} references (all the instances of the dataset, as "
        f"n_reference=50) is left out, as the adapter refuses the input of instance {BAD}")
    assert "reference_indices= chooses the references" in said[0]
    assert t["left_out"] == [BAD] and t["reference_size"] == N - 1
    u = interaction_type(ad, 0, reference=clean)
    assert u["left_out"] == [] and t["label"] == u["label"]
    for key in ("logits", "emap_logits", "grand_mean", "interaction", "margins"):
        np.testing.assert_equal(t[key], u[key], err_msg=key)
    for m in ad.names:
        np.testing.assert_equal(t["unimodal"][m], u["unimodal"][m])
    # the instance as a dict: the same
    np.testing.assert_equal(interaction_type(ad, bad[0], reference=clean)["emap_logits"],
                            t["emap_logits"])


def test_interaction_type_drawn_references_say_so_and_match_the_kept_ones_given():
    ad = adapter()
    bad, _, _ = with_bad_rows()
    seed = next(s for s in range(50) if BAD in sample_indices(N, 6, s))
    t, said = run_recording(lambda: interaction_type(ad, 0, reference=bad, n_reference=6,
                                                     seed=seed))
    assert len(said) == 1 and f"drawn at random (n_reference=6, seed={seed})" in said[0]
    kept = [int(i) for i in sample_indices(N, 6, seed) if i != BAD]
    u = interaction_type(ad, 0, reference=bad, reference_indices=kept, seed=seed)
    assert t["reference_size"] == 5 and u["left_out"] == []
    np.testing.assert_equal(t["emap_logits"], u["emap_logits"])


def test_interaction_type_refused_references_given_or_instance_still_raise():
    ad = adapter()
    bad, _, _ = with_bad_rows()
    with pytest.raises(ValueError, match=rf"^Instance {BAD}: series: .* \(instance {BAD} is one "
                                         "of the reference_indices given: remove it from them"):
        interaction_type(ad, 0, reference=bad, reference_indices=[1, BAD, 6])
    with warnings.catch_warnings(record=True) as record:     # no warning before the error
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"^series: a series must be \[time, 2 channels\]"):
            interaction_type(ad, BAD, reference=bad)
    assert not left_out_warnings(record)


# -- dime ---------------------------------------------------------------------------------------
def test_dime_leaves_a_refused_reference_drawn_out_and_says_how_to_choose_them():
    ad = adapter()
    bad, clean, kept = with_bad_rows()
    r, said = run_recording(lambda: dime(ad, bad, 0, n_samples=16))
    assert len(said) == 1
    assert said[0].startswith(f"dime: 1 of the {N} references (all the instances of the "
                              f"dataset, as n_reference=50) is left out, as the adapter refuses "
                              f"the input of instance {BAD}: series:")
    assert "reference_indices= chooses the references" in said[0]
    assert r.params["left_out"] == [BAD] and r.params["n_reference"] == N - 1
    assert list(r.reference_indices) == kept
    u = dime(ad, clean, 0, n_samples=16)
    assert u.params["left_out"] == [] and u.params["left_out_why"] == {}
    for m in ad.names:
        np.testing.assert_equal(r.uc[m], u.uc[m])
        np.testing.assert_equal(r.mi[m], u.mi[m])
    assert (r.f_value, r.uc_value, r.mi_value) == (u.f_value, u.uc_value, u.mi_value)


def test_dime_references_drawn_at_random_match_the_kept_ones_given():
    ad = adapter()
    bad, _, _ = with_bad_rows()
    seed = next(s for s in range(50) if BAD in sample_indices(N, 6, s))
    r, said = run_recording(lambda: dime(ad, bad, 0, n_reference=6, seed=seed, n_samples=16))
    assert len(said) == 1 and f"references drawn at random (n_reference=6, seed={seed})" in said[0]
    kept = [int(i) for i in sample_indices(N, 6, seed) if i != BAD]
    u = dime(ad, bad, 0, reference_indices=kept, seed=seed, n_samples=16)
    assert list(r.reference_indices) == kept and r.params["n_reference"] == 5
    for m in ad.names:
        np.testing.assert_equal(r.uc[m], u.uc[m])


def test_dime_refused_references_given_or_instance_still_raise():
    ad = adapter()
    bad, _, _ = with_bad_rows()
    with pytest.raises(ValueError, match=rf"^Instance {BAD}: series: .* \(instance {BAD} is one "
                                         "of the reference_indices given: remove it from them"):
        dime(ad, bad, 0, reference_indices=[1, BAD, 2, 3], n_samples=8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"^series: a series must be \[time, 2 channels\]"):
            dime(ad, bad, BAD, n_samples=8)
    assert not left_out_warnings(record)


# -- the model's own errors ---------------------------------------------------------------------
class FailsOnLargeValues(Bilinear):
    """Takes every input the adapter gives, but fails on a row whose first value is large."""

    def forward(self, tabular, series):
        if bool((tabular[:, 0] > 50).any()):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (odd row)")
        return super().forward(tabular, series)


class AlwaysFails(Bilinear):
    def forward(self, tabular, series):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x4 and 5x3)")


def test_a_model_that_fails_on_every_row_still_raises_and_leaves_nothing_out():
    items, labels = instances(8, seed=3), labels_of(8)
    items[5]["tabular"] = torch.tensor([99.0, 0.0, 0.0, 0.0])
    ds = dataset(items, labels)
    for model in (AlwaysFails(),):
        ad = adapter(model)
        for call in (lambda: emap_gap(ad, ds, n=None),
                     lambda: interaction_type(ad, 0, reference=ds),
                     lambda: dime(ad, ds, 0, n_samples=8)):
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                with pytest.raises((ModelInputError, RuntimeError, ValueError)):
                    call()
            assert not left_out_warnings(record)


def test_a_model_that_fails_on_one_row_leaves_it_out_when_drawn_and_names_it_when_given():
    items, labels = instances(8, seed=3), labels_of(8)
    items[5]["tabular"] = torch.tensor([99.0, 0.0, 0.0, 0.0])
    ad, ds = adapter(FailsOnLargeValues()), dataset(items, labels)
    r, said = run_recording(lambda: emap_gap(ad, ds, n=None))
    assert r["left_out"] == [5] and len(said) == 1
    t, said = run_recording(lambda: interaction_type(ad, 0, reference=ds, n_reference=8))
    assert t["left_out"] == [5] and len(said) == 1
    d, said = run_recording(lambda: dime(ad, ds, 0, n_samples=8, n_reference=8))
    assert d.params["left_out"] == [5] and len(said) == 1
    assert "the model cannot run instance 5 alone" in said[0], said
    assert list(d.reference_indices) == [k for k in range(8) if k != 5]
    with pytest.raises(ModelInputError, match="instance 5 of the indices given|instances given"):
        emap_gap(ad, ds, indices=range(8))
    with pytest.raises(ModelInputError, match="dime: the model cannot run instance 5 of the "
                                              "reference_indices given, alone"):
        dime(ad, ds, 0, n_samples=8, reference_indices=range(8))


# -- a row the model cannot run alone ---------------------------------------------------------
def with_short_row(n=N, short=BAD):
    """(a dataset whose row ``short`` has a series of 7 steps, which the adapter takes and the
    model (a Linear over 8 x 2 values) cannot run, the indices of the other rows)."""
    items, labels = instances(n, seed=3), labels_of(n)
    spoilt = [dict(it) for it in items]
    spoilt[short]["series"] = items[short]["series"][:7]
    return dataset(spoilt, labels), [k for k in range(n) if k != short]


def test_a_row_the_model_cannot_run_alone_is_left_out_of_what_is_drawn():
    """A 47-step series among 48-step ones: interaction_type and dime raised the model's bare
    error without the instance, emap_gap named it as "emap: ... of the 12 instances given" and
    advised indices=, which then made every refused row an error."""
    ad = adapter()
    bad, kept = with_short_row()
    r, said = run_recording(lambda: emap_gap(ad, bad, n=None))
    assert len(said) == 1 and said[0].startswith(
        f"emap_gap: 1 of the {N} instances of the dataset is left out, as the model cannot run "
        f"instance {BAD} alone (on instance {BAD}: "), said
    assert r["left_out"] == [BAD] and r["left_out_why"][BAD].startswith("the model fails on it")
    same_gap(r, emap_gap(ad, bad, indices=kept))
    t, said = run_recording(lambda: interaction_type(ad, 0, reference=bad, n_reference=N))
    assert len(said) == 1 and "the model cannot run instance 5 alone" in said[0], said
    assert t["left_out"] == [BAD] and t["reference_size"] == N - 1
    given = interaction_type(ad, 0, reference=bad, reference_indices=kept)
    np.testing.assert_equal({k: v for k, v in t.items() if not k.startswith("left_out")},
                            {k: v for k, v in given.items() if not k.startswith("left_out")})
    # given by index: an error naming it as given, and the method
    with pytest.raises(ModelInputError, match=r"interaction_type: the model cannot run instance "
                                              r"5 of the reference_indices given, alone"):
        interaction_type(ad, 0, reference=bad, reference_indices=range(N))
    with pytest.raises(ModelInputError, match=r"^emap_gap: the model cannot run 1 of the 12 "):
        emap_gap(ad, bad, indices=range(N))


def test_a_retry_without_a_row_goes_on_with_the_progress_and_warns_of_its_cost_once(monkeypatch):
    """The retry reported from 0 of a smaller total after the first attempt's (132, 144), and
    gave the cost warning again."""
    from multiviz_widgets.kernels import emap as emap_module
    monkeypatch.setattr(emap_module, "EMAP_WARN_SECONDS", 0.0)
    ad = adapter()
    bad, _ = with_short_row(short=N - 1)                  # the last row: found late
    for call in (lambda p: emap_gap(ad, bad, n=None, batch_size=4, progress=p),
                 lambda p: interaction_type(ad, 0, reference=bad, n_reference=N, batch_size=4,
                                            progress=p),
                 lambda p: dime(ad, bad, 0, n_samples=8, n_reference=N, batch_size=4,
                                progress=p)):
        seen = []
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            call(lambda d, t, m: seen.append((d, t)))
        done = [d for d, _ in seen]
        assert done == sorted(done) and len({t for _, t in seen}) == 1, seen
        assert seen[-1][0] == seen[-1][1]
        costs = [w for w in record if "at the rate of its first batches" in str(w.message)]
        assert len(costs) <= 1
