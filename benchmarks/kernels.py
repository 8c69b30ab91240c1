"""Speed of the kernels on the easy-VQA model, side by side in one run (issue criterion 6).

Stage 1: every method of ``multiviz_widgets.kernels.unimodal`` against captum's own equivalent at
equal forward passes (Saliency, InputXGradient, IntegratedGradients, FeatureAblation with a
feature mask, Lime, KernelShap, with perturbations_per_eval = our batch size), all on a forward
function over the same continuous inputs (image pixels, question embeddings), over --n instances
(questions about a shape or a colour).

Floors. The floor batch is chosen once at the start: the size in FLOOR_BATCHES (32..512) with
the lowest per-sample time of a batched forward pass (and, separately, of a batched forward +
backward). The machine's speed drifts by up to 2x within minutes, so a floor measured at another
moment than the kernel would mislead: for every instance, the per-sample time at the floor batch
(best of 3) is measured again right next to that instance's timings, and each ratio to a floor
is, per instance, the geometric mean of ours / floor over its rounds, then the median over the
instances. The timings of one instance run in rounds: first the floors, then ours, captum's (and
the bare code's) back to back, in every possible order once per cycle (3 sides: 6 orders), so
that each side runs first (right after the floors' large batches, which evict the CPU caches),
second and third equally often, after each of the others. Ratios are taken per instance over
whole cycles, where these position effects cancel (``_time_method`` says what they did before).

What the gradient methods' ratio to captum is made of. Each side is timed once per call, as a
user calls it, so its code runs out of caches that the floors' batches or the other side
evicted; and everything after the backward pass runs on caches the backward pass has evicted.
There a step costs 4 to 19 times what it does in a warm loop (``benchmarks/cold_cache.py``:
numpy's ``isfinite(v).all()`` on the scores 61 us cold against 3 us warm). Captum's Saliency
does almost nothing after its backward pass; ours must pool the gradient into unit scores, make
the maps and the result. So those steps are written for a cold cache: few tensor operations (the
unit sums made in float64 by the reduction itself), no numpy reduction, no comprehension where a
loop will do, and the one-row gradient path skips the rows machinery of integrated gradients.
That took our call from about bare + 330 us to bare + 220 us (captum's: bare + 120 us), measured
by an earlier design of this benchmark (see the README for the ratios by each design). Timed
warm instead (``warm_loop``: WARM_CALLS calls in a row per side and instance, informative), the
two sides take about the same time.

numpy's and scipy's OpenBLAS (not torch's BLAS) run single-threaded during stage 1: captum's
KernelShap fits with scikit-learn, whose OpenBLAS threads keep spinning after the fit; on 2 cores
they slowed whatever ran next by about 1.5x (our lime and kernel_shap alike, and the floors), so
every call timed right after captum's KernelShap paid for it. Captum's own times did not change
measurably (within 3%).

* ``ratio_to_floor`` (the criterion, <= 1.5): ours / (forward passes x per-sample forward time).
* ``ratio_to_fwd_bwd_floor`` (gradient methods, informative): ours / (backward passes x
  per-sample forward+backward time + the other forward passes x per-sample forward time).
* ``ratio_to_bare`` (gradient methods, informative): ours / the same passes written as the
  plainest torch code (``bare_call``).

Every per-instance timing is kept in the JSON (``instances``) to show the spread, and
``ratio_ours_captum_ci95`` (a bootstrap over the instances) says how far the median could move:
``vs_captum_margin`` is "marginal" where the median meets 1.1 and the interval's upper end does
not. Correctness: on each instance's first round our unit scores are compared with captum's
(``max_relative_difference_to_captum``, ``pass.agrees`` at 1e-4). LIME's and KernelSHAP's
samples differ from captum's, so they get a sanity check instead, untimed, once per instance
after its rounds, on the scores of its first round (``sanity_check``, ``pass.agrees`` at 1e-4):
KernelSHAP's efficiency (the scores sum to f(x) - f(baseline)), and LIME against a refit of the
same masks with scikit-learn's Ridge, its sample weights scaled to mean 1 so that its alpha
means ours (``SANITY_NOTE``). Captum's Lime is configured like ours (a ridge fit, alpha 1, and
our similarity kernel on the masks): its defaults (a Lasso, a cosine distance of the full
inputs) cost about 20% more. The penalties are not quite equal: sklearn's Ridge takes alpha as
it is, ours scales it by the mean similarity weight (alpha 1 on samples of mean weight 1, so
that it means the same for any n_samples), which changes the scores by about 1% and not the
cost.

Many instances at once (``stage1.batched``, gradient methods, informative): ``attribute_batch``
over --batched-n other test questions (stacking the rows of questions of equal length into
shared passes) against one ``attribute`` call per instance on the same prepared instances, back
to back in --batched-rounds rounds (order reversed every other round), with the floors measured
next to each round; per-instance time = the call's time / the instances.

Stage 2 (``benchmarks/kernels_stage2.py``, written separately): merged under "stage2" when present.

    python benchmarks/kernels.py --n 20 --out benchmarks/results/kernels.json
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import sys
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (AGREEMENT_MAX, FLOOR_BATCHES, RESULTS, bootstrap_median_ci,  # noqa: E402
                    environment, median, per_sample_forward_backward_ms, per_sample_forward_ms,
                    per_sample_scan, geometric_mean, shape_or_color_indices, single_threaded_blas,
                    start_run, timed, write_json)

from multiviz_widgets.kernels.common import PERTURBATION_BATCH  # noqa: E402
from multiviz_widgets.kernels.unimodal import (  # noqa: E402
    METHODS, _shape_groups, attribute, attribute_batch, integration_rule)

BATCH = PERTURBATION_BATCH   # the kernels' default; captum gets the same perturbations_per_eval
#: method -> (our parameters, target median in ms or None)
STAGE1 = {
    "gradient": ({}, 20.0),
    "grad_x_input": ({}, 20.0),
    "integrated_gradients": ({"steps": 50, "rule": "gausslegendre", "internal_batch_size": 128},
                             150.0),
    "occlusion": ({"batch_size": BATCH}, None),
    "lime": ({"n_samples": 500, "batch_size": BATCH}, 1500.0),
    "kernel_shap": ({"n_samples": 500, "batch_size": BATCH}, 1500.0),
}
CAPTUM_NAMES = {"gradient": "Saliency(abs=False)", "grad_x_input": "InputXGradient",
                "integrated_gradients": "IntegratedGradients(n_steps=50, gausslegendre)",
                "occlusion": f"FeatureAblation(feature_mask, perturbations_per_eval={BATCH})",
                "lime": f"Lime(feature_mask, n_samples=500, perturbations_per_eval={BATCH}, "
                        f"SkLearnRidge(alpha=1.0), our similarity kernel)",
                "kernel_shap": f"KernelShap(feature_mask, n_samples=500, "
                               f"perturbations_per_eval={BATCH})"}
RATIO_MAX, FLOOR_MAX = 1.1, 1.5
#: repeats of the per-instance floor measurement (its best is kept)
FLOOR_REPEATS = 3
#: calls in a row per side and instance of the gradient methods' warm loop (informative)
WARM_CALLS = 20
GRADIENT_METHODS_NOTE = (
    "The literal floor (ratio_to_floor, pass.floor) counts forward passes only, each at the best "
    "per-sample time of a large batched forward pass without gradient. Gradient methods cannot "
    "come within 1.5x of it: gradient and grad_x_input explain one instance with a forward pass "
    "of a batch of ONE (several times the per-sample cost of a large batch, which shares the "
    "per-call overhead among its rows) followed by a backward pass; integrated gradients makes "
    "one backward pass per forward pass, and a backward pass costs about twice a forward pass. "
    "Two informative ratios say what is left to gain: ratio_to_fwd_bwd_floor = ours / (backward "
    "passes x the best per-sample forward+backward time of a large batch + the other forward "
    "passes x the per-sample forward time; it still assumes large batches, so a batch of one stays "
    "far above it); ratio_to_bare = ours / the same passes on the same shapes written as the "
    "plainest torch code (leaves that require grad, adapter.forward, torch.autograd.grad), i.e. "
    "the kernel's overhead over the unavoidable work.")
PASSES_NOTE = {
    "gradient": "1 forward + 1 backward of a batch of one (see criteria.gradient_methods)",
    "grad_x_input": "1 forward + 1 backward of a batch of one (see criteria.gradient_methods)",
    "integrated_gradients": "52 forwards + 52 backwards as one batch of 52: the 50 nodes, and x "
                            "and the baseline for the completeness gap "
                            "(see criteria.gradient_methods)",
}


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
            internal_batch_size=128, return_convergence_delta=True)   # ours reports the gap too
    if method == "occlusion":
        return lambda: FeatureAblation(forward).attribute(
            inputs, baselines=baselines, target=target, feature_mask=masks,
            perturbations_per_eval=BATCH)
    if method == "lime":
        # configured as ours: a ridge fit (alpha 1) and our similarity kernel on the masks
        # (captum's defaults, a Lasso and a cosine distance of the full inputs, cost about 20%
        # more and would flatter ours)
        from captum._utils.models.linear_model import SkLearnRidge
        return lambda: Lime(forward, interpretable_model=SkLearnRidge(alpha=1.0),
                            similarity_func=lime_similarity).attribute(
            inputs, baselines=baselines, target=target, feature_mask=masks, n_samples=500,
            perturbations_per_eval=BATCH)
    if method == "kernel_shap":
        return lambda: KernelShap(forward).attribute(
            inputs, baselines=baselines, target=target, feature_mask=masks, n_samples=500,
            perturbations_per_eval=BATCH)
    raise ValueError(method)


#: our LIME's kernel width (its default, which the benchmark's parameters keep)
LIME_KERNEL_WIDTH = METHODS["lime"].defaults["kernel_width"]


def lime_similarity(_original, _perturbed, interpretable_sample, **_kwargs):
    """Our LIME's sample weight, for captum's Lime: exp(-d^2 / (2 width^2)) with d the cosine
    distance of the binary mask to the all-ones mask, 1 - sqrt(kept / units)."""
    z = interpretable_sample
    d = 1.0 - torch.sqrt(z.sum() / z.numel())
    return torch.exp(-(d ** 2) / (2.0 * LIME_KERNEL_WIDTH ** 2))


def unit_scores_of_captum(method: str, prepared, attributions) -> dict | None:
    """Captum's per-scalar attributions as per-unit scores comparable to ours: summed over each
    unit's scalars for the gradient methods, the unit's (repeated) value for occlusion; None
    for LIME and KernelSHAP, whose samples differ from ours."""
    if method in ("lime", "kernel_shap"):
        return None
    if method == "integrated_gradients" and isinstance(attributions, tuple) \
            and len(attributions) == 2:
        attributions = attributions[0]                # (attributions, convergence delta)
    out = {}
    for n, a in zip(prepared.names, attributions):
        idx = prepared.index[n].reshape(-1)
        flat = a.detach()[0].reshape(-1).double()
        sums = torch.zeros(prepared.n_units[n], dtype=torch.float64).index_add_(0, idx, flat)
        if method == "occlusion":
            sums = sums / torch.bincount(idx, minlength=prepared.n_units[n]).clamp(min=1)
        out[n] = sums.numpy()
    return out


def relative_difference(ours, theirs: dict) -> float:
    """max |ours - captum's| over all units, relative to ours' largest |score|."""
    diff = max(float(abs(ours.scores[n] - theirs[n]).max()) for n in theirs)
    scale = max(float(abs(ours.scores[n]).max()) for n in theirs)
    return diff / max(scale, 1e-12)


#: what the sanity check of a sampled method (whose samples differ from captum's) compares; run
#: once per instance, untimed, on the scores of its first timed call
SANITY_NOTE = {
    "kernel_shap": "efficiency: |sum of our unit scores over all modalities - (f(x) - "
                   "f(baseline))| for the target, f from one plain forward pass each, relative "
                   "to max(|f(x) - f(baseline)|, 1e-3 max(|f(x)|, |f(baseline)|), 1e-12) (the "
                   "scale of the kernels' completeness_gap_relative)",
    "lime": "our scores against a LIME fitted again here: the same masks drawn as "
            "lime_from_function documents them (numpy's default_rng(seed), each unit kept with "
            "probability keep_probability, the first mask keeping all), the model's target "
            "output on the masked inputs, the weights exp(-d^2 / (2 kernel_width^2)) of the "
            "cosine distance d to the all-ones mask, and scikit-learn's Ridge(alpha) with an "
            "unpenalised intercept and the weights scaled to mean 1; max |ours - refit| over the "
            "units relative to max |ours|",
}


@torch.no_grad()
def _f(adapter, prepared, target: int, continuous: dict) -> float:
    """The target logit at one instance's continuous inputs (no batch dimension)."""
    return float(adapter.forward(prepared.raw, {n: v.unsqueeze(0) for n, v in continuous.items()}
                                 )[0, target])


def kernel_shap_efficiency(adapter, prepared, target: int, params: dict, ours) -> float:
    """KernelSHAP's efficiency: the unit scores sum to f(x) - f(baseline) (see SANITY_NOTE); the
    relative deviation. Exact by construction up to float32 rounding (the fit is constrained)."""
    fx = _f(adapter, prepared, target, prepared.continuous)
    fb = _f(adapter, prepared, target, prepared.baseline)
    total = sum(float(v.sum()) for v in ours.scores.values())
    scale = max(abs(fx - fb), 1e-3 * max(abs(fx), abs(fb)), 1e-12)
    return abs(total - (fx - fb)) / scale


def lime_refit(adapter, prepared, target: int, params: dict, ours) -> float:
    """Our LIME's scores against a LIME fitted again to the same masks (see SANITY_NOTE): the
    relative difference. The masks and the model's outputs are the same, so only the fits'
    rounding (float64) separates the two."""
    from sklearn.linear_model import Ridge

    from multiviz_widgets.kernels.common import masked_continuous
    p = {**METHODS["lime"].defaults, **params}
    names = list(prepared.names)
    units = [prepared.n_units[n] for n in names]
    z = (np.random.default_rng(p["seed"]).random((int(p["n_samples"]), sum(units)))
         < p["keep_probability"]).astype(np.float64)
    z[0] = 1.0
    zt = torch.from_numpy(z.astype(np.float32))
    cuts = np.cumsum([0] + units)
    ys = []
    with torch.no_grad():
        for s in range(0, len(z), int(p["batch_size"])):
            chunk = zt[s:s + int(p["batch_size"])]
            masks = {n: chunk[:, cuts[k]:cuts[k + 1]] for k, n in enumerate(names)}
            cont = masked_continuous(prepared, masks, adapter)
            ys.append(adapter.forward(prepared.raw, cont)[:, target].double().numpy())
    d = 1.0 - np.sqrt(z.sum(1) / z.shape[1])
    w = np.exp(-(d ** 2) / (2.0 * p["kernel_width"] ** 2))
    fit = Ridge(alpha=p["alpha"]).fit(z, np.concatenate(ys), sample_weight=w * len(w) / w.sum())
    theirs = dict(zip(names, np.split(fit.coef_, cuts[1:-1])))
    return relative_difference(ours, theirs)


#: method -> its sanity check (adapter, prepared, target, params, our result) -> relative deviation
SANITY_CHECKS = {"kernel_shap": kernel_shap_efficiency, "lime": lime_refit}


def bare_call(method: str, adapter, prepared, target: int, params: dict):
    """A zero-argument function doing a gradient method's passes as the plainest torch code (the
    ``bare`` comparison), or None for a perturbation method.

    gradient / grad_x_input: one forward of a batch of one and ``torch.autograd.grad`` of the
    target logit (what captum's Saliency does), times the input for grad_x_input.
    integrated_gradients: the ``steps`` points of the straight path baseline -> input (and, as
    ours, the two end points with weight 0, whose outputs give the completeness gap) in batches
    of ``internal_batch_size`` (one batch of 52 here), one forward and one backward per batch with
    the quadrature weights as output gradients, the sum times (input - baseline). The quadrature
    nodes and weights are constants computed once, outside the timed function.
    """
    names = prepared.names
    if method in ("gradient", "grad_x_input"):
        def run():
            leaves = {n: prepared.continuous[n].unsqueeze(0).clone().requires_grad_(True)
                      for n in names}
            out = adapter.forward(prepared.raw, leaves)[:, target]
            grads = torch.autograd.grad(out.sum(), list(leaves.values()))
            if method == "grad_x_input":
                return [g * prepared.continuous[n] for n, g in zip(names, grads)]
            return grads
        return run
    if method == "integrated_gradients":
        alphas, weights = (torch.as_tensor(v, dtype=torch.float32)
                           for v in integration_rule(params["steps"], params["rule"]))
        # ours evaluates x and the baseline too (weight 0), for the completeness gap
        ends = torch.tensor([e for e in (0.0, 1.0) if not bool((alphas == e).any())])
        alphas, weights = torch.cat([alphas, ends]), torch.cat([weights, torch.zeros(len(ends))])
        bs = params["internal_batch_size"]

        def run():
            x = {n: prepared.continuous[n] for n in names}
            diff = {n: x[n] - prepared.baseline[n] for n in names}
            total = {n: torch.zeros_like(x[n]) for n in names}
            for s in range(0, len(alphas), bs):
                a = alphas[s:s + bs]
                leaves = {n: (prepared.baseline[n] + a.view(-1, *[1] * x[n].dim()) * diff[n]
                              ).requires_grad_(True) for n in names}
                out = adapter.forward(prepared.raw, leaves)[:, target]
                grads = torch.autograd.grad(out, list(leaves.values()),
                                            grad_outputs=weights[s:s + bs])
                for n, g in zip(names, grads):
                    total[n] += g.sum(0)
            return {n: diff[n] * total[n] for n in names}
        return run
    return None


def _sig(x: float) -> float:
    """x to 4 significant digits (the per-instance numbers of the JSON)."""
    return float(f"{x:.4g}")


def run_stage1(adapter, dataset, indices, repeats: int = 1, methods=None,
               floor_batch: int | None = None) -> dict:
    """Per method: median ms ours, captum's (and the bare code's), ratios, passes, the floors
    measured per instance and the ratios to them (medians over instances), pass/fail, and every
    instance's numbers. ``floor_batch``: the floors' batch size (default: the fastest per sample
    of FLOOR_BATCHES, chosen once, for the forward and the forward+backward floor separately).

    numpy's and scipy's OpenBLAS run single-threaded meanwhile (``common.single_threaded_blas``).
    """
    with single_threaded_blas():
        return _stage1(adapter, dataset, indices, repeats, methods, floor_batch)


def _stage1(adapter, dataset, indices, repeats, methods, floor_batch) -> dict:
    """``run_stage1`` under the OpenBLAS limit: the floor batches, then every method."""
    methods = list(methods or STAGE1)
    prepared = [adapter.prepare(dataset[int(i)]) for i in indices]
    targets = [int(adapter.predict(p.raw).argmax(1)[0]) for p in prepared]
    batches = FLOOR_BATCHES if floor_batch is None else (floor_batch,)
    scan = {"forward": per_sample_scan(adapter, prepared[0], batches),
            "forward_backward": per_sample_scan(adapter, prepared[0], batches, backward=True,
                                                target=targets[0])}
    out = {"floor_batch": min(scan["forward"], key=scan["forward"].get),
           "floor_batch_fwd_bwd": min(scan["forward_backward"], key=scan["forward_backward"].get),
           "floor_batch_scan_ms_per_sample": scan, "floor_repeats_per_instance": FLOOR_REPEATS,
           "methods": {}}
    for m in methods:
        entry = _time_method(m, adapter, indices, prepared, targets, repeats,
                             out["floor_batch"], out["floor_batch_fwd_bwd"])
        out["methods"][m] = entry
        extra = (f"  fwd+bwd floor x{entry['ratio_to_fwd_bwd_floor']:4.1f}"
                 f"  bare {entry['bare_ms']:6.2f} ms (x{entry['ratio_to_bare']:4.2f})"
                 if entry["bare_ms"] is not None else "")
        print(f"{m:22s} ours {entry['median_ms_ours']:8.2f} ms  captum "
              f"{entry['median_ms_captum']:8.2f} ms  ratio {entry['ratio_ours_captum']:5.2f}  "
              f"passes {entry['forward_passes']:5g}  floor {entry['floor_ms']:7.2f} ms "
              f"(x{entry['ratio_to_floor']:5.2f}){extra}", flush=True)
    return out


def side_orders(n_sides: int) -> list[tuple[int, ...]]:
    """Every order of ``n_sides`` side-by-side calls (2 sides: 2 orders, 3 sides: 6). Timed once
    each, they put every side in every position, right after every other side (and first, right
    after the floors) equally often, and they pair every position of one side with every other
    position of another: the paired ratios of one instance then carry no position effect on
    average (see ``_balanced``)."""
    return list(itertools.permutations(range(n_sides)))


def rounds_per_instance(repeats: int, n_sides: int) -> int:
    """``repeats`` rounded up to whole cycles through every order of the sides."""
    cycle = len(side_orders(n_sides))
    return -(-max(1, repeats) // cycle) * cycle


def _time_method(m: str, adapter, indices, prepared, targets, repeats: int, fwd_batch: int,
                 fb_batch: int) -> dict:
    """One method's JSON entry: per instance, rounds of timings (``rounds_per_instance``: whole
    cycles through every order of the sides), each round the floors at the chosen batches (and,
    for a gradient method, the forward+backward floor), then ours, captum's (and the bare code)
    back to back in that round's order.

    Why every order, and per-instance ratios over whole cycles: a call timed first, right after
    the floors' large batches (which evict the CPU caches), costs 1.2 to 1.7 times what it costs
    third. A single timing's ratio ours/captum therefore says mostly which of the two ran
    first. The rotation used before (3 orders of 3 sides) put each side in each position
    equally often, but the median of its 60 single-timing ratios fell among the timings where
    ours ran second and captum third (the "bare first" third of them): the gradient's ratio
    read 1.16 where ours was 1.02, 1.09 and 1.07 times captum's at equal positions. A fixed
    order with the floors in the middle had, before that, flattered ours (0.94)."""
    params, target_ms = STAGE1[m]
    # warm-up (not timed): first calls allocate and let captum import its submodules
    gradient_family = attribute(adapter, prepared[0], method=m, target=targets[0],
                                **params).backward_passes > 0
    captum_call(m, adapter, prepared[0], targets[0])()
    if gradient_family:
        bare_call(m, adapter, prepared[0], targets[0], params)()
    rows, warm = [], []
    for i, p, t in zip(indices, prepared, targets):
        floors = [("floor", lambda: per_sample_forward_ms(adapter, p, batch=fwd_batch,
                                                          repeats=FLOOR_REPEATS))]
        sides = [("ours", lambda: attribute(adapter, p, method=m, target=t, **params)),
                 ("captum", captum_call(m, adapter, p, t))]
        if gradient_family:
            floors.append(("floor_fb", lambda: per_sample_forward_backward_ms(
                adapter, p, target=t, batch=fb_batch, repeats=FLOOR_REPEATS)))
            sides.append(("bare", bare_call(m, adapter, p, t, params)))
        orders = side_orders(len(sides))
        for r in range(rounds_per_instance(repeats, len(sides))):
            got = {who: fn() for who, fn in floors}
            order = [sides[k] for k in orders[r % len(orders)]]
            for who, fn in order:
                got[who] = timed(fn)
            rows.append(_instance_row(int(i), t, r, got, [who for who, _ in order]))
            if r == 0:            # do the two give the same numbers? (deterministic methods)
                first_row, first_result = rows[-1], got["ours"][1]
                theirs = unit_scores_of_captum(m, p, got["captum"][1])
                if theirs is not None:
                    rows[-1]["relative_difference_to_captum"] = relative_difference(
                        got["ours"][1], theirs)
        if m in SANITY_CHECKS:    # sampled methods: untimed, once, after the instance's rounds
            first_row["sanity_relative_deviation"] = SANITY_CHECKS[m](adapter, p, t, params,
                                                                      first_result)
        if gradient_family:          # informative: each side warm, WARM_CALLS calls in a row
            warm.append({who: timed(lambda fn=fn: [fn() for _ in range(WARM_CALLS)])[0]
                         / WARM_CALLS for who, fn in sides})
    return _summary(m, params, target_ms, rows, warm)


def _instance_row(index: int, target: int, repeat: int, got: dict, order: list[str]) -> dict:
    """One round's timings, floors and ratios, from the timed calls: ``got`` maps "ours",
    "captum" (and "bare") to (ms, result), "floor" (and "floor_fb") to the per-sample ms at the
    floor batch; ``order``: the sides in the order they ran."""
    ours_ms, res = got["ours"]
    fwd, bwd = res.forward_passes, res.backward_passes
    row = {"index": index, "target": target, "repeat": repeat, "order": order, "ours_ms": ours_ms,
           "captum_ms": got["captum"][0], "forward_passes": fwd, "backward_passes": bwd,
           "per_sample_forward_ms": got["floor"], "floor_ms": fwd * got["floor"]}
    row["ratio_to_floor"] = ours_ms / row["floor_ms"]
    row["ratio_ours_captum"] = ours_ms / row["captum_ms"]
    if "bare" in got:
        row.update(bare_ms=got["bare"][0], per_sample_forward_backward_ms=got["floor_fb"],
                   floor_fwd_bwd_ms=bwd * got["floor_fb"] + (fwd - bwd) * got["floor"])
        row.update(ratio_to_fwd_bwd_floor=ours_ms / row["floor_fwd_bwd_ms"],
                   ratio_to_bare=ours_ms / row["bare_ms"])
    return row


#: the per-round ratios that are summarised per instance (``_balanced``), then over instances
RATIOS = ("ratio_ours_captum", "ratio_to_floor", "ratio_to_fwd_bwd_floor", "ratio_to_bare")


def _balanced(rows: list[dict], key: str) -> list[float]:
    """Per instance, the geometric mean of ``key`` (a ratio) over its rounds. The rounds are
    whole cycles through every order of the sides, so each side's position (first after the
    floors, second, third) enters its mean as often as the other side's: the position effects,
    which multiply a timing, cancel in the mean of the logarithms."""
    by_instance: dict[int, list[float]] = {}
    for r in rows:
        by_instance.setdefault(r["index"], []).append(r[key])
    return [geometric_mean(v) for v in by_instance.values()]


def _summary(method: str, params: dict, target_ms, rows: list[dict],
             warm: list[dict] | None = None) -> dict:
    """A method's JSON entry: medians over the rows (times) and over the instances (ratios),
    pass/fail, and the rows; ``warm``: per instance, each side's ms per call in a warm loop."""
    def med(key):
        if key not in rows[0]:
            return None
        return median(_balanced(rows, key)) if key in RATIOS else median([r[key] for r in rows])

    def passes(key):   # a whole number unless the instances' median falls between two
        v = med(key)
        return int(v) if v.is_integer() else v

    mo, mc = med("ours_ms"), med("captum_ms")
    entry = {
        "captum": CAPTUM_NAMES[method], "params": params,
        # the criterion's ratio: per instance, the geometric mean of the paired ratios over
        # whole cycles of orders (ours and captum timed back to back, each in every position),
        # then the median over the instances, as the floors' ratios
        "median_ms_ours": mo, "median_ms_captum": mc, "ratio_ours_captum": med("ratio_ours_captum"),
        # informative: the ratio of the two medians, and the median of the single timings'
        # ratios (which says mostly which side ran first: see _time_method)
        "ratio_of_medians_ours_captum": mo / mc,
        "median_of_timing_ratios_ours_captum": median([r["ratio_ours_captum"] for r in rows]),
        "forward_passes": passes("forward_passes"), "backward_passes": passes("backward_passes"),
        "per_sample_forward_ms": med("per_sample_forward_ms"),
        "per_sample_forward_backward_ms": med("per_sample_forward_backward_ms"),
        "floor_ms": med("floor_ms"), "ratio_to_floor": med("ratio_to_floor"),
        "target_ms": target_ms,
        # informative only (not the criterion): see criteria.gradient_methods
        "floor_fwd_bwd_ms": med("floor_fwd_bwd_ms"),
        "ratio_to_fwd_bwd_floor": med("ratio_to_fwd_bwd_floor"),
        "bare_ms": med("bare_ms"), "ratio_to_bare": med("ratio_to_bare"),
        "note": PASSES_NOTE.get(method),
        "n_instances": len({r["index"] for r in rows}), "n_timings": len(rows),
    }
    # how far the median could move with other instances: a ratio met by the median but not by
    # the upper end of the interval is marginal
    ci = bootstrap_median_ci(_balanced(rows, "ratio_ours_captum"))
    entry["ratio_ours_captum_ci95"] = ci
    entry["vs_captum_margin"] = ("clear" if ci[1] <= RATIO_MAX else "marginal"
                                 if entry["ratio_ours_captum"] <= RATIO_MAX else "not met")
    diffs = [r["relative_difference_to_captum"] for r in rows
             if "relative_difference_to_captum" in r]
    entry["max_relative_difference_to_captum"] = max(diffs) if diffs else None
    checks = [r["sanity_relative_deviation"] for r in rows if "sanity_relative_deviation" in r]
    if checks:
        # float32 rounding of the same forward passes, in other batches (KernelSHAP's f(x) and
        # f(baseline)) or the same ones (LIME's refit), is far below AGREEMENT_MAX; a wrong
        # mask, weight, penalty or constraint is far above it
        entry["sanity_check"] = {"compares": SANITY_NOTE[method],
                                 "max_relative_deviation": max(checks),
                                 "tolerance": AGREEMENT_MAX, "n_instances": len(checks)}
    entry["pass"] = {"vs_captum": entry["ratio_ours_captum"] <= RATIO_MAX,
                     "floor": entry["ratio_to_floor"] <= FLOOR_MAX,
                     "target": None if target_ms is None else mo <= target_ms,
                     # the same numbers as captum's; for the sampled methods (LIME, KernelSHAP:
                     # captum's samples differ) the sanity check instead (sanity_check)
                     "agrees": (None if not (diffs or checks)
                                else max(diffs or checks) <= AGREEMENT_MAX)}
    entry["passed"] = all(v for v in entry["pass"].values() if v is not None)
    if warm:
        entry["warm_loop"] = {
            "calls_in_a_row": WARM_CALLS,
            "median_ms": {who: median([w[who] for w in warm]) for who in warm[0]},
            "ratio_ours_captum": median([w["ours"] / w["captum"] for w in warm]),
            "ratio_ours_bare": median([w["ours"] / w["bare"] for w in warm])}
    entry["instances"] = [{k: _sig(v) if isinstance(v, float) else v for k, v in r.items()}
                          for r in rows]
    return entry


def run_batched(adapter, dataset, n: int, rounds: int, seed: int, fwd_batch: int,
                fb_batch: int, methods=None) -> dict:
    """Gradient methods explaining ``n`` instances in one ``attribute_batch`` call against one
    ``attribute`` call each (same prepared instances and predicted classes), per instance."""
    methods = [m for m in (methods or STAGE1) if m in PASSES_NOTE]
    indices = shape_or_color_indices(dataset, n, seed=seed + 1)
    prepared = [adapter.prepare(dataset[int(i)]) for i in indices]
    targets = [int(adapter.predict(p.raw).argmax(1)[0]) for p in prepared]
    # attribute_batch stacks instances whose inputs have equal shapes (questions of one length)
    groups = sorted((len(g) for g in _shape_groups(adapter, prepared)), reverse=True)
    out = {"n": len(prepared), "rounds": rounds, "shape_groups": groups, "methods": {}}
    for m in methods:
        params = STAGE1[m][0]
        attribute_batch(adapter, prepared[:8], m, targets=targets[:8], **params)   # warm-up
        calls = [("batched", lambda: attribute_batch(adapter, prepared, m, targets=targets,
                                                     **params)),
                 ("single", lambda: [attribute(adapter, p, m, target=t, **params)
                                     for p, t in zip(prepared, targets)])]
        f, b = METHODS[m].cost(prepared[0], **params)       # passes per instance
        rows = []
        for r in range(rounds):
            got = {who: timed(fn)[0] / len(prepared)
                   for who, fn in (calls if r % 2 == 0 else calls[::-1])}
            fwd = per_sample_forward_ms(adapter, prepared[0], batch=fwd_batch,
                                        repeats=FLOOR_REPEATS)
            fb = per_sample_forward_backward_ms(adapter, prepared[0], target=targets[0],
                                                batch=fb_batch, repeats=FLOOR_REPEATS)
            rows.append({"batched_ms": got["batched"], "single_ms": got["single"],
                         "floor_ms": f * fwd, "floor_fwd_bwd_ms": b * fb + (f - b) * fwd})
        med = {k: median([row[k] for row in rows]) for k in rows[0]}
        entry = {"ms_per_instance_batched": med["batched_ms"],
                 "ms_per_instance_single": med["single_ms"],
                 "speedup_over_single": median([r["single_ms"] / r["batched_ms"] for r in rows]),
                 "floor_ms": med["floor_ms"],
                 "ratio_to_floor": median([r["batched_ms"] / r["floor_ms"] for r in rows]),
                 "floor_fwd_bwd_ms": med["floor_fwd_bwd_ms"],
                 "ratio_to_fwd_bwd_floor": median([r["batched_ms"] / r["floor_fwd_bwd_ms"]
                                                   for r in rows]),
                 "rounds": [{k: _sig(v) for k, v in r.items()} for r in rows]}
        out["methods"][m] = entry
        print(f"{m:22s} {len(prepared)} at once {entry['ms_per_instance_batched']:7.3f} ms each"
              f"  one by one {entry['ms_per_instance_single']:7.3f} ms  (x"
              f"{entry['speedup_over_single']:4.1f})  floor x{entry['ratio_to_floor']:5.2f}"
              f"  fwd+bwd floor x{entry['ratio_to_fwd_bwd_floor']:5.2f}", flush=True)
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
    ap.add_argument("--repeats", type=int, default=3,
                    help="timings per instance and method, rounded up to whole cycles through "
                         "every order of the sides (3 sides: 6 rounds, 2 sides: 4)")
    ap.add_argument("--methods", nargs="*", default=None, help=f"subset of {list(STAGE1)}")
    ap.add_argument("--no-stage2", action="store_true", help="skip benchmarks/kernels_stage2.py")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (2 cores)")
    ap.add_argument("--floor-batch", type=int, default=None,
                    help="batch of the passes that set the per-sample floors (default: the "
                         "fastest per sample of 32..512, chosen once at the start)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batched-n", type=int, default=256,
                    help="instances explained at once by attribute_batch (0: skip)")
    ap.add_argument("--batched-rounds", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "kernels.json"))
    args = ap.parse_args(argv)
    adapter, dataset, note, indices = start_run(args.threads, args.n, args.seed)
    if len(indices) < 20:
        print(f"note: {len(indices)} instances; the criterion's medians are over at least 20 "
              "(n_meets_criterion is false in the JSON)", flush=True)
    result = {"model": note, "n": len(indices), "n_meets_criterion": len(indices) >= 20,
              "repeats": args.repeats, "environment": environment(),
              "criteria": {"ratio_ours_captum_max": RATIO_MAX, "ratio_to_floor_max": FLOOR_MAX,
                           "floor": "forward passes x per-sample time of a batched forward pass "
                                    "(no gradient) at the floor batch ("
                                    + (str(args.floor_batch) if args.floor_batch else
                                       "the fastest per sample of 32..512, chosen once")
                                    + "), measured again next to every instance's timings "
                                      "(in every round, before the sides); ratio_to_floor = "
                                      "per instance, the geometric mean over its rounds of "
                                      "ours / the floor measured in that round, then the "
                                      "median over the instances",
                           "gradient_methods": GRADIENT_METHODS_NOTE},
              "stage1": run_stage1(adapter, dataset, indices, args.repeats, args.methods,
                                   args.floor_batch)}
    if args.batched_n > 0:
        s1 = result["stage1"]
        with single_threaded_blas():
            s1["batched"] = run_batched(adapter, dataset, args.batched_n, args.batched_rounds,
                                        args.seed, s1["floor_batch"], s1["floor_batch_fwd_bwd"],
                                        args.methods)
    if not args.no_stage2:
        result["stage2"] = run_stage2(adapter, dataset, indices, args.repeats)
    path = write_json(args.out, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
