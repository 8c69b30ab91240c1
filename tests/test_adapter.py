"""ModelAdapter: continuous inputs replace model inputs, hooks never outlive a call, no shared state."""
import pytest
import torch

from multiviz_widgets import Class, Neuron
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
