"""Stage 3: multimodal representations, the input h(x) of the model's decision layer.

* ``extract_features(adapter, dataset)``: h and the logits over a dataset, in batches of
  instances whose inputs have equal shapes (never padded), through
  the adapter's forward pre-hook on the decision layer (the hook lives for one forward call and is
  removed in ``finally``, also when the model raises). Results are cached on disk as ``.npz``
  (no pickle), keyed by a hash of the model's weights, settings and structure
  (``ModelAdapter.fingerprint``: not integer, list or plain-tensor attributes), the code of
  its classes, the plain global values they read and the functions they name or its modules
  hold that are not hashed as code, torch's and built-ins, by name (``model_code_digest``),
  its forward hooks and pre-hooks (``forward_hooks_text``), the modalities' preprocessing, the
  number of classes and the dataset's fingerprint; a change of any gives another key, a
  corrupt or inconsistent
  file (logits of another width included) is ignored and recomputed, writes are atomic. The
  cache folder is bounded: after a write, the least recently used files beyond
  $MULTIVIZ_CACHE_MAX_MB (default 2048) are removed; ``clear_feature_cache()`` empties it.
* ``StreamingExtremes`` / ``neuron_extremes``: for every neuron the k instances with the largest
  and the smallest activation in one streaming pass, memory O(k d) whatever the dataset size.
* ``decision_contributions(adapter, instance)``: the local view, h(x) and each neuron's
  contribution W[c, j] h_j(x) to a class.

Nothing here is global: every function takes its adapter, so two adapters (two models) can be
used side by side in one process.
"""
from __future__ import annotations

import dis
import functools
import hashlib
import inspect
import os
import re
import stat
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from ..notices import warn
from ..adapter import (MASK_FINITE, AdapterError, ModelAdapter, ModelInputError,
                       _outside_stacklevel, hash_module_settings, hash_tensor,
                       masked_logits_hint)
from ..atomic_file import write_atomically
from ..data import MultimodalDataset
from ..modalities import _stable_callable, _stable_text, hash_code
from ..precision import dtype_eps, outputs_differ, roundoff_eps
from ..progress import ProgressFn, report
from ..checks import is_integer, positive_int
from .common import (GIVE_UP_AFTER, ROWS_INDEPENDENT_ADVICE, ModelFailure, as_prepared,
                     indices_or_all, input_shapes, memory_error, runnable_parts)

# v2: the key covers modality signatures and the module tree; v3: batches of equal shapes only
# (no padding, which changed the features of models that pool without a pad mask), and the
# instances that could not be prepared are recorded; v4: the default Text tokenizer reads quoted
# words and curly apostrophes as words (other token ids for such texts), and the dataset
# fingerprint hashes dicts, sets and plain objects by content. Instances the model cannot run
# are recorded among the skipped ones too, without a new version: before, such an instance
# stopped the extraction, so no file was ever written for them; the format is unchanged.
# v6: the instances whose outputs are not finite are left out (and recorded as skipped).
CACHE_VERSION = "features-v6"


# -- cache location ----------------------------------------------------------------------------
def default_cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The directory of on-disk caches: ``path``, else $MULTIVIZ_CACHE, else
    ~/.cache/multiviz_widgets (a leading ``~`` is the home folder in the first two too)."""
    if path is not None:
        return Path(path).expanduser()          # "~/cache": the home's, not a folder named ~
    env = os.environ.get("MULTIVIZ_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "multiviz_widgets"


def _host_float(t: torch.Tensor) -> torch.Tensor:
    """A model output on the host, as float64 when it is float64 (a float64 model's features
    rounded to float32 tie distinct values, which the extremes then rank by index), else as
    float32 (float16 and bfloat16 included)."""
    t = t.detach()
    return (t if t.dtype == torch.float64 else t.float()).cpu()


def _features_dtype(a: np.ndarray) -> type:
    """The dtype features are kept in: float64 for a float64 model's, float32 otherwise."""
    return np.float64 if a.dtype == np.float64 else np.float32


def _module_name(adapter: ModelAdapter, module) -> str:
    """The dotted name of one of the model's submodules (its class name where it has none)."""
    for name, mod in adapter.model.named_modules():
        if mod is module:
            return name
    return type(module).__name__


def _decision_layer_name(adapter: ModelAdapter) -> str:
    return _module_name(adapter, adapter.decision_layer)


def _torch_module(name: str | None) -> bool:
    """Whether a module is torch's own: "torch" or below it. Not a prefix test on the name:
    torchvision, torchaudio, torch_geometric or a user's torch_utils.py are not torch, and
    their code changes without torch's version changing."""
    return name == "torch" or (name or "").startswith("torch.")


def _own_function(f) -> bool:
    """A plain function of the user's (or a library's other than torch's): its code is hashed."""
    return (isinstance(f, types.FunctionType)
            and not _torch_module(getattr(f, "__module__", None)))


def model_code_digest(model: torch.nn.Module) -> str:
    """A hash of the code the model's forward pass runs, as far as it can be found: every
    function (methods, static and class methods, properties) of the classes of its modules,
    up their bases, except torch's own (they change only with torch, whose version the key has
    too), and the module-level functions those call by name, recursively. An edit of
    ``forward`` (tanh to relu) in a notebook then gives another feature-cache key. A decorated
    method (``@torch.no_grad()``, a user's decorator) is followed to the function it wraps
    (``__wrapped__``, and the functions its closure holds). A function set on a module
    instance (``model.forward = patched``, an activation given to the constructor) is hashed
    too, unless code already hashed makes it (a lambda forward sets). Not followed:
    functions reached through attributes (``helpers.act(x)``) or held in containers, and the
    values (other than functions) a closure holds.

    The plain values of their modules that these functions read as globals (``SCALE = 3.0``
    read in ``forward``) are hashed too, by content (``_plain_global_text``): numbers, texts,
    flags, small containers of them, arrays and tensors of up to ``_GLOBAL_ARRAY_MAX``
    elements. So are, by name (``_callable_identity``), the functions and classes read as
    globals or held by a module whose code is not hashed: torch's (``ACT = torch.tanh``
    rebound to ``torch.sigmoid``, ``self.act = F.relu`` given ``F.silu``) and built-ins.
    Not: a global one of these functions writes (``global calls; calls += 1``, a counter),
    larger arrays, and other objects (their state cannot be seen)."""
    h = hashlib.sha256()
    seen: set[int] = set()
    reads: dict[tuple[str, str], tuple[dict, str]] = {}   # (module, name) -> (globals, name)
    written: set[tuple[str, str]] = set()

    visited: list = []                             # the functions hashed, in order

    def visit(f) -> None:
        if id(f) in seen:
            return
        seen.add(id(f))
        visited.append(f)
        h.update(f"{f.__module__}.{f.__qualname__}".encode())
        # a functools.wraps wrapper (torch.no_grad's included) copies the wrapped function's
        # module and name but runs its own code: without this an edit of the decorated
        # function's body would keep the cache key
        inner = getattr(f, "__wrapped__", None)
        if inner is not None and _own_function(inner):
            visit(inner)
        hash_code(f.__code__, h)        # what it does, not where (a notebook cell's file)
        for name in f.__code__.co_names:           # module-level helpers called by name
            g = f.__globals__.get(name)
            if _own_function(g):
                visit(g)
        module = str(f.__globals__.get("__name__", f.__module__))
        loads, stores = _global_names(f.__code__)
        for name in loads:
            reads.setdefault((module, name), (f.__globals__, name))
        written.update((module, name) for name in stores)
        # a decorator without functools.wraps keeps the decorated function only in its closure
        for cell in f.__closure__ or ():
            try:
                g = cell.cell_contents
            except ValueError:                     # a cell not filled yet
                continue
            if _own_function(g):
                visit(g)

    classes = {}
    for m in model.modules():
        for cls in type(m).__mro__:
            if _torch_module(cls.__module__) or cls is object:
                continue
            classes[f"{cls.__module__}.{cls.__qualname__}"] = cls
    for name in sorted(classes):
        for attr, value in sorted(vars(classes[name]).items()):
            # a property's getter and setter, a cached_property's function (.func), a static
            # or class method's (.__func__)
            for f in ((value.fget, value.fset) if isinstance(value, property)
                      else (value.func,) if isinstance(value, functools.cached_property)
                      else (getattr(value, "__func__", value),)):
                if not isinstance(f, types.FunctionType) and hasattr(f, "__wrapped__"):
                    # a wrapper that is not a function (functools.lru_cache's, a decorator
                    # class's instance): only the function it wraps can be hashed
                    try:
                        f = inspect.unwrap(f)
                    except ValueError:             # a cycle of __wrapped__
                        continue
                if _own_function(f):
                    visit(f)
    # functions set on a module itself (model.forward = patched, a closure over the old one;
    # an activation given to the constructor) run in the forward pass too, so their code (and
    # the functions their closures hold) is hashed, under the module's place in the model; not
    # a function made by code already hashed (self.act = lambda ... in forward: it may change
    # from pass to pass, and its code is part of forward's)
    nested = set()
    stack = [f.__code__ for f in visited]
    while stack:
        for const in stack.pop().co_consts:
            if isinstance(const, types.CodeType) and const not in nested:
                nested.add(const)
                stack.append(const)
    for place, m in model.named_modules():
        for attr, value in sorted(vars(m).items()):
            f = getattr(value, "__func__", value)            # a bound method's function
            if _own_function(f):
                if f.__code__ not in nested:
                    h.update(f"instance {place}.{attr}".encode())
                    seen.discard(id(f))      # hashed again here: its place is part of the key
                    visit(f)
                continue
            # torch's function or a built-in (self.act = F.relu): its code changes only with
            # torch's or Python's version, but which one the module holds changes the pass
            text = _callable_identity(value)
            if text is not None:
                h.update(f"instance {place}.{attr}={text}".encode())
    for where in sorted(set(reads) - written):
        scope, name = reads[where]
        if name not in scope or id(scope[name]) in seen:     # a function hashed as code
            continue
        value = scope[name]
        text = _plain_global_text(value)
        if text is None:
            # ACT = torch.tanh called in forward, rebound to torch.sigmoid in a cell re-run
            text = _callable_identity(value)
        if text is not None:
            h.update(f"{where[0]}.{name}={text}".encode())
    return h.hexdigest()[:32]


#: The built-in callables told by their name: C functions (torch.tanh, len, math.sqrt), the
#: methods of built-in types (torch.Tensor.relu, str.upper) and numpy's ufuncs (np.tanh).
_BUILTIN_CALLABLES = (types.BuiltinFunctionType, types.MethodDescriptorType,
                      types.WrapperDescriptorType, types.MethodWrapperType,
                      types.ClassMethodDescriptorType, np.ufunc)


def _callable_identity(v, depth: int = 0) -> str | None:
    """A text of a function a model's code reads as a global, or one of its modules holds,
    that is not hashed as code: a built-in's, a class's or torch's own function's module and
    qualified name (torch's code changes only with its version, which the key has too); a
    user's function's name and code (one named only in a lambda, which ``model_code_digest``
    does not follow); a functools.partial's function and plain arguments (any other argument
    by its type); a bound method's function and its object's type. The same in every process
    (no address), so that a new kernel finds the cache an earlier one wrote. None for any
    other object (its state cannot be seen)."""
    if depth > 4:                                   # a partial of a partial of ...
        return None
    if isinstance(v, functools.partial):
        func = _callable_identity(v.func, depth + 1)
        if func is None:
            return None
        args = [_argument_text(x, depth + 1) for x in v.args]
        kwargs = [f"{k}={_argument_text(x, depth + 1)}" for k, x in sorted(v.keywords.items())]
        return f"partial({func},{','.join(args + kwargs)})"
    if isinstance(v, types.MethodType):
        func = _callable_identity(v.__func__, depth + 1)
        owner = type(v.__self__)
        return None if func is None else f"{func} of {owner.__module__}.{owner.__qualname__}"
    if not isinstance(v, (type, types.FunctionType, *_BUILTIN_CALLABLES)):
        return None
    name = getattr(v, "__qualname__", None) or getattr(v, "__name__", "?")
    # a method descriptor (torch.Tensor.relu) or a built-in bound to an object (x.mul) has
    # no module: its class's is taken
    module = (getattr(v, "__module__", None)
              or getattr(getattr(v, "__objclass__", None), "__module__", None)
              or type(getattr(v, "__self__", None)).__module__)
    text = f"{module}.{name}"
    if _own_function(v):
        h = hashlib.sha256()
        hash_code(v.__code__, h)
        text += f":{h.hexdigest()[:16]}"
    return text


def _argument_text(v, depth: int) -> str:
    """A functools.partial's argument in ``_callable_identity``: a plain value by content, a
    function by its identity, any other object by its type (its state cannot be seen)."""
    text = _plain_global_text(v)
    if text is None:
        text = _callable_identity(v, depth)
    return text if text is not None else f"<{type(v).__module__}.{type(v).__qualname__}>"


def _global_names(code) -> tuple[set[str], set[str]]:
    """(the names ``code`` reads as globals, those it writes or deletes as globals), its
    nested code (lambdas, comprehensions, inner functions) included."""
    loads: set[str] = set()
    stores: set[str] = set()
    for ins in dis.get_instructions(code):
        if ins.opname == "LOAD_GLOBAL":
            loads.add(ins.argval)
        elif ins.opname in ("STORE_GLOBAL", "DELETE_GLOBAL"):
            stores.add(ins.argval)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            inner_loads, inner_stores = _global_names(const)
            loads |= inner_loads
            stores |= inner_stores
    return loads, stores


#: The largest array or tensor (in elements) that is hashed when a model's code reads it as a
#: global (256 KiB of float32): larger ones are left out of the key, which would otherwise hash
#: a dataset a notebook keeps as a global on every key.
_GLOBAL_ARRAY_MAX = 1 << 16

#: The most items of a tuple or frozenset read as a global that are hashed.
_GLOBAL_ITEMS_MAX = 1000


def _plain_global_text(v, depth: int = 0) -> str | None:
    """The text (``_stable_text``) of a value a model's code reads as a global, when it is
    plain and small: a number, text, flag or None; an array or tensor of up to
    ``_GLOBAL_ARRAY_MAX`` elements; a tuple or frozenset of up to ``_GLOBAL_ITEMS_MAX`` such
    values. None (left out of the key) for anything else: a list, dict or set (a model may
    fill one as it runs: a memo), a function, class or module (followed as code, or not at
    all), any other object (its state cannot be seen)."""
    if v is None or isinstance(v, (bool, int, float, str, np.generic)):
        return _stable_text(v)
    if isinstance(v, (np.ndarray, torch.Tensor)):
        size = v.numel() if isinstance(v, torch.Tensor) else v.size
        if size > _GLOBAL_ARRAY_MAX or (isinstance(v, np.ndarray) and v.dtype.hasobject):
            return None
        try:
            return _stable_text(v)
        except (RuntimeError, TypeError, ValueError):     # a meta tensor, a sparse one
            return None
    if isinstance(v, (tuple, frozenset)) and depth < 4:
        # not a list, dict or set: a model may fill one as it runs (a memo, a counter), which
        # would change the key after every forward pass
        if len(v) > _GLOBAL_ITEMS_MAX:
            return None
        if any(_plain_global_text(x, depth + 1) is None for x in v):
            return None
        return _stable_text(v)
    return None


def _hook_text(hook) -> str:
    """A forward hook by what it runs: a function by its code and the values it reads
    (``_stable_callable``); one of torch's own hook objects (``weight_norm``'s) by its type and
    settings, since torch's code changes only with its version; any other object by its
    identity (in this process only)."""
    if (not isinstance(hook, (types.FunctionType, types.MethodType, functools.partial))
            and _torch_module(type(hook).__module__)):
        return (f"<{type(hook).__module__}.{type(hook).__qualname__} "
                f"{_stable_text(dict(getattr(hook, '__dict__', {})))}>")
    # a dict, list or set it reads by its type alone: a hook that records activations into
    # one changes it at every forward pass, which must not change the key (nor is a change of
    # a config dict it reads seen: pass cache=False then)
    return _stable_callable(hook, mutable_by_type=True)


def forward_hooks_text(model: torch.nn.Module) -> str:
    """A text of every forward hook and forward pre-hook that runs in the model's forward
    pass, in the order they run: torch's global ones (``register_module_forward_hook``) and
    each module's, with how each is called (with keyword arguments, always). A hook that
    changes an input or an output (an ablation) changes the features as much as a weight."""
    M = torch.nn.modules.module
    parts = []

    def add(where: str, hooks, with_kwargs, always=()) -> None:
        for hid, hook in list(hooks.items()):
            flags = "k" * (hid in with_kwargs) + "a" * (hid in always)
            parts.append(f"{where}[{flags}]={_hook_text(hook)}")
    add("global-pre", M._global_forward_pre_hooks, ())
    add("global", M._global_forward_hooks,
        getattr(M, "_global_forward_hooks_with_kwargs", {}),
        getattr(M, "_global_forward_hooks_always_called", {}))
    for name, module in model.named_modules():
        add(f"{name}:pre", getattr(module, "_forward_pre_hooks", {}),
            getattr(module, "_forward_pre_hooks_with_kwargs", {}))
        add(f"{name}:", getattr(module, "_forward_hooks", {}),
            getattr(module, "_forward_hooks_with_kwargs", {}),
            getattr(module, "_forward_hooks_always_called", {}))
    return ";".join(parts)


def features_key(adapter: ModelAdapter, dataset: MultimodalDataset,
                 indices: Sequence[int] | None = None, batch_size: int = 256) -> str:
    """The cache key of a feature extraction: weights hash + the model's module tree and code
    (``model_code_digest``) + its forward hooks and pre-hooks, torch's global ones included
    (``forward_hooks_text``; a dict, list or set a hook reads by its type alone) + each
    modality's preprocessing (``Modality.signature()``, in
    adapter order) + the number of classes (a one-logit model read as two classes gives two
    logits) + dataset fingerprint + what was asked.

    Cost: hashes the weights (and, the first time, the dataset's contents); no forward pass.
    """
    h = hashlib.sha256()
    # under the model's lock: a kernel on another thread adds hooks of its own for the length
    # of its passes (the adapter's input hooks), which are no part of what the features are
    with adapter._lock:
        hooks = forward_hooks_text(adapter.model)
    signatures = [adapter.modalities[name].signature() for name in adapter.names]
    # how the model is called (by position or by name) and where text enters it (its
    # embedding layers) change the features as much as the weights do
    calling = (f"keyword_inputs={bool(adapter.keyword_inputs)};embeddings="
               + ",".join(f"{m}:{_module_name(adapter, layer)}"
                          for m, layer in sorted(adapter.embedding_layers.items())))
    for part in (CACHE_VERSION, adapter.fingerprint(), repr(adapter.model),
                 model_code_digest(adapter.model), hooks,
                 f"torch={torch.__version__}", *signatures,
                 f"classes={adapter.n_classes}", dataset.fingerprint(),
                 _decision_layer_name(adapter), ",".join(adapter.names), calling,
                 str(int(batch_size))):
        h.update(part.encode())
        h.update(b"\0")
    h.update(indices_or_all(indices, len(dataset)).tobytes())
    return h.hexdigest()[:40]


# -- streaming over a dataset ------------------------------------------------------------------
#: The errors that leave one instance out of the features (it cannot be prepared: a text with
#: no tokens, a non-finite value...); any other error stops the extraction. An instance the
#: model cannot run (a ModelInputError on its own inputs) is left out too (``runnable_parts``).
_UNPREPARABLE = (ValueError, TypeError, LookupError, RuntimeError)

#: How the reason of an instance left out because the model cannot run it begins.
_MODEL_FAILED = "ModelInputError: "

#: How the reason of an instance left out because the model's output on it is NaN or infinite
#: begins (its features cannot be ranked, projected or fit, nor its prediction read).
_NOT_FINITE = "model output not finite: "
#: Added to the reason of a row not finite only by -inf logits.
_MASKED_REASON = " (-inf: a masked class?)"


def _finite_rows(logits: torch.Tensor, h: torch.Tensor, positions: Sequence[int],
                 nonfinite: dict[int, str]) -> torch.Tensor | None:
    """None when every row of the batch's logits and h is finite; else the mask of the finite
    rows, the others recorded in ``nonfinite`` {position: which values}."""
    bad_h = ~torch.isfinite(h).all(1)
    bad_logits = ~torch.isfinite(logits).all(1)
    bad = bad_h | bad_logits
    if not bad.any():
        return None
    for row in bad.nonzero().flatten().tolist():
        parts = [f"{name} {int((~torch.isfinite(t[row])).sum())} of {t.shape[1]} values"
                 for name, t, b in (("decision features", h, bad_h),
                                    ("logits", logits, bad_logits)) if b[row]]
        masked = (_MASKED_REASON if not bad_h[row] and masked_logits_hint(logits[row:row + 1])
                  else "")
        nonfinite[positions[row]] = ", ".join(parts) + " NaN or infinite" + masked
    return ~bad


def _shape_batches(adapter: ModelAdapter, dataset: MultimodalDataset, idx: np.ndarray,
                   batch_size: int, failed: dict[int, Exception]
                   ) -> Iterator[tuple[list[int], dict[str, torch.Tensor], list[int]]]:
    """Yield (positions in ``idx``, model inputs {name: [B, ...]}, the positions of the batch's
    shape group not yet yielded after it) for batches of up to
    ``batch_size`` instances whose model inputs have the same shapes, so that no batch is ever
    padded (a model that pools without a pad mask gives every instance the features of its own
    forward pass) and instances of different sizes never meet.

    A first pass only reads every instance's shapes; then each shape group runs in batches, in
    the order of its first instance: one batch of inputs is in memory at a time. An instance
    that cannot be prepared goes into ``failed`` {position: error}: found in the first pass, or,
    when a batch fails its checks (a non-finite value...), by preparing that batch's instances
    one at a time.
    """
    groups: dict[tuple, list[int]] = {}
    for pos, i in enumerate(idx):
        try:
            groups.setdefault(input_shapes(adapter, dataset[int(i)]), []).append(pos)
        except _UNPREPARABLE as exc:
            failed[pos] = exc
    for positions in groups.values():
        for s in range(0, len(positions), batch_size):
            chunk, rest = positions[s:s + batch_size], positions[s + batch_size:]
            try:
                yield chunk, adapter.collate([dataset[int(idx[p])] for p in chunk]), rest
                continue
            except _UNPREPARABLE:
                pass
            good = []
            for p in chunk:                          # find the instances that fail alone
                try:
                    adapter.collate([dataset[int(idx[p])]], on_device=False)
                    good.append(p)
                except _UNPREPARABLE as exc:
                    failed[p] = exc
            if good:
                yield good, adapter.collate([dataset[int(idx[p])] for p in good]), rest


def _skipped_text(skipped: dict[int, str], total: int) -> str:
    first = "; ".join(f"#{i} ({why})" for i, why in list(skipped.items())[:3])
    more = " ..." if len(skipped) > 3 else ""
    kinds = {_MODEL_FAILED: "run by the model", _NOT_FINITE: "given finite outputs"}
    unprepared = any(not str(why).startswith(tuple(kinds)) for why in skipped.values())
    how = ["prepared"] * unprepared + [said for start, said in kinds.items()
                                       if any(str(why).startswith(start)
                                              for why in skipped.values())]
    how = ", ".join(how[:-1]) + " or " + how[-1] if len(how) > 1 else how[0]
    return (f"{len(skipped)} of {total} instances could not be {how} and are left out "
            f"of the decision features: {first}{more}")


def _warn_skipped(skipped: dict[int, str], total: int, cached: bool = False) -> None:
    if skipped:
        again = (" (as the feature cache recorded them: extract_features(..., refresh=True) "
                 "runs them again)" if cached else "")
        warn(_skipped_text(skipped, total) + again, RuntimeWarning,
                      stacklevel=_outside_stacklevel())


#: How many rows the check of a batch's independence runs (``_check_rows_independent``).
ROWS_CHECKED = 8


def _check_rows_independent(adapter: ModelAdapter, raw: dict, out: tuple, ran) -> None:
    """An AdapterError (code "batch-dependent") when a row's outputs (logits, h) depend on the
    other rows of its batch: a model with statistics over the batch (BatchNorm without running
    statistics, h - h.mean(0), dynamic quantisation's per-batch scale) whose features would
    depend on which instances share a batch. The first row with finite outputs, among k =
    min(B, ROWS_CHECKED) rows of the batch, is compared with the same row in a batch of k
    copies of it: the same shapes run the same kernels in the same order, so a model that
    treats rows independently gives the same values (to rounding). Cost: two forward passes of
    k rows; two more only when they differ (a second batch of copies, to tell randomness, which
    check() reports, from the batch; and one of a row alone that reads the precision the model
    computes in)."""
    finite = (torch.isfinite(out[0]).all(1) & torch.isfinite(out[1]).all(1)).nonzero()
    if len(finite) == 0:
        return                          # no finite row to compare (they are left out)
    r = int(finite[0])
    b = len(next(iter(raw.values())))
    k = min(b, ROWS_CHECKED)
    order = torch.tensor([r] + [i for i in range(b) if i != r][:k - 1])
    batch = {n: v[order] for n, v in raw.items()}
    copies = {n: v[r:r + 1].expand(k, *v.shape[1:]).contiguous() for n, v in raw.items()}
    rows = 2 * k                     # what the model is given, counted as the passes run
    try:
        mixed, same = adapter.features(batch), adapter.features(copies)
        eps = dtype_eps(adapter, *mixed, *same)
        if not any(outputs_differ(x[:1], y[:1], eps) for x, y in zip(mixed, same)):
            return
        rows += k
        again = adapter.features(copies)
        if any(outputs_differ(x, y, eps) for x, y in zip(same, again)):
            return                   # a random model: check() says so, not this
        rows += 1
        eps = max(eps, roundoff_eps(adapter, {n: v[:1] for n, v in copies.items()}))
        differ = [outputs_differ(x[:1], y[:1], eps) for x, y in zip(mixed, same)]
        if not any(differ):
            return
        largest = max(float((x[:1].double() - y[:1].double()).abs().max())
                      for x, y, d in zip(mixed, same, differ) if d)
        what = "logits" if differ[0] else "decision features h"
        raise AdapterError(
            f"The model's {what} for an instance depend on the other instances in its batch: "
            f"in a batch of {k} with others and in a batch of {k} copies of itself, they differ "
            f"by up to {largest:.3g}. Every view of the dataset would then depend on how its "
            "instances were batched. " + ROWS_INDEPENDENT_ADVICE,
            code="batch-dependent")
    finally:
        if ran is not None:
            ran[0] += rows


def stream_features(adapter: ModelAdapter, dataset: MultimodalDataset, batch_size: int = 256,
                    indices: Sequence[int] | None = None, progress: ProgressFn = None,
                    message: str = "decision features", skipped: dict | None = None
                    ) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """Yield (indices [B], logits [B, C], h [B, d]) batch by batch, storing nothing.

    Each forward pass batches instances whose model inputs have the same shapes (up to
    ``batch_size``; see ``_shape_batches``), so nothing is padded and every instance's features
    equal those of its own forward pass; the batches come group by group, so the indices are
    not in dataset order (each batch names its own). An instance that cannot be prepared, or
    that the model cannot run (it raises ModelInputError on its inputs: a series shorter than a
    convolution's kernel...) or whose outputs are NaN or infinite, is left out: it is
    recorded in ``skipped`` {dataset index:
    reason} when a dict is given, and a RuntimeWarning names how many and the first few at the
    end; when no instance can be prepared and run the first error is raised. Any other error
    (out of memory...) stops the extraction as it is.
    Cost: one forward pass per instance (no gradients), and a first pass that reads each
    instance's input shapes; progress is reported per batch. A batch the model cannot run is
    halved until the instances it cannot run alone are found (about 2 log2(batch_size) more
    forward passes per such instance; none when every batch runs); when the first
    GIVE_UP_AFTER (32) instances of one input shape all fail, the rest of that shape is left
    out untried (its reason says so), and the other shapes still run.
    """
    idx = indices_or_all(indices, len(dataset))
    for positions, logits, h in _feature_batches(adapter, dataset, idx, batch_size, progress,
                                                 message, skipped):
        yield idx[positions], logits, h


def _feature_batches(adapter, dataset, idx, batch_size, progress, message, skipped,
                     ran: list[int] | None = None):
    """stream_features' batches as (positions in idx [B], logits, h). ``ran`` [count]: every
    row the model is given is added to it, those left out after (non-finite outputs) and the
    calls a batch's halving makes included, since each of them cost a forward pass."""
    if not isinstance(adapter, ModelAdapter):
        raise TypeError(f"stream_features needs a ModelAdapter, got {type(adapter).__name__}.")
    batch_size = positive_int(batch_size, "batch_size")
    total = len(idx)
    report(progress, 0, total, message)
    failed: dict[int, Exception] = {}          # position in idx -> error (not prepared)
    unrunnable: dict[int, ModelFailure] = {}   # position in idx -> the model's error on it
    computed = last = yielded = 0
    nonfinite: dict[int, str] = {}             # position -> which output was not finite
    # per shape group: the instances it ran and the failures before it began; a group whose
    # first GIVE_UP_AFTER instances all fail is given up (its other instances left out untried:
    # a series shorter than a kernel fails for every instance of its length), and the others
    # are still run; when no group runs any, the first error is raised at the end
    group = {"ran": 0, "failed_before": 0}
    untried: dict[int, str] = {}               # position -> why it was not tried
    new_group = True

    checked = [False]

    def run(raw):
        rows = len(next(iter(raw.values())))
        if ran is not None:
            ran[0] += rows
        out = adapter.features(raw)
        if rows > 1 and not checked[0]:
            checked[0] = True
            _check_rows_independent(adapter, raw, out, ran)
        return out
    for positions, raw, rest in _shape_batches(adapter, dataset, idx, batch_size, failed):
        if new_group:
            group = {"ran": 0, "failed_before": len(unrunnable)}
        new_group = not rest
        if positions[0] in untried:
            continue

        def give_up(group=group) -> bool:
            return (group["ran"] == 0
                    and len(unrunnable) - group["failed_before"] >= GIVE_UP_AFTER)
        try:
            # one forward pass of the batch; only when the model raises ModelInputError is it
            # halved until the instances it cannot run are found (left out like unprepared ones)
            for part, (logits, h) in runnable_parts(run, raw, positions, unrunnable,
                                                    give_up):
                if h.dim() != 2:
                    raise AdapterError(
                        f"The decision layer's input has shape {tuple(h.shape)}; decision-level "
                        "features must be one vector per instance [batch, d]. Pass "
                        "decision_layer= the final linear layer that maps a pooled vector to "
                        "the logits.")
                computed += len(part)
                group["ran"] += len(part)
                logits, h = _host_float(logits), _host_float(h)
                finite = _finite_rows(logits, h, part, nonfinite)
                if finite is not None:
                    yielded += int(finite.sum())
                    yield (np.asarray(part, dtype=np.int64)[finite.numpy()], logits[finite],
                           h[finite])
                else:
                    yielded += len(part)
                    yield (np.asarray(part, dtype=np.int64), logits, h)
                last = computed + len(failed) + len(unrunnable) + len(untried)
                report(progress, last, total, message)
        except ModelInputError as e:
            if memory_error(e):
                raise
            tried = len(unrunnable) - group["failed_before"]
            note = (f"not tried: the model ran none of the first {tried} instances of the same "
                    f"input shapes ({type(e.__cause__ or e).__name__})")
            for pos in [q for q in positions if q not in unrunnable] + list(rest):
                untried[pos] = note
            report(progress, computed + len(failed) + len(unrunnable) + len(untried), total,
                   message)
    if computed and last < total:
        # the last batch's instances all failed their checks (or the model), so no batch
        # came after them: the count still ends at the total
        report(progress, computed + len(failed) + len(unrunnable) + len(untried), total,
               message)
    why = {p: f"{type(e).__name__}: {e}" for p, e in failed.items()}
    why.update((p, _MODEL_FAILED + f.brief()) for p, f in unrunnable.items())
    why.update((p, _MODEL_FAILED + note) for p, note in untried.items())
    why.update((p, _NOT_FINITE + note) for p, note in nonfinite.items())
    reasons = {int(idx[p]): why[p] for p in sorted(why)}
    if why and not computed:
        first = min(set(failed) | set(unrunnable))     # an instance that was tried
        raise failed[first] if first in failed else unrunnable[first].error
    if computed and not yielded:
        first = min(nonfinite)
        raise ValueError(f"The model's output is not finite for every instance it ran "
                         f"({computed}; instance {int(idx[first])}: {nonfinite[first]}): "
                         "there are no decision features to show. Check the model for "
                         "numerical problems (a log or sqrt of a negative, a division by 0)."
                         + (f" A logit of -inf counts too: {MASK_FINITE}."
                            if _MASKED_REASON in nonfinite[first] else ""))
    if skipped is not None:
        skipped.update(reasons)
    _warn_skipped(reasons, total)


@dataclass
class Features:
    """Decision-level features of a dataset: h [N, d], logits [N, C], dataset indices [N].

    ``skipped`` {dataset index: reason}: the instances asked for that could not be prepared
    (a text with no tokens...), that the model cannot run (reason "ModelInputError: the
    model raised ...") or whose logits or features are NaN or infinite (reason "model output
    not finite: ..."), which have no row here.
    """

    h: np.ndarray
    logits: np.ndarray
    indices: np.ndarray
    key: str = ""
    from_cache: bool = False
    # the rows the model was given: with those left out after it ran (non-finite outputs) and
    # the calls that halving a batch it could not run made, since each cost a forward pass
    forward_passes: int = 0
    seconds: float = 0.0
    path: str | None = None
    skipped: dict = field(default_factory=dict)

    @property
    def predictions(self) -> np.ndarray:
        """The model's predicted class per instance [N]."""
        return self.logits.argmax(1)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def d(self) -> int:
        return int(self.h.shape[1])


def _check_cached(h: np.ndarray, logits: np.ndarray, indices: np.ndarray, idx: np.ndarray,
                  d: int | None, skipped: np.ndarray, n_classes: int | None = None) -> None:
    """Raise ValueError when a cache file's arrays are not the features of ``idx`` less the
    ``skipped`` instances."""
    if h.ndim != 2 or logits.ndim != 2 or indices.ndim != 1:
        raise ValueError(f"shapes h {h.shape}, logits {logits.shape}, indices {indices.shape}; "
                         "expected [N, d], [N, C], [N]")
    if not (np.issubdtype(h.dtype, np.floating) and np.issubdtype(logits.dtype, np.floating)
            and np.issubdtype(indices.dtype, np.integer)):
        raise ValueError(f"dtypes h {h.dtype}, logits {logits.dtype}, indices {indices.dtype}")
    if not len(h) == len(logits) == len(indices):
        raise ValueError(f"{len(h)} rows of h, {len(logits)} of logits, {len(indices)} indices")
    if skipped.ndim != 1 or not np.isin(skipped, idx).all():
        raise ValueError("its skipped instances are not among those asked for")
    kept = idx[~np.isin(idx, skipped)]
    if len(indices) != len(kept) or not np.array_equal(indices, kept):
        raise ValueError(f"it holds {len(indices)} instances, not the {len(kept)} asked for")
    if d is not None and h.shape[1] != d:
        raise ValueError(f"h has {h.shape[1]} features but the decision layer takes {d}")
    if n_classes is not None and logits.shape[1] != n_classes:
        raise ValueError(f"its logits are of {logits.shape[1]} classes, the adapter's "
                         f"{n_classes}")


def _load_cached(path: Path, key: str, idx: np.ndarray, d: int | None = None,
                 n_classes: int | None = None) -> Features | None:
    """The cached features of ``idx`` under ``key``, or None (missing, foreign, corrupt or not
    matching what was asked: the last two with a warning)."""
    try:
        # the file opened here, so that it is closed also when np.load cannot read it (a
        # truncated file: np.load's own handle was left to the garbage collector)
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            h, logits, indices = z["h"], z["logits"], z["indices"]
            skipped, reasons = z["skipped_indices"], z["skipped_reasons"]
        if skipped.shape != reasons.shape or not np.issubdtype(skipped.dtype, np.integer):
            raise ValueError(f"skipped instances {skipped.shape} {skipped.dtype} with reasons "
                             f"{reasons.shape}")
        _check_cached(h, logits, indices, idx, d, skipped, n_classes)
        return Features(h, logits, indices, key, True, 0, 0.0, str(path),
                        dict(zip(skipped.tolist(), map(str, reasons.tolist()))))
    except (FileNotFoundError, NotADirectoryError):
        # no such file (a cache folder under a file is no folder: writing says so)
        return None
    except Exception as exc:  # corrupt or inconsistent file: recompute and overwrite
        warn(f"Ignoring unreadable feature cache {path} ({type(exc).__name__}: {exc}); "
                      "recomputing.", RuntimeWarning, stacklevel=3)
        return None


#: A feature cache file's name: the 40 hex digits of its key (``features_key``).
_CACHE_NAME = re.compile(r"[0-9a-f]{40}\.npz")

#: The temporary file ``write_atomically`` writes a cache file into before renaming it
#: (``.<key>.npz.<random>.tmp``): one older than ``_STALE_TMP_SECONDS`` was left by a writer
#: that was killed.
_CACHE_TMP_NAME = re.compile(r"\.[0-9a-f]{40}\.npz\.[A-Za-z0-9_]+\.tmp")
_STALE_TMP_SECONDS = 3600.0

#: The size the cache folder is kept under (in MB) when $MULTIVIZ_CACHE_MAX_MB is not set.
DEFAULT_CACHE_MAX_MB = 2048.0


def cache_max_bytes() -> float:
    """The most bytes of feature cache files kept in a cache folder: $MULTIVIZ_CACHE_MAX_MB
    (a number of megabytes, 0 or more; ``inf``: no bound) else DEFAULT_CACHE_MAX_MB. A value
    that is not such a number is ignored with a RuntimeWarning."""
    raw = os.environ.get("MULTIVIZ_CACHE_MAX_MB", "").strip()
    if raw:
        try:
            mb = float(raw)
            if not mb >= 0:                          # NaN too
                raise ValueError
            return mb * 1e6
        except ValueError:
            warn(f"MULTIVIZ_CACHE_MAX_MB={raw!r} is not a number of megabytes (0 or "
                          f"more, or inf); using {DEFAULT_CACHE_MAX_MB:g}.", RuntimeWarning,
                          stacklevel=_outside_stacklevel())
    return DEFAULT_CACHE_MAX_MB * 1e6


def _cache_entries(folder: Path, pattern: re.Pattern) -> list[tuple[Path, os.stat_result]]:
    """(path, stat) of the plain files in ``folder`` whose names match ``pattern`` (none when
    the folder cannot be read); files removed meanwhile (by another process) are left out."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    out = []
    for name in names:
        if pattern.fullmatch(name):
            try:
                st = os.stat(folder / name, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                out.append((folder / name, st))
    return out


def _remove(path: Path) -> int:
    """Remove a file; its size when it was removed, else -1 (gone already, not allowed)."""
    try:
        size = path.stat().st_size
        path.unlink()
        return size
    except OSError:
        return -1


def _remove_stale_temporaries(folder: Path, older_than: float = _STALE_TMP_SECONDS) -> int:
    """Remove the cache's temporary files in ``folder`` last written more than ``older_than``
    seconds ago (a writer killed mid-write leaves one; a live writer's is younger): the bytes
    freed."""
    now = time.time()
    return sum(max(_remove(p), 0) for p, st in _cache_entries(folder, _CACHE_TMP_NAME)
               if now - st.st_mtime > older_than)


def _evict(folder: Path, keep: Path, limit: float) -> None:
    """Remove the least recently used cache files of ``folder`` (by modification time, which a
    cache hit renews) until the rest take at most ``limit`` bytes; never ``keep``, the file
    just written, even when it alone is larger."""
    entries = _cache_entries(folder, _CACHE_NAME)
    total = sum(st.st_size for _, st in entries)
    if total <= limit:
        return
    keep = keep.resolve()
    for p, st in sorted(entries, key=lambda e: (e[1].st_mtime, e[0].name)):
        if total <= limit:
            break
        if p.resolve() == keep:
            continue
        if _remove(p) >= 0:
            total -= st.st_size


def _touch(path: Path) -> None:
    """Mark a cache file as just used (its modification time: what eviction orders by; access
    times are often not kept). A read-only cache folder is used all the same."""
    try:
        os.utime(path)
    except OSError:
        pass


def _save_atomic(path: Path, **arrays) -> None:
    """Write a cache file atomically, then tidy its folder: the temporary files of writers
    killed more than an hour ago are removed, and the least recently used cache files beyond
    ``cache_max_bytes()`` (never this one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # 0644: a cache is as readable as its directory
    write_atomically(path, lambda f: np.savez(f, **arrays), binary=True, mode=0o644)
    _remove_stale_temporaries(path.parent)
    _evict(path.parent, path, cache_max_bytes())


def clear_feature_cache(cache_dir: str | os.PathLike | None = None) -> int:
    """Remove the decision-feature cache files of ``cache_dir`` (default: ``default_cache_dir()``,
    $MULTIVIZ_CACHE or ~/.cache/multiviz_widgets), and the temporary files writers killed
    mid-write left there over an hour ago; nothing else in the folder. Returns the number of
    bytes freed. The next ``extract_features`` computes its features again."""
    folder = default_cache_dir(cache_dir)
    freed = sum(max(_remove(p), 0) for p, _ in _cache_entries(folder, _CACHE_NAME))
    return freed + _remove_stale_temporaries(folder)


def _model_state(model: torch.nn.Module) -> dict[str, str | None]:
    """{name: a hash} of each parameter and persistent buffer (the state_dict's), of each other
    buffer's dtype and shape only (a model may keep its last activation in one, or fill a
    rotary embedding's cache in its first pass), and under "" (no tensor's name) of the
    modules' settings (``module_settings``): to tell whether the model changed during a pass.
    None for an empty tensor, which a model may fill without changing what it computes."""
    persistent = set(model.state_dict())
    state: dict[str, str | None] = {}
    for k, v in [*model.named_parameters(), *model.named_buffers()]:
        if v.numel() == 0:
            state[k] = None
        elif k in persistent:
            h = hashlib.sha256()
            hash_tensor(h, k, v)
            state[k] = h.hexdigest()
        else:
            state[k] = f"{v.dtype}{tuple(v.shape)}"
    settings = hashlib.sha256()
    hash_module_settings(settings, model)
    state[""] = settings.hexdigest()
    return state


def _changed_since(before: dict[str, str | None], model: torch.nn.Module) -> bool:
    """Whether the model is not as ``_model_state`` found it (an empty buffer filled since
    is no change)."""
    now = _model_state(model)
    return any(v is not None and now.get(k) != v for k, v in before.items())


#: What extract_features says when the model changed while its features were computed.
MODEL_CHANGED_DURING_PASS = (
    "The model changed while its decision features were computed (its weights, buffers or "
    "settings): the features mix the model before and after the change, and were not "
    "cached. Compute them again once the model is as you want it (extract_features, or the "
    "Explorer's recompute).")


def extract_features(adapter: ModelAdapter, dataset: MultimodalDataset, batch_size: int = 256,
                     indices: Sequence[int] | None = None, progress: ProgressFn = None,
                     cache: bool = True, cache_dir: str | os.PathLike | None = None,
                     refresh: bool = False) -> Features:
    """Decision-level features h [N, d] and logits [N, C] of a dataset (or of ``indices``).

    Instances are batched with others whose model inputs have the same shapes (nothing is
    padded: see ``stream_features``). An instance that cannot be prepared, or that the model
    cannot run, has no row: it is in ``Features.skipped`` {dataset index: reason} (kept in the
    cache too), with a RuntimeWarning.
    Cost: one forward pass per instance, in batches of up to ``batch_size``; none when the
    on-disk cache (keyed by the weights, the model's settings, code, forward hooks and small
    plain globals, and the dataset's fingerprint: ``features_key``) already holds them.
    ``cache_dir=`` overrides the cache location; ``cache=False`` neither reads nor writes it;
    ``refresh=True`` computes again and overwrites it (an instance the model failed on by a
    fault since fixed is kept skipped in the cache until then; the Explorer's "recompute"
    does this).
    After a write the folder's least recently used cache files beyond $MULTIVIZ_CACHE_MAX_MB
    (default 2048) are removed; ``clear_feature_cache(cache_dir)`` removes them all.
    A dataset without a ``fingerprint()`` (a plain list of instances) is not cached, nor are
    features during whose pass the model changed (a RuntimeWarning says so).
    """
    batch_size = positive_int(batch_size, "batch_size")
    idx = indices_or_all(indices, len(dataset))
    t0 = time.perf_counter()
    key = path = None
    if cache and callable(getattr(dataset, "fingerprint", None)):
        key = features_key(adapter, dataset, idx, batch_size)
        path = default_cache_dir(cache_dir) / f"{key}.npz"
        layer = adapter.decision_layer
        d = layer.in_features if isinstance(layer, torch.nn.Linear) else None
        hit = None if refresh else _load_cached(path, key, idx, d, adapter.n_classes)
        if hit is not None:
            _touch(path)                  # recently used: the last to be evicted
            hit.seconds = time.perf_counter() - t0
            report(progress, len(idx), len(idx), "decision features (cached)")
            _warn_skipped(hit.skipped, len(idx), cached=True)
            return hit
    # the model as the pass begins: loaded or trained meanwhile (in a cell, beside the
    # Explorer's pass), its rows would mix two models
    state = _model_state(adapter.model) if path is not None else None
    # each batch written at its rows in the order of idx (the batches come grouped by shape):
    # a list of the batches, their concatenation and its reordering held three copies at once
    hs = ls = None
    filled, skipped, ran = np.zeros(len(idx), dtype=bool), {}, [0]
    for positions, logits, h in _feature_batches(adapter, dataset, idx, batch_size, progress,
                                                 "decision features", skipped, ran):
        h, logits = h.numpy(), logits.numpy()   # on the host, float32 or float64 (_host_float)
        if hs is None:
            hs = np.empty((len(idx), h.shape[1]), dtype=h.dtype)
            ls = np.empty((len(idx), logits.shape[1]), dtype=logits.dtype)
        hs[positions], ls[positions], filled[positions] = h, logits, True
    if hs is None:
        raise ValueError("No instances to extract features from: the dataset (or indices) is empty.")
    if not filled.all():                       # the instances left out: their rows dropped
        hs, ls = hs[filled], ls[filled]
    kept = idx[filled]
    feats = Features(hs, ls, kept, key or "", False, ran[0], 0.0, None, skipped)
    if path is not None and _changed_since(state, adapter.model):
        # the rows mix two models, and must never be read back under the first one's key
        warn(MODEL_CHANGED_DURING_PASS, RuntimeWarning, stacklevel=2)
        feats.key, path = "", None
    if path is not None:
        try:
            _save_atomic(path, key=np.array(key), h=feats.h, logits=feats.logits, indices=kept,
                         skipped_indices=np.array(list(skipped), dtype=np.int64),
                         skipped_reasons=np.array(list(skipped.values()), dtype=str))
            feats.path = str(path)
        except OSError as exc:
            warn(f"Could not write the feature cache to {path} ({exc}); continuing "
                          "without it. Set MULTIVIZ_CACHE to a writable directory.",
                          RuntimeWarning, stacklevel=2)
    feats.seconds = time.perf_counter() - t0
    return feats


# -- global neuron analysis: streaming top-k / bottom-k ------------------------------------------
@dataclass
class NeuronExtremes:
    """For every neuron j: the k instances with the largest and the smallest h_j.

    top_indices[j] / top_values[j] are sorted from the largest down; bottom_* from the smallest up.
    Ties go to the instance seen first, as in a stable full sort.
    """

    top_indices: np.ndarray      # [d, k] dataset indices
    top_values: np.ndarray       # [d, k]
    bottom_indices: np.ndarray   # [d, k]
    bottom_values: np.ndarray    # [d, k]
    n_instances: int = 0
    method: str = "streaming_extremes"
    params: dict = field(default_factory=dict)
    forward_passes: int = 0
    seconds: float = 0.0

    @property
    def k(self) -> int:
        return int(self.top_indices.shape[1])

    @property
    def d(self) -> int:
        return int(self.top_indices.shape[0])

    def _neuron(self, neuron) -> int:
        if not is_integer(neuron) or not 0 <= neuron < self.d:
            raise IndexError(f"neuron must be an integer in 0..{self.d - 1} (there are {self.d} "
                             f"decision neurons), got {neuron!r}; negative indices are refused "
                             "rather than counted from the end.")
        return int(neuron)

    def top(self, neuron: int) -> list[tuple[int, float]]:
        """[(dataset index, activation)] of the neuron's top instances, largest first.
        ``neuron`` is in 0..d-1 (a negative one raises IndexError, it does not count from the end)."""
        j = self._neuron(neuron)
        return [(int(i), float(v)) for i, v in zip(self.top_indices[j], self.top_values[j])]

    def bottom(self, neuron: int) -> list[tuple[int, float]]:
        """[(dataset index, activation)] of the neuron's bottom instances, smallest first
        (``neuron`` as in ``top``)."""
        j = self._neuron(neuron)
        return [(int(i), float(v)) for i, v in zip(self.bottom_indices[j], self.bottom_values[j])]


def gallery_rows(extremes, neuron: int, values: np.ndarray, indices: np.ndarray | None = None
                 ) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(top, bottom) [(dataset index, activation)] of one neuron for a gallery, each instance
    in one row only. ``extremes``: its top and bottom lists (``NeuronExtremes``); ``values``:
    the neuron's activation over the rows of the features, whose dataset indices are
    ``indices`` (default: the row numbers). A dataset of fewer than twice the row's length:
    the bottom row is the lowest of the instances the top row does not show (one instance is
    not both the most and the least activating), taken from ``values``, since the extremes'
    bottom list may then be the top's own (a tie, a dead ReLU's); so it is, of any size, when
    the bottom list holds instances of the top one."""
    k = int(extremes.top_indices.shape[1])
    top = [(int(i), float(v)) for i, v in zip(extremes.top_indices[neuron],
                                                extremes.top_values[neuron]) if i >= 0]
    on_top = {i for i, _ in top}
    values = np.asarray(values)
    bottom = list(zip(extremes.bottom_indices[neuron], extremes.bottom_values[neuron]))
    # (a neuron tied over more than k instances, a dead ReLU's, has the same first k in both)
    if len(values) < 2 * k or any(int(i) in on_top for i, _ in bottom if i >= 0):
        rows = np.arange(len(values)) if indices is None else np.asarray(indices)
        rest = [(int(i), float(v)) for i, v in zip(rows, values)
                if np.isfinite(v) and int(i) not in on_top]
        bottom = sorted(rest, key=lambda t: t[1])[:k]        # ties: in the rows' order
    return top, [(int(i), float(v)) for i, v in bottom if i >= 0 and int(i) not in on_top]


def tied_extremes(values: np.ndarray, shown: Sequence[float]
                  ) -> tuple[int, float, int] | None:
    """(how many instances have the value, the value, how many of the shown have it) when the
    last shown instance of a top or bottom list shares its activation with instances not shown
    (a ReLU neuron's h = 0): those shown with it are then some of a tie, not a ranking (all of
    the list, or its end: top 5, 0, 0, 0 of a neuron off on most instances); else None.
    values: one neuron's activation over the instances ranked."""
    if not len(shown):
        return None
    last = float(shown[-1])
    n = int(np.count_nonzero(np.asarray(values) == last))
    k = int(np.count_nonzero(np.asarray(shown, dtype=np.float64) == last))
    return (n, last, k) if n > k else None


class StreamingExtremes:
    """Running top-k and bottom-k per column of a stream of [B, d] batches, memory O(k d).

    ``update(h_batch, indices)`` merges the batch with the kept [k, d] candidates (a sort over
    k + B rows per column, ties to the lower instance index), so the result equals a full sort
    of all rows seen by value and then index, in whatever order the batches come.
    """

    def __init__(self, k: int, d: int | None = None):
        self.k = positive_int(k, "k (instances kept per neuron)")
        self.d = d
        self.n = 0
        self._top_v = self._top_i = self._bot_v = self._bot_i = None

    def update(self, h_batch, indices=None) -> None:
        """Merge a batch h [B, d] whose rows are instances ``indices`` [B] (default: running count)."""
        if not isinstance(h_batch, torch.Tensor):
            h_batch = np.asarray(h_batch)
            if not h_batch.flags.writeable:   # cached features are read-only: torch would warn
                h_batch = h_batch.copy()      # that it shares their memory
        h = torch.as_tensor(h_batch)
        # float64 features stay float64 (float32 would round distinct values into ties and
        # rank them by index); anything else is compared in float32 as before
        dtype = torch.float64 if (h.dtype == torch.float64 or (
            self._top_v is not None and self._top_v.dtype == torch.float64)) else torch.float32
        h = h.detach().to("cpu", dtype)
        if h.dim() != 2:
            raise ValueError(f"update expects a batch of feature vectors [B, d], got shape {tuple(h.shape)}.")
        b, d = h.shape
        if self.d is None:
            self.d = d
        if d != self.d:
            raise ValueError(f"This batch has {d} features but earlier ones had {self.d}.")
        if b == 0:
            return
        nan = torch.isnan(h)
        if nan.any():
            row, neuron = (int(v) for v in nan.nonzero()[0])
            where = (f"instance {int(np.asarray(indices).reshape(-1)[row])}"
                     if indices is not None and np.asarray(indices).size == b
                     else f"row {self.n + row} of the stream")
            raise ValueError(f"The features contain NaN ({int(nan.sum())} values; the first at "
                             f"{where}, neuron {neuron}); a neuron cannot be ranked. Check the "
                             f"model for numerical problems on that instance.")
        if indices is None:
            idx = torch.arange(self.n, self.n + b, dtype=torch.int64)
        else:
            raw_idx = np.asarray(indices)
            if raw_idx.size and (raw_idx.dtype == np.bool_ or raw_idx.dtype.kind not in "iu"):
                raise ValueError(f"indices must be integer instance numbers, got dtype "
                                 f"{raw_idx.dtype} (e.g. {raw_idx.ravel()[:3].tolist()}); "
                                 "non-integer numbers are not truncated.")
            idx = torch.as_tensor(raw_idx.astype(np.int64)).reshape(-1)
            if idx.numel() != b:
                raise ValueError(f"indices has {idx.numel()} entries for a batch of {b} rows.")
        idx = idx[:, None].expand(b, d)
        self.n += b
        if self._top_v is not None and self._top_v.dtype != h.dtype:   # float32 kept, now float64
            self._top_v, self._bot_v = self._top_v.to(h.dtype), self._bot_v.to(h.dtype)
        if self._top_v is None:
            self._top_v, self._top_i = self._merge(h, idx, True)
            self._bot_v, self._bot_i = self._merge(h, idx, False)
        else:
            self._top_v, self._top_i = self._merge(torch.cat([self._top_v, h]),
                                                   torch.cat([self._top_i, idx]), True)
            self._bot_v, self._bot_i = self._merge(torch.cat([self._bot_v, h]),
                                                   torch.cat([self._bot_i, idx]), False)

    def _merge(self, vals: torch.Tensor, ids: torch.Tensor, largest: bool):
        # ties go to the lower instance index, whatever order the batches come in
        # (stream_features gives them group by group): sort by index, then stably by value
        by_id = torch.sort(ids, dim=0, stable=True).indices
        vals, ids = vals.gather(0, by_id), ids.gather(0, by_id)
        v, order = torch.sort(vals, dim=0, descending=largest, stable=True)
        kk = min(self.k, vals.shape[0])
        return v[:kk].contiguous(), ids.gather(0, order[:kk]).contiguous()

    def result(self) -> NeuronExtremes:
        """The extremes so far (k columns, or fewer when fewer instances were seen)."""
        if self._top_v is None:
            raise ValueError("No instances were seen: call update() with at least one batch.")
        return NeuronExtremes(self._top_i.T.numpy().copy(), self._top_v.T.numpy().copy(),
                              self._bot_i.T.numpy().copy(), self._bot_v.T.numpy().copy(),
                              n_instances=self.n, params={"k": self.k})


def _refuse_repeats(idx: np.ndarray, what: str, fix: str) -> None:
    """A ValueError when an instance number repeats: a neuron's top k would show it k times."""
    values, counts = np.unique(idx, return_counts=True)
    if len(values) < len(idx):
        j = int(np.argmax(counts > 1))
        raise ValueError(f"{what} repeat instance {int(values[j])} ({int(counts[j])} times): a "
                         f"neuron's top and bottom instances would show it more than once; "
                         f"{fix}.")


def neuron_extremes(adapter: ModelAdapter | None, dataset: MultimodalDataset | None = None,
                    k: int = 8, batch_size: int = 256, indices: Sequence[int] | None = None,
                    progress: ProgressFn = None, features: Features | None = None
                    ) -> NeuronExtremes:
    """Every neuron's k top and k bottom instances, in one streaming pass (memory O(k d)).

    With ``features`` (from extract_features) no model is run; otherwise the model runs over the
    dataset in batches and no h is kept beyond the current batch; instances that cannot be
    prepared or that the model cannot run are left out, with a RuntimeWarning naming them (see
    ``stream_features``).
    Cost: one forward pass per instance (none with ``features``).
    """
    t0 = time.perf_counter()
    ext = StreamingExtremes(k)
    passes = 0
    if features is not None and not isinstance(features, Features):
        raise TypeError(f"features= must be a Features object from extract_features(adapter, "
                        f"dataset), got {type(features).__name__}; for a plain array h [N, d] use "
                        "StreamingExtremes(k).update(h) or Features(h, logits, indices).")
    if features is not None:
        if indices is not None:
            raise ValueError("indices= selects instances to run the model on; with features= "
                             "pass the features of those instances instead (extract_features("
                             "..., indices=...)).")
        _refuse_repeats(np.asarray(features.indices), "features.indices (the instances of the "
                        "features)", "extract the features again with each instance once")
        total = len(features)
        for s in range(0, total, positive_int(batch_size, "batch_size")):
            ext.update(features.h[s:s + batch_size], features.indices[s:s + batch_size])
            report(progress, min(total, s + batch_size), total, "neuron extremes")
    else:
        if adapter is None or dataset is None:
            raise ValueError("neuron_extremes needs an adapter and a dataset, or features=.")
        # the rows the model ran, not the rows yielded: those with non-finite outputs are
        # left out of the batches but cost their forward pass all the same
        ran = [0]
        idx = indices_or_all(indices, len(dataset))
        _refuse_repeats(idx, "indices", "give each instance once (np.unique(indices))")
        for positions, _, h in _feature_batches(adapter, dataset, idx, batch_size, progress,
                                                "neuron extremes", None, ran):
            ext.update(h, idx[positions])
        passes = ran[0]
    if ext.n == 0:
        raise ValueError("There are no instances to rank: the dataset, the indices or the "
                         "features are empty. Pass at least one instance.")
    res = ext.result()
    res.params.update(batch_size=batch_size, from_features=features is not None)
    res.forward_passes = passes
    res.seconds = time.perf_counter() - t0
    return res


# -- local view -----------------------------------------------------------------------------------
@dataclass
class DecisionContributions:
    """One instance's decision-level features and each neuron's contribution to a class."""

    class_index: int
    class_name: str
    h: np.ndarray              # [d] activations
    contributions: np.ndarray  # [d] W[c, j] * h_j (or the sparse model's standardised version)
    weights: np.ndarray        # [d] W[c, :] used
    logits: np.ndarray         # [C] of the model
    source: str = "decision_layer"   # or "sparse_model"
    bias: float = 0.0          # the source's bias of the class: contributions.sum() + bias is its logit

    def top(self, k: int = 10, absolute: bool = False) -> list[int]:
        """The k neuron indices ranked by contribution (largest first; by |.| when absolute).
        k >= 0; a negative k raises ValueError (it would otherwise drop neurons from the end)."""
        k = positive_int(k, "k (neurons to rank)", minimum=0)
        c = np.abs(self.contributions) if absolute else self.contributions
        return [int(j) for j in np.argsort(-c, kind="stable")[:k]]


def _few(names: Sequence[str]) -> str:
    return f"{list(names[:6])}{' ...' if len(names) > 6 else ''}"


def check_sparse_model_fits(sparse_model, adapter: ModelAdapter, d: int | None) -> None:
    """A ValueError unless ``sparse_model`` was fit for this model: ``d`` decision features
    (None: not known), the model's classes, in its order (compared without case or the spaces
    around them; a sparse model fit without class_names names them 0..k - 1). A sparse model
    with fewer classes, named 0..k - 1 (or the model's first k), was fit without class_names;
    one whose classes are others was fit on another model."""
    how = ("Refit with fit_sparse_model(..., class_names=adapter.class_names) (or "
           "fit_sparse_model_for(adapter, ...)).")
    if d is not None and sparse_model.weight.shape[1] != d:
        raise ValueError(f"The sparse model has {sparse_model.weight.shape[1]} features but the "
                         f"decision layer has {d}: it was fit on another model.")
    names = [str(n) for n in sparse_model.class_names]
    own = [str(n) for n in adapter.class_names]
    if sparse_model.n_classes != adapter.n_classes:
        # fit_sparse_model without class_names names the classes 0..k - 1 it saw
        counted = names in ([str(k) for k in range(len(names))], own[:len(names)])
        if counted and len(names) < len(own):
            raise ValueError(
                f"The sparse model has {sparse_model.n_classes} classes but the model has "
                f"{adapter.n_classes}: fit without class_names, it only counts the classes up "
                f"to the largest that occurs in its targets. {how}")
        raise ValueError(
            f"The sparse model has {sparse_model.n_classes} classes ({_few(names)}) but the "
            f"model has {adapter.n_classes} ({_few(own)}): it was fit on another model. {how}")
    if names != own and sorted(names) == sorted(own):
        # the same classes in another order: row c of its weights is another class's
        raise ValueError(
            f"The sparse model's classes are the model's in another order ({_few(names)} "
            f"against {_few(own)}): its weights for a class would be another class's. Refit "
            "with fit_sparse_model(..., class_names=adapter.class_names) and targets numbered "
            "as the model's classes (or fit_sparse_model_for(adapter, ...)).")
    folded = [[n.strip().casefold() for n in side] for side in (names, own)]
    if folded[0] != folded[1] and names != [str(k) for k in range(len(names))]:
        # other classes of the same count: its weights for "cat" would explain "k0"
        raise ValueError(
            f"The sparse model's classes ({_few(names)}) are not the model's ({_few(own)}): it "
            f"was fit on another model, or with other class names. {how}")


def _warn_unless_logit(adapter: ModelAdapter, c: int, W: np.ndarray, b: np.ndarray,
                       h: np.ndarray, logits: np.ndarray, eps: float) -> None:
    """Warn when the decision layer's contributions and bias (W h + b) do not add up to the
    model's logits (beyond rounding at ``eps``, the precision the model computes in): forward()
    scales the layer's output (a temperature), or the logits come from another layer (a second
    head, chosen by default), and the neurons' contributions explain what the logit is not. A
    shift common to every class (log_softmax) changes no comparison between them: not
    warned."""
    totals = W.astype(np.float64) @ h.astype(np.float64) + b.astype(np.float64)
    gaps = logits.astype(np.float64) - totals
    scale = (np.abs(W) @ np.abs(h)).astype(np.float64) + np.abs(b) + np.abs(logits)
    tol = np.maximum(1e-6, 64 * max(eps, float(np.finfo(np.float32).eps)) * scale)
    if not np.isfinite(gaps[c]) or abs(gaps[c]) <= tol[c]:
        return
    finite = np.isfinite(gaps)
    if finite.sum() > 1 and np.ptp(gaps[finite]) <= 2 * tol[finite].max():
        return                                         # the same shift for every class
    total, logit = float(totals[c]), float(logits[c])
    warn(f"The decision layer's contributions to class {adapter.class_names[c]!r} add up to "
         f"{total:.6g} (with its bias), but the model's logit is {logit:.6g} (a difference of "
         f"{logit - total:.3g}): forward() changes "
         "the decision layer's output (a temperature, a scale, a sum with another branch) or "
         "its logits come from another layer (a second head). The neuron bars and the "
         "prediction path explain the decision layer's output, not the logit: pass "
         "decision_layer= the layer whose output is the logits where there is one "
         "(multiviz_widgets.check(adapter, instance) says which), or read them as the "
         "decision layer's.")


def decision_contributions(adapter: ModelAdapter, instance, target=None, sparse_model=None
                           ) -> DecisionContributions:
    """h(x) and the contribution of each neuron to class ``target`` (default: predicted class).

    Contributions are W[c, j] h_j(x) with the decision layer's W, or with ``sparse_model``
    (from prediction.fit_sparse_model) W[c, j] (h_j - mean_j) / std_j. Cost: one forward pass.
    """
    from .prediction import check_sparse_model     # prediction imports this module
    check_sparse_model(sparse_model)
    prepared = as_prepared(adapter, instance)
    logits, h = adapter.features(prepared.raw)
    computed_in = (logits.dtype, h.dtype)          # (autocast: bfloat16 in a float32 model)
    if h.dim() != 2:
        raise AdapterError(f"The decision layer's input has shape {tuple(h.shape)}; it must be "
                           "[batch, d].")
    h = _host_float(h[0]).numpy()
    logits = _host_float(logits[0]).numpy()
    if target is None:
        if np.isnan(logits).any() or not np.isfinite(logits.max()):
            raise ValueError(
                f"decision_contributions: the model's output on the instance is not finite "
                f"(logits {np.array2string(logits, precision=3, threshold=8)}), so no class is "
                "predicted (an argmax of NaN would be class 0) and nothing is explained (NaN "
                "results are never returned). Check the model on this instance, e.g. with "
                "multiviz_widgets.check(adapter, instance)." + masked_logits_hint(logits[None]))
        t = adapter.target(int(logits.argmax()))
    else:
        t = adapter.target(target)
    if t.kind != "class":
        raise ValueError("Neuron contributions and the prediction path explain a class (class "
                         f"<- neurons); give a class index or name, not {t}. What drives a "
                         f"neuron: attribute(..., target=Neuron({t.index})).")
    c = t.index
    if not np.isfinite(h).all():
        bad = np.flatnonzero(~np.isfinite(h))
        raise ValueError(
            f"decision_contributions: the decision features h of the instance are not finite "
            f"(h{', h'.join(str(j) for j in bad[:6])}{' ...' if len(bad) > 6 else ''}: NaN or "
            "infinity), so every contribution W[c, j] h_j and their ranking would be NaN (NaN "
            "results are never returned). Check the model on this instance, e.g. with "
            "multiviz_widgets.check(adapter, instance).")
    if sparse_model is not None:
        check_sparse_model_fits(sparse_model, adapter, h.shape[0])
        w = sparse_model.weight[c]
        contrib = w * sparse_model.standardise(h[None])[0]
        source, bias = "sparse_model", sparse_model.bias[c]
    else:
        W, b = adapter.decision_weights()
        w = W[c]
        contrib = w * h
        source, bias = "decision_layer", b[c]
        eps = dtype_eps(adapter, dtypes=[d for d in computed_in if d.is_floating_point])
        _warn_unless_logit(adapter, c, W, b, h, logits, eps)
    # np.array copies: the decision layer's W[c] is a view of the live parameter, and a
    # result must not write through to the model
    dtype = _features_dtype(h)
    return DecisionContributions(c, adapter.class_names[c], h, contrib.astype(dtype),
                                 np.array(w, dtype=dtype), logits, source, float(bias))
