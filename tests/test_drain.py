"""Stop and drain, for every registered backend: what a stop costs and counts.

* A stop is not an accept race: the drain's last look at the listen backlog must not
  show up as listen wakeups or lost races.
* A drain that cannot flush (the client never reads) waits for writability or the
  drain deadline — it must not spin on an fd that stays ready (the stop eventfd).
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from conftest import BACKENDS, require_backend, start_server


@pytest.fixture(params=list(BACKENDS))
def backend(request):
    require_backend(request.param)
    return request.param


def _records(srv):
    with open(srv.stats_path) as f:
        return [json.loads(x) for x in f if x.strip()]


def test_stop_without_traffic_counts_no_accept_race(backend, tmp_path):
    srv = start_server(tmp_path, "--backend", backend, "--workers", "2")
    time.sleep(0.3)
    final = srv.stop()
    for w in final["workers"]:
        # lost_races is None where the backend cannot observe them (io_uring)
        assert (w["listen_wakeups"], w["lost_races"] or 0, w["accepted"]) == (0, 0, 0), w


def test_drain_that_cannot_flush_does_not_spin(backend, tmp_path):
    drain = 1.5
    # The server's send buffer is fixed (--sndbuf: set on the listener, inherited by the
    # connection).  Left to autotuning it grows at each ACK of the client's zero-window
    # probes, so output that was stuck when the client gave up could still reach the
    # kernel before the stop, and the drain then rightly had nothing to wait for (seen
    # under load: bytes_out == bytes_in at stop, the drain done in 0.06 s).
    srv = start_server(tmp_path, "--backend", backend, "--workers", "1", "--stats-interval", "0.1",
                       "--max-output", "65536", "--drain-timeout", str(drain), "--sndbuf", "16384")
    # The small receive buffer is set before connect, so the window the client advertises
    # is small from the handshake on.  Shrunk after it, the window already advertised
    # cannot be taken back: the client drops what the server sends into it, the server's
    # retransmission timer backs off, and the client's own sends then stall for seconds
    # on a window update that comes late - while the server reads everything and holds
    # nothing (seen under load: ss showed the server's Recv-Q empty, the client
    # rwnd-limited on its persist timer).  A stall of the client is then no proof that
    # the server stopped reading, and the drain had nothing to wait for.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(srv.address)
    sock.settimeout(0.5)

    def stuck_round() -> bool | None:
        """Send until 0.5 s pass without room for one byte; True if no byte went at all."""
        block = b"x" * 65536
        first = True
        for _ in range(2000):
            try:
                sock.send(block)
            except TimeoutError:
                return first
            except OSError:
                return None
            first = False
        return None

    # The output is stuck in the server's user space only once the server has paused
    # reading and its kernel send buffer is full.  One round that times out is not
    # proof: a server stalled by the scheduler for 0.5 s looks the same, and after it
    # it may take in everything (its kernel buffers can hold megabytes) and pause no
    # more.  A round that cannot send a single byte can: the server stopped reading.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        outcome = stuck_round()
        assert outcome is not None, "the connection failed or never filled"
        if outcome:
            break
    else:
        pytest.fail("the server never stopped reading from a client that does not read")
    time.sleep(0.4)  # a few more stats records with the output stuck
    assert _records(srv)[-1]["workers"][0]["backpressure"] >= 1
    before = _records(srv)[-1]["workers"][0]["cpu_ns"]
    t0 = time.monotonic()
    final = srv.stop()
    took = time.monotonic() - t0
    sock.close()
    spent = (final["workers"][0]["cpu_ns"] - before) / 1e9
    w = final["workers"][0]
    assert took >= drain * 0.8, \
        f"the drain gave up before its deadline ({took:.2f} s; in {w['bytes_in']}, out {w['bytes_out']})"
    assert spent < 0.35 * drain, f"worker burned {spent:.2f} s of CPU in a {drain} s drain"


def test_forked_workers_stop_when_the_parent_dies(tmp_path):
    """A SIGKILLed parent cannot tell its workers to stop: the kernel does (PDEATHSIG)."""
    import os
    import signal

    srv = start_server(tmp_path, "--mode", "process", "--workers", "2", "--stats-interval", "0.1")
    deadline = time.monotonic() + 10
    pids = set()
    while time.monotonic() < deadline and len(pids) < 2:
        recs = [r for r in _records(srv) if r["type"] == "interval"]
        pids = {w["pid"] for w in recs[-1]["workers"] if w["pid"]} if recs else set()
        time.sleep(0.1)
    assert len(pids) == 2 and srv.proc.pid not in pids
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
        time.sleep(0.1)
    alive = [p for p in pids if os.path.exists(f"/proc/{p}")
             and open(f"/proc/{p}/stat").read().split(") ")[1][0] != "Z"]
    for p in alive:
        os.kill(p, signal.SIGKILL)  # our own workers, by PID: do not leave them behind
    assert not alive, "forked workers outlived their parent"
