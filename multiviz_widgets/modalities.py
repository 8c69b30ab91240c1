"""Modalities: what the interpretable units of each input are, and what "removing" one means.

Every modality turns a raw instance into a model input tensor (``to_tensor``), batches several
(``batch``), and defines on its *continuous* form (the tensor that attribution differentiates:
the model input itself, or for text the output of the embedding layer):

* ``unit_index(x)``: a LongTensor of x's shape giving the unit of every scalar (0..n_units-1),
* ``baseline_raw(raw)``: the model input with every unit removed (zeros, white, blur, [PAD]...),
* ``apply_mask(x, masks, baseline)``: a batch of inputs where masked-out units take the baseline,
* ``pool(attr, x)``: per-unit sums of a scalar attribution, and ``to_map`` its full-resolution map.

Kernels use only these verbs, so they never ask which kind of modality they hold.
"""
from __future__ import annotations

import functools
import hashlib
import math
import re
import unicodedata
import uuid
import weakref
from collections.abc import Iterable
from typing import Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch

from .checks import is_integer, positive_int


class Modality:
    """Base class. Subclasses define ``kind``, ``to_tensor``, ``unit_index`` and ``baseline_raw``."""

    kind: ClassVar[str] = "generic"
    #: True when gradients must flow through an embedding layer (text): the continuous form is
    #: that layer's output and the adapter needs the layer.
    via_embedding: ClassVar[bool] = False
    #: True when a unit's scalars are coordinates in an arbitrary basis (embeddings): second-order
    #: interactions then move a unit along its own value minus the baseline, not along all-ones.
    weigh_units_by_input: ClassVar[bool] = False
    #: True when a unit is the same feature in every instance (a tabular column): a concept
    #: people give it names it everywhere (``annotations.feature_key``), not in one instance.
    shared_units: ClassVar[bool] = False

    def __init__(self, name: str):
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(
                f"Modality name {name!r} must be a Python identifier such as 'image' or 'question', "
                "because it names the model's argument.")
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    #: Attributes that are caches, not settings (left out of ``signature``).
    _UNSTABLE: ClassVar[tuple[str, ...]] = ("_sp_cache",)

    def signature(self, baselines: bool = True) -> str:
        """A stable text of every setting that shapes this modality's inputs and units (its
        class, vocabulary, tokenizer, patch size, columns, baselines...): it keys on-disk caches,
        so that a change of preprocessing is never served features computed with the old one.
        baselines=False: without the baselines (what a unit is replaced by, not which part of
        the input it is), for what annotations record of the units their concepts name."""
        fields = {k: v for k, v in vars(self).items()
                  if k not in self._UNSTABLE and (baselines or "baseline" not in k)}
        return f"{type(self).__module__}.{type(self).__qualname__}{_stable_text(fields)}"

    # -- raw instances ----------------------------------------------------------------------
    def to_tensor(self, raw) -> torch.Tensor:
        """The model input for one raw instance, without a batch dimension."""
        raise NotImplementedError

    def input_shape(self, raw) -> tuple[int, ...]:
        """The shape of ``to_tensor(raw)``, as cheaply as the modality can tell it (batches of
        one shape need no padding); by default by converting."""
        return tuple(self.to_tensor(raw).shape)

    def batch(self, items: Sequence) -> torch.Tensor:
        """Stack raw instances (or their tensors) into one batch tensor."""
        _some(items, self.name)
        return torch.stack([self._as_tensor(item) for item in items])

    def _as_tensor(self, item) -> torch.Tensor:
        return self.to_tensor(item)     # tensors too: every input gets the same checks

    def baseline_raw(self, x: torch.Tensor) -> torch.Tensor:
        """The model input (same shape as x, one instance) in which every unit is removed."""
        raise NotImplementedError

    def continuous_baseline(self, base: torch.Tensor) -> torch.Tensor:
        """The baseline on the continuous form, given ``base``, the continuous form of
        ``baseline_raw`` (for text: the embedding of the [PAD] ids). By default ``base`` itself;
        a modality whose baseline is not the image of any model input (Text(baseline="zero"):
        zero embeddings) replaces it here."""
        return base

    # -- units on the continuous form -------------------------------------------------------
    def unit_index(self, x: torch.Tensor) -> torch.Tensor:
        """LongTensor of x's shape: the unit that each scalar of one instance belongs to."""
        raise NotImplementedError

    def n_units(self, x: torch.Tensor) -> int:
        return int(self.unit_index(x).max().item()) + 1

    def unit_labels(self, x: torch.Tensor) -> list[str]:
        """A short human-readable name for every unit."""
        return [f"{self.name}[{u}]" for u in range(self.n_units(x))]

    def describe_units(self, raw, x: torch.Tensor) -> list[str]:
        """Unit labels for one instance, given its raw value and its model input x."""
        return self.unit_labels(x)

    def apply_mask(self, x: torch.Tensor, masks: torch.Tensor, baseline: torch.Tensor,
                   index: torch.Tensor | None = None) -> torch.Tensor:
        """Inputs [B, *x.shape]: unit u keeps x where masks[b, u] = 1 and takes the baseline where 0.

        Fractional mask values interpolate, which the path methods use.
        """
        idx = self.unit_index(x) if index is None else index
        masks = torch.as_tensor(masks, dtype=x.dtype, device=x.device)
        if masks.dim() != 2 or masks.shape[1] != int(idx.max()) + 1:
            raise ValueError(f"{self.name}: masks must have shape [batch, {int(idx.max()) + 1}] "
                             f"(one column per unit), got {tuple(masks.shape)}.")
        m = masks[:, idx]
        # lerp is exact at both ends: mask 1 gives x and mask 0 the baseline, bit for bit
        return torch.lerp(baseline.unsqueeze(0).expand_as(m), x.unsqueeze(0).expand_as(m), m)

    def pool(self, attr: torch.Tensor, x: torch.Tensor, index: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Per-unit sums [B, n_units] of a scalar attribution attr [B, *x.shape]."""
        idx = self.unit_index(x) if index is None else index
        flat = wide_sums(attr).reshape(attr.shape[0], -1)     # a bfloat16 sum rounds each step
        out = torch.zeros(attr.shape[0], int(idx.max()) + 1, dtype=flat.dtype, device=attr.device)
        return out.index_add_(1, idx.reshape(-1), flat)

    def to_map(self, attr: torch.Tensor) -> torch.Tensor:
        """Full-resolution map of a scalar attribution of one instance (default: as it is)."""
        return attr

    def unit_sums_and_map(self, attr: torch.Tensor, x: torch.Tensor, index: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(per-unit sums [n_units], ``to_map(attr)``) of one instance's scalar attribution
        computed together, for modalities where one follows cheaply from the other; None (the
        default) leaves it to ``pool`` and ``to_map``. Every stage-1 gradient call makes both,
        right after its backward pass, which has pushed this code out of the CPU's caches: each
        tensor operation here costs several microseconds, so the fewer the better (the sums
        may come in the scores' float64 already, see ``score_dtype``)."""
        return None

    def expand(self, unit_values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Broadcast per-unit values [n_units] back to x's shape."""
        idx = self.unit_index(x)
        if isinstance(unit_values, np.ndarray) and not unit_values.flags.writeable:
            unit_values = unit_values.copy()      # cached scores are read-only: torch would warn
        return torch.as_tensor(unit_values, device=idx.device)[idx]


#: torch dtypes numpy has no type for (a bfloat16 model's outputs and weights): ``host_array``
#: converts them to float32, which holds each of their values exactly
NOT_IN_NUMPY = frozenset([torch.bfloat16] + [getattr(torch, name) for name in (
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, name)])

#: Floating dtypes too coarse to add up attributions in: a sum of bfloat16 (8 significant bits)
#: or float16 values rounds each partial sum, off by up to ~1e-3 of the exact sum of the very
#: same values; they are summed in float32 (``wide_sums``), which holds each of them exactly.
LOW_PRECISION = frozenset([torch.bfloat16, torch.float16])


def wide_sums(attr: torch.Tensor) -> torch.Tensor:
    """``attr`` as a tensor to add up: float32 for a low-precision one (``LOW_PRECISION``), as it
    is otherwise (no copy)."""
    return attr.float() if attr.dtype in LOW_PRECISION else attr


def score_dtype(attr: torch.Tensor) -> torch.dtype:
    """The dtype in which the fused ``unit_sums_and_map`` add up units: float64 on the CPU (the
    results' scores are float64, so the sum converts them on the way at no cost, where a
    conversion afterwards would be one more operation), the attribution's own elsewhere (not
    every accelerator has float64; the host converts the scores when it receives them)."""
    return torch.float64 if attr.device.type == "cpu" else attr.dtype


@functools.cache
def _keeps_units(kind: type, cls: type) -> bool:
    """Whether the class ``kind`` uses ``cls``'s own unit_index, pool and to_map (no subclass
    override), which the fused ``unit_sums_and_map`` of ``cls`` assume; decided once per class
    (a lookup, where three attribute comparisons in every call cost microseconds there). A
    method assigned to a class after its first explanation is not seen until
    ``_keeps_units.cache_clear()``; a subclass defined with its own methods always is."""
    return all(getattr(kind, m) is getattr(cls, m) for m in ("unit_index", "pool", "to_map"))


def _some(items: Sequence, name: str) -> None:
    """A ValueError when a batch is asked of no instances (torch.stack's and max()'s own errors
    do not say what was wrong)."""
    if len(items) == 0:
        raise ValueError(f"{name}: a batch needs at least one instance, got none.")


#: unsigned integer types wider than a byte: their pixels are 16- or 32-bit levels whatever
#: the values of one image (a dim 16-bit scan holds 0..199 of 0..65535)
_WIDE_UNSIGNED = tuple(getattr(torch, n) for n in ("uint16", "uint32", "uint64")
                       if hasattr(torch, n))
_16BIT_HINT = " For 16-bit images (0..65535) pass pixels / 65535 as floats."


def _unit_range(t: torch.Tensor, name: str) -> torch.Tensor:
    """Pixels as floats in [0, 1]: integers (0..255) divided by 255, bools as 0/1, floats checked
    (and kept at their precision). Unsigned integers wider than a byte are refused whatever
    their values: divided by 255, a dark 16-bit image would be read 257 times too bright, and
    the brighter images of the same dataset refused."""
    if t.dtype == torch.bool:
        return t.float()
    if t.dtype in _WIDE_UNSIGNED:
        raise ValueError(f"{name}: {str(t.dtype).replace('torch.', '')} pixels are not 8-bit "
                         "levels (0..255), whatever the values of this image, so dividing them "
                         f"by 255 would misread them.{_16BIT_HINT} Pixels that are 8-bit levels "
                         "stored in a wider type: pass pixels.astype(np.uint8).")
    if not t.is_floating_point():
        wide = t.to(torch.int64)          # uint16/uint32 tensors have no min() or max()
        lo, hi = int(wide.min()), int(wide.max())
        if lo < 0 or hi > 255:
            hint = (_16BIT_HINT if lo >= 0 and hi <= 65535
                    and t.dtype in (torch.int32, torch.int64) else "")
            raise ValueError(f"{name}: integer pixels must lie in 0..255, got {lo}..{hi}.{hint}")
        return wide.float() / 255.0
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: the image holds NaN or infinite pixels; replace them (pixels "
                         "are floats in [0, 1] or integers in 0..255).")
    lo, hi = float(t.min()), float(t.max())
    if not (lo >= -1e-3 and hi <= 1 + 1e-3):          # (NaN fails too)
        hint = (" They look like 0..255 values: divide by 255, or pass uint8 pixels."
                if 0 <= lo and 2 < hi <= 255 else
                " If your model expects normalised pixels, normalise inside its forward: units "
                "and baselines ('zero' (black), 'white', 'mean', 'blur') are on [0, 1] pixels.")
        raise ValueError(f"{name}: float pixels must lie in [0, 1], got {lo:g}..{hi:g}.{hint}")
    return t


def _stable_text(v) -> str:
    """A text of v for on-disk cache keys: containers recursively (sets sorted), arrays and
    tensors by dtype, shape and a hash of their bytes, compiled patterns by pattern and flags,
    functions by their code (``_stable_callable``): the same in every process for these. Any
    other object by its type's name."""
    import hashlib

    if isinstance(v, dict):
        return "{" + ",".join(f"{_stable_text(k)}:{_stable_text(v[k])}"
                              for k in sorted(v, key=repr)) + "}"
    if isinstance(v, (list, tuple)):
        return type(v).__name__ + "[" + ",".join(_stable_text(x) for x in v) + "]"
    if isinstance(v, (set, frozenset)):
        return type(v).__name__ + "{" + ",".join(sorted(_stable_text(x) for x in v)) + "}"
    if isinstance(v, re.Pattern):
        return f"re({v.pattern!r},{v.flags})"
    if isinstance(v, (torch.Tensor, np.ndarray)):
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu()
            try:
                a = t.numpy()
            except TypeError:              # bfloat16 and other dtypes numpy lacks: the bytes
                raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
                return (f"array({v.dtype},{tuple(v.shape)},"
                        f"{hashlib.sha256(raw.tobytes()).hexdigest()[:16]})")
        else:
            a = v
        a = np.ascontiguousarray(a)
        return f"array({a.dtype},{a.shape},{hashlib.sha256(a.tobytes()).hexdigest()[:16]})"
    if v is None or isinstance(v, (bool, int, float, str, np.generic)):
        return repr(v)
    if callable(v):
        return _stable_callable(v)
    return f"<{type(v).__module__}.{type(v).__qualname__}>"


#: values whose ``_stable_text`` is their content (others are told by their type alone)
_PLAIN = (type(None), bool, int, float, str, np.generic, list, tuple, dict, set, frozenset,
          re.Pattern, np.ndarray, torch.Tensor)


def _stable_value(v, depth: int, mutable_by_type: bool = False) -> str:
    """A value a function reads (a closure cell, a global of its module): by content when it
    is plain or a function; any other object by its identity (``_identity_token``), since its
    state, which the function may read, cannot be seen. ``mutable_by_type``: a dict, list
    or set by its type alone (a forward hook's: one that records activations into a dict
    changes its content at every forward pass, not what it computes)."""
    if callable(v) and not isinstance(v, type):
        return _stable_callable(v, depth + 1, mutable_by_type)
    if mutable_by_type and isinstance(v, (dict, list, set)):
        # by its type alone: not its content (filled at every pass), nor its identity (which
        # would keep it, and what it holds, alive: dicts cannot be weakly referenced)
        return f"<{type(v).__qualname__}>"
    if isinstance(v, _PLAIN) or isinstance(v, type):
        return _stable_text(v) if not isinstance(v, type) else f"<class {v.__qualname__}>"
    return f"<{type(v).__qualname__} {_identity_token(v)}>"


_IDENTITY: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_IDENTITY_KEPT: dict[int, tuple] = {}


def _identity_token(obj) -> str:
    """A text unique to ``obj`` for the life of this process, never given to another object
    (``id()`` is, once the object is freed): a random token kept beside the object (weakly; an
    object that cannot be weakly referenced is kept alive, so that its id stays its own)."""
    try:
        token = _IDENTITY.get(obj)
        if token is None:
            token = _IDENTITY[obj] = uuid.uuid4().hex
        return token
    except TypeError:                       # not weakly referenceable, or not hashable
        kept = _IDENTITY_KEPT.get(id(obj))
        if kept is None or kept[0] is not obj:
            kept = _IDENTITY_KEPT[id(obj)] = (obj, uuid.uuid4().hex)
        return kept[1]


def hash_code(code, h, names: list | None = None) -> None:
    """Add what a function's code does to the hash ``h``, not where it is: its bytecode, the
    names it uses and its constants (nested code objects, a lambda's or a comprehension's,
    recursively; a frozenset's items sorted, since their order follows the process's string
    hashing). Not its file and line numbers: a function defined in a notebook cell gets another
    file name at every run of that cell. ``names``: extended with every name the code uses."""
    import types
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    if names is not None:
        names.extend(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            hash_code(c, h, names)
        elif isinstance(c, frozenset):
            h.update(repr(sorted(map(repr, c))).encode())
        else:
            h.update(repr(c).encode())


def _stable_callable(fn, depth: int = 0, mutable_by_type: bool = False) -> str:
    """A text of a function that changes when what it computes may change: a Python function
    by its name, its code (bytecode, constants, names, nested functions), its defaults, the
    values it closes over and the functions and values of its module that it names (plain
    values by content, other objects by identity: ``_stable_value``); a functools.partial by
    its function and arguments; a built-in by its name; a bound method by its function and the
    identity of its object. Any other callable (an object with state, such as a tokenizer
    instance) by its identity: unique in this process, so that an on-disk cache made with it
    is never served to another tokenizer of the same name (nor, in a new process, to itself).
    ``mutable_by_type``: see ``_stable_value``."""
    import functools
    import types

    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    if depth > 8:                                   # deep (or cyclic) references: by name
        return f"<{name}>"
    if isinstance(fn, functools.partial):
        return (f"partial({_stable_callable(fn.func, depth + 1, mutable_by_type)},"
                f"{_stable_text(list(fn.args))},{_stable_text(dict(fn.keywords))})")
    if isinstance(fn, (types.MethodDescriptorType, types.WrapperDescriptorType)) or (
            isinstance(fn, types.BuiltinFunctionType)
            and (fn.__self__ is None or isinstance(fn.__self__, types.ModuleType))):
        return f"<builtin {name}>"                   # str.split, len, math.floor
    if isinstance(fn, types.MethodType):
        return (f"<method {_stable_callable(fn.__func__, depth + 1, mutable_by_type)} of "
                f"{type(fn.__self__).__qualname__} {_identity_token(fn.__self__)}>")
    if not isinstance(fn, types.FunctionType):
        return f"<{name}:object {_identity_token(fn)}>"
    h = hashlib.sha256()
    names: list[str] = []
    hash_code(fn.__code__, h, names)
    h.update(_stable_text(list(fn.__defaults__ or ())).encode())
    h.update(_stable_text(dict(fn.__kwdefaults__ or {})).encode())
    for cell in fn.__closure__ or ():
        try:
            value = cell.cell_contents
        except ValueError:                          # an empty cell
            value = None
        h.update(_stable_value(value, depth, mutable_by_type).encode())
    for n in dict.fromkeys(names if depth < 2 else ()):   # module functions and values it names
        if n in fn.__globals__ and fn.__globals__[n] is not fn:
            value = fn.__globals__[n]
            if not isinstance(value, types.ModuleType):
                h.update(f"{n}={_stable_value(value, depth, mutable_by_type)}".encode())
    return f"<{name}:{h.hexdigest()[:16]}>"


class Image(Modality):
    """An image [C, H, W] with values in [0, 1]; units are a patch grid or superpixels.

    baseline: "zero", "white" (1.0), "mean" (the image's per-channel mean), "blur" (a box blur
    of the image), or a number.
    """

    kind = "image"

    def __init__(self, name: str = "image", patch: int = 8, superpixels: int | None = None,
                 baseline: str | float = "zero", channels_last_raw: bool = True):
        super().__init__(name)
        patch = positive_int(patch, "Image patch (pixels per side of a unit)")
        if superpixels is not None:
            superpixels = positive_int(superpixels, "superpixels (or None for the patch grid)", 2)
        if isinstance(baseline, str):
            if baseline not in ("zero", "white", "mean", "blur"):
                raise ValueError(f"Image baseline {baseline!r} is not one of 'zero', 'white', "
                                 "'mean', 'blur' or a number.")
        elif (isinstance(baseline, bool) or not isinstance(baseline, (int, float, np.number))
              or not 0 <= float(baseline) <= 1):       # (NaN fails too)
            hint = (f" Pixels are in [0, 1]: for the 0..255 value {baseline} pass "
                    f"{float(baseline) / 255:.4g}."
                    if isinstance(baseline, (int, float, np.number)) and not isinstance(baseline, bool)
                    and 1 < float(baseline) <= 255 else "")
            raise ValueError(f"Image baseline {baseline!r} is not one of 'zero', 'white', 'mean', "
                             f"'blur' or a number in [0, 1] (a grey level).{hint}")
        self.patch = int(patch)
        self.superpixels = superpixels
        self.baseline = baseline
        self.channels_last_raw = channels_last_raw
        self._sp_cache: dict = {}

    def signature(self, baselines: bool = True) -> str:
        """As Modality.signature; with ``channels_last_raw=False`` it also names the current
        readings of an HxW array ([1, H, W], where it used to be [H, W, 1]) and of a PIL image
        (H x W x C, where it used to be read as C x H x W), so that a cache made with an old
        reading is not served."""
        return (super().signature(baselines)
                + ("" if self.channels_last_raw else "+gray:1xHxW+pil:HxWxC"))

    def to_tensor(self, raw) -> torch.Tensor:
        """[C, H, W] floats in [0, 1] from an HxWxC (``channels_last_raw``, else CxHxW) or HxW
        array, a PIL image (H x W x C whatever ``channels_last_raw``), or a [C, H, W] tensor.
        Integer pixels (0..255; unsigned types wider than a byte and PIL's 16- and 32-bit modes
        are refused, see ``_unit_range``) are divided by 255; float pixels must already lie in
        [0, 1]. A PIL image whose array is not its colours (palette, CMYK, YCbCr, HSV, LAB) is
        converted to RGB (RGBA for a palette with transparency) first, see ``pil_pixels``."""
        # a PIL image's array is H x W x C whatever the layout of the dataset's arrays
        channels_last = self.channels_last_raw or _is_pil(raw)
        if _is_pil(raw):
            _check_pil_depth(raw, self.name)
            raw = pil_pixels(raw, self.name)
        if isinstance(raw, torch.Tensor):
            t = raw.detach()
            if t.is_complex():                # (a cast would drop the imaginary parts)
                raise TypeError(f"{self.name}: an image must hold real pixel values, got a "
                                f"{t.dtype} tensor; pass the magnitude (tensor.abs()) or the "
                                "real part (tensor.real), scaled to [0, 1].")
            if t.dim() == 3 and t.shape[0] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
                raise ValueError(
                    f"{self.name}: an image tensor must be [C, H, W], and shape {tuple(t.shape)} "
                    "looks like H x W x C: pass tensor.permute(2, 0, 1), or the numpy array.")
        else:
            try:
                arr = _native_byte_order(np.asarray(raw))
            except (TypeError, ValueError) as e:
                pair = (" It looks like an (image, label) pair, as a torchvision dataset gives: "
                        "pass the images alone as this modality's inputs and the labels as the "
                        "dataset's labels=." if isinstance(raw, tuple) and len(raw) == 2 else "")
                raise TypeError(f"{self.name}: an image must be one array of numbers (H x W x "
                                f"C, H x W, a PIL image or a [C, H, W] tensor), but numpy cannot "
                                f"make this {type(raw).__name__} into one array ({e}).{pair}"
                                ) from None
            if arr.dtype == object or not (arr.dtype.kind in "biuf"):
                raise TypeError(f"{self.name}: an image must be an array of numbers, got "
                                f"{type(raw).__name__} of dtype {arr.dtype}.")
            if arr.ndim == 2:                 # grey levels: one channel, where the layout has it
                arr = arr[..., None] if channels_last else arr[None]
            if arr.ndim != 3:
                raise ValueError(f"{self.name}: an image must be HxWxC or HxW, got shape "
                                 f"{arr.shape}." + batch_of_one_hint(arr.shape, 3))
            if (channels_last and arr.shape[0] in (1, 3, 4)
                    and arr.shape[-1] not in (1, 3, 4)):
                raise ValueError(
                    f"{self.name}: an image array must be H x W x C, and shape {arr.shape} looks "
                    "like C x H x W: pass array.transpose(1, 2, 0), or give the modality "
                    "channels_last_raw=False.")
            if (not channels_last and arr.shape[-1] in (1, 3, 4)
                    and arr.shape[0] not in (1, 3, 4)):
                raise ValueError(
                    f"{self.name}: the modality has channels_last_raw=False, so an image array "
                    f"must be C x H x W, and shape {arr.shape} looks like H x W x C: pass "
                    "array.transpose(2, 0, 1), or leave channels_last_raw at its default (True) "
                    "if the dataset's arrays are all H x W x C.")
            if (channels_last and arr.shape[-1] > 4
                    and arr.shape[0] < min(arr.shape[1], arr.shape[2])):
                raise ValueError(
                    f"{self.name}: an image array must be H x W x C, and shape {arr.shape} "
                    f"would be a {arr.shape[0]}-pixel-high picture of {arr.shape[-1]} channels: "
                    f"it looks like {arr.shape[0]} planes of {arr.shape[1]} x {arr.shape[2]} "
                    "first (C x H x W: pass array.transpose(1, 2, 0) or give the modality "
                    "channels_last_raw=False; a video's frames T x H x W: an Image is one "
                    "picture, so give the frames as a TimeSeries of per-frame features or one "
                    "Image modality per frame). If it is a picture of that many channels, pass it "
                    "as a [C, H, W] tensor: torch.from_numpy(array).permute(2, 0, 1).")
            if arr.dtype.kind == "f" and arr.dtype != np.float64:
                # float arrays give float32, as the other modalities do; float64 ones keep
                # their precision (collate casts to the model's dtype: a float64 model
                # explains the values it was given, not their float32 rounding)
                arr = arr.astype(np.float32, copy=False)
            if not arr.flags.writeable:       # (PIL's arrays): torch warns, and would share it
                arr = arr.copy()
            t = torch.from_numpy(np.ascontiguousarray(arr))
            if channels_last:
                t = t.permute(2, 0, 1)
        if t.dim() != 3:
            raise ValueError(f"{self.name}: an image tensor must be [C, H, W], got "
                             f"{tuple(t.shape)}." + batch_of_one_hint(t.shape, 3))
        if 0 in t.shape:
            raise ValueError(f"{self.name}: the image is empty (shape {tuple(t.shape)}).")
        return _unit_range(t, self.name).contiguous()

    def input_shape(self, raw) -> tuple[int, ...]:
        if isinstance(raw, np.ndarray) and raw.ndim in (2, 3) and raw.dtype.kind in "biuf":
            if raw.ndim == 2:                 # grey levels: [1, H, W] in either layout
                return (1, *raw.shape)
            shape = raw.shape
            return (shape[2], shape[0], shape[1]) if self.channels_last_raw else tuple(shape)
        return super().input_shape(raw)

    def grid(self, x: torch.Tensor) -> tuple[int, int]:
        """Rows and columns of the patch grid."""
        h, w = x.shape[-2], x.shape[-1]
        return math.ceil(h / self.patch), math.ceil(w / self.patch)

    def unit_index(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = x.shape
        if self.superpixels:
            return self._superpixel_index(x).unsqueeze(0).expand(c, h, w)
        rows = torch.arange(h, device=x.device) // self.patch
        cols = torch.arange(w, device=x.device) // self.patch
        ncols = math.ceil(w / self.patch)
        return (rows[:, None] * ncols + cols[None, :]).unsqueeze(0).expand(c, h, w)

    def _on_grid(self, x: torch.Tensor) -> bool:
        """Whether this image's units are an exact patch grid (no superpixels, no ragged edge)."""
        h, w = x.shape[-2:]
        return not self.superpixels and h % self.patch == 0 and w % self.patch == 0

    def unit_sums_and_map(self, attr, x, index):
        """On an exact patch grid: the map (channels summed), then its patches summed. Not for
        a subclass with its own units, pooling or map (their results would be ignored)."""
        if not (self._on_grid(x) and _keeps_units(type(self), Image)):
            return None
        h, w = x.shape[-2:]
        p = self.patch
        m = attr.sum(-3)
        return m.view(h // p, p, w // p, p).sum((1, 3), dtype=score_dtype(m)).view(-1), m

    def apply_mask(self, x: torch.Tensor, masks: torch.Tensor, baseline: torch.Tensor,
                   index: torch.Tensor | None = None) -> torch.Tensor:
        """As Modality.apply_mask; on an exact patch grid it broadcasts one value per patch
        instead of gathering one per pixel (about 6x faster for 8x8 patches on 64x64 images)."""
        c, h, w = x.shape
        p = self.patch
        if not self._on_grid(x):
            return super().apply_mask(x, masks, baseline, index)
        rows, cols = h // p, w // p
        masks = torch.as_tensor(masks, dtype=x.dtype, device=x.device)
        if masks.dim() != 2 or masks.shape[1] != rows * cols:
            raise ValueError(f"{self.name}: masks must have shape [batch, {rows * cols}] "
                             f"(one column per unit), got {tuple(masks.shape)}.")
        b = masks.shape[0]
        shape6 = (1, c, rows, p, cols, p)
        out = torch.lerp(baseline.reshape(shape6), x.reshape(shape6), masks.view(b, 1, rows, 1, cols, 1))
        return out.reshape(b, c, h, w)

    def _superpixel_index(self, x: torch.Tensor) -> torch.Tensor:
        # keyed by the pixels themselves: an address and a sum were shared by another image
        # (a flipped copy written into the same tensor, a new tensor where a freed one was)
        pixels = x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        key = (tuple(x.shape), str(x.dtype), str(x.device),
               hashlib.blake2b(pixels.tobytes(), digest_size=16).hexdigest())
        if key not in self._sp_cache:
            self._sp_cache.clear()
            # numpy has no bfloat16 (nor float8): float32 holds each of their values exactly
            img = x.detach().cpu()
            img = img.float() if img.dtype in NOT_IN_NUMPY else img
            self._sp_cache[key] = torch.from_numpy(
                slic_superpixels(img.numpy(), self.superpixels)).to(x.device)
        return self._sp_cache[key]

    def unit_labels(self, x: torch.Tensor) -> list[str]:
        if self.superpixels:
            return [f"segment {u}" for u in range(self.n_units(x))]
        rows, cols = self.grid(x)
        return [f"patch r{r}c{c}" for r in range(rows) for c in range(cols)]

    def baseline_raw(self, x: torch.Tensor) -> torch.Tensor:
        b = self.baseline
        if b == "zero":
            return torch.zeros_like(x)
        if b == "white":
            return torch.ones_like(x)
        if b == "mean":
            return x.mean(dim=(-2, -1), keepdim=True).expand_as(x).clone()
        if b == "blur":
            k = max(3, self.patch | 1)
            return torch.nn.functional.avg_pool2d(x.unsqueeze(0), k, stride=1, padding=k // 2,
                                                  count_include_pad=False)[0]
        return torch.full_like(x, float(b))

    def to_map(self, attr: torch.Tensor) -> torch.Tensor:
        return attr.sum(dim=-3)


#: PIL modes whose array is not the image's colours, and the mode to read them in: CMYK holds
#: four ink channels; YCbCr, HSV and LAB three channels that are not red, green and blue; RGBX
#: a padding channel; RGBa and PA colours premultiplied by alpha or palette indices. (A palette
#: image, mode P, is read as RGB, or RGBA when it has transparency: see ``pil_pixels``.)
_PIL_READ_AS = {"CMYK": "RGB", "YCbCr": "RGB", "HSV": "RGB", "LAB": "RGB", "RGBX": "RGB",
                "RGBa": "RGBA", "PA": "RGBA"}


def _is_pil(raw) -> bool:
    """Whether raw is a PIL image (told without importing PIL, which is optional)."""
    return (type(raw).__module__.startswith("PIL.") and hasattr(raw, "mode")
            and hasattr(raw, "convert"))


#: PIL modes of 16- or 32-bit integer pixels (a 16-bit PNG opens as I;16 or, in older
#: versions of PIL, as I): not 8-bit levels, whatever the values of one image
_PIL_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I;32", "I;32B", "I;32L")


def _check_pil_depth(img, name: str) -> None:
    """A ValueError for a PIL image of integer pixels wider than a byte (``_PIL_WIDE_MODES``),
    which dividing by 255 would misread (as ``_unit_range`` refuses uint16 arrays)."""
    if img.mode in _PIL_WIDE_MODES:
        raise ValueError(f"{name}: a PIL image of mode {img.mode!r} holds 16- or 32-bit integer "
                         "pixels, not 8-bit levels (0..255), whatever the values of this image, "
                         "so dividing them by 255 would misread them. For a 16-bit image "
                         "(0..65535) pass np.asarray(img) / 65535 as floats.")


def pil_pixels(img, name: str = "image"):
    """A PIL image in a mode whose array is its pixels: a palette image (mode P, whose array
    holds palette indices, not grey levels) as RGB, or RGBA when it has transparency; CMYK,
    YCbCr, HSV and LAB as RGB (see ``_PIL_READ_AS``); RGB, L, LA, RGBA, 1, I and F as they are.
    The dataset fingerprint hashes this too, so that images differing only in their palette
    differ."""
    mode = img.mode
    if mode == "P":
        transparent = getattr(img, "has_transparency_data", None)
        transparent = ("transparency" in img.info) if transparent is None else transparent
        target = "RGBA" if transparent else "RGB"
    else:
        target = _PIL_READ_AS.get(mode)
    if target is None:
        return img
    try:
        return img.convert(target)
    except (ValueError, OSError) as e:
        raise ValueError(f"{name}: a PIL image of mode {mode!r} holds no RGB pixels and this "
                         f"version of PIL cannot convert it to {target} ({e}); convert it "
                         f"yourself, e.g. img.convert('RGB').") from None


#: slic_superpixels computes at most this many pixel-centre-feature differences at a time
SLIC_CHUNK_ELEMENTS = 1 << 22


def slic_superpixels(img: np.ndarray, n_segments: int, compactness: float = 10.0,
                     iterations: int = 6) -> np.ndarray:
    """SLIC-style superpixels of a [C, H, W] image: k-means on colour and position.

    Returns an [H, W] array of consecutive segment ids 0..K-1.
    """
    c, h, w = img.shape
    step = max(1.0, math.sqrt(h * w / n_segments))
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    feats = np.concatenate([img.reshape(c, -1).T * compactness,
                            np.stack([ys.ravel(), xs.ravel()], 1) / step], axis=1)
    # a row (column) of centres at least: an image thinner than half a step had none
    cy = np.arange(min(step, h) / 2, h, step)
    cx = np.arange(min(step, w) / 2, w, step)
    centers_idx = [int(min(h - 1, y)) * w + int(min(w - 1, x)) for y in cy for x in cx]
    centers = feats[centers_idx].copy()
    # the pixels' distances to the centres a chunk of pixels at a time (memory: chunk x K, not
    # pixels x K x features: 1 GB for 224 x 224 pixels and 800 segments), and each centre the
    # mean of its pixels, found by one stable sort (not a pass over all pixels per centre: 18 s
    # there); the same numbers as the direct computation, element by element
    chunk = max(1, SLIC_CHUNK_ELEMENTS // max(1, len(centers) * feats.shape[1]))
    labels = np.zeros(len(feats), dtype=np.int64)
    for _ in range(iterations):
        for s in range(0, len(feats), chunk):
            part = feats[s:s + chunk]
            labels[s:s + chunk] = ((part[:, None, :] - centers[None, :, :]) ** 2).sum(-1).argmin(1)
        order = np.argsort(labels, kind="stable")
        ks, starts = np.unique(labels[order], return_index=True)
        for k, members in zip(ks, np.split(order, starts[1:])):
            centers[k] = feats[members].mean(0)
    _, labels = np.unique(labels, return_inverse=True)
    return labels.reshape(h, w).astype(np.int64)


#: whether a token of the default tokenizer is a word (not punctuation or a symbol)
_STARTS_WORD = re.compile(r"\w").match
#: typographic apostrophes, read as the ASCII one (don’t is don't)
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


@functools.cache
def _word_pattern() -> re.Pattern:
    """The default tokenizer's pattern (built on first use: listing the combining marks takes
    some 30 ms). A token is

    * a word: letters, digits and combining marks (Unicode categories M*: the vowel signs and
      viramas of Devanagari, Arabic harakat, a decomposed accent), with inner apostrophes
      (don't, c'est); ``\\w`` alone leaves the marks out, which split हिन्दी into three "words"
      and dropped the vowel marks of عَرَبِيّ. An apostrophe that opens or closes a word ('red',
      dogs') is punctuation, so that a quoted word is still the word;
    * or a pair of regional indicators (a flag, 🇫🇷);
    * or one other character (a punctuation mark, a symbol, an emoji) with the marks,
      variation selectors and skin-tone modifiers that follow it, and the characters joined
      to it by zero-width joiners: 👍🏽 and 👨‍👩‍👧 are one token each, as they are one
      character to a reader.

    On ASCII text it splits exactly as the plain ``\\w+(?:'\\w+)*|[^\\w\\s]`` did."""
    marks = _char_class(lambda c: unicodedata.category(c).startswith("M"))
    word = rf"[\w{marks}]+"
    attached = rf"[{marks}\U0001F3FB-\U0001F3FF]*"        # marks, skin tones (Fitzpatrick)
    symbol = rf"[^\w\s{marks}]{attached}(?:\u200d[^\w\s{marks}]{attached})*"
    return re.compile(rf"{word}(?:'{word})*|[\U0001F1E6-\U0001F1FF]{{2}}|{symbol}")


def _char_class(keep: Callable[[str], bool]) -> str:
    """The body of a regex character class holding every code point for which keep is true,
    as ranges (a-b). Planes 0, 1 and 14 only: the others hold CJK ideographs, private use
    or nothing, and reading them would cost 0.2 s instead of 0.03 s."""
    parts = []
    for plane in (range(0, 0x20000), range(0xE0000, 0xF0000)):
        start = None
        for code in [*plane, None]:
            if code is not None and keep(chr(code)):
                start = code if start is None else start
                prev = code
            elif start is not None:
                parts.append(re.escape(chr(start)) if start == prev
                             else f"{re.escape(chr(start))}-{re.escape(chr(prev))}")
                start = None
    return "".join(parts)


#: common spellings of the padding and unknown tokens, most specific first
#: (bracketed only: the plain words "pad" and "unk" may be words of the vocabulary)
_SPECIAL_SPELLINGS = {"pad_token": ("[PAD]", "<pad>", "<PAD>", "[pad]", "<|pad|>"),
                      "unk_token": ("[UNK]", "<unk>", "<UNK>", "[unk]", "<|unk|>")}


def _check_specials(vocab: Mapping[str, int], pad_token: str, unk_token: str) -> None:
    """A ValueError when the vocabulary lacks pad_token or unk_token, that names the argument to
    pass when it holds another common spelling of that token (a vocabulary with '<pad>' needs
    pad_token='<pad>': adding '[PAD]' would give it an id beyond the model's embedding rows)."""
    given = {"pad_token": pad_token, "unk_token": unk_token}
    missing = [k for k, tok in given.items() if tok not in vocab]
    if not missing:
        return
    found = {k: next((t for t in _SPECIAL_SPELLINGS[k] if t in vocab), None) for k in missing}
    head = "Text vocab must contain " + " and ".join(f"{k} {given[k]!r}" for k in missing)
    fix = ", ".join(f"{k}={t!r}" for k, t in found.items() if t is not None)
    if fix:
        held = " and ".join(repr(t) for t in found.values() if t is not None)
        added = " or ".join(repr(given[k]) for k, t in found.items() if t is not None)
        rest = [k for k, t in found.items() if t is None]
        more = f"; {rest[0]} must also name a token of the vocabulary" if rest else ""
        raise ValueError(f"{head}, but it holds {held}: pass {fix} to Text(...){more}. Adding "
                         f"{added} to the vocabulary instead would give it an id the model's "
                         "embedding has no row for.")
    raise ValueError(f"{head}. Pass the vocabulary's own padding and unknown tokens as "
                     "pad_token='...' and unk_token='...' (as your tokenizer spells them); add a "
                     "token only if the model's embedding has a row for its new id.")


#: what a special token looks like (BERT's [CLS], [SEP], [MASK], [unused0]; <s>, </s>, <eos>,
#: <extra_id_0>; GPT-2's <|endoftext|>): the default tokenizer keeps an entry of the vocabulary
#: that looks like this, written in the text as it is spelt there, as one token
_SPECIAL_LOOK = re.compile(r"\[[A-Za-z][\w-]*\]|</?[A-Za-z][\w-]*>|<\|[^<>|\s]+\|>")


def special_spans(text: str, vocab: Mapping[str, int]) -> list[tuple[int, int]]:
    """The (start, end) of each special token of the vocabulary written in text (an entry that
    looks like one, ``_SPECIAL_LOOK``, spelt as in the vocabulary: case counts, as it does for
    tokenizers), left to right."""
    spans: list[tuple[int, int]] = []
    if "[" not in text and "<" not in text:
        return spans
    pos = 0
    while (m := _SPECIAL_LOOK.search(text, pos)) is not None:
        if m.group() in vocab:
            spans.append(m.span())
            pos = m.end()
        else:
            pos = m.start() + 1
    return spans


#: {Text modality: whether its vocabulary has special tokens besides its padding and unknown
#: ones}, worked out once per vocabulary (a scan of every token)
_OTHER_SPECIALS: "weakref.WeakKeyDictionary[Text, tuple[int, bool]]" = weakref.WeakKeyDictionary()


def _other_specials(text: "Text") -> bool:
    """Whether the vocabulary of a Text modality holds special tokens (``_SPECIAL_LOOK``)
    besides its padding and unknown ones: only then does the default tokenizer keep those
    written in a text whole."""
    vocab = text.vocab
    known = _OTHER_SPECIALS.get(text)
    if known is None or known[0] != id(vocab):
        known = (id(vocab), any(_SPECIAL_LOOK.fullmatch(t) for t in vocab
                                if t not in (text.pad_token, text.unk_token)))
        _OTHER_SPECIALS[text] = known
    return known[1]


def _is_symbol(token: str) -> bool:
    """Whether a non-word token is a symbol that ``drop_punctuation`` keeps when the vocabulary
    has it (an emoji, a pictograph): not ASCII (whose marks were always dropped, and a
    vocabulary taken from a real tokenizer holds them all) and not punctuation (Unicode
    categories P*: a CJK full stop, a guillemet)."""
    return not token.isascii() and not unicodedata.category(token[0]).startswith("P")


class Text(Modality):
    """A token sequence [T] of ids; units are tokens; gradients flow through the embedding layer.

    vocab: the list of tokens (index = id), which must contain ``pad_token`` and ``unk_token``.
    tokenize: a function from a string to a list of tokens (default: the text NFC-normalised
    and lower-cased, split into words, with punctuation and symbols split off and, if
    ``drop_punctuation``, dropped, except symbols such as emoji that the vocabulary holds; see
    ``_word_pattern``; the vocabulary's special tokens written in the text as spelt there,
    such as [CLS], [SEP] or <s>, are kept whole, with their own ids: ``special_spans``).
    baseline: "pad" (a removed token's embedding becomes the embedding of [PAD]) or "zero"
    (zero embeddings). Either way only the embedding layer's output changes: the model still
    receives the original ids, so a padding mask it builds from them (``ids != pad``) still
    counts a removed token as present, as captum's embedding-level attributions do. Such a
    model's own pooling over that mask then sees the [PAD] embedding in the token's place.
    """

    kind = "text"
    via_embedding = True
    weigh_units_by_input = True

    def __init__(self, name: str = "text", vocab: Sequence[str] = (), pad_token: str = "[PAD]",
                 unk_token: str = "[UNK]", tokenize: Callable[[str], list[str]] | None = None,
                 baseline: str = "pad", drop_punctuation: bool = True):
        super().__init__(name)
        if isinstance(vocab, (str, bytes)):
            raise TypeError("Text vocab is a single string; give the list of tokens (index = id), "
                            "e.g. vocab=['[PAD]', '[UNK]', 'what', 'is'].")
        if isinstance(vocab, Mapping):       # {token: id} (tokenizer.get_vocab()): ordered by id
            vocab = _vocab_from_ids(vocab.items())
        vocab = list(vocab)
        odd = next((t for t in vocab if not isinstance(t, str)), None)
        if odd is not None:
            raise TypeError(f"Text vocab must hold strings (the tokens, index = id), got {odd!r}.")
        seen: dict[str, int] = {}
        for i, tok in enumerate(vocab):
            if tok in seen:
                raise ValueError(f"Text vocab holds {tok!r} twice (ids {seen[tok]} and {i}): a "
                                 "token must have one id. Remove the duplicate, or pass your "
                                 "own tokenize= and token ids.")
            seen[tok] = i
        _check_specials(seen, pad_token, unk_token)
        if baseline not in ("pad", "zero"):
            raise ValueError(f"Text baseline {baseline!r} is not 'pad' or 'zero'.")
        if tokenize is not None and not callable(tokenize):
            # a name such as "split" failed only on the first text, as not callable
            raise TypeError(f"Text tokenize must be a function from a string to its list of "
                            f"tokens (e.g. str.split or a tokenizer's .tokenize), or None for "
                            f"the default words, got {type(tokenize).__name__} {tokenize!r}.")
        self.vocab = vocab
        self.token_to_id = {t: i for i, t in enumerate(vocab)}
        self.pad_token, self.unk_token = pad_token, unk_token
        self.pad_id, self.unk_id = self.token_to_id[pad_token], self.token_to_id[unk_token]
        self.baseline = baseline
        self.drop_punctuation = drop_punctuation
        self._tokenize = tokenize

    def signature(self, baselines: bool = True) -> str:
        """As Modality.signature; with the default tokenizer it also names that tokenizer's
        rules (Unicode words, since combining marks became part of words and symbols in the
        vocabulary were kept), so that features cached with the older splitting of non-ASCII
        text are not served; "+specials" when the vocabulary holds special tokens besides its
        padding and unknown ones (such as [CLS]), which the tokenizer keeps whole since it
        split them into words ([CLS] became 'cls'). Other vocabularies keep their signature."""
        if self._tokenize is not None:
            return super().signature(baselines)
        return (super().signature(baselines) + "+words:unicode-2"
                + ("+specials" if _other_specials(self) else ""))

    def tokenize(self, text: str) -> list[str]:
        if self._tokenize is not None:
            toks = self._tokenize(text)
            # a HuggingFace tokenizer called on the text gives a BatchEncoding (a UserDict of
            # input_ids, attention_mask...): iterated, its key names would be the tokens
            if isinstance(toks, Mapping) or callable(getattr(toks, "keys", None)):
                keys = list(toks.keys())
                raise TypeError(
                    f"{self.name}: tokenize returned a {type(toks).__name__} with the keys "
                    f"{keys[:6]}, as a HuggingFace tokenizer called on the text does, where it "
                    "must return the list of token strings (its key names would be read as the "
                    "tokens). Pass tokenize=tokenizer.tokenize, which gives the tokens as "
                    "strings, with vocab=tokenizer.get_vocab(); or pass the ids "
                    "(tokenizer(text)['input_ids']) as a 1-D integer tensor instead of the text.")
            if not isinstance(toks, (str, bytes)) and isinstance(toks, Iterable):
                toks = list(toks)     # a generator or map: checking it below would consume it
            # a string would be split into characters, and ids looked up as tokens: all [UNK]
            if not isinstance(toks, list) or not all(isinstance(t, str) for t in toks):
                got = (repr(toks) if isinstance(toks, (str, bytes)) else
                       f"{type(toks).__name__} holding "
                       f"{type(next(t for t in toks if not isinstance(t, str))).__name__}"
                       if isinstance(toks, list) else type(toks).__name__)
                raise TypeError(f"{self.name}: tokenize must return a list of token strings, got "
                                f"{got[:80]}. For a tokenizer that gives ids, pass the ids as "
                                "a 1-D integer tensor instead of the text.")
            return toks
        return self._words(text, self.drop_punctuation)

    def _words(self, text: str, drop_punctuation: bool) -> list[str]:
        """The default tokenizer: each special token of the vocabulary written in the text as
        it is spelt there (``special_spans``: [CLS], <s>, [PAD], [UNK]...) is one token, with its
        own id; the text around them is split into words (``_plain_words``). A vocabulary with
        no special tokens but its padding and unknown ones splits every text into words, as
        before special tokens were kept (its signature, which keys cached features and saved
        unit concepts, is the same as then)."""
        if not _other_specials(self):
            return self._plain_words(text, drop_punctuation)
        toks, start = [], 0
        for a, b in special_spans(text, self.token_to_id):
            toks += self._plain_words(text[start:a], drop_punctuation)
            toks.append(text[a:b])
            start = b
        return toks + self._plain_words(text[start:], drop_punctuation)

    def _plain_words(self, text: str, drop_punctuation: bool) -> list[str]:
        """The words of a text without special tokens. NFC first, so that a decomposed "café"
        (e + a combining accent) is the vocabulary's "café"; lower-casing "İ" gives "i" + a
        combining dot, read as "i" as before. A symbol with modifiers that is not in the
        vocabulary, where the symbol alone is, is read as the symbol (👍🏽 as 👍, ❤️ as ❤; not
        a sequence joined by zero-width joiners, whose first emoji is not what it shows). A
        token that is not a word is dropped with ``drop_punctuation``, unless it is a symbol
        (not ASCII, not punctuation: an emoji) that the vocabulary holds (``_is_symbol``)."""
        text = unicodedata.normalize("NFC", text.lower().translate(_APOSTROPHES))
        vocab = self.token_to_id
        toks = []
        for t in _word_pattern().findall(text.replace("i\u0307", "i")):
            if not _STARTS_WORD(t):
                if len(t) > 1 and t not in vocab and t[0] in vocab and "\u200d" not in t:
                    t = t[0]
                if drop_punctuation and not (t in vocab and _is_symbol(t)):
                    continue
            toks.append(t)
        return toks

    def to_tensor(self, raw) -> torch.Tensor:
        if isinstance(raw, torch.Tensor):
            if (raw.is_floating_point() or raw.is_complex() or raw.dtype == torch.bool
                    or raw.dim() != 1):
                raise ValueError(f"{self.name}: token ids must be a 1-D integer tensor, got "
                                 f"{raw.dtype} with shape {tuple(raw.shape)}."
                                 + batch_of_one_hint(raw.shape, 1))
            if raw.numel() == 0:
                raise ValueError(f"{self.name}: the tensor of token ids is empty.")
            lo, hi = int(raw.min()), int(raw.max())
            if lo < 0 or hi >= len(self.vocab):
                raise ValueError(f"{self.name}: token ids must lie in 0..{len(self.vocab) - 1} "
                                 f"(the vocabulary), got {lo}..{hi}.")
            return raw.long()
        if _missing(raw):
            raise ValueError(f"{self.name}: the text is missing ({raw!r}, e.g. an empty cell of "
                             f"a DataFrame): fill it in, or leave the instance out.")
        if not isinstance(raw, str):
            hint = ""
            if isinstance(raw, (list, tuple)) and raw and all(isinstance(w, str) for w in raw):
                hint = (" A list of words (pre-tokenised text, as the CMU-MOSEI SDK gives): "
                        "join them, ' '.join(words), or pass their ids as a tensor.")
            elif isinstance(raw, (list, tuple, np.ndarray)):
                hint = (" Token ids as a list or a numpy array: pass "
                        "torch.as_tensor(ids, dtype=torch.long).")
            raise TypeError(f"{self.name}: expected a string or a 1-D tensor of token ids, got "
                            f"{type(raw).__name__}.{hint}")
        toks = self.tokenize(raw)
        if not toks:
            dropped = (self._tokenize is None and self.drop_punctuation
                       and self._words(raw, drop_punctuation=False))
            hint = (" It holds only punctuation or symbols outside the vocabulary, which "
                    "drop_punctuation drops: add them to the vocabulary, or give the modality "
                    "drop_punctuation=False." if dropped else "")
            raise ValueError(f"{self.name}: the text {raw!r} has no tokens.{hint}")
        return torch.tensor([self.token_to_id.get(t, self.unk_id) for t in toks], dtype=torch.long)

    def input_shape(self, raw) -> tuple[int, ...]:
        if isinstance(raw, str):                      # the token count, without the ids
            toks = self.tokenize(raw)
            if toks:
                return (len(toks),)
        return super().input_shape(raw)

    def batch(self, items: Sequence) -> torch.Tensor:
        _some(items, self.name)
        ts = [self._as_tensor(i) for i in items]
        n = max(len(t) for t in ts)
        out = torch.full((len(ts), n), self.pad_id, dtype=torch.long)
        for i, t in enumerate(ts):
            out[i, :len(t)] = t
        return out

    def tokens(self, ids: torch.Tensor) -> list[str]:
        return [self.vocab[int(i)] if 0 <= int(i) < len(self.vocab) else self.unk_token
                for i in ids.reshape(-1)]

    def unit_index(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.arange(x.shape[0], device=x.device)
        return t if x.dim() == 1 else t.view(-1, *([1] * (x.dim() - 1))).expand_as(x)

    def n_units(self, x: torch.Tensor) -> int:
        return int(x.shape[0])

    def unit_labels(self, x: torch.Tensor) -> list[str]:
        """The tokens, when x holds token ids; their positions otherwise."""
        if x.dim() == 1 and not torch.is_floating_point(x):
            return self.tokens(x)
        return [f"#{i}" for i in range(x.shape[0])]

    def describe_units(self, raw, x: torch.Tensor) -> list[str]:
        """The words as written (also those outside the vocabulary), when raw is a string."""
        if isinstance(raw, str):
            words = self.tokenize(raw)
            if len(words) == x.shape[0]:
                return words
        return self.unit_labels(x)

    def baseline_raw(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, self.pad_id)

    def continuous_baseline(self, base: torch.Tensor) -> torch.Tensor:
        """baseline="pad": the embedding of [PAD] ids (``base``); "zero": zero embeddings."""
        return torch.zeros_like(base) if self.baseline == "zero" else base

    def to_map(self, attr: torch.Tensor) -> torch.Tensor:
        return attr.reshape(attr.shape[0], -1).sum(-1) if attr.dim() > 1 else attr

    def unit_sums_and_map(self, attr, x, index):
        """A token is a unit: its sum is its entry of the map (the same numbers, two tensors: the
        map, and its copy in ``score_dtype``). Not for a subclass with its own units, pooling or
        map."""
        if not _keeps_units(type(self), Text):
            return None
        m = attr.sum(-1) if attr.dim() == 2 else self.to_map(attr)
        return m.to(score_dtype(m), copy=True), m


def _is_index(value) -> bool:
    """An index a mapping holds: a Python or numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _vocab_from_ids(pairs: Iterable[tuple], what: str = "Text vocab given as a dict",
                    item: str = "token", error: type[Exception] = ValueError) -> list:
    """The list (index = id) of (item, id) pairs, such as a {token: id} mapping's items, whose
    order need not be the ids'. ``what`` and ``item`` name them in the errors (also used for
    class_names given as a mapping); ``error`` is raised when the ids are not 0..n-1."""
    pairs = list(pairs)
    if not all(_is_index(i) for _, i in pairs):
        raise TypeError(f"{what} must map each {item} to its integer id.")
    ids = sorted(int(i) for _, i in pairs)
    if ids != list(range(len(pairs))):
        shown = ", ".join(map(str, ids[:8])) + (", ..." if len(ids) > 8 else "")
        raise error(f"{what} must map the {item}s to the ids 0..{len(pairs) - 1}, each once "
                    f"(got the ids {shown}).")
    return [t for t, _ in sorted(pairs, key=lambda kv: int(kv[1]))]


class Tabular(Modality):
    """A row of F numeric columns [F]; units are columns, or named groups of columns.

    baseline: "zero", "mean" (``means`` must be given, e.g. the training means) or a vector.
    ``means`` and a vector baseline are read as rows are (``to_tensor``): a dict or a pandas
    Series (``df.mean()``) by column name, a plain sequence in the order of ``columns``.
    """

    kind = "tabular"
    shared_units = True

    def __init__(self, name: str = "tabular", columns: Sequence[str] = (),
                 groups: dict[str, Sequence[int]] | None = None,
                 baseline: str | Sequence[float] = "zero", means: Sequence[float] | None = None):
        super().__init__(name)
        self.columns = _names(columns, "Tabular columns", "columns=['hr', 'bp']")
        if not self.columns:
            raise ValueError("Tabular needs the column names, e.g. Tabular('vitals', columns=['hr', 'bp']).")
        f = len(self.columns)
        if groups is not None and not isinstance(groups, dict):
            raise TypeError("Tabular groups must be a dict {unit name: column indices or names}, "
                            f"got {type(groups).__name__}.")
        self.group_names = [str(g) for g in groups] if groups else list(self.columns)
        index = np.full(f, -1, dtype=np.int64)
        if groups:
            for g, (gname, cols) in enumerate(groups.items()):
                cols = _members(cols, f"Tabular group {gname!r}", self.columns, "column")
                for c in cols:
                    if not 0 <= c < f:
                        raise ValueError(f"Tabular group column {c} is outside 0..{f - 1}.")
                    if index[c] != -1:
                        raise ValueError(f"Tabular column {self.columns[c]!r} is in two groups; "
                                         "each column must belong to exactly one unit.")
                    index[c] = g
            if (index < 0).any():
                missing = [self.columns[c] for c in np.where(index < 0)[0]]
                raise ValueError(f"Tabular columns {missing} are in no group; every column must "
                                 "belong to exactly one unit.")
        else:
            index = np.arange(f)
        self._index = torch.from_numpy(index)
        if isinstance(baseline, str):
            if baseline not in ("zero", "mean"):
                raise ValueError(f"Tabular baseline {baseline!r} is not 'zero', 'mean' or a vector.")
            if baseline == "mean" and means is None:
                raise ValueError("Tabular baseline 'mean' needs means=..., the column means of the "
                                 "training data.")
            self._baseline = (None if baseline == "zero" else
                              self._vector(means, f"Tabular {self.name!r} means"))
        else:
            self._baseline = self._vector(baseline, f"Tabular {self.name!r} baseline")
        if self._baseline is not None and self._baseline.shape != (f,):
            given = "means=" if isinstance(baseline, str) else "baseline="
            raise ValueError(f"Tabular {self.name!r} {given} must have one value per column "
                             f"({f}), got shape {tuple(self._baseline.shape)}.")
        if self._baseline is not None and not bool(torch.isfinite(self._baseline).all()):
            bad = [self.columns[i] for i in np.where(~torch.isfinite(self._baseline).numpy())[0]]
            raise ValueError(f"Tabular baseline (or means) is NaN or infinite for columns {bad}: "
                             "every masked input would be too. Give finite values (e.g. "
                             "np.nanmean over the training data).")

    def _vector(self, values, what: str) -> torch.Tensor:
        """A float vector of means or baseline values: a dict or a pandas Series by column
        name (``df.mean()`` of a frame in any column order), a sequence as it is. At the
        precision given, as ``_float_tensor`` keeps it (float64 values stay float64, others
        become float32): ``baseline_raw`` casts it to the input's dtype, so a float64 model
        gets the values it was given, not their float32 rounding."""
        if _is_labelled(values):
            values = self._by_name(values, what)
        return _float_tensor(values, what)

    def to_tensor(self, raw) -> torch.Tensor:
        """A row [F] from a sequence of F numbers (in the order of ``columns``), a dict keyed by
        the column names, or a pandas Series whose labels include them (taken by name, so a
        row of a DataFrame with other columns or another column order is read right). A
        missing value (NaN, None, pd.NA) becomes NaN, which the adapter's checks report."""
        if _is_labelled(raw):
            raw = self._by_name(raw, f"{self.name}: the row")
        t = _float_tensor(raw, self.name)
        if t.shape != (len(self.columns),):
            raise ValueError(f"{self.name}: a row must have {len(self.columns)} values "
                             f"({', '.join(self.columns)}), got shape {tuple(t.shape)}."
                             + batch_of_one_hint(t.shape, 1, raw,
                                                 lambda rest: rest == (len(self.columns),)))
        return t

    def _by_name(self, raw, what: str):
        """The values of a dict or a pandas Series, in the order of ``columns``, by label.
        A Series whose labels are integers none of which is a column name (labels 0..F-1, a
        RangeIndex) is read by position; one that names some columns but not all (a renamed
        column), or none (labels 'BP', 'HR' for the columns 'hr', 'bp'), is refused, as is a
        dict without every column: by position, the values of the other columns would be
        silently misread. what names the values in the errors ("vitals: the row", "Tabular
        'vitals' means")."""
        series = not isinstance(raw, Mapping)
        picked = _named_order(
            list(raw.index) if series else list(raw.keys()), self.columns,
            f"{what} ({'a pandas Series' if series else 'a dict'})",
            "labels" if series else "keys", "column",
            f"Name the values by the columns {self.columns} (rename the others), or pass them "
            f"as an array in that order.", by_position=series)
        if picked is None:
            return _pandas_numbers(raw, what)       # integer labels, none a column: by position
        if series:
            return _pandas_numbers(raw[picked], what)
        return [np.nan if _is_missing(raw[k]) else raw[k] for k in picked]

    def unit_index(self, x: torch.Tensor) -> torch.Tensor:
        return self._index.to(x.device)

    def n_units(self, x=None) -> int:
        return len(self.group_names)

    def unit_labels(self, x=None) -> list[str]:
        return list(self.group_names)

    def baseline_raw(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x) if self._baseline is None else self._baseline.to(x).clone()


def _names(v, what: str, example: str) -> list[str]:
    """Column or channel names as a list of distinct strings (a single string, which would be
    split into characters, and duplicates, which would make units ambiguous, refused)."""
    if isinstance(v, (str, bytes)):
        raise TypeError(f"{what} is a single string; give a list of names, e.g. {example}.")
    if not isinstance(v, Iterable) or isinstance(v, Mapping):
        raise TypeError(f"{what} must be a list of names, e.g. {example}; got "
                        f"{type(v).__name__} {v!r:.60}.")
    names = [str(c) for c in v]
    seen: set[str] = set()
    dup = next((c for c in names if c in seen or seen.add(c)), None)
    if dup is not None:
        raise ValueError(f"{what} name {dup!r} appears twice; every name must be distinct.")
    return names


def _members(cols, what: str, names: Sequence[str], thing: str) -> list[int]:
    """The indices of a group of columns (channels) given by index or by name; a group must
    not be empty (a unit without scalars would misalign the units and their labels)."""
    if isinstance(cols, (str, bytes)) or np.ndim(cols) == 0:
        cols = [cols]
    out = []
    for c in cols:
        if isinstance(c, str) and c in names:
            out.append(names.index(c))
        elif isinstance(c, (int, np.integer)) and not isinstance(c, (bool, np.bool_)):
            out.append(int(c))
        else:
            raise ValueError(f"{what} holds {c!r}: give {thing} indices (integers) or {thing} "
                             f"names ({list(names)[:10]}).")
    if not out:
        raise ValueError(f"{what} is empty; every unit must hold at least one {thing} (drop the "
                         "group).")
    return out


def _others(labels: list, names: Sequence[str], word: str, thing: str) -> str:
    """The part of an error that lists the labels (keys, columns) that are not names of
    columns (channels): often the misspelt or renamed ones."""
    unknown = [k for k in labels if str(k) not in names]
    if not unknown:
        return f"its {word} are {labels[:10]}{' ...' if len(labels) > 10 else ''}"
    return (f"its {word} that are not {thing} names are {unknown[:10]}"
            f"{' ...' if len(unknown) > 10 else ''}")


def is_pandas(v, ndim: int | None = None) -> bool:
    """Whether v is a pandas Series (``ndim`` 1) or DataFrame (2), either when ``ndim`` is
    None; told without importing pandas (an optional dependency)."""
    return (hasattr(v, "iloc") and hasattr(v, "index") and hasattr(v, "to_numpy")
            and getattr(v, "ndim", 0) in ((1, 2) if ndim is None else (ndim,)))


def _is_labelled(v) -> bool:
    """Whether v names its values: a mapping (a dict) or a pandas Series."""
    return isinstance(v, Mapping) or is_pandas(v, 1)


def _named_order(labels: list, names: Sequence[str], what: str, word: str, thing: str,
                 fix: str, by_position: bool = True, holds: str = "value") -> list | None:
    """The labels of ``names``, in their order, when every name is a label (compared as
    text); None when none is, every label is an integer and ``by_position`` (labels 0..n-1, a
    RangeIndex: read by position). A partial match (a renamed column, a missing channel) is
    refused, and so are labels that are names but not these (['BP', 'HR'] for the columns
    ['hr', 'bp']): by position, the values would be silently misread. ``fix`` ends the error
    with what to do."""
    found = {str(k): k for k in labels}
    missing = [n for n in names if n not in found]
    if not missing:
        return [found[n] for n in names]
    if (by_position and len(missing) == len(names)
            and all(is_integer(k) for k in labels)):
        return None
    folded = {str(k).casefold(): str(k) for k in labels if str(k) not in names}
    cased = [(folded[n.casefold()], n) for n in missing if n.casefold() in folded]
    case = (f" Names are case-sensitive: {cased[0][0]!r} is not {cased[0][1]!r}."
            if cased else "")
    raise ValueError(f"{what} has no {holds} for the {thing}s {missing}; "
                     f"{_others(labels, names, word, thing)}.{case} {fix}")


def _is_missing(x) -> bool:
    """Whether x is pandas' missing value pd.NA (told without importing pandas), which numpy
    cannot make a float of; None and NaN become NaN already."""
    return type(x).__name__ == "NAType" and type(x).__module__.startswith("pandas")


def _pandas_numbers(v, name: str) -> np.ndarray:
    """The values of a pandas Series or DataFrame as a numpy array: columns of numpy numbers as
    they are (their dtype kept, as when read as an array), others (nullable Float64 or Int64,
    object) as float64 with missing values (pd.NA, None) as NaN, which the adapter's checks
    then report as missing values to impute (pd.NA was an unclear TypeError)."""
    dtypes = [v.dtype] if v.ndim == 1 else list(v.dtypes)
    if all(isinstance(d, np.dtype) and d.kind in "biuf" for d in dtypes):
        return v.to_numpy()
    try:
        return v.to_numpy(dtype="float64", na_value=np.nan)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name}: expected numbers, but the pandas {type(v).__name__} (dtype "
                        f"{', '.join(sorted({str(d) for d in dtypes}))}) holds values that are "
                        f"not ({e}){_non_numeric(v)}. Convert them to the numbers the model was "
                        f"trained on (a category one-hot encoded, as in training), or drop the "
                        f"columns the model does not take.") from None


def _non_numeric(v) -> str:
    """Which entries of a pandas row (a Series indexed by column) or columns of a DataFrame
    hold values that are not numbers: " in 'sex_M'"; "" when it cannot be told."""
    def number(x) -> bool:
        if x is None or _is_missing(x):
            return True
        try:
            float(x)                      # numbers, and texts of numbers ("42"), as numpy reads
        except (TypeError, ValueError):
            return False
        return True
    try:
        if v.ndim == 1:
            bad = [k for k, x in v.items() if not number(x)]
        else:
            bad = [c for c in v.columns if not all(number(x) for x in v[c])]
    except Exception:  # noqa: BLE001 -- only for the message
        return ""
    if not bad:
        return ""
    shown = ", ".join(repr(str(b)) for b in bad[:5]) + (", ..." if len(bad) > 5 else "")
    return f" in {shown}"


def _missing(value) -> bool:
    """Whether ``value`` is a missing value, not data: None, a NaN of any float type, or
    pandas' NA or NaT (``_is_missing``'s way: told by their types, pandas not imported)."""
    if value is None or _is_missing(value):
        return True
    if isinstance(value, (float, np.floating)):
        return bool(np.isnan(value))
    return type(value).__name__ == "NaTType" and type(value).__module__.startswith("pandas")


def _native_byte_order(arr: np.ndarray) -> np.ndarray:
    """arr with its numbers in this machine's byte order (a FITS file's arrays are big-endian,
    which torch cannot take), the same values and precision."""
    if not arr.dtype.isnative:
        return arr.astype(arr.dtype.newbyteorder("="))
    return arr


def _complex_refused(dtype, name: str) -> None:
    """A TypeError for complex values, which a cast to float would silently cut to their real
    parts."""
    raise TypeError(f"{name}: expected real numbers, got complex values ({dtype}); pass their "
                    "magnitude (abs) or real part (.real) as the model expects them.")


def _missing_as_nan(arr: np.ndarray) -> np.ndarray:
    """An object array (a list holding pd.NA or pd.NaT, ``df.to_numpy()`` of a nullable
    column) with its missing values (``_missing``) as NaN, so that they are reported as missing
    values to impute, not as values numpy cannot make a float of."""
    flat = [np.nan if _missing(v) else v for v in arr.ravel().tolist()]
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(arr.shape)


def batch_of_one_hint(shape: Sequence[int], instance_dims: int, raw=None,
                      fits: Callable[[tuple], bool] = lambda _: True) -> str:
    """A hint when ``shape`` is one instance's (``instance_dims`` dimensions, a shape that
    ``fits``) with a batch dimension of 1 in front: a batch of one passed where one instance is
    wanted (``raw``, the value given: a pandas frame's row is taken with .iloc)."""
    shape = tuple(shape)
    if len(shape) == instance_dims + 1 and shape[0] == 1 and fits(shape[1:]):
        take = "x.iloc[0]" if is_pandas(raw, 2) else "x[0]"
        return (f" It looks like a batch of one (shape [1, ...]): pass the instance itself, "
                f"{take} (the kernels add the batch dimension).")
    return ""


def _float_tensor(raw, name: str) -> torch.Tensor:
    """raw (an array, a nested list or a tensor of numbers) as a float tensor: float64 values
    (a float64 array, Python floats) keep their precision, others become float32; ``collate``
    then casts to the model's dtype (so a float64 model explains the values it was given).
    Missing values (None, NaN, pd.NA, pd.NaT) become NaN, which the adapter's checks report."""
    if isinstance(raw, torch.Tensor):       # a float tensor keeps its precision (float64 models)
        if raw.is_complex():
            _complex_refused(raw.dtype, name)
        return raw.detach() if raw.is_floating_point() else raw.detach().float()
    try:
        arr = _native_byte_order(np.asarray(raw))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name}: expected numbers (an array, a list or a tensor), got "
                        f"{type(raw).__name__}: {e}") from None
    if arr.dtype.kind == "c":
        _complex_refused(arr.dtype, name)
    try:
        if arr.dtype == object:
            arr = _missing_as_nan(arr)
        if arr.dtype != np.float64:
            arr = np.asarray(arr, dtype=np.float32)
        if not arr.flags.writeable:       # (pandas' arrays): torch warns, and would share it
            arr = arr.copy()
        return torch.from_numpy(arr)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name}: expected numbers (an array, a list or a tensor), got "
                        f"{type(raw).__name__}: {e}") from None


class TimeSeries(Modality):
    """A multichannel series [T, C]; units are time windows x channel groups. The model gets
    a batch as [B, T, C], time first (a Conv1d model transposes it in forward: x.transpose(1, 2)).

    window: time steps per unit; channel_groups: lists of channel indices (default: one group
    per channel); baseline: "zero" or "mean" (each channel's mean over the instance).
    """

    kind = "timeseries"

    def __init__(self, name: str = "series", window: int = 8, channels: Sequence[str] = (),
                 channel_groups: Sequence[Sequence[int]] | None = None, baseline: str = "zero"):
        super().__init__(name)
        window = positive_int(window, "TimeSeries window (time steps per unit)")
        if baseline not in ("zero", "mean"):
            raise ValueError(f"TimeSeries baseline {baseline!r} is not 'zero' or 'mean'.")
        self.window = int(window)
        # any sequence of names: a list, a numpy array, a DataFrame's columns
        self.channels = _names(channels, "TimeSeries channels", "channels=['ecg', 'spo2']")
        if not self.channels:
            raise ValueError("TimeSeries needs the channel names, e.g. channels=['ecg', 'spo2'].")
        if isinstance(channel_groups, (str, bytes, dict)):
            raise TypeError("TimeSeries channel_groups must be a list of groups, each a list of "
                            "channel indices or names, e.g. [[0, 1], [2]].")
        groups = ([[c] for c in range(len(self.channels))] if channel_groups is None
                  else list(channel_groups))
        if not groups:
            raise ValueError("TimeSeries channel_groups is empty; give one group per unit, e.g. "
                             "[[0, 1], [2]], or leave it out for one group per channel.")
        groups = [_members(chans, f"TimeSeries channel group {g}", self.channels, "channel")
                  for g, chans in enumerate(groups)]
        gidx = np.full(len(self.channels), -1, dtype=np.int64)
        for g, chans in enumerate(groups):
            for c in chans:
                if not 0 <= c < len(self.channels):
                    raise ValueError(f"TimeSeries channel {c} is outside 0..{len(self.channels) - 1}.")
                if gidx[c] != -1:
                    raise ValueError(f"TimeSeries channel {self.channels[c]!r} is in two groups.")
                gidx[c] = g
        if (gidx < 0).any():
            raise ValueError("Every TimeSeries channel must be in exactly one channel group.")
        self.groups = [list(g) for g in groups]
        self._gidx = torch.from_numpy(gidx)
        self.baseline = baseline

    def to_tensor(self, raw) -> torch.Tensor:
        """A series [T, C] from an array (time x channels, channels in the order of
        ``channels``) or a pandas DataFrame, whose columns are taken by name (a frame in
        another column order is read right). A frame whose column labels are integers none of
        which is a channel name (``pd.DataFrame(array)``, labels 0..C-1) is read by position;
        one whose labels name some channels but not all, or other names only, is refused."""
        if is_pandas(raw, 2):
            raw = self._by_channel_name(raw)
        t = _float_tensor(raw, self.name)
        c = len(self.channels)
        if t.dim() != 2 or t.shape[1] != c or t.shape[0] == 0:
            hint = batch_of_one_hint(t.shape, 2, raw, lambda rest: rest[1:] == (c,))
            if not hint and t.dim() == 1 and c == 1 and t.shape[0]:
                hint = " A 1-D series of one channel: pass series[:, None] (or .reshape(-1, 1))."
            elif t.dim() == 2 and t.shape[0] == c and t.shape[1] not in (0, c):
                hint = (" It looks like [channels, time]: pass series.T (the model then gets "
                        "[batch, time, channels]; a model that wants channels first transposes "
                        "it in forward).")
            elif t.dim() == 2 and t.shape[0] >= t.shape[1] > 0:
                # (time x channels: longer than wide; a wide one may be channels x time)
                hint = (f" channels= names {c} channels but the series has {t.shape[1]} "
                        "columns: give one name per column.")
            raise ValueError(f"{self.name}: a series must be [time, {c} channels] "
                             f"with at least one time step, got shape {tuple(t.shape)}.{hint}")
        return t

    def _by_channel_name(self, frame) -> np.ndarray:
        """A DataFrame's values [T, C] with its columns in the order of ``channels`` (by
        position when its column labels are integers, none a channel name)."""
        picked = _named_order(
            list(frame.columns), self.channels, f"{self.name}: the DataFrame", "columns",
            "channel", f"Name its columns by the channels {self.channels} (rename the others), "
            f"or pass frame.to_numpy() with the channels in that order.", holds="column")
        return _pandas_numbers(frame if picked is None else frame[picked], self.name)

    def n_windows(self, x: torch.Tensor) -> int:
        return math.ceil(x.shape[0] / self.window)

    def unit_index(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.arange(x.shape[0], device=x.device) // self.window
        return t[:, None] * len(self.groups) + self._gidx.to(x.device)[None, :]

    def n_units(self, x: torch.Tensor) -> int:
        return self.n_windows(x) * len(self.groups)

    def unit_labels(self, x: torch.Tensor) -> list[str]:
        names = ["+".join(self.channels[c] for c in g) for g in self.groups]
        return [f"{names[g]} t{w * self.window}-{min(x.shape[0], (w + 1) * self.window) - 1}"
                for w in range(self.n_windows(x)) for g in range(len(self.groups))]

    def baseline_raw(self, x: torch.Tensor) -> torch.Tensor:
        if self.baseline == "zero":
            return torch.zeros_like(x)
        return x.mean(0, keepdim=True).expand_as(x).clone()
