"""Stage 3 and 4 edge cases from a bug hunt: the binary elastic net's objective, results that
shared memory with the model or with each other, float64 rankings, progress that ended short
of its total, and bad inputs that gave wrong numbers or confusing errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from multiviz_widgets import ModelAdapter, MultimodalDataset, Tabular
from multiviz_widgets.kernels.metrics import deletion_insertion, relevance_mass, relevance_rank
from multiviz_widgets.kernels.prediction import fit_sparse_model, prediction_path
from multiviz_widgets.kernels.projection import colour_groups
from multiviz_widgets.kernels.representations import (
    StreamingExtremes, decision_contributions, extract_features, neuron_extremes)

F, D, C = 4, 5, 3


class Tiny(nn.Module):
    """tabular [F] -> h = tanh(A x) [D] -> head -> [C]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(F, D)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        return self.head(torch.tanh(self.enc(x)))


def tiny_adapter():
    return ModelAdapter(Tiny().eval(), [Tabular("x", columns=[f"c{i}" for i in range(F)])],
                        [f"k{i}" for i in range(C)], decision_layer="head")


def tiny_dataset(n=6, nan_at=()):
    rng = np.random.default_rng(0)
    x = [rng.normal(size=F).astype(np.float32) for _ in range(n)]
    for i in nan_at:
        x[i][0] = np.nan
    return MultimodalDataset({"x": x})


def softmax(v):
    e = np.exp(v - v.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def kkt_residual(m, h, y, i):
    """The largest violation of the elastic net's optimality conditions at path point i, for
    (1/n) sum CE + lam (alpha |W|_1 + (1 - alpha)/2 |W|^2) in the sparse model's z space."""
    z = m.standardise(h)
    W, b, lam, a = m.path_weights[i], m.path_biases[i], m.path_lambdas[i], m.alpha
    Y = np.eye(W.shape[0])[y]
    P = softmax(z @ W.T + b)
    G = (P - Y).T @ z / len(z) + lam * (1 - a) * W
    on = W != 0
    res = np.abs(G + lam * a * np.sign(W))[on].max(initial=0)
    off = np.maximum(np.abs(G[~on]) - lam * a, 0).max(initial=0)
    return max(res, off, np.abs((P - Y).mean(0)).max())


# -- stage 4: the elastic net -----------------------------------------------------------------------
@pytest.mark.parametrize("n_classes", [2, 3])
def test_every_path_point_solves_the_documented_elastic_net(n_classes):
    # scikit-learn's binary fit penalised |v|^2 of its one logit where the softmax rows (-v/2, v/2)
    # carry |v|^2 / 2: the two-class path solved another objective (the L2 part doubled)
    rng = np.random.default_rng(0)
    h = rng.normal(size=(300, 5)) * [1, 2, 0.5, 1, 3] + 1
    y = (h @ rng.normal(size=(5, n_classes)) + rng.normal(size=(300, n_classes))).argmax(1)
    m = fit_sparse_model((h, y), val=(h, y), alpha=0.5, n_lambdas=4, eps=0.01, tol=1e-10,
                         max_iter=5000, stop_early=False)
    for i in range(len(m.path_lambdas)):
        assert kkt_residual(m, h, y, i) < 1e-4, i


def test_the_chosen_bias_is_not_a_view_of_the_path():
    rng = np.random.default_rng(1)
    h = rng.normal(size=(120, 3))
    y = (h[:, 0] > 0).astype(int)
    m = fit_sparse_model((h, y), n_lambdas=3, stop_early=False)
    kept = m.path_biases.copy()
    m.bias += 1.0
    np.testing.assert_array_equal(m.path_biases, kept)


def test_fidelity_checks_its_targets_instead_of_broadcasting():
    rng = np.random.default_rng(2)
    h = rng.normal(size=(100, 3))
    y = (h[:, 0] > 0).astype(int)
    m = fit_sparse_model((h, y), n_lambdas=3)
    with pytest.raises(ValueError, match="100 feature rows but 1 targets"):
        m.fidelity(h, [0])                        # broadcast: was the share of class 0
    assert m.fidelity(h, np.eye(2)[y]) == m.fidelity(h, y)    # logits: their argmax, as in fit
    with pytest.raises(ValueError, match="fractional"):
        m.fidelity(h, y + 0.5)
    with pytest.raises(IndexError, match="class index in 0..1"):
        m.top_weights(-1)                         # counted from the end before
    with pytest.raises(ValueError, match="k"):
        m.top_weights(0, -1)


def test_a_path_that_stops_early_reports_its_total():
    rng = np.random.default_rng(3)
    h = rng.normal(size=(200, 3))
    y = (h[:, 0] > 0).astype(int)
    seen = []
    m = fit_sparse_model((h, y), n_lambdas=15, progress=lambda d, t, msg: seen.append((d, t)))
    assert m.params["stopped_at"] < 15
    assert seen[-1] == (15, 15) and all(d <= t for d, t in seen)


# -- the prediction path --------------------------------------------------------------------------
def test_the_path_keeps_its_counts_as_plain_ints():
    """Counts given as numpy integers or one-element tensors are checked and kept as ints (the
    params are JSON data)."""
    adapter, ds = tiny_adapter(), tiny_dataset()
    path = prediction_path(adapter, ds[0], k_neurons=np.int64(2), k_units=torch.tensor(3),
                           unimodal_method="gradient", interaction_method=None)
    assert [type(path.params[k]) for k in ("k_neurons", "k_units", "k_pairs")] == [int] * 3
    with pytest.raises(ValueError, match="k_units"):
        prediction_path(adapter, ds[0], k_units=True, unimodal_method="gradient",
                        interaction_method=None)


def test_the_path_says_what_its_contributions_add_up_to():
    adapter, ds = tiny_adapter(), tiny_dataset()
    path = prediction_path(adapter, ds[0], k_neurons=2, unimodal_method="gradient",
                           interaction_method=None)
    c = decision_contributions(adapter, ds[0])
    W, b = adapter.decision_weights()
    assert path.params["bias"] == pytest.approx(float(b[path.class_index]))
    assert path.params["source_logit"] == pytest.approx(c.contributions.sum() + b[c.class_index],
                                                        abs=1e-5)
    assert path.params["source_logit"] == pytest.approx(path.logit, abs=1e-5)
    # with a sparse model: its own logit, which is not the model's
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, F)).astype(np.float32)
    f = extract_features(adapter, MultimodalDataset({"x": list(x)}), cache=False)
    sm = fit_sparse_model(f, n_lambdas=4, class_names=adapter.class_names, stop_early=False)
    sp = prediction_path(adapter, ds[0], sparse_model=sm, unimodal_method="gradient",
                         interaction_method=None, target=int(sm.predict(f.h[:1])[0]))
    h0 = decision_contributions(adapter, ds[0]).h
    expect = sm.decision_function(h0)[0, sp.class_index]
    assert sp.params["source_logit"] == pytest.approx(expect, abs=1e-6)
    assert json.loads(json.dumps(sp.to_dict()))["params"]["source_logit"] == pytest.approx(expect)


# -- stage 3 --------------------------------------------------------------------------------------
def test_contribution_weights_do_not_write_through_to_the_model():
    adapter, ds = tiny_adapter(), tiny_dataset()
    before = adapter.decision_layer.weight.detach().clone()
    c = decision_contributions(adapter, ds[0])
    c.weights[:] = 123.0
    assert torch.equal(adapter.decision_layer.weight.detach(), before)


def test_float64_features_are_ranked_at_their_own_precision():
    h = np.array([[1.0], [1.0 + 1e-10], [1.0 - 1e-10]])
    s = StreamingExtremes(2)
    s.update(h[:1], [0])
    s.update(h[1:], [1, 2])
    r = s.result()
    assert r.top_indices[0].tolist() == [1, 0] and r.bottom_indices[0].tolist() == [2, 0]
    assert r.top_values[0, 0] == h[1, 0]
    # float32 first, float64 later: the kept candidates are promoted
    s = StreamingExtremes(1)
    s.update(np.float32([[1.0]]), [0])
    s.update(np.array([[1.0 + 1e-10]]), [1])
    assert s.result().top(0)[0][0] == 1
    # float32 stays float32
    s = StreamingExtremes(1)
    s.update(np.float32([[1.0], [2.0]]))
    assert s.result().top_values.dtype == np.float32


def test_non_integer_instance_numbers_are_refused_not_truncated():
    s = StreamingExtremes(2)
    with pytest.raises(ValueError, match="integer instance numbers"):
        s.update(np.array([[1.0], [2.0]]), [0.7, 1.9])
    with pytest.raises(ValueError, match="integer instance numbers"):
        s.update(np.array([[1.0], [2.0]]), [True, False])
    s.update(np.array([[1.0], [2.0]]), torch.tensor([4, 5]))
    assert s.result().top(0) == [(5, 2.0), (4, 1.0)]


def test_progress_reaches_its_total_when_the_last_batch_cannot_be_prepared():
    adapter, ds = tiny_adapter(), tiny_dataset(5, nan_at=(4,))
    for run in (lambda p: extract_features(adapter, ds, batch_size=2, cache=False, progress=p),
                lambda p: neuron_extremes(adapter, ds, k=2, batch_size=2, progress=p)):
        seen = []
        with pytest.warns(RuntimeWarning, match="1 of 5"):
            run(lambda d, t, m: seen.append((d, t)))
        assert seen[-1] == (5, 5) and all(d <= t for d, t in seen)


# -- projection and metrics -------------------------------------------------------------------------
def test_colour_groups_name_a_bad_choice_and_mismatched_labels():
    with pytest.raises(ValueError, match="Colour by 'bogus'"):
        colour_groups("bogus", None, np.array([0, 1]), ["a", "b"])   # was a TypeError about None
    with pytest.raises(ValueError, match="3 labels for 2 predictions"):
        colour_groups("correctness", np.array([0, 1, 1]), np.array([0, 1]), ["a", "b"])


def test_relevance_metrics_refuse_non_finite_maps():
    gt = np.array([[True, False]])
    for r in (np.array([[np.nan, 1.0]]), np.array([[np.inf, 1.0]])):
        with pytest.raises(ValueError, match="non-finite"):
            relevance_mass(r, gt)                 # was NaN
        with pytest.raises(ValueError, match="non-finite"):
            relevance_rank(r, gt)                 # was 0.0


def test_deletion_insertion_checks_its_class_batch_size_and_scores():
    adapter, ds = tiny_adapter(), tiny_dataset()
    p = adapter.prepare(ds[0])
    s = np.arange(F, dtype=float)
    base = deletion_insertion(adapter, p, "x", s, 2)
    assert deletion_insertion(adapter, p, "x", s, "k2")[0] == pytest.approx(base[0])
    assert deletion_insertion(adapter, ds[0], "x", s, 2)[0] == pytest.approx(base[0])  # a dict
    with pytest.raises(ValueError, match="out of range"):
        deletion_insertion(adapter, p, "x", s, -1)     # was the last class
    with pytest.raises(ValueError):
        deletion_insertion(adapter, p, "x", s, True)   # was class 1
    with pytest.raises(ValueError, match="batch_size"):
        deletion_insertion(adapter, p, "x", s, 0, batch_size=0)
    with pytest.raises(ValueError, match="NaN"):
        deletion_insertion(adapter, p, "x", np.array([0.0, np.nan, 1.0, 2.0]), 0)


def test_deletion_insertion_of_a_one_output_model_says_why_not_instead_of_flat_curves():
    class OneLogit(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(F, 1)

        def forward(self, x):
            return self.enc(x)[:, 0]                      # [B]: one output
    adapter = ModelAdapter(OneLogit().eval(), [Tabular("x", columns=[f"c{i}" for i in range(F)])],
                           ["risk"])
    with pytest.raises(ValueError, match=r"one output \(\['risk'\]\).*softmax is always 1.*"
                                         r"class_names=\[negative, positive\]"):
        deletion_insertion(adapter, tiny_dataset()[0], "x", np.arange(F, dtype=float), 0)


def test_a_bfloat16_model_is_explained_at_every_stage():
    """numpy has no bfloat16: maps, features and decision weights come to the host as float32
    (which holds every bfloat16 value), where they raised numpy's TypeError."""
    from multiviz_widgets.kernels.unimodal import attribute, attribute_batch
    adapter = ModelAdapter(Tiny().eval().bfloat16(), [Tabular("x", columns=[f"c{i}" for i in range(F)])],
                           [f"k{i}" for i in range(C)], decision_layer="head")
    ds = tiny_dataset()
    for method in ("gradient", "grad_x_input", "integrated_gradients"):
        r = attribute(adapter, ds[0], method, target=1)
        assert r.maps["x"].dtype == np.float32 and np.isfinite(r.scores["x"]).all()
    assert len(attribute_batch(adapter, [ds[0], ds[1]], "gradient", targets=0)) == 2
    feats = extract_features(adapter, ds)
    assert feats.h.dtype == np.float32 and feats.h.shape == (len(ds), D)
    w, b = adapter.decision_weights()
    assert w.dtype == np.float32 and w.shape == (C, D)
    path = prediction_path(adapter, ds[0], k_neurons=2)
    assert len(path.neurons) == 2


def test_fit_sparse_model_checks_max_iter_seed_and_alpha_up_front():
    """max_iter=0 fit an all-zero model silently (scikit-learn) or failed inside glm_saga;
    seed=-1 got numpy's error, naming no argument; alpha="0.9" a bare TypeError."""
    rng = np.random.default_rng(0)
    h, y = rng.normal(size=(40, 3)), np.arange(40) % 2
    for kw, words in [(dict(max_iter=0), r"max_iter .* integer of at least 1, got 0"),
                      (dict(max_iter=0, solver="glm_saga"), r"max_iter .*at least 1, got 0"),
                      (dict(max_iter=2.5), r"max_iter .*got 2.5"),
                      (dict(seed=-1), r"seed .* integer of at least 0, got -1"),
                      (dict(seed="0"), r"seed .*got '0'"),
                      (dict(alpha="0.9"), r"alpha .* must be a number in \(0, 1\].*'0.9' \(str\)"),
                      (dict(alpha=True), r"alpha .*got True \(bool\)"),
                      (dict(eps="1e-3"), r"eps .* must be a number"),
                      (dict(tolerance=None), r"tolerance must be a number"),
                      (dict(val_fraction="0.2"), r"val_fraction must be a number")]:
        with pytest.raises(ValueError, match=words):
            fit_sparse_model((h, y), **kw)
    m = fit_sparse_model((h, y), alpha=np.float64(0.9), max_iter=np.int64(50), seed=np.int64(3),
                         n_lambdas=3)
    assert m.alpha == 0.9 and m.params["seed"] == 3 and m.params["max_iter"] == 50
    assert type(m.params["seed"]) is int                  # a plain int: saved as JSON
    # seed=None: fresh randomness, as scikit-learn takes it (it was refused for a while)
    assert fit_sparse_model((h, y), seed=None, n_lambdas=3).params["seed"] is None
    with pytest.raises(ValueError, match=r"seed .*got None"):
        fit_sparse_model((h, y), seed=None, solver="glm_saga", n_lambdas=3)


def test_a_sparse_model_that_is_not_one_is_refused_with_the_loader_named():
    """SparseModel.to_dict() read back from JSON, or a path, raised AttributeError: 'dict' object
    has no attribute 'weight'."""
    adapter, ds = tiny_adapter(), tiny_dataset(12)
    sm = fit_sparse_model(extract_features(adapter, ds), class_names=adapter.class_names,
                          n_lambdas=3)
    saved = json.loads(json.dumps(sm.to_dict()))
    for bad, words in [(saved, r"it is a dict, as SparseModel.to_dict\(\).*"
                               r"prediction.sparse_model_from_dict\(that dict\)"),
                       ("sparse.json", r"the path 'sparse.json'.*sparse_model_from_dict\("
                                       r"json.load\(open\(path\)\)\)"),
                       (3, r"got int .*sparse_model_from_dict rebuilds one")]:
        with pytest.raises(TypeError, match=r"sparse_model must be a SparseModel .*" + words):
            prediction_path(adapter, ds[0], sparse_model=bad, interaction_method=None)
        with pytest.raises(TypeError, match=words):
            decision_contributions(adapter, ds[0], sparse_model=bad)
    from multiviz_widgets.kernels.prediction import sparse_model_from_dict
    again = decision_contributions(adapter, ds[0], sparse_model=sparse_model_from_dict(saved))
    assert again.source == "sparse_model"


def test_the_explorer_analyses_check_sparse_model_gallery_k_and_path_params_when_built():
    """A dict sparse model, gallery_k=-1 and path_params k_neurons=-1 were taken and failed only
    after a click, in the banner; gallery_k=2.7 was cut to 2."""
    from multiviz_widgets.engine import Analyses, Engine, Kernels
    adapter, ds = tiny_adapter(), tiny_dataset()
    engine = Engine(delay=0.0)
    try:
        with pytest.raises(TypeError, match="sparse_model must be a SparseModel.*it is a dict"):
            Analyses(engine, adapter, ds, sparse_model={"weight": [[1.0]]})
        for k in (-1, 0, 2.7, "4"):
            with pytest.raises(ValueError, match=rf"gallery_k .* at least 1, got {k!r}"):
                Analyses(engine, adapter, ds, gallery_k=k)
        for params, err, words in [
                ({"k_neurons": -1}, ValueError, r"path_params\['k_neurons'\] .*got -1"),
                ({"k_units": 1.5}, ValueError, r"path_params\['k_units'\] .*got 1.5"),
                ({"k_neuron": 2}, TypeError, r"\['k_neuron'\] are not parameters of "
                                             r"prediction_path; it takes .*'k_neurons'")]:
            with pytest.raises(err, match=words):
                Analyses(engine, adapter, ds, path_params=params)
        ok = Analyses(engine, adapter, ds, gallery_k=np.int64(3), path_params={"k_neurons": 2})
        assert ok.gallery_k == 3 and ok.path_params == {"k_neurons": 2}

        class Own(Kernels):          # kernels of one's own take their own kind of sparse model
            def contributions(self, *a, **k):
                return None

            def prediction_path(self, *a, **k):
                return {}
        assert Analyses(engine, adapter, ds, Own(), sparse_model="mine").sparse_model == "mine"
    finally:
        engine.close()


# -- the decision layer's contributions against the model's logit --------------------------------
_TWO_TABLES = [Tabular("a", columns=list("pqrs")), Tabular("b", columns=list("xyz"))]
_TABLES_INSTANCE = {"a": np.array([0.3, -1.0, 2.0, 0.5], np.float32),
                    "b": np.array([1.0, 0.2, -0.4], np.float32)}


class _TwoTables(nn.Module):
    """h = relu(ea(a) * eb(b)); logits = head(h) / temperature, or head(input=h)."""

    def __init__(self, temperature: float = 1.0, keyword: bool = False, nan: bool = False,
                 end: str = ""):
        super().__init__()
        torch.manual_seed(0)
        self.ea, self.eb, self.head = nn.Linear(4, 8), nn.Linear(3, 8), nn.Linear(8, 3)
        self.temperature, self.keyword, self.nan, self.end = temperature, keyword, nan, end

    def forward(self, a, b):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.end == "autocast"):
            h = torch.relu(self.ea(a) * self.eb(b))
            if self.nan:
                h = torch.sqrt(h - 100.0)
            z = self.head(input=h) if self.keyword else self.head(h)
        return (torch.log_softmax(z, 1) if self.end == "log_softmax" else z) / self.temperature


def test_contributions_that_do_not_add_up_to_the_logit_are_said():
    """A temperature after the decision layer: the bars and the path explained a logit half the
    model's, silently (the doctor said so, but the Explorer never runs it)."""
    import warnings
    adapter = ModelAdapter(_TwoTables(temperature=0.5).eval(), _TWO_TABLES, ["u", "v", "w"])
    with pytest.warns(UserWarning, match=r"contributions to class '.' add up to .* but the "
                                         r"model's logit is .*a temperature"):
        dc = decision_contributions(adapter, _TABLES_INSTANCE)
    assert dc.logits[dc.class_index] == pytest.approx(2 * (dc.contributions.sum() + dc.bias))
    plain = ModelAdapter(_TwoTables().eval(), _TWO_TABLES, ["u", "v", "w"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dc = decision_contributions(plain, _TABLES_INSTANCE)
        # no false alarm: the same shift for every class (log_softmax) compares classes as the
        # logits do; autocast computes in bfloat16 and rounds as such
        for end in ("log_softmax", "autocast"):
            decision_contributions(ModelAdapter(_TwoTables(end=end).eval(), _TWO_TABLES,
                                                ["u", "v", "w"]), _TABLES_INSTANCE)
    assert dc.logits[dc.class_index] == pytest.approx(dc.contributions.sum() + dc.bias, abs=1e-6)


def test_a_decision_layer_called_with_a_keyword_gives_its_features():
    """head(input=h) left the pre-hook no positional argument: an IndexError, said to be the
    inputs' shapes."""
    adapter = ModelAdapter(_TwoTables(keyword=True).eval(), _TWO_TABLES, ["u", "v", "w"])
    dc = decision_contributions(adapter, _TABLES_INSTANCE)
    positional = ModelAdapter(_TwoTables().eval(), _TWO_TABLES, ["u", "v", "w"])
    assert np.allclose(dc.h, decision_contributions(positional, _TABLES_INSTANCE).h)
    assert dc.logits[dc.class_index] == pytest.approx(dc.contributions.sum() + dc.bias, abs=1e-6)


def test_contributions_of_an_output_that_is_not_finite_are_refused():
    """NaN logits explained class 0 (argmax of NaN) with NaN contributions, and top() ranked the
    finite neurons first."""
    adapter = ModelAdapter(_TwoTables(nan=True).eval(), _TWO_TABLES, ["u", "v", "w"])
    with pytest.raises(ValueError, match=r"output on the instance is not finite .*argmax of NaN"):
        decision_contributions(adapter, _TABLES_INSTANCE)
    with pytest.raises(ValueError, match=r"decision features h of the instance are not finite "
                                         r"\(h0, h1"):
        decision_contributions(adapter, _TABLES_INSTANCE, target=1)


def test_neuron_extremes_refuse_an_instance_given_twice():
    """indices=[5, 5, 5, 7] made neuron 0's top 3 instance 5 three times."""
    adapter, ds = tiny_adapter(), tiny_dataset(8)
    with pytest.raises(ValueError, match=r"indices repeat instance 5 \(3 times\).*np\.unique"):
        neuron_extremes(adapter, ds, k=3, indices=[5, 5, 5, 7])
    feats = extract_features(adapter, ds, indices=[1, 2, 1], cache=False)
    with pytest.raises(ValueError, match=r"features\.indices .* repeat instance 1 \(2 times\)"):
        neuron_extremes(None, features=feats, k=2)
    top = neuron_extremes(adapter, ds, k=3, indices=[5, 7, 2])
    assert sorted(int(i) for i in top.top_indices[0]) == [2, 5, 7]
