"""The adapter doctor: a healthy model passes; each broken adapter gets a clear, actionable message."""
import numpy as np
import pytest
import torch
from torch import nn

from multiviz_widgets import AdapterError, Image, ModelAdapter, Neuron, Text
from multiviz_widgets.doctor import STAGES, check

from .test_interaction_notes import ScalarHead

VOCAB = ["[PAD]", "[UNK]", "what", "colour", "is", "it"]
INSTANCE = {"image": torch.rand(3, 8, 8), "question": "what colour is it"}


class Healthy(nn.Module):
    def __init__(self, n_classes=3, dropout=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(len(VOCAB), 6)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fuse = nn.Linear(6, 8)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(8, n_classes)

    def features(self, image, question):
        img = torch.tanh(self.conv(image)).mean((2, 3))
        q = self.embedding(question).mean(1)
        return torch.relu(self.fuse(img * q))

    def forward(self, image, question):
        return self.classifier(self.drop(self.features(image, question)))


def adapter(model, **kw):
    kw.setdefault("class_names", ["red", "green", "blue"])
    mods = kw.pop("modalities", [Image("image", patch=4), Text("question", vocab=VOCAB)])
    return ModelAdapter(model.eval() if kw.pop("eval", True) else model, mods, **kw)


def test_a_healthy_model_supports_every_stage():
    report = check(adapter(Healthy()), INSTANCE)
    assert report.ok, str(report)
    assert all(report.stages[s] for s in STAGES)
    assert report.n_classes == 3 and report.n_features == 8
    assert "OK" in str(report)


class ThreeDOutput(Healthy):
    def forward(self, image, question):
        return super().forward(image, question).unsqueeze(1)


class NonFinite(Healthy):
    def forward(self, image, question):
        return super().forward(image, question) / 0.0


class Softmaxed(Healthy):
    def forward(self, image, question):
        return torch.softmax(super().forward(image, question), -1)


class SkipsDecisionLayer(Healthy):
    def forward(self, image, question):
        return self.features(image, question)[:, :3]


class DetachedEmbedding(Healthy):
    def features(self, image, question):
        img = torch.tanh(self.conv(image)).mean((2, 3))
        q = self.embedding(question).detach().mean(1)
        return torch.relu(self.fuse(img * q))


class WrongOrder(Healthy):
    """Arguments in another order than the modalities, under other names (with the modalities'
    names the adapter passes them by keyword: see test_adapter)."""
    def forward(self, q, img):
        return super().forward(img, q)


class ReturnsDict(Healthy):
    def forward(self, image, question):
        return {"logits": super().forward(image, question)}


class ShapeMismatch(Healthy):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)  # expects grey images


def codes(model, instance=INSTANCE, **kw):
    r = check(adapter(model, **kw), instance)
    assert not r.ok or r.warnings, "expected a finding"
    return r


@pytest.mark.parametrize("make, code, words, stage", [
    (lambda: (Healthy(), {"image": torch.rand(3, 8, 8), "text": "what"}), "instance",
     "missing ['question']", "unimodal_gradient"),
    (lambda: (Healthy(), {"image": torch.rand(3, 8, 8)}), "instance", "missing", "representations"),
    (lambda: (ShapeMismatch(), INSTANCE), "forward", "shapes", "unimodal_perturbation"),
    (lambda: (WrongOrder(), INSTANCE), "forward", "order of the model's arguments", "prediction"),
    (lambda: (ThreeDOutput(), INSTANCE), "output-shape", "2-D logits", "unimodal_gradient"),
    (lambda: (ReturnsDict(), INSTANCE), "output-type", "tensor of logits", "representations"),
    (lambda: (NonFinite(), INSTANCE), "non-finite", "NaN or infinity", "unimodal_gradient"),
    (lambda: (SkipsDecisionLayer(), INSTANCE), "decision-layer", "never called", "representations"),
    (lambda: (DetachedEmbedding(), INSTANCE), "gradient-not-reached", "No gradient reaches modality 'question'",
     "unimodal_gradient"),
])
def test_broken_adapters_get_actionable_errors(make, code, words, stage):
    model, instance = make()
    r = check(adapter(model), instance)
    assert not r.ok
    assert code in r.codes(), str(r)
    msg = " ".join(f.message for f in r.errors)
    assert words in msg, msg
    assert r.stages[stage] is False
    with pytest.raises(AdapterError):
        r.raise_if_failed()


def test_training_mode_with_dropout_is_a_warning_and_checked_in_eval_mode():
    """The kernels run a model in training mode in eval mode: so does check(), which warns."""
    model = Healthy(dropout=0.5).train()
    with pytest.warns(UserWarning, match="training mode"):
        r = check(adapter(model, eval=False), INSTANCE)
    assert r.ok, str(r)
    assert "training-mode" in r.codes() and "model.eval()" in r.warnings[0].message
    assert model.training and model.drop.training


def test_probabilities_instead_of_logits_is_a_warning():
    r = check(adapter(Softmaxed()), INSTANCE)
    assert r.ok and "probabilities" in r.codes()
    assert "softmax" in r.warnings[0].message


def test_class_count_mismatch():
    r = check(adapter(Healthy(), class_names=["a", "b"]), INSTANCE)
    assert "class-count" in r.codes() and "one name per logit" in str(r)


@pytest.mark.parametrize("kw, match", [
    (dict(modalities=[Image("image"), Image("image")]), "unique"),
    (dict(modalities=[]), "at least one modality"),
    (dict(decision_layer="nope"), "no submodule 'nope'"),
    (dict(decision_layer=nn.Linear(2, 2)), "not part of the model"),
    (dict(embedding_layers={"caption": "embedding"}), "not modalities"),
    (dict(class_names=[]), "class_names is empty"),
])
def test_adapter_construction_errors(kw, match):
    with pytest.raises(AdapterError, match=match):
        adapter(Healthy(), **kw)


def test_text_embedding_must_be_named_when_ambiguous():
    class TwoEmbeddings(Healthy):
        def __init__(self):
            super().__init__()
            self.other = nn.Embedding(3, 2)
    with pytest.raises(AdapterError, match="embedding_layers="):
        adapter(TwoEmbeddings())


def test_targets_are_checked():
    a = adapter(Healthy())
    with pytest.raises(AdapterError, match="classes are"):
        a.target("purple")
    with pytest.raises(AdapterError, match="out of range"):
        a.target(7)
    assert a.target("green").index == 1
    # indices are integers: a float or a bool used to be truncated to another target
    for bad in [("neuron", 2.5), ("class", True), 1.5, True, ("layer", 1)]:
        with pytest.raises(AdapterError, match="integer|class index|kind"):
            a.target(bad)
    with pytest.raises(ValueError, match="must be an integer"):
        Neuron(2.5)
    # a one-element integer tensor (e.g. a label from a batch) is a class index
    assert a.target(torch.tensor(2)) == a.target(2) and isinstance(a.target(torch.tensor(2)).index, int)
    assert a.target(("neuron", np.int64(3))) == Neuron(3)


# ---------------------------------------------------------------------------------------------
# check() follows the kernels' paths: continuous inputs, masked inputs, batches, eval mode
# ---------------------------------------------------------------------------------------------
def _tabular_series(model, **kw):
    from multiviz_widgets import Tabular, TimeSeries
    return ModelAdapter(model, [Tabular("vitals", columns=["hr", "bp", "t"]),
                                TimeSeries("ecg", window=5, channels=["a", "b"])], ["a", "b"], **kw)


TS_INSTANCE = {"vitals": [0.5, -1.0, 2.0], "ecg": torch.rand(10, 2, generator=torch.Generator().manual_seed(1))}


class Mixer(nn.Module):
    """Tabular x series; ``kind`` = "batchmix" adds the batch mean, "log" takes a log of the
    vitals (infinite at the zero baseline), "late" applies the head to each modality."""

    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(2, 4), nn.Linear(4, 2)

    def forward(self, vitals, ecg):
        if self.kind == "late":
            return (self.head(torch.tanh(self.a(vitals))) + self.head(torch.tanh(self.b(ecg.mean(1))))) / 2
        h = torch.tanh(self.a(vitals)) * torch.tanh(self.b(ecg.mean(1)))
        if self.kind == "batchmix":
            h = h + h.mean(0, keepdim=True)
        if self.kind == "log":
            h = h * torch.log(vitals.abs().sum(1, keepdim=True))
        return self.head(h)


def test_a_model_that_mixes_the_rows_of_a_batch_is_reported():
    r = check(_tabular_series(Mixer("batchmix").eval()), TS_INSTANCE)
    assert "batch-dependent" in r.codes() and not r.ok, str(r)
    assert "depends on the other instances in its batch" in str(r)
    assert not any(r.stages.values())
    assert check(_tabular_series(Mixer("plain").eval()), TS_INSTANCE).ok


class RoundingMixer(Mixer):
    """Rows of a batch of two come out one bfloat16 roundoff (2**-7) larger than alone: what
    another summation order (a GPU's convolution algorithm for another batch size) does."""

    def forward(self, vitals, ecg):
        out = super().forward(vitals, ecg)
        return out * (1 + 2 ** -7) if vitals.shape[0] > 1 else out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_of_a_less_precise_model_is_not_batch_dependence(dtype):
    assert check(_tabular_series(RoundingMixer("plain").eval().to(dtype)), TS_INSTANCE).ok
    r = check(_tabular_series(Mixer("batchmix").eval().to(dtype)), TS_INSTANCE)
    assert "batch-dependent" in r.codes(), str(r)
    # float32's tolerance is float32's: the same roundoff there is a real difference ...
    r = check(_tabular_series(RoundingMixer("plain").eval()), TS_INSTANCE)
    assert "batch-dependent" in r.codes(), str(r)


class AutocastMixer(RoundingMixer):
    """float32 weights, computing in bfloat16 inside forward (torch.autocast)."""

    def forward(self, vitals, ecg):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return super().forward(vitals, ecg).float()


def test_a_model_that_computes_in_bfloat16_under_autocast_gets_bfloat16s_tolerance():
    """... unless the model computes below its weights' precision: its modules' outputs say so."""
    assert check(_tabular_series(AutocastMixer("plain").eval()), TS_INSTANCE).ok


class WithScripted(Mixer):
    """A TorchScript submodule, which takes no Python forward hooks."""

    def __init__(self):
        super().__init__("plain")
        self.b = torch.jit.script(nn.Linear(2, 4))


def test_a_model_with_a_torchscript_submodule_is_checked_and_left_without_hooks():
    model = WithScripted().eval()
    assert check(_tabular_series(model), TS_INSTANCE).ok
    assert not any(m._forward_hooks for m in model.modules()
                   if not isinstance(m, torch.jit.ScriptModule))


def test_a_model_failing_on_its_masked_inputs_is_reported_for_the_perturbation_stages():
    r = check(_tabular_series(Mixer("log").eval()), TS_INSTANCE)
    assert "masked-non-finite" in r.codes(), str(r)
    assert not r.stages["unimodal_perturbation"] and not r.stages["interaction_perturbation"]
    assert r.stages["representations"] and r.stages["interaction_gradient"]


def test_a_decision_layer_called_twice_is_reported_for_neurons_and_features():
    r = check(_tabular_series(Mixer("late").eval(), decision_layer="head"), TS_INSTANCE)
    assert "decision-calls" in r.codes(), str(r)
    assert "called 2 times" in str(r)
    assert not r.stages["representations"] and not r.stages["prediction"]
    assert r.stages["unimodal_gradient"] and r.stages["unimodal_perturbation"]


class Norm2d(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.tab, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, image, vitals):
        return self.head(self.bn(self.conv(image)).mean((2, 3)) * torch.tanh(self.tab(vitals)))


def test_check_runs_a_model_in_training_mode_as_the_kernels_do_and_leaves_it_unchanged():
    from multiviz_widgets import Tabular
    model = Norm2d()
    model.bn.running_mean.fill_(0.3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a = ModelAdapter(model, [Image("image", patch=4), Tabular("vitals", columns=["hr", "bp", "t"])],
                     ["a", "b"])
    with pytest.warns(UserWarning, match="training mode"):
        r = check(a, {"image": torch.rand(3, 8, 8), "vitals": [0.5, -1.0, 2.0]})
    assert r.ok, str(r)
    assert [f.code for f in r.warnings] == ["training-mode"]
    assert model.training and model.bn.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed"


def test_check_reports_an_embedding_layer_that_is_not_the_texts():
    """embedding_layers names the positional embedding: check() runs the substituted path and
    says that the perturbation and gradient stages cannot run (before, it said they could)."""
    from tests.test_adapter import TV_INSTANCE, text_vitals
    r = check(text_vitals(embedding_layers={"text": "pos"}), TV_INSTANCE)
    assert "embedding-substitution" in r.codes(), str(r)
    assert "pos (Embedding), was never called on the token ids of 'text'" in str(r)
    assert not r.stages["unimodal_perturbation"] and not r.stages["unimodal_gradient"]
    assert r.stages["representations"]
    for kind in ("cls", "inplace", "copied"):
        a = text_vitals(kind)
        rep = check(a, a.prepare(TV_INSTANCE))            # a Prepared instance, as kernels take
        assert rep.ok, (kind, str(rep))


def test_an_embedding_layer_the_model_never_calls_is_reported_once():
    model = Healthy()
    model.spare = nn.Embedding(len(VOCAB), 6)
    r = check(adapter(model, embedding_layers={"question": "spare"}), INSTANCE)
    assert len(r.errors) == 1, str(r)
    assert "spare (Embedding), was never called on the token ids of 'question'" in str(r)
    assert not r.stages["unimodal_gradient"] and r.stages["representations"]


def test_check_reports_an_embedding_module_that_cannot_embed_the_ids():
    from tests.test_adapter import TV_INSTANCE, Pooled, TextVitals, text_vitals

    class Raising(nn.Module):
        def forward(self, ids):
            raise RuntimeError("expected a float tensor")
    for module, words in [(Pooled(), "bag (Pooled), returned (1, 5)"),
                          (Raising(), "bag (Raising), raised RuntimeError")]:
        model = TextVitals().eval()
        model.bag = module
        a = ModelAdapter(model, list(text_vitals().modalities.values()), ["a", "b"],
                         embedding_layers={"text": "bag"})
        r = check(a, TV_INSTANCE)
        assert "embedding-layer" in r.codes() and words in str(r), str(r)
        assert not r.ok


def test_outputs_of_one_score_per_instance_are_reported_with_the_fix():
    from tests.test_adapter import outputs_adapter
    instance = {"tabular": torch.rand(4), "series": torch.rand(8, 2)}
    r = check(outputs_adapter("B", 1, ("n", "y", "z")), instance)
    assert "output-shape" in r.codes() and "class_names=[negative, positive]" in str(r), str(r)
    assert check(outputs_adapter("B", 1), instance).ok      # binary: one logit, two names


def test_a_model_that_fails_at_its_baseline_is_still_checked_for_the_rest():
    """check() returned at the non-finite baseline pass: the batch dependence and the detached
    modality below went unreported, and features and the prediction path read "yes"."""
    from multiviz_widgets import Tabular, TimeSeries

    class LogOfInputs(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.l, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, tab, ser):
            h = torch.tanh(self.l(torch.log(tab)))           # the zero baseline: -inf
            h = h - h.mean(0, keepdim=True)                  # statistics over the batch
            h = h * torch.log(tab).sum(1, keepdim=True).exp().clamp(max=1)
            return self.head(h + ser.detach().sum((1, 2))[:, None])   # series detached
    model = LogOfInputs().eval()
    a = ModelAdapter(model, [Tabular("tab", columns=["a", "b", "c"]),
                             TimeSeries("ser", window=2, channels=["x"])], ["n", "p"],
                     decision_layer=model.head)
    r = check(a, {"tab": [1.0, 2.0, 3.0], "ser": np.ones((4, 1), np.float32)})
    assert {"masked-non-finite", "batch-dependent", "no-gradient"} <= r.codes()
    assert not any(r.stages.values())
    assert "gradient and gradient x input do not" in str(r)


class HeadFirst(nn.Module):
    """The classifier registered before the fusion layer (registration order is not use)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.classifier = nn.Linear(6, 2)
        self.a, self.b = nn.Linear(3, 6), nn.Linear(2, 6)
        self.fuse = nn.Linear(6, 6)
        self.scale = scale

    def forward(self, vitals, ecg):
        h = torch.tanh(self.fuse(torch.tanh(self.a(vitals)) * torch.tanh(self.b(ecg.mean(1)))))
        return self.classifier(h) * self.scale


def test_the_default_decision_layer_is_the_one_with_an_output_per_class():
    adapter = _tabular_series(HeadFirst().eval())
    assert adapter.decision_layer is adapter.model.classifier
    assert check(adapter, TS_INSTANCE).ok


class MatmulHead(HeadFirst):
    """Logits from a matrix product with a parameter, not an nn.Linear: the default decision
    layer, the last nn.Linear, is the 6-wide fusion layer."""

    def __init__(self):
        super().__init__()
        del self.classifier
        self.w = nn.Parameter(torch.randn(6, 2))

    def forward(self, vitals, ecg):
        return torch.tanh(self.fuse(torch.tanh(self.a(vitals)) * torch.tanh(self.b(ecg.mean(1))))
                          ) @ self.w


def test_a_decision_layer_given_that_cannot_compute_the_logits_is_refused_at_construction():
    """Before: the adapter took fuse (6 outputs for 2 classes); only check() said so, and the
    Explorer, which never runs it, drew neuron bars and paths from fuse's weights."""
    with pytest.raises(AdapterError, match=r"fuse \(Linear\), has 6 outputs but class_names has "
                                           r"2 names") as e:
        _tabular_series(HeadFirst().eval(), decision_layer="fuse")
    assert e.value.code == "decision-not-logits"
    assert "one output per class, or 1 for a binary model" in str(e.value)
    assert "Pass decision_layer= the final nn.Linear" in str(e.value)
    assert "leave decision_layer out" in str(e.value)
    # the layer may be the final one, with class names of another length: that is said too
    with pytest.raises(AdapterError, match=r"If it is the model's final layer \(its outputs are "
                                           r"the logits\), class_names is what is wrong: give "
                                           r"one name per output \(2 names\)"):
        from multiviz_widgets import Tabular, TimeSeries
        ModelAdapter(HeadFirst().eval(), [Tabular("vitals", columns=["hr", "bp", "t"]),
                                          TimeSeries("ecg", window=5, channels=["a", "b"])],
                     ["a", "b", "c"], decision_layer="classifier")
    # the layers that can be the logits' are taken: one per class, a binary model's one logit
    assert _tabular_series(HeadFirst().eval(), decision_layer="classifier")
    one = ModelAdapter(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1)),
                       [Image("image")], ["no", "yes"], decision_layer="1")
    assert one.decision_layer.out_features == 1


def test_a_default_decision_layer_that_does_not_compute_the_logits_is_reported():
    """Before: the doctor said OK and the neuron bars used fuse's weights as the classes'."""
    adapter = _tabular_series(MatmulHead().eval())
    assert adapter.decision_layer is adapter.model.fuse
    r = check(adapter, TS_INSTANCE)
    assert "decision-not-logits" in r.codes() and not r.stages["prediction"], str(r)
    assert "6 -> 6" in str(r) and r.stages["representations"]
    scaled = check(_tabular_series(HeadFirst(scale=0.5).eval()), TS_INSTANCE)
    assert "decision-not-last" in scaled.codes() and scaled.ok, str(scaled)


class GatedHead(HeadFirst):
    """A 2-unit gate (as wide as the classes) registered after the classifier, used inside."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(3, 2)

    def forward(self, vitals, ecg):
        g = torch.sigmoid(self.gate(vitals)).mean(1, keepdim=True)
        return super().forward(vitals * g, ecg)


def test_a_default_decision_layer_that_is_not_the_classifier_is_an_error_naming_the_right_one():
    adapter = _tabular_series(GatedHead().eval())
    assert adapter.decision_layer is adapter.model.gate          # as wide as the classes
    r = check(adapter, TS_INSTANCE)
    assert "decision-not-logits" in r.codes() and not r.stages["prediction"], str(r)
    assert "Pass decision_layer='classifier'" in str(r)
    assert check(_tabular_series(GatedHead().eval(), decision_layer="classifier"),
                 TS_INSTANCE).ok


def test_a_table_column_read_through_an_integer_cast_is_named_for_perturbation_methods():
    """A categorical code looked up in an embedding (rec[:, 1].long()): its gradient is exactly
    0, yet it changes the logit; the modality as a whole has a gradient, so only a per-column
    check can tell."""
    from multiviz_widgets import Tabular, TimeSeries

    class Categorical(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.ward = nn.Embedding(5, 4)
            self.age, self.series = nn.Linear(1, 4), nn.Linear(2, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, record, vitals):
            r = torch.tanh(self.age(record[:, :1])) + self.ward(record[:, 1].long())
            return self.head(r * torch.tanh(self.series(vitals.mean(1))))

    a = ModelAdapter(Categorical().eval(), [Tabular("record", columns=["age", "ward"]),
                                            TimeSeries("vitals", window=4, channels=["hr", "bp"])],
                     ["home", "icu"])
    r = check(a, {"record": torch.tensor([0.5, 3.0]), "vitals": torch.rand(8, 2)})
    finding = next(f for f in r.findings if f.code == "step-columns")
    assert finding.severity == "warning" and "'ward'" in finding.message
    assert "'age'" not in finding.message and "occlusion" in finding.message
    assert "step-columns" not in check(adapter(Healthy()), INSTANCE).codes()


def test_a_column_saturated_at_the_instance_is_not_taken_for_a_step():
    """clamp(-1, 1) of a value of 4: zero gradient here, yet integrated gradients sees the
    column on the way to the baseline (0): no step warning."""
    from multiviz_widgets import Tabular, TimeSeries

    class Clamped(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.series, self.head = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, record, vitals):
            r = record.clamp(-1, 1)
            return self.head(r * torch.tanh(self.series(vitals.mean(1))))

    a = ModelAdapter(Clamped().eval(), [Tabular("record", columns=["dose", "age"]),
                                        TimeSeries("vitals", window=4, channels=["hr", "bp"])],
                     ["home", "icu"])
    r = check(a, {"record": torch.tensor([4.0, 0.5]), "vitals": torch.rand(8, 2)})
    assert "step-columns" not in r.codes(), str(r)


def _unknown(report):
    return [f for f in report.findings if f.code == "unknown-tokens"]


def test_text_that_is_mostly_unknown_tokens_is_a_warning_naming_the_words_and_the_cause():
    """A cased vocabulary with the lower-casing default tokenizer made 'What Colour is it'
    [UNK] [UNK] is it, and check() said OK with nothing to say: every explanation then scored
    [UNK], not the words."""
    cased = ["[PAD]", "[UNK]", "What", "Colour", "is", "it"]
    a = adapter(Healthy(), modalities=[Image("image", patch=4), Text("question", vocab=cased)])
    r = check(a, {"image": INSTANCE["image"], "question": "What Colour is it"})
    found = _unknown(r)
    assert r.ok and len(found) == 1 and found[0].severity == "warning", str(r)
    message = found[0].message
    assert "2 of the 4 tokens of 'question' are not in its vocabulary and become '[UNK]', " \
           "e.g. 'what', 'colour'" in message, message
    assert "The vocabulary is cased ('what' is there as 'What') and the default tokenizer " \
           "lower-cases the text: pass tokenize=" in message, message


def test_a_subword_vocabulary_read_as_whole_words_is_named_as_the_cause():
    pieces = ["[PAD]", "[UNK]", "what", "col", "##our", "##s"]
    a = adapter(Healthy(), modalities=[Image("image", patch=4), Text("question", vocab=pieces)])
    r = check(a, {"image": INSTANCE["image"], "question": "colour is it"})
    message = _unknown(r)[0].message
    assert "3 of the 3 tokens" in message and "'colour', 'is', 'it'" in message, message
    assert "subword one" in message and "tokenize=tokenizer.tokenize" in message, message


def test_words_outside_a_plain_vocabulary_get_the_generic_advice_and_few_unknowns_none():
    a = adapter(Healthy())
    message = _unknown(check(a, {"image": INSTANCE["image"],
                                 "question": "which vehicles park here"}))[0].message
    assert "4 of the 4 tokens" in message and "Check that tokenize= splits the text" in message
    # one unknown word in a few (a word the model never saw) is no sign of a mismatch
    for question in ("what colour is it", "what hue is it", "what is teal", "what x"):
        found = _unknown(check(a, {"image": INSTANCE["image"], "question": question}))
        assert not found, (question, found)
    # ids given as a tensor: the share counts, no words to name
    ids = {"image": INSTANCE["image"], "question": torch.tensor([1, 1, 2])}
    message = _unknown(check(a, ids))[0].message
    assert "2 of the 3 tokens" in message and "e.g." not in message, message
    # a pad that is also the unknown token (GPT-2's <|endoftext|>) is not counted as unknown
    same = ["<eos>", "what", "colour", "is", "it"]
    b = adapter(Healthy(), modalities=[Image("image", patch=4),
                                       Text("question", vocab=same, pad_token="<eos>",
                                            unk_token="<eos>")])
    padded = {"image": INSTANCE["image"], "question": torch.tensor([1, 2, 3, 0, 0, 0, 0])}
    assert not _unknown(check(b, padded))


# ---------------------------------------------------------------------------------------------
# second derivatives that vanish (a piecewise-linear model)
# ---------------------------------------------------------------------------------------------
class ReluHead(Healthy):
    """Concatenated image and question features, then ReLUs: piecewise linear in both inputs,
    so its second derivatives are 0 almost everywhere, though the modalities interact."""

    def __init__(self):
        super().__init__()
        self.fuse = nn.Linear(12, 8)

    def features(self, image, question):
        img = self.conv(image).mean((2, 3))
        return torch.relu(self.fuse(torch.cat([img, self.embedding(question).mean(1)], 1)))


class Difference(ScalarHead):
    """logit 1 = (t0 - s0)^2: its Hessian [[2, -2], [-2, 2]] is 0 along the ones direction."""

    def scalar(self, tabular, series):
        return (tabular[:, :1] - series.flatten(1)[:, :1]) ** 2


def _curvature(report):
    return [f for f in report.findings if f.code == "zero-second-derivatives"]


def test_a_relu_model_is_told_that_second_order_gradients_cannot_see_its_interactions():
    """Second-order gradients (the default interaction method) give a ReLU fusion head a matrix
    of zeros: check() says so at the instance it runs, and what to use instead."""
    r = check(adapter(ReluHead()), INSTANCE)
    found = _curvature(r)
    assert len(found) == 1 and found[0].severity == "warning", str(r)
    assert "piecewise linear" in found[0].message and "pairwise ablation" in found[0].message
    assert "Shapley" in found[0].message and r.ok and r.stages["interaction_gradient"]


def test_a_curved_model_gets_no_curvature_warning_even_when_its_hessian_cancels_on_ones():
    """The healthy model curves; (t0 - s0)^2 curves too, though its Hessian times the ones
    vector is 0: the check reads the Hessian along a random direction."""
    from multiviz_widgets import Tabular, TimeSeries
    assert not _curvature(check(adapter(Healthy()), INSTANCE))
    mods = [Tabular("tabular", columns=["a", "b"]), TimeSeries("series", window=1, channels=["x"])]
    a = ModelAdapter(Difference(), mods, ["k0", "k1"])
    r = check(a, {"tabular": torch.tensor([1.0, 0.5]), "series": torch.tensor([[-1.0], [2.0]])})
    assert not _curvature(r), str(r)


def test_check_refuses_what_is_not_an_adapter_and_says_to_wrap_the_model():
    """check("model", instance) raised AttributeError: 'str' object has no attribute 'model'."""
    for bad in ("model", Healthy()):
        with pytest.raises(AdapterError, match=rf"check needs a ModelAdapter, got "
                                               rf"{type(bad).__name__}: wrap the model in "
                                               r"ModelAdapter\(model, modalities, class_names\)"):
            check(bad, INSTANCE)
    with pytest.raises(AdapterError, match="arguments are swapped"):
        check(INSTANCE, adapter(Healthy()))


def test_a_model_of_one_output_is_told_what_explains_it_and_what_needs_two_classes():
    """A regression head (one output, one class name) read "prediction: yes" with nothing said,
    and a sparse model then blamed the model for predicting one class everywhere."""
    from multiviz_widgets import MultimodalDataset
    from multiviz_widgets.kernels.prediction import fit_sparse_model, fit_sparse_model_for
    a = adapter(Healthy(n_classes=1), class_names=["score"])
    report = check(a, INSTANCE)
    assert report.ok and all(report.stages[s] for s in STAGES)
    said = [f.message for f in report.warnings if f.code == "one-output"]
    assert len(said) == 1 and "one output ('score'), explained as a score" in said[0]
    assert "the EMAP gap, the interaction type, and a sparse linear model" in said[0]
    assert "one-output" not in check(adapter(Healthy()), INSTANCE).codes()
    ds = MultimodalDataset({"image": [torch.rand(3, 8, 8) for _ in range(4)],
                            "question": ["what colour is it"] * 4})
    words = r"one output \('score'\): a sparse linear model .* needs two or more"
    with pytest.raises(ValueError, match=words):
        fit_sparse_model_for(a, ds, cache=False)
    with pytest.raises(ValueError, match=words):
        fit_sparse_model((np.random.rand(8, 3), np.zeros(8, int)), class_names=["score"])


class PaddedEmbedding(Healthy):
    """The embedding keeps row 0 for padding, as a model trained with [PAD] at id 0 does."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(len(VOCAB), 6, padding_idx=0)


def test_a_vocabulary_whose_pad_token_is_not_the_models_padding_row_is_said():
    """A vocabulary listed as ["[UNK]", "[PAD]", ...] for a model trained with [PAD] at id 0:
    the 'pad' baseline used id 1's trained vector and check() said OK."""
    swapped = ["[UNK]", "[PAD]", *VOCAB[2:]]
    mods = [Image("image", patch=4), Text("question", vocab=swapped)]
    with pytest.warns(UserWarning, match=r"padding_idx=0.*'\[PAD\]' is id 1.*id 0 is '\[UNK\]'"):
        a = adapter(PaddedEmbedding(), modalities=mods)
    r = check(a, INSTANCE)
    assert "padding-idx" in r.codes() and "pad_token=" in str(r), str(r)
    assert str(r).startswith("Adapter check: OK (1 warning below)\n"), str(r)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        good = adapter(PaddedEmbedding())            # [PAD] at id 0: nothing to say
    assert "padding-idx" not in check(good, INSTANCE).codes()


class _AfterHead(nn.Module):
    """Two tabular inputs, a head of ``classes`` outputs, and ``after`` applied to its output
    (what a model does after its decision layer)."""

    def __init__(self, classes: int, after):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(2, 4), nn.Linear(2, 4)
        self.head, self.after = nn.Linear(8, classes), after

    def forward(self, x, y):
        return self.after(self.head(torch.cat([torch.tanh(self.a(x)), torch.tanh(self.b(y))], 1)))


def _check_after_head(classes: int, after, class_names):
    from multiviz_widgets import Tabular
    mods = [Tabular("x", columns=["x0", "x1"]), Tabular("y", columns=["y0", "y1"])]
    return check(ModelAdapter(_AfterHead(classes, after).eval(), mods, class_names,
                              decision_layer="head"), {"x": [0.1, -0.2], "y": [0.3, 0.4]})


def test_a_change_after_the_decision_layer_is_said_beside_a_guess_of_probabilities():
    """Outputs that happen to lie in [0, 1] get the guess 'binary-probability'; the change after
    the decision layer (halved, shifted) was then not said."""
    r = _check_after_head(1, lambda z: z / 2.0 + 0.9, ["no", "yes"])
    assert {"binary-probability", "decision-not-last"} <= r.codes(), str(r)


def test_a_softmax_after_the_decision_layer_gets_only_its_own_fix():
    """softmax(head(h)), the usual mistake, also got 'pass decision_layer= the last module that
    computes the logits', which has no answer: there is no later layer."""
    r = _check_after_head(3, lambda z: torch.softmax(z, 1), ["a", "b", "c"])
    assert "probabilities" in r.codes() and "decision-not-last" not in r.codes(), str(r)


# -- baselines against the data ----------------------------------------------------------------
class VitalsAndPressure(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(40, 4), nn.Linear(8, 2)

    def forward(self, vitals, bp):
        return self.head(torch.tanh(torch.cat([self.a(vitals), self.b(bp.flatten(1))], 1)))


def _vitals_data(n: int = 60, nan: bool = False):
    """Raw-scale columns (age in years, a lab value near 1e-4, a 0/1 flag) and a pressure
    channel near 120 beside a standardised one."""
    from multiviz_widgets import MultimodalDataset
    rng = np.random.default_rng(0)
    rows = np.stack([rng.uniform(18, 90, n), rng.uniform(1e-5, 2e-4, n),
                     rng.integers(0, 2, n)], 1).astype(np.float32)
    if nan:
        rows[3, 0] = np.nan
    series = [np.stack([rng.normal(120, 10, 20), rng.normal(0, 1, 20)], 1).astype(np.float32)
              for _ in range(n)]
    return MultimodalDataset({"vitals": list(rows), "bp": series}, labels=[i % 2 for i in range(n)])


def _vitals_adapter(**tabular):
    from multiviz_widgets import Tabular, TimeSeries
    return ModelAdapter(VitalsAndPressure().eval(),
                        [Tabular("vitals", columns=["age", "lab", "flag"], **tabular),
                         TimeSeries("bp", window=5, channels=["sys", "z"],
                                    baseline="mean" if tabular else "zero")], ["a", "b"])


def test_a_baseline_outside_the_datas_values_is_said_with_the_fix():
    """Tabular's default baseline sets a removed age to 0 years against ages of 18 to 90 (and a
    series' to a pressure of 0): every removal method then measures the model on values it
    never saw. Neither the README nor the views said what a removed column became."""
    from multiviz_widgets.doctor import check_baselines
    tab, ser = check_baselines(_vitals_adapter(), _vitals_data())
    assert tab.startswith("Tabular 'vitals': a removed column is set to its baseline ('zero', "
                          "the default), which lies outside the data's values for 1 of 3 "
                          "columns: 'age' (0 against 18.") and "(from 60 instances)" in tab
    assert "'lab'" not in tab and "'flag'" not in tab      # 0 within half a spread, or a value
    assert "baseline='mean', means=" in tab
    assert ser.startswith("TimeSeries 'bp': a removed window is set to its baseline ('zero', "
                          "the default), which lies outside the data's values for 1 of 2 "
                          "channels: 'sys' (0 against ") and "baseline='mean')" in ser
    # the fix said: nothing more to say (a NaN in a column, and the NaN row refused, too)
    means = dict(zip(["age", "lab", "flag"], [54.0, 1e-4, 0.5]))
    assert check_baselines(_vitals_adapter(baseline="mean", means=means), _vitals_data()) == []
    assert len(check_baselines(_vitals_adapter(), _vitals_data(nan=True))) == 2
    # one instance: its columns have no spread to be outside of; its series' steps have
    [one] = check_baselines(_vitals_adapter(), _vitals_data(n=1))
    assert one.startswith("TimeSeries 'bp'")


def test_the_explorer_says_a_baseline_outside_the_data_beside_its_views(tmp_path, monkeypatch):
    from multiviz_widgets.explorer import Explorer
    monkeypatch.setenv("MULTIVIZ_CACHE", str(tmp_path / "cache"))
    ex = Explorer(_vitals_adapter(), _vitals_data(), delay=0.0,
                  method_params={"interaction_type": {"n_reference": 0}})
    try:
        assert ex.wait(60)
        said = [line for line in ex.state()["notices"] if line.startswith("baselines: ")]
        assert [line.split(": ")[1].split(" ")[0] for line in said] == ["Tabular", "TimeSeries"]
    finally:
        ex.close()
    ok = Explorer(_vitals_adapter(baseline="mean", means=[54.0, 1e-4, 0.5]), _vitals_data(),
                  delay=0.0, method_params={"interaction_type": {"n_reference": 0}})
    try:
        assert ok.wait(60)
        assert not [line for line in ok.state()["notices"] if line.startswith("baselines")]
    finally:
        ok.close()
