"""The balance experiment's arithmetic (experiments/balance.py), without a server."""

from __future__ import annotations

import pytest

from parallelnet.experiments import balance


def test_lagged_pairs_relate_a_workers_busy_time_to_its_next_accepts():
    series = [
        {"busy": [0.9, 0.3], "accepted": [5, 5]},
        {"busy": [0.8, 0.4], "accepted": [2, 8]},   # after worker 0 was busier: it won less
        {"busy": [0.5, 0.5], "accepted": [0, 0]},   # no accepts: no point
        {"busy": [0.5, 0.5], "accepted": [3, 3]},
    ]
    xs, ys = balance.lagged_pairs(series)
    assert xs == pytest.approx([0.3, -0.3, 0.0, 0.0])
    assert ys == pytest.approx([-0.3, 0.3, 0.0, 0.0])
    fit = balance.analysis.ols(xs, ys)
    assert fit["slope"] == pytest.approx(-1.0)


def test_sustained_load_interpolates_to_the_target():
    pts = [(0.5, 2000.0), (0.7, 4000.0), (0.85, 12000.0), (0.95, 40000.0)]
    assert balance.sustained(pts, 10000.0) == pytest.approx(0.7 + 0.15 * 6000 / 8000)
    assert balance.sustained(pts, 50000.0) == 0.95
    assert balance.sustained(pts, 1000.0) is None


def test_rates_give_the_asked_utilisation():
    p = dict(balance.WORKLOAD)
    r = balance.rates(p, 0.8, overhead_us=30.0, workers=2)
    k, n = p["heavy_connections"], p["long_connections"]
    long_mean = (k * 1000 + (n - k) * 200) / n
    work = (r["long_rate"] * (long_mean + 30) + r["churn_conn_rate"] * p["requests_per_conn"] * 230)
    assert work == pytest.approx(0.8 * 2e6)
    assert r["churn_conn_rate"] * p["requests_per_conn"] == pytest.approx(
        p["churn_share"] * r["total_rate"])
