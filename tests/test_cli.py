"""The command line: listing backends, clear errors, the demo."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import start_server


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "parallelnet.core.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_backends_lists_every_readiness_backend_as_available():
    out = run_cli("backends").stdout
    for name in ("select", "poll", "epoll"):
        line = next(ln for ln in out.splitlines() if ln.split()[0] == name)
        assert " available " in line


@pytest.mark.parametrize("backend", ["select", "poll"])
def test_exclusive_is_refused_clearly_where_unsupported(backend):
    res = run_cli("serve", "--backend", backend, "--accept", "exclusive", "--port", "0")
    assert res.returncode == 2
    assert "does not support --accept exclusive" in res.stderr


def test_non_loopback_bind_needs_explicit_flag():
    res = run_cli("serve", "--host", "0.0.0.0", "--port", "0")
    assert res.returncode == 2
    assert "--allow-remote" in res.stderr


def test_cpu_outside_affinity_mask_is_a_clear_error():
    res = run_cli("serve", "--cpus", "4095", "--port", "0")
    assert res.returncode == 2
    assert "affinity mask" in res.stderr


def test_serve_prints_address_and_final_table(tmp_path):
    srv = start_server(tmp_path, "--workers", "2")
    with srv.connect() as s:
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
    final = srv.stop()
    assert srv.proc.returncode == 0
    assert "accepted: total 1," in srv.output
    assert "Jain" in srv.output
    assert len(final["workers"]) == 2


def test_demo_runs_and_prints_the_table():
    res = run_cli("demo", "--duration", "1", "--clients", "8", timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "errors: none" in res.stdout
    assert "accept races:" in res.stdout


def test_loadgen_subcommand_drives_a_server(tmp_path):
    srv = start_server(tmp_path, "--workers", "1", "--message-size", "64")
    res = run_cli("loadgen", "-c", "4", "-d", "0.5s", "--warmup", "0", "--max-requests", "500",
                  f"{srv.host}:{srv.port}")
    final = srv.stop()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Requests/sec" in res.stdout
    assert final["totals"]["requests"] >= 500


def test_serve_help_describes_listen():
    out = run_cli("serve", "--help").stdout
    assert "--listen ADDR:PORT[,protocol=NAME]" in out
    assert "[::1]:8080" in out


@pytest.mark.parametrize("args, why", [
    (("--listen", "127.0.0.1:0", "--port", "0"), "either with --listen or with --host/--port"),
    (("--listen", "127.0.0.1:0", "--host", "127.0.0.1"), "either with --listen or with --host/--port"),
    (("--listen", "::1:80"), "HOST:PORT or [IPv6]:PORT"),
    (("--listen", "127.0.0.1:0,protocol=gopher"), "unknown protocol 'gopher'"),
    (("--listen", "127.0.0.1:0", "--listen", "10.1.2.3:0"), "--allow-remote"),
])
def test_listen_mistakes_are_clear_errors(args, why):
    res = run_cli("serve", *args)
    assert res.returncode == 2, res.stdout + res.stderr
    assert why in res.stderr


# serve's SIGTERM handler runs in the main thread between two of its Python lines, which
# may be inside the wait for that very stop (threading.Event.wait holds the Event's lock
# there: a handler calling Event.set() then blocked forever - a serve that never stopped).
# sys.settrace runs the handler at *every* line of the wait, as a signal may.
STOP_ANYWHERE = """
import sys
from parallelnet.core.stopping import StopRequest
stop = StopRequest()
def tracer(frame, event, arg):
    stop.request()          # what serve's handler does
    return tracer
sys.settrace(tracer)
woke = stop.wait(5.0)
sys.settrace(None)
print("woke" if woke else "timeout")
"""


def test_a_stop_requested_anywhere_inside_the_wait_wakes_it():
    try:
        res = subprocess.run([sys.executable, "-c", STOP_ANYWHERE], capture_output=True,
                             text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("a stop requested inside the wait deadlocked it")
    assert res.stdout.strip() == "woke", res.stderr


def test_serve_refuses_a_socket_buffer_size_that_is_not_positive():
    res = run_cli("serve", "--port", "0", "--sndbuf", "0", timeout=30)
    assert res.returncode == 2
    assert "--sndbuf must be a positive number of bytes, got 0" in res.stderr
