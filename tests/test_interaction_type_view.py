"""The Explorer's line on how the modalities combine at the selected instance (its interaction
type: dominance, complement, conflict, undecided), under the heatmap's caption: what it says for
each type, that it follows the instance (and only the instance), that data stays text, and that
a failure is said on the line without taking the page's error."""
from __future__ import annotations

import threading

import ipywidgets as W
import numpy as np
import pytest
import torch
from torch import nn

from multiviz_widgets import ModelAdapter, MultimodalDataset, Tabular, TimeSeries
from multiviz_widgets.engine import TYPE_REFERENCES, Analyses, Engine, Kernels
from multiviz_widgets.explorer import Explorer
from multiviz_widgets.kernels.emap import interaction_type
from multiviz_widgets.views.heatmap_view import combination_text

from .explorer_support import CLASSES, FakeKernels, tiny_three, tiny_vqa
from .test_explorer import _until, nan_for_instance_3


_SAME = object()


def _kind(label, predicted, alone, emap_prediction=_SAME, dominant=None, n=50):
    return {"label": label, "predicted": predicted, "unimodal_predictions": alone,
            "emap_prediction": predicted if emap_prediction is _SAME else emap_prediction,
            "dominant": dominant, "reference_size": n}


def test_each_type_is_said_with_the_prediction_and_what_each_modality_alone_predicts():
    names = ["no", "yes", "circle"]
    text = combination_text(_kind("dominance", 2, {"image": 2, "question": 0},
                                  dominant="image"), names)
    assert text.startswith("How the modalities combine: dominance. The model predicts "
                           "'circle'; on its own, 'image' already does (")
    assert text.endswith("(with the other modality's input averaged over 50 instances of the "
                         "dataset, 'image' alone predicts 'circle' and 'question' alone 'no').")
    both = combination_text(_kind("complement", 1, {"image": 1, "question": 1}), names)
    assert ("The model predicts 'yes'; so does each modality on its own, and so do their "
            "effects added up") in both
    neither = combination_text(_kind("complement", 1, {"image": 0, "question": 2}), names)
    assert ("The model predicts 'yes'; no modality on its own does, their effects added up "
            "do") in neither
    conflict = combination_text(_kind("conflict", 2, {"image": 0, "question": 0},
                                      emap_prediction=0), names)
    assert ("The model predicts 'circle'; added up, the modalities' separate effects would "
            "predict 'no': their interaction decides") in conflict
    tied = combination_text(_kind("conflict", 2, {"image": 0, "question": 0},
                                  emap_prediction=None), names)
    assert "separate effects would pick no class (a tie): their interaction decides" in tied
    tie = combination_text(_kind("undecided", 0, {"image": None, "question": 1},
                                 emap_prediction=None), names)
    assert "top two classes tie" in tie and "'image' alone predicts no class (a tie)" in tie
    some = combination_text(_kind("complement", 0, {"a": 0, "b": 0, "c": 1}), names)
    assert "predicts 'no'; so do 'a' and 'b' on their own, and their effects added up (" in some
    three = combination_text(_kind("complement", 0, {"a": 0, "b": 0, "c": 0}), names)
    assert ("the other modalities' inputs averaged over 50 instances of the dataset, 'a' alone "
            "predicts 'no', 'b' alone 'no' and 'c' alone 'no')") in three
    left = combination_text({**_kind("complement", 0, {"a": 0, "b": 0}, n=49),
                             "reference_left_out": 1}, names)
    assert ("over 49 instances of the dataset (1 more left out: 1 for which the model gives "
            "no finite output)") in left
    why = combination_text({**_kind("complement", 0, {"a": 0, "b": 0}, n=46),
                            "reference_left_out": 4,
                            "reference_left_out_why": {"input": 2, "model": 1, "output": 1}},
                           names)
    assert ("over 46 instances of the dataset (4 more left out: 2 whose input the adapter "
            "refuses; 1 the model fails on; 1 for which the model gives no finite output)"
            ) in why


def test_names_from_data_stay_text_and_keep_their_case():
    text = combination_text(_kind("dominance", 3, {"mRNA": 3, "eHR": 0}, dominant="mRNA"),
                            CLASSES)
    assert "The model predicts '<b>bold</b>'; on its own, 'mRNA' already does" in text
    assert "'eHR' alone 'red'" in text


def _explorer(adapter, ds, kernels=None, **kw):
    return Explorer(adapter, ds, kernels=kernels or FakeKernels(), delay=0.02, **kw)


def test_the_line_shows_the_kernels_type_of_the_selected_instance_and_follows_it():
    adapter, ds = tiny_vqa()
    ex = _explorer(adapter, ds)
    try:
        assert ex.wait(60)
        for i in (0, 5):
            if i:
                ex.select(instance=i)
                assert ex.wait(60)
            want = interaction_type(adapter, i, reference=ds,
                                    n_reference=min(TYPE_REFERENCES, len(ds)))
            st = ex.state()
            assert st["interaction_type"] == want["label"], (i, st["interaction_type_text"])
            assert st["interaction_type_text"] == combination_text(want, adapter.class_names)
            assert f"averaged over {len(ds)} instances" in st["interaction_type_text"]
        # shown as text, in labels (never HTML)
        line = ex.heatmap_view.combination
        assert line in ex.heatmap_view.children and line.layout.display is None
        assert all(type(w) is W.Label for w in line.children)
        assert st["error"] == ""
    finally:
        ex.close()


class _Counting(FakeKernels):
    """Counts the instances whose interaction type it computes (``typed``); ``gated``: each
    waits first for ``gate``, reporting progress (where a cancel stops it)."""

    def __init__(self, gated: bool = False):
        super().__init__()
        self.typed = []
        self.gate = threading.Event() if gated else None
        self.started = threading.Event()

    def interaction_type(self, adapter, dataset, index, reference_indices, progress=None,
                         **params):
        self.started.set()
        while self.gate is not None and not self.gate.wait(0.01):
            progress(0, 1, "waiting")
        self.typed.append(index)
        return super().interaction_type(adapter, dataset, index, reference_indices, progress,
                                        **params)


def test_the_type_is_computed_once_per_instance_not_per_target_method_or_pair():
    adapter, ds = tiny_three()
    kernels = _Counting()
    ex = _explorer(adapter, ds, kernels)
    try:
        assert ex.wait(60)
        shown = ex.state()["interaction_type_text"]
        ex.select(target=1)
        assert ex.state()["interaction_type_text"] == shown      # not asked again: no flash
        assert ex.wait(60)
        ex.select(interaction_method="pairwise_ablation")
        assert ex.wait(60)
        pairs = ex.heatmap_view.selection.pair
        assert kernels.typed == [0], (kernels.typed, pairs)
        ex.select(instance=2)
        assert ex.wait(60)
        ex.select(instance=0)                     # back: from the cache
        assert ex.wait(60)
        assert kernels.typed == [0, 2]
        assert ex.state()["interaction_type"] in ("dominance", "complement", "conflict",
                                                  "undecided")
        assert "the other modalities' inputs averaged" in ex.state()["interaction_type_text"]
    finally:
        ex.close()


def test_a_failure_is_said_on_the_line_and_the_page_keeps_its_own_error():
    """Instance 3's output is NaN: it is left out of the other instances' references (before,
    every instance's line failed on it), and its own line says why it has none."""
    adapter, ds = nan_for_instance_3()
    ex = _explorer(adapter, ds)
    try:
        assert ex.wait(60)
        st = ex.state()
        assert st["error"] == "" and st["interaction_type"] in ("dominance", "complement",
                                                                "conflict", "undecided")
        assert (f"averaged over {len(ds) - 1} instances of the dataset (1 more left out: 1 for "
                "which the model gives no finite output)") in st["interaction_type_text"]
        ex.select(instance=3)
        assert ex.wait(60)
        st = ex.state()
        assert st["interaction_type"] == ""
        assert st["interaction_type_text"].startswith(
            "How the modalities combine at #3: not computed (")
        assert "NaN or infinite" in st["interaction_type_text"]
        assert "instance 3 is not finite" in st["error"]
    finally:
        ex.close()


class _OneScore(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 1), nn.Linear(4, 1)

    def forward(self, tab, series):
        return self.a(tab) * self.b(series.mean(1))


def test_no_type_for_a_model_with_one_output_nor_a_one_instance_dataset():
    mods = [Tabular("tab", columns=list("abc")),
            TimeSeries("series", channels=list("wxyz"), window=2)]
    rng = np.random.default_rng(0)
    ds = MultimodalDataset({"tab": [rng.normal(size=3).astype(np.float32) for _ in range(4)],
                            "series": [rng.normal(size=(6, 4)).astype(np.float32)
                                       for _ in range(4)]})
    engine = Engine()
    try:
        one = ModelAdapter(_OneScore().eval(), mods, ["score"])
        assert Analyses(engine, one, ds, kernels=Kernels()).interaction_type(0) is None
        adapter, vqa = tiny_vqa(n=1)
        assert Analyses(engine, adapter, vqa, kernels=Kernels()).interaction_type(0) is None
    finally:
        engine.close()


def test_method_params_set_the_reference_set_or_turn_the_line_off():
    adapter, ds = tiny_vqa()
    ex = _explorer(adapter, ds, method_params={"interaction_type": {"n_reference": 4,
                                                                    "seed": 3}})
    try:
        assert ex.wait(60)
        want = interaction_type(adapter, 0, reference=ds, n_reference=4, seed=3)
        assert ex.state()["interaction_type_text"] == combination_text(want, adapter.class_names)
        assert "averaged over 4 instances" in ex.state()["interaction_type_text"]
    finally:
        ex.close()
    ex = _explorer(adapter, ds, method_params={"interaction_type": {"n_reference": 0}})
    try:
        assert ex.wait(60)
        assert ex.state()["interaction_type_text"] == ""
        assert ex.heatmap_view.combination.layout.display == "none"
    finally:
        ex.close()


@pytest.mark.parametrize("params, error, match", [
    ({"n_reference": 1}, ValueError, "0 for no line, or 2 or more"),
    ({"n_reference": -2}, ValueError, "n_reference"),
    ({"n_reference": 2.5}, ValueError, "n_reference"),
    ({"references": 9}, TypeError, r"interaction_type does not take.*n_reference"),
    ({"seed": -1}, ValueError, "seed"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"factorized": "maybe"}, ValueError, "factorized must be"),
])
def test_method_params_of_the_line_are_checked_when_the_explorer_opens(params, error, match):
    adapter, ds = tiny_vqa()
    with pytest.raises(error, match=match):
        Explorer(adapter, ds, kernels=FakeKernels(),
                 method_params={"interaction_type": params}).close()


def test_a_cancel_stops_the_line_which_is_asked_again_on_the_next_click():
    adapter, ds = tiny_vqa()
    kernels = _Counting(gated=True)
    ex = _explorer(adapter, ds, kernels)
    try:
        assert kernels.started.wait(30)
        assert "computing" in ex.state()["interaction_type_text"]
        ex.progress_panel.cancel.click()
        assert ex.wait(30)
        assert ex.state()["interaction_type_text"] == (
            "How the modalities combine at #0: not computed (Cancelled; asked again on the "
            "next click)")
        kernels.gate.set()
        ex.select(unit=("question", 1))
        assert ex.wait(60)
        assert ex.state()["interaction_type"] != "" and kernels.typed == [0]   # after the gate
    finally:
        kernels.gate.set()
        ex.close()


def test_recompute_computes_the_line_again_for_new_weights():
    adapter, ds = tiny_vqa()
    kernels = _Counting()
    ex = _explorer(adapter, ds, kernels)
    try:
        assert ex.wait(60)
        with torch.no_grad():
            adapter.model.head.weight.mul_(-3)
        ex.controls.refresh_button.click()
        assert ex.wait(60)
        want = interaction_type(adapter, 0, reference=ds, n_reference=len(ds))
        assert kernels.typed == [0, 0]
        assert ex.state()["interaction_type_text"] == combination_text(want,
                                                                       adapter.class_names)
    finally:
        ex.close()


def test_the_line_gives_way_to_a_later_click_and_comes_back_behind_it():
    """Before: a change of target waited for the whole interaction type (N^2 pairs, thousands
    of full passes for a model that does not split) before its matrix was computed."""
    adapter, ds = tiny_vqa()
    kernels = _Counting(gated=True)
    ex = _explorer(adapter, ds, kernels)
    try:
        assert kernels.started.wait(30)
        ex.select(target=1)
        asked = f"for class '{CLASSES[1]}'"
        # while the gate is still closed
        assert _until(lambda: asked in ex.heatmap_view.caption.value, 20)
        assert "computing" in ex.state()["interaction_type_text"]
        kernels.gate.set()
        assert ex.wait(60)
        want = interaction_type(adapter, 0, reference=ds, n_reference=len(ds))
        assert ex.state()["interaction_type_text"] == combination_text(want,
                                                                       adapter.class_names)
    finally:
        kernels.gate.set()
        ex.close()


def test_the_seed_draws_the_references_and_the_three_modality_permutations():
    adapter, ds = tiny_three()
    ex = _explorer(adapter, ds, method_params={"interaction_type": {"seed": 3}})
    try:
        assert ex.wait(60)
        want = interaction_type(adapter, 0, reference=ds, n_reference=len(ds), seed=3)
        assert ex.state()["interaction_type_text"] == combination_text(want,
                                                                       adapter.class_names)
    finally:
        ex.close()


def test_an_instance_the_model_fails_on_is_left_out_of_the_references():
    adapter, ds = tiny_vqa()
    forward = adapter.model.forward
    bad = torch.as_tensor(ds[5]["image"]).permute(2, 0, 1)

    def fails_on_5(image, question):
        if any(torch.equal(row, bad) for row in image):
            raise ZeroDivisionError("instance 5")
        return forward(image, question)
    adapter.model.forward = fails_on_5
    ex = _explorer(adapter, ds)
    try:
        assert ex.wait(60)
        assert "(1 more left out: 1 the model fails on)" in ex.state()["interaction_type_text"]
    finally:
        ex.close()


def test_an_input_the_adapter_refuses_is_left_out_as_such_and_one_instance_is_said():
    """A NaN in an instance's input was said to be the model's non-finite output (the model
    never ran on it); a dataset of one instance left the line empty, with no reason."""
    adapter, ds = tiny_vqa()
    images = [np.asarray(ds[k]["image"], dtype=np.float32) for k in range(len(ds))]
    images[5] = images[5].copy()
    images[5][0, 0, 0] = np.nan
    columns = {"image": images, "question": [ds[k]["question"] for k in range(len(ds))]}
    ex = _explorer(adapter, MultimodalDataset(columns))
    try:
        assert ex.wait(60)
        assert ("(1 more left out: 1 whose input the adapter refuses)"
                in ex.state()["interaction_type_text"])
    finally:
        ex.close()
    one = MultimodalDataset({k: v[:1] for k, v in columns.items()})
    ex = _explorer(adapter, one)
    try:
        assert ex.wait(60)
        assert ex.state()["interaction_type_text"] == (
            "How the modalities combine: not computed (EMAP averages over instances of the "
            "dataset, and it has 1: at least 2 are needed)")
    finally:
        ex.close()
    for k in (1, 2):                       # of 3 instances, 2 refused: the reason, not the model
        images[k] = images[5]
    three = MultimodalDataset({k: v[:3] for k, v in columns.items()})
    ex = _explorer(adapter, three)
    try:
        assert ex.wait(60)
        # (no other draw: the dataset has no other instances)
        assert ("Of the 3 instances drawn for EMAP's averages, 1 can be used, and at least 2 "
                "are needed; left out: 2 whose input the adapter refuses. Fix those inputs.)"
                ) in ex.state()["interaction_type_text"]
    finally:
        ex.close()


def test_a_model_that_fails_on_every_input_is_not_called_non_finite():
    """A model raising on every input (a transpose forgotten in forward) got "0 have a finite
    output ... Make the model finite on the dataset, or set ... seed to draw others": neither
    is the cause nor helps."""
    adapter, ds = tiny_vqa()
    def fail(_module, _args):
        # (on the workers: the Explorer's own check of the output, when it opens, runs on the
        # kernel's thread and is left to pass)
        if threading.current_thread().name.startswith("multiviz-engine"):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    handle = adapter.model.register_forward_pre_hook(fail)
    ex = _explorer(adapter, ds)
    try:
        assert ex.wait(60)
        text = ex.state()["interaction_type_text"]
        assert (f"Of the {min(len(ds), 50)} instances drawn for EMAP's averages, 0 can be used, "
                f"and at least 2 are needed; left out: {min(len(ds), 50)} the model fails on. "
                "Fix what makes the model fail on them (the other views show its error for "
                "this instance).)") in text, text
        assert "finite" not in text and "seed" not in text
    finally:
        ex.close()
        handle.remove()


def test_a_line_turned_off_never_shows_nor_asks():
    adapter, ds = tiny_vqa()
    kernels = _Counting()
    ex = _explorer(adapter, ds, kernels, method_params={"interaction_type": {"n_reference": 0}})
    shown = []
    ex.heatmap_view.combination.layout.observe(lambda c: shown.append(c["new"]), "display")
    try:
        for i in (1, 2, 3):
            ex.select(instance=i)
            assert ex.wait(60)
        assert shown == [] and kernels.typed == []
        assert ex.heatmap_view.combination.layout.display == "none"
    finally:
        ex.close()


def test_checking_the_references_reports_progress_where_a_stale_line_stops():
    """Each reference is a pass of its own, waiting for the model while the dataset's features
    pass holds it: with no progress report among them, the line of an instance left behind
    held the click lane for 17 s. A report comes before each, and a cancel there stops the
    line before the next reference's pass."""
    from multiviz_widgets.progress import Cancelled
    adapter, ds = tiny_vqa()
    analyses = Analyses(Engine(delay=0.0), adapter, ds, kernels=Kernels())
    n = analyses.interaction_type_references()
    passes, said = [], []
    predict = adapter.predict
    adapter.predict = lambda *a, **k: passes.append(1) or predict(*a, **k)

    def stop_at_the_third(done, total, message=""):
        said.append((done, total, message))
        if done == 2:
            raise Cancelled("a click elsewhere")
    with pytest.raises(Cancelled):
        analyses.interaction_type(0, stop_at_the_third)
    assert said[0] == (0, n, "checking the instances EMAP averages over"), said
    assert len(said) == 3 and len(passes) == 2           # two references' passes, no more


def test_the_projection_gets_the_features_as_stored_not_copies_of_them():
    """Analyses.projection made a float64 copy of the features and a copy of every row before
    the kernel, which converts chunk by chunk: 1.7 GB for 100,000 x 1,024 float32 features,
    where the projection itself needs about 0.1 GB. Only rows that are not finite are left
    out by a copy."""
    from multiviz_widgets.kernels.representations import Features, extract_features
    adapter, ds = tiny_vqa()
    got = []

    class Seen(Kernels):
        def projection(self, h):
            got.append(h)
            return super().projection(h)
    real = extract_features(adapter, ds, cache=False)
    h = np.array(real.h, dtype=np.float32)
    feats = Features(h, real.logits, real.indices)
    analyses = Analyses(Engine(delay=0.0), adapter, ds, kernels=Seen(), features=feats)
    rows, coords = analyses.projection()
    assert got[0] is feats.h or np.shares_memory(got[0], feats.h)
    assert rows.tolist() == list(range(len(ds))) and coords.shape == (len(ds), 3)
    h[3] = np.nan                                                    # one row left out
    analyses = Analyses(Engine(delay=0.0), adapter, ds, kernels=Seen(), features=feats)
    rows, coords = analyses.projection()
    assert 3 not in rows.tolist() and got[1].dtype == np.float32 and len(got[1]) == len(ds) - 1
