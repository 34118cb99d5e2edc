"""The session's parts on their own, on plain float times: recovery returns the
chunks to send again, the ACK batcher decides what is due, credit bounds."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import stripeproxy.core.session
import stripeproxy.net.driver
from stripeproxy.core import wire
from stripeproxy.core.session.acks import AckBatcher
from stripeproxy.core.session.config import KiB, MiB, SessionConfig
from stripeproxy.core.session.credit import Credit
from stripeproxy.core.session.recovery import Recovery, SubflowState
from stripeproxy.core.session.stream import Chunk, Stream, StreamState

CONFIG = SessionConfig(min_rto=0.2, initial_rto=1.0, max_rto=10.0, ack_delay=0.002)


def stream(stream_id: int = 1, state: StreamState = StreamState.OPEN) -> Stream:
    return Stream(stream_id, 256 * KiB, 256 * KiB, state, 0.0)


def send(recovery: Recovery, st: Stream, sf: SubflowState, size: int, now: float) -> Chunk:
    st.send.enqueue(b"x" * size, CONFIG.chunk_size)
    chunk = st.send.take(st, size)
    recovery.sent(sf, chunk, now)
    return chunk


# ---------------------------------------------------------------- recovery


def test_expire_returns_the_overdue_chunks_and_asks_for_one_probe() -> None:
    recovery = Recovery(CONFIG)
    slow, fast = recovery.add(1, 0.0), recovery.add(2, 0.0)
    st = stream()
    first = send(recovery, st, slow, 1000, now=0.0)
    second = send(recovery, st, slow, 1000, now=0.5)
    assert recovery.rto_expiry(slow) == 1.0  # no RTT yet: the initial RTO
    assert recovery.expire(slow, 0.999) == ([], False)
    requeue, probe = recovery.expire(slow, 1.0)
    # Only the first is overdue, but TCP order holds the second behind it:
    # both go again at once, and one PING probes the subflow.
    assert requeue == [first, second] and probe
    for chunk in (first, second):
        assert chunk.sid is None and chunk.avoid == 1 and chunk.retries == 1
    assert slow.suspect and slow.inflight == 0
    assert recovery.timeouts == 1
    assert recovery.counters()["requeued_timeout"] == 2000
    assert recovery.usable() == [fast]  # no new chunk for the stalled subflow
    third = send(recovery, st, slow, 1000, now=1.0)  # say it was the only one writable
    requeue, probe = recovery.expire(slow, 3.0)
    assert requeue == [third] and not probe  # already suspect: no second PING
    assert fast.inflight == 0
    recovery.acked(first, 3.1)  # a late ACK of a moved chunk is no sign of life here
    assert slow.suspect
    fourth = send(recovery, st, slow, 1000, now=3.1)
    recovery.acked(fourth, 3.2)  # a chunk it carried is acknowledged: alive again
    assert not slow.suspect and recovery.usable() == [slow, fast]


def test_without_another_healthy_subflow_a_timeout_only_backs_off() -> None:
    recovery = Recovery(CONFIG)
    only = recovery.add(1, 0.0)
    chunk = send(recovery, stream(), only, 1000, now=0.0)
    requeue, probe = recovery.expire(only, 1.0)
    assert requeue == [] and probe
    assert chunk.sid == 1 and chunk.retries == 1
    assert recovery.rto_expiry(only) == 1.0 + 2.0  # watched afresh, twice as long


def test_remove_returns_everything_the_subflow_carried() -> None:
    recovery = Recovery(CONFIG)
    gone, other = recovery.add(1, 0.0), recovery.add(2, 0.0)
    a, b = stream(1), stream(3)
    lost = [send(recovery, a, gone, 100, 0.0), send(recovery, b, gone, 100, 0.0)]
    kept = send(recovery, a, other, 100, 0.0)
    gone.tx_real = 500
    assert recovery.remove(1, [a, b]) == lost
    assert all(c.sid is None and c.avoid is None for c in lost)
    assert kept.sid == 2
    assert recovery.remove(1, [a, b]) is None  # already gone
    assert recovery.counters()["tx_real"] == 500  # its counters are kept
    assert recovery.subflows_lost == 1


def test_remove_resends_the_last_chunk_once_our_fin_is_out() -> None:
    """A finished peer cannot repeat a final ACK lost with the subflow."""
    recovery = Recovery(CONFIG)
    gone, other = recovery.add(1, 0.0), recovery.add(2, 0.0)
    st = stream()
    send(recovery, st, gone, 100, 0.0)
    last = send(recovery, st, other, 100, 0.0)
    st.send.fin_offset = st.send.next_offset
    requeue = recovery.remove(1, [st])
    assert requeue is not None and requeue[-1] is last
    assert last.sid is None and last.avoid == 2 and other.inflight == 0


def test_reinject_waits_for_twice_the_fastest_rtt_then_says_so_once() -> None:
    recovery = Recovery(CONFIG)
    slow, fast = recovery.add(1, 0.0), recovery.add(2, 0.0)
    fast.rtt_sample(0.010)
    st = stream()
    head = send(recovery, st, slow, 1000, now=1.0)
    assert not recovery.reinject(st, head, 1.01)
    assert recovery.reinject_checks == {st: 1.0 + 0.020 + 0.002}
    assert recovery.due_checks(1.02) == []
    assert recovery.due_checks(1.022) == [st] and not recovery.reinject_checks
    assert recovery.reinject(st, head, 1.022)
    assert head.reinjected and head.sid is None and recovery.reinjected == 1000
    assert not recovery.reinject(st, head, 2.0)  # at most once per chunk


def test_acked_chunks_sample_rtt_except_after_a_timeout() -> None:
    recovery = Recovery(CONFIG)
    sf = recovery.add(1, 0.0)
    st = stream()
    chunk = send(recovery, st, sf, 1000, now=0.0)
    recovery.acked(chunk, 0.05)
    assert sf.srtt == 0.05 and sf.rttvar == 0.025 and sf.inflight == 0
    retried = send(recovery, st, sf, 1000, now=1.0)
    retried.retries = 1
    recovery.acked(retried, 3.0)
    assert sf.srtt == 0.05  # Karn: no sample from a chunk that timed out
    assert recovery.rto(sf) == max(0.2, 2 * 0.05 + 4 * 0.025 + 0.002)


# -------------------------------------------------------------------- acks


def ack_config(**kw: object) -> SessionConfig:
    return SessionConfig(ack_threshold=8 * KiB, ack_delay=0.002, **kw)  # type: ignore[arg-type]


def test_acks_wait_for_the_threshold_or_the_delay() -> None:
    config = ack_config()
    acks, credit = AckBatcher(config), Credit(config)
    subflows = [SubflowState(1, 0.0)]
    st = stream()
    assert st.recv.receive(1, 0, b"x" * 100) == [b"x" * 100]
    acks.want(st)
    assert acks.flush(False, 1.0, subflows, credit) is None
    assert acks.deadline == 1.002 and acks.pending == [st]
    out = acks.flush(True, 1.002, subflows, credit)
    assert out is not None
    sf, frames = out
    (frame,) = wire.FrameDecoder(False).feed(b"".join(frames))
    assert sf is subflows[0]
    assert frame == wire.Ack(1, 100, 100 + credit.window(st))
    assert acks.deadline is None and acks.pending == [] and st.recv.ack_due == 0


def receive_and_flush(
    acks: AckBatcher, credit: Credit, st: Stream, size: int, total: int, now: float
) -> list[int]:
    """Receive ``total`` bytes in order in pieces of ``size``, flushing after
    each as the session does; the cumulative offsets the ACKs carried."""
    acked: list[int] = []
    subflows = [SubflowState(1, 0.0)]
    for offset in range(0, total, size):
        st.recv.receive(st.id, offset, b"x" * size)
        acks.want(st)
        out = acks.flush(False, now, subflows, credit)
        if out is not None:
            frames = wire.FrameDecoder(False).feed(b"".join(out[1]))
            acked += [f.cumulative for f in frames if isinstance(f, wire.Ack)]
    return acked


def test_a_fast_stream_is_acknowledged_every_512_kib_after_its_first_ack() -> None:
    """The default cadence (SPEC.md section 4): the first ACK once the sender
    has used half its initial credit (256 KiB), then one per 512 KiB; with
    a 4 MiB window, credit never decides before the threshold does."""
    config = SessionConfig()
    acks, credit = AckBatcher(config), Credit(config)
    st = stream()
    acked = receive_and_flush(acks, credit, st, 64 * KiB, 2048 * KiB, now=1.0)
    assert acked == [128 * KiB, 640 * KiB, 1152 * KiB, 1664 * KiB]
    # Bytes still unacknowledged wait for the delay: one deadline, 2 ms after them.
    assert acks.pending == [st] and acks.deadline == 1.0 + config.ack_delay


def test_a_small_window_is_acknowledged_at_half_the_credit_left() -> None:
    """Many streams share the budget, so windows are small: an ACK goes out
    once the sender has used half of the credit our last ACK left it,
    long before 512 KiB, so it never stalls waiting for the timer."""
    config = SessionConfig()
    acks, credit = AckBatcher(config), Credit(config)
    credit.data_streams = 300
    window = credit.window(stream())
    assert window == 32 * 1024 * KiB // 300  # 109 KiB
    st = Stream(1, 256 * KiB, 64 * KiB, StreamState.OPEN, 0.0)
    acked = receive_and_flush(acks, credit, st, 16 * KiB, 256 * KiB, now=1.0)
    # 32 KiB is half the 64 KiB initial credit; after that each ACK leaves
    # the sender 109 KiB, and at 16 KiB a chunk the half is passed after 64 KiB.
    assert acked == [32 * KiB, 96 * KiB, 160 * KiB, 224 * KiB]
    assert st.recv.advertised == 224 * KiB + window


def test_a_completed_direction_is_acknowledged_at_once() -> None:
    config = ack_config()
    acks, credit = AckBatcher(config), Credit(config)
    st = stream()
    st.recv.receive(1, 0, b"end")
    st.recv.set_final(1, 3)
    acks.want(st)
    assert acks.flush(False, 0.0, [SubflowState(1, 0.0)], credit) is not None


def test_reset_streams_get_no_ack_and_closed_ones_still_do() -> None:
    config = ack_config()
    acks, credit = AckBatcher(config), Credit(config)
    reset, closed = stream(1, StreamState.RESET), stream(3, StreamState.CLOSED)
    for st in (reset, closed):
        acks.want(st)
    out = acks.flush(True, 0.0, [SubflowState(1, 0.0)], credit)
    assert out is not None
    frames = wire.FrameDecoder(False).feed(b"".join(out[1]))
    assert [f.stream_id for f in frames if isinstance(f, wire.Ack)] == [3]


def test_acks_without_a_subflow_wait_without_a_deadline() -> None:
    config = ack_config()
    acks = AckBatcher(config)
    acks.want(stream())
    assert acks.flush(True, 0.0, [], Credit(config)) is None
    assert acks.deadline is None and len(acks.pending) == 1


def test_ack_subflow_prefers_healthy_writable_idle_and_takes_turns() -> None:
    acks = AckBatcher(ack_config())
    a, b, c = SubflowState(1, 0.0), SubflowState(2, 0.0), SubflowState(3, 0.0)
    b.suspect = True
    c.inflight = 10
    assert [acks.subflow([a, b, c]).sid for _ in range(3)] == [1, 1, 1]  # type: ignore[union-attr]
    c.inflight = 0
    assert [acks.subflow([a, b, c]).sid for _ in range(4)] == [3, 1, 3, 1]  # type: ignore[union-attr]
    a.writable = c.writable = False
    assert acks.subflow([a, b, c]) is not b  # suspect is worse than unwritable


# ------------------------------------------------------------------ credit


@pytest.mark.parametrize(
    ("budget", "streams", "window"),
    [
        (32 * 1024 * KiB, 1, 4 * 1024 * KiB),
        (32 * 1024 * KiB, 64, 512 * KiB),
        (1024 * KiB, 64, 64 * KiB),
    ],
)
def test_window_is_the_budget_shared_within_bounds(budget: int, streams: int, window: int) -> None:
    credit = Credit(SessionConfig())
    credit.memory_budget = budget
    credit.data_streams = streams
    assert credit.window(stream()) == window


def out_of_order(st: Stream, size: int) -> None:
    """``size`` bytes arrive beyond a 1-byte hole at the stream's start."""
    st.recv.receive(st.id, st.recv.next_offset + 1 + st.recv.buffered, b"x" * size)


def test_reordering_doubles_a_stream_window_up_to_the_session_window() -> None:
    """A far subflow's hole holds the near ones' bytes: once they fill half
    the window it doubles (SPEC.md section 4), to the session window at most."""
    config = SessionConfig(stream_window=4 * MiB, session_window=16 * MiB)
    credit = Credit(config)
    credit.data_streams = 1
    st = Stream(1, 64 * MiB, 64 * MiB, StreamState.OPEN, 0.0)
    out_of_order(st, 2 * MiB - 1)
    assert not credit.reordered(st) and credit.window(st) == 4 * MiB
    out_of_order(st, 1)
    assert credit.reordered(st) and credit.window(st) == 8 * MiB
    assert not credit.reordered(st)  # 2 MiB is not half of 8
    out_of_order(st, 2 * MiB)
    assert credit.reordered(st) and credit.window(st) == 16 * MiB
    out_of_order(st, 6 * MiB)
    assert not credit.reordered(st) and credit.window(st) == 16 * MiB


def test_in_order_bytes_and_a_shared_budget_do_not_grow_the_window() -> None:
    """A slow local peer holds in-order bytes, not reordered ones; and where
    many streams share the budget, the share binds before the window does."""
    credit = Credit(SessionConfig())
    st = Stream(1, 64 * MiB, 64 * MiB, StreamState.OPEN, 0.0)
    st.recv.receive(st.id, 0, b"x" * 3 * MiB)
    assert not credit.reordered(st)
    credit.data_streams = 64
    out_of_order(st, 4 * MiB)
    assert not credit.reordered(st) and credit.window(st) == 512 * KiB


def test_the_budget_blocks_new_chunks_and_reports_the_unblocking_once() -> None:
    credit = Credit(SessionConfig(session_window=100))
    credit.unacked_bytes = 100
    assert not credit.may_send() and credit.send_blocked
    assert not credit.unblocked()
    credit.unacked_bytes = 99
    assert credit.unblocked() and not credit.unblocked()


# ------------------------------------------------------------------ layers


def imports(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return modules


def test_the_session_parts_import_in_one_direction_and_no_twisted() -> None:
    package = Path(stripeproxy.core.session.__file__).parent
    order = ["config", "events", "stream", "recovery", "credit", "acks", "sender", "base"]
    order.append("session")
    for path in package.glob("*.py"):
        found = imports(path)
        assert not any(m.startswith("twisted") for m in found), path
        if path.stem in order:
            later = order[order.index(path.stem) + 1 :]
            assert not {f"stripeproxy.core.session.{m}" for m in later} & found, path


def test_the_driver_does_not_import_its_adapters() -> None:
    found = imports(Path(stripeproxy.net.driver.__file__))
    assert not {"stripeproxy.net.local", "stripeproxy.net.subflow"} & found
