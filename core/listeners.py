"""Accept strategies: which listening socket(s) each worker watches.

* ``shared`` (the seed): one non-blocking listening socket, in every worker's loop.
  One kernel accept queue; every worker whose wait includes it may be woken.
* ``exclusive``: the same socket, registered with EPOLLEXCLUSIVE by backends that
  support it, so the kernel wakes one waiter (usually) instead of all.
* ``reuseport``: one socket per worker, all bound to the same address with
  SO_REUSEPORT (Linux >= 3.9).  The kernel hashes each new connection's 4-tuple to
  one of the sockets — one accept queue per worker, no race and no herd, but no
  notion of how busy the chosen worker is.

Sockets are bound here, before any worker starts (and before fork, in process
mode, so that forked workers share the very same kernel sockets).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

STRATEGIES = ("shared", "exclusive", "reuseport")
DEFAULT_BACKLOG = 4096  # capped by net.core.somaxconn


@dataclass
class ListenerSet:
    strategy: str
    sockets: list[socket.socket]
    host: str
    port: int

    def for_worker(self, index: int) -> list[socket.socket]:
        if self.strategy == "reuseport":
            return [self.sockets[index]]
        return list(self.sockets)

    def close(self) -> None:
        for s in self.sockets:
            s.close()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind_one(host: str, port: int, backlog: int, reuseport: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def open_listeners(strategy: str, host: str, port: int, workers: int,
                   backlog: int = DEFAULT_BACKLOG) -> ListenerSet:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown accept strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    reuseport = strategy == "reuseport"
    first = _bind_one(host, port, backlog, reuseport)
    socks = [first]
    port = first.getsockname()[1]  # port 0: every later socket joins the port the kernel chose
    try:
        if reuseport:
            for _ in range(workers - 1):
                socks.append(_bind_one(host, port, backlog, True))
    except BaseException:
        for s in socks:
            s.close()
        raise
    return ListenerSet(strategy, socks, host, port)
