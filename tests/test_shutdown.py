"""Graceful shutdown: GOAWAY, open streams finish, new streams are refused."""

from __future__ import annotations

import random

import pytest_twisted
from helpers import (
    Cleanup,
    EchoFactory,
    Keys,
    in_thread,
    sleep,
    socks_echo,
    start_pair,
    start_target,
    wait_for,
)
from twisted.internet import defer

from stripeproxy.core.session import RESET_GENERAL, MiB
from stripeproxy.testing import CLIENT, SERVER, SessionPair


def test_go_away_lets_open_streams_finish_and_refuses_new_ones() -> None:
    pair = SessionPair(k=2)
    old = pair.open_stream()
    pair.settle()
    pair.go_away(SERVER, "maintenance")
    pair.settle()
    assert ("session_going_away", "maintenance") in pair.client_owner.events
    assert pair.client.peer_going_away and pair.server.going_away
    new = pair.open_stream()  # a client that ignored GOAWAY
    pair.settle()
    assert (new, RESET_GENERAL, "", 0) in pair.client_owner.open_results  # refused
    data = random.randbytes(1 * MiB)
    pair.write(CLIENT, old, data, eof=True)
    pair.write(SERVER, old, data, eof=True)
    pair.settle()
    assert pair.server_owner.data(old) == data == pair.client_owner.data(old)
    assert pair.client_owner.finished(old) and pair.server_owner.finished(old)
    pair.shutdown()


def test_client_closes_at_once_when_a_going_away_peer_drops() -> None:
    pair = SessionPair(k=2)
    stream_id = pair.open_stream()
    pair.settle()
    pair.go_away(SERVER, "bye")
    pair.settle()
    pair.kill_subflow(1)
    assert not pair.client.closed  # one subflow left
    pair.kill_subflow(2)
    # No grace period: the server said it was going.
    assert pair.client_owner.session_closes == ["the peer went away"]
    assert (stream_id, 1) in pair.client_owner.resets
    pair.shutdown()


@pytest_twisted.ensureDeferred
async def test_sigterm_style_stop_drains_an_open_transfer(
    cleanup: Cleanup, keys: Keys, log_messages: list[str]
) -> None:
    target = await start_target(cleanup, EchoFactory())
    pair = await start_pair(cleanup, keys, False, k=3, server_extra=["--drain-timeout", "30"])
    transfer = in_thread(socks_echo, pair.socks_port, target.port, 32 * MiB)
    driver = pair.server_driver()
    await wait_for(lambda: bool(driver.stream_count), "the stream to open")
    await sleep(0.05)
    stopped = defer.ensureDeferred(pair.server.stop())  # what twistd does on SIGTERM
    result = await transfer
    assert result.errors == []
    assert result.received == result.sent == 32 * MiB
    assert result.received_sha == result.sent_sha
    await stopped
    assert any("peer is going away: the server is shutting down" in m for m in log_messages)
    assert not any("drain timeout" in m for m in log_messages)
