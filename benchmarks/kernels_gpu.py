"""The kernels on a CUDA GPU, measured side by side in one run (informative: the issue's speed
criteria are set for two CPU cores, and ``benchmarks/kernels.py`` measures those).

The shipped easy-VQA model moved to the GPU; median over --n test questions about a shape or a
colour, each timed --repeats times, the order of the compared calls reversed every other time.
Every timing waits for the device's queued work before and after (``common.timed``).

* Stage 1: each method against captum's equivalent at equal passes (ours/captum), and against
  its floor: forward passes x the best per-sample time of a batched forward pass (batches of
  256 to 4096, a GPU's sizes).
* The second-order token x patch matrix (modes "vmap" and "replicate") against the per-token
  autograd loop and the loop of the original MultiViz code (``kernels_stage2``).
* EMAP with N = 100 (--emap-n; traced split, and N^2 full forwards batched) against the unbatched
  reference, one forward pass per pair: --reference-pairs pairs timed, the N^2 extrapolated.

Without a CUDA device it stops with exit status 2 and says so. ``--device cpu`` runs the same
code on the CPU, to check the script (the CPU figures are ``benchmarks/kernels.py``'s).

    python benchmarks/kernels_gpu.py --n 20 --out benchmarks/results/kernels_gpu.json
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS, environment, geometric_mean, load_demo, median,  # noqa: E402
                    per_sample_scan, shape_or_color_indices, single_threaded_blas, timed,
                    write_json)
from kernels import STAGE1, captum_call  # noqa: E402
from kernels_stage2 import EMAP_N, _emap_instances, emap_unbatched, sog_per_token_loop  # noqa: E402,E501

from multiviz_widgets.kernels.common import resolve_target  # noqa: E402
from multiviz_widgets.kernels.interactions import emap, interaction  # noqa: E402
from multiviz_widgets.kernels.unimodal import METHODS, attribute  # noqa: E402

GPU_FLOOR_BATCHES = (256, 1024, 4096)


def side_by_side(calls: dict, repeats: int, k: int) -> dict[str, list[float]]:
    """{name: [ms per repeat]} of zero-argument calls, timed back to back (reversed order every
    other repeat, by ``k`` and the repeat; two calls get an even number of repeats)."""
    out = {name: [] for name in calls}
    items = list(calls.items())
    if len(items) == 2:                     # whole cycles: each side first equally often
        repeats += repeats % 2
    for r in range(repeats):
        for name, fn in (items if (k + r) % 2 == 0 else items[::-1]):
            out[name].append(timed(fn)[0])
    return out


def stage1(adapter, prepared, targets, repeats: int, with_captum: bool, methods) -> dict:
    """Per method: medians of ours (and captum's), their ratio, and the floor ratio. numpy's
    and scipy's BLAS run single-threaded meanwhile, as in ``kernels.py``
    (``common.single_threaded_blas``)."""
    with single_threaded_blas():
        return _stage1(adapter, prepared, targets, repeats, with_captum, methods)


def _stage1(adapter, prepared, targets, repeats: int, with_captum: bool, methods) -> dict:
    floors = [min(per_sample_scan(adapter, p, GPU_FLOOR_BATCHES, repeats=3).values())
              for p in prepared]
    result = {}
    for m in methods:
        params = STAGE1[m][0]
        rows = {"ours": [], "captum": [], "ratio_to_floor": [], "ratio_ours_captum": []}
        for k, (p, t) in enumerate(zip(prepared, targets)):
            calls = {"ours": lambda p=p, t=t: attribute(adapter, p, m, target=t, **params)}
            if with_captum:
                calls["captum"] = captum_call(m, adapter, p, t)
            for fn in calls.values():                     # warm-up (cuDNN picks its kernels)
                fn()
            got = side_by_side(calls, repeats, k)
            for name, ms in got.items():
                rows[name] += ms
            fwd = METHODS[m].cost(p, **params)[0]
            rows["ratio_to_floor"] += [ms / (fwd * floors[k]) for ms in got["ours"]]
            if with_captum:       # paired: ours and captum timed back to back; per instance
                # the geometric mean over its repeats (each order equally often when even), as
                # kernels.py balances the positions within an instance
                rows["ratio_ours_captum"].append(geometric_mean(
                    [o / c for o, c in zip(got["ours"], got["captum"])]))
        entry = {"median_ms_ours": median(rows["ours"]), "ratio_to_floor": median(rows["ratio_to_floor"])}
        if with_captum:
            entry["median_ms_captum"] = median(rows["captum"])
            entry["ratio_ours_captum"] = median(rows["ratio_ours_captum"])
            entry["ratio_of_medians_ours_captum"] = (entry["median_ms_ours"]
                                                     / entry["median_ms_captum"])
        result[m] = entry
        print(f"{m:22s} ours {entry['median_ms_ours']:8.2f} ms"
              + (f"  captum {entry['median_ms_captum']:8.2f} ms  ratio "
                 f"{entry['ratio_ours_captum']:5.2f}" if with_captum else "")
              + f"  floor x{entry['ratio_to_floor']:.1f}", flush=True)
    return {"per_sample_forward_ms": median(floors), "floor_batches": list(GPU_FLOOR_BATCHES),
            "methods": result}


def second_order(adapter, prepared, targets, repeats: int) -> dict:
    image, text = adapter.names[0], adapter.names[1]
    rows = {"vmap": [], "replicate": [], "loop": [], "shared_graph_loop": []}
    worst = 0.0
    for k, (p, t) in enumerate(zip(prepared, targets)):
        calls = {mode: (lambda p=p, t=t, mode=mode: interaction(
                     adapter, p, "second_order", modalities=(image, text), target=t, mode=mode))
                 for mode in ("vmap", "replicate")}
        calls["loop"] = lambda p=p, t=t: sog_per_token_loop(adapter, p, t, image, text)
        calls["shared_graph_loop"] = lambda p=p, t=t: sog_per_token_loop(
            adapter, p, t, image, text, shared_graph=True)
        outs = {name: fn() for name, fn in calls.items()}          # warm-up, and the check
        ref = outs["loop"]
        for mode in ("vmap", "replicate"):
            worst = max(worst, float(np.abs(outs[mode].matrix - ref).max()
                                     / max(np.abs(ref).max(), 1e-12)))
        for name, ms in side_by_side(calls, repeats, k).items():
            rows[name] += ms
    med = {name: median(v) for name, v in rows.items()}
    out = {"median_ms": med, "speedup_over_loop": {m: med["loop"] / med[m] for m in ("vmap", "replicate")},
           "speedup_over_shared_graph_loop": {m: med["shared_graph_loop"] / med[m]
                                              for m in ("vmap", "replicate")},
           "max_relative_difference_to_loop": worst}
    print(f"second-order  vmap {med['vmap']:.2f} ms  replicate {med['replicate']:.2f} ms  "
          f"per-token loop {med['loop']:.2f} ms  shared-graph loop {med['shared_graph_loop']:.2f} ms",
          flush=True)
    return out


def emap_speed(adapter, dataset, n: int, reference_pairs: int, repeats: int, seed: int) -> dict:
    instances = _emap_instances(dataset, n, seed)
    out = {"n": n, "reference_pairs_timed": reference_pairs}
    emap_unbatched(adapter, instances, pairs=8)                     # warm-up
    ref = [timed(lambda: emap_unbatched(adapter, instances, pairs=reference_pairs))[0]
           * n * n / reference_pairs / 1e3 for _ in range(repeats)]
    out["unbatched_reference_s"] = median(ref)
    for label, factorized in (("traced", "traced"), ("full_forwards", False)):
        emap(adapter, instances, factorized=factorized)             # warm-up
        secs = [timed(lambda: emap(adapter, instances, factorized=factorized))[0] / 1e3
                for _ in range(repeats)]
        out[label] = {"median_s": median(secs), "speedup": median(ref) / median(secs)}
        print(f"EMAP {label:14s} {median(secs):.3f} s  reference {median(ref):.2f} s  "
              f"speedup {median(ref) / median(secs):.1f}x", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20, help="instances (median over them)")
    ap.add_argument("--repeats", type=int, default=3, help="timings per instance and call")
    ap.add_argument("--reference-pairs", type=int, default=1000,
                    help="pairs of the unbatched EMAP reference timed (then extrapolated to N^2)")
    ap.add_argument("--methods", nargs="*", default=list(STAGE1), help=f"subset of {list(STAGE1)}")
    ap.add_argument("--emap-n", type=int, default=EMAP_N, help="EMAP instances (N x N pairs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", help="cuda (or cpu, to check the script)")
    ap.add_argument("--out", default=str(RESULTS / "kernels_gpu.json"))
    args = ap.parse_args(argv)
    unknown = sorted(set(args.methods) - set(STAGE1))
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {list(STAGE1)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks/kernels_gpu.py needs a CUDA device, and torch sees none here; "
              "benchmarks/kernels.py measures the kernels on the CPU.", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message="Input Tensor .* did not already require gradients")
    adapter, dataset, note = load_demo(allow_stand_in=False)
    adapter.model.to(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.init()
    with_captum = importlib.util.find_spec("captum") is not None
    if not with_captum:
        print("captum is not installed: stage 1 is timed without it", file=sys.stderr)
    indices = shape_or_color_indices(dataset, args.n, seed=args.seed)
    prepared = [adapter.prepare(dataset[int(i)]) for i in indices]
    targets = [resolve_target(adapter, p) for p in prepared]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    result = {"model": note, "device": device, "n": len(indices),
              "repeats": args.repeats, "indices": [int(i) for i in indices],
              "environment": environment(),
              "stage1": stage1(adapter, prepared, [t.index for t in targets], args.repeats,
                               with_captum, args.methods),
              "second_order": second_order(adapter, prepared, targets, args.repeats),
              "emap": emap_speed(adapter, dataset, args.emap_n, args.reference_pairs,
                                 args.repeats, args.seed)}
    print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
