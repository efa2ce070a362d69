"""Experiments with records of their own (handoff, soak, validate_loadgen) under their smoke
presets, and the arithmetic of windows and machine noise."""

from __future__ import annotations

import json
import os

import pytest

from conftest import require_backend
from parallelnet.experiments.cli import run_one
from parallelnet.experiments.noise import NoiseProbe
from parallelnet.experiments.server import window


def smoke(name, tmp_path):
    """Run experiment NAME under its smoke preset through the entry point; (its results
    dir, its records), after the checks every run must pass."""
    from pathlib import Path

    from parallelnet.experiments import framework

    (run_dir,) = run_one(name, "smoke", str(tmp_path))
    meta = json.loads(open(os.path.join(run_dir, "meta.json")).read())
    assert meta["preset"] == "smoke" and meta["outcome"] == "ok" and len(meta["code"]["commit"]) == 40
    recs = framework.load_records(run_dir)
    assert len(recs) == meta["points"] == meta["planned"] and not [r for r in recs if "error" in r]
    summary = json.loads(open(os.path.join(run_dir, "summary.json")).read())
    assert summary["tables"] and all(t["rows"] for t in summary["tables"])
    return Path(run_dir), recs


def _stats_file(tmp_path, records):
    path = tmp_path / "stats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _worker(index, requests, cpu_ns, accepted=0, extra=None):
    return {"index": index, "cpu": index, "requests": requests, "accepted": accepted,
            "lost_races": 0, "wakeups": requests, "listen_wakeups": 0, "bytes_in": 0,
            "bytes_out": 0, "cpu_ns": cpu_ns, "user_s": 0.0, "sys_s": cpu_ns / 1e9,
            "extra": extra or {}}


def test_window_differences_the_bracketing_records(tmp_path):
    recs = [{"type": "interval", "t": t, "workers": [_worker(0, r, c, extra={"entries": e})]}
            for t, r, c, e in [(0.5, 100, 1_000_000, 10), (1.0, 1100, 6_000_000, 20),
                               (1.5, 2100, 11_000_000, 30), (2.0, 9999, 99_000_000, 99)]]
    win = window(_stats_file(tmp_path, recs), 0.6, 1.6)
    assert win["total"]["requests"] == 1000
    assert win["total"]["cpu_us_per_req"] == pytest.approx(5.0)
    assert win["total"]["seconds"] == pytest.approx(0.5)
    assert win["workers"][0]["extra"] == {"entries": 10}


def test_window_refuses_too_few_records(tmp_path):
    recs = [{"type": "interval", "t": 1.0, "workers": [_worker(0, 1, 1)]}]
    with pytest.raises(RuntimeError, match="fewer than two"):
        window(_stats_file(tmp_path, recs), 0.0, 2.0)


def test_noise_probe_reports_every_cpu():
    noise = NoiseProbe([os.getpid()]).start()
    sum(i * i for i in range(200_000))  # some CPU of our own, which is not "others"
    out = noise.stop()
    assert out["ncpu"] == len(out["per_cpu"]) >= 1
    for cpu in out["per_cpu"].values():
        assert 0.0 <= cpu["busy"] <= 1.0 and 0.0 <= cpu["steal"] <= 1.0
    assert isinstance(out["noisy"], bool)
    assert out["others_cpu"] >= 0 and out["kthreads_cpu"] >= 0


def test_noise_counts_our_descendants_as_ours():
    from parallelnet.core.procfs import TaskStat, descendants

    tree = {1: 0, 10: 1, 11: 10, 12: 11, 20: 1}   # pid -> ppid
    procs = {pid: TaskStat(pid, "x", "S", ppid, 0, 5, 0, 0) for pid, ppid in tree.items()}
    assert descendants([10], procs) == {10, 11, 12}


def test_summaries_prefer_quiet_runs_and_say_when_there_were_none():
    from parallelnet.experiments.analysis import prefer_quiet

    runs = [{"v": 1, "noisy": True}, {"v": 2, "noisy": False}, {"v": 3, "noisy": False}]
    assert prefer_quiet(runs, lambda r: r["noisy"]) == (runs[1:], 1, False)
    loud = [{"v": 1, "noisy": True}, {"v": 2, "noisy": True}]
    assert prefer_quiet(loud, lambda r: r["noisy"]) == (loud, 0, True)


def test_handoff_smoke(tmp_path):
    require_backend("uring")
    run_dir, recs = smoke("handoff", tmp_path)
    by_label = {r["label"]: r for r in recs}
    assert set(by_label) == {"scm", "msg-ring", "epoll-scm"}
    assert by_label["msg-ring"]["channel"] == "msg-ring" and by_label["scm"]["channel"] == "scm"
    # Every connection went through the channel under test, and nothing else woke a worker.
    assert by_label["msg-ring"]["msg_handoffs"] >= by_label["msg-ring"]["completed"] > 0
    assert by_label["msg-ring"]["handoff_wakeups"] == 0
    assert by_label["scm"]["msg_handoffs"] == 0 and by_label["scm"]["handoff_wakeups"] > 0
    for r in recs:
        assert r["client_errors"] == 0 and r["server_us_per_conn"] > 0 and not r["server_crashed"]
    summary = json.loads((run_dir / "summary.json").read_text())
    (table,) = [t for t in summary["tables"] if t["key"] == "all"]
    assert {row[0].removesuffix(" (noisy)") for row in table["rows"]} == set(by_label)
    assert summary["values"]["scm.vs_first"] == 1.0
    assert (run_dir / "pyperf.json").exists()


def test_handoff_config_syntax():
    from parallelnet.experiments.framework import parse_config
    from parallelnet.experiments.handoff import EXPERIMENT

    assert parse_config("m=uring:--uring-handoff msg-ring") == ("m", "uring", ["--uring-handoff", "msg-ring"])
    assert parse_config("e=epoll") == ("e", "epoll", [])
    assert parse_config("uring") == ("uring", "uring", [])
    for preset in EXPERIMENT.presets.values():
        assert [parse_config(c)[0] for c in preset["configs"]] == ["scm", "msg-ring", "epoll-scm"]


def test_handoff_summary_reads_the_old_scripts_runs():
    """The paper cites a run of the stand-alone script (handoff.json): the rows come from
    the same function as a framework run's."""
    from parallelnet.experiments.handoff import summary_rows

    runs = [{"label": lab, "backend": b, "server_us_per_conn": us, "conn_rate": rate, "p50_us": 50,
             "p99_us": 90, "noisy": noisy, "bound": "server"}
            for lab, b, us, rate, noisy in [("scm", "uring", 10.0, 1000.0, False),
                                            ("scm", "uring", 30.0, 900.0, True),
                                            ("mr", "uring", 8.0, 1100.0, False)]]
    rows = {r["label"]: r for r in summary_rows(runs, ["scm", "mr"])}
    assert rows["scm"]["n"] == 1 and rows["scm"]["noisy_dropped"] == 1   # the noisy run left out
    assert rows["mr"]["vs_first"] == pytest.approx(0.8) and rows["mr"]["rate_vs_first"] == pytest.approx(1.1)


def test_pyperf_driven_smoke(tmp_path):
    """pyperf's worker/calibration machinery around the server: one value per backend."""
    import subprocess
    import sys

    require_backend("uring")
    out = tmp_path / "cpu.json"
    proc = subprocess.run([sys.executable, "-m", "parallelnet.experiments.pyperf_cpu",
                           "--debug-single-value", "--quiet", "-o", str(out),
                           "--backends", "uring", "epoll", "--connections", "4"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import pyperf

    suite = pyperf.BenchmarkSuite.load(str(out))
    assert sorted(suite.get_benchmark_names()) == ["epoll-c4", "uring-c4"]
    for bench in suite.get_benchmarks():
        assert bench.get_unit() == "second" and 0 < bench.median() < 0.1
    assert "x epoll" in proc.stdout


def test_validate_loadgen_smoke(tmp_path):
    from parallelnet.experiments.validate_loadgen import EXPERIMENT

    if len(os.sched_getaffinity(0)) < 2:  # server and client need a CPU each: a clear refusal
        notes = EXPERIMENT.plan(dict(EXPERIMENT.presets["smoke"])).notes
        assert "needs two CPUs" in notes.skipped["validate_loadgen"]
        return
    run_dir, recs = smoke("validate_loadgen", tmp_path)
    sizes = [r for r in recs if r["params"]["step"] == "echo"]
    assert [r["size"] for r in sizes] == [1, 64, 65536, 4 << 20]
    assert all(r["byte_exact"] for r in sizes)
    (cap,) = [r for r in recs if r["params"]["step"] == "capacity"]
    assert cap["errors"] == 0 and cap["server_cpu_us_per_req"] > 0
    assert isinstance(cap["noisy"], bool)
    keys = {t["key"] for t in json.loads((run_dir / "summary.json").read_text())["tables"]}
    assert {"echo", "capacity"} <= keys


def test_soak_smoke(tmp_path):
    run_dir, (rec,) = smoke("soak", tmp_path)
    assert rec["passed"] and rec["responses_lost"] == 0 and rec["requests"] > 0
    assert all(rec["checks"].values())
    values = json.loads((run_dir / "summary.json").read_text())["values"]
    assert values["epoll.lost"] == "0"


def test_read_records_ignores_the_record_being_written(tmp_path):
    """A server writes its stats line while an experiment reads the file mid-run; a read can
    see part of the last line (it happened in a balance run: JSONDecodeError at column
    1624). Complete lines are returned, the torn tail is left for the next read."""
    from parallelnet.experiments.server import read_records

    path = tmp_path / "stats.jsonl"
    whole = json.dumps({"type": "interval", "t": 1.0, "workers": []})
    torn = json.dumps({"type": "interval", "t": 1.25, "workers": [{"pid": 7}]})[:20]
    path.write_text(whole + "\n" + torn)
    assert read_records(str(path)) == [{"type": "interval", "t": 1.0, "workers": []}]
    path.write_text(torn)
    assert read_records(str(path)) == []
    path.write_text(whole + "\n" + whole + "\n")
    assert len(read_records(str(path))) == 2
    assert read_records(str(tmp_path / "missing.jsonl")) == []


def test_a_window_reports_levels_as_they_were_and_counts_as_differences(tmp_path):
    """A measured window's worker extras are differences of the counters between its first
    and last stats record; some extras are levels (the io_uring window's budget, the
    ring's size, the measured rate) or running maxima (max_pending), and their difference
    meant nothing (a budget of 200 recorded as 0, a rate as -125).  Those come as the
    last record had them: the ones the record names in ``extra_levels`` (declared by the
    worker's backend), so the reader keeps no list of any backend's names."""
    from parallelnet.experiments.server import window

    def rec(t, cqes, budget, target, peak):
        w = {"requests": int(t * 100), "accepted": 0, "lost_races": None, "wakeups": 0,
             "listen_wakeups": 0, "bytes_in": 0, "bytes_out": 0, "cpu_ns": 0, "user_s": 0.0,
             "sys_s": 0.0, "index": 0, "cpu": 0,
             "extra": {"cqes": cqes, "window_us": budget, "ring_target": target,
                       "max_pending": peak, "setup_flags": "DEFER_TASKRUN"},
             "extra_levels": ["max_pending", "ring_target", "window_us"]}
        return json.dumps({"type": "interval", "t": t, "workers": [w]})

    path = tmp_path / "stats.jsonl"
    path.write_text(rec(1.0, 100, 200, 48, 4096) + "\n" + rec(2.0, 350, 200, 32, 8192) + "\n")
    extra = window(str(path), 0.5, 2.5)["workers"][0]["extra"]
    assert extra["cqes"] == 250                                   # a counter: the difference
    assert (extra["window_us"], extra["ring_target"], extra["max_pending"]) == (200, 32, 8192)


def test_backends_declare_their_levels_and_the_core_declares_its_own():
    """max_pending is a high-water mark on every backend; the epoll window's batch size is
    its own declaration, and a snapshot names them all."""
    from parallelnet.core.stats import WorkerStats

    st = WorkerStats(0, None, "epoll")
    assert st.snapshot()["extra_levels"] == ["max_pending"]
    st.declare_levels("window_nr")
    assert st.snapshot()["extra_levels"] == ["max_pending", "window_nr"]


def test_a_tail_with_fewer_than_ten_samples_beyond_it_is_not_printed():
    """load-curve's cost table: p99 of 5,000 requests (50 beyond) is printed with its count,
    p99.9 of them (4 beyond: the generator's rank of it is 4,996, float rounding included)
    and p99 of 500 (5 beyond) are not; the count is the thinnest repetition's."""
    from parallelnet.experiments import load_curve
    from parallelnet.experiments.framework import PlanNotes

    def rec(backend, rep, requests):
        return {"config": f"{backend}/rate=1000", "rep": rep, "bound": "offered", "rps": 1000.0,
                "requests": requests, "offered": 1000, "noise": {"noisy": False},
                "params": {"label": backend, "backend": backend, "kind": "rate", "value": 1000},
                "server": {"cpu_us_per_req": 10.0, "user_us_per_req": 4.0, "sys_us_per_req": 6.0,
                           "cpu_util": 0.01},
                "client": {"latency_us": {"p50": 100.0, "p99": 300.0, "p99.9": 900.0},
                           "cpu_util": 0.02, "rate_met": True, "mode": "open", "errors": 0}}

    records = [rec("epoll", 0, 5000), rec("epoll", 1, 6000), rec("native", 0, 500)]
    p = {"loads": [("rate", 1000)], "baselines": ["epoll"]}
    s = load_curve.summarize(records, p, PlanNotes(["epoll", "native"], {}))
    (cost,) = [t for t in s.tables if t.key == "cost"]
    col = {h: i for i, h in enumerate(cost.header)}
    rows = {r[col["backend"]]: r for r in cost.rows}
    assert rows["epoll"][col["p99 µs"]] == "300 (50 beyond)"
    assert rows["epoll"][col["p99.9 µs"]] == "– (4 beyond, <10)"
    assert rows["native"][col["p99 µs"]] == "– (5 beyond, <10)"
    assert "fewer than 10 beyond" in cost.note
    assert s.values["lat.epoll.rate=1000"]["samples"] == 5000


def test_the_step_figure_takes_every_repetition_aligned_on_the_step():
    """Each repetition's intervals end at its own server's ticks: they are binned by time
    since the step, and only the bins every repetition reaches are drawn."""
    from parallelnet.experiments.imbalance import interval_width, step_band

    def rep(offset, shares):   # intervals end 0.25 s apart, the hog starts at 1.1 s
        return {"step_at": 1.1, "series": [[round(0.25 * (i + 1) + offset, 3), sh, 100]
                                           for i, sh in enumerate(shares)]}

    rs = [rep(0.0, [0.5, 0.5, 0.5, 0.5, 0.2, 0.1]), rep(0.02, [0.4, 0.6, 0.5, 0.5, 0.3, 0.3]),
          rep(-0.02, [0.5, 0.5, 0.5, 0.5, 0.4])]   # the third stops an interval early
    width = interval_width(rs)
    assert width == 0.25
    band = step_band(rs, width)
    # Bin 0: the interval (1.0, 1.25] the hog switched on in; the last bin, which only
    # two repetitions reach, is left out.
    assert [x for x, *_ in band] == [-1.0, -0.75, -0.5, -0.25, 0.0]
    assert band[0] == (-1.0, 0.5, 0.4, 0.5)
    assert band[-1] == (0.0, 0.3, 0.2, 0.4)


def test_sizes_measures_enough_requests_at_a_low_rate():
    """At 250 req/s a 0.75 s window holds 187 requests: too few for a p99 (fewer than 10
    beyond it) and a noisy CPU per request.  A rate point lasts long enough for
    ``min_requests`` (2,000 in the standard preset: 8 s at 250/s), the fast ones keep
    their duration, and the plan's estimate follows."""
    from parallelnet.experiments import sizes

    p = {**sizes.EXPERIMENT.presets["standard"], "reps": 1, "aa": None}
    assert p["min_requests"] == 2000
    assert sizes.point_duration(p, 250, "rate") == 8.0
    assert sizes.point_duration(p, 20000, "rate") == p["duration"]
    assert sizes.point_duration(p, 250, "sat") == p["duration"]
    plan = sizes.plan(p)
    by_size = {pt.params["size"]: pt.est_s for pt in plan.points if pt.params["protocol"] == "http"}
    assert by_size[1048576] > by_size[65536] + 7


def test_the_sizes_ratio_figure_draws_exactly_what_the_table_ranks(tmp_path, monkeypatch):
    """A ratio whose baseline was both-bound in one repetition rests on fewer pairs: the
    table does not rank it, and the figure leaves it out (one predicate, sizes.ranked)."""
    pytest.importorskip("matplotlib")
    from parallelnet.experiments import plots, sizes
    from parallelnet.experiments.framework import Context, PlanNotes

    def rec(label, load, rep, cpu, bound="offered"):
        return {"config": f"{label}/echo-64/{load}", "rep": rep, "bound": bound, "rps": 1000.0,
                "requests": 5000, "noise": {"noisy": False},
                "params": {"label": label, "backend": label, "protocol": "echo", "size": 64,
                           "load": load, "rate": 1000},
                "server": {"cpu_us_per_req": cpu, "user_us_per_req": 1.0, "sys_us_per_req": 1.0,
                           "cpu_util": 0.1},
                "client": {"latency_us": {"p50": 100.0, "p99": 300.0, "p99.9": 900.0},
                           "cpu_util": 0.2, "rate_met": True, "mode": "open", "errors": 0}}

    records = [rec(label, load, rep, cpu) for rep in range(3) for load in ("rate", "sat")
               for label, cpu in (("epoll", 10.0), ("uring", 8.0))]
    records[2]["bound"] = "both"   # epoll/sat in repetition 0
    p = {"echo": [[64, 1000]], "http": [], "loads": ["rate", "sat"], "baseline": "epoll"}
    notes = PlanNotes(["epoll", "uring"], {})
    s = sizes.summarize(records, p, notes)
    assert s.values["uring/echo-64/sat"]["ratio"]["n"] == 2    # a ratio exists, from 2 pairs
    (table,) = [t for t in s.tables if t.key == "all"]
    cells = {(r[1], r[2]): r[9] for r in table.rows}
    assert cells[("sat", "uring")] == "not ranked (epoll both-bound)"
    assert cells[("rate 1000", "uring")].startswith("0.80×")
    drawn = {}

    def lines(series, path, *args, **kwargs):
        drawn[path] = series
        return path

    monkeypatch.setattr(plots, "lines", lines)
    sizes.figures(s, records, Context(str(tmp_path), p, notes))
    (ratios,) = [v for k, v in drawn.items() if k.endswith("sizes-ratio.png")]
    assert ratios == {"echo, fixed rate|uring": [(64, pytest.approx(0.8), pytest.approx(0.8),
                                                  pytest.approx(0.8))]}


def test_sizes_pairs_each_io_uring_backend_with_its_epoll_twin():
    """The 2x2's question, what the interface buys at equal protocol code, is read from
    uring / epoll and native-uring / native paired per repetition (not from their ratios
    to one baseline), in its own table and values."""
    from parallelnet.experiments import sizes
    from parallelnet.experiments.framework import PlanNotes

    def rec(label, rep, cpu, bound="offered"):
        return {"config": f"{label}/echo-65536/rate", "rep": rep, "bound": bound, "rps": 3000.0,
                "requests": 6000, "noise": {"noisy": False},
                "params": {"label": label, "backend": label, "protocol": "echo", "size": 65536,
                           "load": "rate", "rate": 3000},
                "server": {"cpu_us_per_req": cpu, "user_us_per_req": 1.0, "sys_us_per_req": 1.0,
                           "cpu_util": 0.1},
                "client": {"latency_us": {"p50": 100.0, "p99": 300.0, "p99.9": 900.0},
                           "cpu_util": 0.2, "rate_met": True, "mode": "open", "errors": 0}}

    cpu = {"epoll": [50.0, 40.0, 60.0], "uring": [55.0, 44.0, 66.0],
           "native": [40.0, 30.0, 50.0], "native-uring": [38.0, 28.5, 47.5]}
    records = [rec(label, rep, v[rep]) for rep in range(3) for label, v in cpu.items()]
    records[-1]["bound"] = "client"   # native-uring in repetition 2: that pair is not ranked
    p = {"echo": [[65536, 3000]], "http": [], "loads": ["rate"], "baseline": "epoll"}
    s = sizes.summarize(records, p, PlanNotes(list(cpu), {}))
    u = s.values["interface.uring/epoll/echo-65536/rate"]
    assert u["kind"] == "range" and u["n"] == 3 and u["estimate"] == pytest.approx(1.1)
    n = s.values["interface.native-uring/native/echo-65536/rate"]
    assert n is None    # a client-bound repetition: not ranked, as in the main table
    (table,) = [t for t in s.tables if t.key == "interface"]
    assert table.rows == [["echo 65536 B", "3000/s", "1.10× [range 1.10–1.10, n=3]",
                           "not ranked (native-uring client-bound)"]]
