"""docs/adding-a-backend.md's template, copied as documented, serves, follows the rules and
leaves no descriptor behind - and without its ``_teardown`` the suite's leak check catches
it; a readiness backend without its event bits is refused when the class is created."""

from __future__ import annotations

import re
import socket
import threading
from pathlib import Path

import pytest

from conftest import fds_left_by_a_server_run, read_http_responses, recv_exactly, recv_until_eof
from parallelnet.backends.readiness import ReadinessLoop
from parallelnet.core import server as server_mod
from parallelnet.core.backend import Limits, check_declarations

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "adding-a-backend.md"


def _template_class():
    code = re.search(r"```python\n(# mypkg/myepoll.py.*?)```", GUIDE.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(GUIDE), "exec"), namespace)
    return namespace["MyEpollBackend"]


@pytest.fixture
def template_server(monkeypatch):
    cls = _template_class()
    assert check_declarations(cls) is None
    monkeypatch.setattr(server_mod, "get_backend", lambda name: cls)
    servers = []

    def make(**kw):
        srv = server_mod.Server(server_mod.ServerConfig(backend=cls.name, workers=2, **kw))
        servers.append(srv)
        return srv, srv.start()
    yield make
    for srv in servers:
        assert srv.stop()


def test_the_template_echoes_under_backpressure_and_half_close(template_server):
    srv, address = template_server(limits=Limits(max_output=65536))
    payload = bytes(range(256)) * (64 << 10)      # 16 MiB: more than loopback buffers hold
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)   # before connect
        s.settimeout(20)
        s.connect(address)
        sender = threading.Thread(target=s.sendall, args=(payload,))
        sender.start()
        deadline = __import__("time").monotonic() + 10   # not reading: the server must pause
        while not sum(w["backpressure"] for w in srv.snapshots()) and __import__("time").monotonic() < deadline:
            __import__("time").sleep(0.05)
        assert recv_exactly(s, len(payload)) == payload
        sender.join(20)
        s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s) == b""
    assert sum(w["backpressure"] for w in srv.snapshots()) >= 1   # the write mask works


def test_the_template_enforces_the_request_deadline(template_server):
    srv, address = template_server(protocol="http", limits=Limits(header_timeout=0.4))
    with socket.create_connection(address, timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_http_responses(s, 1)[0][0] == 200
        s.sendall(b"GET / HTTP/1.1\r\n")
        assert recv_until_eof(s) == b""
    assert sum(w["extra"]["header_timeouts"] for w in srv.snapshots()) == 1


def test_a_readiness_backend_without_its_event_bits_is_refused():
    with pytest.raises(TypeError, match="EV_WRITE"):
        class NoWriteMask(_template_class()):   # noqa: F841 - creating it is the test
            EV_WRITE = None
    with pytest.raises(TypeError, match="EV_READ, EV_WRITE, EV_ERROR"):
        class Bare(ReadinessLoop):   # noqa: F841
            name = "bare"

            def _setup(self): ...
            def _register(self, fd, events, exclusive=False): ...
            def _modify(self, fd, events): ...
            def _unregister(self, fd): ...
            def _poll(self, timeout): return []


def test_a_plugin_whose_add_arguments_fails_is_reported(monkeypatch, capsys):
    from parallelnet.core import cli

    class Broken(_template_class()):
        name = "broken"

        @classmethod
        def add_arguments(cls, parser):
            raise RuntimeError("bad option table")

    monkeypatch.setattr(cli, "registry", lambda: {"broken": Broken})
    args = cli.build_parser().parse_args(["serve", "--backend", "broken"])
    assert "backend broken: add_arguments failed (RuntimeError: bad option table)" in capsys.readouterr().err
    with pytest.raises(cli.BackendError, match="add_arguments failed"):
        cli.config_from_args(args)


def _leaked(monkeypatch, cls) -> dict:
    monkeypatch.setattr(server_mod, "get_backend", lambda name: cls)
    return fds_left_by_a_server_run(server_mod.ServerConfig(backend=cls.name, workers=2))


def test_the_template_leaves_no_descriptor_open(monkeypatch):
    assert _leaked(monkeypatch, _template_class()) == {}


def test_the_template_without_teardown_is_caught_leaking(monkeypatch):
    """The conformance suite's leak check (conftest.fds_left_by_a_server_run) on the
    template with ``_teardown`` removed: each worker's epoll fd stays open."""
    template = _template_class()
    assert "_teardown" in vars(template)

    class NoTeardown(template):
        name = "myepoll-no-teardown"
        _teardown = ReadinessLoop._teardown    # the default, which releases nothing
    leaked = _leaked(monkeypatch, NoTeardown)
    assert sorted(leaked.values()) == ["anon_inode:[eventpoll]"] * 2, leaked   # one per worker
