"""SOCKS clients get fast, correct answers (issue 10 item 5).

A CONNECT with no server up is answered within ``--connect-wait`` (at once
when every dial is refused); the first CONNECT after a server restart
succeeds; during a server's drain a new CONNECT goes to a fresh session if
one can be had and is refused at once otherwise; the client drains on
SIGTERM; the per-session stream limit is logged where it is hit.
"""

from __future__ import annotations

import socket

import pytest_twisted
from helpers import (
    Cleanup,
    CountingFactory,
    EchoFactory,
    Keys,
    free_port,
    in_thread,
    read_all,
    sleep,
    socks_connect,
    socks_echo,
    socks_handshake_reply,
    start_client,
    start_pair,
    start_server,
    start_target,
    wait_for,
)
from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock

from stripeproxy.core import socks5
from stripeproxy.core.session import MiB, SessionConfig
from stripeproxy.net.client import ClientSettings, Overlay
from stripeproxy.testing import SessionPair

WAIT_REASON = "(--connect-wait)"  # in the refusal line when the wait ran out


def refusals(messages: list[str]) -> list[str]:
    return [m for m in messages if "refused:" in m and "CONNECT" in m]


# ------------------------------------------------------------ pure parts


class Waiter:
    """An OpenWaiter that records what the overlay told it."""

    def __init__(self) -> None:
        self.told: list[str] = []

    def subflow_up(self) -> None:
        self.told.append("up")

    def no_server(self, reason: str) -> None:
        self.told.append(reason)

    def session_ended(self, reason: str) -> None:
        self.told.append(f"ended: {reason}")


def test_waiting_connects_are_answered_when_the_last_dial_under_way_fails() -> None:
    overlay = Overlay(ClientSettings(reactor=Clock(), psk=b"k" * 32))
    overlay.dial_started()
    overlay.dial_started()
    waiter = Waiter()
    driver = overlay.session_for(waiter)
    assert driver is overlay.driver  # no verdict yet: it waits for a subflow
    overlay.dial_failed("Connection refused")
    assert waiter.told == []  # one dial is still under way
    overlay.dial_failed("Connection\nrefused")
    assert waiter.told == ["no server reachable: Connection\\x0arefused"]  # escaped
    assert overlay.waiting == {}
    # The next CONNECT is answered at once, until a dial connects again.
    assert overlay.session_for(Waiter()) == "no server reachable: Connection\\x0arefused"
    overlay.dial_started()
    overlay.dial_connected()
    other = Waiter()
    assert overlay.session_for(other) is overlay.driver
    overlay.stop_accepting()
    assert other.told == ["the client is stopping"]
    assert overlay.session_for(Waiter()) == "the client is stopping"


def test_the_client_logs_connects_beyond_its_stream_limit_once_per_interval(
    log_messages: list[str],
) -> None:
    clock = Clock()
    settings = ClientSettings(
        reactor=clock, psk=b"k" * 32, config=SessionConfig(max_streams=2, grace_period=1000)
    )
    overlay = Overlay(settings)
    driver = overlay.current()
    driver.open_stream("example.com", 80)
    overlay.session_for(Waiter())
    driver.open_stream("example.com", 80)
    for _ in range(3):
        overlay.session_for(Waiter())
    clock.advance(61)
    overlay.session_for(Waiter())
    lines = [m for m in log_messages if "streams open, the limit is 2" in m]
    assert len(lines) == 2
    assert "has 2 streams open" in lines[0] and "(0 more since the last line)" in lines[0]
    assert "(2 more since the last line)" in lines[1]
    driver.close("test over")
    assert clock.getDelayedCalls() == []


def test_the_server_session_reports_an_open_refused_for_its_stream_limit() -> None:
    pair = SessionPair(k=2, config=SessionConfig(max_streams=2, grace_period=1000))
    for _ in range(3):
        pair.open_stream()
    pair.settle()
    refused = [e for e in pair.server_owner.events if e[0] == "stream_open_refused"]
    assert refused == [("stream_open_refused", 3, 2)]
    pair.shutdown()


# ------------------------------------------------------- 1. no server


@pytest_twisted.ensureDeferred
async def test_connect_with_every_dial_refused_is_answered_at_once(
    cleanup: Cleanup, keys: Keys, log_messages: list[str]
) -> None:
    port = await free_port()
    extra = ["--connect-wait", "30", "--open-timeout", "30"]
    client = await start_client(cleanup, keys, port, False, k=2, extra=extra)
    reply = await in_thread(socks_handshake_reply, client.socks_port, "example.com", 80)
    assert reply == socks5.REPLY_GENERAL_FAILURE
    (line,) = refusals(log_messages)
    assert "example.com:80 refused: no server reachable: " in line
    assert "refused" in line.split("no server reachable: ")[1]  # the dial error
    assert WAIT_REASON not in line  # not the end of the 30 s wait


class SilentProtocol(Protocol):
    """Accepts a subflow and never sends its CHALLENGE."""

    factory: CountingFactory

    def connectionMade(self) -> None:
        self.factory.made(self)

    def connectionLost(self, reason: object = None) -> None:
        self.factory.lost(self)


class SilentFactory(CountingFactory):
    protocol = SilentProtocol


@pytest_twisted.ensureDeferred
async def test_connect_wait_bounds_the_wait_for_a_server_that_never_answers(
    cleanup: Cleanup, keys: Keys, log_messages: list[str]
) -> None:
    silent = await start_target(cleanup, SilentFactory())
    extra = ["--connect-wait", "1", "--open-timeout", "30", "--handshake-timeout", "30"]
    client = await start_client(cleanup, keys, silent.port, False, k=2, extra=extra)
    await wait_for(lambda: silent.factory.connections == 2, "both subflows to connect")
    reply = await in_thread(socks_handshake_reply, client.socks_port, "example.com", 80)
    assert reply == socks5.REPLY_GENERAL_FAILURE
    (line,) = refusals(log_messages)
    assert f"no server reachable in 1 s {WAIT_REASON}: the server accepted no subflow" in line
    assert not any("no answer from the server in time" in m for m in log_messages)


# ------------------------------------------------- 2. server restart


@pytest_twisted.ensureDeferred
async def test_first_connect_after_a_server_restart_succeeds(
    cleanup: Cleanup, keys: Keys, log_messages: list[str]
) -> None:
    target = await start_target(cleanup, EchoFactory())
    pair = await start_pair(cleanup, keys, False, k=3, client_extra=["--retry-max", "1"])
    before = await in_thread(socks_echo, pair.socks_port, target.port, 1 * MiB)
    assert before.errors == [] and before.received_sha == before.sent_sha
    old = pair.client_driver()
    await pair.server.stop()  # no drain: the client's session outlives the server
    await wait_for(lambda: not old.subflows, "the client to lose its subflows")
    # The CONNECT goes to the old session, which the restarted server forgot;
    # it waits for a subflow (re-dials begin a second after the loss).
    transfer = in_thread(socks_echo, pair.socks_port, target.port, 1 * MiB, 5)
    await wait_for(lambda: old.stream_count == 1, "the CONNECT in the old session")
    listen = f"tcp:{pair.server.port}:interface=127.0.0.1"
    pair.server = await start_server(cleanup, keys, False, listen=listen)
    result = await transfer
    assert result.errors == []
    assert result.received == result.sent == 1 * MiB
    assert result.received_sha == result.sent_sha
    assert old.closed and pair.client_driver() is not old
    assert any(
        "goes to a new session (the server no longer knows this session)" in m for m in log_messages
    )
    assert refusals(log_messages) == []


# --------------------------------------------------------- 3. drain


async def start_draining(
    cleanup: Cleanup, keys: Keys, log_messages: list[str]
) -> tuple[object, socket.socket, defer.Deferred[None], int]:
    """A pair whose server drains (SIGTERM) while one stream stays open."""
    target = await start_target(cleanup, EchoFactory())
    pair = await start_pair(
        cleanup,
        keys,
        False,
        k=2,
        server_extra=["--drain-timeout", "30"],
        client_extra=["--connect-wait", "30", "--open-timeout", "30"],
    )
    held = await in_thread(socks_connect, pair.socks_port, "127.0.0.1", target.port)
    driver = pair.client_driver()
    await wait_for(lambda: bool(pair.server_driver().stream_count), "the held stream")
    stopped = defer.ensureDeferred(pair.server.stop())
    await wait_for(lambda: driver.peer_going_away, "GOAWAY at the client")
    return pair, held, stopped, target.port


@pytest_twisted.ensureDeferred
async def test_connect_during_a_drain_is_refused_at_once_when_no_fresh_session_can_be_had(
    cleanup: Cleanup, keys: Keys, log_messages: list[str]
) -> None:
    pair, held, stopped, target_port = await start_draining(cleanup, keys, log_messages)
    for _ in range(2):  # the spare dial is refused; then refused without a dial
        reply = await in_thread(socks_handshake_reply, pair.socks_port, "127.0.0.1", target_port)
        assert reply == socks5.REPLY_GENERAL_FAILURE
    lines = refusals(log_messages)
    assert len(lines) == 2
    assert "no server reachable: " in lines[0] and "refused" in lines[0]
    assert "the server is draining and no fresh session could be opened" in lines[1]
    assert not any(WAIT_REASON in line for line in lines)
    assert await in_thread(ping_pong, held) == b"still here"  # then the drain ends
    await stopped
    assert not any("drain timeout" in m for m in log_messages)


@pytest_twisted.ensureDeferred
async def test_connect_during_a_drain_uses_a_fresh_session_where_one_answers(
    cleanup: Cleanup, keys: Keys, log_messages: list[str]
) -> None:
    pair, held, stopped, target_port = await start_draining(cleanup, keys, log_messages)
    draining = pair.client_driver()
    # Another instance takes over the address (as behind a balancer).
    await wait_for(lambda: port_refuses(pair.server.port), "the draining server to stop listening")
    listen = f"tcp:{pair.server.port}:interface=127.0.0.1"
    other = await start_server(cleanup, keys, False, listen=listen)
    result = await in_thread(socks_echo, pair.socks_port, target_port, 1 * MiB, 3)
    assert result.errors == [] and result.received_sha == result.sent_sha
    fresh = pair.client.overlay.driver
    assert fresh is not None and fresh is not draining and fresh.subflow_count
    assert len(other.sessions) == 1 and other.sessions[0].label == fresh.label
    assert await in_thread(ping_pong, held) == b"still here"
    await stopped
    assert refusals(log_messages) == []


def ping_pong(sock: socket.socket) -> bytes:
    with sock:
        sock.sendall(b"still here")
        return sock.recv(100)


def port_refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


# ------------------------------------------------------ 4. client drain


@pytest_twisted.ensureDeferred
async def test_client_stop_lets_a_transfer_in_flight_finish(
    cleanup: Cleanup, keys: Keys, log_messages: list[str]
) -> None:
    target = await start_target(cleanup, EchoFactory())
    pair = await start_pair(cleanup, keys, False, k=3, client_extra=["--drain-timeout", "30"])
    transfer = in_thread(socks_echo, pair.socks_port, target.port, 32 * MiB)
    driver = pair.client_driver()
    await wait_for(lambda: bool(driver.stream_count), "the stream to open")
    await sleep(0.05)
    stopped = defer.ensureDeferred(pair.client.service.stopService())  # SIGTERM
    await wait_for(lambda: port_refuses(pair.socks_port), "the SOCKS listener to close")
    result = await transfer
    assert result.errors == []
    assert result.received == result.sent == 32 * MiB
    assert result.received_sha == result.sent_sha
    await stopped
    assert driver.closed
    assert not any("drain timeout" in m for m in log_messages)


@pytest_twisted.ensureDeferred
async def test_client_stop_resets_what_is_left_after_the_drain_timeout(
    cleanup: Cleanup, keys: Keys, log_messages: list[str]
) -> None:
    target = await start_target(cleanup, EchoFactory())
    pair = await start_pair(cleanup, keys, False, k=2, client_extra=["--drain-timeout", "0.5"])
    held = await in_thread(socks_connect, pair.socks_port, "127.0.0.1", target.port)
    waiting = in_thread(read_all, held)  # an idle stream: it never ends by itself
    await wait_for(lambda: bool(pair.client_driver().stream_count), "the held stream")
    stopped = defer.ensureDeferred(pair.client.service.stopService())
    await sleep(0.1)
    assert not waiting.called  # still draining
    assert await waiting == b""  # then reset
    await stopped
    assert any("drain timeout: resetting 1 open streams" in m for m in log_messages)


# --------------------------------------------------- 5. stream limit


@pytest_twisted.ensureDeferred
async def test_the_server_logs_the_stream_limit_when_it_refuses_an_open(
    cleanup: Cleanup, keys: Keys, log_messages: list[str]
) -> None:
    target = await start_target(cleanup, EchoFactory())
    pair = await start_pair(cleanup, keys, False, k=2, server_extra=["--max-streams", "2"])
    held = [
        await in_thread(socks_connect, pair.socks_port, "127.0.0.1", target.port) for _ in range(2)
    ]
    for _ in range(2):
        reply = await in_thread(socks_handshake_reply, pair.socks_port, "127.0.0.1", target.port)
        assert reply == socks5.REPLY_GENERAL_FAILURE
    lines = [m for m in log_messages if "new stream refused" in m]
    assert len(lines) == 1  # once per interval
    assert "2 streams open, the limit per session (--max-streams)" in lines[0]
    for sock in held:
        sock.close()
