"""Tests for the sans-I/O session core, driven through two sessions on one Clock.

Every test ends with :func:`finish` (or the equivalent checks): nothing in
flight, no stream or buffered byte left on either side, both sessions closed
and ``clock.getDelayedCalls() == []``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stripeproxy.core import control, wire
from stripeproxy.core.session import (
    INITIAL_WINDOW,
    RESET_GENERAL,
    RESET_IDLE,
    KiB,
    MiB,
    SessionConfig,
)
from stripeproxy.core.session import config as session_config
from stripeproxy.testing import C2S, CLIENT, S2C, SERVER, FakeOwner, SessionPair, Side

CHUNK = 64 * KiB


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def opened(pair: SessionPair, host: str = "example.com", port: int = 80) -> int:
    """Open a stream and let OPEN / OPEN_OK cross."""
    stream_id = pair.open_stream(host, port)
    pair.settle()
    assert pair.client_owner.open_results[-1] == (stream_id, 0, "127.0.0.1", 4242)
    return stream_id


def data_frames(pair: SessionPair, side: str, stream_id: int) -> dict[int, list[wire.Data]]:
    """DATA frames of ``stream_id`` that ``side`` wrote, per subflow."""
    owner = pair.client_owner if side == CLIENT else pair.server_owner
    out: dict[int, list[wire.Data]] = {}
    for sid in owner.sent:
        out[sid] = [
            f
            for f in owner.frames_sent(sid, pair.crc)
            if isinstance(f, wire.Data) and f.stream_id == stream_id
        ]
    return out


def placement(pair: SessionPair, direction: str, stream_id: int) -> dict[int, int]:
    """Offset -> subflow of the DATA frames of ``stream_id`` in flight."""
    return {
        f.offset: sid
        for sid in pair.alive
        for f in pair.in_flight(sid, C2S if direction == C2S else S2C)
        if isinstance(f, wire.Data) and f.stream_id == stream_id
    }


def eof_after_all_bytes(owner: FakeOwner, stream_id: int, total: int) -> None:
    """EOF came once, after exactly ``total`` bytes, and no byte came after it."""
    delivered = 0
    seen_eof = False
    for event in owner.events:
        if event[0] == "stream_data" and event[1] == stream_id:
            assert not seen_eof, "data after EOF"
            assert isinstance(event[2], int)
            delivered += event[2]
        elif event[0] == "stream_eof" and event[1] == stream_id:
            assert not seen_eof
            assert delivered == total
            seen_eof = True
    assert seen_eof


def event_index(owner: FakeOwner, event: tuple[object, ...]) -> int:
    return owner.events.index(event)


def finish(pair: SessionPair) -> None:
    """Everything delivered and finished, then both sessions closed with no timer left."""
    pair.settle()
    pair.assert_idle()
    for owner in (pair.client_owner, pair.server_owner):
        assert owner.session_closes == []
    pair.shutdown()
    assert pair.client_owner.session_closes == ["test over"]
    assert pair.server_owner.session_closes == ["test over"]
    assert pair.client.next_deadline() is None
    assert pair.server.next_deadline() is None
    assert pair.clock.getDelayedCalls() == []


# ------------------------------------------------------------------ basics


def test_open_then_data_both_ways() -> None:
    pair = SessionPair(k=3)
    stream_id = pair.open_stream("example.com", 443)
    assert stream_id == 1
    assert pair.client.stream_ids == [1]
    assert pair.server.stream_ids == []  # the OPEN is still in flight
    pair.settle()
    assert pair.server_owner.open_requests == [(1, "example.com", 443)]
    assert pair.client_owner.open_results == [(1, 0, "127.0.0.1", 4242)]

    up, down = payload(1, 3 * MiB + 17), payload(2, 2 * MiB + 5)
    pair.write(CLIENT, 1, up, eof=True)
    pair.write(SERVER, 1, down, eof=True)
    pair.settle()

    assert sha(pair.server_owner.data(1)) == sha(up)
    assert sha(pair.client_owner.data(1)) == sha(down)
    assert pair.client_owner.eofs == [1]
    assert pair.server_owner.eofs == [1]
    assert pair.client_owner.closed_streams == [1]
    assert pair.server_owner.closed_streams == [1]
    for owner in (pair.client_owner, pair.server_owner):
        assert owner.resets == []
        assert owner.closed_subflows == []
    assert pair.client.stats_retransmitted == 0
    assert pair.server.stats_retransmitted == 0
    finish(pair)


def test_crc_mode_end_to_end() -> None:
    pair = SessionPair(k=2, config=SessionConfig(crc=True))
    stream_id = opened(pair)
    up = payload(3, 300 * KiB)
    pair.write(CLIENT, stream_id, up, eof=True)
    pair.write(SERVER, stream_id, b"ok", eof=True)
    pair.settle()
    assert pair.server_owner.data(stream_id) == up
    assert pair.client_owner.data(stream_id) == b"ok"
    # Every frame on the wire carries a valid CRC32C trailer.
    for owner in (pair.client_owner, pair.server_owner):
        for sid in owner.sent:
            assert owner.frames_sent(sid, crc=True)
    finish(pair)


def test_empty_stream_closes_on_fins_alone() -> None:
    pair = SessionPair(k=2)
    stream_id = opened(pair)
    pair.write(CLIENT, stream_id, b"", eof=True)
    pair.write(SERVER, stream_id, b"", eof=True)
    pair.settle()
    assert pair.client_owner.data(stream_id) == b""
    assert pair.client_owner.eofs == [stream_id]
    assert pair.server_owner.eofs == [stream_id]
    assert pair.client_owner.closed_streams == [stream_id]
    assert pair.server_owner.closed_streams == [stream_id]
    finish(pair)


# ------------------------------------------------------------- reordering


def test_reordering_across_subflows() -> None:
    pair = SessionPair(k=3)
    stream_id = opened(pair)
    first = payload(4, INITIAL_WINDOW)  # four chunks, exactly the initial credit
    pair.write(CLIENT, stream_id, first)
    where = placement(pair, C2S, stream_id)
    assert sorted(where) == [0, CHUNK, 2 * CHUNK, 3 * CHUNK]
    assert set(where.values()) == {1, 2, 3}  # striped over every subflow

    # Everything except the subflow carrying offset 0 arrives first.
    head = where[0]
    for sid in pair.alive:
        if sid != head:
            pair.deliver(sid, C2S)
    held_back = sum(CHUNK for sid in where.values() if sid == head)
    assert pair.server_owner.data(stream_id) == b""
    assert pair.server.buffered_bytes() == INITIAL_WINDOW - held_back
    pair.deliver(head, C2S)
    assert pair.server_owner.data(stream_id) == first
    assert pair.server.buffered_bytes() == 0

    # The rest of a long transfer, subflow 3 always before 2 before 1, both ways.
    rest, down = payload(5, 2 * MiB), payload(6, 2 * MiB)
    pair.write(CLIENT, stream_id, rest, eof=True)
    pair.write(SERVER, stream_id, down, eof=True)
    pair.settle(order=[3, 2, 1])
    assert sha(pair.server_owner.data(stream_id)) == sha(first + rest)
    assert sha(pair.client_owner.data(stream_id)) == sha(down)
    assert pair.client_owner.closed_streams == [stream_id]
    assert pair.server_owner.closed_streams == [stream_id]
    finish(pair)


def test_random_interleaving_across_subflows() -> None:
    pair = SessionPair(k=5)
    stream_id = opened(pair)
    up, down = payload(7, 3 * MiB), payload(8, 3 * MiB)
    pair.write(CLIENT, stream_id, up, eof=True)
    pair.write(SERVER, stream_id, down, eof=True)
    pair.settle(rng=random.Random(9))
    assert sha(pair.server_owner.data(stream_id)) == sha(up)
    assert sha(pair.client_owner.data(stream_id)) == sha(down)
    finish(pair)


def test_one_large_stream_is_striped_over_every_subflow() -> None:
    # The pair delivers one subflow's frames after another's, which the
    # receiver sees as reordering and would answer by growing the window
    # (SPEC.md section 4); a session window equal to the stream window keeps
    # it at 4 MiB, so the split below is the scheduler's alone.
    pair = SessionPair(k=4, config=SessionConfig(session_window=4 * MiB))
    stream_id = opened(pair)
    data = payload(10, 8 * MiB)
    pair.write(CLIENT, stream_id, data, eof=True)
    pair.settle()
    assert sha(pair.server_owner.data(stream_id)) == sha(data)
    frames = data_frames(pair, CLIENT, stream_id)
    per_subflow = {sid: sum(len(f.payload) for f in fs) for sid, fs in frames.items()}
    assert sorted(per_subflow) == [1, 2, 3, 4]
    assert sum(per_subflow.values()) == 8 * MiB
    # Equal subflows share the load evenly: 32 chunks each, give or take one
    # (ACKs, which also take turns, decide which subflow drains first).
    assert all(abs(n - 2 * MiB) <= CHUNK for n in per_subflow.values()), per_subflow
    assert all(len(f.payload) == CHUNK for fs in frames.values() for f in fs)
    pair.write(SERVER, stream_id, b"", eof=True)
    finish(pair)


def test_a_stalled_subflow_gets_no_more_than_its_buffer() -> None:
    # Subflows that hold two chunks each; subflow 2 stops delivering.  The
    # placement below is the plain policy's (the product default is adaptive).
    pair = SessionPair(k=3, config=SessionConfig(scheduler="least-queued"), capacity=2 * CHUNK)
    stream_id = opened(pair)
    data = payload(11, 4 * MiB)
    pair.hold(2)
    pair.write(CLIENT, stream_id, data, eof=True)
    pair.settle()
    # With ACKs every 512 KiB the second hole's check comes due a few ms on
    # (twice the other subflows' RTT, which includes the ACK delay).
    pair.advance(0.01)
    pair.settle()
    stuck = sorted(f.offset for f in pair.in_flight(2, C2S) if isinstance(f, wire.Data))
    # Two chunks went on subflow 2 before it filled up; all 62 others went
    # round it, and the two holes were re-injected on the other subflows once
    # the data beyond them was acknowledged (SPEC.md section 6).
    assert stuck == [0, 3 * CHUNK]
    assert pair.client.stats_reinjected == 2 * CHUNK
    assert sha(pair.server_owner.data(stream_id)) == sha(data)
    assert pair.server.buffered_bytes() == 0
    pair.release(2)  # the late copies are dropped as duplicates
    pair.settle()
    assert sha(pair.server_owner.data(stream_id)) == sha(data)
    frames = data_frames(pair, CLIENT, stream_id)
    assert sum(len(f.payload) for f in frames[2]) == 2 * CHUNK
    pair.write(SERVER, stream_id, b"", eof=True)
    finish(pair)


# ------------------------------------------------------------ flow control


def test_credit_exhaustion_pauses_the_sender_and_resume_delivers_all() -> None:
    pair = SessionPair(k=3)
    stream_id = opened(pair)
    pair.sink_paused(SERVER, stream_id, True)
    data = payload(12, 2 * MiB)
    pair.write(CLIENT, stream_id, data, eof=True)
    pair.settle()

    # The sender stopped at the initial credit: the receiver never grew it.
    assert len(pair.server_owner.data(stream_id)) == INITIAL_WINDOW
    # Its send buffer then filled (256 KiB queued) and it paused the source,
    # which had handed over 4 chunks sent + 4 queued.
    assert pair.client_owner.pauses == [stream_id]
    assert pair.client_owner.paused == {stream_id}
    assert pair.unsent(CLIENT, stream_id) == len(data) - 2 * INITIAL_WINDOW
    assert pair.client.buffered_bytes() == pair.client.config.send_buffer
    assert pair.server.buffered_bytes() == 0
    assert pair.client_owner.resumes == []

    pair.sink_paused(SERVER, stream_id, False)
    pair.settle()
    assert pair.client_owner.resumes == [stream_id]
    assert sha(pair.server_owner.data(stream_id)) == sha(data)
    assert pair.server_owner.eofs == [stream_id]
    pair.write(SERVER, stream_id, b"", eof=True)
    finish(pair)


def test_receiver_that_stops_reading_holds_bounded_memory() -> None:
    config = SessionConfig()
    pair = SessionPair(k=4, config=config)
    stream_id = opened(pair)
    bound = config.stream_window + config.chunk_size
    state = {"paused_at": -1, "peak": 0, "paused": 0}

    def check() -> None:
        buffered = pair.server.buffered_bytes()
        state["peak"] = max(state["peak"], buffered)
        assert buffered <= bound
        delivered = len(pair.server_owner.received.get(stream_id, b""))
        if state["paused_at"] < 0 and delivered >= 2 * MiB:
            pair.sink_paused(SERVER, stream_id, True)
            state["paused_at"] = delivered
            state["paused"] = 1
        if state["paused"]:
            # What the local peer is handed while it does not read: at most a window.
            assert delivered - state["paused_at"] <= config.stream_window

    pair.on_delivery = check
    data = payload(13, 24 * MiB)
    pair.write(CLIENT, stream_id, data, eof=True)
    rng = random.Random(14)
    pair.settle(rng=rng)
    paused_at = state["paused_at"]
    assert paused_at >= 2 * MiB
    stalled = len(pair.server_owner.data(stream_id))
    assert paused_at < stalled <= paused_at + config.stream_window
    assert stalled < len(data)
    assert pair.client_owner.paused == {stream_id}
    # Reordering made the reorder buffer do real work, within the bound.
    assert 0 < state["peak"] <= bound

    state["paused"] = 0
    pair.sink_paused(SERVER, stream_id, False)
    pair.settle(rng=rng)
    assert sha(pair.server_owner.data(stream_id)) == sha(data)
    assert state["peak"] <= bound
    pair.on_delivery = None
    pair.write(SERVER, stream_id, b"", eof=True)
    finish(pair)


def test_small_windows_still_reopen_after_a_pause() -> None:
    # A stream window below ack_threshold (what 300 streams share with the
    # defaults) must still be announced when the local peer drains.
    pair = SessionPair(k=2, config=SessionConfig(stream_window=64 * KiB))
    stream_id = opened(pair)
    pair.sink_paused(SERVER, stream_id, True)
    data = payload(15, 1 * MiB)
    pair.write(CLIENT, stream_id, data, eof=True)
    pair.settle()
    assert len(pair.server_owner.data(stream_id)) == INITIAL_WINDOW
    pair.sink_paused(SERVER, stream_id, False)
    pair.settle()
    assert sha(pair.server_owner.data(stream_id)) == sha(data)
    pair.write(SERVER, stream_id, b"", eof=True)
    finish(pair)


def test_many_streams_share_the_session_window() -> None:
    config = SessionConfig(session_window=1 * MiB)  # 16 streams -> 64 KiB each
    pair = SessionPair(k=3, config=config)
    ids = [pair.open_stream() for _ in range(16)]
    pair.settle()
    for stream_id in ids:
        pair.sink_paused(SERVER, stream_id, True)
    for i, stream_id in enumerate(ids):
        pair.write(CLIENT, stream_id, payload(100 + i, 512 * KiB), eof=True)
    pair.settle()
    # Nothing grows beyond the initial credit while the sinks are paused.
    assert [len(pair.server_owner.data(s)) for s in ids] == [INITIAL_WINDOW] * 16
    for stream_id in ids:
        pair.sink_paused(SERVER, stream_id, False)
        pair.write(SERVER, stream_id, b"", eof=True)
    pair.settle()
    for i, stream_id in enumerate(ids):
        assert pair.server_owner.data(stream_id) == payload(100 + i, 512 * KiB)
    assert sorted(pair.server_owner.closed_streams) == ids
    finish(pair)


# -------------------------------------------------------------- half-close


def test_client_fin_while_server_keeps_sending() -> None:
    pair = SessionPair(k=3)
    stream_id = opened(pair)
    request = payload(20, 100 * KiB)
    pair.write(CLIENT, stream_id, request, eof=True)
    pair.settle()
    assert pair.server_owner.eofs == [stream_id]
    eof_after_all_bytes(pair.server_owner, stream_id, len(request))
    assert pair.client_owner.closed_streams == []
    assert pair.server_owner.closed_streams == []
    assert pair.client.stream_ids == [stream_id]

    response = payload(21, 3 * MiB)
    pair.write(SERVER, stream_id, response[: 1 * MiB])
    pair.settle()
    assert pair.client_owner.data(stream_id) == response[: 1 * MiB]
    assert pair.client_owner.eofs == []
    pair.write(SERVER, stream_id, response[1 * MiB :], eof=True)
    pair.settle()
    assert sha(pair.client_owner.data(stream_id)) == sha(response)
    eof_after_all_bytes(pair.client_owner, stream_id, len(response))
    for owner in (pair.client_owner, pair.server_owner):
        assert owner.closed_streams == [stream_id]
        assert event_index(owner, ("stream_closed", stream_id)) > event_index(
            owner, ("stream_eof", stream_id)
        )
    finish(pair)


def test_server_fin_while_client_keeps_sending() -> None:
    pair = SessionPair(k=3)
    stream_id = opened(pair)
    banner = b"220 ready\r\n"
    pair.write(SERVER, stream_id, banner, eof=True)
    pair.settle()
    assert pair.client_owner.data(stream_id) == banner
    assert pair.client_owner.eofs == [stream_id]
    assert pair.server_owner.closed_streams == []

    upload = payload(22, 3 * MiB + 1)
    pair.write(CLIENT, stream_id, upload, eof=True)
    pair.settle()
    assert sha(pair.server_owner.data(stream_id)) == sha(upload)
    eof_after_all_bytes(pair.server_owner, stream_id, len(upload))
    assert pair.client_owner.closed_streams == [stream_id]
    assert pair.server_owner.closed_streams == [stream_id]
    finish(pair)


def test_eof_waits_for_reordered_tail() -> None:
    pair = SessionPair(k=2)
    stream_id = opened(pair)
    data = payload(23, 2 * CHUNK)
    pair.write(CLIENT, stream_id, data, eof=True)
    where = placement(pair, C2S, stream_id)
    tail = where[CHUNK]
    assert where == {0: 3 - tail, CHUNK: tail}
    # The FIN (stream 0) and the first chunk arrive; the last chunk is late.
    pair.hold(tail, C2S)
    pair.settle()
    assert pair.server_owner.data(stream_id) == data[:CHUNK]
    assert pair.server_owner.eofs == []
    pair.release(tail, C2S)
    pair.settle()
    eof_after_all_bytes(pair.server_owner, stream_id, len(data))
    pair.write(SERVER, stream_id, b"", eof=True)
    finish(pair)


def test_finished_stream_still_acknowledges_the_last_bytes() -> None:
    # The client's direction is finished first; when the server's last bytes
    # arrive the client is done with the stream, and must still ACK them, or
    # the server's side never finishes.
    pair = SessionPair(k=3)
    stream_id = opened(pair)
    pair.write(CLIENT, stream_id, b"GET / HTTP/1.0\r\n\r\n", eof=True)
    pair.settle()
    pair.write(SERVER, stream_id, payload(24, 300 * KiB), eof=True)
    pair.settle()
    assert pair.client_owner.closed_streams == [stream_id]
    assert pair.server_owner.closed_streams == [stream_id]
    assert pair.server.buffered_bytes() == 0
    finish(pair)


# ------------------------------------------------------------------- reset


def test_client_reset_reaches_the_server() -> None:
    pair = SessionPair(k=3)
    stream_id = opened(pair)
    pair.write(CLIENT, stream_id, payload(30, 1 * MiB))
    pair.write(SERVER, stream_id, payload(31, 1 * MiB))
    pair.deliver_round()  # the first chunks arrive, ACKs go back
    pair.deliver_round()  # the ACKs arrive, more chunks leave: data in flight both ways
    assert placement(pair, C2S, stream_id) and placement(pair, S2C, stream_id)
    pair.reset(CLIENT, stream_id, 5)
    assert pair.client.stream_ids == []
    # Only the RST itself is still unacknowledged (on stream 0).
    assert pair.client.buffered_bytes() == len(control.encode(control.Rst(stream_id, 5)))
    pair.settle()
    assert pair.server_owner.resets == [(stream_id, 5)]
    assert pair.client_owner.resets == []  # the client's own reset is not echoed
    assert pair.server.stream_ids == []
    for owner in (pair.client_owner, pair.server_owner):
        assert owner.closed_streams == []
        assert owner.closed_subflows == []  # late DATA is not an error
    finish(pair)


def test_server_reset_reaches_the_client() -> None:
    pair = SessionPair(k=3)
    stream_id = opened(pair)
    pair.write(CLIENT, stream_id, payload(32, 1 * MiB))
    pair.deliver_round()
    pair.deliver_round()
    assert placement(pair, C2S, stream_id)
    pair.reset(SERVER, stream_id)
    pair.settle()
    assert pair.client_owner.resets == [(stream_id, RESET_GENERAL)]
    assert pair.server_owner.resets == []
    assert pair.client.stream_ids == []
    assert pair.server.stream_ids == []
    finish(pair)


def test_idle_stream_is_reset_and_busy_streams_are_not() -> None:
    """The server's idle timeout resets the silent stream (RST 0x06 to both
    owners) while a stream that keeps talking, however slowly, lives on."""
    pair = SessionPair(k=2, server_config=SessionConfig(idle_timeout=10.0))
    busy, silent = opened(pair), opened(pair)
    for second in range(1, 25):
        pair.advance(1.0)
        if second % 3 == 0:  # a trickle every 3 s, alternating directions
            pair.write(CLIENT if second % 2 else SERVER, busy, b"x")
        pair.settle()
        if second == 10:
            assert pair.server_owner.resets == []  # not before the timeout
    assert pair.server_owner.resets == [(silent, RESET_IDLE)]
    assert pair.client_owner.resets == [(silent, RESET_IDLE)]
    assert pair.client.stream_ids == [busy] and pair.server.stream_ids == [busy]
    pair.write(CLIENT, busy, b"", eof=True)
    pair.write(SERVER, busy, b"", eof=True)
    pair.settle()
    assert pair.server.stream_ids == []
    # No stream, no idle check: the timer is back to heartbeats only.
    heartbeat = (
        min(pair.server.subflow(s).last_tx for s in pair.server.subflow_ids)
        + pair.server.config.heartbeat_interval
    )
    assert pair.server.next_deadline() == heartbeat
    finish(pair)


def test_memory_budget_caps_what_is_in_flight_whatever_the_peer_grants() -> None:
    """The server grants 64 MiB of credit; the client's own budget (4 MiB)
    still caps its unacknowledged bytes while nothing is acknowledged, and
    everything arrives once the subflows move again."""
    generous = SessionConfig(stream_window=64 * MiB, session_window=64 * MiB)
    pair = SessionPair(k=3, config=SessionConfig(session_window=4 * MiB), server_config=generous)
    streams = [opened(pair) for _ in range(3)]
    for stream_id in streams:  # the server's first ACKs announce its big windows
        pair.write(CLIENT, stream_id, payload(stream_id, 256 * KiB))
    pair.settle()
    for sid in pair.alive:
        pair.hold(sid, C2S)
    data = {stream_id: payload(50 + stream_id, 8 * MiB) for stream_id in streams}
    for stream_id in streams:
        pair.write(CLIENT, stream_id, data[stream_id], eof=True)
    pair.advance(0.001)
    session = pair.client
    in_flight = sum(len(c.data) for s in streams for c in session._streams[s].send.unacked.values())
    assert in_flight == session._credit.unacked_bytes
    assert 4 * MiB <= in_flight <= 4 * MiB + session.config.chunk_size
    for sid in pair.alive:
        pair.release(sid, C2S)
    pair.settle()
    for stream_id in streams:
        assert pair.server_owner.data(stream_id) == payload(stream_id, 256 * KiB) + data[stream_id]
    assert session._credit.unacked_bytes == len(session._streams[0].send.unacked) == 0
    for stream_id in streams:
        pair.write(SERVER, stream_id, b"", eof=True)
    finish(pair)


def test_a_lower_memory_budget_shrinks_new_credit() -> None:
    pair = SessionPair(k=2)
    stream_id = opened(pair)
    pair.set_memory_budget(SERVER, 1 * MiB)
    pair.write(CLIENT, stream_id, payload(60, 3 * MiB))
    pair.settle()
    recv = pair.server._streams[stream_id].recv
    # Credit announced before stays (it may not shrink); new credit follows the budget.
    assert recv.advertised <= recv.next_offset + 1 * MiB
    pair.set_memory_budget(SERVER, 32 * MiB)  # growing it re-opens the window at once
    pair.settle()
    assert recv.advertised == recv.next_offset + 4 * MiB  # the stream window again
    pair.write(CLIENT, stream_id, b"", eof=True)
    pair.write(SERVER, stream_id, b"", eof=True)
    finish(pair)


def test_reset_of_a_stream_whose_open_is_in_flight() -> None:
    pair = SessionPair(k=2)
    stream_id = pair.open_stream()
    pair.reset(CLIENT, stream_id, 1)
    pair.settle()
    # OPEN then RST in stream-0 order: the server accepted, then dropped it.
    assert pair.server_owner.open_requests == [(stream_id, "example.com", 80)]
    assert pair.server_owner.resets == [(stream_id, 1)]
    assert pair.client_owner.open_results == []  # the late OPEN_OK is ignored
    finish(pair)


def test_reset_by_the_owner_while_data_is_delivered() -> None:
    pair = SessionPair(k=2)
    stream_id = opened(pair)
    # The local peer aborts on the first bytes it gets, from inside the delivery.
    pair.client_owner.on_data = lambda sid, _data: pair.reset(CLIENT, sid, 1)
    response = payload(33, 3 * CHUNK)
    pair.write(SERVER, stream_id, response)
    assert set(placement(pair, S2C, stream_id).values()) == {1, 2}
    pair.settle(order=[2, 1])  # later chunks wait in the reorder buffer
    # One piece was handed over; the ones behind it in the same pass were not.
    assert pair.client_owner.data(stream_id) == response[:CHUNK]
    assert [e for e in pair.client_owner.events if e[0] == "stream_data"] == [
        ("stream_data", stream_id, CHUNK)
    ]
    assert pair.server_owner.resets == [(stream_id, 1)]
    assert pair.client.stream_ids == []
    assert pair.server.stream_ids == []
    pair.client_owner.on_data = None
    finish(pair)


# ------------------------------------------------------- many streams, fairness


def test_many_streams_interleaved() -> None:
    pair = SessionPair(k=4)
    rng = random.Random(40)
    ids = [pair.open_stream(f"host{i}.example", 1000 + i) for i in range(60)]
    assert ids == list(range(1, 61))
    sizes = {s: (rng.randrange(0, 200 * KiB), rng.randrange(0, 300 * KiB)) for s in ids}
    for s in ids:
        pair.write(CLIENT, s, payload(s, sizes[s][0]), eof=True)
        pair.write(SERVER, s, payload(1000 + s, sizes[s][1]), eof=True)
    pair.settle(rng=rng)
    assert [r[0] for r in pair.server_owner.open_requests] == ids
    for s in ids:
        assert pair.server_owner.data(s) == payload(s, sizes[s][0])
        assert pair.client_owner.data(s) == payload(1000 + s, sizes[s][1])
    assert sorted(pair.client_owner.closed_streams) == ids
    assert sorted(pair.server_owner.closed_streams) == ids
    finish(pair)


def test_small_request_finishes_while_bulk_transfer_runs() -> None:
    # Subflows that hold two chunks each: a transport with a shallow buffer.
    pair = SessionPair(k=3, capacity=2 * CHUNK)
    bulk = opened(pair)
    bulk_data = payload(41, 16 * MiB)
    pair.write(CLIENT, bulk, bulk_data, eof=True)
    for _ in range(5):
        pair.deliver_round()  # the bulk upload is well under way
    started = len(pair.server_owner.data(bulk))
    assert 0 < started < 2 * MiB

    small = pair.open_stream("api.example", 443)
    pair.write(CLIENT, small, b"GET /small", eof=True)
    pair.write(SERVER, small, b"small answer", eof=True)
    progress: dict[str, int] = {}

    def watch() -> None:
        done = small in pair.client_owner.closed_streams and small in (
            pair.server_owner.closed_streams
        )
        if done and "bulk" not in progress:
            progress["bulk"] = len(pair.server_owner.received.get(bulk, b""))

    pair.on_delivery = watch
    pair.settle()
    pair.on_delivery = None
    assert pair.server_owner.data(small) == b"GET /small"
    assert pair.client_owner.data(small) == b"small answer"
    # The small exchange was over while the bulk stream had most still to go.
    # Round-robin by chunk: 16 bulk chunks went while the small exchange ran,
    # not the bulk stream's whole 4 MiB of credit ahead of it.
    assert progress["bulk"] - started <= 1 * MiB
    assert progress["bulk"] < 4 * MiB
    assert sha(pair.server_owner.data(bulk)) == sha(bulk_data)
    pair.write(SERVER, bulk, b"", eof=True)
    finish(pair)


# ------------------------------------------------------------ subflow loss


def test_subflow_killed_mid_transfer_loses_nothing() -> None:
    pair = SessionPair(k=4)
    stream_id = opened(pair)
    up, down = payload(50, 4 * MiB), payload(51, 4 * MiB)
    pair.write(CLIENT, stream_id, up, eof=True)
    pair.write(SERVER, stream_id, down, eof=True)
    pair.deliver_round()
    pair.deliver_round()  # more chunks in flight both ways, some of them on subflow 2
    in_flight_up = sum(
        len(f.payload)
        for f in pair.in_flight(2, C2S)
        if isinstance(f, wire.Data) and f.stream_id == stream_id
    )
    in_flight_down = sum(
        len(f.payload)
        for f in pair.in_flight(2, S2C)
        if isinstance(f, wire.Data) and f.stream_id == stream_id
    )
    assert in_flight_up > 0
    assert in_flight_down > 0
    pair.kill_subflow(2)
    assert pair.client.subflow_ids == [1, 3, 4]
    assert pair.server.subflow_ids == [1, 3, 4]
    pair.settle()
    assert sha(pair.server_owner.data(stream_id)) == sha(up)
    assert sha(pair.client_owner.data(stream_id)) == sha(down)
    # What the dead subflow carried unacknowledged went again on the others.
    assert pair.client.stats_retransmitted >= in_flight_up
    assert pair.server.stats_retransmitted >= in_flight_down
    assert pair.client.stats_subflows_lost == 1
    for owner in (pair.client_owner, pair.server_owner):
        assert owner.closed_streams == [stream_id]
    finish(pair)


def test_subflows_die_one_after_another_and_new_ones_join() -> None:
    pair = SessionPair(k=3)
    stream_id = opened(pair)
    up, down = payload(52, 6 * MiB), payload(53, 6 * MiB)
    pair.write(CLIENT, stream_id, up, eof=True)
    pair.write(SERVER, stream_id, down, eof=True)
    rng = random.Random(54)
    for victim in (1, 2, 3):
        pair.deliver_random(rng, 40)
        new = pair.add_subflow()
        pair.kill_subflow(victim)
        assert victim not in pair.client.subflow_ids
        assert new in pair.server.subflow_ids
    pair.settle(rng=rng)
    assert pair.client.subflow_ids == [4, 5, 6]
    assert sha(pair.server_owner.data(stream_id)) == sha(up)
    assert sha(pair.client_owner.data(stream_id)) == sha(down)
    finish(pair)


def test_final_ack_lost_with_a_subflow_is_recovered() -> None:
    pair = SessionPair(k=3)
    stream_id = opened(pair)
    pair.write(CLIENT, stream_id, b"request", eof=True)
    pair.settle()
    pair.write(SERVER, stream_id, b"response", eof=True)
    (data_sid,) = set(placement(pair, S2C, stream_id).values())
    # The client's ACK must leave on another subflow than the one the data used.
    pair.set_writable(data_sid, False, CLIENT)
    pair.deliver_all(directions=[S2C])
    assert pair.client_owner.closed_streams == [stream_id]  # the client is done
    ack_sids = [
        sid
        for sid in pair.alive
        if any(
            isinstance(f, wire.Ack) and f.stream_id == stream_id for f in pair.in_flight(sid, C2S)
        )
    ]
    assert len(ack_sids) == 1
    assert ack_sids[0] != data_sid
    pair.kill_subflow(ack_sids[0])  # the final ACK is gone
    pair.set_writable(data_sid, True, CLIENT)
    pair.settle()
    assert pair.server_owner.closed_streams == [stream_id]
    assert pair.server.stream_ids == []
    finish(pair)


def test_open_survives_the_loss_of_its_subflow() -> None:
    pair = SessionPair(k=2)
    stream_id = pair.open_stream()
    (control_sid,) = {sid for sid in pair.alive if pair.in_flight(sid, C2S)}
    pair.kill_subflow(control_sid)
    pair.settle()
    assert pair.server_owner.open_requests == [(stream_id, "example.com", 80)]
    assert pair.client_owner.open_results == [(stream_id, 0, "127.0.0.1", 4242)]
    pair.write(CLIENT, stream_id, b"x", eof=True)
    pair.write(SERVER, stream_id, b"y", eof=True)
    finish(pair)


# --------------------------------------------------------------- opening


def test_data_before_open_ok_is_held_until_the_stream_opens() -> None:
    pair = SessionPair(k=3)
    stream_id = pair.open_stream()
    pair.deliver_all(directions=[C2S])  # the server sees OPEN and accepts at once
    assert pair.server_owner.open_requests == [(stream_id, "example.com", 80)]
    response = payload(60, 2 * CHUNK)
    pair.write(SERVER, stream_id, response, eof=True)
    control_sids = {
        sid
        for sid in pair.alive
        if any(isinstance(f, wire.Data) and f.stream_id == 0 for f in pair.in_flight(sid, S2C))
    }
    data_sids = set(placement(pair, S2C, stream_id).values())
    assert len(control_sids) == 1
    assert not control_sids & data_sids
    for sid in data_sids:
        pair.deliver(sid, S2C)
    # The bytes are there, but the stream is not open yet: nothing delivered.
    assert pair.client_owner.open_results == []
    assert pair.client_owner.received == {}
    (control_sid,) = control_sids
    pair.deliver(control_sid, S2C)
    assert pair.client_owner.open_results == [(stream_id, 0, "127.0.0.1", 4242)]
    assert pair.client_owner.data(stream_id) == response
    assert pair.client_owner.eofs == [stream_id]
    result_at = event_index(
        pair.client_owner, ("stream_open_result", stream_id, 0, "127.0.0.1", 4242)
    )
    first_data = next(i for i, e in enumerate(pair.client_owner.events) if e[0] == "stream_data")
    assert result_at < first_data
    pair.write(CLIENT, stream_id, b"", eof=True)
    finish(pair)


def test_window_reopens_once_held_data_is_delivered() -> None:
    # The server fills the client's whole credit before OPEN_OK arrives (its
    # subflow is slow); delivering the held bytes must announce new credit.
    pair = SessionPair(k=3, config=SessionConfig(stream_window=64 * KiB))
    stream_id = pair.open_stream()
    pair.deliver_all(directions=[C2S])  # OPEN arrives, accepted, OPEN_OK leaves
    (control_sid,) = {
        sid
        for sid in pair.alive
        if any(isinstance(f, wire.Data) and f.stream_id == 0 for f in pair.in_flight(sid, S2C))
    }
    pair.hold(control_sid, S2C)
    pair.set_writable(control_sid, False, SERVER)  # the data goes on the other two
    response = payload(62, 1 * MiB)
    pair.write(SERVER, stream_id, response, eof=True)
    pair.settle()
    assert pair.client_owner.received == {}
    sent = sum(len(f.payload) for fs in data_frames(pair, SERVER, stream_id).values() for f in fs)
    assert sent == INITIAL_WINDOW  # the server is blocked on credit
    pair.release(control_sid)
    pair.set_writable(control_sid, True, SERVER)
    pair.settle()
    assert pair.client_owner.open_results == [(stream_id, 0, "127.0.0.1", 4242)]
    assert sha(pair.client_owner.data(stream_id)) == sha(response)
    pair.write(CLIENT, stream_id, b"", eof=True)
    finish(pair)


def test_client_sends_nothing_before_open_ok() -> None:
    pair = SessionPair(k=2, auto_accept=False)
    stream_id = pair.open_stream()
    pair.write(CLIENT, stream_id, b"early bytes", eof=True)
    pair.settle()
    assert pair.server_owner.open_requests == [(stream_id, "example.com", 80)]
    assert data_frames(pair, CLIENT, stream_id) == {1: [], 2: []}
    pair.accept(stream_id, "10.1.2.3", 5555)
    pair.settle()
    assert pair.client_owner.open_results == [(stream_id, 0, "10.1.2.3", 5555)]
    assert pair.server_owner.data(stream_id) == b"early bytes"
    assert pair.server_owner.eofs == [stream_id]
    pair.write(SERVER, stream_id, b"", eof=True)
    finish(pair)


def test_open_fail_reaches_the_client_with_its_code() -> None:
    pair = SessionPair(k=2, auto_accept=False)
    refused = pair.open_stream("10.0.0.1", 9)
    general = pair.open_stream("10.0.0.2", 9)
    pair.write(CLIENT, refused, b"never sent", eof=True)
    pair.settle()
    pair.refuse(refused, 5)
    pair.refuse(general, 0)  # no code: the client reports "general failure"
    assert pair.server.stream_ids == []
    pair.settle()
    assert pair.client_owner.open_results == [
        (refused, 5, "", 0),
        (general, RESET_GENERAL, "", 0),
    ]
    assert pair.client.stream_ids == []
    assert pair.client_owner.resets == []
    assert pair.server_owner.received == {}
    finish(pair)


def test_server_refuses_streams_beyond_max_streams() -> None:
    pair = SessionPair(k=2, config=SessionConfig(max_streams=2))
    ids = [pair.open_stream() for _ in range(3)]
    pair.settle()
    assert [r[0] for r in pair.server_owner.open_requests] == ids[:2]
    # The three OPENs arrive in one control chunk: the refusal is queued while
    # the chunk is read, the acceptances once the server's owner sees them.
    assert sorted(pair.client_owner.open_results) == [
        (1, 0, "127.0.0.1", 4242),
        (2, 0, "127.0.0.1", 4242),
        (3, RESET_GENERAL, "", 0),
    ]
    for stream_id in ids[:2]:
        pair.write(CLIENT, stream_id, b"", eof=True)
        pair.write(SERVER, stream_id, b"", eof=True)
    finish(pair)


# ------------------------------------------------------ protocol violations


def bystander(pair: SessionPair) -> tuple[int, bytes, bytes]:
    """A stream with a transfer under way in both directions."""
    stream_id = opened(pair)
    up, down = payload(70, 1 * MiB), payload(71, 1 * MiB)
    pair.write(CLIENT, stream_id, up, eof=True)
    pair.write(SERVER, stream_id, down, eof=True)
    pair.deliver_round()
    pair.deliver_round()
    assert placement(pair, C2S, stream_id) and placement(pair, S2C, stream_id)
    return stream_id, up, down


def assert_bystander_intact(pair: SessionPair, stream: tuple[int, bytes, bytes]) -> None:
    stream_id, up, down = stream
    pair.settle()
    assert sha(pair.server_owner.data(stream_id)) == sha(up)
    assert sha(pair.client_owner.data(stream_id)) == sha(down)
    assert pair.client_owner.closed_streams[-1] == stream_id
    assert pair.server_owner.closed_streams[-1] == stream_id


def test_data_beyond_credit_closes_the_subflow() -> None:
    pair = SessionPair(k=3)
    victim = opened(pair)
    stream = bystander(pair)
    # The server has granted the victim stream only its initial credit.
    pair.inject(2, C2S, [wire.Data(victim, INITIAL_WINDOW - 10, b"x" * 20)])
    assert pair.server_owner.closed_subflows == [
        (2, f"stream {victim}: DATA beyond the credit limit")
    ]
    assert pair.client.subflow_ids == [1, 3]
    assert pair.server.subflow_ids == [1, 3]
    assert pair.server.has_stream(victim)
    assert_bystander_intact(pair, stream)
    # The victim stream itself carries on: the bad frame changed nothing.
    pair.write(CLIENT, victim, b"fine", eof=True)
    pair.write(SERVER, victim, b"", eof=True)
    pair.settle()
    assert pair.server_owner.data(victim) == b"fine"
    finish(pair)


def test_data_for_a_never_opened_stream_closes_the_subflow() -> None:
    pair = SessionPair(k=3)
    stream = bystander(pair)
    pair.inject(1, C2S, [wire.Data(99, 0, b"x")])
    assert pair.server_owner.closed_subflows == [(1, "DATA for stream 99, which was never opened")]
    pair.inject(3, S2C, [wire.Data(42, 0, b"y")])
    assert pair.client_owner.closed_subflows == [(3, "DATA for stream 42, which was never opened")]
    assert pair.client.subflow_ids == [2]
    assert pair.server.subflow_ids == [2]
    assert_bystander_intact(pair, stream)
    finish(pair)


def test_ack_for_unsent_data_closes_the_subflow() -> None:
    pair = SessionPair(k=3)
    stream = bystander(pair)
    stream_id = stream[0]
    pair.inject(2, S2C, [wire.Ack(stream_id, 100 * MiB, 200 * MiB)])
    assert pair.client_owner.closed_subflows == [
        (2, f"stream {stream_id}: ACK for data never sent")
    ]
    pair.inject(3, C2S, [wire.Ack(stream_id, 0, INITIAL_WINDOW, ((10 * MiB, 11 * MiB),))])
    assert pair.server_owner.closed_subflows == [
        (3, f"stream {stream_id}: ACK for data never sent")
    ]
    assert pair.client.subflow_ids == [1]
    assert_bystander_intact(pair, stream)
    finish(pair)


def test_handshake_frame_in_a_session_closes_the_subflow() -> None:
    pair = SessionPair(k=2)
    stream = bystander(pair)
    pair.inject(1, C2S, [wire.Challenge(1, b"n" * 32)])
    assert pair.server_owner.closed_subflows == [
        (1, "unexpected Challenge frame in an open session")
    ]
    assert_bystander_intact(pair, stream)
    finish(pair)


# ----------------------------------------------------------------- timers


def test_ack_is_delayed_then_sent_by_the_timer() -> None:
    pair = SessionPair(k=1)
    stream_id = opened(pair)
    start = pair.clock.seconds()
    pair.write(CLIENT, stream_id, b"tiny")
    pair.deliver(1, C2S)
    assert pair.in_flight(1, S2C) == []  # under the ACK threshold: wait
    ack_delay = pair.server.config.ack_delay
    assert pair.server.next_deadline() == start + ack_delay
    assert sorted(c.getTime() for c in pair.clock.getDelayedCalls())[0] == start + ack_delay
    pair.advance(ack_delay)
    assert pair.in_flight(1, S2C) == [wire.Ack(stream_id, 4, 4 + 4 * MiB)]
    pair.write(CLIENT, stream_id, b"", eof=True)
    pair.write(SERVER, stream_id, b"", eof=True)
    finish(pair)


def test_heartbeats_and_dead_subflow() -> None:
    config = SessionConfig(heartbeat_interval=4.0, dead_interval=12.0)
    pair = SessionPair(k=3, config=config)
    # Idle since t=0: both sides owe a PING at t=4 and nothing before.
    assert pair.client.next_deadline() == 4.0
    assert pair.server.next_deadline() == 4.0
    assert sorted(c.getTime() for c in pair.clock.getDelayedCalls()) == [4.0, 4.0]
    pair.advance(3.5)
    assert pair.pending() == 0
    pair.advance(0.5)
    for sid in (1, 2, 3):
        assert pair.in_flight(sid, C2S) == [wire.Ping(4_000_000)]
        assert pair.in_flight(sid, S2C) == [wire.Ping(4_000_000)]
    pair.deliver_all()
    for sid in (1, 2, 3):
        assert pair.client.subflow(sid).srtt == 0.0
        assert pair.server.subflow(sid).srtt == 0.0
    assert pair.client.next_deadline() == 8.0

    # Subflow 1 goes silent (a black hole); 2 and 3 keep answering.
    pair.hold(1)
    for _ in range(2):
        pair.advance(4.0)
        pair.deliver_all()
    assert pair.clock.seconds() == 12.0
    assert pair.client.subflow_ids == [1, 2, 3]
    pair.advance(3.999)
    assert pair.client.subflow_ids == [1, 2, 3]
    pair.advance(0.001)  # t=16: nothing on subflow 1 since t=4
    closes = pair.client_owner.closed_subflows + pair.server_owner.closed_subflows
    assert closes == [(1, "silent for 12 s")]
    assert pair.client.subflow_ids == [2, 3]
    assert pair.server.subflow_ids == [2, 3]
    assert pair.in_flight(1, C2S) == []
    pair.deliver_all()
    finish(pair)


def test_heartbeat_deadline_is_met_at_inexact_times() -> None:
    # 5.002 + 5.0 - 5.002 < 5.0 in floating point: the timer must still send
    # its PING at the deadline it asked for, not fire again and again.
    pair = SessionPair(k=1)
    opened(pair)  # the last frames leave at t=0.002
    assert pair.client.next_deadline() == 0.002 + 5.0
    pair.advance(6.0)
    pair.advance(6.0)
    pings = [wire.Ping(int(t * 1e6)) for t in (0.002 + 5.0, 0.002 + 5.0 + 5.0)]
    assert pair.in_flight(1, C2S) == pings
    assert pair.in_flight(1, S2C) == pings
    assert pair.client.next_deadline() == 0.002 + 5.0 + 5.0 + 5.0  # dead at t=15.002
    pair.advance(3.0)
    assert pair.client_owner.closed_subflows + pair.server_owner.closed_subflows == [
        (1, "silent for 15 s")
    ]
    assert pair.client.subflow_ids == []
    pair.shutdown()
    assert pair.clock.getDelayedCalls() == []


def test_traffic_postpones_the_heartbeat() -> None:
    # Times that are exact in binary floating point, so deadlines compare exactly.
    # initial_rto beyond the heartbeat, so only heartbeat deadlines show here.
    config = SessionConfig(
        heartbeat_interval=4.0, dead_interval=12.0, ack_delay=0.25, initial_rto=8.0
    )
    pair = SessionPair(k=1, config=config)
    pair.advance(3.0)
    stream_id = pair.open_stream()  # the OPEN leaves the client at t=3
    assert pair.client.next_deadline() == 7.0
    assert pair.server.next_deadline() == 4.0  # the server has sent nothing
    pair.deliver_all()  # OPEN_OK leaves the server at t=3
    assert pair.server.next_deadline() == 3.25  # its ACK of the OPEN is due
    pair.advance(0.25)  # the delayed ACKs leave both sides at t=3.25
    # Each side acknowledges the other's stream 0: OPEN_OK (14 bytes), OPEN (22).
    assert pair.in_flight(1, C2S) == [wire.Ack(0, 14, 14 + 256 * KiB)]
    assert pair.in_flight(1, S2C) == [wire.Ack(0, 22, 22 + 256 * KiB)]
    pair.deliver_all()
    assert pair.client.next_deadline() == 7.25
    assert pair.server.next_deadline() == 7.25
    pair.advance(4.0)
    assert pair.in_flight(1, C2S) == [wire.Ping(7_250_000)]
    assert pair.in_flight(1, S2C) == [wire.Ping(7_250_000)]
    pair.write(CLIENT, stream_id, b"", eof=True)
    pair.write(SERVER, stream_id, b"", eof=True)
    finish(pair)


def test_grace_period_then_every_stream_is_reset() -> None:
    pair = SessionPair(k=2)
    a, b = opened(pair), opened(pair)
    pair.write(CLIENT, a, payload(80, 1 * MiB))
    pair.write(SERVER, b, payload(81, 1 * MiB))
    pair.deliver_all()
    lost_at = pair.clock.seconds()
    pair.kill_subflow(1)
    assert pair.client.next_deadline() != lost_at + 30.0  # one subflow left
    pair.kill_subflow(2)
    assert pair.client.next_deadline() == lost_at + 30.0
    assert pair.server.next_deadline() == lost_at + 30.0
    pair.advance(29.5)
    assert not pair.client.closed
    assert pair.client_owner.resets == []
    pair.advance(0.5)
    for owner in (pair.client_owner, pair.server_owner):
        assert owner.session_closes == ["no subflow for the grace period"]
        assert sorted(owner.resets) == [(a, RESET_GENERAL), (b, RESET_GENERAL)]
        assert owner.closed_streams == []
    assert pair.client.closed and pair.server.closed
    assert pair.client.stream_ids == [] and pair.server.stream_ids == []
    assert pair.client.next_deadline() is None
    assert pair.server.next_deadline() is None
    assert pair.clock.getDelayedCalls() == []


def test_pending_ack_does_not_spin_the_timer_without_subflows() -> None:
    pair = SessionPair(k=2)
    stream_id = opened(pair)
    pair.write(SERVER, stream_id, b"x" * 1000)
    pair.deliver_all()  # the client's ACK now waits for its 2 ms timer
    now = pair.clock.seconds()
    assert pair.client.next_deadline() == now + pair.client.config.ack_delay
    pair.kill_subflow(1)
    pair.kill_subflow(2)
    # Nothing to send the ACK on: the next deadline is the grace period.
    assert pair.client.next_deadline() == now + pair.client.config.grace_period
    pair.advance(1.0)
    new = pair.add_subflow()  # a re-dial in time: the ACK goes now
    pair.settle()
    assert pair.client.subflow_ids == [new]
    pair.write(CLIENT, stream_id, b"", eof=True)
    pair.write(SERVER, stream_id, b"", eof=True)
    finish(pair)


def test_session_resumes_when_a_subflow_rejoins_within_grace() -> None:
    pair = SessionPair(k=2)
    stream_id = opened(pair)
    up, down = payload(82, 2 * MiB), payload(83, 2 * MiB)
    pair.write(CLIENT, stream_id, up, eof=True)
    pair.write(SERVER, stream_id, down, eof=True)
    pair.deliver_all()
    pair.kill_subflow(1)
    pair.kill_subflow(2)
    pair.advance(20.0)
    assert not pair.client.closed
    pair.add_subflow()
    pair.add_subflow()
    assert pair.client.next_deadline() != pair.clock.seconds() + 10.0
    pair.settle()
    assert sha(pair.server_owner.data(stream_id)) == sha(up)
    assert sha(pair.client_owner.data(stream_id)) == sha(down)
    assert pair.client_owner.session_closes == []
    finish(pair)


def test_payload_byte_counters() -> None:
    pair = SessionPair(k=2)
    stream_id = opened(pair)
    pair.write(CLIENT, stream_id, b"a" * 1000, eof=True)
    pair.write(SERVER, stream_id, b"", eof=True)
    pair.settle()
    tx_real = sum(pair.client.subflow(s).tx_real for s in pair.client.subflow_ids)
    rx_real = sum(pair.server.subflow(s).rx_real for s in pair.server.subflow_ids)
    # Only stream payload is "real"; stream 0 (OPEN 22 + FIN 15) is overhead.
    control_bytes = sum(len(f.payload) for fs in data_frames(pair, CLIENT, 0).values() for f in fs)
    assert control_bytes == 22 + 15
    assert tx_real == rx_real == 1000
    tx_dummy = sum(pair.client.subflow(s).tx_dummy for s in pair.client.subflow_ids)
    assert tx_dummy > control_bytes
    finish(pair)


@pytest.mark.parametrize("crc", [False, True])
def test_byte_counters_add_up_to_the_bytes_on_the_wire(crc: bool) -> None:
    """rx_real + rx_dummy is every byte the peer wrote: the decoder reports each
    frame's wire size, CRC32C trailer included (with --no-tls, ACKs, PINGs,
    PONGs and GOAWAYs were once counted 4 bytes short each)."""
    pair = SessionPair(k=2, config=SessionConfig(crc=crc))
    stream_id = opened(pair)
    pair.write(CLIENT, stream_id, payload(90, 300 * KiB))
    pair.write(SERVER, stream_id, payload(91, 100 * KiB))
    pair.settle()
    pair.advance(6.0)  # heartbeats: a PING and a PONG each way on every subflow
    pair.go_away(SERVER, "counted too")
    pair.settle()
    assert pair.pending() == 0
    for side, peer in ((SERVER, CLIENT), (CLIENT, SERVER)):
        on_wire = sum(len(data) for data in pair.owner(peer).sent.values())
        received, sent = pair.session(side).counters(), pair.session(peer).counters()
        assert received["rx_real"] + received["rx_dummy"] == on_wire
        assert sent["tx_real"] + sent["tx_dummy"] == on_wire
        assert received["rx_real"] == sent["tx_real"]
    pair.write(CLIENT, stream_id, b"", eof=True)
    pair.write(SERVER, stream_id, b"", eof=True)
    finish(pair)


# ---------------------------------------------------------------- property

SMALL = SessionConfig(
    chunk_size=4 * KiB,
    stream_window=16 * KiB,
    session_window=48 * KiB,
    min_stream_window=8 * KiB,
    send_buffer=16 * KiB,
    ack_threshold=8 * KiB,
)
STREAMS = 3
SIDES: tuple[Side, Side] = (CLIENT, SERVER)
index = st.integers(0, 7)
side = st.sampled_from(SIDES)
stream_index = st.integers(0, STREAMS - 1)
operations = st.one_of(
    st.tuples(st.just("deliver"), st.integers(1, 40)),
    st.tuples(st.just("round")),
    st.tuples(st.just("drain"), index, st.sampled_from([C2S, S2C])),
    st.tuples(st.just("kill"), index),
    st.tuples(st.just("add")),
    st.tuples(st.just("hold"), index, st.sampled_from([C2S, S2C])),
    st.tuples(st.just("release"), index),
    st.tuples(st.just("writable"), index, side, st.booleans()),
    st.tuples(st.just("sink"), stream_index, side, st.booleans()),
    # Mostly ACK-timer steps; sometimes long enough for heartbeats and silence.
    st.tuples(st.just("advance"), st.sampled_from([0.001, 0.002, 0.01, 0.1, 0.25, 3.0, 6.0])),
    st.tuples(st.just("write"), stream_index, side, st.integers(1, 40 * KiB)),
    st.tuples(st.just("write"), stream_index, side, st.integers(1, 40 * KiB)),
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(0, 64 * KiB), min_size=2 * STREAMS, max_size=2 * STREAMS),
    st.lists(operations, min_size=10, max_size=80),
    st.integers(0, 2**32),
    st.sampled_from([None, 6 * KiB, 32 * KiB]),
    st.sampled_from([4 * KiB, 32 * KiB]),  # below and above the stream window
    st.booleans(),
)
def test_random_schedules_deliver_every_byte(
    initial: list[int],
    ops: list[tuple[Any, ...]],
    seed: int,
    capacity: int | None,
    ack_threshold: int,
    crc: bool,
) -> None:
    config = dataclasses.replace(SMALL, ack_threshold=ack_threshold, crc=crc)
    # A small initial credit (both sides read the config module constant), so that
    # credit, not the 256 KiB default, limits the senders most of the time.
    with mock.patch.object(session_config, "INITIAL_WINDOW", 8 * KiB):
        run_schedule(config, initial, ops, seed, capacity, 8 * KiB)


def assert_within_credit(pair: SessionPair) -> None:
    """No sender has sent past its credit, and no sender believes in more
    credit than its peer granted (the limit only comes from the peer's ACKs)."""
    for who, peer in ((CLIENT, SERVER), (SERVER, CLIENT)):
        mine = pair.session(who)._streams
        theirs = pair.session(peer)._streams
        for stream_id, stream in mine.items():
            assert stream.send.next_offset <= stream.send.limit, (who, stream_id)
            other = theirs.get(stream_id)
            if other is not None:
                assert stream.send.limit <= other.recv.advertised, (who, stream_id)


def run_schedule(
    config: SessionConfig,
    initial: list[int],
    ops: list[tuple[Any, ...]],
    seed: int,
    capacity: int | None,
    initial_window: int,
) -> None:
    """Play ``ops`` on a fresh pair, heal everything, and check every byte arrived."""
    pair = SessionPair(k=3, config=config, capacity=capacity, read_size=config.chunk_size)
    # Per stream: a send queue of at most send_buffer plus one read, unacked
    # chunks and a reorder buffer each within the credit given; stream 0 aside.
    credit = max(initial_window, config.stream_window)
    bound = STREAMS * (config.send_buffer + config.chunk_size + 2 * credit) + 4 * KiB
    rng = random.Random(seed)
    ids = [pair.open_stream(f"h{i}.example", 80) for i in range(STREAMS)]
    sent: dict[tuple[Side, int], bytearray] = {(s, i): bytearray() for s in SIDES for i in ids}
    sinks: set[tuple[Side, int]] = set()
    ops = [("write", i % STREAMS, SIDES[i // STREAMS], n) for i, n in enumerate(initial)] + ops

    def pick_alive(i: int) -> int:
        alive = pair.alive
        return alive[i % len(alive)]

    for op in ops:
        kind = op[0]
        if not pair.alive:
            pair.add_subflow()  # every subflow fell silent: re-dial
        if kind == "deliver":
            pair.deliver_random(rng, op[1])
        elif kind == "round":
            pair.deliver_round()
        elif kind == "drain":
            pair.deliver(pick_alive(op[1]), op[2])
        elif kind == "kill":
            if len(pair.alive) == 1:
                pair.add_subflow()
            pair.kill_subflow(pick_alive(op[1]))
        elif kind == "add":
            if len(pair.alive) < 6:
                pair.add_subflow()
        elif kind == "hold":
            pair.hold(pick_alive(op[1]), op[2])
        elif kind == "release":
            pair.release(pick_alive(op[1]))
        elif kind == "writable":
            pair.set_writable(pick_alive(op[1]), op[3], op[2])
        elif kind == "sink":
            stream_id, who, paused = ids[op[1]], op[2], op[3]
            if pair.session(who).has_stream(stream_id):
                pair.sink_paused(who, stream_id, paused)
                (sinks.add if paused else sinks.discard)((who, stream_id))
        elif kind == "advance":
            pair.advance(op[1])
        else:
            stream_id, who, size = ids[op[1]], op[2], op[3]
            data = rng.randbytes(size)
            sent[(who, stream_id)] += data
            pair.write(who, stream_id, data)
        for who in SIDES:
            assert pair.session(who).buffered_bytes() <= bound
        assert_within_credit(pair)

    # Heal the network, let every local peer read and finish, and settle.
    if not pair.alive:
        pair.add_subflow()
    for sid in pair.alive:
        pair.release(sid)
        pair.set_writable(sid, True)
    for who, stream_id in sinks:
        if pair.session(who).has_stream(stream_id):
            pair.sink_paused(who, stream_id, False)
    for who in SIDES:
        for stream_id in ids:
            pair.write(who, stream_id, b"", eof=True)
    pair.settle(rng=rng)

    for stream_id in ids:
        assert pair.server_owner.data(stream_id) == sent[(CLIENT, stream_id)]
        assert pair.client_owner.data(stream_id) == sent[(SERVER, stream_id)]
    for owner in (pair.client_owner, pair.server_owner):
        assert sorted(owner.closed_streams) == ids
        assert sorted(owner.eofs) == ids
        assert owner.resets == []
        # Subflows only ever close for silence, never for a protocol error.
        assert all(reason.startswith("silent") for _, reason in owner.closed_subflows)
    finish(pair)
