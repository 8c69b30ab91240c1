"""Stage 4: multimodal prediction, a sparse linear model over the decision features.

``fit_sparse_model`` fits y = softmax(W z + b) on the *standardised* decision features
z = (h - mean) / std with the elastic net

    (1/n) sum_n CE(y_n, W z_n + b) + lambda (alpha |W|_1 + (1 - alpha)/2 |W|_F^2),

over a warm-started regularisation path from lambda_max (all weights zero) down to
eps * lambda_max, where lambda_max = max_{j,c} |sum_n z_nj (1[y_n = c] - ybar_c)| / (n alpha).
By default it is fit to the *model's own predictions*, so its accuracy is its *fidelity* to the
model. The sparsity level is chosen on validation data: the sparsest point of the path whose
validation fidelity is within ``tolerance`` (1 point) of the best, never a fixed path index.

Solver: scikit-learn's SAGA (``LogisticRegression(solver="saga", l1_ratio=alpha)``, warm-started
along the path) is the default: well kept, deterministic for a seed, exact zeros, and on
easy-VQA (30,860 x 64 features, 13 classes) the fastest of those tried. glm-saga (the original
MultiViz solver) stays available as ``solver="glm_saga"``: its stopping rule (the change of one
mini-batch step) rarely fires, so it runs its full epoch budget per lambda in a Python loop and
was several times slower; a full-batch proximal gradient (FISTA) was slower still on these
ill-conditioned features. Either solver stops short of the optimum (SAGA at tol=1e-3 left the
shipped easy-VQA model 5 extra non-zero weights, the dense end of the path 4 times the
optimum's), so each point is then polished to the KKT conditions of the objective above
(``kkt_violation``, ``kkt_tol``): L-BFGS-B over the support and the weights that violate them,
about 1 s a point on easy-VQA where SAGA at tol=1e-4 took 30 s for the chosen point alone.

``prediction_path`` builds the path view's plain data: class <- top neurons by weight x
activation <- each neuron's top units (stage 1 targeted at the neuron) and top cross-modal pairs
(stage 2 targeted at the neuron).
"""
from __future__ import annotations

import numbers
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..notices import warn
from ..adapter import ModelAdapter, Neuron, host_array
from ..progress import ProgressFn, duration_words, report
from ..checks import is_integer, positive_int
from .common import as_prepared, modality_pair
from .representations import Features, decision_contributions

SOLVERS = ("sklearn", "glm_saga")
#: A neuron whose standard deviation over the training set is at most this many rounding
#: steps of its mean (``rounding_step``: 1.2e-7 of a value in float32) counts as constant: the
#: same activation computed in batches of other sizes spreads by a step or so.
CONSTANT_ROUNDING_STEPS = 8

FLOAT32_STEP = 2.0 ** -23


def rounding_step(h, model_dtype: bool = False) -> float:
    """The relative rounding step (machine epsilon) of the features ``h``: their dtype's
    (a float16 or bfloat16 model's is coarser), never below float32's, since features handed
    over as float64 are often a float32 model's converted (and lists or integers have none),
    unless ``model_dtype`` says that ``h`` is in the model's own dtype (``Features`` from
    ``extract_features``: float64 only for a float64 model, whose finer step then counts).
    ``extract_features`` keeps a half-precision model's features as float32: fit on
    (h, y) with h in the model's dtype for its coarser step to count."""
    dtype = getattr(h, "dtype", None)
    if dtype is None:                        # a list: no dtype of its own (np.dtype(None)
        eps = 0.0                            # is float64, and np.finfo(None) is deprecated)
    elif isinstance(dtype, torch.dtype):
        eps = float(torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0
    else:
        try:
            eps = float(np.finfo(dtype).eps) if np.dtype(dtype).kind == "f" else 0.0
        except TypeError:
            eps = 0.0
    return eps if model_dtype and eps > 0 else max(eps, FLOAT32_STEP)


# ------------------------------------------------------------------------------------------------
# the sparse model
# ------------------------------------------------------------------------------------------------
@dataclass
class SparseModel:
    """A sparse linear model over standardised decision features, with its regularisation path.

    weight [C, d] and bias [C] act on z = (h - mean) / std. ``path_*`` hold every point of the path
    (lambda, non-zeros, validation and test fidelity); ``chosen`` is the point selected by the
    validation rule. Classes absent from the training targets get weight 0 and bias -inf
    (``absent_classes``; the repr names them, and ``fit_sparse_model`` warns of them). A
    constant (dead) neuron has std = inf: its z is 0, so it never enters the model.
    """

    weight: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    class_names: list[str]
    alpha: float
    lam: float
    chosen: int
    path_lambdas: np.ndarray            # [K]
    path_nonzeros: np.ndarray           # [K] non-zero weights in total
    path_val_fidelity: np.ndarray       # [K]
    path_test_fidelity: np.ndarray | None = None   # [K] when test data was given
    path_weights: np.ndarray | None = None         # [K, C, d]
    path_biases: np.ndarray | None = None          # [K, C]
    val_fidelity: float = float("nan")
    test_fidelity: float | None = None
    tolerance: float = 0.01
    fit_to: str = "predictions"
    solver: str = "sklearn"
    n_train: int = 0
    n_val: int = 0
    n_test: int = 0
    seconds: float = 0.0
    params: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        test = "" if self.test_fidelity is None else f", test fidelity {self.test_fidelity:.3f}"
        absent = self.absent_classes
        if absent:
            listed = ", ".join(repr(c) for c in absent[:3]) + (", ..." if len(absent) > 3 else "")
            absent = f" ({len(absent)} never in the training targets, never predicted: {listed})"
        return (f"SparseModel({self.n_classes} classes{absent or ''} x {self.d} features, "
                f"{int(self.nonzeros_per_class.sum())} non-zero weights "
                f"({self.fraction_nonzero:.1%}), "
                f"lambda {self.lam:.3g} (path point {self.chosen} of {len(self.path_lambdas)}), "
                f"validation fidelity {self.val_fidelity:.3f}{test}, fit to {self.fit_to})")

    # -- shape and sparsity ----------------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def d(self) -> int:
        return int(self.weight.shape[1])

    @property
    def absent_classes(self) -> list[str]:
        """Names of the classes that never occurred in the training targets: no weights, bias
        -inf, never predicted (``fit_sparse_model`` warns of them)."""
        return [str(self.class_names[c]) for c in np.flatnonzero(np.isneginf(self.bias))]

    @property
    def nonzeros_per_class(self) -> np.ndarray:
        """Non-zero weights of each class [C]."""
        return (self.weight != 0).sum(1)

    @property
    def fraction_nonzero(self) -> float:
        """Non-zero weights / all weights of the chosen model."""
        return float((self.weight != 0).mean())

    # -- prediction ------------------------------------------------------------------------------
    def standardise(self, h) -> np.ndarray:
        """z = (h - mean) / std for features h [N, d]; a ValueError for rows that are not
        finite (their class would be an argmax of NaN: class 0, silently)."""
        h = _finite(_as_2d(h, self.d))
        return (h - self.mean) / self.std

    def decision_function(self, h) -> np.ndarray:
        """Logits [N, C] of the sparse model for decision features h [N, d] (no model pass)."""
        return self.standardise(h) @ self.weight.T + self.bias

    def predict(self, h) -> np.ndarray:
        """Predicted class [N] for decision features h [N, d]."""
        return self.decision_function(h).argmax(1)

    def fidelity(self, h, y) -> float:
        """Share of instances on which the sparse model's class equals ``y`` (e.g. the model's):
        class indices [N] or logits [N, C] (their argmax), one per row of h [N, d]."""
        h = _finite(_as_2d(h, self.d))
        y = _targets(y, "fidelity")
        if len(y) != len(h):
            raise ValueError(f"fidelity: {len(h)} feature rows but {len(y)} targets; pass one "
                             "class index (or one row of logits) per instance.")
        if len(y) == 0:
            raise ValueError("fidelity of no instances is undefined; pass at least one.")
        return float((self.predict(h) == y).mean())

    def curve(self) -> dict[str, list]:
        """The fidelity-vs-non-zeros curve of the path (plain lists)."""
        out = {"lambda": self.path_lambdas.tolist(), "nonzeros": self.path_nonzeros.tolist(),
               "val_fidelity": self.path_val_fidelity.tolist()}
        if self.path_test_fidelity is not None:
            out["test_fidelity"] = self.path_test_fidelity.tolist()
        return out

    def top_weights(self, c: int, k: int = 10) -> list[tuple[int, float]]:
        """The k (neuron, weight) of class c with the largest |weight| (non-zero only).
        c is a class index in 0..C-1 (a negative one raises, it does not count from the end)."""
        if not is_integer(c) or not 0 <= c < self.n_classes:
            raise IndexError(f"c must be a class index in 0..{self.n_classes - 1}, got {c!r}.")
        k = positive_int(k, "k (weights to list)", minimum=0)
        w = self.weight[c]
        order = [j for j in np.argsort(-np.abs(w), kind="stable") if w[j] != 0][:k]
        return [(int(j), float(w[j])) for j in order]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able plain data: weights, standardisation, the chosen point and the whole curve."""
        return {
            "class_names": list(self.class_names),
            "weight": self.weight.tolist(),
            "bias": [float(b) if np.isfinite(b) else None for b in self.bias],
            "mean": self.mean.tolist(),
            "std": [float(v) if np.isfinite(v) else None for v in self.std],   # None: constant
            "alpha": float(self.alpha), "lambda": float(self.lam), "chosen": int(self.chosen),
            "val_fidelity": float(self.val_fidelity),
            "test_fidelity": None if self.test_fidelity is None else float(self.test_fidelity),
            "nonzeros_per_class": self.nonzeros_per_class.tolist(),
            "fraction_nonzero": self.fraction_nonzero,
            "tolerance": float(self.tolerance), "fit_to": self.fit_to, "solver": self.solver,
            "n_train": int(self.n_train), "n_val": int(self.n_val), "n_test": int(self.n_test),
            "seconds": float(self.seconds), "params": dict(self.params),
            "curve": self.curve(),
        }


def check_sparse_model(value, where: str = "sparse_model"):
    """``value`` when it is a SparseModel (or None); else a TypeError that says how to get one:
    its ``to_dict()`` read back (from JSON) is rebuilt with ``sparse_model_from_dict``, a saved
    file is read first."""
    if value is None or isinstance(value, SparseModel):
        return value
    load = "multiviz_widgets.kernels.prediction.sparse_model_from_dict"
    if isinstance(value, Mapping):
        how = (f"it is a dict, as SparseModel.to_dict() (saved as JSON) gives: pass "
               f"{load}(that dict) instead")
    elif isinstance(value, (str, bytes, os.PathLike)):
        how = (f"it is the path {value!r}: read the file and pass "
               f"{load}(json.load(open(path)))")
    else:
        how = f"got {type(value).__name__} ({load} rebuilds one from its to_dict())"
    raise TypeError(f"{where} must be a SparseModel (from fit_sparse_model or "
                    f"fit_sparse_model_for), or None for the decision layer; {how}.")


def sparse_model_from_dict(data: dict[str, Any]) -> SparseModel:
    """Rebuild a SparseModel from ``SparseModel.to_dict()`` (the path weights are not kept)."""
    curve = data["curve"]
    bias = np.array([-np.inf if b is None else b for b in data["bias"]], dtype=np.float64)
    return SparseModel(
        weight=np.asarray(data["weight"], dtype=np.float64), bias=bias,
        mean=np.asarray(data["mean"], dtype=np.float64),
        std=np.array([np.inf if v is None else v for v in data["std"]], dtype=np.float64),
        class_names=list(data["class_names"]),
        alpha=float(data["alpha"]), lam=float(data["lambda"]), chosen=int(data["chosen"]),
        path_lambdas=np.asarray(curve["lambda"], dtype=np.float64),
        path_nonzeros=np.asarray(curve["nonzeros"], dtype=np.int64),
        path_val_fidelity=np.asarray(curve["val_fidelity"], dtype=np.float64),
        path_test_fidelity=(np.asarray(curve["test_fidelity"], dtype=np.float64)
                            if "test_fidelity" in curve else None),
        val_fidelity=float(data["val_fidelity"]), test_fidelity=data.get("test_fidelity"),
        tolerance=float(data["tolerance"]), fit_to=data["fit_to"], solver=data["solver"],
        n_train=int(data["n_train"]), n_val=int(data["n_val"]), n_test=int(data["n_test"]),
        seconds=float(data["seconds"]), params=dict(data.get("params", {})))


def _as_2d(h, d: int | None = None) -> np.ndarray:
    if isinstance(h, torch.Tensor):
        h = host_array(h)
    h = np.asarray(h, dtype=np.float64)
    if h.ndim == 1:
        h = h[None]
    if h.ndim != 2:
        raise ValueError(f"Decision features must be [N, d], got shape {h.shape}.")
    if d is not None and h.shape[1] != d:
        raise ValueError(f"The features have {h.shape[1]} columns but the sparse model was fit on "
                         f"{d} decision features.")
    return h


def _finite(h: np.ndarray, what: str | None = None) -> np.ndarray:
    """h [N, d], or a ValueError naming its rows that hold NaN or infinity: rows to classify,
    or, with ``what``, the rows of the split the caller gave for fitting ("train")."""
    bad = np.nonzero(~np.isfinite(h).all(1))[0] if h.ndim == 2 and len(h) else []
    if len(bad) and what is not None:
        raise ValueError(
            f"The {what} features contain NaN or infinity in {len(bad)} row(s) (rows "
            f"{bad[:10].tolist()}{', ...' if len(bad) > 10 else ''} of {what}); check the model on "
            "those instances, or leave them out.")
    if len(bad):
        rows = ", ".join(str(int(r)) for r in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise ValueError(f"The decision features of {len(bad)} of the {len(h)} rows are not "
                         f"finite (NaN or infinity; rows {rows}): the sparse model cannot "
                         f"classify them. Leave those instances out, or check the model's "
                         f"forward on them.")
    return h


def _split_data(data, what: str, fit_to: str) -> tuple[np.ndarray, np.ndarray]:
    """(h [N, d], targets [N]) from Features or an (h, y) pair; features that are not finite
    are refused here, with their rows as the caller numbers them (before any random split)."""
    if isinstance(data, Features):
        if fit_to == "labels":
            raise ValueError(f"fit_to='labels' needs the true labels: pass {what}=(features.h, "
                             "labels) instead of a Features object.")
        return _finite(_as_2d(data.h), what), data.predictions.astype(np.int64)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        h, y = data
        y = _targets(y, what)
        if np.ndim(h) == 1 and len(y) != 1:
            raise ValueError(f"{what}: the features must be [N, d] (one row per instance), got "
                             f"shape {np.shape(h)} beside {len(y)} targets; for one feature "
                             "(a single neuron), pass h[:, None].")
        h = _finite(_as_2d(h), what)
        if len(y) != len(h):
            raise ValueError(f"{what}: {len(h)} feature rows but {len(y)} targets.")
        return h, y
    raise TypeError(f"{what} must be Features (from extract_features) or a pair (h [N, d], y [N] "
                    f"or logits [N, C]), got {type(data).__name__}.")


def _targets(y, what: str) -> np.ndarray:
    """Integer class targets [N] from class indices [N] or logits [N, C] (their argmax), checked:
    strings, fractional or non-finite numbers and a column [N, 1] are refused, never coerced."""
    if isinstance(y, torch.Tensor):
        y = host_array(y)
    y = np.asarray(y)
    if y.dtype.kind in "US" or (y.dtype.kind == "O" and any(isinstance(v, (str, bytes))
                                                         for v in y.ravel())):
        raise TypeError(f"{what} targets are strings; targets are integer class indices 0..C-1. "
                        "Map class names to indices first, e.g. y = [class_names.index(s) for s "
                        "in labels], and pass class_names=class_names.")
    if y.dtype.kind not in "biuf":
        try:
            y = y.astype(np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{what} targets must be integer class indices [N] or logits [N, C], "
                            f"got values of dtype {y.dtype}.") from None
    if y.ndim == 2 and y.shape[1] == 1:
        raise ValueError(f"{what} targets have shape {y.shape}, a column of labels: pass a 1-D "
                         "array of class indices (y.ravel()), or logits [N, C] with one column "
                         "per class.")
    if y.ndim not in (1, 2):
        raise ValueError(f"{what} targets must be class indices [N] or logits [N, C], got shape "
                         f"{y.shape}.")
    if not np.isfinite(y).all():
        raise ValueError(f"{what} targets contain NaN or infinity at rows "
                         f"{np.where(~np.isfinite(y.reshape(len(y), -1)).all(1))[0][:10].tolist()}; "
                         "every instance needs a class index (or finite logits).")
    if y.ndim == 2:          # logits: fit to their argmax
        return y.argmax(1).astype(np.int64)
    if y.dtype.kind == "f" and (y != np.round(y)).any():
        bad = y[y != np.round(y)]
        raise ValueError(f"{what} targets must be whole class indices, got fractional values such "
                         f"as {bad[:3].tolist()}; they are refused rather than truncated.")
    return y.astype(np.int64)


def _check_classes(y: np.ndarray, what: str, n_classes: int, named: bool) -> None:
    """Raise ValueError unless every target is a class index in 0..n_classes-1."""
    bad = (y < 0) | (y >= n_classes)
    if bad.any():
        hint = (f"class_names has {n_classes} names" if named else
                "a negative value is not a class; drop unlabelled instances first")
        raise ValueError(f"{what} targets must be class indices in 0..{n_classes - 1} ({hint}); "
                         f"got {sorted(set(y[bad].tolist()))[:5]} at rows "
                         f"{np.where(bad)[0][:10].tolist()}.")


def lambda_max(z: np.ndarray, y: np.ndarray, n_classes: int, alpha: float) -> float:
    """The smallest lambda at which every weight is zero, for standardised z."""
    onehot = np.eye(n_classes)[y]
    return float(np.abs(z.T @ (onehot - onehot.mean(0))).max() / (len(z) * alpha))


# -- solvers: each yields (W [C_present, d], b [C_present]) per lambda, warm-started ----------------
def _check_sklearn(version: str) -> None:
    """An ImportError unless scikit-learn is 1.8 or newer: before 1.8 its LogisticRegression
    ignores ``l1_ratio`` unless ``penalty="elasticnet"`` is named, so every fit of the path
    would be a dense L2 fit, silently."""
    major, minor = (int("".join(ch for ch in part if ch.isdigit()) or 0)
                    for part in (version.split(".") + ["0"])[:2])
    if (major, minor) < (1, 8):
        raise ImportError(f"the sparse model's path needs scikit-learn >= 1.8 (found {version}, "
                          f"whose LogisticRegression ignores l1_ratio): pip install -U "
                          f"'scikit-learn>=1.8', or use solver='glm_saga'.")


def _path_sklearn(z, y, lams, alpha, tol, max_iter, seed):
    import sklearn
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    _check_sklearn(sklearn.__version__)
    n = len(z)
    classes = np.unique(y)
    binary = len(classes) == 2
    # scikit-learn penalises its one binary logit s = v z with |v|_1 and |v|^2; the softmax rows
    # (-v/2, v/2) it stands for carry |v|_1 and |v|^2 / 2, so the L2 part is halved (a rescaled
    # lambda and L1 share): the binary fit then minimises the documented objective too
    scale, ratio = ((alpha + (1 - alpha) / 2, alpha / (alpha + (1 - alpha) / 2)) if binary
                    else (1.0, alpha))
    clf = LogisticRegression(C=1.0 / (lams[0] * scale * n), l1_ratio=ratio, solver="saga",
                             warm_start=True, tol=tol, max_iter=max_iter, random_state=seed)
    # Start from the exact solution at lambda_max: W = 0, b = log class frequencies.
    freq = np.bincount(np.searchsorted(classes, y), minlength=len(classes)) / n
    logf = np.log(freq)
    if binary:   # scikit-learn fits one logit s = w z + b: the softmax rows are (-s/2, s/2)
        clf.coef_ = np.zeros((1, z.shape[1]))
        clf.intercept_ = np.array([logf[1] - logf[0]])
    else:
        clf.coef_ = np.zeros((len(classes), z.shape[1]))
        clf.intercept_ = logf - logf.mean()
    clf.classes_ = classes
    for lam in lams:
        clf.set_params(C=1.0 / (lam * scale * n))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(z, y)
        if binary:
            w, b = clf.coef_[0] / 2, clf.intercept_[0] / 2
            yield np.stack([-w, w]), np.array([-b, b])
        else:
            yield clf.coef_.copy(), clf.intercept_.copy()


def _path_glm_saga(z, y, lams, alpha, tol, max_iter, seed, batch_size=1024, lr=0.1):
    from glm_saga.elasticnet import IndexedTensorDataset, train_saga
    from torch.utils.data import DataLoader
    classes, yi = np.unique(y, return_inverse=True)
    g = torch.Generator().manual_seed(seed)
    zt = torch.tensor(z, dtype=torch.float32)
    loader = DataLoader(IndexedTensorDataset(zt, torch.tensor(yi)), batch_size=batch_size,
                        shuffle=True, generator=g)
    linear = torch.nn.Linear(z.shape[1], len(classes))
    freq = np.bincount(yi, minlength=len(classes)) / len(yi)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.tensor(np.log(freq) - np.log(freq).mean()))
    state = None
    for lam in lams:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = train_saga(linear, loader, lr, max_iter, float(lam), alpha, group=False,
                               state=state, n_ex=len(z), n_classes=len(classes), tol=tol,
                               logger=lambda *a, **k: None)
        yield (linear.weight.detach().double().numpy().copy(),
               linear.bias.detach().double().numpy().copy())


# -- optimality: the KKT conditions of the elastic net, and a polish that meets them ---------
def _smooth_grads(z, yi, W, b, lam, alpha):
    """Gradients (G [C, d], g_b [C]) of the smooth part (1/n) sum CE + lam (1 - alpha)/2 |W|^2 at
    (W, b), for z [n, d] and class indices yi [n] in 0..C-1, and the mean cross-entropy."""
    from scipy.special import logsumexp
    n = len(z)
    s = z @ W.T + b
    lse = logsumexp(s, axis=1)
    ce = float((lse - s[np.arange(n), yi]).mean())
    p = np.exp(s - lse[:, None])
    p[np.arange(n), yi] -= 1.0
    return p.T @ z / n + lam * (1 - alpha) * W, p.sum(0) / n, ce


def kkt_violation(z, y, W, b, lam: float, alpha: float) -> float:
    """How far (W, b) is from the optimum of the elastic net that ``fit_sparse_model`` states,
    (1/n) sum CE(y_n, W z_n + b) + lam (alpha |W|_1 + (1 - alpha)/2 |W|_F^2), in units of
    lam * alpha: with G the gradient of the smooth part, the largest of |G + lam alpha sign(W)|
    over non-zero weights, max(|G| - lam alpha, 0) over zero ones and |gradient of b| (the
    bias is not penalised), divided by lam * alpha. 0 at the optimum exactly.

    z [n, d]: standardised features; y [n]: class indices 0..C-1; W [C, d], b [C]: the softmax
    rows of every class that occurs in y (the binary fit's rows (-v/2, v/2) are such rows: their
    CE gradients are opposite, so this measures the documented objective in v too)."""
    W = np.asarray(W, dtype=np.float64)
    G, gb, _ = _smooth_grads(z, np.asarray(y), W, np.asarray(b, dtype=np.float64), lam, alpha)
    return _violation(G, gb, W, lam * alpha)


def _violation(G, gb, W, t) -> float:
    """``kkt_violation`` from the smooth part's gradients (G, gb) at W, with t = lam alpha."""
    v = np.where(W != 0, np.abs(G + t * np.sign(W)), np.maximum(np.abs(G) - t, 0.0))
    return float(max(v.max(initial=0.0), np.abs(gb).max(initial=0.0)) / t)


def _polish(z, yi, W, b, lam, alpha, kkt_tol, max_iter):
    """(W, b, violation, iterations, note): (W, b) moved to the optimum of the elastic net at lam
    until ``kkt_violation`` <= kkt_tol, by L-BFGS-B on W = W+ - W- (W+, W- >= 0, which makes the
    L1 term linear and keeps exact zeros at the bounds) over a working set: the non-zero weights
    and the zero ones whose KKT condition fails, grown until no zero one fails (each round
    lowers the objective: a zero weight that fails is a direction of descent). L-BFGS-B's
    stopping rule (largest projected gradient) is then the KKT violation itself. Iterations are
    capped at ``max_iter`` in all; note says why it stopped when it did not get there."""
    from scipy.optimize import minimize
    t = lam * alpha
    C = W.shape[0]
    W, b = W.astype(np.float64).copy(), b.astype(np.float64).copy()
    used = 0
    while True:
        G, gb, ce = _smooth_grads(z, yi, W, b, lam, alpha)
        viol = _violation(G, gb, W, t)
        if viol <= kkt_tol:
            return W, b, viol, used, ""
        if used >= max_iter:
            return W, b, viol, used, f"polish_max_iter={max_iter} L-BFGS-B iterations ran out"
        obj = ce + t * np.abs(W).sum() + lam * (1 - alpha) / 2 * float((W ** 2).sum())
        active = (W != 0) | (np.abs(G) > t)
        cols = np.flatnonzero(active.any(0))
        act = active[:, cols]
        zc = np.ascontiguousarray(z[:, cols])
        k = int(act.sum())

        def f(x, act=act, zc=zc, k=k):
            Wc = np.zeros(act.shape)
            Wc[act] = x[:k] - x[k:2 * k]
            Gc, gbc, ce = _smooth_grads(zc, yi, Wc, x[2 * k:], lam, alpha)
            val = ce + t * x[:2 * k].sum() + lam * (1 - alpha) / 2 * float((Wc ** 2).sum())
            return val, np.concatenate([Gc[act] + t, t - Gc[act], gbc])

        wa = W[:, cols][act]
        x0 = np.concatenate([np.maximum(wa, 0), np.maximum(-wa, 0), b])
        res = minimize(f, x0, jac=True, method="L-BFGS-B",
                       bounds=[(0, None)] * (2 * k) + [(None, None)] * C,
                       options={"maxiter": max_iter - used, "maxfun": 2 * (max_iter - used) + 20,
                                "gtol": 0.5 * kkt_tol * t, "ftol": 0.0, "maxcor": 20})
        used += int(res.nit)
        if not res.fun < obj - 4 * np.finfo(float).eps * max(1.0, abs(obj)):
            # no lower objective: float64 rounding, not the iteration count, stops it here
            return W, b, viol, used, (f"L-BFGS-B found no lower objective after {used} "
                                      f"iterations ({res.message}): float64 rounding")
        Wc = np.zeros(act.shape)
        Wc[act] = res.x[:k] - res.x[k:2 * k]
        W[:, cols] = Wc
        b = res.x[2 * k:].copy()


def choose_sparsity(nonzeros: Sequence[int], val_fidelity: Sequence[float],
                    tolerance: float = 0.01) -> int:
    """The path index of the sparsest model whose validation fidelity is within ``tolerance`` of
    the best (ties: the stronger regularisation, i.e. the earlier point)."""
    nz = np.asarray(nonzeros)
    fid = np.asarray(val_fidelity, dtype=np.float64)
    if len(nz) == 0 or len(nz) != len(fid):
        raise ValueError("choose_sparsity needs one fidelity per path point (and at least one).")
    ok = np.where(fid >= fid.max() - tolerance - 1e-12)[0]
    return int(ok[np.lexsort((ok, nz[ok]))[0]])


def choose_covering(nonzeros: Sequence[int], val_fidelity: Sequence[float],
                    covers: Sequence[bool], tolerance: float = 0.01) -> int:
    """``choose_sparsity`` among the path points that predict every class of the training
    targets (``covers``: on the training and validation data), when any does; else among all
    points. Plain
    fidelity (accuracy) alone chose, on a task where 1% of the targets are one class, the
    all-zero model that never predicts it: 0.99 is within 0.01 of the best."""
    ok = np.flatnonzero(np.asarray(covers, dtype=bool))
    if len(ok) == 0:
        return choose_sparsity(nonzeros, val_fidelity, tolerance)
    nz, fid = np.asarray(nonzeros)[ok], np.asarray(val_fidelity, dtype=np.float64)[ok]
    return int(ok[choose_sparsity(nz, fid, tolerance)])


def _validation_split(y: np.ndarray, val_fraction: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows) of a random split holding out ``val_fraction``; when it
    would leave a class of two or more instances out of either side (a rare class: about 1 draw
    in 10 at 10% of 100 instances), or put the one instance of a class in validation (where no
    model fitted without it can predict it), each class is split on its own in that proportion
    (at least one instance on each side; a class of one instance in training), so that the
    choice of sparsity sees every class."""
    perm = rng.permutation(len(y))
    n_val = max(1, int(round(val_fraction * len(y))))
    val, train = perm[:n_val], perm[n_val:]
    classes, counts = np.unique(y, return_counts=True)
    several = set(classes[counts >= 2].tolist())
    if several <= set(y[val].tolist()) and set(classes.tolist()) <= set(y[train].tolist()):
        return train, val
    val_parts, train_parts = [], []
    for c in classes:
        rows = perm[y[perm] == c]
        k = 0 if len(rows) < 2 else min(len(rows) - 1, max(1, int(round(val_fraction
                                                                          * len(rows)))))
        val_parts.append(rows[:k])
        train_parts.append(rows[k:])
    val_rows = np.concatenate(val_parts)
    if len(val_rows) == 0:          # no class of two instances to hold one out: the random one
        return train, val
    return np.sort(np.concatenate(train_parts)), np.sort(val_rows)


def _real(value, what: str, allowed: str) -> float:
    """value as a float, refusing what is not a real number (a string such as "0.9", a bool),
    which the range checks would compare with numbers and fail on with a bare TypeError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a number in {allowed}, got {value!r} "
                         f"({type(value).__name__}).")
    return float(value)


def _refuse_one_output(name) -> None:
    raise ValueError(
        f"The model has one output ({name!r}): a sparse linear model is fitted to the model's "
        "choice among classes, and needs two or more. A one-output model's prediction path "
        "reads its decision layer, with no sparse model (prediction_path without sparse_model); "
        "a binary classifier's one logit takes two class names, class_names=[negative, "
        "positive].")


def fit_sparse_model(train, val=None, test=None, *, class_names: Sequence[str] | None = None,
                     alpha: float = 0.99, n_lambdas: int = 20, eps: float = 1e-3,
                     tolerance: float = 0.01, fit_to: str = "predictions",
                     val_fraction: float = 0.2, solver: str = "sklearn", tol: float = 1e-3,
                     max_iter: int = 100, seed: int = 0, stop_early: bool = True,
                     kkt_tol: float = 1e-4, polish_max_iter: int = 1000,
                     choose_by: str = "accuracy", progress: ProgressFn = None) -> SparseModel:
    """Fit the elastic-net regularisation path and choose its sparsity on validation data.

    train / val / test: ``Features`` (targets = the model's predictions: fidelity) or pairs
    (h [N, d], y [N] or logits [N, C]); with fit_to="labels" pass pairs with the true labels.
    val None: a random ``val_fraction`` of train is held out for choosing. test: optional
    held-out data for the reported fidelity. solver: "sklearn" (SAGA in
    scikit-learn's LogisticRegression, warm-started; default) or "glm_saga" (the solver of the
    original MultiViz; it reads ``max_iter`` as epochs of mini-batches of 1024, so on a few
    thousand instances the default 100 is about 100 steps per lambda, and its objective ended
    about 5e-2 from the optimum on a 300-instance check, with extra non-zeros, which the polish
    below then removes: raising ``max_iter``, e.g. to 3000, for small data leaves it less to
    do). stop_early: end the path as soon as the rule's choice over the points computed so far
    has a validation fidelity of at least 1 - tolerance (the curve then ends there): later
    points can raise the best fidelity, and so rule out chosen points below 1 - tolerance, but
    never above 1, so that choice is the full path's (assuming, as the path's growth of
    non-zeros makes so in practice, that no later point is sparser). When the choice stays
    below 1 - tolerance the path runs to its end. ``params["choice_final"]``
    (kept in saved models) is therefore true; older models saved it false where their path
    stopped before the choice was settled. Pass stop_early=False for every point of the path.
    kkt_tol, polish_max_iter: the solver stops early (SAGA's ``tol`` is a change of the weights
    per epoch; its ConvergenceWarnings are not shown), and the point it stops at is not the
    optimum: on easy-VQA the chosen point's KKT violation was 0.05 lambda alpha with 47 non-zero
    weights where the optimum has 42, and the last points of the path had 239 where it has 61.
    So every point of the path is *polished* in float64 (``_polish``: L-BFGS-B over the support
    and the weights that violate their KKT condition, warm-started from the solver's point)
    until its ``kkt_violation`` (in units of lambda * alpha) is at most ``kkt_tol``, in at most
    ``polish_max_iter`` iterations; its non-zeros and fidelities, and so the choice, are those
    of the polished weights. A point left above ``kkt_tol`` gets a RuntimeWarning naming its
    violation and the fix (raise ``polish_max_iter``; below about 1e-6 float64 rounding of the
    objective stops L-BFGS-B first: raise ``kkt_tol``); kkt_tol=float("inf") keeps the
    solver's points. A weight whose KKT condition is within kkt_tol of binding (it enters the
    model a fraction kkt_tol of lambda further on) may be zero or tiny either way: on random
    problems with alpha < 1 the default 1e-4 gave the support of a 1e-7 solve but for one such
    weight in 12 x 20 points.
    ``params["kkt_violation"]`` is the chosen point's violation, ``params["path_kkt_violation"]``
    every point's, and ``params["path_solver_kkt_violation"]`` that of the solver's points.
    Classes that never occur in the training targets get no weights (bias -inf, never
    predicted): a UserWarning names them, and so does the model's repr.
    choose_by: the validation fidelity the sparsity is chosen by: "accuracy" (the share of
    targets matched, MultiViz's) or "balanced" (its mean over the classes of the validation
    targets: on a task where 1% of them are one class, accuracy is within 0.01 of the best for a
    model that never predicts it). Either way the choice is among the points that predict every
    class of the training targets, on the training and validation data, where any does
    (``choose_covering``; a held-out split that would leave out a class of two or more
    instances, or hold the one instance of a class, is drawn class by class), and a
    UserWarning says when the chosen point matches under half of the validation targets of a
    class that has two or more there (``params["val_class_fidelity"]``); ``val_fidelity`` is
    the accuracy either way.
    Cost: no model pass; at most ``n_lambdas - 1`` warm-started fits over the training features
    (the first point, lambda_max, is exact: all weights zero), each polished (on easy-VQA, 0.1 to
    1.5 s a point, where SAGA takes 2 to 4 s); progress per path point.
    """
    t0 = time.perf_counter()
    if choose_by not in ("accuracy", "balanced"):
        raise ValueError(f"choose_by must be 'accuracy' or 'balanced' (the mean of the classes' "
                         f"fidelities), got {choose_by!r}.")
    if fit_to not in ("predictions", "labels"):
        raise ValueError(f"fit_to must be 'predictions' (fidelity) or 'labels', got {fit_to!r}.")
    if solver not in SOLVERS:
        raise ValueError(f"Unknown solver {solver!r}; choose one of {SOLVERS}.")
    alpha = _real(alpha, "alpha (the L1 share of the elastic net)", "(0, 1], e.g. 0.99")
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha (the L1 share of the elastic net) must be in (0, 1], got {alpha}.")
    eps = _real(eps, "eps (smallest lambda / lambda_max)", "(0, 1), e.g. 1e-3")
    if not 0 < eps < 1:
        raise ValueError(f"eps (smallest lambda / lambda_max) must be in (0, 1), got {eps}.")
    n_lambdas = positive_int(n_lambdas, "n_lambdas", minimum=2)
    tolerance = _real(tolerance, "tolerance", "[0, 1), e.g. 0.01")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance is a fraction of fidelity (0.01 = 1 point), got {tolerance}.")
    # max_iter=0 left every point of the path at its all-zero start with scikit-learn (silently)
    # and failed inside glm_saga; a negative seed failed in numpy without naming the argument
    max_iter = positive_int(max_iter, "max_iter (the solver's iterations per path point)")
    kkt_tol = _real(kkt_tol, "kkt_tol (the KKT violation to polish to, in lambda * alpha)",
                    "(0, inf], e.g. 1e-4")
    if not kkt_tol > 0:
        raise ValueError(f"kkt_tol (the KKT violation to polish to, in lambda * alpha) must be "
                         f"positive, e.g. 1e-4, got {kkt_tol}.")
    polish_max_iter = positive_int(polish_max_iter,
                                   "polish_max_iter (L-BFGS-B iterations per path point)",
                                   minimum=0)
    if seed is not None or solver == "glm_saga":      # None: fresh randomness (scikit-learn)
        seed = positive_int(seed, "seed (of the validation split and the solver)", minimum=0)
    if class_names is not None and len(class_names) == 1:
        _refuse_one_output(next(iter(class_names)))    # a list's name, or a mapping's key
    step = (rounding_step(train.h, model_dtype=True) if isinstance(train, Features) else
            rounding_step(train[0] if isinstance(train, (tuple, list)) and len(train) == 2
                          else None))
    h_tr, y_tr = _split_data(train, "train", fit_to)
    if len(h_tr) == 0:
        raise ValueError("The training set is empty; pass at least two instances of two classes.")
    if val is None:
        val_fraction = _real(val_fraction, "val_fraction", "(0, 1), e.g. 0.2")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
        n_val = max(1, int(round(val_fraction * len(h_tr))))
        if len(h_tr) - n_val < 2:
            raise ValueError(f"Too few training instances ({len(h_tr)}) to hold out a validation "
                             "split; pass val= or more data.")
        rows_tr, rows_va = _validation_split(y_tr, val_fraction, np.random.default_rng(seed))
        h_va, y_va = h_tr[rows_va], y_tr[rows_va]
        h_tr, y_tr = h_tr[rows_tr], y_tr[rows_tr]
    else:
        h_va, y_va = _split_data(val, "val", fit_to)
    h_te = y_te = None
    if test is not None:
        h_te, y_te = _split_data(test, "test", fit_to)
    d = h_tr.shape[1]
    splits = (("train", h_tr, y_tr), ("val", h_va, y_va), ("test", h_te, y_te))
    for name, h, _ in splits:
        if h is not None and len(h) == 0:
            raise ValueError(f"The {name} set is empty; pass at least one instance (or "
                             f"{name}=None{' to hold out part of train' if name == 'val' else ''}).")
        if h is not None and h.shape[1] != d:
            raise ValueError(f"{name} has {h.shape[1]} features but train has {d}.")
    n_classes = len(class_names) if class_names is not None else int(
        max(y_tr.max(), y_va.max(), -1 if y_te is None else y_te.max())) + 1
    names = list(class_names) if class_names is not None else [str(c) for c in range(n_classes)]
    for name, _, y in splits:
        if y is not None:
            _check_classes(y, name, n_classes, class_names is not None)
    present = np.unique(y_tr)
    if len(present) < 2:
        if isinstance(train, Features):      # its targets are the model's predictions
            raise ValueError(
                f"The model predicts one class ({names[present[0]]!r}) for every training "
                "instance (the sparse model is fitted to the model's own predictions), so there "
                "is no decision to explain. Check the model (a collapsed or untrained model "
                "predicts one class everywhere), use data on which it predicts at least two "
                "classes, or fit the true labels: train=(features.h, labels), "
                "fit_to='labels'.")
        raise ValueError(f"The training targets hold a single class ({names[present[0]]!r}); a "
                         "classifier needs at least two. Use more (or more varied) data.")
    absent = [names[c] for c in range(n_classes) if c not in set(present.tolist())]
    if absent:
        whose = ("the model never predicts them on the training split (the sparse model is "
                 "fitted to its predictions)" if fit_to == "predictions" else
                 "no training label is one of them")
        listed = ", ".join(repr(c) for c in absent[:10]) + (", ..." if len(absent) > 10 else "")
        warn(f"{len(absent)} of the {n_classes} classes never occur in the training "
                      f"targets: {listed}; {whose}. The sparse model gets no weights for them "
                      f"(bias -inf) and never predicts them, so its fidelity on instances of "
                      f"them is 0. Fit on data where they occur to explain them.",
                      UserWarning, stacklevel=2)

    mean = h_tr.mean(0)
    std = h_tr.std(0)
    # constant (dead) neurons stay at weight 0: no spread at all, or one within a few rounding
    # steps of their mean in the features' own dtype (the same activation computed in batches
    # of other sizes). The test is relative, so that neurons of any scale (1e-9 or 1e9) are
    # standardised alike: scaling a neuron leaves the fit unchanged. Their std is infinite, so
    # their z is 0 (with std = 1 the rounding noise of a neuron of scale 1e9 kept a spread of
    # about 50 and entered the model). A fixed 1e-5 of the mean instead zeroed a float32 neuron
    # of mean 1e6 and spread 3 (48 rounding steps): shifting a neuron changed the fit.
    constant = ~(std > CONSTANT_ROUNDING_STEPS * step * np.abs(mean))
    std = np.where(constant, np.inf, std)
    z_tr = (h_tr - mean) / std
    lmax = lambda_max(z_tr, y_tr, n_classes, alpha)
    if lmax <= 0:
        raise ValueError(
            "The features carry no signal about the targets (lambda_max = 0): "
            + (f"every feature is constant on the training set, or varies by at most "
               f"{CONSTANT_ROUNDING_STEPS} rounding steps ({step:.3g} of its mean), which "
               "counts as constant (the same activation rounded differently). If so small a "
               "spread is real (float64 features with a large offset), pass Features from "
               "extract_features of a float64 model, or subtract the offset from h."
               if constant.all() else "no feature's mean differs between the classes."))
    lams = np.geomspace(lmax, eps * lmax, n_lambdas)

    path = _path_sklearn if solver == "sklearn" else _path_glm_saga
    weights = np.zeros((n_lambdas, n_classes, d))
    biases = np.full((n_lambdas, n_classes), -np.inf)
    nonzeros = np.zeros(n_lambdas, dtype=np.int64)
    val_fid = np.zeros(n_lambdas)
    # whether each point predicts every class of its training targets at least once, on the
    # training and validation features (judged on validation alone, a class with one
    # validation instance, misclassified, counted as never predicted); the fidelity on each
    # class's validation targets (classes the training targets hold), and their mean
    covers = np.zeros(n_lambdas, dtype=bool)
    val_classes = np.intersect1d(np.unique(y_va), present)
    val_counts = np.array([int((y_va == c).sum()) for c in val_classes])
    class_fid = np.zeros((n_lambdas, len(val_classes)))
    bal_fid = np.zeros(n_lambdas)
    by = val_fid if choose_by == "accuracy" else bal_fid     # what the rule reads (filled below)
    test_fid = np.zeros(n_lambdas) if h_te is not None else None
    seconds = np.zeros(n_lambdas)
    z_va = (h_va - mean) / std
    z_te = None if h_te is None else (h_te - mean) / std
    # lambda_max: the exact solution is known (W = 0, b = centred log class frequencies)
    freq = np.bincount(np.searchsorted(present, y_tr), minlength=len(present)) / len(y_tr)
    first = (np.zeros((len(present), d)), np.log(freq) - np.log(freq).mean())
    fits = path(z_tr, y_tr, lams[1:], alpha, tol, max_iter, seed)
    yi_tr = np.searchsorted(present, y_tr)
    kkt = np.zeros(n_lambdas)
    kkt_solver = np.zeros(n_lambdas)
    polish_iters = np.zeros(n_lambdas, dtype=np.int64)
    unpolished = []     # (point, violation, why, iterations ran out) of points above kkt_tol
    used = 0
    t_point = time.perf_counter()
    for i, (w, b) in enumerate(_chain([first], fits)):
        kkt_solver[i] = kkt_violation(z_tr, yi_tr, w, b, lams[i], alpha)
        if kkt_solver[i] > kkt_tol:
            w, b, kkt[i], polish_iters[i], why = _polish(z_tr, yi_tr, w, b, lams[i], alpha,
                                                         kkt_tol, polish_max_iter)
            if len(present) == 2:         # the binary form (-v/2, v/2): the same objective
                v, c = (w[1] - w[0]) / 2, (b[1] - b[0]) / 2    # or lower, on its symmetric rows
                w, b = np.stack([-v, v]), np.array([-c, c])
                kkt[i] = kkt_violation(z_tr, yi_tr, w, b, lams[i], alpha)
            if kkt[i] > kkt_tol:
                unpolished.append((i, kkt[i], why or "after its binary rows were symmetrised",
                                   polish_iters[i] >= polish_max_iter))
        else:
            kkt[i] = kkt_solver[i]
        weights[i, present] = w
        biases[i, present] = b
        nonzeros[i] = int((w != 0).sum())
        pred_va = (z_va @ weights[i].T + biases[i]).argmax(1)
        val_fid[i] = float((pred_va == y_va).mean())
        pred_tr = (z_tr @ weights[i].T + biases[i]).argmax(1)
        covers[i] = bool(np.isin(present, np.concatenate([pred_tr, pred_va])).all())
        class_fid[i] = [float((pred_va[y_va == c] == c).mean()) for c in val_classes]
        bal_fid[i] = float(class_fid[i].mean()) if len(val_classes) else val_fid[i]
        if z_te is not None:
            test_fid[i] = float(((z_te @ weights[i].T + biases[i]).argmax(1) == y_te).mean())
        now = time.perf_counter()
        seconds[i], t_point = now - t_point, now
        used = i + 1
        report(progress, used, n_lambdas, "sparse model path")
        # the rule's choice so far stays the full path's once its own fidelity is within
        # tolerance of 1: later points can raise the best (and so rule out earlier points
        # below 1 - tolerance: on easy-VQA one 1.26 points below the full path's best was
        # taken when the path stopped at its first point above 1 - tolerance) but never above 1
        if (stop_early and covers[i] and by[i] >= 1.0 - tolerance - 1e-12
                and by[choose_covering(nonzeros[:i + 1], by[:i + 1], covers[:i + 1],
                                       tolerance)] >= 1.0 - tolerance - 1e-12):
            break
    fits.close()
    if used < n_lambdas:          # stopped early: the count still ends at its total
        report(progress, n_lambdas, n_lambdas,
               f"sparse model path (stopped early after {used} of {n_lambdas} points)")
    sl = slice(0, used)
    k = choose_covering(nonzeros[sl], by[sl], covers[sl], tolerance)
    shown = val_counts >= 2            # (a class of one validation instance says little)
    if not covers[k]:
        pred_k = np.concatenate([(z @ weights[k].T + biases[k]).argmax(1) for z in (z_tr, z_va)])
        never = [names[c] for c in present if not (pred_k == c).any()]
        warn(f"fit_sparse_model: no point of the path predicts every class of its training "
             f"targets (on the training and validation data): the chosen one never predicts "
             f"{', '.join(map(repr, never[:10]))}, so it does not explain those. Fit on more "
             f"instances of them (a larger or richer training set), or lower eps (now {eps:g}) "
             f"for a denser end of the path.", UserWarning, stacklevel=2)
    elif shown.any() and class_fid[k][shown].min() < 0.5:
        worst = int(np.flatnonzero(shown)[class_fid[k][shown].argmin()])
        warn(f"fit_sparse_model: the chosen point matches the targets of "
             f"{names[val_classes[worst]]!r} on only {class_fid[k][worst]:.0%} of their "
             f"validation instances (its accuracy over all of them is {val_fid[k]:.3f}), so it "
             f"explains that class poorly. "
             + ("choose_by='balanced' chooses by the mean of the classes' fidelities, which "
                "counts each class alike (a rare one as much as the others)."
                if choose_by == "accuracy" else
                "Fit on more instances of that class, or lower tolerance (now "
                f"{tolerance:g}) for a denser point."), UserWarning, stacklevel=2)
    if unpolished:
        chosen = next((f"{v:.3g}" for i, v, _, _ in unpolished if i == k), None)
        capped = any(ran_out for *_, ran_out in unpolished)
        fix = (f"Raise polish_max_iter (now {polish_max_iter}), e.g. to "
               f"{max(10 * polish_max_iter, 1000)}, or raise kkt_tol to accept them" if capped
               else f"kkt_tol={kkt_tol:g} is finer than float64 rounding allows on these "
               f"features: raise kkt_tol, e.g. to {max(10 * kkt_tol, 1e-3):g}")
        warn(
            f"fit_sparse_model: {len(unpolished)} of the {used} path points are not the optimum "
            f"of their elastic net within kkt_tol={kkt_tol:g}: KKT violations "
            + "; ".join(f"{v:.3g} at point {i} ({why})" for i, v, why, _ in unpolished[:3])
            + ("; ..." if len(unpolished) > 3 else "")
            + " (in units of lambda * alpha, params['path_kkt_violation']). "
            + (f"The chosen point {k} is one of them (violation {chosen}): its non-zeros and "
               f"fidelity are those of a point short of the optimum. " if chosen else
               f"The chosen point {k} is within kkt_tol. ")
            + f"{fix}.",
            RuntimeWarning, stacklevel=2)
    return SparseModel(
        weight=weights[k].astype(np.float64), bias=biases[k].copy(), mean=mean, std=std,
        class_names=names, alpha=alpha, lam=float(lams[k]), chosen=k, path_lambdas=lams[sl],
        path_nonzeros=nonzeros[sl], path_val_fidelity=val_fid[sl],
        path_test_fidelity=None if test_fid is None else test_fid[sl],
        path_weights=weights[sl], path_biases=biases[sl], val_fidelity=float(val_fid[k]),
        test_fidelity=None if test_fid is None else float(test_fid[k]), tolerance=tolerance,
        fit_to=fit_to, solver=solver, n_train=len(z_tr), n_val=len(z_va),
        n_test=0 if z_te is None else len(z_te), seconds=time.perf_counter() - t0,
        params={"n_lambdas": n_lambdas, "eps": eps, "tol": tol, "max_iter": max_iter,
                "seed": seed, "lambda_max": lmax, "stop_early": stop_early,
                "stopped_at": used, "point_seconds": seconds[sl].round(4).tolist(),
                "kkt_tol": kkt_tol if np.isfinite(kkt_tol) else None,     # None: no polish
                "polish_max_iter": polish_max_iter,
                # in units of lambda * alpha (kkt_violation): the chosen point's, every point's
                # after polishing, and every point as the solver left it
                "kkt_violation": float(kkt[k]),
                "path_kkt_violation": kkt[sl].tolist(),
                "path_solver_kkt_violation": kkt_solver[sl].tolist(),
                "polish_iterations": polish_iters[sl].tolist(),
                # taken for constant (weight 0): no spread, or rounding noise (rounding_step)
                "constant_features": np.nonzero(constant)[0].tolist(),
                "choice_final": bool(used == n_lambdas
                                     or by[k] >= 1.0 - tolerance - 1e-12),
                # chosen among the points that predict every class of the training targets
                # (on the training and validation data: choose_covering), where any does
                "path_predicts_every_class": covers[sl].tolist(),
                "predicts_every_class": bool(covers[k]),
                "choose_by": choose_by,
                "path_val_balanced_fidelity": bal_fid[sl].tolist(),
                "val_class_fidelity": {names[c]: float(f)
                                       for c, f in zip(val_classes, class_fid[k])}})


def _chain(*iterables):
    for it in iterables:
        yield from it


def fit_sparse_model_for(adapter: ModelAdapter, train_dataset, test_dataset=None, *,
                         batch_size: int = 256, cache: bool = True, progress: ProgressFn = None,
                         **params) -> SparseModel:
    """Decision features of the datasets (extract_features, cached on disk) then
    fit_sparse_model to the model's predictions, with the adapter's class names.

    Cost: one forward pass per instance of both datasets (none when cached), then the path fit.
    """
    from .representations import extract_features

    if adapter.n_classes == 1:                 # before a pass over the datasets
        _refuse_one_output(adapter.class_names[0])

    def stage(name):
        return None if progress is None else (lambda d, t, m: progress(d, t, f"{name}: {m}"))

    train = extract_features(adapter, train_dataset, batch_size=batch_size, cache=cache,
                             progress=stage("train features"))
    test = None if test_dataset is None else extract_features(
        adapter, test_dataset, batch_size=batch_size, cache=cache, progress=stage("test features"))
    params.setdefault("class_names", adapter.class_names)
    return fit_sparse_model(train, test=test, progress=stage("sparse model"), **params)


# ------------------------------------------------------------------------------------------------
# the prediction path of one instance
# ------------------------------------------------------------------------------------------------
@dataclass
class PathNeuron:
    """One decision neuron on an instance's prediction path."""

    index: int
    weight: float
    activation: float
    contribution: float
    units: dict[str, list[tuple[int, str, float]]] = field(default_factory=dict)
    pairs: list[tuple[int, int, str, str, float]] = field(default_factory=list)
    pair_modalities: tuple[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": int(self.index), "weight": float(self.weight),
            "activation": float(self.activation), "contribution": float(self.contribution),
            "units": {m: [[int(u), str(l), float(s)] for u, l, s in us]
                      for m, us in self.units.items()},
            "pairs": [[int(u), int(v), str(a), str(b), float(x)] for u, v, a, b, x in self.pairs],
            "pair_modalities": None if self.pair_modalities is None else list(self.pair_modalities),
        }


@dataclass
class PredictionPath:
    """class <- its top neurons (weight x activation) <- their top units and cross-modal pairs.

    ``note`` says why ``neurons`` is empty when it is (the class has no non-zero weight), else "".
    ``logit`` is the model's logit of the class; ``params["bias"]`` is the bias of the source of
    the contributions (decision layer or sparse model) and ``params["source_logit"]`` that
    source's logit, the sum of every neuron's contribution plus the bias (the model's logit
    with the decision layer; None for a class the sparse model never predicts).
    """

    class_index: int
    class_name: str
    neurons: list[PathNeuron]
    logit: float = 0.0
    source: str = "decision_layer"          # or "sparse_model"
    unimodal_method: str = ""
    interaction_method: str | None = None
    forward_passes: int = 0
    backward_passes: int = 0
    seconds: float = 0.0
    params: dict = field(default_factory=dict)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able plain data for the path view."""
        return {
            "class": {"index": int(self.class_index), "name": self.class_name,
                      "logit": float(self.logit)},
            "source": self.source, "unimodal_method": self.unimodal_method,
            "interaction_method": self.interaction_method,
            "neurons": [n.to_dict() for n in self.neurons], "note": self.note,
            "forward_passes": int(self.forward_passes),
            "backward_passes": int(self.backward_passes), "seconds": float(self.seconds),
            "params": {k: (list(v) if isinstance(v, list) else
                           dict(v) if isinstance(v, dict) else v)
                       for k, v in self.params.items()
                       if isinstance(v, (int, float, str, bool, type(None)))
                       or (isinstance(v, list) and (all(isinstance(x, int) for x in v)
                                                    or all(isinstance(x, str) for x in v)))
                       or (isinstance(v, dict) and all(isinstance(x, str) and isinstance(y, int)
                                                       for x, y in v.items()))},
        }


def _top_units(scores: np.ndarray, labels: Sequence[str], k: int, absolute: bool):
    """The k units of largest score (|score| when ``absolute``), leaving out those of score 0:
    of a neuron silent at the instance (every unit's score 0), the first k units in their
    order were drawn as its "top units"."""
    s = np.asarray(scores, dtype=np.float64)
    key = np.abs(s) if absolute else s
    order = [u for u in np.argsort(-key, kind="stable") if s[u] != 0][:k]
    return [(int(u), str(labels[u]) if u < len(labels) else str(u), float(s[u])) for u in order]


def _add_pair_units(units: dict, att, prepared, pair_mods, pairs) -> None:
    """Append to ``units`` {modality: [(unit, label, score)]} the units of ``pairs`` that are
    not among the top units, each with its own stage-1 score: the path then shows every pair it
    computed between units it shows (with the top units alone, most pairs had one unit that was
    not drawn, and their links were left out)."""
    for side, modality in enumerate(pair_mods):
        if modality not in att.scores:
            continue
        listed = units.setdefault(modality, [])
        have = {u for u, _, _ in listed}
        scores = np.asarray(att.scores[modality], dtype=np.float64)
        labels = att.labels.get(modality, prepared.labels[modality])
        for pair in pairs:
            u = int(pair[side])
            if u not in have and u < len(scores):
                listed.append((u, str(labels[u]) if u < len(labels) else str(u),
                               float(scores[u])))
                have.add(u)


def _empty_path_note(contrib, sparse_model: SparseModel | None) -> str:
    """Why class ``contrib.class_index`` has no neuron that contributes to it."""
    name = contrib.class_name
    if np.any(contrib.weights != 0) and np.isfinite(contrib.bias):
        return (f"No neuron contributes to class {name!r} on this instance: the neurons with a "
                f"weight for it are all inactive here (activation "
                f"{'at its mean' if sparse_model is not None else '0'}).")
    if sparse_model is None:
        return (f"The decision layer's weights for class {name!r} are all zero, so no neuron "
                "contributes to it.")
    if not np.isfinite(sparse_model.bias[contrib.class_index]):
        return (f"Class {name!r} never occurs in the sparse model's training targets, so it has no "
                "weights (and is never predicted by it); fit on data in which it occurs, or "
                "explain it with the decision layer (sparse_model=None).")
    return (f"The sparse model keeps no non-zero weight for class {name!r} at its chosen sparsity "
            f"(lambda {sparse_model.lam:.3g}); a smaller tolerance or lambda keeps more neurons, "
            "or use the decision layer (sparse_model=None).")


#: Pairwise ablation in the prediction path looks for a neuron's pairs among at most this many
#: units of each modality, those of largest stage-1 score (a modality with fewer: all of them)
PATH_ABLATION_UNITS = 24


def _candidates(adapter: ModelAdapter, prepared, att, modalities, absolute: bool,
                narrowed: dict, whole: set) -> dict:
    """{"units": {modality: candidate units}} for a neuron's pairwise ablation in the path, or
    {} when both modalities have at most PATH_ABLATION_UNITS units; records in ``narrowed``
    how many candidates a narrowed modality kept, and in ``whole`` a modality of more units
    that could not be narrowed (stage 1 gave it no scores: ``unimodal_params`` left it out)."""
    pair = modality_pair(adapter, modalities)
    if all(prepared.n_units[m] <= PATH_ABLATION_UNITS for m in pair):
        return {}
    units = {}
    for m in pair:
        if prepared.n_units[m] <= PATH_ABLATION_UNITS:
            continue
        if m not in att.scores:
            whole.add(m)
            continue
        score = np.asarray(att.scores[m], dtype=np.float64)
        key = np.abs(score) if absolute else score
        units[m] = np.sort(np.argsort(-key, kind="stable")[:PATH_ABLATION_UNITS]).tolist()
        narrowed[m] = PATH_ABLATION_UNITS
    return {"units": units}


#: prediction_path warns (UserWarning) when its first neuron says the others will take longer
#: than this (seconds)
PATH_WARN_SECONDS = 60.0


def prediction_path(adapter: ModelAdapter, instance, target=None, sparse_model: SparseModel | None = None,
                    k_neurons: int = 3, k_units: int = 3, k_pairs: int = 3,
                    unimodal_method: str = "integrated_gradients",
                    interaction_method: str | None = "second_order",
                    unimodal_params: dict | None = None, interaction_params: dict | None = None,
                    modalities: tuple[str, str] | None = None, absolute: bool = True,
                    ablation_params: dict | None = None,
                    progress: ProgressFn = None) -> PredictionPath:
    """The prediction path of one instance as plain data (see PredictionPath.to_dict).

    target: the class to explain (None: the predicted class). Neurons are ranked by their
    contribution to that class: W[c, j] h_j(x) with the decision layer, or with ``sparse_model``
    W[c, j] (h_j - mean_j) / std_j, largest |contribution| first (``absolute``, the default, as
    the neuron view's bars; else largest first); neurons that contribute nothing (zero weight,
    or inactive: a contribution of 0, or under 1e-6 of the largest) are skipped. A class the
    instance is far from (say, not predicted) then shows the neurons that lower it most, where
    the signed order picked inactive neurons. ``absolute`` ranks the units and pairs the same way. For each
    of the top ``k_neurons``: stage 1 (``unimodal_method``) and stage 2 (``interaction_method``,
    None to skip; needs two modalities) targeted at Neuron(j): a neuron's units are each
    modality's top ``k_units`` of non-zero score, then the other units of its top ``k_pairs``
    pairs (each with its own stage-1 score), so that every pair links units the path shows; a
    neuron no unit moves at the instance (every score 0: a neuron inactive there, whose
    standardised value still contributes) has none, and ``params["units_silent"]`` lists such
    neurons that no pair gives units either. Where second-order
    gradients are blind to a neuron (the model is piecewise linear there, a ReLU network, or
    cuts a modality off autograd's graph: its matrix is all 0 and says so in ``params["note"]``
    and ``params["blind"]``), that neuron's pairs come from pairwise
    ablation instead, and ``params["pairs_by_ablation"]`` lists such neurons. Pairwise ablation
    of two modalities of more than PATH_ABLATION_UNITS units each is narrowed to the pairs among
    each one's PATH_ABLATION_UNITS units of largest stage-1 score for the neuron (every pair of
    96 x 128 units is 12,288 forward passes per neuron, and 2,000 x 128, 256,000, took a minute
    and a half); ``params["ablation_candidates"]`` then gives the candidates per modality, and
    ``params["ablation_whole"]`` a modality of more units searched whole, having no stage-1
    scores to narrow it by (``unimodal_params`` restrict stage 1 to other modalities).
    ``ablation_params``: pairwise ablation's parameters where it stands in for second-order
    gradients (e.g. ``{"batch_size": 64}``; its ``units`` narrow the search as above does).
    Cost: 1 forward pass + k_neurons x (the stage-1 method's cost + the stage-2 method's cost;
    + pairwise ablation's for a neuron second-order gradients are blind to).
    """
    from .unimodal import attribute        # stage kernels are imported lazily
    t0 = time.perf_counter()
    k_neurons, k_units, k_pairs = (positive_int(v, name) for name, v in (
        ("k_neurons", k_neurons), ("k_units", k_units), ("k_pairs", k_pairs)))
    check_sparse_model(sparse_model)
    prepared = as_prepared(adapter, instance)
    contrib = decision_contributions(adapter, prepared, target, sparse_model)
    c = contrib.class_index
    rank = np.abs(contrib.contributions) if absolute else contrib.contributions
    # nothing: 0, or float rounding of it (a neuron at its mean, in float32) next to the largest
    finite = np.abs(contrib.contributions[np.isfinite(contrib.contributions)])
    nothing = 1e-6 * float(finite.max(initial=0.0))      # a NaN or inf neuron is not "nothing"
    order = [j for j in np.argsort(-rank, kind="stable")
             if contrib.weights[j] != 0 and not abs(contrib.contributions[j]) <= nothing]
    chosen = order[:k_neurons]
    do_pairs = interaction_method is not None and len(adapter.names) >= 2
    if do_pairs:
        from .interactions import interaction
    steps = len(chosen) * (2 if do_pairs else 1)
    done = 0
    fwd, bwd = 1, 0
    neurons, by_ablation, silent = [], [], []
    narrowed: dict[str, int] = {}      # modality -> its candidate units, when narrowed
    whole: set[str] = set()            # modalities of many units that could not be narrowed
    if not isinstance(ablation_params, (Mapping, type(None))):
        raise TypeError(f"ablation_params must be a dict of pairwise_ablation's parameters, "
                        f"e.g. {{'batch_size': 64}}, got {type(ablation_params).__name__}.")

    def ablation(params, att) -> dict:
        """pairwise ablation's parameters: ``params``, with the candidate units of ``att``
        unless they name their own ``units``."""
        out = dict(params or {})
        if "units" not in out:
            out.update(_candidates(adapter, prepared, att, modalities, absolute, narrowed,
                                   whole))
        return out

    def within(what: str):
        """A step's kernel reports its own batches as the path's progress (so that a cancel,
        or a newer click that makes the path stale, stops it inside a slow kernel, a Shapley
        estimate of seconds, not only between the steps)."""
        if progress is None:
            return None
        at = done
        return lambda d, t, m="": report(progress, at, steps, f"{what} ({m} {d}/{t})")

    began = time.perf_counter()
    for k, j in enumerate(chosen):
        if k == 1:
            # what the rest will cost at the first neuron's rate, said when long: each neuron
            # repeats the methods (Shapley or LIME on a large model: a minute or more each)
            seconds = (time.perf_counter() - began) * (len(chosen) - 1)
            if seconds > PATH_WARN_SECONDS:
                warn(f"prediction_path: {unimodal_method}"
                     + (f" and {interaction_method}" if do_pairs else "")
                     + f" run again for each of its {len(chosen)} neurons: about "
                     f"{duration_words(seconds)} more at the rate of the first. Choose cheaper "
                     "methods for the path (gradient, second_order) or fewer neurons.",
                     UserWarning)
        nt = Neuron(int(j))
        att = attribute(adapter, prepared, unimodal_method, target=nt,
                        progress=within(f"neuron {j}: units"), **(unimodal_params or {}))
        fwd, bwd = fwd + att.forward_passes, bwd + att.backward_passes
        units = {m: _top_units(att.scores[m], att.labels.get(m, prepared.labels[m]), k_units,
                               absolute) for m in att.scores}
        done += 1
        report(progress, done, steps, f"neuron {j}: units")
        pairs, pair_mods = [], None
        if do_pairs:
            iparams = (ablation(interaction_params, att)
                       if interaction_method == "pairwise_ablation" else
                       dict(interaction_params or {}))
            inter = interaction(adapter, prepared, interaction_method, modalities=modalities,
                                target=nt, progress=within(f"neuron {j}: pairs"), **iparams)
            fwd, bwd = fwd + inter.forward_passes, bwd + inter.backward_passes
            if interaction_method == "second_order" and (inter.params or {}).get("blind"):
                # blind here (all 0 whatever the units do): pairs that remove the units
                inter = interaction(adapter, prepared, "pairwise_ablation",
                                    modalities=modalities, target=nt,
                                    progress=within(f"neuron {j}: pairs"),
                                    **ablation(ablation_params, att))
                fwd, bwd = fwd + inter.forward_passes, bwd + inter.backward_passes
                by_ablation.append(int(j))
            pair_mods = tuple(inter.modalities)
            # (a pair of 0, no interaction beyond rounding, is no link)
            pairs = [(u, v, inter.row_labels[u], inter.col_labels[v], x)
                     for u, v, x in inter.top_pairs(k_pairs, absolute=absolute) if x != 0]
            _add_pair_units(units, att, prepared, pair_mods, pairs)
            done += 1
            report(progress, done, steps, f"neuron {j}: pairs")
        if not any(units.values()):     # nothing in the input moves it here, nor any pair
            silent.append(int(j))
        neurons.append(PathNeuron(int(j), float(contrib.weights[j]), float(contrib.h[j]),
                                  float(contrib.contributions[j]), units, pairs, pair_mods))
    # what the neurons' contributions add up to: sum_j contribution_j + bias = the source's
    # logit (the model's with the decision layer; the sparse model's own with sparse_model)
    bias = contrib.bias
    source_logit = float(np.sum(contrib.contributions, dtype=np.float64)) + bias
    return PredictionPath(
        class_index=c, class_name=contrib.class_name, neurons=neurons,
        logit=float(contrib.logits[c]), source=contrib.source, unimodal_method=unimodal_method,
        interaction_method=interaction_method if do_pairs else None, forward_passes=fwd,
        backward_passes=bwd, seconds=time.perf_counter() - t0,
        params={"k_neurons": k_neurons, "k_units": k_units, "k_pairs": k_pairs,
                "absolute": absolute, "pairs_by_ablation": by_ablation,
                **({"units_silent": silent} if silent else {}),
                **({"ablation_candidates": dict(narrowed)} if narrowed else {}),
                **({"ablation_whole": sorted(whole)} if whole else {}),
                "bias": bias if np.isfinite(bias) else None,
                "source_logit": source_logit if np.isfinite(source_logit) else None},
        note="" if neurons else _empty_path_note(contrib, sparse_model))
