"""The Explorer: clicks in each view change the Selection and the other views follow.

Kernel-free (no Jupyter, no browser): clicks are simulated the way the front end sends them
(bqplot ``_handle_custom_msg``, ipyvolume ``clicked_index``, the InputView's ``selected``,
ipywidgets ``Button.click``); kernels are cheap fakes that count their calls.
"""
import contextlib
import threading
import time
import warnings

import ipywidgets as W
import numpy as np
import pytest
import torch

from multiviz_widgets import MultimodalDataset
from multiviz_widgets.adapter import Class, Neuron
from multiviz_widgets.explorer import Explorer, default_pair

from multiviz_widgets.views.controls import method_label

from .explorer_support import (CLASSES, FakeKernels, own_features, tiny_tab_series, tiny_three,
                               tiny_vqa)


def click_mark(mark, **data):
    mark._handle_custom_msg({"event": "element_click", "data": data}, [])


def test_the_explorer_fills_every_view(vqa):
    ex, _ = vqa
    st = ex.state()
    assert st["error"] == ""
    assert st["pair"] == ["question", "image"]
    assert st["items"] == ["image", "question"] and st["input_instance"] == 0
    assert set(st["input_scores"]) == {"image", "question"}
    assert np.asarray(st["heatmap"]).shape == (5, 4)      # 5 tokens x 4 patches
    # a bar per neuron that adds something to the class (the tiny model's inactive ReLU
    # neurons add exactly 0 and get none)
    c = ex.analyses.contributions(0, ex.analyses.class_index(0, -1)).contributions
    assert len(st["neurons"]) == int((np.asarray(c) != 0).sum()) == 6
    assert ex.neuron_view.caption.value.endswith("; the other 6 add exactly 0 here")
    assert {n["kind"] for n in st["path"]["nodes"]} == {"class", "neuron", "unit"}
    assert st["embedding"]["n_points"] == 12 and st["embedding"]["selected"] == 0
    assert isinstance(ex, W.VBox)


def test_clicking_a_token_shows_its_interaction_over_the_patches(vqa):
    ex, _ = vqa
    ex.input_panel.click("question", 1)          # what the browser does on a token click
    assert ex.wait(30)
    st = ex.state()
    assert st["unit_ref"] == ["question", 1]
    assert st["heatmap_selected_row"] == 1
    assert np.allclose(st["input_scores"]["image"], np.asarray(st["heatmap"])[1])
    # the row is drawn on the heatmap's scale (a weak row must not look as strong as the
    # strongest pair); the question's own attribution on its own largest |score|
    assert st["input_scales"] == {"image": pytest.approx(np.abs(np.asarray(st["heatmap"])).max())}
    assert "interaction with question unit 1 ('color'" in st["score_caption"]
    # the row is outlined (4 cells wide, row 1 of 5 from the top), its cells' colours kept
    assert ex.heatmap_view.state()["outline"] == {"x": [0, 4, 4, 0, 0], "y": [4, 4, 3, 3, 4]}
    assert ex.heatmap_view.grid.selected is None          # "selected" cells: those not computed
    assert st["input_selected"] == {"modality": "question", "unit": 1}


def test_clicking_a_patch_colours_the_tokens_by_interaction(vqa):
    ex, _ = vqa
    ex.input_panel.click("image", 2)
    ex.wait(30)
    st = ex.state()
    assert np.allclose(st["input_scores"]["question"], np.asarray(st["heatmap"])[:, 2])
    assert st["input_scales"] == {
        "question": pytest.approx(np.abs(np.asarray(st["heatmap"])).max())}
    assert st["heatmap_selected_col"] == 2


def test_a_heatmap_cell_click_selects_the_row_unit(vqa):
    ex, _ = vqa
    grid = ex.heatmap_view.grid       # bqplot sends the ticks and the cell's value as drawn
    click_mark(grid, rowNum=3, columnNum=1, row="not this row's tick", column=str(grid.column[1]),
               color=float(np.asarray(grid.color)[3, 1]))
    assert ex.selection.unit_ref != ("question", 3)       # a click on another matrix's row
    click_mark(grid, rowNum=3, columnNum=1, row=str(grid.row[3]), column=str(grid.column[1]),
               color=float(np.asarray(grid.color)[3, 1]))
    ex.wait(30)
    st = ex.state()
    assert st["unit_ref"] == ["question", 3] and st["input_selected"]["unit"] == 3
    assert np.allclose(st["input_scores"]["image"], np.asarray(st["heatmap"])[3])


def test_clicking_a_neuron_shows_its_targeted_attributions_and_gallery(vqa):
    ex, kernels = vqa
    j = ex.neuron_view.shown[2]
    click_mark(ex.neuron_view.contrib_bars, index=2, key=2)
    assert ex.selection.neuron == j
    ex.wait(30)
    st = ex.state()
    assert st["gallery_neuron"] == j
    assert [g["side"] for g in st["gallery"]] == ["top"] * 4 + ["bottom"] * 4
    values = [g["value"] for g in st["gallery"]]
    assert values[0] >= values[3] and min(values[:4]) >= max(values[4:])
    assert f"neuron h{j}" in st["score_caption"]
    assert Neuron(j) in kernels.targets
    assert all(g["thumbnails"] == ["image"] for g in st["gallery"])
    assert list(ex.neuron_view.contrib_bars.selected) == [2]
    heat = {k: v for k, v in st["input_scores"].items()}
    # the captions say how strongly the neuron fires here: each map is coloured to its own
    # largest score, so a nearly silent neuron's map would look as strong as any
    here = f"neuron h{j} (h = {ex.analyses.activation(0, j) + 0.0:.3g} here)"
    assert heat and ex.heatmap_view.caption.value.endswith(here)
    assert here in st["score_caption"]


def test_clicking_a_gallery_item_changes_the_instance_everywhere(vqa):
    ex, _ = vqa
    ex.select(neuron=ex.neuron_view.shown[0])
    ex.wait(30)
    item = ex.state()["gallery"][1]
    button = ex.neuron_view.top_row.children[1].children[-2]
    button.click()
    assert ex.selection.instance == item["index"]
    ex.wait(30)
    st = ex.state()
    assert st["input_instance"] == item["index"]
    assert st["embedding"]["selected"] == item["index"]
    assert int(ex.controls.instance.value) == item["index"]


def test_clicking_a_class_node_changes_the_target_everywhere(vqa):
    ex, kernels = vqa
    ex.select(neuron=ex.neuron_view.shown[0])
    ex.wait(30)
    nodes = ex.state()["path"]["nodes"]
    other = next(n for n in nodes if n["kind"] == "class" and n["y"] != 1.0)
    pos = nodes.index(other)
    click_mark(ex.path_view.graph, index=pos, node_id=other["id"], label=other["label"])
    assert ex.selection.target == other["class"] and ex.selection.neuron == -1
    ex.wait(30)
    st = ex.state()
    name = CLASSES[other["class"]]
    predicted = CLASSES[ex.analyses.class_index(0, -1)]
    # a class other than the prediction is said to be one (it stays when the instance changes)
    said = f"class {name!r} (not the predicted {predicted!r})"
    assert said in st["score_caption"]
    assert ex.heatmap_view.caption.value.endswith(said)
    assert f"class {name!r}" in ex.neuron_view.caption.value
    assert st["path"]["nodes"][0]["class"] == other["class"]
    assert ex.controls.target.value == other["class"]
    assert Class(other["class"]) in kernels.targets


def test_neuron_and_unit_nodes_of_the_path_are_clickable(vqa):
    ex, _ = vqa
    nodes = ex.path_view.nodes
    neuron = next(n for n in nodes if n["kind"] == "neuron")
    ex.path_view.click_node(neuron["id"])
    assert ex.selection.neuron == neuron["neuron"]
    unit = next(n for n in nodes if n["kind"] == "unit")
    ex.path_view.click_node(unit["id"])
    assert ex.selection.unit_ref == (unit["modality"], unit["unit"])
    ex.wait(30)
    assert ex.path_view.graph.selected is not None and len(ex.path_view.graph.selected) == 2


def test_clicking_a_3d_point_changes_the_instance_everywhere(vqa):
    ex, _ = vqa
    ex.embedding_view.scatter.clicked_index = 5
    assert ex.selection.instance == int(ex.embedding_view.indices[5])
    assert ex.embedding_view.scatter.clicked_index is None
    ex.wait(30)
    st = ex.state()
    assert st["input_instance"] == 5 and st["embedding"]["selected"] == 5
    assert ex.input_view.caption.startswith("#5 ")
    ex.embedding_view.colour_by.value = "correctness"
    assert ex.state()["embedding"]["groups"] == ["wrong", "right"]


def test_the_embedding_colours_the_dataset_by_the_selected_neurons_activation(vqa):
    from multiviz_widgets.views.embedding_view import BY_NEURON, SEQUENTIAL
    ex, _ = vqa
    view = ex.embedding_view
    view.colour_by.value = BY_NEURON
    emb = ex.state()["embedding"]
    assert emb["colour_range"] is None and "click a neuron" in emb["legend"][0]
    ex.select(neuron=2)                      # a bar click: the points follow
    assert ex.wait(30)
    h = np.asarray(ex.analyses.features().h)[view._rows, 2]
    colours = np.asarray(view.scatter.color)
    assert colours.shape == (len(h), 3)
    np.testing.assert_allclose(colours[h.argmax()], SEQUENTIAL[-1], atol=1e-6)
    np.testing.assert_allclose(colours[h.argmin()], SEQUENTIAL[0], atol=1e-6)
    # ordered: a higher activation is further along the scale (its green channel, here)
    order = np.argsort(h)
    luminance = colours[order] @ np.array([0.2126, 0.7152, 0.0722])
    assert np.all(np.diff(luminance) >= -1e-6)
    emb = ex.state()["embedding"]
    assert emb["colour_range"] == [2, pytest.approx(h.min()), pytest.approx(h.max())]
    assert emb["legend"][0] == "activation of h2:"
    ex.annotations.add(("neuron", 2), "<b>round</b> shapes")     # its concepts name it, as text
    assert ex.state()["embedding"]["legend"][0] == "activation of h2 (<b>round</b> shapes):"
    view.colour_by.value = "prediction"      # back to classes
    assert ex.state()["embedding"]["colour_range"] is None and ex.state()["embedding"]["groups"]


def test_select_from_code_and_read_back(vqa):
    ex, _ = vqa
    ex.select(instance=2, unit=("question", 0), target="circle")
    ex.wait(30)
    st = ex.state()
    assert (st["instance"], st["unit_ref"], st["target"]) == (2, ["question", 0], 2)
    assert st["input_instance"] == 2 and st["heatmap_selected_row"] == 0
    with pytest.raises(IndexError):
        ex.select(instance=99)
    with pytest.raises(ValueError, match="modality of"):
        ex.select(unit=("audio", 1))
    with pytest.raises(ValueError, match="Unknown class 'purple'; the classes are"):
        ex.select(target="purple")
    with pytest.raises(ValueError, match="neuron 99 is out of range"):
        ex.select(neuron=99)


def test_controls_change_the_selection(vqa):
    ex, kernels = vqa
    ex.controls.method.value = "gradient"
    ex.controls.target.value = 1
    ex.controls.next.click()
    assert (ex.selection.method, ex.selection.target, ex.selection.instance) == ("gradient", 1, 1)
    ex.wait(30)
    assert ex.state()["score_caption"].startswith("gradient attribution for class 'blue'")


def test_an_identical_request_hits_the_cache(vqa):
    ex, kernels = vqa
    ex.select(instance=1)
    ex.wait(30)
    before = dict(kernels.calls)
    ex.select(instance=0)
    ex.wait(30)
    assert dict(kernels.calls) == before
    assert ex.state()["input_instance"] == 0


def test_a_stale_result_is_dropped_and_the_latest_click_wins(vqa):
    ex, kernels = vqa
    applied = []
    original = ex.input_panel._got_scores
    ex.input_panel._got_scores = lambda result: applied.append(result[0]) or original(result)
    kernels.block = threading.Event()
    kernels.blocking_started.clear()
    ex.select(instance=3)
    assert kernels.blocking_started.wait(10)
    kernels.block = None                  # the next computations run freely
    ex.select(instance=4)
    assert ex.wait(30)
    st = ex.state()
    assert st["instance"] == 4 and st["input_instance"] == 4
    assert applied == [4]                 # instance 3's overlay was never applied
    expected = kernels._unit_scores(ex.adapter, ex.analyses.prepared(4),
                                    Class(ex.analyses.class_index(4, -1)))
    assert np.allclose(st["input_scores"]["question"], expected["question"])


def test_a_long_job_shows_progress_and_cancel_works(vqa):
    ex, kernels = vqa
    gate = kernels.block = threading.Event()
    kernels.blocking_started.clear()
    ex.select(instance=6)
    assert kernels.blocking_started.wait(10)
    end = time.monotonic() + 10
    while not ex.progress_panel.visible and time.monotonic() < end:
        time.sleep(0.01)
    assert ex.state()["progress_visible"] and ex.state()["busy"]
    assert ex.progress_panel.layout.visibility == "visible"
    ex.progress_panel.cancel.click()
    assert ex.wait(30)
    assert not ex.state()["busy"] and not ex.progress_panel.visible
    # hidden, it keeps its place: the views below do not jump as it comes and goes
    assert ex.progress_panel.layout.visibility == "hidden"
    assert ex.progress_panel.layout.display != "none"
    assert ex.state()["error"] == ""
    assert "Cancelled" in ex.input_view.score_caption
    kernels.block = None
    gate.set()
    ex.select(instance=7)
    ex.wait(30)
    assert ex.state()["input_instance"] == 7 and ex.state()["input_scores"]


def test_a_kernel_error_shows_the_banner_and_the_explorer_keeps_working(vqa):
    ex, kernels = vqa
    kernels.fail_keys.add(ex.analyses.prepared(8).key)
    ex.select(instance=8)
    ex.wait(30)
    assert "kernel exploded on purpose" in ex.state()["error"]
    assert ex.banner.visible and "kernel exploded" in ex.banner.text.value
    ex.select(instance=9)
    ex.wait(30)
    st = ex.state()
    assert st["error"] == "" and not ex.banner.visible
    assert st["input_instance"] == 9 and st["input_scores"]


class WarningKernels(FakeKernels):
    """Fake kernels whose attribution warns, as a real one does when it misses a check, for
    the instances in ``warn_keys`` (with a data string that looks like markup)."""

    def __init__(self):
        super().__init__()
        self.warn_keys: set[str] = set()

    def attribute(self, adapter, prepared, method, target, progress=None):
        from multiviz_widgets.notices import warn
        if prepared.key in self.warn_keys:
            warn(f"completeness missed for <b>{prepared.key}</b>", RuntimeWarning)
        return super().attribute(adapter, prepared, method, target, progress)


def test_a_kernels_caveat_is_shown_beside_the_views_and_comes_back_with_the_cached_result():
    """What a kernel warns while computing a view's result is shown in the notices banner (as
    text), goes when that view shows a result without a caveat, and comes back with the
    cached result (the kernel does not run again); dismiss hides it; nothing is a Python
    warning, which from the worker would reach no cell."""
    adapter, ds = tiny_vqa()
    kernels = WarningKernels()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        ex = Explorer(adapter, ds, kernels=kernels, delay=0.05)
        try:
            assert ex.wait(60)
            key = ex.analyses.prepared(3).key
            kernels.warn_keys.add(key)
            ex.select(instance=3)
            assert ex.wait(30)
            lines = ex.state()["notices"]
            assert len(lines) == 1 and f"completeness missed for <b>{key}</b>" in lines[0], lines
            assert ex.notices_banner.visible
            shown = [w.children[0].value for w in ex.notices_banner.text.children]
            assert shown and shown[0].startswith(lines[0][:40])
            ex.select(instance=4)
            assert ex.wait(30)
            assert ex.state()["notices"] == [] and not ex.notices_banner.visible
            calls = kernels.calls["attribute"]
            ex.select(instance=3)                        # from the cache: told again
            assert ex.wait(30)
            assert kernels.calls["attribute"] == calls
            assert ex.state()["notices"] == lines
            ex.notices_banner.dismiss.click()
            assert ex.state()["notices"] == [] and not ex.notices_banner.visible
            assert ex.state()["error"] == ""
        finally:
            ex.close()
    assert not [w for w in said if "completeness missed" in str(w.message)]


def test_data_strings_are_never_rendered_as_html(vqa):
    ex, _ = vqa
    html_like = (W.HTML, W.HTMLMath)

    def walk(w):
        yield w
        for c in getattr(w, "children", ()):
            yield from walk(c)

    assert not [w for w in walk(ex) if isinstance(w, html_like)]
    assert "<b>bold</b>" in [label for label, _ in ex.controls.target.options]


def test_the_explorer_runs_on_tabular_and_time_series():
    adapter, ds = tiny_tab_series()
    kernels = FakeKernels()
    ex = Explorer(adapter, ds, kernels=kernels, delay=0.05)
    try:
        assert ex.wait(60)
        st = ex.state()
        assert default_pair(adapter) == ("vitals", "series") and st["error"] == ""
        kinds = {it["name"]: it["kind"] for it in ex.input_view.items}
        assert kinds == {"vitals": "tabular", "series": "timeseries"}
        assert np.asarray(st["heatmap"]).shape == (4, 8)     # 4 columns x (4 windows x 2 ch)
        ex.input_panel.click("vitals", 2)                     # a table cell
        ex.wait(30)
        st = ex.state()
        assert np.allclose(st["input_scores"]["series"], np.asarray(st["heatmap"])[2])
        ex.input_panel.click("series", 5)                     # a strip cell
        ex.wait(30)
        st = ex.state()
        assert np.allclose(st["input_scores"]["vitals"], np.asarray(st["heatmap"])[:, 5])
        ex.select(neuron=ex.neuron_view.shown[0])
        ex.wait(30)
        gallery = ex.state()["gallery"]
        assert gallery and all(g["thumbnails"] == ["series", "vitals"] for g in gallery)
        ex.embedding_view.scatter.clicked_index = 3
        ex.wait(30)
        assert ex.state()["input_instance"] == 3
    finally:
        ex.close()


# -- projections (kernels/projection.py) -------------------------------------------------------
def test_project_3d_is_pca_scaled_and_deterministic():
    from multiviz_widgets.kernels.projection import project_3d
    rng = np.random.default_rng(0)
    h = rng.normal(size=(50, 6)) * np.array([10, 5, 2, 0.1, 0.1, 0.1])
    p = project_3d(h)
    assert p.shape == (50, 3) and np.abs(p).max() == pytest.approx(1.0)
    assert np.allclose(p, project_3d(h.copy()))
    var = p.var(0)
    assert var[0] >= var[1] >= var[2]
    assert project_3d(np.ones((1, 2))).shape == (1, 3)
    with pytest.raises(ValueError):
        project_3d(np.ones(3))
    # huge finite values: the mean once overflowed to NaN and infinite coordinates
    huge = project_3d([[1e308, 0], [1e308, 1], [-1e308, 2]])
    assert np.isfinite(huge).all() and np.abs(huge).max() == pytest.approx(1.0)
    np.testing.assert_allclose(huge, project_3d(np.array([[1e308, 0], [1e308, 1], [-1e308, 2]])
                                                / 1e300), atol=1e-6)


def test_colour_groups():
    from multiviz_widgets.kernels.projection import colour_groups
    g, names = colour_groups("correctness", np.array([0, 1, 1]), np.array([0, 0, 1]), ["a", "b"])
    assert g.tolist() == [1, 0, 1] and names == ["wrong", "right"]
    g, names = colour_groups("prediction", None, np.array([1, 0]), ["a", "b"])
    assert g.tolist() == [1, 0] and names == ["a", "b"]
    with pytest.raises(ValueError, match="labels"):
        colour_groups("label", None, np.array([1]), ["a", "b"])


def test_an_empty_path_says_why_in_its_caption():
    """prediction_path's note (why a class has no neurons) reaches the path view's caption."""
    adapter, ds = tiny_vqa()

    class NoNeurons(FakeKernels):
        def prediction_path(self, adapter, prepared, class_index, *args, **kw):
            path = super().prediction_path(adapter, prepared, class_index, *args, **kw)
            return {**path, "neurons": [], "note": "the class never occurred in training"}

    ex = Explorer(adapter, ds, kernels=NoNeurons(), delay=0.05)
    try:
        assert ex.wait(60)
        caption = ex.state()["path"]["caption"]
        assert "no neurons" in caption and "the class never occurred in training" in caption
    finally:
        ex.close()


def test_path_layout_reads_prediction_path_dicts():
    from multiviz_widgets.kernels.projection import path_layout
    path = {"class": {"index": 2, "name": "red", "logit": 3.0}, "neurons": [
        {"index": 5, "contribution": 1.5, "units": {"q": [[0, "what", 0.4]], "img": [[3, "p3", 0.2]]},
         "pairs": [[0, 3, "what", "p3", 0.7]], "pair_modalities": ["q", "img"]},
        {"index": 1, "contribution": 0.5, "units": {"q": [[0, "what", 0.1]]}, "pairs": []}]}
    nodes, links = path_layout(path, other_classes=[(2, "red"), (0, "blue")])
    ids = [n["id"] for n in nodes]
    assert ids[:2] == ["class:2", "class:0"] and ids.count("unit:q:0") == 1
    assert {"neuron:5", "neuron:1", "unit:img:3"} <= set(ids)
    kinds = [l.get("kind") for l in links]
    assert kinds.count("contribution") == 2 and kinds.count("attribution") == 3
    assert kinds.count("pair") == 1
    assert {n["x"] for n in nodes if n["kind"] == "unit"} == {0.0}


def test_a_pair_two_neurons_list_is_one_link_and_opposite_signs_are_said():
    """Units are shared between neurons: a link per neuron lay on top of another, and the
    colour shown was whichever came last."""
    from multiviz_widgets.kernels.projection import path_layout
    from multiviz_widgets.views.path_view import shared_pairs_note
    units = {"q": [[0, "<b>what</b>", 0.4]], "img": [[3, "p3", 0.2]]}
    path = {"class": {"index": 2, "name": "red", "logit": 3.0}, "pair_modalities": ["q", "img"],
            "neurons": [{"index": 5, "contribution": 1.5, "units": units,
                         "pairs": [[0, 3, "what", "p3", -0.7]]},
                        {"index": 1, "contribution": 0.5, "units": units,
                         "pairs": [[0, 3, "what", "p3", 0.2]]}]}
    nodes, links = path_layout(path)
    pairs = [l for l in links if l["kind"] == "pair"]
    assert len(pairs) == 1 and pairs[0]["value"] == -0.7 and pairs[0]["neuron"] == 5
    assert pairs[0]["neurons"] == [[5, -0.7], [1, 0.2]]
    note = shared_pairs_note(nodes, links)
    assert "drawn as h5's interaction" in note and "h1 gives it the other sign" in note
    assert "'<b>what</b>'" in note                      # a token is quoted text, never markup
    path["neurons"][1]["pairs"][0][4] = -0.1            # the same sign: nothing to say
    assert shared_pairs_note(*path_layout(path)) == ""
    path["neurons"][0]["pairs"][0][4] = 0.0             # drawn as 0: it has no sign to differ
    path["neurons"][1]["pairs"][0][4] = 0.3
    assert shared_pairs_note(*path_layout(path)) == ""


# -- the real kernels on the shipped synthetic task ----------------------------------------------
def test_the_synthetic_demo_opens_either_task_and_refuses_a_task_elsewhere():
    """demo("synthetic", kind="additive") was a TypeError (kind is the demo's name)."""
    from multiviz_widgets.explorer import demo
    ex = demo("synthetic", task="additive")
    try:
        assert ex.adapter.model is not None and ex.dataset.name == "synthetic-additive-test"
    finally:
        ex.close()
    with pytest.raises(ValueError, match="'easy_vqa' demo has none"):
        demo("easy_vqa", task="additive")
    with pytest.raises(ValueError, match="Unknown demo 'easyvqa'; use 'easy_vqa' or"):
        demo("easyvqa", task="additive")            # the name first, not "has no task"
    with pytest.raises(ValueError, match="Unknown synthetic task 'Planted'"):
        demo("synthetic", task="Planted")


def test_the_synthetic_demo_runs_with_the_real_kernels():
    from multiviz_widgets.explorer import demo
    ex = demo("synthetic")
    try:
        assert ex.wait(120)
        st = ex.state()
        assert st["error"] == "", st["error"]
        assert {it["kind"] for it in ex.input_view.items} == {"tabular", "timeseries"}
        first = st["pair"][0]
        ex.input_panel.click(first, 1)
        assert ex.wait(120)
        st = ex.state()
        other = st["pair"][1]
        assert np.allclose(st["input_scores"][other], np.asarray(st["heatmap"])[1])
        node = next(n for n in st["path"]["nodes"] if n["kind"] == "neuron")
        ex.path_view.click_node(node["id"])
        assert ex.wait(120)
        st = ex.state()
        assert st["gallery_neuron"] == node["neuron"] and st["gallery"], st["error"]
        assert st["error"] == ""
    finally:
        ex.close()


def test_a_single_modality_model_has_no_heatmap_but_the_rest_works():
    import torch
    from multiviz_widgets import ModelAdapter, MultimodalDataset, Tabular
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    adapter = ModelAdapter(model.eval(), [Tabular("row", columns=["a", "b", "c"])], ["no", "yes"])
    ds = MultimodalDataset({"row": [np.full(3, i, dtype=np.float32) for i in range(5)]})
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05)
    try:
        assert ex.wait(60)
        st = ex.state()
        assert ex.heatmap_view is None and "heatmap" not in st and st["error"] == ""
        assert st["input_scores"]["row"] and st["embedding"]["groups"] == ["no", "yes"]
        ex.input_panel.click("row", 1)
        ex.wait(30)
        assert ex.state()["unit_ref"] == ["row", 1] and ex.state()["error"] == ""
        assert ex.pair is None and st["pair"] is None
        with pytest.raises(ValueError, match=r"one modality \(\['row'\]\): there is no pair"):
            ex.select(pair=("row", "row2"))
    finally:
        ex.close()


def test_view_encoders_colour_by_sign_and_write_png():
    from multiviz_widgets.views._encode import diverging, image_overlay, png, strip
    rgb = diverging(np.array([-1.0, 0.0, 1.0]))
    assert tuple(rgb[1]) == (255, 255, 255)
    assert rgb[2, 0] > rgb[2, 2] and rgb[0, 2] > rgb[0, 0]          # red up, blue down
    over = image_overlay(np.zeros((3, 4, 4)), np.arange(16.0).reshape(4, 4) - 8)
    assert over.shape == (4, 4, 3) and over.dtype == np.uint8
    assert png(strip(np.array([1.0, -2.0, 3.0]), rows=2), size=32)[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_easy_vqa_demo_links_tokens_and_patches_with_the_real_kernels():
    from multiviz_widgets.explorer import demo
    ex = demo("easy_vqa")               # its weights are in the package: a failure is a bug
    try:
        assert ex.wait(300)
        st = ex.state()
        assert st["error"] == "" and st["pair"] == ["question", "image"]
        assert np.asarray(st["heatmap"]).shape[1] == 64            # 8 x 8 patches
        ex.input_panel.click("question", 1)
        assert ex.wait(120)
        st = ex.state()
        assert np.allclose(st["input_scores"]["image"], np.asarray(st["heatmap"])[1])
        ex.input_panel.click("image", 27)
        assert ex.wait(120)
        st = ex.state()
        assert np.allclose(st["input_scores"]["question"], np.asarray(st["heatmap"])[:, 27])
        assert st["heatmap_selected_col"] == 27 and st["error"] == ""
    finally:
        ex.close()


def test_a_one_token_matrix_is_drawn_padded_and_its_padding_is_not_clickable(vqa):
    from multiviz_widgets.results import Interaction
    ex, _ = vqa
    hv = ex.heatmap_view
    inter = Interaction(method="second_order", target=Class(0), modalities=("question", "image"),
                        matrix=np.arange(4.0).reshape(1, 4), row_labels=["what"],
                        col_labels=["p0", "p1", "p2", "p3"])
    hv._show((0, Class(0), inter, "class 0"))
    assert np.asarray(hv.grid.color).shape == (2, 4) and hv.state()["matrix"] == [[0, 1, 2, 3]]
    unit = ex.selection.unit_ref
    click_mark(hv.grid, rowNum=1, columnNum=0)          # the padding row
    assert ex.selection.unit_ref == unit
    click_mark(hv.grid, rowNum=0, columnNum=2)
    assert ex.selection.unit_ref == ("question", 0)


def test_precomputed_features_are_used_as_they_are():
    from .explorer_support import Features
    adapter, ds = tiny_vqa()
    kernels = FakeKernels()
    logits, h = own_features(adapter, [ds[i] for i in range(len(ds))])
    ex = Explorer(adapter, ds, kernels=kernels, features=Features(h.numpy(), logits.numpy()))
    try:
        ex.select(neuron=0)
        assert ex.wait(60)
        assert kernels.calls["features"] == 0
        assert ex.state()["embedding"]["n_points"] == len(ds) and ex.state()["gallery"]
    finally:
        ex.close()


def test_features_of_another_dataset_of_the_same_size_are_said_when_the_explorer_opens():
    """Rows that are not the model's outputs on the dataset's instances (here the rows in
    another order: the features of another dataset of 12) passed every check of their shapes
    and the gallery showed their numbers; the cell that opens the Explorer is now warned, with
    an instance's two logits. The right rows, and a row left out as not finite, say nothing."""
    import warnings as _w
    from .explorer_support import Features
    adapter, ds = tiny_vqa()
    logits, h = own_features(adapter, [ds[i] for i in range(len(ds))])
    h, logits = h.numpy(), logits.numpy()
    with pytest.warns(RuntimeWarning, match=r"features= do not hold the model's outputs on this "
                                            r"dataset: for instance #0 .*another dataset of "
                                            r"the same size.*extract_features") as said:
        ex = Explorer(adapter, ds, kernels=FakeKernels(),
                      features=Features(h[::-1].copy(), logits[::-1].copy()))
    ex.close()
    assert [w.filename for w in said] == [__file__]
    logits[0] = np.nan
    with _w.catch_warnings():
        _w.simplefilter("error")
        ex = Explorer(adapter, ds, kernels=FakeKernels(), features=Features(h, logits))
    ex.close()


def test_a_sparse_model_of_another_model_is_refused_when_the_explorer_opens():
    """Its classes are not the model's: refused at once, saying so (it opened, then every
    click failed with "fit without class_names", which was not the cause)."""
    from multiviz_widgets.kernels.prediction import SparseModel
    adapter, ds = tiny_vqa()
    d = adapter.decision_layer.in_features

    def sparse(names):
        k = len(names)
        return SparseModel(weight=np.zeros((k, d)), bias=np.zeros(k), mean=np.zeros(d),
                           std=np.ones(d), class_names=names, alpha=0.99, lam=0.1, chosen=0,
                           path_lambdas=np.ones(1), path_nonzeros=np.ones(1),
                           path_val_fidelity=np.ones(1))
    other = [f"s{k}" for k in range(7)]
    with pytest.raises(ValueError, match=r"7 classes \(\['s0', 's1', .* ...\) but the model has "
                                         r"4 \(\['red', .*fit on another model"):
        Explorer(adapter, ds, kernels=FakeKernels(), sparse_model=sparse(other))
    with pytest.raises(ValueError, match="fit without class_names"):
        Explorer(adapter, ds, kernels=FakeKernels(), sparse_model=sparse(["0", "1"]))
    with pytest.raises(ValueError, match="another order"):
        Explorer(adapter, ds, kernels=FakeKernels(), sparse_model=sparse(CLASSES[::-1]))
    # other classes of the same count: accepted before, its "cat" weights explaining "red"
    with pytest.raises(ValueError, match=r"classes \(\['cat', .*\) are not the model's .*fit "
                                         r"on another model"):
        Explorer(adapter, ds, kernels=FakeKernels(),
                 sparse_model=sparse(["cat", "dog", "bird", "fish"]))
    # fit without class_names (0..3), or the same names in another case: the model's classes
    for names in (["0", "1", "2", "3"], [n.upper() for n in CLASSES]):
        Explorer(adapter, ds, kernels=FakeKernels(), sparse_model=sparse(names),
                 start=False).close()


def test_the_users_features_stay_writable_while_the_explorer_shows_them():
    """The engine makes cached results read-only; features the user passes stay theirs (the
    embedding view's job holds them too)."""
    from multiviz_widgets.kernels.representations import extract_features
    adapter, ds = tiny_vqa()
    feats = extract_features(adapter, ds, cache=False)        # a dataclass, as users get it
    ex = Explorer(adapter, ds, kernels=FakeKernels(), features=feats)
    try:
        ex.select(neuron=0)
        assert ex.wait(60) and ex.state()["embedding"]["n_points"] == len(ds)
        assert feats.h.flags.writeable and feats.logits.flags.writeable
        feats.h[0, 0] += 1.0
    finally:
        ex.close()


# -- failures, stale content and bad input ------------------------------------------------------
def _json_safe_widgets():
    """The widget states that JSON (as Jupyter sends it, allow_nan=False) rejects."""
    import json
    from ipywidgets.widgets.widget import _remove_buffers
    bad = []
    for w in list(W.Widget.widgets.values()):
        state, _, _ = _remove_buffers(w.get_state())
        try:
            json.dumps(state, allow_nan=False)
        except ValueError:
            bad.append(type(w).__name__)
    return bad


def test_a_failed_instance_blanks_every_view_and_old_content_is_not_clickable(vqa):
    ex, kernels = vqa
    ex.select(instance=1)
    assert ex.wait(30) and ex.state()["heatmap"] and ex.path_view.nodes
    kernels.fail_all = True
    kernels.fail_keys.add(ex.analyses.prepared(2).key)
    ex.select(instance=2)
    assert ex.wait(30)
    st = ex.state()
    assert "kernel exploded" in st["error"]
    assert ex.input_view.caption.startswith("#2 ") and st["input_instance"] == 2
    assert st["input_scores"] == {} and st["score_caption"] == "not computed (RuntimeError: kernel exploded on purpose)"
    assert st["heatmap"] == [] and st["neurons"] == [] and st["path"]["nodes"] == []
    for caption in (ex.heatmap_view.caption, ex.neuron_view.caption, ex.path_view.caption):
        assert "of #2 not shown (RuntimeError: kernel exploded on purpose)" in caption.value
    click_mark(ex.heatmap_view.grid, rowNum=0, columnNum=0)
    click_mark(ex.neuron_view.contrib_bars, index=0, key=0)
    ex.path_view.click(0)
    assert ex.selection.unit_ref is None and ex.selection.neuron == -1
    assert ex.selection.target == -1 and not _json_safe_widgets()
    kernels.fail_keys.clear()
    ex.select(instance=3)
    assert ex.wait(30)
    st = ex.state()
    assert st["heatmap"] and st["neurons"] and st["path"]["nodes"] and st["input_scores"]


def test_a_model_that_raises_blanks_the_input_view():
    adapter, ds = tiny_vqa()
    model, forward = adapter.model, adapter.model.forward
    bad = torch.as_tensor(ds[2]["image"]).permute(2, 0, 1)

    def raising(image, question):
        if any(torch.equal(row, bad) for row in image):
            raise RuntimeError("bad input on purpose")
        return forward(image, question)

    model.forward = raising
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05)
    try:
        ex.select(instance=1)
        assert ex.wait(30) and ex.input_view.items
        ex.select(instance=2)
        assert ex.wait(30)
        st = ex.state()
        assert "bad input on purpose" in st["error"]
        assert ex.input_view.items == [] and st["input_scores"] == {}
        assert ex.input_view.caption.startswith("#2 ") and "not shown" in ex.input_view.caption
        ex.input_panel.click("question", 1)        # a click on what was shown before
        assert ex.selection.unit_ref is None and ex.input_view.selected == {}
        assert ex.state()["heatmap"] == [] and ex.path_view.nodes == []
    finally:
        ex.close()


def test_a_click_on_the_previous_instance_while_the_new_one_loads_is_ignored(vqa):
    ex, kernels = vqa
    kernels.block = threading.Event()
    kernels.blocking_started.clear()
    ex.select(instance=5)            # the overlay blocks: instance 0's matrix and path stay
    assert kernels.blocking_started.wait(10)
    assert ex.heatmap_view.instance == 0 and ex.path_view.instance == 0
    click_mark(ex.heatmap_view.grid, rowNum=1, columnNum=0)
    ex.heatmap_view.click(1)         # what a cell click does, from code: ignored the same way
    unit = next(p for p, n in enumerate(ex.path_view.nodes) if n["kind"] == "unit")
    ex.path_view.click(unit)
    assert ex.selection.unit_ref is None
    kernels.block.set()
    kernels.block = None
    assert ex.wait(30)
    click_mark(ex.heatmap_view.grid, rowNum=1, columnNum=0)
    assert ex.selection.unit_ref == ("question", 1)


def test_an_out_of_range_instance_or_target_set_on_the_selection_is_rejected(vqa):
    import traitlets
    ex, kernels = vqa
    before = ex.state()
    with pytest.raises(traitlets.TraitError, match=r"Instance 50 is out of range.*0\.\.11"):
        ex.selection.instance = 50
    with pytest.raises(traitlets.TraitError, match="Instance -1 is out of range"):
        ex.selection.update(instance=-1, modality="question", unit=1)
    with pytest.raises(traitlets.TraitError, match="target 77 is out of range"):
        ex.selection.target = 77
    assert ex.wait(30)
    st = ex.state()
    assert (st["instance"], st["unit_ref"], st["target"]) == (0, None, -1)
    assert st["input_scores"] == before["input_scores"] and st["error"] == ""


def test_recompute_shows_the_overlay_again_after_the_lru_dropped_the_inputs(vqa):
    ex, kernels = vqa
    scores = ex.state()["input_scores"]
    assert scores and ex.engine.has(("items", 0))
    with ex.engine._lock:
        ex.engine._cache.pop(("items", 0))      # evicted by many clicks on the instance
    ex.controls.refresh_button.click()
    assert ex.wait(30)
    st = ex.state()
    assert st["input_scores"] == scores and st["score_caption"].startswith("integrated gradients")


def nan_for_instance_3():
    """tiny_vqa whose model's logits are NaN on instance 3 (and only there)."""
    adapter, ds = tiny_vqa()
    forward = adapter.model.forward
    bad = torch.as_tensor(ds[3]["image"]).permute(2, 0, 1)

    def nan_for_one(image, question):
        out = forward(image, question)
        rows = torch.tensor([torch.equal(row, bad) for row in image])
        return torch.where(rows[:, None], torch.full_like(out, float("nan")), out)
    adapter.model.forward = nan_for_one
    return adapter, ds


def test_non_finite_logits_are_reported_and_never_reach_the_browser():
    adapter, ds = nan_for_instance_3()
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05)
    try:
        assert ex.wait(30)
        emb = ex.state()["embedding"]
        assert emb["n_points"] == 11 and 3 not in ex.embedding_view.indices.tolist()
        assert "1 left out" in ex.embedding_view.caption.value
        assert "#3" in ex.embedding_view.caption.value
        for kw in (dict(instance=3), dict(target=0), dict(neuron=1)):
            ex.select(**kw)
            assert ex.wait(30)
            st = ex.state()
            assert "instance 3 is not finite" in st["error"], (kw, st["error"])
            assert "| predicted:" not in ex.input_view.caption   # no class is claimed
            assert st["path"]["nodes"] == [] and st["heatmap"] == []
            assert not _json_safe_widgets()
    finally:
        ex.close()


def test_instances_whose_output_is_not_finite_are_left_out_of_the_gallery_and_the_embedding():
    """With the real kernels: extract_features leaves instance 3 (NaN output) out and says
    why; the neuron's gallery ranks the others (one NaN row once stopped it for the whole
    dataset). Features given with a NaN row are ranked without it too."""
    from multiviz_widgets.kernels.representations import Features as RealFeatures
    adapter, ds = nan_for_instance_3()
    logits, h = own_features(adapter, [ds[i] for i in range(len(ds))])
    h = h.numpy().copy()
    h[5] = np.nan                                # given features: instance 5's row is NaN
    given = RealFeatures(h, logits.numpy(), np.arange(len(ds)))
    for features, out in [(None, 3), (given, 5)]:
        # said from the worker thread: in the Explorer's notices, not as a Python warning (which
        # reaches no cell from a worker)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            ex = Explorer(adapter, ds, features=features, delay=0.05)
            ready = ex.wait(120)
        try:
            assert ready
            assert not [w for w in said if "1 of 12 instances" in str(w.message)], said
            told = [line for line in ex.state()["notices"] if "1 of 12 instances" in line]
            assert len(told) == (features is None), ex.state()["notices"]
            assert ex.notices_banner.visible == (features is None)
            ex.select(instance=0, neuron=1)
            assert ex.wait(120)
            shown = [it["index"] for it in ex.neuron_view.gallery]
            assert len(shown) == 8 and out not in shown, (out, shown)
            assert "gallery not shown" not in ex.neuron_view.gallery_caption.value
            if features is None:
                assert ("1 left out of the features (#3: model output not finite: "
                        in ex.embedding_view.caption.value), ex.embedding_view.caption.value
        finally:
            ex.close()


@pytest.fixture
def gated():
    """An Explorer whose dataset-features job runs until ``gate`` is set."""
    adapter, ds = tiny_vqa()
    kernels = FakeKernels()
    gate = kernels.features_gate = threading.Event()
    ex = Explorer(adapter, ds, kernels=kernels, delay=0.05)
    assert kernels.features_started.wait(10)
    yield ex, kernels, gate
    gate.set()
    ex.close()


def _until(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


def test_cancel_stops_the_click_but_not_the_dataset_features(gated):
    ex, kernels, gate = gated
    kernels.block = threading.Event()
    kernels.blocking_started.clear()
    ex.select(instance=4)
    assert kernels.blocking_started.wait(10)
    ex.progress_panel.cancel.click()
    kernels.block.set()
    kernels.block = None
    assert _until(lambda: "Cancelled" in ex.input_view.score_caption)
    assert ex.engine._running["background"] is not None      # the features still run
    assert "Cancelled" not in ex.embedding_view.caption.value
    gate.set()
    assert ex.wait(30)
    assert ex.state()["embedding"]["n_points"] == len(ex.dataset)


def test_the_embedding_comes_back_after_its_features_were_cancelled(gated):
    ex, _, gate = gated
    assert _until(lambda: ex.engine._running["main"] is None and not ex.engine._queues["main"])
    ex.progress_panel.cancel.click()           # only the features run: they are cancelled
    assert ex.wait(30)
    assert "Cancelled" in ex.embedding_view.caption.value
    assert ex.state()["embedding"]["n_points"] == 0
    gate.set()
    ex.select(instance=1)
    assert ex.wait(30)
    assert ex.state()["embedding"]["n_points"] == len(ex.dataset)


def test_the_prediction_path_does_not_wait_for_the_dataset_features(gated):
    ex, _, gate = gated
    ex.select(instance=2)
    assert _until(lambda: ex.path_view.caption.value.startswith("prediction path to"))
    assert not gate.is_set() and ex.path_view.instance == 2 and ex.path_view.nodes


def test_unknown_methods_are_rejected_with_the_valid_ones(vqa):
    ex, _ = vqa
    options = ex.controls.method.options
    with pytest.raises(ValueError, match=r"Unknown method 'bogus'; choose one of \['gradient'"):
        ex.select(method="bogus")
    with pytest.raises(ValueError, match="Unknown interaction_method 'bogus2'.*second_order"):
        ex.select(interaction_method="bogus2")
    assert ex.selection.method == "integrated_gradients"
    assert ex.selection.interaction_method == "second_order"
    assert ex.controls.method.options == options and "bogus2" not in \
        [v for _, v in ex.controls.interaction_method.options]


def test_precomputed_features_of_another_dataset_are_rejected():
    from .explorer_support import Features
    adapter, big = tiny_vqa(12)
    _, small = tiny_vqa(4)
    logits, h = own_features(adapter, [big[i] for i in range(len(big))])
    feats = Features(h.numpy(), logits.numpy())
    with pytest.raises(ValueError, match="another dataset.*12 rows.*4 instances"):
        Explorer(adapter, small, kernels=FakeKernels(), features=feats)
    feats.indices = np.arange(5)
    with pytest.raises(ValueError, match="do not fit together"):
        Explorer(adapter, big, kernels=FakeKernels(), features=feats)
    with pytest.raises(TypeError, match="extract_features"):
        Explorer(adapter, big, kernels=FakeKernels(), features=h.numpy())
    # an instance listed twice was said to come "from another dataset"
    feats = Features(h.numpy()[[3, 5, 3]], logits.numpy()[[3, 5, 3]])
    feats.indices = np.array([3, 5, 3])
    with pytest.raises(ValueError, match=r"1 repeated rows \(instances \[3\] more than once"):
        Explorer(adapter, big, kernels=FakeKernels(), features=feats)


def test_the_embedding_says_when_the_instance_shown_is_not_among_its_points():
    """The caption promised a black point that was not drawn (the instance outside the
    features given), and named one reason for instances left out for several."""
    from .explorer_support import Features
    adapter, ds = tiny_vqa(12)
    logits, h = own_features(adapter, [ds[i] for i in range(12)])
    rows = [4, 5, 6]
    feats = Features(h.numpy()[rows], logits.numpy()[rows])
    feats.indices = np.array(rows)
    feats.skipped = {1: "ValueError: no tokens", 2: "ValueError: NaN pixels",
                     3: "ValueError: no tokens"}
    ex = Explorer(adapter, ds, kernels=FakeKernels(), features=feats, delay=0.05)
    try:
        assert ex.wait(60)
        cap = ex.embedding_view.caption.value
        assert "the instance shown, #0, is not among them" in cap, cap
        assert ("3 left out of the features (#1, #3: ValueError: no tokens; #2: ValueError: "
                "NaN pixels)") in cap
        ex.select(instance=5)
        assert ex.wait(60)
        cap = ex.embedding_view.caption.value
        assert "the black one is the instance shown" in cap and "3 left out" in cap
        assert ex.state()["embedding"]["selected"] == 5
    finally:
        ex.close()


def test_the_selected_point_is_never_drawn_in_a_classs_colour():
    """The selected instance's point was black, and so were the points of a class "black"
    (easy-VQA's answer): the marker could not be told from them. It takes the first of the
    markers that no point's colour is near, and the caption names it."""
    from multiviz_widgets import Image, ModelAdapter, MultimodalDataset, Text

    from .explorer_support import VOCAB, TinyVQA
    adapter = ModelAdapter(TinyVQA().eval(), [Image("image", patch=4), Text("question", VOCAB)],
                           ["black", "blue", "circle", "square"])
    rng = np.random.default_rng(0)
    ds = MultimodalDataset({"image": [rng.random((8, 8, 3)).astype(np.float32)
                                      for _ in range(8)],
                            "question": ["what color is the shape"] * 8},
                           labels=[i % 4 for i in range(8)])
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05)
    try:
        assert ex.wait(60)
        view = ex.embedding_view
        assert view.colour_by.value == "label"
        assert view.scatter.color_selected == "#c800c8"
        assert "the magenta one is the instance shown" in view.caption.value
        view.colour_by.value = "selected neuron"             # no neuron: every point grey
        assert ex.wait(60)
        assert view.scatter.color_selected == "#000000"
        assert "the black one is the instance shown" in view.caption.value
    finally:
        ex.close()


@pytest.mark.parametrize("data", ["list", "dict", None, "abc"])
def test_a_dataset_that_is_not_a_multimodal_dataset_gets_a_clear_type_error(data):
    adapter, ds = tiny_vqa(4)
    data = {"list": [ds[i] for i in range(4)], "dict": dict(ds.columns)}.get(data, data)
    with pytest.raises(TypeError, match="needs a MultimodalDataset.*Wrap your data"):
        Explorer(adapter, data, kernels=FakeKernels())


def test_a_failed_construction_leaves_no_threads_and_no_del_noise(monkeypatch):
    import gc
    import sys
    adapter, ds = tiny_vqa(4)

    def engine_threads():
        return sum(t.name.startswith("multiviz-engine") for t in threading.enumerate())

    assert _until(lambda: engine_threads() == 0)     # those of earlier tests have stopped
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    for kw in (dict(pair=("image", "image")), dict(cache_size=0)):
        with pytest.raises(ValueError):
            Explorer(adapter, ds, kernels=FakeKernels(), **kw)
    with pytest.raises(TypeError):
        Explorer(adapter, [ds[0]], kernels=FakeKernels())
    gc.collect()
    assert unraisable == []
    assert _until(lambda: engine_threads() == 0)


def test_labels_outside_the_classes_are_shown_as_unknown_and_not_counted_wrong():
    from multiviz_widgets import MultimodalDataset
    adapter, ds0 = tiny_vqa(4)
    ds = MultimodalDataset(ds0.columns, labels=[0, 7, 9, 1], name="odd labels")
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05)
    try:
        assert ex.wait(30)
        ev = ex.embedding_view
        assert ev.group_names == CLASSES + ["unknown / unlabelled"]
        assert ev.groups.tolist() == [0, 4, 4, 1]
        assert ev.state()["legend"][-1] == "\u25cf unknown / unlabelled"
        ev.colour_by.value = "correctness"
        preds = np.asarray(ev._features.predictions)
        assert ev.group_names == ["wrong", "right", "unknown / unlabelled"]
        assert ev.groups.tolist() == [int(preds[0] == 0), 2, 2, int(preds[3] == 1)]
        assert len(ev.scatter.color) == 4
    finally:
        ex.close()


# -- what the browser draws: axes, progress labels, gallery captions ----------------------------
def test_the_axes_domains_are_the_labels_of_the_matrix_and_bars_shown(vqa):
    """bqplot loses tick_labels changes that come with a new domain: the ordinal domains are
    the labels themselves, set explicitly and in order (rows: the first one at the top)."""
    from multiviz_widgets.views.heatmap_view import TICK_CHARS, tick_labels
    ex, _ = vqa
    hv, nv = ex.heatmap_view, ex.neuron_view
    for i in (1, 2, 0):
        ex.select(instance=i)
        assert ex.wait(30)
        rows = hv.state()["rows"]
        assert list(hv.rows_scale.domain) == tick_labels(rows, len(rows))[::-1]
        assert list(hv.grid.row) == tick_labels(rows, len(rows))
        cols = hv.state()["cols"]
        assert list(hv.cols_scale.domain) == list(hv.grid.column) == tick_labels(cols, len(cols))
        assert cols[0] == "patch r0c0" and hv.grid.column[0] == "r0c0"   # "patch " left out
        names = [f"h{j}" for j in nv.shown]
        for bars in (nv.act_bars, nv.contrib_bars):
            assert list(bars.x) == list(bars.scales["x"].domain) == names
    half = (TICK_CHARS - 1) // 2                    # a long word keeps its start and its end
    assert tick_labels(["what", "what", "x" * 30], 5) == [
        "what", "what (2)", "x" * (TICK_CHARS - 1 - half) + "\u2026" + "x" * half, "", " "]
    assert tick_labels(["", ""], 3) == ["", " (2)", " "]


def test_a_bar_click_with_its_name_selects_that_neuron(vqa):
    ex, _ = vqa
    nv = ex.neuron_view
    click_mark(nv.act_bars, key=f"h{nv.shown[3]}")
    assert ex.selection.neuron == nv.shown[3]


def test_the_progress_label_names_the_interactions_a_unit_click_computes(vqa):
    ex, _ = vqa
    labels = []
    submit = ex.engine.submit

    def spy(slot, *args, **kw):
        labels.append((slot, kw.get("label")))
        return submit(slot, *args, **kw)

    ex.engine.submit = spy
    ex.select(interaction_method="shapley")
    ex.input_panel.click("question", 1)
    assert ex.wait(30)
    method = ex.selection.method
    assert (ex.input_panel.scores_slot, f"{method_label(method)} + Shapley interactions") in labels
    ex.select(unit=None)
    assert ex.wait(30)
    assert [lab for slot, lab in labels if slot == ex.input_panel.scores_slot][-1] == \
        method_label(method)


def test_a_gallery_row_of_tied_activations_says_so():
    from multiviz_widgets.kernels.representations import tied_extremes as _tie
    from .explorer_support import Features
    assert _tie(np.array([0, 0, 0, 0, 0, 0, 1.0, 2.0]), [0.0] * 4) == (6, 0.0, 4)
    assert _tie(np.array([0, 0, 0, 0, 1.0, 2.0]), [0.0] * 4) is None       # exactly the 4 shown
    assert _tie(np.array([0, 0, 0, 0, 0, 1.0]), [1.0, 0.0, 0.0, 0.0]) == (5, 0.0, 3)  # its end
    assert _tie(np.array([0, 0, 3.0, 0, 0, 1.0]), [3.0, 1.0, 0.0, 0.0]) == (4, 0.0, 2)
    assert _tie(np.array([4.0, 3.0, 2.0, 1.0, 0, 0]), [4.0, 3.0, 2.0, 1.0]) is None  # a ranking
    adapter, ds = tiny_vqa()
    logits, h = own_features(adapter, [ds[i] for i in range(len(ds))])
    h = h.numpy().copy()
    h[:10, 0] = 0.0                                   # a ReLU neuron, off on 10 of 12 instances
    h[10:, 0] = [1.0, 2.0]
    ex = Explorer(adapter, ds, kernels=FakeKernels(), features=Features(h, logits.numpy()))
    try:
        ex.select(neuron=0)
        assert ex.wait(60)
        nv = ex.neuron_view
        assert nv.bottom_label.value == ("bottom activating: 10 instances tie at h = 0 (no "
                                         "ranking among them), showing 4 of them")
        # the top row is 2, 1, 0, 0: its end is two of the ten, not the two lowest
        assert nv.top_label.value == ("top activating: the last 2 shown tie at h = 0 with 8 "
                                      "more instances (no ranking among them)")
    finally:
        ex.close()


class _RealExtremes(FakeKernels):
    """Fake attributions (fast), the real streaming extremes."""

    def extremes(self, adapter, features, k, progress=None):
        from multiviz_widgets.engine import Kernels
        return Kernels.extremes(self, adapter, features, k, progress)


def test_the_gallery_shows_and_counts_only_instances_the_embedding_keeps():
    """A features row with a NaN output was left out of the embedding and the ranking, but the
    gallery's small-dataset fallback showed it (a click then opened an instance whose output
    is NaN), and its tie count counted such rows."""
    from .explorer_support import Features
    adapter, ds = tiny_vqa(6)
    logits, h = own_features(adapter, [ds[i] for i in range(6)])
    h, logits = h.numpy().copy(), logits.numpy().copy()
    h[:, 0] = [5, 4, 3, 2, 1, -7]                    # instance 5 the least activating ...
    logits[5] = np.nan                               # ... but its output is not finite
    ex = Explorer(adapter, ds, kernels=_RealExtremes(), features=Features(h, logits), delay=0.05)
    try:
        assert ex.wait(60)
        assert ex.embedding_view.indices.tolist() == [0, 1, 2, 3, 4]
        ex.select(neuron=0)
        assert ex.wait(60)
        assert [(it["side"], it["index"]) for it in ex.neuron_view.gallery] == [
            ("top", 0), ("top", 1), ("top", 2), ("top", 3), ("bottom", 4)]
    finally:
        ex.close()
    adapter, ds = tiny_vqa(12)
    logits, h = own_features(adapter, [ds[i] for i in range(12)])
    h, logits = h.numpy().copy(), logits.numpy().copy()
    h[:, 0] = [0.0] * 8 + [1, 2, 3, 4]
    logits[0:3] = np.nan                             # three of the eight zeros left out
    ex = Explorer(adapter, ds, kernels=_RealExtremes(), features=Features(h, logits), delay=0.05)
    try:
        ex.select(instance=5, neuron=0)
        assert ex.wait(60)
        assert {it["index"] for it in ex.neuron_view.gallery}.isdisjoint({0, 1, 2})
        assert ex.neuron_view.bottom_label.value.startswith("bottom activating: 5 instances tie")
    finally:
        ex.close()


def test_features_given_as_any_object_with_h_and_logits_open_the_gallery():
    """They were accepted, but the gallery failed ("features= must be a Features object")
    unless a NaN row made the Explorer convert them."""
    from types import SimpleNamespace
    adapter, ds = tiny_vqa(12)
    logits, h = own_features(adapter, [ds[i] for i in range(12)])
    feats = SimpleNamespace(h=h.numpy(), logits=logits.numpy())
    ex = Explorer(adapter, ds, kernels=_RealExtremes(), features=feats, delay=0.05)
    try:
        ex.select(neuron=1)
        assert ex.wait(60)
        assert ex.state()["error"] == "" and len(ex.neuron_view.gallery) == 8
    finally:
        ex.close()


def test_a_small_dataset_shows_each_instance_once_in_the_gallery():
    """Fewer instances than the two rows hold (4 each): the top row has the 4 largest h, the
    bottom row only the smallest of the others; a lone instance is in the top row alone. All
    tied (a dead ReLU): the bottom row is the others, not empty (the extremes' bottom list is
    then the top's own)."""
    from .explorer_support import Features
    for n, tied, top, bottom in [(6, False, [0, 1, 2, 3], [5, 4]), (1, False, [0], []),
                                 (6, True, [0, 1, 2, 3], [4, 5])]:
        adapter, ds = tiny_vqa(n)
        logits, h = own_features(adapter, [ds[i] for i in range(n)])
        h = h.numpy().copy()
        h[:, 0] = 0.0 if tied else np.arange(n, dtype=h.dtype)[::-1]   # else h0 = n - 1 - i
        ex = Explorer(adapter, ds, kernels=FakeKernels(), features=Features(h, logits.numpy()))
        try:
            ex.select(neuron=0)
            assert ex.wait(60)
            nv = ex.neuron_view
            rows = {side: [it["index"] for it in nv.gallery if it["side"] == side]
                    for side in ("top", "bottom")}
            assert rows == {"top": top, "bottom": bottom}, (n, rows)
            assert nv.bottom_label.layout.display == (None if bottom else "none")
        finally:
            ex.close()


# -- widgets the views replace are closed; close() closes them all ----------------------------
def _live(widgets) -> list:
    return [w for w in widgets if w.comm is not None]


def test_gallery_and_legend_refreshes_close_the_widgets_they_replace(vqa):
    ex, _ = vqa
    nv, ev = ex.neuron_view, ex.embedding_view
    ex.select(neuron=nv.shown[0])
    assert ex.wait(30) and nv.gallery
    first_items = list(nv.top_row.children) + list(nv.bottom_row.children)
    first_parts = [w for item in first_items for w in item.children]
    before = len(W.Widget.widgets)
    for n in range(12):                        # new galleries: other neurons, other methods
        ex.select(neuron=nv.shown[n % 3], method=ex.controls.methods[n % 2])
        ev.colour_by.value = ["label", "prediction", "correctness"][n % 3]
        assert ex.wait(30) and nv.gallery
    assert len(W.Widget.widgets) <= before + 5
    assert not _live(first_items + first_parts)          # the first gallery's widgets
    ex.select(neuron=-1)                                  # no gallery: its items closed too
    assert ex.wait(30) and not nv.top_row.children
    assert len(W.Widget.widgets) < before


def test_close_closes_every_widget_of_the_explorer():
    from multiviz_widgets.views._common import widget_tree
    adapter, ds = tiny_vqa()
    before = set(W.Widget.widgets)
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05)
    assert ex.wait(60)
    ex.select(neuron=ex.neuron_view.shown[0])
    assert ex.wait(30) and ex.neuron_view.gallery
    tree = widget_tree([ex])
    kinds = {type(w).__name__ for w in tree}
    assert {"InputView", "Figure", "GridHeatMap", "Scatter", "Image", "Button", "Layout"} <= kinds
    ex.close()
    assert not _live(tree)
    assert set(W.Widget.widgets) - before == set()


# -- the heatmap's pair with three modalities ---------------------------------------------------
@pytest.fixture
def three():
    adapter, ds = tiny_three()
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05)
    assert ex.wait(60)
    yield ex
    ex.close()


def test_the_pair_menu_changes_the_heatmap_the_overlay_and_the_path(three):
    ex = three
    menu = ex.controls.pair
    assert menu is not None and ex.pair == ("question", "image")
    assert [v for _, v in menu.options] == [("question", "image"), ("meta", "image"),
                                            ("question", "meta")]
    assert np.asarray(ex.state()["heatmap"]).shape == (5, 4)
    ex.input_panel.click("meta", 1)                  # a unit outside the pair: a note says so
    assert ex.wait(30)
    st = ex.state()
    assert "meta is not in the heatmap's pair question x image" in st["score_caption"]
    assert "pair menu" in st["score_caption"] and st["heatmap_selected_row"] == -1
    menu.value = ("meta", "image")                   # what a pick in the browser does
    assert ex.selection.pair == ("meta", "image") and ex.wait(30)
    st = ex.state()
    assert st["pair"] == ["meta", "image"] and st["error"] == ""
    assert np.asarray(st["heatmap"]).shape == (3, 4)
    assert ex.heatmap_view.caption.value.startswith("second-order gradients meta x image")
    assert (ex.heatmap_view.row_axis.label, ex.heatmap_view.col_axis.label) == ("meta", "image")
    assert st["heatmap_selected_row"] == 1 and st["unit_ref"] == ["meta", 1]
    assert np.allclose(st["input_scores"]["image"], np.asarray(st["heatmap"])[1])
    assert "not in the heatmap's pair" not in st["score_caption"]
    assert ex.analyses.path_params == {"unimodal_method": "integrated_gradients",
                                       "interaction_method": "second_order",
                                       "modalities": ("meta", "image")}
    ex.heatmap_view.click(2)                          # a cell click selects a meta unit
    assert ex.selection.unit_ref == ("meta", 2)
    ex.select(pair=("image", "question"))             # from code, another order: added to the menu
    assert ex.wait(30) and menu.value == ("image", "question")
    assert np.asarray(ex.state()["heatmap"]).shape == (4, 5)
    with pytest.raises(ValueError, match="two different modalities"):
        ex.select(pair=("meta", "meta"))
    with pytest.raises(ValueError, match="two different modalities"):
        ex.select(pair=("meta", "audio"))


def test_the_path_follows_the_method_menus_unless_path_params_name_its_own():
    """The path's units and pairs come from the methods the menus show (as the input view's
    and the heatmap's do), and its caption names them; path_params' own methods stay."""
    from .explorer_support import FakeKernels, tiny_vqa
    adapter, ds = tiny_vqa()
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05)
    try:
        assert ex.wait(30)
        assert "units by integrated gradients, pairs by second-order gradients" in (
            ex.path_view.caption.value)
        ex.controls.method.value = "occlusion"
        ex.controls.interaction_method.value = "pairwise_ablation"
        assert ex.wait(30)
        assert ex.analyses.path_params == {"unimodal_method": "occlusion",
                                           "interaction_method": "pairwise_ablation",
                                           "modalities": ("question", "image")}
        assert "units by occlusion, pairs by pairwise ablation" in ex.path_view.caption.value
    finally:
        ex.close()
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05,
                  path_params={"unimodal_method": "gradient", "interaction_method": None})
    try:
        ex.controls.method.value = "lime"
        assert ex.wait(30)
        assert ex.analyses.path_params == {"unimodal_method": "gradient",
                                           "interaction_method": None}
        assert "units by gradient, no pairs" in ex.path_view.caption.value
    finally:
        ex.close()
    # a method's parameters without the method: the default method they were written for
    # (IG's steps passed to occlusion failed the path: "occlusion does not take ['steps']")
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05,
                  path_params={"unimodal_params": {"steps": 16}})
    try:
        ex.controls.method.value = "occlusion"
        ex.controls.interaction_method.value = "pairwise_ablation"
        assert ex.wait(30)
        p = ex.analyses.path_params
        assert (p["unimodal_method"], p["interaction_method"]) == ("integrated_gradients",
                                                                   "pairwise_ablation")
    finally:
        ex.close()


def test_the_overlay_caption_says_when_kernel_shap_had_too_few_samples():
    import dataclasses

    from .explorer_support import FakeKernels, tiny_vqa

    class FewSamples(FakeKernels):
        def attribute(self, adapter, prepared, method, target, progress=None):
            r = super().attribute(adapter, prepared, method, target, progress)
            return dataclasses.replace(r, params={"underdetermined": method == "kernel_shap"})

    adapter, ds = tiny_vqa()
    ex = Explorer(adapter, ds, kernels=FewSamples(), delay=0.05)
    try:
        assert ex.wait(30) and "too few samples" not in ex.input_view.score_caption
        ex.controls.method.value = "kernel_shap"
        assert ex.wait(30)
        assert "an estimate from too few samples for this many units, unreliable" in (
            ex.input_view.score_caption)
    finally:
        ex.close()


def test_two_modalities_have_no_pair_menu(vqa):
    ex, _ = vqa
    assert ex.controls.pair is None
    assert all(ex.controls.pair not in box.children for box in ex.controls.children)


# -- select() checks units; captions without descriptions; many classes ----------------------
def test_select_rejects_a_unit_out_of_range(vqa):
    ex, _ = vqa
    with pytest.raises(ValueError, match=r"unit 50 of 'question' is out of range: instance 0 "
                                         r"has 5 units there \(0..4\)"):
        ex.select(unit=("question", 50))
    with pytest.raises(ValueError, match="modality of"):
        ex.select(unit=("audio", 0))
    assert ex.selection.unit_ref is None
    ex.select(unit=("question", 4))
    assert ex.selection.unit_ref == ("question", 4)


def test_a_dataset_without_descriptions_names_its_instance_once(three):
    ex = three
    ex.select(instance=4)
    assert ex.wait(30)
    assert ex.input_view.caption.startswith("#4 | predicted: ")
    ex.select(neuron=ex.neuron_view.shown[0])
    assert ex.wait(30)
    button = ex.neuron_view.top_row.children[0].children[-2]
    assert button.description == f"#{ex.neuron_view.gallery[0]['index']}"


def test_a_class_named_after_a_colour_is_drawn_in_that_colour():
    """easy-VQA's legend drew "red" green and "gray" red: the palette went by class index."""
    from multiviz_widgets.views.embedding_view import NAMED_COLOURS, _TOO_CLOSE, group_colours
    names = ["circle", "rectangle", "triangle", "Red", "green", "blue", "black", "gray ", "teal",
             "brown", "yellow", "yes", "no"]
    colours = group_colours(len(names), "label", names)
    for name, c in zip(names, colours):
        if name.strip().lower() in NAMED_COLOURS:
            assert np.allclose(c, NAMED_COLOURS[name.strip().lower()]), name
        else:                    # the others are told apart from every named class
            assert all(np.linalg.norm(c - colours[g]) >= _TOO_CLOSE
                       for g, n in enumerate(names) if n.strip().lower() in NAMED_COLOURS)
    assert len({tuple(c) for c in colours}) == len(names)
    # more classes than palette colours left: named ones keep theirs, the others on hues
    from multiviz_widgets.views.embedding_view import colour_note
    many = ["red", "green", "blue", "orange", "purple", "pink", "brown"] + [f"c{k}" for k in
                                                                          range(9)]
    drawn = group_colours(len(many), "label", many)
    for g, name in enumerate(many[:7]):
        assert np.allclose(drawn[g], NAMED_COLOURS[name]), name
    assert len({tuple(np.round(c, 4)) for c in drawn}) == len(many)
    assert "named after a colour are drawn in it" in colour_note(len(many), "label", many)
    assert colour_note(len(names), "label", names) == ""
    assert "more than the 15 distinct colours" in colour_note(20, "label", [])
    # two names for one colour, or the correctness groups: the palette as before
    from multiviz_widgets.views.embedding_view import CORRECTNESS, PALETTE
    assert np.allclose(group_colours(2, "label", ["gray", "grey"]), PALETTE[:2])
    assert np.allclose(group_colours(2, "correctness", ["wrong", "right"]), CORRECTNESS)


def test_more_classes_than_palette_colours_get_a_hue_scale_and_a_legend_note():
    from multiviz_widgets.views.embedding_view import PALETTE, group_colours
    assert np.allclose(group_colours(3, "label"), PALETTE[:3])
    many = group_colours(50, "label")
    assert many.shape == (50, 3) and len({tuple(np.round(c, 4)) for c in many}) == 50
    from multiviz_widgets import ModelAdapter, MultimodalDataset, Tabular
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 50))
    adapter = ModelAdapter(model.eval(), [Tabular("row", columns=["a", "b", "c"])],
                           [f"c{k}" for k in range(50)])
    ds = MultimodalDataset({"row": [np.full(3, i, dtype=np.float32) for i in range(6)]},
                           labels=list(range(6)))
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05)
    try:
        assert ex.wait(30)
        ev = ex.embedding_view
        assert ex.state()["error"] == ""
        assert "50 classes" in ev.state()["legend_note"]
        assert ev.legend.children[0].value == ev.state()["legend_note"]
    finally:
        ex.close()


def test_an_instance_that_cannot_be_prepared_is_named_under_the_embedding():
    """Dataset features leave out an instance that cannot be prepared (a question without
    tokens); the 3-D view shows the others and says which one is missing and why."""
    adapter, ds = tiny_vqa()
    questions = [ds[i]["question"] for i in range(len(ds))]
    questions[2] = "?!"
    data = MultimodalDataset({"image": [ds[i]["image"] for i in range(len(ds))],
                              "question": questions}, labels=ds.labels)
    ex = Explorer(adapter, data, delay=0.05)
    try:
        assert ex.wait(60)
        caption = ex.embedding_view.caption.value
        assert ex.state()["embedding"]["n_points"] == len(ds) - 1
        assert "1 left out of the features (#2: ValueError" in caption and "no tokens" in caption
        # and the features' caveat is in the notices, with the views that rest on them
        told = [line for line in ex.state()["notices"] if "could not be prepared" in line]
        assert len(told) == 1 and "#2" in told[0], ex.state()["notices"]
    finally:
        ex.close()


# -- diagnostics: what the kernel did with a browser's click -----------------------------------
def test_diagnostics_say_what_the_kernel_did_with_each_click_from_the_browser(vqa):
    import json
    ex, _ = vqa
    view = ex.input_view
    view.set_state({"selected": {"modality": "question", "unit": 2}})   # what a click sends
    assert ex.wait(30)
    d = ex.diagnostics()
    json.dumps(d)                                   # plain values only
    iv = d["input_view"]
    assert d["selection"]["unit_ref"] == ["question", 2]
    assert iv["recent_clicks"] == [dict(iv["recent_clicks"][0], unit=["question", 2],
                                        action="selected", **{"from": "browser"})]
    assert iv["messages_from_browser"] == 1 and iv["last_message_error"] == ""
    assert iv["overlay_wanted"] == iv["overlay_received"]
    assert "('question', 2)" in iv["overlay_wanted"]
    assert iv["overlay_shown"] == view.score_caption and "unit 2 (" in iv["score_caption"]
    assert iv["model_id"] == view.model_id and iv["items_instance"] == 0
    assert d["engine"]["pending"] == 0 and d["engine"]["lanes"]["main"]["thread_alive"]
    assert "multiviz-engine-main" in d["threads"]
    # a unit the view does not show (the instance has 5 tokens): ignored, and the view reset
    view.set_state({"selected": {"modality": "question", "unit": 9}})
    d = ex.diagnostics()
    ignored, reset = d["input_view"]["recent_clicks"][-2:]
    assert ignored["unit"] == ["question", 9] and ignored["from"] == "browser"
    assert ignored["action"] == "ignored: the view does not show this unit"
    assert reset["unit"] == ["question", 2] and reset["from"] == "kernel"
    assert reset["action"] == "already selected"
    assert d["input_view"]["selected"] == {"modality": "question", "unit": 2}
    # a click whose handling raises: the traceback is kept (ipywidgets would only print it)
    ex.input_panel.refresh_scores = lambda: (_ for _ in ()).throw(RuntimeError("observer broke"))
    with pytest.raises(RuntimeError, match="observer broke"):
        view.set_state({"selected": {"modality": "question", "unit": 3}})
    d = ex.diagnostics()
    assert "RuntimeError: observer broke" in d["input_view"]["last_message_error"]
    assert d["input_view"]["messages_from_browser"] == 3


def test_a_late_click_on_the_inputs_of_an_instance_no_longer_shown_is_ignored(vqa):
    """A student presses ">" and clicks a word of the question still drawn: the click, reaching
    the kernel after it showed the next instance, selected the word of that index there (another
    word); the heatmap refused the same late click."""
    ex, _ = vqa
    view = ex.input_view
    assert ex.wait(30) and {it["instance"] for it in view.items} == {0}
    ex.select(instance=1)
    assert ex.wait(30) and {it["instance"] for it in view.items} == {1}
    view.set_state({"selected": {"modality": "question", "unit": 2, "instance": 0}})
    assert ex.wait(30)
    assert ex.selection.unit_ref is None and view.selected == {}
    late = [c for c in ex.diagnostics()["input_view"]["recent_clicks"] if c["from"] == "browser"]
    assert late[-1]["action"] == "ignored: a click on #0's inputs, no longer shown"
    view.set_state({"selected": {"modality": "question", "unit": 2, "instance": 1}})
    assert ex.wait(30)
    assert ex.selection.unit_ref == ("question", 2)
    assert view.selected == {"modality": "question", "unit": 2}
    assert ex.diagnostics()["input_view"]["recent_clicks"][-1]["action"] == "selected"


def test_select_rejects_what_does_not_fit_with_the_usual_errors_and_changes_nothing(vqa):
    ex, _ = vqa
    before = ex.selection.as_dict()
    with pytest.raises(IndexError, match=r"Instance 12 is out of range: the dataset has 12 "
                                         r"instances \(0..11\)"):
        ex.select(instance=12, unit=("question", 1))
    with pytest.raises(ValueError, match=r"target 4 is out of range: use -1 .* 0..3"):
        ex.select(target=4)
    with pytest.raises(ValueError, match=r"pair must name two different modalities of "
                                         r"\['image', 'question'\] as \(rows, columns\)"):
        ex.select(pair=("question", "question"))
    with pytest.raises(ValueError, match=r"unit must be \(modality, index\) with a modality of"):
        ex.select(unit=3)
    with pytest.raises(ValueError, match="unit index must be non-negative"):
        ex.select(unit=("question", -2))
    with pytest.raises(ValueError, match=r"unit must be \(modality, index\) with a modality's"):
        ex.select(unit=("", 3))                 # "" would have cleared the clicked unit
    with pytest.raises(ValueError, match="unit index must be an integer, got 1.7"):
        ex.select(unit=("question", 1.7))       # not truncated to 1
    with pytest.raises(ValueError, match="neuron must be an integer, got 'x'"):
        ex.select(neuron="x")
    assert ex.selection.as_dict() == before


def test_sequential_colours_span_the_scale_and_a_constant_sits_in_its_middle():
    from multiviz_widgets.views.embedding_view import SEQUENTIAL, sequential_colours
    c = sequential_colours(np.array([3.0, -1.0, 1.0]))
    np.testing.assert_allclose(c[[1, 0, 2]], SEQUENTIAL[[0, 4, 2]], atol=1e-6)
    np.testing.assert_allclose(sequential_colours(np.full(4, 7.0)), np.tile(SEQUENTIAL[2], (4, 1)))
    assert sequential_colours(np.zeros(0)).shape == (0, 3)


def test_the_path_colours_edges_by_sign_per_kind_and_greys_the_other_classes(vqa):
    """Each kind of edge (contribution, attribution, pair) is drawn on its own scale in [-1, 1]
    with its sign kept (red raises, blue lowers); the path's class is red, the other classes
    shown beside it grey."""
    from multiviz_widgets.views.path_view import _OTHER_CLASS, signed_link_values
    ex, _ = vqa
    assert ex.wait(60)
    view = ex.path_view
    drawn = [l["value"] for l in view.graph.link_data]
    assert drawn == signed_link_values(view.links) and drawn
    for link, v in zip(view.links, drawn):
        assert -1.0 <= v <= 1.0 and np.sign(v) == np.sign(link["value"])
    for kind in {l.get("kind") for l in view.links}:
        assert max(abs(v) for l, v in zip(view.links, drawn) if l.get("kind") == kind) == 1.0
    classes = [(n["class"], c) for n, c in zip(view.nodes, view.graph.colors)
               if n["kind"] == "class"]
    assert classes[0][1] == "#d62728" and all(c == _OTHER_CLASS for _, c in classes[1:])
    assert "red edges raise" in view.caption.value
    assert signed_link_values([{"value": float("nan"), "kind": "pair"},
                               {"value": 0.0, "kind": "pair"}]) == [0.0, 0.0]


class ShapleyPlayersKernels(FakeKernels):
    """Fake Shapley interactions computed only between some players (as max_players does)."""

    PLAYERS = {"question": [0, 2], "image": [1, 3]}

    def interaction(self, adapter, prepared, method, modalities, target, progress=None):
        inter = super().interaction(adapter, prepared, method, modalities, target, progress)
        if method == "shapley":
            a, b = modalities
            kept = np.zeros(inter.matrix.shape, bool)
            kept[np.ix_(self.PLAYERS[a], self.PLAYERS[b])] = True
            inter.matrix = np.where(kept, inter.matrix, 0.0)
            inter.params = dict(inter.params or {}, players=self.PLAYERS)
        return inter


@contextlib.contextmanager
def shapley_explorer(kernels):
    """An Explorer on tiny_vqa with ``kernels``, showing Shapley interactions; closed after."""
    adapter, ds = tiny_vqa()
    ex = Explorer(adapter, ds, kernels=kernels, delay=0.05)
    try:
        assert ex.wait(60)
        ex.selection.interaction_method = "shapley"
        assert ex.wait(60)
        yield ex
    finally:
        ex.close()


def click_unit(ex, modality: str, unit: int) -> dict:
    """Click a unit in the input view; the Explorer's state once every view has followed."""
    ex.input_panel.click(modality, unit)
    assert ex.wait(60)
    return ex.state()


def test_units_that_are_not_shapley_players_get_no_score_not_a_zero():
    """A non-player's row is not computed (0 in the matrix, grey in the heatmap): the input view
    shows no score for it, and says why; a player's row leaves the other side's non-players
    unscored."""
    with shapley_explorer(ShapleyPlayersKernels()) as ex:
        st = click_unit(ex, "question", 1)                    # not a player
        assert st["input_scores"]["image"] == [None] * 4
        assert "no interactions with question unit" in st["score_caption"]
        assert "not a player of the Shapley interactions" in st["score_caption"]
        st = click_unit(ex, "question", 2)                    # a player
        row = np.asarray(st["heatmap"])[2]
        assert st["input_scores"]["image"] == [None, row[1], None, row[3]]
        assert "interaction with question unit" in st["score_caption"]
        assert ", Shapley interactions)" in st["score_caption"]
        assert "interaction with question unit 2 (" in st["score_caption"]
        st = click_unit(ex, "image", 0)                       # a patch that is not a player
        assert st["input_scores"]["question"] == [None] * 5


def test_the_embedding_caption_is_wrapped_to_its_box_not_cut(vqa):
    """A Label cut the caption at the 440 px box, just where it says what the black point is."""
    ex, _ = vqa
    cap = ex.embedding_view.caption
    assert "black" in cap.value and len(cap.value) > 56
    assert len(cap.children) >= 2 and all(len(line.value) <= 56 for line in cap.children)
    assert " ".join(line.value for line in cap.children) == " ".join(cap.value.split())


def test_the_gallery_says_how_to_read_its_strip_thumbnails():
    """A table's and a series' thumbnails are coloured strips: a key under the gallery's caption
    names their squares (columns; channel rows and windows); an image model needs none."""
    adapter, ds = tiny_tab_series()
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05)
    try:
        assert ex.wait(60)
        nv = ex.neuron_view
        assert nv.gallery_key.layout.display == "none" and nv.gallery_key.value == ""
        ex.select(neuron=1)
        assert ex.wait(60)
        assert nv.gallery and nv.gallery_key.layout.display is None
        assert nv.gallery_key.value == (
            "Thumbnails, coloured by what drives the neuron (red raises it, blue lowers it): "
            "vitals: a square per hr, bp, temp, age (left to right); series: a row per ecg, "
            "spo2 (top to bottom), a square per window of 4 steps (left to right).")
    finally:
        ex.close()


def test_an_image_and_text_gallery_needs_no_thumbnail_key(vqa):
    ex, _ = vqa
    ex.select(neuron=1)
    assert ex.wait(60)
    assert ex.neuron_view.gallery and ex.neuron_view.gallery_key.layout.display == "none"


def test_the_path_names_its_units_left_of_them_and_draws_no_arrowheads(vqa):
    """Arrowheads piled up over the neurons' names, and the units' names sat on their edges:
    the names are a text mark left of the units, and the layout (caption: left to right) gives
    the direction."""
    from multiviz_widgets.views.path_view import UNIT_LABEL_GAP, UNIT_NAME_CHARS
    ex, _ = vqa
    pv = ex.path_view
    units = [n for n in pv.nodes if n["kind"] == "unit"]
    assert units and not pv.graph.directed
    assert all(d["label_display"] == "none" for d in pv.graph.node_data if d["kind"] == "unit")
    assert pv.figure.marks == [pv.graph, pv.unit_names]
    from multiviz_widgets.views.path_view import _short_unit_name
    assert list(pv.unit_names.text) == [_short_unit_name(str(n["label"])) for n in units]
    assert pv.graph.tooltip is not None and list(pv.graph.tooltip.fields) == ["name"]
    assert [d["name"] for d in pv.graph.node_data] == [str(n["label"]) for n in pv.nodes]
    from multiviz_widgets.views.path_view import CLASS_NAME_CHARS, _short_class_name
    assert _short_class_name("yes") == "yes"            # a long answer stays in its box
    assert _short_class_name("a rather long answer") == "a rather\u2026"
    assert len(_short_class_name("x" * 40)) == CLASS_NAME_CHARS
    np.testing.assert_allclose(pv.unit_names.x, [n["x"] - UNIT_LABEL_GAP for n in units])
    assert pv.unit_names.align == "end" and pv.xs.min < min(pv.unit_names.x) - 0.3
    assert "left to right" in pv.caption.value
    names = [_short_unit_name(f"ecg+respiration t{8 * w}-{8 * w + 7}") for w in range(4)]
    assert names[1] == "ecg+respi\u2026 t8-15" and len(set(names)) == 4
    assert all(len(n) <= UNIT_NAME_CHARS for n in names)
    assert _short_unit_name("a" * 30) == "a" * (UNIT_NAME_CHARS - 1) + "\u2026"
    assert _short_unit_name("patch r6c0") == "patch r6c0"


@pytest.mark.parametrize("players", [{"question": [0, 2]},                 # a side missing
                                     {"question": [0, 2], "image": None},
                                     {"question": [0, 2], "image": [1, 3, 9]},  # out of range
                                     {"question": "all", "image": [1]}])
def test_players_the_heatmap_ignores_the_input_view_ignores_too(players):
    """Both views read the players through one function: where the heatmap greys nothing, the
    input view shows every score (and never fails on odd players from custom kernels)."""
    class OddPlayers(FakeKernels):
        def interaction(self, adapter, prepared, method, modalities, target, progress=None):
            inter = super().interaction(adapter, prepared, method, modalities, target, progress)
            inter.params = dict(inter.params or {}, players=players)
            return inter
    with shapley_explorer(OddPlayers()) as ex:
        st = click_unit(ex, "question", 1)
        assert st["error"] == "" and ex.heatmap_view.state()["computed"] is None
        assert None not in st["input_scores"]["image"]
        assert "not a player" not in st["score_caption"]


def test_a_silent_neuron_is_said_to_be_silent_not_drawn_blank():
    """A neuron that does not fire at the instance (ReLU at 0) has a gradient of 0 everywhere:
    the caption says so, and says how strongly each explained neuron fires there."""
    adapter, ds = tiny_vqa()
    ex = Explorer(adapter, ds, delay=0.0)          # the real kernels
    try:
        assert ex.wait(120)
        h = [ex.analyses.activation(0, j) for j in range(6)]   # the image half: relu(img(x))
        silent, firing = h.index(0.0), int(np.argmax(h))
        ex.select(method="gradient", neuron=silent)
        assert ex.wait(120)
        caption = ex.state()["score_caption"]
        assert caption == (f"gradient attribution for neuron h{silent} (h = 0 here): every "
                           "score is 0 (nothing in the input moves it at this instance)")
        ex.select(neuron=firing)
        assert ex.wait(120)
        caption = ex.state()["score_caption"]
        assert caption == (f"gradient attribution for neuron h{firing} (h = {h[firing]:.3g} "
                           "here)")
        with pytest.raises(IndexError, match="Neuron 99 is out of range: the decision layer "
                                             r"has 12 neurons \(0..11\)"):
            ex.analyses.activation(0, 99)
    finally:
        ex.close()


def test_a_closed_explorer_is_freed_with_the_model_it_held():
    """anywidget made each view's bundle path a file object of the class, whose change signal
    held every view ever made: no closed Explorer (nor its model, dataset and cached results)
    was ever freed, about 14 MB each on easy-VQA."""
    import gc
    import weakref
    adapter, ds = tiny_vqa()
    ex = Explorer(adapter, ds)
    assert ex.wait(30)
    ex.select(instance=1)
    assert ex.wait(30)
    ex.close()
    # a worker holds its engine until its loop returns, and so does the progress bar's timer
    # (cancelled) until it wakes: on a loaded machine that came after gc.collect() below
    workers = list(ex.engine._threads.values()) + [
        t for t in threading.enumerate() if isinstance(t, threading.Timer)]
    explorer, model = weakref.ref(ex), weakref.ref(adapter.model)
    del ex, adapter, ds
    for t in workers:
        t.join(30)
    assert not any(t.is_alive() for t in workers)
    del workers, t                     # a Timer object keeps its function (the engine's)
    gc.collect()
    assert explorer() is None and model() is None


def test_a_long_series_thumbnail_keeps_its_strong_window_and_rows_a_person_can_see():
    """2,000 windows in 96 px were a 96 x 1 px picture, and a nearest-neighbour resize dropped
    the one strong window: columns are pooled to the largest magnitude (its sign kept) and rows
    are at least MIN_STRIP_ROW_PX tall; a short strip keeps its square cells."""
    import io

    from PIL import Image as PILImage

    from multiviz_widgets.views._encode import MIN_STRIP_ROW_PX, pooled_columns, strip_png
    g = np.zeros((2, 2000))
    g[0, 1000] = 5.0
    g[1, 17] = -3.0
    pooled = pooled_columns(g, 96)
    assert pooled.shape == (2, 96)
    assert pooled[0].max() == 5.0 and pooled[1].min() == -3.0
    img = PILImage.open(io.BytesIO(strip_png(g, 96)))
    assert img.size == (96, 2 * MIN_STRIP_ROW_PX)
    px = np.asarray(img.convert("RGB")).astype(int)
    row0 = px[:MIN_STRIP_ROW_PX].reshape(-1, 3)
    assert ((row0[:, 0] > 200) & (row0[:, 1] < 100)).any()         # the red window is drawn
    row1 = px[MIN_STRIP_ROW_PX:].reshape(-1, 3)
    assert ((row1[:, 2] > 200) & (row1[:, 0] < 150)).any()         # and the blue one
    small = PILImage.open(io.BytesIO(strip_png(np.arange(24.0).reshape(3, 8), 96)))
    assert small.size == (96, 36)                                  # 12 px square cells
    assert pooled_columns(np.full((1, 300), np.nan), 96).shape == (1, 96)


def test_method_params_reach_the_views_methods_and_the_path():
    """An instance of thousands of units needs more LIME samples than 500, and the menus have
    no place for numbers: method_params gives them, to the input view's and the heatmap's
    methods and to the path's when it follows the menus; unknown names are refused at once."""
    adapter, ds = tiny_vqa()
    for bad, err, match in [({"limes": {}}, ValueError, "no method"),
                            ({"lime": {"samples": 3}}, TypeError, r"\['samples'\].*n_samples"),
                            ({"shapley": {"budgett": 3}}, TypeError, "budget"),
                            ({"lime": 3}, TypeError, "dict of its parameters"),
                            ([1], TypeError, "method_params must be a dict")]:
        with pytest.raises(err, match=match):
            Explorer(adapter, ds, method_params=bad, start=False)
    ex = Explorer(adapter, ds, delay=0.05,
                  method_params={"lime": {"n_samples": 64, "seed": 3},
                                 "pairwise_ablation": {"batch_size": 5}})
    try:
        assert ex.wait(120)
        ex.controls.method.value = "lime"
        ex.controls.interaction_method.value = "pairwise_ablation"
        assert ex.wait(120)
        i, t = ex.selection.instance, ex.analyses.explained(ex.selection.instance,
                                                           ex.selection.target,
                                                           ex.selection.neuron)
        attr = ex.analyses.attribution(i, t, "lime")
        assert attr.params["n_samples"] == 64 and attr.params["seed"] == 3
        inter = ex.analyses.interaction(i, t, "pairwise_ablation", ex.selection.pair)
        assert inter.params["batch_size"] == 5
        pp = ex.analyses.path_params
        assert pp["unimodal_method"] == "lime"
        assert pp["unimodal_params"] == {"n_samples": 64, "seed": 3}
        assert pp["interaction_params"] == {"batch_size": 5}
        assert ex.state()["error"] == ""
    finally:
        ex.close()


def test_a_thumbnail_of_many_channel_groups_keeps_a_strong_cell():
    """More channel groups than rows fit (96 px / 6 px): rows are pooled as the columns are
    (a nearest-neighbour resize lost one strong cell in four with 128 groups)."""
    import io

    from PIL import Image as PILImage

    from multiviz_widgets.views._encode import strip_png
    for groups in (17, 128, 300):
        lost = 0
        for r in range(0, groups, max(1, groups // 12)):
            g = np.zeros((groups, 2000))
            g[r, 1234] = 5.0
            px = np.asarray(PILImage.open(io.BytesIO(strip_png(g, 96))).convert("RGB")).astype(int)
            lost += not ((px[..., 0] > 200) & (px[..., 1] < 100)).any()
        assert lost == 0, (groups, lost)
        assert max(PILImage.open(io.BytesIO(strip_png(g, 96))).size) <= 96


def test_a_unit_pairwise_ablation_left_out_is_said_so_not_called_a_shapley_player():
    adapter, ds = tiny_vqa()
    ex = Explorer(adapter, ds, delay=0.05,
                  method_params={"pairwise_ablation": {"units": {"image": [0, 1]}}})
    try:
        assert ex.wait(120)
        ex.controls.interaction_method.value = "pairwise_ablation"
        ex.select(unit=("image", 3))
        assert ex.wait(120)
        cap = ex.input_view.score_caption
        assert "not among the units the pairwise ablation computed (units=; the heatmap greys " \
               "the others, or leaves them out)" in cap, cap
        assert "player" not in cap and "occlusion effect" not in cap
        ex.select(unit=("image", 1))
        assert ex.wait(120)
        assert "interaction with image unit 1" in ex.input_view.score_caption
    finally:
        ex.close()


def test_the_gallerys_headings_stay_hidden_until_a_gallery_shows():
    """Wrapped (not cut), the "top activating" and "bottom activating" headings showed over
    empty rows before any gallery: setting a WrappedText's text shows it."""
    adapter, ds = tiny_vqa()
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05, start=False)
    try:
        for heading in (ex.neuron_view.top_label, ex.neuron_view.bottom_label):
            assert heading.layout.display == "none" and heading.value.endswith("activating")
    finally:
        ex.close()


def test_the_paths_words_on_neurons_no_unit_moves_say_inactive_only_where_they_are():
    """A neuron every stage-1 score of which is 0 may be active (a bias-like neuron, one fed by
    a detached modality): it was called inactive, its contribution said to come from the
    dataset's mean, with no sparse model at all."""
    from multiviz_widgets.views.path_view import silent_neurons_note
    neurons = [{"index": 10, "activation": 2.0}, {"index": 46, "activation": 0.0}]
    own = silent_neurons_note({"unimodal_method": "gradient", "source": "decision_layer",
                               "neurons": neurons}, [10, 46])
    assert "no input unit moves h10, h46 here (every gradient score is 0)" in own
    assert "inactive" not in own and "mean" not in own
    sparse = silent_neurons_note({"unimodal_method": "gradient", "source": "sparse_model",
                                  "neurons": neurons}, [10, 46])
    assert "h46 is 0 here (inactive)" in sparse and "h10 is" not in sparse
