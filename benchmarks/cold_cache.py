"""What the gradient methods' last steps cost right after a backward pass, against a warm loop:
why ``unimodal._all_finite`` (a Python sum first) stands in for numpy's ``isfinite(v).all()``,
and why Image/Text ``unit_sums_and_map`` make the unit sums in float64 inside the torch
reduction instead of pooling in numpy or converting afterwards.

    python benchmarks/cold_cache.py [--n 20] [--repeats 25] [--floor-batch B]
                                    [--out benchmarks/results/cold_cache.json]

Each timing follows what ``benchmarks/kernels.py`` makes a gradient call follow: its two floors'
batched passes (which evict the CPU caches), a forward pass without gradient at the forward
floor batch, then a forward + backward at the forward + backward floor batch, each as often as
kernels.py runs them (FLOOR_REPEATS timed, after one untimed); the floor batches are chosen as
kernels.py chooses them, once at the start: the sizes of FLOOR_BATCHES (32..512) with the lowest
per-sample time of the one pass and of the other (on the first instance), or --floor-batch for
both, as kernels.py's option (``floor_batch`` and ``floor_batch_fwd_bwd`` in the JSON). Then the
gradient of one instance (a forward and a backward pass of a batch of one, as the bare code of
kernels.py writes it). Then ONE variant of one step is timed once, on that fresh gradient
("cold"), and at once five times more ("warm", the median). The variants take turns from one
gradient to the next, so each follows a backward pass equally often.

Steps (easy-VQA: a 3x64x64 image in 8x8 patches, a question of 5-7 embedded tokens):

* ``pool``: the image's map (channels summed) and its 64 patch sums in float64, as numpy arrays.
  ``torch_float64_in_reduction`` (the project's), ``torch_then_numpy_float64`` (the sums in the
  gradient's float32, converted by numpy), ``numpy`` (the gradient as a numpy array, pooled by
  numpy).
* ``finite``: whether every unit score (image and question, float64 numpy arrays, pooled by the
  project's path untimed first) is finite. ``numpy_isfinite`` (``np.isfinite(v).all()`` per
  modality), ``python_sum`` (the project's ``_all_finite``).

Reported per variant: the median cold and warm microseconds and cold / warm; per step, each
variant's cold time over the project's. Microseconds: the machine's speed drifts, so compare
variants of one run, not runs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (FLOOR_BATCHES, RESULTS, environment, load_demo, median,  # noqa: E402
                    per_sample_forward_backward_ms, per_sample_forward_ms, per_sample_scan,
                    rotated, shape_or_color_indices, timed, write_json)
from kernels import FLOOR_REPEATS, bare_call  # noqa: E402

from multiviz_widgets.kernels.unimodal import _all_finite  # noqa: E402

WARM_REPEATS = 5
OURS = {"pool": "torch_float64_in_reduction", "finite": "python_sum"}


def instance_gradient(adapter, prepared, target: int) -> dict[str, torch.Tensor]:
    """{modality: d logit_target / d continuous input} of one instance, without the batch
    dimension: kernels.py's bare gradient (one forward and one backward of a batch of one)."""
    grads = bare_call("gradient", adapter, prepared, target, {})()
    return {n: g[0] for n, g in zip(prepared.names, grads)}


def pool_variants(patch: int) -> dict:
    """The variants of the ``pool`` step: gradient [C, H, W] -> (map [H, W], sums [units])."""
    def grid(h, w):
        return h // patch, patch, w // patch, patch

    def in_reduction(g):
        m = g.sum(-3)
        return m.numpy(), m.view(grid(*m.shape)).sum((1, 3), dtype=torch.float64).view(-1).numpy()

    def then_numpy(g):
        m = g.sum(-3)
        s = m.view(grid(*m.shape)).sum((1, 3)).view(-1)
        return m.numpy(), np.asarray(s.numpy(), dtype=np.float64)

    def in_numpy(g):
        m = g.numpy().sum(0)
        return m, m.reshape(grid(*m.shape)).sum((1, 3), dtype=np.float64).reshape(-1)

    return {OURS["pool"]: in_reduction, "torch_then_numpy_float64": then_numpy,
            "numpy": in_numpy}


def finite_variants() -> dict:
    """The variants of the ``finite`` step: [float64 arrays] -> bool."""
    return {"numpy_isfinite": lambda arrays: all(bool(np.isfinite(v).all()) for v in arrays),
            OURS["finite"]: _all_finite}


def project_scores(adapter, prepared, grads) -> list[np.ndarray]:
    """The unit scores as the project's gradient path makes them (float64 numpy arrays)."""
    out = []
    for n, g in grads.items():
        sums, _ = adapter.modalities[n].unit_sums_and_map(g, prepared.continuous[n],
                                                          prepared.index[n])
        out.append(sums.numpy())
    return out


def _time(fn, arg) -> tuple[float, float]:
    """(cold us, warm us): one call, then the median of WARM_REPEATS calls more."""
    cold = timed(lambda: fn(arg))[0] * 1e3
    return cold, median([timed(lambda: fn(arg))[0] * 1e3 for _ in range(WARM_REPEATS)])


def floor_batches(adapter, prepared, target: int, floor_batch: int | None = None
                  ) -> tuple[int, int]:
    """(forward, forward + backward) floor batch sizes, chosen as ``benchmarks/kernels.py``
    chooses them: ``floor_batch`` for both, or each the size of FLOOR_BATCHES with the lowest
    per-sample time of its pass on the instance."""
    if floor_batch is not None:
        return floor_batch, floor_batch
    fwd = per_sample_scan(adapter, prepared, FLOOR_BATCHES)
    fb = per_sample_scan(adapter, prepared, FLOOR_BATCHES, backward=True, target=target)
    return min(fwd, key=fwd.get), min(fb, key=fb.get)


def run(adapter, dataset, indices, repeats: int, floor_batch: int | None = None) -> dict:
    """{"floor_batch": the forward floor's batch, "floor_batch_fwd_bwd": the forward +
    backward floor's, "steps": {step: {variant: timings}}}."""
    image = next(n for n, m in adapter.modalities.items() if m.kind == "image")
    patch = adapter.modalities[image].patch
    steps = {"pool": pool_variants(patch), "finite": finite_variants()}
    turns = [(step, name) for step, variants in steps.items() for name in variants]
    if len(indices) * repeats < len(turns):
        raise ValueError(f"n x repeats must be at least {len(turns)} (one timing per variant), "
                         f"got {len(indices)} x {repeats}.")
    prepared = [adapter.prepare(dataset[int(i)]) for i in indices]
    targets = [int(adapter.predict(p.raw).argmax(1)[0]) for p in prepared]
    fwd_batch, fb_batch = floor_batches(adapter, prepared[0], targets[0], floor_batch)
    got = {turn: ([], []) for turn in turns}
    for v in steps["pool"].values():                                    # warm-up, untimed
        v(instance_gradient(adapter, prepared[0], targets[0])[image])
    turn = 0
    for _ in range(repeats):
        for p, t in zip(prepared, targets):
            step, name = rotated(turns, turn)[0]
            turn += 1
            # the floors of kernels.py's round, which evict the CPU caches, as there
            per_sample_forward_ms(adapter, p, batch=fwd_batch, repeats=FLOOR_REPEATS)
            per_sample_forward_backward_ms(adapter, p, target=t, batch=fb_batch,
                                           repeats=FLOOR_REPEATS)
            with torch.enable_grad():
                grads = instance_gradient(adapter, p, t)
            if step == "pool":
                cold, warm = _time(steps[step][name], grads[image])
            else:
                cold, warm = _time(steps[step][name], project_scores(adapter, p, grads))
            got[(step, name)][0].append(cold)
            got[(step, name)][1].append(warm)
    out = {}
    for step, variants in steps.items():
        entry = {}
        for name in variants:
            cold, warm = got[(step, name)]
            entry[name] = {"cold_us": median(cold), "warm_us": median(warm),
                           "cold_over_warm": median(cold) / median(warm), "n": len(cold)}
        ours = entry[OURS[step]]["cold_us"]
        for name in variants:
            entry[name]["cold_over_ours"] = entry[name]["cold_us"] / ours
        out[step] = entry
    return {"floor_batch": fwd_batch, "floor_batch_fwd_bwd": fb_batch, "steps": out}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20, help="test questions about a shape or colour")
    ap.add_argument("--repeats", type=int, default=25, help="timings per instance")
    ap.add_argument("--floor-batch", type=int, default=None,
                    help="batch of the floors' passes before each timing (default: as "
                         "kernels.py, the fastest per sample of 32..512, chosen once per pass)")
    ap.add_argument("--out", default=str(RESULTS / "cold_cache.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    adapter, dataset, note = load_demo("test")
    indices = shape_or_color_indices(dataset, args.n)
    got = run(adapter, dataset, indices, args.repeats, args.floor_batch)
    steps = got["steps"]
    result = {"model": note, "n": args.n, "repeats": args.repeats,
              "warm_repeats": WARM_REPEATS, "floor_batch": got["floor_batch"],
              "floor_batch_fwd_bwd": got["floor_batch_fwd_bwd"], "floor_repeats": FLOOR_REPEATS,
              "project_variant": OURS, "steps": steps, "environment": environment()}
    for step, entry in steps.items():
        for name, v in entry.items():
            print(f"{step:7s} {name:28s} cold {v['cold_us']:7.1f} us  warm {v['warm_us']:6.1f} us"
                  f"  (cold/warm {v['cold_over_warm']:4.1f}, cold/ours {v['cold_over_ours']:4.2f})")
    print(f"wrote {write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
