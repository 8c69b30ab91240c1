"""The adapter doctor: run the model once and say which stages it supports, and why not.

``check(adapter, instance)`` never raises for a broken model: it returns a ``Report`` whose
findings each say what is wrong and how to fix it. ``report.ok`` is False when any error was
found; ``report.stages`` maps every stage to whether it can run.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .adapter import AdapterError, ModelAdapter

STAGES = (
    "unimodal_gradient",       # gradient, grad x input, integrated gradients
    "unimodal_perturbation",   # occlusion, LIME, KernelSHAP
    "interaction_gradient",    # second-order gradients
    "interaction_perturbation",  # pairwise ablation, Shapley interactions, EMAP, DIME
    "representations",         # decision-level features (stage 3)
    "prediction",              # sparse linear model and prediction path (stage 4)
)

_ALL = STAGES
_GRADIENT = ("unimodal_gradient", "interaction_gradient")
_FEATURES = ("representations", "prediction")


@dataclass
class Finding:
    severity: str          # "error" or "warning"
    code: str              # a stable identifier, e.g. "output-shape"
    message: str           # what is wrong and how to fix it
    stages: tuple[str, ...] = ()   # the stages it rules out (errors only)

    def __str__(self) -> str:
        return f"[{self.severity}] {self.message}"


@dataclass
class Report:
    """What check() found: findings, and for every stage whether it is supported."""

    findings: list[Finding] = field(default_factory=list)
    stages: dict[str, bool] = field(default_factory=lambda: {s: True for s in STAGES})
    n_classes: int | None = None
    n_features: int | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    def add(self, severity: str, code: str, message: str, stages=()) -> None:
        self.findings.append(Finding(severity, code, message, tuple(stages)))
        if severity == "error":
            for s in stages:
                self.stages[s] = False

    def __str__(self) -> str:
        lines = ["Adapter check: " + ("OK" if self.ok else f"{len(self.errors)} problem(s)")]
        for s in STAGES:
            lines.append(f"  {'yes' if self.stages[s] else 'no ':3}  {s}")
        lines += [f"  - {f}" for f in self.findings]
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        """Raise AdapterError with every error message when the check failed."""
        if not self.ok:
            raise AdapterError("\n".join(f.message for f in self.errors))


def check(adapter: ModelAdapter, instance) -> Report:
    """Run the model on one instance and report which stages are supported (cost: ~4 passes)."""
    report = Report()
    model = adapter.model

    # 1. The instance fits the modalities.
    try:
        prepared = adapter.prepare(instance)
    except (AdapterError, ValueError, TypeError) as e:
        report.add("error", "instance", f"The instance does not fit the adapter: {e}", _ALL)
        return report

    # 2. Training mode with active dropout makes every explanation random.
    dropouts = [m for m in model.modules()
                if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and m.training]
    if dropouts:
        report.add("error", "training-mode",
                   f"The model is in training mode with {len(dropouts)} active dropout layer(s), so "
                   "every forward pass differs and explanations are noise. Call model.eval() "
                   "before wrapping it.", _ALL)
    elif model.training:
        report.add("warning", "training-mode",
                   "The model is in training mode (batch norm uses batch statistics); call "
                   "model.eval() before explaining it.")

    # 3. One forward pass: output shape, finiteness, logits vs probabilities, decision layer.
    shapes = ", ".join(f"{n}: {tuple(v.shape)}" for n, v in prepared.raw.items())
    calls = {}
    handles = [adapter.decision_layer.register_forward_pre_hook(
        lambda m, i: calls.__setitem__("decision", calls.get("decision", 0) + 1))]
    for n, emb in adapter.embedding_layers.items():
        handles.append(emb.register_forward_hook(
            lambda m, i, o, n=n: calls.__setitem__(n, calls.get(n, 0) + 1)))
    try:
        with torch.no_grad():
            out = model(**prepared.raw) if adapter.keyword_inputs else model(*prepared.raw.values())
    except Exception as e:  # the user's model can raise anything
        report.add("error", "forward",
                   f"The model raised {type(e).__name__} on inputs of shapes ({shapes}): {e}. Check "
                   "that the modalities are listed in the order of the model's arguments and that "
                   "each modality produces the shape the model expects.", _ALL)
        return report
    finally:
        for h in handles:
            h.remove()
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        report.add("warning", "tuple-output",
                   "The model returns a tuple; its first element is taken as the logits.")
        out = out[0]
    if not isinstance(out, torch.Tensor):
        report.add("error", "output-type",
                   f"The model returned {type(out).__name__}; it must return a tensor of logits "
                   "[batch, classes].", _ALL)
        return report
    if out.dim() != 2 or out.shape[0] != 1:
        report.add("error", "output-shape",
                   f"The model returned shape {tuple(out.shape)} for a batch of one; it must "
                   f"return 2-D logits [batch, classes] = [1, {adapter.n_classes}].", _ALL)
        return report
    report.n_classes = int(out.shape[1])
    if out.shape[1] != adapter.n_classes:
        report.add("error", "class-count",
                   f"The model returns {out.shape[1]} logits but class_names has "
                   f"{adapter.n_classes} names; give one name per logit.", _ALL)
    if not torch.isfinite(out).all():
        report.add("error", "non-finite",
                   "The model's output contains NaN or infinity for this instance; check the "
                   "input scaling and the model's numerics.", _ALL)
        return report
    row = out[0]
    if (row >= 0).all() and (row <= 1).all() and abs(float(row.sum()) - 1) < 1e-4:
        report.add("warning", "probabilities",
                   "The output looks like probabilities (in [0, 1], summing to 1). Explanations "
                   "should target pre-softmax logits: remove the final softmax from forward().")
    if calls.get("decision", 0) == 0:
        report.add("error", "decision-layer",
                   f"The decision layer ({type(adapter.decision_layer).__name__}) was never called "
                   "in the forward pass: pass decision_layer= the module that computes the logits "
                   "from the decision-level features.", _FEATURES)
    else:
        with torch.no_grad():
            _, h = adapter.features(prepared.raw)
        if h.dim() != 2:
            report.add("error", "decision-input",
                       f"The decision layer's input has shape {tuple(h.shape)}; it must be "
                       "[batch, features] so that each feature is a neuron.", _FEATURES)
        else:
            report.n_features = int(h.shape[1])
        if not isinstance(adapter.decision_layer, nn.Linear):
            report.add("warning", "decision-not-linear",
                       "The decision layer is not an nn.Linear: neuron contributions W[c, j] h_j "
                       "and the prediction path use the sparse linear model instead.")
    for n in adapter.embedding_layers:
        if calls.get(n, 0) == 0:
            report.add("error", "embedding-unused",
                       f"The embedding layer given for {n!r} was never called in the forward "
                       f"pass: pass embedding_layers={{'{n}': <the module that embeds {n}>}}.",
                       _GRADIENT)

    # 4. Determinism: two passes must agree.
    with torch.no_grad():
        again = adapter.forward(prepared.raw)
    if not torch.allclose(again, out, atol=1e-5, rtol=1e-4) and "training-mode" not in report.codes():
        report.add("error", "nondeterministic",
                   "Two forward passes on the same input gave different logits; remove randomness "
                   "from forward() (dropout, sampling) or call model.eval().", _ALL)

    # 5. Gradients reach every modality (through the embedding for text).
    if report.stages["unimodal_gradient"]:
        _check_gradients(adapter, prepared, report, int(out[0].argmax()))
    return report


def _check_gradients(adapter: ModelAdapter, prepared, report: Report, target: int) -> None:
    cont = {n: v.unsqueeze(0).clone().requires_grad_(True) for n, v in prepared.continuous.items()}
    try:
        logits = adapter.forward(prepared.raw, cont)
        grads = torch.autograd.grad(logits[0, target], list(cont.values()), allow_unused=True)
    except RuntimeError as e:
        report.add("error", "no-gradient",
                   f"Back-propagation failed ({e}); gradient methods need a differentiable model "
                   "(no .detach(), .numpy() or torch.no_grad() inside forward).", _GRADIENT)
        return
    for (n, x), g in zip(cont.items(), grads):
        if g is None or not torch.any(g != 0):
            where = ("its embedding layer's output" if n in adapter.embedding_layers
                     else "its input")
            report.add("error", "gradient-not-reached" if n in adapter.embedding_layers
                       else "no-gradient",
                       f"No gradient reaches modality {n!r} through {where}: the model detaches "
                       "it or ignores it. For text, make sure embedding_layers names the layer "
                       "whose output the model uses (not a copy), and that forward() does not "
                       "detach it.", _GRADIENT)
    try:
        logits = adapter.forward(prepared.raw, cont)
        g = torch.autograd.grad(logits[0, target], list(cont.values()), create_graph=True,
                                allow_unused=True)
        s = sum((gi.sum() for gi in g if gi is not None and gi.requires_grad), torch.zeros(()))
        if s.requires_grad:
            torch.autograd.grad(s, list(cont.values()), allow_unused=True)
    except RuntimeError as e:
        report.add("error", "no-double-backward",
                   f"Second-order gradients are not available ({e}); use the perturbation "
                   "interaction methods (pairwise ablation, Shapley) instead.",
                   ("interaction_gradient",))
