"""The embedded default: a small image + question model trained on easy-VQA.

The data comes from the ``easy-vqa`` package (no download): 64x64 RGB pictures of one coloured
shape on a light background, with questions such as "what color is the circle?" and 13 answers.
The model's weights ship in ``demos/weights/easy_vqa.safetensors`` (no pickle), with a JSON file
holding the vocabulary, the answers, the training configuration and the measured test accuracy.

    >>> from multiviz_widgets.demos import easy_vqa
    >>> adapter, dataset = easy_vqa.load("test")       # under 3 s
    >>> dataset[0]                                     # {"image": uint8 [64,64,3], "question": str}

Command line (fixed seeds, 2 threads, about 8 minutes on two cores)::

    python -m multiviz_widgets.demos.easy_vqa train
    python -m multiviz_widgets.demos.easy_vqa evaluate --json
    python -m multiviz_widgets.demos.easy_vqa fit-sparse      # the stage-4 sparse model, about 45 s

The stage-4 sparse linear model of the shipped weights ships beside them
(``weights/easy_vqa_sparse.json``, ``load_sparse_model``), fitted by ``fit_sparse``.

The model (``EasyVQAModel``, 80,941 parameters):

* image encoder: four 3x3 convolutions (stride 2, 2, 2, 1; 16-32-64-64 channels, ReLU; trained
  with batch norm, which the shipped weights fold into the convolutions) -> a spatial map
  [B, 64, 8, 8] (one cell per 8x8 patch);
* question encoder: ``embedding`` (``nn.Embedding``, [PAD] = 0 mapped to the zero vector)
  summed over tokens (so extra [PAD] tokens change nothing, and the all-[PAD] baseline is the
  empty question) and an MLP -> q [B, 64];
* fusion: every cell of the image map is multiplied elementwise by q (a genuine cross-modal
  interaction), mixed by a 1x1 convolution with ReLU and max-pooled over space late (so what
  decides is a place in the picture); with q beside it, an MLP gives the decision vector
  h [B, 64] (ReLU);
* ``classifier``: the one final ``nn.Linear(64, 13)`` decision layer.

Shipped weights: the output of ``train`` with its defaults (seed 0, 10 epochs of batch 64, Adam
with a one-cycle schedule, left-right flips, the first epoch with the best accuracy on held-out
training pictures, here epoch 5; then batch norm folded into the convolutions and the [UNK]
embedding set to zero); 451 s on two cores (torch 2.13.0); test accuracy 0.9998 (9,671 of
9,673; ``seconds`` and ``test_accuracy`` in the JSON). On two cores one forward + backward
takes about 1.0 ms at batch 1 and 13.5 ms at batch 50, a forward of batch 512 about 68 ms
(``benchmarks/easy_vqa_model.py``, ``benchmarks/results/easy_vqa_model.json``).
"""
from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..adapter import ModelAdapter
from ..atomic_file import write_atomically
from ..checks import positive_int
from ..kernels.common import indices_or_all
from ..data import MultimodalDataset, update_hash
from ..modalities import Image, Text

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = WEIGHTS_DIR / "easy_vqa.safetensors"
META_FILE = WEIGHTS_DIR / "easy_vqa.json"
#: The stage-4 sparse linear model of the shipped weights (JSON, ``fit_sparse``).
SPARSE_FILE = WEIGHTS_DIR / "easy_vqa_sparse.json"

#: The 26 words of easy-VQA's questions (lower case, '?' stripped), sorted.
WORDS = ("a black blue brown circle color contain does gray green image in is no not of present "
         "rectangle red shape teal the there triangle what yellow").split()
#: Token ids: [PAD] = 0 (its embedding is the zero vector), [UNK] = 1, then the sorted words.
VOCAB = ["[PAD]", "[UNK]"] + WORDS
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
SPLITS = ("train", "test")
N_TEST_QUESTIONS = 9673

#: The architecture ``train`` fits (batch norm is folded away before saving).
DEFAULT_CONFIG = {"vocab_size": len(VOCAB), "n_answers": 13, "embed_dim": 32, "width": 64,
                  "channels": [16, 32, 64], "norm": True}


class WeightsError(RuntimeError):
    """The shipped weights (or their JSON description) are missing, corrupt or do not fit."""


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
class EasyVQAModel(nn.Module):
    """Image + question -> logits [B, 13]; the decision vector h is the input of ``classifier``.

    forward(image [B, 3, 64, 64] floats in [0, 1], question [B, T] token ids padded with 0).
    ``norm=True`` adds batch norm after each convolution (for training; ``train`` folds it away,
    so the defaults build the shipped architecture).
    Cost on two CPU cores: batch 1 forward + backward about 1 ms; batch 512 forward about 68 ms.
    """

    def __init__(self, vocab_size: int = len(VOCAB), n_answers: int = 13, embed_dim: int = 32,
                 width: int = 64, channels: Sequence[int] = (16, 32, 64), norm: bool = False):
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(3, c1, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, stride=2, padding=1)
        self.conv4 = nn.Conv2d(c3, width, 3, stride=1, padding=1)
        bn = (lambda c: nn.BatchNorm2d(c)) if norm else (lambda c: nn.Identity())
        self.bn1, self.bn2, self.bn3, self.bn4 = bn(c1), bn(c2), bn(c3), bn(width)
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.question_mlp = nn.Sequential(nn.Linear(embed_dim, width), nn.ReLU(),
                                          nn.Linear(width, width))
        self.mix = nn.Conv2d(width, width, 1)
        self.fc = nn.Linear(2 * width, width)
        self.classifier = nn.Linear(width, n_answers)

    @property
    def config(self) -> dict:
        """The constructor arguments (what the JSON beside the weights records)."""
        return {"vocab_size": self.embedding.num_embeddings, "n_answers": self.classifier.out_features,
                "embed_dim": self.embedding.embedding_dim, "width": self.classifier.in_features,
                "channels": [self.conv1.out_channels, self.conv2.out_channels,
                             self.conv3.out_channels],
                "norm": isinstance(self.bn1, nn.BatchNorm2d)}

    def image_map(self, image: torch.Tensor) -> torch.Tensor:
        """The image encoder's spatial map [B, width, H/8, W/8]."""
        x = F.relu(self.bn1(self.conv1(image - 0.5)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return F.relu(self.bn4(self.conv4(x)))

    def question_vector(self, question: torch.Tensor) -> torch.Tensor:
        """The question encoder's vector [B, width] (sum of token embeddings, then an MLP)."""
        return self.question_mlp(self.embedding(question).sum(dim=1))

    def encode_modality(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One modality's encoding (the image map or the question vector). With
        ``fuse_encodings`` it lets EMAP encode each instance once and fuse only the N x N pairs."""
        return self.image_map(x) if name == "image" else self.question_vector(x)

    def fuse_encodings(self, enc: dict) -> torch.Tensor:
        """Logits from the two encodings: the fusion, h and the decision layer."""
        v, q = enc["image"], enc["question"]
        z = F.relu(self.mix(v * q[:, :, None, None]))
        h = F.relu(self.fc(torch.cat([z.amax(dim=(2, 3)), q], dim=1)))
        return self.classifier(h)

    def forward(self, image: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        return self.fuse_encodings({"image": self.encode_modality("image", image),
                                    "question": self.encode_modality("question", question)})


@torch.no_grad()
def fold_batch_norm(model: EasyVQAModel) -> EasyVQAModel:
    """An equivalent model without batch norm (eval-mode statistics folded into the convolutions).

    The shipped model is folded: fewer layers, and no integer buffers in the weights file.
    """
    if not isinstance(model.bn1, nn.BatchNorm2d):
        return copy.deepcopy(model).eval()
    folded = EasyVQAModel(**dict(model.config, norm=False))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("bn")}
    for i in range(1, 5):
        conv, bn = getattr(model, f"conv{i}"), getattr(model, f"bn{i}")
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        state[f"conv{i}.weight"] = conv.weight * scale[:, None, None, None]
        state[f"conv{i}.bias"] = (conv.bias - bn.running_mean) * scale + bn.bias
    folded.load_state_dict(state, strict=True)
    return folded.eval()


@torch.no_grad()
def neutral_unknown_words(model: EasyVQAModel) -> EasyVQAModel:
    """Set the [UNK] embedding to zero, so a word outside the vocabulary changes nothing.

    easy-VQA questions never contain an unknown word, so training leaves [UNK]'s embedding at
    its random start; zero (like [PAD]) makes a typed question with a typo behave sensibly.
    """
    model.embedding.weight[VOCAB.index("[UNK]")] = 0.0
    return model


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
class _ImageColumn:
    """Images indexed per question without copying: item i is images[image_index[i]] (a copy)."""

    def __init__(self, images: np.ndarray, image_index: np.ndarray):
        self.images, self.image_index = images, image_index

    def __len__(self) -> int:
        return len(self.image_index)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.images[self.image_index[int(i)]].copy()


def _frozen(a, dtype=None) -> np.ndarray:
    """``a`` as an array that cannot change in place: itself when it is read-only and owns its
    memory (``load_dataset``'s pictures, shared by the datasets of a split), else a read-only
    copy (a writable array, or a view whose memory another array may write)."""
    arr = np.asarray(a, dtype=dtype)
    if arr.flags.writeable or not arr.flags.owndata:
        arr = arr.copy()
        arr.setflags(write=False)
    return arr


class EasyVQADataset(MultimodalDataset):
    """easy-VQA questions: items {"image": uint8 [64, 64, 3], "question": str}, labels = answers.

    Each picture is stored once (``images`` [n_images, 64, 64, 3]); ``image_index[i]`` is the
    picture of question i. ``answers`` are the class names; ``descriptions`` the questions.
    ``images`` and ``image_index`` are kept read-only (copied unless they are read-only arrays
    that own their memory), so that the remembered fingerprint stays true: an edit of the
    arrays given (``imgs[:] = 255 - imgs``) does not reach the dataset.
    """

    def __init__(self, images: np.ndarray, image_index: np.ndarray, questions: Sequence[str],
                 labels: Sequence[int], answers: Sequence[str], split: str = "test"):
        images = self.images = _frozen(images)
        self.image_index = _frozen(image_index, np.int64)
        # a tuple: the questions cannot change in place, so the remembered fingerprint (and
        # the descriptions, a copy made from them) stay true
        self.questions = tuple(str(q) for q in questions)
        self.answers = list(answers)
        self.split = split
        self._fingerprint: str | None = None
        super().__init__({"image": _ImageColumn(images, self.image_index),
                          "question": self.questions},
                         labels=labels, descriptions=self.questions, name=f"easy-VQA {split}")

    def answer(self, i: int) -> str:
        """The true answer of question i."""
        return self.answers[int(self.labels[int(i)])]

    def kinds(self) -> list[str]:
        """question_kind of every question ("shape", "color" or "yes_no")."""
        return [question_kind(q) for q in self.questions]

    def fingerprint(self) -> str:
        """A hash of the pictures, the picture index, the questions and the labels. The first
        three (~25 ms) are hashed once and remembered: unlike a dataset of the user's lists,
        they cannot change in place (the pictures are read-only, the questions a tuple). The
        labels, which may be replaced (``ds.labels = ...``) or edited, are hashed every time
        (microseconds)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(f"easy-vqa:{self.split}:{self.n}".encode())
            for part in (self.images, self.image_index, list(self.questions)):
                update_hash(h, part)
            self._fingerprint = h.hexdigest()
        h = hashlib.sha256(self._fingerprint.encode())
        if self.labels is not None:
            update_hash(h, self.labels)
        return h.hexdigest()[:32]


@functools.lru_cache(maxsize=2)
def _read_split(split: str):
    """(images uint8 [n, 64, 64, 3] read-only, image_index, questions, answer names) of a split."""
    try:
        import easy_vqa as ev
    except ImportError as e:  # pragma: no cover - declared dependency
        raise ImportError("The easy-VQA demo needs the 'easy-vqa' package: pip install easy-vqa") from e
    from PIL import Image as PILImage

    if split == "train":
        texts, answers, ids = ev.get_train_questions()
        paths = ev.get_train_image_paths()
    else:
        texts, answers, ids = ev.get_test_questions()
        paths = ev.get_test_image_paths()
    order = sorted(paths)
    row = {image_id: r for r, image_id in enumerate(order)}
    images = np.stack([np.asarray(PILImage.open(paths[i]).convert("RGB")) for i in order])
    images.setflags(write=False)
    image_index = np.array([row[i] for i in ids], dtype=np.int64)
    image_index.setflags(write=False)
    return images, image_index, tuple(texts), tuple(answers)


def load_dataset(split: str = "test") -> EasyVQADataset:
    """The easy-VQA split ("train": 38,575 questions, "test": 9,673) as an EasyVQADataset.

    Cost: reading the split's PNG files once per process (about 0.3 s for test), then cached.
    """
    if split not in SPLITS:
        raise ValueError(f"easy-VQA split {split!r} does not exist; use 'train' or 'test'.")
    import easy_vqa as ev

    answer_names = ev.get_answers()
    images, image_index, texts, answers = _read_split(split)
    to_id = {a: i for i, a in enumerate(answer_names)}
    labels = np.array([to_id[a] for a in answers], dtype=np.int64)
    return EasyVQADataset(images, image_index, texts, labels, answer_names, split)


# ---------------------------------------------------------------------------------------------
# Loading the shipped model
# ---------------------------------------------------------------------------------------------
def _retrain_hint() -> str:
    return ("Reinstall the package, or re-create the weights with "
            "`python -m multiviz_widgets.demos.easy_vqa train`.")


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


#: {SHA-256 of a weights file: its tensors}, for the files read so far (a few MB each)
_FILE_WEIGHTS: dict[str, dict[str, torch.Tensor]] = {}


def _same_weights(live: dict, reference: dict) -> bool:
    """Whether a model's state dict holds the reference weights: the same names and shapes,
    and values equal to the reference's cast to the live tensor's dtype (a model moved to
    float64, to half precision or to a GPU keeps its weights; one trained further or edited
    in place does not)."""
    if set(live) != set(reference):
        return False
    for name, ref in reference.items():
        t = live[name].detach().cpu()
        if t.shape != ref.shape or t.is_floating_point() != ref.is_floating_point():
            return False
        if not torch.equal(t, ref.to(t.dtype)):
            return False
    return True


def _file_weights(sha256: str) -> dict | None:
    """The tensors of the weights file whose SHA-256 is ``sha256``: remembered when
    ``load_model`` read it, else read from the shipped file when it is that file (once per
    process); None when no such file is known."""
    if sha256 not in _FILE_WEIGHTS:
        try:
            if _file_sha256(WEIGHTS_FILE) != sha256:
                return None
            from safetensors.torch import load_file
            _FILE_WEIGHTS[sha256] = load_file(str(WEIGHTS_FILE))
        except Exception:  # noqa: BLE001 - unreadable: no reference, said by the caller
            return None
    return _FILE_WEIGHTS[sha256]


def read_meta(meta_path: str | Path | None = None) -> dict:
    """The JSON beside the weights: vocab, answers, config, training settings, test accuracy."""
    path = Path(meta_path) if meta_path is not None else META_FILE
    if not path.is_file():
        raise WeightsError(f"The easy-VQA model description {path} is missing. {_retrain_hint()}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"The easy-VQA model description {path} is not valid JSON ({e}). "
                           f"{_retrain_hint()}") from e
    if not isinstance(meta, dict):
        raise WeightsError(f"The easy-VQA model description {path} must be a JSON object with "
                           f"'config', 'vocab' and 'answers', got a {type(meta).__name__}. "
                           f"{_retrain_hint()}")
    missing = [k for k in ("config", "vocab", "answers") if k not in meta]
    if missing:
        raise WeightsError(f"The easy-VQA model description {path} lacks {missing}. {_retrain_hint()}")
    problem = _meta_problem(meta)
    if problem:
        raise WeightsError(f"The easy-VQA model description {path} does not describe a usable "
                           f"model: {problem}. {_retrain_hint()}")
    return meta


def _meta_problem(meta: dict) -> str | None:
    """What is wrong with the config, vocab and answers of a model description (None: nothing).

    The vocabulary maps words to rows of the embedding and the answers name the classifier's
    outputs, so a list of the wrong length or order would give wrong answers without an error.
    """
    cfg, vocab, answers = meta["config"], meta["vocab"], meta["answers"]
    if not isinstance(cfg, dict):
        return f"'config' must be an object of EasyVQAModel arguments, got {cfg!r}"
    unknown = sorted(set(cfg) - set(DEFAULT_CONFIG))
    if unknown:
        return f"'config' has unknown keys {unknown} (known: {sorted(DEFAULT_CONFIG)})"
    for key in ("vocab_size", "n_answers", "embed_dim", "width"):
        v = cfg.get(key, DEFAULT_CONFIG[key])
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            return f"config[{key!r}] must be a positive integer, got {v!r}"
    ch = cfg.get("channels", DEFAULT_CONFIG["channels"])
    if (not isinstance(ch, (list, tuple)) or len(ch) != 3
            or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in ch)):
        return f"config['channels'] must be a list of 3 positive integers, got {ch!r}"
    if not isinstance(cfg.get("norm", False), bool):
        return f"config['norm'] must be true or false, got {cfg['norm']!r}"
    for key, items, size in (("vocab", vocab, "vocab_size"), ("answers", answers, "n_answers")):
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            return f"{key!r} must be a list of strings"
        if len(set(items)) != len(items):
            return f"{key!r} has repeated entries"
        want = cfg.get(size, DEFAULT_CONFIG[size])
        if len(items) != want:
            return (f"{key!r} has {len(items)} entries but config[{size!r}] is {want} (one per "
                    f"{'row of the embedding' if key == 'vocab' else 'output of the classifier'})")
    if vocab[:2] != ["[PAD]", "[UNK]"]:
        return f"'vocab' must start with '[PAD]' (id 0) and '[UNK]' (id 1), got {vocab[:2]}"
    return None


def question_modality(vocab: Sequence[str] = VOCAB) -> Text:
    """The question modality: one unit per word, [PAD] baseline, gradients through the embedding."""
    return Text("question", vocab=list(vocab), pad_token="[PAD]", unk_token="[UNK]", baseline="pad")


def image_modality() -> Image:
    """The image modality: an 8x8 grid of 8-pixel patches (64 units), white baseline."""
    return Image("image", patch=8, baseline="white")


def load_model(weights_path: str | Path | None = None, meta_path: str | Path | None = None
               ) -> tuple[EasyVQAModel, dict]:
    """(model in eval mode, meta) from the shipped safetensors (or the paths given). No pickle."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    wpath = Path(weights_path) if weights_path is not None else WEIGHTS_FILE
    if wpath.is_dir():                    # the folder train(out_dir=...) wrote
        wpath = wpath / WEIGHTS_FILE.name
    if not wpath.is_file():
        # a path the user gave first: its description is looked for beside it, and "missing
        # description" would name a file they never typed
        raise WeightsError(
            f"There are no easy-VQA weights at {wpath}: check the path (train writes "
            f"{WEIGHTS_FILE.name} and {META_FILE.name} into its --out-dir)."
            if weights_path is not None else
            f"The easy-VQA weights {wpath} are missing. {_retrain_hint()}")
    if meta_path is None:
        meta_path = wpath.with_suffix(".json") if weights_path is not None else META_FILE
    meta = read_meta(meta_path)
    expected, digest = meta.get("weights_sha256"), _file_sha256(wpath)
    if expected and digest != expected:
        raise WeightsError(f"The easy-VQA weights {wpath} are corrupt: their SHA-256 does not match "
                           f"the one recorded in {Path(meta_path).name}. {_retrain_hint()}")
    meta["weights_sha256"] = digest         # what load_sparse_model checks a sparse model by
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"The easy-VQA weights {wpath} cannot be read as safetensors ({e}). "
                           f"{_retrain_hint()}") from e
    bad = [k for k, v in state.items() if not v.is_floating_point()]
    if bad:
        raise WeightsError(f"The easy-VQA weights {wpath} hold non-float tensors {bad} "
                           f"({state[bad[0]].dtype}); the model's parameters are floats. "
                           f"{_retrain_hint()}")
    bad = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise WeightsError(f"The easy-VQA weights {wpath} hold NaN or infinite values in {bad}. "
                           f"{_retrain_hint()}")
    # what a sparse model's check compares with (copies: the model's own may change in place)
    _FILE_WEIGHTS[digest] = {k: v.detach().clone() for k, v in state.items()}
    model = EasyVQAModel(**meta["config"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"The easy-VQA weights {wpath} do not fit the model described in "
                           f"{Path(meta_path).name} ({e}). {_retrain_hint()}") from e
    model.eval()
    return model, meta


def make_adapter(model: EasyVQAModel, vocab: Sequence[str] = VOCAB,
                 answers: Sequence[str] | None = None) -> ModelAdapter:
    """The ModelAdapter of an EasyVQAModel: image (64 patches) and question (words) modalities."""
    if answers is None:
        import easy_vqa as ev
        answers = ev.get_answers()
    return ModelAdapter(model, [image_modality(), question_modality(vocab)],
                        class_names=list(answers), decision_layer=model.classifier,
                        embedding_layers={"question": model.embedding}, name="easy-VQA")


def load_adapter(weights_path: str | Path | None = None, meta_path: str | Path | None = None
                 ) -> ModelAdapter:
    """A ModelAdapter around the shipped easy-VQA model (eval mode), or the weights given; its
    ``weights_sha256`` names the weights file it read. Cost: ~50 ms, no forward."""
    model, meta = load_model(weights_path, meta_path)
    adapter = make_adapter(model, meta["vocab"], meta["answers"])
    adapter.weights_sha256 = meta["weights_sha256"]
    return adapter


def load(split: str = "test") -> tuple[ModelAdapter, EasyVQADataset]:
    """(adapter, dataset): the shipped model and an easy-VQA split. Cost: under 3 s (test)."""
    return load_adapter(), load_dataset(split)


def fit_sparse(out_path: str | Path | None = None, *, n_lambdas: int = 20,
               solver: str = "sklearn", threads: int = 2, max_train: int | None = None,
               cache: bool = True, log: Callable[[str], None] = print):
    """Fit the stage-4 sparse linear model of the shipped model and write it as JSON.

    The decision features of the train split (one forward pass per question, cached on disk),
    the elastic-net path fitted to the model's own predictions (``fit_sparse_model``: sparsity
    chosen on a held-out fifth of train, fixed seed), the fidelity measured on the test split.
    The JSON (``SparseModel.to_dict``, no pickle) records the sha256 of the weights it was fitted
    for, so that ``load_sparse_model`` refuses it beside other weights. ``max_train``: fit on
    the first questions only (for a smoke test); ``cache``: read and write the features' disk
    cache (``extract_features``). Returns the SparseModel. Cost: about 15 s of features (none
    when cached) and about 30 s of fitting on two cores.
    """
    from ..kernels.prediction import fit_sparse_model
    from ..kernels.representations import extract_features
    from ..kernels.prediction import SOLVERS
    threads = positive_int(threads, "threads")
    # the arguments fit_sparse_model checks, checked before the minute of features
    positive_int(n_lambdas, "n_lambdas", minimum=2)
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {list(SOLVERS)}, got {solver!r}.")
    if max_train is not None:
        positive_int(max_train, "max_train")
    path = Path(out_path) if out_path is not None else SPARSE_FILE
    if not path.parent.is_dir():          # said before the minute of work, not after it
        raise OSError(f"The folder {path.parent} does not exist: give a file in an existing "
                      f"folder.")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        adapter = load_adapter()
        train_set, test_set = load_dataset("train"), load_dataset("test")
        idx = None if max_train is None else range(min(positive_int(max_train, "max_train"),
                                                       len(train_set)))
        log("decision features of the train split ...")
        train = extract_features(adapter, train_set, indices=idx, cache=cache)
        log("decision features of the test split ...")
        test = extract_features(adapter, test_set, cache=cache)
        model = fit_sparse_model(train, test=test, class_names=adapter.class_names,
                                 n_lambdas=n_lambdas, solver=solver,
                                 progress=lambda d, t, m: log(f"  path point {d}/{t}"))
    finally:
        torch.set_num_threads(before)
    data = model.to_dict()
    data["weights_sha256"] = _file_sha256(WEIGHTS_FILE)
    text = json.dumps(data, indent=1) + "\n"
    # a temporary file of its own beside the target, renamed once complete: an interrupt
    # leaves the old file (and no partial one), and two runs do not share a name
    write_atomically(path, lambda f: f.write(text), binary=False)
    log(f"wrote {path}: test fidelity {model.test_fidelity:.4f}, non-zero weights "
        f"{model.fraction_nonzero:.3f}, {model.seconds:.1f} s")
    return model


def load_sparse_model(path: str | Path | None = None, adapter: ModelAdapter | None = None):
    """The shipped stage-4 sparse linear model (``fit_sparse``'s JSON), checked against the
    weights it was fitted for (the adapter's, when ``load_adapter`` made it; else the shipped
    file's), against the model's live weights (they must equal that file's tensors: not
    changed in place since loading, nor another model's wrapped with ``make_adapter``) and the
    model's classes and decision width: a WeightsError that says how to refit it otherwise.
    Cost: comparing the model's weights with the file's (well under a millisecond)."""
    from ..kernels.prediction import sparse_model_from_dict
    path = Path(path) if path is not None else SPARSE_FILE
    refit = "Refit it with `python -m multiviz_widgets.demos.easy_vqa fit-sparse`."
    if not path.is_file():
        raise WeightsError(f"The easy-VQA sparse model {path} is missing. {refit}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model = sparse_model_from_dict(data)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
            ValueError) as e:
        raise WeightsError(f"The easy-VQA sparse model {path} is not readable ({e}). "
                           f"{refit}") from e
    adapter = adapter if adapter is not None else load_adapter()
    weights = getattr(adapter, "weights_sha256", None)
    if weights is None:
        try:
            weights = _file_sha256(WEIGHTS_FILE)
        except OSError as e:
            raise WeightsError(f"The easy-VQA weights {WEIGHTS_FILE}, which the sparse model is "
                               f"checked against, cannot be read ({e.strerror or e}). "
                               f"{_retrain_hint()}") from e
    if data.get("weights_sha256") != weights:
        raise WeightsError(f"The easy-VQA sparse model {path} was fitted for other weights than "
                           f"the model's. {refit} (It fits the weights in {WEIGHTS_FILE.parent}; "
                           f"for weights kept elsewhere, fit one on their decision features "
                           f"with multiviz_widgets.kernels.prediction.fit_sparse_model.)")
    # the file names the weights it was fitted for; the model may have changed since it was
    # read (trained further, edited in place) or never have been read from it (make_adapter)
    reference = _file_weights(weights)
    if reference is None or not _same_weights(adapter.model.state_dict(), reference):
        why = ("the weights file it was fitted for cannot be read to compare with"
               if reference is None else
               "the model's weights are not those of the file it was fitted for: changed in "
               "place since they were loaded, or not loaded from it")
        raise WeightsError(f"The easy-VQA sparse model {path} does not fit this model: {why}. "
                           f"Load the model again with load_adapter(), or fit a sparse model "
                           f"on this model's decision features with "
                           f"multiviz_widgets.kernels.prediction.fit_sparse_model.")
    width = adapter.decision_layer.in_features
    if list(model.class_names) != list(adapter.class_names) or model.d != width:
        raise WeightsError(f"The easy-VQA sparse model {path} has {model.n_classes} classes over "
                           f"{model.d} neurons, the model {adapter.n_classes} over {width}. "
                           f"{refit}")
    return model


# ---------------------------------------------------------------------------------------------
# Helpers: ground truth for the relevance checks
# ---------------------------------------------------------------------------------------------
def shape_mask(image, threshold: float = 48.0) -> np.ndarray:
    """Bool [H, W]: the pixels of the picture's shape (the ground truth for relevance mass).

    image: integers 0..255 [H, W, 3] (uint8 or any integer type, a PIL image, nested lists),
    or floats in [0, 1] as [3, H, W] (a model input) or [H, W, 3]; floats above 1 are refused
    (they would be read as far brighter than they are: pass 0..255 values as integers). The
    background colour is the median of the border pixels (easy-VQA backgrounds are light and
    uniform); a pixel belongs to the shape when one of its channels differs from it by more
    than ``threshold`` (on the 0..255 scale).
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim != 3:
        raise ValueError(f"shape_mask needs one RGB image ([H, W, 3] or [3, H, W]), got shape {arr.shape}.")
    if arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = np.moveaxis(arr, 0, -1)
    if arr.shape[-1] != 3:
        raise ValueError(f"shape_mask needs 3 colour channels, got shape {arr.shape}.")
    on_unit_scale = arr.dtype.kind == "f"       # floats in [0, 1]; integers are 0..255
    if on_unit_scale and arr.size and float(np.nanmax(arr)) > 1.0:
        raise ValueError(
            f"shape_mask reads floating images on the 0..1 scale, but this one reaches "
            f"{float(np.nanmax(arr)):g}: divide it by 255, or pass the 0..255 values as "
            f"integers (e.g. arr.astype(np.uint8)).")
    arr = arr.astype(np.float32)
    if on_unit_scale:
        arr = arr * 255.0
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    background = np.median(border, axis=0)
    return np.abs(arr - background).max(axis=-1) > threshold


def question_kind(question: str) -> str:
    """"color" (asks the shape's colour), "shape" (asks which shape) or "yes_no"."""
    words = question.lower().replace("?", " ").split()
    if not words:
        raise ValueError("question_kind needs a question, got an empty string.")
    if words[0] != "what":
        return "yes_no"
    return "color" if "color" in words else "shape"


# ---------------------------------------------------------------------------------------------
# Batched tensors, training and evaluation
# ---------------------------------------------------------------------------------------------
def encode_questions(questions: Sequence[str], modality: Text | None = None) -> torch.Tensor:
    """Token ids [N, T] (padded with [PAD] = 0) of many questions, as the adapter would make them."""
    modality = modality or question_modality()
    return modality.batch([modality.to_tensor(q) for q in questions])


def image_batch(images: np.ndarray) -> torch.Tensor:
    """Model inputs [B, 3, H, W] in [0, 1] from uint8 pictures [B, H, W, 3]."""
    arr = np.asarray(images)
    if not (arr.flags.writeable and arr.flags.c_contiguous):
        arr = np.array(arr)                      # torch wants a writable, contiguous buffer
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def predict(model: nn.Module, dataset: EasyVQADataset, indices: Sequence[int] | None = None,
            batch_size: int = 512, question_ids: torch.Tensor | None = None) -> np.ndarray:
    """Predicted answer indices [N] for the questions ``indices`` (default all; none: an empty
    array). ``model``: an EasyVQAModel (or the ModelAdapter around one). Cost: N forwards."""
    if isinstance(model, ModelAdapter):
        model = model.model
    batch_size = positive_int(batch_size, "batch_size")
    idx = indices_or_all(indices, len(dataset), negative=True)
    if len(idx) == 0:
        return np.zeros(0, dtype=np.int64)
    if question_ids is None:
        question_ids = encode_questions([dataset.questions[i] for i in idx])
        rows = np.arange(len(idx))
    else:
        rows = idx
    # the inputs go where the model lives, the images in its precision
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = weight.device if weight is not None else torch.device("cpu")
    dtype = weight.dtype if weight is not None else torch.float32
    was_training = model.training
    model.eval()
    out = []
    try:
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            img = image_batch(dataset.images[dataset.image_index[chunk]]).to(device, dtype)
            q = question_ids[torch.from_numpy(rows[s:s + batch_size])]
            q = q[:, : max(1, int((q != 0).sum(1).max()))].to(device)
            out.append(model(img, q).argmax(1).cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def accuracy(model: nn.Module, dataset: EasyVQADataset, indices: Sequence[int] | None = None
             ) -> float:
    """Fraction of questions answered correctly. Cost: one forward per question (batched)."""
    idx = indices_or_all(indices, len(dataset), negative=True)
    if len(idx) == 0:
        raise ValueError("accuracy needs at least one question; indices is empty.")
    return float((predict(model, dataset, idx) == dataset.labels[idx]).mean())


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_weights(state: dict, path: str | Path) -> None:
    """Save a state dict as safetensors, byte for byte the same for the same tensors.

    The header's metadata has one key ("format": "pt"): safetensors writes the metadata map in
    a random order, so two keys gave files (and SHA-256s) that differ between identical runs.
    The model's name and configuration are in the JSON beside the weights.
    """
    from safetensors.torch import save_file
    save_file(state, str(path), metadata={"format": "pt"})


def _writable_out_dir(out_dir: str | Path | None) -> Path:
    """The folder train() saves to (default: the package's weights folder), created and checked
    to be writable; an OSError that says to choose --out-dir otherwise."""
    out = Path(out_dir) if out_dir is not None else WEIGHTS_DIR
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as e:
        raise OSError(f"Cannot write the trained weights to {out} ({e.strerror or e}); choose "
                      "a folder you can write with out_dir= (--out-dir on the command line), "
                      "then load it with load_adapter(weights_path=...).") from None
    return out


def _train_config(config) -> dict:
    """DEFAULT_CONFIG updated with ``config``, checked as the loader will check the saved JSON
    (a ValueError that names the problem, before any data is read)."""
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"config must be a dict of EasyVQAModel arguments (e.g. {{'width': 96}}), "
                         f"got {config!r}.")
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    if isinstance(cfg.get("channels"), tuple):
        cfg["channels"] = list(cfg["channels"])
    import easy_vqa as ev
    answers = list(ev.get_answers())
    problem = _meta_problem({"config": cfg, "vocab": list(VOCAB), "answers": answers})
    if problem:
        raise ValueError(f"Cannot train with config {config!r}: {problem} (the vocabulary has "
                         f"{len(VOCAB)} tokens and easy-VQA {len(answers)} answers).")
    return cfg


def train(epochs: int = 10, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
          val_every: int = 10, out_dir: str | Path | None = None, threads: int = 2,
          log: Callable[[str], None] = print, config: dict | None = None,
          max_steps_per_epoch: int | None = None, evaluate_test: bool = True) -> dict:
    """Train EasyVQAModel on the train split with fixed seeds; save safetensors + JSON.

    Pictures whose id is a multiple of ``val_every`` (and their questions) are held out for
    model selection (the best epoch by validation accuracy is kept); the test split is only
    evaluated at the end, for the record. Returns the JSON written beside the weights.
    Cost: epochs x 34,676 forward + backward passes (about 8 minutes on two cores).
    ``max_steps_per_epoch`` cuts epochs short and ``evaluate_test=False`` skips the final test
    pass (both for smoke tests). The arguments are checked first (a ValueError); the caller's
    thread count and random states (torch, numpy, random) are restored afterwards. The weights
    and the JSON are written in full to temporary files and only then renamed over the old pair
    (two renames, so a crash between them would leave new weights beside the old JSON, which the
    loader refuses by its SHA-256 check rather than loading a mismatched pair).
    """
    for name, value, least in (("epochs", epochs, 1), ("batch_size", batch_size, 1),
                               ("val_every", val_every, 2), ("threads", threads, 1),
                               ("seed", seed, 0)):
        positive_int(value, f"{name}" + (" (1 would hold out every picture)"
                                         if name == "val_every" else ""), least)
    if max_steps_per_epoch is not None:
        positive_int(max_steps_per_epoch, "max_steps_per_epoch", 1)
    if (isinstance(lr, bool) or not isinstance(lr, (int, float, np.floating, np.integer))
            or not math.isfinite(lr) or lr <= 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}.")
    cfg = _train_config(config)
    out = _writable_out_dir(out_dir)        # before minutes of training, not after
    threads_before = torch.get_num_threads()
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            return _train(epochs, batch_size, lr, seed, val_every, out, threads, log, cfg,
                          max_steps_per_epoch, evaluate_test)
    finally:
        torch.set_num_threads(threads_before)
        random.setstate(py_state)
        np.random.set_state(np_state)


def _train(epochs, batch_size, lr, seed, val_every, out, threads, log, cfg, max_steps_per_epoch,
           evaluate_test) -> dict:
    """train() after its checks: the training itself, then the files (see train)."""
    torch.set_num_threads(threads)
    _seed_everything(seed)
    start = time.perf_counter()
    ds = load_dataset("train")
    qids = encode_questions(ds.questions)
    image_ids = ds.image_index
    held = (image_ids % val_every) == 0
    train_idx = np.flatnonzero(~held)
    val_idx = np.flatnonzero(held)
    images = torch.from_numpy(np.array(ds.images))                 # uint8 [n, 64, 64, 3]
    labels = torch.from_numpy(ds.labels)
    log(f"easy-VQA: {len(train_idx)} training and {len(val_idx)} validation questions "
        f"({len(ds.images)} pictures), {epochs} epochs of batch {batch_size}")

    model = EasyVQAModel(**cfg)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(train_idx) / batch_size)
    total_steps = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps,
                                                pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    train_t = torch.from_numpy(train_idx)
    best = (-1.0, -1, None)
    history = []
    for epoch in range(epochs):
        model.train()
        perm = train_t[torch.randperm(len(train_t), generator=gen)]
        total_loss, seen = 0.0, 0
        for step, s in enumerate(range(0, len(perm), batch_size)):
            if max_steps_per_epoch is not None and step >= max_steps_per_epoch:
                break
            b = perm[s:s + batch_size]
            img = images[torch.from_numpy(image_ids[b.numpy()])].permute(0, 3, 1, 2).float() / 255.0
            flip = torch.rand(len(b), generator=gen) < 0.5     # mirror left-right: same answer
            img = torch.where(flip[:, None, None, None], img.flip(-1), img)
            q = qids[b]
            loss = F.cross_entropy(model(img, q), labels[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += float(loss.detach()) * len(b)
            seen += len(b)
            if (step + 1) % 100 == 0:
                log(f"  epoch {epoch + 1}/{epochs} step {step + 1}/{steps_per_epoch} "
                    f"loss {total_loss / seen:.4f}")
        val_acc = float((predict(model, ds, val_idx, question_ids=qids) == ds.labels[val_idx]).mean())
        history.append({"epoch": epoch + 1, "train_loss": total_loss / seen, "val_accuracy": val_acc})
        log(f"epoch {epoch + 1}/{epochs}: train loss {total_loss / seen:.4f}, validation accuracy "
            f"{val_acc:.4f} ({time.perf_counter() - start:.0f} s)")
        if val_acc > best[0]:
            best = (val_acc, epoch + 1, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    model = neutral_unknown_words(fold_batch_norm(model.eval()))
    train_seconds = time.perf_counter() - start
    test = load_dataset("test")
    test_acc = accuracy(model, test) if evaluate_test else None
    log(f"kept epoch {best[1]} (validation accuracy {best[0]:.4f}); "
        + (f"test accuracy {test_acc:.4f} on {len(test)} questions; " if evaluate_test else "")
        + f"{train_seconds:.0f} s of training")

    wpath, mpath = out / WEIGHTS_FILE.name, out / META_FILE.name
    # temporary files beside the final ones, renamed once both are complete
    w_tmp, m_tmp = (out / f".{name}.{os.getpid()}.tmp" for name in (wpath.name, mpath.name))
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    import easy_vqa as ev
    meta = {
        "model": "EasyVQAModel",
        "config": model.config,
        "vocab": list(VOCAB),
        "answers": ev.get_answers(),
        "decision_layer": "classifier",
        "decision_features": cfg["width"],
        "training": {"model_config": cfg, "batch_norm_folded": bool(cfg.get("norm")),
                     "unknown_word_embedding": "zero",
                     "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
                     "optimizer": "Adam + OneCycleLR", "augmentation": "random left-right flip",
                     "validation": f"train pictures with id % {val_every} == 0",
                     "train_questions": int(len(train_idx)), "val_questions": int(len(val_idx)),
                     "best_epoch": best[1], "val_accuracy": best[0], "history": history,
                     "seconds": round(train_seconds, 1), "threads": threads,
                     "torch": torch.__version__},
        "test_accuracy": test_acc,
        "n_test": len(test),
    }
    try:
        save_weights(state, w_tmp)
        meta["weights_sha256"] = _file_sha256(w_tmp)
        m_tmp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        os.replace(w_tmp, wpath)
        os.replace(m_tmp, mpath)
    finally:
        for tmp in (w_tmp, m_tmp):
            tmp.unlink(missing_ok=True)
    log(f"saved {wpath} and {mpath}")
    return meta


def evaluate(weights_path: str | Path | None = None, batch_size: int = 512) -> dict:
    """Test accuracy of the shipped model on the full test split (9,673 questions).

    Returns {"test_accuracy", "n", "correct", "per_kind", "seconds", "load_seconds"}.
    Cost: 9,673 forward passes in batches (a second or two).
    """
    t0 = time.perf_counter()
    adapter = load_adapter(weights_path)
    dataset = load_dataset("test")
    load_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    pred = predict(adapter.model, dataset, batch_size=batch_size)
    seconds = time.perf_counter() - t1
    correct = pred == dataset.labels
    kinds = np.array(dataset.kinds())
    per_kind = {k: float(correct[kinds == k].mean()) for k in ("yes_no", "shape", "color")}
    return {"test_accuracy": float(correct.mean()), "n": int(len(dataset)),
            "correct": int(correct.sum()), "per_kind": per_kind,
            "seconds": round(seconds, 3), "load_seconds": round(load_seconds, 3)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multiviz_widgets.demos.easy_vqa",
                                     description="Train or evaluate the embedded easy-VQA model.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train with fixed seeds and save the weights")
    p_train.add_argument("--epochs", type=int, default=10)
    p_train.add_argument("--batch-size", type=int, default=64)
    p_train.add_argument("--lr", type=float, default=3e-3)
    p_train.add_argument("--seed", type=int, default=0)
    p_train.add_argument("--threads", type=int, default=2)
    p_train.add_argument("--config", default=None,
                         help='model options as JSON, e.g. \'{"width": 96, "norm": false}\'')
    p_train.add_argument("--out-dir", default=None,
                         help="folder for easy_vqa.safetensors and easy_vqa.json "
                              "(default: the package's weights folder)")
    p_sparse = sub.add_parser("fit-sparse", help="fit the stage-4 sparse linear model of the "
                                                 "shipped weights and save it as JSON")
    p_sparse.add_argument("--out", default=None, help=f"default: the package's {SPARSE_FILE.name}")
    p_sparse.add_argument("--n-lambdas", type=int, default=20)
    p_sparse.add_argument("--solver", default="sklearn", choices=["sklearn", "glm_saga"])
    p_sparse.add_argument("--threads", type=int, default=2)
    p_eval = sub.add_parser("evaluate", help="test accuracy of the shipped model")
    p_eval.add_argument("--json", action="store_true", help="print one JSON object")
    p_eval.add_argument("--weights", default=None, help="a safetensors file (default: shipped)")
    p_eval.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.command == "train":
        try:
            config = json.loads(args.config) if args.config else None
        except json.JSONDecodeError as e:
            p_train.error(f"--config is not valid JSON ({e}); give an object such as "
                          '\'{"width": 96}\'')
        try:
            train(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                  out_dir=args.out_dir, threads=args.threads, config=config,
                  log=lambda m: print(m, flush=True))
        except (OSError, ValueError) as e:   # a bad argument, a folder it cannot write (checked first)
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    if args.command == "fit-sparse":
        try:
            fit_sparse(args.out, n_lambdas=args.n_lambdas, solver=args.solver,
                       threads=args.threads, log=lambda m: print(m, flush=True))
        except (OSError, ValueError, WeightsError) as e:   # a folder it cannot write, no weights
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        torch.set_num_threads(positive_int(args.threads, "--threads"))
    except ValueError as e:
        p_eval.error(str(e))
    try:
        result = evaluate(args.weights)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        print(f"test accuracy {result['test_accuracy']:.4f} on {result['n']} questions "
              f"(yes/no {result['per_kind']['yes_no']:.4f}, shape {result['per_kind']['shape']:.4f}, "
              f"color {result['per_kind']['color']:.4f}); load {result['load_seconds']:.2f} s, "
              f"evaluation {result['seconds']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
