"""Pieces every kernel shares: instances, targets, masked inputs and chunked evaluation."""
from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..adapter import (AdapterError, ModelAdapter, ModelInputError, Prepared, Target,
                       is_out_of_memory, naming_instance)
from ..checks import is_integer, positive_int
from ..precision import dtype_eps, outputs_differ
from ..progress import ProgressFn, report

#: Default rows per forward pass for perturbation kernels. Small batches keep activations in
#: the CPU caches: on the easy-VQA model a batch of 64-256 costs the least per sample, and one
#: of 512 about 1.5 times as much (2 cores, torch 2.13; ``floor_batch_scan_ms_per_sample`` in
#: benchmarks/results/kernels.json).
PERTURBATION_BATCH = 128


_MATH_LOCK = threading.Lock()
_math_users = 0            # threads inside math_attention now
_math_context = None       # the selector entered by the first of them, exited by the last


@contextlib.contextmanager
def math_attention():
    """A context in which ``scaled_dot_product_attention`` (a transformer's attention) runs in
    its math backend: the fused ones (flash, memory-efficient) have no second derivative
    ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented"), and second-order gradients need one. torch's backend flags are the
    process's: the first thread in sets them and the last one out restores them (so two
    threads inside at once cannot restore them under each other); other threads use the math
    backend meanwhile too, slower but the same."""
    global _math_users, _math_context
    with _MATH_LOCK:
        if _math_users == 0:
            _math_context = _math_selector()
            _math_context.__enter__()
        _math_users += 1
    try:
        yield
    finally:
        with _MATH_LOCK:
            _math_users -= 1
            if _math_users == 0:
                context, _math_context = _math_context, None
                context.__exit__(None, None, None)


def _math_selector():
    """torch's context that allows the math backend of attention only."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:               # pragma: no cover - torch before 2.3
        return torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True,
                                              enable_mem_efficient=False)
    return sdpa_kernel([SDPBackend.MATH])


def check_adapter(adapter, what: str) -> ModelAdapter:
    """adapter, checked to be a ModelAdapter (``what`` names the function in the error)."""
    if not isinstance(adapter, ModelAdapter):
        raise AdapterError(f"{what}() needs a ModelAdapter, got {type(adapter).__name__}.")
    return adapter


def as_prepared(adapter: ModelAdapter, instance, number: int | None = None) -> Prepared:
    """Accept an instance dict or an already prepared instance (prepared by this adapter, or by
    one with the same modalities). ``number``: how errors about a dict's inputs name it
    (``ModelAdapter.prepare``)."""
    if not isinstance(instance, Prepared):
        return adapter.prepare(instance, number=number)
    if instance.names != adapter.names or set(instance.raw) != set(adapter.names):
        raise AdapterError(f"This prepared instance has modalities {instance.names}, but the "
                           f"adapter's are {adapter.names}: it was prepared by another adapter. "
                           "Pass the instance dict, or prepare it with this adapter "
                           "(adapter.prepare(instance)).")
    return instance


#: what to change in a model whose output for an instance depends on the other rows of its
#: batch (said by this check and by the dataset features' own)
ROWS_INDEPENDENT_ADVICE = (
    "Make forward() treat the rows of a batch independently: no statistics over the batch "
    "dimension (h.mean(0), a statistic of the first row applied to all, BatchNorm with "
    "track_running_stats=False or in training mode; a dynamically quantised model scales each "
    "batch by its own range: explain the float model).")

#: adapters whose model was found to treat a batch's rows independently (checked once each)
_ROWS_INDEPENDENT: "weakref.WeakSet[ModelAdapter]" = weakref.WeakSet()

#: why a batch-dependent model is refused (stage 1 and 2's kernels of one instance)
_BATCHED_WITH_COPIES = ("Every explanation batches the instance with masked copies or points on "
                        "a path, so its scores would depend on the batch size.")
#: the same for the kernels over a reference set (EMAP, DIME, the interaction type)
_BATCHED_WITH_OTHERS = ("EMAP batches pairs of different instances' modalities (and DIME their "
                        "masked copies), so its averages would depend on the batch size and on "
                        "which pairs share a batch.")


def check_rows_independent(adapter: ModelAdapter, prepared: Prepared,
                           batched: str = _BATCHED_WITH_COPIES,
                           other: Mapping[str, torch.Tensor] | None = None) -> None:
    """An AdapterError (code "batch-dependent") when the model's output for the instance
    depends on the other rows of its batch (BatchNorm without running statistics, h - h.mean(0),
    the first row's statistic applied to all, dynamic quantisation's per-batch scale): every
    method batches the instance with masked copies or points on a path (EMAP and DIME, with
    other instances), so its scores would depend on which rows share a batch (occlusion's
    changed 2.9x with batch_size; ``batched`` says why in the error). The instance
    beside ``other`` (continuous inputs of its shapes; default its baseline), first and second,
    is compared with the instance beside itself (the same shapes: a model that treats rows
    independently gives the same values to rounding), and one more pass tells a random model
    (check() reports that) from the batch. Passed: not checked again for this adapter.
    Failed, or inconclusive (an output that is not finite, a modality of the instance equal to
    the other row's, where a statistic over it would not show, a model that cannot run the
    batch, whose method then says why): checked again at the next call. Running out of memory
    is raised as it is. Cost: 3 forward passes of 2 rows (4 when they differ), a check of the
    model, not counted in a result's forward_passes; once passed, a set lookup (no
    torch.no_grad() context to enter: every gradient call asks, and that costs about 20 us on
    cold caches, as benchmarks/kernels.py times a call)."""
    if adapter in _ROWS_INDEPENDENT:
        return
    _check_rows_now(adapter, prepared, batched, prepared.baseline if other is None else other)


@torch.no_grad()
def _check_rows_now(adapter: ModelAdapter, prepared: Prepared, batched: str,
                    other: Mapping[str, torch.Tensor]) -> None:
    names = prepared.names
    x = prepared.continuous
    equal = [torch.equal(x[n], other[n]) for n in names]
    if all(equal):
        return                     # the instance is the other row: nothing to tell apart

    def run(*pairs):
        """The outputs of the row pairs, each [2, ...] from (first, second); None when the
        model cannot run them (the method's own passes meet that and say why), and running
        out of memory raised at once, as the method's passes would."""
        try:
            return [adapter.forward(dict(prepared.raw),
                                    {n: torch.stack([first[n], second[n]]) for n in names})
                    for first, second in pairs]
        except Exception as error:  # noqa: BLE001
            if memory_error(error):
                raise
            return None
    ran = run((x, x), (x, other), (other, x))
    if ran is None:
        return
    same, beside = ran[0], torch.cat([ran[1][:1], ran[2][1:]])     # x first, then second
    if not (torch.isfinite(same).all() and torch.isfinite(beside).all()):
        return
    eps = dtype_eps(adapter, same, beside)
    if not outputs_differ(beside, same, eps):
        if not any(equal):             # a modality equal in both rows could hide a statistic
            _ROWS_INDEPENDENT.add(adapter)
        return
    again = run((x, x))
    if again is None or outputs_differ(same, again[0], eps):
        return                             # a random model: check() says so, not this
    largest = float((beside.double() - same.double()).abs().max())
    which = "its baseline" if other is prepared.baseline else "another instance"
    raise AdapterError(
        f"The model's logits for an instance depend on the other instances in its batch: "
        f"beside {which} and beside a copy of itself, they differ by up to "
        f"{largest:.3g}. {batched} " + ROWS_INDEPENDENT_ADVICE,
        code="batch-dependent")


#: how many of a reference set's instances the rows check looks through for one to pair the
#: first with (of its input shapes, different in every modality)
ROWS_CHECK_CANDIDATES = 8


def check_instance_rows_independent(adapter: ModelAdapter, instance, others=()) -> None:
    """``check_rows_independent`` on an instance as the user gives it (a dict of inputs), for
    the kernels over a reference set, which batch instances with each other: the instance
    beside the first of ``others`` (among the first ROWS_CHECK_CANDIDATES) that has its input
    shapes and differs from it in every modality, else beside its baseline. An instance that
    cannot be prepared is left to the method's own passes, which name it and say why."""
    if adapter in _ROWS_INDEPENDENT:
        return
    try:
        prepared = as_prepared(adapter, instance)
    except Exception:  # noqa: BLE001 -- the method's own passes meet it and say why
        return
    x = prepared.continuous
    for candidate in itertools.islice(others, ROWS_CHECK_CANDIDATES):
        try:
            c = as_prepared(adapter, candidate).continuous
        except Exception:  # noqa: BLE001 -- not a partner; its own passes say why
            continue
        if all(c[n].shape == x[n].shape and not torch.equal(c[n], x[n]) for n in x):
            check_rows_independent(adapter, prepared, _BATCHED_WITH_OTHERS, other=c)
            return
    check_rows_independent(adapter, prepared, _BATCHED_WITH_OTHERS)


@torch.no_grad()
def resolve_target(adapter: ModelAdapter, prepared: Prepared, target=None) -> Target:
    """None means the model's predicted class; otherwise see ModelAdapter.target (1 forward if None)."""
    if target is None:
        return adapter.target(int(adapter.forward(prepared.raw).argmax(1)[0]))
    return adapter.target(target)


def masked_continuous(prepared: Prepared, masks: Mapping[str, torch.Tensor],
                      adapter: ModelAdapter) -> dict[str, torch.Tensor]:
    """Continuous inputs [B, ...] in which units with mask 0 take the baseline.

    masks: {modality: [B, n_units]} (values in [0, 1]); modalities without a mask keep the
    instance as it is (expanded to B).
    """
    b = next(iter(masks.values())).shape[0]
    out = {}
    for name in prepared.names:
        x = prepared.continuous[name]
        if name in masks:
            out[name] = adapter.modalities[name].apply_mask(
                x, masks[name], prepared.baseline[name], prepared.index[name])
        else:
            out[name] = x.unsqueeze(0).expand(b, *x.shape)
    return out


@torch.no_grad()
def evaluate_masks(adapter: ModelAdapter, prepared: Prepared, masks: Mapping[str, torch.Tensor],
                   target: Target, batch_size: int = PERTURBATION_BATCH, progress: ProgressFn = None,
                   message: str = "forward passes") -> torch.Tensor:
    """f_target of the masked instance for every row of the masks: a tensor [B].

    Cost: B forward passes, in chunks of batch_size (progress is reported per chunk). No rows
    (B = 0): an empty tensor, no forward pass.
    """
    total = next(iter(masks.values())).shape[0]
    return evaluate_mask_rows(adapter, prepared, total,
                              lambda s, e: {k: v[s:e] for k, v in masks.items()}, target,
                              batch_size, progress, message)


@torch.no_grad()
def evaluate_mask_rows(adapter: ModelAdapter, prepared: Prepared, total: int,
                       rows: Callable[[int, int], Mapping[str, torch.Tensor]], target: Target,
                       batch_size: int = PERTURBATION_BATCH, progress: ProgressFn = None,
                       message: str = "forward passes") -> torch.Tensor:
    """``evaluate_masks`` of ``total`` mask rows that ``rows(start, stop)`` builds one chunk at a
    time: memory for one chunk of masks, whatever their number (occlusion's [1 + U, U] masks
    were 1 GB for 16,000 units)."""
    step = positive_int(batch_size, "batch_size")
    if total == 0:
        return torch.zeros(0, device=adapter.device)
    outs = []
    for s in range(0, total, step):
        chunk = rows(s, min(total, s + step))
        outs.append(adapter.scalar(prepared, masked_continuous(prepared, chunk, adapter), target))
        report(progress, min(total, s + step), total, message)
    return torch.cat(outs)


def occlusion_rows(units: Mapping[str, int], start: int, stop: int) -> dict[str, torch.Tensor]:
    """Rows start..stop - 1 of the occlusion masks of ``units`` {modality: count} (modalities
    in order, their units one after the other): row 0 keeps everything, row 1 + k removes unit
    k of all of them alone."""
    r = torch.arange(start, stop)
    out, offset = {}, 0
    for name, u in units.items():
        m = torch.ones(len(r), u)
        hit = (r >= 1 + offset) & (r < 1 + offset + u)
        m[torch.nonzero(hit)[:, 0], r[hit] - 1 - offset] = 0.0
        out[name] = m
        offset += u
    return out


def block_pairs(a: int, b: int, batch_size: int | None, device):
    """Yield (i [B], j [B]): all a x b pairs (i < a, j < b) in row-major order, in chunks of up
    to batch_size pairs (None: one chunk), as index tensors on ``device``."""
    n = int(a) * int(b)
    step = max(n, 1) if batch_size is None else positive_int(batch_size, "batch_size")
    for s in range(0, n, step):
        k = torch.arange(s, min(n, s + step), device=device)
        yield k // b, k % b


def merge_groups(keys: Sequence, positions: Sequence[torch.Tensor],
                 values: Sequence[Sequence[torch.Tensor | None]]
                 ) -> list[tuple[list[int], torch.Tensor, list[torch.Tensor | None]]]:
    """Groups of instances merged by key: for each distinct key, (its groups, the positions of
    their instances and each of their values, concatenated group after group; None stays
    None). positions[g]: group g's instance positions; values[g]: its list of tensors [G, ...]
    (or None). A group alone under its key is kept as it is (no copy)."""
    parts: dict = {}
    for g, key in enumerate(keys):
        parts.setdefault(key, []).append(g)
    out = []
    for gs in parts.values():
        if len(gs) == 1:
            out.append((gs, positions[gs[0]], list(values[gs[0]])))
            continue
        out.append((gs, torch.cat([positions[g] for g in gs]),
                    [None if v is None else torch.cat([values[g][k] for g in gs])
                     for k, v in enumerate(values[gs[0]])]))
    return out


def input_shapes(adapter: ModelAdapter, instance) -> tuple:
    """The shapes of an instance's model inputs, one per modality (``Modality.input_shape``: no
    conversion where the modality can read them off the raw value, no checks): instances with
    equal shapes can be batched without padding."""
    adapter._check_names(instance)
    return tuple(m.input_shape(instance[n]) for n, m in adapter.modalities.items())


def memory_error(error: BaseException) -> bool:
    """Whether an error (or the error it wraps) is about memory (out of memory on the device or
    the host), not about the inputs: such an error is raised as it is, never blamed on an
    instance."""
    return is_out_of_memory(error) or is_out_of_memory(error.__cause__)


@dataclass
class ModelFailure:
    """The model's error on one instance's own inputs (a batch of one): ``error`` the adapter's
    ModelInputError, ``shapes`` {modality: per-instance input shape}."""

    error: Exception
    shapes: dict

    def brief(self, limit: int = 240) -> str:
        """One line: what the model raised, on which input shapes (the original error, cut at
        ``limit`` characters, without the adapter's general advice)."""
        cause = self.error.__cause__ if self.error.__cause__ is not None else self.error
        text = " ".join(str(cause).split())
        if len(text) > limit:
            text = text[:limit - 3].rstrip() + "..."
        shapes = ", ".join(f"{n} {s}" for n, s in self.shapes.items())
        return f"the model raised {type(cause).__name__} on its inputs ({shapes}): {text}"


#: How many instances in a row, none run, make runnable_parts' callers stop looking for the
#: few the model cannot run: such a model is misconfigured (its first instance's error says how).
GIVE_UP_AFTER = 32


def runnable_parts(run: Callable, raw: Mapping[str, torch.Tensor], positions: Sequence[int],
                   failed: dict, give_up: Callable[[], bool] | None = None
                   ) -> Iterator[tuple[list[int], object]]:
    """Yield (positions, run(inputs)) for ``raw`` (model inputs [B, ...] of the instances at
    ``positions``): one call, ``run(raw)``, when the model runs the batch (no extra cost);
    when it raises ModelInputError the batch is halved, and each half again, until the
    instances that the model cannot run alone are found: they go into ``failed`` {position:
    ModelFailure} and the runnable parts are yielded, in order. Any other error (and a
    ModelInputError about memory) is raised as it is. give_up(): asked after each instance
    found; when it says True, that instance's ModelInputError is raised (a model that runs
    none of the first GIVE_UP_AFTER instances is misconfigured: halving every batch of the
    dataset down to single instances would only make the error come minutes later).
    Cost on a failure: about 2 log2(B) calls per instance the model cannot run."""
    positions = list(positions)
    try:
        out = run(raw)
    except ModelInputError as e:
        if memory_error(e):
            raise
        if len(positions) == 1:
            failed[positions[0]] = ModelFailure(e, {n: tuple(x.shape[1:]) for n, x in raw.items()})
            if give_up is not None and give_up():
                raise
            return
        half = len(positions) // 2
        yield from runnable_parts(run, {n: x[:half] for n, x in raw.items()}, positions[:half],
                                  failed, give_up)
        yield from runnable_parts(run, {n: x[half:] for n, x in raw.items()}, positions[half:],
                                  failed, give_up)
        return
    yield positions, out


class ShapeGroups:
    """N instances grouped by the shapes of their model inputs (``Modality.input_shape``), each
    group collated on its own, so that no instance is ever padded to another's length: a model
    whose output changes with padding (it pools over [PAD] tokens) gets its own numbers. When
    all the instances share one shape (the common case) there is one group: all of them, in
    order, collated as one batch.

    positions[g]: the positions (in the list given) of group g's instances, a LongTensor on the
    model's device; raws[g]: their model inputs. ``by(names)`` regroups them by the shapes of
    some modalities only (what a batch of pairs that takes only those modalities from these
    instances needs); ``instance(k)`` is one instance's inputs (a batch of one).
    Cost: reading each instance's input shapes, and one collate per group.
    """

    def __init__(self, adapter: ModelAdapter, items, numbers=None):
        self.names = tuple(adapter.names)
        self.n = len(items)
        found: dict[tuple, list[int]] = {}
        for k, item in enumerate(items):
            try:
                shapes = input_shapes(adapter, item)
            except (ValueError, TypeError) as e:    # the modality refused it: say which one
                if len(items) > 1 or numbers is not None:
                    naming_instance(e, k if numbers is None else numbers[k])
                raise
            found.setdefault(shapes, []).append(k)
        self.keys = list(found)
        self.positions = [torch.tensor(p, dtype=torch.long, device=adapter.device)
                          for p in found.values()]
        # errors name an instance by ``numbers[k]`` (its dataset index) or its place in
        # ``items``, not by its row in a group
        self.raws = [adapter.collate([items[k] for k in p],
                                     numbers=p if numbers is None else [numbers[k] for k in p])
                     for p in found.values()]
        self._where = {k: (g, r) for g, p in enumerate(found.values()) for r, k in enumerate(p)}
        self._by: dict[tuple[str, ...], list] = {}

    @torch.no_grad()
    def unrunnable(self, run: Callable, batch_size: int) -> tuple[dict[int, ModelFailure], int]:
        """({k: ModelFailure}, instances run) for the instances (positions in the list given)
        whose own inputs the model cannot run: ``run`` (model inputs -> outputs) raises
        ModelInputError on them alone. For after a batch of pairs failed: each group runs in
        batches of ``batch_size``, a failing batch halved until the failing instances are found
        (``runnable_parts``). When the first GIVE_UP_AFTER instances tried all fail, it stops
        there (none run: the model is misconfigured).
        Cost: one forward pass per instance, and about 2 log2(batch_size) more per failing one."""
        step = positive_int(batch_size, "batch_size")
        failed: dict[int, ModelFailure] = {}
        ran = 0
        try:
            for pos, raw in zip(self.positions, self.raws):
                ks = pos.tolist()
                for s in range(0, len(ks), step):
                    for part, _ in runnable_parts(
                            run, {n: x[s:s + step] for n, x in raw.items()}, ks[s:s + step],
                            failed, lambda: ran == 0 and len(failed) >= GIVE_UP_AFTER):
                        ran += len(part)
        except ModelInputError:
            if ran or not failed:                # not runnable_parts giving up
                raise
        return dict(sorted(failed.items())), ran

    def where(self, k: int) -> tuple[int, int]:
        """(group, row in it) of instance k."""
        return self._where[int(k)]

    def instance(self, k: int) -> dict[str, torch.Tensor]:
        """The model inputs of instance k alone {name: [1, ...]}."""
        g, r = self.where(k)
        return {n: x[r:r + 1] for n, x in self.raws[g].items()}

    def by(self, names) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """[(positions, {name: inputs})]: the instances grouped by the shapes of the modalities
        ``names`` only, with those modalities' inputs (the groups of equal shapes there
        concatenated group after group; the groups' own inputs then become views of that copy, so
        each input is held once). One group, all the instances in order, when those shapes are
        all equal."""
        names = tuple(names)
        if names not in self._by:
            cols = [self.names.index(m) for m in names]
            merged = merge_groups([tuple(key[c] for c in cols) for key in self.keys],
                                  self.positions, [[raw[m] for m in names] for raw in self.raws])
            for gs, _, xs in merged:
                if len(gs) > 1:      # the groups' own inputs become views of the merged copy,
                    o = 0            # so that the inputs are held once, not twice
                    for g in gs:
                        k = len(self.positions[g])
                        self.raws[g].update({m: x[o:o + k] for m, x in zip(names, xs)})
                        o += k
            self._by[names] = [(pos, dict(zip(names, xs))) for _, pos, xs in merged]
        return self._by[names]


@torch.no_grad()
def check_model_takes(adapter: ModelAdapter, *raws: Mapping[str, torch.Tensor]) -> None:
    """A plain forward pass of the first instance of each batch of model inputs: raises the
    adapter's clear error (naming the modalities and their shapes) when the model cannot take
    them. For after a split model's encoder or fusion failed: when this passes, the caller
    re-raises the original error (a real problem of the split, not of the inputs)."""
    for raw in raws:
        adapter.forward({n: x[:1] for n, x in raw.items()})


def modality_pair(adapter: ModelAdapter, modalities) -> tuple[str, str]:
    """The two modalities (a, b) of a stage-2 method, validated (default: the first two)."""
    names = adapter.names
    if len(names) < 2:
        raise ValueError(f"Cross-modal interactions need two modalities; the adapter has only "
                         f"{names}. Use stage 1 (kernels.unimodal.attribute) for one modality.")
    if modalities is None:
        return names[0], names[1]
    if isinstance(modalities, str):
        raise ValueError(f"modalities must be a pair of names such as ({names[0]!r}, "
                         f"{names[1]!r}), got the single string {modalities!r}.")
    if isinstance(modalities, (set, frozenset, dict)):
        raise ValueError(f"modalities must be an ordered pair (a tuple or list: rows, then "
                         f"columns), got the unordered {type(modalities).__name__} {modalities!r}.")
    try:
        pair = tuple(modalities)
    except TypeError:
        raise ValueError(f"modalities must be a pair of modality names drawn from {names}, got "
                         f"{modalities!r}.") from None
    if len(pair) != 2:
        raise ValueError(f"modalities must name exactly two modalities (rows, columns), got "
                         f"{list(pair)}.")
    unknown = [m for m in pair if m not in names]
    if unknown:
        raise ValueError(f"Unknown modalities {unknown}; the adapter's modalities are {names}.")
    if pair[0] == pair[1]:
        raise ValueError(f"The two modalities must differ, got {pair[0]!r} twice; interactions "
                         "are between units of two different modalities.")
    return pair  # type: ignore[return-value]


def positive_number(value, what: str, allow_zero: bool = False) -> float:
    """value, checked to be a finite real number > 0 (>= 0 with allow_zero), as a float."""
    ok = (isinstance(value, (int, float, np.integer, np.floating))
          and not isinstance(value, (bool, np.bool_)) and np.isfinite(value)
          and (value >= 0 if allow_zero else value > 0))
    if not ok:
        raise ValueError(f"{what} must be a {'non-negative' if allow_zero else 'positive'} "
                         f"number, got {value!r}.")
    return float(value)


def dataset_index(index, n_total: int, what: str = "index") -> int:
    """One instance number of a dataset of n_total: an integer in 0..n_total-1 (no floats,
    strings or bools: they would be truncated or misread)."""
    if not is_integer(index):
        raise ValueError(f"{what} must be an instance number (an integer), got {index!r} "
                         f"({type(index).__name__}).")
    return int(dataset_indices([index], n_total, what)[0])


def _out_of_range(value, n_total: int, what: str, negative: bool = False) -> ValueError:
    has = (f"the dataset has {n_total} instances, numbered 0..{n_total - 1}"
           + (f" (or -{n_total}..-1 from the end)" if negative else "") if n_total > 0
           else "the dataset is empty (it has no instances)")
    return ValueError(f"{what}: {value} is out of range; {has}.")


def indices_or_all(indices, n_total: int, negative: bool = False) -> np.ndarray:
    """All instance numbers 0..n_total-1 (indices None), or ``indices`` checked by
    ``dataset_indices``."""
    if indices is None:
        return np.arange(n_total, dtype=np.int64)
    return dataset_indices(indices, n_total, negative=negative)


def dataset_indices(indices, n_total: int, what: str = "indices",
                    negative: bool = False) -> np.ndarray:
    """Instance numbers of a dataset of n_total: a 1-D int64 array, every entry an integer in
    0..n_total-1. Refuses floats (1.7 would be truncated), strings, boolean masks and nested
    lists with a message that says what to pass instead. ``negative=True`` also takes
    -n_total..-1, counting from the end (as ``dataset[i]`` does), and returns them as 0..n-1."""
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    try:
        if isinstance(indices, (str, bytes)):
            raise TypeError
        arr = np.asarray(indices if isinstance(indices, np.ndarray) else list(indices))
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a 1-D list of instance numbers (integers), got "
                         f"{indices!r}.") from None
    if arr.dtype == np.bool_:
        raise ValueError(f"{what} must be instance numbers, not a boolean mask; pass "
                         "np.flatnonzero(mask) to take the instances where the mask is True.")
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D list of instance numbers, got shape {arr.shape}.")
    if arr.size and arr.dtype.kind not in "iu":
        values = arr.tolist()
        bad = next((x for x in values if isinstance(x, bool) or not isinstance(x, int)), None)
        if bad is not None:
            raise ValueError(f"{what} must be integers (instance numbers), got {bad!r} "
                             f"({type(bad).__name__}); non-integer numbers are not truncated.")
        big = next((x for x in values if not (-n_total if negative else 0) <= x < n_total),
                   None)
        if big is not None:      # Python integers too large for int64 make an object array
            raise _out_of_range(big, n_total, what, negative)
        arr = np.array(values, dtype=np.int64)   # an object array of small Python integers
    if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise _out_of_range(int(arr.max()), n_total, what, negative)     # would wrap to a negative int64
    arr = arr.astype(np.int64)
    low = -n_total if negative else 0
    out = (arr < low) | (arr >= n_total)
    if out.any():
        raise _out_of_range(int(arr[out][0]), n_total, what, negative)
    return np.where(arr < 0, arr + n_total, arr) if negative else arr


def sample_indices(n_total: int, n: int | None, seed: int) -> np.ndarray:
    """n of range(n_total) drawn with ``seed``, sorted (all of them when n is None or >= n_total).

    n: None or an integer >= 0 (a float, a bool or a negative number is a ValueError)."""
    if n is not None:
        n = positive_int(n, "The number of instances to sample (None for all of them)", 0)
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, size=int(n), replace=False))


# ---------------------------------------------------------------------------------------------
# instances of a dataset whose input the adapter refuses
# ---------------------------------------------------------------------------------------------
#: What collating one instance alone raises when the adapter refuses its input (a shape its
#: modality does not take, a NaN, a missing modality); no model runs there (memory errors are
#: raised as they are)
REFUSED_INPUT = (ValueError, TypeError, LookupError, RuntimeError)

#: How many instances a message names before it counts the rest
NAMED_INSTANCES = 5


def refused_inputs(adapter: ModelAdapter, dataset, idx) -> dict[int, Exception]:
    """{dataset index: error} of the instances ``idx`` of a MultimodalDataset whose input the
    adapter refuses: collating one alone (on the host) raises, its error naming it by its
    dataset index. No model runs. Cost: one collate per instance."""
    out: dict[int, Exception] = {}
    for i in map(int, idx):
        try:
            adapter.collate([dataset[i]], on_device=False, numbers=[i])
        except REFUSED_INPUT as e:
            if memory_error(e):
                raise
            out[i] = e
    return out


def instance_list(numbers: Sequence[int]) -> str:
    """"instance 5", "instances 5, 9 and 12", "instances 1, 2, 3, 4, 5 and 7 more"."""
    numbers = [int(i) for i in numbers]
    shown, more = numbers[:NAMED_INSTANCES], len(numbers) - NAMED_INSTANCES
    if len(numbers) == 1:
        return f"instance {numbers[0]}"
    if more > 0:
        return f"instances {', '.join(map(str, shown))} and {more} more"
    return f"instances {', '.join(map(str, shown[:-1]))} and {shown[-1]}"


def leave_out_refused(adapter: ModelAdapter, dataset, idx, what: str,
                      given: str | None = None, drawn: str = "", after: str = "",
                      choose: str = "", stacklevel: int = 2) -> tuple[np.ndarray, dict[int, str]]:
    """(idx without the instances whose input the adapter refuses, {dataset index: why} of
    those left out), for instances taken from a MultimodalDataset (``refused_inputs``).

    given: the parameter with which the user chose idx ("reference_indices"): a refused one is
    then an error, its own (class and message kept), which adds that it is one of those given
    and to remove it. None: idx was drawn from the dataset (``drawn`` says how: "instances
    drawn (n=100, seed=0)"); the refused ones are left out with one UserWarning naming them (a
    few, then a count) and why, ending with ``after`` (what the result takes instead; "{kept}"
    in it is the number kept). Fewer than 2 left: a ValueError, saying to fix those inputs or
    to ``choose`` ("pass indices="). what: the method's name, which leads the messages.
    stacklevel: the warning's, counted from the caller of this function."""
    idx = np.asarray(idx, dtype=np.int64)
    refused = refused_inputs(adapter, dataset, idx)
    if not refused:
        return idx, {}
    first_i, first = next(iter(refused.items()))
    if given is not None:
        others = [i for i in refused if i != first_i]
        also = (f"; the adapter refuses {instance_list(others)} of them too" if others else "")
        text = first.args[0] if first.args and isinstance(first.args[0], str) else str(first)
        first.args = (f"{text} (instance {first_i} is one of the {given} given: remove it from "
                      f"them, or fix its input{also})", *first.args[1:])
        raise first
    why = {i: str(e) for i, e in refused.items()}
    # the first one's reason, without the "Instance 5: " its error leads with
    reason = why[first_i].removeprefix(f"Instance {first_i}: ").rstrip(". ")
    said = (f"the adapter refuses the input of instance {first_i}: {reason}"
            if len(refused) == 1 else
            f"the adapter refuses the inputs of {instance_list(list(refused))} (on instance "
            f"{first_i}: {reason})")
    return _without(idx, why, what, drawn, said, after, first, stacklevel + 1, lambda kept: (
        f"{kept} {'has' if kept == 1 else 'have'} an input the adapter takes, and at least 2 "
        f"are needed; {said}. Fix those inputs{', or ' + choose if choose else ''}."))


def _without(idx: np.ndarray, why: dict[int, str], what: str, drawn: str, said: str,
             after: str, cause: Exception, stacklevel: int, too_few: Callable[[int], str]
             ) -> tuple[np.ndarray, dict[int, str]]:
    """(idx without the instances ``why`` names, why) for ``leave_out_refused`` and
    ``leave_out_unrunnable``: those left out said in one UserWarning ("{what}: 1 of the 12
    {drawn} is left out, as {said}. {after}", "{kept}" in ``after`` the number kept); a
    ValueError ("{what}: of the 12 {drawn}, " + too_few(number kept)), chained to ``cause``,
    when fewer than 2 are kept. stacklevel: the warning's, counted from this function's
    caller."""
    from ..notices import warn
    kept = idx[~np.isin(idx, list(why))]
    k, n = len(why), len(idx)
    if len(kept) < 2:
        raise ValueError(f"{what}: of the {n} {drawn}, {too_few(len(kept))}") from cause
    warn(f"{what}: {k} of the {n} {drawn} {'is' if k == 1 else 'are'} left out, as {said}. "
         f"{after.format(kept=len(kept))}".rstrip(), UserWarning, stacklevel=stacklevel + 1)
    return kept, why


class ResumedProgress:
    """A progress callback that a retry goes on with (``leave_out_unrunnable``'s callers): its
    reports are passed on as they are until ``resume()``; after it, the retry's counts fill
    what the first attempt left of its total, so that done never goes back."""

    def __init__(self, progress: ProgressFn):
        self.progress, self.last, self.base = progress, (0, 0), None

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if self.base is None:
            self.last = (done, total)
            report(self.progress, done, total, message)
            return
        first, whole = self.base
        share = done / total if total > 0 else 1.0
        report(self.progress, first + round((whole - first) * min(share, 1.0)), whole, message)

    def resume(self) -> None:
        """From now on, the counts are the retry's."""
        if self.base is None:
            self.base = self.last


def leave_out_unrunnable(adapter: ModelAdapter, dataset, idx, error: RuntimeError, what: str,
                         batch_size: int, given: str | None, drawn: str, after: str,
                         stacklevel: int = 2) -> tuple[np.ndarray, dict[int, str]]:
    """After the model failed with ``error`` on pairs of the instances ``idx`` of a dataset:
    (idx without those whose own inputs the model cannot run, {dataset index: why}), those left
    out said in one UserWarning ending with ``after`` ("{kept}": how many are kept). ``error``
    is raised again when it is about memory, when the model runs every instance alone (the
    failure is a pair's) or none of them (the model does not take these inputs at all). given:
    the parameter with which the user chose idx ("reference_indices"), or None when they were
    drawn (``drawn`` says how); given ones are an error naming them as given. Fewer than 2
    left: a ValueError. Cost: one forward pass per instance, only after a failure, and none
    when ``error`` carries what EMAP's own search found (``unrunnable_found``)."""
    if memory_error(error):
        raise error
    idx = np.asarray(idx, dtype=np.int64)
    found = getattr(error, "unrunnable", None)
    if found is None:
        shapes = ShapeGroups(adapter, [dataset[int(i)] for i in idx], idx)
        bad, ran = shapes.unrunnable(adapter.forward, batch_size)
        found = ({int(idx[k]): f.error for k, f in bad.items()}, ran)
    failed, ran = found
    if not failed or not ran:
        raise error
    first_i, first = next(iter(failed.items()))
    listed = instance_list(list(failed))
    if given is not None:
        raise ModelInputError(
            f"{what}: the model cannot run {listed} of the {given} given, alone: every "
            f"reference meets every other, so it needs all of them; remove "
            f"{'it' if len(failed) == 1 else 'them'} from {given}, or make the model take "
            f"{'its' if len(failed) == 1 else 'their'} inputs. On instance {first_i}: {first}"
        ) from error
    return _without(idx, {i: f"the model fails on it: {e}" for i, e in failed.items()}, what,
                    drawn, f"the model cannot run {listed} alone (on instance {first_i}: "
                    f"{first})", after, error, stacklevel + 1, lambda kept: (
                        f"the model runs {kept} alone, and at least 2 are needed; on instance "
                        f"{first_i}: {first}"))


def unrunnable_found(error: Exception, failed: dict[int, Exception], ran: int) -> Exception:
    """``error`` carrying what a search of the instances the model cannot run alone found
    ({dataset index: error}, how many ran), so that ``leave_out_unrunnable`` need not search
    again."""
    error.unrunnable = (failed, ran)
    return error


def reference_texts(n_total: int, reference_indices, n_reference, seed, averages: str,
                    listed: str) -> dict[str, str | None]:
    """The ``given``, ``drawn`` and ``after`` of ``leave_out_refused`` and
    ``leave_out_unrunnable`` for a reference set (dime's, interaction_type's): given when
    ``reference_indices`` is, else drawn from ``n_total`` instances with ``n_reference`` and
    ``seed``; averages: what takes the references kept ("DIME's averages"), listed: where the
    result lists those left out ('params["left_out"]')."""
    return {"given": None if reference_indices is None else "reference_indices",
            "drawn": drawn_references(n_total, n_reference, seed),
            "after": (f"{averages} take the other {{kept}} ({listed} lists those left out); "
                      "reference_indices= chooses the references.")}


def drawn_references(n_total: int, n_reference: int, seed) -> str:
    """How ``sample_indices`` took a reference set, for ``leave_out_refused``'s messages (only
    read when it drew them: n_reference is checked then)."""
    if not is_integer(n_reference) or n_reference >= n_total:
        return f"references (all the instances of the dataset, as n_reference={n_reference})"
    return f"references drawn at random (n_reference={n_reference}, seed={seed})"
