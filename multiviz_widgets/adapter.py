"""ModelAdapter: how any multimodal torch.nn.Module enters the toolkit.

The adapter knows the model's modalities (in the order of its arguments), its class names, its
*decision layer* (the module whose input is the decision-level feature vector h(x)) and, for text,
the embedding layer through which gradients flow. Kernels talk to the model only through:

* ``prepare(instance)``: one instance as model inputs, continuous inputs, baselines and units;
* ``forward(raw, continuous=None, features=False)``: logits (and h) for a batch, where the
  continuous inputs replace the model inputs (for text: the embedding layer's output);
* ``output(logits, features, target)``: the scalar a method explains (a class logit or a neuron).

Hooks are registered for one call and removed in ``finally``; nothing is global, so two adapters
(even on two copies of one model) can be used side by side.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import math
import operator
import os
import re
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .notices import warn
from .checks import is_integer
from .data import update_hash
from .modalities import NOT_IN_NUMPY, Modality, _is_index, _vocab_from_ids


@dataclass(frozen=True)
class Target:
    """What an explanation explains: a class logit (kind="class") or a decision neuron ("neuron")."""

    kind: str
    index: int

    def __post_init__(self):
        if self.kind not in ("class", "neuron"):
            raise ValueError(f"Target kind must be 'class' or 'neuron', got {self.kind!r}.")
        if not is_integer(self.index):       # 2.5 or True would silently become 2 or 1
            raise ValueError(f"A {self.kind} index must be an integer, got {self.index!r}.")
        object.__setattr__(self, "index", operator.index(self.index))

    def __str__(self) -> str:
        return f"{self.kind} {self.index}"


def Class(index: int) -> Target:
    """Target the logit of class ``index``."""
    return Target("class", index)


@functools.lru_cache(maxsize=4096)
def _class_target(index: int) -> Target:
    """Class(index), made once (a Target is frozen, so one is shared): every gradient call asks
    for its target, and a new frozen dataclass costs about 10 us on cold caches (a call after
    other work, as benchmarks/kernels.py times it)."""
    return Class(index)


def Neuron(index: int) -> Target:
    """Target decision-level neuron ``index`` (the input of the decision layer)."""
    return Target("neuron", index)


@dataclass
class Prepared:
    """One instance, ready for the kernels. Tensors have no batch dimension unless stated."""

    raw: dict[str, torch.Tensor]          # model inputs, batch of one
    continuous: dict[str, torch.Tensor]   # what attributions differentiate
    baseline: dict[str, torch.Tensor]     # continuous form with every unit removed
    index: dict[str, torch.Tensor]        # unit of every continuous scalar
    n_units: dict[str, int]
    labels: dict[str, list[str]]          # one label per unit
    key: str = ""                         # content hash, for caches

    @property
    def names(self) -> list[str]:
        return list(self.continuous)


class ModelLock:
    """A reentrant lock that a thread marked as background work (``mark_worker_thread(
    background=True)``: the Explorer's dataset lane) takes only when no other thread waits for
    it. The dataset's features pass takes it for each batch; a click's pass, waiting behind
    that lane's next batch each time, took 1.7 s to 17 s where it takes 0.1 s alone. Between
    two of its batches the pass now lets a waiting click's passes go first."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._waiting = 0                  # threads not marked background, waiting for it

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return True
            background = getattr(_thread_role, "background", False)

            def free() -> bool:
                return self._owner is None and (not background or self._waiting == 0)
            if not background:
                self._waiting += 1
            try:
                if not blocking:
                    ok = free()
                else:
                    ok = self._cond.wait_for(free, None if timeout < 0 else timeout)
                if ok:
                    self._owner, self._depth = me, 1
                return ok
            finally:
                if not background:
                    self._waiting -= 1
                    if self._waiting == 0:
                        self._cond.notify_all()        # a background thread may go now

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("cannot release a ModelLock this thread does not hold")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    def __enter__(self) -> "ModelLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


#: Taken around every computation on a model (``ModelAdapter.run``), by all adapters: their
#: hooks live on modules that two adapters may share, and torch.fx tracing (``kernels.factorize``)
#: patches ``nn.Module.__call__`` for the whole process while it runs.
MODEL_LOCK = ModelLock()



def host_array(t: torch.Tensor) -> np.ndarray:
    """A tensor's values as a numpy array on the host (float32 for a dtype numpy lacks)."""
    t = t.detach()
    if t.dtype in NOT_IN_NUMPY:
        t = t.float()
    return t.cpu().numpy()


class AdapterError(ValueError):
    """A model or instance does not fit the adapter; the message says how to fix it.

    ``code`` names the kind of problem (the doctor's finding code, e.g. "output-shape")."""

    code = "adapter"

    def __init__(self, message: str = "", code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class ModelInputError(AdapterError, RuntimeError):
    """The model raised an error on the inputs it was given (wrong shape, channels, length...);
    the original error is chained. Also a RuntimeError, like most of the errors it wraps."""

    code = "forward"


class ModelOutOfMemory(MemoryError, RuntimeError):
    """The model ran out of host memory on a batch (torch's allocator error chained): not the
    inputs' fault, so never blamed on them; the message says which batch sizes to lower. (A
    RuntimeError too, as the allocator's own error. torch.OutOfMemoryError, the device's, is
    raised as it is: it says so itself.)"""


#: what to lower when a batch does not fit in memory (each method's own parameter)
LOWER_THE_BATCH = (
    "Lower the rows per model call: batch_size= for occlusion, LIME, KernelSHAP, second-order "
    "gradients, pairwise ablation, Shapley, EMAP and DIME; internal_batch_size= for integrated "
    "gradients; rows_per_pass= "
    "for attribute_batch; batch_size= of extract_features (whose features an Explorer takes "
    "as features=; its views' methods take theirs as method_params={method: {parameter: "
    "value}}). Or free memory (other models, tensors kept in the kernel).")


#: errors of the model's own code, whatever its inputs (a misspelt attribute, a missing import):
#: raised as they are, never read as the model refusing an instance (which halves batches to
#: find the instances, and blames their shapes)
_CODE_ERRORS = (AttributeError, NameError, ImportError, SyntaxError, RecursionError)


def is_out_of_memory(error: BaseException | None) -> bool:
    """torch's allocator refusing (host or device), whatever the exception type it uses."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error).lower() if error is not None else ""
    return "out of memory" in text or "allocate memory" in text


def _resolve_module(model: nn.Module, spec, what: str) -> nn.Module:
    if isinstance(spec, nn.Module):
        if not any(m is spec for m in model.modules()):
            raise AdapterError(f"The {what} module given is not part of the model; pass a "
                               "submodule of the model or its dotted name.")
        return spec
    if isinstance(spec, str):
        try:
            return model.get_submodule(spec)
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n]
            raise AdapterError(f"The model has no submodule {spec!r} for the {what}; its "
                               f"submodules are: {', '.join(names[:30])}.") from None
    raise AdapterError(f"The {what} must be a submodule of the model or its dotted name, got "
                       f"{type(spec).__name__}.")


def _gives_logits(layer: nn.Linear, n_classes: int) -> bool:
    """Whether an nn.Linear's output can be the logits: one output per class, or one (a binary
    model's logit, read as [-z/2, z/2])."""
    return layer.out_features == n_classes or (layer.out_features == 1 and n_classes == 2)


def _check_decision_width(model: nn.Module, layer: nn.Module, n_classes: int) -> None:
    """Reject, at construction, a decision layer given as an nn.Linear whose output cannot be
    the logits (``_gives_logits``). Its weights would be taken as the classes' (neuron bars,
    the prediction path), and only the doctor, which the Explorer never runs, would say so."""
    if not isinstance(layer, nn.Linear) or _gives_logits(layer, n_classes):
        return
    raise AdapterError(
        f"The decision layer given, {_layer_name(model, layer)}, has {layer.out_features} "
        f"outputs but class_names has {n_classes} names, so its output is not the logits (it "
        f"needs one output per class{', or 1 for a binary model' if n_classes == 2 else ''}) "
        f"and its weights are not the classes': neuron contributions and the prediction path "
        f"would be computed from a hidden layer. Pass decision_layer= the final nn.Linear that "
        f"maps the decision-level vector h to the logits, or leave decision_layer out to find "
        f"it. If it is the model's final layer (its outputs are the logits), class_names is "
        f"what is wrong: "
        + ("a layer of one output takes 2 class names (a binary model's logit) or 1 (a "
           "score)." if layer.out_features == 1 else
           f"give one name per output ({layer.out_features} names)."),
        code="decision-not-logits")


#: Layers that take vectors, not token ids: never a text modality's embedding layer.
_VECTOR_LAYERS = (nn.Linear, nn.Bilinear, nn.RNNBase, nn.RNNCellBase, nn.modules.conv._ConvNd,
                  nn.MultiheadAttention, nn.LayerNorm, nn.modules.batchnorm._NormBase,
                  nn.TransformerEncoder, nn.TransformerEncoderLayer, nn.TransformerDecoder,
                  nn.TransformerDecoderLayer, nn.Transformer)


def _layer_name(model: nn.Module, layer: nn.Module) -> str:
    """'name (Type)' of a submodule, for messages."""
    name = next((n for n, m in model.named_modules() if m is layer), "")
    return f"{name or 'the model'} ({type(layer).__name__})"


def _check_embedding_layer(model: nn.Module, modality: Modality, layer: nn.Module) -> None:
    """Reject, at construction, layers that cannot be a text modality's embedding: the layer
    must map token ids [B, T] to one vector per token [B, T, D] (checked again on first use)."""
    what = f"The embedding layer given for {modality.name!r}, {_layer_name(model, layer)},"
    fix = (f" Pass embedding_layers={{'{modality.name}': <the nn.Embedding that maps the token "
           "ids to one vector per token>}.")
    if isinstance(layer, nn.EmbeddingBag):
        raise AdapterError(
            f"{what} is an nn.EmbeddingBag: it gives one vector per text, not one per token, so "
            "token attributions cannot be computed. Use an nn.Embedding and pool its output in "
            "forward() (EmbeddingBag(mode='mean') equals Embedding(ids).mean(1)) and name that "
            "nn.Embedding.", code="embedding-layer")
    if isinstance(layer, _VECTOR_LAYERS):
        raise AdapterError(f"{what} takes vectors, not token ids." + fix, code="embedding-layer")
    vocab = getattr(modality, "vocab", None)
    if isinstance(layer, nn.Embedding) and vocab is not None and len(vocab) > layer.num_embeddings:
        raise AdapterError(
            f"{what} has {layer.num_embeddings} rows but the vocabulary of {modality.name!r} has "
            f"{len(vocab)} tokens: ids {layer.num_embeddings} and above would fail. Give the Text "
            "modality the vocabulary the model was trained with.", code="embedding-layer")


def padding_mismatch(model: nn.Module, modality: Modality, layer: nn.Module) -> str | None:
    """What is wrong when a text modality's nn.Embedding keeps a padding row (``padding_idx``)
    other than the vocabulary's pad token's id, else None: the "pad" baseline and the padding
    of batched texts would then use a trained vector, and the model may take another token for
    padding (a vocabulary listed in another order than the model's)."""
    pad_row = getattr(layer, "padding_idx", None) if isinstance(layer, nn.Embedding) else None
    pad_id = getattr(modality, "pad_id", None)
    if pad_row is None or pad_id is None or pad_row == pad_id:
        return None
    vocab = modality.vocab
    there = (f", and id {pad_row} is {vocab[pad_row]!r}, which the model may read as padding"
             if 0 <= pad_row < len(vocab) else "")
    return (f"The embedding layer of {modality.name!r}, {_layer_name(model, layer)}, keeps row "
            f"{pad_row} for padding (padding_idx={pad_row}), but the vocabulary's "
            f"{modality.pad_token!r} is id {pad_id}{there}: the 'pad' baseline and the padding of "
            f"batched texts would use id {pad_id}'s trained vector, not the padding row. Give the "
            f"Text modality the vocabulary in the order the model was trained with (its pad token "
            f"at id {pad_row}), or Text(..., pad_token=<the token at id {pad_row}>).")


def _where_not_finite(modality: Modality, row: torch.Tensor) -> str:
    """Where a row of a tabular input or a series is NaN or infinite, for its error: " (in
    column 'bmi')", " (in channel 'hr', 3 time steps)"; "" for other kinds."""
    bad = ~torch.isfinite(row)
    names = getattr(modality, "columns", None) or getattr(modality, "channels", None)
    if not names or bad.shape[-1] != len(names):
        return ""
    per = bad.reshape(-1, bad.shape[-1])
    which = [str(names[j]) for j in range(len(names)) if bool(per[:, j].any())]
    kind = "column" if getattr(modality, "columns", None) else "channel"
    shown = ", ".join(repr(w) for w in which[:5]) + (", ..." if len(which) > 5 else "")
    n_steps = int(per.any(1).sum())
    steps = f", {n_steps} time step{'s' if n_steps > 1 else ''}" if per.shape[0] > 1 else ""
    return f" (in {kind}{'s' if len(which) > 1 else ''} {shown}{steps})"


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):   # tensors without storage
        return False


def _ids_owners(t: torch.Tensor, names: Sequence[str], ids: Mapping[str, torch.Tensor]
                ) -> list[str]:
    """The text modalities (of ``names``) whose token ids an embedding call received as ``t``:
    those whose ids are the very tensor the adapter passed, else those whose ids it is a slice of
    (a batch taken in parts), else, failing both, those whose ids have the same shape and values
    (ids the model copied or cast first). Several when modalities' ids are equal; none for any
    other ids (a CLS token, positions)."""
    tests = [lambda i: i is t, lambda i: t.shape[1:] == i.shape[1:] and _same_storage(t, i)]
    if not (t.is_floating_point() or t.is_complex()):
        tests.append(lambda i: t.shape == i.shape and t.device == i.device
                     and torch.equal(t.to(i.dtype), i))
    for test in tests:
        found = [n for n in names if ids.get(n) is not None and test(ids[n])]
        if found:
            return found
    return []


class _Matches:
    """What the embedding hooks found during one computation: ``names``, the explained text
    modalities whose continuous input replaced an embedding output; ``others``, the text
    modalities not explained whose ids a call plainly received (left unchanged); ``unclear``,
    the calls on ids equal to those of explained and unexplained modalities alike, that no
    earlier call told apart (left unchanged), as (explained, unexplained) names: judged by
    ``ModelAdapter._check_unclear`` once the pass is over; ``missed``, the first calls (up to
    ``_MISSED_KEPT``) on ids of no text modality, as (the explained modalities of the layer,
    the ids): when a modality's input replaced nothing, ``ModelAdapter._unsubstituted`` looks
    among them for ids built from its own (a [CLS] id put before them)."""

    def __init__(self):
        self.names: set[str] = set()
        self.others: set[str] = set()
        self.unclear: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
        self.missed: list[tuple[tuple[str, ...], torch.Tensor]] = []


#: how many embedding calls on other ids a computation keeps for ``_unsubstituted``'s message
_MISSED_KEPT = 16


def _built_from(t: torch.Tensor, ids: torch.Tensor, pad_id: int | None
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Whether the token ids ``t`` [B, L] that an embedding layer received are built from a text
    modality's ``ids`` [B, T] (T < L): every row of ``ids`` (its trailing padding left out) is a
    run of the same row of ``t``, as when the model puts a [CLS] id before them or a [SEP] id
    after them. Then (the ids before and the ids after the run, in the first row), else None.
    Looks at the first 16 rows (an error's message, not a check of every row)."""
    if (not isinstance(t, torch.Tensor) or not isinstance(ids, torch.Tensor)
            or t.is_floating_point() or t.is_complex() or ids.is_floating_point()
            or t.dim() != 2 or ids.dim() != 2 or t.shape[0] != ids.shape[0]
            or t.shape[1] <= ids.shape[1] or t.device != ids.device or ids.numel() == 0):
        return None
    first = None
    for r in range(min(t.shape[0], 16)):
        row, whole = ids[r], t[r].to(ids.dtype)
        if pad_id is not None:
            kept = (row != pad_id).nonzero()
            row = row[:int(kept[-1]) + 1] if len(kept) else row[:0]
        n = len(row)
        if n == 0:
            continue
        at = (whole.unfold(0, n, 1) == row).all(1).nonzero()
        if not len(at):
            return None
        if first is None:
            o = int(at[0])
            first = (t[r, :o], t[r, o + n:])
    return first


def _match_ids(t: torch.Tensor, names: Sequence[str], others: Sequence[str],
               ids: Mapping[str, torch.Tensor], matches: _Matches) -> str | None:
    """The explained text modality (of ``names``) whose continuous input an embedding call on
    the ids ``t`` gets, or None to leave the call unchanged. ``others`` are the text modalities
    on the same layer that are not explained: a call on their ids is never replaced, also when
    their ids equal an explained modality's (a question and an answer alike; replacing both
    calls would move the answer with the question). Equal ids copied by the model before the
    call are told apart by which of them earlier calls took (each is embedded once): a call
    that cannot be told yet is left unchanged and recorded in ``matches.unclear``."""
    found = _ids_owners(t, list(names) + list(others), ids)
    mine = [n for n in found if n in names]
    theirs = [n for n in found if n not in names]
    if not theirs:
        # explained modalities with equal ids: the first not yet replaced, in forward() order
        return min(mine, key=lambda n: n in matches.names) if mine else None
    if not mine:
        if len(theirs) == 1:
            matches.others.add(theirs[0])
        return None
    open_mine = [n for n in mine if n not in matches.names]
    open_theirs = [n for n in theirs if n not in matches.others]
    if open_mine and not open_theirs:        # the unexplained ones were embedded already
        return open_mine[0]
    if not open_mine and open_theirs:        # the explained ones were replaced already
        return None
    matches.unclear.append((tuple(mine), tuple(theirs)))
    return None


def _rows_of_part(name: str, t: torch.Tensor, ids: torch.Tensor | None, x: torch.Tensor
                  ) -> torch.Tensor:
    """The rows of the continuous input ``x`` [B, ...] for ``t``, a part of the batch's token ids
    ``ids`` [B, ...] that the model embeds on its own (``torch.cat([emb(c) for c in
    ids.split(k)])``), found from where the part starts in the ids' storage (``model_inputs``
    copies an instance's ids to every row of the batch for real, so every row has its place).
    An AdapterError for a part that is no run of rows."""
    rows = t.shape[0]
    if (ids is not None and _same_storage(t, ids) and t.stride() == ids.stride()
            and ids.dim() and ids.stride(0) != 0):
        start, off = divmod(t.storage_offset() - ids.storage_offset(), ids.stride(0))
        if off == 0 and 0 <= start and start + rows <= x.shape[0]:
            return x[start:start + rows]
    raise AdapterError(
        f"The model embeds token ids of {name!r} of shape {tuple(t.shape)}, a part of the batch "
        f"of {x.shape[0]} the adapter gave it, but not a run of its rows (the ids copied, "
        f"reordered or taken every few rows), so the continuous input of those rows cannot be "
        f"put in. Embed the batch's ids in one call, or in consecutive slices (ids[i:j]).",
        code="embedding-substitution")


#: Layers that act differently in training mode (the adapter warns about them; any module in
#: training mode is run in eval mode).
_TRAINING_LAYERS = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase)


#: Marks the threads that compute beside the user's own cells (the Explorer's engine workers,
#: see ``mark_worker_thread``): on those a model in training mode is refused, not switched.
_thread_role = threading.local()


def mark_worker_thread(background: bool = False) -> None:
    """Mark the calling thread as one that computes while the user's cells run (an engine
    worker). Switching the model to eval mode there and back would race the user's own
    ``model.train()`` or ``model.eval()`` (a training step run in eval mode, or an eval undone),
    so a model in training mode gets a clear AdapterError on such a thread instead.
    background: its work waits for the model whenever another thread does (``ModelLock``)."""
    _thread_role.worker = True
    _thread_role.background = bool(background)


def _calls_of_others() -> Callable[[], bool]:
    """For hooks registered now: a test, cheap enough for every call of a hook, of whether the
    thread calling it is another's. The hooks sit on the user's modules, so they fire for any
    forward pass: one the user runs in a cell (the main thread) while an engine worker
    computes, or another worker's, would be counted or have its embedding replaced (a false
    "decision layer called 2 times"). Threads that torch starts for a computation (nn.DataParallel
    runs its replicas on threads of its own) are neither, and keep the hooks."""
    owner = threading.get_ident()

    def foreign() -> bool:
        if threading.get_ident() == owner:
            return False
        return (threading.current_thread() is threading.main_thread()
                or getattr(_thread_role, "worker", False))
    return foreign


def training_mode_message(name: str, where: str, active: Sequence[str],
                          made: bool = True) -> str:
    """Why an Explorer refuses a model in training mode, and how to fix it (made: the Explorer
    exists, and its recompute button shows the views again)."""
    layers = f" with {', '.join(active)} layers" if active else ""
    fix = ("Call model.eval() (after any training step), then click recompute." if made else
           "Call model.eval() before making the Explorer (and after any training step).")
    return (f"The model ({name}) {where}{layers}. The Explorer computes on worker threads while "
            "your cells run, so it cannot switch the model to eval mode and back without racing "
            "your own code (a training step would run in eval mode, or your model.eval() be "
            f"undone). {fix}")


#: How to mask a class so that every method can still compute: the same probabilities as -inf.
MASK_FINITE = ("mask classes with a large negative finite value instead "
               "(logits.masked_fill(mask, -1e4)): the same probabilities")

#: What a method that explains a class masked by -inf says.
MASKED_TARGET_NOTE = f" A class masked by -inf has nothing to explain ({MASK_FINITE})."


def masked_logits_hint(logits) -> str:
    """For logits [B, C] (a tensor or an array) that are not finite only by -inf (each row with
    a finite largest value): a sentence saying to mask classes with a finite value; else ""."""
    # (an array the engine keeps is read-only: torch warns on viewing one, so it is copied)
    z = (logits.detach().double() if isinstance(logits, torch.Tensor)
         else torch.tensor(np.asarray(logits), dtype=torch.float64)).reshape(-1, logits.shape[-1])
    if z.numel() == 0 or z.isnan().any() or (z == math.inf).any() or not (z == -math.inf).any():
        return ""
    if not torch.isfinite(z.max(1).values).all():
        return ""
    return (f" Its -inf logits look like masked classes: {MASK_FINITE}, and averages and "
            "differences of logits (EMAP, integrated gradients' completeness, the sparse "
            "model) finite.")


def _in_effect(layer: nn.Module) -> bool:
    """Whether a dropout or batch norm layer's training mode changes outputs (Dropout(p=0) in
    training mode does not)."""
    return layer.training and getattr(layer, "p", 1) > 0


def _outside_stacklevel() -> int:
    """The stacklevel, for warnings.warn called by this function's caller, of the first frame
    outside this package, torch, contextlib and threading: the user's line that asked for the
    work. On a worker thread (the Explorer's), where no user's line is on the stack, the
    outermost frame of this package (the engine's loop that ran the job), not threading.py."""
    own = os.path.dirname(os.path.abspath(__file__))
    skip = (own, os.path.dirname(torch.__file__), contextlib.__file__, threading.__file__)
    frame, level, outermost_own = sys._getframe(1), 1, 1
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        if frame.f_code.co_filename.startswith(own):
            outermost_own = level
        frame, level = frame.f_back, level + 1
    return level if frame is not None else outermost_own


#: The error of any explanation run inside torch.inference_mode().
INFERENCE_MODE_MESSAGE = (
    "The kernels cannot run inside torch.inference_mode(): its tensors cannot be "
    "differentiated nor tracked for in-place changes. Call attribute (and the other "
    "explanations) outside torch.inference_mode() (under torch.no_grad() they work, and give "
    "the same results); an instance prepared inside it must be prepared again outside.")


def input_versions(args: Mapping[str, torch.Tensor]) -> list[int]:
    """The in-place version counters of a model's inputs (torch bumps one at every in-place
    change of the tensor or of a view of it; reading it costs about 0.1 us). Inference tensors
    have none: an AdapterError says to work outside torch.inference_mode()."""
    try:
        return [v._version for v in args.values()]
    except RuntimeError:
        if any(v.is_inference() for v in args.values()):
            raise AdapterError(INFERENCE_MODE_MESSAGE, code="inference-mode") from None
        raise


def check_inputs_kept(args: Mapping[str, torch.Tensor], versions: Sequence[int]) -> None:
    """An AdapterError when the model changed any of its inputs in place during the call."""
    changed = [n for (n, v), was in zip(args.items(), versions) if v._version != was]
    if changed:
        raise AdapterError(INPUT_IN_PLACE_MESSAGE.format(names=", ".join(map(repr, changed))),
                           code="input-in-place")


#: The error of a model that changes its inputs ({names}) in place.
INPUT_IN_PLACE_MESSAGE = (
    "The model changed its input {names} in place (an operation such as x.sub_(mu), x /= s or "
    "x[...] = ... on the argument itself; or one of its parameters, such as w.clamp_(), with "
    "autograd on: wrap that in torch.no_grad()). The kernels pass the same inputs again (the "
    "instance, its masked copies, the pairs of EMAP and DIME), so every later result would be "
    "computed on changed values. Make the operation out of place in the model's forward: "
    "x = (x - mu) / s.")


def module_settings(module: nn.Module, integers: bool) -> list[tuple[str, str]]:
    """The sorted (name, repr) of a module's own attributes that are settings: floats, flags,
    texts (a long one by its hash), (short) tuples of them and of integers, numpy scalars of
    these kinds (``np.float32(2.0)`` by its dtype and value) and, with ``integers``, lone
    integers (a model may count its forward calls in one). Not a name that begins with "_":
    torch keeps its own state there, and a model its own per-pass notes (``self._last_norm``
    written in forward would change the key at every pass). Not lists (they may grow with the
    calls), not tensors (one may hold the last activation). What ``ModelAdapter.fingerprint``
    (without integers) and a traced split's staleness check (``kernels.factorize``, with them)
    compare. A module without numpy settings gives the list it gave before these were read, so
    an older concept file's fingerprint of it is recognised still."""
    kinds = (bool, int, float, str) if integers else (bool, float, str)
    out = []
    for k, v in vars(module).items():
        if k.startswith("_") or k == "training":
            continue
        if isinstance(v, kinds) or (isinstance(v, np.generic) and v.dtype.kind in (
                "biuf" if integers else "bf")):
            out.append((k, _setting_text(v)))
        elif isinstance(v, tuple) and len(v) <= 64 and all(
                isinstance(x, (bool, int, float, str)) for x in v):
            out.append((k, repr(v)))
    return sorted(out)


def _setting_text(v) -> str:
    """How ``module_settings`` writes a lone setting: a long text by its hash, a numpy scalar
    that is no Python number (np.float32, np.bool_, np.int64) by its dtype and value (the same
    in every process and numpy version), anything else by its repr (as before numpy scalars
    were read: np.float64, a float, keeps its repr)."""
    if isinstance(v, str) and len(v) > 256:
        return "sha256:" + hashlib.sha256(v.encode("utf-8", "replace")).hexdigest()
    if isinstance(v, np.generic) and not isinstance(v, (bool, int, float, str)):
        return f"{v.dtype}:{v.item()!r}"
    return repr(v)


def hash_tensor(h, name: str, t: torch.Tensor) -> None:
    """Feed a named tensor (its name, dtype, shape and bytes) to the hash ``h``."""
    h.update(name.encode())
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def hash_module_settings(h, model: nn.Module) -> None:
    """Feed every module's settings (``module_settings``, integers left out) to the hash ``h``."""
    for name, module in model.named_modules():
        h.update(f"{name}:{module_settings(module, integers=False)}".encode())


def binary_logits(z: torch.Tensor) -> torch.Tensor:
    """[B, 2]: a binary model's one logit z [B, 1] as the two classes' logits [-z/2, z/2], whose
    softmax is [1 - sigmoid(z), sigmoid(z)] and whose difference is z."""
    half = z / 2
    return torch.cat([-half, half], 1)


def _forward_signature(model: nn.Module) -> tuple[list[nn.Module], list[inspect.Parameter]]:
    """(the modules whose forward the adapter's call runs through, outermost first; the
    parameters of the innermost's forward): through a wrapper whose forward takes only
    (*args, **kwargs) and passes them on, nn.DataParallel (.module) and torch.compile
    (._orig_mod), the parameters are the wrapped model's. TypeError or ValueError when a
    forward's signature cannot be read."""
    chain = [model]
    params = list(inspect.signature(model.forward).parameters.values())
    while all(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        inner = next((m for m in (getattr(model, "_orig_mod", None),
                                  getattr(model, "module", None))
                      if isinstance(m, nn.Module)), None)
        if inner is None:
            break
        model = inner
        chain.append(model)
        params = list(inspect.signature(model.forward).parameters.values())
    return chain, params


def _may_add_arguments(module: nn.Module) -> bool:
    """Whether calling ``module`` may give its forward() arguments the caller did not pass: a
    forward pre-hook (its own or a global one), which may replace the arguments, or a
    ``__call__`` of its class's own."""
    from torch.nn.modules import module as module_mod
    return (type(module).__call__ is not nn.Module.__call__
            or hasattr(module, "_hf_hook")                 # accelerate's, around forward
            or bool(getattr(module, "_forward_pre_hooks", None))
            or bool(getattr(module_mod, "_global_forward_pre_hooks", None)))


def _plain_chain(chain: Sequence[nn.Module]) -> bool:
    """Whether the arguments that the modules' forward() get can be read from their signatures:
    every forward undecorated (a decorator, ``functools.wraps`` or not, may fill in an argument
    that the wrapped signature requires), and every module passed through one that passes its
    arguments on unchanged (``nn.DataParallel``, ``DistributedDataParallel``, torch.compile's),
    not a wrapper of the user's own (``forward(*args, **kwargs)`` may add any)."""
    from torch.nn.parallel import DistributedDataParallel
    passing = (nn.DataParallel, DistributedDataParallel)
    compiled = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    if compiled is not None and hasattr(compiled, "OptimizedModule"):
        passing = (*passing, compiled.OptimizedModule)
    for k, m in enumerate(chain):
        forward = getattr(type(m), "forward", None)
        if forward is None or inspect.unwrap(forward) is not forward:
            return False
        if "forward" in vars(m):               # an instance's own forward (a partial, a lambda)
            return False
        if k < len(chain) - 1 and not isinstance(m, passing):
            return False
    return True


def _unpassed_parameters(model: nn.Module, names: Sequence[str], keyword_inputs: bool
                         ) -> tuple[list[inspect.Parameter], dict[str, str]]:
    """The parameters of the model's forward() that must be given (no default; not *args nor
    **kwargs), are not modalities and that the adapter's call (``model(*inputs)``, or
    ``model(**inputs)`` with ``keyword_inputs``) leaves out, such as a Hugging Face model's
    ``attention_mask``; with the parameter that takes each modality ({modality: parameter}:
    its own name when forward() has a parameter of each modality's name, else by position).
    ([], {}) when there are none, and when that cannot be told from the signature: a forward()
    whose signature cannot be read, a call through hooks or a ``__call__`` of the model's own
    (which may give those arguments), or a forward() whose parameters do not take the
    modalities as the adapter calls it (the call's own error, and ``_signature_hint``, say so)."""
    try:
        chain, params = _forward_signature(model)
    except (TypeError, ValueError):
        return [], {}
    if any(_may_add_arguments(m) for m in chain) or not _plain_chain(chain):
        return [], {}
    P = inspect.Parameter
    fixed = [p for p in params if p.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD)]
    by_name = {p.name: p for p in fixed}
    if all(n in by_name for n in names) and not (
            keyword_inputs and any(by_name[n].kind == P.POSITIONAL_ONLY for n in names)):
        takes = {n: n for n in names}
    elif keyword_inputs:
        return [], {}
    else:
        positional = [p for p in fixed if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
        if len(positional) < len(names) and not any(p.kind == P.VAR_POSITIONAL for p in params):
            return [], {}
        takes = {n: p.name for n, p in zip(names, positional)}
    taken = set(takes.values())
    missing = [p for p in fixed
               if p.default is p.empty and p.name not in taken and p.name not in names]
    return (missing, takes) if missing else ([], {})


def _named_in_another_order(model: nn.Module, names: Sequence[str]) -> bool:
    """Whether forward()'s leading arguments (by position or keyword) are the modalities' names
    in another order than the adapter's, or forward() takes the modalities by name and some
    by keyword only (``forward(self, *, image, question)``): the model must then take them by
    keyword."""
    try:
        params = _forward_signature(model)[1]
    except (TypeError, ValueError):
        return False
    by_name = {p.name: p.kind for p in params}
    if all(by_name.get(n) in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                              inspect.Parameter.KEYWORD_ONLY) for n in names) and any(
            by_name[n] == inspect.Parameter.KEYWORD_ONLY for n in names):
        return True
    lead = params[:len(names)]
    if any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in lead):
        return False
    order = [p.name for p in lead]
    if sorted(order) != sorted(names) or order == list(names):
        return False
    if any(p.kind == p.POSITIONAL_ONLY for p in lead):
        raise AdapterError(
            f"The model's forward() takes {order} by position only, but the modalities are "
            f"listed as {list(names)}: list them in forward()'s order.")
    return True


def class_name(class_names: Sequence[str], c: int) -> str:
    """The name of class c, or str(c) where ``class_names`` has no name for it (an output
    beyond the names, or a negative index, is never looked up from the end)."""
    c = int(c)
    return str(class_names[c]) if 0 <= c < len(class_names) else str(c)


def _first_input(module: nn.Module, args: tuple, kwargs: dict):
    """A layer's input from a hook's arguments: the first positional one, else the keyword of
    the first parameter of its forward (``input`` for nn.Linear and nn.Embedding, ``ids`` for
    ``forward(self, ids, scale=1.0)`` called as ``embed(scale=2.0, ids=ids)``); None if not
    given."""
    if args:
        return args[0]
    return kwargs.get(_first_parameter(type(module)))


@functools.lru_cache(maxsize=None)
def _first_parameter(module_type: type) -> str | None:
    """The name of the first parameter of ``module_type.forward`` after self (None: none)."""
    try:
        params = list(inspect.signature(module_type.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return "input"
    return params[0].name if params else None


def _first_refused(modality: Modality, items: Sequence) -> tuple[int, Exception] | None:
    """(position, error) of the first item that ``modality`` refuses on its own (None: each is
    taken alone, so the batch failed for another reason)."""
    for k, item in enumerate(items):
        try:
            modality.batch([item])
        except (ValueError, TypeError) as e:
            return k, e
    return None


def naming_instance(error: Exception, number: int) -> Exception:
    """``error`` itself, its message led by the instance's number ("Instance 37: tab: a row
    must have 3 values ..."): its class, code and attributes kept, so ``except`` clauses still
    catch it (raise it again with a bare ``raise`` where it was caught)."""
    first = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    error.args = (f"Instance {number}: {first}", *error.args[1:])
    return error


def _class_name_list(class_names) -> list[str]:
    """class_names as the list of names in logit order: a sequence as it is; a mapping ordered by
    class index, {index: name} (a HuggingFace config's id2label) or {name: index} (label2id).
    A string (whose letters would be the names) and a set (in no order) are refused."""
    if isinstance(class_names, (str, bytes)):
        raise AdapterError(
            f"class_names is the single string {class_names!r}, whose characters would be read as "
            f"the names: give a list with one name per output logit, e.g. ['cat', 'dog'].")
    if isinstance(class_names, (set, frozenset)):
        raise AdapterError("class_names is a set, which has no order: give a list with one name "
                           "per output logit, in the order of the logits.")
    if isinstance(class_names, Mapping):
        keys, values = list(class_names), list(class_names.values())
        by_keys, by_values = all(map(_is_index, keys)), all(map(_is_index, values))
        if by_keys and by_values and keys:
            raise AdapterError(
                "class_names maps integers to integers, so which are the class indices cannot be "
                "told: give the list of names in logit order, e.g. ['cat', 'dog'].")
        if by_keys:                                  # id2label {0: 'cat', 1: 'dog'}
            pairs = [(name, i) for i, name in class_names.items()]
        elif by_values:                              # label2id {'cat': 0, 'dog': 1}
            pairs = list(class_names.items())
        else:
            hint = (" (a JSON file's keys are strings: convert them, "
                    "{int(i): name for i, name in id2label.items()})"
                    if all(isinstance(k, str) and k.isdigit() for k in keys) else "")
            raise AdapterError(
                "class_names given as a mapping must map the class indices to the names "
                "{0: 'cat', 1: 'dog'} (id2label) or the names to the indices {'cat': 0, 'dog': 1} "
                f"(label2id), with integer indices; got {dict(list(class_names.items())[:4])!r}"
                f"{hint}.")
        names = _vocab_from_ids(pairs, "class_names given as a mapping", "name", AdapterError)
        return [str(c) for c in names]
    try:
        return [str(c) for c in class_names]
    except TypeError:
        raise AdapterError(f"class_names must be a list with one name per output logit, e.g. "
                           f"['cat', 'dog'], got {type(class_names).__name__}.") from None


#: Words and phrases of torch's errors about the inputs ("mat1 and mat2 shapes cannot be
#: multiplied", "The size of tensor a (5) must match ...", "Input type (long int) and bias type
#: (float) should be the same", "Expected tensor for argument #1 'indices' to have one of the
#: following scalar types", "index out of range in self"): only then, or for an assertion or
#: an error without words, are the inputs suspected (an input whose shape changed, their
#: order); an error with none of them is the model's own. Phrases, not single words such as
#: "expected" or "tensor", which a model's own messages use too ("not enough values to unpack"
#: of a shorter question's ``a, b, c, d = q.unbind(1)`` is about the inputs).
INPUT_WORDS = ("shape", "size", "dimension", "mat1", "mat2", "must match", "channels",
               "out of range", "should be the same", "expected input", "scalar type",
               "expected all tensors", "for argument", "length", "dtype", "to unpack")


class ModelAdapter:
    """Wraps a model that takes one input per modality (in order) and returns [B, C] logits.

    model: the torch.nn.Module. Put it in eval mode: a model in training mode is run in eval
        mode for every computation called from your code (dropout off, batch norm on its running
        statistics, which stay unchanged) and its modes are restored afterwards, with a warning
        the first time; the Explorer refuses it (``training_mode_message``).
    modalities: the Modality objects, in the order of the model's arguments. The adapter passes
        forward() these inputs only: a required argument that is none of them (a Hugging Face
        model's attention_mask) is an AdapterError, with a wrapper that builds it.
    class_names: one name per output logit: a list, or a mapping ordered by the logits'
        indices 0..C-1, {index: name} (a HuggingFace config's id2label) or {name: index}.
    decision_layer: the module (or dotted name) whose input is h(x); default: the last nn.Linear
    with one output per class (with two class names and none of two outputs, the last with
    one: a binary model's logit), else the last nn.Linear; ``check`` says when its output is
    not the logits.
    embedding_layers: {text modality name: embedding module or dotted name}; a text modality
        without one uses the model's only nn.Embedding when there is exactly one. Its output
        must be one vector per token [B, T, ...]. The layer may be called more than once in
        forward() and shared by several text modalities: the continuous input of a modality
        replaces the layer's output only on the calls that receive that modality's token ids
        (never on another modality's, also when their ids are equal; a copy of ids equal to
        those of an explained and an unexplained modality, whose owner cannot be told from
        the other calls, is an AdapterError).
    keyword_inputs: call model(**{name: tensor}) instead of model(*tensors). Set by itself
        when forward()'s first arguments are the modalities' names in another order than
        ``modalities`` lists them, or when forward() takes some of them by keyword only (each
        input then goes to the argument of its name).
    """

    def __init__(self, model: nn.Module, modalities: Sequence[Modality],
                 class_names: Sequence[str], decision_layer: nn.Module | str | None = None,
                 embedding_layers: Mapping[str, nn.Module | str] | None = None,
                 keyword_inputs: bool = False, name: str | None = None):
        if not isinstance(model, nn.Module):
            raise AdapterError(f"ModelAdapter needs a torch.nn.Module, got {type(model).__name__}.")
        meta = next((n for n, t in [*model.named_parameters(), *model.named_buffers()]
                     if t.is_meta), None)
        if meta is not None and any(hasattr(m, "_hf_hook") for m in model.modules()):
            raise AdapterError(
                f"The model's {meta!r} (and maybe more) is on the 'meta' device, moved in only "
                "during each forward by accelerate's offloading hooks (device_map= or "
                "cpu_offload). The explanations read the weights between passes (the decision "
                "layer's, the feature cache's key), so load the model whole onto one device: "
                "from_pretrained without device_map=, or with device_map='cpu'.",
                code="meta-device")
        if meta is not None:
            raise AdapterError(
                f"The model's {meta!r} (and maybe more) is on the 'meta' device: it has a shape "
                "but no values, so nothing can be computed from it. Give it real weights first: "
                "model.to_empty(device='cpu') then model.load_state_dict(state), or "
                "load_state_dict(state, assign=True).", code="meta-device")
        modalities = list(modalities)
        if not modalities:
            raise AdapterError("ModelAdapter needs at least one modality, e.g. [Image('image'), Text('question', vocab)].")
        for m in modalities:
            if not isinstance(m, Modality):
                raise AdapterError(f"{m!r} is not a Modality; use Image, Text, Tabular or TimeSeries.")
        names = [m.name for m in modalities]
        if len(set(names)) != len(names):
            raise AdapterError(f"Modality names must be unique, got {names}.")
        self.model = model
        # the layers whose training mode changes outputs, found once (modules() walks the whole
        # model; _eval_mode checks these on every pass)
        self._mode_layers = [m for m in model.modules() if isinstance(m, _TRAINING_LAYERS)]
        #: every module: one in training mode may act on it in its own code (an LSTM's or an
        #: attention's dropout, a forward reading self.training) without such a layer
        self._all_modules = list(model.modules())
        self.modalities = {m.name: m for m in modalities}
        self.class_names = _class_name_list(class_names)
        if not self.class_names:
            raise AdapterError("class_names is empty: give one name per output logit.")
        # forward(image, question) with the modalities listed [question, image]: by position
        # the model would take each input as the other (silently, when the shapes allow it)
        self.keyword_inputs = keyword_inputs or _named_in_another_order(model, names)
        self.name = name or type(model).__name__
        #: whether the decision layer was chosen by default (``check`` then says which layer
        #: computes the logits when the default does not)
        self.decision_layer_default = decision_layer is None
        if decision_layer is None:
            linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise AdapterError("The model has no nn.Linear to use as decision layer; pass "
                                   "decision_layer= (the module whose input is the decision-level "
                                   "feature vector).")
            # registration order need not be the order of use (a classifier defined before the
            # fusion): the last with one output per class is the likelier decision layer. A
            # binary model's one logit comes after: a one-output nn.Linear is as often an
            # attention pooling's scorer beside a two-logit head (``check`` names the layer
            # whose output is the logits when the default is not it)
            heads = [m for m in linears if m.out_features == len(self.class_names)]
            if not heads and len(self.class_names) == 2:     # a binary model's one logit
                heads = [m for m in linears if m.out_features == 1]
            decision_layer = (heads or linears)[-1]
        self.decision_layer = _resolve_module(model, decision_layer, "decision layer")
        if not self.decision_layer_default:
            _check_decision_width(model, self.decision_layer, len(self.class_names))
        self.embedding_layers: dict[str, nn.Module] = {}
        embedding_layers = dict(embedding_layers or {})
        unknown = set(embedding_layers) - set(names)
        if unknown:
            raise AdapterError(f"embedding_layers names {sorted(unknown)}, which are not modalities "
                               f"({names}).")
        # a modality that takes its input as it is (no token ids) has no embedding layer: the
        # entry would be dropped, so that what the person meant (a layer to explain from, say)
        # silently did not happen
        direct = [m for m in modalities if m.name in embedding_layers and not m.via_embedding]
        if direct:
            raise AdapterError(
                f"embedding_layers names {[m.name for m in direct]}, whose inputs are not token "
                f"ids ({', '.join(f'{m.name!r} is {type(m).__name__}' for m in direct)}): only a "
                "Text modality has an embedding layer (the module that maps its token ids to "
                "vectors). The others are explained on their own inputs: leave them out of "
                "embedding_layers.", code="embedding-layer")
        for m in modalities:
            if not m.via_embedding:
                continue
            spec = embedding_layers.get(m.name)
            if spec is None:
                embs = [(n, e) for n, e in model.named_modules() if isinstance(e, nn.Embedding)]
                if len(embs) > 1:
                    raise AdapterError(
                        f"Text modality {m.name!r} needs its embedding layer: pass "
                        f"embedding_layers={{'{m.name}': '<name>'}} with the name of the "
                        f"nn.Embedding that maps its token ids to vectors; the model has "
                        f"{len(embs)}, so it cannot be guessed: "
                        f"{', '.join(repr(n) for n, _ in embs[:8])}.")
                if not embs:
                    raise AdapterError(
                        f"Text modality {m.name!r} needs an embedding layer, a module that maps "
                        "its token ids [batch, tokens] to vectors [batch, tokens, dim], and the "
                        "model has no nn.Embedding (a table read by F.embedding or indexing is "
                        "not a module). Make the table an nn.Embedding (nn.Embedding."
                        "from_pretrained(weight, freeze=False) keeps its values), or pass "
                        "embedding_layers="
                        f"{{'{m.name}': <the module>}}: gradients and token baselines enter "
                        "through its output.")
                embs = [e for _, e in embs]
                spec = embs[0]
            layer = _resolve_module(model, spec, f"embedding of {m.name!r}")
            _check_embedding_layer(model, m, layer)
            mismatch = padding_mismatch(model, m, layer)
            if mismatch:
                warn(mismatch, UserWarning, stacklevel=_outside_stacklevel())
            self.embedding_layers[m.name] = layer
        # forward(pixel_values, input_ids, attention_mask): a required argument that is no
        # modality is never passed, and every call would fail (its TypeError read as the
        # inputs' shapes): said here, with a wrapper that builds it
        missing, takes = _unpassed_parameters(model, names, self.keyword_inputs)
        if missing:
            raise AdapterError(self._unpassed_message([p.name for p in missing], takes),
                               code="forward-arguments")
        self._lock = MODEL_LOCK
        self._warned_training = False
        #: the dtype of the model's first floating parameter (None without one): ``collate``
        #: gives floating inputs this dtype
        self._last_shapes: dict[str, tuple] = {}   # per-instance input shapes the model last took
        # {thread id: the token ids of the model arguments model_inputs() last built in that
        # thread}: the ids whose embedding ``run`` substitutes when its caller does not pass them

    # -- basics ------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.modalities)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def float_dtype(self) -> torch.dtype:
        """The dtype of the model's floating parameters (read live, as ``device``: a model made
        .double() after wrapping gets float64 inputs); float32 for a model without any."""
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()),
                    torch.float32)

    def __repr__(self) -> str:
        return (f"ModelAdapter({self.name}, modalities={self.names}, "
                f"classes={len(self.class_names)})")

    def target(self, target: Any) -> Target:
        """Normalise a target: an int or class name means a class; Neuron(j) a decision neuron."""
        if type(target) is int and 0 <= target < self.n_classes:
            return _class_target(target)     # the common case: one lookup, no new dataclass
        if isinstance(target, Target):
            t = target
        elif isinstance(target, str):
            if target not in self.class_names:
                raise AdapterError(f"Unknown class {target!r}; the classes are {self.class_names}.")
            named = [c for c, name in enumerate(self.class_names) if name == target]
            if len(named) > 1:             # label lists may repeat a name (ImageNet's "crane")
                raise AdapterError(f"The class name {target!r} names the classes {named}: give "
                                   f"the class index instead.")
            t = Class(named[0])
        elif is_integer(target):                # ints, numpy ints, one-element integer tensors
            t = Class(target)
        elif isinstance(target, tuple) and len(target) == 2:
            try:
                t = Target(str(target[0]), target[1])
            except ValueError as e:
                raise AdapterError(f"{e} (target {target!r})") from None
        else:
            raise AdapterError(f"A target is a class index, a class name or Neuron(j); got {target!r}.")
        if t.kind == "class" and not 0 <= t.index < self.n_classes:
            raise AdapterError(f"Class {t.index} is out of range: the model has {self.n_classes} classes.")
        if t.kind == "neuron" and t.index < 0:
            raise AdapterError(f"Neuron index must be non-negative, got {t.index}.")
        return t

    def fingerprint(self) -> str:
        """A hash of the model's parameters and buffers (non-persistent ones too, which the
        state_dict leaves out: a mask, a calibration scale), and of its modules' settings that
        are floats, flags, texts or tuples of them (``model.temperature = 5.0``, a
        convolution's stride; numpy scalars too: ``module_settings``): changes whenever they
        change. Left out: a name that begins with "_" (torch's own state, a model's per-pass
        notes), a lone integer (a model
        may count its forward calls in one), lists, and tensors held as plain attributes (a
        model may keep its last activation in one, which would change the hash on every pass:
        register a tensor the output depends on as a buffer). After changing such an attribute
        (``model.shift = 3``), extract features with ``cache=False`` or a new ``cache_dir``."""
        h = hashlib.sha256()
        tensors = dict(self.model.named_parameters())
        tensors.update(self.model.named_buffers())
        for k, v in sorted(tensors.items()):
            hash_tensor(h, k, v)
        hash_module_settings(h, self.model)
        return h.hexdigest()[:32]

    def weights_fingerprint(self) -> str:
        """A hash of the model's state_dict alone (its parameters and persistent buffers):
        what a retrained copy of the model changes, and what a buffer it fills in its first
        pass (a rotary embedding's cache, never saved) or its settings do not."""
        h = hashlib.sha256()
        for k, v in self.model.state_dict().items():
            if isinstance(v, torch.Tensor):
                hash_tensor(h, k, v)
        return h.hexdigest()[:32]

    # -- instances and batches ---------------------------------------------------------------
    def _check_names(self, instance: Mapping) -> None:
        if not isinstance(instance, Mapping):
            raise AdapterError(f"An instance is a dict {{modality name: input}}, got {type(instance).__name__}.")
        missing = [n for n in self.names if n not in instance]
        extra = [n for n in instance if n not in self.modalities]
        if missing or extra:
            raise AdapterError(f"The instance has modalities {list(instance)} but the adapter expects "
                               f"{self.names}" + (f"; missing {missing}" if missing else "")
                               + (f"; unknown {extra}" if extra else "") + ".")

    def collate(self, instances: Sequence[Mapping], on_device: bool = True,
                numbers: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Model inputs for a list of instances (raw values or tensors), batched per modality,
        on the model's device (left on the CPU with ``on_device=False``). Floating inputs take
        the dtype of the model's floating parameters (a float64 model gets float64 inputs from
        float32 arrays); token ids and other integer inputs are left as they are. No copy when
        device and dtype already match.

        Raises AdapterError when a modality's inputs are empty, hold NaN or infinity (also
        once cast to the model's dtype: 1e5 is infinite in float16), or (in a batch) differ in
        shape from one instance to another; it names the instance by its position in the list,
        or by ``numbers[position]`` when given (a caller that collates a part of its instances
        names them as its user knows them)."""
        for inst in instances:
            self._check_names(inst)
        dev = self.device if on_device else None
        dtype = self.float_dtype
        out = {}
        for n, m in self.modalities.items():
            x = self._checked_batch(m, [inst[n] for inst in instances], numbers, dtype)
            out[n] = x.to(dev, dtype if x.is_floating_point() else None)
        return out

    def _checked_batch(self, modality: Modality, items: Sequence,
                       numbers: Sequence[int] | None = None,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
        """modality.batch(items), with clear errors for inputs of several shapes, empty inputs
        and non-finite values, also those that become infinite cast to ``dtype`` (the model's:
        values beyond its largest number)."""
        name = modality.name
        number = (lambda k: k) if numbers is None else (lambda k: int(numbers[k]))
        try:
            x = modality.batch(items)
        except RuntimeError as e:           # torch.stack: the instances differ in shape
            shapes = [tuple(modality.batch([item]).shape[1:]) for item in items]
            odd = next((k for k, s in enumerate(shapes) if s != shapes[0]), None)
            if odd is None:
                raise
            raise AdapterError(
                f"Modality {name!r}: instance {number(odd)} has shape {shapes[odd]} but instance "
                f"{number(0)} has {shapes[0]}; the instances of a batch must have the same shape "
                f"(resize or crop them to one size, e.g. the size the model was trained on).") from e
        except (ValueError, TypeError):      # the modality refused an item: say which one
            if len(items) == 1 and numbers is None:
                raise
            refused = _first_refused(modality, items)
            if refused is None:
                raise
            odd, own = refused                  # that item's own error, named
            raise naming_instance(own, number(odd)) from None
        of = "" if len(items) == 1 and numbers is None else " of instance {}"
        if x.numel() == 0:
            raise AdapterError(f"Modality {name!r} is empty (input shape {tuple(x.shape[1:])}); "
                               "give at least one pixel, token, time step or value.")
        if torch.is_floating_point(x) or torch.is_complex(x):
            finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
            if not bool(finite.all()):
                k = int((~finite).nonzero()[0, 0])
                raise AdapterError(
                    f"Modality {name!r}{of.format(number(k))} holds non-finite values (NaN or "
                    f"infinity){_where_not_finite(self.modalities[name], x[k])}: the model's "
                    "outputs and every explanation would be NaN. Replace them (for example "
                    "impute missing values) before explaining the instance.")
            if (dtype is not None and x.is_floating_point() and x.dtype != dtype
                    # bfloat16 ends at 3.39e38, float32 at 3.40e38: a float32 value between the
                    # two is not worth a pass over every batch; float16 (65504) is, and so is
                    # float64 input to a float32 or bfloat16 model
                    and torch.finfo(dtype).max < torch.finfo(x.dtype).max / 2
                    # finite here, they may not be in the model's dtype (float16 ends at
                    # 65504): the model would take infinities, and its outputs be NaN. Two
                    # reductions, no copy of the batch; the instance is looked for only after
                    and not bool(torch.isfinite(torch.stack([x.amax(), x.amin()]).to(dtype))
                                 .all())):
                peak = x.reshape(x.shape[0], -1).abs().amax(1)
                over = ~torch.isfinite(peak.to(dtype))
                if bool(over.any()):
                    k = int(over.nonzero()[0, 0])
                    raise AdapterError(
                        f"Modality {name!r}{of.format(number(k))} holds values up to "
                        f"{float(peak[k]):g} in magnitude, beyond the largest number of the "
                        f"model's dtype {str(dtype).replace('torch.', '')} "
                        f"({torch.finfo(dtype).max:g}): cast to it, as the model's inputs are, "
                        "they would overflow to infinity, and the model's outputs and every "
                        "explanation would be NaN or infinite. Scale them down before they reach "
                        "the model (normalising inside forward() comes too late: the inputs are "
                        "cast first), or run the model in float32 (model.float()).")
        return x

    def prepare(self, instance: Mapping, number: int | None = None) -> Prepared:
        """Everything the kernels need about one instance (cost: no forward pass). ``number``:
        how errors about its inputs name it (one of many: "Instance 37: ..."); None: not named."""
        self._check_names(instance)
        raw = self.collate([instance], numbers=None if number is None else [number])
        cont = {k: v[0] for k, v in self.continuous(raw).items()}
        base_raw = {n: m.baseline_raw(raw[n][0]).unsqueeze(0) for n, m in self.modalities.items()}
        for n in self.names:
            if tuple(base_raw[n].shape) != tuple(raw[n].shape):
                raise AdapterError(
                    f"Modality {n!r}: {type(self.modalities[n]).__name__}.baseline_raw returned "
                    f"shape {tuple(base_raw[n].shape[1:])} for an input of shape "
                    f"{tuple(raw[n].shape[1:])}; a baseline (the input with every unit removed) "
                    "must have the input's shape.")
        # in the input's dtype (a custom baseline_raw may give float64 for float32 inputs)
        base_raw = {n: v.to(raw[n].dtype) for n, v in base_raw.items()}
        # Text(baseline="zero") replaces the [PAD] embedding by zeros on the continuous form
        base = {k: self.modalities[k].continuous_baseline(v[0])
                for k, v in self.continuous(base_raw).items()}
        # contiguous once here: modalities may return broadcast views, and every kernel
        # flattens the index (a copy per call otherwise)
        index = {n: m.unit_index(cont[n]).contiguous() for n, m in self.modalities.items()}
        for n in self.names:
            if index[n].numel() == 0:
                raise AdapterError(f"Modality {n!r} has no units (continuous input of shape "
                                   f"{tuple(cont[n].shape)}); give a non-empty input.")
        n_units = {n: int(index[n].max()) + 1 for n in self.names}
        labels = {n: m.describe_units(instance[n], raw[n][0]) for n, m in self.modalities.items()}
        h = hashlib.sha256()
        for n in self.names:
            update_hash(h, n)
            update_hash(h, raw[n])                   # with its shape and dtype
        return Prepared(raw, cont, base, index, n_units, labels, h.hexdigest()[:24])

    @torch.no_grad()
    def continuous(self, raw: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The continuous form of a batch: model inputs, or embedding outputs for text."""
        out = {}
        with self._lock, self._eval_mode():
            for n in self.names:
                x = raw[n]
                if n in self.embedding_layers:
                    out[n] = self._embed(n, x)
                else:
                    out[n] = x.detach().float() if not torch.is_floating_point(x) else x.detach()
        return out

    def _embed(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """The embedding layer of text modality ``name`` on token ids [B, T]: [B, T, ...], or an
        AdapterError naming the layer when it cannot take the ids or gives no vector per token."""
        layer = self.embedding_layers[name]
        what = f"The embedding layer given for {name!r}, {_layer_name(self.model, layer)},"
        fix = (f" embedding_layers={{'{name}': ...}} must name the module that maps the token "
               "ids [batch, tokens] to one vector per token [batch, tokens, dim] (an nn.Embedding).")
        try:
            e = layer(ids)
        except Exception as err:  # the user's module can raise anything
            raise AdapterError(f"{what} raised {type(err).__name__} on the token ids of shape "
                               f"{tuple(ids.shape)} (ids {int(ids.min())}..{int(ids.max())}): "
                               f"{err}." + fix, code="embedding-layer") from err
        if not isinstance(e, torch.Tensor) or e.dim() < 3 or e.shape[:2] != ids.shape:
            got = tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__
            raise AdapterError(f"{what} returned {got} for token ids of shape {tuple(ids.shape)}: "
                               "not one vector per token, so its scores would not be tokens'."
                               + fix, code="embedding-layer")
        return e.detach()

    def _training_state(self) -> tuple[str, list[str]] | None:
        """None when the model and all its modules (found when the adapter was made) are in
        eval mode, else (where the training mode is, the names of its dropout and batch norm
        layers it changes)."""
        if not any(m.training for m in self._all_modules):
            return None
        active = sorted({type(m).__name__ for m in self._mode_layers if _in_effect(m)})
        where = "is in training mode" if self.model.training else "has submodules in training mode"
        return where, active

    def training_mode(self) -> str | None:
        """None when the model and its dropout and batch norm layers are in eval mode, else
        the AdapterError message an Explorer being made gives for it (``training_mode_message``:
        a model in training mode without such layers too, since attention and recurrent
        layers' dropout, or its own code reading self.training, may act on the mode)."""
        state = self._training_state()
        return None if state is None else training_mode_message(self.name, *state, made=False)

    @contextlib.contextmanager
    def _eval_mode(self):
        """The model in eval mode for the block (dropout off, batch norm on its running
        statistics, which then stay unchanged); every module's mode is restored afterwards.
        A model in training mode, or one whose dropout or batch norm layers are (``sub.train()``
        after ``model.eval()``), is warned about once per adapter; on an Explorer's worker
        thread (``mark_worker_thread``) it is refused instead, since switching it there would
        race the user's cells. Cost: nothing when the model and those layers
        are in eval mode: every forward pass runs through here."""
        state = self._training_state()
        if state is None:
            yield
            return
        where, active = state
        if getattr(_thread_role, "worker", False):
            raise AdapterError(training_mode_message(self.name, where, active),
                               code="training-mode")
        if active and not getattr(self, "_warned_training", False):
            self._warned_training = True
            warn(
                f"The model ({self.name}) {where} with {', '.join(active)} layers: "
                "dropout would make every explanation random and batch norm would change its "
                "running statistics. The adapter runs it in eval mode for each computation and "
                "restores its mode afterwards; call model.eval() to silence this warning.",
                UserWarning, stacklevel=_outside_stacklevel())
        modes = [(m, m.training) for m in self.model.modules()]
        try:
            self.model.eval()
            yield
        finally:
            for m, mode in modes:
                m.training = mode

    # -- forward -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _hooks(self, continuous: Mapping[str, torch.Tensor] | None, store: dict | None,
               inputs: Mapping[str, torch.Tensor] | None = None):
        """Hooks for one computation: text modalities' embedding outputs replaced by their
        ``continuous`` inputs on the calls that receive their token ids (``inputs``), and the
        decision layer's input captured into ``store``. Yields the computation's ``_Matches``
        (``names``: the modalities whose embedding output was replaced)."""
        handles, matched = [], _Matches()
        foreign = _calls_of_others()
        try:
            shared: dict[nn.Module, list[str]] = {}
            for n in (continuous or {}):
                if n in self.embedding_layers:
                    shared.setdefault(self.embedding_layers[n], []).append(n)
            if shared and inputs is None:
                inputs = {}                  # no ids given: matched by shape and values only
            for layer, names in shared.items():
                # the text modalities not explained that share the layer: their calls must be
                # told from the explained ones' (their ids may be equal) and left unchanged
                others = [n for n, e in self.embedding_layers.items()
                          if e is layer and n not in names]
                handles.append(layer.register_forward_hook(
                    self._substitute(names, others, continuous, inputs, matched, foreign),
                    with_kwargs=True))
            if store is not None:
                def grab(mod, args, kwargs):
                    if foreign():
                        return
                    store.setdefault("h", _first_input(mod, args, kwargs))
                    store["calls"] = store.get("calls", 0) + 1
                # with the keyword arguments: a layer called as head(input=h) has no args
                handles.append(self.decision_layer.register_forward_pre_hook(
                    grab, with_kwargs=True))
            yield matched
        finally:
            for hd in handles:
                hd.remove()

    def _substitute(self, names: Sequence[str], others: Sequence[str],
                    continuous: Mapping[str, torch.Tensor], inputs: Mapping[str, torch.Tensor],
                    matched: _Matches, foreign: Callable[[], bool] = lambda: False
                    ) -> Callable:
        """A forward hook on an embedding layer shared by the explained text modalities
        ``names`` (and the unexplained ``others``): a call on one explained modality's token ids
        returns that modality's continuous input (a copy, so that the model may change it in
        place and gradients still reach the input); other calls pass, and so do the calls
        ``foreign`` says are another thread's (``_calls_of_others``)."""
        def hook(module, inp, kwargs, out):
            if foreign():
                return None
            t = _first_input(module, inp, kwargs)   # embed(ids) or embed(input=ids)
            n = (_match_ids(t, names, others, inputs, matched) if isinstance(t, torch.Tensor)
                 else None)
            if n is None:
                if isinstance(t, torch.Tensor) and len(matched.missed) < _MISSED_KEPT:
                    matched.missed.append((tuple(names), t))
                return None
            x = continuous[n]
            if isinstance(out, torch.Tensor) and out.shape[1:] != x.shape[1:]:
                raise AdapterError(
                    f"The continuous input of {n!r} has shape {tuple(x.shape)} but its embedding "
                    f"layer gives {tuple(out.shape)} for the token ids of shape {tuple(t.shape)}; "
                    "give one vector per token of the instance, as prepare() does.")
            if t.dim() and x.dim() and t.shape[0] != x.shape[0]:
                x = _rows_of_part(n, t, inputs.get(n), x)
            matched.names.add(n)
            return x.clone()
        return hook

    def _check_unclear(self, matched: _Matches) -> None:
        """AdapterError when an embedding call left unchanged because its ids equal those of an
        explained and an unexplained modality may have been the explained one's: when the
        explained one was never replaced, or when each unexplained one took a call of its own
        (the unclear call was then a second call on explained ids)."""
        for mine, theirs in matched.unclear:
            if all(n in matched.names for n in mine) and not all(
                    n in matched.others for n in theirs):
                continue
            layer = _layer_name(self.model, self.embedding_layers[mine[0]])
            raise AdapterError(
                f"The model called the embedding layer {layer} on a copy of token ids that "
                f"equal those of {', '.join(map(repr, mine))} (explained) and of "
                f"{', '.join(map(repr, theirs))} (not explained), which share that layer, so "
                "whose call it was cannot be told, nor whether to put in the continuous input "
                "of the explained one. Pass the ids the model receives to the embedding layer "
                "as they are (not copied, cast or moved first), or explain these modalities "
                "together (modalities=[...] naming all of them).",
                code="embedding-substitution")

    def _unsubstituted(self, continuous: Mapping[str, torch.Tensor], matched: set,
                       calls: _Matches | None = None,
                       inputs: Mapping[str, torch.Tensor] | None = None) -> None:
        """AdapterError when a text modality's continuous input replaced no embedding output:
        one that says the model builds other ids from the text's (a [CLS] id put before them)
        when the layer was called on such ids (``calls.missed``, the ids of the modalities in
        ``inputs``), else one that says the layer was not called on the text's ids."""
        missing = [n for n in continuous if n in self.embedding_layers and n not in matched]
        if missing:
            n = missing[0]
            built = self._built_message(n, calls, inputs)
            if built:
                raise AdapterError(built, code="embedding-substitution")
            raise AdapterError(
                f"The embedding layer given for {n!r}, "
                f"{_layer_name(self.model, self.embedding_layers[n])}, was never called on the "
                f"token ids of {n!r} during the forward pass, so its continuous input (what "
                "attributions perturb and differentiate) could not be put in. embedding_layers="
                f"{{'{n}': ...}} must name the module that the model applies to the {n} ids it "
                "receives (not a positional embedding, nor one applied to other ids).",
                code="embedding-substitution")

    def _built_message(self, name: str, calls: _Matches | None,
                       inputs: Mapping[str, torch.Tensor] | None) -> str:
        """For text modality ``name``, whose continuous input replaced no embedding output:
        when its layer was called on ids built from its token ids (``_built_from``: the model
        adds a [CLS] or [SEP] id to them before embedding them), what to change; else ''."""
        ids = (inputs or {}).get(name)
        if calls is None or ids is None:
            return ""
        modality = self.modalities[name]
        pad_id = getattr(modality, "pad_id", None)
        for names, t in calls.missed:
            if name not in names:
                continue
            found = _built_from(t, ids, pad_id)
            if found is not None:
                break
        else:
            return ""
        vocab = getattr(modality, "vocab", None) or []

        def tokens(part: torch.Tensor) -> str:
            return ", ".join(f"{int(i)} ({vocab[int(i)]!r})" if 0 <= int(i) < len(vocab)
                             else str(int(i)) for i in part[:4]) + (" ..." if len(part) > 4 else "")
        before, after = found
        added = " and ".join(f"the id{'s' if len(part) > 1 else ''} {tokens(part)} put {where} "
                             f"them" for part, where in ((before, "before"), (after, "after"))
                             if len(part))
        words = [[vocab[int(i)] for i in part] if all(0 <= int(i) < len(vocab) for i in part)
                 else None for part in found]
        written = (f" ({' '.join(words[0] + ['...'] + words[1])!r})"
                   if None not in words and len(before) + len(after) <= 4 else "")
        layer = self.embedding_layers[name]
        attr = next((f"self.{n}" for n, m in self.model.named_modules() if m is layer and n),
                    "self.embed")
        return (
            f"The embedding layer given for {name!r}, {_layer_name(self.model, layer)}, was "
            f"called on token ids of shape {tuple(t.shape)} built from the {tuple(ids.shape)} "
            f"token ids of {name!r} it received ({added}): the model adds tokens to the text (a "
            "[CLS] or [SEP] token) before embedding it. The layer is the right one, but its "
            f"output is not one vector per token of {name!r}, so the continuous input of "
            f"{name!r} (what attributions perturb and differentiate) cannot be put in: "
            "gradients and baselines "
            "cannot enter at the text's tokens. Give the special tokens in the input instead: "
            "a Text tokenize= that adds them (which also makes them units the explanations "
            f"score), or the text written with them{written}; or embed the added tokens in a "
            "separate call of the embedding layer and concatenate the vectors, e.g. "
            f"torch.cat([{attr}(cls_ids), {attr}({name})], 1) in place of "
            f"{attr}(torch.cat([cls_ids, {name}], 1)).")

    def forward(self, raw: Mapping[str, torch.Tensor],
                continuous: Mapping[str, torch.Tensor] | None = None,
                features: bool = False):
        """Logits [B, C] (and h [B, d] when features=True) for a batch.

        raw: model inputs with batch B or 1 (a batch of one is expanded to the continuous batch).
        continuous: {name: [B, ...]} replacing those modalities' continuous inputs.
        Cost: one forward pass of B instances. Gradients flow when the inputs require them.
        """
        args = self.model_inputs(raw, continuous)
        try:
            result = self.run(lambda: self._call_model(args), continuous, features, inputs=args)
        except ModelInputError as e:
            perturbed = tuple(continuous or ())
            if not perturbed or "requires grad" in str(e.__cause__):
                raise
            # on inputs a method built: were their values refused? Only if the instance's own
            # inputs pass, as a batch of the same size
            b = next(iter(args.values())).shape[0]
            try:
                self.forward({n: v.expand(b, *v.shape[1:]) if v.shape[0] == 1 else v
                              for n, v in raw.items()})
            except Exception:  # noqa: BLE001 -- the first error says more
                if b > 1 and all(v.shape[0] == 1 for v in raw.values()):
                    self._refuse_batch_of_one_only(raw, b, e)
                raise e from e.__cause__
            raise ModelInputError(self._model_error_message(args, e.__cause__, perturbed)
                                  ) from e.__cause__
        out = self.as_logits(result[0] if features else result, next(iter(args.values())).shape[0])
        return (out, result[1]) if features else out

    def _refuse_batch_of_one_only(self, raw: Mapping[str, torch.Tensor], b: int,
                                  error: ModelInputError) -> None:
        """A ModelInputError saying so when the model runs the instance ``raw`` alone but not as
        a batch of ``b`` (its ``error``); nothing when it cannot run it alone either."""
        try:
            self.forward(raw)
        except Exception:  # noqa: BLE001 -- then the batch is not the cause
            return
        cause = error.__cause__ or error
        raise ModelInputError(
            f"The model runs this instance alone but not as a batch of {b} "
            f"({type(cause).__name__}: {cause}). Every explanation batches its inputs (masked "
            "copies, points on a path): make forward() take any batch size (no reshape(1, ...), "
            ".item(), .squeeze() or a loop that assumes one row).") from cause

    def is_binary_logit(self, out: Any, b: int) -> bool:
        """Whether ``out`` is a binary model's one logit per instance for a batch of ``b``
        ([b], [b, 1], or [] for a squeezed batch of one) with two class names: ``as_logits``
        reads it as [-z/2, z/2]."""
        return (self.n_classes == 2 and isinstance(out, torch.Tensor)
                and (out.shape in ((b,), (b, 1)) or (b == 1 and out.dim() == 0)))

    def as_logits(self, out: Any, b: int) -> torch.Tensor:
        """The model's output for a batch of ``b`` as logits [b, C] (the first element of a
        tuple; [b] with one class name becomes [b, 1]), or an AdapterError saying how to make
        the model return it. Every path that runs the model (or its fused half) goes through it."""
        returned = "returned"
        if isinstance(out, (tuple, list)) and out:
            returned = f"returned a {type(out).__name__} whose first element (taken as logits) is"
            out = out[0]
        if isinstance(out, torch.Tensor) and not out.is_floating_point():
            raise AdapterError(
                f"The model {returned} a tensor of {out.dtype}; it must return floating-point "
                "logits [batch, classes]: the scores before any argmax, threshold, rounding or "
                "cast to an integer (a real tensor: take .real or .abs() of a complex one in "
                "forward). Attributions differentiate and compare these scores.",
                code="output-dtype")
        c = self.n_classes
        if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape == (b, c):
            return out
        if self.is_binary_logit(out, b):
            return binary_logits(out.reshape(b, 1))
        wrap = ("Wrap the model: class Logits(nn.Module): __init__(self, m) sets self.m = m; "
                "forward(self, **x) returns self.m(**x){}; and pass ModelAdapter(Logits(model), "
                "..., keyword_inputs=True)." if self.keyword_inputs else
                "Wrap the model: class Logits(nn.Module): __init__(self, m) sets self.m = m; "
                "forward(self, *x) returns self.m(*x){}; and pass ModelAdapter(Logits(model), ...).")
        if isinstance(out, Mapping):
            raise AdapterError(
                f"The model returned a {type(out).__name__} (keys {list(out)[:8]}); it must return a "
                f"tensor of logits [batch, classes]. " + wrap.format("['logits']"),
                code="output-type")
        if not isinstance(out, torch.Tensor):
            hf = isinstance(getattr(out, "logits", None), torch.Tensor)
            raise AdapterError(
                f"The model {returned} {type(out).__name__}; it must return a tensor of logits "
                "[batch, classes]." + (" " + wrap.format(".logits") if hf else ""),
                code="output-type")
        shape = tuple(out.shape)
        if out.dim() == 1 and out.shape[0] == b and c == 1:
            return out[:, None]
        if out.dim() == 1 and out.shape[0] == b:
            raise AdapterError(
                f"The model returned shape {shape}: one score per instance, where the adapter "
                f"needs 2-D logits [batch, classes] with classes = len(class_names) = {c}. A "
                "binary model returning one logit z takes class_names=[negative, positive] (z "
                "is read as the two logits [-z/2, z/2]); a single score (a regression) takes "
                "one class name.",
                code="output-shape")
        if out.dim() != 2 or out.shape[0] != b:
            raise AdapterError(
                f"The model returned shape {shape} for a batch of {b}; it must return 2-D logits "
                f"[batch, classes] = [{b}, {c}] (classes = len(class_names)).",
                code="output-shape")
        hint = (" A binary model returning one logit z ([batch, 1]) takes "
                "class_names=[negative, positive] (z is read as the two logits [-z/2, z/2]); a "
                "single score (a regression) takes one class name." if out.shape[1] == 1 else "")
        raise AdapterError(
            f"The model returns {out.shape[1]} logits (shape {shape}) but class_names has {c} "
            f"names; it must return [batch, classes] with classes = len(class_names): give one "
            f"name per logit.{hint}", code="class-count")

    def _call_model(self, args: Mapping[str, torch.Tensor]):
        """model(*args) (or model(**args)); an error the model raises on these inputs comes out
        as a ModelInputError naming the modalities and their shapes (the original chained), and
        a model that changes its inputs in place gets an AdapterError (``check_inputs_kept``)."""
        versions = input_versions(args)
        try:
            out = self.model(**args) if self.keyword_inputs else self.model(*args.values())
        except AdapterError:
            raise
        except Exception as e:  # noqa: BLE001 -- a model can raise anything (ZeroDivisionError,
            # its own exception classes): every error is named with the inputs it met, and one
            # instance's (whatever its type) is left out, not the whole dataset's work; but
            # an error of the model's code (_CODE_ERRORS) is raised as it is
            if isinstance(e, (torch.OutOfMemoryError, *_CODE_ERRORS)):
                raise
            if is_out_of_memory(e):
                b = next(iter(args.values())).shape[0] if args else 0
                raise ModelOutOfMemory(
                    f"The model ran out of memory on a batch of {b} instance(s) "
                    f"({type(e).__name__}: {str(e)[:300]}). This is not about the inputs' "
                    f"values. {LOWER_THE_BATCH}") from e
            if "leaf Variable that requires grad is being used in an in-place" in str(e):
                # torch refused the in-place change of a gradient method's input before it
                # happened: the same fix as for one made (check_inputs_kept)
                leaves = [n for n, v in args.items() if v.requires_grad] or list(args)
                raise AdapterError(INPUT_IN_PLACE_MESSAGE.format(
                    names=" or ".join(map(repr, leaves))), code="input-in-place") from e
            raise ModelInputError(self._model_error_message(args, e)) from e
        check_inputs_kept(args, versions)
        self._last_shapes = {n: tuple(v.shape[1:]) for n, v in args.items()}
        return out

    def _model_error_message(self, args: Mapping[str, torch.Tensor], error: Exception,
                             perturbed: Sequence[str] = ()) -> str:
        """perturbed: the modalities whose inputs an explanation method built (masked units at
        their baseline, points on a path from it), not the instance's own."""
        shapes = ", ".join(f"{n}: {tuple(v.shape)}" for n, v in args.items())
        text = str(error)
        head = f"The model raised {type(error).__name__} on the inputs of modalities ({shapes}): {text}."
        special = (self._unpassed_hint(error) or self._signature_hint()
                   or ("type" in text.lower() and self._dtype_hint(args))
                   or (isinstance(error, IndexError) and "index out of range in self" in text
                       and self._table_hint(args)))
        if special:
            return f"{head} {special}"
        if perturbed:
            # (forward() passes them only when the instance's own inputs, as a batch of the
            # same size, pass: the values are what the model refuses)
            return (f"{head} These were not the instance's own inputs but those the explanation "
                    f"method built from it for {', '.join(map(repr, perturbed))}: units set to "
                    "the modality's baseline (occlusion, LIME, SHAP, ablation) or points on the "
                    "path from the baseline (integrated gradients); the instance's own inputs, "
                    "as a batch of the same size, pass. Give that modality a baseline the model "
                    "accepts (its baseline= argument), or make forward() accept such inputs.")
        last = getattr(self, "_last_shapes", {})
        # the modality to suspect: its batch shape appears in the message, or its per-instance
        # shape differs from the inputs the model last took
        named = [n for n, v in args.items() if str(list(v.shape)) in text]
        changed = [n for n, v in args.items()
                   if tuple(v.shape[1:]) != last.get(n, tuple(v.shape[1:]))]
        # a text's length changes from instance to instance: suspect the others first, and the
        # text only where the error is about inputs (a model's own error on an instance, such
        # as a RuntimeError of its checks, was blamed on the question's length)
        about_inputs = (isinstance(error, AssertionError) or not text.strip()
                        or any(w in text.lower() for w in INPUT_WORDS))
        changed = ([n for n in changed if n not in self.embedding_layers]
                   or (changed if about_inputs else []))
        if not (named or changed or about_inputs):
            return (f"{head} The error names no shape or size, and no input other than a "
                    "text's length differs from those the model took before: it most likely "
                    "comes from the model's own code (forward() or what it calls) on this "
                    "instance's values. Its traceback shows where: "
                    "adapter.predict(adapter.prepare(instance).raw) in a cell raises this error "
                    "with the model's own as its cause.")
        if named:
            hint = (f" The input of modality {named[0]!r} (shape {tuple(args[named[0]].shape)}) "
                    "appears in the error.")
        elif changed:
            hint = " " + "; ".join(
                f"Modality {n!r} has shape {tuple(args[n].shape[1:])} per instance, where the "
                f"model last took {last[n]}" for n in changed) + "."
        else:
            hint = ""
        series = [n for n in (named or changed or self.names)
                  if self.modalities[n].kind == "timeseries"]
        layout = (f" A TimeSeries ({', '.join(map(repr, series))}) reaches forward() as [batch, "
                  "time, channels]: a model whose Conv1d takes [batch, channels, time] "
                  "transposes it in forward (x.transpose(1, 2))." if series else "")
        return (f"{head}{hint} Check that the modalities give the shapes the model "
                "expects (channels, image size, series length, columns) and that they "
                f"are listed in the order of the model's arguments.{layout}")

    def _table_hint(self, args: Mapping[str, torch.Tensor]) -> str:
        """For an index out of an embedding table's range (torch's "index out of range in
        self"): a text longer than a table of the model that is not its token embedding (a
        table of positions: one named so first; tables of under 8 rows, such as a BERT's token
        types, are not taken for one), or ''."""
        own = {id(m) for m in self.embedding_layers.values()}
        tables = [(name, m.num_embeddings) for name, m in self.model.named_modules()
                  if isinstance(m, nn.Embedding) and id(m) not in own and m.num_embeddings >= 8]
        tables.sort(key=lambda t: ("pos" not in t[0].lower(), t[1]))
        long = [(n, int(args[n].shape[-1])) for n in self.embedding_layers if n in args]
        over = [(n, t, name, rows) for n, t in long for name, rows in tables if t > rows]
        if not over:
            return ""
        n, t, name, rows = over[0]
        return (f"The text of {n!r} has {t} tokens, and the model's table {name!r} has {rows} "
                f"rows (a table of positions?): shorten the text to at most {rows} tokens "
                f"(the Text modality's tokenize= can cut it), or give the model a longer "
                f"table.")

    def _signature_hint(self) -> str:
        """What to change when the model's forward() cannot take the modalities the way the
        adapter calls it (by keyword only, **kwargs, one dict of all of them, fewer arguments
        than modalities, or not by the modalities' names); '' when its signature fits."""
        try:
            params = inspect.signature(self.model.forward).parameters.values()
        except (TypeError, ValueError):
            return ""
        kinds = {p.name: p.kind for p in params}
        var_keyword = any(k == inspect.Parameter.VAR_KEYWORD for k in kinds.values())
        var_positional = any(k == inspect.Parameter.VAR_POSITIONAL for k in kinds.values())
        positional = [n for n, k in kinds.items() if k in (inspect.Parameter.POSITIONAL_ONLY,
                                                             inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        keyword_only = [n for n, k in kinds.items() if k == inspect.Parameter.KEYWORD_ONLY]
        named = [n for n in kinds if kinds[n] not in (inspect.Parameter.VAR_KEYWORD,
                                                       inspect.Parameter.VAR_POSITIONAL)]
        if self.keyword_inputs:
            unknown = [n for n in self.names if n not in kinds]
            if not unknown or var_keyword:
                return ""
            if len(named) == 1 and len(self.names) > 1 and named[0] not in self.names:
                return self._one_argument_hint(named[0])
            return (f"keyword_inputs=True calls model(**inputs), but forward() has no argument "
                    f"named {unknown[0]!r}: name the modalities after forward()'s arguments "
                    f"({named}), or drop keyword_inputs=True to pass them in order.")
        if var_positional or len(positional) >= len(self.names):
            return ""
        if var_keyword or keyword_only:
            by_keyword = keyword_only or ["**" + next(n for n, k in kinds.items()
                                                      if k == inspect.Parameter.VAR_KEYWORD)]
            return (f"The model's forward() takes {', '.join(by_keyword)} by keyword: pass "
                    f"keyword_inputs=True to ModelAdapter (it calls model(**inputs); the "
                    f"modalities' names must be the argument names).")
        if len(positional) == 1 and len(self.names) > 1 and positional[0] not in self.names:
            return self._one_argument_hint(positional[0])     # all of them in one dict?
        return (f"The model's forward() takes {len(positional)} input"
                f"{'' if len(positional) == 1 else 's'} ({positional}) but the adapter has "
                f"{len(self.names)} modalities ({self.names}): give ModelAdapter one modality per "
                f"argument of forward(), in its order.")

    def _unpassed_hint(self, error: Exception) -> str:
        """For the TypeError of a call without required arguments ("forward() missing 1
        required positional argument: 'attention_mask'") that are not modalities: that the
        adapter passes only the modalities' inputs, and how to give the others
        (``_unpassed_message``); '' for any other error."""
        found = re.search(r"missing \d+ required (?:positional|keyword-only) arguments?: (.+)",
                          str(error)) if isinstance(error, TypeError) else None
        missing = re.findall(r"'([^']+)'", found.group(1)) if found else []
        if not missing or any(n in self.modalities for n in missing):
            return ""
        try:
            params = _forward_signature(self.model)[1]
        except (TypeError, ValueError):
            params = None
        if params is None:
            return self._unpassed_message(missing, None, inside=True)
        P = inspect.Parameter
        fixed = [p for p in params if p.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD)]
        by_name = {p.name: p for p in fixed}
        passes_on = len(fixed) < len(params)
        if self.keyword_inputs and passes_on and not all(n in by_name for n in self.names):
            # model(**inputs) with forward(image, text, **kwargs): the modalities went to
            # **kwargs, and the parameters it lacks are theirs under other names
            odd = [n for n in self.names if n not in by_name]
            return (f"keyword_inputs=True calls model(**inputs), but forward() has no parameter "
                    f"named {odd[0]!r} (it goes to its **kwargs), and lacks "
                    f"{', '.join(map(repr, missing))}: name the modalities after forward()'s "
                    f"parameters ({[p.name for p in fixed]}), or drop keyword_inputs=True to pass "
                    "them in order.")
        if all(n in by_name for n in missing):
            if all(n in by_name for n in self.names):
                takes = {n: n for n in self.names}
            elif not self.keyword_inputs:
                positional = [p.name for p in fixed
                              if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
                takes = dict(zip(self.names, positional))
            else:
                takes = None
            return self._unpassed_message(missing, takes)
        if passes_on:
            return self._unpassed_message(missing, None, inside=True)
        return (f"A function that forward() calls was called without "
                f"{', '.join(map(repr, missing))}: the inputs' shapes and order are not the "
                "cause; give that argument in the model's code.")

    def _unpassed_message(self, missing: Sequence[str], takes: Mapping[str, str] | None,
                          inside: bool = False) -> str:
        """What to do about the arguments ``missing`` that the model requires and the adapter
        does not pass (it passes the modalities' inputs only), with a ready-made wrapper that
        builds them (an attention mask from a text's pad id). takes: {modality: the parameter
        of forward() that takes it} (None: the wrapper calls the model as the adapter does);
        inside: forward() passes its arguments on to code that requires them."""
        listed = ", ".join(map(repr, missing))
        one = len(missing) == 1
        call = (", ".join(f"{n}=..." for n in self.names) if self.keyword_inputs
                else ", ".join(self.names))
        who = ("The model's forward() (or the code it passes its arguments on to)" if inside
               else "The model's forward()")
        fills = {name: self._fill_for(name) for name in missing}
        try:
            params = _forward_signature(self.model)[1]
        except (TypeError, ValueError):
            params = []
        by_position = {p.name for p in params if p.kind == p.POSITIONAL_ONLY}
        if takes is None:
            args = [f"{n}={n}" if self.keyword_inputs else n for n in self.names]
        else:
            param_of = {param: n for n, param in takes.items()}
            order = [p.name for p in params if p.name in param_of]
            order += [p for p in param_of if p not in order]
            args = [param_of[p] if p in by_position else f"{p}={param_of[p]}" for p in order]
        args += [fills[n] if n in by_position else f"{n}={fills[n]}" for n in missing]
        lead = "        return self.model("
        code, line = [], lead
        for k, a in enumerate(args):
            piece = a + (", " if k < len(args) - 1 else ")")
            if len(line) + len(piece.rstrip()) > 92 and line != lead:
                code.append(line.rstrip())
                line = " " * len(lead)
            line += piece
        code.append(line)
        masks = [n for n in missing if fills[n].endswith(".long()")]
        texts = [t for t in self.names if any(fills[n].startswith(f"({t} != ") for n in masks)]
        if texts:
            t = self.modalities[texts[0]]
            code.insert(0, f"        # the mask: 1 at the tokens of {texts[0]!r}, 0 at its padding"
                           f" ({getattr(t, 'pad_token', 'pad')!r}, id {getattr(t, 'pad_id', 0)})")
        example = ", e.g. an attention mask from the text's pad id" if masks else ""
        todo = [n for n in missing if fills[n] == "..."]
        todo_note = (f" (in place of ..., how the model's {', '.join(map(repr, todo))} "
                     f"{'is' if len(todo) == 1 else 'are'} made from the inputs)" if todo else "")
        return (f"{who} requires {listed} (no default), which "
                f"{'is not a modality' if one else 'are not modalities'}: the adapter passes "
                f"only the modalities' inputs (model({call})), so {'it is' if one else 'they are'}"
                f" never given and every call fails (the inputs' shapes and order are not the "
                f"cause). Wrap the model so that its forward() takes the modalities alone and "
                f"builds {'it' if one else 'them'}{example}{todo_note}:\n\n"
                f"class Wrapped(torch.nn.Module):\n"
                f"    def __init__(self, model):\n"
                f"        super().__init__()\n"
                f"        self.model = model\n\n"
                f"    def forward(self, {', '.join(self.names)}):\n"
                + "\n".join(code) + "\n\n"
                "adapter = ModelAdapter(Wrapped(model), ...)   # decision_layer, embedding_layers: "
                "the same module objects as before (or their names with 'model.' in front)\n\n"
                f"Or give {listed} a default of None in forward() and handle None there"
                + (" (no attention mask: every token attended)." if masks else "."))

    def _fill_for(self, argument: str) -> str:
        """Code that builds a model's argument from the modalities' inputs, for the wrapper of
        ``_unpassed_message``: an attention mask (1 at a text's tokens, 0 at its padding), token
        type ids, position ids; '...' for any other."""
        texts = [n for n in self.names if n in self.embedding_layers]
        low = argument.lower()
        text = next((t for t in texts if t.lower() in low), texts[0] if texts else None)
        if text is None:
            return "..."
        if "mask" in low and not any(w in low for w in ("pixel", "image", "img", "vis")):
            return f"({text} != {getattr(self.modalities[text], 'pad_id', 0)}).long()"
        if "token_type" in low:
            return f"torch.zeros_like({text})"
        if "position_ids" in low:
            return f"torch.arange({text}.shape[1], device={text}.device).expand_as({text})"
        return "..."

    def _one_argument_hint(self, argument: str) -> str:
        """How to wrap a model whose forward() takes every modality in one argument (a dict)."""
        items = ", ".join(f"{n!r}: {n}" for n in self.names)
        return (f"The model's forward() takes one argument ({argument!r}) but the adapter has "
                f"{len(self.names)} modalities ({self.names}). If it takes them in one dict, "
                f"wrap it so that each modality is an argument of forward():\n\n"
                f"class Wrapped(torch.nn.Module):\n"
                f"    def __init__(self, model):\n"
                f"        super().__init__()\n"
                f"        self.model = model\n\n"
                f"    def forward(self, {', '.join(self.names)}):\n"
                f"        return self.model({{{items}}})\n\n"
                f"adapter = ModelAdapter(Wrapped(model), ...)   # decision_layer: the same "
                f"module object as before\n")

    def _dtype_hint(self, args: Mapping[str, torch.Tensor]) -> str:
        """Says so when the floating inputs' dtype differs from the model's parameters'."""
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)
        odd = [n for n, v in args.items() if v.is_floating_point() and v.dtype != dtype]
        if dtype is None or not odd:
            return ""
        name = str(dtype).replace("torch.", "")
        return (f"The model's parameters are {name} but modality {odd[0]!r} is "
                f"{str(args[odd[0]].dtype).replace('torch.', '')}: pass {name} tensors as inputs "
                f"(torch.as_tensor(x, dtype=torch.{name})), or convert the model to the inputs' "
                "dtype (model.float()). An instance prepared before the model was converted "
                "keeps the old dtype: prepare it again (adapter.prepare(instance)).")

    def model_inputs(self, raw: Mapping[str, torch.Tensor],
                     continuous: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The model's arguments {name: [B, ...]} for a batch (copies when B = 1): the raw inputs
        (a batch of one expanded to B), with the continuous inputs in place of those of non-text
        modalities (text's continuous inputs enter through its embedding layer: see ``run``,
        which takes these arguments' token ids as the ones whose embedding it replaces)."""
        continuous = continuous or {}
        b = max([v.shape[0] for v in continuous.values()] + [v.shape[0] for v in raw.values()])
        args = {}
        for n in self.names:
            if n in continuous and n not in self.embedding_layers:
                args[n] = continuous[n]
            else:
                x = raw[n]
                if x.shape[0] == 1 and b > 1:
                    x = x.expand(b, *x.shape[1:])
                    if n in self.embedding_layers:
                        # token ids copied for real (B x T integers): a model that embeds them
                        # in parts then passes parts whose place in the batch can be read
                        # (``_rows_of_part``); rows of an expanded tensor all sit at one place
                        x = x.contiguous()
                if n in self.embedding_layers and any(m in self.embedding_layers
                                                      and _same_storage(x, v)
                                                      for m, v in args.items()):
                    # two text modalities given one tensor (or views of one): a copy, so that
                    # each embedding call is told whose ids it takes by the tensor it receives
                    x = x.clone()
                args[n] = x
        if b == 1:
            # the instance's own tensors (its Prepared raw and continuous inputs) are passed as
            # copies: a model that changes its input in place (refused after the call, see
            # check_inputs_kept; or unseen, through x.numpy() or x.data) must not change the
            # instance every later result is computed from. A batch of one costs next to
            # nothing to copy; a larger batch is built for the call (masks, paths). A gradient
            # method's leaf is passed as it is (a copy here would add a step to every backward
            # pass): the kernels make their leaves from copies of the instance's tensors
            args = {n: v if v.requires_grad else v.clone() for n, v in args.items()}
        return args

    def run(self, fn: Callable[[], Any], continuous: Mapping[str, torch.Tensor] | None = None,
            features: bool = False, inputs: Mapping[str, torch.Tensor] | None = None):
        """fn() -- a computation on this adapter's model, such as part of its graph -- under the
        adapter's lock (the model is shared between threads), in eval mode (see ``_eval_mode``:
        a model in training mode gets its modes back afterwards), with text modalities' embedding
        outputs replaced by their ``continuous`` inputs on the embedding calls that receive
        their token ids (those of ``inputs``, by default the arguments ``model_inputs`` last
        built in this thread; an AdapterError when no call does); with features=True returns
        (fn(), h) where h is the input of the decision layer during that call."""
        store = {} if features else None
        with self._lock, self._eval_mode(), self._hooks(continuous, store, inputs) as matched:
            out = fn()
        if matched.unclear:
            self._check_unclear(matched)
        if continuous and len(matched.names) < len(continuous):
            self._unsubstituted(continuous, matched.names, matched, inputs)
        if not features:
            return out
        if "h" not in store:
            raise AdapterError("The decision layer was never called during the forward pass: pass "
                               "decision_layer= the module that computes the logits.",
                               code="decision-layer")
        if store["calls"] > 1:
            raise AdapterError(
                f"The decision layer ({type(self.decision_layer).__name__}) was called "
                f"{store['calls']} times in one forward pass (e.g. late fusion, head(a) + "
                "head(b)), so its input is not one decision-level vector per instance and neuron "
                "targets and features would take the first call only. Pass decision_layer= a "
                "module called once per forward pass, on the fused vector.",
                code="decision-calls")
        return out, self._checked_features(store["h"])

    def _checked_features(self, h: Any) -> torch.Tensor:
        if not isinstance(h, torch.Tensor) or h.dim() != 2:
            got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
            raise AdapterError(
                f"The decision layer's input has shape {got}; neuron targets and features need "
                "one vector per instance [batch, features]. Pass decision_layer= a module whose "
                "input is that vector (after pooling over tokens, time steps or positions).",
                code="decision-input")
        return h

    def output(self, logits: torch.Tensor, features: torch.Tensor | None, target: Target
               ) -> torch.Tensor:
        """The explained scalar per batch row: a class logit or a decision neuron's activation."""
        if target.kind == "class":
            return logits[:, target.index]
        if features is None:
            raise AdapterError("A neuron target needs features=True in forward().")
        features = self._checked_features(features)
        if target.index >= features.shape[1]:
            raise AdapterError(f"Neuron {target.index} is out of range: the decision layer has "
                               f"{features.shape[1]} inputs.")
        return features[:, target.index]

    def scalar(self, prepared: Prepared, continuous: Mapping[str, torch.Tensor], target: Target
               ) -> torch.Tensor:
        """f_target for a batch of continuous inputs [B, ...] of one instance: a tensor [B]."""
        return self.target_output(prepared.raw, continuous, target)

    def target_output(self, raw: Mapping[str, torch.Tensor],
                      continuous: Mapping[str, torch.Tensor] | None, target: Target) -> torch.Tensor:
        """f_target [B] for model inputs ``raw`` (batch B or 1), with those continuous inputs
        replaced: a class logit, or a decision neuron's activation (the forward pass then
        captures the decision features)."""
        if target.kind == "class":
            return self.forward(raw, continuous)[:, target.index]
        logits, h = self.forward(raw, continuous, features=True)
        return self.output(logits, h, target)

    @torch.no_grad()
    def predict(self, raw: Mapping[str, torch.Tensor],
                continuous: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits for a batch of model inputs (no gradients), optionally with those continuous
        inputs put in."""
        return self.forward(raw, continuous)

    @torch.no_grad()
    def features(self, raw: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, C], h [B, d]) for a batch of model inputs (no gradients)."""
        return self.forward(raw, features=True)

    def decision_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(W [C, d], b [C]) of the decision layer, which must be an nn.Linear with one output
        per class (or one, a binary model's logit); else an AdapterError that says what to pass
        instead (a sparse model's weights serve the contributions and the path)."""
        layer = self.decision_layer
        sparse = ("sparse_model=fit_sparse_model_for(adapter, train_set) to the Explorer (or to "
                  "decision_contributions / prediction_path): its weights over h then give the "
                  "contributions and the path.")
        if not isinstance(layer, nn.Linear):
            raise AdapterError(
                f"The decision layer, {_layer_name(self.model, layer)}, is not an nn.Linear, so "
                "it has no weights W[c, j] to weigh the neurons h_j by for each class. Pass "
                + sparse, code="decision-not-linear")
        if not _gives_logits(layer, self.n_classes):
            # only the default can be such a layer (a given one is refused at construction):
            # no nn.Linear has one output per class, so the last nn.Linear was taken
            raise AdapterError(
                f"The decision layer, {_layer_name(self.model, layer)}, has "
                f"{layer.out_features} outputs, not one per class ({self.n_classes}): no "
                "nn.Linear of the model computes the logits (a head written with F.linear, a "
                "matmul or a sum of several heads), so it was taken as the last nn.Linear, and "
                "its weights are not the classes' (its input is not h either). Make the head an "
                "nn.Linear over the decision-level vector h; or call an nn.Identity on h in "
                "forward, pass decision_layer= that module, and pass " + sparse,
                code="decision-not-logits")
        w = host_array(layer.weight)
        b = (host_array(layer.bias) if layer.bias is not None
             else np.zeros(w.shape[0], dtype=w.dtype))
        if w.shape[0] == 1 and self.n_classes == 2:   # one logit z: the classes' -z/2 and z/2
            return np.concatenate([-w, w]) / 2, np.concatenate([-b, b]) / 2
        return w, b
