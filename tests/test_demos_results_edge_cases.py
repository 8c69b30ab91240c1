"""Edge cases of the demos (easy-VQA, synthetic), the result objects and the shared kernel helpers."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from multiviz_widgets.adapter import Target
from multiviz_widgets.demos import easy_vqa as demo
from multiviz_widgets.demos import synthetic
from multiviz_widgets.kernels import common
from multiviz_widgets.results import (Attribution, Interaction, attribution_from_dict,
                                      interaction_from_dict)


# -- results ----------------------------------------------------------------------------------
def test_non_finite_values_serialise_as_strict_json_and_come_back_as_nan():
    a = Attribution("occlusion", Target("class", 1),
                    scores={"x": np.array([np.nan, 1.5, np.inf])},
                    maps={"x": np.array([[np.nan, 2.0], [-np.inf, 0.0]])},
                    labels={"x": ["a", "b", "c"]})
    data = json.loads(json.dumps(a.to_dict(), allow_nan=False))
    assert data["scores"]["x"] == [None, 1.5, None]
    back = attribution_from_dict(data)
    np.testing.assert_array_equal(back.scores["x"], [np.nan, 1.5, np.nan])
    assert back.maps["x"].shape == (2, 2) and back.maps["x"][0, 1] == 2.0

    i = Interaction("sog", Target("class", 0), modalities=("x", "y"),
                    matrix=np.array([[np.nan, 1.0]]), row_labels=["r"], col_labels=["c0", "c1"])
    back = interaction_from_dict(json.loads(json.dumps(i.to_dict(), allow_nan=False)))
    np.testing.assert_array_equal(back.matrix, [[np.nan, 1.0]])


def test_interaction_from_dict_with_labels_that_do_not_fit_the_matrix_is_a_clear_error():
    i = Interaction("sog", Target("class", 0), modalities=("x", "y"), matrix=np.ones((2, 2)),
                    row_labels=["a", "b"], col_labels=["c", "d"])
    data = i.to_dict()
    data["col_labels"] = ["c"]
    with pytest.raises(ValueError, match="2 row labels and 1 column labels"):
        interaction_from_dict(data)


def test_top_pairs_ranks_nan_last_and_refuses_a_bad_k():
    i = Interaction("sog", Target("class", 0), modalities=("x", "y"),
                    matrix=np.array([[np.nan, 0.1], [5.0, -7.0]]))
    assert i.top_pairs(2) == [(1, 1, -7.0), (1, 0, 5.0)]
    assert i.top_pairs(2, absolute=False) == [(1, 0, 5.0), (0, 1, 0.1)]
    assert i.top_pairs(np.int64(1)) == [(1, 1, -7.0)]
    assert i.top_pairs(0) == []
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="top_pairs' k"):
            i.top_pairs(bad)


# -- kernels/common.py ------------------------------------------------------------------------
def test_block_pairs_of_no_pairs_and_a_bad_batch_size():
    assert list(common.block_pairs(0, 3, None, "cpu")) == []
    assert list(common.block_pairs(3, 0, 2, "cpu")) == []
    with pytest.raises(ValueError, match="batch_size"):
        list(common.block_pairs(2, 3, 0, "cpu"))


def test_dataset_indices_name_the_value_that_is_out_of_range():
    with pytest.raises(ValueError, match=f"{2 ** 70} is out of range"):
        common.dataset_indices([1, 2 ** 70], 5)
    with pytest.raises(ValueError, match=f"{2 ** 63} is out of range"):
        common.dataset_indices(np.array([2 ** 63], dtype=np.uint64), 5)   # no wrap to negative
    with pytest.raises(ValueError, match="dataset is empty"):
        common.dataset_index(0, 0)
    np.testing.assert_array_equal(common.dataset_indices(np.array([1, 2], dtype=object), 5), [1, 2])
    np.testing.assert_array_equal(common.dataset_indices([-1, 0], 5, negative=True), [4, 0])
    with pytest.raises(ValueError, match="out of range"):
        common.dataset_indices([-1], 5)


@pytest.mark.parametrize("n", [-1, 2.5, True])
def test_sample_indices_refuses_a_bad_count(n):
    with pytest.raises(ValueError, match="number of instances to sample"):
        common.sample_indices(10, n, 0)


def test_sample_indices_edge_counts():
    assert len(common.sample_indices(10, 0, 0)) == 0
    np.testing.assert_array_equal(common.sample_indices(3, np.int64(5), 0), [0, 1, 2])
    big = common.sample_indices(10 ** 12, 3, 0)
    assert len(set(big.tolist())) == 3 and (np.diff(big) > 0).all()


# -- easy-VQA: loading --------------------------------------------------------------------------
def _edit_meta(m, fn):
    meta = json.loads(m.read_text())
    m.write_text(json.dumps(fn(meta)))


def _set(meta, path, value):
    *first, last = path
    d = meta
    for k in first:
        d = d[k]
    d[last] = value
    return meta


@pytest.mark.parametrize("edit, match", [
    (lambda m: ["config"], "must be a JSON object"),
    (lambda m: "config vocab answers", "must be a JSON object"),
    (lambda m: _set(m, ["config"], None), "'config' must be an object"),
    (lambda m: _set(m, ["config", "bogus"], 1), "unknown keys \\['bogus'\\]"),
    (lambda m: _set(m, ["config", "channels"], [16, 32]), "3 positive integers"),
    (lambda m: _set(m, ["vocab"], m["vocab"][:-1]), "'vocab' has 27 entries"),
    (lambda m: _set(m, ["vocab"], m["vocab"][::-1]), "must start with '\\[PAD\\]'"),
    (lambda m: _set(m, ["answers"], m["answers"][:-1]), "'answers' has 12 entries"),
])
def test_a_description_that_does_not_match_the_weights_is_a_clear_error(weights_copy, edit, match):
    w, m = weights_copy
    _edit_meta(m, edit)
    with pytest.raises(demo.WeightsError, match=match):
        demo.load_adapter(w)


@pytest.mark.parametrize("change, match", [
    (lambda t: t.to(torch.int64), "non-float tensors"),
    (lambda t: t.index_fill(0, torch.tensor([0]), float("nan")), "NaN or infinite"),
])
def test_weights_of_the_wrong_type_or_not_finite_are_a_clear_error(weights_copy, change, match):
    from safetensors.torch import load_file, save_file
    w, m = weights_copy
    state = load_file(str(w))
    state["classifier.weight"] = change(state["classifier.weight"])
    save_file(state, str(w))
    _edit_meta(m, lambda meta: {k: v for k, v in meta.items() if k != "weights_sha256"})
    with pytest.raises(demo.WeightsError, match=match):
        demo.load_adapter(w)


def test_load_adapter_takes_the_folder_train_wrote(weights_copy):
    w, _ = weights_copy
    assert demo.load_adapter(w.parent).names == demo.load_adapter(w).names


# -- easy-VQA: predict and accuracy -------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded():
    return demo.load("test")


@pytest.mark.parametrize("indices, match", [
    ([1.7, 2.2], "not truncated"),
    ([True, False, True], "boolean mask"),
    ([10 ** 6], "out of range"),
])
def test_predict_and_accuracy_refuse_bad_indices(loaded, indices, match):
    adapter, ds = loaded
    with pytest.raises(ValueError, match=match):
        demo.predict(adapter.model, ds, indices)
    with pytest.raises(ValueError, match=match):
        demo.accuracy(adapter.model, ds, indices)


def test_predict_edge_cases(loaded):
    adapter, ds = loaded
    n = len(ds)
    assert demo.predict(adapter.model, ds, []).shape == (0,)
    np.testing.assert_array_equal(demo.predict(adapter.model, ds, [-1, 0]),
                                  demo.predict(adapter.model, ds, [n - 1, 0]))
    np.testing.assert_array_equal(demo.predict(adapter, ds, torch.tensor([0, 1])),
                                  demo.predict(adapter.model, ds, [0, 1]))
    with pytest.raises(ValueError, match="at least one question"):
        demo.accuracy(adapter.model, ds, [])
    with pytest.raises(ValueError, match="batch_size"):
        demo.predict(adapter.model, ds, [0, 1], batch_size=0)


# -- easy-VQA: training -------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    ({"epochs": 0}, "epochs"),
    ({"val_every": 1}, "val_every"),
    ({"batch_size": 0}, "batch_size"),
    ({"max_steps_per_epoch": 0}, "max_steps_per_epoch"),
    ({"lr": float("nan")}, "lr"),
    ({"config": {"bogus": 1}}, "unknown keys"),
    ({"config": {"vocab_size": 30}}, "'vocab' has 28 entries"),
    ({"config": [1]}, "config must be a dict"),
])
def test_bad_training_arguments_fail_before_training_and_writing(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        demo.train(out_dir=tmp_path / "out", log=lambda m: None, **kw)
    assert not (tmp_path / "out").exists()


def test_cli_reports_bad_config_json(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["train", "--config", "{width: 96}"])
    assert e.value.code == 2
    assert "--config is not valid JSON" in capsys.readouterr().err


def test_saved_weights_are_byte_for_byte_reproducible(tmp_path):
    state = {f"w{k}": torch.full((3,), float(k)) for k in range(4)}
    blobs = set()
    for k in range(8):          # the metadata order used to change from one save to the next
        demo.save_weights(state, tmp_path / f"{k}.safetensors")
        blobs.add((tmp_path / f"{k}.safetensors").read_bytes())
    assert len(blobs) == 1


def test_training_restores_threads_and_random_states_and_writes_no_partial_files(
        tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    random.seed(7)
    np.random.seed(7)
    want = (torch.rand(1), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(7)
    np.random.seed(7)
    out = tmp_path / "out"
    demo.train(epochs=1, max_steps_per_epoch=1, out_dir=out, log=lambda m: None,
               evaluate_test=False, val_every=1000, threads=1)
    assert torch.get_num_threads() == threads
    assert (torch.rand(1), random.random(), np.random.rand()) == want
    assert sorted(p.name for p in out.iterdir()) == ["easy_vqa.json", "easy_vqa.safetensors"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(demo.json, "dumps", broken)     # writing the JSON fails
    with pytest.raises(OSError, match="disk full"):
        demo.train(epochs=1, max_steps_per_epoch=1, out_dir=out, log=lambda m: None,
                   evaluate_test=False, val_every=1000, threads=1, seed=1)
    # the previous weights and description are intact and still match, no temporary files left
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    demo.load_adapter(out)


# -- synthetic ------------------------------------------------------------------------------------
def test_synthetic_models_are_copies_so_edits_do_not_leak_into_later_loads():
    adapter, _ = synthetic.load("additive")
    with torch.no_grad():
        adapter.model.head.weight.zero_()
    again, _ = synthetic.load("additive")
    assert again.model is not adapter.model
    assert again.model.head.weight.abs().sum() > 0
    model, metrics = synthetic.train("additive")
    metrics["test_accuracy"] = -1.0
    assert synthetic.info("additive")["test_accuracy"] > 0.5
    assert synthetic.train("additive", 0)[1] == synthetic.train(kind="additive", seed=0)[1]


def test_synthetic_bad_split_fails_before_training(monkeypatch):
    monkeypatch.setattr(synthetic, "_train_cached",
                        lambda *a: pytest.fail("trained before checking the split"))
    with pytest.raises(ValueError, match="Unknown split"):
        synthetic.load("planted", "validation", seed=12345)


def test_synthetic_data_sizes():
    tab, series, labels = synthetic.make_data(0)
    assert tab.shape == (0, 6) and series.shape == (0, 32, 3) and labels.shape == (0,)
    for n in (-1, 2.5):
        with pytest.raises(ValueError, match="number of instances"):
            synthetic.make_data(n)
    with pytest.raises(ValueError, match="n must be an integer of at least 1"):
        synthetic.make_dataset("test", n=0)


def test_synthetic_planted_units_match_the_data_generation():
    # the label flips with the sign of the planted series unit's window mean exactly as the
    # documented formula says: recompute it from the unit numbers, not from make_data's code
    tab, series, labels = synthetic.make_data(500, seed=3)
    w, c = divmod(synthetic.PLANTED_UNITS["series"], len(synthetic.CHANNELS))
    assert (w, synthetic.CHANNELS[c]) == (2, "respiration")
    s = series[:, w * synthetic.WINDOW:(w + 1) * synthetic.WINDOW, c].mean(1)
    add = synthetic.ADDITIVE_WEIGHT * (tab[:, 0] - tab[:, 4])
    for u, sign in zip(synthetic.ADDITIVE_UNITS["series"], (1, -1)):
        wu, cu = divmod(u, len(synthetic.CHANNELS))
        add = add + sign * synthetic.ADDITIVE_WEIGHT * series[
            :, wu * synthetic.WINDOW:(wu + 1) * synthetic.WINDOW, cu].mean(1)
    score = add + synthetic.INTERACTION_WEIGHT * tab[:, synthetic.PLANTED_COLUMN] * s
    np.testing.assert_array_equal(labels, (score > 0).astype(np.int64))
    assert synthetic.unit_names([synthetic.PLANTED_UNITS["series"]], "series") == [
        "respiration t16-23"]


@pytest.mark.parametrize("units, modality", [([12], "series"), ([-1], "series"),
                                             ([6], "tabular"), ([-1], "tabular"),
                                             ([1.0], "tabular")])
def test_synthetic_unit_names_refuse_units_out_of_range(units, modality):
    with pytest.raises(ValueError, match="units are numbered"):
        synthetic.unit_names(units, modality)


def test_evaluate_masks_with_no_rows_and_a_bad_batch_size():
    adapter, ds = synthetic.load("additive")
    prepared = adapter.prepare(ds[0])
    target = adapter.target(0)
    out = common.evaluate_masks(adapter, prepared, {"tabular": torch.zeros(0, 6)}, target)
    assert out.shape == (0,)
    with pytest.raises(ValueError, match="batch_size"):
        common.evaluate_masks(adapter, prepared, {"tabular": torch.ones(2, 6)}, target,
                              batch_size=0)
    full = common.evaluate_masks(adapter, prepared, {"tabular": torch.ones(3, 6)}, target,
                                 batch_size=np.int64(2))
    assert full.shape == (3,)
