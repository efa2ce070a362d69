"""The machine probes (experiments/machine): wake-up latency, timer overshoot, the facts read
from the kernel, and the summary's tail rule.  Sanity bounds only: the figures themselves
depend on the machine and are reported, never asserted."""

import os

import pytest

from parallelnet.experiments import machine

CPUS = sorted(os.sched_getaffinity(0))


def test_wake_latency_returns_every_sample_positive_and_bounded():
    xs = machine.wake_latency(CPUS[0], CPUS[-1], n=200, gap_us=50)
    assert len(xs) == 200
    # A wake-up takes time and, on any machine that runs the suite, less than a second.
    assert all(0 < x < 1_000_000_000 for x in xs)


def test_wake_latency_on_one_cpu_and_the_callers_mask_is_restored():
    before = os.sched_getaffinity(0)
    xs = machine.wake_latency(CPUS[0], CPUS[0], n=100, gap_us=0)
    assert len(xs) == 100 and min(xs) > 0
    assert os.sched_getaffinity(0) == before


def test_a_cpu_outside_the_mask_is_a_clear_error_not_a_hang():
    bad = max(CPUS) + 1024
    with pytest.raises(OSError) as e:
        machine.wake_latency(CPUS[0], bad, n=10, gap_us=0)
    assert "wake_latency" in str(e.value)
    with pytest.raises(OSError):
        machine.timer_overshoot(bad, n=5)


def test_timer_overshoot_is_never_early():
    xs = machine.timer_overshoot(CPUS[0], n=50, sleep_us=100)
    # TIMER_ABSTIME on CLOCK_MONOTONIC: the sleep never returns before its deadline.
    assert len(xs) == 50 and min(xs) >= 0


def test_the_cpu_charged_per_wake_up_is_positive_and_a_bad_cpu_is_an_error():
    before = os.sched_getaffinity(0)
    us = machine.wake_cpu_cost(CPUS[0], n=20, sleep_us=100)
    # Entering a sleep and coming back costs something, and far less than the sleep itself
    # times the count would if the thread had spun (20 x 100 us).
    assert 0 < us < 20 * 100
    assert os.sched_getaffinity(0) == before
    with pytest.raises(OSError) as e:
        machine.wake_cpu_cost(max(CPUS) + 1024, n=2)
    assert "wake_cpu_cost" in str(e.value)


def test_tails_are_printed_only_with_ten_samples_beyond():
    s = machine.summarise_ns(list(range(1, 501)))          # 500 samples: 5 beyond p99
    assert "p99_us" not in s and s["n"] == 500 and s["min_us"] == 0.001
    s = machine.summarise_ns(list(range(1, 1001)))         # 10 beyond p99, 1 beyond p99.9
    assert s["p99_us"] == pytest.approx(0.991) and "p99.9_us" not in s


def test_steal_fraction_from_proc_stat_fields():
    before = {"cpu0": [100, 0, 50, 800, 0, 0, 0, 50, 0, 0]}
    after = {"cpu0": [150, 0, 100, 1600, 0, 0, 0, 150, 0, 0]}
    # elapsed 1000 jiffies, of which 100 steal
    assert machine.steal_fraction(before, after) == {"cpu0": pytest.approx(0.1)}


def test_characterise_reports_facts_measurements_and_what_cannot_be_known():
    r = machine.characterise(n=50, gap_us=20, timer_n=20, cost_plan=((100, 10), (1000, 5)))
    f = r["facts"]
    assert f["kernel"] == os.uname().release and f["allowed_cpus"] == CPUS
    assert isinstance(f["hypervisor_flag"], bool) and f["clocksource"]
    assert f"cpu{CPUS[0]}->cpu{CPUS[0]}" in r["wake_latency"]
    if len(CPUS) > 1:
        assert f"cpu{CPUS[0]}->cpu{CPUS[-1]}" in r["wake_latency"]
    assert all(s["n"] == 50 for s in r["wake_latency"].values())
    assert set(r["steal_during"]) >= {f"cpu{c}" for c in CPUS}
    assert r["unknowable"] and "pinned" in " ".join(r["unknowable"])
    text = machine.format_report(r)
    assert "wake-up latency" in text and "cannot be known from inside" in text
    assert set(r["wake_cpu_us"][f"cpu{CPUS[0]}"]) == {"100", "1000"}
    assert "CPU charged per sleep and wake-up" in text


def test_the_machine_experiment_runs_under_its_smoke_preset(tmp_path):
    """`parallelnet experiment machine`: a run like any other (provenance, records with the
    raw samples, summary tables, a figure), so a paper can pin it."""
    import json

    from test_experiments import smoke

    run_dir, recs = smoke("machine", tmp_path)
    assert len(recs) == 1 and recs[0]["facts"]["kernel"] == os.uname().release
    (d0,) = [d for d in recs[0]["wake_samples_ns"] if d == f"cpu{CPUS[0]}->cpu{CPUS[0]}"]
    assert len(recs[0]["wake_samples_ns"][d0]) == 100
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [t["key"] for t in summary["tables"]] == ["wake", "wake_cpu", "timer", "facts"]
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["figures"] == ["wakeup.png"] and (run_dir / "wakeup.png").stat().st_size > 0
