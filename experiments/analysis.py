"""The statistics every summary uses: medians with their range, paired ratios, bootstrap intervals.

Why paired ratios: this VM's speed drifts by up to a quarter within one run with no steal
recorded.  Configurations are run back to back within each repetition, so a drift moves
both members of a pair alike and cancels in their ratio; the ratio of two medians taken
across repetitions does not cancel it.  A comparison is therefore reported as the median
of the per-repetition ratios, with a percentile-bootstrap 95% interval of that median and
the number of pairs (with 3 pairs the interval is wide, and says so).

The bootstrap is seeded from the data itself, so a summary recomputed from the same raw
records is identical byte for byte (the paper is rebuilt deterministically).
"""

from __future__ import annotations

import hashlib
import math
import random
import statistics
from typing import Callable, Iterable

BOOTSTRAP_RESAMPLES = 4000


def median_range(values: Iterable[float]) -> dict | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def bootstrap_ci(values: list[float], stat: Callable = statistics.median, level: float = 0.95,
                 resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` over ``values`` (deterministic)."""
    if not values:
        raise ValueError("no values")
    if len(values) == 1:
        return values[0], values[0]
    seed = int.from_bytes(hashlib.sha256(repr(sorted(values)).encode()).digest()[:8], "big")
    rng = random.Random(seed)
    n = len(values)
    stats = sorted(stat([values[rng.randrange(n)] for _ in range(n)]) for _ in range(resamples))
    lo = stats[int(math.floor((1 - level) / 2 * resamples))]
    hi = stats[min(resamples - 1, int(math.ceil((1 + level) / 2 * resamples)) - 1)]
    return lo, hi


def paired(values_a: dict, values_b: dict) -> list[float]:
    """Ratios a/b over the keys (repetitions) both have, in key order."""
    return [values_a[k] / values_b[k] for k in sorted(set(values_a) & set(values_b))
            if values_a[k] is not None and values_b[k]]


def ratio_summary(ratios: list[float]) -> dict | None:
    """median, bootstrap 95% interval, range, number of pairs, and how many pairs lie
    below 1 (a reader's quickest check on the direction)."""
    if not ratios:
        return None
    lo, hi = bootstrap_ci(ratios)
    return {"median": statistics.median(ratios), "ci95": [lo, hi], "min": min(ratios),
            "max": max(ratios), "n": len(ratios), "below_1": sum(r < 1 for r in ratios)}


def fmt_ratio(s: dict | None, digits: int = 2) -> str:
    """``0.87 [0.85–0.89] n=5``."""
    if not s:
        return "–"
    f = f"{{:.{digits}f}}"
    return (f"{f.format(s['median'])} [{f.format(s['ci95'][0])}–{f.format(s['ci95'][1])}] "
            f"n={s['n']}")


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
BOUND_ORDER = ("client", "both", "server", "neither", "offered")
UNRANKABLE = ("client", "both")


def row_bound(bounds: list[str]) -> str:
    pool = [b for b in bounds if b in UNRANKABLE] or list(bounds)
    known = [b for b in BOUND_ORDER if b in pool] + sorted(set(pool) - set(BOUND_ORDER))
    return max(known, key=pool.count) if known else "?"
