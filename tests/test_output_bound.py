"""What one read may make a server produce: bounded on every backend (core/policy.py rule held-answers).

``GET /bytes/16777216`` is 39 bytes and asks for 16 MiB, so 64 of them in one write (2.5 KB)
ask for 1 GiB.  Every registered backend must answer them within ``--max-output`` of
pending output per connection (its peak RSS rising by a few times that at most), send
every answer it sends complete and in order, and still answer requests held behind a
half-close.  Lengths that overflow 64 bits get 413 and close everywhere (the C parser
once wrapped them around).  One server per backend serves every check here.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time

import pytest

from conftest import BACKENDS, recv_exactly, recv_until_eof, require_backend, start_server
from parallelnet.core.protocols.base import answer_all
from parallelnet.core.protocols.http import HttpProtocol

MAX_OUTPUT = 1 << 20
BIG = 16 * 1024 * 1024
BIG_GET = b"GET /bytes/16777216 HTTP/1.1\r\nHost: x\r\n\r\n"
DATE = re.compile(rb"Date: [^\r]*\r\n")
#: Peak RSS may rise by this much over the idle server: a few times --max-output (the
#: documented bound is one --max-output of pending output per connection, plus the
#: kernel's share) and a little interpreter slack.
RSS_BOUND = 4 * MAX_OUTPUT + 2 * MAX_OUTPUT

VARIANTS = [[name] for name in BACKENDS] + [["native-uring", "--uring-zc-threshold", "4096"],
                                            ["uring", "--uring-buffers", "8"]]


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: "-".join(v))
def server(request, tmp_path_factory):
    name, *extra = request.param
    require_backend(name)
    srv = start_server(tmp_path_factory.mktemp(name), "--backend", name, "--protocol", "http",
                       "--workers", "1", "--max-output", str(MAX_OUTPUT), *extra)
    srv.bursts = 0
    yield srv
    srv.stop()
    final_checks(srv)


def final_checks(srv) -> None:
    """After the module's tests on this server: the mechanism was used where a burst ran
    (under pytest-xdist a worker may have run only some of them), nothing failed to
    allocate."""
    workers = srv.final["workers"]
    if srv.bursts:
        assert sum(w["extra"]["output_holds"] for w in workers) > 0, "answers were never held"
    assert sum(w["extra"]["alloc_failures"] for w in workers) == 0


def peak_rss_kib(pid: int) -> int:
    """VmHWM of the server and its forked workers, if any."""
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    total = 0
    for p in pids:
        with open(f"/proc/{p}/status") as f:
            total += int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))
    return total


def expected(stream: bytes) -> bytes:
    return answer_all(HttpProtocol(), stream)[0]


def normalise(data: bytes) -> bytes:
    return DATE.sub(b"Date: -\r\n", data)


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP response with a Content-Length body: (header section, body)."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, f"connection closed inside a header section: {head!r}"
        head += chunk
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
    return head, recv_exactly(sock, length)


def test_a_burst_asking_for_a_gibibyte_stays_within_max_output(server):
    """64 pipelined /bytes/16777216 in one 2.5 KB write, never read: peak RSS stays within
    a few --max-output; the answers that are read are complete and byte-exact."""
    server.bursts += 1
    time.sleep(0.2)
    before = peak_rss_kib(server.proc.pid)
    with server.connect(timeout=10) as s:
        s.sendall(BIG_GET * 64)
        time.sleep(0.5)   # the server produces what it may, then waits for the reader
        stalled = peak_rss_kib(server.proc.pid)
        body = expected(b"GET /bytes/16777216 HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(2):
            head, got = read_response(s)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and got == body[-BIG:]
        after = peak_rss_kib(server.proc.pid)
    assert server.alive()
    assert (stalled - before) * 1024 <= RSS_BOUND, (before, stalled)
    assert (after - before) * 1024 <= RSS_BOUND, (before, after)


def test_large_answers_are_complete_and_in_order(server):
    stream = (b"GET /bytes/1048576 HTTP/1.1\r\nHost: x\r\n\r\n" * 5
              + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
              + b"HEAD /bytes/5000000 HTTP/1.1\r\nHost: x\r\n\r\n"
              + b"GET /bytes/100000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
              + b"GET /never-answered HTTP/1.1\r\nHost: x\r\n\r\n")
    with server.connect(timeout=10) as s:
        s.sendall(stream)
        got = recv_until_eof(s)
    assert normalise(got) == normalise(expected(stream))


def test_answers_held_behind_a_half_close_are_all_sent(server):
    stream = b"GET /bytes/3000000 HTTP/1.1\r\nHost: x\r\n\r\n" * 4 + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    with server.connect(timeout=10) as s:
        s.sendall(stream)
        s.shutdown(socket.SHUT_WR)
        got = recv_until_eof(s)
    assert normalise(got) == normalise(expected(stream))


@pytest.mark.parametrize("length, then", [
    (b"18446744073709551616", b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n"),             # 2^64
    (b"1844674407370955161605", b"12345GET /x HTTP/1.1\r\nHost: x\r\n\r\n"),       # 2^64 * 100 + 5
    (b"99999999999999999999999999999999", b""),
])
def test_content_length_past_64_bits_is_413_and_close(server, length, then):
    with server.connect(timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n" + then)
        got = recv_until_eof(s)
    assert got.startswith(b"HTTP/1.1 413 Content Too Large\r\n"), got[:200]
    assert got.count(b"HTTP/1.1 ") == 1 and b"Connection: close\r\n" in got
