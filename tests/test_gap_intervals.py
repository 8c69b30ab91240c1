"""The EMAP gap's 95% intervals: Wilson's for the prediction gap, Newcombe's paired interval
(method 10) for the label gap. Checked against scipy's Wilson interval, a brute-force coverage
simulation, and the planted and additive synthetic models (a large gap's interval excludes 0,
an additive model's holds it)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from multiviz_widgets.demos import synthetic
from multiviz_widgets.kernels.emap import emap_gap, paired_difference_interval, wilson_interval


@pytest.mark.parametrize("k, n", [(0, 1), (0, 10), (3, 10), (10, 10), (1, 100), (47, 100),
                                  (0, 1000), (999, 1000)])
def test_wilson_interval_equals_scipy_s(k, n):
    want = binomtest(k, n).proportion_ci(0.95, method="wilson")
    np.testing.assert_allclose(wilson_interval(k, n), [want.low, want.high], atol=1e-12)


def test_wilson_interval_is_not_empty_at_no_disagreement():
    low, high = wilson_interval(0, 100)
    assert low == 0.0 and 0.03 < high < 0.04          # about 3.8 / n, not [0, 0]


@pytest.mark.parametrize("k, n", [(-1, 5), (6, 5), (0, 0)])
def test_wilson_interval_refuses_impossible_counts(k, n):
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_interval(k, n)


def _paired(rng, n, p_both, p_first, p_second):
    """Outcomes (first right, second right) of n instances with the given cell probabilities
    (both right, first only, second only; both wrong the rest)."""
    cell = rng.choice(4, size=n, p=[p_both, p_first, p_second, 1 - p_both - p_first - p_second])
    return (cell == 0) | (cell == 1), (cell == 0) | (cell == 2)


@pytest.mark.parametrize("cells", [(0.6, 0.2, 0.05), (0.7, 0.02, 0.02), (0.3, 0.3, 0.1),
                                   (0.85, 0.1, 0.0)])
def test_paired_interval_covers_the_true_difference_about_95_percent_of_the_time(cells):
    """Newcombe's method 10 keeps close to its nominal 95% (his paper: 93% to 97% for n = 100
    over such tables), where mean +- 1.96 se under-covers with few discordant pairs."""
    rng = np.random.default_rng(0)
    truth = cells[1] - cells[2]
    runs, covered = 2000, 0
    for _ in range(runs):
        low, high = paired_difference_interval(*_paired(rng, 100, *cells))
        covered += low <= truth <= high
    assert 0.925 <= covered / runs <= 0.985, covered / runs


def _table(a, b, c, d):
    """Outcomes of a paired table: a both right, b the first only, c the second only."""
    first = np.array([1] * a + [1] * b + [0] * c + [0] * d, dtype=bool)
    second = np.array([1] * a + [0] * b + [1] * c + [0] * d, dtype=bool)
    return first, second


@pytest.mark.parametrize("table, want", [
    ((36, 12, 2, 0), (0.0569, 0.3404)),      # Newcombe 1998's own worked example
    ((59, 6, 16, 80), (-0.1186, -0.0046)),   # Fagerland, Lydersen & Laake 2017, ch. 8 (Cavo)
    ((1, 1, 7, 12), (-0.5069, -0.0256)),     # the same chapter (Bentur): ad - bc > n / 2 is
])                                           # where the correction of phi changes the result
def test_paired_interval_reproduces_the_published_examples(table, want):
    np.testing.assert_allclose(paired_difference_interval(*_table(*table)), want, atol=5e-5)


@pytest.mark.parametrize("table", [(20, 0, 0, 20), (50, 0, 0, 50), (1, 0, 0, 1), (40, 0, 0, 0),
                                   (0, 0, 0, 40), (0, 30, 0, 0), (0, 0, 30, 0), (3, 1, 0, 0),
                                   (10, 5, 5, 10)])
def test_paired_interval_holds_the_estimate_and_is_never_a_claim_of_certainty(table):
    """Uncorrected, phi is 1 for a table of no discordant pair and as many right as wrong,
    and the interval was [0, 0]."""
    first, second = _table(*table)
    low, high = paired_difference_interval(first, second)
    diff = first.mean() - second.mean()
    assert -1.0 <= low <= diff <= high <= 1.0 and high - low > 0, (low, high)


@pytest.mark.parametrize("cells", [(0.6, 0.2, 0.05), (0.5, 0.0, 0.0), (0.0, 1.0, 0.0),
                                   (0.0, 0.0, 1.0), (0.2, 0.4, 0.4)])
def test_paired_interval_holds_the_estimate_and_stays_in_range(cells):
    rng = np.random.default_rng(1)
    for n in (1, 5, 40, 500):
        first, second = _paired(rng, n, *cells)
        low, high = paired_difference_interval(first, second)
        diff = first.mean() - second.mean()
        assert -1.0 <= low <= diff <= high <= 1.0
        assert high - low > 0                     # never a zero-width claim of certainty


def test_paired_interval_of_identical_outcomes_is_narrow_but_not_empty():
    same = np.arange(200) % 3 == 0
    low, high = paired_difference_interval(same, same)
    assert low < 0 < high and high - low < 0.1


def test_class_indices_instead_of_outcomes_are_refused():
    with pytest.raises(ValueError, match="yes/no outcomes"):
        paired_difference_interval(np.array([0, 2, 1]), np.array([1, 2, 0]))
    with pytest.raises(ValueError, match="integers"):
        wilson_interval(2.5, 10)


def test_paired_interval_refuses_arrays_of_other_shapes():
    with pytest.raises(ValueError, match="same non-zero length"):
        paired_difference_interval([True, False], [True])
    with pytest.raises(ValueError, match="same non-zero length"):
        paired_difference_interval([], [])


def test_planted_gap_interval_excludes_zero_and_the_additive_twin_s_holds_it():
    planted, ds = synthetic.load("planted")
    gap = emap_gap(planted, ds, n=100)
    low, high = gap["gap_ci95"]
    assert gap["gap_ci95"] == gap["gap_labels_ci95"] and 0 < low <= gap["gap"] <= high
    assert gap["gap_points_ci95"] == pytest.approx([100 * low, 100 * high])
    p_low, p_high = gap["gap_predictions_ci95"]
    assert 0 < p_low <= gap["gap_predictions"] <= p_high
    additive, ds = synthetic.load("additive")
    twin = emap_gap(additive, ds, n=100)
    low, high = twin["gap_ci95"]
    assert low <= 0 <= high and high - low < 0.1, twin


def test_gap_without_labels_takes_the_prediction_gap_s_interval():
    adapter, ds = synthetic.load("planted")         # a dataset of its own: labels cleared
    ds.labels = None
    gap = emap_gap(adapter, ds, n=40)
    assert "gap_labels_ci95" not in gap
    assert gap["gap_ci95"] == gap["gap_predictions_ci95"]
