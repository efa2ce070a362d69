"""Sans-I/O protocols and their registry: a name on the command line -> a factory.

``make_factory("http", max_header_bytes=4096)`` returns a zero-argument callable that
builds one protocol object per connection.  Options a protocol does not take, and
options given as ``None`` (an unset CLI flag), are ignored, so the CLI can pass every
protocol option it knows to every protocol.
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass, field
from typing import Callable

from .base import Protocol
from .echo import EchoProtocol
from .http import HttpProtocol

__all__ = ["PROTOCOLS", "Protocol", "EchoProtocol", "HttpProtocol", "ProtocolSpec",
           "make_factory", "make_spec", "spec_of"]

PROTOCOLS: dict[str, type[Protocol]] = {"echo": EchoProtocol, "http": HttpProtocol}

#: Test-only protocols (a handler that raises, for the fault suite) exist only when
#: PARALLELNET_TEST_PROTOCOLS=1 is set in the server's environment.
if os.environ.get("PARALLELNET_TEST_PROTOCOLS") == "1":
    from .testing import TEST_PROTOCOLS

    PROTOCOLS.update(TEST_PROTOCOLS)


@dataclass(frozen=True)
class ProtocolSpec:
    """What one listener serves: the protocol's name, the options it takes (those
    given that it accepts), and a zero-argument factory of per-connection objects."""

    name: str
    options: dict = field(default_factory=dict)
    factory: Callable[[], Protocol] | None = None


def make_spec(name: str, **options) -> ProtocolSpec:
    """``make_factory`` with its name and the options it kept."""
    factory = make_factory(name, **options)
    return ProtocolSpec(name, dict(factory.keywords), factory)


def spec_of(factory: Callable[[], Protocol]) -> ProtocolSpec:
    """The spec of a bare factory (one ``make_factory`` built, or any callable)."""
    cls = getattr(factory, "func", factory)
    name = next((n for n, c in PROTOCOLS.items() if c is cls), getattr(cls, "__name__", "?"))
    return ProtocolSpec(name, dict(getattr(factory, "keywords", None) or {}), factory)


def make_factory(name: str, **options) -> Callable[[], Protocol]:
    """A per-connection factory for protocol ``name``, configured with ``options``.

    Raises ValueError for an unknown name (listing the known ones) or for an option
    value the protocol rejects (checked now, by building one instance).
    """
    try:
        cls = PROTOCOLS[name]
    except KeyError:
        known = ", ".join(sorted(PROTOCOLS))
        raise ValueError(f"unknown protocol {name!r}; known: {known}") from None
    accepted = inspect.signature(cls).parameters
    kwargs = {k: v for k, v in options.items() if v is not None and k in accepted}
    cls(**kwargs)  # fail early on a bad value
    return functools.partial(cls, **kwargs)
