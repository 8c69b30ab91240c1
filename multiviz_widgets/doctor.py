"""The adapter doctor: run the model once and say which stages it supports, and why not.

``check(adapter, instance)`` never raises for a broken model: it returns a ``Report`` whose
findings each say what is wrong and how to fix it. ``report.ok`` is False when any error was
found; ``report.stages`` maps every stage to whether it can run.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .adapter import (AdapterError, ModelAdapter, Prepared, class_name, masked_logits_hint,
                      padding_mismatch)
from .kernels.common import math_attention
from .kernels.interactions import ROUNDING_EPS
from .modalities import _SPECIAL_LOOK, Text, _other_specials, special_spans
from .precision import outputs_differ, roundoff_eps, watched_pass

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
_PERTURBATION = ("unimodal_perturbation", "interaction_perturbation")
#: stages whose kernels replace the continuous inputs (text: the embedding layer's output)
_CONTINUOUS = _GRADIENT + _PERTURBATION
#: stages that evaluate the model with units at their baselines (integrated gradients too)
_MASKED = _PERTURBATION + ("unimodal_gradient",)


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
        n = len(self.warnings)
        warned = f" ({n} warning{'s' if n > 1 else ''} below)" if n else ""
        lines = ["Adapter check: " + ("OK" if self.ok else f"{len(self.errors)} problem(s)")
                 + warned]
        for s in STAGES:
            lines.append(f"  {'yes' if self.stages[s] else 'no ':3}  {s}")
        lines += [f"  - {f}" for f in self.findings]
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        """Raise AdapterError with every error message when the check failed."""
        if not self.ok:
            raise AdapterError("\n".join(f.message for f in self.errors))


def check(adapter: ModelAdapter, instance) -> Report:
    """Run the model on one instance (a dict, or a ``Prepared`` one as the kernels take) and
    report which stages are supported (cost: about 9 passes of a batch of one). The passes run
    as the kernels run them: in eval mode, under the adapter's lock; the model is left as it was.
    """
    if not isinstance(adapter, ModelAdapter):
        swapped = (" (the arguments are swapped: the adapter comes first)"
                   if isinstance(instance, ModelAdapter) else "")
        raise AdapterError(
            f"check needs a ModelAdapter, got {type(adapter).__name__}{swapped}: wrap the model "
            f"in ModelAdapter(model, modalities, class_names) and call check(adapter, instance).")
    report = Report()
    model = adapter.model

    # 1. The instance fits the modalities (and the embedding layers take the token ids).
    try:
        prepared = instance if isinstance(instance, Prepared) else adapter.prepare(instance)
    except Exception as e:  # noqa: BLE001 -- a user's modality or embedding layer can raise anything
        # only an AdapterError's code is a finding code (other errors may carry an HTTP or OS
        # code); the type of any other error is named, as its text alone may be just a key
        code = e.code if isinstance(e, AdapterError) else "adapter"
        if code == "adapter":
            text = str(e) if isinstance(e, (AdapterError, ValueError, TypeError)) else \
                f"{type(e).__name__}: {e}"
            report.add("error", "instance", f"The instance does not fit the adapter: {text}", _ALL)
        else:
            report.add("error", code, str(e), _ALL)
        return report

    # (a text's padding row other than its vocabulary's pad token: said when the adapter was
    # made, and here, where a user looks for what is wrong)
    for name, layer in adapter.embedding_layers.items():
        mismatch = padding_mismatch(model, adapter.modalities[name], layer)
        if mismatch:
            report.add("warning", "padding-idx", mismatch)

    # 2. Training mode (of the model, or of its dropout / batch norm layers after model.eval()
    # and sub.train()): the kernels run the model in eval mode; say so.
    dropouts = [m for m in model.modules()
                if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and m.training]
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._NormBase) and m.training]
    what = [f"{len(dropouts)} active dropout layer(s)"] if dropouts else []
    what += ["batch norm, which would use batch statistics and update its running ones"
             ] if norms else []
    fix = ("Every explanation called from your code (and this check) runs it in eval mode "
           "and restores its mode afterwards, but the Explorer refuses it (it computes beside "
           "your cells, where switching modes would race them): call model.eval() before "
           "wrapping it so that what is explained is the model you evaluate.")
    if model.training:
        what = (f"with {' and '.join(what)}" if what else
                "(no dropout or batch norm module in it is active; attention or recurrent "
                "layers' dropout, or its own code reading self.training, may still act on it)")
        report.add("warning", "training-mode", f"The model is in training mode {what}. {fix}")
    elif what or any(m.training for m in model.modules()):
        layers = dropouts + norms or [m for m in model.modules() if m.training]
        names = [_module_name(model, m) for m in layers]
        with_what = (f"with {' and '.join(what)}" if what else
                     "(attention or recurrent layers' dropout, or their own code reading "
                     "self.training, may act on it)")
        report.add("warning", "training-submodule",
                   f"The model is in eval mode but its submodule(s) {', '.join(names[:5])} are in "
                   f"training mode (a .train() call on a part of the model after model.eval()), "
                   f"{with_what}. {fix}")
    _check_unknown_tokens(adapter, prepared, report)
    _check_special_words(adapter, prepared, None if instance is prepared else instance, report)
    with adapter._lock, adapter._eval_mode():
        _check_passes(adapter, prepared, report)
    return report


#: the share of a text's tokens that may be unknown to its vocabulary before check() warns
_UNKNOWN_SHARE = 0.5
#: how subword vocabularies mark a token's position in a word: WordPiece continues a word with
#: '##', SentencePiece starts one with '▁', byte-level BPE (GPT-2, RoBERTa) with 'Ġ'
_SUBWORD_MARKS = ("##", "\u2581", "\u0120")


def _check_unknown_tokens(adapter: ModelAdapter, prepared, report: Report) -> None:
    """A warning for each text modality of which most tokens (at least two, or all) are the
    vocabulary's unknown token: the model reads them all as one token and every explanation
    scores that token, not the words. Nothing fails, so nothing else would say it; the usual
    causes are a tokenizer that does not match the vocabulary (a cased vocabulary with the
    lower-casing default tokenizer, a subword vocabulary split into words)."""
    for name, m in adapter.modalities.items():
        if not isinstance(m, Text):
            continue
        every = prepared.raw[name].reshape(-1).tolist()
        ids = [v for v in every if v != m.pad_id]
        # positions among all the ids (the labels' positions), pads wherever they are skipped
        # (a pad that is also the unknown token, GPT-2's <|endoftext|>, is a pad)
        unknown = [i for i, v in enumerate(every) if v == m.unk_id and v != m.pad_id]
        if not unknown or not (len(unknown) == len(ids) or (
                len(unknown) >= 2 and len(unknown) >= _UNKNOWN_SHARE * len(ids))):
            continue
        labels = prepared.labels.get(name, [])
        words = list(dict.fromkeys(labels[i] for i in unknown if i < len(labels)
                                   and labels[i] != m.unk_token))
        shown = f", e.g. {', '.join(map(repr, words[:5]))}" if words else ""
        report.add("warning", "unknown-tokens",
                   f"{len(unknown)} of the {len(ids)} tokens of {name!r} are not in its "
                   f"vocabulary and become {m.unk_token!r}{shown}: the model reads them all as "
                   f"the same token, and every explanation scores {m.unk_token!r}, not the "
                   f"words. {_unknown_cause(m, words)}")


def _check_special_words(adapter: ModelAdapter, prepared, instance, report: Report) -> None:
    """A warning for each text modality whose text holds words that look like special tokens
    ([CLS], <s>: ``_SPECIAL_LOOK``) but are not in its vocabulary, at any share of the tokens:
    a token of the tokenizer that becomes the unknown one, or a word written in the text,
    which the default tokenizer splits ([CLS] becomes 'cls'); the model never reads them as
    the special token, and their units are labelled with what was written. And one when the
    text writes out the padding token, read as padding, which a model that masks it ignores.
    instance: the raw inputs (None for a Prepared one: then the tokens alone are read)."""
    for name, m in adapter.modalities.items():
        if not isinstance(m, Text):
            continue
        every = prepared.raw[name].reshape(-1).tolist()
        labels = prepared.labels.get(name, [])
        words = [w for w, v in zip(labels, every) if v == m.unk_id and v != m.pad_id
                 and w != m.unk_token and _SPECIAL_LOOK.fullmatch(w)]
        text = instance.get(name) if isinstance(instance, Mapping) else None
        if not isinstance(text, str):
            text = ""
        # written in the text, for the default tokenizer, which keeps a vocabulary's special
        # tokens whole only where it has some besides its padding and unknown ones; where it
        # has none, a word in brackets ("[the]") or an HTML tag ("<b>") is text
        specials = _other_specials(m)
        default = m._tokenize is None
        # whether the tokenizer reads a vocabulary token written in the text as itself: the
        # default one where the vocabulary has other special tokens; one of the user's own as
        # its output says
        whole = ((lambda w: specials) if default else (lambda w: _tokens_of(m, w) == [w]))
        words += [w.group() for w in _SPECIAL_LOOK.finditer(text)
                  if (w.group() not in m.token_to_id or not whole(w.group()))
                  and (specials or _special_not_text(w.group(), m))]
        if words:
            words = list(dict.fromkeys(words))[:5]
            read = "; ".join(f"{w!r} is read as {_read_as(m, w)}" for w in words)
            folded = {t.casefold(): t for t in m.vocab if _SPECIAL_LOOK.fullmatch(t)}
            cased = [(w, folded[w.casefold()]) for w in words
                     if w.casefold() in folded and folded[w.casefold()] != w]
            split = [w for w in words if w in m.token_to_id]     # in it, but split up
            fix = (f"The vocabulary spells {cased[0][0]!r} as {cased[0][1]!r}: write it so "
                   "(special tokens are matched as spelt)." if cased else
                   f"The tokenizer splits {split[0]!r}, which the vocabulary holds: keep the "
                   f"vocabulary's special tokens whole in tokenize= (or leave them out of the "
                   f"text)." if split and not default else
                   "Leave them out of the text, or write the vocabulary's own special tokens "
                   "(a token it lacks has no embedding the model was trained with).")
            report.add("warning", "special-tokens",
                       f"The text of {name!r} holds {', '.join(map(repr, words))}, which look "
                       f"like special tokens but are not read as one of its vocabulary: "
                       f"{read}, not as the special token the model may expect. {fix}")
        written = ([text[a:b] for a, b in special_spans(text, m.token_to_id)] if specials
                   else []) if default else _tokens_of(m, text)
        if m.pad_token in written and m.pad_id != m.unk_id:
            report.add("warning", "special-tokens",
                       f"The text of {name!r} writes out the padding token {m.pad_token!r}, "
                       f"read as padding (id {m.pad_id}): a model that masks padding ignores "
                       "it, and its explanations score it near zero. Leave it out unless the "
                       "model was trained on texts padded so.")


def _special_not_text(word: str, m: Text) -> bool:
    """Whether a special-looking word of a text (``_SPECIAL_LOOK``) is meant as a special token
    where the vocabulary has none: not an HTML tag (<b>, </i>: angle brackets without bars),
    and not a word of the vocabulary in brackets ([the])."""
    if word.casefold() in (m.pad_token.casefold(), m.unk_token.casefold()):
        return True
    if word.startswith("<") and not word.startswith("<|"):
        return False
    return word.strip("[]<>|/").lower() not in m.token_to_id


def _tokens_of(m: Text, text: str) -> list[str]:
    """The tokens the modality's tokenizer makes of a text ([] when it raises: said elsewhere)."""
    try:
        return list(m.tokenize(text))
    except Exception:  # noqa: BLE001 -- a user's tokenizer can raise anything
        return []


def _read_as(m: Text, word: str) -> str:
    """What the tokenizer of m makes of a word outside its vocabulary: its tokens, those
    outside the vocabulary marked as the unknown token."""
    try:
        toks = m.tokenize(word)
    except Exception:  # noqa: BLE001 -- a user's tokenizer can raise anything
        toks = [word]
    return " ".join(repr(t) if t in m.token_to_id and t != m.unk_token
                    else f"{t!r} ({m.unk_token})" for t in toks) or "nothing (dropped)"


def _unknown_cause(m: Text, words: list[str]) -> str:
    """The likely reason why the words are not in the vocabulary of m, and its fix."""
    folded = {}
    for tok in m.vocab:
        folded.setdefault(tok.casefold(), tok)
    cased = [(w, folded[w.casefold()]) for w in words if w.casefold() in folded]
    if cased:
        word, tok = cased[0]
        how = ("the default tokenizer lower-cases the text" if m._tokenize is None else
               "the tokenizer gives another case")
        return (f"The vocabulary is cased ({word!r} is there as {tok!r}) and {how}: pass "
                f"tokenize= the tokenizer the vocabulary was made with (e.g. "
                f"tokenize=str.split keeps the case, or a HuggingFace tokenizer's "
                f"tokenize=tokenizer.tokenize).")
    if any(tok.startswith(_SUBWORD_MARKS) for tok in m.vocab):
        return ("The vocabulary is a subword one (WordPiece, SentencePiece or BPE pieces), "
                "which whole words do not match: pass tokenize=tokenizer.tokenize, the "
                "tokenizer the vocabulary was made with.")
    return ("Check that tokenize= splits the text as the vocabulary's tokens were made (case, "
            "punctuation, subwords) and that vocab is the one the model was trained with; "
            "words the model never saw are expected to be unknown.")


def _module_name(model: nn.Module, module: nn.Module) -> str:
    name = next((n for n, m in model.named_modules() if m is module), "")
    return f"{name or 'the model'} ({type(module).__name__})"


def _attempt(report: Report, code: str, stages, what: str, fn):
    """fn(), or None with an error finding ``code`` (``what``: the message's start) when it
    raises; an AdapterError's own code and message are kept."""
    try:
        return fn()
    except AdapterError as e:
        report.add("error", e.code if e.code not in ("adapter", "forward") else code,
                   f"{what}: {e}", stages)
    except Exception as e:  # noqa: BLE001 -- the user's model can raise anything
        report.add("error", code, f"{what}: the model raised {type(e).__name__}: {e}", stages)
    return None


def _check_passes(adapter: ModelAdapter, prepared, report: Report) -> None:
    # 3. One forward pass: output shape, finiteness, logits vs probabilities, decision layer.
    shapes = ", ".join(f"{n}: {tuple(v.shape)}" for n, v in prepared.raw.items())
    calls = {}
    count = (lambda key: lambda *_: calls.__setitem__(key, calls.get(key, 0) + 1))
    handles = [adapter.decision_layer.register_forward_pre_hook(count("decision"))]
    try:
        with torch.no_grad():
            # (copies: a model writing into its input through .numpy() would change the
            # instance, and the second pass below would call it nondeterministic)
            raw_out = adapter._call_model(adapter.model_inputs(prepared.raw))
    except Exception as e:  # noqa: BLE001 -- the user's model can raise anything
        report.add("error", "forward", str(e) if isinstance(e, AdapterError) else
                   f"The model raised {type(e).__name__} on inputs of shapes ({shapes}): {e}. "
                   "Check that the modalities are listed in the order of the model's arguments "
                   "and that each modality produces the shape the model expects.", _ALL)
        return
    finally:
        for h in handles:
            h.remove()
    if isinstance(raw_out, (tuple, list)) and raw_out and isinstance(raw_out[0], torch.Tensor):
        report.add("warning", "tuple-output",
                   "The model returns a tuple; its first element is taken as the logits.")
    first = raw_out[0] if isinstance(raw_out, (tuple, list)) and raw_out else raw_out
    if isinstance(first, torch.Tensor) and first.dim() == 2:
        report.n_classes = int(first.shape[1])
    try:
        out = adapter.as_logits(raw_out, next(iter(prepared.raw.values())).shape[0])
    except AdapterError as e:
        report.add("error", e.code, str(e), _ALL)
        return
    if not torch.isfinite(out).all():
        report.add("error", "non-finite",
                   "The model's output contains NaN or infinity for this instance; check the "
                   "input scaling and the model's numerics." + masked_logits_hint(out), _ALL)
        return
    row = out[0]
    if (row >= 0).all() and (row <= 1).all() and abs(float(row.sum()) - 1) < 1e-4:
        report.add("warning", "probabilities",
                   "The output looks like probabilities (in [0, 1], summing to 1). Explanations "
                   "should target pre-softmax logits: remove the final softmax from forward().")
    eps = roundoff_eps(adapter, prepared.raw, out)      # the precision it computes in
    if adapter.is_binary_logit(first, out.shape[0]):
        _check_binary_output(adapter, prepared, report, first.reshape(-1), eps)
    if adapter.n_classes == 1:
        report.add("warning", "one-output", ONE_OUTPUT.format(name=adapter.class_names[0]))
    after_layer = _check_decision_layer(adapter, prepared, report, calls.get("decision", 0), eps)
    # an embedding layer never called on its text's ids is reported (once) by step 5's
    # substitution check, which names the layer and what it must be

    # 4. Determinism: two passes must agree.
    again = _attempt(report, "nondeterministic", _ALL, "A second forward pass failed",
                     lambda: adapter.predict(prepared.raw))
    random = again is not None and outputs_differ(again, out, eps)
    # (a random model's logits differ for randomness alone, and a sigmoid found after the
    # layer is said already, with its own fix: remove it; the warnings that outputs look like
    # probabilities are guesses from their range, beside which this one still says something)
    if after_layer and not random and "sigmoid-output" not in report.codes():
        report.add("warning", "decision-not-last", after_layer)
    if random:
        report.add("error", "nondeterministic",
                   "Two forward passes on the same input gave different logits; remove randomness "
                   "from forward() (dropout, sampling).", _ALL)
    # (the comparisons below would then fail for that randomness alone, with wrong advice: the
    # passes still run, to find the errors they raise)

    # 5. The kernels' paths: the continuous inputs put in give the model's own output; the
    # instance with every unit removed runs; a batch of two gives what two batches of one give.
    cont = {n: v[None] for n, v in prepared.continuous.items()}
    base = {n: v[None] for n, v in prepared.baseline.items()}
    sub = _attempt(report, "embedding-substitution", _CONTINUOUS,
                   "Putting the continuous inputs in (as every kernel does) failed",
                   lambda: adapter.predict(prepared.raw, cont))
    if sub is not None and not random and outputs_differ(sub, out, eps):
        report.add("error", "embedding-substitution",
                   f"Putting the instance's own continuous inputs in gives logits "
                   f"{sub[0].tolist()} where the model gives {out[0].tolist()}: the kernels "
                   "would explain another input. For text, embedding_layers must name the layer "
                   "whose output on the token ids the model uses as it is.", _CONTINUOUS)
    if sub is None:
        return
    masked = _attempt(report, "masked-forward", _MASKED,
                      "The model fails on the instance with every unit at its baseline (as "
                      "occlusion, LIME, SHAP and integrated gradients evaluate it; gradient and "
                      "gradient x input do not)",
                      lambda: adapter.predict(prepared.raw, base))
    masked_usable = masked is not None and bool(torch.isfinite(masked).all())
    if masked is not None and not masked_usable:
        report.add("error", "masked-non-finite",
                   "The model's output is NaN or infinite on the instance with every unit at its "
                   "baseline (as occlusion, LIME, SHAP and integrated gradients evaluate it; "
                   "gradient and gradient x input do not); choose another baseline for the "
                   "modalities or guard the model's numerics (sqrt, log, division) against such "
                   "inputs.", _MASKED)
    # the batch check needs a second row the model can evaluate: the baseline, or else the
    # point halfway to it (the other checks go on either way: a failure here must not leave
    # the stages it does not concern at "yes" unchecked)
    second, second_out = (base, masked) if masked_usable else _halfway(adapter, prepared, cont,
                                                                        base)
    if second is None:
        report.add("warning", "batch-unchecked",
                   "Whether the model treats the rows of a batch independently could not be "
                   "checked: it gives no finite output at the baseline nor halfway to it.")
    else:
        pair = _attempt(report, "batch-dependent", _ALL, "A batch of two instances failed",
                        lambda: adapter.predict(prepared.raw, {n: torch.cat([cont[n], second[n]])
                                                               for n in cont}))
        alone = torch.cat([sub, second_out])
        if pair is not None and not random and outputs_differ(pair, alone, eps):
            largest = (float((pair - alone).abs().max()) if pair.shape == alone.shape
                       else float("nan"))
            report.add("error", "batch-dependent",
                       "The model's output for an instance depends on the other instances in its "
                       "batch: the instance and another input in one batch give other logits "
                       f"than each alone (largest difference {largest:.3g})"
                       ". Every kernel batches its inputs, so every result would be wrong: make "
                       "forward() treat the rows of a batch independently (no statistics over "
                       "the batch dimension such as h.mean(0), no batch norm in training mode).",
                       _ALL)

    # 6. Gradients reach every modality (through the embedding for text).
    if not random:
        _check_gradients(adapter, prepared, report, int(out[0].argmax()))


def _halfway(adapter: ModelAdapter, prepared, cont: dict, base: dict):
    """(the continuous inputs halfway between the baseline and the instance, the model's
    output there), or (None, None) when it is not finite or the model fails there."""
    half = {n: torch.lerp(base[n], cont[n], 0.5) for n in cont}
    try:
        out = adapter.predict(prepared.raw, half)
    except Exception:  # noqa: BLE001 -- the user's model can raise anything
        return None, None
    return (half, out) if bool(torch.isfinite(out).all()) else (None, None)


def _check_decision_layer(adapter: ModelAdapter, prepared, report: Report, calls: int,
                          eps: float) -> str | None:
    """Report what is wrong with the decision layer (``eps``: the model's precision, as
    ``roundoff_eps`` gives); returns the warning that the logits are not its output, for the
    caller to give once it knows the model is not random."""
    name = type(adapter.decision_layer).__name__
    after = None
    if calls == 0:
        report.add("error", "decision-layer",
                   f"The decision layer ({name}) was never called "
                   "in the forward pass: pass decision_layer= the module that computes the logits "
                   "from the decision-level features.", _FEATURES)
        return None
    if calls > 1:
        report.add("error", "decision-calls",
                   f"The decision layer ({name}) is called {calls} times in one forward pass "
                   "(e.g. late fusion, head(a) + head(b)): its input is not one decision-level "
                   "vector per instance, so neuron targets (Neuron(j)), features and the "
                   "prediction path cannot be computed. Pass decision_layer= a module called once, "
                   "on the fused vector.", _FEATURES)
        return None
    feats = _attempt(report, "decision-input", _FEATURES, "The decision-level features",
                     lambda: adapter.features(prepared.raw))
    if feats is not None:
        report.n_features = int(feats[1].shape[1])
    layer = adapter.decision_layer
    if feats is not None and isinstance(layer, nn.Linear):
        logits, h = feats
        if layer.out_features not in _logit_widths(logits):
            report.add("error", "decision-not-logits",
                       f"The decision layer ({name}, {layer.in_features} -> "
                       f"{layer.out_features}) does not compute the {logits.shape[1]} logits: "
                       f"its weights are not the classes' weights, so neuron contributions "
                       f"W[c, j] h_j and the prediction path would be meaningless. Pass "
                       f"decision_layer= the module that computes the logits (the neurons "
                       f"shown are then its inputs).", ("prediction",))
        else:
            with torch.no_grad():
                again = adapter.as_logits(layer(h.to(layer.weight.dtype)), logits.shape[0])
            mismatch = outputs_differ(again.to(logits.dtype), logits, eps)
            # chosen by default (the last Linear with one output per class): another layer of
            # that width may be the one whose output is the logits
            found, heads = (_logit_layers(adapter, prepared, logits, eps) if mismatch
                            else ([], []))
            found = found if adapter.decision_layer_default else []
            if found:
                report.add("error", "decision-not-logits",
                           f"The decision layer chosen by default "
                           f"({_module_name(adapter.model, layer)}, the last nn.Linear with one "
                           f"output per class) does not compute the logits, so neuron "
                           f"contributions and the prediction path would use the wrong "
                           f"weights. Pass decision_layer={found[0]!r}: its output is the "
                           f"logits.", ("prediction",))
            elif mismatch and len(heads) > 1:
                after = (f"The logits are not the decision layer's output ({name}): "
                         f"{len(heads)} layers of one output per class run in the pass "
                         f"({', '.join(heads[:5])}), so the logits look like a sum of several "
                         f"heads, and no one layer's weights give them. Neuron contributions "
                         f"W[c, j] h_j and the prediction path then cover this layer's part "
                         f"only: for the whole decision, compute the logits with one nn.Linear "
                         f"over the concatenated encodings (the heads' weights side by side).")
            elif mismatch and not outputs_differ(
                    torch.softmax(again.to(logits.dtype), 1), logits, eps):
                pass      # a softmax after it: the "probabilities" warning says to remove it
            elif mismatch:
                after = (f"The logits are not the decision layer's output ({name}): the model "
                         f"changes them after it (a scale, a bias, another layer), so neuron "
                         f"contributions W[c, j] h_j do not add up to them. Pass "
                         f"decision_layer= the last module that computes the logits, or read "
                         f"the contributions as those of the layer's output.")
    if not isinstance(adapter.decision_layer, nn.Linear):
        report.add("warning", "decision-not-linear",
                   "The decision layer is not an nn.Linear: neuron contributions W[c, j] h_j "
                   "and the prediction path need a sparse linear model's weights instead: pass "
                   "sparse_model=fit_sparse_model_for(adapter, train_set) to the Explorer (or "
                   "to decision_contributions / prediction_path).")
    return after


def _logit_layers(adapter: ModelAdapter, prepared, logits: torch.Tensor, eps: float
                  ) -> tuple[list[str], list[str]]:
    """(the names of the model's nn.Linear layers whose output in one pass is the logits, the
    names of all of its nn.Linear layers of the logits' width that ran in that pass)."""
    outputs: dict[str, torch.Tensor] = {}
    if not watched_pass(adapter, prepared.raw,
                        lambda m: (isinstance(m, nn.Linear)
                                   and m.out_features in _logit_widths(logits)),
                        lambda name, out: outputs.setdefault(name, out.detach())):
        return [], []
    found = []
    for n, out in outputs.items():
        if out.dim() == 2 and out.shape[0] == logits.shape[0]:
            out = adapter.as_logits(out, logits.shape[0])
            if not outputs_differ(out.to(logits.dtype), logits, eps):
                found.append(n)
    return found, list(outputs)


def _logit_widths(logits: torch.Tensor) -> tuple[int, ...]:
    """The output widths of a layer that computes these logits: one per class, or one logit
    for a binary model (read as [-z/2, z/2], ``adapter.binary_logits``)."""
    return (2, 1) if logits.shape[1] == 2 else (logits.shape[1],)


#: what check() says of a model of one output (a score, a regression head)
ONE_OUTPUT = ("The model has one output ({name!r}), explained as a score: stages 1 to 3 and the "
              "prediction path (through the decision layer) explain it, while what compares "
              "classes needs two or more: the EMAP gap, the interaction type, and a sparse "
              "linear model of the decision (fit_sparse_model). A binary classifier's one "
              "logit takes two class names instead.")


def _check_binary_output(adapter: ModelAdapter, prepared, report: Report, z: torch.Tensor,
                         eps: float) -> None:
    """A binary model's one output is read as a logit ([-z/2, z/2]): an error when it is the
    sigmoid of the decision layer's output (a probability), a warning when it lies in [0, 1]."""
    fix = ("return the logit (the decision layer's output, before any sigmoid): the adapter "
           "reads one output z with two class names as the logits [-z/2, z/2], whose softmax is "
           "[1 - sigmoid(z), sigmoid(z)]; a probability p read as a logit makes every "
           "prediction the second class and every explanation that of p, not of the decision.")
    layer = adapter.decision_layer
    if isinstance(layer, nn.Linear) and layer.out_features == 1:
        try:
            with torch.no_grad():
                _, h = adapter.features(prepared.raw)
                logit = layer(h.to(layer.weight.dtype)).reshape(-1).to(z.dtype)
        except Exception:  # noqa: BLE001 -- the decision-layer checks report a failure
            logit = None
        if (logit is not None and outputs_differ(logit, z, eps)
                and not outputs_differ(torch.sigmoid(logit), z, eps)):
            report.add("error", "sigmoid-output",
                       "The model's one output is the sigmoid of its decision layer's output, a "
                       "probability: " + fix, _ALL)
            return
    if bool(((z >= 0) & (z <= 1)).all()):
        report.add("warning", "binary-probability",
                   f"The model's one output is {float(z[0]):.4g}, within [0, 1]. If forward() "
                   "ends in a sigmoid, " + fix)


def _check_step_columns(adapter: ModelAdapter, prepared, report: Report, target: int, name: str,
                        grad: torch.Tensor) -> None:
    """A warning naming the columns of a table whose gradient is exactly zero although setting
    them to the baseline changes the logit: a step inside forward() (an integer cast into an
    embedding, a comparison, a rounding), where gradient methods score 0 what matters."""
    mod, index = adapter.modalities[name], prepared.index[name]
    x, b = prepared.continuous[name], prepared.baseline[name]
    per_unit = mod.pool(grad.abs().unsqueeze(0), x, index)[0]
    dead = [int(u) for u in torch.nonzero(per_unit == 0).reshape(-1)]
    if not dead:
        return
    n = prepared.n_units[name]

    def masks(scale: float) -> torch.Tensor:      # each dead unit at `scale` of its way to x
        m = torch.ones(len(dead), n, dtype=x.dtype, device=x.device)
        m[torch.arange(len(dead)), dead] = scale
        return m
    try:
        with torch.no_grad():
            base = adapter.forward(prepared.raw)[0, target]
            changed = adapter.forward(prepared.raw,
                                      {name: mod.apply_mask(x, masks(0.0), b, index)})[:, target]
    except Exception:  # noqa: BLE001 -- the other checks report a model that fails
        return
    delta = (changed - base).abs()
    tol = 1e-6 * max(1.0, float(base.abs()))
    # a step, or a unit saturated at this instance (a clamp, a saturated tanh)? Saturation has a
    # gradient somewhere on the way to the baseline (where integrated gradients sees it): each
    # unit's gradient at five points of that way
    alphas = (0.1, 0.3, 0.5, 0.7, 0.9)
    way = torch.stack([mod.apply_mask(x, masks(alpha), b, index) for alpha in alphas], 1)
    try:
        with torch.enable_grad():
            way = way.reshape(-1, *x.shape).requires_grad_(True)
            out = adapter.forward(prepared.raw, {name: way})[:, target]
            g, = torch.autograd.grad(out.sum(), way, allow_unused=True)
    except Exception:  # noqa: BLE001 -- the other checks report a model that fails
        return
    moving = (torch.zeros(len(dead), len(alphas), n, dtype=x.dtype) if g is None else
              mod.pool(g.abs(), x, index).reshape(len(dead), len(alphas), n).cpu())
    steps = [(prepared.labels[name][u], float(delta[r])) for r, u in enumerate(dead)
             if float(delta[r]) > tol and not bool(moving[r, :, u].ne(0).any())]
    if steps:
        shown = ", ".join(f"{label!r} ({d:.3g})" for label, d in steps[:8])
        report.add("warning", "step-columns",
                   f"Units of {name!r} have a gradient of exactly zero at this instance and "
                   "on the way to the baseline, yet "
                   f"setting them to the baseline changes the logit (by): {shown}. forward() "
                   "passes them through a step (an integer cast into an embedding, a "
                   "comparison, a rounding), so gradient saliency, gradient x input, integrated "
                   "gradients and second-order gradients score them 0: explain them with the "
                   "perturbation methods (occlusion, LIME, KernelSHAP, pairwise ablation, "
                   "Shapley).", _GRADIENT)


def _check_gradients(adapter: ModelAdapter, prepared, report: Report, target: int) -> None:
    cont = {n: v.unsqueeze(0).clone().requires_grad_(True) for n, v in prepared.continuous.items()}
    try:
        logits = adapter.forward(prepared.raw, cont)
        grads = torch.autograd.grad(logits[0, target], list(cont.values()), allow_unused=True)
    except Exception as e:  # noqa: BLE001 -- the user's model can raise anything
        report.add("error", "no-gradient",
                   f"Back-propagation failed ({e}); gradient methods need a differentiable model "
                   "(no .detach(), .numpy() or torch.no_grad() inside forward).", _GRADIENT)
        return
    for (n, x), g in zip(cont.items(), grads):
        if g is not None and not torch.any(g != 0):
            # connected, but zero here: not detached (advice about embedding_layers is wrong);
            # a warning, as it may hold at this instance only
            cls = class_name(adapter.class_names, target)
            report.add("warning", "zero-gradient",
                       f"The gradient of the logit of {cls!r} with respect to modality {n!r} is "
                       "exactly zero at this instance, although the modality is connected to the "
                       "output: the output does not change locally with it. Either units "
                       "saturate at this instance (a dead ReLU, a saturated tanh or sigmoid, a "
                       "clamp): check() another instance; or forward() passes it through a step "
                       "(round, argmax, a comparison, an integer cast), which no gradient method "
                       "can explain: use the perturbation methods (occlusion, LIME, SHAP, "
                       "ablation).", _GRADIENT)
        elif g is not None and adapter.modalities[n].kind == "tabular":
            _check_step_columns(adapter, prepared, report, target, n, g[0])
        elif g is None:
            where = ("its embedding layer's output" if n in adapter.embedding_layers
                     else "its input")
            report.add("error", "gradient-not-reached" if n in adapter.embedding_layers
                       else "no-gradient",
                       f"No gradient reaches modality {n!r} through {where}: the model detaches "
                       "it or ignores it. For text, make sure embedding_layers names the layer "
                       "whose output the model uses (not a copy), and that forward() does not "
                       "detach it.", _GRADIENT)
    try:
        with math_attention():      # as the second-order kernel runs it
            logits = adapter.forward(prepared.raw, cont)
            g = torch.autograd.grad(logits[0, target], list(cont.values()), create_graph=True,
                                    allow_unused=True)
            # the Hessian along a random direction: 0 along it means 0, almost surely (along
            # the ones, f = (x1 - x2)^2 would give 0 too)
            gen = torch.Generator().manual_seed(0)
            s = sum((torch.sum(gi * torch.randn(gi.shape, generator=gen, dtype=torch.float64)
                               .to(gi.dtype).to(gi.device))
                     for gi in g if gi is not None and gi.requires_grad), torch.zeros(()))
            hv = (torch.autograd.grad(s, list(cont.values()), allow_unused=True)
                  if s.requires_grad else ())
    except Exception as e:  # noqa: BLE001 -- the user's model can raise anything
        report.add("error", "no-double-backward",
                   f"Second-order gradients are not available ({e}); use the perturbation "
                   "interaction methods (pairwise ablation, Shapley) instead.",
                   ("interaction_gradient",))
        return
    _check_curvature(prepared, report, cont, g, hv)


def _check_curvature(prepared, report: Report, cont: dict, g, hv) -> None:
    """A warning when the output's second derivatives vanish at the instance (its Hessian along
    a random direction, ``hv``, is float rounding beside the gradient ``g``) while its gradient
    does not: a model piecewise linear here (a ReLU network, whose second derivatives are 0
    almost everywhere), where second-order gradients give a matrix of zeros whether or not the
    modalities interact."""
    if len(cont) < 2:                       # no interactions to see
        return
    first = max((float(gi.detach().abs().max()) for gi in g if gi is not None and gi.numel()),
                default=0.0)
    if not first > 0 or not math.isfinite(first):
        return                              # zero-gradient (or not finite): said elsewhere
    # how far the inputs are from their baselines: what turns a second derivative into a
    # change of the gradient (1 when they are their baselines)
    span = max(float((x - prepared.baseline[n]).abs().max()) if x.numel() else 0.0
               for n, x in prepared.continuous.items()) or 1.0
    second = max((float(h.detach().abs().max()) for h in hv if h is not None and h.numel()),
                 default=0.0)
    dtype = next(iter(cont.values())).dtype
    if not second * span <= ROUNDING_EPS * torch.finfo(dtype).eps * first:
        return
    report.add("warning", "zero-second-derivatives",
               "The model's second derivatives are 0 at this instance although its gradient is "
               "not: it is piecewise linear here (e.g. a ReLU network, whose second derivatives "
               "are 0 almost everywhere). Second-order gradients, the default interaction "
               "method, then give a matrix of zeros whether or not the modalities interact: "
               "use pairwise ablation or Shapley interactions to see its interactions (or, to "
               "keep second-order gradients, smooth activations such as GELU or SiLU).")


# ---------------------------------------------------------------------------------------------
# baselines against the data
# ---------------------------------------------------------------------------------------------
#: How many instances ``check_baselines`` reads, spread evenly over the dataset.
BASELINE_SAMPLE = 200
#: A baseline further outside the data's values than this many of their standard deviations is
#: said (a lab value of 7e-5 against values 1e-5 to 2e-4 is not: 0 is 0.2 of them below).
BASELINE_OUTSIDE_STD = 0.5


def check_baselines(adapter: ModelAdapter, dataset, n: int = BASELINE_SAMPLE) -> list[str]:
    """What a removed unit is set to, against the data: one message per Tabular or TimeSeries
    modality whose baseline lies outside the values of up to ``n`` instances spread over
    ``dataset`` for some columns (channels), by more than half their standard deviation, with
    the fix; [] when none does. The default baseline 'zero' of columns on their own scales sets
    a removed age to 0 years against ages of 18 to 90: occlusion, LIME, KernelSHAP, integrated
    gradients, pairwise ablation and Shapley interactions then measure the model on values it
    never saw there, and a column whose value is 0 always scores 0. The Explorer says these
    beside its views. Instances the adapter refuses are passed over (said elsewhere)."""
    names = [k for k, m in adapter.modalities.items() if m.kind in ("tabular", "timeseries")]
    if not names or len(dataset) == 0:
        return []
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(int(n), len(dataset))).round())
    values: dict[str, list] = {k: [] for k in names}
    bases: dict[str, list] = {k: [] for k in names}
    for i in picks.astype(int):
        try:
            p = adapter.prepare(dataset[int(i)])
        except Exception:  # noqa: BLE001 -- a refused instance is said where it is used
            continue
        for k in names:
            x, b = (t.detach().double().cpu().numpy() for t in (p.continuous[k], p.baseline[k]))
            values[k].append(x.reshape(-1, x.shape[-1]))
            bases[k].append(np.broadcast_to(b, x.shape).reshape(-1, x.shape[-1]))
    out = []
    for k in names:
        if not values[k]:
            continue
        x, b = np.concatenate(values[k]), np.concatenate(bases[k])
        x = np.where(np.isfinite(x), x, np.nan)
        lo, hi, sd = (np.full(x.shape[1], np.nan) for _ in range(3))
        seen = ~np.isnan(x).all(0)             # a column of no finite value has no range
        if seen.any():
            lo[seen], hi[seen] = np.nanmin(x[:, seen], 0), np.nanmax(x[:, seen], 0)
            sd[seen] = np.nanstd(x[:, seen], 0)
        below, above = lo - b.min(0), b.max(0) - hi
        far = np.maximum(below, above)
        bad = np.flatnonzero(np.isfinite(far) & (sd > 0) & (far > BASELINE_OUTSIDE_STD * sd))
        if bad.size:
            out.append(_baseline_message(adapter.modalities[k], bad, b, lo, hi, below,
                                         len(values[k])))
    return out


def _baseline_message(m, bad, b, lo, hi, below, n: int) -> str:
    """``check_baselines``'s message for modality ``m``: the columns (channels) ``bad``, each
    with the baseline value furthest out and the data's range, and the fix."""
    tabular = m.kind == "tabular"
    names = m.columns if tabular else m.channels
    shown = [f"{names[c]!r} ({(b[:, c].min() if below[c] > 0 else b[:, c].max()):.4g} against "
             f"{lo[c]:.4g} to {hi[c]:.4g})" for c in bad[:5]]
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    what, unit = ("Tabular", "column") if tabular else ("TimeSeries", "window")
    given = ("'zero', the default" if (getattr(m, "_baseline", None) is None if tabular
                                       else m.baseline == "zero") else "the values given")
    fix = ("For columns on their own scales, pass Tabular(..., baseline='mean', means=...) with "
           "the training data's column means (e.g. train_df.mean()), or a vector of typical "
           "values as baseline=." if tabular else
           "Pass TimeSeries(..., baseline='mean') (each channel's mean over the instance).")
    return (f"{what} {m.name!r}: a removed {unit} is set to its baseline ({given}), which lies "
            f"outside the data's values for {len(bad)} of {len(names)} "
            f"{'columns' if tabular else 'channels'}: {', '.join(shown)}{more} (from {n} "
            "instances). Occlusion, LIME, KernelSHAP, integrated gradients, pairwise ablation "
            "and Shapley interactions then measure the model on values it never saw there (and "
            f"a value equal to the baseline always scores 0). {fix}")
