"""ModelAdapter: continuous inputs replace model inputs, hooks never outlive a call, no shared state;
a model in training mode runs in eval mode, untouched; inputs it cannot take are clear errors."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from multiviz_widgets import AdapterError, Class, ModelAdapter, Neuron, Tabular, TimeSeries
from multiviz_widgets.adapter import ModelInputError
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
    from multiviz_widgets.kernels.interactions import emap
    a = adapter(Healthy())
    small = dict(INSTANCE, image=torch.rand(3, 4, 4))
    with pytest.raises(AdapterError, match=r"'image': instance 1 has shape \(3, 4, 4\) but "
                                           r"instance 0 has \(3, 8, 8\)") as e:
        emap(a, [INSTANCE, small, INSTANCE])
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
