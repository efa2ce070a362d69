"""Listening addresses as text: ``--listen ADDR:PORT[,protocol=NAME]`` and the "listening on" line.

One spelling for both directions, so what ``serve`` prints is what it parses and what
a client (core/launch.py, the experiments) reads back:

* IPv4 or a name: ``127.0.0.1:8080``, ``localhost:0``;
* IPv6 in brackets (the colon of the port would otherwise be ambiguous): ``[::1]:8080``;
* port 0 asks the kernel for a free port (``bind(2)`` with port 0 picks one from the
  ephemeral range; ``getsockname(2)`` tells which).

``serve`` prints ``listening on A0 A1 ...``: every bound address, in ``--listen`` order,
separated by spaces.  With one address the line is what it always was
(``listening on 127.0.0.1:PORT``), so a reader of its last token still works there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LISTENING_PREFIX = "listening on "

_ADDRESS = re.compile(r"\[(?P<v6>[0-9A-Fa-f:.]+(?:%\w+)?)\]:(?P<p6>\d+)|(?P<host>[^:\[\],\s]+):(?P<port>\d+)")


@dataclass(frozen=True)
class ListenSpec:
    """One address to listen on, and the protocol it serves (None: ``--protocol``'s)."""

    host: str
    port: int
    protocol: str | None = None


def format_address(host: str, port: int) -> str:
    """``host:port``, IPv6 in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_host(text: str) -> str:
    """A ``--host`` value: a name, an IPv4 address or an IPv6 address, with or without the
    brackets of the address syntax (``[::1]`` is ``::1``); ValueError says what is wrong."""
    host = text.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(c in host for c in "[] ,/") or (":" not in host and "%" in host):
        raise ValueError(f"--host must be a name or an IP address (IPv6 with or without "
                         f"brackets), got {text!r}")
    return host


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); ValueError says what is wrong."""
    m = _ADDRESS.fullmatch(text.strip())
    if not m:
        raise ValueError(f"address must be HOST:PORT or [IPv6]:PORT, got {text!r}")
    host = m.group("v6") or m.group("host")
    port = int(m.group("p6") or m.group("port"))
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port} in {text!r}")
    return host, port


def parse_listen(text: str) -> ListenSpec:
    """``ADDR:PORT[,protocol=NAME]`` (the value of one ``--listen``)."""
    address, *options = text.split(",")
    host, port = parse_address(address)
    protocol = None
    for option in options:
        key, eq, value = option.partition("=")
        if key.strip() != "protocol" or not eq or not value.strip():
            raise ValueError(f"--listen {text!r}: the only option is protocol=NAME, got {option!r}")
        if protocol is not None:
            raise ValueError(f"--listen {text!r}: protocol given twice")
        protocol = value.strip()
    return ListenSpec(host, port, protocol)


def format_listening(addresses: list[tuple[str, int]]) -> str:
    """The line ``serve`` prints once every worker is armed."""
    return LISTENING_PREFIX + " ".join(format_address(h, p) for h, p in addresses)


def parse_listening(line: str) -> list[tuple[str, int]] | None:
    """The addresses of a "listening on" line (None for any other line)."""
    if not line.startswith(LISTENING_PREFIX):
        return None
    return [parse_address(token) for token in line[len(LISTENING_PREFIX):].split()]
