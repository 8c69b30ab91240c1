"""Results as plain data: to_dict / *_from_dict round trips, strict JSON, and a short repr."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from multiviz_widgets import ModelAdapter, Neuron, Tabular, TimeSeries
from multiviz_widgets.adapter import Target
from multiviz_widgets.kernels.interactions import interaction
from multiviz_widgets.kernels.unimodal import METHODS, attribute
from multiviz_widgets.results import (Attribution, Interaction, attribution_from_dict,
                                      interaction_from_dict)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b, self.out = nn.Linear(3, 4), nn.Linear(12, 4), nn.Linear(4, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.6)

    def forward(self, vitals, series):
        return self.out(torch.tanh(self.a(vitals)) * torch.tanh(self.b(series.flatten(1))))


@pytest.fixture(scope="module")
def setup():
    adapter = ModelAdapter(Net().eval(), [Tabular("vitals", columns=["hr", "bp", "t"]),
                                          TimeSeries("series", window=2, channels=["x", "y"])],
                           ["no", "yes"])
    rng = np.random.default_rng(0)
    return adapter, {"vitals": rng.normal(size=3).astype(np.float32),
                     "series": rng.normal(size=(6, 2)).astype(np.float32)}


def assert_same_attribution(a: Attribution, b: Attribution):
    assert (a.method, a.target, a.forward_passes, a.backward_passes, a.seconds) == \
        (b.method, b.target, b.forward_passes, b.backward_passes, b.seconds)
    assert a.labels == b.labels and set(a.scores) == set(b.scores) == set(a.maps)
    for n in a.scores:
        np.testing.assert_array_equal(a.scores[n], b.scores[n])
        np.testing.assert_array_equal(a.maps[n], b.maps[n])
        assert a.maps[n].shape == b.maps[n].shape


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("target", [1, Neuron(2)])
def test_attribution_round_trips_through_strict_json(setup, method, target):
    adapter, inst = setup
    kw = {"n_samples": 20} if method in ("lime", "kernel_shap") else {}
    r = attribute(adapter, inst, method, target=target, **kw)
    text = json.dumps(r.to_dict(), allow_nan=False)
    data = json.loads(text)
    assert data["type"] == "attribution"
    assert data["target"] == {"kind": r.target.kind, "index": r.target.index}
    back = attribution_from_dict(data)
    assert_same_attribution(back, r)
    assert back.params == json.loads(json.dumps(r.params, default=str))
    assert json.dumps(back.to_dict(), allow_nan=False) == text


@pytest.mark.parametrize("method,params", [("second_order", {}), ("pairwise_ablation", {}),
                                           ("shapley", {"max_players": 4})])
def test_interaction_round_trips_through_strict_json(setup, method, params):
    adapter, inst = setup
    r = interaction(adapter, inst, method, target=0, **params)
    text = json.dumps(r.to_dict(), allow_nan=False)
    back = interaction_from_dict(json.loads(text))
    assert (back.method, back.target, back.modalities) == (r.method, r.target, r.modalities)
    assert (back.row_labels, back.col_labels) == (r.row_labels, r.col_labels)
    np.testing.assert_array_equal(back.matrix, r.matrix)
    assert back.top_pairs(3) == r.top_pairs(3)
    assert json.dumps(back.to_dict(), allow_nan=False) == text


def test_numpy_scalars_tuples_and_targets_in_params_become_plain_json():
    r = Interaction(method="m", target=Target("neuron", 3), modalities=("a", "b"),
                    matrix=np.zeros((0, 2), np.float32), col_labels=["u", "v"],
                    params={"steps": np.int64(5), "gap": np.float32(0.25), "ok": np.bool_(True),
                            "pair": ("a", "b"), "arr": np.arange(3), "bad": float("nan"),
                            "inf": np.float64(np.inf), "nested": {1: [np.float64(0.5)]},
                            "target": Target("class", 1), "obj": object})
    data = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert data["params"] == {"steps": 5, "gap": 0.25, "ok": True, "pair": ["a", "b"],
                              "arr": [0, 1, 2], "bad": None, "inf": None, "nested": {"1": [0.5]},
                              "target": {"kind": "class", "index": 1}, "obj": str(object)}
    assert data["target"] == {"kind": "neuron", "index": 3}
    back = interaction_from_dict(data)
    assert back.matrix.shape == (0, 2) and back.modalities == ("a", "b")


def test_from_dict_refuses_the_other_kind_of_result(setup):
    adapter, inst = setup
    data = attribute(adapter, inst, "gradient", target=0).to_dict()
    with pytest.raises(ValueError, match="Expected the to_dict\\(\\) data of an Interaction"):
        interaction_from_dict(data)
    with pytest.raises(ValueError, match="of an Attribution.*got 'interaction'"):
        attribution_from_dict(dict(data, type="interaction"))


def _without(data: dict, field: str) -> dict:
    return {k: v for k, v in data.items() if k != field}


@pytest.mark.parametrize("change, says", [
    (lambda d: dict(d, target={"kind": "class", "index": 0.7}), "class index must be an integer"),
    (lambda d: dict(d, target={"kind": "class", "index": True}), "class index must be an integer"),
    (lambda d: _without(d, "target"), "no 'target' field"),
    (lambda d: _without(d, "scores"), "no 'scores' field"),
    (lambda d: dict(d, scores=[1.0, 2.0]), "\"scores\" must map each modality"),
    (lambda d: dict(d, scores=dict(d["scores"], vitals=[1.0, 2.0])),
     "scores of 'vitals' have shape \\(2,\\) but it has 3 unit labels"),
    (lambda d: dict(d, maps={"vitals": d["maps"]["vitals"]}), "name other modalities"),
    (lambda d: dict(d, method=None), "\"method\" must be the method's name"),
    (lambda d: dict(d, forward_passes=2.7), "\"forward_passes\" must be an integer"),
    (lambda d: dict(d, labels=dict(d["labels"], vitals="hbt")), "must be a list of unit names"),
])
def test_attribution_data_of_the_wrong_shape_is_refused_with_what_is_wrong(setup, change, says):
    adapter, inst = setup
    data = json.loads(json.dumps(attribute(adapter, inst, "gradient", target=0).to_dict()))
    with pytest.raises(ValueError, match="This is not Attribution.to_dict\\(\\) data: .*" + says):
        attribution_from_dict(change(data))


@pytest.mark.parametrize("change, says", [
    (lambda d: dict(d, matrix=[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
     "matrix has shape \\(3, 2\\) but there are 2 row labels and 3 column labels"),
    (lambda d: dict(d, matrix=[[1.0, 2.0, 3.0], [4.0, 5.0]]), "This is not"),
    (lambda d: dict(d, modalities=["a"]), "must name the two modalities"),
    (lambda d: _without(d, "row_labels"), "no 'row_labels' field"),
])
def test_interaction_data_of_the_wrong_shape_is_refused_with_what_is_wrong(change, says):
    r = Interaction(method="pairwise", target=Target("class", 0), modalities=("a", "b"),
                    matrix=np.ones((2, 3)), row_labels=["r0", "r1"],
                    col_labels=["c0", "c1", "c2"])
    data = json.loads(json.dumps(r.to_dict()))
    with pytest.raises(ValueError, match=says):
        interaction_from_dict(change(data))


def test_repr_is_one_short_line_without_arrays():
    big = np.arange(100_000, dtype=np.float64)
    a = Attribution(method="integrated_gradients", target=Target("class", 2),
                    forward_passes=52, backward_passes=52, seconds=0.0123456,
                    scores={"image": big[:196], "question": big[:7]},
                    maps={"image": big.reshape(250, 400)}, labels={"question": ["w"] * 7})
    text = repr(a)
    assert text == ("Attribution(integrated_gradients, target=class 2, scores={image: (196,), "
                    "question: (7,)}, forward_passes=52, backward_passes=52, seconds=0.0123)")
    i = Interaction(method="second_order", target=Target("neuron", 1), modalities=("img", "txt"),
                    matrix=big[:196 * 7].reshape(196, 7), forward_passes=1, backward_passes=8)
    assert repr(i) == ("Interaction(second_order, target=neuron 1, matrix=(196, 7) (img x txt), "
                       "forward_passes=1, backward_passes=8, seconds=0)")
    assert str(a) == repr(a) and "\n" not in repr(i) + repr(a)


def _interaction_data() -> dict:
    return Interaction(method="pairwise", target=Target("class", 0), modalities=("a", "b"),
                       matrix=np.ones((2, 2)), row_labels=["r0", "r1"],
                       col_labels=["c0", "c1"]).to_dict()


@pytest.mark.parametrize("change, says", [
    ({"matrix": [["nan", 1.0], [1.0, 1.0]]}, "matrix must hold numbers .* got 'nan'"),
    ({"matrix": [[1.0, "1e3"], [1.0, 1.0]]}, "matrix must hold numbers .* got '1e3'"),
    ({"matrix": [[True, 1.0], [1.0, None]]}, "matrix must hold numbers .* got True"),
    ({"matrix": [[True, False], [True, True]]}, "matrix must hold numbers .* got True"),
    ({"matrix": [[10 ** 400, 1.0], [1.0, 1.0]]}, "matrix has a number too large for a float"),
    ({"seconds": 10 ** 400}, "a number too large for a float"),
    ({"seconds": "1e3"}, "\"seconds\" must be a number, got '1e3'"),
    ({"modalities": [7, 7]}, "\"modalities\" must name the two modalities"),
    ({"modalities": ["a", "a"]}, "two different names.*got \\['a', 'a'\\]"),
    ({"row_labels": [None, {"x": 1}]}, "\"row_labels\" must be strings, got None"),
    ({"col_labels": ["c0", 1]}, "\"col_labels\" must be strings, got 1"),
    ({"params": [["k", 1]]}, "\"params\" must map each parameter's name to its value"),
])
def test_interaction_data_with_values_to_dict_never_writes_is_refused(change, says):
    with pytest.raises(ValueError, match="This is not Interaction.to_dict\\(\\) data: .*" + says):
        interaction_from_dict({**_interaction_data(), **change})


@pytest.mark.parametrize("change, says", [
    (lambda d: dict(d, scores=dict(d["scores"], vitals=["1", 2.0, 3.0])), "got '1'"),
    (lambda d: dict(d, maps=dict(d["maps"], vitals=[False, 1.0, 1.0])), "got False"),
    (lambda d: dict(d, labels=dict(d["labels"], vitals=["hr", 7, "t"])),
     "the labels of 'vitals' must be strings, got 7"),
    (lambda d: dict(d, params="steps=5"), "\"params\" must map"),
    (lambda d: dict(d, map_shapes=dict(d["map_shapes"], vitals=[4])),
     "the map of 'vitals' has shape \\(3,\\) but \"map_shapes\" says \\(4,\\)"),
])
def test_attribution_data_with_values_to_dict_never_writes_is_refused(setup, change, says):
    adapter, inst = setup
    data = json.loads(json.dumps(attribute(adapter, inst, "gradient", target=0).to_dict()))
    with pytest.raises(ValueError, match="This is not Attribution.to_dict\\(\\) data: .*" + says):
        attribution_from_dict(change(data))


def test_top_pairs_ranks_nan_after_minus_infinity_when_signed():
    i = Interaction(method="m", target=Target("class", 0), modalities=("a", "b"),
                    matrix=np.array([[np.nan, -np.inf], [-1.0, np.nan]]),
                    row_labels=["r0", "r1"], col_labels=["c0", "c1"])
    top = i.top_pairs(4, absolute=False)
    assert top[:2] == [(1, 0, -1.0), (0, 1, -np.inf)]
    assert [(r, c) for r, c, _ in top[2:]] == [(0, 0), (1, 1)]      # NaN last, row-major
    assert i.top_pairs(2) == [(0, 1, -np.inf), (1, 0, -1.0)]


def test_empty_maps_keep_their_shape_and_data_without_shapes_still_loads():
    a = Attribution(method="m", target=Target("class", 0), scores={"t": np.zeros(0)},
                    maps={"t": np.zeros((0, 4)), "u": np.zeros((2, 0, 3))},
                    labels={"t": []})
    a.scores["u"], a.labels["u"] = np.zeros(0), []
    data = json.loads(json.dumps(a.to_dict(), allow_nan=False))
    back = attribution_from_dict(data)
    assert back.maps["t"].shape == (0, 4) and back.maps["u"].shape == (2, 0, 3)
    old = {k: v for k, v in data.items() if k != "map_shapes"}      # written before them
    assert attribution_from_dict(old).maps["t"].shape == (0,)


def test_a_count_given_as_a_one_element_array_says_how_to_pass_it():
    i = Interaction(method="m", target=Target("class", 0), modalities=("a", "b"),
                    matrix=np.arange(4.0).reshape(2, 2))
    assert len(i.top_pairs(torch.tensor([3]))) == 3 and len(i.top_pairs(np.array(3))) == 3
    with pytest.raises(ValueError, match=r"one element: pass the element, a\[0\] or a.item\(\)"):
        i.top_pairs(np.array([3]))
