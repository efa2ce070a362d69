"""The server under test: a ``parallelnet serve`` subprocess, and windows of its stats records."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass

from parallelnet.core.launch import spawn_server
from parallelnet.core.stats import add_observable, delta_observable


@dataclass
class ServerHandle:
    proc: subprocess.Popen
    host: str
    port: int
    stats_path: str
    t_listen: float  # monotonic time at which it printed "listening on"
    output: str = ""

    def worker_pids(self) -> list[int]:
        recs = read_records(self.stats_path)
        pids = {w["pid"] for r in recs for w in r["workers"] if w["pid"]}
        return sorted(pids | {self.proc.pid})

    def stop(self, timeout: float = 30.0) -> dict:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.output = out or ""
        finals = [r for r in read_records(self.stats_path) if r["type"] == "final"]
        return finals[-1] if finals else {}


def start_server(args: list[str], stats_path: str, cpus: set[int] | None = None,
                 interval: float = 0.25, timeout: float = 15.0) -> ServerHandle:
    """``parallelnet serve --port 0 --stats-json PATH --stats-interval S ARGS``."""
    allowed = cpus or set(range(os.cpu_count() or 1))
    proc, host, port = spawn_server(
        ["--stats-json", stats_path, "--stats-interval", str(interval), *args],
        merge_stderr=True, timeout=timeout, preexec_fn=lambda: os.sched_setaffinity(0, allowed))
    return ServerHandle(proc, host, port, stats_path, time.monotonic())


def read_records(stats_path: str) -> list[dict]:
    """The complete records of a server's ``--stats-json`` file, read while it may be
    writing: a write(2) to a regular file is not atomic against a concurrent read(2) (the
    reader can see the first pages of a record before the rest), so only lines that end
    in a newline count; the torn tail is the record in progress and is left for the next
    read."""
    try:
        with open(stats_path) as f:
            text = f.read()
    except FileNotFoundError:
        return []
    complete = text[:text.rfind("\n") + 1]
    return [json.loads(x) for x in complete.splitlines() if x.strip()]


def window(stats_path: str, t0: float, t1: float) -> dict:
    """Per-worker and total deltas between the first and last interval records in [t0, t1]
    (server clock: seconds since it started)."""
    recs = [r for r in read_records(stats_path) if r["type"] == "interval" and t0 <= r["t"] <= t1]
    if len(recs) < 2:
        raise RuntimeError(f"fewer than two stats records in the window [{t0:.2f}, {t1:.2f}] s")
    first, last = recs[0], recs[-1]
    keys = ("requests", "accepted", "lost_races", "wakeups", "listen_wakeups", "bytes_in",
            "bytes_out", "cpu_ns", "user_s", "sys_s")
    workers = []
    for a, b in zip(first["workers"], last["workers"]):
        d = {k: delta_observable(a[k], b[k]) for k in keys}   # lost_races may be n/a (None)
        d["index"], d["cpu"] = b["index"], b["cpu"]
        ea, eb = a.get("extra", {}), b.get("extra", {})
        levels = set(b.get("extra_levels", ()))   # declared by the worker's backend
        d["extra"] = {k: eb[k] if k in levels else eb[k] - ea[k] for k in eb
                      if isinstance(eb[k], (int, float)) and isinstance(ea.get(k), (int, float))}
        workers.append(d)
    total = {k: add_observable(w[k] for w in workers) for k in keys}
    req = max(total["requests"], 1)
    total.update(seconds=last["t"] - first["t"],
                 cpu_us_per_req=total["cpu_ns"] / 1e3 / req,
                 user_us_per_req=total["user_s"] * 1e6 / req,
                 sys_us_per_req=total["sys_s"] * 1e6 / req)
    return {"workers": workers, "total": total}
