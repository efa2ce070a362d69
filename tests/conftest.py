"""Shared fixtures: servers started through the real CLI, on loopback, port 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest

from parallelnet.core.backend import registry
from parallelnet.core import client
from parallelnet.core.launch import serve_command, spawn_server_all

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
BACKENDS = registry()

#: Skips that stay skips under CI: (test id substring, why CI may lack the facility).
#: Anything else skipped while CI is set is a failure: a skip must not hide a check.
CI_SKIP_ALLOWED = (
    ("test_loadgen.py::test_ipv6", "the CI machine may have no IPv6 loopback (::1)"),
    ("test_listeners.py::test_an_ipv6_listener", "the CI machine may have no IPv6 loopback (::1)"),
    ("test_native.py::test_epollexclusive_busy_head", "a kernel without EPOLLEXCLUSIVE (Linux < 4.5)"),
)


#: Modules whose checks are about time or CPU and must not share the machine with other
#: tests: ``make test`` runs them alone, after the rest has run in parallel (pytest-xdist).
SERIAL_MODULES = (
    "test_accept_races.py",   # which worker wins a race, by timing
)


def pytest_configure(config):
    config.addinivalue_line("markers", "serial: run alone, not beside other tests (time/CPU checks)")


def _mark_serial(items) -> None:
    for item in items:
        if item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1] in SERIAL_MODULES:
            item.add_marker(pytest.mark.serial)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI, a skip is a failure unless CI_SKIP_ALLOWED names it (xfail is not a skip)."""
    outcome = yield
    report = outcome.get_result()
    if not IN_CI or not report.skipped or hasattr(report, "wasxfail"):
        return
    if any(pattern in item.nodeid for pattern, _ in CI_SKIP_ALLOWED):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped under CI (CI=true), which counts as a failure: {reason}"


def require_backend(name: str) -> None:
    """Skip with the probe's precise reason — except in CI, where every registered
    backend (io_uring included) must run: there an unavailable backend is a failure."""
    avail = BACKENDS[name].probe()
    if not avail:
        if IN_CI:
            pytest.fail(f"backend {name} unavailable in CI: {avail.reason}")
        pytest.skip(f"backend {name} unavailable here: {avail.reason}")


@dataclass
class ServerProc:
    proc: subprocess.Popen
    host: str
    port: int
    stats_path: str
    args: list[str]
    output_path: str = ""
    output: str = ""
    final: dict = field(default_factory=dict)
    #: Every address it listens on, by listener id (the first is host/port).
    addresses: list[tuple[str, int]] = field(default_factory=list)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def connect(self, timeout: float = 5.0, listener: int = 0) -> socket.socket:
        s = socket.create_connection(self.addresses[listener] if self.addresses else self.address,
                                     timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def read_output(self) -> str:
        """Everything the server printed so far (it writes to a file, never a pipe)."""
        with open(self.output_path, errors="replace") as f:
            return f.read()

    def communicate(self, timeout: float) -> str:
        """Wait for the server to exit; return what it printed."""
        self.proc.wait(timeout)
        self.output = self.read_output()
        return self.output

    def stop(self, timeout: float = 20.0) -> dict:
        """SIGTERM, wait for the drain, return the final stats record."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # Servers run with PYTHONFAULTHANDLER: SIGABRT makes it print every thread's
            # stack before it dies, so a hang leaves its cause in the failure.
            self.proc.send_signal(signal.SIGABRT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            pytest.fail(f"server did not stop within {timeout}s after SIGTERM; it said:\n"
                        f"{self.read_output()[-12000:]}")
        self.output = self.read_output()
        with open(self.stats_path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        finals = [r for r in records if r["type"] == "final"]
        assert finals, f"no final stats record; server said:\n{self.output}"
        self.final = finals[-1]
        return self.final

    def alive(self) -> bool:
        return self.proc.poll() is None


def start_server(tmp_path, *args: str, timeout: float = 15.0,
                 env: dict | None = None) -> ServerProc:
    """``parallelnet serve --port 0 --stats-json … ARGS`` as a subprocess (without
    ``--port 0`` when ARGS name their addresses with ``--listen``)."""
    stamp = time.monotonic_ns()
    stats_path = str(tmp_path / f"stats-{stamp}.jsonl")
    output_path = str(tmp_path / f"output-{stamp}.log")
    env = {**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})}
    try:
        proc, addresses = spawn_server_all(["--stats-json", stats_path, *args], env=env,
                                           timeout=timeout, output=output_path)
    except RuntimeError as exc:
        raise AssertionError(str(exc)) from None
    (host, port), *_ = addresses
    srv = ServerProc(proc, host, port, stats_path, list(args), output_path, addresses=addresses)
    _STARTED.append(srv)
    return srv


_STARTED: list[ServerProc] = []


@pytest.fixture(autouse=True)
def _no_server_outlives_its_test():
    """A test that fails before its ``stop()`` must not leave its server running into
    the next tests (it would hold CPU and skew them): kill what it started, by PID.
    Module-scoped servers start before this fixture's mark and are left alone."""
    mark = len(_STARTED)
    yield
    for srv in _STARTED[mark:]:
        if srv.proc.poll() is None:
            srv.proc.kill()   # forked workers follow through PR_SET_PDEATHSIG
            srv.proc.wait(10)
    del _STARTED[mark:]


@pytest.fixture
def server_factory(tmp_path):
    """start_server bound to this test's tmp_path (the autouse fixture above ends what
    the test leaves running)."""
    def make(*args: str) -> ServerProc:
        return start_server(tmp_path, *args)

    return make


@pytest.fixture
def tcp_pair():
    """A connected (client, server) pair of TCP sockets on loopback."""
    with socket.create_server(("127.0.0.1", 0)) as lst:
        client = socket.create_connection(lst.getsockname())
        server, _ = lst.accept()
    yield client, server
    client.close()
    server.close()


def ipv6_loopback() -> bool:
    """Whether ::1 can be bound here (a container may have no IPv6 loopback)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise EOFError(f"connection closed with {n} bytes still expected")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_until_eof(sock: socket.socket, limit: int = 1 << 26) -> bytes:
    chunks, total = [], 0
    while total < limit:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def read_http_responses(sock: socket.socket, count: int) -> list[tuple[int, bytes, bytes]]:
    """Exactly ``count`` responses (status, head, body); EOF before that is an error."""
    out = client.read_http_responses(sock, count)
    if len(out) < count:
        raise EOFError(f"EOF after {len(out)} of {count} responses")
    return out


def run_cli_serve_error(*args: str) -> str:
    """Run ``parallelnet serve`` expecting a startup refusal (exit 2); return stderr."""
    res = subprocess.run(serve_command(list(args)), capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    return res.stderr


LIMIT_FLAGS = {"idle_timeout": "--idle-timeout", "header_timeout": "--header-timeout",
               "header_min_rate": "--header-min-rate",
               "max_connections": "--max-connections", "max_output": "--max-output"}
_FLAG_VALUE = {"max_connections": "7", "max_output": "7", "header_min_rate": "100"}


def policy_outcome(request, backend: str, *limits: str) -> None:
    """The explicit outcome for a backend that declares ``limits`` unsupported
    (``Backend.unsupported``) - never a silent PASS: check that asking for one is refused
    at startup naming the flag and the backend, then end as an expected failure that names
    the reason.  A backend that enforces them all: the test goes on."""
    cls = BACKENDS[backend]
    refused = [(name, cls.unsupported(name)) for name in limits if cls.unsupported(name)]
    for name, why in refused:
        value = _FLAG_VALUE.get(name, "5")
        res = subprocess.run([sys.executable, "-m", "parallelnet.core.cli", "serve", "--port", "0",
                              "--backend", backend, LIMIT_FLAGS[name], value, "--duration", "1"],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 2, (res.stdout, res.stderr)
        assert LIMIT_FLAGS[name] in res.stderr and backend in res.stderr, res.stderr
    if refused:
        pytest.xfail(f"{backend} declares {', '.join(n for n, _ in refused)} unsupported "
                     f"({refused[0][1]}); the refusal at startup was checked")


def _backend_of(test_id: str) -> str | None:
    """The registered backend a parametrised test id starts with (the longest match:
    ``uring-py-thread`` is uring-py's, not uring's)."""
    names = [n for n in BACKENDS if test_id == n or test_id.startswith(n + "-")]
    return max(names, key=len) if names else None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """``-k NAME`` with NAME a registered backend selects that backend's tests only:
    pytest matches substrings, so ``-k poll`` would also take epoll's (and ``-k uring``
    uring-py's).  Tests that name no backend are left to pytest's own matching."""
    _mark_serial(items)   # before -m selects on marks
    name = (config.getoption("keyword") or "").strip()
    if name not in BACKENDS:
        return
    keep, drop = [], []
    for item in items:
        spec = getattr(item, "callspec", None)
        owner = _backend_of(spec.id) if spec is not None else None
        (drop if owner is not None and owner != name else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def open_fds() -> dict[int, str]:
    """This process's open file descriptors: fd -> what it is (/proc/self/fd)."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass   # the directory's own fd, closed by now
    return out


def fds_left_by_a_server_run(config, connections: int = 4) -> dict[int, str]:
    """Start an in-process ``Server(config)``, serve a few echo round trips, stop it (twice:
    the first run is a warm-up); return the descriptors open after the second that were
    not open before it (fd -> what it is).

    The garbage collector is off for the run: a descriptor that only a collection would
    close (a multiplexer object in a reference cycle) is a leak all the same - a worker
    restarted in a long-lived process would pile them up until some later collection."""
    import gc

    from parallelnet.core.server import Server

    def run() -> None:
        srv = Server(config)
        try:
            host, port = srv.start()[:2]
            for i in range(connections):
                with socket.create_connection((host, port), timeout=10) as s:
                    s.sendall(b"x" * (i + 1))
                    assert recv_exactly(s, i + 1) == b"x" * (i + 1)
        finally:
            assert srv.stop()

    # A first run pays what a library opens once per process (uvloop: one pipe, kept for
    # the process's life); the second, measured, must leave nothing behind.
    run()
    gc.collect()
    gc.disable()
    try:
        before = open_fds()
        run()
        after = open_fds()
    finally:
        gc.enable()
    return {fd: what for fd, what in after.items() if fd not in before}
