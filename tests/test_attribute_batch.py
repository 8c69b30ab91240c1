"""attribute_batch: many instances (or targets) at once give what attribute gives one by one."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from multiviz_widgets import AdapterError, MultimodalDataset, Neuron
from multiviz_widgets.kernels.unimodal import METHODS, attribute, attribute_batch

from .test_unimodal import image_text, tab_series

GRADIENT = ["gradient", "grad_x_input", "integrated_gradients"]
QUESTIONS = ["what shape is the red circle", "what color is the circle", "is the shape red",
             "what shape", "what color is the red shape", "the circle is red", "shape"]


@pytest.fixture(scope="module")
def it_many():
    """The image + text model with instances of several question lengths (several groups)."""
    model, adapter, _ = image_text()
    rng = np.random.default_rng(3)
    instances = [{"image": (rng.random((8, 8, 3)) * 255).astype(np.uint8),
                  "question": QUESTIONS[k % len(QUESTIONS)]} for k in range(11)]
    return adapter, instances


def assert_same(many, one, rtol=1e-5, atol=1e-6):
    assert len(many) == len(one)
    for a, b in zip(many, one):
        gaps = ("completeness_gap", "completeness_gap_relative")
        # the rows per pass each path used: attribute_batch records its own rows_per_pass
        own = gaps + ("internal_batch_size",)
        assert (a.method, a.target) == (b.method, b.target)
        assert {k: v for k, v in a.params.items() if k not in own} == \
            {k: v for k, v in b.params.items() if k not in own}
        for k in gaps:
            assert (k in a.params) == (k in b.params)
            assert a.params.get(k, 0) == pytest.approx(b.params.get(k, 0), rel=1e-3, abs=1e-5)
        assert (a.forward_passes, a.backward_passes) == (b.forward_passes, b.backward_passes)
        assert a.labels == b.labels
        assert set(a.scores) == set(b.scores) and set(a.maps) == set(b.maps)
        for n in a.scores:
            np.testing.assert_allclose(a.scores[n], b.scores[n], rtol=rtol, atol=atol)
            np.testing.assert_allclose(a.maps[n], b.maps[n], rtol=rtol, atol=atol)
        assert a.seconds >= 0


@pytest.mark.parametrize("method", GRADIENT)
def test_batch_equals_one_call_per_instance(it_many, method):
    adapter, instances = it_many
    targets = [k % 3 for k in range(len(instances))]
    many = attribute_batch(adapter, instances, method, targets=targets)
    one = [attribute(adapter, x, method, target=t) for x, t in zip(instances, targets)]
    assert_same(many, one)


def test_predicted_targets_are_found_in_batches_and_counted(it_many):
    adapter, instances = it_many
    many = attribute_batch(adapter, instances, "gradient")
    one = [attribute(adapter, x, "gradient") for x in instances]
    assert_same(many, one)
    assert all(r.forward_passes == 2 for r in many)      # 1 to find the class + 1 to explain it


def test_one_instance_many_targets_with_passes_that_split_an_instance(it_many):
    adapter, instances = it_many
    targets = [Neuron(0), 2, Neuron(5), 0, None]
    many = attribute_batch(adapter, instances[0], "integrated_gradients", targets=targets,
                           rows_per_pass=7, steps=16)
    one = [attribute(adapter, instances[0], "integrated_gradients", target=t, steps=16)
           for t in targets]
    assert_same(many, one)


def test_perturbation_methods_run_one_instance_at_a_time_with_the_same_result(it_many):
    adapter, instances = it_many
    seen = []
    many = attribute_batch(adapter, instances[:4], "kernel_shap", targets=1, n_samples=64,
                           progress=lambda done, total, msg: seen.append((done, total)))
    one = [attribute(adapter, x, "kernel_shap", target=1, n_samples=64) for x in instances[:4]]
    assert_same(many, one, rtol=0, atol=0)
    assert seen[-1] == (4, 4)


def test_a_dataset_and_a_modality_subset():
    _, adapter, inst = tab_series()
    rng = np.random.default_rng(5)
    data = MultimodalDataset({"vitals": [rng.normal(size=3).astype(np.float32) for _ in range(6)],
                              "series": [rng.normal(size=(6, 2)).astype(np.float32)
                                         for _ in range(6)]})
    many = attribute_batch(adapter, data, "grad_x_input", targets=Neuron(1), modalities=["series"])
    one = [attribute(adapter, data[i], "grad_x_input", target=Neuron(1), modalities=["series"])
           for i in range(len(data))]
    assert_same(many, one)
    assert set(many[0].scores) == {"series"}


def test_progress_counts_rows_to_the_end(it_many):
    adapter, instances = it_many
    seen = []
    attribute_batch(adapter, instances, "integrated_gradients", targets=0, steps=10,
                    rows_per_pass=32, progress=lambda done, total, msg: seen.append((done, total)))
    done = [d for d, _ in seen]
    rows = (10 + 2) * len(instances)                 # the steps, then x and the baseline
    assert done == sorted(done) and seen[-1] == (rows, rows)


def test_seconds_are_shares_of_the_call(it_many):
    adapter, instances = it_many
    many = attribute_batch(adapter, instances, "gradient", targets=0)
    assert all(r.seconds > 0 for r in many)
    assert np.allclose([r.seconds for r in many], many[0].seconds)   # equal rows, equal shares


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 40), pick=st.lists(st.integers(0, 10), min_size=1, max_size=6),
       steps=st.integers(2, 12))
def test_any_pass_size_and_any_selection_give_the_same_numbers(it_many, rows, pick, steps):
    adapter, instances = it_many
    chosen = [instances[k] for k in pick]
    targets = [Neuron(k % 6) if k % 2 else k % 3 for k in pick]
    many = attribute_batch(adapter, chosen, "integrated_gradients", targets=targets,
                           rows_per_pass=rows, steps=steps)
    one = [attribute(adapter, x, "integrated_gradients", target=t, steps=steps)
           for x, t in zip(chosen, targets)]
    assert_same(many, one)


def test_ig_completeness_holds_for_each_batched_instance(it_many):
    adapter, instances = it_many
    for r, x in zip(attribute_batch(adapter, instances, "integrated_gradients", targets=1,
                                    steps=200), instances):
        p = adapter.prepare(x)
        with torch.no_grad():
            fx = float(adapter.forward(p.raw)[0, 1])
            fb = float(adapter.forward(p.raw, {n: v.unsqueeze(0)
                                               for n, v in p.baseline.items()})[0, 1])
        assert sum(float(v.sum()) for v in r.scores.values()) == pytest.approx(fx - fb, rel=0.01,
                                                                               abs=1e-4)


# -- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("as_type", [list, tuple, np.array, torch.tensor])
def test_targets_may_be_a_list_tuple_array_or_tensor(it_many, as_type):
    adapter, instances = it_many
    many = attribute_batch(adapter, instances[0], "gradient", targets=as_type([2, 0, 1]))
    assert [r.target.index for r in many] == [2, 0, 1]
    many = attribute_batch(adapter, instances[:3], "gradient", targets=as_type([1, 1, 0]))
    assert [r.target.index for r in many] == [1, 1, 0]


def test_targets_of_the_wrong_length_say_so(it_many):
    adapter, instances = it_many
    with pytest.raises(ValueError, match="targets has 2 entries for 3 instances"):
        attribute_batch(adapter, instances[:3], "gradient", targets=[0, 1])


@pytest.mark.parametrize("instances, match", [([], "at least one instance"),
                                              (5, "takes a list of instances")])
def test_no_instances_or_not_a_list_say_so(it_many, instances, match):
    adapter, _ = it_many
    with pytest.raises(ValueError, match=match):
        attribute_batch(adapter, instances, "gradient")


def test_bad_arguments_are_clear_errors(it_many):
    adapter, instances = it_many
    with pytest.raises(ValueError, match="rows_per_pass"):
        attribute_batch(adapter, instances, "gradient", rows_per_pass=0)
    with pytest.raises(ValueError, match="Unknown stage-1 method"):
        attribute_batch(adapter, instances, "saliency")
    with pytest.raises(TypeError, match="does not take"):
        attribute_batch(adapter, instances, "gradient", steps=5)
    with pytest.raises(AdapterError, match="needs a ModelAdapter"):
        attribute_batch(object(), instances, "gradient")
    with pytest.raises(AdapterError, match="Neuron 99 is out of range"):
        attribute_batch(adapter, instances, "gradient", targets=Neuron(99))
    with pytest.raises(ValueError, match="zebra"):
        attribute_batch(adapter, instances, "gradient", targets="zebra")


def test_every_method_is_accepted(it_many):
    adapter, instances = it_many
    for name in METHODS:
        out = attribute_batch(adapter, instances[:2], name, targets=0)
        assert [r.method for r in out] == [name, name]
