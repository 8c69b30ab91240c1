"""Stages 3 and 4 on easy-VQA: streaming neuron extremes and the sparse linear model.

    python benchmarks/representations.py [--out benchmarks/results/representations.json]

Reports
* ``extremes_vqa``: the time of the global neuron analysis over the easy-VQA test split (9,673
  questions), forward passes included: one streaming pass (top-k and bottom-k of every neuron),
  target under 30 s on 2 cores;
* ``memory``: the peak memory of the streaming pass at N = 9,673 and N = 100,000 synthetic
  instances (random [B, d] batches generated on the fly), each measured in a fresh process as
  the growth of the peak resident set (VmHWM, reset before the pass) plus tracemalloc's peak;
  the target is a peak that does not grow with N. Also the real model at N = 2,000 and 9,673;
* ``cache``: extracting the test features, then reopening them from the on-disk cache;
* ``sparse``: the elastic-net path fit on the train split's features (to the model's own
  predictions), its sparsity chosen on a validation part of train, the fidelity on the test
  split: fit time (target under 60 s), fidelity (target >= 0.95), fraction of non-zero weights
  (target <= 0.10), non-zeros per class and the fidelity-vs-non-zeros curve.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS, ROOT, environment, load_demo, reset_peak_rss,  # noqa: E402
                    status_kib, write_json)

from multiviz_widgets.kernels.prediction import fit_sparse_model  # noqa: E402
from multiviz_widgets.kernels.representations import (  # noqa: E402
    StreamingExtremes, extract_features, neuron_extremes)


def child(args) -> dict:
    """One memory measurement in this (fresh) process; prints a JSON line."""
    torch.set_num_threads(args.threads)
    d, k, b = args.d, args.k, args.batch_size
    if args.child == "synthetic":
        gen = torch.Generator().manual_seed(0)
        def batches():
            for s in range(0, args.n, b):
                m = min(b, args.n - s)
                yield torch.arange(s, s + m), torch.randn(m, d, generator=gen)
        run = None
    else:
        adapter, dataset, note = load_demo("test")
        idx = np.arange(min(args.n, len(dataset)))
        dataset.fingerprint()
        run = (adapter, dataset, idx)
        next(iter(dataset.batches(b, idx[:b])))       # touch the data path once
    ext = StreamingExtremes(k)
    import gc
    gc.collect()
    base = status_kib("VmRSS")
    reset = reset_peak_rss()
    tracemalloc.start()
    t0 = time.perf_counter()
    if run is None:
        for i, h in batches():
            ext.update(h, i)
        res = ext.result()
    else:
        res = neuron_extremes(run[0], run[1], k=k, batch_size=b, indices=run[2])
    seconds = time.perf_counter() - t0
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak = status_kib("VmHWM")
    out = {"kind": args.child, "n": int(res.n_instances), "d": int(res.d), "k": k,
           "batch_size": b, "seconds": seconds,
           "peak_rss_growth_mib": (peak - base) / 1024 if reset else None,
           "tracemalloc_peak_mib": traced_peak / 2**20,
           "kept_state_kib": k * res.d * 2 * (4 + 8) / 1024,
           "store_all_h_mib": res.n_instances * res.d * 4 / 2**20}
    print(json.dumps(out))
    return out


def measure(kind: str, n: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--n", str(n), "--d", str(args.d),
           "--k", str(args.k), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"memory child failed: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS / "representations.json"))
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--d", type=int, default=64, help="synthetic feature width (easy-VQA: 64)")
    ap.add_argument("--n-synthetic", type=int, nargs="+", default=[9673, 100_000])
    ap.add_argument("--n-lambdas", type=int, default=20)
    ap.add_argument("--solver", default="sklearn")
    ap.add_argument("--skip-sparse", action="store_true")
    ap.add_argument("--full-path", action="store_true",
                    help="fit the whole path (no early stop) to report the full fidelity curve")
    ap.add_argument("--compare-solvers", action="store_true",
                    help="also fit with glm_saga (the original MultiViz solver) for comparison")
    ap.add_argument("--child", choices=["synthetic", "vqa"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    torch.set_num_threads(args.threads)
    out: dict = {"benchmark": "representations", "environment": environment(),
                 "params": {"k": args.k, "batch_size": args.batch_size, "threads": args.threads}}

    adapter, test, note = load_demo("test")
    out["model"] = note
    print(note, flush=True)

    # 1. global neuron analysis over the test split, forward passes included
    t0 = time.perf_counter()
    ext = neuron_extremes(adapter, test, k=args.k, batch_size=args.batch_size)
    secs = time.perf_counter() - t0
    out["extremes_vqa"] = {"n": len(test), "d": ext.d, "k": ext.k, "seconds": secs,
                           "forward_passes": ext.forward_passes, "target_seconds": 30,
                           "meets_target": secs < 30}
    print("extremes over the test split:", out["extremes_vqa"], flush=True)

    # 2. peak memory vs N (fresh processes)
    mem = []
    for n in args.n_synthetic:
        mem.append(measure("synthetic", n, args))
        print("memory", mem[-1], flush=True)
    for n in (2000, len(test)):
        mem.append(measure("vqa", n, args))
        print("memory", mem[-1], flush=True)
    syn = [m for m in mem if m["kind"] == "synthetic"]
    out["memory"] = {"runs": mem, "note": "peak RSS growth during the streaming pass (VmHWM reset "
                     "before it) and tracemalloc's peak (numpy/Python only; torch's allocator is "
                     "not traced); store_all_h_mib is what keeping every h would need"}
    if len(syn) >= 2 and all(m["peak_rss_growth_mib"] is not None for m in syn):
        out["memory"]["synthetic_peak_ratio_largest_vs_smallest_n"] = (
            syn[-1]["peak_rss_growth_mib"] / max(1e-3, syn[0]["peak_rss_growth_mib"]))

    # 3. feature cache: extract, then reopen
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        f1 = extract_features(adapter, test, batch_size=args.batch_size, cache_dir=tmp)
        t1 = time.perf_counter()
        f2 = extract_features(adapter, test, batch_size=args.batch_size, cache_dir=tmp)
        t2 = time.perf_counter()
        out["cache"] = {"extract_seconds": t1 - t0, "reopen_seconds": t2 - t1,
                        "reopen_from_cache": f2.from_cache, "file_mib":
                        os.path.getsize(f1.path) / 2**20}
    print("cache:", out["cache"], flush=True)
    test_feats = f1

    # 4. the sparse linear model
    if not args.skip_sparse:
        from multiviz_widgets.demos import easy_vqa
        train = easy_vqa.load_dataset("train")
        t0 = time.perf_counter()
        train_feats = extract_features(adapter, train, batch_size=args.batch_size)
        extract_s = time.perf_counter() - t0
        print(f"train features: {train_feats.h.shape} in {extract_s:.1f} s "
              f"(cached: {train_feats.from_cache})", flush=True)
        solvers = [args.solver] + (["glm_saga"] if args.compare_solvers and args.solver != "glm_saga" else [])
        out["sparse"] = {}
        for solver in solvers:
            t0 = time.perf_counter()
            m = fit_sparse_model(train_feats, test=test_feats, class_names=adapter.class_names,
                                 n_lambdas=args.n_lambdas, solver=solver,
                                 stop_early=not args.full_path,
                                 progress=lambda d, t, msg: print(f"  path point {d}/{t}", flush=True))
            fit_s = time.perf_counter() - t0
            res = {"solver": solver, "fit_seconds": fit_s, "target_fit_seconds": 60,
                   "train_feature_seconds": extract_s, "train_features_cached": train_feats.from_cache,
                   "n_train": m.n_train, "n_val": m.n_val, "n_test": m.n_test, "d": m.d,
                   "chosen": m.chosen, "lambda": m.lam, "val_fidelity": m.val_fidelity,
                   "test_fidelity": m.test_fidelity, "target_fidelity": 0.95,
                   "fraction_nonzero": m.fraction_nonzero, "target_fraction_nonzero": 0.10,
                   "nonzeros_per_class": dict(zip(m.class_names, m.nonzeros_per_class.tolist())),
                   "curve": m.curve(), "stop_early": m.params["stop_early"],
                   "path_points_fitted": m.params["stopped_at"], "n_lambdas": args.n_lambdas,
                   "point_seconds": m.params["point_seconds"],
                   "model_test_accuracy": float((test_feats.predictions == test.labels).mean()),
                   "sparse_test_accuracy_vs_labels": float((m.predict(test_feats.h) == test.labels).mean())}
            res["meets_targets"] = bool(fit_s < 60 and m.test_fidelity >= 0.95
                                        and m.fraction_nonzero <= 0.10)
            out["sparse"][solver] = res
            print(f"sparse ({solver}): fit {fit_s:.1f} s, test fidelity {m.test_fidelity:.4f}, "
                  f"non-zero {m.fraction_nonzero:.3f}, chosen {m.chosen}", flush=True)
    path = write_json(args.out, out)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
