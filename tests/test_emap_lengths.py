"""EMAP, the EMAP gap, DIME and interaction_type on instances of different input shapes (texts
of different token counts): they batch only instances of one shape per modality (and a split
model encodes each shape group on its own), so a model whose output changes with [PAD] tokens
(it mean-pools its token embeddings without a pad mask) gets its own numbers: here they equal
brute force, every pair computed alone (a batch of one, nothing padded)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from multiviz_widgets import AdapterError, ModelAdapter, MultimodalDataset, Neuron, Tabular, Text
from multiviz_widgets.kernels.common import ShapeGroups, masked_continuous, resolve_target
from multiviz_widgets.kernels.emap import _pair_batches
from multiviz_widgets.kernels.interactions import (dime, emap, emap_gap, emap_matrix,
                                                   interaction_type)
from multiviz_widgets.kernels.unimodal import lime_from_function
from tests.test_factorize import _seeded

VOCAB = ["[PAD]", "[UNK]", "what", "shape", "is", "the", "red", "circle"]
QUESTIONS = ["what shape", "is the red circle", "what is the shape", "red", "the circle",
             "circle", "is the circle red", "shape red", "what is red", "the red shape"]
ATOL = 1e-5


class MeanPool(nn.Module):
    """A question's mean embedding ([PAD] tokens count: no pad mask, unless ``masked``) times a
    tabular encoding; the modalities meet at pooled vectors (a split encodes each to a fixed
    size)."""

    def __init__(self, n_out: int = 3, masked: bool = False):
        super().__init__()
        self.masked = masked
        self.embedding = nn.Embedding(len(VOCAB), 4, padding_idx=0)
        self.a, self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 5), nn.Linear(5, n_out)
        _seeded(self)

    def forward(self, tabular, question):
        e = self.embedding(question)
        if self.masked:
            keep = (question != 0).float()[..., None]
            q = (e * keep).sum(1) / keep.sum(1).clamp(min=1)
        else:
            q = e.mean(1)
        return self.head(torch.tanh(self.fc(torch.tanh(self.a(tabular)) * q + q)))


class DeclaredMeanPool(MeanPool):
    """The same model with a declared split whose question encoder mean-pools over [PAD]."""

    def encode_modality(self, name, x):
        return torch.tanh(self.a(x)) if name == "tabular" else self.embedding(x).mean(1)

    def fuse_encodings(self, enc):
        t, q = enc["tabular"], enc["question"]
        return self.head(torch.tanh(self.fc(t * q + q)))


class TokenLevel(nn.Module):
    """The modalities meet at the tokens ([B, T, 4] scaled by a tabular gate), then a mean over
    the tokens (with [PAD]): a traced split's question encoding has the question's length."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(len(VOCAB), 4, padding_idx=0)
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 3)
        _seeded(self, 1)

    def forward(self, tabular, question):
        gate = torch.tanh(self.a(tabular))[:, None, :]
        return self.head(torch.tanh(self.embedding(question) * gate).mean(1))


class TwoTexts(nn.Module):
    """Three modalities, two texts mean-pooled without a mask (EMAP's M > 2 projection)."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(len(VOCAB), 4, padding_idx=0)
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 3)
        _seeded(self, 2)

    def forward(self, tabular, question, answer):
        q, r = self.embedding(question).mean(1), self.embedding(answer).mean(1)
        return self.head(torch.tanh(torch.tanh(self.a(tabular)) * q + q * r))


TABULAR = Tabular("tabular", columns=["c0", "c1", "c2", "c3"])


def adapter_for(model, texts=("question",)):
    mods = [TABULAR] + [Text(t, VOCAB) for t in texts]
    return ModelAdapter(model, mods, [f"k{c}" for c in range(3)], decision_layer="head",
                        embedding_layers={t: "embedding" for t in texts})


def items_of(n: int, seed: int = 0, answers: bool = False) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        item = {"tabular": torch.randn(4, generator=g), "question": QUESTIONS[k % len(QUESTIONS)]}
        if answers:
            item["answer"] = QUESTIONS[(3 * k + 1) % len(QUESTIONS)]
        out.append(item)
    return out


def dataset_of(items, labels=None) -> MultimodalDataset:
    return MultimodalDataset({k: [it[k] for it in items] for k in items[0]}, labels=labels)


# -- brute force: one instance, one pair at a time (a batch of one: nothing padded) ----------
@torch.no_grad()
def alone(adapter, instance, target=None) -> np.ndarray:
    raw = adapter.collate([instance])
    if target is not None:
        logits, h = adapter.forward(raw, features=True)
        return adapter.output(logits, h, adapter.target(target))[:, None][0].double().numpy()
    return adapter.forward(raw)[0].double().numpy()


def pair_matrix(adapter, items, side, target=None, mixed=None) -> np.ndarray:
    """M[i, j] = f(x_side^i, x_others^j), every pair alone; mixed: {k: permutation}, modality k of
    reference j from instance mixed[k][j] (EMAP's M > 2 references)."""
    def other(k, j):
        return items[j][k] if mixed is None else items[int(mixed[k][j])][k]
    return np.stack([np.stack([alone(adapter, {m: (a[m] if m == side else other(m, j))
                                               for m in a}, target)
                               for j in range(len(items))]) for a in items])


def mixing(names, n, seed=0) -> dict:
    """EMAP's M > 2 permutations as its docstring defines them: for each modality m, then each
    k != m (the adapter's order), numpy.random.default_rng(seed).permutation(n)."""
    rng = np.random.default_rng(seed)
    return {m: {k: rng.permutation(n) for k in names if k != m} for m in names}


def brute_emap(adapter, items, target=None, seed=0) -> dict:
    names = adapter.names
    sides = [names[0]] if len(names) == 2 else list(names)
    perms = mixing(names, len(items), seed) if len(names) > 2 else {}
    mats = [pair_matrix(adapter, items, m, target, perms.get(m)) for m in sides]
    means = [m.mean((0, 1)) for m in mats]          # each modality's own mean of its pairs
    grand = np.mean(means, axis=0)
    unimodal = {m: mat.mean(1) - g for m, mat, g in zip(sides, mats, means)}
    if len(names) == 2:
        unimodal[names[1]] = mats[0].mean(0) - means[0]
    return {"logits": np.stack([alone(adapter, it, target) for it in items]),
            "emap_logits": grand + sum(unimodal.values()), "unimodal": unimodal,
            "grand": grand, "matrix": mats[0]}


def padded_differs(adapter, items) -> bool:
    """The model's outputs in one padded batch are not its own (what grouping avoids)."""
    with torch.no_grad():
        batched = adapter.forward(adapter.collate(items)).double().numpy()
    own = np.stack([alone(adapter, it) for it in items])
    return float(np.abs(batched - own).max()) > 1e-3


def assert_emap_is_brute(r, want):
    np.testing.assert_allclose(r.logits, want["logits"], atol=ATOL, rtol=ATOL)
    np.testing.assert_allclose(r.emap_logits, want["emap_logits"], atol=ATOL, rtol=ATOL)
    np.testing.assert_allclose(r.grand_mean, want["grand"], atol=ATOL, rtol=ATOL)
    for m, u in want["unimodal"].items():
        np.testing.assert_allclose(r.unimodal[m], u, atol=ATOL, rtol=ATOL)
    if r.matrix is not None:
        np.testing.assert_allclose(r.matrix, want["matrix"], atol=ATOL, rtol=ATOL)


# -- EMAP -------------------------------------------------------------------------------------
@pytest.mark.parametrize("model,factorized,kind", [
    (MeanPool, False, "none"), (MeanPool, None, "traced"), (MeanPool, "traced", "traced"),
    (DeclaredMeanPool, None, "declared"), (TokenLevel, None, "traced"),
    (TokenLevel, False, "none")])
def test_emap_of_a_padding_sensitive_model_equals_brute_force(model, factorized, kind):
    adapter = adapter_for(model())
    items = items_of(9)
    assert padded_differs(adapter, items)          # padding would change the numbers
    r = emap(adapter, items, factorized=factorized, keep_matrix=True)
    assert r.params["factorization"] == kind, r.params
    assert_emap_is_brute(r, brute_emap(adapter, items))
    # the same cost as before: N^2 pairs and, with a split, its check (fused and full)
    assert r.forward_passes == 81 + (0 if kind == "none" else 2 * (9 + 8))


def test_token_level_encodings_are_fused_block_by_block():
    """A traced cut at the tokens gives encodings of each question's length: they cannot be put
    together, so pairs are fused per (side group, others group) and still equal brute force."""
    from multiviz_widgets.kernels.split_model import FusedPairs, model_split
    adapter = adapter_for(TokenLevel())
    items = items_of(8)
    split, _ = model_split(adapter, None, "tabular")
    fused = FusedPairs(adapter, split, 5, False, lambda logits, h: logits)
    enc = fused.encode_groups(ShapeGroups(adapter, items))
    lengths = {len(q.split()) for q in QUESTIONS[:8]}
    assert len(enc.side) == 1 and len(enc.others) == len(lengths) == len(enc.groups)
    assert sorted(enc.side[0][0].tolist()) == list(range(8))     # every instance once
    r = emap(adapter, items, batch_size=5, keep_matrix=True)
    assert r.params["factorization"] == "traced"
    assert_emap_is_brute(r, brute_emap(adapter, items))


@pytest.mark.parametrize("factorized", [None, False])
def test_emap_neuron_target_and_progress_with_several_lengths(factorized):
    adapter = adapter_for(MeanPool())
    items = items_of(7, seed=3)
    calls = []
    r = emap(adapter, items, target=Neuron(2), batch_size=6, factorized=factorized,
             keep_matrix=True, progress=lambda d, n, m: calls.append((d, n)))
    assert_emap_is_brute(r, brute_emap(adapter, items, Neuron(2)))
    assert calls[-1] == (49, 49) and [d for d, _ in calls] == sorted(d for d, _ in calls)


@pytest.mark.parametrize("factorized", [None, False])
def test_emap_with_three_modalities_and_two_texts_of_several_lengths(factorized):
    adapter = adapter_for(TwoTexts(), ("question", "answer"))
    items = items_of(7, seed=1, answers=True)
    assert padded_differs(adapter, items)
    r = emap(adapter, items, factorized=factorized)
    assert_emap_is_brute(r, brute_emap(adapter, items))
    assert set(r.unimodal) == {"tabular", "question", "answer"}
    for m, part in r.unimodal.items():                  # each unimodal part is centred
        np.testing.assert_allclose(part.mean(0), 0.0, atol=ATOL)
    np.testing.assert_allclose(r.grand_mean + sum(r.unimodal.values()), r.emap_logits, atol=ATOL)


def test_emap_gap_of_a_padding_sensitive_model_equals_brute_force():
    adapter = adapter_for(MeanPool())
    items = items_of(10, seed=2)
    labels = [int(k) % 3 for k in range(10)]
    ds = dataset_of(items, labels)
    idx = [7, 1, 4, 0, 9, 3, 2]
    gap = emap_gap(adapter, ds, indices=idx)
    sub = brute_emap(adapter, [items[i] for i in idx])
    pred, pred_hat = sub["logits"].argmax(1), sub["emap_logits"].argmax(1)
    y = np.array(labels)[idx]
    assert gap["agreement"] == pytest.approx(float((pred == pred_hat).mean()))
    assert gap["accuracy_model"] == pytest.approx(float((pred == y).mean()))
    assert gap["accuracy_emap"] == pytest.approx(float((pred_hat == y).mean()))
    # emap_gap runs emap on those indices: the very numbers of brute force
    r = emap(adapter, ds, indices=idx)
    np.testing.assert_allclose(r.emap_logits, sub["emap_logits"], atol=ATOL)
    assert gap["n"] == len(idx) and gap["indices"] == idx


# -- DIME -------------------------------------------------------------------------------------
def brute_dime_terms(adapter, instance, refs, target, pair):
    """(UC(masks), f(masks)) of a batch of masks, every forward pass a batch of one."""
    p = adapter.prepare(instance)
    a, b = pair
    ref_raws = [adapter.collate([r]) for r in refs]

    def f1(raw, cont=None):
        with torch.no_grad():
            return float(adapter.target_output(raw, cont or {}, target)[0])

    grand = np.mean([f1({a: ri[a], b: rj[b]}) for ri in ref_raws for rj in ref_raws])

    def terms(masks):
        uc, f = [], []
        for k in range(next(iter(masks.values())).shape[0]):
            cont = masked_continuous(p, {a: masks[a][k:k + 1], b: masks[b][k:k + 1]}, adapter)
            side = np.mean([f1({a: p.raw[a], b: r[b]}, {a: cont[a]}) for r in ref_raws])
            other = np.mean([f1({a: r[a], b: p.raw[b]}, {b: cont[b]}) for r in ref_raws])
            uc.append(side + other - grand)
            f.append(f1(p.raw, cont))
        return torch.tensor(uc, dtype=torch.float64), torch.tensor(f, dtype=torch.float64)
    return p, terms


@pytest.mark.parametrize("design", ["per_modality", "joint"])
@pytest.mark.parametrize("model,factorized,kind", [
    (MeanPool, False, "none"), (MeanPool, None, "traced"), (DeclaredMeanPool, None, "declared"),
    (TokenLevel, None, "traced")])
def test_dime_of_a_padding_sensitive_model_equals_brute_force(model, factorized, kind, design):
    adapter = adapter_for(model())
    items = items_of(9, seed=4)
    ds = dataset_of(items)
    refs = [1, 2, 3, 4, 5, 6]
    assert padded_differs(adapter, [items[i] for i in refs])
    kw = dict(n_samples=24, seed=3, batch_size=7)
    r = dime(adapter, ds, 0, reference_indices=refs, factorized=factorized, design=design, **kw)
    assert r.params["factorization"] == kind and r.params["design"] == design, r.params
    p, terms = brute_dime_terms(adapter, items[0], [items[i] for i in refs],
                                resolve_target(adapter, adapter.prepare(items[0])),
                                ("tabular", "question"))
    units = {"tabular": p.n_units["tabular"], "question": p.n_units["question"]}
    # per modality: one LIME over each modality's units, the other modality intact (all ones)
    parts = [{m: u} for m, u in units.items()] if design == "per_modality" else [units]
    uc, mi = {}, {}
    for part in parts:
        def full(m):
            rows = next(iter(m.values())).shape[0]
            return {n: m[n] if n in m else torch.ones(rows, u) for n, u in units.items()}
        uc.update(lime_from_function(lambda m: terms(full(m))[0], part, **kw))
        mi.update(lime_from_function(lambda m: terms(full(m))[1] - terms(full(m))[0], part,
                                     **kw))
    ones = {m: torch.ones(1, u) for m, u in units.items()}
    uc_full, f_full = (float(v[0]) for v in terms(ones))
    assert r.uc_value == pytest.approx(uc_full, abs=ATOL)
    assert r.f_value == pytest.approx(f_full, abs=ATOL)
    assert r.mi_value == pytest.approx(f_full - uc_full, abs=ATOL)
    for m in units:
        np.testing.assert_allclose(r.uc[m], uc[m], atol=ATOL)
        np.testing.assert_allclose(r.mi[m], mi[m], atol=ATOL)


def test_dime_with_a_neuron_target_and_several_lengths_agrees_across_paths():
    adapter = adapter_for(MeanPool())
    ds = dataset_of(items_of(9, seed=5))
    kw = dict(reference_indices=[0, 2, 3, 5, 8], n_samples=30, target=Neuron(1))
    fast, slow = dime(adapter, ds, 4, **kw), dime(adapter, ds, 4, factorized=False, **kw)
    assert fast.params["factorization"] == "traced"
    assert fast.uc_value == pytest.approx(slow.uc_value, abs=ATOL)
    for m in adapter.names:
        np.testing.assert_allclose(fast.mi[m], slow.mi[m], atol=ATOL)


# -- interaction type -------------------------------------------------------------------------
def test_interaction_type_of_a_padding_sensitive_model_equals_brute_force():
    adapter = adapter_for(MeanPool())
    items = items_of(9, seed=6)
    instance, refs = items[0], items[1:]
    assert padded_differs(adapter, items)
    mat = pair_matrix(adapter, refs, "tabular")
    grand = mat.mean((0, 1))
    parts = {m: np.mean([alone(adapter, {k: (instance if k == m else r)[k] for k in instance})
                         for r in refs], axis=0) - grand for m in adapter.names}
    logits = alone(adapter, instance)
    for reference, kw in [(refs, {}), (dataset_of(items), {"reference_indices": range(1, 9)})]:
        t = interaction_type(adapter, instance, reference, batch_size=5, **kw)
        np.testing.assert_allclose(t["logits"], logits, atol=ATOL)
        np.testing.assert_allclose(t["grand_mean"], grand, atol=ATOL)
        for m in adapter.names:
            np.testing.assert_allclose(t["unimodal"][m], parts[m], atol=ATOL)
        np.testing.assert_allclose(t["emap_logits"], grand + sum(parts.values()), atol=ATOL)
        assert t["reference_size"] == 8
    # with the instance among EMAP's instances its parts are EMAP's (the reference includes it)
    r = emap(adapter, items)
    t = interaction_type(adapter, items[3], items)
    np.testing.assert_allclose(t["emap_logits"], r.emap_logits[3], atol=ATOL)


def test_masked_pooling_gives_the_same_numbers_grouped_or_padded():
    """A model that ignores [PAD] (as before, when batches were padded): unchanged numbers."""
    adapter = adapter_for(MeanPool(masked=True))
    items = items_of(8)
    assert not padded_differs(adapter, items)
    for factorized in (None, False):
        assert_emap_is_brute(emap(adapter, items, factorized=factorized, keep_matrix=True),
                             brute_emap(adapter, items))


# -- shape groups -----------------------------------------------------------------------------
def test_shape_groups_never_pad_and_keep_one_batch_for_one_shape():
    adapter = adapter_for(MeanPool())
    items = items_of(7)
    groups = ShapeGroups(adapter, items)
    lengths = [len(q.split()) for q in QUESTIONS[:7]]
    assert len(groups.raws) == len(set(lengths))
    for pos, raw in zip(groups.positions, groups.raws):
        assert {lengths[int(k)] for k in pos} == {raw["question"].shape[1]}
    (pos, tab), = groups.by(["tabular"])               # one shape of the tabular inputs
    assert sorted(pos.tolist()) == list(range(7))
    assert torch.equal(tab["tabular"], torch.stack([items[k]["tabular"] for k in pos.tolist()]))
    for g, raw in enumerate(groups.raws):              # the groups' inputs: views of it, no copy
        assert raw["tabular"].untyped_storage().data_ptr() == \
            tab["tabular"].untyped_storage().data_ptr()
    for k in range(7):
        assert torch.equal(groups.instance(k)["question"], adapter.collate([items[k]])["question"])
    # every pair once, each batch of one shape per modality
    seen = []
    for i, j, raw in _pair_batches(groups, ["tabular"], ["question"], 4, adapter.device):
        assert {lengths[int(b)] for b in j} == {raw["question"].shape[1]} and len(i) <= 4
        assert torch.equal(raw["tabular"], torch.stack([items[k]["tabular"] for k in i.tolist()]))
        seen += list(zip(i.tolist(), j.tolist()))
    assert sorted(seen) == [(a, b) for a in range(7) for b in range(7)]

    # one shape: one group, the batch of collate as it is, and the row-major chunks of before
    same = [dict(it, question="what is the shape") for it in items]
    one = ShapeGroups(adapter, same)
    raw = adapter.collate(same)
    assert len(one.raws) == 1 and torch.equal(one.positions[0], torch.arange(7))
    assert all(torch.equal(one.raws[0][m], raw[m]) for m in raw)
    (pos, got), = one.by(["question"])
    assert got["question"] is one.raws[0]["question"]                   # no copy
    chunks = list(_pair_batches(one, ["tabular"], ["question"], 10, adapter.device))
    assert [len(i) for i, _, _ in chunks] == [10, 10, 10, 10, 9]
    k = torch.arange(49)
    assert torch.equal(torch.cat([i for i, _, _ in chunks]), k // 7)
    assert torch.equal(torch.cat([j for _, j, _ in chunks]), k % 7)


def test_the_emap_operator_of_brute_force_is_emap():
    """The brute force above is EMAP: its projection equals emap_matrix of its pair matrix."""
    adapter = adapter_for(MeanPool())
    want = brute_emap(adapter, items_of(6))
    whole = emap_matrix(want["matrix"])
    np.testing.assert_allclose(np.diagonal(whole, axis1=0, axis2=1).T, want["emap_logits"],
                               atol=1e-9)


# -- the model that EMAP, DIME and interaction_type used to refuse --------------------------
@pytest.mark.parametrize("masked", [False, True])
def test_a_model_whose_output_changes_with_padding_gets_its_own_numbers(masked):
    """Once refused (an AdapterError naming the padding), now exact: EMAP per instance, DIME's
    UC / MI split and interaction_type equal brute force, with or without a pad mask."""
    adapter = adapter_for(MeanPool(masked=masked))
    g = torch.Generator().manual_seed(0)
    questions = ["what shape", "is the red circle", "what is the shape", "red", "the circle"]
    items = [{"tabular": torch.randn(4, generator=g), "question": q} for q in questions]
    ds = dataset_of(items)
    assert padded_differs(adapter, items) != masked
    for factorized in (None, False):
        assert_emap_is_brute(emap(adapter, items, factorized=factorized, keep_matrix=True),
                             brute_emap(adapter, items))
        r = dime(adapter, ds, 0, n_samples=20, factorized=factorized)
        t = resolve_target(adapter, adapter.prepare(items[0]))
        _, terms = brute_dime_terms(adapter, items[0], [items[int(i)] for i in r.reference_indices],
                                    t, ("tabular", "question"))
        uc, f = terms({m: torch.ones(1, u) for m, u in adapter.prepare(items[0]).n_units.items()})
        assert (r.uc_value, r.f_value) == (pytest.approx(float(uc[0]), abs=ATOL),
                                           pytest.approx(float(f[0]), abs=ATOL))
    typed = interaction_type(adapter, items[0], items[1:])
    mat = pair_matrix(adapter, items[1:], "tabular")
    np.testing.assert_allclose(typed["grand_mean"], mat.mean((0, 1)), atol=ATOL)
    np.testing.assert_allclose(typed["logits"], alone(adapter, items[0]), atol=ATOL)


# -- other modalities of several shapes: images of several sizes ---------------------------
class AnySize(nn.Module):
    """Takes images of any size (a spatial mean), with a mean-pooled question."""

    def __init__(self, flatten: bool = False):
        super().__init__()
        self.flatten = flatten
        self.embedding = nn.Embedding(len(VOCAB), 6)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.lin = nn.Linear(3 * 8 * 8, 6)
        self.head = nn.Linear(6, 3)
        _seeded(self, 3)

    def forward(self, image, question):
        img = (self.lin(image.flatten(1)) if self.flatten
               else torch.tanh(self.conv(image)).mean((2, 3)))
        return self.head(torch.relu(img * self.embedding(question).mean(1)))


def _image_items():
    from multiviz_widgets import Image
    g = torch.Generator().manual_seed(1)
    sizes = [8, 4, 8, 12, 4, 8]
    items = [{"image": torch.rand(3, s, s, generator=g), "question": QUESTIONS[k]}
             for k, s in enumerate(sizes)]
    mods = [Image("image", patch=4), Text("question", VOCAB)]
    return items, mods


@pytest.mark.parametrize("factorized", [None, False])
def test_images_of_several_sizes_are_batched_by_size(factorized):
    """Instances the model takes one at a time are taken together too (never stacked across
    sizes); a model that cannot take a size gets the adapter's error naming it."""
    from multiviz_widgets import AdapterError
    items, mods = _image_items()
    adapter = ModelAdapter(AnySize(), mods, ["x", "y", "z"], decision_layer="head")
    r = emap(adapter, items, factorized=factorized, keep_matrix=True)
    assert_emap_is_brute(r, brute_emap(adapter, items))
    fixed = ModelAdapter(AnySize(flatten=True), mods, ["x", "y", "z"], decision_layer="head")
    with pytest.raises(AdapterError, match=r"'image' has shape \(3, 4, 4\) per instance"):
        emap(fixed, items, factorized=factorized)


def test_a_bad_instance_is_named_by_its_place_in_the_list_not_in_its_shape_group():
    adapter = adapter_for(MeanPool())
    items = items_of(7)
    items[6]["tabular"] = torch.tensor([1.0, float("nan"), 0.0, 0.0])
    with pytest.raises(AdapterError, match="'tabular' of instance 6 holds non-finite"):
        emap(adapter, items)
    with pytest.raises(AdapterError, match="'tabular' of instance 5 holds non-finite"):
        interaction_type(adapter, items[0], items[1:])
    items[6]["question"] = "is the circle red what shape"     # alone in its length: still named
    with pytest.raises(AdapterError, match="'tabular' of instance 6 holds non-finite"):
        emap(adapter, items, factorized=False)
    ds = dataset_of(items)             # from a dataset: named by its dataset index
    with pytest.raises(AdapterError, match="'tabular' of instance 6 holds non-finite"):
        emap(adapter, ds, indices=[6, 0, 1, 2])
    with pytest.raises(AdapterError, match="'tabular' of instance 6 holds non-finite"):
        dime(adapter, ds, 0, reference_indices=[1, 6, 2, 3], n_samples=8)


def test_an_input_a_modality_refuses_is_named_in_every_dataset_method():
    """A row of 2 values among rows of 4 was refused with the modality's own words and no
    instance: in 10,000 rows, no way to find it (a NaN in its place was named)."""
    from multiviz_widgets.kernels.unimodal import attribute_batch
    adapter = adapter_for(MeanPool())
    items = items_of(7)
    items[5]["tabular"] = torch.tensor([1.0, 0.0])
    words = r"^Instance 5: tabular: a row must have 4 values"
    ds = dataset_of(items)
    for call in (lambda: emap(adapter, items), lambda: emap(adapter, ds),
                 lambda: dime(adapter, ds, 0, reference_indices=[1, 5, 2, 3], n_samples=8),
                 lambda: attribute_batch(adapter, ds, "gradient"),
                 lambda: attribute_batch(adapter, items, "gradient"),
                 lambda: adapter.collate(items)):
        with pytest.raises(ValueError, match=words):
            call()
    with pytest.raises(ValueError, match=words.replace("5", "4", 1)):    # 4th of the references
        interaction_type(adapter, items[0], items[1:])
    with pytest.raises(ValueError, match=r"^tabular: a row must have 4 values"):
        adapter.prepare(items[5])          # one instance: nothing to name it among


def test_interaction_type_progress_with_three_modalities_ends_at_its_total():
    adapter = adapter_for(TwoTexts(), ("question", "answer"))
    items = items_of(6, seed=1, answers=True)
    seen = []
    interaction_type(adapter, items[0], items[1:], progress=lambda d, t, *_: seen.append((d, t)))
    done = [d for d, _ in seen]
    assert done == sorted(done) and {t for _, t in seen} == {3 * 25 + 3 * 5 + 1}
    assert seen[-1] == (91, 91)


def test_interaction_type_with_three_modalities_has_emaps_centred_parts():
    """With the instance among the references, its parts, grand mean and EMAP are EMAP's, for
    three modalities too (each part centred by its own modality's mean of pairs)."""
    adapter = adapter_for(TwoTexts(), ("question", "answer"))
    items = items_of(6, seed=1, answers=True)
    r = emap(adapter, items)
    t = interaction_type(adapter, items[2], items)
    np.testing.assert_allclose(t["grand_mean"], r.grand_mean, atol=ATOL)
    for m in adapter.names:
        np.testing.assert_allclose(t["unimodal"][m], r.unimodal[m][2], atol=ATOL)
    np.testing.assert_allclose(t["emap_logits"], r.emap_logits[2], atol=ATOL)


def test_three_modalities_take_one_seed_in_emap_interaction_type_and_emap_gap():
    """One definition and one seed: the mixed references' permutations of emap(seed=s) are
    interaction_type's (the instance among the same references) and emap_gap's; another seed
    draws others (and other numbers: it is a sample)."""
    adapter = adapter_for(TwoTexts(), ("question", "answer"))
    items = items_of(6, seed=1, answers=True)
    r0, r3 = emap(adapter, items), emap(adapter, items, seed=3)
    assert r3.params["seed"] == 3 and "(seed 3)" in r3.params["anova"]
    assert_emap_is_brute(r3, brute_emap(adapter, items, seed=3))
    assert np.abs(r3.emap_logits - r0.emap_logits).max() > 1e-4
    for factorized in (None, False):
        t = interaction_type(adapter, items[2], items, seed=3, factorized=factorized)
        np.testing.assert_allclose(t["grand_mean"], r3.grand_mean, atol=ATOL)
        for m in adapter.names:
            np.testing.assert_allclose(t["unimodal"][m], r3.unimodal[m][2], atol=ATOL)
        np.testing.assert_allclose(t["emap_logits"], r3.emap_logits[2], atol=ATOL)
    # a dataset as the reference: seed draws the references and then their permutations
    ds = dataset_of(items_of(12, seed=2, answers=True))
    from multiviz_widgets.kernels.common import sample_indices
    idx = sample_indices(12, 6, 4)
    r = emap(adapter, ds, indices=idx, seed=4)
    t = interaction_type(adapter, int(idx[1]), ds, n_reference=6, seed=4)
    np.testing.assert_allclose(t["emap_logits"], r.emap_logits[1], atol=ATOL)
    with pytest.raises(ValueError, match="seed must be an integer of at least 0"):
        interaction_type(adapter, items[2], items, seed=-1)
    labelled = dataset_of(items, labels=[0, 1, 2, 0, 1, 2])
    gap = emap_gap(adapter, labelled, n=None, seed=3)
    agree = float((r3.logits.argmax(1) == r3.emap_logits.argmax(1)).mean())
    assert gap["agreement"] == agree
    with pytest.raises(ValueError, match="seed must be an integer of at least 0"):
        emap_gap(adapter, labelled, n=None, seed=1.0)
