"""ModelAdapter: continuous inputs replace model inputs, hooks never outlive a call, no shared state;
a model in training mode runs in eval mode, untouched; inputs it cannot take are clear errors."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from multiviz_widgets import AdapterError, Class, ModelAdapter, Neuron, Tabular, Text, TimeSeries
from multiviz_widgets.adapter import ModelInputError, class_name
from multiviz_widgets.modalities import Modality
from tests.test_doctor import INSTANCE, Healthy, adapter


def test_continuous_inputs_replace_the_model_inputs():
    a = adapter(Healthy())
    p = a.prepare(INSTANCE)
    base = a.forward(p.raw)
    same = a.forward(p.raw, {n: v.unsqueeze(0) for n, v in p.continuous.items()})
    assert torch.allclose(base, same, atol=1e-6)
    zeros = a.forward(p.raw, {"question": torch.zeros(3, *p.continuous["question"].shape)})
    assert zeros.shape == (3, 3) and not torch.allclose(zeros[0], base[0])
    logits, h = a.forward(p.raw, features=True)
    assert h.shape == (1, 8)
    assert torch.allclose(a.scalar(p, {"image": p.continuous["image"][None]}, Neuron(2)), h[:, 2])
    assert torch.allclose(a.scalar(p, {"image": p.continuous["image"][None]}, Class(1)), logits[:, 1])


def _hook_count(a):
    mods = [a.decision_layer, *a.embedding_layers.values()]
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in mods)


def test_hooks_never_outlive_a_call_even_when_the_model_raises():
    class Raises(Healthy):
        def forward(self, image, question):
            self.features(image, question)
            raise RuntimeError("boom")
    a = adapter(Raises())
    p = a.prepare(INSTANCE)
    with pytest.raises(RuntimeError, match="boom"):
        a.forward(p.raw, {"question": p.continuous["question"][None]}, features=True)
    assert _hook_count(a) == 0


def test_two_adapters_side_by_side_do_not_share_state():
    m1, m2 = Healthy(), Healthy()
    with torch.no_grad():
        m2.classifier.weight.mul_(-1)
    a1, a2 = adapter(m1), adapter(m2)
    p = a1.prepare(INSTANCE)
    l1, l2 = a1.forward(p.raw), a2.forward(p.raw)
    assert torch.allclose(l1, adapter(Healthy()).forward(p.raw))
    assert not torch.allclose(l1, l2)
    assert a1.fingerprint() != a2.fingerprint()


def test_fingerprint_follows_the_weights():
    m = Healthy()
    a = adapter(m)
    f = a.fingerprint()
    assert f == a.fingerprint()
    with torch.no_grad():
        m.fuse.bias.add_(1e-3)
    assert a.fingerprint() != f


def test_prepared_instances_have_consistent_units():
    a = adapter(Healthy())
    p = a.prepare(INSTANCE)
    assert p.n_units == {"image": 4, "question": 4}
    assert p.labels["question"] == ["what", "colour", "is", "it"]
    assert p.baseline["image"].shape == p.continuous["image"].shape
    assert p.key == a.prepare(INSTANCE).key
    assert p.key != a.prepare({**INSTANCE, "question": "what is it"}).key
    # the unit index is stored contiguous: kernels flatten it on every call, and a
    # modality's broadcast view would be copied each time
    assert all(i.is_contiguous() for i in p.index.values())
    assert p.index["image"].shape == p.continuous["image"].shape


def test_fingerprint_follows_tuple_settings_not_counters_nor_kept_activations():
    """A stride is part of what the model computes; a lone integer may count its calls and a
    tensor attribute may hold its last activation, so neither is (else the cache never hits)."""
    model = Healthy()
    model.fuse.stride_like = (1, 1)
    a = adapter(model)
    f = a.fingerprint()
    model.fuse.stride_like = (2, 2)
    g = a.fingerprint()
    assert g != f
    model.calls = 7
    model.last_h = torch.randn(3)
    model.names = np.array(["low", "mid", "high"])
    assert a.fingerprint() == g


def test_fingerprint_handles_zero_dimensional_buffers():
    model = Healthy()
    model.register_buffer("steps", torch.tensor(3))  # like batch norm's num_batches_tracked
    a = adapter(model)
    f = a.fingerprint()
    model.steps += 1
    assert a.fingerprint() != f


# ---------------------------------------------------------------------------------------------
# models in training mode, and inputs the model cannot take
# ---------------------------------------------------------------------------------------------
class DropNorm(nn.Module):
    """tabular [4] + series [8, 2] through batch norm and dropout: both act in training mode."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.t, self.s = nn.Linear(4, 6), nn.Linear(16, 6)
        self.bn, self.drop = nn.BatchNorm1d(12), nn.Dropout(0.5)
        self.head = nn.Linear(12, 2)

    def forward(self, tabular, series):
        h = torch.cat([self.t(tabular), torch.tanh(self.s(series.flatten(1)))], 1)
        return self.head(self.drop(torch.relu(self.bn(h))))


def drop_norm_adapter(model):
    return ModelAdapter(model, [Tabular("tabular", columns=list("abcd")),
                                TimeSeries("series", window=4, channels=["x", "y"])], ["n", "y"])


def drop_norm_instance(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"tabular": torch.randn(4, generator=g), "series": torch.randn(8, 2, generator=g)}


def test_a_model_in_training_mode_is_explained_in_eval_mode_and_left_as_it_was():
    """Dropout and batch norm in training mode would make every explanation random (or fail on
    a batch of one) and move the running statistics: every kernel runs the model in eval mode,
    warns once, and gives the model back in its own modes with its state untouched."""
    from multiviz_widgets.kernels.interactions import emap, interaction
    from multiviz_widgets.data import MultimodalDataset
    from multiviz_widgets.kernels.representations import stream_features
    from multiviz_widgets.kernels.unimodal import attribute, attribute_batch

    model = DropNorm()
    reference = drop_norm_adapter(DropNorm().eval())
    model.train()
    model.s.eval()                                  # a submodule's own mode is kept too
    modes = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a = drop_norm_adapter(model)
    inst, items = drop_norm_instance(), [drop_norm_instance(i) for i in range(4)]
    with pytest.warns(UserWarning, match="training mode.*model.eval"):
        first = attribute(a, inst, "integrated_gradients", target=0, steps=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # warned once per adapter
        for method in ("gradient", "integrated_gradients", "occlusion", "lime"):
            got = attribute(a, inst, method, target=0)
            want = attribute(reference, inst, method, target=0)
            for n in want.scores:
                np.testing.assert_allclose(got.scores[n], want.scores[n], atol=1e-6)
        again = attribute(a, inst, "integrated_gradients", target=0, steps=8)
        np.testing.assert_array_equal(first.scores["tabular"], again.scores["tabular"])
        attribute_batch(a, items, "gradient")
        np.testing.assert_allclose(interaction(a, inst, "second_order", target=0).matrix,
                                   interaction(reference, inst, "second_order", target=0).matrix,
                                   atol=1e-6)
        np.testing.assert_allclose(emap(a, items).emap_logits, emap(reference, items).emap_logits,
                                   atol=1e-6)
        ds = MultimodalDataset({n: [x[n] for x in items] for n in items[0]})
        for _, logits, h in stream_features(a, ds, batch_size=2):   # representations
            assert logits.shape == (2, 2) and h.shape == (2, 12)
    assert {name: m.training for name, m in model.named_modules()} == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed"


def test_non_finite_inputs_are_rejected_naming_the_modality():
    a = drop_norm_adapter(DropNorm().eval())
    bad = drop_norm_instance()
    bad["tabular"][2] = float("nan")
    with pytest.raises(AdapterError, match=r"'tabular' holds non-finite values \(NaN or inf"):
        a.prepare(bad)
    worse = drop_norm_instance()
    worse["series"][3, 1] = float("inf")
    with pytest.raises(AdapterError, match="'series' of instance 1 holds non-finite"):
        a.collate([drop_norm_instance(), worse])
    a.prepare(drop_norm_instance())                 # still works


def test_inputs_the_model_cannot_take_are_clear_errors_naming_the_modality():
    from multiviz_widgets.kernels.unimodal import attribute
    a = adapter(Healthy())
    grey = dict(INSTANCE, image=torch.rand(1, 8, 8))
    with pytest.raises(AdapterError, match=r"\(image: \(1, 1, 8, 8\), question: .*3 channels.*"
                                           r"modality 'image'") as e:
        attribute(a, grey, "gradient")
    assert isinstance(e.value.__cause__, RuntimeError)
    assert isinstance(e.value, ModelInputError) and isinstance(e.value, RuntimeError)
    attribute(a, INSTANCE, "gradient")              # the adapter keeps working
    # a series of the wrong length, after a call that worked: the modality that changed
    b = drop_norm_adapter(DropNorm().eval())
    attribute(b, drop_norm_instance(), "gradient")
    longer = dict(drop_norm_instance(), series=torch.randn(9, 2))
    with pytest.raises(AdapterError, match=r"Modality 'series' has shape \(9, 2\) per instance, "
                                           r"where the model last took \(8, 2\)") as e:
        attribute(b, longer, "occlusion")
    assert "mat1 and mat2" in str(e.value.__cause__)
    assert _hook_count(b) == 0


def test_a_batch_of_instances_of_different_shapes_names_the_odd_one():
    a = adapter(Healthy())
    small = dict(INSTANCE, image=torch.rand(3, 4, 4))
    with pytest.raises(AdapterError, match=r"'image': instance 1 has shape \(3, 4, 4\) but "
                                           r"instance 0 has \(3, 8, 8\)") as e:
        a.collate([INSTANCE, small, INSTANCE])
    assert isinstance(e.value.__cause__, RuntimeError)


class Loose(Modality):
    """A modality without checks of its own: a vector of any length, one unit per value."""

    def to_tensor(self, raw):
        return torch.as_tensor(np.asarray(raw, dtype=np.float32))

    def unit_index(self, x):
        return torch.arange(x.numel()).reshape(x.shape)

    def baseline_raw(self, x):
        return torch.zeros_like(x)


def test_empty_inputs_are_rejected_before_any_kernel_runs():
    a = ModelAdapter(nn.Sequential(nn.Linear(3, 2)), [Loose("x")], ["a", "b"])
    with pytest.raises(AdapterError, match=r"Modality 'x' is empty \(input shape \(0,\)\)"):
        a.prepare({"x": np.zeros(0)})
    assert a.prepare({"x": np.ones(3)}).n_units == {"x": 3}


# ---------------------------------------------------------------------------------------------
# embedding layers: called more than once, shared, changed in place, or not embeddings at all
# ---------------------------------------------------------------------------------------------
WORDS = ["[PAD]", "[UNK]", "what", "colour", "is", "the", "car", "red", "blue", "a", "big"]


class TextVitals(nn.Module):
    """text [T] through an embedding + tabular [3]; ``kind`` picks how the embedding is used."""

    def __init__(self, kind="plain"):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.emb, self.pos = nn.Embedding(len(WORDS), 6), nn.Embedding(20, 6)
        self.att, self.tab, self.head = nn.Linear(6, 1), nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, text, vitals):
        if self.kind == "cls":           # the text's embedding is also called on a CLS token
            cls = self.emb(torch.full((text.shape[0], 1), 1, dtype=torch.long))
            e = torch.cat([cls, self.emb(text)], 1)
        elif self.kind == "inplace":     # the model masks and scales the embedding in place
            e = self.emb(text)
            e.masked_fill_((text == 0)[..., None], 0.0)
            e.mul_(2.0)
        elif self.kind == "copied":      # the ids are copied before the embedding
            e = self.emb(text + 0)
        elif self.kind == "chunked":     # the batch embedded in parts of 2 rows
            e = torch.cat([self.emb(c) for c in text.split(2)])
            e = e + self.pos(torch.arange(text.shape[1]))[None]
        elif self.kind == "strided":     # every other row, then the rest: no run of rows
            e = torch.cat([self.emb(text[::2]), self.emb(text[1::2])])
        elif self.kind == "reversed":    # parts embedded last first, put back in order
            k = text.shape[0] // 2
            e = torch.cat([self.emb(text[k:]), self.emb(text[:k])]).roll(k, 0)
            e = e + self.pos(torch.arange(text.shape[1]))[None]
        else:
            e = self.emb(text) + self.pos(torch.arange(text.shape[1]))[None]
        w = torch.softmax(self.att(e), 1)
        return self.head(torch.tanh((w * e).sum(1)) * torch.tanh(self.tab(vitals)))


TV_INSTANCE = {"text": "what colour is the car", "vitals": [0.5, -1.0, 2.0]}


def text_vitals(kind="plain", **kw):
    from multiviz_widgets import Text
    kw.setdefault("embedding_layers", {"text": "emb"})
    return ModelAdapter(TextVitals(kind).eval(), [Text("text", vocab=WORDS),
                                                  Tabular("vitals", columns=["hr", "bp", "t"])],
                        ["a", "b"], **kw)


def occlusion_truth(model, p, name, target):
    """f(x) - f(x with token/column u zeroed), one plain forward each."""
    with torch.no_grad():
        f0, out = model(*p.raw.values())[0, target], []
        for u in range(p.n_units[name]):
            r = {k: v.clone() for k, v in p.raw.items()}
            r[name][0, u] = 0
            out.append(float(f0 - model(*r.values())[0, target]))
    return np.array(out)


@pytest.mark.parametrize("kind", ["cls", "copied", "plain"])
def test_an_embedding_called_on_other_ids_too_is_replaced_only_on_the_text_ids(kind):
    """emb(cls) then emb(text), ids copied before the embedding: the continuous input replaces
    only the output of the call on the text's ids, so the model's own output comes back."""
    from multiviz_widgets.kernels.unimodal import attribute
    a = text_vitals(kind)
    p = a.prepare(TV_INSTANCE)
    with torch.no_grad():
        plain = a.model(*p.raw.values())
        sub = a.forward(p.raw, {"text": p.continuous["text"][None]})
    torch.testing.assert_close(sub, plain)
    occ = attribute(a, p, "occlusion", target=1)
    np.testing.assert_allclose(occ.scores["text"], occlusion_truth(a.model, p, "text", 1), atol=1e-5)
    ig = attribute(a, p, "integrated_gradients", target=1, steps=64)
    with torch.no_grad():
        gap = (a.forward(p.raw)[0, 1] - a.forward(p.raw, {n: v[None] for n, v in p.baseline.items()})[0, 1])
    assert sum(float(s.sum()) for s in ig.scores.values()) == pytest.approx(float(gap), abs=1e-3)


def test_a_model_that_embeds_the_batch_in_parts_gets_each_part_its_own_rows():
    """torch.cat([emb(c) for c in ids.split(2)]): each part gets the continuous input of its
    rows (found from where it starts in the ids, also for one instance's ids copied to the
    batch), so every method gives what the same model embedding the batch at once gives,
    whatever the order of the parts. It got the whole batch for each part, and a misleading
    error."""
    from multiviz_widgets.kernels.unimodal import attribute
    whole = text_vitals("plain")
    p = whole.prepare(TV_INSTANCE)
    for kind in ("chunked", "reversed"):
        parts = text_vitals(kind)
        parts.model.load_state_dict(whole.model.state_dict())
        for method in ("gradient", "integrated_gradients", "occlusion", "kernel_shap"):
            want = attribute(whole, p, method, target=1)
            got = attribute(parts, parts.prepare(TV_INSTANCE), method, target=1)
            for name in want.scores:
                np.testing.assert_allclose(got.scores[name], want.scores[name], rtol=1e-5,
                                           atol=1e-7, err_msg=f"{kind} {method} {name}")
    # a batch of five different rows, each with its own continuous input
    texts = ["what colour", "the car is", "what is the car colour", "car", "is the colour"]
    batch = [dict(TV_INSTANCE, text=t) for t in texts]
    raw = whole.collate(batch)
    g = torch.Generator().manual_seed(0)
    cont = {"text": torch.randn(5, raw["text"].shape[1], 6, generator=g)}
    with torch.no_grad():
        torch.testing.assert_close(parts.forward(raw, cont), whole.forward(raw, cont))
    # parts that are no run of rows are refused, saying why: on a batch, and on one instance's
    # rows (its ids copied to the batch)
    strided = text_vitals("strided")
    with pytest.raises(AdapterError, match="not a run of its rows"):
        strided.forward(raw, cont)
    with pytest.raises(AdapterError, match="not a run of its rows"):
        attribute(strided, strided.prepare(TV_INSTANCE), "occlusion", target=1)


class Premise(nn.Module):
    """premise and hypothesis through one shared embedding (NLI)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.l, self.head = nn.Embedding(len(WORDS), 6), nn.Linear(12, 6), nn.Linear(6, 2)

    def forward(self, premise, hypothesis):
        a, b = self.emb(premise).mean(1), self.emb(hypothesis).mean(1)
        return self.head(torch.tanh(self.l(torch.cat([a, b * 2], 1))))


@pytest.mark.parametrize("layers", [{"premise": "emb", "hypothesis": "emb"}, None])
def test_two_text_modalities_sharing_one_embedding_each_get_their_own_input(layers):
    from multiviz_widgets import Text
    from multiviz_widgets.kernels.unimodal import attribute
    model = Premise().eval()
    a = ModelAdapter(model, [Text("premise", vocab=WORDS), Text("hypothesis", vocab=WORDS)],
                     ["no", "yes"], embedding_layers=layers)    # None: the only nn.Embedding
    for hyp in ("a big blue car", "a car"):                     # same length, other length
        p = a.prepare({"premise": "the car is red", "hypothesis": hyp})
        with torch.no_grad():
            sub = a.forward(p.raw, {n: v[None] for n, v in p.continuous.items()})
        torch.testing.assert_close(sub, model(*p.raw.values()))
        occ = attribute(a, p, "occlusion", target=1)
        for n in ("premise", "hypothesis"):
            np.testing.assert_allclose(occ.scores[n], occlusion_truth(model, p, n, 1), atol=1e-5)
        both = attribute(a, p, "gradient", target=1)
        one = attribute(a, p, "gradient", target=1, modalities=["premise"])
        np.testing.assert_allclose(one.scores["premise"], both.scores["premise"], atol=1e-6)
        assert np.abs(both.scores["hypothesis"]).sum() > 0


class QuestionAnswer(nn.Module):
    """question and answer through one shared embedding, used differently; ``copy`` names the
    texts whose ids the model copies before embedding them."""

    def __init__(self, copy=()):
        super().__init__()
        torch.manual_seed(0)
        self.copy = tuple(copy)
        self.emb, self.q, self.a = nn.Embedding(len(WORDS), 4), nn.Linear(4, 5), nn.Linear(4, 5)
        self.out = nn.Linear(10, 3)

    def embed(self, ids, name):
        return self.emb(ids + 0 if name in self.copy else ids).mean(1)

    def forward(self, question, answer):
        q = torch.tanh(self.q(self.embed(question, "question")))
        a = torch.tanh(self.a(self.embed(answer, "answer")))
        return self.out(torch.cat([q * a, q + a], 1))


def test_explaining_one_of_two_texts_sharing_an_embedding_leaves_the_other_with_equal_ids():
    """Only the question explained, the answer's ids equal to the question's: the answer's
    embedding call got the question's continuous input too (matched by equal values), so the
    answer moved with the question: a gradient 3.5x too large, IG adding up to f(x) minus f
    with both texts at the baseline. Now the answer's call is left as it is."""
    from multiviz_widgets.kernels.unimodal import attribute, attribute_batch
    model = QuestionAnswer().eval()
    a = ModelAdapter(model, [Text("question", vocab=WORDS), Text("answer", vocab=WORDS)],
                     ["x", "y", "z"])
    inst = {"question": "what colour is", "answer": "what colour is"}
    p = a.prepare(inst)
    assert torch.equal(p.raw["question"], p.raw["answer"])

    def f(eq):        # the truth: only the question's embedding output varies
        with torch.no_grad():
            ea = model.emb(p.raw["answer"])
        q, an = torch.tanh(model.q(eq.mean(1))), torch.tanh(model.a(ea.mean(1)))
        return model.out(torch.cat([q * an, q + an], 1))[:, 1]
    x = p.continuous["question"][None].clone().requires_grad_(True)
    (want,) = torch.autograd.grad(f(x).sum(), [x])
    want = want[0].sum(-1).numpy()
    with torch.no_grad():
        gap = float(f(x) - f(p.baseline["question"][None]))
    got = attribute(a, p, "gradient", target=1, modalities=["question"])
    np.testing.assert_allclose(got.scores["question"], want, rtol=1e-5, atol=1e-7)
    ig = attribute(a, p, "integrated_gradients", target=1, modalities=["question"])
    assert ig.scores["question"].sum() == pytest.approx(gap, abs=1e-5)
    for method in ("gradient", "integrated_gradients"):
        one = attribute(a, p, method, target=1, modalities=["question"])
        for r in attribute_batch(a, [inst, inst], method, targets=1, modalities=["question"]):
            np.testing.assert_allclose(r.scores["question"], one.scores["question"],
                                       rtol=1e-5, atol=1e-7)


def test_equal_ids_of_an_explained_and_an_unexplained_text_copied_by_the_model():
    """The model copies ids before embedding them, and the texts' ids are equal: a copy is
    told apart by which text another call took by its very tensor, else a clear error."""
    from multiviz_widgets.kernels.unimodal import attribute
    mods = [Text("question", vocab=WORDS), Text("answer", vocab=WORDS)]
    same = {"question": "the car", "answer": "the car"}
    plain = ModelAdapter(QuestionAnswer().eval(), mods, ["x", "y", "z"])
    truth = {n: attribute(plain, same, "gradient", target=1, modalities=[n]).scores[n]
             for n in ("question", "answer")}
    for copy in ("question", "answer"):
        a = ModelAdapter(QuestionAnswer([copy]).eval(), mods, ["x", "y", "z"])
        for n in ("question", "answer"):
            if (copy, n) == ("question", "question"):
                # the question's copy is embedded first, the answer's ids then: the copy was
                # the question's, but only known once its call had passed unchanged
                with pytest.raises(AdapterError, match="cannot be told") as e:
                    attribute(a, same, "gradient", target=1, modalities=[n])
                assert e.value.code == "embedding-substitution"
                continue
            r = attribute(a, same, "gradient", target=1, modalities=[n])
            np.testing.assert_allclose(r.scores[n], truth[n], rtol=1e-6, err_msg=f"{copy} {n}")
    # both copied and equal, one explained: a clear error, not the other's input put in
    a = ModelAdapter(QuestionAnswer(["question", "answer"]).eval(), mods, ["x", "y", "z"])
    for n in ("question", "answer"):
        with pytest.raises(AdapterError, match="cannot be told"):
            attribute(a, same, "integrated_gradients", target=1, modalities=[n])
    both = attribute(a, same, "gradient", target=1)          # both explained: as before
    assert all(np.abs(v).sum() > 0 for v in both.scores.values())
    r = attribute(a, {"question": "the car", "answer": "a car"}, "gradient", target=1,
                  modalities=["question"])                  # ids that differ: fine
    np.testing.assert_allclose(r.scores["question"], attribute(
        plain, {"question": "the car", "answer": "a car"}, "gradient", target=1,
        modalities=["question"]).scores["question"], rtol=1e-6)


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_one_tensor_given_for_two_texts_is_told_apart_by_the_model_inputs():
    """raw ids of the question and the answer given as one tensor: the model's arguments are
    two tensors, so each embedding call is told whose ids it takes."""
    model = QuestionAnswer().eval()
    a = ModelAdapter(model, [Text("question", vocab=WORDS), Text("answer", vocab=WORDS)],
                     ["x", "y", "z"])
    ids = a.prepare({"question": "the car", "answer": "the car"}).raw["question"]
    args = a.model_inputs({"question": ids, "answer": ids})
    # (a batch of one is passed as copies: see test_user_models' in-place tests)
    assert not _shares_storage(args["question"], args["answer"])
    assert torch.equal(args["question"], ids) and torch.equal(args["answer"], ids)
    cont = a.continuous({"question": ids, "answer": ids})
    with torch.no_grad():
        moved = a.forward({"question": ids, "answer": ids},
                          {"question": cont["question"] + 1.0})
        want = model.out(torch.cat([
            (q := torch.tanh(model.q((cont["question"] + 1.0).mean(1))))
            * (an := torch.tanh(model.a(model.emb(ids).mean(1)))), q + an], 1))
    torch.testing.assert_close(moved, want)


def test_an_embedding_never_called_on_the_text_ids_is_a_clear_error():
    a = text_vitals(embedding_layers={"text": "pos"})     # the positional embedding
    p = a.prepare(TV_INSTANCE)
    with pytest.raises(AdapterError, match=r"'text', pos \(Embedding\), was never called on the "
                                           r"token ids of 'text'") as e:
        a.forward(p.raw, {"text": p.continuous["text"][None]})
    assert e.value.code == "embedding-substitution"
    assert _hook_count(a) == 0
    a.forward(p.raw)                                       # without continuous inputs: fine


def test_an_embedding_layer_named_for_a_modality_without_token_ids_is_refused():
    """embedding_layers={"vitals": ...} (a Tabular) was accepted and dropped: what the person
    meant silently did not happen."""
    with pytest.raises(AdapterError, match=r"embedding_layers names \['vitals'\], whose inputs "
                                           r"are not token ids \('vitals' is Tabular\)") as e:
        text_vitals(embedding_layers={"text": "emb", "vitals": "emb"})
    assert e.value.code == "embedding-layer" and "leave them out" in str(e.value)


def test_in_place_changes_of_the_embedding_output_keep_gradients_and_inputs():
    """The model masks and scales its embedding output in place: the hook hands it a copy, so
    back-propagation works, reaches the continuous input and leaves the input unchanged."""
    from multiviz_widgets.kernels.interactions import interaction
    from multiviz_widgets.kernels.unimodal import attribute
    a = text_vitals("inplace")
    p = a.prepare(TV_INSTANCE)
    before = p.continuous["text"].clone()
    x = p.continuous["text"][None].clone().requires_grad_(True)
    out = a.forward(p.raw, {"text": x})
    torch.testing.assert_close(out.detach(), a.model(*p.raw.values()).detach())
    (g,) = torch.autograd.grad(out[0, 1], [x])
    assert torch.count_nonzero(g) > 0
    with torch.no_grad():       # the gradient of 2 * e: a finite difference agrees
        d = torch.zeros_like(x)
        d[0, 2, 3] = 1e-3
        fd = (a.forward(p.raw, {"text": x + d})[0, 1] - a.forward(p.raw, {"text": x - d})[0, 1]) / 2e-3
    assert float(g[0, 2, 3]) == pytest.approx(float(fd), rel=1e-2, abs=1e-5)
    for method in ("gradient", "integrated_gradients", "occlusion"):
        attribute(a, p, method, target=1)
    interaction(a, p, "second_order", target=1)
    assert torch.equal(p.continuous["text"], before)


class Pooled(nn.Module):
    """A custom embedding module that pools its tokens: one vector per text."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(len(WORDS), 5)

    def forward(self, ids):
        return self.emb(ids).mean(1)


@pytest.mark.parametrize("layer, match", [
    (lambda m: nn.EmbeddingBag(len(WORDS), 5), r"bag \(EmbeddingBag\), is an nn.EmbeddingBag: it "
                                               r"gives one vector per text"),
    (lambda m: m.tab, r"tab \(Linear\), takes vectors, not token ids"),
    (lambda m: nn.LSTM(6, 6), r"bag \(LSTM\), takes vectors"),
    (lambda m: nn.Embedding(5, 6), r"bag \(Embedding\), has 5 rows but the vocabulary of 'text' "
                                   r"has 11 tokens"),
])
def test_layers_that_cannot_embed_the_token_ids_are_rejected_at_construction(layer, match):
    model = TextVitals().eval()
    model.bag = layer(model)
    spec = "tab" if isinstance(model.bag, nn.Linear) else "bag"
    with pytest.raises(AdapterError, match=match) as e:
        ModelAdapter(model, list(text_vitals().modalities.values()), ["a", "b"],
                     embedding_layers={"text": spec})
    assert e.value.code == "embedding-layer"


def test_an_embedding_module_without_one_vector_per_token_fails_on_first_use():
    model = TextVitals().eval()
    model.bag = Pooled()
    a = ModelAdapter(model, list(text_vitals().modalities.values()), ["a", "b"],
                     embedding_layers={"text": "bag"})
    with pytest.raises(AdapterError, match=r"bag \(Pooled\), returned \(1, 5\) for token ids of "
                                           r"shape \(1, 5\): not one vector per token"):
        a.prepare(TV_INSTANCE)


# ---------------------------------------------------------------------------------------------
# outputs and decision layers the kernels cannot use
# ---------------------------------------------------------------------------------------------
class Outputs(nn.Module):
    """tabular [3] + series; returns its logits in the shape or type ``kind`` says."""

    def __init__(self, kind="plain", n=2):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(2, 4), nn.Linear(4, n)

    def forward(self, tabular, series):
        z = self.head(torch.tanh(self.a(tabular)) * torch.tanh(self.b(series.mean(1))))
        k = self.kind
        return {"B": lambda: z[:, 0], "dict": lambda: {"logits": z},
                "hf": lambda: type("Out", (), {"logits": z})(),
                "late": lambda: (z + self.head(torch.tanh(self.a(tabular)))) / 2,
                }.get(k, lambda: z)()


def outputs_adapter(kind="plain", n=2, names=("n", "y"), **kw):
    return ModelAdapter(Outputs(kind, n).eval(), [Tabular("tabular", columns=list("abcd")),
                                                   TimeSeries("series", window=4, channels=["x", "y"])],
                        list(names), **kw)


@pytest.mark.parametrize("kind, n, names, match", [
    ("B", 1, ("n", "y", "z"), r"shape \(\d+,\): one score per instance.*classes = "
                              r"len\(class_names\) = 3.*binary model.*\[negative, positive\]"),
    ("plain", 1, ("n", "y", "z"), r"returns 1 logits.*class_names has 3 names.*binary model"),
    ("plain", 3, ("n", "y"), r"returns 3 logits.*class_names has 2 names.*classes = len\(class_names\)"),
    ("dict", 2, ("n", "y"), r"returned a dict \(keys \['logits'\]\).*self.m\(\*x\)\['logits'\]"),
    ("hf", 2, ("n", "y"), r"returned Out.*returns self.m\(\*x\).logits"),
])
def test_outputs_that_are_not_logits_per_class_name_are_clear_errors(kind, n, names, match):
    from multiviz_widgets.kernels.unimodal import attribute
    a = outputs_adapter(kind, n, names)
    for method in ("gradient", "occlusion"):
        with pytest.raises(AdapterError, match=match):
            attribute(a, drop_norm_instance(), method, target=0)


def test_one_score_per_instance_with_one_class_name_is_one_logit():
    from multiviz_widgets.kernels.unimodal import attribute
    a = outputs_adapter("B", 1, ("positive",))
    p = a.prepare(drop_norm_instance())
    assert a.predict(p.raw).shape == (1, 1)
    attribute(a, p, "occlusion", target=0)


@pytest.mark.parametrize("kind", ["B", "plain"])
def test_a_binary_model_with_one_logit_is_read_as_two_classes(kind):
    """One logit z with class_names=[negative, positive]: the logits [-z/2, z/2] (softmax =
    [1 - sigmoid(z), sigmoid(z)]), the decision layer's one row as the two classes' rows, and
    every stage that needs two outputs (the EMAP gap, the doctor's decision-layer check)."""
    from multiviz_widgets import check
    from multiviz_widgets.kernels.representations import decision_contributions
    from multiviz_widgets.kernels.unimodal import attribute
    model = Outputs(kind, 1).eval()
    a = ModelAdapter(model, [Tabular("tabular", columns=list("abcd")),
                             TimeSeries("series", window=4, channels=["x", "y"])], ["no", "yes"])
    assert a.decision_layer is model.head
    p = a.prepare(drop_norm_instance())
    z = model(*p.raw.values()).reshape(-1)
    logits = a.predict(p.raw)
    assert logits.shape == (1, 2)
    assert torch.allclose(logits, torch.stack([-z / 2, z / 2], 1))
    assert torch.allclose(logits.softmax(1)[:, 1], torch.sigmoid(z))
    pos, neg = (attribute(a, p, "gradient", target=c) for c in (1, 0))
    assert np.allclose(pos.scores["tabular"], -neg.scores["tabular"])
    w, b = a.decision_weights()
    assert w.shape == (2, 4) and np.allclose(w[1], model.head.weight.detach().numpy()[0] / 2)
    got = decision_contributions(a, p, 1)
    assert np.isclose(got.contributions.sum() + got.bias, float(z[0]) / 2, atol=1e-6)
    report = check(a, drop_norm_instance())
    assert not [f for f in report.findings if f.code == "decision-not-logits"], str(report)
    from multiviz_widgets import MultimodalDataset
    from multiviz_widgets.kernels.emap import emap_gap
    insts = [drop_norm_instance(seed) for seed in range(6)]
    ds = MultimodalDataset({n: [i[n] for i in insts] for n in ("tabular", "series")},
                           labels=[0, 1, 0, 1, 0, 1])
    gap = emap_gap(a, ds, n=None)
    assert 0 <= gap["accuracy_model"] <= 1 and 0 <= gap["agreement"] <= 1, gap


class HiddenPair(nn.Module):
    """A binary model whose one-logit head comes after a hidden nn.Linear of two outputs
    (``head_first``: a two-logit head registered before a one-output gate)."""

    def __init__(self, head_first=False):
        super().__init__()
        torch.manual_seed(0)
        self.head_first = head_first
        if head_first:
            self.head, self.gate, self.mid = nn.Linear(4, 2), nn.Linear(3, 1), nn.Linear(3, 4)
        else:
            self.enc, self.mid, self.head = nn.Linear(3, 2), nn.Linear(2, 4), nn.Linear(4, 1)

    def forward(self, vitals):
        if self.head_first:
            return self.head(torch.tanh(self.mid(vitals)) * torch.sigmoid(self.gate(vitals)))
        return self.head(torch.tanh(self.mid(torch.tanh(self.enc(vitals)))))


def test_a_binary_models_two_logit_head_is_the_default_beside_a_one_output_gate():
    """Two class names: the last nn.Linear of two outputs is the decision layer, not a
    one-output gate (an attention pooling's scorer) registered after it; a one-output layer
    is taken only when there is no two-output one."""
    model = HiddenPair(head_first=True).eval()
    a = ModelAdapter(model, [Tabular("vitals", columns=["a", "b", "c"])], ["neg", "pos"])
    assert a.decision_layer is model.head and a.decision_weights()[0].shape == (2, 4)
    # a hidden nn.Linear(..., 2) before a one-logit head is taken for the head: check() says
    # so and names the head
    from multiviz_widgets import check
    one = HiddenPair().eval()
    b = ModelAdapter(one, [Tabular("vitals", columns=["a", "b", "c"])], ["neg", "pos"])
    assert b.decision_layer is one.enc
    found = [f for f in check(b, {"vitals": np.array([0.1, 0.2, 0.3], np.float32)}).findings
             if f.code == "decision-not-logits"]
    assert found and "decision_layer='head'" in found[0].message, found


def test_modalities_listed_in_another_order_than_forward_reach_their_own_arguments():
    """forward(tabular, series) with the modalities listed [series, tabular]: each input goes
    to the argument of its name (by position the model would take one for the other)."""
    from multiviz_widgets.kernels.unimodal import attribute
    model = Outputs("plain", 2).eval()
    mods = [Tabular("tabular", columns=list("abcd")),
            TimeSeries("series", window=4, channels=["x", "y"])]
    right = ModelAdapter(model, mods, ["n", "y"])
    swapped = ModelAdapter(model, mods[::-1], ["n", "y"])
    assert swapped.keyword_inputs and not right.keyword_inputs
    inst = drop_norm_instance()
    p, q = right.prepare(inst), swapped.prepare(inst)
    assert torch.equal(right.predict(p.raw), swapped.predict(q.raw))
    r1, r2 = (attribute(x, y, "occlusion", target=1) for x, y in ((right, p), (swapped, q)))
    for n in ("tabular", "series"):
        assert np.allclose(r1.scores[n], r2.scores[n])

    class PositionalOnly(nn.Module):
        def forward(self, tabular, series, /):
            return model(tabular, series)
    with pytest.raises(AdapterError, match=r"by position only.*list them in forward\(\)'s order"):
        ModelAdapter(PositionalOnly(), mods[::-1], ["n", "y"])


def test_a_decision_layer_called_twice_or_on_tokens_is_an_error_for_neurons():
    from multiviz_widgets.kernels.unimodal import attribute
    a = outputs_adapter("late", decision_layer="head")
    p = a.prepare(drop_norm_instance())
    with pytest.raises(AdapterError, match="called 2 times in one forward pass"):
        attribute(a, p, "occlusion", target=Neuron(0))
    with pytest.raises(AdapterError, match="called 2 times"):
        a.features(p.raw)
    attribute(a, p, "occlusion", target=1)                 # class targets still work

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.tok = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, tabular, series):
            return self.tok(torch.tanh(self.a(tabular))[:, None] * series.mean(2, keepdim=True)).mean(1)
    b = ModelAdapter(Tokens().eval(), list(a.modalities.values()), ["n", "y"])
    with pytest.raises(AdapterError, match=r"input has shape \(1, 8, 4\); neuron targets and "
                                           r"features need one vector per instance \[batch, features\]"):
        b.features(p.raw)
    with pytest.raises(AdapterError, match=r"one vector per instance"):
        attribute(b, p, "gradient", target=Neuron(1))


# ---------------------------------------------------------------------------------------------
# hints for models called the wrong way
# ---------------------------------------------------------------------------------------------
class KeywordOnly(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.t, self.s = nn.Linear(4, 3), nn.Linear(16, 3)

    def forward(self, *, tabular, series):
        return self.t(tabular) + self.s(series.flatten(1))


def test_keyword_only_forward_and_float64_models_get_specific_hints():
    from multiviz_widgets.kernels.unimodal import attribute
    mods = list(drop_norm_adapter(DropNorm()).modalities.values())
    # forward(self, *, tabular, series) takes the modalities by name only: called so by itself
    # (it failed at the first call, told to pass keyword_inputs=True)
    a = ModelAdapter(KeywordOnly().eval(), mods, list("abc"))
    assert a.keyword_inputs is True
    ok = ModelAdapter(KeywordOnly().eval(), mods, list("abc"), keyword_inputs=True)
    assert np.array_equal(attribute(a, drop_norm_instance(), "gradient").scores["tabular"],
                          attribute(ok, drop_norm_instance(), "gradient").scores["tabular"])
    wide = ModelAdapter(KeywordOnly().double().eval(), mods, list("abc"), keyword_inputs=True)
    attribute(wide, drop_norm_instance(), "gradient")     # collate casts the float32 inputs
    raw = {k: v[None] for k, v in drop_norm_instance().items()}    # past collate: not cast
    with pytest.raises(ModelInputError, match=r"parameters are float64 but modality 'tabular' is "
                                              r"float32: pass float64 tensors.*model.float\(\)"):
        wide.forward(raw)
    inst = {k: v.double() for k, v in drop_norm_instance().items()}
    attribute(wide, inst, "gradient")


class OneDict(KeywordOnly):
    def forward(self, batch):
        return super().forward(tabular=batch["tabular"], series=batch["series"])


class AnyKeywords(KeywordOnly):
    def forward(self, **inputs):
        return super().forward(**inputs)


class TooFew(KeywordOnly):
    def forward(self, tabular):
        return self.t(tabular)


def test_forward_signatures_that_cannot_take_the_modalities_get_what_to_change():
    """One dict of every modality, **kwargs without keyword_inputs, fewer arguments than
    modalities: the error says what to change (not to check the inputs' shapes), and the
    wrapper it shows works."""
    from multiviz_widgets.kernels.unimodal import attribute
    mods = list(drop_norm_adapter(DropNorm()).modalities.values())
    inst = drop_norm_instance()
    for keyword_inputs in (False, True):
        a = ModelAdapter(OneDict().eval(), mods, list("abc"), keyword_inputs=keyword_inputs)
        with pytest.raises(ModelInputError, match=r"takes one argument \('batch'\) but the "
                                                  r"adapter has 2 modalities") as e:
            attribute(a, inst, "gradient")
        assert "shapes the model expects" not in str(e.value)
        recipe = str(e.value)[str(e.value).index("class Wrapped"):]
        space: dict = {"torch": torch}
        exec(recipe.split("adapter = ")[0], space)               # the wrapper as shown
        model = OneDict().eval()
        wrapped = ModelAdapter(space["Wrapped"](model), mods, list("abc"))
        assert np.isfinite(attribute(wrapped, inst, "gradient").scores["tabular"]).all()
    with pytest.raises(ModelInputError, match=r"takes \*\*inputs by keyword: pass "
                                              r"keyword_inputs=True"):
        attribute(ModelAdapter(AnyKeywords().eval(), mods, list("abc")), inst, "gradient")
    attribute(ModelAdapter(AnyKeywords().eval(), mods, list("abc"), keyword_inputs=True), inst,
              "gradient")
    with pytest.raises(ModelInputError, match=r"takes 1 input \(\['tabular'\]\) but the "
                                              r"adapter has 2 modalities.*one modality per "
                                              r"argument"):
        attribute(ModelAdapter(TooFew().eval(), mods, list("abc")), inst, "gradient")


class Wide(nn.Module):
    """A float64 model: tabular [4] (float64 numpy rows) + token ids, which stay integers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(6, 3)
        self.t = nn.Linear(4, 5)
        self.head = nn.Linear(8, 2)
        self.double()

    def forward(self, tabular, words):
        assert tabular.dtype == torch.float64 and words.dtype == torch.int64
        return self.head(torch.cat([torch.tanh(self.t(tabular)), self.emb(words).mean(1)], 1))


def test_a_float64_model_takes_float64_and_float32_arrays_and_token_ids_stay_integers(tmp_path):
    from multiviz_widgets import MultimodalDataset, Text
    from multiviz_widgets.kernels.representations import extract_features
    from multiviz_widgets.kernels.unimodal import attribute
    vocab = ["[PAD]", "[UNK]", "a", "b", "c", "d"]
    a = ModelAdapter(Wide().eval(), [Tabular("tabular", columns=list("wxyz")),
                                     Text("words", vocab)], ["n", "y"])
    rng = np.random.default_rng(0)
    rows = [rng.normal(size=4) for _ in range(5)]                  # float64 numpy
    words = ["a b", "c", "d a b", "b b", "c d"]
    batch = a.collate([{"tabular": r, "words": w} for r, w in zip(rows[:2], words[:2])])
    assert batch["tabular"].dtype == torch.float64 and batch["words"].dtype == torch.int64
    same = torch.zeros(1, 4, dtype=torch.float64)
    assert a.collate([{"tabular": same[0], "words": "a"}])["tabular"].dtype == torch.float64
    for x in (rows[0], rows[0].astype(np.float32)):
        r = attribute(a, {"tabular": x, "words": "a b"}, "gradient")
        assert np.isfinite(np.asarray(r.scores["tabular"])).all()
    ds = MultimodalDataset({"tabular": rows, "words": words})
    f = extract_features(a, ds, cache_dir=tmp_path)
    with torch.no_grad():
        want = torch.stack([a.model(torch.as_tensor(r)[None], a.modalities["words"].batch([w]))[0]
                            for r, w in zip(rows, words)])
    np.testing.assert_allclose(f.logits, want.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(f.indices, np.arange(5))


def test_inputs_follow_the_model_dtype_live_and_keys_see_shapes():
    """A model made .double() after wrapping gets float64 inputs (the dtype is read live, as the
    device is); two instances whose bytes agree but whose shapes differ get different keys."""
    from multiviz_widgets import Tabular, TimeSeries

    class Sum(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(1, 2)

        def forward(self, tab, series):
            return self.head((tab.sum(1) + series.sum((1, 2)))[:, None])

    mods = [Tabular("tab", columns=["a", "b"]), TimeSeries("series", window=2, channels=["x", "y"])]
    adapter = ModelAdapter(Sum().eval(), mods, ["n", "p"], decision_layer="head")
    inst = {"tab": np.ones(2, np.float32), "series": np.ones((4, 2), np.float32)}
    assert adapter.collate([inst])["tab"].dtype == torch.float32
    adapter.model.double()
    assert adapter.collate([inst])["tab"].dtype == torch.float64
    assert adapter.forward(adapter.collate([inst])).dtype == torch.float64
    adapter.model.float()
    wide = ModelAdapter(Sum().eval(), [Tabular("tab", columns=["a", "b"]),
                                       TimeSeries("series", window=2, channels=["x", "y", "z", "w"])],
                        ["n", "p"], decision_layer="head")
    a = adapter.prepare(inst)
    b = wide.prepare({"tab": inst["tab"], "series": np.ones((2, 4), np.float32)})
    assert a.key != b.key


def test_values_beyond_the_model_dtype_are_an_error_naming_the_overflow():
    """A float16 model that normalises inside forward (v / 1e5) got an income of 120000 as
    inf: collate checked finiteness before the cast, and check() blamed the model's numerics."""
    model = nn.Sequential(nn.Linear(3, 2)).half().eval()
    adapter = ModelAdapter(model, [Tabular("v", columns=["income", "age", "debt"])], ["no", "yes"])
    ok, big = {"v": [60000.0, 40.0, 7.0]}, {"v": [120000.0, 40.0, -70000.0]}
    assert adapter.collate([ok])["v"].dtype == torch.float16
    with pytest.raises(AdapterError, match=r"Modality 'v' of instance 1 holds values up to "
                                           r"120000 in magnitude, beyond the largest number of "
                                           r"the model's dtype float16 \(65504\)") as err:
        adapter.collate([ok, big])
    assert "Scale them down before they reach the model" in str(err.value)
    assert "model.float()" in str(err.value)
    # read from the batch's largest and smallest values (no copy of it): a negative one too
    with pytest.raises(AdapterError, match=r"instance 0 holds values up to 70000 in magnitude"):
        adapter.collate([{"v": [1.0, -70000.0, 7.0]}, ok])
    model.bfloat16()                    # its range is float32's: nothing to check
    assert adapter.collate([{"v": [1e30, 40.0, 7.0]}])["v"].dtype == torch.bfloat16
    model.half()
    from multiviz_widgets import check
    report = check(adapter, big)
    assert not report.ok and "beyond the largest number" in str(report), str(report)
    assert "non-finite" not in report.codes()
    model.float()                       # a float32 model takes them
    assert adapter.collate([big])["v"].tolist() == [[120000.0, 40.0, -70000.0]]
    model.double()
    assert adapter.collate([{"v": np.array([1e300, 0.0, 0.0])}])["v"].dtype == torch.float64
    model.float()
    with pytest.raises(AdapterError, match="float32"):
        adapter.collate([{"v": np.array([1e300, 0.0, 0.0])}])


def test_an_instance_prepared_before_the_model_was_converted_is_told_to_prepare_again():
    from multiviz_widgets import Tabular
    from multiviz_widgets.adapter import ModelInputError
    from multiviz_widgets.kernels.unimodal import attribute
    adapter = ModelAdapter(torch.nn.Linear(2, 2).eval(), [Tabular("tab", columns=["a", "b"])],
                           ["n", "p"])
    inst = {"tab": np.ones(2, np.float32)}
    p = adapter.prepare(inst)
    adapter.model.double()
    with pytest.raises(ModelInputError, match=r"prepare it again \(adapter.prepare\(instance\)\)"):
        attribute(adapter, p, "occlusion", target=0)
    assert attribute(adapter, adapter.prepare(inst), "occlusion", target=0).scores["tab"].shape == (2,)


def test_a_class_name_given_twice_is_a_target_by_index_only():
    """Label lists repeat names (ImageNet has two "crane"s): the adapter takes them, and a
    target named by such a name is refused, saying which classes it names (it picked the
    first, silently)."""
    from multiviz_widgets import Tabular
    from multiviz_widgets.adapter import AdapterError
    adapter = ModelAdapter(torch.nn.Linear(2, 3).eval(), [Tabular("tab", columns=["a", "b"])],
                           ["crane", "red", "crane"])
    assert adapter.target(2).index == 2 and adapter.target("red").index == 1
    with pytest.raises(AdapterError, match=r"'crane' names the classes \[0, 2\]: give the class "
                                           r"index"):
        adapter.target("crane")


def test_a_text_longer_than_the_models_table_of_positions_says_so():
    """Before: 'IndexError: index out of range in self', with advice about image sizes."""
    from multiviz_widgets.adapter import ModelInputError
    vocab = ["[PAD]", "[UNK]", "a", "b"]

    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.pos = nn.Embedding(4, 3), nn.Embedding(8, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, question):
            steps = torch.arange(question.shape[1])
            return self.head((self.embed(question) + self.pos(steps)).mean(1))
    a = ModelAdapter(Positions(), [Text("question", vocab=vocab)], ["x", "y"],
                     embedding_layers={"question": "embed"})
    assert a.forward(a.prepare({"question": "a b a b"}).raw).shape == (1, 2)
    with pytest.raises(ModelInputError, match="has 10 tokens, and the model.s table .pos. has 8 "
                                              "rows"):
        a.forward(a.prepare({"question": "a b a b a b a b a b"}).raw)


def test_a_model_that_refuses_the_baseline_inputs_is_told_about_baselines_not_shapes():
    from multiviz_widgets.kernels.unimodal import attribute

    class RefusesZeros(Outputs):
        def forward(self, tabular, series):
            if bool((tabular == 0).all(1).any()):
                raise ValueError("all-zero record not supported")
            return super().forward(tabular, series)
    a = ModelAdapter(RefusesZeros().eval(), [Tabular("tabular", columns=list("abcd")),
                                             TimeSeries("series", window=4, channels=["x", "y"])],
                     ["n", "y"])
    p = a.prepare(drop_norm_instance())
    for method in ("integrated_gradients", "kernel_shap"):
        with pytest.raises(ModelInputError, match=r"all-zero record not supported.*not the "
                                                  r"instance's own inputs.*'tabular'.*baseline=") as e:
            attribute(a, p, method, target=0)
        assert "order of the model's arguments" not in str(e.value)
    ok = ModelAdapter(RefusesZeros().eval(), [Tabular("tabular", columns=list("abcd"),
                                                      baseline=[1.0] * 4),
                                              TimeSeries("series", window=4, channels=["x", "y"])],
                      ["n", "y"])
    assert attribute(ok, ok.prepare(drop_norm_instance()), "occlusion", target=0).scores


def test_a_binary_model_that_ends_in_a_sigmoid_is_told_to_return_the_logit():
    from multiviz_widgets import check

    class Sigmoid(Outputs):
        def forward(self, tabular, series):
            return torch.sigmoid(super().forward(tabular, series))

    class Squeezed(Outputs):
        def forward(self, tabular, series):
            return super().forward(tabular, series).squeeze()    # [] for a batch of one
    mods = [Tabular("tabular", columns=list("abcd")),
            TimeSeries("series", window=4, channels=["x", "y"])]
    r = check(ModelAdapter(Sigmoid(n=1).eval(), mods, ["no", "yes"]), drop_norm_instance())
    assert "sigmoid-output" in r.codes() and not r.ok and "return the logit" in str(r), str(r)
    # the sigmoid is the one fix: no advice to pass another decision layer beside it
    assert "decision-not-last" not in r.codes(), str(r)
    squeezed = ModelAdapter(Squeezed(n=1).eval(), mods, ["no", "yes"])
    assert squeezed.predict(squeezed.prepare(drop_norm_instance()).raw).shape == (1, 2)
    assert "sigmoid-output" not in check(squeezed, drop_norm_instance()).codes()


def test_a_model_that_takes_one_instance_only_is_not_told_about_baselines():
    """forward() written for a batch of one fails on any batch: the baselines are not to
    blame (the instance itself fails as a batch of the same size), the batch size is (the
    instance alone runs)."""
    from multiviz_widgets.kernels.unimodal import attribute

    class OneAtATime(Outputs):
        def forward(self, tabular, series):
            return super().forward(tabular.view(1, -1), series.view(1, 8, 2))
    a = ModelAdapter(OneAtATime().eval(), [Tabular("tabular", columns=list("abcd")),
                                           TimeSeries("series", window=4, channels=["x", "y"])],
                     ["n", "y"])
    with pytest.raises(ModelInputError) as e:
        attribute(a, drop_norm_instance(), "occlusion", target=0)
    assert "baseline" not in str(e.value)
    assert "runs this instance alone but not as a batch" in str(e.value)
    assert "take any batch size" in str(e.value)


def test_argument_order_is_read_through_data_parallel_and_the_wrapper_advice_keeps_names():
    model = Outputs("plain", 2).eval()
    mods = [Tabular("tabular", columns=list("abcd")),
            TimeSeries("series", window=4, channels=["x", "y"])]
    wrapped = ModelAdapter(nn.DataParallel(model), mods[::-1], ["n", "y"])
    plain = ModelAdapter(model, mods, ["n", "y"])
    assert wrapped.keyword_inputs
    inst = drop_norm_instance()
    assert torch.equal(wrapped.predict(wrapped.prepare(inst).raw),
                       plain.predict(plain.prepare(inst).raw))

    class OwnModule(Outputs):            # a submodule named "module" of a model with names
        def __init__(self):
            super().__init__("plain", 2)
            self.module = nn.Linear(1, 1)
    assert ModelAdapter(OwnModule().eval(), mods[::-1], ["n", "y"]).keyword_inputs
    dict_out = ModelAdapter(Outputs("dict", 2).eval(), mods[::-1], ["n", "y"])
    with pytest.raises(AdapterError, match=r"forward\(self, \*\*x\) returns self.m\(\*\*x\)"
                                           r"\['logits'\].*keyword_inputs=True"):
        dict_out.predict(dict_out.prepare(inst).raw)


def test_class_names_given_as_a_mapping_are_ordered_by_class_index():
    """A HuggingFace id2label {0: 'cat', ...} gave the names ['0', '1', '2'], and a label2id
    {'dog': 1, 'cat': 0, ...} named logit 0 'dog': a mapping is read by its class indices."""
    expected = ["red", "green", "blue"]
    for names in ({2: "blue", 0: "red", 1: "green"}, {"green": 1, "blue": 2, "red": 0},
                  {np.int64(1): "green", np.int64(0): "red", np.int64(2): "blue"}):
        assert adapter(Healthy(), class_names=names).class_names == expected
    a = adapter(Healthy(), class_names={1: "green", 0: "red", 2: "blue"})
    assert a.target("green").index == 1
    for bad, words in [({0: "red", 1: "green", 3: "blue"}, r"ids 0\.\.2, each once.*0, 1, 3"),
                       ({"red": 0, "green": 0, "blue": 1}, r"ids 0\.\.2, each once.*0, 0, 1"),
                       ({"0": "red", "1": "green", "2": "blue"}, r"id2label.*label2id.*"
                                                                r"JSON file's keys are strings"),
                       ({0: 2, 1: 0, 2: 1}, "integers to integers"),
                       ({"red": "r", "green": "g"}, r"\{0: 'cat', 1: 'dog'\} \(id2label\)")]:
        with pytest.raises(AdapterError, match=words):
            adapter(Healthy(), class_names=bad)


def test_class_names_as_one_string_a_set_or_a_number_are_refused():
    """'abc' became the names ['a', 'b', 'c'] (silently); a set has no order."""
    with pytest.raises(AdapterError, match=r"single string 'rgb'.*give a list"):
        adapter(Healthy(), class_names="rgb")
    with pytest.raises(AdapterError, match="is a set, which has no order"):
        adapter(Healthy(), class_names={"red", "green", "blue"})
    with pytest.raises(AdapterError, match="must be a list with one name per output logit.*int"):
        adapter(Healthy(), class_names=3)
    assert adapter(Healthy(), class_names=("r", "g", "b")).class_names == ["r", "g", "b"]


def test_class_name_never_reads_from_the_end():
    """An index beyond the names (a neuron, an output the names miss) is shown as its number;
    a negative one too, never as the last names (Python's names[-1])."""
    names = ["red", "green"]
    assert [class_name(names, c) for c in (0, 1, 2, -1)] == ["red", "green", "2", "-1"]


def test_an_embedding_called_with_keywords_takes_the_continuous_input():
    """embed(input=ids) or a subclass's embed(scale=1.0, ids=ids) gave its hook no positional
    argument: the ids were never matched (or the wrong keyword was read)."""
    from multiviz_widgets.kernels.unimodal import attribute

    class Scaled(nn.Embedding):
        def forward(self, ids, scale=1.0):
            return super().forward(ids) * scale

    class Keywords(Healthy):
        def __init__(self, subclass: bool):
            super().__init__()
            if subclass:
                scaled = Scaled(self.embedding.num_embeddings, 6)
                scaled.weight.data.copy_(self.embedding.weight.data)
                self.embedding = scaled
            self.subclass = subclass

        def features(self, image, question):
            img = torch.tanh(self.conv(image)).mean((2, 3))
            e = self.embedding
            q = e(scale=1.0, ids=question) if self.subclass else e(input=question)
            return torch.relu(self.fuse(img * q.mean(1)))

    want = attribute(adapter(Healthy()), INSTANCE, "gradient").scores["question"]
    for subclass in (False, True):
        got = attribute(adapter(Keywords(subclass)), INSTANCE, "gradient")
        assert np.allclose(got.scores["question"], want, atol=1e-6)


def test_a_refused_input_keeps_its_exception_class_when_its_instance_is_named():
    """Naming the instance made a plain ValueError of a modality's own ValueError subclass,
    which the user's except clause then missed."""
    class BadRow(ValueError):
        def __init__(self, message, row=None):
            super().__init__(message)
            self.row = row

    class Strict(Tabular):
        def to_tensor(self, raw):
            if len(raw) != 4:
                raise BadRow(f"{self.name}: a row of {len(raw)} values", row=raw)
            return super().to_tensor(raw)

    a = ModelAdapter(DropNorm().eval(), [Strict("tabular", columns=list("abcd")),
                                         TimeSeries("series", window=4, channels=["x", "y"])],
                     ["n", "y"])
    rows = [np.zeros(4, np.float32), np.zeros(4, np.float32), np.zeros(2, np.float32)]
    items = [{"tabular": r, "series": np.zeros((8, 2), np.float32)} for r in rows]
    with pytest.raises(BadRow, match=r"^Instance 2: tabular: a row of 2 values$") as e:
        a.collate(items)
    assert e.value.row.shape == (2,)


def test_attribute_batch_names_an_instance_only_for_what_is_wrong_with_its_input():
    """An embedding layer that pools its tokens is the model's problem, not instance 0's: it
    was said as "Instance 0: The embedding layer given ..." (a list of one included)."""
    from multiviz_widgets.kernels.unimodal import attribute_batch

    class PoolingEmbedding(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids).mean(1)

    class Pools(Healthy):
        def __init__(self):
            super().__init__()
            self.embedding = PoolingEmbedding(self.embedding.num_embeddings, 6)

        def features(self, image, question):
            img = torch.tanh(self.conv(image)).mean((2, 3))
            return torch.relu(self.fuse(img * self.embedding(question)))

    for instances in ([INSTANCE, INSTANCE], [INSTANCE]):
        with pytest.raises(AdapterError, match=r"^The embedding layer given for 'question'"):
            attribute_batch(adapter(Pools()), instances, "gradient")
