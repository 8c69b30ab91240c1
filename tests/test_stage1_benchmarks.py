"""The stage-1 benchmark scripts run end to end on a tiny sample and write the promised JSON.

No timing is asserted here (speed is measured by the scripts themselves, on a quiet machine).
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def has_easy_vqa():
    importlib.import_module("easy_vqa")   # in requirements.txt: its absence is a failure


def test_faithfulness_writes_the_promised_json(tmp_path, has_easy_vqa):
    out = tmp_path / "f.json"
    load("faithfulness").main(["--n", "2", "--methods", "gradient", "occlusion",
                               "--out", str(out)])
    d = json.loads(out.read_text())
    assert d["n"] == 2 and set(d["methods"]) == {"gradient", "occlusion"}
    for block in list(d["methods"].values()) + [d["random"]]:
        for k in ("relevance_mass", "relevance_rank", "deletion_auc", "insertion_auc"):
            assert 0.0 <= block[k] <= 1.0
    # a real map, not a random one: occlusion's mass inside the shape is well above a random
    # map's (0.47 against 0.03 on these two questions; 0.86 against 0.09 over 500)
    occlusion, chance = d["methods"]["occlusion"]["relevance_mass"], d["random"]["relevance_mass"]
    assert occlusion > 3 * chance, (occlusion, chance)
    # too few questions for the criterion (at least 500), whatever the mass
    assert "pooling" in d and d["criterion"]["passed"] is False and d["criterion"]["n_min"] == 500


@pytest.mark.parametrize("argv, says", [
    (["--n", "0"], "--n must be at least 1"),
    (["--n", "-3"], "--n must be at least 1"),
    (["--methods"], "--methods needs at least one"),
    (["--methods", "saliency"], "unknown methods"),
])
def test_faithfulness_refuses_bad_arguments_before_loading_the_model(argv, says, capsys,
                                                                        monkeypatch):
    """--n 0 once died in an IndexError after the whole run, --methods with no names in max()."""
    bench = load("faithfulness")
    monkeypatch.setattr(bench, "load_demo", lambda: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_kernels_benchmark_writes_ratios_and_floors(tmp_path, has_easy_vqa):
    out = tmp_path / "k.json"
    load("kernels").main(["--n", "1", "--methods", "gradient", "occlusion", "--no-stage2",
                          "--floor-batch", "32", "--batched-n", "6", "--batched-rounds", "1",
                          "--out", str(out)])
    d = json.loads(out.read_text())
    for m in ("gradient", "occlusion"):
        e = d["stage1"]["methods"][m]
        for k in ("median_ms_ours", "median_ms_captum", "ratio_ours_captum", "forward_passes",
                  "floor_ms", "ratio_to_floor", "target_ms", "pass"):
            assert k in e
    assert d["stage1"]["methods"]["occlusion"]["forward_passes"] > 60
    for m in ("gradient", "occlusion"):   # the same numbers as captum's, and the ratio's spread
        e = d["stage1"]["methods"][m]
        assert e["max_relative_difference_to_captum"] < 1e-4 and e["pass"]["agrees"]
        lo, hi = e["ratio_ours_captum_ci95"]
        assert lo <= e["ratio_ours_captum"] <= hi
        assert e["vs_captum_margin"] in ("clear", "marginal", "not met")
    # every order of the sides once per cycle: each side in each position equally often, and
    # the instance's ratio is the geometric mean over its rounds (position effects cancel)
    for m, sides, rounds in (("gradient", {"ours", "captum", "bare"}, 6),
                             ("occlusion", {"ours", "captum"}, 4)):
        e = d["stage1"]["methods"][m]
        orders = [tuple(r["order"]) for r in e["instances"]]
        assert len(orders) == rounds == e["n_timings"] and e["n_instances"] == 1
        assert all(set(o) == sides for o in orders)
        for side in sides:
            positions = [o.index(side) for o in orders]
            assert sorted(positions) == sorted(list(range(len(sides))) * (rounds // len(sides)))
        if m == "gradient":
            assert len(set(orders)) == 6
        geo = math.exp(sum(math.log(r["ratio_ours_captum"]) for r in e["instances"]) / rounds)
        assert e["ratio_ours_captum"] == pytest.approx(geo, rel=2e-3)
        assert e["median_of_timing_ratios_ours_captum"] > 0
    warm = d["stage1"]["methods"]["gradient"]["warm_loop"]      # informative, gradient methods
    assert set(warm["median_ms"]) == {"ours", "captum", "bare"} and warm["ratio_ours_captum"] > 0
    assert "warm_loop" not in d["stage1"]["methods"]["occlusion"]
    batched = d["stage1"]["batched"]                 # gradient methods only
    assert batched["n"] == 6 and sum(batched["shape_groups"]) == 6
    assert set(batched["methods"]) == {"gradient"}
    e = batched["methods"]["gradient"]
    assert e["ms_per_instance_batched"] > 0 and e["speedup_over_single"] > 0
    assert e["ratio_to_fwd_bwd_floor"] == pytest.approx(
        e["rounds"][0]["batched_ms"] / e["rounds"][0]["floor_fwd_bwd_ms"], rel=2e-3)


def test_gpu_benchmark_runs_its_code_on_the_cpu_and_stops_clearly_without_cuda(
        tmp_path, has_easy_vqa, monkeypatch, capsys):
    bench = load("kernels_gpu")
    out = tmp_path / "g.json"
    assert bench.main(["--device", "cpu", "--n", "1", "--repeats", "1", "--methods", "gradient",
                       "occlusion", "--emap-n", "6", "--reference-pairs", "4",
                       "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["device"] == "cpu" and set(d["stage1"]["methods"]) == {"gradient", "occlusion"}
    assert d["second_order"]["max_relative_difference_to_loop"] < 1e-4
    assert set(d["second_order"]["speedup_over_loop"]) == {"vmap", "replicate"}
    assert d["emap"]["n"] == 6 and d["emap"]["traced"]["speedup"] > 0
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert bench.main(["--out", str(tmp_path / "none.json")]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "none.json").exists()


def test_allocator_benchmark_runs_both_settings_in_fresh_processes(tmp_path, has_easy_vqa):
    out = tmp_path / "a.json"
    load("allocator").main(["--rounds", "1", "--n", "1", "--repeats", "1",
                            "--methods", "occlusion", "--out", str(out)])
    d = json.loads(out.read_text())
    tuned = d["tuned_settings"]
    (r,) = d["rounds"]
    assert r["tuned"]["settings"] == tuned                  # the child saw the settings...
    assert set(r["default"]["settings"].values()) == {None}  # ...and the other did not
    e = d["methods"]["occlusion"]
    assert e["default_over_tuned"] == pytest.approx(e["default_median_ms"] / e["tuned_median_ms"])


def test_make_benchmarks_runs_every_benchmark_once():
    """`make benchmarks` names each benchmark: a glob also ran kernels_stage2.py (which
    kernels.py runs) and kernels_gpu.py, whose exit on a machine without CUDA stopped the rest."""
    makefile = (BENCH.parent / "Makefile").read_text()
    line = next(ln for ln in makefile.splitlines() if ln.startswith("BENCHMARKS :="))
    listed = line.split(":=", 1)[1].split()
    assert len(listed) == len(set(listed))
    run_elsewhere = {"common", "kernels_stage2", "kernels_gpu"}
    assert set(listed) == {p.stem for p in BENCH.glob("*.py")} - run_elsewhere
    assert "kernels_stage2" in (BENCH / "kernels.py").read_text()
    target = makefile.split("\nbenchmarks:", 1)[1].split("\n\n", 1)[0]
    assert "torch.cuda.is_available()" in target and "benchmarks/kernels_gpu.py" in target


def test_make_demo_exports_the_benchmarked_malloc_settings():
    """`make demo` starts JupyterLab (whose kernels inherit its environment) with exactly the
    settings benchmarks/allocator.py measures."""
    makefile = (BENCH.parent / "Makefile").read_text()
    line = next(ln for ln in makefile.splitlines() if ln.startswith("DEMO_MALLOC :="))
    settings = dict(kv.split("=", 1) for kv in line.split(":=", 1)[1].split())
    assert settings == load("allocator").TUNED
    demo = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "$(DEMO_MALLOC) $(VENV)/bin/jupyter lab" in demo


def test_cold_cache_times_every_variant_and_writes_the_promised_json(tmp_path, has_easy_vqa):
    out = tmp_path / "c.json"
    bench = load("cold_cache")
    bench.main(["--n", "5", "--repeats", "1", "--out", str(out)])
    d = json.loads(out.read_text())
    assert set(d["steps"]) == {"pool", "finite"}
    # the floors before each timing are kernels.py's, at batches chosen as kernels.py does
    floor_batches = load("common").FLOOR_BATCHES
    assert d["floor_batch"] in floor_batches and d["floor_batch_fwd_bwd"] in floor_batches
    assert d["floor_repeats"] == load("kernels").FLOOR_REPEATS
    for step, entry in d["steps"].items():
        assert d["project_variant"][step] in entry
        assert entry[d["project_variant"][step]]["cold_over_ours"] == 1.0
        assert all(v["n"] >= 1 and v["cold_us"] > 0 for v in entry.values())
    with pytest.raises(ValueError, match="at least 5"):
        bench.main(["--n", "2", "--repeats", "1", "--out", str(out)])


def test_cold_cache_takes_kernels_floor_batch_option():
    bench = load("cold_cache")
    assert bench.floor_batches(None, None, 0, floor_batch=32) == (32, 32)
    assert "128" not in bench.__doc__.split("Steps")[0]     # no fixed batch claimed


def test_cold_cache_variants_compute_the_same_numbers():
    """The variants differ in speed only: the same map and float64 sums, the same verdict."""
    import numpy as np
    import torch
    bench = load("cold_cache")
    g = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(0))
    got = {name: fn(g) for name, fn in bench.pool_variants(8).items()}
    ref_map, ref_sums = got[bench.OURS["pool"]]
    for name, (m, s) in got.items():
        assert s.dtype == np.float64 and s.shape == (4,), name
        np.testing.assert_allclose(m, ref_map, rtol=1e-6)
        np.testing.assert_allclose(s, ref_sums, rtol=1e-6)
    cases = [[np.ones(3)], [np.ones(3), np.array([np.nan])], [np.array([np.inf, 1.0])],
             [np.array([1e308, 1e308])]]
    for arrays in cases:
        verdicts = {name: fn(arrays) for name, fn in bench.finite_variants().items()}
        assert len(set(verdicts.values())) == 1, (arrays, verdicts)


def test_shapley_accuracy_benchmark_compares_a_sample_with_its_reference(tmp_path, has_easy_vqa):
    out = tmp_path / "s.json"
    load("shapley_accuracy").main(["--n", "1", "--players", "14", "--budget", "400",
                                   "--reference-budget", "1600", "--seeds", "2",
                                   "--out", str(out)])
    d = json.loads(out.read_text())
    assert d["n"] == 1 and d["players"] == 14 and d["seeds"] == 2
    row = d["instances"][0]
    assert len(row["errors"]) == len(row["reported_noise"]) == 2
    assert all(e > 0 for e in row["errors"]) and all(x > 0 for x in row["reported_noise"])
    assert row["exact"] and row["exact_players"] == 8          # the default at budget 400
    assert d["median_exact_default_s"] > 0 and d["strongest_cell_agrees"].endswith("of 2")


def test_captums_lime_is_weighted_as_ours():
    """The benchmark runs captum's Lime with our similarity kernel (and a ridge fit), so that
    the two do the same work: its weight of a mask equals lime_from_function's."""
    import torch
    k = load("kernels")
    for kept, total in ((72, 72), (30, 72), (1, 72), (5, 9)):
        z = torch.zeros(1, total)
        z[0, :kept] = 1
        d = 1 - math.sqrt(kept / total)
        want = math.exp(-d * d / (2 * 0.25 ** 2))
        assert float(k.lime_similarity(None, None, z)) == pytest.approx(want, rel=1e-6)
    assert "SkLearnRidge(alpha=1.0)" in k.CAPTUM_NAMES["lime"]


def test_kernels_benchmark_checks_lime_and_kernel_shap(tmp_path, has_easy_vqa):
    """Captum's samples differ from ours, so LIME and KernelSHAP get a sanity check of their own
    (untimed, once per instance): KernelSHAP's efficiency, LIME against a refit of its masks."""
    import types

    import numpy as np
    k = load("kernels")
    out = tmp_path / "k.json"
    k.main(["--n", "1", "--repeats", "1", "--methods", "lime", "kernel_shap", "--no-stage2",
            "--floor-batch", "32", "--batched-n", "0", "--out", str(out)])
    d = json.loads(out.read_text())
    assert "geometric mean over its rounds" in d["criteria"]["floor"]
    for m in ("lime", "kernel_shap"):
        e = d["stage1"]["methods"][m]
        assert e["max_relative_difference_to_captum"] is None
        check = e["sanity_check"]
        assert check["n_instances"] == 1 and check["compares"] == k.SANITY_NOTE[m]
        assert check["max_relative_deviation"] < check["tolerance"] == 1e-4
        assert e["pass"]["agrees"] is True
        assert sum("sanity_relative_deviation" in r for r in e["instances"]) == 1
    # the checks are not vacuous: one unit's score moved by 1% of the largest fails them
    from common import load_demo, shape_or_color_indices

    from multiviz_widgets.kernels.unimodal import attribute
    adapter, ds, _ = load_demo()
    p = adapter.prepare(ds[int(shape_or_color_indices(ds, 1)[0])])
    t = int(adapter.predict(p.raw).argmax(1)[0])
    for m, check in k.SANITY_CHECKS.items():
        params = k.STAGE1[m][0]
        r = attribute(adapter, p, method=m, target=t, **params)
        assert check(adapter, p, t, params, r) < 1e-4, m
        scores = {n: np.array(v, dtype=np.float64) for n, v in r.scores.items()}
        name = p.names[0]
        scores[name][0] += 0.01 * max(float(np.abs(v).max()) for v in scores.values())
        assert check(adapter, p, t, params, types.SimpleNamespace(scores=scores)) > 1e-3, m


def test_stage2_benchmark_rotates_its_orders_and_keeps_its_rounds(tmp_path, has_easy_vqa):
    """EMAP's sides and DIME's variants run in rotated orders (recorded), DIME's split variants
    are checked against the generic one, and the second-order rounds are in the JSON."""
    import torch
    bench = load("kernels_stage2")
    out = tmp_path / "s2.json"
    threads = torch.get_num_threads()
    try:
        bench.main(["--n", "1", "--emap-n", "6", "--emap-repeats", "2", "--dime-instances", "1",
                    "--dime-samples", "20", "--threads", str(threads), "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    d = json.loads(out.read_text())["stage2"]
    so = d["second_order"]
    assert len(so["rounds"]) == so["rounds_per_instance"] == 6
    assert len({tuple(r["order"][:3]) for r in so["rounds"]}) == 6
    # the speedup can be derived again from the rounds (4 significant digits each)
    geo = math.exp(sum(math.log(r["shared"] / r["kernel"]) for r in so["rounds"]) / 6)
    assert so["speedup"] == pytest.approx(geo, rel=2e-3)
    e = d["emap"]
    sides = e["emap_sides"]
    assert set(sides) == {"adapter_reference", "plain_reference", *e["variants"]}
    assert len(e["orders"]) == 2 and all(sorted(o) == sorted(sides) for o in e["orders"])
    assert e["orders"][0][0] != e["orders"][1][0] and e["orders"][0][-1] != e["orders"][1][-1]
    assert "rotated" in e["order"] and e["statistic"]
    assert e["traced"]["first_call_s"] > 0
    dm = d["dime"]
    assert dm["orders"] == [dm["variants"]] and "rotated" in dm["order"] and dm["compared"]
    for label in dm["variants"]:
        if label != "generic":
            assert dm[label]["max_relative_difference_to_generic"] < 1e-4
            assert dm[label]["agrees"] is True


def test_ui_latency_waits_for_the_caption_the_explorer_writes():
    """The click benchmark waited for "(#k)" after the overlay's caption became "(#k, method)":
    every click timed out (60 s each) and nothing said why. Its marker is checked here against
    the caption the Explorer writes for a clicked question token."""
    from multiviz_widgets.explorer import Explorer

    from .explorer_support import FakeKernels, tiny_vqa
    ui = load("ui_latency")
    adapter, ds = tiny_vqa()
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05)
    try:
        for k in (1, 3):
            ex.select(unit=("question", k))
            assert ex.wait(30)
            assert ui.caption_marker(k) in ex.input_view.score_caption, (
                ex.input_view.score_caption)
    finally:
        ex.close()
