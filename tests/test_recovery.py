"""Loss recovery in the session core: timeouts, re-injection, re-ACK (SPEC.md section 6)."""

from __future__ import annotations

import random

from stripeproxy.core import wire
from stripeproxy.core.session import KiB, MiB, SessionConfig
from stripeproxy.testing import C2S, CLIENT, S2C, SERVER, SessionPair


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def run_until(pair: SessionPair, done: object, step: float = 0.05, limit: float = 12.0) -> None:
    """Deliver and let time pass in small steps until ``done()`` (bounded)."""
    start = pair.clock.seconds()
    while not done():  # type: ignore[operator]
        assert pair.clock.seconds() - start < limit, "did not finish in time"
        pair.settle()
        pair.advance(step)


def test_black_holed_subflow_loses_nothing_and_is_avoided() -> None:
    pair = SessionPair(k=3)
    pair.hold(1)  # subflow 1 swallows everything from now on, no reset
    stream_id = pair.open_stream()
    run_until(pair, lambda: pair.client_owner.open_results)
    up, down = payload(1, 2 * MiB), payload(2, 1 * MiB)
    pair.write(CLIENT, stream_id, up, eof=True)
    pair.write(SERVER, stream_id, down, eof=True)
    run_until(
        pair,
        lambda: pair.client_owner.finished(stream_id) and pair.server_owner.finished(stream_id),
    )
    assert pair.server_owner.data(stream_id) == up
    assert pair.client_owner.data(stream_id) == down
    for session in (pair.client, pair.server):
        assert session.stats_timeouts >= 1
        assert session.counters()["timeouts"] == session.stats_timeouts
        assert session.counters()["requeued_timeout"] > 0  # counted by cause
    # Once suspect, the black hole got at most the chunks that first revealed it.
    held = sum(len(f.payload) for f in pair.in_flight(1, C2S) if hasattr(f, "payload"))
    assert held <= 256 * KiB
    assert pair.client.subflow(1).suspect
    pair.kill_subflow(1)
    pair.settle()
    pair.assert_idle()
    pair.shutdown()
    assert pair.clock.getDelayedCalls() == []


def test_hole_held_by_a_slow_subflow_is_reinjected_once() -> None:
    pair = SessionPair(k=2, config=SessionConfig(ack_delay=0.002))
    stream_id = pair.open_stream()
    run_until(pair, lambda: pair.client_owner.open_results, step=0.01)
    # Warm up: both subflows carry acknowledged chunks, so RTTs are known.
    warm = payload(3, 512 * KiB)
    pair.write(CLIENT, stream_id, warm)
    pair.settle()
    pair.advance(0.01)
    pair.settle()
    assert all(pair.client.subflow(s).srtt is not None for s in (1, 2))
    pair.hold(1, C2S)  # subflow 1 becomes very slow client -> server
    rest = payload(4, 2 * MiB)
    pair.write(CLIENT, stream_id, rest, eof=True)
    for _ in range(60):  # 0.3 s: long enough for a timeout to catch the tail too
        pair.settle()
        pair.advance(0.005)
    assert pair.client.stats_reinjected > 0
    assert pair.client.stats_reinjected % (64 * KiB) == 0
    # Everything arrived over subflow 2 while subflow 1 still holds its copies.
    assert pair.server_owner.data(stream_id) == warm + rest
    assert any(pair.in_flight(1, C2S))
    reinjected = pair.client.stats_reinjected
    pair.release(1, C2S)  # the late copies arrive and are dropped as duplicates
    pair.write(SERVER, stream_id, b"", eof=True)
    pair.settle()
    assert pair.server_owner.data(stream_id) == warm + rest
    assert pair.client.stats_reinjected == reinjected
    pair.assert_idle()
    pair.shutdown()
    assert pair.clock.getDelayedCalls() == []


def test_rto_follows_measured_rtt() -> None:
    config = SessionConfig(min_rto=0.2, initial_rto=1.0, ack_delay=0.002)
    pair = SessionPair(k=1, config=config)
    stream_id = pair.open_stream()
    sent_at = pair.clock.seconds()
    # Before any sample the first chunk (the OPEN) times out after initial_rto.
    assert pair.client.next_deadline() == sent_at + 1.0
    pair.advance(0.1)
    pair.settle()
    srtt = pair.client.subflow(1).srtt
    assert srtt is not None and 0.1 <= srtt <= 0.11
    pair.write(CLIENT, stream_id, b"x" * 1000)
    now = pair.clock.seconds()
    sf = pair.client.subflow(1)
    expected = max(0.2, 2 * sf.srtt + 4 * sf.rttvar + 0.002)  # type: ignore[operator]
    assert abs(pair.client.next_deadline() - (now + expected)) < 1e-9  # type: ignore[operator]
    pair.write(CLIENT, stream_id, b"", eof=True)
    pair.write(SERVER, stream_id, b"", eof=True)
    pair.settle()
    pair.assert_idle()
    pair.shutdown()


def test_protocol_error_in_the_control_stream_ends_the_session() -> None:
    pair = SessionPair(k=2)
    stream_id = pair.open_stream()
    pair.settle()
    # A control message of unknown type 0x7f at the next control offset.
    offset = pair.server.stream_progress(0)[1]  # control bytes received so far
    pair.inject(1, C2S, [wire.Data(0, offset, b"\x7f\x00\x00")])
    pair.deliver_all()
    assert (
        pair.server_owner.session_closes and "protocol error" in pair.server_owner.session_closes[0]
    )
    assert (stream_id, 1) in [(s, c) for s, c in pair.server_owner.resets]
    pair.close(CLIENT, "test over")


def test_final_ack_lost_after_a_sack_still_finishes_the_stream() -> None:
    """The tail was SACKed, the head arrived last, and the final cumulative ACK
    died with its subflow after the server had already forgotten the stream:
    the late copy's ACK covers only the head, and the client must still finish
    (SACKs are firm, SPEC.md section 4).  Before that rule the client kept the
    stream for ever."""
    # The placement below is the plain policy's (the product default is adaptive).
    pair = SessionPair(k=2, config=SessionConfig(scheduler="least-queued"))
    stream_id = pair.open_stream()
    pair.settle()
    pair.write(SERVER, stream_id, b"", eof=True)
    pair.settle()
    pair.write(CLIENT, stream_id, payload(5, 128 * KiB), eof=True)

    # Chunk 0 went on one subflow, chunk 1 on the other (the FIN, a control
    # message, on either).
    def chunks(sid: int) -> list[int]:
        frames = pair.in_flight(sid, C2S)
        return [f.offset for f in frames if isinstance(f, wire.Data) and f.stream_id == stream_id]

    head, tail = sorted(pair.alive, key=chunks)
    assert chunks(head) == [0] and chunks(tail) == [64 * KiB]
    pair.deliver(tail, C2S)
    pair.advance(0.05)  # the ACK delay passes: an ACK with a SACK for chunk 1 goes out
    pair.deliver_all(directions=[S2C])
    send = pair.client._streams[stream_id].send
    assert list(send.unacked) == [0] and send.acked == 0
    pair.deliver(head, C2S)  # chunk 0 arrives: the server is done and forgets the stream
    assert pair.server.stream_ids == []
    carrier = [
        s for s in pair.alive if any(isinstance(f, wire.Ack) for f in pair.in_flight(s, S2C))
    ]
    assert len(carrier) == 1
    pair.kill_subflow(carrier[0])  # the final ACK is lost
    pair.add_subflow()
    run_until(pair, lambda: pair.client_owner.finished(stream_id))
    assert pair.server_owner.data(stream_id) == payload(5, 128 * KiB)
    pair.assert_idle()
    pair.shutdown()


def test_timeout_never_resends_on_the_subflow_that_holds_the_chunk() -> None:
    """With one subflow a copy could only follow the original down the same
    TCP connection: the chunk stays put, its timeout backs off, and the timer
    never spins, even after the backoff reaches max_rto."""
    pair = SessionPair(k=1, config=SessionConfig(max_rto=2.0, dead_interval=60.0))
    stream_id = pair.open_stream()
    run_until(pair, lambda: pair.client_owner.open_results)
    pair.hold(1, C2S)
    data = payload(9, 256 * KiB)
    pair.write(CLIENT, stream_id, data, eof=True)
    for _ in range(40):  # 20 s: the RTO backs off to max_rto and stays there
        now = pair.clock.seconds()
        deadline = pair.client.next_deadline()
        assert deadline is not None and deadline > now  # nothing overdue: no spin
        pair.advance(0.5)
    assert pair.client.stats_timeouts >= 4
    assert pair.client.stats_retransmitted == 0
    assert pair.client.subflow(1).suspect
    pair.release(1, C2S)
    pair.write(SERVER, stream_id, b"", eof=True)
    run_until(pair, lambda: pair.client_owner.finished(stream_id))
    assert pair.server_owner.data(stream_id) == data
    assert pair.client.stats_retransmitted == 0
    pair.assert_idle()
    pair.shutdown()


# ------------------------------------------------- re-injection and queueing


def paced(pair: SessionPair, rates: dict[int, float], seed: int, done: object) -> None:
    """Run a transfer over subflows that each deliver ``rates[sid]`` frames per
    millisecond client -> server (on average, jittered, read in a random order
    each millisecond like a receiver taking its sockets in turn); ACKs come
    back at once.  With the pair's ``capacity``, a sender fills each subflow's
    queue to it, so chunks wait behind others there: ordinary queueing.
    """
    rng = random.Random(seed)
    credit = dict.fromkeys(rates, 0.0)
    start = pair.clock.seconds()
    while not done():  # type: ignore[operator]
        assert pair.clock.seconds() - start < 20.0, "did not finish in time"
        pair.advance(0.001)
        sids = list(rates)
        rng.shuffle(sids)
        for sid in sids:
            credit[sid] += rates[sid] * rng.uniform(0.0, 2.0)
            n = int(credit[sid])
            if n:
                credit[sid] -= n
                pair.deliver(sid, C2S, n)
            pair.deliver(sid, S2C)


def paced_upload(rates: dict[int, float], seed: int, size: int = 16 * MiB) -> SessionPair:
    pair = SessionPair(k=len(rates), capacity=256 * KiB)
    stream_id = pair.open_stream()
    pair.settle()
    data = payload(seed, size)
    pair.write(CLIENT, stream_id, data, eof=True)
    paced(pair, rates, seed, lambda: len(pair.server_owner.data(stream_id)) == size)
    assert pair.server_owner.data(stream_id) == data
    return pair


def test_equal_paths_with_queueing_send_nothing_twice() -> None:
    # Six equal subflows, each with a queue of 256 KiB that drains at a jittery
    # rate: holes come and go as the receiver reads the subflows in turn, and
    # a chunk waits behind others on its subflow, but nothing is ever lost.
    # (Comparing a hole's age with the fastest other subflow's RTT alone re-sent
    # chunks here with two of these seeds.)
    for seed in range(4):
        counters = paced_upload({sid: 1.0 for sid in range(1, 7)}, seed).client.counters()
        assert counters["retransmitted"] == 0, f"seed {seed}"
        assert counters["reinjected"] == 0
        assert counters["timeouts"] == 0


def test_one_slow_path_is_reinjected() -> None:
    # Subflow 1 delivers 20x slower than the others: the holes it leaves go
    # again on a fast subflow, long before any timeout.
    for seed in range(2):
        pair = paced_upload({1: 0.05, **{sid: 1.0 for sid in range(2, 7)}}, seed)
        counters = pair.client.counters()
        assert counters["reinjected"] > 0, f"seed {seed}"
        assert counters["timeouts"] == 0
        assert counters["retransmitted"] == counters["reinjected"]


def test_requeued_bytes_are_counted_by_cause() -> None:
    pair = SessionPair(k=2)
    stream_id = pair.open_stream()
    pair.settle()
    pair.hold(1, C2S)
    pair.write(CLIENT, stream_id, payload(5, 512 * KiB))
    held = sum(len(f.payload) for f in pair.in_flight(1, C2S) if isinstance(f, wire.Data))
    assert held > 0
    pair.kill_subflow(1)
    pair.settle()
    counters = pair.client.counters()
    assert counters["requeued_lost"] == held
    assert counters["requeued_timeout"] == 0


def test_a_lost_grant_is_repeated() -> None:
    """The peer sent up to our limit and everything it sent is acknowledged,
    so it has nothing to time out; the ACK that grants more is lost (a black
    hole on the ACK path).  Without a repeat both sides would wait for each
    other until the dead interval; the receiver repeats the grant after a
    timeout instead (SPEC.md section 6)."""
    pair = SessionPair(k=2, config=SessionConfig(dead_interval=60.0))
    stream_id = pair.open_stream()
    run_until(pair, lambda: pair.client_owner.open_results)
    pair.sink_paused(CLIENT, stream_id, True)  # the local app reads nothing for now
    data = payload(21, 1 * MiB)
    pair.write(SERVER, stream_id, data, eof=True)
    pair.settle()
    pair.advance(0.05)
    pair.settle()
    send = pair.server._streams[stream_id].send
    assert send.next_offset == send.limit and not send.unacked  # blocked, nothing in flight
    pair.sink_paused(CLIENT, stream_id, False)  # the app reads: the client grants more
    carriers = [
        s for s in pair.alive if any(isinstance(f, wire.Ack) for f in pair.in_flight(s, C2S))
    ]
    assert carriers
    for sid in carriers:
        assert pair.swallow(sid, C2S)  # the grant is lost on the way
    limit = send.limit
    pair.settle()
    assert send.limit == limit  # nothing else tells the server
    run_until(pair, lambda: pair.client_owner.finished(stream_id) or bool(pair.client_owner.eofs))
    assert pair.client_owner.data(stream_id) == data
    counters = pair.server.counters()
    assert counters["retransmitted"] == 0 and counters["timeouts"] == 0
    assert pair.client.counters()["subflows_lost"] == 0
    pair.write(CLIENT, stream_id, b"", eof=True)
    pair.settle()
    pair.assert_idle()
    pair.shutdown()
    assert pair.clock.getDelayedCalls() == []
