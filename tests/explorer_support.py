"""Stand-in models, datasets and fake kernels for the Explorer tests (no browser, no kernel)."""
from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from multiviz_widgets import Image, ModelAdapter, MultimodalDataset, Tabular, Text, TimeSeries
from multiviz_widgets.adapter import Target
from multiviz_widgets.engine import Kernels
from multiviz_widgets.explorer import Explorer
from multiviz_widgets.results import Attribution, Interaction

VOCAB = ["[PAD]", "[UNK]", "what", "color", "is", "the", "shape", "circle", "red", "blue"]
CLASSES = ["red", "blue", "circle", "<b>bold</b>"]


class TinyVQA(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.img = nn.Linear(3 * 8 * 8, 6)
        self.emb = nn.Embedding(len(VOCAB), 4)
        self.txt = nn.Linear(4, 6)
        self.head = nn.Linear(12, len(CLASSES))

    def forward(self, image, question):
        a = torch.relu(self.img(image.flatten(1)))
        b = torch.relu(self.txt(self.emb(question).mean(1)))
        return self.head(torch.cat([a, b * a.mean(1, keepdim=True) + b], 1))


def tiny_vqa(n: int = 12):
    model = TinyVQA().eval()
    adapter = ModelAdapter(model, [Image("image", patch=4), Text("question", VOCAB)], CLASSES)
    rng = np.random.default_rng(0)
    images = [rng.random((8, 8, 3)).astype(np.float32) for _ in range(n)]
    qs = ["what color is the shape", "what is the shape", "is the circle red",
          "what color is the circle"]
    questions = [qs[i % len(qs)] for i in range(n)]
    ds = MultimodalDataset({"image": images, "question": questions},
                           labels=[i % len(CLASSES) for i in range(n)], descriptions=questions,
                           name="tiny-vqa")
    return adapter, ds


class TinyTabSeries(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.tab = nn.Linear(4, 5)
        self.ser = nn.Linear(16 * 2, 5)
        self.head = nn.Linear(10, 2)

    def forward(self, vitals, series):
        a = torch.tanh(self.tab(vitals))
        b = torch.tanh(self.ser(series.flatten(1)))
        return self.head(torch.cat([a, a * b], 1))


@pytest.fixture
def vqa():
    """(an Explorer on tiny_vqa with FakeKernels, its kernels), ready; closed afterwards."""
    adapter, ds = tiny_vqa()
    kernels = FakeKernels()
    ex = Explorer(adapter, ds, kernels=kernels, delay=0.05)
    assert ex.wait(60)
    yield ex, kernels
    ex.close()


def tiny_tab_series(n: int = 10):
    model = TinyTabSeries().eval()
    adapter = ModelAdapter(model, [Tabular("vitals", columns=["hr", "bp", "temp", "age"]),
                                   TimeSeries("series", window=4, channels=["ecg", "spo2"])],
                           ["healthy", "sick"])
    rng = np.random.default_rng(1)
    ds = MultimodalDataset({"vitals": [rng.normal(size=4).astype(np.float32) for _ in range(n)],
                            "series": [rng.normal(size=(16, 2)).astype(np.float32)
                                       for _ in range(n)]},
                           labels=[i % 2 for i in range(n)], name="tiny-tab-series")
    return adapter, ds


class Features:
    def __init__(self, h, logits):
        self.h, self.logits = h, logits
        self.indices = np.arange(len(h))

    @property
    def predictions(self):
        return self.logits.argmax(1)


class Extremes:
    def __init__(self, h, k, indices=None):
        order = np.argsort(-h, axis=0, kind="stable")
        at = np.arange(len(h)) if indices is None else np.asarray(indices)   # row -> instance
        self.top_indices = at[order[:k].T]
        self.top_values = np.take_along_axis(h, order[:k], 0).T
        self.bottom_indices = at[order[::-1][:k].T]
        self.bottom_values = np.take_along_axis(h, order[::-1][:k], 0).T


class Contributions:
    def __init__(self, h, c):
        self.h, self.contributions = h, c

    def top(self, k=10, absolute=False):
        c = np.abs(self.contributions) if absolute else self.contributions
        return [int(j) for j in np.argsort(-c, kind="stable")[:k]]


def own_features(adapter, items):
    """(logits, h) of ``items``, each instance run alone, as the Explorer's own extraction
    gives them (nothing padded: tiny_vqa's model sums over its [PAD] tokens, so a padded batch
    gives other numbers, which an Explorer given them warns about)."""
    outs = [adapter.features(adapter.collate([item])) for item in items]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


class FakeKernels(Kernels):
    """Cheap, deterministic kernels that count their calls and can block or fail on demand.

    gate: a threading.Event; when set in ``block``, attribute() waits on it (calling progress).
    fail_keys: prepared keys for which attribute() (and, with ``fail_all``, interaction(),
    contributions() and prediction_path()) raise.
    features_gate: a threading.Event; when set in ``features_gate``, features() waits on it.
    """

    def __init__(self):
        self.calls = Counter()
        self.targets: list[Target] = []
        self.block = None              # threading.Event to wait on inside attribute()
        self.blocking_started = threading.Event()
        self.fail_keys: set[str] = set()
        self.fail_all = False
        self.features_gate = None
        self.features_started = threading.Event()

    def _fail(self, prepared, every: bool = False):
        if prepared.key in self.fail_keys and (self.fail_all or not every):
            raise RuntimeError("kernel exploded on purpose")

    def _unit_scores(self, adapter, prepared, target):
        out = {}
        for name, m in adapter.modalities.items():
            x = prepared.continuous[name]
            pooled = m.pool(x.unsqueeze(0).float(), x, prepared.index[name])[0].numpy()
            out[name] = pooled * (1 + target.index) * (-1 if target.kind == "neuron" else 1)
        return out

    def attribute(self, adapter, prepared, method, target, progress=None):
        self.calls["attribute"] += 1
        self.targets.append(target)
        self._fail(prepared)
        gate = self.block
        if gate is not None:
            self.blocking_started.set()
            while not gate.wait(0.01):
                if progress:
                    progress(0, 1, "blocked")
        scores = self._unit_scores(adapter, prepared, target)
        maps = {}
        for name, m in adapter.modalities.items():
            full = torch.as_tensor(scores[name])[prepared.index[name]]
            maps[name] = m.to_map(full).numpy() if m.kind == "image" else scores[name]
        return Attribution(method=method, target=target, scores=scores, maps=maps,
                           labels=dict(prepared.labels))

    def interaction(self, adapter, prepared, method, modalities, target, progress=None):
        self.calls["interaction"] += 1
        self._fail(prepared, every=True)
        s = self._unit_scores(adapter, prepared, target)
        a, b = modalities
        mat = np.outer(s[a], s[b]) + np.arange(len(s[a]))[:, None] * 0.01
        return Interaction(method=method, target=target, modalities=(a, b), matrix=mat,
                           row_labels=list(prepared.labels[a]), col_labels=list(prepared.labels[b]))

    def features(self, adapter, dataset, progress=None):
        self.calls["features"] += 1
        self.features_started.set()
        gate = self.features_gate
        while gate is not None and not gate.wait(0.01):
            if progress:
                progress(0, 1, "blocked")
        hs, ls = [], []
        for _, batch in dataset.batches(4):
            logits, h = adapter.features(adapter.collate(batch))
            hs.append(h.numpy())
            ls.append(logits.numpy())
            if progress:
                progress(len(hs), -(-len(dataset) // 4), "features")
        return Features(np.concatenate(hs), np.concatenate(ls))

    def extremes(self, adapter, features, k, progress=None):
        self.calls["extremes"] += 1
        return Extremes(features.h, k, getattr(features, "indices", None))

    def contributions(self, adapter, prepared, class_index, sparse_model=None):
        self.calls["contributions"] += 1
        self._fail(prepared, every=True)
        _, h = adapter.features(prepared.raw)
        w, _ = adapter.decision_weights()
        h = h[0].numpy()
        return Contributions(h, w[class_index] * h)

    def prediction_path(self, adapter, prepared, class_index, sparse_model=None, progress=None,
                        **params):
        self.calls["path"] += 1
        self._fail(prepared, every=True)
        dc = self.contributions(adapter, prepared, class_index)
        names = adapter.names
        neurons = []
        for j in dc.top(3, absolute=True):
            s = self._unit_scores(adapter, prepared, Target("neuron", j))
            units = {n: [(int(u), prepared.labels[n][u], float(s[n][u]))
                         for u in np.argsort(-np.abs(s[n]))[:2]] for n in names}
            pairs = ([(units[names[0]][0][0], units[names[1]][0][0], "a", "b", 0.5)]
                     if len(names) > 1 else [])
            neurons.append({"index": j, "weight": 1.0, "activation": float(dc.h[j]),
                            "contribution": float(dc.contributions[j]), "units": units,
                            "pairs": pairs})
        return {"class": class_index, "class_name": adapter.class_names[class_index],
                "neurons": neurons,
                "unimodal_method": params.get("unimodal_method", "integrated_gradients"),
                "interaction_method": (params.get("interaction_method", "second_order")
                                       if len(names) > 1 else None)}


class TinyThree(nn.Module):
    """image + question + tabular "meta" (for the pair menu)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.img = nn.Linear(3 * 8 * 8, 6)
        self.emb = nn.Embedding(len(VOCAB), 4)
        self.txt = nn.Linear(4, 6)
        self.tab = nn.Linear(3, 6)
        self.head = nn.Linear(6, len(CLASSES))

    def forward(self, image, question, meta):
        a = torch.relu(self.img(image.flatten(1)))
        b = torch.tanh(self.txt(self.emb(question).mean(1)))
        c = torch.tanh(self.tab(meta))
        return self.head(a * b + c * a + b)


def tiny_three(n: int = 8):
    """Three modalities and no descriptions (describe(i) is "#i")."""
    adapter = ModelAdapter(TinyThree().eval(), [Image("image", patch=4), Text("question", VOCAB),
                                                Tabular("meta", columns=["a", "b", "c"])],
                           CLASSES)
    rng = np.random.default_rng(2)
    qs = ["what color is the shape", "is the circle red", "what is the shape"]
    ds = MultimodalDataset({"image": [rng.random((8, 8, 3)).astype(np.float32) for _ in range(n)],
                            "question": [qs[i % len(qs)] for i in range(n)],
                            "meta": [rng.normal(size=3).astype(np.float32) for _ in range(n)]},
                           labels=[i % len(CLASSES) for i in range(n)], name="tiny-three")
    return adapter, ds
