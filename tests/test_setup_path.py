"""What a new stream waits for between CONNECT and its first byte: nothing but
the network.

The OPEN, the server's answer and the first bytes each way travel in the
drain of the input that caused them, so on a ``task.Clock`` they all arrive
without the clock moving: no timer (ACK delay, heartbeat) sits on the path.
The server dials a checked IP literal straight away; the reactor's name
resolver (``getaddrinfo`` in a thread) is asked only about names.
"""

from __future__ import annotations

import pytest
from test_logs import _Resolver  # every name resolves to one address; questions recorded
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel

from stripeproxy.core import control, wire
from stripeproxy.core.policy import TargetPolicy, parse_rule
from stripeproxy.net.access import stream_debug, stream_levels
from stripeproxy.net.driver import SessionDriver
from stripeproxy.net.server import ServerSessionDriver, ServerSettings
from stripeproxy.testing import C2S, S2C, SERVER, SessionPair

# ---------------------------------------------------------------- the core


@pytest.mark.parametrize("k", [1, 6])
def test_the_open_result_and_the_first_bytes_arrive_with_no_clock_advance(k: int) -> None:
    pair = SessionPair(k=k)
    start = pair.clock.seconds()
    stream_id = pair.open_stream("127.0.0.1", 7)
    assert pair.client_owner.open_results == []
    # One one-way trip: the OPEN reaches the server, which accepts at once.
    pair.deliver_round([C2S])
    assert pair.server_owner.open_requests == [(stream_id, "127.0.0.1", 7)]
    # The answer travels back in the same drain: one more trip, no timer.
    pair.deliver_round([S2C])
    assert pair.client_owner.open_results == [(stream_id, 0, "127.0.0.1", 4242)]
    # The first byte each way (the echo of a one-byte request) is as prompt.
    pair.write(SERVER, stream_id, b"hello")
    pair.deliver_round([S2C])
    assert bytes(pair.client_owner.received[stream_id]) == b"hello"
    assert pair.clock.seconds() == start


def test_a_refused_open_is_answered_with_no_clock_advance() -> None:
    pair = SessionPair(k=6, auto_accept=False)
    start = pair.clock.seconds()
    stream_id = pair.open_stream("127.0.0.1", 7)
    pair.deliver_round([C2S])
    pair.refuse(stream_id, 0x05)
    pair.deliver_round([S2C])
    assert pair.client_owner.open_results == [(stream_id, 0x05, "", 0)]
    assert pair.clock.seconds() == start


# ------------------------------------------------------------ the server's dial


class _Subflow:
    def __init__(self) -> None:
        self.sid = 0
        self.transport = StringTransport()  # type: ignore[no-untyped-call]
        self.peer = "192.0.2.1:4433"

    def abort(self) -> None:
        """Not needed here."""


def _server(resolver: _Resolver) -> tuple[ServerSessionDriver, MemoryReactorClock]:
    reactor = MemoryReactorClock()  # type: ignore[no-untyped-call]
    reactor.nameResolver = resolver
    policy = TargetPolicy(allow=[parse_rule("127.0.0.0/8"), parse_rule("::1/128")])
    settings = ServerSettings(reactor=reactor, keys={}, policy=policy)
    closed: list[SessionDriver] = []
    driver = ServerSessionDriver(settings, b"\x02" * 16, closed.append)
    driver.attach(_Subflow())
    return driver, reactor


def _open(driver: ServerSessionDriver, stream_id: int, host: str, port: int) -> None:
    """The client's first control message: OPEN at offset 0 of stream 0."""
    driver.frames(1, [wire.Data(0, 0, control.encode(control.Open(stream_id, host, port)))])


@pytest.mark.parametrize("literal", ["127.0.0.1", "::1"])
def test_a_literal_target_is_dialled_without_asking_the_resolver(literal: str) -> None:
    resolver = _Resolver("127.0.0.1")
    driver, reactor = _server(resolver)
    _open(driver, 1, literal, 8080)
    assert resolver.asked == []
    ((host, port, _factory, timeout, _bind),) = reactor.tcpClients
    assert (host, port, timeout) == (literal, 8080, driver.settings.connect_timeout)


def test_a_name_is_resolved_once_and_its_checked_address_dialled_as_a_literal() -> None:
    resolver = _Resolver("127.0.0.1")
    driver, reactor = _server(resolver)
    _open(driver, 1, "echo.example", 8080)
    # HostnameEndpoint asked the resolver again about the literal it was given.
    assert resolver.asked == ["echo.example"]
    ((host, port, *_),) = reactor.tcpClients
    assert (host, port) == ("127.0.0.1", 8080)


def test_per_stream_debug_lines_are_built_only_when_they_go_somewhere() -> None:
    assert not stream_debug()  # the default: the main log gets info and up
    stream_levels.setLogLevelForNamespace("stripeproxy.streams", LogLevel.debug)
    try:
        assert stream_debug()
    finally:
        stream_levels.clearLogLevels()
    stream_levels.setLogLevelForNamespace("stripeproxy", LogLevel.debug)  # a parent
    try:
        assert stream_debug()
    finally:
        stream_levels.clearLogLevels()
    assert not stream_debug()
