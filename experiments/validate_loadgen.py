"""Validate the load generator (issue 4): byte-exact echo, wrk cross-check, capacity,
pipelining, open-loop pacing.  Reproduces the numbers in docs/loadgen.md.

    flock /tmp/bench.lock .venv/bin/python -m parallelnet.experiments.validate_loadgen

Server: ``parallelnet serve --cpus 0 --workers 1`` (one pinned worker on CPU 0); client:
the C load generator's threads pinned to CPU 1 (``LoadSpec.cpus``), or ``wrk`` under
``taskset -c 1``.  Every run's raw figures go to results/<UTC>-validate_loadgen/
(one JSON per step plus metadata.json), with /proc/stat deltas (steal, softirq, and CPU
used by neither the server nor the client) so a noisy run can be recognised.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from parallelnet.experiments.loadgen import LoadSpec, run

SERVER_CPU, CLIENT_CPU = 0, 1
_TCK = os.sysconf("SC_CLK_TCK")


# ---- machine state ---------------------------------------------------------------------

def proc_stat() -> dict:
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    return {n: int(v) / _TCK for n, v in zip(names, fields)}


def proc_cpu(pid: int) -> float:
    """utime + stime (s) of every thread of ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        raw = f.read()
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TCK


def metadata(argv: list[str]) -> dict:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    return {
        "command": [sys.executable, "-m", "parallelnet.experiments.validate_loadgen", *argv],
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "kernel": platform.release(), "uname": " ".join(platform.uname()),
        "cpu_model": model, "ncpus": os.cpu_count(), "python": sys.version,
        "git_commit": commit, "wrk": shutil.which("wrk"),
        "server_cpu": SERVER_CPU, "client_cpu": CLIENT_CPU,
    }


# ---- server ----------------------------------------------------------------------------

class Server:
    """``parallelnet serve`` as a child process (ours; stopped by its PID)."""

    def __init__(self, backend: str, protocol: str, extra=()):
        self.cmd = [sys.executable, "-m", "parallelnet.core.cli", "serve", "--backend", backend,
                    "--protocol", protocol, "--workers", "1", "--cpus", str(SERVER_CPU),
                    "--port", "0", *extra]
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line}{self.proc.stderr.read()}")
        self.port = int(line.rsplit(":", 1)[1])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def measured(srv: Server, fn):
    """Run ``fn()``; return (its result, server CPU s, /proc/stat deltas)."""
    s0, c0 = proc_stat(), proc_cpu(srv.proc.pid)
    t0 = time.monotonic()
    out = fn()
    wall = time.monotonic() - t0
    s1, c1 = proc_stat(), proc_cpu(srv.proc.pid)
    delta = {k: round(s1[k] - s0[k], 3) for k in s0}
    busy = sum(v for k, v in delta.items() if k not in ("idle", "iowait"))
    return out, c1 - c0, dict(delta, wall_s=round(wall, 3), busy_s=round(busy, 3))


def lg(port: int, **kw):
    spec = LoadSpec(port=port, cpus=[CLIENT_CPU], threads=1, **kw)
    return run(spec)


def summary(r, server_cpu: float | None = None, noise: dict | None = None) -> dict:
    d = {
        "requests": r.requests, "rps": round(r.rps, 1), "errors": r.errors_total,
        "error_kinds": {k: v for k, v in r.errors.items() if v},
        "non2xx": r.non2xx, "ok": r.ok, "rate_met": r.rate_met,
        "target_rate": r.target_rate, "achieved_rate": round(r.achieved_rate, 1),
        "p50_us": r.latency.get("p50"), "p99_us": r.latency.get("p99"),
        "p999_us": r.latency.get("p99.9"), "max_us": r.latency_max_us,
        "client_cpu_us_per_req": r.client_cpu_us_per_req,
        "bytes_sent": r.bytes_sent, "bytes_received": r.bytes_received,
        "spec": r.spec, "latency": r.latency,
    }
    if server_cpu is not None and r.requests:
        # Server process CPU over the whole call (warm-up included) / requests of the
        # measured window scaled to the same span: use rps * wall for the denominator.
        d["server_cpu_s"] = round(server_cpu, 3)
    if noise is not None:
        d["proc_stat"] = noise
        wall = noise["wall_s"]
        if r.requests and wall:
            total_req = r.rps * wall  # requests served over the whole call, approximately
            d["server_cpu_us_per_req"] = round(server_cpu * 1e6 / total_req, 2) if server_cpu else None
        # CPU used by neither server nor client (client ≈ its own threads' CPU).
        client = r.client_cpu_user_s + r.client_cpu_sys_s
        d["other_cpu_s"] = round(noise["busy_s"] - (server_cpu or 0) - client, 3)
        d["noisy"] = noise["steal"] > 0.05 * wall
    return d


# ---- steps -----------------------------------------------------------------------------

def step_echo_sizes(a) -> list[dict]:
    out = []
    with Server("native", "echo") as srv:
        for size in (1, 64, 65536, 4 << 20):
            conns = 4 if size >= 65536 else 16
            r = lg(srv.port, size=size, connections=conns, duration=a.short, warmup=0.5)
            d = summary(r)
            # Every response byte is compared with what was sent (loadgen.c); a mismatch
            # aborts the run.  bytes_sent/received count different windows, so they differ.
            d.update(size=size, byte_exact=r.ok and r.errors.get("echo_mismatch", 0) == 0
                     and r.requests > 0)
            print(f"echo {size:>8} B x{conns}: {r.requests} req, {r.rps:.0f} req/s, "
                  f"sent {r.bytes_sent} recv {r.bytes_received}, errors {r.errors_total}",
                  flush=True)
            out.append(d)
    return out


def wrk(port: int, conns: int, duration: float) -> dict:
    cmd = ["taskset", "-c", str(CLIENT_CPU), "wrk", "-t1", f"-c{conns}", f"-d{int(duration)}s",
           "--latency", f"http://127.0.0.1:{port}/"]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    total = re.search(r"(\d+) requests in", p.stdout)
    m = re.search(r"Requests/sec:\s+([\d.]+)", p.stdout)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", p.stdout)
    errs = re.search(r"Socket errors:.*", p.stdout)
    return {"cmd": " ".join(cmd), "rps": float(m.group(1)) if m else None,
            "client_cpu_s": round(cpu, 3),
            "client_cpu_us_per_req": round(cpu * 1e6 / int(total.group(1)), 2) if total else None,
            "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": errs.group(0) if errs else "", "stdout": p.stdout}


def step_wrk(a) -> list[dict]:
    out = []
    for backend in ("native", "epoll"):
        with Server(backend, "http") as srv:
            w_rps, l_rps, runs = [], [], []
            for _ in range(a.repeat):
                w, wscpu, wnoise = measured(srv, lambda: wrk(srv.port, 64, a.duration))
                w.update(server_cpu_s=round(wscpu, 3), proc_stat=wnoise)
                if w["rps"]:
                    w["server_cpu_us_per_req"] = round(wscpu * 1e6 / (w["rps"] * wnoise["wall_s"]), 2)
                r, scpu, noise = measured(srv, lambda: lg(srv.port, protocol="http", connections=64,
                                                          duration=a.duration, warmup=1.0))
                w_rps.append(w["rps"] or 0.0)
                l_rps.append(r.rps)
                runs.append({"wrk": w, "loadgen": summary(r, scpu, noise)})
            wm, lm = statistics.median(w_rps), statistics.median(l_rps)
            diff = (lm - wm) / wm * 100 if wm else None
            wc = statistics.median(x["wrk"]["client_cpu_us_per_req"] or 0 for x in runs)
            lc = statistics.median(x["loadgen"]["client_cpu_us_per_req"] or 0 for x in runs)
            print(f"http {backend:>6} c64: wrk {wm:.0f} req/s ({wc:.2f} client µs/req), loadgen "
                  f"{lm:.0f} req/s ({lc:.2f} client µs/req) ({diff:+.1f}%)", flush=True)
            out.append({"backend": backend, "wrk_rps": w_rps, "loadgen_rps": l_rps,
                        "wrk_median": wm, "loadgen_median": lm, "diff_pct": diff,
                        "within_10pct": diff is not None and abs(diff) <= 10, "runs": runs})
    return out


def step_capacity(a) -> list[dict]:
    out = []
    with Server("native", "echo", ["--message-size", "64"]) as srv:
        for conns, depth in ((16, 1), (256, 1), (16, 4), (16, 16), (256, 4), (16, 64)):
            r, scpu, noise = measured(srv, lambda: lg(srv.port, size=64, connections=conns,
                                                      depth=depth, duration=a.duration, warmup=1.0))
            d = summary(r, scpu, noise)
            d.update(connections=conns, depth=depth)
            print(f"capacity c{conns:<3} depth {depth:<2}: {r.rps:9.0f} req/s, client "
                  f"{r.client_cpu_us_per_req:.2f} µs/req, server "
                  f"{d.get('server_cpu_us_per_req')} µs/req, p50 {r.latency['p50']:.0f} µs, "
                  f"steal {noise['steal']}", flush=True)
            out.append(d)
    return out


def step_open_loop(a, capacity_rps: float) -> list[dict]:
    out = []
    with Server("native", "echo", ["--message-size", "64"]) as srv:
        r1 = lg(srv.port, size=64, connections=1, duration=a.duration, warmup=1.0)
        d = summary(r1)
        d.update(kind="closed depth 1, 1 connection")
        out.append(d)
        print(f"closed c1 d1: {r1.rps:.0f} req/s, p50 {r1.latency['p50']:.1f} µs", flush=True)
        r16 = lg(srv.port, size=64, connections=16, duration=a.duration, warmup=1.0)
        d = summary(r16)
        d.update(kind="closed depth 1, 16 connections")
        out.append(d)
        print(f"closed c16 d1: {r16.rps:.0f} req/s, p50 {r16.latency['p50']:.1f} µs", flush=True)
        cap = capacity_rps or r16.rps
        for frac in (0.1, 0.25, 2.0):
            rate = round(cap * frac, -2)
            r = lg(srv.port, size=64, connections=16, mode="open", rate=rate,
                   duration=a.duration, warmup=1.0)
            d = summary(r)
            d.update(kind=f"open {frac:g}x capacity", fraction=frac,
                     achieved_error_pct=round((r.achieved_rate - rate) / rate * 100, 3))
            out.append(d)
            print(f"open {frac:>4g}x ({rate:.0f}/s): achieved {r.achieved_rate:.0f} "
                  f"({d['achieved_error_pct']:+.2f}%), met {r.rate_met}, p50 "
                  f"{r.latency['p50']:.1f} µs, p99 {r.latency['p99']:.1f} µs, p99.9 "
                  f"{r.latency['p99.9']:.1f} µs, max {r.latency_max_us:.0f} µs, "
                  f"backlog {r.backlog}/{r.scheduled}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    p.add_argument("--short", type=float, default=2.0, help="seconds per byte-exactness run")
    p.add_argument("--repeat", type=int, default=3, help="wrk/loadgen pairs per backend")
    p.add_argument("--out", default="results", help="parent folder of the run folder")
    p.add_argument("--steps", default="echo,wrk,capacity,open")
    a = p.parse_args(argv)
    if len(os.sched_getaffinity(0)) < 2:
        print("needs two CPUs (server on 0, client on 1)", file=sys.stderr)
        return 2
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder = os.path.join(a.out, f"{stamp}-validate_loadgen")
    os.makedirs(folder, exist_ok=True)
    meta = metadata(argv)
    with open(os.path.join(folder, "metadata.json"), "w") as f:
        json.dump(meta, f, indent=1)
    steps = a.steps.split(",")
    results: dict = {}
    if "echo" in steps:
        results["echo_sizes"] = step_echo_sizes(a)
    if "wrk" in steps:
        if shutil.which("wrk"):
            results["wrk_vs_loadgen"] = step_wrk(a)
        else:
            print("wrk not installed: skipping the cross-check", file=sys.stderr)
    cap = 0.0
    if "capacity" in steps:
        results["capacity"] = step_capacity(a)
        cap = results["capacity"][0]["rps"]
    if "open" in steps:
        results["open_loop"] = step_open_loop(a, cap)
    for name, data in results.items():
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
            json.dump(data, f, indent=1)
        os.replace(f.name, os.path.join(folder, f"{name}.json"))
    print(f"raw results: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
