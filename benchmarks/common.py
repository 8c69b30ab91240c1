"""Shared helpers of the benchmark scripts: the demo model, instance selection, timing, JSON."""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def load_demo(split: str = "test", allow_stand_in: bool = True):
    """(adapter, dataset, note): the shipped easy-VQA model, or (when its weights are missing and
    allow_stand_in) the same architecture with seeded random weights, saying so in ``note``."""
    from multiviz_widgets.demos import easy_vqa

    dataset = easy_vqa.load_dataset(split)
    try:
        return easy_vqa.load_adapter(), dataset, "easy-VQA shipped weights"
    except Exception as e:  # WeightsError, or anything the loader raises while weights are absent
        if not allow_stand_in:
            raise
        torch.manual_seed(0)
        model = easy_vqa.EasyVQAModel().eval()
        return (easy_vqa.make_adapter(model, answers=dataset.answers), dataset,
                f"STAND-IN: easy-VQA architecture with random weights ({type(e).__name__}: {e})")


def shape_or_color_indices(dataset, n: int, seed: int = 0) -> np.ndarray:
    """n indices of questions about a shape or a colour (a seeded random sample, sorted)."""
    from multiviz_widgets.demos.easy_vqa import question_kind

    idx = np.array([i for i, q in enumerate(dataset.questions)
                    if question_kind(q) in ("shape", "color")])
    if n < len(idx):
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=n, replace=False))
    return idx


def start_run(threads: int, n: int, seed: int):
    """(adapter, dataset, note, indices) for a benchmark run on the easy-VQA model: torch on
    ``threads`` threads, captum's "did not already require gradients" warning silenced, and n
    questions about a shape or a colour (seeded)."""
    import warnings

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message="Input Tensor .* did not already require gradients")
    adapter, dataset, note = load_demo()
    return adapter, dataset, note, shape_or_color_indices(dataset, n, seed=seed)


def single_threaded_blas():
    """A context in which numpy's and scipy's OpenBLAS (not torch's BLAS) run one thread.

    captum's Lime and KernelShap fit with scikit-learn, whose OpenBLAS threads keep spinning for
    a while after each fit and slow the next timed call: on a 16-core GPU host our KernelSHAP took
    74 ms instead of 7.5 ms right after captum's. threadpoolctl limits only the libraries loaded
    when the limit is set, and scikit-learn brings its own scipy's OpenBLAS, so it is imported
    first.
    """
    import importlib

    from threadpoolctl import threadpool_limits
    importlib.import_module("sklearn.linear_model")
    return threadpool_limits(1, user_api="blas")


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(milliseconds, result) of one call; where CUDA is in use, the device's queued work is
    waited for before and after (GPU kernels run asynchronously)."""
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return (time.perf_counter() - t0) * 1e3, out


def rotated(items: list, turn: int) -> list:
    """``items`` starting at position turn % len(items) (each item comes first once every
    len(items) turns): the order in which side-by-side calls are timed."""
    k = turn % len(items)
    return items[k:] + items[:k]


def median(xs) -> float:
    return float(statistics.median(xs))


def geometric_mean(ratios) -> float:
    """The geometric mean of positive ratios: over timings in every order, the factors by which
    a call's position (first, second, ...) multiplies its time cancel in it."""
    logs = [math.log(r) for r in ratios]
    return math.exp(sum(logs) / len(logs))


#: largest relative difference of a kernel's numbers to its reference's (captum, a loop): float32
#: rounding
AGREEMENT_MAX = 1e-4


def bootstrap_median_ci(values, resamples: int = 2000, seed: int = 0) -> list[float]:
    """[2.5th, 97.5th] percentiles of the median of ``values`` (per-instance ratios) over
    bootstrap resamples of the instances: how far the median could move with other instances
    of the same kind. A criterion met by the median but not by the upper end is marginal."""
    v = np.asarray(list(values), dtype=np.float64)
    rng = np.random.default_rng(seed)
    medians = np.median(v[rng.integers(0, len(v), size=(resamples, len(v)))], axis=1)
    return [float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))]


#: Batch sizes tried for a floor: the best per-sample time over them is the floor (small
#: batches stay in the CPU caches and are often the fastest per sample).
FLOOR_BATCHES = (32, 64, 128, 256, 512)


def per_sample_scan(adapter, prepared, batches=FLOOR_BATCHES, repeats: int = 5,
                    backward: bool = False, target: int = 0) -> dict[int, float]:
    """{batch size: best per-sample time (ms)} of a batched pass over copies of the instance's
    continuous inputs: a forward pass without gradient, or (``backward``) a forward pass and a
    backward of the ``target`` logit to the continuous inputs.

    One untimed call per batch size, then ``repeats`` rounds, each timing every batch size once:
    the rounds interleave the batch sizes, so that a drift of the machine's speed affects them
    alike; each batch size keeps its fastest round.
    """
    steps = {}
    for size in batches:
        cont = {n: v.unsqueeze(0).expand(size, *v.shape).contiguous()
                for n, v in prepared.continuous.items()}
        steps[size] = _batched_pass(adapter, prepared.raw, cont, backward, target)
    for step in steps.values():
        step()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(repeats):
        for size, step in steps.items():
            ms, _ = timed(step)
            best[size] = min(best[size], ms / size)
    return best


def _batched_pass(adapter, raw, cont, backward: bool, target: int):
    """A zero-argument function running one pass of ``per_sample_scan`` on the batch ``cont``."""
    if not backward:
        def step():
            with torch.no_grad():
                adapter.forward(raw, cont)
        return step

    def step():
        leaves = {n: v.detach().requires_grad_(True) for n, v in cont.items()}
        out = adapter.forward(raw, leaves)[:, target]
        torch.autograd.grad(out.sum(), list(leaves.values()))
    return step


def per_sample_forward_ms(adapter, prepared, batch: int | None = None, repeats: int = 5) -> float:
    """Best per-sample time (ms) of a batched forward pass over the continuous inputs: the
    minimum over FLOOR_BATCHES, or over the one batch size given (see ``per_sample_scan``)."""
    return min(per_sample_scan(adapter, prepared, FLOOR_BATCHES if batch is None else (batch,),
                               repeats).values())


def per_sample_forward_backward_ms(adapter, prepared, target: int = 0, batch: int | None = None,
                                   repeats: int = 5) -> float:
    """Best per-sample time (ms) of a batched forward + backward to the continuous inputs (the
    minimum over FLOOR_BATCHES, or over the one batch size given; see ``per_sample_scan``)."""
    return min(per_sample_scan(adapter, prepared, FLOOR_BATCHES if batch is None else (batch,),
                               repeats, backward=True, target=target).values())


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "machine": platform.machine(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                      time.gmtime())}
    if torch.cuda.is_initialized():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_json(path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_default) + "\n", encoding="utf-8")
    return path


def _default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.bool_):
        return bool(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: peak), or -1."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def reset_peak_rss() -> bool:
    """Reset the peak resident set (VmHWM) to the current one; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
