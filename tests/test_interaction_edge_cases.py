"""Stage-2 per-instance kernels: regressions found by a bug hunt (second-order gradients on
models without a path, metadata under the side swap, Shapley progress, argument checks, DIME's
independence of the order of its modalities)."""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from multiviz_widgets import ModelAdapter, MultimodalDataset, Tabular, Text, TimeSeries
from multiviz_widgets.kernels.interactions import dime, interaction

from .test_interactions import VOCAB, TextTab as QuestionTab, _seeded


def _modalities():
    # tabular: 4 units, series: 8 steps / window 4 x 2 channels = 4 units; "single": 1 unit
    return [Tabular("tabular", columns=["c0", "c1", "c2", "c3"]),
            TimeSeries("series", window=4, channels=["x", "y"])]


def _instance(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"tabular": torch.randn(4, generator=g), "series": torch.randn(8, 2, generator=g)}


class IgnoresSeries(nn.Module):
    """Reads the tabular columns only: no path from the series to the output."""

    def __init__(self):
        super().__init__()
        self.t = nn.Linear(4, 5)
        self.head = nn.Linear(5, 2)
        _seeded(self, 0)

    def forward(self, tabular, series):
        return self.head(torch.tanh(self.t(tabular)))


class Constant(nn.Module):
    """An output that depends on no input at all."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(1, 2)

    def forward(self, tabular, series):
        return self.head(torch.ones(len(tabular), 1))


class Fusion(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        self.t = nn.Linear(4, 5)
        self.s = nn.Linear(16, 5)
        self.head = nn.Linear(5, 3)
        _seeded(self, seed)

    def forward(self, tabular, series):
        a = torch.tanh(self.t(tabular))
        b = torch.tanh(self.s(series.flatten(1)))
        return self.head(torch.tanh(a * b + a))


# ---------------------------------------------------------------------------------------------
# second-order gradients on a side the model ignores
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", [IgnoresSeries, Constant])
@pytest.mark.parametrize("mode", ["auto", "vmap", "replicate"])
@pytest.mark.parametrize("pair", [("tabular", "series"), ("series", "tabular")])
@pytest.mark.parametrize("phi", ["identity", "abs"])
def test_sog_of_a_side_without_a_path_is_zero_not_an_error(model, mode, pair, phi):
    """Contracting the ignored side used to raise torch's "The differentiated Tensor ... appears
    to not have been used in the graph" (in every mode; auto retried replicate and failed again)."""
    adapter = ModelAdapter(model(), _modalities(), ["k0", "k1"], decision_layer="head")
    r = interaction(adapter, _instance(), "second_order", modalities=pair, target=0, mode=mode,
                    phi=phi, batch_size=3)
    assert r.matrix.shape == (4, 4)
    assert np.all(r.matrix == 0)
    assert r.params["mode"] == ("vmap" if mode == "auto" else mode)


def test_sog_backward_count_is_what_was_run():
    """With no path from the contracted side there is no second derivative to take: no second
    backward passes are run, and the result says so. The all-zero matrix costs one forward of
    4 rows more (removing both modalities against removing each), which finds no interaction:
    the zeros are the answer, without a note."""
    adapter = ModelAdapter(IgnoresSeries(), _modalities(), ["k0", "k1"], decision_layer="head")
    pair = ("series", "tabular")
    r = interaction(adapter, _instance(), "second_order", modalities=pair, target=0, mode="vmap")
    assert r.params["contracted"] == "series"
    assert r.forward_passes == 1 + 4 and r.backward_passes == 1
    assert "note" not in r.params and "blind" not in r.params
    r = interaction(adapter, _instance(), "second_order", modalities=pair, target=0,
                    mode="replicate")
    assert r.forward_passes == 4 + 4 and r.backward_passes == 4
    assert "note" not in r.params


class CutOff(nn.Module):
    """logit 0 = tanh(tabular) . w * series[:, 0, 0]: the modalities interact, but forward()
    cuts one side off autograd's graph (``how``: "detach" or "round") or runs under
    torch.no_grad() ("no_grad")."""

    def __init__(self, how, side="tabular"):
        super().__init__()
        self.how, self.side = how, side
        self.head = nn.Linear(1, 2)
        _seeded(self, 0)

    def _forward(self, tabular, series):
        x = {"tabular": tabular, "series": series}
        if self.how == "detach":
            x[self.side] = x[self.side].detach()
        elif self.how == "round":
            x[self.side] = torch.round(x[self.side] * 4) / 4
        t = torch.tanh(x["tabular"]) @ torch.tensor([1.0, -0.5, 0.25, 2.0])
        return self.head((t * x["series"][:, 0, 0]).unsqueeze(1))

    def forward(self, tabular, series):
        if self.how == "no_grad":
            with torch.no_grad():
                return self._forward(tabular, series)
        return self._forward(tabular, series)


@pytest.mark.parametrize("mode", ["auto", "vmap", "replicate"])
def test_sog_of_a_model_under_no_grad_is_the_stage_1_error_not_zeros(mode):
    """The output does not require grad: the matrix was all 0 with no note (read as "no
    interaction"); now the AdapterError the gradient methods raise, with stage 2's advice."""
    from multiviz_widgets import AdapterError
    adapter = ModelAdapter(CutOff("no_grad"), _modalities(), ["k0", "k1"])
    with pytest.raises(AdapterError, match=r"torch.no_grad\(\).*Second-order gradients "
                                           r"\(interaction method second_order\).*use "
                                           r"pairwise_ablation or shapley") as e:
        interaction(adapter, _instance(), "second_order", target=0, mode=mode)
    assert e.value.code == "no-gradient"


@pytest.mark.parametrize("mode", ["vmap", "replicate"])
@pytest.mark.parametrize("how, side, why", [
    ("detach", "tabular", r"(no gradient with respect to|cuts) 'tabular'.*\.detach\(\)"),
    ("detach", "series", r"(no gradient with respect to|cuts) 'series'.*\.detach\(\)"),
    ("round", "tabular", r"(gradient with respect to|cuts) 'tabular'.*torch\.round")])
@pytest.mark.parametrize("pair", [("tabular", "series"), ("series", "tabular")])
def test_sog_of_a_side_cut_off_from_the_graph_is_marked_blind(mode, how, side, why, pair):
    """A side detached or rounded inside forward() has no second derivatives: the matrix was
    all 0 with no note while pairwise ablation found the pairs. Now it is marked blind as a
    piecewise-linear model's is (params["blind"], read by the prediction path, and a note that
    names the side, why, and what to use instead), and counts the passes that found it.
    (Where the other side is linear, the piecewise-linear check already calls it blind.)"""
    adapter = ModelAdapter(CutOff(how, side), _modalities(), ["k0", "k1"])
    r = interaction(adapter, _instance(), "second_order", modalities=pair, target=0, mode=mode)
    assert np.all(r.matrix == 0) and r.params["blind"] is True
    assert re.search(why, r.params["note"])
    assert "cannot see" in r.params["note"] and "pairwise ablation" in r.params["note"]
    ablation = interaction(adapter, _instance(), "pairwise_ablation", modalities=pair, target=0)
    assert np.abs(ablation.matrix).max() > 0.1
    # on top of the method's own passes: 4 rows to find the interaction, 1 + 1 to name the side
    plain = interaction(ModelAdapter(CutOff("none"), _modalities(), ["k0", "k1"]), _instance(),
                        "second_order", modalities=pair, target=0, mode=mode)
    assert "note" not in plain.params and np.abs(plain.matrix).max() > 0.01
    assert r.forward_passes >= plain.forward_passes


# ---------------------------------------------------------------------------------------------
# params under the side swap
# ---------------------------------------------------------------------------------------------
class TextTab(QuestionTab):
    """test_interactions' question x tabular model, taking the tabular input first."""

    def forward(self, tabular, question):
        return super().forward(question, tabular)


def test_sog_params_describe_the_rows_and_columns_also_when_the_sides_are_swapped():
    """Rows: 5 tokens, columns: 2 columns, so the columns are contracted. The params used to
    describe the contracted side (attribution="gradient" for the tokens' columns...): passed back
    with the same modalities they gave another matrix."""
    adapter = ModelAdapter(TextTab(), [Tabular("tabular", columns=["u", "v"]),
                                       Text("question", vocab=VOCAB)], ["no", "yes"])
    inst = {"tabular": [0.5, -1.0], "question": "what is the red circle"}
    r = interaction(adapter, inst, "second_order", modalities=("question", "tabular"), target=1)
    assert r.params["contracted"] == "tabular"
    # tokens (rows) move along their embedding, the columns along the indicator
    assert r.params["attribution"] == "grad_x_input" and r.params["times_input"] is False
    again = interaction(adapter, inst, "second_order", modalities=("question", "tabular"),
                        target=1, attribution=r.params["attribution"],
                        times_input=r.params["times_input"], phi=r.params["phi"])
    np.testing.assert_allclose(again.matrix, r.matrix, rtol=1e-5, atol=1e-7)
    # and the other way round: rows = columns of the table (contracted, not swapped)
    r2 = interaction(adapter, inst, "second_order", modalities=("tabular", "question"), target=1)
    assert r2.params["attribution"] == "gradient" and r2.params["times_input"] is True
    np.testing.assert_allclose(r2.matrix, r.matrix.T, rtol=1e-5, atol=1e-7)
    # an explicit symmetric choice that swaps: the params still name side a's attribution
    r3 = interaction(adapter, inst, "second_order", modalities=("question", "tabular"),
                     target=1, attribution="grad_x_input", times_input=False)
    assert r3.params["attribution"] == "grad_x_input" and not r3.params["times_input"]
    np.testing.assert_allclose(r3.matrix, r.matrix, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Shapley progress
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index, budget, approximator",
                         [("k-SII", 4096, "ExactComputer"), ("k-SII", 100, "KernelSHAPIQ"),
                          ("STII", 240, "PermutationSamplingSTII")])
def test_shapley_progress_ends_at_its_total_and_never_passes_it(index, budget, approximator):
    """Exact (2^8 coalitions of a budget of 4096), KernelSHAPIQ (two halves of the budget) or
    permutation sampling (whole permutations short of the budget): progress used to stop at
    256 / 4096 or 89 / 100."""
    adapter = ModelAdapter(Fusion(), _modalities(), ["a", "b", "c"])
    calls = []
    r = interaction(adapter, _instance(), "shapley", budget=budget, target=0, max_players=None,
                    index=index, progress=lambda d, n, m: calls.append((d, n)))
    assert r.params["approximator"] == approximator
    assert calls and calls[-1][0] == calls[-1][1]
    assert all(0 <= d <= n for d, n in calls)
    assert all(b[0] >= a[0] for a, b in zip(calls, calls[1:]))


def test_exact_shapley_reports_each_chunk_so_that_a_cancel_stops_it_early():
    """shapiq's exact computer asks for all 2^n coalitions in one call: the game still reports
    after each chunk of batch_size (the Explorer's progress bar moves, and its Cancel, raised
    from a report, stops the work at the next chunk instead of after all of it)."""
    adapter = ModelAdapter(Fusion(), _modalities(), ["a", "b", "c"])
    calls = []
    r = interaction(adapter, _instance(), "shapley", target=0, max_players=None, batch_size=32,
                    progress=lambda d, n, m: calls.append((d, n, m)))
    assert r.params["exact"] and r.params["coalitions"] == 256
    coalitions = [(d, n) for d, n, m in calls if m == "Shapley coalitions"]
    assert coalitions == [(k, 256) for k in range(32, 257, 32)]

    class Stop(Exception):
        pass

    forwards = []

    def cancel_after_the_first_chunk(done, total, message):
        forwards.append(done)
        if message == "Shapley coalitions":
            raise Stop

    with pytest.raises(Stop):
        interaction(adapter, _instance(), "shapley", target=0, max_players=None, batch_size=32,
                    progress=cancel_after_the_first_chunk)
    assert forwards == [32]


def test_choosing_shapley_players_reports_its_occlusion_passes():
    adapter = ModelAdapter(Fusion(), _modalities(), ["a", "b", "c"])
    calls = []
    r = interaction(adapter, _instance(), "shapley", target=0, max_players=4,
                    progress=lambda d, n, m: calls.append((d, n, m)))
    assert sum(map(len, r.params["players"].values())) == 4
    messages = [m for _, _, m in calls]
    first = messages.index("Shapley coalitions")
    assert first > 0 and all(m.startswith("choosing the Shapley players: occlusion of ")
                             for m in messages[:first])


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------
def _ds(n=6):
    items = [_instance(i) for i in range(n)]
    return MultimodalDataset({"tabular": [x["tabular"] for x in items],
                              "series": [x["series"] for x in items]})


@pytest.mark.parametrize("seed", [-1, 1.5, "0", None, True])
def test_a_bad_seed_is_a_clear_error(seed):
    adapter = ModelAdapter(Fusion(), _modalities(), ["a", "b", "c"])
    with pytest.raises(ValueError, match="seed must be an integer"):
        interaction(adapter, _instance(), "shapley", budget=64, seed=seed, target=0)
    with pytest.raises(ValueError, match="seed must be an integer"):
        dime(adapter, _ds(), 0, reference_indices=[1, 2], n_samples=4, seed=seed)


@pytest.mark.parametrize("value", ["yes", 1, 0.0, "False"])
def test_sog_times_input_must_be_a_bool(value):
    adapter = ModelAdapter(Fusion(), _modalities(), ["a", "b", "c"])
    with pytest.raises(ValueError, match="times_input must be None, True or False"):
        interaction(adapter, _instance(), "second_order", times_input=value, target=0)


@pytest.mark.parametrize("method", [["second_order"], {"shapley": 1}, 3])
def test_a_method_that_is_not_a_name_is_a_clear_error(method):
    adapter = ModelAdapter(Fusion(), _modalities(), ["a", "b", "c"])
    with pytest.raises(ValueError, match="Unknown interaction method"):
        interaction(adapter, _instance(), method)


def test_dime_refuses_unknown_lime_params_before_running_the_model():
    calls = []

    class Counting(Fusion):
        def forward(self, tabular, series):
            calls.append(len(tabular))
            return super().forward(tabular, series)

    adapter = ModelAdapter(Counting(), _modalities(), ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"unknown parameters \['kernel'\].*kernel_width"):
        dime(adapter, _ds(), 0, reference_indices=[1, 2], n_samples=4, target=0, kernel=0.5)
    assert calls == []
    r = dime(adapter, _ds(), 0, reference_indices=[1, 2], n_samples=4, target=0,
             kernel_width=0.5)
    assert r.params["kernel_width"] == 0.5


# ---------------------------------------------------------------------------------------------
# DIME is symmetric in its pair
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factorized", [None, False])
def test_dime_scores_do_not_depend_on_the_order_of_the_modalities(factorized):
    """DIME's UC and MI are symmetric in the two modalities; the LIME design used to be drawn
    over the units in the order the pair was named, so (b, a) gave other scores than (a, b)."""
    adapter = ModelAdapter(Fusion(2), _modalities(), ["a", "b", "c"])
    kw = dict(reference_indices=[1, 2, 3, 4], n_samples=16, target=1, factorized=factorized)
    ab = dime(adapter, _ds(), 0, **kw)
    ba = dime(adapter, _ds(), 0, modalities=("series", "tabular"), **kw)
    assert ba.modalities == ("series", "tabular") and list(ba.uc) == ["series", "tabular"]
    assert ba.uc_value == pytest.approx(ab.uc_value, abs=1e-6)
    for m in adapter.names:
        np.testing.assert_allclose(ba.uc[m], ab.uc[m], atol=1e-6)
        np.testing.assert_allclose(ba.mi[m], ab.mi[m], atol=1e-6)


def test_times_input_none_moves_side_b_along_its_own_direction_whatever_the_attribution():
    """times_input=None means side b's own direction (x - baseline for embedded tokens) also when
    side a's attribution is given explicitly; it used to sum the token's coordinates then."""
    from multiviz_widgets.demos import easy_vqa
    adapter, dataset = easy_vqa.load_adapter(), easy_vqa.load_dataset("test")
    inst = dataset[0]
    kw = dict(modalities=("image", "question"), attribution="gradient")
    default = interaction(adapter, inst, "second_order", **kw)
    explicit = interaction(adapter, inst, "second_order", times_input=True, **kw)
    summed = interaction(adapter, inst, "second_order", times_input=False, **kw)
    np.testing.assert_allclose(default.matrix, explicit.matrix, rtol=1e-6, atol=1e-9)
    assert not np.allclose(default.matrix, summed.matrix)
    assert default.params["times_input"] is True


class _Exp(torch.autograd.Function):
    """exp with a hand-written backward that accumulates in place into a fresh tensor: fine for
    plain (and double) backward passes, but torch's batched second backward (is_grads_batched,
    vmap) refuses the in-place add of a batched gradient."""

    @staticmethod
    def forward(ctx, x):
        y = x.exp()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        y, = ctx.saved_tensors
        out = torch.zeros_like(y)
        out.add_(g * y)
        return out


class _ExpFusion(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(2, 2)

    def forward(self, tabular, series):
        z = tabular.sum(1, keepdim=True) * series.reshape(len(series), -1)[:, :1]
        return self.head(torch.cat([_Exp.apply(z), z], 1))


def test_auto_mode_falls_back_to_replicate_and_counts_the_failed_attempt():
    adapter = ModelAdapter(_seeded(_ExpFusion(), 5), _modalities(), ["p", "q"])
    g = torch.Generator().manual_seed(3)
    inst = {"tabular": torch.randn(4, generator=g), "series": torch.randn(8, 2, generator=g)}
    with pytest.raises(RuntimeError, match=r"vmap: aten::add_"):     # vmap cannot run it
        interaction(adapter, inst, "second_order", target=0, mode="vmap")
    auto = interaction(adapter, inst, "second_order", target=0)
    rep = interaction(adapter, inst, "second_order", target=0, mode="replicate")
    assert auto.params["mode"] == "replicate" and auto.params["vmap_error"]
    assert "vmap_error" not in rep.params
    np.testing.assert_allclose(auto.matrix, rep.matrix, rtol=1e-6, atol=1e-9)
    assert np.abs(rep.matrix).max() > 0
    # the failed vmap attempt's forward and first backward are part of the cost
    assert (auto.forward_passes, auto.backward_passes) == (rep.forward_passes + 1,
                                                           rep.backward_passes + 1)


class TwoImages(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.left, self.right = nn.Conv2d(3, 2, 4, stride=4), nn.Conv2d(3, 2, 4, stride=4)
        self.head = nn.Linear(2, 2)

    def forward(self, left, right):
        u = torch.tanh(self.left(left)).mean((2, 3))
        v = torch.tanh(self.right(right)).mean((2, 3))
        return self.head(u * v)


def test_second_order_with_a_side_of_many_units_sums_them_by_index_and_is_exact():
    """Image against image, 64 patches a side: the vmapped unit attributions are summed by
    index (a [units, scalars] indicator's batched second backward grows as units^2 x scalars:
    4 GB for 576 patches of a 96 x 96 image) and equal the replicated computation."""
    from multiviz_widgets import Image
    from multiviz_widgets.kernels import interactions
    adapter = ModelAdapter(TwoImages().eval(), [Image("left", patch=4), Image("right", patch=4)],
                           ["a", "b"])
    rng = np.random.default_rng(0)
    p = adapter.prepare({k: rng.random((32, 32, 3)).astype(np.float32)
                         for k in ("left", "right")})
    assert p.n_units["left"] * 32 * 32 * 3 > interactions.SMALL_INDICATOR
    vm = interaction(adapter, p, "second_order", target=1, mode="vmap")
    rep = interaction(adapter, p, "second_order", target=1, mode="replicate")
    assert vm.matrix.shape == (64, 64) and np.abs(vm.matrix).max() > 0
    np.testing.assert_allclose(vm.matrix, rep.matrix, rtol=1e-5, atol=1e-9)


class _ScaledEmbedding(nn.Embedding):
    """An embedding outside torch.nn (as transformers' scaled word embeddings): torch.fx would
    trace through it, and the adapter's hook on it would never fire in a traced split."""

    def forward(self, ids):
        return super().forward(ids) * 2.0


@pytest.mark.parametrize("wrapped", [False, True])
def test_dime_traced_split_calls_a_custom_embedding_module_whole(wrapped):
    from multiviz_widgets import MultimodalDataset, Tabular, Text
    from multiviz_widgets.kernels.dime import dime
    vocab = ["[PAD]", "[UNK]", "a", "b", "c", "d", "e"]

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            emb = _ScaledEmbedding(len(vocab), 4)
            self.emb = nn.Sequential(emb) if wrapped else emb
            self.tab, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, tabular, text):
            return self.head(torch.tanh(self.tab(tabular) * self.emb(text).mean(1)))

    m = Model().eval()
    a = ModelAdapter(m, [Tabular("tabular", columns=["x", "y", "z"]), Text("text", vocab=vocab)],
                     ["n", "p"], embedding_layers={"text": m.emb})
    rng = np.random.default_rng(0)
    ds = MultimodalDataset({"tabular": list(rng.standard_normal((6, 3)).astype(np.float32)),
                            "text": ["a b c", "d e a", "b b c", "e d c", "a a a", "c d e"]})
    split, plain = (dime(a, ds, 0, n_samples=20, factorized=f) for f in (None, False))
    assert split.params["factorization"] == "traced"
    for n in ("tabular", "text"):
        assert np.allclose(split.uc[n], plain.uc[n], atol=1e-9)
        assert np.allclose(split.mi[n], plain.mi[n], atol=1e-9)


def test_an_interaction_parameter_the_method_does_not_take_is_named_with_those_it_takes():
    a = ModelAdapter(QuestionTab().eval(), [Text("question", vocab=VOCAB),
                                            Tabular("tabular", columns=["x", "y"])], ["n", "y"])
    inst = {"question": "what red circle", "tabular": np.ones(2, np.float32)}
    with pytest.raises(ValueError, match=r"'pairwise_ablation' got unknown parameters \['phi'\]; "
                                         r"it takes \['batch_size', 'units'\]"):
        interaction(a, inst, "pairwise_ablation", phi="abs")
    assert interaction(a, inst, "second_order", phi="abs").params["phi"] == "abs"


def test_interactions_inside_inference_mode_are_a_clear_error():
    from multiviz_widgets import AdapterError
    a = ModelAdapter(QuestionTab().eval(), [Text("question", vocab=VOCAB),
                                            Tabular("tabular", columns=["x", "y"])], ["n", "y"])
    inst = {"question": "what red circle", "tabular": np.ones(2, np.float32)}
    for method in ("pairwise_ablation", "second_order"):
        with torch.inference_mode(), pytest.raises(AdapterError, match="inference_mode"):
            interaction(a, inst, method)
    assert interaction(a, inst, "pairwise_ablation").matrix.shape == (3, 2)


@pytest.mark.parametrize("method", ["second_order", "pairwise_ablation", "shapley"])
def test_an_interaction_progress_that_is_not_callable_is_a_clear_error_before_any_work(method):
    """progress=5 gave "'int' object is not callable" from inside the kernel, after its first
    forward passes."""
    model = Fusion()
    rows = []
    handle = model.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    adapter = ModelAdapter(model, _modalities(), ["k0", "k1", "k2"])
    try:
        with pytest.raises(TypeError, match=r"interaction: progress must be None or a callable "
                                            r"progress\(done, total, message\), got 5 \(int\)"):
            interaction(adapter, _instance(), method, target=0, progress=5)
    finally:
        handle.remove()
    assert rows == []


# ---------------------------------------------------------------------------------------------
# costs at realistic sizes: pairwise ablation's masks and warning, Shapley's noise
# ---------------------------------------------------------------------------------------------
def test_pairwise_ablation_builds_each_batchs_masks_when_it_runs(monkeypatch):
    """All 1 + U_a + U_b + U_a U_b masks were built before the first forward: 784 x 512 units
    took about 2 GB. Each batch's masks are built when it runs now (at most batch_size rows at a
    time), with the same matrix as the masks built at once."""
    from multiviz_widgets.kernels import interactions
    from multiviz_widgets.kernels.common import evaluate_masks
    from multiviz_widgets.kernels.interactions import pairwise_masks
    adapter = ModelAdapter(Fusion(), _modalities(), ["a", "b", "c"])
    p, t = adapter.prepare(_instance()), adapter.target(1)
    rows = []

    def spy(adapter, prepared, masks, *args, **kwargs):
        rows.append([tuple(m.shape) for m in masks.values()])
        return evaluate_masks(adapter, prepared, masks, *args, **kwargs)

    monkeypatch.setattr(interactions, "evaluate_masks", spy)
    r = interaction(adapter, p, "pairwise_ablation", target=1, batch_size=4)
    assert all(a[0] == b[0] <= 4 and (a[1], b[1]) == (4, 4) for a, b in rows)
    assert sum(a[0] for a, _ in rows) == 25 == r.forward_passes      # 1 + 4 + 4 + 16
    ma, mb = pairwise_masks(4, 4)
    f = evaluate_masks(adapter, p, {"tabular": ma, "series": mb}, t, 4).double().numpy()
    want = f[0] - f[1:5, None] - f[None, 5:9] + f[9:].reshape(4, 4)
    np.testing.assert_allclose(r.matrix, want, rtol=1e-12, atol=1e-12)


def test_pairwise_ablation_of_many_pairs_warns_with_its_cost_and_what_costs_less(monkeypatch):
    """784 x 512 units are 401,408 forward passes, and nothing said so to a code caller. Above
    PAIRWISE_WARN_PAIRS pairs a UserWarning gives the forwards, the time the second batch took
    times the batches (when there is a second batch), and the cheaper ways."""
    from multiviz_widgets.kernels import interactions
    adapter = ModelAdapter(Fusion(), _modalities(), ["a", "b", "c"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # 16 pairs: no warning by default
        interaction(adapter, _instance(), "pairwise_ablation", target=1, batch_size=4)
    monkeypatch.setattr(interactions, "PAIRWISE_WARN_PAIRS", 15)
    words = (r"pairwise_ablation: 4 x 4 units make 16 pairs, one forward pass each: 25 forward "
             r"passes in all{}\. Use fewer, larger units \(a larger patch .*second_order \(1 "
             r"forward and 5 backward passes\) or shapley")
    with pytest.warns(UserWarning, match=words.format(r", about \d+ s at the rate of its first "
                                                      r"batches")) as record:
        interaction(adapter, _instance(), "pairwise_ablation", target=1, batch_size=4)
    assert len(record) == 1 and record[0].filename == __file__
    with pytest.warns(UserWarning, match=words.format("")) as record:       # one batch: untimed
        interaction(adapter, _instance(), "pairwise_ablation", target=1, batch_size=64)
    assert len(record) == 1 and record[0].filename == __file__
    # few pairs that will take long (196 x 256 patches and words of a large model: hours) are
    # said too, from the time of the second batch
    monkeypatch.setattr(interactions, "PAIRWISE_WARN_PAIRS", 10**9)
    monkeypatch.setattr(interactions, "PAIRWISE_WARN_SECONDS", 0.0)
    with pytest.warns(UserWarning, match=words.format(r", about \d+ s at the rate of its first "
                                                      r"batches")) as record:
        interaction(adapter, _instance(), "pairwise_ablation", target=1, batch_size=4)
    assert len(record) == 1 and record[0].filename == __file__


def test_shapley_that_will_take_long_says_its_cost_from_its_first_batches(monkeypatch):
    """Default Shapley on a 224 px ViT and 128 words took 74 s with no warning, where pairwise
    ablation of the same size says its cost after its second batch."""
    from multiviz_widgets.kernels import interactions
    adapter = ModelAdapter(Fusion(), _modalities(), ["a", "b", "c"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # quick: no warning by default
        interaction(adapter, _instance(), "shapley", target=1, batch_size=4)
    monkeypatch.setattr(interactions, "SHAPLEY_WARN_SECONDS", 0.0)
    with pytest.warns(UserWarning, match=r"shapley: 256 coalitions of 8 players, one forward "
                                         r"pass each: about \d+ s at the rate of its first "
                                         r"batches\. Lower the budget or max_players") as record:
        interaction(adapter, _instance(), "shapley", target=1, batch_size=4)
    assert len(record) == 1


def test_a_shapley_estimate_that_is_mostly_noise_warns():
    """relative_noise of 0.5 or more (the heatmap's "read it as mostly noise") passed silently
    for a code caller: a UserWarning now says so and what to change."""
    from .test_interactions import WideFusion
    mods = [Tabular("tabular", columns=[f"c{i}" for i in range(7)]),
            TimeSeries("series", window=1, channels=["x"])]
    g = torch.Generator().manual_seed(0)
    inst = {"tabular": torch.randn(7, generator=g), "series": torch.randn(6, 1, generator=g)}
    adapter = ModelAdapter(WideFusion(), mods, ["k0", "k1"])
    with pytest.warns(UserWarning, match=r"shapley: KernelSHAPIQ's estimate from 200 coalitions "
                                         r"of 13 players is mostly noise: its error, estimated "
                                         r"from two independent halves of the sample, is about "
                                         r"\d+% of the matrix's size\. Raise the budget \(now "
                                         r"200\) or lower max_players\.") as record:
        r = interaction(adapter, inst, "shapley", budget=200, max_players=None, target=0)
    assert r.params["relative_noise"] >= 0.5 and record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = interaction(adapter, inst, "shapley", budget=800, max_players=None, target=0)
    assert r.params["relative_noise"] < 0.5


def test_dime_on_fewer_lime_samples_than_units_warns_once_and_records_it():
    """DIME fits LIME to UC and to MI over each modality's units: below a fit's unknowns (its 4
    units and the intercept) each fit warned on its own; one UserWarning now, and the params
    say which modalities' fits were underdetermined."""
    adapter = ModelAdapter(Fusion(), _modalities(), ["a", "b", "c"])
    with pytest.warns(UserWarning, match=r"dime: the LIME regression fits 4 unit scores and an "
                                         r"intercept to only 4 samples.*at least 5") as record:
        r = dime(adapter, _ds(), 0, reference_indices=[1, 2], n_samples=4, target=0)
    assert len(record) == 1 and record[0].filename == __file__
    assert r.params["underdetermined"] is True
    assert r.params["underdetermined_modalities"] == ["tabular", "series"]
    with pytest.warns(UserWarning, match=r"fits 8 unit scores .* 6 samples.*at least 9"):
        r = dime(adapter, _ds(), 0, reference_indices=[1, 2], n_samples=6, target=0,
                 design="joint")
    assert r.params["underdetermined_modalities"] == ["tabular", "series"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = dime(adapter, _ds(), 0, reference_indices=[1, 2], n_samples=5, target=0)
    assert r.params["underdetermined"] is False and r.params["underdetermined_modalities"] == []
