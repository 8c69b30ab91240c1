"""Faithfulness of every stage-1 method's image map on easy-VQA (issue criterion).

For --n test questions about a shape or a colour (default 500, a seeded sample), each stage-1
method explains the model's predicted answer (by default the image's units, the question held as
it is, as deletion and insertion do; ``--explain all`` explains both modalities jointly); its
image map is pooled to R >= 0 per pixel and scored against the shape's pixels (the ground-truth mask, found from the picture by
``easy_vqa.shape_mask``):

* relevance mass accuracy: share of R inside the mask;
* relevance rank accuracy: share of the top-|GT| pixels of R inside the mask;
* deletion / insertion AUC: image patches removed (set to the white baseline) / inserted in the
  order of the method's patch scores, the question intact, integrating the softmax probability
  of the explained answer (deletion lower is better, insertion higher is better);
* deletion AOPC: the mean fall of that probability along the deletion curve (higher is better);

beside two controls that do not look at the model: a random map (uniform noise per pixel; a
random patch order) and an input-only map (each pixel's squared distance from the white baseline,
summed over channels; patches in the order of its sums). The ground truth is "the pixels that
differ from the background", so the input-only map localises the shape almost perfectly: relevance
mass and rank measure how well a map *finds the shape*, and a method beats the input-only control
there only by ignoring the background more completely. Deletion and insertion are the columns that
say whether the model relied on what the map ranks first. Writes

    {"n": ..., "methods": {NAME: {"relevance_mass", "relevance_rank", "deletion_auc",
     "insertion_auc", ...}}, "random": {...}, "input_only": {...}, ...}

to --out (default benchmarks/results/faithfulness.json). Criterion: the best method's mean
relevance mass is at least 0.7 (the JSON also records whether it beats the input-only control).

    python benchmarks/faithfulness.py --n 500
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, load_demo, shape_or_color_indices, write_json  # noqa: E402

from multiviz_widgets.demos.easy_vqa import question_kind, shape_mask  # noqa: E402
from multiviz_widgets.kernels.metrics import (POOLINGS, aopc, deletion_insertion,  # noqa: E402
                                              pixel_relevance, relevance_mass, relevance_rank)
from multiviz_widgets.kernels.unimodal import METHODS, attribute  # noqa: E402

POOLING = "clip"
MASS_MIN = 0.7
METRICS = ("relevance_mass", "relevance_rank", "deletion_auc", "insertion_auc", "deletion_aopc")


def score_map(heatmap, gt, pooling: str) -> tuple[float, float]:
    r = pixel_relevance(heatmap, pooling)
    return relevance_mass(r, gt), relevance_rank(r, gt)


def input_only_map(prepared) -> np.ndarray:
    """[H, W]: each pixel's squared distance from the image's baseline, summed over channels."""
    x, b = prepared.continuous["image"], prepared.baseline["image"]
    return ((x - b) ** 2).sum(0).double().cpu().numpy()


def unit_sums(prepared, pixel_map: np.ndarray) -> np.ndarray:
    """[n_units]: a per-pixel map summed over each image unit (patch)."""
    index = prepared.index["image"][0].reshape(-1).cpu().numpy()
    return np.bincount(index, weights=pixel_map.reshape(-1),
                       minlength=prepared.n_units["image"])


def summarise(rows: list[dict], kinds: list[str]) -> dict:
    out = {}
    for k in rows[0]:
        v = np.array([r[k] for r in rows], dtype=np.float64)
        out[k] = float(v.mean())
        out[k + "_std"] = float(v.std())
    by_kind = {}
    for kind in sorted(set(kinds)):
        sel = [r for r, q in zip(rows, kinds) if q == kind]
        by_kind[kind] = {k: float(np.mean([r[k] for r in sel])) for k in METRICS}
        by_kind[kind]["n"] = len(sel)
    out["by_question_kind"] = by_kind
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=500, help="questions about a shape or a colour")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), help=f"subset of {list(METHODS)}")
    ap.add_argument("--n-samples", type=int, default=500, help="LIME / KernelSHAP samples")
    ap.add_argument("--steps", type=int, default=50, help="integrated-gradients steps")
    ap.add_argument("--explain", choices=["image", "all"], default="image",
                    help="image: explain the image with the question held as it is (as deletion "
                         "and insertion do); all: explain both modalities jointly")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "faithfulness.json"))
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error(f"--n must be at least 1 (questions to explain), got {args.n}")
    if not args.methods:
        ap.error(f"--methods needs at least one of {list(METHODS)} (or leave it out for all)")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    adapter, dataset, note = load_demo()
    indices = shape_or_color_indices(dataset, args.n, seed=args.seed)
    explain = {"modalities": ["image"]} if args.explain == "image" else {}
    params = {m: dict(explain) for m in args.methods}
    for m in ("lime", "kernel_shap"):
        if m in params:
            params[m]["n_samples"] = args.n_samples
    if "integrated_gradients" in params:
        params["integrated_gradients"]["steps"] = args.steps
    rng = np.random.default_rng(args.seed)
    rows = {m: [] for m in args.methods}
    rows["random"] = []
    rows["input_only"] = []
    seconds = {m: 0.0 for m in args.methods}
    kinds, correct, shares = [], [], []
    for k, i in enumerate(indices):
        inst = dataset[int(i)]
        gt = shape_mask(inst["image"])
        p = adapter.prepare(inst)
        c = int(adapter.predict(p.raw).argmax(1)[0])
        kinds.append(question_kind(dataset.questions[int(i)]))
        correct.append(c == int(dataset.labels[int(i)]))
        shares.append(float(gt.mean()))
        for m in args.methods:
            r = attribute(adapter, p, method=m, target=c, **params[m])
            seconds[m] += r.seconds
            mass, rank = score_map(r.maps["image"], gt, POOLING)
            mass_abs, rank_abs = score_map(r.maps["image"], gt, "abs")
            d, ins, curve, _ = deletion_insertion(adapter, p, "image", r.scores["image"], c)
            rows[m].append({"relevance_mass": mass, "relevance_rank": rank, "deletion_auc": d,
                            "insertion_auc": ins, "deletion_aopc": aopc(curve),
                            "relevance_mass_abs": mass_abs,
                            "relevance_rank_abs": rank_abs})
        noise = rng.random(gt.shape)
        mass, rank = score_map(noise, gt, POOLING)
        d, ins, curve, _ = deletion_insertion(adapter, p, "image", rng.random(p.n_units["image"]),
                                              c)
        rows["random"].append({"relevance_mass": mass, "relevance_rank": rank, "deletion_auc": d,
                               "insertion_auc": ins, "deletion_aopc": aopc(curve),
                               "relevance_mass_abs": mass,
                               "relevance_rank_abs": rank})
        ink = input_only_map(p)
        mass, rank = score_map(ink, gt, POOLING)
        d, ins, curve, _ = deletion_insertion(adapter, p, "image", unit_sums(p, ink), c)
        rows["input_only"].append({"relevance_mass": mass, "relevance_rank": rank,
                                   "deletion_auc": d, "insertion_auc": ins,
                                   "deletion_aopc": aopc(curve), "relevance_mass_abs": mass,
                                   "relevance_rank_abs": rank})
        if (k + 1) % 25 == 0 or k + 1 == len(indices):
            print(f"{k + 1}/{len(indices)} questions, {time.perf_counter() - t_start:.0f} s",
                  flush=True)
    methods = {}
    for m in args.methods:
        methods[m] = summarise(rows[m], kinds)
        methods[m]["params"] = dict(METHODS[m].defaults, **params[m])
        methods[m]["mean_seconds"] = seconds[m] / len(indices)
    best = max(methods, key=lambda m: methods[m]["relevance_mass"])
    result = {
        "n": len(indices),
        "model": note,
        "question_kinds": {k: kinds.count(k) for k in sorted(set(kinds))},
        "model_accuracy_on_these": float(np.mean(correct)),
        "explained": ("the image, the question held as it is" if args.explain == "image"
                      else "image and question jointly (the image part is scored)"),
        "target": "the model's predicted answer (softmax probability for deletion/insertion)",
        "pooling": POOLINGS[POOLING] + " (the *_abs fields: " + POOLINGS["abs"] + ")",
        "ground_truth": "easy_vqa.shape_mask(image): the shape's pixels",
        "mean_mask_share": float(np.mean(shares)),
        "deletion_insertion": "image patches (64) set to / restored from the white baseline in "
                              "the order of the method's patch scores; question intact; trapezoid "
                              "AUC over the fraction of patches; AOPC: mean of p_0 - p_k over "
                              "the deletion curve's 65 points",
        "methods": methods,
        "random": summarise(rows["random"], kinds),
        "input_only": summarise(rows["input_only"], kinds),
        "input_only_map": "each pixel's squared distance from the white baseline, summed over "
                          "channels (no model); its patch sums order deletion and insertion",
        "best_method": best,
        "best_relevance_mass": methods[best]["relevance_mass"],
        "criterion": {"best_relevance_mass_min": MASS_MIN,
                      "passed": methods[best]["relevance_mass"] >= MASS_MIN and len(indices) >= 500,
                      "n_min": 500},
        "seconds": time.perf_counter() - t_start,
        "environment": environment(),
    }
    ink_mass = result["input_only"]["relevance_mass"]
    result["criterion"]["best_beats_input_only"] = methods[best]["relevance_mass"] > ink_mass
    path = write_json(args.out, result)
    for m in list(methods) + ["random", "input_only"]:
        s = methods.get(m) or result[m]
        print(f"{m:22s} mass {s['relevance_mass']:.3f}  rank {s['relevance_rank']:.3f}  "
              f"deletion {s['deletion_auc']:.3f}  insertion {s['insertion_auc']:.3f}  "
              f"AOPC {s['deletion_aopc']:.3f}")
    print(f"best: {best} ({methods[best]['relevance_mass']:.3f}); wrote {path}")
    return result


if __name__ == "__main__":
    main()
