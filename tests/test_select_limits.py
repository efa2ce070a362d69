"""select(2) cannot watch fds >= FD_SETSIZE: the backend must refuse such a
connection cleanly (close it, count it) and keep serving, not crash."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

from conftest import recv_exactly

SCRIPT = textwrap.dedent("""
    import json, os, resource, sys
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    from parallelnet.core.server import Server, ServerConfig
    srv = Server(ServerConfig(backend="select", workers=1, port=0, protocol="echo"))
    host, port = srv.start()
    # Push the next fd numbers past FD_SETSIZE: every accepted socket will be >= 1024.
    junk = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    print(port, flush=True)
    for line in sys.stdin:
        if line.strip() == "free":
            for fd in junk:
                os.close(fd)
            junk = []
            print("freed", flush=True)
        elif line.strip() == "stop":
            break
    ok = srv.stop()
    print(json.dumps({"clean": ok, "workers": srv.snapshots()}), flush=True)
""")


def test_select_refuses_fd_beyond_fd_setsize_and_keeps_serving():
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        # Refused: the connection is accepted (fd >= 1024) and closed at once.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"x")
            try:
                assert s.recv(10) == b""
            except ConnectionResetError:
                pass  # closed with our byte unread: an RST is just as clear
        # Once fds are free again, the same worker serves normally.
        proc.stdin.write("free\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "freed"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"hello")
            assert recv_exactly(s, 5) == b"hello"
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        final = json.loads(proc.stdout.readline())
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=10)
    (worker,) = final["workers"]
    assert final["clean"]
    assert worker["crashed"] == ""
    assert worker["refused"] == 1
    assert worker["accepted"] == 2
    assert worker["requests"] == 1
    assert "FD_SETSIZE" in err  # logged once, with the reason
