"""How precisely a model computes, and whether two of its outputs differ by more than that:
shared by check() (the doctor) and the kernels' own checks of the model (rows of a batch that
depend on each other), below both of them."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .adapter import ModelAdapter

#: float32's tolerances: two outputs closer than these are the same to rounding
ATOL, RTOL = 1e-5, 1e-4


#: The machine epsilon of TF32 (10 bits of mantissa), in which a GPU may run float32
#: convolutions and matrix products (torch.backends.cudnn.allow_tf32, on by default)
TF32_EPS = 2.0 ** -10


def outputs_differ(a: torch.Tensor, b: torch.Tensor, eps: float = 0.0) -> bool:
    """Whether two outputs differ by more than rounding: ATOL and RTOL (float32's), or for a
    less precise model (``eps``: its machine epsilon, as ``roundoff_eps`` gives) 4 epsilons of
    the outputs' largest magnitude plus 4 of each value, since a batch of another size may sum in
    another order."""
    if a.shape != b.shape:
        return True
    a, b = a.double(), b.double()
    scale = float(b.abs().max()) if b.numel() else 0.0
    atol, rtol = max(ATOL, 4 * eps * scale), max(RTOL, 4 * eps)
    return not torch.allclose(a, b, atol=atol, rtol=rtol)


def roundoff_eps(adapter: ModelAdapter, raw: dict, *outputs: torch.Tensor) -> float:
    """The precision the model computes in, as a machine epsilon: the largest of its floating
    parameters', its outputs', and those of what each of its modules returns in one pass on
    ``raw`` (a model that runs under torch.autocast inside forward computes in bfloat16 or
    float16 with float32 weights), and TF32's for a model on a GPU that allows it."""
    dtypes = set()

    def seen(_name, output):
        for o in (output if isinstance(output, (tuple, list)) else (output,)):
            if isinstance(o, torch.Tensor) and o.is_floating_point():
                dtypes.add(o.dtype)
    watched_pass(adapter, raw, lambda m: True, seen)
    return dtype_eps(adapter, *outputs, dtypes=dtypes)


def dtype_eps(adapter: ModelAdapter, *outputs: torch.Tensor, dtypes=()) -> float:
    """The machine epsilon of the least precise of the model's floating parameters, the
    ``outputs`` and ``dtypes``, and TF32's for a model on a GPU that allows it: no pass (what
    ``roundoff_eps`` adds is the dtypes its modules compute in)."""
    dtypes = set(dtypes) | {p.dtype for p in adapter.model.parameters() if p.is_floating_point()}
    dtypes |= {o.dtype for o in outputs if o.is_floating_point()}
    eps = max((torch.finfo(d).eps for d in dtypes), default=0.0)
    if torch.float32 in dtypes and uses_tf32(adapter.model):
        eps = max(eps, TF32_EPS)
    return eps


def watched_pass(adapter: ModelAdapter, raw: dict, which: Callable[[nn.Module], bool],
                 seen: Callable[[str, object], None]) -> bool:
    """One pass on ``raw`` (no gradients) with ``seen(name, output)`` called for each module
    that ``which`` picks (TorchScript ones take no Python hooks); the hooks are removed
    whatever happens. Whether the pass ran (a failing one: the other checks report it)."""
    handles = []
    try:
        for name, m in adapter.model.named_modules():
            if which(m) and not isinstance(m, torch.jit.ScriptModule):
                handles.append(m.register_forward_hook(
                    lambda _m, _i, out, name=name: seen(name, out)))
        with torch.no_grad():
            adapter.predict(raw)
        return True
    except Exception:  # noqa: BLE001 - the user's model can raise anything
        return False
    finally:
        for h in handles:
            h.remove()


def uses_tf32(model: torch.nn.Module) -> bool:
    """Whether a float32 model may compute in TF32: on a GPU that has it (compute capability 8
    or more), in convolutions (cuDNN's flag, on by default) or matrix products (off by
    default)."""
    weight = next((p for p in model.parameters() if p.is_cuda), None)
    if weight is None or torch.cuda.get_device_capability(weight.device)[0] < 8:
        return False
    convs = any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules())
    return ((convs and torch.backends.cudnn.allow_tf32)
            or torch.backends.cuda.matmul.allow_tf32
            or torch.get_float32_matmul_precision() != "highest")
