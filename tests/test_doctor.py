"""The adapter doctor: a healthy model passes; each broken adapter gets a clear, actionable message."""
import pytest
import torch
from torch import nn

from multiviz_widgets import AdapterError, Image, ModelAdapter, Text
from multiviz_widgets.doctor import STAGES, check

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
    def forward(self, question, image):
        return super().forward(image, question)


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


def test_training_mode_with_dropout_is_an_error():
    r = check(adapter(Healthy(dropout=0.5).train(), eval=False), INSTANCE)
    assert "training-mode" in r.codes() and not r.ok
    assert "model.eval()" in r.errors[0].message


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
