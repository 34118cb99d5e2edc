"""Duplicates and failover on timed paths, in simulated time (SPEC.md section 6).

Each subflow is a path with a one-way delay and a rate
(:class:`~stripeproxy.testing.paths.TimedPaths`), and the pair's ``capacity``
stands for the congestion window: chunks queue on busy subflows as they do on
real ones, so RTT samples include queueing.  On such paths nothing may be
sent twice unless a path is really slower or stalls; when one stalls (held:
a black hole, no reset), its chunks must move at once and the stream must
not wait for the dead interval.
"""

from __future__ import annotations

import random

import pytest

from stripeproxy.core.session import KiB, MiB, Session
from stripeproxy.testing import C2S, CLIENT, S2C, SERVER, SessionPair
from stripeproxy.testing.links import Direction, Side
from stripeproxy.testing.paths import TimedPaths

RATE = 8e6  # bytes per second and subflow, each way
DELAY = 0.025  # one way: 50 ms RTT


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def start(
    k: int, delay: dict[int, float], seed: int, jitter: float = 0.005, rate_jitter: float = 0.0
) -> tuple[SessionPair, TimedPaths, int]:
    pair = SessionPair(k=k, capacity=256 * KiB)
    rates = dict.fromkeys(range(1, k + 1), RATE)
    paths = TimedPaths(pair, delay, rates, jitter=jitter, rate_jitter=rate_jitter, seed=seed)
    stream_id = pair.open_stream()
    paths.run(lambda: bool(pair.client_owner.open_results), limit=2.0)
    return pair, paths, stream_id


def resent(session: Session) -> dict[str, int]:
    counters = session.counters()
    names = ("retransmitted", "reinjected", "timeouts", "requeued_timeout", "requeued_lost")
    return {name: counters[name] for name in names}


def finish(pair: SessionPair, paths: TimedPaths, stream_id: int, side: Side) -> None:
    """``side`` half-closes too, and the stream ends on both sides."""
    pair.write(side, stream_id, b"", eof=True)
    paths.run(
        lambda: pair.client_owner.finished(stream_id) and pair.server_owner.finished(stream_id),
        limit=5.0,
    )


@pytest.mark.parametrize(
    "delay", [pytest.param(0.001, id="loopback"), pytest.param(DELAY, id="wan")]
)
@pytest.mark.parametrize("seed", range(3))
def test_equal_paths_with_queueing_send_nothing_twice(seed: int, delay: float) -> None:
    # Six equal paths, each direction full and drained unevenly tick by tick:
    # chunks wait behind others on their subflow and holes come and go as the
    # frames of six paths interleave, but nothing is lost, so nothing may go
    # twice.  With loopback-like delays the queueing is most of the RTT, and
    # comparing a hole's age with the fastest other subflow's RTT alone
    # re-sent chunks with two of these three seeds.
    pair, paths, stream_id = start(6, dict.fromkeys(range(1, 7), delay), seed, rate_jitter=1.0)
    up, down = payload(seed, 24 * MiB), payload(seed + 100, 24 * MiB)
    pair.write(CLIENT, stream_id, up, eof=True)
    pair.write(SERVER, stream_id, down, eof=True)
    paths.run(
        lambda: pair.client_owner.finished(stream_id) and pair.server_owner.finished(stream_id),
        limit=20.0,
    )
    assert pair.server_owner.data(stream_id) == up
    assert pair.client_owner.data(stream_id) == down
    # The run was busy enough to reorder: the receivers held data beyond holes.
    for session in (pair.client, pair.server):
        assert resent(session) == dict.fromkeys(resent(session), 0)
    pair.settle()
    pair.assert_idle()
    pair.shutdown()


@pytest.mark.parametrize("seed", range(2))
def test_a_ten_times_slower_path_is_reinjected(seed: int) -> None:
    # Path 1 has ten times the RTT of the others: the holes it leaves hold the
    # stream back, and a copy on a fast path arrives long before the original.
    delay = {1: 10 * DELAY, **dict.fromkeys(range(2, 5), DELAY)}
    pair, paths, stream_id = start(4, delay, seed, jitter=0.0)
    data = payload(seed, 24 * MiB)
    pair.write(CLIENT, stream_id, data, eof=True)
    paths.run(lambda: len(pair.server_owner.data(stream_id)) == len(data), limit=20.0)
    assert pair.server_owner.data(stream_id) == data
    counters = resent(pair.client)
    assert counters["reinjected"] > 0
    assert counters["timeouts"] == 0  # re-injection, not the timeout, moved the holes
    assert counters["retransmitted"] == counters["reinjected"]
    finish(pair, paths, stream_id, SERVER)
    pair.shutdown()


# ------------------------------------------------------------- failover

#: (what is held, from which side's point of view): "both" is a dead path;
#: "data" loses only what the sender sends; "acks" only what the receiver sends.
HOLDS = ["both", "data", "acks"]


def held_direction(sender: Side, hold: str) -> Direction | None:
    data = C2S if sender == CLIENT else S2C
    if hold == "both":
        return None
    if hold == "data":
        return data
    return S2C if data == C2S else C2S


@pytest.mark.parametrize("kind", ["hold", "swallow"])
@pytest.mark.parametrize("hold", HOLDS)
@pytest.mark.parametrize("sender", [CLIENT, SERVER])
def test_black_hole_mid_transfer_moves_everything_within_a_second(
    sender: Side, hold: str, kind: str
) -> None:
    """A path black-holes mid-transfer (no reset: the dead interval of 15 s is
    far away): the bytes delivered to the receiver never stop for more than
    a second of simulated time at a 50 ms RTT, nothing is lost, and once the
    path comes back it carries chunks again.

    A held path fills up and stops taking chunks; a swallowing one stays
    writable, so only the suspect mark keeps new chunks off it (each one
    there would hold the stream for a timeout)."""
    k = 4
    pair, paths, stream_id = start(k, dict.fromkeys(range(1, k + 1), DELAY), seed=7)
    receiver = SERVER if sender == CLIENT else CLIENT
    out = pair.owner(receiver)
    data = payload(11, 32 * MiB)
    pair.write(sender, stream_id, data, eof=True)
    paths.run(lambda: len(out.data(stream_id)) >= 8 * MiB, limit=10.0)
    lost_direction = held_direction(sender, hold)
    if kind == "hold":
        pair.hold(1, lost_direction)
    else:
        paths.swallowed.update((1, d) for d in (C2S, S2C) if lost_direction in (None, d))
    held_at = pair.clock.seconds()
    progress = {"bytes": float(len(out.received[stream_id])), "at": held_at, "gap": 0.0}

    session = pair.session(sender)
    stalled = session.subflow(1)
    payload_then: list[int] = []  # stalled.tx_real when it turned suspect

    def sample() -> None:
        if stalled.suspect and not payload_then:
            payload_then.append(stalled.tx_real)
        now = pair.clock.seconds()
        got = len(out.received[stream_id])
        if got > progress["bytes"]:
            progress["gap"] = max(progress["gap"], now - progress["at"])
            progress["bytes"], progress["at"] = got, now

    paths.run(lambda: len(out.received[stream_id]) == len(data), limit=10.0, each=sample)
    assert out.data(stream_id) == data
    print(f"\n{sender} sends, {hold} held: longest gap {progress['gap']:.3f} s (simulated)")
    assert progress["gap"] <= 1.0, progress
    assert session.counters()["subflows_lost"] == 0  # not the dead interval
    if hold != "acks":
        assert session.stats_timeouts >= 1
        assert stalled.suspect
        assert session.counters()["requeued_timeout"] > 0
        # Once suspect, it got no new chunk: the others took everything.
        assert payload_then == [stalled.tx_real]
    if kind == "swallow":
        # What it swallowed is gone for good: on a real connection TLS or the
        # CRC would end the subflow when it comes back.
        pair.kill_subflow(1)
        finish(pair, paths, stream_id, receiver)
        pair.shutdown()
        return
    # The path comes back: what it held arrives (duplicates, dropped), its
    # probe is answered, and it carries new chunks again.
    pair.release(1)
    paths.run(lambda: not pair.session(sender).subflow(1).suspect, limit=2.0)
    before = session.subflow(1).tx_real
    # A second stream, since the first one's sending direction is closed.
    second = pair.open_stream()
    paths.run(lambda: any(r[0] == second for r in pair.client_owner.open_results), limit=2.0)
    more = payload(12, 8 * MiB)
    pair.write(sender, second, more, eof=True)
    paths.run(lambda: len(out.data(second)) == len(more), limit=10.0)
    assert out.data(second) == more
    assert session.subflow(1).tx_real > before
    finish(pair, paths, stream_id, receiver)
    finish(pair, paths, second, receiver)
    pair.shutdown()
