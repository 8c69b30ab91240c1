"""The embedded easy-VQA model: accuracy, load time and the speed the kernels build on.

    python benchmarks/easy_vqa_model.py [--out benchmarks/results/easy_vqa_model.json] [--threads 2]

Reports
* ``accuracy``: ``evaluate()`` on the full test split (9,673 questions; target >= 0.98);
* ``load``: in a fresh process, the time of ``import torch`` and of ``easy_vqa.load("test")``
  (model + dataset; target under 3 s);
* ``speed``: through the adapter, as the kernels call it (continuous inputs, gradients to both
  modalities): median ms of one forward + backward at batch 1 (target < 5 ms) and batch 50
  (target < 60 ms), and of one forward at batch 512 (target < 150 ms), with ``--threads``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, environment, write_json  # noqa: E402

from multiviz_widgets.demos import easy_vqa  # noqa: E402

TARGETS = {"test_accuracy": 0.98, "load_s": 3.0, "fwd_bwd_b1_ms": 5.0, "fwd_bwd_b50_ms": 60.0,
           "fwd_b512_ms": 150.0}

_LOAD = """
import time, json
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from multiviz_widgets.demos import easy_vqa
adapter, dataset = easy_vqa.load("test")
t2 = time.perf_counter()
print(json.dumps({"import_torch_s": t1 - t0, "load_s": t2 - t1, "total_s": t2 - t0}))
"""


def _median_ms(fn, repeats: int) -> float:
    fn()
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return float(statistics.median(ts))


def speed(adapter, dataset, repeats: int = 30) -> dict:
    p = adapter.prepare(dataset[0])
    out = {}
    for batch in (1, 50, 512):
        cont = {n: v.unsqueeze(0).expand(batch, *v.shape).contiguous()
                for n, v in p.continuous.items()}

        def fwd_bwd():
            leaves = {n: v.detach().requires_grad_(True) for n, v in cont.items()}
            y = adapter.forward(p.raw, leaves)[:, 0]
            torch.autograd.grad(y.sum(), list(leaves.values()))

        def fwd():
            with torch.no_grad():
                adapter.forward(p.raw, cont)

        n = repeats if batch < 512 else max(5, repeats // 3)
        out[f"fwd_bwd_b{batch}_ms"] = _median_ms(fwd_bwd, n)
        out[f"fwd_b{batch}_ms"] = _median_ms(fwd, n)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(RESULTS / "easy_vqa_model.json"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    proc = subprocess.run([sys.executable, "-c", _LOAD], cwd=str(ROOT), capture_output=True,
                          text=True, check=True,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": str(args.threads)})
    load = json.loads(proc.stdout.strip().splitlines()[-1])
    acc = easy_vqa.evaluate()
    adapter, dataset = easy_vqa.load("test")
    sp = speed(adapter, dataset, args.repeats)
    figures = {"test_accuracy": acc["test_accuracy"], "load_s": load["load_s"], **sp}
    result = {
        "benchmark": "easy_vqa_model",
        "environment": environment(),
        "accuracy": acc,
        "load": load,
        "speed": sp,
        "targets": TARGETS,
        "met": {k: (figures[k] >= v if k == "test_accuracy" else figures[k] < v)
                for k, v in TARGETS.items()},
        "note": "Timings depend on the machine's load; compare runs on a quiet machine only.",
    }
    write_json(args.out, result)
    print(json.dumps({"figures": figures, "met": result["met"]}, indent=1))
    return result


if __name__ == "__main__":
    main()
