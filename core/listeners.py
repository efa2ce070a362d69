"""Accept strategies: which listening socket(s) each worker watches, for one or more addresses.

A server listens on one or more addresses (``--listen``, in order: the listener id of
an address is its position).  Every strategy below applies to each address alike, and
every worker watches *all* of them in its one loop (the seed: "these file descriptors
are put into all thread local event loops"):

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
* ``dispatch``: one listening socket per address, all owned by an acceptor thread,
  which hands each connection (with its listener id) to a worker of its choosing
  (core/dispatch.py); workers watch only their hand-off channel.

With several addresses: shared/exclusive/exclusive-rotate put one socket per address
in every loop; reuseport/reuseport-cpu bind one socket per worker per address (each
address is a reuseport group of its own, so reuseport-cpu attaches one cBPF program
per group).  ``IPV6_V6ONLY`` is set on IPv6 sockets, so an IPv6 address never takes
the IPv4 side of its port as well.

Socket buffer sizes (``--sndbuf``/``--rcvbuf``) are set on the listening sockets: a
connection ``accept(2)`` returns is a clone of its listener and inherits ``sk_sndbuf``,
``sk_rcvbuf`` and the lock that an explicit ``SO_SNDBUF``/``SO_RCVBUF`` sets, so every
backend and every strategy (the kernel's accept in io_uring, the dispatcher's) gets the
same fixed buffers with no per-connection syscall.  The kernel doubles the value asked
for (bookkeeping overhead) and caps it at ``net.core.wmem_max``/``rmem_max``; a fixed
buffer turns off TCP's autotuning for that direction (tcp(7)).  The receive size is set
before ``listen`` so the window scale of the handshake matches it.

Backends see the socket *layout* only (``layout_of``): reuseport-cpu is reuseport to them.

Sockets are bound here, before any worker starts (and before fork, in process
mode, so that forked workers share the very same kernel sockets).
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import socket
import struct
from dataclasses import dataclass

from parallelnet.core.addresses import format_address

STRATEGIES = ("shared", "exclusive", "exclusive-rotate", "reuseport", "reuseport-cpu", "dispatch")
DEFAULT_BACKLOG = 4096  # capped by net.core.somaxconn
_PER_WORKER = ("reuseport", "reuseport-cpu")
MAX_ADDRESSES = 256     # listener ids travel as one byte with each hand-off (core/handoff.py)

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
    """The bound sockets of one server.  Address *i* (the i-th ``--listen``) has the
    listener id *i*; ``groups[i]`` are its sockets: one (shared, exclusive, dispatch), or
    one per worker, socket *w* being worker *w*'s (reuseport, reuseport-cpu)."""

    strategy: str
    groups: list[list[socket.socket]]
    addresses: list[tuple[str, int]]      # (host, port actually bound) per listener id

    @property
    def host(self) -> str:
        return self.addresses[0][0]

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    @property
    def sockets(self) -> list[socket.socket]:
        return [s for group in self.groups for s in group]

    def for_worker(self, index: int) -> tuple[list[socket.socket], list[int]]:
        """The sockets worker ``index`` watches, and the listener id of each."""
        if self.strategy == "dispatch":
            return [], []  # the acceptor owns them; connections come through the channel
        if self.strategy in _PER_WORKER:
            return [g[index] for g in self.groups], list(range(len(self.groups)))
        return [g[0] for g in self.groups], list(range(len(self.groups)))

    def for_acceptor(self) -> list[socket.socket]:
        """``--accept dispatch``: the listening socket of each listener id, in order."""
        return [g[0] for g in self.groups]

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


@dataclass(frozen=True)
class SocketBuffers:
    """Fixed kernel buffer sizes for every accepted connection (None: the kernel's autotuning)."""

    sndbuf: int | None = None
    rcvbuf: int | None = None

    def __post_init__(self) -> None:
        for name in ("sndbuf", "rcvbuf"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name} must be a positive number of bytes, got {value}")

    def apply(self, sock: socket.socket) -> None:
        if self.sndbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        if self.rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)


class ListenError(OSError):
    """A listening socket that could not be set up; its message names the address
    (``cannot listen on 127.0.0.1:8080: Address already in use``)."""

    def __str__(self) -> str:
        return str(self.strerror)


def _listen_error(host: str, port: int, exc: OSError) -> ListenError:
    why = exc.strerror or str(exc)
    if isinstance(exc, socket.gaierror):
        why = f"cannot resolve {host!r}: {why}"
    return ListenError(exc.errno, f"cannot listen on {format_address(host, port)}: {why}")


def _bind_one(host: str, port: int, backlog: int, reuseport: bool,
              buffers: SocketBuffers = SocketBuffers()) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # An IPv6 wildcard must not also take the IPv4 port (net.ipv6.bindv6only is 0
            # by default): [::]:P and 0.0.0.0:P are two listeners, each its own address.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        buffers.apply(sock)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise _listen_error(host, port, exc) from None
    except BaseException:
        sock.close()
        raise
    return sock


def _refuse_a_held_port(host: str, port: int) -> None:
    """Before a reuseport group binds a fixed port: is someone listening there already?

    An ``SO_REUSEPORT`` socket silently *joins* the group of another listener of the same
    user on the same address, so a second ``serve --accept reuseport`` on a busy port
    would start and take half of the first one's connections.  A probe without
    ``SO_REUSEPORT`` (but with ``SO_REUSEADDR``, so TIME_WAIT leftovers do not count)
    fails with ``EADDRINUSE`` exactly when a listening socket holds the address; the
    probe is closed at once, before the group binds.  ``--reuseport-join`` skips this."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(exc.errno, (
                f"cannot listen on {format_address(host, port)}: address already in use by "
                "another listener (a reuseport socket would silently join its group and "
                "split its connections; --reuseport-join if that is intended)")) from None
        raise _listen_error(host, port, exc) from None
    finally:
        probe.close()


def check_addresses(addresses: list[tuple[str, int]]) -> None:
    """Refuse an address list no strategy can serve as meant (ValueError)."""
    if not addresses:
        raise ValueError("no address to listen on")
    if len(addresses) > MAX_ADDRESSES:
        raise ValueError(f"{len(addresses)} listening addresses: at most {MAX_ADDRESSES} "
                         "(the listener id travels as one byte with each hand-off)")
    seen = set()
    for host, port in addresses:
        # With SO_REUSEPORT a second socket on the same address would silently join the
        # first one's group instead of failing: refuse the duplicate by name.
        if port and (host, port) in seen:
            raise ValueError(f"address {host}:{port} is listed twice")
        seen.add((host, port))


def _bind_group(strategy: str, host: str, port: int, workers: int, backlog: int,
                cpus: list[int] | None, buffers: SocketBuffers,
                join: bool = False) -> list[socket.socket]:
    reuseport = strategy in _PER_WORKER
    if reuseport and port and not join:
        _refuse_a_held_port(host, port)
    first = _bind_one(host, port, backlog, reuseport, buffers)
    socks = [first]
    port = first.getsockname()[1]  # port 0: every later socket joins the port the kernel chose
    try:
        if reuseport:
            for _ in range(workers - 1):
                socks.append(_bind_one(host, port, backlog, True, buffers))
        if strategy == "reuseport-cpu":
            # The group's socket order is the order they were bound: socket i is worker i.
            # One program per group: each address is a reuseport group of its own.
            attach_cpu_steering(first, cpus)
    except OSError as exc:
        for s in socks:
            s.close()
        if isinstance(exc, ListenError):
            raise
        raise _listen_error(host, port, exc) from None
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def open_listeners(strategy: str, addresses: list[tuple[str, int]], workers: int,
                   backlog: int = DEFAULT_BACKLOG, cpus: list[int] | None = None,
                   buffers: SocketBuffers = SocketBuffers(),
                   join: bool = False) -> ListenerSet:
    """Bind the sockets of one strategy for every address, in order (listener id =
    position).  ``cpus[i]`` is worker i's CPU (reuseport-cpu); ``buffers`` are set on
    every listening socket, so every accepted connection inherits them.  A reuseport
    group on a fixed port refuses an address another listener holds (``ListenError``)
    unless ``join`` (``--reuseport-join``): see ``_refuse_a_held_port``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown accept strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    check_addresses(addresses)
    if strategy == "reuseport-cpu" and (cpus is None or len(cpus) != workers or None in cpus):
        raise ValueError("--accept reuseport-cpu needs every worker pinned to a CPU")
    groups: list[list[socket.socket]] = []
    bound: list[tuple[str, int]] = []
    try:
        for host, port in addresses:
            group = _bind_group(strategy, host, port, workers, backlog, cpus, buffers, join)
            groups.append(group)
            bound.append((host, group[0].getsockname()[1]))
    except BaseException:
        for group in groups:
            for s in group:
                s.close()
        raise
    return ListenerSet(strategy, groups, bound)
