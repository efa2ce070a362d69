"""The fairness arithmetic of core/stats.py: one Jain implementation for the whole project
(the server's table, the load generator's report, the experiments)."""

from __future__ import annotations

import math

import pytest

from parallelnet.core.stats import COUNTERS, Fairness, format_table, jain_index


@pytest.mark.parametrize("values, expected", [
    ([1, 1, 1, 1], 1.0),
    ([1, 0, 0, 0], 0.25),
    ([4, 0, 0, 0], 0.25),
    ([3, 1], 0.8),                      # 16 / (2 * 10)
    ([5], 1.0),
    ([2, 2, 0], 2 / 3),                 # 16 / (3 * 8)
    ((x for x in [1, 2, 3]), 36 / 42),  # any iterable, consumed once
])
def test_jain_known_vectors(values, expected):
    assert jain_index(values) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("values", [[], [0], [0, 0, 0, 0]])
def test_jain_undefined_is_nan(values):
    """Nothing to share: the index is undefined, not 'perfectly fair' and not 0."""
    assert math.isnan(jain_index(values))
    assert math.isnan(Fairness.of(values).jain)


def test_loadgen_uses_the_same_function():
    from parallelnet.experiments import loadgen
    assert loadgen.jain_index is jain_index


def _snap(index, **counters):
    snap = {name: 0 for name in COUNTERS}
    snap.update(index=index, pid=1, tid=10 + index, cpu=index, last_cpu=index,
                user_s=0.0, sys_s=0.0, cpu_ns=0, open=0)
    snap.update(counters)
    return snap


def test_format_table_prints_undefined_jain_as_na():
    # Two workers that accepted nothing yet (a table printed right after start).
    text = format_table([_snap(0), _snap(1)])
    accepted = next(ln for ln in text.splitlines() if ln.startswith("accepted:"))
    assert "Jain n/a" in accepted and "nan" not in text.lower()


def test_format_table_prints_defined_jain():
    text = format_table([_snap(0, accepted=3, requests=3), _snap(1, accepted=1, requests=1)])
    accepted = next(ln for ln in text.splitlines() if ln.startswith("accepted:"))
    assert "Jain 0.800" in accepted
