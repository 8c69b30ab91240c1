"""EMAP's automatic split of a model into per-modality encoders and a fusion (kernels.factorize):
the fused pairs equal full forward passes, and every model the split cannot handle falls back to
full forward passes (or, when a split was asked for, gets an error that says why)."""
from __future__ import annotations

import gc
import warnings
import weakref

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
import torch
from torch import nn

from multiviz_widgets import ModelAdapter, MultimodalDataset, Neuron, Tabular, Text, TimeSeries
from multiviz_widgets.demos import easy_vqa, synthetic
from multiviz_widgets.kernels import factorize
from multiviz_widgets.kernels.common import check_instance_rows_independent
from multiviz_widgets.kernels.factorize import FactorizationError, trace_factorization
from multiviz_widgets.kernels.interactions import dime, emap, interaction_type

VOCAB = ["[PAD]", "[UNK]", "what", "shape", "is", "the", "red", "circle"]
MODALITIES = [Tabular("tabular", columns=["c0", "c1", "c2", "c3"]),
              TimeSeries("series", window=4, channels=["x", "y"])]


def _seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.6)
    return module.eval()


def instances(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"tabular": torch.randn(4, generator=g), "series": torch.randn(8, 2, generator=g)}
            for _ in range(n)]


class Bilinear(nn.Module):
    """Encoders, a product, a concatenation and a head: the common shape of a fusion model."""

    def __init__(self):
        super().__init__()
        self.t, self.s = nn.Linear(4, 5), nn.Linear(16, 5)
        self.head = nn.Linear(10, 3)
        _seeded(self)

    def forward(self, tabular, series):
        a, b = torch.tanh(self.t(tabular)), torch.tanh(self.s(series.flatten(1)))
        return self.head(torch.cat([a * b, a + b], 1))


class Branching(Bilinear):
    """Python control flow on tensor values: torch.fx cannot trace it."""

    def forward(self, tabular, series):
        a = self.t(tabular)
        if a.sum() > 0:
            a = -a
        return self.head(torch.cat([a * self.s(series.flatten(1)), a], 1))


class TracedDifferently(Bilinear):
    """Computes another function while torch.fx traces it (code that asks
    ``torch.fx._symbolic_trace.is_fx_tracing()``, as some libraries' does): its rows are
    independent, but its split disagrees with its forward passes."""

    def forward(self, tabular, series):
        out = super().forward(tabular, series)
        return 2 * out if torch.fx._symbolic_trace.is_fx_tracing() else out


class SequenceFirst(Bilinear):
    """The series encoding is [steps, batch, channels] where the modalities meet."""

    def forward(self, tabular, series):
        steps = series.transpose(0, 1)                            # [8, B, 2]
        a = torch.tanh(self.t(tabular))                           # [B, 5]
        mixed = (steps.sum(-1, keepdim=True) * a[None]).mean(0)   # [B, 5]
        return self.head(torch.cat([mixed, a], 1))


class VarArgs(Bilinear):
    def forward(self, *inputs):
        return super().forward(*inputs)


class KeywordArgs(Bilinear):
    """A forward in the style of many libraries: optional arguments and **kwargs."""

    def forward(self, tabular=None, series=None, scale: float = 1.0, **kwargs):
        if tabular is None or series is None:
            raise ValueError("both inputs are needed")
        return super().forward(tabular, series) * scale


class OneModality(Bilinear):
    def forward(self, tabular, series):
        return self.head(torch.cat([self.t(tabular), self.t(tabular)], 1))


class Keywords(nn.Module):
    """Arguments by name, in the opposite order to the adapter's modalities, with text."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(len(VOCAB), 3)
        self.q, self.t = nn.Linear(3, 4, bias=False), nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        _seeded(self)
        with torch.no_grad():       # [PAD] adds nothing to the sum: padding leaves f unchanged
            self.emb.weight[0] = 0

    def forward(self, tabular, question):
        q = torch.tanh(self.q(self.emb(question))).sum(1)
        return self.head(torch.tanh(q * torch.tanh(self.t(tabular)) + q))


def _same_as_full_forwards(adapter, items, target=None):
    fast = emap(adapter, items, target=target)
    slow = emap(adapter, items, target=target, factorized=False)
    assert fast.params["factorization"] == "traced", fast.params
    assert slow.params["factorization"] == "none"
    np.testing.assert_allclose(fast.matrix, slow.matrix, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(fast.emap_logits, slow.emap_logits, atol=1e-5, rtol=1e-5)
    return fast


def test_traced_split_equals_full_forward_passes():
    _same_as_full_forwards(ModelAdapter(Bilinear(), MODALITIES, ["a", "b", "c"]), instances(9))


def test_emap_says_how_many_of_its_passes_were_fused_pairs():
    """A split's forward_passes (fused pairs, encodings, the check) exceeded the N^2 full passes
    it replaces, which read as the split costing more: params["fused_pairs"] says how many of
    them ran only the fusion and the head."""
    adapter = ModelAdapter(Bilinear(), MODALITIES, ["a", "b", "c"])
    fast = emap(adapter, instances(9))
    slow = emap(adapter, instances(9), factorized=False)
    assert fast.params["fused_pairs"] == 81 and slow.params["fused_pairs"] == 0
    assert slow.forward_passes == 81 and fast.forward_passes > fast.params["fused_pairs"]


@pytest.mark.parametrize("target", [1, Neuron(2)])
def test_traced_split_handles_class_and_neuron_targets(target):
    adapter = ModelAdapter(Bilinear(), MODALITIES, ["a", "b", "c"])
    r = _same_as_full_forwards(adapter, instances(6), target)
    assert r.matrix.shape == ((6, 6, 3) if target == 1 else (6, 6, 1))


def test_traced_split_of_keyword_inputs_with_text():
    mods = [Text("question", vocab=VOCAB), Tabular("tabular", columns=list("abcd"))]
    adapter = ModelAdapter(Keywords(), mods, ["no", "yes"], keyword_inputs=True)
    g = torch.Generator().manual_seed(1)
    items = [{"question": " ".join(VOCAB[2:][int(k)] for k in torch.randint(0, 6, (1 + i % 4,),
                                                                           generator=g)),
              "tabular": torch.randn(4, generator=g)} for i in range(7)]
    split = trace_factorization(adapter.model, adapter.names, keyword_inputs=True)
    assert split.inputs == ("question", "tabular")        # the adapter's order, passed by name
    _same_as_full_forwards(adapter, items)


@pytest.mark.parametrize("kind", synthetic.KINDS)
def test_traced_split_of_the_synthetic_models_equals_their_declared_split(kind):
    adapter, ds = synthetic.load(kind)
    traced = emap(adapter, ds, indices=range(25), factorized="traced")
    declared = emap(adapter, ds, indices=range(25), factorized="declared")
    assert (traced.params["factorization"], declared.params["factorization"]) == ("traced", "declared")
    np.testing.assert_allclose(traced.matrix, declared.matrix, atol=1e-5)


def test_easy_vqa_split_cuts_where_image_and_question_meet():
    adapter = easy_vqa.load_adapter()
    split = trace_factorization(adapter.model, adapter.names)
    assert split.side == "image" and set(split.from_side) == {True, False}
    assert split.encoder_operations > split.fused_operations   # the convolutions run once
    ds = easy_vqa.load_dataset("test")
    traced = emap(adapter, ds, indices=range(12), factorized="traced")
    full = emap(adapter, ds, indices=range(12), factorized=False)
    np.testing.assert_allclose(traced.matrix, full.matrix, atol=1e-4)


def test_split_follows_weight_changes():
    model = Bilinear()
    adapter = ModelAdapter(model, MODALITIES, ["a", "b", "c"])
    emap(adapter, instances(4))                   # traced and cached
    with torch.no_grad():
        model.head.weight.mul_(-2.0)
        model.t.bias.add_(0.5)
    _same_as_full_forwards(adapter, instances(5, seed=3))



class Centred(Bilinear):
    """Centres its inputs with buffers of its own (read by the graph as attributes)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("centre", torch.full((4,), 0.25))

    def forward(self, tabular, series):
        return super().forward(tabular - self.centre, series)


@pytest.mark.parametrize("convert", ["double", "buffer"])
def test_split_follows_tensors_the_model_replaced(convert):
    """model.double() (or .half(), .to(device)) replaces the model's buffers: the split, which
    holds the tensors it read, is traced again instead of mixing old and new ones."""
    model = Centred()
    adapter = ModelAdapter(model, MODALITIES, ["a", "b", "c"])
    emap(adapter, instances(4))                   # traced and cached
    old = trace_factorization(model, adapter.names)
    if convert == "double":
        model.double()
    else:
        model.centre = torch.full((4,), -1.0)     # a new buffer tensor, not an in-place edit
    _same_as_full_forwards(adapter, instances(5, seed=3))
    assert trace_factorization(model, adapter.names) is not old


def test_a_traced_split_that_fails_falls_back_this_time_and_is_tried_again(monkeypatch):
    """A RuntimeError of the split falls back to forward passes for that call only: a passing
    failure must not disable the split for the rest of the process. Out of memory, and an
    error about the inputs, are raised (the forward passes would need more, or meet it too)."""
    from multiviz_widgets.adapter import ModelInputError
    from multiviz_widgets.kernels.factorize import Factorization
    adapter = ModelAdapter(Bilinear(), MODALITIES, ["a", "b", "c"])
    items = instances(5)
    real = Factorization.encode
    failures = [RuntimeError("expected scalar type Float but found Half")]

    def flaky(self, raw):
        if failures:
            raise failures.pop()
        return real(self, raw)
    monkeypatch.setattr(Factorization, "encode", flaky)
    r = emap(adapter, items)
    assert r.params["factorization"] == "none"
    assert "not used this time: RuntimeError: expected scalar type" in r.params["factorization_note"]
    np.testing.assert_allclose(r.matrix, emap(adapter, items, factorized=False).matrix)
    assert emap(adapter, items).params["factorization"] == "traced"     # tried again: it holds
    for err in (torch.OutOfMemoryError("CUDA out of memory"), ModelInputError("bad input")):
        failures.append(err)
        with pytest.raises(type(err)):
            emap(adapter, items)
    assert emap(adapter, items).params["factorization"] == "traced"
    failures.append(RuntimeError("expected scalar type Float but found Half"))
    with pytest.raises(RuntimeError, match="expected scalar type"):
        emap(adapter, items, factorized="traced")


@pytest.mark.parametrize("model, reason", [
    (Branching(), "cannot trace"),
    (OneModality(), "never combines"),
])
def test_models_that_cannot_be_split_fall_back_or_say_why(model, reason):
    adapter = ModelAdapter(model, MODALITIES, ["a", "b", "c"])
    r = emap(adapter, instances(5))
    assert r.params["factorization"] == "none" and reason in r.params["factorization_note"]
    slow = emap(adapter, instances(5), factorized=False)
    np.testing.assert_allclose(r.matrix, slow.matrix)
    with pytest.raises(ValueError, match=reason):
        emap(adapter, instances(5), factorized=True)
    with pytest.raises(FactorizationError, match=reason):
        trace_factorization(model, adapter.names)


@pytest.mark.parametrize("model, keyword", [(VarArgs(), False), (KeywordArgs(), True),
                                            (KeywordArgs(), False)])
def test_forwards_with_star_args_kwargs_and_defaults_are_split(model, keyword):
    """The split traces the model as the adapter calls it, so *args, **kwargs and defaults
    (and a None check on an argument) are left to Python."""
    adapter = ModelAdapter(model, MODALITIES, ["a", "b", "c"], keyword_inputs=keyword)
    _same_as_full_forwards(adapter, instances(6, seed=7))


@pytest.mark.parametrize("model", [TracedDifferently(), SequenceFirst()])
def test_splits_that_change_the_numbers_are_rejected(model):
    adapter = ModelAdapter(model, MODALITIES, ["a", "b", "c"])
    items = instances(6)
    r = emap(adapter, items)
    assert r.params["factorization"] == "none" and "rejected" in r.params["factorization_note"]
    np.testing.assert_allclose(r.matrix, emap(adapter, items, factorized=False).matrix)
    again = emap(adapter, items)                  # remembered: no second fused attempt
    assert "rejected earlier" in again.params["factorization_note"]
    with pytest.raises(ValueError, match="rejected"):
        emap(adapter, items, factorized="traced")


class Tempered(Bilinear):
    """A float setting read in forward: the trace bakes it into the graph as a constant."""

    temperature = 1.0

    def forward(self, tabular, series):
        return super().forward(tabular, series) / self.temperature


def test_a_split_follows_a_replaced_submodule_and_a_changed_setting():
    """Before: the split kept the old head and the old temperature, disagreed with the model,
    and was rejected for the life of the model object (every later EMAP: N^2 full passes)."""
    model = Tempered()
    adapter = ModelAdapter(model, MODALITIES, ["a", "b", "c"])
    items = instances(5)
    assert emap(adapter, items).params["factorization"] == "traced"
    model.head = _seeded(nn.Linear(10, 3), seed=1)
    model.temperature = 2.0
    r = emap(adapter, items, factorized="traced")
    np.testing.assert_allclose(r.matrix, emap(adapter, items, factorized=False).matrix,
                               rtol=1e-5, atol=1e-6)
    model.temperature = 1.0
    assert emap(adapter, items).params["factorization"] == "traced"


class Shifted(Bilinear):
    """An integer setting read in forward (baked into the graph as a constant)."""

    shift = 0

    def forward(self, tabular, series):
        return torch.roll(super().forward(tabular, series), self.shift, 1)


def test_a_split_follows_a_changed_integer_setting():
    model = Shifted()
    adapter = ModelAdapter(model, MODALITIES, ["a", "b", "c"])
    items = instances(5)
    assert emap(adapter, items).params["factorization"] == "traced"
    model.shift = 1
    r = emap(adapter, items, factorized="traced")
    np.testing.assert_allclose(r.matrix, emap(adapter, items, factorized=False).matrix,
                               rtol=1e-5, atol=1e-6)


def test_a_rejected_split_is_traced_again_once_the_model_changes():
    model = SequenceFirst()
    adapter = ModelAdapter(model, MODALITIES, ["a", "b", "c"])
    items = instances(6)
    assert "rejected" in emap(adapter, items).params["factorization_note"]
    assert "rejected earlier" in emap(adapter, items).params["factorization_note"]
    model.head = _seeded(nn.Linear(10, 3), seed=2)          # a changed model: tried anew
    assert "rejected earlier" not in emap(adapter, items).params["factorization_note"]


def test_factorized_argument_is_checked():
    adapter = ModelAdapter(Bilinear(), MODALITIES, ["a", "b", "c"])
    with pytest.raises(ValueError, match="factorized must be"):
        emap(adapter, instances(3), factorized="yes")
    with pytest.raises(ValueError, match="encode_modality"):
        emap(adapter, instances(3), factorized="declared")


class RandomFusion(nn.Module):
    """Encoders of random widths and one of several ways for the modalities to meet."""

    def __init__(self, width: int, fusion: str, seed: int):
        super().__init__()
        self.fusion = fusion
        self.t, self.s = nn.Linear(4, width), nn.Linear(16, width)
        self.gate = nn.Linear(width, width)
        self.head = nn.Linear(2 * width, 3)
        _seeded(self, seed)

    def forward(self, tabular, series):
        a, b = torch.tanh(self.t(tabular)), torch.relu(self.s(series.flatten(1)))
        if self.fusion == "product":
            z = torch.cat([a * b, b], 1)
        elif self.fusion == "gated":
            z = torch.cat([torch.sigmoid(self.gate(a)) * b, a - b], 1)
        elif self.fusion == "outer":
            z = torch.cat([torch.einsum("bi,bj->bij", a, b).mean(2), a.max(1, keepdim=True)[0] * b], 1)
        else:  # "late": only the head mixes them
            z = torch.cat([a, b], 1)
        return self.head(z)


@settings(max_examples=15, deadline=None)
@given(width=st.integers(1, 9), fusion=st.sampled_from(["product", "gated", "outer", "late"]),
       n=st.integers(2, 11), seed=st.integers(0, 10_000))
def test_traced_split_equals_full_forwards_on_random_fusions(width, fusion, n, seed):
    adapter = ModelAdapter(RandomFusion(width, fusion, seed), MODALITIES, ["a", "b", "c"])
    _same_as_full_forwards(adapter, instances(n, seed))


class ThreeWay(nn.Module):
    """Three modalities: two tabular encoders meet first, the series joins them later."""

    def __init__(self, seed=0):
        super().__init__()
        self.t1, self.t2 = nn.Linear(3, 4), nn.Linear(2, 4)
        self.s = nn.Linear(8, 4)
        self.mix, self.head = nn.Linear(4, 4), nn.Linear(8, 2)
        _seeded(self, seed)

    def forward(self, t1, t2, series):
        tab = torch.tanh(self.mix(torch.tanh(self.t1(t1)) * torch.tanh(self.t2(t2))))
        s = torch.tanh(self.s(series.flatten(1)))
        return self.head(torch.cat([tab * s, tab + s], 1))


def three_way(model: nn.Module, n: int, seed: int) -> tuple[ModelAdapter, list[dict]]:
    """An adapter of a ThreeWay model and n random instances of its three modalities."""
    mods = [Tabular("t1", columns=list("abc")), Tabular("t2", columns=list("de")),
            TimeSeries("series", window=2, channels=["x", "y"])]
    g = torch.Generator().manual_seed(seed)
    items = [{"t1": torch.randn(3, generator=g), "t2": torch.randn(2, generator=g),
              "series": torch.randn(4, 2, generator=g)} for _ in range(n)]
    return ModelAdapter(model, mods, ["n", "p"]), items


def test_three_modalities_split_each_from_the_others():
    adapter, items = three_way(ThreeWay(), 7, 0)
    fast, slow = emap(adapter, items), emap(adapter, items, factorized=False)
    assert fast.params["factorization"] == "traced" and fast.params["factorized"]
    np.testing.assert_allclose(fast.emap_logits, slow.emap_logits, atol=1e-5)
    for m in adapter.names:
        np.testing.assert_allclose(fast.unimodal[m], slow.unimodal[m], atol=1e-5)
    split = trace_factorization(adapter.model, adapter.names, side="t2")
    assert split.side == "t2" and split.from_side.count(True) >= 1
    with pytest.raises(FactorizationError, match="name the modality"):
        trace_factorization(adapter.model, adapter.names)


class ThreeWayDeclared(ThreeWay):
    """ThreeWay with its own split into one encoder per modality (``len()`` in forward: torch.fx
    cannot trace it, so only the declared split can save forward passes)."""

    def encode_modality(self, name, x):
        return {"t1": lambda: torch.tanh(self.t1(x)), "t2": lambda: torch.tanh(self.t2(x)),
                "series": lambda: torch.tanh(self.s(x.flatten(1)))}[name]()

    def fuse_encodings(self, e):
        tab = torch.tanh(self.mix(e["t1"] * e["t2"]))
        return self.head(torch.cat([tab * e["series"], tab + e["series"]], 1))

    def forward(self, t1, t2, series):
        assert len(t1) == len(series)
        return self.fuse_encodings({"t1": self.encode_modality("t1", t1),
                                    "t2": self.encode_modality("t2", t2),
                                    "series": self.encode_modality("series", series)})


def test_a_declared_split_serves_three_modalities_each_split_from_the_others():
    adapter, items = three_way(ThreeWayDeclared(), 6, 1)
    slow = emap(adapter, items, factorized=False)
    for factorized in (None, "declared"):
        fast = emap(adapter, items, factorized=factorized)
        assert fast.params["factorization"] == "declared", fast.params
        np.testing.assert_allclose(fast.emap_logits, slow.emap_logits, atol=1e-5)
        for m in adapter.names:
            np.testing.assert_allclose(fast.unimodal[m], slow.unimodal[m], atol=1e-5)
    typed = interaction_type(adapter, items[0], items)
    full = interaction_type(adapter, items[0], items, factorized=False)
    assert typed["factorization"] == "declared" and typed["label"] == full["label"]
    np.testing.assert_allclose(typed["emap_logits"], full["emap_logits"], atol=1e-5)


class WithOptions(Bilinear):
    """Arguments beyond the modalities, with defaults (the adapter never passes them)."""

    def forward(self, tabular, series, scale: float = 2.0, return_hidden: bool = False):
        a, b = torch.tanh(self.t(tabular)), torch.tanh(self.s(series.flatten(1)))
        z = torch.cat([a * b, a + b], 1) * scale
        return (self.head(z), z) if return_hidden else self.head(z)


def test_arguments_with_defaults_keep_their_defaults():
    adapter = ModelAdapter(WithOptions(), MODALITIES, ["a", "b", "c"])
    _same_as_full_forwards(adapter, instances(6))
    split = trace_factorization(adapter.model, adapter.names)
    assert split.inputs == ("tabular", "series")


# ---------------------------------------------------------------------------------------------
# DIME with a split model: the same terms as with full forward passes
# ---------------------------------------------------------------------------------------------
def _dime_pair(adapter, ds, **kw):
    fast = dime(adapter, ds, 0, reference_indices=range(1, 13), n_samples=60, **kw)
    slow = dime(adapter, ds, 0, reference_indices=range(1, 13), n_samples=60, factorized=False,
                **kw)
    assert slow.params["factorization"] == "none"
    for part in ("uc", "mi"):
        for m in adapter.names:
            np.testing.assert_allclose(getattr(fast, part)[m], getattr(slow, part)[m],
                                       atol=1e-5, rtol=1e-4)
    assert fast.uc_value == pytest.approx(slow.uc_value, abs=1e-5)
    assert fast.f_value == pytest.approx(slow.f_value, abs=1e-5)
    return fast


@pytest.mark.parametrize("target", [None, 2, Neuron(1)])
def test_dime_with_a_traced_split_equals_dime_with_forward_passes(target):
    adapter = ModelAdapter(Bilinear(), MODALITIES, ["a", "b", "c"])
    ds = MultimodalDataset({k: [it[k] for it in instances(14)] for k in ("tabular", "series")})
    fast = _dime_pair(adapter, ds, target=target)
    assert fast.params["factorization"] == "traced"


@pytest.mark.parametrize("model", [Bilinear, SequenceFirst])
@pytest.mark.parametrize("factorized", [None, False])
def test_dime_and_emap_count_every_row_through_the_decision_layer(factorized, model):
    """forward_passes counts the fused pairs and the full forwards alike, the split's check
    included (it left out the check's fused pairs), also when the check rejects the split
    (it left out that check's passes). The model's rows check, once per adapter and outside
    forward_passes, runs before the rows are counted."""
    adapter = ModelAdapter(model(), MODALITIES, ["a", "b", "c"])
    ds = MultimodalDataset({k: [it[k] for it in instances(14)] for k in ("tabular", "series")})
    check_instance_rows_independent(adapter, ds[0])
    rows = []
    hook = adapter.decision_layer.register_forward_pre_hook(
        lambda _m, inp: rows.append(inp[0].shape[0]))
    try:
        d = dime(adapter, ds, 0, reference_indices=range(1, 13), n_samples=20,
                 factorized=factorized)
        assert d.forward_passes == sum(rows)
        rows.clear()
        e = emap(adapter, ds, factorized=factorized)
        assert e.forward_passes == sum(rows)
    finally:
        hook.remove()
    split = factorized is None and model is Bilinear
    assert (d.params["factorization"] == "traced") == split
    assert (e.params["factorization"] == "traced") == split


def test_dime_split_feeds_masked_text_through_the_embedding():
    mods = [Text("question", vocab=VOCAB), Tabular("tabular", columns=list("abcd"))]
    adapter = ModelAdapter(Keywords(), mods, ["no", "yes"], keyword_inputs=True)
    g = torch.Generator().manual_seed(2)
    words = VOCAB[2:]
    ds = MultimodalDataset({
        "question": [" ".join(words[int(k)] for k in torch.randint(0, 6, (2 + i % 3,), generator=g))
                     for i in range(14)],
        "tabular": [torch.randn(4, generator=g) for _ in range(14)]})
    assert _dime_pair(adapter, ds).params["factorization"] == "traced"


def test_dime_declared_split_of_the_synthetic_model():
    adapter, ds = synthetic.load("planted")
    assert _dime_pair(adapter, ds).params["factorization"] == "declared"


def test_dime_rejects_a_split_that_changes_the_numbers():
    adapter = ModelAdapter(SequenceFirst(), MODALITIES, ["a", "b", "c"])
    ds = MultimodalDataset({k: [it[k] for it in instances(14)] for k in ("tabular", "series")})
    r = dime(adapter, ds, 0, reference_indices=range(1, 13), n_samples=40)
    assert r.params["factorization"] == "none" and "rejected" in r.params["factorization_note"]


def test_tracing_never_disturbs_forward_passes_in_other_threads():
    """torch.fx patches nn.Module.__call__ process-wide while it traces: a forward pass running
    meanwhile in another thread, even of another adapter, used to fail ('module is not
    installed as a submodule'). All adapters share one lock around model computations."""
    import threading
    busy = ModelAdapter(Bilinear(), MODALITIES, ["a", "b", "c"])
    raw = busy.collate(instances(4))
    expected = busy.predict(raw)
    errors, done = [], threading.Event()

    def forwards():
        while not done.is_set():
            try:
                if not torch.allclose(busy.predict(raw), expected):
                    errors.append("different logits")
            except Exception as e:   # the failure this test guards against
                errors.append(repr(e))

    worker = threading.Thread(target=forwards)
    worker.start()
    try:
        for _ in range(25):   # each new model is traced afresh
            emap(ModelAdapter(Bilinear(), MODALITIES, ["a", "b", "c"]), instances(3))
    finally:
        done.set()
        worker.join()
    assert errors == []


class KeepsAttention(Bilinear):
    """Research code often keeps an intermediate value on the model for later display."""

    def forward(self, tabular, series):
        a, b = torch.tanh(self.t(tabular)), torch.tanh(self.s(series.flatten(1)))
        self.last_attention = torch.softmax(a * b, 1)
        return self.head(torch.cat([self.last_attention, a + b], 1))


def test_tracing_leaves_the_model_as_it_was():
    model = KeepsAttention()
    adapter = ModelAdapter(model, MODALITIES, ["a", "b", "c"])
    raw = adapter.collate(instances(2))
    adapter.predict(raw)
    kept = model.last_attention
    trace_factorization(model, adapter.names)
    assert model.last_attention is kept              # not a tracing proxy
    assert not hasattr(Bilinear(), "last_attention")
    _same_as_full_forwards(adapter, instances(5))


# ---------------------------------------------------------------------------------------------
# submodules that torch.fx cannot trace are kept whole
# ---------------------------------------------------------------------------------------------
class PackedQuestion(nn.Module):
    """The usual recurrent question encoder: packs the padded tokens by their lengths, which
    torch.fx cannot trace (the lengths must be concrete)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(len(VOCAB), 4, padding_idx=0)
        self.lstm = nn.LSTM(4, 5, batch_first=True)

    def forward(self, question):
        lengths = (question != 0).sum(1).clamp(min=1)
        packed = nn.utils.rnn.pack_padded_sequence(self.emb(question), lengths.cpu(),
                                                   batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        return h[-1]


class Branchy(nn.Module):
    """A layer with Python control flow on tensor values (a guard against non-finite values,
    as research code often has)."""

    def __init__(self, width: int = 5):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        y = self.lin(x)
        if not bool(torch.isfinite(y).all()):
            raise FloatingPointError("non-finite activations")
        return torch.tanh(y)


class RecurrentVQA(nn.Module):
    """Tabular features and a packed recurrent question encoder; the tabular side goes through
    an untraceable layer nested inside another module; so does the fusion."""

    def __init__(self):
        super().__init__()
        self.question_encoder = PackedQuestion()
        self.tabular_encoder = nn.Sequential(nn.Linear(4, 5), Branchy())
        self.fusion_gate = Branchy(5)
        self.head = nn.Linear(10, 3)
        _seeded(self)

    def forward(self, tabular, question):
        a, b = self.tabular_encoder(tabular), self.question_encoder(question)
        return self.head(torch.cat([self.fusion_gate(a * b), a + b], 1))


def _recurrent(n: int, seed: int = 4):
    mods = [Tabular("tabular", columns=list("abcd")), Text("question", vocab=VOCAB)]
    adapter = ModelAdapter(RecurrentVQA(), mods, ["x", "y", "z"])
    g = torch.Generator().manual_seed(seed)
    words = VOCAB[2:]
    data = {"tabular": [torch.randn(4, generator=g) for _ in range(n)],
            "question": [" ".join(words[int(k)] for k in torch.randint(0, 6, (1 + i % 5,), generator=g))
                         for i in range(n)]}
    return adapter, MultimodalDataset(data)


def test_untraceable_submodules_are_kept_whole_and_the_split_still_holds():
    adapter, ds = _recurrent(8)
    split = trace_factorization(adapter.model, adapter.names)
    # the innermost failing module only: its parent (a Sequential) is still traced through
    assert sorted(split.opaque_modules) == ["fusion_gate", "question_encoder",
                                            "tabular_encoder.1"]
    assert split.from_side.count(True) >= 1 and split.from_side.count(False) >= 1
    items = [ds[i] for i in range(len(ds))]
    fast = _same_as_full_forwards(adapter, items)
    assert "kept whole" in fast.params["factorization_note"]
    assert "question_encoder" in fast.params["factorization_note"]
    _same_as_full_forwards(adapter, items, Neuron(1))


def test_dime_with_submodules_kept_whole_equals_dime_with_forward_passes():
    adapter, ds = _recurrent(14, seed=5)
    fast = _dime_pair(adapter, ds)
    assert fast.params["factorization"] == "traced"
    assert "kept whole" in fast.params["factorization_note"]


def test_too_many_untraceable_submodules_mean_no_split(monkeypatch):
    from multiviz_widgets.kernels import factorize
    monkeypatch.setattr(factorize, "MAX_OPAQUE_MODULES", 1)
    adapter, ds = _recurrent(6)
    with pytest.raises(FactorizationError, match="in submodule"):
        trace_factorization(RecurrentVQA(), adapter.names)
    r = emap(ModelAdapter(RecurrentVQA(), list(adapter.modalities.values()), ["x", "y", "z"]),
             [ds[i] for i in range(6)])
    assert r.params["factorization"] == "none" and "cannot trace" in r.params["factorization_note"]


class NormalisesInPlace(nn.Module):
    """Normalises its tabular input in place: every later pass on the same tensor would see
    twice-normalised values (EMAP's pairs and its check reuse the collated batch)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(16, 4), nn.Linear(8, 2)
        _seeded(self)

    def forward(self, tabular, series):
        tabular = tabular.sub_(0.5).div_(2.0)
        a, b = torch.tanh(self.a(tabular)), torch.tanh(self.b(series.flatten(1)))
        return self.head(torch.cat([a * b, a + b], 1))


@pytest.mark.parametrize("factorized", [None, False, True])
def test_a_model_that_changes_its_input_in_place_is_a_clear_error(factorized):
    """EMAP and DIME used to return wrong numbers silently (the split was rejected after its
    check had changed the batch, and the fallback then ran on the changed values)."""
    from multiviz_widgets import AdapterError
    from multiviz_widgets.kernels.unimodal import attribute
    adapter = ModelAdapter(NormalisesInPlace(), MODALITIES, ["a", "b"], decision_layer="head")
    items = instances(6)
    kept = [{k: v.clone() for k, v in it.items()} for it in items]
    with pytest.raises(AdapterError, match="in place.*x = \\(x - mu\\) / s"):
        emap(adapter, items, factorized=factorized)
    ds = MultimodalDataset({k: [it[k] for it in items] for k in kept[0]})
    with pytest.raises(AdapterError, match="in place"):
        dime(adapter, ds, 0, reference_indices=range(1, 6), n_samples=20, factorized=factorized)
    with pytest.raises(AdapterError, match="in place"):
        attribute(adapter, items[0], "occlusion")
    assert all(torch.equal(a[k], b[k]) for a, b in zip(items, kept) for k in a)   # data intact


class OneLogit(nn.Module):
    """One logit per instance ([B]), which the adapter takes as [B, 1] with one class name."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(16, 4), nn.Linear(4, 1)
        _seeded(self)

    def forward(self, tabular, series):
        return self.head(torch.tanh(self.a(tabular)) * torch.tanh(self.b(series.flatten(1))))[:, 0]


def test_one_logit_models_keep_the_split_in_emap_and_dime():
    """The fused pairs went around the adapter's logits check: DIME crashed on [B] outputs and
    EMAP's check compared [B] with [B, 1] (broadcast) and rejected a correct split."""
    adapter = ModelAdapter(OneLogit(), MODALITIES, ["yes"], decision_layer="head")
    items = instances(7)
    traced, full = emap(adapter, items, factorized=True), emap(adapter, items, factorized=False)
    np.testing.assert_allclose(traced.emap_logits, full.emap_logits, atol=1e-5)
    assert traced.params["factorization"] != "none"
    ds = MultimodalDataset({k: [it[k] for it in items] for k in items[0]})
    a = dime(adapter, ds, 0, n_samples=40, factorized=True)
    b = dime(adapter, ds, 0, n_samples=40, factorized=False)
    assert a.uc_value == pytest.approx(b.uc_value, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# what a trace leaves behind: the cache frees the model, no proxy stays on it, no stale split
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [Branching, SequenceFirst])
def test_a_model_that_cannot_be_split_is_freed_once_the_caller_drops_it(make):
    """Before: the cache kept the FactorizationError of a failed trace (or raised the one of a
    rejection again), whose traceback held the frames of the trace and so the model: the
    weak-keyed cache never let go of it (its weights stayed in memory for ever)."""
    from multiviz_widgets.kernels.split_model import hooked_modules
    model = make()
    adapter = ModelAdapter(model, MODALITIES, ["a", "b", "c"])
    for _ in range(2):                 # the second time from the cache
        assert emap(adapter, instances(5)).params["factorization"] == "none"
        with pytest.raises(FactorizationError):       # emap's split, as emap asks for it
            trace_factorization(model, adapter.names, keep_whole=hooked_modules(adapter))
    dropped = weakref.ref(model)
    del model, adapter
    gc.collect()
    assert dropped() is None


class Recording(Bilinear):
    """Keeps each attention map for plotting, in a list, a dict of lists, an object's attribute
    and an object with slots: a trace must leave every one of them as it was."""

    class Slotted:
        __slots__ = ("last",)

    def __init__(self):
        super().__init__()
        self.maps, self.stats = [], {"maps": [], "calls": 0}
        self.config = type("Config", (), {})()
        self.config.log = []
        self.slotted = self.Slotted()

    def forward(self, tabular, series):
        a, b = torch.tanh(self.t(tabular)), torch.tanh(self.s(series.flatten(1)))
        attention = torch.softmax(a * b, 1)
        self.maps.append(attention)
        self.stats["maps"].append(attention)
        self.stats["calls"] += 1
        self.config.log.append(attention)
        self.slotted.last = attention
        return self.head(torch.cat([a * b, a + b], 1))


def _proxies(value, depth: int = 4) -> list:
    """The torch.fx proxies in a value, through containers and objects' attributes."""
    if isinstance(value, torch.fx.Proxy):
        return [value]
    if depth == 0 or isinstance(value, (torch.Tensor, nn.Module, str, type)):
        return []
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (list, tuple, set)):
        items = list(value)
    else:
        items = [getattr(value, k) for k in getattr(type(value), "__slots__", ())
                 if hasattr(value, k)] + list(getattr(value, "__dict__", {}).values())
    return [p for v in items for p in _proxies(v, depth - 1)]


def test_tracing_leaves_lists_dicts_and_objects_on_the_model_as_they_were():
    """Before: only the modules' own attributes were put back after the trace, so a list the
    forward appends its attention map to held a torch.fx Proxy after emap, and any code that
    read it (torch.stack(model.maps)) broke."""
    model = Recording()
    real = []              # forward calls with real tensors (the trace's get proxies)
    model.register_forward_pre_hook(
        lambda _m, args: real.append(len(args[0])) if isinstance(args[0], torch.Tensor) else None)
    adapter = ModelAdapter(model, MODALITIES, ["a", "b", "c"])
    r = emap(adapter, instances(6))
    assert r.params["factorization"] == "traced"
    assert all(isinstance(x, torch.Tensor) for x in model.maps)
    assert [len(x) for x in model.maps] == [len(x) for x in model.stats["maps"]] == real
    assert model.stats["calls"] == len(real) and len(model.config.log) == len(real)
    assert isinstance(model.slotted.last, torch.Tensor)
    assert not [p for m in model.modules() for p in _proxies(vars(m))]


class Vocabulary(Bilinear):
    """Holds a large vocabulary {token: id} and a large list of ids, and writes a traced value
    into each: both must be put back, without the walk reading them item by item."""

    def __init__(self, n: int = 5000):
        super().__init__()
        self.vocab = {f"tok{i}": i for i in range(n)}
        self.ids = list(range(n))
        self.rows = [[i, i + 1] for i in range(50)]

    def forward(self, tabular, series):
        a, b = torch.tanh(self.t(tabular)), torch.tanh(self.s(series.flatten(1)))
        self.vocab["last"] = a           # a new key
        self.vocab["tok3"] = b           # a value replaced: the same length
        self.ids[7] = a
        self.rows[2].append(b)
        return self.head(torch.cat([a * b, a + b], 1))


def test_tracing_puts_back_large_plain_containers_without_reading_their_items(monkeypatch):
    """Before: every entry of a 300k-entry vocabulary was queued with its path as a string and
    compared one by one, 0.9 s per trace attempt; a container of only str, int, float... is
    now copied and compared whole (at C speed), and its items are not read."""
    model = Vocabulary()
    vocab, ids = dict(model.vocab), list(model.ids)
    read = []
    steps = factorize._steps
    monkeypatch.setattr(factorize, "_steps",
                        lambda value, attributes: read.append(len(value) if hasattr(
                            value, "__len__") else 1) or steps(value, attributes))
    trace_factorization(model, ("tabular", "series"))
    assert read and max(read) < 5000             # neither the vocabulary nor the ids read
    # put back as they were (a real forward pass would leave its tensors there), in order
    assert model.vocab == vocab and list(model.vocab) == list(vocab)
    assert model.ids == ids and model.rows[2] == [2, 3]
    assert not [p for m in model.modules() for p in _proxies(vars(m))]


class Unrestorable(list):
    """A list that cannot be emptied: what the trace put in it stays there."""

    def clear(self):
        raise TypeError("frozen")


class KeepsInside(Bilinear):
    def __init__(self):
        super().__init__()
        self.stats = {"logs": [Unrestorable()]}

    def forward(self, tabular, series):
        a, b = torch.tanh(self.t(tabular)), torch.tanh(self.s(series.flatten(1)))
        self.stats["logs"][0].append(a)
        return self.head(torch.cat([a * b, a + b], 1))


def test_a_proxy_left_where_it_cannot_be_put_back_is_named_by_its_path():
    """The path is built only for this message (once per item it cost more than the walk)."""
    model = KeepsInside()
    with pytest.raises(FactorizationError, match=r"in model\.stats\['logs'\]\[0\]\[0\], "):
        trace_factorization(model, ("tabular", "series"))


LEFT_OUTSIDE: list = []


class KeepsOutside(Bilinear):
    """Keeps a value in a global list: a trace cannot put that back."""

    def forward(self, tabular, series):
        a, b = torch.tanh(self.t(tabular)), torch.tanh(self.s(series.flatten(1)))
        LEFT_OUTSIDE.append(a)
        return self.head(torch.cat([a * b, a + b], 1))


def test_a_forward_that_keeps_traced_values_out_of_reach_is_not_split():
    adapter = ModelAdapter(KeepsOutside(), MODALITIES, ["a", "b", "c"])
    r = emap(adapter, instances(4))
    assert r.params["factorization"] == "none" and "proxy" in r.params["factorization_note"]
    with pytest.raises(ValueError, match="outside the model's attributes"):
        emap(adapter, instances(4), factorized=True)
    LEFT_OUTSIDE.clear()


class Weighted(Bilinear):
    """A list setting read in forward: the trace bakes its numbers in, and the cache's check of
    the model's settings does not look into lists."""

    def __init__(self):
        super().__init__()
        self.mix = [1.0, 1.0]

    def forward(self, tabular, series):
        a, b = torch.tanh(self.t(tabular)), torch.tanh(self.s(series.flatten(1)))
        return self.head(torch.cat([self.mix[0] * a * b, self.mix[1] * (a + b)], 1))


@pytest.mark.parametrize("factorized", [True, None])
def test_a_cached_split_that_disagrees_is_traced_again_once(factorized, monkeypatch):
    """Before: after model.mix changed, the cached split disagreed with the forward pass:
    factorized=True raised that it disagrees, and the default fell back to N^2 full forward
    passes and remembered the rejection for the life of the model."""
    model = Weighted()
    adapter = ModelAdapter(model, MODALITIES, ["a", "b", "c"])
    items = instances(8)
    assert emap(adapter, items, factorized=factorized).params["factorization"] == "traced"
    model.mix = [3.0, 0.5]
    traces = []
    real = factorize._trace
    monkeypatch.setattr(factorize, "_trace", lambda *a: traces.append(1) or real(*a))
    r = emap(adapter, items, factorized=factorized)
    assert r.params["factorization"] == "traced" and len(traces) == 1
    np.testing.assert_allclose(r.matrix, emap(adapter, items, factorized=False).matrix,
                               rtol=1e-5, atol=1e-6)
    assert emap(adapter, items).params["factorization"] == "traced" and len(traces) == 1
    # a split that disagrees as soon as it is traced is rejected (or raised about) at once
    traces.clear()
    adapter = ModelAdapter(TracedDifferently(), MODALITIES, ["a", "b", "c"])
    if factorized:
        with pytest.raises(FactorizationError, match="disagrees"):
            emap(adapter, items, factorized=factorized)
    else:
        assert "rejected" in emap(adapter, items).params["factorization_note"]
    assert len(traces) == 1


# ---------------------------------------------------------------------------------------------
# DIME with a large reference set: cancelled within a batch, batch_size pairs at a time
# ---------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


@pytest.mark.parametrize("factorized", [None, False])
def test_dime_can_be_cancelled_while_it_averages_the_reference_pairs(factorized):
    """Before: no progress was reported during the N^2 pairs of the grand mean (minutes for
    N = 3,000), so a cancel waited until they were all done."""
    adapter = ModelAdapter(Bilinear(), MODALITIES, ["a", "b", "c"])
    ds = MultimodalDataset({k: [it[k] for it in instances(14)] for k in ("tabular", "series")})
    check_instance_rows_independent(adapter, ds[0])   # once per adapter: not DIME's pairs
    rows, calls = [], []
    adapter.decision_layer.register_forward_pre_hook(lambda _m, inp: rows.append(len(inp[0])))

    def cancel(done, total, message):
        calls.append((done, total, message))
        if done > 0:
            raise _Stop
    n = 12
    with pytest.raises(_Stop):
        dime(adapter, ds, 0, reference_indices=range(1, 1 + n), n_samples=20, batch_size=8,
             progress=cancel, factorized=factorized)
    done, total, message = calls[-1]
    assert done == 8 and "reference" in message and total > n * n
    check = 2 * (n + 8) + 1 if factorized is None else 1    # the split's check, the prediction
    assert sum(rows) <= check + 8 < n * n


def test_dime_fuses_batch_size_pairs_at_a_time(monkeypatch):
    """Before: the grand mean fused all N^2 reference pairs at once (their indices and
    outputs: memory grew with N^2), and each batch of masks with all references at once."""
    from multiviz_widgets.kernels.factorize import Factorization
    from multiviz_widgets.kernels.split_model import FusedPairs
    largest, fused = [0], [0]
    real, real_fuse = FusedPairs.pairs, Factorization.fuse

    def pairs(self, side, others, i, j):
        largest[0] = max(largest[0], len(i))
        return real(self, side, others, i, j)

    def fuse(self, rows):
        fused[0] = max(fused[0], len(rows[0]))
        return real_fuse(self, rows)
    monkeypatch.setattr(FusedPairs, "pairs", pairs)
    monkeypatch.setattr(Factorization, "fuse", fuse)
    adapter = ModelAdapter(Bilinear(), MODALITIES, ["a", "b", "c"])
    ds = MultimodalDataset({k: [it[k] for it in instances(14)] for k in ("tabular", "series")})
    progress = []
    fast = dime(adapter, ds, 0, reference_indices=range(1, 13), n_samples=30, batch_size=8,
                progress=lambda *a: progress.append(a))
    # the most pairs asked for at once: the check's N = 12 own pairs (memory linear in N),
    # never the 144 reference pairs or a batch of 8 masks x 12 references
    assert fast.params["factorization"] == "traced" and largest[0] == 12 and fused[0] == 8
    slow = dime(adapter, ds, 0, reference_indices=range(1, 13), n_samples=30, batch_size=8,
                factorized=False)
    assert fast.uc_value == pytest.approx(slow.uc_value, abs=1e-5)
    for m in adapter.names:
        np.testing.assert_allclose(fast.uc[m], slow.uc[m], atol=1e-5, rtol=1e-4)
    done = [d for d, _, _ in progress]
    assert done == sorted(done) and done[-1] == progress[-1][1]      # never back, to the end


class WithEncoder(Bilinear):
    """Bilinear whose tabular encoder is a Sequential (traced through, not a leaf)."""

    def __init__(self):
        super().__init__()
        self.t = nn.Sequential(nn.Linear(4, 5))
        _seeded(self)


def test_tracing_never_runs_the_persons_hooks_on_proxies():
    """torch.fx traced through a module by its __call__, so the person's hooks ran on the
    trace's proxies: a list of logged activations then held a Proxy (torch.cat of it gave a
    Proxy), a row counter became Proxy(add_1) for good. A submodule with hooks is now kept
    whole (the split calls it on real values, hooks and all: a hook that changes its output is
    in the numbers); hooks on the model itself leave the split to the forward passes."""
    items = instances(6)
    model = WithEncoder()
    logged = []
    model.t.register_forward_hook(lambda _m, _i, out: logged.append(out.detach()))
    adapter = ModelAdapter(model, MODALITIES, ["a", "b", "c"])
    r = emap(adapter, items)
    assert r.params["factorization"] == "traced", r.params
    assert "t has hooks, called on real values" in r.params["factorization_note"]
    assert logged and all(type(t) is torch.Tensor for t in logged)
    np.testing.assert_allclose(r.emap_logits, emap(adapter, items, factorized=False).emap_logits,
                               atol=1e-5)
    # a hook that changes the encoder's output: the split calls the encoder with it
    changed = WithEncoder()
    changed.t.register_forward_hook(lambda _m, _i, out: out * 2.0)
    adapter = ModelAdapter(changed, MODALITIES, ["a", "b", "c"])
    r = emap(adapter, items)
    assert r.params["factorization"] == "traced", r.params
    np.testing.assert_allclose(r.emap_logits, emap(adapter, items, factorized=False).emap_logits,
                               atol=1e-5)
    # hooks on the model itself: set aside while it is traced (the split never calls the
    # model itself; its check's forward passes run them on real values)
    counted, rows = WithEncoder(), [0]
    counted.register_forward_pre_hook(lambda _m, args: rows.__setitem__(0, rows[0] +
                                                                       args[0].shape[0]))
    adapter = ModelAdapter(counted, MODALITIES, ["a", "b", "c"])
    r = emap(adapter, items)
    assert r.params["factorization"] == "traced" and type(rows[0]) is int and rows[0] > 0
    # torch's global hooks would run on every module the trace goes through: forward passes
    from torch.nn.modules.module import register_module_forward_hook
    handle = register_module_forward_hook(lambda _m, _i, out: None)
    try:
        r = emap(ModelAdapter(WithEncoder(), MODALITIES, ["a", "b", "c"]), items)
    finally:
        handle.remove()
    assert r.params["factorization"] == "none"
    assert "torch's global module hooks are set" in r.params["factorization_note"]


class _PausesWhileTraced(WithEncoder):
    """Waits, the first time it is traced, for another thread to act."""

    def __init__(self):
        super().__init__()
        import threading
        self.tracing, self.go = threading.Event(), threading.Event()

    def forward(self, tabular, series):
        from torch import fx
        if isinstance(tabular, fx.Proxy) and not self.tracing.is_set():
            self.tracing.set()
            self.go.wait(10)
        return super().forward(tabular, series)


def test_a_hook_removed_or_added_while_the_model_is_traced_stays_so():
    """A hook removed from another thread (a person's cell) while EMAP traced the split came
    back after, and kept running: the trace put back the hook dicts it had saved."""
    import threading
    model = _PausesWhileTraced()
    seen, added = [], []
    handle = model.t.register_forward_hook(lambda _m, _i, out: seen.append(type(out)))

    def person():
        model.tracing.wait(10)
        handle.remove()
        model.s.register_forward_hook(lambda _m, _i, out: added.append(type(out)))
        model.go.set()
    thread = threading.Thread(target=person)
    thread.start()
    r = emap(ModelAdapter(model, MODALITIES, ["a", "b", "c"]), instances(4), factorized="traced")
    thread.join(10)
    assert r.params["factorization"] == "traced"
    assert len(model.t._forward_hooks) == 0 and len(model.s._forward_hooks) == 1
    seen.clear(), added.clear()
    with torch.no_grad():
        model(torch.zeros(1, 4), torch.zeros(1, 8, 2))
    assert seen == [] and added == [torch.Tensor]


class _Enc(nn.Module):
    """A custom (non-leaf) encoder module."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)

    def forward(self, x):
        return self.lin(x)


class _Blocks(Bilinear):
    """Ten custom blocks on the tabular side: more than MAX_OPAQUE_MODULES."""

    def __init__(self):
        super().__init__()
        self.t = _Enc()
        self.blocks = nn.ModuleList(_Scale() for _ in range(10))
        _seeded(self)

    def forward(self, tabular, series):
        a = self.t(tabular)
        for block in self.blocks:
            a = block(a)
        a, b = torch.tanh(a), torch.tanh(self.s(series.flatten(1)))
        return self.head(torch.cat([a * b, a + b], 1))


class _Scale(nn.Module):
    def forward(self, x):
        return 0.9 * x


def test_hooked_modules_keep_their_own_budget_and_hook_refusals_are_not_kept():
    """A legacy backward hook on a custom encoder made the trace index a proxy for ever (memory
    filled); ten hooked blocks used up the eight modules that may be kept whole; a refusal for
    hooks (or torch's global ones) outlived the hooks; a dict of the person named '..._hooks'
    was taken for torch's and kept a proxy."""
    from torch.nn.modules.module import register_module_forward_hook
    items = instances(6)
    legacy = _Blocks()
    with warnings.catch_warnings():                     # torch may say it is deprecated
        warnings.simplefilter("ignore")
        legacy.t.register_backward_hook(lambda *_: None)
    r = emap(ModelAdapter(legacy, MODALITIES, ["a", "b", "c"]), items)
    assert r.params["factorization"] == "traced"
    model = _Blocks()
    handles = [b.register_forward_hook(lambda _m, _i, out: None) for b in model.blocks]
    adapter = ModelAdapter(model, MODALITIES, ["a", "b", "c"])
    r = emap(adapter, items)
    assert r.params["factorization"] == "traced"
    assert "blocks.9 have hooks, called on real values" in r.params["factorization_note"]
    handle = register_module_forward_hook(lambda _m, _i, out: None)
    try:
        assert emap(adapter, items).params["factorization"] == "none"
    finally:
        handle.remove()
    for h in handles:
        h.remove()
    r = emap(adapter, items)                             # no hooks now: traced through
    assert r.params["factorization"] == "traced" and "factorization_note" not in r.params


class _NamedHooks(Bilinear):
    def __init__(self):
        super().__init__()
        self.activation_hooks = {}

    def forward(self, tabular, series):
        self.activation_hooks["t"] = self.t(tabular)
        return super().forward(tabular, series)


def test_a_dict_of_the_model_named_hooks_is_put_back_after_the_trace():
    model = _NamedHooks()
    r = emap(ModelAdapter(model, MODALITIES, ["a", "b", "c"]), instances(6))
    assert r.params["factorization"] == "traced"
    assert type(model.activation_hooks["t"]) is torch.Tensor
