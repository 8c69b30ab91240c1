"""The README's own-model example runs as written (with a small model standing in for yours)."""
import gc
import pathlib
import re

import numpy as np
import torch
from torch import nn

from multiviz_widgets.explorer import Explorer

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


class TinyVQA(nn.Module):
    def __init__(self, vocab_size, n_answers):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 8)
        self.conv = nn.Conv2d(3, 8, 5, stride=4)
        self.fuse = nn.Linear(8, 16)
        self.classifier = nn.Linear(16, n_answers)

    def forward(self, image, question):
        v = torch.tanh(self.conv(image)).mean((2, 3))
        q = self.embed(question).sum(1)
        return self.classifier(torch.relu(self.fuse(v * q)))


def test_the_own_model_example_runs():
    text = README.read_text(encoding="utf-8")
    block = re.search(r"## Your own model.*?```python\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) <= 15
    vocab = ["[PAD]", "[UNK]", "what", "colour", "is", "the", "car"]
    rng = np.random.default_rng(0)
    images = [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(6)]
    torch.manual_seed(0)                 # the same small model every run (and the same warnings)
    namespace = {
        "my_model": TinyVQA(len(vocab), 3), "my_vocab": vocab, "my_answers": ["red", "blue", "grey"],
        "my_image_array": images[0], "images": images,
        "questions": ["what colour is the car?"] * 6, "answers": [0, 1, 2, 0, 1, 2],
    }
    before = {id(o) for o in gc.get_objects() if isinstance(o, Explorer)}
    try:
        exec(compile(block, str(README), "exec"), namespace)
        assert namespace["ig"].scores["image"].shape == (4,)
        assert namespace["sog"].matrix.shape == (4, 5)
    finally:
        # the example's last line shows an Explorer (kept by no name): closed here, so that
        # no engine threads are left for the tests after this one
        for o in gc.get_objects():
            if isinstance(o, Explorer) and id(o) not in before:
                o.close()


def _table_after(text: str, heading: str) -> list[list[str]]:
    """The rows (cells stripped of markdown bold) of the first table after ``heading``."""
    rest = text[text.index(heading):]
    rows = []
    for line in rest.splitlines()[1:]:
        if line.startswith("|"):
            rows.append([c.strip().strip("*").strip() for c in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]                      # without the header and the |---| line


def test_readme_faithfulness_table_is_the_committed_benchmark():
    """Every row of the README's faithfulness table shows its method's numbers from
    benchmarks/results/faithfulness.json (a hand edit once put speed figures there)."""
    import json
    result = json.loads((README.parent / "benchmarks" / "results" / "faithfulness.json")
                        .read_text(encoding="utf-8"))
    names = {"gradient": "gradient", "gradient x input": "grad_x_input",
             "integrated gradients": "integrated_gradients", "occlusion": "occlusion",
             "LIME": "lime", "KernelSHAP": "kernel_shap", "random map": "random",
             "input-only map": "input_only"}
    rows = _table_after(README.read_text(encoding="utf-8"), "### Faithfulness of stage 1")
    seen = []
    for cells in rows:
        key = next(k for k in sorted(names, key=len, reverse=True) if cells[0].startswith(k))
        numbers = result.get(names[key]) or result["methods"][names[key]]
        shown = [float(c.strip("*")) for c in cells[1:6]]
        wanted = [numbers[m] for m in ("relevance_mass", "relevance_rank", "deletion_auc",
                                        "insertion_auc", "deletion_aopc")]
        assert shown == [round(w, 3) for w in wanted], (cells[0], shown, wanted)
        seen.append(key)
    assert sorted(seen) == sorted(names)


def test_readme_speed_table_is_the_committed_benchmark():
    """The stage-1 rows of the README's kernel speed table show benchmarks/results/kernels.json:
    the median (as rounded in the table) and the ratio to captum."""
    import json
    methods = json.loads((README.parent / "benchmarks" / "results" / "kernels.json")
                         .read_text(encoding="utf-8"))["stage1"]["methods"]
    names = {"gradient x input": "grad_x_input", "gradient": "gradient",
             "integrated gradients": "integrated_gradients", "occlusion": "occlusion",
             "LIME": "lime", "KernelSHAP": "kernel_shap"}
    rows = _table_after(README.read_text(encoding="utf-8"), "### Kernel speed")
    checked = set()
    for cells in rows:
        key = next((k for k in names if cells[0].startswith(k)), None)
        if key is None:
            continue
        m = methods[names[key]]
        shown_ms = float(cells[1].removesuffix(" ms"))
        assert abs(shown_ms - m["median_ms_ours"]) <= 0.05 * m["median_ms_ours"], (key, cells[1])
        assert float(cells[2]) == round(m["ratio_ours_captum"], 2), (key, cells[2])
        floor = cells[3].split("x", 1)[0]            # "22.4x (7.5x a forward + backward ...)"
        assert float(floor) == round(m["ratio_to_floor"], 1), (key, cells[3])
        checked.add(key)
    assert checked == set(names)


def test_readme_batched_table_is_the_committed_benchmark():
    """The README's "many instances at once" table shows stage1.batched of kernels.json."""
    import json
    batched = json.loads((README.parent / "benchmarks" / "results" / "kernels.json")
                         .read_text(encoding="utf-8"))["stage1"]["batched"]
    names = {"gradient x input": "grad_x_input", "gradient": "gradient",
             "integrated gradients": "integrated_gradients"}
    rows = _table_after(README.read_text(encoding="utf-8"), "**Many instances at once.**")
    checked = set()
    for cells in rows:
        key = next(k for k in names if cells[0].startswith(k))
        m = batched["methods"][names[key]]
        shown = [c.removesuffix(" ms").removesuffix("x") for c in cells[1:6]]
        wanted = [m["ms_per_instance_batched"], m["ms_per_instance_single"],
                  m["speedup_over_single"], m["ratio_to_floor"], m["ratio_to_fwd_bwd_floor"]]
        for s, w in zip(shown, wanted):           # as rounded to the decimals shown
            decimals = len(s.partition(".")[2])
            assert float(s) == round(w, decimals), (key, shown, wanted)
        checked.add(key)
    assert checked == set(names)
    assert f"{batched['n']} other test questions" in " ".join(README.read_text(encoding="utf-8")
                                                               .split())


def test_readme_allocator_table_is_the_committed_benchmark():
    import json
    result = json.loads((README.parent / "benchmarks" / "results" / "allocator.json")
                        .read_text(encoding="utf-8"))
    rows = _table_after(README.read_text(encoding="utf-8"), "### glibc's allocator")
    assert len(rows) == len(result["methods"])
    for row, (method, e) in zip(rows, result["methods"].items()):
        assert row[1:] == [f"{e['default_median_ms']:.1f} ms", f"{e['tuned_median_ms']:.1f} ms",
                           f"{e['default_over_tuned']:.2f}x"], method


def test_readme_click_latency_table_is_the_committed_benchmark():
    """Every p50 and p95 of the README's click latency table, to the millisecond shown."""
    import json
    cases = json.loads((README.parent / "benchmarks" / "results" / "ui_latency.json")
                       .read_text(encoding="utf-8"))["cases"]
    names = {"gradient x input": ["grad_x_input"], "gradient": ["gradient"],
             "integrated gradients": ["integrated_gradients"],
             "second-order token map": None, "occlusion / LIME / KernelSHAP":
             ["occlusion", "lime", "kernel_shap"]}
    rows = _table_after(README.read_text(encoding="utf-8"), "### Click latency in the browser")
    checked = set()
    for cells in rows:
        key = next(k for k in sorted(names, key=len, reverse=True) if cells[0].startswith(k))
        if names[key] is None:
            runs = [cases["second_order_map/uncached"]]
        elif "cached" in cells[0].split(",")[-1] and "/" in cells[0].split(",")[-1]:
            m = names[key][0]
            runs = [cases[f"token_click/{m}/uncached"], cases[f"token_click/{m}/cached"]]
        else:
            runs = [cases[f"token_click/{m}/uncached"] for m in names[key]]
        for column, stat in ((1, "p50_ms"), (2, "p95_ms")):
            shown = [int(v) for v in cells[column].removesuffix(" ms").split(" / ")]
            assert shown == [round(r[stat]) for r in runs], (cells[0], stat, shown)
        checked.add(key)
    assert checked == set(names)


def test_readme_cold_cache_figures_are_the_committed_benchmark():
    import json
    steps = json.loads((README.parent / "benchmarks" / "results" / "cold_cache.json")
                       .read_text(encoding="utf-8"))["steps"]["finite"]
    text = " ".join(README.read_text(encoding="utf-8").split())
    cold, warm = steps["numpy_isfinite"]["cold_us"], steps["numpy_isfinite"]["warm_us"]
    assert (f"takes {round(cold)} us cold with numpy's `isfinite(v).all()` ({round(warm)} us "
            f"warm) and {round(steps['python_sum']['cold_us'])} us") in text


def test_readme_stage2_speed_rows_are_the_committed_benchmark():
    """The stage-2 rows of the README's kernel speed table (second order, pairwise ablation,
    EMAP, DIME) show stage2 of benchmarks/results/kernels.json, as rounded there."""
    import json
    st = json.loads((README.parent / "benchmarks" / "results" / "kernels.json")
                    .read_text(encoding="utf-8"))["stage2"]
    rows = {cells[0]: cells for cells in _table_after(README.read_text(encoding="utf-8"),
                                                       "### Kernel speed")}

    def row(prefix):
        return " | ".join(next(c for k, c in rows.items() if k.startswith(prefix)))

    sog, pw, emap, dime = st["second_order"], st["pairwise_ablation"], st["emap"], st["dime"]
    text = row("second-order token x patch matrix")
    lo, hi = sog["speedup_ci95"]
    # "faster" only when the interval says so; else "on par"
    said = "faster" if lo > 1 else "on par"
    for piece in (f"{sog['median_ms']:.1f} ms", f"({sog['shared_graph_loop_median_ms']:.1f} ms): "
                  f"{sog['speedup']:.2f}x ({said}", f"{sog['speedup_bound']:.1f}x",
                  f"({sog['per_token_loop_median_ms']:.1f} ms): "
                  f"{sog['speedup_over_recomputing_loop']:.1f}x",
                  f"{sog['ratio_to_floor']:.0f}x ({sog['ratio_to_fwd_bwd_floor']:.1f}x"):
        assert piece in text, (piece, text)
    text = row("pairwise ablation")
    assert f"{pw['median_ms']:.0f} ms" in text and f"{pw['ratio_to_floor']:.1f}x" in text, text
    ref = emap["unbatched_reference_s"]
    for prefix, v in (("EMAP, N = 100, traced", "traced"), ("EMAP, N = 100, declared", "declared"),
                      ("EMAP, N = 100, 10,000", "generic")):
        e, text = emap[v], row(prefix)
        speed = f"{e['speedup']:.0f}x faster" if e["speedup"] >= 10 else f"{e['speedup']:.1f}x"
        time = f"{e['median_s']:.2f} s"
        assert time in text and speed in text, (prefix, time, speed, text)
        assert f"{e['ratio_to_floor']:.{2 if e['ratio_to_floor'] < 1 else 1}f}x" in text, text
    assert f"unbatched reference ({ref:.1f} s)" in row("EMAP, N = 100, traced")
    text = row("DIME of one instance")
    d = dime["traced"]
    assert f"{d['median_s']:.2f} s" in text and f"{d['speedup_over_generic']:.1f}x" in text, text
    assert f"({dime['generic']['median_s']:.1f} s)" in text, text


def _flat_readme() -> str:
    return " ".join(README.read_text(encoding="utf-8").split())


def _kernels() -> dict:
    import json
    return json.loads((README.parent / "benchmarks" / "results" / "kernels.json")
                      .read_text(encoding="utf-8"))


def _shown_ms(v: float) -> str:
    """A median as the speed table rounds it."""
    return f"{v:.2f} ms" if v < 10 else (f"{v:.1f} ms" if v < 30 else f"{v:.0f} ms")


def test_readme_stage1_speed_cells_and_prose_are_the_committed_benchmark():
    """The stage-1 medians and the floor parentheticals exactly as rounded, and the prose about
    the gradient methods (headline, intervals, warm loop, other statistics)."""
    d = _kernels()["stage1"]["methods"]
    rows = _table_after(README.read_text(encoding="utf-8"), "### Kernel speed")
    cells = {c[0].split(" (")[0].split(",")[0]: c for c in rows}
    for name, key in (("gradient", "gradient"), ("gradient x input", "grad_x_input"),
                      ("integrated gradients", "integrated_gradients"),
                      ("occlusion", "occlusion"), ("LIME", "lime"), ("KernelSHAP", "kernel_shap")):
        m, row = d[key], cells[name]
        assert row[1] == _shown_ms(m["median_ms_ours"]), (name, row[1])
        if m.get("ratio_to_bare") is not None:
            assert f"{m['ratio_to_fwd_bwd_floor']:.1f}x" in row[3], (name, row[3])
            assert f"{m['ratio_to_bare']:.2f}x" in row[3], (name, row[3])
    g, gx = d["gradient"], d["grad_x_input"]
    text = _flat_readme()
    for piece in (
            f"**The gradient methods against captum: {g['ratio_ours_captum']:.2f} and "
            f"{gx['ratio_ours_captum']:.2f}",
            "the median's 95% interval is {:.2f} to {:.2f} and {:.2f} to {:.2f}".format(
                *g["ratio_ours_captum_ci95"], *gx["ratio_ours_captum_ci95"]),
            "{:.2f} and {:.2f} ms for the gradient (ours/captum {:.2f}), {:.2f} and {:.2f} ms for "
            "gradient x input ({:.2f})".format(
                g["warm_loop"]["median_ms"]["ours"], g["warm_loop"]["median_ms"]["captum"],
                g["warm_loop"]["ratio_ours_captum"], gx["warm_loop"]["median_ms"]["ours"],
                gx["warm_loop"]["median_ms"]["captum"], gx["warm_loop"]["ratio_ours_captum"]),
            f"the median of single-timing ratios {g['median_of_timing_ratios_ours_captum']:.2f} "
            f"and {gx['median_of_timing_ratios_ours_captum']:.2f}",
            f"the ratio of the two medians {g['ratio_of_medians_ours_captum']:.2f} and "
            f"{gx['ratio_of_medians_ours_captum']:.2f}"):
        assert piece in text, piece


def test_readme_emap_first_call_and_second_order_bound_are_the_committed_benchmark():
    st = _kernels()["stage2"]
    e, so = st["emap"]["traced"], st["second_order"]
    text = _flat_readme()
    lo, hi = so["speedup_ci95"]
    for piece in (
            f"(first call, tracing included: {e['first_call_s']:.2f} s)",
            f"({e['first_call_speedup']:.0f}x on the first call)",
            f"a median of {so['image_gradient_rows_median_ms']:.1f} ms",
            f"({so['shared_graph_loop_median_ms']:.1f} ms) allows at most "
            f"{so['speedup_bound']:.1f}x ({so['speedup_bound_max']:.1f}x on the most favourable "
            f"instance; against the loop that also redoes the forward per token, "
            f"{so['speedup_bound_over_recomputing_loop']:.1f}x), and our kernel takes "
            f"{so['kernel_to_bound']:.1f}x",
            f"{so['speedup']:.2f}x (95% interval {lo:.2f} to {hi:.2f}, `speedup_ci95`: "
            f"{'faster' if lo > 1 else 'on par'})",
            f"{so['rounds_per_instance']} rounds per instance",
            f"(relative difference {so['max_relative_difference_to_loop']:.0e})".replace(
                "e-0", "e-")):
        assert piece in text, piece


def test_readme_emap_scale_and_stage34_tables_are_the_committed_benchmarks():
    import json
    results = README.parent / "benchmarks" / "results"
    em = json.loads((results / "emap_scale.json").read_text(encoding="utf-8"))
    rows = _table_after(README.read_text(encoding="utf-8"), "### EMAP gap over large reference")
    assert len(rows) == len(em["runs"])
    for row, r in zip(rows, em["runs"]):
        t = r["seconds"]
        assert row == [f"{r['n']:,}", f"{r['pairs']:,}", f"{t:.1f} s" if t < 10 else f"{t:.0f} s",
                       f"{int(round(r['pairs_per_second'] / 1000)) * 1000:,}",
                       f"{r['peak_rss_growth_mib']:.0f} MiB", f"{r['pair_matrix_mib']:.0f} MiB"]
    rp = json.loads((results / "representations.json").read_text(encoding="utf-8"))
    text = " | ".join(" | ".join(r) for r in _table_after(README.read_text(encoding="utf-8"),
                                                          "### Stages 3 and 4"))
    runs = rp["memory"]["runs"]
    syn = [r for r in runs if r["kind"] == "synthetic"]
    vqa = [r for r in runs if r["kind"] == "vqa"]
    sp = rp["sparse"]["sklearn"]
    for piece in (f"{rp['extremes_vqa']['seconds']:.1f} s",
                  f"{syn[0]['peak_rss_growth_mib']:.1f} vs {syn[1]['peak_rss_growth_mib']:.1f} MiB",
                  f"{vqa[0]['peak_rss_growth_mib']:.0f} vs {vqa[1]['peak_rss_growth_mib']:.0f} MiB",
                  f"{rp['cache']['reopen_seconds'] * 1000:.1f} ms",
                  f"extracting them: {rp['cache']['extract_seconds']:.1f} s",
                  f"{sp['fit_seconds']:.0f} s", f"{sp['test_fidelity']:.3f}",
                  f"{sp['fraction_nonzero']:.3f}"):
        assert piece in text, piece
    al = json.loads((results / "allocator.json").read_text(encoding="utf-8"))["methods"]
    gains = [al[m]["default_over_tuned"] for m in ("occlusion", "lime", "kernel_shap")]
    assert f"gain {min(gains):.2f}-{max(gains):.2f}x here" in _flat_readme()


def test_each_benchmark_section_dates_the_run_of_its_committed_json():
    """A section about ``benchmarks/NAME.py`` that dates its run ("run of 2026-11-27 14:00
    UTC") dates the run that wrote ``benchmarks/results/NAME.json``: its first date is that
    JSON's ``time_utc`` (a rerun whose JSON is committed without the README's date moved
    otherwise goes unnoticed)."""
    import json
    results = README.parent / "benchmarks" / "results"
    sections = re.split(r"^### ", README.read_text(encoding="utf-8"), flags=re.M)[1:]
    checked = 0
    for section in sections:
        heading = section.splitlines()[0]
        named = re.search(r"benchmarks/(\w+)\.py", heading)
        text = " ".join(section.split())
        dated = re.search(r"[Rr]un of (\d{4}-\d\d-\d\d) (\d\d:\d\d) UTC", text)
        if not named or not dated or not (results / f"{named[1]}.json").is_file():
            continue
        env = json.loads((results / f"{named[1]}.json").read_text(encoding="utf-8")).get(
            "environment") or {}
        if "time_utc" not in env:
            continue
        day, minute = env["time_utc"][:10], env["time_utc"][11:16]
        assert (dated[1], dated[2]) == (day, minute), (heading, env["time_utc"])
        checked += 1
    assert checked >= 5          # kernels, allocator, the GPU's, EMAP at scale, stages 3-4
