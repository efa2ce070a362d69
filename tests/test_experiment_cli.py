"""``parallelnet experiment``: every user error is one line, every run ends in a recorded outcome.

Bad input ends in one line on stderr, a non-zero exit, no traceback and no results
directory; a run stopped by a signal is recorded as ``interrupted`` (never current, never
upgraded by ``rebuild``), its server reaped; ``experiment diff`` pairs equal configurations.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from parallelnet.experiments import framework
from parallelnet.experiments.index import render

CLI = [sys.executable, "-m", "parallelnet.core.cli", "experiment"]


def run_cli(*args, timeout=60):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, status", [
    (["herd", "--set", "nonsense=1"], 2),
    (["herd", "--set", "reps=0"], 2),
    (["herd", "--set", "reps=-1"], 2),
    (["herd", "--set", "reps=abc"], 2),
    (["herd", "--set", "workers=[]"], 2),
    (["herd", "--set", "duration=\"long\""], 2),
    (["herd", "--set", 'backends=["nope"]'], 1),
    (["rebuild", "/nonexistent/run"], 2),
    (["index", "--results", "/nonexistent/results"], 2),
])
def test_bad_input_is_one_line(tmp_path, args, status):
    out = tmp_path / "out"
    if args[0] == "herd":
        args = [*args, "--out", str(out)]
    res = run_cli(*args)
    assert res.returncode == status, res
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert not out.exists() or not list(out.iterdir()), "a run directory was written"


def test_out_that_is_a_file_is_one_line(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    res = run_cli("herd", "--out", str(f))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "is not a directory" in res.stderr


def test_help_lists_the_set_keys():
    res = run_cli("balance", "--help")
    assert res.returncode == 0
    assert "--set keys" in res.stdout and "loads" in res.stdout and "p99_target_ms" in res.stdout


def _servers_of(pid: int) -> list[int]:
    """PIDs of parallelnet servers whose parent is ``pid``."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if ppid == pid and b"serve" in cmd:
            out.append(int(d))
    return out


def test_an_interrupted_run_is_recorded_never_current_and_never_upgraded(tmp_path):
    proc = subprocess.Popen([*CLI, "herd", "--out", str(tmp_path), "--set", "reps=3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        line = ""
        while "[2/" not in line and time.monotonic() < deadline:   # into the second point
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err)
    assert "Traceback" not in err and "interrupted" in (out + err)
    time.sleep(0.2)
    assert not _servers_of(proc.pid)
    (run,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    meta = json.loads((run / "meta.json").read_text())
    assert meta["outcome"] == "interrupted" and meta["points"] < meta["planned"]
    assert "| incomplete |" in render(str(tmp_path))
    assert run_cli("rebuild", str(run)).returncode == 0
    assert json.loads((run / "meta.json").read_text())["outcome"] == "interrupted"


def test_a_complete_run_has_its_header_csv_and_diff(tmp_path):
    a = framework.run(framework.get("herd"), "smoke", str(tmp_path / "a"), stream=sys.stderr)
    b = framework.run(framework.get("herd"), "smoke", str(tmp_path / "b"), stream=sys.stderr)
    meta = json.loads(open(os.path.join(a, "meta.json")).read())
    assert meta["outcome"] == "ok" and meta["points"] == meta["planned"]
    md = open(os.path.join(a, "summary.md")).read()
    assert "- commit `" in md and "outcome **ok**" in md and "![herd-cpu.png](herd-cpu.png)" in md
    assert os.path.exists(os.path.join(a, "records.csv"))
    assert any(f.startswith("table-") and f.endswith(".csv") for f in os.listdir(a))
    res = run_cli("diff", a, b)
    assert res.returncode == 0 and "B / A" in res.stdout
    assert "epoll/process/shared/packed/rate=500/n=4" in res.stdout
    for differ in ("presets differ", "commits differ", "machines differ", "did not end ok"):
        assert differ not in res.stdout   # same commit, preset and machine, both ok


def test_load_fractions_are_named_by_their_absolute_rate_in_pyperf():
    from parallelnet.experiments.load_curve import pyperf_name

    rec = {"config": "epoll/load=0.20", "client": {"rate": 12675.4}}
    assert pyperf_name(rec) == "epoll/rate=12675"
    assert pyperf_name({"config": "epoll/sat", "client": {"rate": 0}}) == "epoll/sat"


#: A one-configuration experiment that sends itself SIGTERM at a chosen place (argv[2]):
#: inside a point, behind an ``except Exception`` that turns any failure into a point error
#: (as a server start does), or while the run writes its summary after the last point.
_SELF_TERM = r'''
import os, signal, sys, time
from parallelnet.experiments import framework
from parallelnet.experiments.framework import Experiment, Plan, PlanNotes, Point, Summary
where = sys.argv[2]

def plan(p):
    return Plan([Point("a", rep, {}, est_s=0.1) for rep in range(3)], PlanNotes(["a"], []))

def run_point(point, ctx):
    if where == "point":
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except Exception as exc:
            raise RuntimeError("the server exited") from exc
    if where == "cleanup":   # a finally whose cleanup fails because the signal reached it too
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            raise RuntimeError("server exited with 130")
    return {"v": 1.0}

def summarize(records, params, notes):
    if where == "summary":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    return Summary()

exp = Experiment(name="t", title="t", presets={"smoke": {}}, plan=plan, run_point=run_point,
                 summarize=summarize)
try:
    framework.run(exp, "smoke", sys.argv[1], stream=sys.stderr)
except framework.Interrupted as exc:
    sys.exit(128 + exc.signum)
'''


@pytest.mark.parametrize("where,measured", [("point", 0), ("cleanup", 0), ("summary", 3)])
def test_a_signal_ends_the_run_as_interrupted_wherever_it_lands(tmp_path, where, measured):
    """A SIGTERM is never taken for a point's failure (an ``except Exception`` in a point's
    code must not swallow it, nor a cleanup that fails while it propagates - a server the
    signal reached too exits 130 and stopping it raises: the run went on until SIGKILL),
    and one that lands after the last point, while the summary is written, still records
    how the run ended."""
    res = subprocess.run([sys.executable, "-c", _SELF_TERM, str(tmp_path), where],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 128 + signal.SIGTERM, (res.returncode, res.stderr[-2000:])
    (run,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    meta = json.loads((run / "meta.json").read_text())
    assert meta["outcome"] == "interrupted", meta
    assert meta["points"] == measured and meta["planned"] == 3
    assert "SIGTERM" in meta["reason"]
    if where == "summary":
        assert "summary" in meta["reason"]
