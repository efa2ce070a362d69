"""The experiment framework: every experiment under its smoke preset, checked for structure
and consistency (never for speed), plus the arithmetic and the bookkeeping it relies on."""

from __future__ import annotations

import json
import time
import os
import subprocess
import sys

import pytest

from parallelnet.experiments import analysis, framework, provenance
from parallelnet.experiments.measure import Layout, bottleneck

#: Experiments whose records are load points of experiments.measure (the others -
#: handoff, soak, validate_loadgen - have records of their own, checked in test_experiments.py).
OWN_RECORDS = ("handoff", "soak", "validate_loadgen", "machine")
FRAMEWORK = [n for n in framework.names() if n not in OWN_RECORDS]


def _run_smoke(name, out, **overrides):
    exp = framework.get(name)
    return framework.run(exp, "smoke", str(out), overrides or None, stream=sys.stderr)


def _records(d):
    return framework.load_records(d)


@pytest.mark.parametrize("name", FRAMEWORK)
def test_smoke_preset_runs_and_its_output_is_consistent(name, tmp_path):
    if name in ("imbalance", "balance") and len(os.sched_getaffinity(0)) < 2:
        pytest.skip(f"{name} needs two CPUs (two workers to compare)")
    outdir = _run_smoke(name, tmp_path)
    exp = framework.get(name)
    meta = json.loads(open(os.path.join(outdir, "meta.json")).read())
    params = meta["params"]
    # Provenance: a full commit, the dirty flag, versions, the preset, an end.
    assert len(meta["code"]["commit"]) == 40 and isinstance(meta["code"]["dirty"], bool)
    assert meta["preset"] == "smoke" and meta["ended"] and meta["outcome"] == "ok"
    assert meta["versions"]["python"] and "liburing" in meta["versions"]
    assert not any(a.startswith(provenance.REPO) for a in meta["argv"])
    # One record per planned point, none failed, every wanted backend ran or has a reason.
    recs = _records(outdir)
    assert len(recs) == meta["points"] == len(exp.plan(dict(exp.presets["smoke"])).points)
    assert not [r for r in recs if "error" in r]
    # What the plan decided is in its notes, not among the parameters.
    assert params == json.loads(json.dumps(exp.presets["smoke"]))
    assert framework.PlanNotes.from_meta(meta) == framework.PlanNotes(**meta["plan"])
    ran = set(meta["plan"]["ran"])
    assert ran, "nothing ran"
    for rec in recs:
        assert rec["requests"] > 0 and rec["client"]["errors"] == 0
        assert rec["server"]["cpu_us_per_req"] > 0
        assert rec["bound"] in analysis.BOUND_ORDER
        if rec["client"]["mode"] == "open":
            assert rec["client"]["achieved"] > 0
        ws = rec.get("workers")
        if ws:
            # Counts add up: the workers' accepts are the server's, shares sum to one.
            if "accept_share" in rec and sum(rec["accepted"]):
                assert sum(rec["accept_share"]) == pytest.approx(1.0)
    summary = json.loads(open(os.path.join(outdir, "summary.json")).read())
    assert summary["tables"] and all(t["rows"] for t in summary["tables"][:1])
    assert open(os.path.join(outdir, "summary.md")).read().startswith("# ")
    # pyperf: one benchmark per configuration, one run per repetition, seconds per request.
    import pyperf

    suite = pyperf.BenchmarkSuite.load(os.path.join(outdir, "pyperf.json"))
    for bench in suite.get_benchmarks():
        assert bench.get_unit() == "second"
        assert bench.get_nrun() == params["reps"]
        assert all(0 < v < 0.1 for v in bench.get_values())
    # Figures, where matplotlib is installed (it is, in CI: the plot extra).
    figs = meta["figures"]
    assert figs, "no figure written"
    for f in figs:
        assert open(os.path.join(outdir, f), "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_two_runs_of_one_experiment_compare_with_pyperf(tmp_path):
    a = _run_smoke("compare", tmp_path / "a")
    b = _run_smoke("compare", tmp_path / "b")
    res = subprocess.run([sys.executable, "-m", "pyperf", "compare_to", "--table",
                          os.path.join(a, "pyperf.json"), os.path.join(b, "pyperf.json")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "compare/native/rate=10000" in res.stdout and "compare/epoll/sat" in res.stdout


def test_rebuild_gives_the_same_summary(tmp_path):
    outdir = _run_smoke("compare", tmp_path)
    before = open(os.path.join(outdir, "summary.json")).read()
    from parallelnet.experiments.cli import main

    assert main(["rebuild", outdir]) == 0
    assert open(os.path.join(outdir, "summary.json")).read() == before


def test_pyperf_json_is_the_same_whenever_it_is_written(tmp_path):
    """pyperf.json is a function of the records: a rebuild days later writes the same bytes.
    pyperf collects, when the file is written, facts of the writing process (uptime, load
    average, its own max RSS, runnable threads): they described the rebuild, not the
    measurement, and made every rebuild differ."""
    exp = framework.get("compare")
    rec = {"config": "epoll/rate=1000", "rep": 0, "requests": 1000, "bound": "offered",
           "measured_at": "2026-12-05T17:17:00Z", "params": {"label": "epoll", "value": 1000},
           "server": {"cpu_us_per_req": 10.0}, "noise": {"noisy": False}}
    framework.write_pyperf(str(tmp_path / "a.json"), exp, [rec], {"preset": "smoke", "code": {"commit": "a" * 40}})
    time.sleep(0.05)
    bytearray(8 << 20)                   # the writer's own max RSS moves
    framework.write_pyperf(str(tmp_path / "b.json"), exp, [rec], {"preset": "smoke", "code": {"commit": "a" * 40}})
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert a == b
    assert "uptime" not in json.dumps(a) and "mem_max_rss" not in json.dumps(a)


def test_a_failed_point_is_recorded_and_the_run_fails(tmp_path):
    with pytest.raises(RuntimeError, match="1 of 1 points"):
        _run_smoke("compare", tmp_path, backends=["epoll"], loads=[["rate", 1000]],
                   server_args=["--no-such-flag"])
    (run_dir,) = tmp_path.iterdir()
    (rec,) = _records(str(run_dir))
    assert "error" in rec and "did not start" in rec["error"]
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["outcome"] == "empty" and meta["reason"] == "1 of 1 points failed"


def test_standard_refuses_a_dirty_tree(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "code_state",
                        lambda: {"commit": "0" * 40, "dirty": True, "changed": ["core/x.py"]})
    with pytest.raises(SystemExit, match="dirty tree"):
        framework.run(framework.get("compare"), "standard", str(tmp_path))
    assert not list(tmp_path.iterdir())


def test_unavailable_backends_are_listed_with_the_reason():
    ok, skipped = framework.available_backends(["epoll", "no-such-backend"])
    assert ok == ["epoll"] and skipped == {"no-such-backend": "not registered"}


# -- the statistics -------------------------------------------------------------------------

def test_paired_ratios_use_common_repetitions_only():
    assert analysis.paired({0: 2.0, 1: 3.0, 2: 4.0}, {0: 1.0, 2: 2.0, 3: 9.0}) == [2.0, 2.0]


# -- bottleneck attribution --------------------------------------------------------------------

@pytest.mark.parametrize("srv,cli,open_loop,met,want", [
    (0.30, 0.20, True, True, "offered"),
    (0.99, 0.20, True, False, "server"),
    (0.40, 0.97, False, True, "client"),
    (0.95, 0.96, False, True, "both"),
    (0.30, 0.30, True, False, "neither"),
    (0.97, 0.20, False, True, "server"),
])
def test_bottleneck_attribution(srv, cli, open_loop, met, want):
    per_cpu = {"cpu0": {"busy": srv}, "cpu1": {"busy": cli}}
    assert bottleneck(per_cpu, Layout([0], [1]), open_loop, met) == want


def test_default_layout_keeps_server_and_client_apart_when_it_can():
    lay = Layout.default(1)
    if len(os.sched_getaffinity(0)) > 1:
        assert not lay.shared
    else:
        assert lay.shared


# -- provenance, index, pins ---------------------------------------------------------------------

def test_relative_argv_hides_host_paths():
    repo = provenance.REPO
    argv = [os.path.join(repo, ".venv", "bin", "python"), "-m", "x", "--out",
            os.path.join(repo, "results")]
    assert provenance.relative_argv(argv) == [os.path.join(".venv", "bin", "python"), "-m", "x",
                                              "--out", "results"]
    assert provenance.relative_argv(["/usr/bin/python3"]) == ["python3"]


def test_index_marks_cited_current_superseded_and_legacy(tmp_path, monkeypatch):
    from parallelnet.experiments import index

    def mk(name, meta):
        d = tmp_path / name
        d.mkdir()
        (d / "meta.json").write_text(json.dumps(meta))

    full = {"code": {"commit": "a" * 40, "dirty": False}, "preset": "standard", "outcome": "ok"}
    mk("20260101T000000-herd-standard", {**full, "experiment": "herd"})
    mk("20260102T000000-herd-standard", {**full, "experiment": "herd"})
    mk("20260103T000000-herd-standard", {**full, "experiment": "herd"})
    mk("20250101T000000-accept", {"commit": "abc1234"})
    monkeypatch.setattr(index, "read_pins", lambda: {"herd": ["results/20260102T000000-herd-standard"]})
    rows = {r["dir"]: r for r in index.runs(str(tmp_path))}
    index.statuses(list(rows.values()), {"20260102T000000-herd-standard"})
    assert rows["20260101T000000-herd-standard"]["status"] == "superseded"
    assert rows["20260102T000000-herd-standard"]["status"] == "cited"
    assert rows["20260103T000000-herd-standard"]["status"] == "current"
    assert rows["20250101T000000-accept"]["status"] == "legacy"
    assert "| `20260102T000000-herd-standard` | herd | standard |" in index.render(str(tmp_path))


def test_index_keeps_a_run_with_set_overrides_apart(tmp_path, monkeypatch):
    """A run of a preset with ``--set`` overrides (another grid, other configurations) is
    not that preset's run: marked ``custom`` and shown as ``standard+set``, it is never
    the preset's current run and supersedes none."""
    from parallelnet.experiments import index

    def mk(name, meta):
        d = tmp_path / name
        d.mkdir()
        (d / "meta.json").write_text(json.dumps(meta))

    full = {"code": {"commit": "a" * 40, "dirty": False}, "preset": "standard", "outcome": "ok",
            "experiment": "sizes", "argv": ["parallelnet", "experiment", "sizes"]}
    mk("20260101T000000-sizes-standard", full)
    mk("20260102T000000-sizes-standard", {**full, "argv": full["argv"] + ["--set", "reps=2"]})
    monkeypatch.setattr(index, "read_pins", lambda: {})
    rows = {r["dir"]: r for r in index.runs(str(tmp_path))}
    index.statuses(list(rows.values()), set())
    assert rows["20260101T000000-sizes-standard"]["status"] == "current"
    assert rows["20260102T000000-sizes-standard"]["status"] == "custom"
    assert "| `20260102T000000-sizes-standard` | sizes | standard+set |" in index.render(str(tmp_path))


def test_index_keeps_runs_on_machines_of_another_size_apart(tmp_path, monkeypatch):
    """A run on a lent 16-core machine does not supersede the 2-CPU run of the same
    experiment and preset (nor the reverse): each size has its own current run, and the
    index shows the CPUs."""
    from parallelnet.experiments import index

    def mk(name, cpus):
        d = tmp_path / name
        d.mkdir()
        (d / "meta.json").write_text(json.dumps(
            {"code": {"commit": "a" * 40, "dirty": False}, "preset": "standard", "outcome": "ok",
             "experiment": "scaling", "machine": {"cpus": cpus}}))

    mk("20260101T000000-scaling-standard", 2)
    mk("20260102T000000-scaling-standard", 16)
    mk("20260103T000000-scaling-standard", 2)
    monkeypatch.setattr(index, "read_pins", lambda: {})
    rows = {r["dir"]: r for r in index.runs(str(tmp_path))}
    index.statuses(list(rows.values()), set())
    assert [rows[f"2026010{k}T000000-scaling-standard"]["status"] for k in (1, 2, 3)] == [
        "superseded", "current", "current"]
    assert "| `20260102T000000-scaling-standard` | scaling | standard | aaaaaaaaaaaa | 16 |" \
        in index.render(str(tmp_path))


def test_pins_are_read_and_rewritten(tmp_path):
    from parallelnet.experiments import paper_pins

    tpl = tmp_path / "paper.in.md"
    tpl.write_text("# x\n<!-- pin herd: results/A -->\ntext\n")
    assert paper_pins.read_pins(str(tpl)) == {"herd": ["results/A"]}
    paper_pins.repin({"herd": [os.path.join(provenance.REPO, "results", "B")],
                      "sizes": [os.path.join(provenance.REPO, "results", "C")]}, str(tpl))
    assert paper_pins.read_pins(str(tpl)) == {"sizes": ["results/C"], "herd": ["results/B"]}
    assert paper_pins.cited_experiments(str(tpl)) == ["sizes", "herd"]


def test_cli_lists_every_experiment():
    res = subprocess.run([sys.executable, "-m", "parallelnet.core.cli", "experiment", "list"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    for name in framework.names():
        assert name in res.stdout
    for name in ("load-curve", "imbalance", "herd", "scaling", "sizes", "handoff", "soak",
                 "validate_loadgen"):
        assert name in framework.names()


def test_every_preset_is_declared_for_every_experiment():
    for name in framework.names():
        exp = framework.get(name)
        assert set(exp.presets) == set(framework.PRESETS), name


def test_hog_is_bounded_and_duty_zero_starts_nothing():
    from parallelnet.experiments.hog import Hog, spin

    with Hog(cpu=sorted(os.sched_getaffinity(0))[0], duty=0.0, seconds=5) as idle:
        assert idle.pid is None
    with Hog(cpu=sorted(os.sched_getaffinity(0))[0], duty=0.5, seconds=0.3) as hog:
        assert hog.proc.wait(timeout=20) == 0          # it stopped by itself
    assert 5 <= spin(0.5, 0.2) <= 21                    # 10 ms periods, fewer if preempted
    with pytest.raises(ValueError):
        Hog(cpu=0, duty=1.5, seconds=1)


def test_experiments_are_registered_by_entry_point():
    from importlib.metadata import entry_points

    eps = {ep.name for ep in entry_points(group=framework.ENTRY_POINTS)}
    assert set(framework.names()) == eps and "load-curve" in eps
    for name in framework.names():
        assert framework.get(name).name == name


def test_an_unknown_experiment_is_one_line():
    with pytest.raises(SystemExit, match=r"^unknown experiment 'nosuch'; known: .*load-curve"):
        framework.get("nosuch")
    res = subprocess.run([sys.executable, "-m", "parallelnet.core.cli", "experiment", "nosuch"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "unknown experiment 'nosuch'" in res.stderr


def test_summarize_run_adds_the_tail_a_a_where_the_records_have_latencies():
    """Where the A/A twin's records carry the client's latencies and the A/A figure is not
    already the p99, the run also states the tail's noise floor: the twin's p99 over the
    original's, per repetition (a p99 difference smaller than that is not read)."""
    exp = framework.Experiment(name="t", title="t", presets={"smoke": {}}, plan=lambda p: [],
                               run_point=None, summarize=lambda r, p, n: framework.Summary(),
                               aa_metric=lambda r: r["v"])
    recs = [{"config": c, "rep": k, "v": 10.0, "client": {"latency_us": {"p99": p99}}}
            for k in range(8)
            for c, p99 in (("a", 400.0), ("a" + framework.AA_SUFFIX, 400.0 * (1.5 if k % 2 else 0.7)))]
    s = framework.summarize_run(exp, recs, {}, None)
    tail = s.values["aa_p99"]
    assert tail["n"] == 8 and tail["kind"] == "ci95" and tail["flag"] is True
    assert any(f.startswith("A/A on p99 (a twice in every repetition)") for f in s.findings)
    # No latencies (or an A/A already on p99): no second line.
    plain = [{k: v for k, v in r.items() if k != "client"} for r in recs]
    assert "aa_p99" not in framework.summarize_run(exp, plain, {}, None).values


def test_summarize_run_leaves_the_aa_twin_out_of_the_configurations_and_adds_its_ratio():
    """The paper rebuilds every pinned run's summary with summarize_run, as the run did: the
    twin (config + AA_SUFFIX) is the A/A control's, never a configuration of the summary."""
    seen = []

    def summarize(records, params, notes):
        seen.extend(r["config"] for r in records)
        return framework.Summary()

    exp = framework.Experiment(name="t", title="t", presets={"smoke": {}}, plan=lambda p: [],
                               run_point=None, summarize=summarize,
                               aa_metric=lambda r: r["v"])
    recs = [{"config": c, "rep": k, "v": v}
            for k in range(3)
            for c, v in (("a", 10.0), ("b", 20.0), ("a" + framework.AA_SUFFIX, 10.0 + k))]
    s = framework.summarize_run(exp, recs, {}, None)
    assert sorted(set(seen)) == ["a", "b"]
    aa = s.values["aa"]
    assert aa["config"] == "a" and aa["n"] == 3 and aa["kind"] == "range"
    assert aa["interval"] == [1.0, 1.2] and aa["flag"] is True
    assert s.findings[0].startswith("A/A control (a measured twice in every repetition)")


def _scaling_record(cfg: str, n: int, rep: int, rps: float) -> dict:
    b, m, st = cfg.split("/")
    return {"config": f"{cfg}/w={n}", "rep": rep, "rps": rps,
            "params": {"backend": b, "mode": m, "strategy": st, "workers": n},
            "noise": {"noisy": False}, "server": {"cpu_us_per_req": 12.0},
            "client": {"cpu_util": 0.5}, "ceiling_cpus": n, "request_share_max": 1 / n,
            "bound": "server", "layout": {"server": list(range(n)), "client": [8]}}


@pytest.mark.parametrize("service_us,expected", [(200, "GET /work/200, server-bound"),
                                                  (0, "GET /work/0,"), (None, "64-byte echo")])
def test_scaling_names_its_workload_also_without_a_service_time(service_us, expected):
    """GET /work/0 is a request with no service time, not the 64-byte echo of runs from
    before the service-time workload (which have no service_us at all)."""
    from parallelnet.experiments import scaling
    from parallelnet.experiments.framework import PlanNotes

    p = {"strategies": ["shared"], "modes": ["process"]}
    if service_us is not None:
        p["service_us"] = service_us
    records = [_scaling_record("epoll/process/shared", n, rep, 1000.0 * n)
               for rep in range(2) for n in (1, 2)]
    s = scaling.summarize(records, p, PlanNotes(["epoll/process/shared"], []))
    assert expected in s.tables[0].title
    assert s.values["epoll/process/shared.w=2"]["speedup"]["estimate"] == pytest.approx(2.0)


def test_scaling_takes_a_backend_with_options_under_its_own_label():
    """``LABEL=BACKEND:ARGS`` among the backends: its own rows, the server started with
    ARGS (a side-by-side of one backend's two settings in thread mode)."""
    from parallelnet.experiments import scaling

    p = dict(scaling.EXPERIMENT.presets["smoke"], reps=1, workers=[1, 2], modes=["thread"],
             backends=["epoll", "uring-direct=uring:--uring-calls direct"], aa=None)
    plan = scaling.plan(p)
    by = {pt.config: pt.params for pt in plan.points}
    assert plan.notes.ran == ["epoll/thread/shared", "uring-direct/thread/shared"]
    q = by["uring-direct/thread/shared/w=2"]
    assert q["backend"] == "uring" and q["args"] == ["--uring-calls", "direct"]
    assert "args" not in by["epoll/thread/shared/w=1"]


@pytest.mark.parametrize("bound,workers,cpu,server,want", [
    ("neither", [(7, 1), (7, 2), (7, 3)], 1.05, [0, 1, 2], "gil"),     # 3 threads, one CPU's worth
    ("neither", [(7, 1), (8, 2)], 1.05, [0, 1], "neither"),              # processes: no shared lock
    ("neither", [(7, 1)], 0.9, [0], "neither"),                          # one worker: nothing to serialise
    ("neither", [(7, 1), (7, 2)], 1.9, [0, 1], "neither"),               # threads using both CPUs
    ("server", [(7, 1), (7, 2)], 1.0, [0, 1], "server"),                 # a saturated CPU says more
    ("offered", [(7, 1), (7, 2)], 1.0, [0, 1], "offered"),               # the rate was met
])
def test_threads_that_together_use_one_cpu_are_labelled_gil_bound(bound, workers, cpu, server, want):
    """Eight Python worker threads used 1.05 CPUs of eight and nothing was saturated: the
    label said ``neither`` (latency-bound), when a lock - the GIL - was the limit."""
    from parallelnet.experiments.measure import gil_bound

    assert gil_bound(bound, workers, cpu, Layout(server, [9])) == want
