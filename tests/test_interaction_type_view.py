"""The Explorer's line on how the modalities combine at the selected instance (its interaction
type: dominance, complement, conflict, undecided), under the heatmap's caption: what it says for
each type, that it follows the instance (and only the instance), that data stays text, and that
a failure is said on the line without taking the page's error."""
from __future__ import annotations

import ipywidgets as W
import numpy as np
import pytest
from torch import nn

from multiviz_widgets import ModelAdapter, MultimodalDataset, Tabular, TimeSeries
from multiviz_widgets.engine import TYPE_REFERENCES, Analyses, Engine, Kernels
from multiviz_widgets.explorer import Explorer
from multiviz_widgets.kernels.emap import interaction_type
from multiviz_widgets.views.heatmap_view import combination_text

from .explorer_support import CLASSES, FakeKernels, tiny_three, tiny_vqa
from .test_explorer import nan_for_instance_3


def _kind(label, predicted, alone, emap_prediction=None, dominant=None, n=50):
    return {"label": label, "predicted": predicted, "unimodal_predictions": alone,
            "emap_prediction": predicted if emap_prediction is None else emap_prediction,
            "dominant": dominant, "reference_size": n}


def test_each_type_is_said_with_what_each_modality_alone_predicts():
    names = ["no", "yes", "circle"]
    text = combination_text(_kind("dominance", 2, {"image": 2, "question": 0},
                                  dominant="image"), names)
    assert text.startswith("How the modalities combine: dominance. Image alone already "
                           "predicts 'circle'")
    assert "(each alone, the other averaged over 50 instances by EMAP: image 'circle', " \
           "question 'no')." in text
    both = combination_text(_kind("complement", 1, {"image": 1, "question": 1}), names)
    assert "Each modality alone predicts 'yes', and so do their effects added up" in both
    neither = combination_text(_kind("complement", 1, {"image": 0, "question": 2}), names)
    assert "No modality alone predicts 'yes'; their effects added up do" in neither
    conflict = combination_text(_kind("conflict", 2, {"image": 0, "question": 0},
                                      emap_prediction=0), names)
    assert ("Added up, the modalities' separate effects would predict 'no'; their interaction "
            "makes it 'circle'") in conflict
    tie = combination_text(_kind("undecided", 0, {"image": None, "question": 1},
                                 emap_prediction=None), names)
    assert "top two classes tie" in tie and "image no class (a tie)" in tie
    three = combination_text(_kind("complement", 0, {"a": 0, "b": 0, "c": 0}), names)
    assert "the others averaged" in three


def test_class_names_from_data_stay_text():
    text = combination_text(_kind("conflict", 3, {"image": 0, "question": 0},
                                  emap_prediction=0), CLASSES)
    assert "'<b>bold</b>'" in text and "'red'" in text


def _explorer(adapter, ds, kernels=None):
    return Explorer(adapter, ds, kernels=kernels or FakeKernels(), delay=0.02)


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
    def __init__(self):
        super().__init__()
        self.typed = []

    def interaction_type(self, adapter, dataset, index, n_reference, progress=None, **params):
        self.typed.append(index)
        return super().interaction_type(adapter, dataset, index, n_reference, progress,
                                        **params)


def test_the_type_is_computed_once_per_instance_not_per_target_method_or_pair():
    adapter, ds = tiny_three()
    kernels = _Counting()
    ex = _explorer(adapter, ds, kernels)
    try:
        assert ex.wait(60)
        ex.select(target=1)
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
        assert "the others averaged" in ex.state()["interaction_type_text"]   # 3 modalities
    finally:
        ex.close()


def test_a_failure_is_said_on_the_line_and_the_page_keeps_its_own_error():
    adapter, ds = nan_for_instance_3()
    ex = _explorer(adapter, ds)
    try:
        assert ex.wait(60)
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
    mods = [Tabular("tab", columns=list("abc")), TimeSeries("series", channels=list("wxyz"), window=2)]
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
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.02,
                  method_params={"interaction_type": {"n_reference": 4, "seed": 3}})
    try:
        assert ex.wait(60)
        want = interaction_type(adapter, 0, reference=ds, n_reference=4, seed=3)
        assert ex.state()["interaction_type_text"] == combination_text(want, adapter.class_names)
        assert "averaged over 4 instances" in ex.state()["interaction_type_text"]
    finally:
        ex.close()
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.02,
                  method_params={"interaction_type": {"n_reference": 0}})
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
])
def test_method_params_of_the_line_are_checked_when_the_explorer_opens(params, error, match):
    adapter, ds = tiny_vqa()
    with pytest.raises(error, match=match):
        Explorer(adapter, ds, kernels=FakeKernels(),
                 method_params={"interaction_type": params}).close()
