"""The statistics every summary uses, saying what they know: intervals, ranges, slopes, A/A.

Why paired ratios: this VM's speed drifts by up to a quarter within one run with no steal
recorded.  Configurations are run back to back within each repetition, so a drift moves
both members of a pair alike and cancels in their ratio; the ratio of two medians taken
across repetitions does not cancel it.  A comparison is therefore built from the
per-repetition ratios (or differences), and summarised by what their number allows:

* **8 pairs or more**: a 95% confidence interval with that coverage.  Ratios: a Student t
  interval on the log-ratios, reported as the geometric mean ratio and its interval
  (exact coverage when the log-ratios are normal; ``tests/test_analysis.py`` checks it on
  synthetic data).  Differences (points of share, µs of latency): a t interval on the
  mean difference.  ``kind`` is ``"ci95"``.
* **fewer than 8**: no interval is claimed.  With three pairs a percentile bootstrap of
  the median *is* the [min, max] of the three (all 27 resamples enumerate it) and covers
  about 75%, not 95%; so the summary reports the median and the **range** of the pairs,
  labelled as such.  ``kind`` is ``"range"``.

A **dose-response** (a share against a hog's duty, accepts against busy time) is
summarised by a fitted slope: an ordinary least-squares slope per repetition, and the
interval (or range) of those slopes across repetitions - repetitions are independent,
the points within one are not.

An **A/A control** (one configuration measured twice within each repetition, as if it
were two) gives the noise floor of a run: its ratio is summarised like any other, and a
run whose A/A estimate or interval leaves [0.95, 1.05] is flagged.

A **tail percentile** (p99, p99.9, ...) of one run rests on the samples beyond it: p99.9
of 4,500 connections is the 5th slowest, not a distribution's property.  Every table
prints a tail figure with that count beside it (:func:`fmt_tail`: ``225 (38 beyond)``),
and prints no figure at all, but ``–`` and the count, when fewer than
``MIN_TAIL_SAMPLES`` lie beyond it.  A cell that is a median over repetitions counts
the repetition with the fewest samples (:func:`fewest_samples`), the one whose tail is
thinnest.

Everything here is deterministic: a summary recomputed from the same raw records is
identical byte for byte (the paper is rebuilt deterministically).  Quantiles of the t
distribution come from scipy (the ``bench`` extra), imported only when an interval is
computed.
"""

from __future__ import annotations

import math
import statistics
from typing import Iterable

#: Pairs needed before a 95% interval is claimed (below: the range is reported).
MIN_PAIRS_FOR_CI = 8
#: An A/A ratio (estimate or either end of its interval) outside this band flags the run.
AA_BAND = (0.95, 1.05)
#: A tail percentile is printed only when at least this many samples lie beyond it: with
#: fewer it is one of a handful of the slowest samples, which one run's luck decides.
MIN_TAIL_SAMPLES = 10


def median_range(values: Iterable[float]) -> dict | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom: scipy's where it is
    installed (the ``bench`` extra), else ``t_quantile_series``."""
    try:
        from scipy.stats import t
    except ImportError:   # a machine without the bench extra (a lent device with no network)
        return t_quantile_series(p, df)
    return float(t.ppf(p, df))


def t_quantile_series(p: float, df: int) -> float:
    """Student's t quantile from the normal one by the Cornish-Fisher series in 1/df
    (Abramowitz & Stegun, Handbook of Mathematical Functions, 26.7.5): within 1e-3 of the
    exact value for df >= 7, the smallest an interval is computed with here (8 pairs);
    tests/test_analysis.py checks it against scipy."""
    z = statistics.NormalDist().inv_cdf(p)
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
    v = float(df)
    return z + g1 / v + g2 / v ** 2 + g3 / v ** 3 + g4 / v ** 4


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student t interval of the mean of ``values`` (n >= 2)."""
    n = len(values)
    mean = statistics.fmean(values)
    half = t_quantile(0.5 + level / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


def paired(values_a: dict, values_b: dict) -> list[float]:
    """Ratios a/b over the keys (repetitions) both have, in key order."""
    return [values_a[k] / values_b[k] for k in sorted(set(values_a) & set(values_b))
            if values_a[k] is not None and values_b[k]]


def paired_diff(values_a: dict, values_b: dict) -> list[float]:
    """Differences a - b over the keys (repetitions) both have, in key order."""
    return [values_a[k] - values_b[k] for k in sorted(set(values_a) & set(values_b))
            if values_a[k] is not None and values_b[k] is not None]


def _summary(values: list[float], estimate: float, interval, kind: str, pivot: float) -> dict:
    return {"estimate": estimate, "interval": [interval[0], interval[1]], "kind": kind,
            "n": len(values), "median": statistics.median(values), "min": min(values),
            "max": max(values), "below": sum(v < pivot for v in values)}


def ratio_summary(ratios: list[float]) -> dict | None:
    """Paired ratios summarised by what their number allows (module docstring):
    ``estimate`` (geometric mean with a ``ci95``, median with a ``range``), ``interval``,
    ``kind``, ``n``, ``median``, ``min``, ``max`` and ``below`` (pairs below 1: a reader's
    quickest check on the direction)."""
    ratios = [r for r in ratios if r is not None and r > 0 and math.isfinite(r)]
    if not ratios:
        return None
    if len(ratios) >= MIN_PAIRS_FOR_CI and len(set(ratios)) > 1:
        m, lo, hi = t_interval([math.log(r) for r in ratios])
        return _summary(ratios, math.exp(m), (math.exp(lo), math.exp(hi)), "ci95", 1.0)
    return _summary(ratios, statistics.median(ratios), (min(ratios), max(ratios)), "range", 1.0)


def unpaired_ratio_summary(a: list[float], b: list[float]) -> dict | None:
    """B / A for two independent samples (two runs: their repetitions are not paired):
    the ratio of geometric means, with a Welch t interval on the difference of mean logs
    when both have 8 values or more (``ci95``), else the widest ratio the values allow,
    [min B / max A, max B / min A] (``range``)."""
    a = [x for x in a if x is not None and x > 0 and math.isfinite(x)]
    b = [x for x in b if x is not None and x > 0 and math.isfinite(x)]
    if not a or not b:
        return None
    la, lb = [math.log(x) for x in a], [math.log(x) for x in b]
    est = math.exp(statistics.fmean(lb) - statistics.fmean(la))
    base = {"estimate": est, "n": min(len(a), len(b)), "n_a": len(a), "n_b": len(b),
            "median": statistics.median(b) / statistics.median(a), "min": min(b) / max(a),
            "max": max(b) / min(a), "below": None}
    if len(a) >= MIN_PAIRS_FOR_CI and len(b) >= MIN_PAIRS_FOR_CI:
        va, vb = statistics.variance(la) / len(la), statistics.variance(lb) / len(lb)
        if va + vb > 0:
            df = (va + vb) ** 2 / (va ** 2 / (len(la) - 1) + vb ** 2 / (len(lb) - 1))
            half = t_quantile(0.975, df) * math.sqrt(va + vb)
            return {**base, "interval": [est * math.exp(-half), est * math.exp(half)], "kind": "ci95"}
    return {**base, "interval": [base["min"], base["max"]], "kind": "range"}


def diff_summary(diffs: list[float]) -> dict | None:
    """Paired differences: the mean and its t interval (``ci95``) with 8 pairs or more,
    else the median and the range.  ``below`` counts differences below 0."""
    diffs = [d for d in diffs if d is not None and math.isfinite(d)]
    if not diffs:
        return None
    if len(diffs) >= MIN_PAIRS_FOR_CI and len(set(diffs)) > 1:
        m, lo, hi = t_interval(diffs)
        return _summary(diffs, m, (lo, hi), "ci95", 0.0)
    return _summary(diffs, statistics.median(diffs), (min(diffs), max(diffs)), "range", 0.0)


def ols(xs: list[float], ys: list[float]) -> dict | None:
    """Least-squares line through (x, y): slope, intercept, r2, n (None if x is constant)."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if not sxx:
        return None
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    syy = sum((y - my) ** 2 for y in ys)
    slope = sxy / sxx
    return {"slope": slope, "intercept": my - slope * mx, "n": n,
            "r2": sxy * sxy / (sxx * syy) if syy else 1.0}


def slope_summary(series: list[tuple[list[float], list[float]]]) -> dict | None:
    """A dose-response across repetitions: one OLS slope per repetition's (xs, ys), then
    ``diff_summary`` of those slopes (a ``ci95`` from 8 repetitions on, else a range),
    with the per-repetition slopes kept (``slopes``)."""
    fits = [ols(xs, ys) for xs, ys in series]
    slopes = [f["slope"] for f in fits if f is not None]
    s = diff_summary(slopes)
    if s is not None:
        s["slopes"] = slopes
    return s


def aa_flag(summary: dict | None) -> bool:
    """An A/A ratio whose estimate or interval leaves AA_BAND: the run's noise floor is
    wider than the effects it would be read for."""
    if not summary:
        return False
    lo, hi = AA_BAND
    vals = [summary["estimate"], *summary["interval"]]
    return any(v < lo or v > hi for v in vals)


def fmt_interval(s: dict | None, digits: int = 2, scale: float = 1.0, unit: str = "",
                 signed: bool = False) -> str:
    """``0.87 [95% CI 0.85–0.89, n=8]`` or ``0.87 [range 0.85–0.89, n=3]`` (``scale``
    multiplies every figure, e.g. 100 for points of share)."""
    if not s:
        return "–"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    lo, hi = (f.format(v * scale) for v in s["interval"])
    what = "95% CI" if s["kind"] == "ci95" else "range"
    return f"{f.format(s['estimate'] * scale)}{unit} [{what} {lo}–{hi}, n={s['n']}]"


def fmt_ratio(s: dict | None, digits: int = 2) -> str:
    """A ratio: ``0.87× [95% CI 0.85–0.89, n=8]`` / ``0.87× [range 0.85–0.89, n=3]``."""
    return fmt_interval(s, digits, unit="×")


def tail_samples(n_samples: int, q: float) -> int:
    """How many of ``n_samples`` latency samples lie beyond their q-th percentile as the
    load generator reports it (the sample ranked ceil(q% * n), loadgen.percentile_rank):
    the samples ranked after it.  0 for no samples."""
    from parallelnet.experiments.loadgen.loadgen import percentile_rank

    if n_samples <= 0:
        return 0
    return n_samples - percentile_rank(q, n_samples)


def percentile_of(key: str) -> float:
    """The percentile a latency key names: ``"p99.9"`` -> 99.9."""
    return float(key.removeprefix("p"))


def latency_samples(record: dict) -> int | None:
    """The latency samples of a record's load generator: its ``requests``, each measured
    request being one sample (in churn, one connection: connect, echo, close).  None for
    a record that does not have it."""
    return record.get("requests")


def fewest_samples(counts: Iterable[int | None]) -> int | None:
    """The smallest per-repetition sample count behind a median of tail figures (the
    thinnest tail among them); None when any count is unknown (records from before the
    count was kept) or there is none."""
    counts = list(counts)
    if not counts or any(c is None for c in counts):
        return None
    return min(counts)


def fmt_tail(value: float | None, n_samples: int | None, q: float | str, digits: int = 0,
             scale: float = 1.0) -> str:
    """A tail percentile with the samples beyond it: ``225 (38 beyond)``; with fewer than
    MIN_TAIL_SAMPLES beyond, no figure: ``– (4 beyond, <10)``.  ``q``: 99.9 or "p99.9";
    ``n_samples``: the samples it was taken over (the fewest of the repetitions for a
    median), None when unknown (``225 (? beyond)``); ``scale`` multiplies the value
    (1e-3 for ms)."""
    if value is None:
        return "–"
    q = percentile_of(q) if isinstance(q, str) else q
    shown = f"{value * scale:.{digits}f}"
    if n_samples is None:
        return f"{shown} (? beyond)"
    beyond = tail_samples(n_samples, q)
    if beyond < MIN_TAIL_SAMPLES:
        return f"– ({beyond} beyond, <{MIN_TAIL_SAMPLES})"
    return f"{shown} ({beyond} beyond)"


def tail_note(sample: str = "request") -> str:
    """The sentence a table with tail figures adds to its note: what its count means."""
    return (f"Tail latencies: (k beyond) = how many {sample}s' latencies lie beyond that "
            f"percentile, in the repetition with the fewest {sample}s (a median over "
            f"repetitions counts its thinnest tail); with fewer than {MIN_TAIL_SAMPLES} beyond, "
            "no figure is printed (–).")


def prefer_quiet(runs: list, is_noisy) -> tuple[list, int, bool]:
    """The runs a summary row uses: ``(used, dropped, all_noisy)``.

    The quiet runs when there are any (the noisy ones are counted, not used); when every
    run of a configuration was noisy, all of them, and the row says so: an empty summary
    would hide that the machine was busy instead of showing it.
    """
    quiet = [r for r in runs if not is_noisy(r)]
    if quiet:
        return quiet, len(runs) - len(quiet), False
    return list(runs), 0, True


#: How a summary row names its bottleneck when its repetitions disagree: the most common
#: of the bounds that stop a row from being ranked, if any repetition had one, else the
#: most common; ties broken in this order (deterministic, whatever the hash seed).
BOUND_ORDER = ("client", "both", "server", "gil", "neither", "offered")
UNRANKABLE = ("client", "both")


def row_bound(bounds: list[str]) -> str:
    pool = [b for b in bounds if b in UNRANKABLE] or list(bounds)
    known = [b for b in BOUND_ORDER if b in pool] + sorted(set(pool) - set(BOUND_ORDER))
    return max(known, key=pool.count) if known else "?"
