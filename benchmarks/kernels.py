"""Speed of the kernels on the easy-VQA model, side by side in one run (issue criterion 6).

Stage 1: every method of ``multiviz_widgets.kernels.unimodal`` against captum's own equivalent at
equal forward passes (Saliency, InputXGradient, IntegratedGradients, FeatureAblation with a
feature mask, Lime, KernelShap, with perturbations_per_eval = our batch size), all on a forward
function over the same continuous inputs (image pixels, question embeddings). Medians over
--n instances (questions about a shape or a colour), the two implementations interleaved.
Each kernel is also compared with its floor: forward passes x the best per-sample time of a
large batched forward pass.

Stage 2 (``benchmarks/kernels_stage2.py``, written separately): merged under "stage2" when present.

    python benchmarks/kernels.py --n 20 --out benchmarks/results/kernels.json
"""
from __future__ import annotations

import argparse
import warnings
import importlib.util
import sys
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS, environment, load_demo, median, per_sample_forward_backward_ms,  # noqa: E402,E501
                    per_sample_forward_ms, shape_or_color_indices, timed, write_json)

from multiviz_widgets.kernels.common import PERTURBATION_BATCH  # noqa: E402
from multiviz_widgets.kernels.unimodal import attribute  # noqa: E402

BATCH = PERTURBATION_BATCH   # the kernels' default; captum gets the same perturbations_per_eval
#: method -> (our parameters, target median in ms or None)
STAGE1 = {
    "gradient": ({}, 20.0),
    "grad_x_input": ({}, 20.0),
    "integrated_gradients": ({"steps": 50, "rule": "gausslegendre", "internal_batch_size": 128}, 150.0),
    "occlusion": ({"batch_size": BATCH}, None),
    "lime": ({"n_samples": 500, "batch_size": BATCH}, 1500.0),
    "kernel_shap": ({"n_samples": 500, "batch_size": BATCH}, 1500.0),
}
CAPTUM_NAMES = {"gradient": "Saliency(abs=False)", "grad_x_input": "InputXGradient",
                "integrated_gradients": "IntegratedGradients(n_steps=50, gausslegendre)",
                "occlusion": "FeatureAblation(feature_mask, perturbations_per_eval=256)",
                "lime": "Lime(feature_mask, n_samples=500, perturbations_per_eval=256)",
                "kernel_shap": "KernelShap(feature_mask, n_samples=500, perturbations_per_eval=256)"}
RATIO_MAX, FLOOR_MAX = 1.1, 1.5


def captum_call(method: str, adapter, prepared, target: int):
    """A zero-argument function running captum's equivalent of ``method`` on the instance."""
    from captum.attr import (FeatureAblation, InputXGradient, IntegratedGradients, KernelShap,
                             Lime, Saliency)

    names = prepared.names
    inputs = tuple(prepared.continuous[n].unsqueeze(0) for n in names)
    baselines = tuple(prepared.baseline[n].unsqueeze(0) for n in names)
    masks, offset = [], 0
    for n in names:
        masks.append((prepared.index[n] + offset).unsqueeze(0))
        offset += prepared.n_units[n]
    masks = tuple(masks)

    def forward(*xs):
        return adapter.forward(prepared.raw, dict(zip(names, xs)))

    if method == "gradient":
        return lambda: Saliency(forward).attribute(inputs, target=target, abs=False)
    if method == "grad_x_input":
        return lambda: InputXGradient(forward).attribute(inputs, target=target)
    if method == "integrated_gradients":
        return lambda: IntegratedGradients(forward).attribute(
            inputs, baselines=baselines, target=target, n_steps=50, method="gausslegendre",
            internal_batch_size=128)
    if method == "occlusion":
        return lambda: FeatureAblation(forward).attribute(
            inputs, baselines=baselines, target=target, feature_mask=masks,
            perturbations_per_eval=BATCH)
    if method == "lime":
        return lambda: Lime(forward).attribute(
            inputs, baselines=baselines, target=target, feature_mask=masks, n_samples=500,
            perturbations_per_eval=BATCH)
    if method == "kernel_shap":
        return lambda: KernelShap(forward).attribute(
            inputs, baselines=baselines, target=target, feature_mask=masks, n_samples=500,
            perturbations_per_eval=BATCH)
    raise ValueError(method)


def run_stage1(adapter, dataset, indices, repeats: int = 1, methods=None,
               floor_batch: int | None = None) -> dict:
    """Per method: median ms ours and captum's, ratio, passes, floor, targets, pass/fail."""
    methods = list(methods or STAGE1)
    prepared = [adapter.prepare(dataset[int(i)]) for i in indices]
    targets = [int(adapter.predict(p.raw).argmax(1)[0]) for p in prepared]
    out = {"floor_batch": floor_batch, "methods": {}}
    for m in methods:
        params, target_ms = STAGE1[m]
        # the floor is measured right before each method's timings: this machine's speed drifts
        # by up to 2x over minutes, and a floor from another moment would mislead
        per_sample = min(per_sample_forward_ms(adapter, p, batch=floor_batch) for p in prepared[:2])
        per_sample_fb = min(per_sample_forward_backward_ms(adapter, p, batch=floor_batch)
                            for p in prepared[:2])
        ours_ms, captum_ms, passes = [], [], None
        # warm-up (not timed): first calls allocate and let captum import its submodules
        attribute(adapter, prepared[0], method=m, target=targets[0], **params)
        captum_call(m, adapter, prepared[0], targets[0])()
        for k, (p, t) in enumerate(zip(prepared, targets)):
            ours = lambda: attribute(adapter, p, method=m, target=t, **params)
            theirs = captum_call(m, adapter, p, t)
            for r in range(repeats):
                order = [("ours", ours), ("captum", theirs)]
                if (k + r) % 2:
                    order.reverse()
                for who, fn in order:
                    ms, res = timed(fn)
                    if who == "ours":
                        ours_ms.append(ms)
                        passes = (res.forward_passes, res.backward_passes)
                    else:
                        captum_ms.append(ms)
        mo, mc = median(ours_ms), median(captum_ms)
        floor = passes[0] * per_sample
        entry = {
            "captum": CAPTUM_NAMES[m], "params": params,
            "median_ms_ours": mo, "median_ms_captum": mc, "ratio_ours_captum": mo / mc,
            "forward_passes": passes[0], "backward_passes": passes[1],
            "per_sample_forward_ms": per_sample, "per_sample_forward_backward_ms": per_sample_fb,
            "floor_ms": floor, "ratio_to_floor": mo / floor, "target_ms": target_ms,
            # informative only (not the criterion): gradient methods also need backward passes
            "floor_fwd_bwd_ms": (passes[1] * per_sample_fb + (passes[0] - passes[1]) * per_sample
                                 if passes[1] else None),
            "n_timings": len(ours_ms),
            "pass": {"vs_captum": mo / mc <= RATIO_MAX, "floor": mo / floor <= FLOOR_MAX,
                     "target": None if target_ms is None else mo <= target_ms},
        }
        entry["passed"] = all(v for v in entry["pass"].values() if v is not None)
        out["methods"][m] = entry
        print(f"{m:22s} ours {mo:8.2f} ms  captum {mc:8.2f} ms  ratio {mo / mc:5.2f}  "
              f"passes {passes[0]:4d}  floor {floor:7.2f} ms (x{mo / floor:5.1f})", flush=True)
    return out


def run_stage2(adapter, dataset, indices, repeats: int) -> dict:
    path = Path(__file__).resolve().parent / "kernels_stage2.py"
    if not path.is_file():
        return {"skipped": "benchmarks/kernels_stage2.py is not present"}
    try:
        spec = importlib.util.spec_from_file_location("kernels_stage2", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.run(adapter, dataset, indices, repeats)
    except Exception as e:  # report, never hide: the stage-1 numbers are still written
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20, help="instances (median over them; >= 20)")
    ap.add_argument("--repeats", type=int, default=1, help="timings per instance and method")
    ap.add_argument("--methods", nargs="*", default=None, help=f"subset of {list(STAGE1)}")
    ap.add_argument("--no-stage2", action="store_true", help="skip benchmarks/kernels_stage2.py")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (2 cores)")
    ap.add_argument("--floor-batch", type=int, default=None,
                    help="batch of the forward pass that sets the per-sample floor "
                         "(default: the best over 32..512)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "kernels.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Input Tensor .* did not already require gradients")
    adapter, dataset, note = load_demo()
    indices = shape_or_color_indices(dataset, args.n, seed=args.seed)
    result = {"model": note, "n": len(indices), "repeats": args.repeats,
              "environment": environment(),
              "criteria": {"ratio_ours_captum_max": RATIO_MAX, "ratio_to_floor_max": FLOOR_MAX,
                           "floor": "forward passes x best per-sample time of a batched "
                                    "forward pass (no gradient), over batch sizes "
                                    + (str(args.floor_batch) if args.floor_batch else "32..512")},
              "stage1": run_stage1(adapter, dataset, indices, args.repeats, args.methods,
                                   args.floor_batch)}
    if not args.no_stage2:
        result["stage2"] = run_stage2(adapter, dataset, indices, args.repeats)
    path = write_json(args.out, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
