"""Edge cases of the Explorer's interactive layer: cancels and failures while an instance loads,
galleries that fail, redraws on the kernel's thread while results arrive on the worker, values
from the browser that do not fit.

Kernel-free (no Jupyter, no browser), with the cheap fake kernels of ``explorer_support``.
"""
import threading
import time

import numpy as np
import pytest
import traitlets


def _hold_inputs_of(ex, instance):
    """Make the input view's job for ``instance`` wait (on the worker only) until the returned
    event is set; returns (started, release)."""
    started, release = threading.Event(), threading.Event()
    raw = ex.analyses.raw

    def held(i):
        if int(i) == instance and threading.current_thread().name.startswith("multiviz-engine"):
            started.set()
            release.wait(30)
        return raw(i)

    ex.analyses.raw = held
    return started, release


def _cancel_while_instance_loads(ex, instance: int) -> None:
    """Select ``instance``, cancel while its inputs are being made, and wait until idle."""
    started, release = _hold_inputs_of(ex, instance)
    ex.select(instance=instance)
    assert started.wait(10)
    ex.engine.cancel()
    release.set()
    assert ex.wait(30)


def test_a_cancel_while_an_instance_loads_keeps_the_clicked_unit_and_starts_nothing(vqa):
    ex, _ = vqa
    started, release = _hold_inputs_of(ex, 3)
    ex.select(instance=3, unit=("question", 1))
    assert started.wait(10)
    runs = ex.engine.stats["runs"]
    ex.progress_panel.cancel.click()
    release.set()
    assert ex.wait(30)
    st = ex.state()
    # the blank view is not a click that clears the unit (nor one that starts new jobs)
    assert st["unit_ref"] == ["question", 1]
    assert "not shown (Cancelled)" in ex.input_view.caption and st["items"] == []
    assert ex.engine.stats["runs"] == runs + 1          # only the job that was running
    ex.controls.refresh_button.click()                  # recompute: all of it comes back
    assert ex.wait(30)
    st = ex.state()
    assert st["input_instance"] == 3 and st["input_selected"] == {"modality": "question",
                                                                  "unit": 1}
    assert "interaction with question unit" in st["score_caption"]
    assert st["heatmap_selected_row"] == 1


def test_an_instance_whose_inputs_fail_keeps_the_unit_and_the_banner(vqa):
    ex, _ = vqa
    raw = ex.analyses.raw

    def broken(i):
        if int(i) == 5:
            raise RuntimeError("cannot draw this instance")
        return raw(i)

    ex.analyses.raw = broken
    ex.select(instance=5, unit=("question", 2))
    assert ex.wait(30)
    st = ex.state()
    assert "cannot draw this instance" in st["error"] and ex.banner.visible
    assert st["unit_ref"] == ["question", 2] and st["heatmap_selected_row"] == 2
    assert st["items"] == [] and "not shown (RuntimeError: " in ex.input_view.caption
    ex.analyses.raw = raw
    ex.select(instance=6)
    assert ex.wait(30)
    assert ex.state()["input_instance"] == 6 and ex.state()["error"] == ""


def test_a_new_method_after_a_cancelled_instance_shows_the_inputs_not_computing_for_ever(vqa):
    ex, _ = vqa
    _cancel_while_instance_loads(ex, 3)
    assert ex.state()["items"] == [] and "Cancelled" in ex.input_view.caption
    ex.select(method="gradient")
    assert ex.wait(30)
    st = ex.state()
    assert not st["score_caption"].startswith("computing"), st["score_caption"]
    assert st["input_instance"] == 3 and st["items"] == ["image", "question"]
    assert st["score_caption"].startswith("gradient attribution") and st["input_scores"]


def test_a_failed_gallery_does_not_leave_the_previous_neurons_instances(vqa):
    ex, kernels = vqa
    ex.select(neuron=3)
    assert ex.wait(30)
    assert ex.state()["gallery_neuron"] == 3 and ex.state()["gallery"]
    kernels.fail_keys = {ex.analyses.prepared(i).key for i in range(len(ex.dataset))}
    ex.select(neuron=5)
    assert ex.wait(30)
    st = ex.state()
    assert st["neuron"] == 5
    assert st["gallery"] == [] and st["gallery_neuron"] == -1
    nv = ex.neuron_view
    assert not nv.top_row.children and not nv.bottom_row.children
    assert nv.gallery_caption.value.startswith("gallery not shown (RuntimeError: ")
    kernels.fail_keys = set()
    ex.select(neuron=6)
    assert ex.wait(30)
    assert ex.state()["gallery_neuron"] == 6 and ex.state()["gallery"]


def test_a_bar_redraw_on_the_kernels_thread_does_not_interleave_with_new_bars(vqa):
    """A neuron click redraws the bars on the kernel's thread while the bars of a new instance
    arrive on the worker: the bars drawn are those whose neurons a click selects."""
    ex, kernels = vqa
    nv = ex.neuron_view
    shown_before = list(nv.shown)
    contributions = kernels.contributions
    go = threading.Event()

    def gated(adapter, prepared, class_index, sparse_model=None):
        if threading.current_thread().name.startswith("multiviz-engine"):
            go.wait(30)
        return contributions(adapter, prepared, class_index, sparse_model)

    kernels.contributions = gated
    clicker = threading.Thread(target=lambda: ex.select(neuron=7), name="kernel-messages")
    paused, resume = threading.Event(), threading.Event()

    def pause(_change):                       # inside the click's redraw of the bars
        if threading.current_thread() is clicker and not paused.is_set():
            paused.set()
            resume.wait(30)

    nv.act_bars.observe(pause, names="selected")
    ex.select(instance=5)                     # its bars wait in the kernel (gated)
    clicker.start()
    assert paused.wait(10)
    go.set()                                  # the new bars arrive while the redraw runs
    threading.Event().wait(1.0)               # (they are applied now, or wait for the redraw)
    resume.set()
    clicker.join(30)
    assert ex.wait(30)
    names = [f"h{n}" for n in nv.shown]
    assert nv.shown != shown_before           # instance 5 ranks its neurons otherwise
    assert list(nv.act_bars.x) == names and list(nv.contrib_bars.x) == names
    assert list(nv.contrib_bars.scales["x"].domain) == names
    assert np.allclose(nv.contrib_bars.y, nv.contributions)
    position = nv.shown.index(7)
    assert list(nv.contrib_bars.selected) == [position]
    st = ex.state()
    assert st["instance"] == 5 and st["neuron"] == 7


@pytest.mark.parametrize("unit", [1.7, True, "2", None])
def test_a_selected_unit_from_the_browser_that_is_not_an_integer_is_refused(vqa, unit):
    ex, _ = vqa
    view = ex.input_view
    sent = []
    view.send_state = lambda key=None: sent.append(key)
    with pytest.raises(traitlets.TraitError, match="an integer index"):
        view.set_state({"selected": {"modality": "question", "unit": unit}})
    assert ex.selection.unit_ref is None and view.selected == {}
    assert sent == [["selected"]]             # the browser gets the kernel's value back
    assert "an integer index" in ex.diagnostics()["input_view"]["last_message_error"]
    view.set_state({"selected": {"modality": "question", "unit": 2}})
    assert ex.selection.unit_ref == ("question", 2)


def test_views_whose_requests_a_cancel_stopped_ask_again_on_the_next_click(vqa):
    """The heatmap, the neuron bars and the prediction path stayed blank after a cancel until
    "recompute" (the input view and the embedding already asked again)."""
    ex, _ = vqa
    _cancel_while_instance_loads(ex, 3)
    for caption in (ex.heatmap_view.caption, ex.neuron_view.caption, ex.path_view.caption):
        assert caption.value.endswith("(Cancelled; asked again on the next click)"), caption.value
    assert ex.heatmap_view.instance == -1 and ex.neuron_view.shown == []
    ex.select(method="gradient")                 # a change none of the three asks again on
    assert ex.wait(30)
    st = ex.state()
    assert ex.heatmap_view.instance == 3 and np.asarray(st["heatmap"]).size
    assert st["neurons"] and ex.path_view.nodes
    assert "not shown" not in ex.path_view.caption.value + ex.neuron_view.caption.value
    ex.select(method="occlusion")                # and only once: nothing is left to ask again
    assert ex.wait(30)
    assert not ex.heatmap_view.retry.pending and not ex.path_view.retry.pending


def test_a_click_between_a_cancel_and_the_worker_stopping_asks_the_view_again(vqa):
    """A cancel flags the running job, which stops at its next progress report (seconds later
    in one slow call): the view is told at the cancel, so that a click meanwhile asks again.
    It was told only when the worker stopped, after the click, and stayed blank."""
    ex, kernels = vqa
    started, release = threading.Event(), threading.Event()
    compute = kernels.interaction

    def slow_without_reports(*args, **kw):
        started.set()
        release.wait(30)                       # a long chunk of work: no progress report
        return compute(*args, **kw)

    kernels.interaction = slow_without_reports
    ex.select(instance=5)
    assert started.wait(10)
    ex.engine.cancel()
    caption = ex.heatmap_view.caption.value
    assert caption.endswith("(Cancelled; asked again on the next click)"), caption
    kernels.interaction = compute
    ex.select(unit=("question", 1))            # the heatmap only highlights on a unit click
    release.set()
    assert ex.wait(30)
    assert ex.heatmap_view.instance == 5 and np.asarray(ex.state()["heatmap"]).size
    assert "not shown" not in ex.heatmap_view.caption.value
    assert not ex.heatmap_view.retry.pending


def test_the_neuron_bars_show_the_top_neurons_and_only_the_selected_one_besides(vqa):
    ex, _ = vqa
    ex.neuron_view.n_bars = 3                    # fewer bars than the tiny model's neurons
    ex.neuron_view.refresh()
    assert ex.wait(30)
    top = list(ex.neuron_view.shown)
    assert len(top) == 3
    others = [j for j in range(ex.analyses.n_neurons()) if j not in top][:3]
    assert len(others) == 3
    for j in others:
        ex.select(neuron=j)
        assert ex.wait(30)
        assert ex.neuron_view.shown == top + [j]
    ex.select(neuron=-1)
    assert ex.wait(30)
    assert ex.neuron_view.shown == top
    assert len(ex.neuron_view.activations) == len(top)


def test_path_params_with_dicts_and_lists_work_and_unknown_ones_are_refused():
    import threading as th

    from multiviz_widgets.engine import params_key
    from multiviz_widgets.explorer import Explorer

    from .explorer_support import FakeKernels, tiny_vqa
    adapter, ds = tiny_vqa()
    for params in ({"unimodal_params": {"steps": 8}}, {"modalities": ["image", "question"]}):
        ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05, path_params=params)
        try:
            assert ex.wait(30)
            assert "not shown" not in ex.path_view.caption.value, ex.path_view.caption.value
            assert ex.path_view.nodes
        finally:
            ex.close()
    assert params_key({"b": [1, {"c": [2]}], "a": 1}) == params_key({"a": 1, "b": [1, {"c": [2]}]})
    before = sum(t.name.startswith("multiviz-engine") and t.is_alive() for t in th.enumerate())
    with pytest.raises(TypeError, match=r"\['n_steps'\] are not parameters of prediction_path"):
        Explorer(adapter, ds, path_params={"n_steps": 8}, start=False)   # the real kernels
    Explorer(adapter, ds, kernels=FakeKernels(), path_params={"n_steps": 8},
             start=False).close()          # kernels of one's own: their path's names
    with pytest.raises(TypeError, match="path_params must be a dict"):
        Explorer(adapter, ds, kernels=FakeKernels(), path_params=[("k_units", 2)])
    time.sleep(0.2)
    assert sum(t.name.startswith("multiviz-engine") and t.is_alive()
               for t in th.enumerate()) <= before


def test_a_first_refresh_that_raises_leaves_no_threads_and_no_claim(monkeypatch, tmp_path):
    from multiviz_widgets.annotations import Annotations
    from multiviz_widgets.explorer import Explorer

    from .explorer_support import FakeKernels, tiny_vqa
    adapter, ds = tiny_vqa()
    made = []
    real_init = Explorer._build

    def build(self, *args):
        made.append(self)
        return real_init(self, *args)

    def refresh(self):
        raise RuntimeError("first refresh")
    monkeypatch.setattr(Explorer, "_build", build)
    monkeypatch.setattr(Explorer, "refresh", refresh)
    with pytest.raises(RuntimeError, match="first refresh"):
        Explorer(adapter, ds, kernels=FakeKernels(), annotations=tmp_path / "c.json")
    engine = made[0].engine
    time.sleep(0.2)
    assert not any(t.is_alive() for t in engine._threads.values())
    store = Annotations.open(tmp_path / "c.json")
    assert store._viewers == [] and store._key_checks == []


def test_recompute_sees_an_edited_dataset_and_new_weights():
    import torch

    from multiviz_widgets.explorer import Explorer

    from .explorer_support import FakeKernels, tiny_vqa
    adapter, ds = tiny_vqa()
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05)
    try:
        assert ex.wait(30)
        words = [it for it in ex.input_view.items if it["name"] == "question"][0]["tokens"]
        ds.columns["question"][0] = "red blue red"                # edited in place
        with torch.no_grad():
            for p in adapter.model.parameters():
                p.mul_(-1.0)                                    # trained further, say
        logits_before = np.asarray(ex.analyses.logits(0)).copy()
        coords_before = np.asarray(ex.embedding_view.coords).copy()
        ex.refresh()                                            # the recompute button
        assert ex.wait(30)
        assert not np.allclose(np.asarray(ex.embedding_view.coords), coords_before)
        shown = [it for it in ex.input_view.items if it["name"] == "question"][0]["tokens"]
        assert shown != words and shown == ["red", "blue", "red"]
        assert not np.allclose(np.asarray(ex.analyses.logits(0)), logits_before)
        assert ex.state()["embedding"]["n_points"] == len(ds)
        ex.embedding_view.forget()                # recompute pending: the colour menu works
        ex.embedding_view.colour_by.value = "correctness"
        ex.refresh()
        assert ex.wait(30) and ex.state()["embedding"]["groups"] == ["wrong", "right"]
    finally:
        ex.close()


def test_a_value_computed_before_a_clear_is_not_cached_after_it():
    from multiviz_widgets.engine import Engine
    engine = Engine(delay=0.05)
    try:
        started, release = threading.Event(), threading.Event()

        def slow():
            started.set()
            release.wait(10)
            return "old"
        t = threading.Thread(target=lambda: engine.memo(("k",), slow))
        t.start()
        assert started.wait(10)
        engine.clear_cache()                                   # meanwhile: recompute
        release.set()
        t.join(10)
        assert not engine.has(("k",))
        assert engine.memo(("k",), lambda: "new") == "new"
    finally:
        engine.close()


# -- what a person reads: legend colours, headings over nothing, cut and raw texts -------------
def test_the_legend_colours_only_its_dots_and_writes_the_names_in_the_text_colour(vqa):
    """Each entry was one label "● red" coloured whole: a class "red" drawn green, a pale one
    (yellow, light blue) unreadable on white. Only the dot has the colour now."""
    from multiviz_widgets.views.embedding_view import (DOT, NAMED_COLOURS, SEQUENTIAL,
                                                       BY_NEURON, _hex, group_colours)
    from .explorer_support import CLASSES
    ex, _ = vqa
    ev = ex.embedding_view
    assert ev.colour_by.value == "label" and ev.group_names == CLASSES
    colours = group_colours(len(CLASSES), "label", CLASSES)
    assert _hex(colours[0]) == _hex(NAMED_COLOURS["red"])      # "red" is red
    for g, (entry, name) in enumerate(zip(ev.legend.children, CLASSES)):
        dot, text = entry.children
        assert dot.value == DOT and dot.style.text_color == _hex(colours[g])
        assert text.value == name and not text.style.text_color      # the normal colour
        # text_label's: MathJax leaves them alone ("$5" stays as it is)
        assert "mathjax_ignore" in dot._dom_classes and "mathjax_ignore" in text._dom_classes
    assert ev.state()["legend"] == [f"{DOT} {name}" for name in CLASSES]
    ev.colour_by.value = BY_NEURON
    # the hint, in pieces that each fit the 440 px view (a label cuts its text, never wraps)
    hint = ev.state()["legend"]
    assert " ".join(hint) == ("click a neuron (a bar or a path node) to colour the dataset by "
                              "its activation")
    assert all(len(part) <= 40 for part in hint)
    ex.select(neuron=2)
    assert ex.wait(30)
    _, low, high = ev.legend.children
    for entry, colour, words in ((low, SEQUENTIAL[0], "(lowest)"),
                                 (high, SEQUENTIAL[-1], "(highest)")):
        dot, text = entry.children
        assert dot.style.text_color == _hex(colour) and not text.style.text_color
        assert text.value.endswith(words)
    assert ev.state()["legend"][2].startswith(f"{DOT} ") and "(highest)" in ev.state()["legend"][2]


def test_the_gallery_headings_show_only_over_a_gallery_and_the_caption_is_in_words(vqa):
    ex, kernels = vqa
    nv = ex.neuron_view
    hidden = lambda: [lab.layout.display == "none" for lab in (nv.top_label, nv.bottom_label)]
    assert hidden() == [True, True]                        # no neuron clicked yet
    ex.select(neuron=3)
    assert ex.wait(30)
    assert hidden() == [False, False] and nv.top_row.children and nv.bottom_row.children
    assert nv.gallery_caption.value == ("h3: dataset instances with the largest and smallest "
                                        "activation, each coloured by what drives neuron h3 "
                                        "in it")
    ex.select(neuron=-1)
    assert ex.wait(30)
    assert hidden() == [True, True]
    kernels.fail_keys = {ex.analyses.prepared(i).key for i in range(len(ex.dataset))}
    ex.select(neuron=5)                                    # a gallery that fails: none either
    assert ex.wait(30)
    assert hidden() == [True, True] and nv.gallery_caption.value.startswith("gallery not shown")


def test_a_selected_neuron_outside_the_top_bars_is_named_with_its_values_in_words(vqa):
    """A neuron selected elsewhere (the path, the concepts menu) is added as a last bar that
    may be too small to see, while the caption says "top n": its values are written out."""
    ex, _ = vqa
    nv = ex.neuron_view
    nv.n_bars = 3
    nv.refresh()
    assert ex.wait(30)
    top = list(nv.shown)
    name = ex.analyses.adapter.class_names[ex.analyses.class_index(0, -1)]
    base = (f"top 3 of 12 neurons by |contribution| to class {name!r} (each bar: the "
            f"decision layer's weight of the class for the neuron x its activation)")
    assert nv.caption.value == base and nv.selected_caption.value == ""
    assert nv.selected_caption.layout.display == "none"
    j = [k for k in range(12) if k not in top][0]
    ex.select(neuron=j)
    assert ex.wait(30)
    assert nv.shown == top + [j] and nv.caption.value == base      # the title stays true
    h, c = nv.activations[-1], nv.contributions[-1]
    assert nv.selected_caption.value == (f"selected h{j} (not in the top 3, the last bar): "
                                         f"activation {h:.3g}, contribution {c:.3g} to {name!r}")
    assert nv.selected_caption.layout.display != "none"
    assert nv.state()["selected_caption"] == nv.selected_caption.value
    ex.select(neuron=top[1])                               # one of the top bars: nothing to add
    assert ex.wait(30)
    assert nv.selected_caption.value == "" and nv.selected_caption.layout.display == "none"
    assert nv.caption.value == base


def test_the_bar_charts_are_titled_in_words_before_their_formula(vqa):
    from multiviz_widgets.views.neuron_view import contribution_source, contribution_title
    ex, _ = vqa
    nv = ex.neuron_view
    assert nv.act_figure.title == "how strongly each neuron fires, h_j(x)"
    name = ex.analyses.adapter.class_names[ex.analyses.class_index(0, -1)]
    assert nv.contrib_figure.title == f"what each neuron adds to {name!r}"
    assert "each bar: the decision layer's weight of the class" in nv.caption.value
    ex.select(target=3)                                    # '<b>bold</b>', shortened to fit
    assert ex.wait(30)
    assert nv.contrib_figure.title == "what each neuron adds to '<b>bold</b>'"
    assert contribution_title("a very long class name indeed") == \
        "what each neuron adds to 'a very long…'"
    # a sparse linear model weighs the standardised activations: said in words
    assert "standardised over the data the sparse model was fit on" in contribution_source(True)


def test_the_method_menus_show_readable_names_and_keep_the_method_names_as_values(vqa):
    from multiviz_widgets.views._common import METHOD_LABELS
    ex, _ = vqa
    menu, inter = ex.controls.method, ex.controls.interaction_method
    assert dict(menu.options) == {
        "gradient": "gradient", "gradient x input": "grad_x_input",
        "integrated gradients": "integrated_gradients", "occlusion": "occlusion",
        "LIME": "lime", "KernelSHAP": "kernel_shap"}
    assert [label for label, _ in inter.options] == [
        "second-order gradients", "pairwise ablation", "Shapley interactions"]
    assert [v for _, v in inter.options] == ["second_order", "pairwise_ablation", "shapley"]
    assert menu.value == "integrated_gradients" and menu.label == "integrated gradients"
    menu.label = "KernelSHAP"                              # what choosing it in the page does
    assert ex.selection.method == "kernel_shap"
    ex.select(interaction_method="pairwise_ablation")     # from code: the menu follows
    assert inter.label == "pairwise ablation" and inter.value == "pairwise_ablation"
    assert ex.wait(30)
    assert all(label for label in METHOD_LABELS.values())


def test_a_method_without_a_readable_name_is_listed_by_its_name():
    from multiviz_widgets.selection import Selection
    from multiviz_widgets.views.controls import Controls
    sel = Selection()
    sel.select(method="my_method")
    c = Controls(sel, 3, ["a", "b"], methods=["gradient"])
    try:
        assert c.method.options == (("gradient", "gradient"), ("my_method", "my_method"))
        assert c.method.value == "my_method"
        sel.select(method="other_method")                  # a method the menu did not list
        assert c.method.label == "other_method" and c.method.value == "other_method"
    finally:
        c.close()


def test_the_control_row_fits_a_1280_px_notebook_and_recompute_is_not_cut(vqa):
    """At 1280 px the notebook's output is about 845 px wide; the row was 960 px, and the
    recompute button was shrunk to "recomp..."."""
    ex, _ = vqa
    c = ex.controls
    row = c.children[1]
    assert list(row.children) == [c.target, c.method, c.interaction_method, c.refresh_button]
    widths = [int(w.layout.width.removesuffix("px")) for w in row.children]
    assert sum(widths) + 4 * len(widths) <= 845               # with each widget's margins
    assert c.refresh_button.layout.flex == "0 0 auto"          # never shrunk below its text
    assert widths[-1] >= 100 and row.layout.flex_flow == "row wrap"
    for menu in (c.target, c.method, c.interaction_method):
        assert menu.style.description_width == "initial"


def test_the_concept_rows_prompts_fit_and_the_menu_shows_its_prompt(vqa):
    from multiviz_widgets.views.concepts_view import GOTO_PROMPT
    ex, _ = vqa
    cv = ex.concepts_view
    # nothing selected: short prompts (a label of 260 px cut "... to name what it stan...")
    assert cv.neuron_label.value == "neuron: click a bar to name it"
    assert cv.unit_label.value == "unit: click a unit of #0 to name it"
    for label in (cv.neuron_label, cv.unit_label):
        assert label.layout.min_width == "260px" and label.layout.width is None
    ex.select(instance=11)
    assert ex.wait(30)
    assert len(cv.unit_label.value) <= 38
    # the menu's prompt is its selected option (index 0): a blank menu showed before
    assert (cv.named.index, cv.named.label, cv.named.value) == (0, GOTO_PROMPT, None)
    ex.annotations.add(("neuron", 4), "round")             # the menu is listed again
    assert (cv.named.index, cv.named.label, cv.named.value) == (0, GOTO_PROMPT, None)
    cv.named.value = ("neuron", 4)                          # going there ...
    assert ex.selection.neuron == 4
    assert (cv.named.index, cv.named.label, cv.named.value) == (0, GOTO_PROMPT, None)
    cv.named.index = 1
    assert ex.selection.neuron == 4 and cv.named.index == 0   # ... as often as wanted
    ex.select(neuron=-1)
    cv.named.index = 0                                      # the prompt is not a place to go
    assert ex.selection.neuron == -1 and cv.named.label == GOTO_PROMPT


def test_neuron_bars_of_a_class_no_neuron_adds_to_say_so(vqa):
    """A sparse model may leave a class without neurons (or a layer may be silent): no bars,
    and a caption that says why instead of "top 0 of 12"."""
    ex, _ = vqa
    nv = ex.neuron_view
    dc = ex.analyses.contributions(0, ex.analyses.class_index(0, -1))
    from types import SimpleNamespace
    silent = SimpleNamespace(h=dc.h, contributions=np.zeros_like(dc.contributions))
    nv._show_bars((ex.analyses.class_index(0, -1), silent, [], "", False))
    assert nv.shown == [] and nv.caption.value.startswith("no neuron adds anything to class ")
    assert nv.caption.value.endswith("all 12 contributions are exactly 0")
    ex.select(neuron=3)
    assert ex.wait(30)
    nv._show_bars((ex.analyses.class_index(0, -1), silent, [], "", False))
    assert nv.selected_caption.value.startswith("selected h3 (the only bar): activation ")


def test_neuron_clicks_during_the_dataset_pass_do_not_start_it_again(vqa):
    """Before: each click on a neuron made the gallery's job stale, and the features pass it
    was running was thrown away and started again by the next one."""
    ex, kernels = vqa
    ex.select(neuron=1)
    assert ex.wait(30)
    before = kernels.calls["features"]
    kernels.features_gate = gate = threading.Event()
    kernels.features_started.clear()
    ex.refresh()                                   # "recompute": the pass runs again
    assert kernels.features_started.wait(10)
    for n in (2, 3, 0):
        ex.select(neuron=n)
        time.sleep(0.05)
    gate.set()
    assert ex.wait(30)
    assert kernels.calls["features"] == before + 1
    st = ex.state()
    assert st["gallery_neuron"] == 0 and st["embedding"]["n_points"] > 0


def test_a_recompute_during_the_dataset_pass_starts_the_new_pass_at_once(vqa):
    """The pass of the first recompute is not finished for nothing (the cache it would fill
    was cleared): the second recompute's pass starts at its next progress report."""
    ex, kernels = vqa
    kernels.features_gate = gate = threading.Event()
    kernels.features_started.clear()
    ex.refresh()
    assert kernels.features_started.wait(10)
    before = kernels.calls["features"]
    kernels.features_started.clear()
    ex.refresh()
    assert kernels.features_started.wait(10)            # while the gate still holds the first
    assert kernels.calls["features"] == before + 1
    gate.set()
    assert ex.wait(30) and ex.state()["embedding"]["n_points"] > 0


def test_recompute_does_not_show_the_old_overlay_as_current_and_state_works_meanwhile(vqa):
    """Before: the inputs, back first after "recompute", got the overlay from before it (same
    key) under its old caption; and state() raised IndexError until the 3-D points came."""
    ex, kernels = vqa
    old = ex.state()["input_scores"]
    assert old
    kernels.block = gate = threading.Event()
    kernels.blocking_started.clear()
    kernels.features_gate = features_gate = threading.Event()
    ex.refresh()
    assert kernels.blocking_started.wait(10)
    time.sleep(0.2)                                # the inputs are back meanwhile
    st = ex.state()                                # no IndexError
    assert st["input_scores"] == {} and st["score_caption"].startswith("computing")
    assert st["embedding"]["selected"] is None
    kernels.block = None
    gate.set()
    features_gate.set()
    assert ex.wait(30)
    st = ex.state()
    assert st["input_scores"] == old and "attribution for" in st["score_caption"]
    assert st["embedding"]["selected"] == st["input_instance"]


def test_a_failed_view_says_why_in_its_caption_after_the_banner_is_gone(vqa):
    ex, kernels = vqa
    kernels.fail_all = True
    kernels.fail_keys.add(ex.analyses.prepared(2).key)
    ex.select(instance=2)
    assert ex.wait(30) and "kernel exploded on purpose" in ex.state()["error"]
    kernels.fail_all, kernels.fail_keys = False, set()
    ex.select(method="gradient")       # clears the banner; the heatmap is not asked again
    assert ex.wait(30) and ex.state()["error"] == ""
    assert ("not shown (RuntimeError: kernel exploded on purpose)"
            in ex.heatmap_view.caption.value)


def test_a_second_cancel_reaches_the_background_while_the_first_waits_for_a_slow_step():
    from multiviz_widgets.engine import Engine
    engine = Engine(delay=0.01)
    release, background_stop, told = threading.Event(), threading.Event(), []

    def slow(progress):                               # one long call after its first report
        progress(1, 10, "step")
        release.wait(10)
        return 1

    def background(progress):
        while not background_stop.is_set():
            progress(0, 1, "features")
            time.sleep(0.01)
        return 2
    try:
        engine.submit("bg", ("bg",), background, on_error=lambda e: told.append("bg"),
                      lane="background")
        engine.submit("click", ("c",), slow, on_error=lambda e: told.append("click"))
        time.sleep(0.2)
        engine.cancel()
        assert told == ["click"]
        assert engine.show_progress and engine.message.startswith("cancelling click")
        engine.cancel()                               # the click's job has not stopped yet
        time.sleep(0.1)
        assert told == ["click", "bg"]
        assert engine.snapshot()["lanes"]["background"]["running"] is None
    finally:
        release.set()
        background_stop.set()
        engine.wait(5)
        engine.close()


def test_a_long_error_is_wrapped_in_the_banner_not_cut():
    from multiviz_widgets.engine import Engine
    from multiviz_widgets.views.controls import ErrorBanner
    engine = Engine(delay=0.01)
    try:
        banner = ErrorBanner(engine)
        advice = "The model's output is not finite " + "at this instance " * 10 + "(recompute)"
        engine.error = advice
        assert banner.visible
        lines = [label.value for label in banner.text.children]
        assert len(lines) >= 2 and " ".join(lines) == advice
        assert all(label.style.text_color == "#a00000" for label in banner.text.children)
    finally:
        engine.close()


def test_a_dataset_whose_columns_are_not_the_modalities_is_refused_at_once():
    """Before: the Explorer opened, and every view failed with the same error in the banner."""
    from multiviz_widgets import MultimodalDataset
    from multiviz_widgets.explorer import Explorer

    from .explorer_support import FakeKernels, tiny_vqa
    adapter, ds = tiny_vqa()
    columns = dict(ds.columns)
    columns["img"] = columns.pop("image")
    with pytest.raises(ValueError, match=r"missing \['image'\], unknown \['img'\]"):
        Explorer(adapter, MultimodalDataset(columns), kernels=FakeKernels())


# -- a neuron from the keyboard; long messages; bidi controls in data --------------------------
def test_a_neuron_is_picked_by_its_number_as_a_click_on_its_bar_picks_it(vqa):
    """The bars and the path's nodes are for the pointer only: the controls take a neuron's
    number too (typed, then Enter, or "show neuron"), through the selection as a click."""
    ex, _ = vqa
    c = ex.controls
    n = ex.analyses.n_neurons()
    # -1: no neuron (the box always holds the selection, see the next test)
    assert c.neuron_pick is not None and (c.neuron_pick.min, c.neuron_pick.max) == (-1, n - 1)
    assert c.neuron_pick.value == -1 and c.neuron_go.disabled       # nothing to show again yet
    row = c.children[2]
    assert c.neuron_pick in row.children and c.neuron_go in row.children
    assert row.layout.flex_flow == "row wrap"              # the longer row wraps, never cut
    seen = []
    ex.selection.observe(lambda ch: seen.append(ch["new"]), names="neuron")
    c.neuron_pick.value = 3                  # typed, then Enter: one change of the value
    assert ex.selection.neuron == 3 and seen == [3]
    assert ex.wait(30)
    st = ex.state()
    assert st["neuron"] == 3 and st["gallery_neuron"] == 3 and c.neuron_label.value == \
        "neuron: h3"
    ex.select(neuron=-1)
    assert c.neuron_pick.value == -1 and not c.neuron_go.disabled
    c.neuron_go.click()                                     # the one selected last, again
    assert ex.selection.neuron == 3 and seen == [3, -1, 3]
    c.neuron_pick.value = n + 7                             # clamped to the last neuron
    assert ex.selection.neuron == n - 1
    # a bar clicked: the box shows its number, and that selects nothing more
    ex.select(neuron=-1)
    before = len(seen)
    ex.neuron_view.click_bar(0)
    j = ex.neuron_view.shown[0]
    assert ex.selection.neuron == j and c.neuron_pick.value == j and seen[before:] == [j]
    assert ex.wait(30)


def test_controls_without_a_neuron_count_have_no_neuron_box():
    from multiviz_widgets.selection import Selection
    from multiviz_widgets.views.controls import Controls
    c = Controls(Selection(), 3, ["a", "b"], methods=["gradient"])
    try:
        assert c.neuron_pick is None and c.neuron_go is None
    finally:
        c.close()


def test_a_refused_concept_and_the_save_status_are_wrapped_not_cut(vqa):
    """The reason a concept is refused (which character) and where concepts are saved were
    one-line Labels, cut with "..." at their width; the path's concepts line too."""
    ex, _ = vqa
    cv = ex.concepts_view
    ex.select(neuron=ex.neuron_view.shown[0])
    assert ex.wait(30)
    cv.neuron_tags.edit("add", "a pasted\tconcept " + "p" * 70)
    msg = cv.message.value
    assert msg.startswith("not taken: ") and "control character" in msg and len(msg) > 110
    lines = [label.value for label in cv.message.children]
    assert len(lines) >= 2 and all(len(line) <= 110 for line in lines)
    assert " ".join(lines).split() == msg.split()           # all of it, the end included
    assert all(label.style.text_color == "#a00000" for label in cv.message.children)
    cv.neuron_tags.edit("add", "fine")
    assert cv.message.value == "" and cv.message.layout.display == "none"
    status = cv.status.value
    assert "kept in memory only" in status and len(status) > 110
    lines = [label.value for label in cv.status.children]
    assert len(lines) >= 2 and " ".join(lines).split() == status.split()
    # the path's line of concepts: every named neuron on the path, in lines of 84 at most
    on_path = [int(node["neuron"]) for node in ex.path_view.nodes if node["kind"] == "neuron"]
    assert on_path
    for j in on_path:
        ex.annotations.add(("neuron", j), f"a long name for what neuron {j} stands for")
    line = ex.path_view.concepts.value
    assert line.startswith("concepts on this path: ") and len(line) > 84
    lines = [label.value for label in ex.path_view.concepts.children]
    assert len(lines) >= 2 and all(len(x) <= 84 for x in lines)
    assert " ".join(lines).split() == line.split()
    assert ex.state()["path"]["concepts"] == line


def test_isolate_keeps_data_from_reordering_the_words_around_it():
    from multiviz_widgets.display_text import FSI, PDI, isolate
    from multiviz_widgets.views._common import instance_title
    assert isolate("") == "" and isolate(None) == ""
    assert isolate("a red circle") == f"{FSI}a red circle{PDI}"
    assert isolate("\u05e9\u05dc\u05d5\u05dd") == f"{FSI}\u05e9\u05dc\u05d5\u05dd{PDI}"  # RTL
    # embeddings, overrides and isolates inside: escaped as repr shows them; marks are kept
    assert isolate("ab\u202ecd\u2069\u202a\u200f") == f"{FSI}ab\\u202ecd\\u2069\\u202a\u200f{PDI}"
    assert instance_title(4, "x\u202ey", isolated=True) == f"#4 {FSI}x\\u202ey{PDI}"
    assert instance_title(4, "#4", isolated=True) == "#4"
    assert instance_title(4, "x\u202ey") == "#4 x\u202ey"          # alone on its line: as is


def test_bidi_controls_in_descriptions_and_class_names_cannot_reorder_the_input_caption():
    """A description or a class name with a RIGHT-TO-LEFT OVERRIDE (or a POP DIRECTIONAL
    ISOLATE meant to escape an isolate) once reversed "| predicted: ... | label: ..." after
    it in the input view's caption: every piece of data is now an isolate of its own."""
    import re

    from multiviz_widgets import Image, ModelAdapter, MultimodalDataset, Text
    from multiviz_widgets.explorer import Explorer
    from multiviz_widgets.display_text import FSI, PDI

    from .explorer_support import VOCAB, FakeKernels, TinyVQA
    classes = ["red\u202e", "blue", "circle", "\u2069evil\u202e"]
    adapter = ModelAdapter(TinyVQA().eval(), [Image("image", patch=4), Text("question", VOCAB)],
                           classes)
    rng = np.random.default_rng(0)
    n = 8
    ds = MultimodalDataset({"image": [rng.random((8, 8, 3)).astype(np.float32)
                                      for _ in range(n)],
                            "question": ["what color is the shape"] * n},
                           labels=[i % 4 for i in range(n)],
                           descriptions=[f"q{i} \u202egnp.live\u2069" for i in range(n)])
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.0)
    try:
        for i in (0, 3):
            ex.select(instance=i)
            assert ex.wait(60)
            cap = ex.input_view.caption
            assert "\u202e" not in cap and cap.count(FSI) == cap.count(PDI) == 3, cap
            assert cap.startswith(f"#{i} {FSI}q{i} \\u202egnp.live\\u2069{PDI} | predicted: ")
            assert cap.endswith(f" | label: {FSI}{classes[i % 4]}{PDI}".replace(
                "\u202e", "\\u202e").replace("\u2069evil", "\\u2069evil"))
            # the app's own words are outside every isolate, in their order
            outside = re.sub(f"{FSI}[^{PDI}]*{PDI}", "", cap)
            assert outside == f"#{i}  | predicted:  | label: ", outside
        # the caption of an instance that cannot be shown too
        ex.input_panel._items_failed(5, RuntimeError("no inputs"))
        cap = ex.input_view.caption
        assert cap == f"#5 {FSI}q5 \\u202egnp.live\\u2069{PDI} | not shown (RuntimeError: " \
                      f"no inputs)"
    finally:
        ex.close()


def test_a_label_of_no_class_reads_unknown_in_the_input_caption():
    """The README: a label of C or more is shown as unknown. The caption showed "label: 7",
    which with classes named "0".."3" read as a class, while the embedding said unknown."""
    from multiviz_widgets import Image, ModelAdapter, MultimodalDataset, Text
    from multiviz_widgets.explorer import Explorer

    from .explorer_support import VOCAB, FakeKernels, TinyVQA
    adapter = ModelAdapter(TinyVQA().eval(), [Image("image", patch=4), Text("question", VOCAB)],
                           ["0", "1", "2", "3"])
    rng = np.random.default_rng(0)
    ds = MultimodalDataset({"image": [rng.random((8, 8, 3)).astype(np.float32)
                                      for _ in range(3)],
                            "question": ["what color is the shape"] * 3}, labels=[0, 7, 3])
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.0)
    try:
        for i, said in ((1, "unknown (7)"), (2, "\u20683\u2069")):
            ex.select(instance=i)
            assert ex.wait(60)
            assert ex.input_view.caption.endswith(f" | label: {said}"), ex.input_view.caption
    finally:
        ex.close()


# -- a failed constructor, a failing description, stale views after a failure, use after close --
def _widgets_of(ex):
    """Every widget of ``ex``: its children's and those of the views it had built."""
    import ipywidgets as W

    from multiviz_widgets.views._common import widget_tree
    return widget_tree([ex] + [w for w in ex.__dict__.values() if isinstance(w, W.Widget)])


@pytest.mark.parametrize("fails", ["first refresh", "embedding view"])
def test_a_failed_constructor_closes_the_views_it_built_and_lets_go_of_a_shared_store(
        monkeypatch, fails):
    """Before: the views built so far stayed open (about 99 widgets with live comms), and the
    path and concepts views stayed observers of the caller's concepts store."""
    import sys

    from ipywidgets.widgets.widget import _instances

    from multiviz_widgets.annotations import Annotations
    from multiviz_widgets.explorer import Explorer

    from .explorer_support import FakeKernels, tiny_vqa
    adapter, ds = tiny_vqa()
    store = Annotations()
    # (one Explorer first: ipyvolume makes its own shared widgets, a theme, once per process)
    Explorer(adapter, ds, kernels=FakeKernels(), annotations=store).close()
    made = []
    real_build = Explorer._build

    def build(self, *args):
        made.append(self)
        return real_build(self, *args)

    def refresh(self):
        raise RuntimeError("first refresh")
    monkeypatch.setattr(Explorer, "_build", build)
    if fails == "first refresh":
        monkeypatch.setattr(Explorer, "refresh", refresh)
        expected, said = RuntimeError, "first refresh"
    else:                                       # ipyvolume missing: after the path view
        monkeypatch.setitem(sys.modules, "ipyvolume", None)
        expected, said = ImportError, "ipyvolume"
    before = set(_instances)
    with pytest.raises(expected, match=said):
        Explorer(adapter, ds, kernels=FakeKernels(), annotations=store)
    assert store._observers == [] and store._key_checks == []
    widgets = _widgets_of(made[0])
    assert len(widgets) > 10 and all(w.comm is None for w in widgets)
    assert set(_instances) - before == set()
    monkeypatch.undo()
    ex = Explorer(adapter, ds, kernels=FakeKernels(), annotations=store)   # the store works on
    try:
        assert ex.wait(30)
        ex.annotations.add(("neuron", 1), "red things")
        assert len(store._observers) == 3
    finally:
        ex.close()
    assert store._observers == []


def test_a_description_that_raises_does_not_stop_selecting_or_showing_its_instance():
    """Before: ``select(instance=3)`` raised the dataset's KeyError from the controls' observer
    (the selection had changed, the views after it never heard of it) and the input view was
    blank; a gallery with such an instance failed as a whole."""
    from multiviz_widgets.data import MultimodalDataset
    from multiviz_widgets.explorer import Explorer

    from .explorer_support import FakeKernels, tiny_vqa

    class Flaky(MultimodalDataset):
        def describe(self, i):
            if int(i) % 2:
                raise KeyError(f"no metadata row for #{i}")
            return super().describe(i)

    adapter, ds = tiny_vqa()
    ex = Explorer(adapter, Flaky(dict(ds.columns), labels=ds.labels), kernels=FakeKernels(),
                  delay=0.0)
    try:
        assert ex.wait(30)
        ex.select(instance=3)
        assert ex.wait(30)
        st = ex.state()
        assert st["instance"] == 3 and st["input_instance"] == 3 and st["items"]
        note = "(no description: KeyError: 'no metadata row for #3')"
        assert ex.controls.description.value == note
        assert ex.input_view.caption.startswith("#3 ") and note in ex.input_view.caption
        assert "| predicted: " in ex.input_view.caption
        assert st["concepts"]["unit_label"] == "unit: click a unit of #3 to name it"
        ex.controls.next.click()
        assert ex.selection.instance == 4 and ex.controls.description.value == "#4"
        ex.select(neuron=ex.neuron_view.shown[0])
        assert ex.wait(30)
        gallery = ex.state()["gallery"]
        assert ex.neuron_view.gallery_neuron == ex.selection.neuron
        odd = [it for it in gallery if it["index"] % 2]
        assert odd and all(it["description"].startswith("(no description: KeyError")
                           for it in odd)
        assert ex.state()["error"] == ""
    finally:
        ex.close()


def test_the_neuron_box_selects_the_number_typed_after_no_neuron_or_a_cleared_one(vqa):
    """Before: the box held a number while no neuron was selected (0 at first, the cleared
    neuron's after "clear neuron"), and typing that number then Enter changed nothing the
    browser sends: neuron 0 could not be picked at first, nor a cleared neuron again."""
    ex, _ = vqa
    c = ex.controls
    assert ex.selection.neuron == -1 and c.neuron_pick.value == -1
    c.neuron_pick.value = 0                   # typed 0, then Enter
    assert ex.selection.neuron == 0
    ex.select(neuron=5)
    assert c.neuron_pick.value == 5
    c.clear_neuron.click()
    assert ex.selection.neuron == -1 and c.neuron_pick.value == -1
    c.neuron_pick.value = 5                   # typed 5, then Enter
    assert ex.selection.neuron == 5
    c.neuron_pick.value = -1                  # -1: none, as select(neuron=-1)
    assert ex.selection.neuron == -1 and c.neuron_label.value == "neuron: none"
    assert ex.wait(30)


def test_views_that_fail_do_not_keep_the_previous_pairs_axes_or_classs_title():
    """Before: a failed heatmap kept the earlier pair's axis titles and the earlier method's
    and target's legend, and failed bars kept the earlier class's chart title."""
    from multiviz_widgets.explorer import Explorer
    from multiviz_widgets.views.neuron_view import contribution_title

    from .explorer_support import FakeKernels, tiny_three
    adapter, ds = tiny_three()
    kernels = FakeKernels()
    ex = Explorer(adapter, ds, kernels=kernels, delay=0.0)
    try:
        assert ex.wait(30)
        hv, nv = ex.heatmap_view, ex.neuron_view
        assert (hv.row_axis.label, hv.col_axis.label) == ("question", "image")
        assert hv.legend.value and nv.contrib_figure.title != contribution_title()
        kernels.fail_keys.add(ex.analyses.prepared(3).key)
        kernels.fail_all = True
        ex.select(instance=3, pair=("image", "meta"))        # the predicted class: unknown
        assert ex.wait(30)
        assert "not shown" in hv.caption.value and "not shown" in nv.caption.value
        assert (hv.row_axis.label, hv.col_axis.label) == ("image", "meta")
        assert hv.state()["pair"] == ["image", "meta"]
        assert hv.legend.value == "" and hv.state()["legend"] == ""
        assert nv.contrib_figure.title == contribution_title()
        ex.select(target="red")
        assert ex.wait(30)
        assert nv.contrib_figure.title == contribution_title("red")
        kernels.fail_all, kernels.fail_keys = False, set()
        ex.select(instance=0, pair=("question", "image"))
        assert ex.wait(30)
        assert (hv.row_axis.label, hv.col_axis.label) == ("question", "image")
        assert "red" in hv.legend.value and hv.matrix.size
    finally:
        ex.close()


def test_a_closed_explorer_refuses_select_and_refresh_before_changing_anything(vqa):
    """Before: ``select`` after ``close()`` changed the selection, then raised the engine's
    "The engine is closed." from inside the views' observers."""
    ex, _ = vqa
    ex.select(instance=2)
    assert ex.wait(30)
    ex.close()
    with pytest.raises(RuntimeError, match="This Explorer is closed.*create a new one"):
        ex.select(instance=4)
    with pytest.raises(RuntimeError, match="This Explorer is closed"):
        ex.refresh()
    assert ex.selection.instance == 2 and ex.engine.closed


def test_the_banner_is_not_rewritten_while_a_result_is_applied_on_the_worker():
    """The banner's lines are replaced (not set in one go): a click clearing the error on the
    kernel's thread waits for the worker, which sets errors under the engine's lock."""
    from multiviz_widgets.engine import Engine
    from multiviz_widgets.views.controls import ErrorBanner
    engine = Engine(delay=0.01)
    held, release = threading.Event(), threading.Event()

    def worker():
        with engine.lock:
            held.set()
            release.wait(10)
    try:
        banner = ErrorBanner(engine)
        engine.error = "heatmap failed: RuntimeError: " + "kernel exploded " * 12
        holder = threading.Thread(target=worker)
        holder.start()
        assert held.wait(10)
        clearing = threading.Thread(target=engine.clear_error)
        clearing.start()
        time.sleep(0.2)
        assert clearing.is_alive() and banner.visible and len(banner.text.children) >= 2
        release.set()
        clearing.join(10)
        holder.join(10)
        assert not banner.visible and banner.text.children == ()
    finally:
        release.set()
        engine.close()


def test_a_float64_models_logits_stay_float64_in_the_explorer():
    """Two classes 1e-9 apart tie in float32: the Explorer's prediction then could differ from
    the features' (float64, kept as the model gives them)."""
    from multiviz_widgets.explorer import Explorer
    from .explorer_support import FakeKernels, tiny_vqa
    adapter, ds = tiny_vqa()
    adapter.model.double()
    ex = Explorer(adapter, ds, kernels=FakeKernels(), start=False)
    try:
        z = ex.analyses.logits(0)
        assert z.dtype == np.float64
        raw = adapter.predict(adapter.prepare(ds[0]).raw)[0].numpy()
        np.testing.assert_array_equal(z, raw)
    finally:
        ex.close()


def test_the_path_follows_the_pair_menu_with_path_params_that_name_no_modalities():
    """Any path_params (k_neurons=2) pinned the path's pairs to prediction_path's default pair
    while the heatmap and the overlay followed the menu."""
    from multiviz_widgets.explorer import Explorer

    from .explorer_support import FakeKernels, tiny_three
    adapter, ds = tiny_three()
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05, path_params={"k_neurons": 2})
    try:
        assert ex.wait(60)
        ex.select(pair=("meta", "image"))
        assert ex.wait(60)
        menus = {"unimodal_method": "integrated_gradients", "interaction_method": "second_order"}
        assert ex.analyses.path_params == {"k_neurons": 2, **menus,
                                           "modalities": ("meta", "image")}
    finally:
        ex.close()
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05,
                  path_params={"modalities": ("image", "question")})
    try:
        ex.select(pair=("meta", "image"))
        assert ex.wait(60)
        assert ex.analyses.path_params == {**menus,
                                           "modalities": ("image", "question")}   # pinned
    finally:
        ex.close()


@pytest.mark.parametrize("concepts, says", [
    ({"image": {3: 5}}, "a list of texts, got 5"),
    ({"image": {3: np.array(["red", "round"])}}, "a list of texts"),
    ({"image": {"\u00b2": ["red"]}}, "a unit is named by its index"),
])
def test_odd_concepts_given_to_the_input_view_are_refused_with_a_clear_error(concepts, says):
    """They escaped as TypeError ('int' object is not iterable), numpy's ambiguous truth value,
    or int('²')."""
    from multiviz_widgets.views.input_view import InputView
    with pytest.raises(traitlets.TraitError, match=says):
        InputView(concepts=concepts)


def test_recompute_while_the_embedding_job_ends_shows_the_new_features():
    """The embedding's job ends (on the old features) right after "recompute" forgot the
    points: its result is dropped, and the points are computed again from the new features
    (they were brought back and kept)."""
    from multiviz_widgets.explorer import Explorer

    from .explorer_support import FakeKernels, tiny_vqa

    class ModelChanges(FakeKernels):
        def __init__(self):
            super().__init__()
            self.generation, self.gate, self.inside = 0, threading.Event(), threading.Event()

        def features(self, adapter, dataset, progress=None):
            f = super().features(adapter, dataset, progress)
            f.h = f.h + 100.0 * self.generation        # the model retrained: new features
            return f

        def projection(self, h):
            self.inside.set()
            self.gate.wait(10)
            return super().projection(h)

    k = ModelChanges()
    adapter, ds = tiny_vqa()
    ex = Explorer(adapter, ds, kernels=k, delay=0.05)
    try:
        assert k.inside.wait(10)          # the first embedding job is past its progress reports
        k.generation = 1
        ask_again = ex.input_panel.refresh

        def the_old_job_ends_first():     # the worker ends it between forget and the views' asks
            k.gate.set()
            time.sleep(0.3)
            ask_again()
        ex.input_panel.refresh = the_old_job_ends_first
        ex.refresh()
        ex.input_panel.refresh = ask_again
        assert ex.wait(30)
        assert float(np.asarray(ex.embedding_view._features.h).mean()) > 50
    finally:
        ex.close()


def test_patch_names_are_spelled_out_where_they_are_shown(vqa):
    """"patch r6c0" on the heatmap's axes and the path's nodes was never explained."""
    from multiviz_widgets.views._common import patch_names_key
    assert patch_names_key(["what", "patch r6c0"]).startswith("; a patch rRcC is the patch in "
                                                              "row R, column C")
    assert patch_names_key(["what", "segment 3", "patch", "patch r6"]) == ""
    ex, _ = vqa
    assert "image" in ex.pair
    assert "row R, column C of the image's grid" in ex.heatmap_view.legend.value
    shown = [n["label"] for n in ex.path_view.nodes if n["kind"] == "unit"]
    assert ("row R, column C" in ex.path_view.caption.value) == any(
        str(x).startswith("patch r") for x in shown)


def test_class_names_of_another_length_are_refused_when_the_explorer_opens():
    """class_names of 5 (or 3) for a model of 4 logits opened an Explorer whose every view was
    empty, with one error, the prediction path's ("prediction path failed: ..."), and an
    interaction-type line blaming non-finite outputs."""
    from multiviz_widgets import AdapterError, Explorer, ModelAdapter
    from tests.explorer_support import tiny_vqa
    good, ds = tiny_vqa()
    for names in (good.class_names + ["extra"], good.class_names[:-1]):
        adapter = ModelAdapter(good.model, list(good.modalities.values()), names)
        with pytest.raises(AdapterError, match=f"returns {len(good.class_names)} logits .* "
                                               f"class_names has {len(names)} names"):
            Explorer(adapter, ds)
    # an instance the adapter refuses is not the model's output: the next one is tried
    bad = [np.full((8, 8, 3), np.nan, np.float32)] + [ds[k]["image"] for k in range(1, len(ds))]
    from multiviz_widgets import MultimodalDataset
    mixed = MultimodalDataset({"image": bad, "question": [ds[k]["question"]
                                                          for k in range(len(ds))]})
    adapter = ModelAdapter(good.model, list(good.modalities.values()), good.class_names[:-1])
    with pytest.raises(AdapterError, match="class_names has"):
        Explorer(adapter, mixed)
    Explorer(good, mixed).close()            # (its instance 0 is said by the views)


def test_a_model_of_integer_outputs_is_refused_when_the_explorer_opens():
    """An int64 output (a one-hot answer) opened an Explorer whose every view failed with it."""
    import torch
    from multiviz_widgets import AdapterError, Explorer, ModelAdapter
    from tests.explorer_support import tiny_vqa
    good, ds = tiny_vqa()

    class OneHot(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, image, question):
            out = self.model(image, question)
            return torch.nn.functional.one_hot(out.argmax(1), out.shape[1])
    adapter = ModelAdapter(OneHot(good.model).eval(), list(good.modalities.values()),
                           good.class_names)
    with pytest.raises(AdapterError) as refused:
        Explorer(adapter, ds)
    assert refused.value.code == "output-dtype"
