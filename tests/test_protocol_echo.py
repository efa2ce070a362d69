"""EchoProtocol (zero-copy echo) and the protocol registry; no sockets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parallelnet.core.protocols import PROTOCOLS, make_factory
from parallelnet.core.protocols.base import Protocol
from parallelnet.core.protocols.echo import EchoProtocol
from parallelnet.core.protocols.http import HttpProtocol


# ---------------------------------------------------------------- echo


@pytest.mark.parametrize(
    "data",
    [b"hello", bytearray(b"hello"), memoryview(b"hello"),
     memoryview(bytearray(b"x" * 4096))[10:20]],
    ids=["bytes", "bytearray", "memoryview", "memoryview-slice"],
)
@pytest.mark.parametrize("message_size", [0, 3])
def test_echo_returns_the_identical_object(data, message_size):
    out, _ = EchoProtocol(message_size).feed(data)
    assert out is data


def test_echo_counts_one_per_non_empty_chunk_by_default():
    p = EchoProtocol()
    assert p.feed(b"a") == (b"a", 1)
    assert p.feed(b"x" * 100_000)[1] == 1
    out, n = p.feed(b"")
    assert (out, n) == (b"", 0)
    assert p.feed(memoryview(b"abc"))[1] == 1


def test_echo_counts_fixed_size_messages_across_and_within_chunks():
    p = EchoProtocol(message_size=4)
    assert p.feed(b"ab")[1] == 0  # 2 of 4
    assert p.feed(b"cd")[1] == 1  # message 1 done
    assert p.feed(b"abcdabcdab")[1] == 2  # messages 2, 3 and half of 4
    assert p.feed(b"c")[1] == 0
    assert p.feed(b"dabcd")[1] == 2  # message 4 done, message 5 whole
    assert p.feed(b"")[1] == 0
    assert p.feed(b"a" * 4000)[1] == 1000


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(min_value=1, max_value=50),
    chunks=st.lists(st.binary(max_size=120), max_size=20),
)
def test_echo_message_count_matches_total_bytes(size, chunks):
    p = EchoProtocol(size)
    total = 0
    for c in chunks:
        out, n = p.feed(c)
        assert out is c
        total += n
    assert total == sum(map(len, chunks)) // size


def test_echo_state_and_eof():
    p = EchoProtocol()
    assert isinstance(p, Protocol)
    assert p.closing is False
    assert p.eof() == b""
    assert p.closing is True
    assert not hasattr(p, "__dict__")  # __slots__ all the way down


def test_echo_rejects_negative_size():
    with pytest.raises(ValueError):
        EchoProtocol(-1)


# ---------------------------------------------------------------- registry


def test_registry_names():
    assert PROTOCOLS == {"echo": EchoProtocol, "http": HttpProtocol}


def test_make_factory_builds_fresh_configured_instances():
    f = make_factory("echo", message_size=8)
    a, b = f(), f()
    assert isinstance(a, EchoProtocol) and a is not b
    assert a.message_size == 8
    h = make_factory("http", max_header_bytes=1024, max_body_bytes=10)()
    assert isinstance(h, HttpProtocol)
    assert (h.max_header_bytes, h.max_body_bytes) == (1024, 10)


def test_make_factory_passes_only_accepted_options_and_ignores_none():
    e = make_factory("echo", message_size=5, max_header_bytes=1024, max_body_bytes=None)()
    assert e.message_size == 5
    h = make_factory("http", message_size=5, max_header_bytes=None, max_body_bytes=7)()
    assert (h.max_header_bytes, h.max_body_bytes) == (8192, 7)
    assert make_factory("echo", message_size=None)().message_size == 0


def test_make_factory_unknown_name_lists_known_ones():
    with pytest.raises(ValueError) as info:
        make_factory("gopher")
    msg = str(info.value)
    assert "gopher" in msg and "echo" in msg and "http" in msg


def test_make_factory_rejects_bad_values_early():
    with pytest.raises(ValueError):
        make_factory("echo", message_size=-3)
    with pytest.raises(ValueError):
        make_factory("http", max_header_bytes=0)
