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
    assert st["items"] == [] and "not shown (RuntimeError)" in ex.input_view.caption
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
    assert nv.gallery_caption.value == "gallery not shown (RuntimeError)"
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
