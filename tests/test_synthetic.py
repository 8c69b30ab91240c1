"""The synthetic ground-truth tasks: data, training, planted units, adapter wiring."""
import numpy as np
import pytest
import torch

from multiviz_widgets import ModelAdapter
from multiviz_widgets.demos import synthetic


@pytest.fixture(scope="module", params=synthetic.KINDS)
def task(request):
    return (request.param,) + synthetic.load(request.param)


def test_load_gives_adapter_and_labelled_dataset(task):
    kind, adapter, ds = task
    assert isinstance(adapter, ModelAdapter)
    assert adapter.names == ["tabular", "series"]
    assert adapter.class_names == list(synthetic.CLASS_NAMES)
    assert len(ds) == synthetic.N_TEST and ds.labels is not None
    inst = ds[0]
    assert inst["tabular"].shape == (len(synthetic.COLUMNS),)
    assert inst["series"].shape == (synthetic.STEPS, len(synthetic.CHANNELS))
    assert "glucose" in ds.describe(0)


def test_models_learn_their_task(task):
    kind, adapter, ds = task
    m = synthetic.info(kind)
    assert m["test_accuracy"] > 0.85, m
    preds = []
    for _, batch in ds.batches(256):
        preds.append(adapter.predict(adapter.collate(batch)).argmax(1).numpy())
    assert (np.concatenate(preds) == ds.labels).mean() > 0.85


def test_decision_layer_has_32_features(task):
    kind, adapter, ds = task
    logits, h = adapter.features(adapter.collate([ds[0], ds[1]]))
    assert h.shape == (2, 32) and logits.shape == (2, 2)
    w, b = adapter.decision_weights()
    assert w.shape == (2, 32)
    assert np.allclose(h.numpy() @ w.T + b, logits.numpy(), atol=1e-5)


def test_readable_unit_labels_and_planted_units():
    adapter, ds = synthetic.load("planted")
    p = adapter.prepare(ds[0])
    assert p.labels["tabular"] == list(synthetic.COLUMNS)
    assert p.n_units["series"] == synthetic.N_WINDOWS * len(synthetic.CHANNELS)
    assert p.labels["tabular"][synthetic.PLANTED_UNITS["tabular"]] == "glucose"
    assert p.labels["series"][synthetic.PLANTED_UNITS["series"]] == "respiration t16-23"
    assert synthetic.unit_names([synthetic.PLANTED_UNITS["series"]], "series") == ["respiration t16-23"]


def test_planted_label_depends_on_the_product():
    tab, series, y = synthetic.make_data(2000, seed=5, kind="planted")
    means = series.reshape(len(y), synthetic.N_WINDOWS, synthetic.WINDOW, -1).mean(2).reshape(len(y), -1)
    prod = tab[:, synthetic.PLANTED_UNITS["tabular"]] * means[:, synthetic.PLANTED_UNITS["series"]]
    assert ((prod > 0) == (y == 1)).mean() > 0.75
    _, _, y_add = synthetic.make_data(2000, seed=5, kind="additive")
    assert abs(((prod > 0) == (y_add == 1)).mean() - 0.5) < 0.1


def test_additive_twin_is_exactly_additive():
    adapter, ds = synthetic.load("additive")
    raw = adapter.collate([ds[i] for i in range(4)])
    t, s = raw["tabular"], raw["series"]
    f = lambda i, j: adapter.predict({"tabular": t[i:i + 1], "series": s[j:j + 1]})[0]
    for i, j in [(0, 1), (2, 3)]:
        assert torch.allclose(f(i, i) + f(j, j), f(i, j) + f(j, i), atol=1e-5)


def test_training_is_deterministic():
    m1, _ = synthetic.train.__wrapped__("additive", 3, steps=5)
    m2, _ = synthetic.train.__wrapped__("additive", 3, steps=5)
    for (k, v), (_, w) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(v, w), k


def test_errors_are_clear():
    with pytest.raises(ValueError, match="Unknown synthetic task"):
        synthetic.load("xor")
    with pytest.raises(ValueError, match="Unknown split"):
        synthetic.make_dataset("validation")
    with pytest.raises(ValueError, match="Unknown modality"):
        synthetic.unit_names([0], "image")
