"""Synthetic ground-truth tasks: tabular + time series with a known (planted) interaction.

Every instance has a tabular row of six clinical-style columns and a 32-step series of three
channels. The series is piecewise constant per 8-step window (plus noise), so each unit
(window x channel) carries one number: its window mean ``s[w, c]``. Units of the series are
numbered ``w * 3 + c`` (the ``TimeSeries`` convention: window-major, channel-minor).

* ``kind="planted"``: the label is ``4 t[glucose] * s[2, respiration] + additive terms > 0``
  (4 = ``INTERACTION_WEIGHT``).
  The model (``PlantedFusion``) is a smooth MLP over both encoders, so it can and does learn the
  product: the one cross-modal interaction is between tabular unit ``PLANTED_UNITS["tabular"]``
  and series unit ``PLANTED_UNITS["series"]``.
* ``kind="additive"``: the label has only the additive terms and the model (``AdditiveFusion``)
  is a late-fusion twin ``f = W [g(tab); h(series)] + b``: no interaction at all, exactly.

Both models have GELU activations (second-order gradients of a ReLU network vanish almost
everywhere) and one final ``nn.Linear(32, 2)`` decision layer (``head``) over a 32-dimensional h.
They train on one thread with fixed seeds, in about 2 to 3 s (planted) and 1 s (additive) of
CPU time, and are cached in memory::

    >>> from multiviz_widgets.demos import synthetic
    >>> adapter, dataset = synthetic.load("planted")        # trains on first use (~2-3 s)
    >>> synthetic.PLANTED_UNITS
    {'tabular': 2, 'series': 7}
"""
from __future__ import annotations

import copy
import functools
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..adapter import ModelAdapter
from ..checks import is_integer, positive_int
from ..data import MultimodalDataset
from ..modalities import Tabular, TimeSeries

KINDS = ("planted", "additive")
SPLITS = ("train", "test")
COLUMNS = ("age", "bmi", "glucose", "blood_pressure", "cholesterol", "heart_rate")
CHANNELS = ("ecg", "respiration", "spo2")
STEPS = 32
WINDOW = 8
N_WINDOWS = STEPS // WINDOW
CLASS_NAMES = ("low risk", "high risk")

#: The planted interaction: tabular column "glucose" x series window 2 (t16-23) of "respiration".
PLANTED_COLUMN = COLUMNS.index("glucose")
PLANTED_WINDOW, PLANTED_CHANNEL = 2, CHANNELS.index("respiration")
PLANTED_UNITS = {"tabular": PLANTED_COLUMN,
                 "series": PLANTED_WINDOW * len(CHANNELS) + PLANTED_CHANNEL}
#: Units with an additive effect on the label (both kinds): {modality: [unit, ...]}.
ADDITIVE_UNITS = {"tabular": [COLUMNS.index("age"), COLUMNS.index("cholesterol")],
                  "series": [0 * len(CHANNELS) + CHANNELS.index("ecg"),
                             3 * len(CHANNELS) + CHANNELS.index("spo2")]}
INTERACTION_WEIGHT = 4.0
ADDITIVE_WEIGHT = 0.35
NOISE = 0.3
N_TRAIN, N_TEST = 3000, 600


def make_data(n: int, seed: int = 0, kind: str = "planted"
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tabular [n, 6], series [n, 32, 3], labels [n]) float32/int64 arrays drawn with ``seed``
    (n: an integer >= 0)."""
    _check_kind(kind)
    n = positive_int(n, "n (the number of instances)", 0)
    rng = np.random.default_rng(seed)
    tab = rng.standard_normal((n, len(COLUMNS))).astype(np.float32)
    levels = rng.standard_normal((n, N_WINDOWS, len(CHANNELS))).astype(np.float32)
    series = (np.repeat(levels, WINDOW, axis=1)
              + NOISE * rng.standard_normal((n, STEPS, len(CHANNELS)))).astype(np.float32)
    means = series.reshape(n, N_WINDOWS, WINDOW, len(CHANNELS)).mean(2)
    flat = means.reshape(n, N_WINDOWS * len(CHANNELS))     # [n, units] in unit order
    t_add, s_add = ADDITIVE_UNITS["tabular"], ADDITIVE_UNITS["series"]
    score = ADDITIVE_WEIGHT * (tab[:, t_add[0]] - tab[:, t_add[1]]
                               + flat[:, s_add[0]] - flat[:, s_add[1]])
    if kind == "planted":
        score = score + INTERACTION_WEIGHT * tab[:, PLANTED_COLUMN] * flat[:, PLANTED_UNITS["series"]]
    labels = (score > 0).astype(np.int64)
    return tab, series, labels


class _EncodeThenFuse(nn.Module):
    """forward = fuse_encodings of the two encodings; subclasses define ``tab_encoder``,
    ``series_encoder`` and ``fuse_encodings`` (which lets EMAP encode each instance once)."""

    def forward(self, tabular: torch.Tensor, series: torch.Tensor) -> torch.Tensor:
        return self.fuse_encodings({"tabular": self.encode_modality("tabular", tabular),
                                    "series": self.encode_modality("series", series)})

    def encode_modality(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One modality's encoding."""
        return self.tab_encoder(x) if name == "tabular" else self.series_encoder(x)


class PlantedFusion(_EncodeThenFuse):
    """Early-fusion MLP: encoders for both modalities, a joint GELU MLP -> h [B, 32] -> ``head``."""

    def __init__(self, n_columns: int = len(COLUMNS), steps: int = STEPS,
                 channels: int = len(CHANNELS), width: int = 64, hidden: int = 32):
        super().__init__()
        self.tab_encoder = nn.Sequential(nn.Linear(n_columns, width), nn.GELU())
        self.series_encoder = nn.Sequential(nn.Flatten(), nn.Linear(steps * channels, width),
                                            nn.GELU())
        self.fusion = nn.Sequential(nn.Linear(2 * width, width), nn.GELU(),
                                    nn.Linear(width, hidden), nn.GELU())
        self.head = nn.Linear(hidden, len(CLASS_NAMES))

    def fuse_encodings(self, enc: dict) -> torch.Tensor:
        return self.head(self.fusion(torch.cat([enc["tabular"], enc["series"]], 1)))


class AdditiveFusion(_EncodeThenFuse):
    """Late fusion: h = [g(tabular) (16); h(series) (16)], logits = ``head``(h): exactly additive."""

    def __init__(self, n_columns: int = len(COLUMNS), steps: int = STEPS,
                 channels: int = len(CHANNELS), width: int = 64, hidden: int = 32):
        super().__init__()
        half = hidden // 2
        self.tab_encoder = nn.Sequential(nn.Linear(n_columns, width), nn.GELU(),
                                         nn.Linear(width, half), nn.GELU())
        self.series_encoder = nn.Sequential(nn.Flatten(), nn.Linear(steps * channels, width),
                                            nn.GELU(), nn.Linear(width, hidden - half), nn.GELU())
        self.head = nn.Linear(hidden, len(CLASS_NAMES))

    def fuse_encodings(self, enc: dict) -> torch.Tensor:
        return self.head(torch.cat([enc["tabular"], enc["series"]], 1))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {list(SPLITS)}.")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"Unknown synthetic task {kind!r}; choose one of {list(KINDS)}.")


def train(kind: str = "planted", seed: int = 0, steps: int = 200, lr: float = 1e-2
          ) -> tuple[nn.Module, dict]:
    """(model in eval mode, {"train_accuracy", "test_accuracy", "steps", "seed"}); cached.

    Full-batch Adam with weight decay on ``N_TRAIN`` instances, on one thread (small matrices
    gain nothing from more, and a busy machine loses a lot): 2 to 3 s of CPU time (planted), 1 s
    (additive). The trained model
    is cached in memory (one entry per kind, seed, steps and lr, however they are passed);
    every call returns its own copy, so that editing a model (or the metrics) never changes
    what a later ``train`` or ``load`` gives. ``train.__wrapped__`` trains without the cache.
    """
    _check_kind(kind)
    model, metrics = _train_cached(kind, positive_int(seed, "seed", 0),
                                   positive_int(steps, "steps", 1), float(lr))
    return copy.deepcopy(model), dict(metrics)


@functools.lru_cache(maxsize=8)
def _train_cached(kind: str, seed: int, steps: int, lr: float) -> tuple[nn.Module, dict]:
    """The training behind ``train``, cached (never hand out its model: train copies it)."""
    return _train(kind, seed, steps, lr)


def _train(kind: str = "planted", seed: int = 0, steps: int = 200, lr: float = 1e-2
           ) -> tuple[nn.Module, dict]:
    """``train`` without the cache (a fresh training)."""
    _check_kind(kind)
    tab, series, labels = make_data(N_TRAIN, seed=seed, kind=kind)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, xt, xs, y = _fit(kind, seed, steps, lr, tab, series, labels)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tt, ts, ty = make_data(N_TEST, seed=seed + 1000, kind=kind)
    with torch.no_grad():
        train_acc = float((model(xt, xs).argmax(1) == y).float().mean())
        test_acc = float((model(torch.from_numpy(tt), torch.from_numpy(ts)).argmax(1)
                          == torch.from_numpy(ty)).float().mean())
    return model, {"kind": kind, "seed": seed, "steps": steps, "train_accuracy": train_acc,
                   "test_accuracy": test_acc}


train.__wrapped__ = _train


def _fit(kind, seed, steps, lr, tab, series, labels):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PlantedFusion() if kind == "planted" else AdditiveFusion()
        xt, xs, y = torch.from_numpy(tab), torch.from_numpy(series), torch.from_numpy(labels)
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        model.train()
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt, xs), y)
            loss.backward()
            opt.step()
            sched.step()
    return model, xt, xs, y


def tabular_modality() -> Tabular:
    return Tabular("tabular", columns=COLUMNS)


def series_modality() -> TimeSeries:
    return TimeSeries("series", window=WINDOW, channels=CHANNELS)


def make_adapter(model: nn.Module, kind: str = "planted") -> ModelAdapter:
    """The ModelAdapter of a synthetic model: modalities "tabular" and "series", decision ``head``."""
    return ModelAdapter(model, [tabular_modality(), series_modality()], CLASS_NAMES,
                        decision_layer=model.head, name=f"synthetic-{kind}")


def make_dataset(split: str = "test", seed: int = 0, kind: str = "planted",
                 n: int | None = None) -> MultimodalDataset:
    """The synthetic instances {"tabular": [6], "series": [32, 3]} with labels and descriptions
    ("true label low risk: glucose +1.68 (standardised), respiration t16-23 -2.43 (window
    mean)": the planted units' values)."""
    _check_split(split)
    n = (N_TRAIN if split == "train" else N_TEST) if n is None else positive_int(n, "n", 1)
    tab, series, labels = make_data(n, seed=seed if split == "train" else seed + 1000, kind=kind)
    s_unit = PLANTED_UNITS["series"]
    means = series.reshape(n, N_WINDOWS, WINDOW, len(CHANNELS)).mean(2).reshape(n, N_WINDOWS * len(CHANNELS))
    descriptions = [
        f"true label {CLASS_NAMES[labels[i]]}: glucose {tab[i, PLANTED_COLUMN]:+.2f} "
        f"(standardised), respiration t16-23 {means[i, s_unit]:+.2f} (window mean)"
        for i in range(n)]
    return MultimodalDataset({"tabular": list(tab), "series": list(series)}, labels=labels,
                             descriptions=descriptions, name=f"synthetic-{kind}-{split}")


def load(kind: str = "planted", split: str = "test", seed: int = 0
         ) -> tuple[ModelAdapter, MultimodalDataset]:
    """(adapter, dataset) of a synthetic task; the model trains on first use (2 to 3 s).
    The adapter wraps its own copy of the cached model."""
    _check_kind(kind)
    _check_split(split)
    model, _ = train(kind, seed)
    return make_adapter(model, kind), make_dataset(split, seed=seed, kind=kind)


def info(kind: str = "planted", seed: int = 0) -> dict:
    """Training metrics of a synthetic model, plus the ground truth (planted and additive units)."""
    _, metrics = train(kind, seed)
    return {**metrics, "planted_units": dict(PLANTED_UNITS) if kind == "planted" else None,
            "additive_units": {k: list(v) for k, v in ADDITIVE_UNITS.items()}}


def unit_names(units: Sequence[int], modality: str) -> list[str]:
    """Readable names of units of "tabular" or "series" (e.g. 'respiration t16-23').

    units: unit numbers, 0..5 (tabular) or 0..11 (series); others are a ValueError."""
    n_units = {"tabular": len(COLUMNS), "series": N_WINDOWS * len(CHANNELS)}.get(modality)
    if n_units is not None:
        units = list(units)
        bad = [u for u in units if not is_integer(u) or not 0 <= int(u) < n_units]
        if bad:
            raise ValueError(f"{modality} units are numbered 0..{n_units - 1}, got {bad[0]!r}.")
        units = [int(u) for u in units]
    if modality == "tabular":
        return [COLUMNS[u] for u in units]
    if modality == "series":
        return [f"{CHANNELS[u % len(CHANNELS)]} t{(u // len(CHANNELS)) * WINDOW}-"
                f"{(u // len(CHANNELS) + 1) * WINDOW - 1}" for u in units]
    raise ValueError(f"Unknown modality {modality!r}; the synthetic tasks have 'tabular' and 'series'.")
