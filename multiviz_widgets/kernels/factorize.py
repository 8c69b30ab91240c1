"""Split a model where one modality meets the others: encoders once, the fusion per pair.

EMAP needs the outputs f(x_m^i, x_rest^j) of all N^2 pairs of N instances: modality m from
instance i, the other modalities from instance j (with two modalities, f(x_a^i, x_b^j)). Most
multimodal models encode each modality on its own before the modalities meet, so most of each
of those forward passes repeats work N times over. :func:`trace_factorization` traces the
model's ``forward`` with ``torch.fx``, labels every operation with the side it depends on
(modality m, the others, or both), and cuts the graph at the *frontier*: the values computed
from one side only that an operation mixing both sides reads. The *encoder* (every one-sided
operation) then runs once on the N instances, and the *fusion* (every operation that reads both
sides) runs on the N^2 pairs of frontier rows. Operations that depend on no input (parameters,
constants) go wherever they are used.

Requirements, checked: the model's own ``forward`` traces with ``torch.fx`` (no Python control
flow on tensor values), called as the adapter calls it (its other arguments keep their defaults;
``*args`` and ``**kwargs`` are fine), and every frontier value is a tensor whose first dimension
is the batch. A submodule that does not trace (an encoder that packs a padded sequence by its
lengths, say) is kept whole, as one operation: the split still works when it reads one side
only, and ``Factorization.opaque_modules`` names it. Whether rows really are independent cannot
be read from the graph, so ``emap`` also compares fused pairs with plain forward passes before
it uses them. A forward that keeps values on the model (``self.maps.append(a)``) gets what it
changed put back after the trace (``_Saved``); one that keeps them where that cannot be done (a
global list) is not split.
Models that declare ``encode_modality``/``fuse_encodings`` do not need this.
"""
from __future__ import annotations

import collections
import gc
import operator
import types
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn.modules.module as module_mod
from torch import nn

from ..adapter import module_settings

__all__ = ["Factorization", "FactorizationError", "reject_factorization", "trace_factorization",
           "traced_split"]


class FactorizationError(ValueError):
    """The model cannot be split into per-modality encoders and a fusion (the message says why).
    ``state``: the model's ``_model_state`` when that was found (None: not tied to one)."""

    state: tuple | None = None


@dataclass
class Factorization:
    """A traced split of ``model(*inputs)`` (see the module docstring).

    encoder(*inputs) -> tuple of frontier values (batch first); ``from_side[k]`` says whether the
    k-th comes from modality ``side`` or from the others. fusion(*frontier values) -> the
    model's output.
    """

    names: tuple[str, ...]
    side: str                      # the modality split from all the others
    inputs: tuple[str, ...]        # the modality of each graph input (the adapter's order)
    encoder: fx.GraphModule
    fusion: fx.GraphModule
    from_side: tuple[bool, ...]    # per frontier value: computed from ``side`` (else the others)
    fused_operations: int          # operations left in the fusion (informative)
    encoder_operations: int        # operations moved to the encoder (informative)
    #: submodules kept whole because torch.fx cannot trace them: {qualified name: why}
    opaque_modules: dict[str, str] = field(default_factory=dict)
    #: (qualified name, tensor) of every attribute the graphs read (get_attr): the split holds
    #: the tensors themselves, so a model whose tensors were replaced since (``model.half()``,
    #: ``model.to(device)`` replace its buffers) needs a new split (``is_current``)
    attributes: tuple = ()
    #: the model's ``_model_state`` when it was traced: which submodule sits at each name and
    #: the settings the trace baked in as constants (``model.temperature = 2.0``)
    state: tuple = ()

    def is_current(self, model: nn.Module, state: tuple | None = None) -> bool:
        """Whether every attribute the split read is still the model's own tensor, and every
        submodule and setting still what it was when it was traced (``state``: the model's
        ``_model_state`` now, when the caller has it)."""
        return (all(_attribute(model, name) is value for name, value in self.attributes)
                and (_model_state(model) if state is None else state) == self.state)

    @property
    def note(self) -> str:
        """'' or which submodules were kept whole (informative, for a result's params)."""
        if not self.opaque_modules:
            return ""
        hooked = [m for m, why in self.opaque_modules.items() if _HOOKED in why]
        untraced = [m for m in self.opaque_modules if m not in hooked]
        parts = ([f"torch.fx cannot trace into {', '.join(untraced)}"] if untraced else []) + (
            [f"{', '.join(hooked)} {'has' if len(hooked) == 1 else 'have'} hooks, called "
             "on real values"] if hooked else [])
        return "traced with submodules kept whole (" + "; ".join(parts) + ")"

    def encode(self, raw: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Frontier values of a batch {modality: [B, ...]}; raises FactorizationError when a
        value is not a tensor with the batch first."""
        b = int(raw[self.names[0]].shape[0])
        values = self.encoder(*(raw[m] for m in self.inputs))
        for k, v in enumerate(values):
            if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != b:
                got = (f"shape {tuple(v.shape)}" if isinstance(v, torch.Tensor)
                       else type(v).__name__)
                where = self.side if self.from_side[k] else "the other modalities"
                raise FactorizationError(
                    f"the {k}-th value where the modalities meet (from {where}) is not a tensor "
                    f"with the batch ({b}) first: {got}")
        return tuple(values)

    def fuse(self, rows: Sequence[torch.Tensor]) -> torch.Tensor:
        """The model's output for pairs of frontier rows (one row per pair in each value)."""
        out = self.fusion(*rows)
        return out[0] if isinstance(out, (tuple, list)) else out


@dataclass(frozen=True)
class _Refusal:
    """A failure to trace or a rejected split, as the cache keeps it: its message and the model
    state it holds for, never the exception itself, whose traceback and context hold the
    frames of the trace and through them the model, so that the weak-keyed cache would keep
    its key (the model, with all its weights) alive for ever."""

    message: str
    state: tuple | None

    def error(self) -> FactorizationError:
        """A new FactorizationError for each raise (a raised one gets the raiser's frames)."""
        error = FactorizationError(self.message)
        error.state = self.state
        return error


#: model -> {(names, keyword_inputs, side, kept whole): Factorization or _Refusal}; traced once.
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def trace_factorization(model: nn.Module, names: Sequence[str], keyword_inputs: bool = False,
                        side: str | None = None, keep_whole: Sequence[nn.Module] = (),
                        retrace: bool = False) -> Factorization:
    """The model's traced split between modality ``side`` (default: the first of two) and the
    other modalities. names: the model's arguments, in order (matched by name when
    ``keyword_inputs``). keep_whole: submodules called as one operation, not traced through
    (the adapter's embedding layers and decision layer, whose hooks put continuous inputs in and
    read the decision-level features: a hook fires only where the module itself is called, and
    torch.fx traces through any module outside torch.nn). Cached per model, and traced again
    when the tensors it read were replaced (``model.half()``) or a submodule or a number, flag
    or text setting changed (``_model_state``); a failure to trace or a rejection is retried
    then too. retrace: trace again whatever is cached (a cached split that disagrees with the
    forward pass may be stale: a setting the state does not see changed, a list say). Raises
    FactorizationError with the reason.
    torch.fx patches ``nn.Module.__call__`` while it traces, so no other thread may run a
    forward pass meanwhile: call it through ``ModelAdapter.run``, which holds the lock that the
    adapter's forward passes take."""
    return traced_split(model, names, keyword_inputs, side, keep_whole, retrace)[0]


def traced_split(model: nn.Module, names: Sequence[str], keyword_inputs: bool = False,
                 side: str | None = None, keep_whole: Sequence[nn.Module] = (),
                 retrace: bool = False) -> tuple[Factorization, bool]:
    """(``trace_factorization``'s split, whether this call traced it: False when it came from
    the cache, so that a caller whose check finds it wrong can trace it again once)."""
    key = _key(model, names, keyword_inputs, side, keep_whole)
    per_model = _CACHE.setdefault(model, {})
    found = None if retrace else per_model.get(key)
    # traced once; again when the model's tensors were replaced since (model.half(), .to(...))
    # or a submodule or setting changed (model.head = nn.Linear(...)): a split, a failure to
    # trace and a rejection alike hold for the model as it was
    state = _model_state(model)
    stale = (not found.is_current(model, state) if isinstance(found, Factorization)
             else found is not None and found.state is not None and found.state != state)
    fresh = found is None or stale
    if fresh:
        try:
            found = _trace(model, *key)
            found.state = state
        except FactorizationError as e:
            found = _Refusal(str(e), state)
        per_model[key] = found
    if isinstance(found, _Refusal):
        raise found.error()
    return found, fresh


def _qualified_names(model: nn.Module, modules: Sequence[nn.Module]) -> tuple[str, ...]:
    """The names (as the tracer sees them, under the adapter's call) of those submodules."""
    wanted = {id(m) for m in modules}
    return tuple(sorted("model." + name for name, m in model.named_modules()
                        if id(m) in wanted and name))


def reject_factorization(model: nn.Module, names: Sequence[str], keyword_inputs: bool,
                         side: str | None, reason: str, keep_whole: Sequence[nn.Module] = ()
                         ) -> None:
    """Remember that the model's traced split gave different numbers from its forward pass, so
    that later calls skip it (``trace_factorization`` then raises with ``reason``) until a
    submodule or setting of the model changes."""
    _CACHE.setdefault(model, {})[_key(model, names, keyword_inputs, side, keep_whole)] = _Refusal(
        f"its traced split was rejected earlier: {reason}", _model_state(model))


def _model_state(model: nn.Module) -> tuple:
    """What a traced split depends on besides the tensors it reads: which submodule object sits
    at each name, and each module's settings that are numbers, flags, texts or tuples of them
    (the trace bakes them into the graph as constants; a long text by its hash), and which
    modules have hooks (kept whole; torch's global hooks refuse the trace): a split or refusal
    made with other hooks is not served. A model that counts its calls in an integer is traced
    again at each call: slower, never stale. A setting under a name beginning with "_" is not
    read (``module_settings``): a split traced before it changed is caught by the check of
    the fused pairs against full forward passes, and traced again (a check's passes spent)."""
    return (tuple((name, id(module), tuple(module_settings(module, integers=True)),
                   _has_call_hooks(module))
                  for name, module in model.named_modules())
            + (("global hooks", _has_call_hooks(module_mod, _GLOBAL_CALL_HOOKS)),))


def _key(model: nn.Module, names: Sequence[str], keyword_inputs: bool, side: str | None,
         keep_whole: Sequence[nn.Module]) -> tuple:
    """(names, keyword_inputs, side, the kept-whole modules' names): what a split is traced for."""
    names = tuple(names)
    if side is None:
        if len(names) != 2:
            raise FactorizationError(f"name the modality to split from the others ({list(names)})")
        side = names[0]
    if side not in names:
        raise FactorizationError(f"{side!r} is not one of the modalities {list(names)}")
    return names, bool(keyword_inputs), side, _qualified_names(model, keep_whole)


def _trace(model: nn.Module, names: tuple[str, ...], keyword_inputs: bool, side: str,
           keep_whole: tuple[str, ...] = ()) -> Factorization:
    if len(names) < 2:
        raise FactorizationError(f"a split needs two or more modalities, the adapter has "
                                 f"{list(names)}")
    root, graph, modality_of, opaque = _trace_graph(model, names, keyword_inputs, keep_whole)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]

    # which of the two groups (side, others) each value depends on
    deps: dict[fx.Node, frozenset] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            deps[node] = frozenset([modality_of[node] == side])
        else:
            deps[node] = frozenset().union(*(deps[i] for i in node.all_input_nodes))
    output = next(n for n in graph.nodes if n.op == "output")
    if len(deps[output]) < 2:
        raise FactorizationError(f"the output never combines {side!r} with the other modalities "
                                 "(or only through in-place operations, which the split cannot "
                                 "follow)")
    frontier = [n for n in graph.nodes
                if len(deps[n]) == 1 and n.op != "output"
                and any(u.op == "output" or len(deps[u]) == 2 for u in n.users)]

    encoder = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node.op != "output" and len(deps[node]) <= 1:
            env[node] = encoder.node_copy(node, lambda n: env[n])
    encoder.output(tuple(env[n] for n in frontier))

    fusion = fx.Graph()
    env = {n: fusion.placeholder(f"frontier_{k}") for k, n in enumerate(frontier)}
    for node in graph.nodes:
        if node in env or (len(deps[node]) == 1 and node.op != "output"):
            continue      # frontier values arrive as arguments; other encoder steps: not needed
        env[node] = fusion.node_copy(node, lambda n: env[n])
    enc_module, fuse_module = _module(root, encoder), _module(root, fusion)
    return Factorization(names=names, side=side, inputs=tuple(modality_of[p] for p in placeholders),
                         encoder=enc_module, fusion=fuse_module,
                         from_side=tuple(True in deps[n] for n in frontier),
                         fused_operations=_operations(fuse_module.graph),
                         encoder_operations=_operations(enc_module.graph),
                         opaque_modules=dict(opaque),
                         attributes=tuple((n.target, _attribute(model, n.target))
                                          for n in graph.nodes if n.op == "get_attr"))


def _attribute(model: nn.Module, target: str):
    """The value a get_attr node of the traced graph reads ("model.a.b": ``model.a.b``), or
    None when the model no longer has it."""
    value = model
    for part in target.removeprefix("model.").split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


#: the hooks a module's __call__ runs (and the process-wide ones, torch's globals): forward
#: hooks would run on the trace's proxies, and a legacy backward hook's set-up indexes the
#: output until it finds a tensor, which a proxy never is (a loop that fills the memory)
_CALL_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks")
_GLOBAL_CALL_HOOKS = ("_global_forward_hooks", "_global_forward_hooks_with_kwargs",
                      "_global_forward_hooks_always_called", "_global_forward_pre_hooks",
                      "_global_backward_hooks", "_global_backward_pre_hooks")
#: torch's own hook dicts on a module (never the forward's state)
_TORCH_HOOK_DICTS = frozenset(k for k in vars(nn.Module()) if "hook" in k)


def _has_call_hooks(owner, names: Sequence[str] = _CALL_HOOKS) -> bool:
    return any(isinstance(h := getattr(owner, name, None), dict) and h for name in names)


#: why a module with forward hooks is not traced through (_HookedModule's message)
_HOOKED = "it has hooks, which tracing would run on symbolic values"


class _OwnHooksAside:
    """The model's own hooks (not its submodules') set aside while it is traced: the
    split never calls the model itself, only its parts, so they do not belong in the graph (its
    check's full forward passes run them; a hook that changes the model's output makes that
    check reject the split). Each dict is swapped for an empty one, not emptied: a handle
    removed meanwhile (from another thread) removes its hook from the dict put back, and a
    hook registered meanwhile is added to it."""

    def __init__(self, model: nn.Module):
        self.model, self.saved = model, []

    def __enter__(self):
        for name in _CALL_HOOKS:
            hooks = getattr(self.model, name, None)
            if isinstance(hooks, dict) and hooks:
                empty = collections.OrderedDict()
                setattr(self.model, name, empty)
                self.saved.append((name, hooks, empty))
        return self

    def __exit__(self, *exc):
        for name, hooks, meanwhile in self.saved:
            hooks.update(meanwhile)
            setattr(self.model, name, hooks)
        self.saved.clear()
        return False


class _HookedModule(Exception):
    """A module with forward hooks that the trace would go through: torch.fx calls it by its
    ``__call__``, so its hooks would run on the trace's proxies (a logger would keep a Proxy,
    a counter would become one). It is kept whole instead: the split calls it on real values,
    hooks and all, so a hook that changes its output is in the numbers too."""


class _AsTheAdapterCalls(nn.Module):
    """model(*inputs) or model(**inputs), as ``ModelAdapter`` calls it: tracing this instead of
    the model's ``forward`` leaves its other arguments (defaults, ``*args``, ``**kwargs``) to
    Python, and gives one graph input per modality."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], keyword_inputs: bool):
        super().__init__()
        self.model, self.names, self.keyword_inputs = model, names, keyword_inputs

    def forward(self, inputs: dict):
        if self.keyword_inputs:
            return self.model(**{m: inputs[m] for m in self.names})
        return self.model(*(inputs[m] for m in self.names))


def _trace_graph(model: nn.Module, names: tuple[str, ...], keyword_inputs: bool,
                 keep_whole: tuple[str, ...] = ()) -> tuple[nn.Module, fx.Graph, dict, dict]:
    """(the model as the adapter calls it, its fx graph, {input node: modality}, {submodule kept
    whole: why it could not be traced})."""
    root = _AsTheAdapterCalls(model, names, keyword_inputs)
    # A submodule that torch.fx cannot trace (Python control flow on tensor values, such as
    # packing a padded sequence by its lengths) is kept whole: called as one operation, it stays
    # on its modality's side of the split when it reads only that modality. Each failing
    # submodule is found by tracing again, up to MAX_OPAQUE_MODULES of them.
    if _has_call_hooks(module_mod, _GLOBAL_CALL_HOOKS):
        raise FactorizationError(
            "torch's global module hooks are set (nn.modules.module.register_module_forward_"
            "hook and the like), which tracing would run on symbolic values; the forward passes "
            "run them on real ones")
    # submodules with hooks are kept whole from the start (their own budget: not retraced,
    # not counted in MAX_OPAQUE_MODULES)
    hooked = {f"model.{name}": _HOOKED for name, m in model.named_modules()
              if name and _has_call_hooks(m)}
    opaque: dict[str, str] = {}
    while True:
        tracer = _Tracer(set(opaque) | set(keep_whole) | set(hooked))
        saved = _Saved(model)
        try:
            with _OwnHooksAside(model):
                graph = tracer.trace(root, concrete_args={"inputs": {m: fx.PH for m in names}})
            why = ""
        except Exception as e:   # fx raises many kinds (TraceError, TypeError, ...)
            why = f"{type(e).__name__}: {e}"
        finally:
            saved.restore()
        # here, past the except clause, its traceback (whose frames hold the trace's proxies)
        # is gone: a proxy still alive is one the model or the user's code kept
        _no_proxies_left(model, tracer)
        if not why:
            break
        where = tracer.failed_in if tracer.failed_in != "model" else None   # not the model itself
        if where and where not in opaque and len(opaque) < MAX_OPAQUE_MODULES:
            opaque[where] = why
            continue
        inside = f" (in submodule {where.removeprefix('model.')!r})" if where else ""
        raise FactorizationError(f"torch.fx cannot trace the model's forward{inside} ({why})")
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(names):
        raise FactorizationError(f"the traced forward has {len(placeholders)} inputs for the "
                                 f"{len(names)} modalities")
    return root, graph, dict(zip(placeholders, names)), {k.removeprefix("model."): v
                                                         for k, v in {**hooked, **opaque}.items()}


#: Submodules that may be kept whole (untraced) before a model counts as untraceable.
MAX_OPAQUE_MODULES = 8


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping the submodules named in ``opaque`` whole, and remembering the
    innermost submodule whose forward failed (``failed_in``; None: the model's own forward)."""

    def __init__(self, opaque: set[str]):
        super().__init__()
        self.opaque, self.failed_in = opaque, None
        self.proxies: list[weakref.ref] = []     # every proxy of the trace, to see none is kept

    def proxy(self, node: fx.Node) -> fx.Proxy:
        made = super().proxy(node)
        self.proxies.append(weakref.ref(made))
        return made

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (module_qualified_name in self.opaque
                or super().is_leaf_module(m, module_qualified_name))

    def call_module(self, m, forward, args, kwargs):
        try:
            if _has_call_hooks(m) and not self.is_leaf_module(m, self.path_of_module(m)):
                raise _HookedModule(_HOOKED)      # hooks registered while it traced
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:     # the innermost failing module is seen first
                try:
                    self.failed_in = self.path_of_module(m) or None
                except NameError:          # a module that is not a submodule of the model
                    pass
            raise


#: How deep (attribute, item, attribute of an object held there...) and over how many objects
#: the values a forward may change while it is traced are saved, and put back after the trace;
#: SAVED_ITEMS bounds the items read one by one (a model holding a list of a million objects
#: would otherwise cost seconds per trace, each retry included)
SAVED_DEPTH, SAVED_OBJECTS, SAVED_ITEMS = 6, 50_000, 200_000

#: Values never looked into: immutable, or not the model's state (tensors are the weights)
_LEAVES = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
           types.MethodType, torch.Tensor, fx.Proxy, fx.Node, torch.dtype, torch.device,
           weakref.ref, str, bytes, int, float, complex, bool, type(None))

#: Exactly these types (not subclasses, which may hold attributes) hold nothing to look into
_PLAIN = frozenset({str, bytes, int, float, complex, bool, type(None)})

#: A container with more items than this has their types read first (at C speed): when all
#: are plain (a vocabulary {token: id}) it is saved whole but not read item by item
_LARGE = 256

#: The mutable containers put back as they were (in place: other references to them stay valid)
_RESTORED = (list, dict, set, collections.deque)


def _where(chain) -> str:
    """The path a ``_reachable`` chain names ("model.enc.stats['maps'][0]"). Built only for an
    error message: building one per item cost more than the walk itself."""
    steps = []
    while isinstance(chain, tuple):
        chain, key, kind = chain
        steps.append(f".{key}" if kind == "attr" else f"[{key!r}]" if kind == "item"
                     else f"[{key}]" if kind == "index" else " (an item)")
    return chain + "".join(reversed(steps))


def _steps(value: object, attributes: bool) -> Iterator[tuple[object, str, object]]:
    """(key, kind, item) for what a value holds: a dict's values (its attributes when it is an
    object's ``__dict__``), a sequence's or a set's items, or an object's attribute dict or
    slots (key None: the same path)."""
    if isinstance(value, dict):
        kind = "attr" if attributes else "item"
        return ((k, kind, v) for k, v in list(value.items()))
    if isinstance(value, (list, tuple, collections.deque)):
        return ((k, "index", v) for k, v in enumerate(list(value)))
    if isinstance(value, (set, frozenset)):
        return ((None, "member", v) for v in list(value))
    try:
        return iter([(None, "self", vars(value))])
    except TypeError:              # no __dict__: its slots, if any
        return ((k, "attr", v) for k, v in _slots(value).items() if v is not _UNSET)


def _plain(value: object) -> bool:
    """Whether a large container holds only str, int, float... (nothing a trace can change in
    place, nor anything to look into)."""
    if isinstance(value, (dict, list, tuple, set, frozenset, collections.deque)):
        items = value.values() if isinstance(value, dict) else value
        return len(value) > _LARGE and set(map(type, items)) <= _PLAIN
    return False


def _reachable(model: nn.Module) -> Iterator[tuple[object, object, bool]]:
    """(where, value, attributes) for the attribute dicts of the model's modules and every
    value reachable from them through lists, tuples, dicts, sets, deques and the attributes of
    other objects, breadth first, each once, up to SAVED_DEPTH steps, SAVED_OBJECTS objects
    looked into and SAVED_ITEMS items read. Values that hold nothing to look into (str, int,
    tensors, proxies...) are not yielded. ``where`` is a chain for ``_where``; ``attributes``:
    the value is an object's ``__dict__`` (its keys are attribute names)."""
    modules = {id(m) for m in model.modules()}
    todo = collections.deque((f"model.{name}" if name else "model", vars(m), 0, True)
                             for name, m in model.named_modules())
    seen: set[int] = set()
    budget = SAVED_ITEMS
    while todo and len(seen) < SAVED_OBJECTS:
        where, value, depth, attributes = todo.popleft()
        if id(value) in seen:
            continue
        seen.add(id(value))
        yield where, value, attributes
        if (depth >= SAVED_DEPTH or budget <= 0 or _plain(value)
                or (isinstance(value, nn.Module) and id(value) in modules)):  # modules: above
            continue
        for key, kind, item in _steps(value, attributes):
            budget -= 1
            if budget < 0:                 # the rest is not saved: a proxy left there is caught
                break
            if not isinstance(item, _LEAVES):
                todo.append((where if kind == "self" else (where, key, kind), item, depth + 1,
                             kind == "self"))


class _Saved:
    """The mutable values reachable from the model's modules (``_reachable``: their attribute
    dicts, the lists, dicts, sets and deques they hold, the attributes of objects they hold...),
    each with a shallow copy, to put back after a trace: a forward that keeps values on the
    model (``self.last = a``, ``self.maps.append(a)``, ``self.stats["last"] = a``) would
    otherwise keep the tracer's proxies there, and a count of calls would count the trace.
    Cost: a C-speed copy of each container (a vocabulary of 300k entries: milliseconds)."""

    def __init__(self, model: nn.Module):
        self.saved, self.slots = [], []
        # the modules' hook dicts are torch's, not the forward's: a hook that another thread
        # removes while the model is traced stays removed
        hooks = {id(v) for m in model.modules() for k, v in vars(m).items()
                 if k in _TORCH_HOOK_DICTS and isinstance(v, dict)}
        for _, value, _ in _reachable(model):
            if id(value) in hooks:
                continue
            if isinstance(value, dict):
                # a plain dict's copy is one C call; a subclass's (OrderedDict) in its own order
                self.saved.append((value, value.copy() if type(value) is dict
                                   else dict(value.items())))
            elif isinstance(value, _RESTORED):
                self.saved.append((value, list(value)))
            elif slots := _slots(value):
                self.slots.append((value, slots))

    def restore(self) -> None:
        """Each container as it was, in place; only those that changed (compared by identity,
        at C speed: a proxy compared by value would trace the comparison)."""
        for value, was in self.slots:
            for k, v in was.items():
                if getattr(value, k, _UNSET) is v:
                    continue
                try:
                    if v is _UNSET:
                        delattr(value, k)
                    else:
                        setattr(value, k, v)
                except Exception:         # read-only: a proxy left there is caught after
                    pass
        for value, was in self.saved:
            if len(value) != len(was):
                same = False
            elif isinstance(value, dict):     # the same keys, in the same order, same values
                same = (all(map(operator.is_, value.keys(), was.keys()))
                        and all(map(operator.is_, value.values(), was.values())))
            elif isinstance(value, set):      # no order to follow
                same = set(map(id, value)) == set(map(id, was))
            else:
                same = all(map(operator.is_, value, was))
            if same:
                continue
            try:
                value.clear()
                if isinstance(value, (dict, set)):
                    value.update(was)
                else:                                  # a list or a deque
                    value.extend(was)
            except Exception:      # a container that refuses: a proxy left there is caught after
                pass


def _slots(value: object) -> dict[str, object]:
    """{slot: value or _UNSET} of an object without a __dict__, else {}."""
    try:
        vars(value)
        return {}
    except TypeError:
        pass
    names: set[str] = set()
    for cls in type(value).__mro__:
        declared = cls.__dict__.get("__slots__", ())
        names.update([declared] if isinstance(declared, str) else declared)
    return {k: getattr(value, k, _UNSET) for k in sorted(names - {"__weakref__", "__dict__"})}


_UNSET = object()      # a slot without a value


def _no_proxies_left(model: nn.Module, tracer: _Tracer) -> None:
    """Raise FactorizationError when a proxy of the trace is still alive after the model's state
    was put back: the forward kept it where that could not be undone (a global variable, a
    closure, deeper than SAVED_DEPTH), so the model (or the user's code) is not as it was, and
    the graph may miss effects of the forward (a split must not be used then)."""
    if not any(r() is not None for r in tracer.proxies):
        return
    gc.collect()                          # a proxy kept only by a cycle is not kept
    alive = {id(p) for r in tracer.proxies if (p := r()) is not None}
    if not alive:
        return
    # the walk yields containers only; the proxy is one of their items
    where = next((_where(w if kind == "self" else (w, key, kind))
                  for w, value, attributes in _reachable(model)
                  for key, kind, item in _steps(value, attributes) if id(item) in alive), None)
    raise FactorizationError(
        "its forward keeps a value computed while it was traced (a torch.fx proxy) "
        + (f"in {where}, " if where else "outside the model's attributes (a global variable "
           "or a closure, say), ")
        + "where the split cannot put back what was there before: that place now holds the "
        "proxy. Keep such values in the model's own attributes, lists or dicts (the split puts "
        "those back as they were), or pass factorized=False")


def _module(model: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule sharing the model's submodules and parameters, without unused steps."""
    try:
        module = fx.GraphModule(model, graph)
        module.graph.eliminate_dead_code()
        module.graph.lint()
        module.recompile()
    except Exception as e:
        raise FactorizationError(f"the split graphs do not compile ({type(e).__name__}: "
                                 f"{e})") from None
    return module


def _operations(graph: fx.Graph) -> int:
    return sum(n.op not in ("placeholder", "output", "get_attr") for n in graph.nodes)
