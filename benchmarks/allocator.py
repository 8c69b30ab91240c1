"""glibc's malloc settings and the speed of the stage-1 kernels, each setting in fresh processes.

    python benchmarks/allocator.py [--rounds 3] [--n 6] [--repeats 3] [--out benchmarks/results/allocator.json]

By default glibc hands every allocation above its mmap threshold (128 KiB at the start) to a
fresh ``mmap`` and unmaps it on free, so every batch's multi-MB tensors are page-faulted in
anew. glibc raises that threshold on its own once large blocks are freed, so a long-running
process often gets faster by itself, but a fresh kernel (the demo's, a new notebook's) starts
slow. ``TUNED`` keeps blocks up to 32 MiB on the heap and returns memory to the system only
when 256 MiB are free at its top. Setting only one of the two is worse than neither: it turns
off glibc's dynamic threshold.

``make demo`` starts JupyterLab (and so the notebook's kernel) with ``TUNED``. The library itself
sets nothing: an allocator setting applies to the user's whole process.

Each round runs one fresh process with glibc's defaults and one with ``TUNED`` (the order
alternates between rounds, so a drift of the machine's speed affects both alike). Each process
loads the demo model, warms every method up on one instance, then times ``repeats`` calls on
each of ``n`` test instances. Reported per method: each process's median, the median over the
rounds, and the ratio default / tuned (above 1: the setting helps).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, environment, load_demo, median, timed, write_json  # noqa: E402

from multiviz_widgets.kernels.common import sample_indices  # noqa: E402

#: The settings ``make demo`` exports (a test checks that the Makefile says the same).
TUNED = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "268435456"}
METHODS = ("occlusion", "lime", "kernel_shap", "integrated_gradients", "gradient")


def child(methods, n: int, repeats: int, threads: int, seed: int) -> dict:
    """One measurement in this (fresh) process; prints a JSON line."""
    from multiviz_widgets.kernels.unimodal import attribute

    torch.set_num_threads(threads)
    adapter, dataset, note = load_demo("test")
    prepared = [adapter.prepare(dataset[int(i)]) for i in sample_indices(len(dataset), n, seed)]
    out = {"settings": {k: os.environ.get(k) for k in TUNED}, "model": note, "methods": {}}
    for m in methods:
        first_ms, _ = timed(lambda: attribute(adapter, prepared[0], m))
        times = [timed(lambda: attribute(adapter, p, m))[0] for p in prepared for _ in range(repeats)]
        out["methods"][m] = {"median_ms": median(times), "first_call_ms": first_ms}
    print(json.dumps(out))
    return out


def _run_child(tuned: bool, args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TUNED}
    if tuned:
        env.update(TUNED)
    cmd = [sys.executable, __file__, "--child", "--methods", *args.methods, "--n", str(args.n),
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--seed", str(args.seed)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"the {'tuned' if tuned else 'default'} process failed:\n"
                           f"{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=6, help="test instances per process")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per instance")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS / "allocator.json"))
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.n < 1 or args.repeats < 1:
        ap.error("--rounds, --n and --repeats must be at least 1")
    if args.child:
        return child(args.methods, args.n, args.repeats, args.threads, args.seed)
    rounds = []
    for k in range(args.rounds):
        order = (False, True) if k % 2 == 0 else (True, False)
        got = {("tuned" if t else "default"): _run_child(t, args) for t in order}
        rounds.append(got)
        print(f"round {k + 1}: " + "  ".join(
            f"{m} {got['default']['methods'][m]['median_ms']:.1f} -> "
            f"{got['tuned']['methods'][m]['median_ms']:.1f} ms" for m in args.methods), flush=True)
    summary = {}
    for m in args.methods:
        d = median([r["default"]["methods"][m]["median_ms"] for r in rounds])
        t = median([r["tuned"]["methods"][m]["median_ms"] for r in rounds])
        summary[m] = {"default_median_ms": d, "tuned_median_ms": t, "default_over_tuned": d / t}
        print(f"{m:22s} default {d:7.1f} ms  tuned {t:7.1f} ms  default/tuned {d / t:4.2f}")
    result = {"environment": environment(), "tuned_settings": TUNED, "n": args.n,
              "repeats": args.repeats, "rounds": rounds, "methods": summary,
              "model": rounds[0]["default"]["model"]}
    path = write_json(args.out, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
