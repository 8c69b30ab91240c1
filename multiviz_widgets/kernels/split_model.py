"""A model split where one modality meets the others, in use: each modality of a batch encoded
once, and the outputs of many (modality from instance i, the others from instance j) pairs
computed by fusing pairs of encodings.

EMAP (``kernels.emap``) and DIME (``kernels.dime``) evaluate the model on cartesian pairs of
instances. ``model_split`` finds the split: declared by the model (``encode_modality`` /
``fuse_encodings``) or traced by ``kernels.factorize``. ``FusedPairs`` encodes
batches and fuses pairs of rows, and ``FusedPairs.check`` compares fused pairs with plain
forward passes before they are trusted; ``with_split`` builds on a split and falls back (and
remembers the rejection) when a traced split disagrees.

Instances of different input shapes (texts of different lengths) are encoded shape group by
shape group (``FusedPairs.encode_groups``), never padded: an encoder that pools over its
tokens without a pad mask gives each instance its own encoding. Encodings of one size (pooled
vectors) are then put together (group after group, each row with its instance's position) and
fused exactly as those of one batch; encodings whose size follows the input's (a token-level
cut) stay in groups of one size, and pairs are fused block by block (``Encodings``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ..adapter import (AdapterError, ModelAdapter, ModelInputError, ModelOutOfMemory,
                       check_inputs_kept, input_versions)
from ..progress import ProgressFn, report
from .common import ShapeGroups, merge_groups
from .factorize import FactorizationError, reject_factorization, traced_split

__all__ = ["CHECKED_PAIRS", "Encodings", "FusedPairs", "NoDecisionLayerInFusion", "Split",
           "check_factorized", "model_split", "same_or_reject", "steady_progress", "with_split"]


#: off-diagonal pairs (i, i + 1) compared with plain forward passes before fused pairs are used
CHECKED_PAIRS = 8


class NoDecisionLayerInFusion(FactorizationError):
    """The decision layer is not called by the split's fusion (it runs in an encoder, say): fused
    pairs give the logits but not the decision features a neuron target reads. A limit of the
    split for neuron targets only, never remembered as a rejection of the split."""


@dataclass
class Split:
    """How to encode each modality of a batch once and fuse pairs of encodings."""

    kind: str                                          # "declared" or "traced"
    side: str                                          # the modality split from the others
    encode: Callable[[Mapping[str, torch.Tensor]], tuple]
    from_side: tuple[bool, ...]                        # per encoded value: from the split-off modality
    fuse: Callable[[Sequence[torch.Tensor]], torch.Tensor]
    note: str = ""                                     # informative (e.g. submodules kept whole)
    #: traced by this call (False: a traced split from the cache, which a failed check may
    #: find stale, as when a list setting of the model changed: it is traced again then)
    fresh: bool = True


def steady_progress(progress: ProgressFn, total: int) -> Callable[[int, str], None]:
    """step(done, message): ``report(progress, done, total, message)``, never less than it
    reported before: when a split is abandoned part way (the forward passes then run its pairs
    again), the count stays where it was until the forward passes pass it, and never goes back."""
    shown = [0]

    def step(done: int, message: str) -> None:
        shown[0] = max(shown[0], int(done))
        report(progress, shown[0], total, message)
    return step


def check_factorized(factorized) -> None:
    """Raise a clear error unless ``factorized`` is one of the values emap and dime accept."""
    if factorized not in (None, True, False, "declared", "traced"):
        raise ValueError(f"factorized must be None, True, False, 'declared' or 'traced', got "
                         f"{factorized!r}.")


def with_split(adapter: ModelAdapter, factorized, side: str, build: Callable[[Split], object]
               ) -> tuple[object | None, str, str]:
    """(build(split), its kind, its note) with the model's split of ``side`` from the others, or
    (None, "none", why not) when there is none or (for a traced split and factorized=None) when
    build finds that the split disagrees with forward passes; the rejection is remembered. A
    traced split from the cache that disagrees is traced again once first: it may be stale (a
    setting the cache does not see changed, such as a list), and only a split traced for this
    call is rejected (or raised about, when it was asked for)."""
    split, why = model_split(adapter, factorized, side)
    while True:
        if split is None:
            return None, "none", why
        try:
            return build(split), split.kind, split.note
        except FactorizationError as e:
            if split.fresh or isinstance(e, NoDecisionLayerInFusion):
                return _not_built(adapter, factorized, side, split, e)
        except (AdapterError, RuntimeError) as e:
            return _not_built(adapter, factorized, side, split, e)
        split, why = model_split(adapter, factorized, side, retrace=True)


def _not_built(adapter: ModelAdapter, factorized, side: str, split: Split, e: Exception
               ) -> tuple[None, str, str]:
    """with_split's answer when build(split) raised ``e``: (None, "none", why) to fall back to
    forward passes (remembering a traced split that disagrees), else raise ``e``."""
    fall_back = factorized is None and split.kind == "traced"
    if isinstance(e, NoDecisionLayerInFusion):
        # the split holds (class targets keep it): only this neuron target cannot use it, so
        # the rejection is not remembered, and factorized=None falls back for a declared split too
        if factorized is None:
            return None, "none", f"split not used for this neuron target: {e}"
    elif isinstance(e, FactorizationError):
        # a traced split that disagrees with the forward pass: rejected for good (the
        # forward passes explain the model instead), when it was not asked for by name
        if fall_back:
            reject_factorization(adapter.model, adapter.names, adapter.keyword_inputs, side,
                                 str(e), hooked_modules(adapter))
            return None, "none", f"traced split rejected: {e}"
    elif isinstance(e, AdapterError):
        # a traced split in which a module the adapter hooks was not called as it is (the hook
        # that puts a modality's continuous input in never fired): the forward passes explain
        # the model instead
        if fall_back and getattr(e, "code", None) == "embedding-substitution":
            return None, "none", f"traced split not used: {e}"
    elif isinstance(e, RuntimeError):
        # a traced split that fails where the forward pass may not (e.g. a tensor of the model
        # that the trace could not follow): the forward passes explain the model this time,
        # and the split is tried again next time. Out of memory (the forward passes need more)
        # and an error about the inputs (which the forward passes would meet too) are raised.
        if fall_back and not isinstance(e, (torch.OutOfMemoryError, ModelOutOfMemory,
                                            ModelInputError)):
            return None, "none", f"traced split not used this time: {type(e).__name__}: {e}"
    raise e


def hooked_modules(adapter: ModelAdapter) -> list[nn.Module]:
    """The modules whose hooks the adapter uses (embedding layers, the decision layer): a traced
    split calls them whole."""
    return [*adapter.embedding_layers.values(), adapter.decision_layer]


def model_split(adapter: ModelAdapter, factorized, side: str, retrace: bool = False
                ) -> tuple[Split | None, str]:
    """(the split of modality ``side`` from the others, or None and why) for
    ``factorized=...`` of ``emap`` and ``dime``. retrace: a traced split is traced anew, not
    taken from the cache."""
    if factorized is False:
        return None, ""
    model, names = adapter.model, adapter.names
    declared = all(callable(getattr(model, k, None)) for k in ("encode_modality", "fuse_encodings"))
    if factorized == "declared" and not declared:
        raise ValueError("factorized='declared' needs a model with encode_modality(name, x) and "
                         "fuse_encodings(encodings) methods.")
    if declared and factorized != "traced":
        # each modality encoded alone: a pair takes ``side``'s encoding from one instance and
        # every other modality's from the other (with three or more, the others come together)
        return Split("declared", side,
                     lambda raw: tuple(model.encode_modality(n, raw[n]) for n in names),
                     tuple(n == side for n in names),
                     lambda rows: model.fuse_encodings(dict(zip(names, rows)))), ""
    try:
        f, fresh = adapter.run(lambda: traced_split(model, names, adapter.keyword_inputs, side,
                                                    hooked_modules(adapter), retrace))
    except FactorizationError as e:
        if factorized is None:
            return None, f"not traced: {e}"
        raise ValueError(f"factorized={factorized!r}: the model cannot be split where {side!r} "
                         f"meets the other modalities: {e}.") from None
    return Split("traced", side, f.encode, f.from_side, f.fuse, f.note, fresh), ""


@dataclass
class Encodings:
    """A split's values for N instances (``FusedPairs.encode_groups``), in groups whose values
    have one size, each group a (positions [G] of its instances, values [G, ...] per value).

    groups: one per input-shape group of the instances (``ShapeGroups``); side / others: the
    groups for the values of the split-off modality / of the other modalities (values of the
    other kind are None there). When each kind of value has one size, side and others are one
    group: all N instances (the case of pooled encodings), and pairs (i, j) are
    fused from any rows; otherwise a pair batch takes its side rows from one side group and its
    others rows from one others group.
    """

    groups: list[tuple[torch.Tensor, list[torch.Tensor]]]
    side: list[tuple[torch.Tensor, list[torch.Tensor | None]]]
    others: list[tuple[torch.Tensor, list[torch.Tensor | None]]]

    def blocks(self):
        """(side positions, side values, others positions, others values) for every pair of a
        side group and an others group: together all N x N pairs."""
        for ps, sv in self.side:
            for po, ov in self.others:
                yield ps, sv, po, ov


class FusedPairs:
    """A split model in use: encodings of batches, and outputs of fused pairs of encodings.

    reduce(logits, h) -> the outputs wanted ([B, K] or [B]); h is None unless ``features``.
    cost: a [count] of forward passes that ``check`` adds its own to (fused and full alike), as
    it runs them: a check that fails has run them too.
    status(what): called between the batches of ``encode_groups`` and ``check`` with what is
    being done ("encoding the instances (400 of 2000)"): the callers' progress counts the
    pairs, and without it the encoding of a large reference set (minutes for a large encoder)
    showed nothing and could not be cancelled (a progress callback raises ``Cancelled``).
    """

    def __init__(self, adapter: ModelAdapter, split: Split, batch_size: int, features: bool,
                 reduce: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
                 cost: list[int] | None = None, status: Callable[[str], None] | None = None):
        self.adapter, self.split, self.batch_size = adapter, split, batch_size
        self.features, self.reduce = features, reduce
        self.cost = [0] if cost is None else cost
        self.status = status

    def encode(self, raw: Mapping[str, torch.Tensor],
               continuous: Mapping[str, torch.Tensor] | None = None,
               rows_done: Callable[[int], None] | None = None) -> list[torch.Tensor]:
        """The split's values for a batch (raw inputs, optionally with continuous ones);
        rows_done(k) after each chunk of k rows encoded."""
        args = self.adapter.model_inputs(raw, continuous)
        b, bs = next(iter(args.values())).shape[0], self.batch_size
        versions = input_versions(args)
        parts = []
        for s in range(0, b, bs):
            chunk = {m: x[s:s + bs] for m, x in args.items()}
            parts.append(self.adapter.run(
                lambda chunk=chunk: self.split.encode(chunk),
                None if continuous is None else {m: x[s:s + bs] for m, x in continuous.items()},
                inputs=chunk))               # the ids whose embedding calls get the inputs
            if rows_done is not None:
                rows_done(min(bs, b - s))
        check_inputs_kept(args, versions)        # an encoder that edits its input in place
        return [torch.cat([p[k] for p in parts]) for k in range(len(self.split.from_side))]

    def _counter(self, what: str, total: int) -> Callable[[int], None] | None:
        """rows_done(k) for ``status``: "what (done of total)", counted over its calls; None
        without a status."""
        if self.status is None:
            return None
        done = [0]

        def rows_done(k: int) -> None:
            done[0] += k
            self.status(f"{what} ({done[0]} of {total})")
        rows_done(0)
        return rows_done

    def encode_groups(self, groups: ShapeGroups) -> Encodings:
        """The split's values for instances of several input shapes, each shape group encoded on
        its own (nothing padded); see ``Encodings``. One group: ``encode`` of its batch."""
        count = self._counter("encoding the instances", groups.n)
        full = [(pos, self.encode(raw, rows_done=count))
                for pos, raw in zip(groups.positions, groups.raws)]
        if len(full) == 1:
            return Encodings(full, full, full)
        return Encodings(full, self._merged(full, True), self._merged(full, False))

    def _merged(self, full, side: bool) -> list[tuple[torch.Tensor, list[torch.Tensor | None]]]:
        """The groups of ``full`` whose values of one kind (side's or the others') have the same
        sizes, put together group after group (with their instances' positions)."""
        kept = [k for k, own in enumerate(self.split.from_side) if own == side]
        merged = merge_groups([tuple(tuple(values[k].shape[1:]) for k in kept)
                               for _, values in full], [pos for pos, _ in full],
                              [[v if k in kept else None for k, v in enumerate(values)]
                               for _, values in full])
        return [(pos, values) for _, pos, values in merged]

    def pairs(self, side: Sequence[torch.Tensor], others: Sequence[torch.Tensor],
              i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Outputs of the pairs (row i of the side's values, row j of the others'), in batches."""
        bs, out = self.batch_size, []
        for s in range(0, len(i), bs):
            rows = [x[i[s:s + bs]] if own else y[j[s:s + bs]]
                    for x, y, own in zip(side, others, self.split.from_side)]
            if self.features:
                try:
                    logits, h = self.adapter.run(lambda: self.split.fuse(rows), features=True)
                except AdapterError:
                    raise NoDecisionLayerInFusion(
                        "the decision layer is not called where the modalities meet, so fused "
                        "pairs cannot give a neuron target; pass factorized=False (or None) for "
                        "neuron targets of this model") from None
            else:
                logits, h = self.adapter.run(lambda: self.split.fuse(rows)), None
            # the same logits as a forward pass gives ([B] with one class name becomes [B, 1])
            logits = self.adapter.as_logits(logits, len(i[s:s + bs]))
            out.append(self.reduce(logits, h).double())
        return out[0] if len(out) == 1 else torch.cat(out)    # one batch: as it is (faster)

    def check(self, groups: ShapeGroups, enc: Encodings,
              out_fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor]) -> None:
        """Raise FactorizationError unless fused pairs equal forward passes (``out_fn``): every
        instance with itself (batched, shape group by shape group), and a few with their
        neighbour, each alone (a batch of one, so that a model whose batch rows are not
        independent is caught too)."""
        side, bs, dev = self.split.side, self.batch_size, self.adapter.device
        direct, got = [], []
        n = groups.n
        count = self._counter("checking the split against forward passes",
                              n + min(n, CHECKED_PAIRS))
        for (pos, values), raw in zip(enc.groups, groups.raws):
            own = torch.arange(len(pos), device=dev)
            for s in range(0, len(pos), bs):
                direct.append(out_fn({m: x[s:s + bs] for m, x in raw.items()}).double())
                if count is not None:
                    count(len(direct[-1]))
            got.append(self.pairs(values, values, own, own))
        # the neighbours (i, i + 1), fused in one batch per (group of i, group of j): one batch
        # when the instances share one shape; each also run alone, in the same order
        blocks: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for i in range(min(n, CHECKED_PAIRS)):
            j = (i + 1) % n
            blocks.setdefault((groups.where(i)[0], groups.where(j)[0]), []).append((i, j))
        for (gi, gj), ij in blocks.items():
            ri = torch.tensor([groups.where(i)[1] for i, _ in ij], device=dev)
            rj = torch.tensor([groups.where(j)[1] for _, j in ij], device=dev)
            got.append(self.pairs(enc.groups[gi][1], enc.groups[gj][1], ri, rj))
            direct += [out_fn({m: (groups.instance(i) if m == side else groups.instance(j))[m]
                               for m in groups.names}).double() for i, j in ij]
            if count is not None:
                count(len(ij))
        self.cost[0] += sum(len(x) for x in got) + sum(len(x) for x in direct)
        same_or_reject(self.split, torch.cat(got), torch.cat(direct))


def same_or_reject(split: Split, got: torch.Tensor, direct: torch.Tensor) -> None:
    """Raise FactorizationError unless the fused outputs ``got`` equal the forward passes'
    ``direct``. NaN and infinities must sit at the same places in both (a model that is not
    finite on some inputs says nothing against its split: its callers refuse non-finite
    results); the tolerance scales with the largest finite output."""
    finite = torch.isfinite(direct)
    scale = float(direct[finite].abs().max()) if bool(finite.any()) else 0.0
    tol = 1e-4 * max(1.0, scale)
    close = torch.isclose(got, direct, atol=tol, rtol=1e-4, equal_nan=True)
    if not bool(close.all()):
        how = ("encode_modality/fuse_encodings disagree" if split.kind == "declared"
               else "traced split (kernels.factorize) disagrees")
        raise FactorizationError(
            f"The model's {how} with its forward pass (largest difference "
            f"{float((got - direct)[~close].abs().max()):.3g}); fix them or pass "
            "factorized=False.")
