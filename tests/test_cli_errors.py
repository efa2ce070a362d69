"""Every user mistake ends in one clear line and a non-zero exit; a server that cannot
serve says so before "listening on"; an unclean drain and a forced exit say so too.

The table below walks bad inputs of every subcommand (serve, demo, loadgen, backends,
the top level; ``experiment`` has its own tests) and asserts for each: the exit status,
exactly one line on stderr, no traceback, no "listening on", no process left in the
command's own process group, nothing written where a result path was given, and that
the refusal came at once (before any run the command would otherwise have started).
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ipv6_loopback, require_backend, start_server
from parallelnet.core.cpus import MAX_WORKERS, allowed_cpus, max_workers

CLI = [sys.executable, "-m", "parallelnet.core.cli"]
QUICK = 10.0    # seconds: a refusal never waits for the run it refuses (those ask for 30 s)
NOT_MINE = 4095 if 4095 not in allowed_cpus() else None   # a CPU outside the affinity mask


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:   # a process of another user took the id: not ours
        return True
    return False


def run_cli(args, timeout: float = 30.0, script: str | None = None,
            env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """The CLI in a session of its own; asserts that nothing of it outlives it (whatever
    it started is in that process group).  Returns the result and how long it took."""
    cmd = [sys.executable, "-c", script, *args] if script else [*CLI, *args]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # the group we created, with all it started
        proc.communicate()
        pytest.fail(f"{args} did not end within {timeout} s")
    took = time.monotonic() - t0
    deadline = time.monotonic() + 5
    while not _group_gone(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not _group_gone(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{args}: a process of its group outlived it")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), took


def assert_one_line(res: subprocess.CompletedProcess, status: int = 2) -> str:
    """Exit ``status``, exactly one non-empty line on stderr, no traceback, nothing
    served.  Returns the line."""
    lines = res.stderr.splitlines()
    assert res.returncode == status, (res.returncode, res.stdout, res.stderr)
    assert len(lines) == 1 and lines[0].strip(), f"want one line on stderr, got:\n{res.stderr}"
    assert "Traceback" not in res.stderr + res.stdout
    assert "listening on" not in res.stdout
    return lines[0]


# -- the table ------------------------------------------------------------------------

def _serve_cases():
    too_many = max_workers() + 1
    cases = [
        (["--port", "70000"], r"--port must be 0\.\.65535, got 70000"),
        (["--port", "-1"], r"--port must be 0\.\.65535, got -1"),
        (["--port", "http"], r"--port must be an integer"),
        (["--max-output", "-1"], r"--max-output must be 1\.\."),
        (["--max-output", "0"], r"--max-output must be 1\.\."),
        (["--max-connections", "0"], r"--max-connections must be 1\.\."),
        (["--backlog", "-1"], r"--backlog must be 1\.\.65535"),
        (["--stats-interval", "-1"], r"--stats-interval must be 0 \(off\) or 0\.01\.\."),
        (["--stats-interval", "0.0001"], r"--stats-interval must be"),
        (["--duration", "-1"], r"--duration must be 0\.\."),
        (["--duration", "nan"], r"--duration must be a finite number"),
        (["--drain-timeout", "-1"], r"--drain-timeout must be 0\.\.86400"),
        (["--idle-timeout", "-1"], r"--idle-timeout must be 0\.\."),
        (["--header-timeout", "-0.5"], r"--header-timeout must be 0\.\."),
        (["--header-min-rate", "-5"], r"--header-min-rate must be 0\.\."),
        (["--message-size", "-1"], r"--message-size must be 0\.\."),
        (["--sndbuf", "0"], r"--sndbuf must be a positive number of bytes, got 0"),
        (["--workers", "0"], r"--workers must be 1\.\."),
        (["--workers", "10000"], rf"--workers must be 1\.\.{MAX_WORKERS}, got 10000"),
        (["--cpus", "x"], r"--cpus: bad CPU list"),
        (["--cpus", "0-99999"], r"--cpus: bad CPU list '0-99999': CPU numbers are 0\.\.8191"),
        (["--dispatch-cpu", str(allowed_cpus()[0])], r"--dispatch-cpu is for --accept dispatch"),
        (["--dispatch-policy", "least-connections"], r"--dispatch-policy is for --accept dispatch"),
        (["--reuseport-join"], r"--reuseport-join is for --accept reuseport"),
        (["--backend", "uring", "--epoll-edge"], r"--epoll-edge is an option of backend epoll, "
                                                 r"not of --backend uring"),
        (["--backend", "epoll", "--uring-entries", "8"],
         r"--uring-entries is an option of backends native-uring, uring, uring-py"),
        (["--backend", "nope"], r"invalid choice: 'nope'"),
        (["--accept", "sideways"], r"invalid choice: 'sideways'"),
        (["--no-such-flag"], r"unrecognized arguments: --no-such-flag"),
        (["--listen", "127.0.0.1:70000"], r"--listen: port must be in 0\.\.65535"),
        (["--listen", "127.0.0.1:0", "--port", "0"], r"either with --listen or with --host/--port"),
        (["--host", "no-such-host.invalid"], r"cannot resolve host 'no-such-host\.invalid'"),
        (["--host", "10.1.2.3"], r"refusing to bind non-loopback address '10\.1\.2\.3' without "
                                 r"--allow-remote"),
        (["--backend", "poll", "--accept", "exclusive"], r"does not support --accept exclusive"),
    ]
    if too_many <= MAX_WORKERS:
        cases.append((["--workers", str(too_many)], rf"--workers must be 1\.\.{too_many - 1} here"))
    if NOT_MINE is not None:
        cases += [
            (["--cpus", f"{NOT_MINE - 95}-{NOT_MINE}"],
             rf"--cpus {NOT_MINE - 95}-{NOT_MINE}: CPUs {NOT_MINE - 95}-{NOT_MINE} not in this "
             r"process's affinity mask \([0-9,-]+\)$"),
            (["--accept", "dispatch", "--dispatch-cpu", str(NOT_MINE)],
             rf"--dispatch-cpu {NOT_MINE} is not in this process's affinity mask"),
        ]
    return cases


@pytest.mark.parametrize("args, why", _serve_cases(), ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_serve_refuses_in_one_line(args, why, tmp_path):
    stats = tmp_path / "stats.jsonl"
    extra = ["--stats-json", str(stats), "--duration", "30"]
    if "--duration" in args:
        extra = extra[:2]
    if not any(a in args for a in ("--port", "--listen")):
        extra += ["--port", "0"]
    res, took = run_cli(["serve", *args, *extra])
    line = assert_one_line(res)
    assert line.startswith("parallelnet serve: "), line
    assert re.search(why, line), line
    assert len(line) < 300, f"not a short line: {line}"
    assert took < QUICK, f"refused only after {took:.1f} s"
    assert not stats.exists(), "a server that did not start wrote its stats file"


@pytest.mark.parametrize("target, why", [
    ("/nonexistent-dir/stats.jsonl", r"--stats-json /nonexistent-dir/stats\.jsonl: directory "
                                     r"/nonexistent-dir does not exist"),
    (".", r"--stats-json \.: is a directory"),
])
def test_serve_refuses_a_stats_file_it_cannot_write(target, why, tmp_path):
    res, took = run_cli(["serve", "--port", "0", "--duration", "30", "--stats-json", target])
    assert re.search(why, assert_one_line(res))
    assert took < QUICK


DEMO_CASES = [
    (["--backend", "nope"], r"invalid choice: 'nope'"),
    (["--backend", "poll", "--accept", "exclusive"],
     r"backend poll does not support --accept exclusive \(it supports: .*shared"),
    (["--clients", "0"], r"--clients must be 1\.\.4096, got 0"),
    (["--clients", "-3"], r"--clients must be 1\.\.4096, got -3"),
    (["--duration", "0"], r"--duration must be 0\.1\.\.3600 s"),
    (["--duration", "-1"], r"--duration must be 0\.1\.\.3600 s"),
    (["--mode", "fork"], r"invalid choice: 'fork'"),
]


@pytest.mark.parametrize("args, why", DEMO_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_demo_refuses_in_one_line(args, why):
    duration = [] if "--duration" in args else ["--duration", "30"]
    res, took = run_cli(["demo", *args, *duration])
    line = assert_one_line(res)
    assert line.startswith("parallelnet demo: ") and re.search(why, line), line
    assert took < QUICK, f"refused only after {took:.1f} s"
    assert "not within" not in line


def _loadgen_cases(tmp_path):
    target = "127.0.0.1:9"   # nothing answers there: a run that went ahead would fail fast
    cases = [
        (["--json", "/nonexistent-dir/r.json", target], r"--json /nonexistent-dir/r\.json: "
                                                        r"directory /nonexistent-dir does not exist"),
        (["--json", str(tmp_path), target], r"--json .*: is a directory"),
        (["-c", "0", target], r"--connections must be 1\.\.1000000, got 0"),
        (["-t", "0", target], r"--threads must be 1\.\.1024, got 0"),
        (["-c", "1", "-t", "2", target], r"threads \(2\) must not exceed connections \(1\)"),
        (["-d", "0", target], r"--duration must be above 0"),
        (["-d", "-1", target], r"--duration is not a duration: '-1'"),
        (["-d", "soon", target], r"--duration is not a duration: 'soon'"),
        (["--warmup", "-1", target], r"--warmup is not a duration"),
        (["--timeout", "0", target], r"--timeout must be above 0"),
        (["--depth", "0", target], r"--depth must be 1\.\.4096, got 0"),
        (["--size", "0", target], r"--size must be 1\.\.67108864 bytes"),
        (["--size", "100m", target], r"--size must be 1\.\.67108864 bytes"),
        (["--rate", "-5", target], r"--rate must be 0 or more"),
        (["--seed", "-1", target], r"--seed must be 0\.\."),
        (["--requests-per-conn", "0", "--mode", "churn", target], r"--requests-per-conn must be 1\.\."),
        (["--max-requests", "-1", target], r"--max-requests must be 0\.\."),
        (["--mode", "sideways", target], r"invalid choice: 'sideways'"),
        (["127.0.0.1"], r"target must be HOST:PORT"),
        (["127.0.0.1:70000"], r"port must be an integer in 1\.\.65535, got 70000"),
        (["https://127.0.0.1/"], r"only http:// URLs are supported"),
        (["no-such-host.invalid:80"], r"cannot resolve host 'no-such-host\.invalid'"),
        ([], r"the following arguments are required: target"),
        (["--no-such-flag", target], r"unrecognized arguments: --no-such-flag"),
    ]
    if NOT_MINE is not None:
        cases.append((["--cpus", f"{NOT_MINE - 95}-{NOT_MINE}", target],
                      rf"--cpus {NOT_MINE - 95}-{NOT_MINE}: CPUs {NOT_MINE - 95}-{NOT_MINE} not "
                      r"in this process's affinity mask"))
    return cases


def test_loadgen_refuses_in_one_line_before_any_run(tmp_path):
    for args, why in _loadgen_cases(tmp_path):
        out = tmp_path / "result.json"
        extra = [] if "--json" in args else ["--json", str(out)]
        # -d 30: a refusal that came after the run would take that long
        if "-d" not in args:
            extra += ["-d", "30", "--warmup", "0"]
        res, took = run_cli(["loadgen", *args, *extra])
        line = assert_one_line(res)
        assert line.startswith("parallelnet loadgen: ") and re.search(why, line), (args, line)
        assert took < QUICK, f"{args}: refused only after {took:.1f} s"
        assert not out.exists(), f"{args}: a result was written"


@pytest.mark.parametrize("args, why", [
    (["backends", "--foo"], r"unrecognized arguments: --foo"),
    (["backends", "extra"], r"unrecognized arguments: extra"),
    (["nope"], r"invalid choice: 'nope'"),
    ([], r"the following arguments are required: COMMAND"),
    (["--bogus", "serve"], r"unrecognized arguments: --bogus|invalid choice"),
])
def test_top_level_and_backends_refuse_in_one_line(args, why):
    res, took = run_cli(args)
    line = assert_one_line(res)
    assert line.startswith("parallelnet") and re.search(why, line), line
    assert took < QUICK


def test_version_is_one_line():
    from importlib.metadata import version

    res, _ = run_cli(["--version"])
    assert res.returncode == 0 and not res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"parallelnet {version('parallelnet')}"), lines


def test_help_shows_each_default_once_and_every_option_has_help():
    for sub in ("serve", "demo"):
        res, _ = run_cli([sub, "--help"])
        assert res.returncode == 0
        text = res.stdout
        flat = " ".join(text.split())   # help lines wrap anywhere
        assert flat.count("(default: 4096)") == 1 or sub != "serve"
        # Options in the help body start a line with two spaces and a dash; each has text.
        body = text.split("options:", 1)[1]
        entries = re.split(r"\n  (?=-)", body)
        for entry in entries[1:]:
            flag = entry.split()[0]
            words = entry.split()
            assert len(words) > 2, f"{sub} {flag}: no help text"
            assert entry.count("default") <= 1, f"{sub} {flag} shows its default twice:\n{entry}"
    res, _ = run_cli(["loadgen", "--help"])
    assert res.returncode == 0 and "--json PATH" in res.stdout


# -- a server that cannot serve says so before "listening on" ------------------------------

FAIL_PIN = """
import errno, sys
import parallelnet.core.dispatch as dispatch
def refuse(cpu):
    raise OSError(errno.EINVAL, "Invalid argument")
dispatch.pin_current_thread = refuse
from parallelnet.core.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_dispatcher_that_cannot_start_is_one_line_before_listening(tmp_path):
    stats = tmp_path / "stats.jsonl"
    cpu = str(allowed_cpus()[-1])
    res, took = run_cli(["serve", "--port", "0", "--accept", "dispatch", "--dispatch-cpu", cpu,
                         "--workers", "2", "--duration", "30", "--stats-json", str(stats)],
                        script=FAIL_PIN)
    line = assert_one_line(res)
    assert line == f"parallelnet serve: dispatcher did not start: cannot pin it to CPU {cpu}: " \
                   "Invalid argument", line
    assert res.stdout == "" and not stats.exists()
    assert took < QUICK


DISPATCHER_DIES = """
import sys
import parallelnet.core.dispatch as dispatch
def broken(self, listener_id):
    raise MemoryError("injected")
dispatch.Dispatcher._accept_all = broken
from parallelnet.core.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_dispatcher_that_dies_while_serving_fails_the_server():
    cmd = [sys.executable, "-c", DISPATCHER_DIES, "serve", "--port", "0", "--accept", "dispatch",
           "--workers", "1", "--duration", "30"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        assert ready, "the server printed nothing within 15 s"
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        host, port = line.split()[-1].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5):
            pass
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, (proc.returncode, err)
    assert "Traceback" not in err
    assert err.count("dispatcher died: MemoryError: injected") == 1, err


FAIL_WORKER = """
import sys
from parallelnet.backends.epoll import EpollBackend
setup = EpollBackend._setup
def broken(self):
    if self.ctx.index == 1:
        raise OSError(12, "cannot allocate the loop")
    setup(self)
EpollBackend._setup = broken
from parallelnet.core.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_worker_that_cannot_start_is_one_line_before_listening(tmp_path):
    res, took = run_cli(["serve", "--port", "0", "--workers", "2", "--duration", "30"],
                        script=FAIL_WORKER)
    line = assert_one_line(res)
    assert line.startswith("parallelnet serve: worker 1 did not start: OSError") and \
        "cannot allocate the loop" in line, line
    assert took < QUICK


def test_a_dispatcher_pin_failure_fails_start_in_process(monkeypatch):
    import errno

    from parallelnet.core import dispatch as dispatch_mod
    from parallelnet.core.backend import BackendError
    from parallelnet.core.server import Server, ServerConfig

    def refuse(cpu):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(dispatch_mod, "pin_current_thread", refuse)
    srv = Server(ServerConfig(workers=1, accept="dispatch", dispatch_cpu=allowed_cpus()[0]))
    with pytest.raises(BackendError, match="dispatcher did not start: cannot pin it to CPU"):
        srv.start()
    assert not srv.workers.alive(), "the workers were left running"


# -- addresses ---------------------------------------------------------------------------

def test_a_second_reuseport_server_on_a_held_port_is_refused(tmp_path):
    first = start_server(tmp_path, "--accept", "reuseport", "--workers", "2")
    try:
        res, took = run_cli(["serve", "--accept", "reuseport", "--port", str(first.port),
                             "--duration", "30"])
        line = assert_one_line(res)
        assert f"cannot listen on 127.0.0.1:{first.port}: address already in use" in line, line
        assert "--reuseport-join" in line
        # A plain server on the held port: the address is named.
        res, _ = run_cli(["serve", "--port", str(first.port), "--duration", "30"])
        line = assert_one_line(res)
        assert line == f"parallelnet serve: cannot listen on 127.0.0.1:{first.port}: " \
                       "Address already in use", line
        # Said to be intended: it joins the group.
        second = start_server(tmp_path, "--accept", "reuseport", "--workers", "1",
                              "--reuseport-join", "--port", str(first.port))
        assert second.port == first.port
        second.stop()
        assert second.proc.returncode == 0, second.output
    finally:
        first.stop()
    assert first.proc.returncode == 0, first.output


def test_a_bracketed_ipv6_host_is_loopback(tmp_path):
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    srv = start_server(tmp_path, "--host", "[::1]", "--workers", "1")
    assert srv.host == "::1"
    with srv.connect() as s:
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
    srv.stop()
    assert srv.proc.returncode == 0 and "non-loopback" not in srv.output


def test_banner_says_unpinned_and_wrapping_is_announced(tmp_path):
    n = len(allowed_cpus()) + 1
    srv = start_server(tmp_path, "--workers", str(n), "--no-pin")
    srv.stop()
    assert "not pinned" in srv.output and "on CPUs" not in srv.output, srv.output
    assert "warning" not in srv.output
    srv = start_server(tmp_path, "--workers", str(n))
    srv.stop()
    cpus = allowed_cpus()
    pins = ",".join(str(cpus[i % len(cpus)]) for i in range(n))
    assert f"warning: {n} workers on {len(cpus)} CPU" in srv.output
    assert f"pinned to {pins}" in srv.output, srv.output


# -- drain ---------------------------------------------------------------------------------

def _stuck_client(srv) -> socket.socket:
    """A client that asks for 16 MiB and never reads: the answer stays in the server."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(srv.address)
    sock.sendall(b"GET /bytes/16777216 HTTP/1.1\r\nHost: t\r\n\r\n")
    return sock


@pytest.mark.parametrize("backend, mode", [("epoll", "thread"), ("epoll", "process"),
                                           ("uring", "thread"), ("native", "thread"),
                                           ("asyncio", "thread")])
def test_an_unclean_drain_says_so_and_exits_3(backend, mode, tmp_path):
    require_backend(backend)
    srv = start_server(tmp_path, "--backend", backend, "--mode", mode, "--protocol", "http",
                       "--workers", "1", "--max-output", "65536", "--sndbuf", "16384",
                       "--drain-timeout", "0.3")
    sock = _stuck_client(srv)
    try:
        time.sleep(0.5)   # the answer fills the socket buffers and the rest is held
        srv.proc.send_signal(signal.SIGTERM)
        srv.communicate(timeout=15)
    finally:
        sock.close()
    assert srv.proc.returncode == 3, srv.output
    assert srv.output.count("drain unclean: 1 connection still had answers unsent at "
                            "--drain-timeout 0.3 s; abandoned (status 3)") == 1, srv.output
    assert "Traceback" not in srv.output
    with open(srv.stats_path) as f:
        final = [json.loads(x) for x in f if x.strip()][-1]
    assert final["type"] == "final" and final["clean"] is False
    assert final["drain"]["abandoned"] == 1 and final["drain"]["killed"] is False


def test_a_clean_drain_exits_0_without_a_drain_line(tmp_path):
    srv = start_server(tmp_path, "--protocol", "http", "--workers", "1", "--drain-timeout", "1")
    with srv.connect() as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 200")
        final = srv.stop()     # the idle keep-alive connection is closed, not abandoned
    assert srv.proc.returncode == 0, srv.output
    assert final["clean"] is True and final["drain"]["abandoned"] == 0
    assert "drain" not in srv.output


def test_a_second_signal_forces_exit_with_one_line(tmp_path):
    srv = start_server(tmp_path, "--protocol", "http", "--workers", "1", "--max-output", "65536",
                       "--sndbuf", "16384", "--drain-timeout", "30")
    sock = _stuck_client(srv)
    try:
        time.sleep(0.5)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert srv.alive(), "the drain should still be waiting for the stuck client"
        srv.proc.send_signal(signal.SIGTERM)
        srv.communicate(timeout=10)
    finally:
        sock.close()
    assert srv.proc.returncode == 130
    assert srv.output.count("parallelnet serve: second signal: forced exit without the drain "
                            "(status 130)") == 1, srv.output
    assert "Traceback" not in srv.output


# -- loadgen against the wrong protocol ------------------------------------------------------

def test_loadgen_echo_against_http_hints_at_the_url(tmp_path):
    srv = start_server(tmp_path, "--protocol", "http", "--workers", "1")
    try:
        # 16 KiB of echo pattern is no request line: the server answers 414 (or 400 for a
        # bare LF in it) at once, "HTTP/1.1 4..", never an echo.
        res, took = run_cli(["loadgen", "-c", "2", "--size", "16k", "-d", "0.5", "--warmup", "0",
                             f"{srv.host}:{srv.port}"])
    finally:
        srv.stop()
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    hint = [ln for ln in res.stderr.splitlines() if "hint:" in ln]
    assert len(hint) == 1 and "http://HOST:PORT/" in hint[0] and "--protocol http" in hint[0], \
        res.stderr


@pytest.mark.parametrize("output", [False, True])
def test_a_server_that_exits_before_listening_is_reported_with_its_reason(output, tmp_path):
    """What the demo, the experiments and the tests see: the server's own line and its
    status, at once - not "did not start within 10 s" after it had long exited."""
    from parallelnet.core.launch import ServerStartError, spawn_server

    t0 = time.monotonic()
    with pytest.raises(ServerStartError) as info:
        spawn_server(["--backend", "poll", "--accept", "exclusive"], timeout=10,
                     output=str(tmp_path / "out.log") if output else None)
    assert time.monotonic() - t0 < QUICK
    assert info.value.returncode == 2
    assert info.value.reason.startswith("backend 'poll' does not support --accept exclusive"), \
        info.value.reason
    assert "did not start: it exited with status 2" in str(info.value)
