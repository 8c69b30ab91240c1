"""Split a two-modality model into per-modality encoders and a fusion, automatically.

EMAP needs the outputs f(x_a^i, x_b^j) of all N^2 pairs of N instances. Most multimodal models
encode each modality on its own before the modalities meet, so most of each forward pass is
repeated N times over. :func:`trace_factorization` traces the model's ``forward`` with
``torch.fx``, labels every operation with the modalities it depends on, and cuts the graph at
the *frontier*: the values computed from one modality only that an operation mixing both
modalities reads. The *encoder* (every single-modality operation) then runs once on the N
instances, and the *fusion* (every operation that reads both) runs on the N^2 pairs of frontier
rows. Operations that depend on no input (parameters, constants) go wherever they are used.

Requirements, checked: the model traces with ``torch.fx`` (no data-dependent Python control
flow), takes exactly the adapter's modalities as arguments, and every frontier value is a tensor
whose first dimension is the batch. Whether rows really are independent cannot be read from the
graph, so ``emap`` also compares fused pairs with plain forward passes before it uses them.
Models that declare ``encode_modality``/``fuse_encodings`` themselves do not need this.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

__all__ = ["Factorization", "FactorizationError", "reject_factorization", "trace_factorization"]


class FactorizationError(ValueError):
    """The model cannot be split into per-modality encoders and a fusion (the message says why)."""


@dataclass
class Factorization:
    """A traced split of ``model(*inputs)`` (see the module docstring).

    encoder(*inputs) -> tuple of frontier values (batch first); ``sides[k]`` is the modality the
    k-th frontier value comes from. fusion(*frontier values) -> the model's output.
    """

    names: tuple[str, ...]
    inputs: tuple[str, ...]        # the modality of each forward argument, in order
    encoder: fx.GraphModule
    fusion: fx.GraphModule
    sides: tuple[str, ...]
    fused_operations: int          # operations left in the fusion (informative)
    encoder_operations: int        # operations moved to the encoder (informative)

    def encode(self, raw: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Frontier values of a batch {modality: [B, ...]}; raises FactorizationError when a
        value is not a tensor with the batch first."""
        b = int(raw[self.names[0]].shape[0])
        values = self.encoder(*(raw[m] for m in self.inputs))
        for k, v in enumerate(values):
            if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != b:
                got = (f"shape {tuple(v.shape)}" if isinstance(v, torch.Tensor)
                       else type(v).__name__)
                raise FactorizationError(
                    f"the {k}-th value where the modalities meet (from {self.sides[k]!r}) is not "
                    f"a tensor with the batch ({b}) first: {got}")
        return tuple(values)

    def fuse(self, rows: Sequence[torch.Tensor]) -> torch.Tensor:
        """The model's output for pairs of frontier rows (one row per pair in each value)."""
        out = self.fusion(*rows)
        return out[0] if isinstance(out, (tuple, list)) else out


#: model -> {(names, keyword_inputs): Factorization or FactorizationError}; traced once per model.
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def trace_factorization(model: nn.Module, names: Sequence[str], keyword_inputs: bool = False
                        ) -> Factorization:
    """The model's traced split between modalities ``names`` (its arguments, in order; by name
    when ``keyword_inputs``). Cached per model. Raises FactorizationError with the reason."""
    key = (tuple(names), bool(keyword_inputs))
    per_model = _CACHE.setdefault(model, {})
    if key not in per_model:
        try:
            per_model[key] = _trace(model, tuple(names), bool(keyword_inputs))
        except FactorizationError as e:
            per_model[key] = e
    found = per_model[key]
    if isinstance(found, FactorizationError):
        raise found
    return found


def reject_factorization(model: nn.Module, names: Sequence[str], keyword_inputs: bool,
                         reason: str) -> None:
    """Remember that the model's traced split gave different numbers from its forward pass, so
    that later calls skip it (``trace_factorization`` then raises with ``reason``)."""
    _CACHE.setdefault(model, {})[(tuple(names), bool(keyword_inputs))] = FactorizationError(
        f"its traced split was rejected earlier: {reason}")


def _trace(model: nn.Module, names: tuple[str, ...], keyword_inputs: bool) -> Factorization:
    if len(names) != 2:
        raise FactorizationError(f"a split needs exactly two modalities, the adapter has {list(names)}")
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as e:   # fx raises many kinds (TraceError, TypeError, NotImplementedError...)
        raise FactorizationError(f"torch.fx cannot trace the model's forward "
                                 f"({type(e).__name__}: {e})") from None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(names):
        raise FactorizationError(f"forward takes {len(placeholders)} arguments "
                                 f"({[p.target for p in placeholders]}), not one per modality "
                                 f"({list(names)})")
    if keyword_inputs:
        missing = [m for m in names if m not in {p.target for p in placeholders}]
        if missing:
            raise FactorizationError(f"forward has no argument named {missing}")
        side_of = {p: p.target for p in placeholders}
    else:
        side_of = dict(zip(placeholders, names))

    deps: dict[fx.Node, frozenset] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            deps[node] = frozenset([side_of[node]])
        else:
            deps[node] = frozenset().union(*(deps[i] for i in node.all_input_nodes))
    output = next(n for n in graph.nodes if n.op == "output")
    if len(deps[output]) < 2:
        raise FactorizationError(f"the output depends on {sorted(deps[output]) or 'no input'} "
                                 "only: the modalities never meet")
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
    enc_module, fuse_module = _module(model, encoder), _module(model, fusion)
    return Factorization(names=names, inputs=tuple(side_of[p] for p in placeholders),
                         encoder=enc_module, fusion=fuse_module,
                         sides=tuple(next(iter(deps[n])) for n in frontier),
                         fused_operations=_operations(fuse_module.graph),
                         encoder_operations=_operations(enc_module.graph))


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
