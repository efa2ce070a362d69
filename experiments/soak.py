"""Soak: normal load mixed with faults against one server subprocess, then checks.

    parallelnet experiment soak --preset standard          # epoll, uring, native, 30 s each
    parallelnet experiment soak --set 'backends=["uring"]' --set duration=60

Runs ``parallelnet serve --protocol http`` (127.0.0.1, port 0) and, for ``--duration``
seconds (bounded, default 60):

* normal load: keep-alive clients and connection churn (``core.client.run_clients``,
  which checks every response byte and reports every error);
* faults, in rotation: slow readers (thousands of pipelined requests, nothing read for
  a while, then everything read and checked), RST mid-request, RST mid-response,
  half-close, malformed requests (must get a 4xx and a close), slowloris (a partial
  header, which the server's header timeout must close).

At the end it checks: every well-formed request answered (responses lost = 0), zero
byte mismatches, open fds and RSS back to the starting level within a small margin,
no worker died and the server stopped cleanly.  It prints a summary; a backend that fails
a check is a failed point (its error names the checks), so the run's outcome is
``failed``.  One point per backend; the record is the soak's summary (``passed``,
``checks``, ``responses_lost``, ``faults``, ``fds``, ``rss_kib``...).  tests/test_faults.py
runs a 3 s form (:func:`run_soak`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

from types import SimpleNamespace

from parallelnet.core.client import read_http_responses, run_clients
from parallelnet.experiments.framework import (
    Context, Experiment, Plan, PlanNotes, Point, Summary, Table, available_backends, rotated,
)

GET = b"GET / HTTP/1.1\r\nHost: soak\r\n\r\n"
BODY = b"Hello, World!"
RSS_MARGIN_KB = 8 * 1024      # RSS may settle this much above the start (allocator caches)
RSS_MARGIN_FRAC = 0.10


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _nfds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Soak:
    def __init__(self, args) -> None:
        self.args = args
        self.faults: Counter = Counter()
        self.requests = 0        # well-formed requests sent whose responses we checked
        self.answered = 0
        self.mismatches = 0
        self.problems: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.stats_path = tempfile.mktemp(prefix="soak-stats-", suffix=".jsonl")

    # -- server ---------------------------------------------------------------------------

    def start_server(self) -> None:
        a = self.args
        cmd = [sys.executable, "-m", "parallelnet.core.cli", "serve", "--port", "0",
               "--backend", a.backend, "--workers", str(a.workers), "--protocol", "http",
               "--header-timeout", "1", "--idle-timeout", "10", "--max-output", "262144",
               "--stats-json", self.stats_path, "--stats-interval", "0.25"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith("listening on "):
                host, _, port = line.split()[-1].rpartition(":")
                self.addr = (host, int(port))
                threading.Thread(target=self.proc.stdout.read, daemon=True).start()
                return
        self.proc.kill()
        raise SystemExit(f"server did not start: {self.proc.communicate()}")

    def latest(self) -> dict:
        with open(self.stats_path) as f:
            # A line without its newline is still being written: skip it.
            recs = [json.loads(x) for x in f if x.endswith("\n") and x.strip()]
        return recs[-1] if recs else {}

    def wait_quiet(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rec = self.latest()
            if rec and rec["totals"]["open"] == 0:
                return True
            time.sleep(0.1)
        return False

    # -- checked request/response helpers ---------------------------------------------------

    def connect(self) -> socket.socket:
        s = socket.create_connection(self.addr, timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def read_responses(self, s: socket.socket, n: int) -> int:
        """Read n responses; count mismatches; return how many arrived."""
        responses = read_http_responses(s, n)
        bad = sum(1 for status, head, body in responses
                  if not head.startswith(b"HTTP/1.1 200 ") or body != BODY)
        if bad:
            with self.lock:
                self.mismatches += bad
        return len(responses)

    def checked(self, sent: int, got: int) -> None:
        with self.lock:
            self.requests += sent
            self.answered += got

    # -- faults ---------------------------------------------------------------------------------

    def slow_reader(self) -> None:
        n = 30000  # ~4 MB of responses: more than the socket buffers hold, so the server pauses reading
        with self.connect() as s:
            sender = threading.Thread(target=s.sendall, args=(GET * n,))
            sender.start()
            time.sleep(0.3)      # not reading
            got = self.read_responses(s, n)
            sender.join()
        self.checked(n, got)

    def reset_mid_request(self) -> None:
        s = self.connect()
        s.sendall(b"GET / HTTP/1.1\r\nHost: soak\r\nX-Partial: ")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()

    def reset_mid_response(self) -> None:
        s = self.connect()
        s.sendall(GET * 2000)
        s.recv(512)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()

    def half_close(self) -> None:
        with self.connect() as s:
            s.sendall(GET * 3)
            s.shutdown(socket.SHUT_WR)
            got = self.read_responses(s, 3)
            if s.recv(1) != b"":
                self.problems.append("half-close: no EOF after the responses")
        self.checked(3, got)

    def malformed(self) -> None:
        with self.connect() as s:
            s.sendall(b"BREW /pot HTTP/1.1\x00\r\n\r\n" if self.faults["malformed"] % 2
                      else b"GET / HTTP/1.1\r\nX: " + b"y" * 10000 + b"\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        if not data.startswith(b"HTTP/1.1 4"):
            self.problems.append(f"malformed request answered with {data[:40]!r}")

    def slowloris(self) -> None:
        s = self.connect()
        s.sendall(b"GET / HTTP/1.1\r\nHost: so")
        s.settimeout(5)
        try:
            if s.recv(1) != b"":
                self.problems.append("slowloris: got data instead of a close")
        except socket.timeout:
            self.problems.append("slowloris: the header timeout did not close the connection")
        except ConnectionResetError:
            pass
        s.close()

    def fault_loop(self, kinds) -> None:
        i = 0
        while not self.stop.is_set():
            kind = kinds[i % len(kinds)]
            i += 1
            try:
                getattr(self, kind)()
            except OSError as exc:
                self.problems.append(f"{kind}: {exc!r}")
            self.faults[kind] += 1
            time.sleep(0.02)

    # -- the run ------------------------------------------------------------------------------------

    def run(self) -> int:
        a = self.args
        self.start_server()
        pid = self.proc.pid
        try:
            warm = run_clients(*self.addr, connections=8, protocol="http", duration=0.5)
            self.wait_quiet(5)
            fds0, rss0 = _nfds(pid), _rss_kb(pid)
            results = {}

            def load(name, **kw):
                results[name] = run_clients(*self.addr, protocol="http", duration=a.duration,
                                            timeout=10, **kw)

            threads = [threading.Thread(target=load, args=("keepalive",), kwargs=dict(connections=16)),
                       threading.Thread(target=load, args=("churn",),
                                        kwargs=dict(connections=4, mode="short")),
                       threading.Thread(target=self.fault_loop, args=(
                           ["slow_reader", "reset_mid_request", "malformed", "reset_mid_response",
                            "half_close"],)),
                       threading.Thread(target=self.fault_loop, args=(["slowloris"],))]
            for t in threads:
                t.start()
            deadline = time.monotonic() + a.duration
            died = ""
            while time.monotonic() < deadline:
                time.sleep(0.25)
                if self.proc.poll() is not None:
                    died = f"server exited with {self.proc.returncode} during the soak"
                    break
            self.stop.set()
            for t in threads:
                t.join(a.duration + 30)
            quiet = self.wait_quiet(10)
            time.sleep(0.3)
            fds1 = _nfds(pid) if self.proc.poll() is None else -1
            rss1 = _rss_kb(pid) if self.proc.poll() is None else -1
        finally:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                _, err = self.proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                _, err = self.proc.communicate()
        final = self.latest()
        load_req = sum(r.requests for r in results.values())
        load_err = Counter()
        for r in results.values():
            load_err.update(r.errors)
        mismatches = self.mismatches + load_err.pop("mismatch", 0) + load_err.pop("http_status", 0)
        lost = self.requests - self.answered
        crashed = [w for w in final.get("workers", []) if w.get("crashed")]
        checks = {
            "server ran throughout": not died,
            "responses lost == 0": lost == 0,
            "byte mismatches == 0": mismatches == 0,
            "load clients: no errors": not load_err,
            "fault clients: no problems": not self.problems,
            "connections all closed at the end": quiet,
            "fds back to start": fds1 == fds0,
            "RSS back to start (margin)": 0 <= rss1 <= rss0 * (1 + RSS_MARGIN_FRAC) + RSS_MARGIN_KB,
            "no worker died": not crashed,
            "clean stop (exit 0)": self.proc.returncode == 0 and final.get("type") == "final"
                                   and final.get("clean", False),
        }
        extra = Counter()
        for w in final.get("workers", []):
            extra.update({k: v for k, v in w["extra"].items() if isinstance(v, int)})
        print(f"soak: backend {a.backend}, {a.workers} workers, {a.duration:g} s "
              f"(warm-up {warm.requests} requests)")
        print(f"  requests: {load_req + self.requests} well-formed "
              f"(load {load_req}: keepalive {results['keepalive'].requests}, "
              f"churn {results['churn'].requests} on {results['churn'].connects} connections; "
              f"fault clients {self.requests}), responses lost {lost}, mismatches {mismatches}")
        print("  faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())))
        t = final.get("totals", {})
        print(f"  server: requests {t.get('requests')}, accepted {t.get('accepted')}, "
              f"errors {t.get('errors')}, handler_errors {t.get('handler_errors')}, "
              + ", ".join(f"{k} {extra[k]}" for k in ("header_timeouts", "idle_timeouts",
                                                      "accept_errors", "max_pending") if k in extra)
              + f", backpressure {sum(w['backpressure'] for w in final.get('workers', []))}")
        print(f"  fds: {fds0} -> {fds1}; RSS: {rss0 / 1024:.1f} MiB -> {rss1 / 1024:.1f} MiB")
        if load_err:
            print(f"  load client errors: {dict(load_err)}")
        for p in self.problems[:10]:
            print(f"  problem: {p}")
        failed = [k for k, ok in checks.items() if not ok]
        for k, ok in checks.items():
            print(f"  [{'ok' if ok else 'FAIL'}] {k}")
        if crashed or died:
            print(err[-2000:], file=sys.stderr)
        os.unlink(self.stats_path)
        self.summary = {
            "backend": a.backend, "workers": a.workers, "duration": a.duration,
            "requests": load_req + self.requests, "load_requests": load_req,
            "churn_connections": results["churn"].connects, "fault_client_requests": self.requests,
            "responses_lost": lost, "mismatches": mismatches, "faults": dict(self.faults),
            "fds": [fds0, fds1], "rss_kib": [rss0, rss1], "server_totals": t,
            "server_extra": dict(extra), "checks": checks, "passed": not failed,
        }
        print("PASS" if not failed else "FAIL: " + "; ".join(failed))
        return 0 if not failed else 1


def run_soak(backend: str, workers: int = 2, duration: float = 60.0) -> dict:
    """One soak of ``backend``: its summary (``passed`` and every check)."""
    if not 0 < duration <= 3600:
        raise ValueError("soak duration must be in (0, 3600] s")
    soak = Soak(SimpleNamespace(backend=backend, workers=workers, duration=duration))
    soak.run()
    return soak.summary


# -- the experiment ----------------------------------------------------------------------------

def plan(p: dict) -> Plan:
    backends, skipped = available_backends(p["backends"])
    points = [Point(b, rep, {"backend": b}, est_s=p["duration"] + 4)
              for rep in range(p["reps"]) for b in rotated(backends, rep)]
    return Plan(points, PlanNotes(backends, skipped))


def run_point(point: Point, ctx: Context) -> dict:
    p = ctx.params
    rec = run_soak(point.params["backend"], p["workers"], p["duration"])
    if not rec["passed"]:
        failed = [k for k, ok in rec["checks"].items() if not ok]
        raise RuntimeError(f"soak of {point.params['backend']} failed: {'; '.join(failed)} "
                           f"(lost {rec['responses_lost']}, mismatches {rec['mismatches']})")
    return rec


def summarize(records: list[dict], p: dict, notes: PlanNotes) -> Summary:
    s = Summary()
    rows = []
    for d in records:
        faults = ", ".join(f"{k} {v}" for k, v in sorted(d["faults"].items()))
        rows.append([d["backend"], f"{d['duration']:.0f} s", f"{d['requests']:,}", faults,
                     str(d["responses_lost"]), str(d["mismatches"]), f"{d['fds'][0]} → {d['fds'][1]}",
                     f"{d['rss_kib'][0] / 1024:.1f} → {d['rss_kib'][1] / 1024:.1f}",
                     "PASS" if d["passed"] else "**FAIL**"])
        s.values[f"{d['backend']}.lost"] = str(d["responses_lost"])
    s.tables.append(Table("Faults mixed with load", ["backend", "duration", "well-formed requests",
                                                     "faults injected", "lost", "mismatches", "fds",
                                                     "RSS MiB", "verdict"], rows, key="all"))
    s.findings += [f"{d['backend']}: {'PASS' if d['passed'] else 'FAIL'}, {d['requests']:,} requests, "
                   f"{d['responses_lost']} lost, {d['mismatches']} mismatches" for d in records]
    s.add_skipped(notes.skipped)
    return s


EXPERIMENT = Experiment(
    name="soak", title="Faults mixed with load: nothing lost, nothing leaked",
    presets={
        "smoke": dict(backends=["epoll"], workers=2, duration=3.0, reps=1),
        "standard": dict(backends=["epoll", "uring", "native"], workers=2, duration=30.0, reps=1),
        "full": dict(backends=["epoll", "uring", "uring-py", "native"], workers=2, duration=120.0,
                     reps=1),
    },
    plan=plan, run_point=run_point, summarize=summarize,
    description="resets, slow readers, malformed input, fd exhaustion under load; one point per "
                "backend, failed if any check fails")
