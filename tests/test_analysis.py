"""The experiments' statistics say what they know (experiments/analysis.py).

Coverage is checked on synthetic data with a fixed seed (deterministic, cannot flake):
thousands of simulated runs whose true ratio is known, each summarised as a run would be.
"""

from __future__ import annotations

import math
import random

import pytest

from parallelnet.experiments import analysis

TRIALS = 4000


def _coverage(n: int, draw, truth: float, summarise) -> float:
    rng = random.Random(20261205 + n)
    hits = 0
    for _ in range(TRIALS):
        s = summarise([draw(rng) for _ in range(n)])
        lo, hi = s["interval"]
        hits += lo <= truth <= hi
    return hits / TRIALS


@pytest.mark.parametrize("n", [8, 12, 30])
def test_ratio_interval_has_its_coverage_with_lognormal_ratios(n):
    """Log-normal ratios (the model the t interval on log-ratios is exact for): 95% of
    intervals contain the true geometric mean ratio.  With 4,000 trials the standard
    error of the coverage is 0.0034: the band below is more than four of them."""
    truth = 0.85
    cov = _coverage(n, lambda rng: truth * math.exp(rng.gauss(0, 0.08)), truth,
                    analysis.ratio_summary)
    assert 0.935 <= cov <= 0.965, cov


def test_difference_interval_has_its_coverage():
    cov = _coverage(10, lambda rng: rng.gauss(-0.12, 0.05), -0.12, analysis.diff_summary)
    assert 0.935 <= cov <= 0.965, cov


def test_fewer_than_eight_pairs_give_a_range_not_an_interval():
    """With three pairs a percentile bootstrap of the median is the [min, max] of the three
    and covers about 75% (here: the range of 3 log-normal draws contains their median
    only 75% of the time) - so it is reported and labelled as a range."""
    s = analysis.ratio_summary([0.9, 0.8, 0.85])
    assert s["kind"] == "range" and s["interval"] == [0.8, 0.9] and s["estimate"] == 0.85
    assert analysis.fmt_ratio(s) == "0.85× [range 0.80–0.90, n=3]"
    cov = _coverage(3, lambda rng: math.exp(rng.gauss(0, 0.1)), 1.0, analysis.ratio_summary)
    assert 0.70 <= cov <= 0.80, cov   # 1 - 2 * 0.5**3 = 0.75: why it is not called 95%


def test_eight_pairs_give_a_labelled_95_interval_around_the_geometric_mean():
    ratios = [0.80, 0.82, 0.85, 0.86, 0.88, 0.90, 0.91, 0.95]
    s = analysis.ratio_summary(ratios)
    assert s["kind"] == "ci95" and s["n"] == 8 and s["below"] == 8
    gm = math.exp(sum(map(math.log, ratios)) / 8)
    assert s["estimate"] == pytest.approx(gm)
    assert s["interval"][0] < gm < s["interval"][1]
    assert analysis.fmt_ratio(s).startswith(f"{gm:.2f}× [95% CI ")


def test_slope_across_repetitions():
    """A known dose-response recovered from per-repetition fits; the interval comes from the
    spread of the repetitions' slopes, not from the points inside one repetition."""
    rng = random.Random(7)
    series = []
    for _ in range(10):
        xs = [0.0, 0.25, 0.5, 0.75, 1.0] * 2
        ys = [0.5 - 0.2 * x + rng.gauss(0, 0.02) for x in xs]
        series.append((xs, ys))
    s = analysis.slope_summary(series)
    assert s["kind"] == "ci95" and len(s["slopes"]) == 10
    assert s["interval"][0] < -0.2 < s["interval"][1]
    assert analysis.ols([1, 1], [2, 3]) is None   # no spread in x: no slope


def test_aa_flag():
    quiet = analysis.ratio_summary([1.0, 1.01, 0.99, 1.0, 1.02, 0.98, 1.0, 1.01])
    assert not analysis.aa_flag(quiet)
    noisy = analysis.ratio_summary([1.0, 1.2, 0.9, 1.1])
    assert analysis.aa_flag(noisy)


def test_summaries_are_deterministic_and_ignore_bad_values():
    vals = [0.81, 0.85, 0.86, 0.88, 0.93, 0.9, 0.87, 0.84]
    assert analysis.ratio_summary(vals) == analysis.ratio_summary(list(reversed(vals)))
    assert analysis.ratio_summary([None, 0.0, float("nan")]) is None
    assert analysis.diff_summary([]) is None


def test_series_t_quantile_matches_scipy_where_intervals_are_computed():
    from scipy.stats import t

    for df in range(7, 200):
        for p in (0.975, 0.95, 0.995):
            assert abs(analysis.t_quantile_series(p, df) - t.ppf(p, df)) < 1e-3, (df, p)


# -- tail percentiles and the samples beyond them ------------------------------------------

def test_ten_samples_beyond_a_percentile_print_it_and_nine_do_not():
    # 1,000 samples: p99 is the 990th, 10 lie beyond it; 999 samples: still the 990th, 9.
    assert analysis.tail_samples(1000, 99) == analysis.MIN_TAIL_SAMPLES == 10
    assert analysis.tail_samples(999, 99) == 9
    assert analysis.fmt_tail(225.4, 1000, 99) == "225 (10 beyond)"
    assert analysis.fmt_tail(225.4, 999, 99) == "– (9 beyond, <10)"
    # p99.9 of 4,500 connections (an imbalance point) rests on 4 of them.
    assert analysis.fmt_tail(3100.0, 4500, "p99.9") == "– (4 beyond, <10)"
    assert analysis.fmt_tail(2.345e3, 20000, "p99", digits=2, scale=1e-3) == "2.35 (200 beyond)"


def test_samples_beyond_count_from_the_sample_the_load_generator_reports():
    """The count is of the samples ranked after the one reported as the percentile, by
    the generator's own arithmetic (its float rounding included)."""
    from parallelnet.experiments.loadgen.loadgen import percentiles_from_histogram

    for n in (1, 9, 10, 99, 100, 101, 999, 1000, 1001, 4500, 10000):
        hist = [(1000 * (i + 1), 1) for i in range(n)]   # n distinct values, one sample each
        pcts = percentiles_from_histogram(hist)
        for key, value_us in pcts.items():
            beyond = sum(1000 * (i + 1) > value_us * 1000 for i in range(n))
            assert analysis.tail_samples(n, analysis.percentile_of(key)) == beyond, (n, key)


def test_a_median_of_tails_counts_its_thinnest_repetition():
    assert analysis.fewest_samples([15000, 14200, 14999]) == 14200
    assert analysis.fewest_samples([15000, None]) is None     # a record without the count
    assert analysis.fewest_samples([]) is None
    assert analysis.fmt_tail(225.0, None, 99) == "225 (? beyond)"
    assert analysis.fmt_tail(None, 1000, 99) == "–"
    assert analysis.tail_samples(0, 99) == 0
