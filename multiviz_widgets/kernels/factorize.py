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
it uses them.
Two-modality models that declare ``encode_modality``/``fuse_encodings`` do not need this.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from ..adapter import module_settings

__all__ = ["Factorization", "FactorizationError", "reject_factorization", "trace_factorization"]


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
        return ("traced with submodules kept whole (torch.fx cannot trace into them): "
                + ", ".join(self.opaque_modules))

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


#: model -> {(names, keyword_inputs, side): Factorization or FactorizationError}; traced once.
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def trace_factorization(model: nn.Module, names: Sequence[str], keyword_inputs: bool = False,
                        side: str | None = None, keep_whole: Sequence[nn.Module] = ()
                        ) -> Factorization:
    """The model's traced split between modality ``side`` (default: the first of two) and the
    other modalities. names: the model's arguments, in order (matched by name when
    ``keyword_inputs``). keep_whole: submodules called as one operation, not traced through
    (the adapter's embedding layers and decision layer, whose hooks put continuous inputs in and
    read the decision-level features: a hook fires only where the module itself is called, and
    torch.fx traces through any module outside torch.nn). Cached per model, and traced again when the tensors it read were
    replaced (``model.half()``) or a submodule or a number, flag or text setting changed
    (``_model_state``); a failure to trace or a rejection is retried then too. Raises
    FactorizationError with the reason.
    torch.fx patches ``nn.Module.__call__`` while it traces, so no other thread may run a
    forward pass meanwhile: call it through ``ModelAdapter.run``, which holds the lock that the
    adapter's forward passes take."""
    key = _key(model, names, keyword_inputs, side, keep_whole)
    per_model = _CACHE.setdefault(model, {})
    found = per_model.get(key)
    # traced once; again when the model's tensors were replaced since (model.half(), .to(...))
    # or a submodule or setting changed (model.head = nn.Linear(...)): a split, a failure to
    # trace and a rejection alike hold for the model as it was
    state = _model_state(model)
    stale = (not found.is_current(model, state) if isinstance(found, Factorization)
             else found is not None and found.state is not None and found.state != state)
    if found is None or stale:
        try:
            found = _trace(model, *key)
            found.state = state
        except FactorizationError as e:
            e.state = state
            found = e
        per_model[key] = found
    if isinstance(found, FactorizationError):
        raise found
    return found


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
    error = FactorizationError(f"its traced split was rejected earlier: {reason}")
    error.state = _model_state(model)
    _CACHE.setdefault(model, {})[_key(model, names, keyword_inputs, side, keep_whole)] = error


def _model_state(model: nn.Module) -> tuple:
    """What a traced split depends on besides the tensors it reads: which submodule object sits
    at each name, and each module's settings that are numbers, flags, texts or tuples of them
    (the trace bakes them into the graph as constants; a long text by its hash). A model that
    counts its calls in an integer is traced again at each call: slower, never stale."""
    return tuple((name, id(module), tuple(module_settings(module, integers=True)))
                 for name, module in model.named_modules())


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
        raise FactorizationError(f"a split needs two or more modalities, the adapter has {list(names)}")
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
            continue          # frontier values arrive as arguments; other encoder steps are not needed
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
    opaque: dict[str, str] = {}
    while True:
        tracer = _Tracer(set(opaque) | set(keep_whole))
        try:
            graph = _restoring_attributes(model, lambda: tracer.trace(
                root, concrete_args={"inputs": {m: fx.PH for m in names}}))
            break
        except Exception as e:   # fx raises many kinds (TraceError, TypeError, NotImplementedError...)
            why = f"{type(e).__name__}: {e}"
            where = tracer.failed_in if tracer.failed_in != "model" else None   # not the model itself
            if where and where not in opaque and len(opaque) < MAX_OPAQUE_MODULES:
                opaque[where] = why
                continue
            inside = f" (in submodule {where.removeprefix('model.')!r})" if where else ""
            raise FactorizationError(f"torch.fx cannot trace the model's forward{inside} "
                                     f"({why})") from None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(names):
        raise FactorizationError(f"the traced forward has {len(placeholders)} inputs for the "
                                 f"{len(names)} modalities")
    return root, graph, dict(zip(placeholders, names)), {k.removeprefix("model."): v
                                                         for k, v in opaque.items()}


#: Submodules that may be kept whole (untraced) before a model counts as untraceable.
MAX_OPAQUE_MODULES = 8


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping the submodules named in ``opaque`` whole, and remembering the
    innermost submodule whose forward failed (``failed_in``; None: the model's own forward)."""

    def __init__(self, opaque: set[str]):
        super().__init__()
        self.opaque, self.failed_in = opaque, None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.opaque or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:     # the innermost failing module is seen first
                try:
                    self.failed_in = self.path_of_module(m) or None
                except NameError:          # a module that is not a submodule of the model
                    pass
            raise


def _restoring_attributes(model: nn.Module, trace):
    """trace(), then every module's attributes as they were: a forward that keeps values on the
    model (``self.last_attention = a``) would otherwise keep the tracer's proxies there."""
    saved = [(m, dict(vars(m))) for m in model.modules()]
    try:
        return trace()
    finally:
        for m, attributes in saved:
            state = vars(m)
            for k in [k for k in state if k not in attributes]:
                del state[k]
            state.update(attributes)


def _module(model: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule sharing the model's submodules and parameters, without unused steps."""
    try:
        module = fx.GraphModule(model, graph)
        module.graph.eliminate_dead_code()
        module.graph.lint()
        module.recompile()
    except Exception as e:
        raise FactorizationError(f"the split graphs do not compile ({type(e).__name__}: {e})") from None
    return module


def _operations(graph: fx.Graph) -> int:
    return sum(n.op not in ("placeholder", "output", "get_attr") for n in graph.nodes)
