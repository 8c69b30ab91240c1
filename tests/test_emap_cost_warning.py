"""EMAP's pairs warn of their cost, as Shapley and pairwise ablation do.

emap, emap_gap and interaction_type run N^2 pairs (full forward passes when the model cannot be
split): N = 500 took 12 s, N = 2,000 minutes, with nothing said when no progress= was given.
After the first batches of pairs the rest is estimated at their rate, and above
EMAP_WARN_SECONDS one UserWarning per call gives the estimate, why (the N^2 pairs; no split, and
why not) and what costs less. Each test sets the threshold (0: every call is "slow") and a
small batch_size, so that it runs in well under a second.
"""
from __future__ import annotations

import types
import warnings

import numpy as np
import pytest

from multiviz_widgets import ModelAdapter
from multiviz_widgets.kernels import emap as emap_module
from multiviz_widgets.kernels.emap import EMAP_WARN_SECONDS, emap, emap_gap, interaction_type
from multiviz_widgets.notices import collecting
from tests.test_emap_lengths import TwoTexts, adapter_for, dataset_of, items_of
from tests.test_factorize import MODALITIES, Bilinear, instances


def _cost_warnings(call) -> tuple[object, list[str]]:
    """(call(), the texts of the cost warnings it gave)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = call()
    return out, [str(w.message) for w in seen
                 if "at the rate of its first batches" in str(w.message)]


def _bilinear():
    return ModelAdapter(Bilinear(), MODALITIES, ["a", "b", "c"], decision_layer="head")


class Untraceable(Bilinear):
    """Bilinear whose forward branches on its inputs' values: torch.fx cannot trace it, so
    emap has no split (``factorization_note`` says why) and runs full forward passes."""

    def forward(self, tabular, series):
        out = super().forward(tabular, series)
        return out if bool(tabular.sum() < 1e9) else -out


@pytest.fixture
def slow(monkeypatch):
    """Every call's estimate is above the threshold."""
    monkeypatch.setattr(emap_module, "EMAP_WARN_SECONDS", 0.0)


def test_the_threshold_is_a_minute_like_the_other_kernels():
    from multiviz_widgets.kernels.interactions import SHAPLEY_WARN_SECONDS
    assert EMAP_WARN_SECONDS == SHAPLEY_WARN_SECONDS == 60.0


def test_emap_without_a_split_warns_once_with_the_estimate_why_and_what_to_do(slow):
    adapter, items = _bilinear(), instances(6)
    r, said = _cost_warnings(lambda: emap(adapter, items, batch_size=4, factorized=False))
    assert r.params["factorization"] == "none"
    assert len(said) == 1, said
    text = said[0]
    assert text.startswith("emap: 6 instances make 36 pairs (N^2), one full forward pass each")
    assert "not split (factorized=False)" in text
    assert "encode_modality(name, x)" in text and "fuse_encodings" in text
    assert "torch.fx can trace" in text
    assert " more at the rate of its first batches (" in text and " in all)" in text
    assert "Pass progress=" in text and "Explorer shows its progress" in text
    assert "fewer instances (indices=" in text


def test_the_warning_gives_the_reason_the_model_is_not_split(slow):
    adapter, items = (ModelAdapter(Untraceable(), MODALITIES, ["a", "b", "c"],
                                   decision_layer="head"), instances(6))
    r, said = _cost_warnings(lambda: emap(adapter, items, batch_size=4))
    assert r.params["factorization"] == "none"
    assert len(said) == 1 and f"not split ({r.params['factorization_note']})" in said[0]


def test_the_estimate_is_the_rest_at_the_rate_of_the_first_timed_batch(monkeypatch):
    """A clock that ticks 1 s per reading: the second batch (4 pairs) takes 1 s, the 28 pairs
    left take 7 s; the whole adds the seconds before (a few ticks), well under 20."""
    ticks = iter(range(1, 10_000))
    monkeypatch.setattr(emap_module, "time",
                        types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    adapter, items = _bilinear(), instances(6)
    monkeypatch.setattr(emap_module, "EMAP_WARN_SECONDS", 7.0)
    _, said = _cost_warnings(lambda: emap(adapter, items, batch_size=4, factorized=False))
    assert len(said) == 1 and "About 7 s more at the rate of its first batches" in said[0]
    ticks = iter(range(1, 10_000))
    monkeypatch.setattr(emap_module, "EMAP_WARN_SECONDS", 20.0)
    assert _cost_warnings(lambda: emap(adapter, items, batch_size=4, factorized=False))[1] == []


def test_the_fused_path_warns_once_too(slow):
    adapter, items = _bilinear(), instances(6)
    r, said = _cost_warnings(lambda: emap(adapter, items, batch_size=4))
    assert r.params["factorization"] == "traced" and r.params["fused_pairs"] == 36
    assert len(said) == 1
    assert "36 pairs (N^2), each fused from the modalities' encodings" in said[0]
    assert "not split" not in said[0]


@pytest.mark.parametrize("factorized", [None, False])
def test_three_modalities_warn_once_for_all_their_loops(slow, factorized):
    adapter = adapter_for(TwoTexts(), ("question", "answer"))
    items = items_of(6, seed=1, answers=True)
    _, said = _cost_warnings(lambda: emap(adapter, items, batch_size=4, factorized=factorized))
    assert len(said) == 1
    assert "6 instances make 108 pairs (N^2 = 36 for each of its 3 modalities)" in said[0]


def test_emap_gap_warns_once_for_all_its_repeats(slow):
    adapter = adapter_for(TwoTexts(), ("question", "answer"))
    ds = dataset_of(items_of(6, seed=1, answers=True), labels=[0, 1, 2, 0, 1, 2])
    _, said = _cost_warnings(lambda: emap_gap(adapter, ds, n=None, batch_size=4, repeats=3))
    assert len(said) == 1
    assert said[0].startswith("emap_gap: 6 instances make 108 pairs")
    assert "3 times (repeats=3)" in said[0] and "fewer instances (n=" in said[0]


def test_interaction_type_warns_once(slow):
    adapter, items = _bilinear(), instances(7)
    _, said = _cost_warnings(lambda: interaction_type(adapter, items[0], items[1:],
                                                      batch_size=4, factorized=False))
    assert len(said) == 1
    assert said[0].startswith("interaction_type: 6 references make 36 pairs (N^2)")
    assert "fewer references (n_reference=" in said[0]


@pytest.mark.parametrize("factorized", [None, False])
def test_fast_calls_say_nothing(factorized):
    adapter, items = _bilinear(), instances(6)
    _, said = _cost_warnings(lambda: emap(adapter, items, batch_size=4, factorized=factorized))
    assert said == []
    ds = dataset_of(items_of(6, seed=1, answers=True), labels=[0, 1, 2, 0, 1, 2])
    three = adapter_for(TwoTexts(), ("question", "answer"))
    assert _cost_warnings(lambda: emap_gap(three, ds, n=None, batch_size=4, repeats=2))[1] == []
    assert _cost_warnings(lambda: interaction_type(adapter, items[0], items[1:], batch_size=4,
                                                   factorized=factorized))[1] == []


def test_with_progress_it_warns_too_and_results_and_progress_are_unchanged(monkeypatch):
    """As Shapley's (and the prediction path's) cost warning, it is given with a progress
    callback too (the Explorer passes one, and shows the warning beside its view), less the
    advice to pass one; the results and the progress reports are those of a quiet call."""
    adapter, items = _bilinear(), instances(6)

    def run():
        seen = []
        r, said = _cost_warnings(lambda: emap(adapter, items, batch_size=4, factorized=False,
                                              keep_matrix=True,
                                              progress=lambda *a: seen.append(a)))
        return r, said, seen

    quiet, none_said, quiet_seen = run()
    assert none_said == []
    monkeypatch.setattr(emap_module, "EMAP_WARN_SECONDS", 0.0)
    loud, said, loud_seen = run()
    assert len(said) == 1 and "Pass progress=" not in said[0]
    assert loud_seen == quiet_seen and loud_seen[-1][:2] == (36, 36)
    for name in ("logits", "emap_logits", "matrix", "grand_mean"):
        np.testing.assert_array_equal(getattr(loud, name), getattr(quiet, name))
    assert loud.forward_passes == quiet.forward_passes


def test_the_warning_reaches_the_explorers_collector(slow):
    """Through notices.warn: on the Explorer's workers it is collected for the job's view."""
    adapter, items = _bilinear(), instances(6)
    with collecting() as notices, warnings.catch_warnings(record=True) as plain:
        warnings.simplefilter("always")
        emap(adapter, items, batch_size=4, factorized=False)
    assert [n.category for n in notices if "emap: 6 instances" in n.text] == ["UserWarning"]
    assert not [w for w in plain if "emap: 6 instances" in str(w.message)]


def test_loops_of_one_batch_are_measured_and_a_warning_never_comes_with_the_result(
        monkeypatch):
    """N^2 <= batch_size: each loop's only batch was its untimed warm-up, so no loop was ever
    measured and a slow model ran for minutes unsaid; with two batches the warning came after
    the last one ("About 0 s more"). A loop of one batch now gives the rate of what follows it,
    and nothing is said when less than half the threshold is left."""
    import torch
    from multiviz_widgets import Tabular

    class ThreeInputs(Bilinear):
        def __init__(self):
            super().__init__()
            self.extra = torch.nn.Linear(2, 5)

        def forward(self, tabular, series, extra):
            return super().forward(tabular, series) + self.head(
                torch.cat([torch.tanh(self.extra(extra))] * 2, 1))
    monkeypatch.setattr(emap_module, "EMAP_WARN_SECONDS", 1e-9)
    adapter = ModelAdapter(ThreeInputs(), [*MODALITIES, Tabular("extra", columns=["e0", "e1"])],
                           ["a", "b", "c"], decision_layer="head")
    g = torch.Generator().manual_seed(0)
    items = [dict(it, extra=torch.randn(2, generator=g)) for it in instances(3)]
    # three loops of 9 pairs, each one batch
    _, said = _cost_warnings(lambda: emap(adapter, items, batch_size=16, factorized=False))
    assert len(said) == 1, said
    # two modalities: one loop, one batch, nothing after it: no warning with the result
    _, said = _cost_warnings(lambda: emap(_bilinear(), instances(3), batch_size=16,
                                          factorized=False))
    assert said == []
