"""EMAP gap over large reference sets of the easy-VQA test split: time and peak memory.

    python benchmarks/emap_scale.py [--n 100 1000 3000] [--out benchmarks/results/emap_scale.json]

``emap_gap`` evaluates all N^2 pairs (image of instance i, question of instance j). It sums the
pairs chunk by chunk (row sums, column sums, diagonal), so its memory should grow with N (the
N instances and their encodings), not with the N^2 x 13 pair matrix. Each N runs in a fresh
process; reported: seconds, pairs per second, the growth of the peak resident set during the
call (VmHWM reset just before it), and the size the whole pair matrix would have taken.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS, ROOT, environment, load_demo, reset_peak_rss,  # noqa: E402
                    status_kib, write_json)

from multiviz_widgets.kernels.common import sample_indices  # noqa: E402
from multiviz_widgets.kernels.emap import emap_gap  # noqa: E402


def child(n: int, threads: int, seed: int) -> dict:
    """One measurement in this (fresh) process; prints a JSON line."""
    torch.set_num_threads(threads)
    adapter, dataset, note = load_demo("test")
    idx = sample_indices(len(dataset), n, seed)
    emap_gap(adapter, dataset, indices=idx[:20])               # warm-up (and the traced split)
    gc.collect()
    base = status_kib("VmRSS")
    reset = reset_peak_rss()
    t0 = time.perf_counter()
    r = emap_gap(adapter, dataset, indices=idx)
    seconds = time.perf_counter() - t0
    peak = status_kib("VmHWM")
    out = {"n": n, "pairs": n * n, "seconds": seconds, "pairs_per_second": n * n / seconds,
           "peak_rss_growth_mib": (peak - base) / 1024 if reset else None,
           "pair_matrix_mib": n * n * adapter.n_classes * 8 / 2**20,
           "gap_points": r["gap_points"], "agreement": r["agreement"], "model": note}
    print(json.dumps(out))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[100, 1000, 3000])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS / "emap_scale.json"))
    args = ap.parse_args(argv)
    if args.child is not None:
        return child(args.child, args.threads, args.seed)
    runs = []
    for n in args.n:
        cmd = [sys.executable, __file__, "--child", str(n), "--threads", str(args.threads),
               "--seed", str(args.seed)]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if p.returncode != 0:
            raise RuntimeError(f"N = {n} failed: {p.stderr[-2000:]}")
        runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
        r = runs[-1]
        print(f"N = {n:5d}  {r['seconds']:7.1f} s  {r['pairs_per_second']:9.0f} pairs/s  peak "
              f"+{r['peak_rss_growth_mib']:.0f} MiB (pair matrix: {r['pair_matrix_mib']:.0f} MiB)  "
              f"gap {r['gap_points']:.1f} points", flush=True)
    result = {"environment": environment(), "runs": runs}
    path = write_json(args.out, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
