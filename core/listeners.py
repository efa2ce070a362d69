"""Accept strategies: which listening socket(s) each worker watches.

* ``shared`` (the seed): one non-blocking listening socket, in every worker's loop.
  One kernel accept queue; every worker whose wait includes it may be woken.
* ``exclusive``: the same socket, registered with EPOLLEXCLUSIVE by backends that
  support it, so the kernel wakes one waiter (usually) instead of all.
* ``reuseport``: one socket per worker, all bound to the same address with
  SO_REUSEPORT (Linux >= 3.9).  The kernel hashes each new connection's 4-tuple to
  one of the sockets — one accept queue per worker, no race and no herd, but no
  notion of how busy the chosen worker is.
* ``reuseport-cpu``: the same sockets plus a classic BPF program attached to the group
  with ``SO_ATTACH_REUSEPORT_CBPF`` (Linux >= 4.5) that returns the index of the socket
  whose worker is pinned to the CPU the SYN is being processed on
  (``SKF_AD_OFF + SKF_AD_CPU``).  An index the group does not have makes the kernel
  fall back to the hash.  On loopback the SYN is processed in the connecting thread's
  context, so "the arrival CPU" is the *client's* CPU: a client pinned to one CPU sends
  every connection to the worker on that CPU.  With a NIC it is the CPU that took the
  interrupt/RPS decision, which is what the steering is for.

* ``exclusive-rotate``: ``exclusive``, with each worker re-adding the listener to its
  epoll after every 16 accepts (nginx's remedy): EPOLLEXCLUSIVE wakes the waiter at the
  head of the wait queue, and re-adding moves a busy worker to the tail.
* ``dispatch``: one listening socket owned by an acceptor thread, which hands each
  connection to a worker of its choosing (core/dispatch.py); workers watch only their
  hand-off channel.

Backends see the socket *layout* only (``layout_of``): reuseport-cpu is reuseport to them.

Sockets are bound here, before any worker starts (and before fork, in process
mode, so that forked workers share the very same kernel sockets).
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from dataclasses import dataclass

STRATEGIES = ("shared", "exclusive", "exclusive-rotate", "reuseport", "reuseport-cpu", "dispatch")
DEFAULT_BACKLOG = 4096  # capped by net.core.somaxconn
_PER_WORKER = ("reuseport", "reuseport-cpu")

SO_ATTACH_REUSEPORT_CBPF = 51  # <asm-generic/socket.h>; Python's socket module lacks it
# Classic BPF opcodes (<linux/filter.h>).
_BPF_LD_W_ABS = 0x00 | 0x00 | 0x20   # BPF_LD | BPF_W | BPF_ABS
_BPF_JEQ_K = 0x05 | 0x10 | 0x00      # BPF_JMP | BPF_JEQ | BPF_K
_BPF_RET_K = 0x06 | 0x00             # BPF_RET | BPF_K
_SKF_AD_CPU = -0x1000 + 36           # SKF_AD_OFF + SKF_AD_CPU: "the current CPU"
_NO_SOCKET = 0xFFFFFFFF              # out of range: the kernel falls back to the hash


def layout_of(strategy: str) -> str:
    """The socket layout a backend sees for an accept strategy."""
    return "reuseport" if strategy in _PER_WORKER else strategy


def cpu_steering_program(cpus: list[int]) -> bytes:
    """cBPF: load the current CPU; return the index of the first worker pinned to it."""
    insns = [(_BPF_LD_W_ABS, 0, 0, _SKF_AD_CPU & 0xFFFFFFFF)]
    seen: set[int] = set()
    for index, cpu in enumerate(cpus):
        if cpu in seen:
            continue  # several workers on one CPU: the first of them gets that CPU's connections
        seen.add(cpu)
        insns.append((_BPF_JEQ_K, 0, 1, cpu))      # A == cpu ? next : skip the return
        insns.append((_BPF_RET_K, 0, 0, index))
    insns.append((_BPF_RET_K, 0, 0, _NO_SOCKET))
    return b"".join(struct.pack("HBBI", *i) for i in insns)


def attach_cpu_steering(sock: socket.socket, cpus: list[int]) -> None:
    code = cpu_steering_program(cpus)
    buf = ctypes.create_string_buffer(code, len(code))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = struct.pack("HP", len(code) // 8, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


@dataclass
class ListenerSet:
    strategy: str
    sockets: list[socket.socket]
    host: str
    port: int

    def for_worker(self, index: int) -> list[socket.socket]:
        if self.strategy == "dispatch":
            return []  # the acceptor owns it; the worker gets connections through its channel
        if self.strategy in _PER_WORKER:
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
                   backlog: int = DEFAULT_BACKLOG, cpus: list[int] | None = None) -> ListenerSet:
    """Bind the sockets of one strategy.  ``cpus[i]`` is worker i's CPU (reuseport-cpu)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown accept strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    reuseport = strategy in _PER_WORKER
    first = _bind_one(host, port, backlog, reuseport)
    socks = [first]
    port = first.getsockname()[1]  # port 0: every later socket joins the port the kernel chose
    try:
        if reuseport:
            for _ in range(workers - 1):
                socks.append(_bind_one(host, port, backlog, True))
        if strategy == "reuseport-cpu":
            if cpus is None or len(cpus) != workers or None in cpus:
                raise ValueError("--accept reuseport-cpu needs every worker pinned to a CPU")
            # The group's socket order is the order they were bound: socket i is worker i.
            attach_cpu_steering(first, cpus)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return ListenerSet(strategy, socks, host, port)
