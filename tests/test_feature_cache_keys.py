"""The decision-feature cache key sees every change of what the model computes: torch's
functions and built-ins it calls through a global or holds as an attribute (by name, the same
in every process), and float, flag and text settings stored as numpy scalars or under names
that begin with "_". Torch's own state and call counters stay out, so an unchanged model still
finds its features, and a model without such settings keeps the fingerprint older concept
files recorded."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from multiviz_widgets import ModelAdapter, MultimodalDataset, Tabular, TimeSeries
from multiviz_widgets.adapter import module_settings
from multiviz_widgets.kernels import representations as rep
from multiviz_widgets.kernels.representations import extract_features

T, CH = 8, 2

#: A notebook cell: the model calls a torch function through the global ACT and another
#: through its attribute ``act``, and reads a private float and a numpy float; it counts its
#: calls in integers (``calls``, ``_n``), which must not change the key.
CELL = '''
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ACT = torch.tanh


class Net(nn.Module):
    def __init__(self, act=F.relu):
        super().__init__()
        torch.manual_seed(0)
        self.tab = nn.Linear(4, 8)
        self.ser = nn.Linear(16, 8)
        self.classifier = nn.Linear(16, 3)
        self.act = act
        self._temperature = 1.0
        self.gain = np.float32(1.0)
        self.calls = 0
        self._n = 0

    def forward(self, tab, ser):
        self.calls += 1
        self._n += 1
        h = torch.cat([self.tab(tab), self.ser(ser.flatten(1))], 1)
        return self.classifier(self.act(ACT(h)) * float(self.gain) / self._temperature)
'''


def cell(run: int = 1) -> dict:
    """The globals of the cell's ``run``-th execution (each run its own file name)."""
    scope: dict = {"__name__": "notebook_cell"}
    exec(compile(CELL, f"/tmp/ipykernel_5/{run}.py", "exec"), scope)
    return scope


def make_adapter(model: nn.Module) -> ModelAdapter:
    mods = [Tabular("tab", columns=["a", "b", "c", "d"]),
            TimeSeries("ser", window=4, channels=["x", "y"])]
    return ModelAdapter(model.eval(), mods, ["k0", "k1", "k2"], decision_layer="classifier")


def make_dataset(n: int = 23) -> MultimodalDataset:
    rng = np.random.default_rng(0)
    return MultimodalDataset({"tab": list(rng.normal(size=(n, 4)).astype(np.float32)),
                              "ser": list(rng.normal(size=(n, T, CH)).astype(np.float32))})


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("MULTIVIZ_CACHE", str(folder))
    return folder


def fresh_features(adapter, ds, first):
    """The features of the model as it is now: computed, not read from the cache, equal to a
    computation without the cache, and other than ``first``'s."""
    now = extract_features(adapter, ds)
    assert not now.from_cache
    np.testing.assert_allclose(now.h, extract_features(adapter, ds, cache=False).h)
    assert np.abs(now.h - first.h).max() > 1e-3
    return now


def test_a_torch_function_rebound_as_a_global_is_another_key(cache):
    """Before: ``ACT = torch.tanh`` read in forward and rebound to torch.sigmoid (a cell run
    again) kept the key, and the tanh features were served."""
    scope, ds = cell(), make_dataset()
    adapter = make_adapter(scope["Net"]())
    first = extract_features(adapter, ds)
    scope["ACT"] = torch.sigmoid
    changed = fresh_features(adapter, ds, first)
    scope["ACT"] = torch.tanh
    back = extract_features(adapter, ds)
    assert back.from_cache and back.key == first.key != changed.key


def test_a_function_a_module_holds_is_another_key(cache):
    """Before: ``self.act = F.relu`` (torch's function, whose code is not hashed) changed to
    F.silu kept the key; so did a built-in (torch.relu) or a functools.partial of torch's."""
    ds = make_dataset()
    model = cell()["Net"]()
    adapter = make_adapter(model)
    first = extract_features(adapter, ds)
    model.act = F.silu
    fresh_features(adapter, ds, first)
    digests = set()
    for act in (F.relu, F.silu, torch.relu, torch.sigmoid,
                functools.partial(F.leaky_relu, negative_slope=0.1),
                functools.partial(F.leaky_relu, negative_slope=0.2)):
        model.act = act
        digests.add(rep.model_code_digest(model))
    assert len(digests) == 6
    # torch's TransformerEncoderLayer holds its activation as a function (its setting is an
    # integer, which the fingerprint leaves out)
    relu, gelu = (rep.model_code_digest(nn.TransformerEncoderLayer(8, 2, activation=a))
                  for a in ("relu", "gelu"))
    assert relu != gelu


@pytest.mark.parametrize("name, value", [("gain", np.float32(2.0)), ("gain", np.bool_(False))])
def test_numpy_settings_are_in_the_key(cache, name, value):
    """Before: ``model.gain = np.float32(2.0)`` (a numpy scalar, no Python float) was left out
    of the fingerprint, and the features of the old value were served."""
    ds = make_dataset()
    model = cell()["Net"]()
    adapter = make_adapter(model)
    first = extract_features(adapter, ds)
    before = adapter.fingerprint()
    setattr(model, name, value)
    assert adapter.fingerprint() != before
    fresh_features(adapter, ds, first)


def test_a_private_note_written_in_forward_keeps_the_cache(cache):
    """Names beginning with "_" stay out of the key (the README says to pass cache=False after
    changing one): a model that notes a float of each pass there (``self._last_norm``) was
    told that it changed during the pass, and its features were never cached."""
    ds = make_dataset()
    model = cell()["Net"]()
    adapter = make_adapter(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = extract_features(adapter, ds)
        model._last_norm = float(model._n)             # a note of the pass, read by nothing
        adapter.predict(adapter.prepare(ds[0]).raw)
        again = extract_features(adapter, ds)
    assert not first.from_cache and again.from_cache and again.key == first.key


def test_an_unchanged_model_finds_its_features_with_a_fresh_adapter(cache):
    """Its call counters (``calls``, ``_n``) change at every pass, and the cell may be run
    again (new classes, new functions): the key stays, in this process and in a new one."""
    ds = make_dataset()
    model = cell(1)["Net"]()
    first = extract_features(make_adapter(model), ds)
    assert not first.from_cache and model._n > 0
    again = extract_features(make_adapter(model), ds)
    assert again.from_cache and again.key == first.key
    rerun = extract_features(make_adapter(cell(2)["Net"]()), ds)
    assert rerun.from_cache and rerun.key == first.key
    # the names of torch's functions, not their addresses: a new kernel reads the cache too
    partial = "functools.partial(F.leaky_relu, negative_slope=0.1)"
    probe = ("import sys, functools; sys.path.insert(0, 'tests'); import torch.nn.functional "
             "as F; from test_feature_cache_keys import cell, make_adapter, make_dataset; "
             "from multiviz_widgets.kernels.representations import features_key; "
             f"print(features_key(make_adapter(cell()['Net']({partial})), make_dataset()))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    keys = {subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           check=True, cwd=root, env={**os.environ, "PYTHONHASHSEED": seed}
                           ).stdout.strip() for seed in ("1", "2")}
    model = cell()["Net"](functools.partial(F.leaky_relu, negative_slope=0.1))
    assert keys == {rep.features_key(make_adapter(model), ds)}


def torch_modules():
    return [nn.Conv2d(3, 4, 3), nn.Linear(3, 4), nn.Embedding(10, 4, padding_idx=0),
            nn.LSTM(3, 4, batch_first=True), nn.MultiheadAttention(8, 2),
            nn.MultiheadAttention(8, 2, kdim=4, vdim=4), nn.BatchNorm2d(4),
            nn.TransformerEncoderLayer(8, 2, batch_first=True)]


@pytest.mark.parametrize("subclass", [False, True])
def test_torch_state_stays_out_of_the_settings(subclass):
    """Torch's own attributes under names beginning with "_" (MultiheadAttention's
    ``_qkv_same_embed_dim``, ``_is_full_backward_hook`` once a backward hook is registered)
    are no settings, in torch's modules and in a user's subclasses of them: their
    fingerprint is the one older concept files recorded."""
    for module in torch_modules():
        if subclass:
            module.__class__ = type(f"My{type(module).__name__}", (type(module),), {})
        adapter_like = nn.Sequential(module)
        fingerprint = make_fingerprint(adapter_like)
        for m in adapter_like.modules():
            m.register_forward_hook(lambda *args: None)
            m.register_forward_pre_hook(lambda *args: None)
            m.register_full_backward_hook(lambda *args: None)
        assert make_fingerprint(adapter_like) == fingerprint, type(module)
        for m in adapter_like.modules():
            for integers in (False, True):
                names = [k for k, _ in module_settings(m, integers=integers)]
                assert not [k for k in names if k.startswith("_")], (type(m), names)


def make_fingerprint(model: nn.Module) -> str:
    import hashlib

    from multiviz_widgets.adapter import hash_module_settings
    h = hashlib.sha256()
    hash_module_settings(h, model)
    return h.hexdigest()


def test_a_traced_split_does_not_see_a_private_call_counter():
    """A traced split's staleness check reads integers too, but not ``self._n`` (a model may
    count its calls there, which would retrace it at every call) nor another name beginning
    with "_"; a numpy flag and a numpy integer setting it reads."""
    model = cell()["Net"]()
    model.flag = np.bool_(True)
    model.steps = np.int64(3)
    with_integers = dict(module_settings(model, integers=True))
    without = dict(module_settings(model, integers=False))
    assert "_n" not in with_integers and with_integers["calls"] == "0"
    assert "_temperature" not in with_integers and "_temperature" not in without
    assert with_integers["gain"] == without["gain"] == "float32:1.0"
    assert with_integers["flag"] == without["flag"] == "bool:True"
    assert with_integers["steps"] == "int64:3" and "steps" not in without


#: The shipped easy-VQA weights (their file's SHA-256) and their ``ModelAdapter.fingerprint``
#: as recorded before numpy settings were read: an older concept file of the
#: model holds it ("weights" without "weights_method"), and must still be recognised.
EASY_VQA_WEIGHTS = "ba4372ab2fb60a8701f921c3679780f510b05317a598833e90d4134a0d994cf5"
EASY_VQA_FINGERPRINT = "beeb6ba9a00ead1193df20939241578c"


def test_the_easy_vqa_fingerprint_is_the_one_older_files_recorded():
    from multiviz_widgets.demos import easy_vqa
    adapter = easy_vqa.load_adapter()
    if adapter.weights_sha256 != EASY_VQA_WEIGHTS:
        pytest.skip("the shipped easy-VQA weights are not those whose fingerprint is recorded")
    assert adapter.fingerprint() == EASY_VQA_FINGERPRINT
