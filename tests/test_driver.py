"""The driver's one door out, on StringTransports and a Clock: every input is
followed by one drain (events, then frames one write at a time), and each
reactor turn ends with one re-armed delayed call."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from stripeproxy.core import control, wire
from stripeproxy.core.session import KiB, SessionConfig
from stripeproxy.net.client import ClientSessionDriver
from stripeproxy.net.driver import SessionDriver

CONFIG = SessionConfig(scheduler="least-queued")


class FakeSubflow:
    """A subflow transport; ``pause_after`` DATA frames it tells the driver it is full."""

    def __init__(self, driver: SessionDriver, pause_after: int | None = None) -> None:
        self.sid = 0
        self.transport = StringTransport()
        self.peer = "192.0.2.1:4433"
        self.aborted = False
        self.driver = driver
        self.pause_after = pause_after
        self.data_writes = 0
        real_write_sequence = self.transport.writeSequence

        def write_sequence(pieces: list[bytes]) -> None:
            real_write_sequence(pieces)
            if pieces[0][:1] == bytes([wire.T_DATA]) and len(pieces) == 2:
                self.data_writes += 1
                if self.data_writes == self.pause_after:
                    driver.writable(self.sid, False)  # synchronously, as Twisted does

        self.transport.writeSequence = write_sequence  # type: ignore[method-assign]

    def abort(self) -> None:
        self.aborted = True

    def frames(self) -> list[wire.Frame]:
        return wire.FrameDecoder(False).feed(self.transport.value())


class FakeLocal:
    target = "example.com:80"
    opened_at = 0.0

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def open_result(self, code: int, host: str, port: int) -> None:
        self.calls.append(("open_result", code, host, port))

    def write_local(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def half_close_local(self) -> None:
        self.calls.append(("half_close",))

    def close_local(self) -> None:
        self.calls.append(("close",))

    def abort_local(self) -> None:
        self.calls.append(("abort",))

    def pause_reading(self) -> None:
        self.calls.append(("pause",))

    def resume_reading(self) -> None:
        self.calls.append(("resume",))


def one_timer_at_the_deadline(clock: Clock, driver: SessionDriver) -> None:
    """Once the reactor turn is over, one delayed call, due no later than the deadline."""
    clock.advance(0)
    (call,) = clock.getDelayedCalls()
    deadline = driver.session.next_deadline()
    assert deadline is not None and call.getTime() <= deadline


def opened_client(
    clock: Clock, *pause_after: int | None
) -> tuple[ClientSessionDriver, list[FakeSubflow], FakeLocal, int]:
    closed: list[SessionDriver] = []
    driver = ClientSessionDriver(clock, CONFIG, b"\x01" * 16, closed.append)
    one_timer_at_the_deadline(clock, driver)  # the grace period, from the start
    subflows = [FakeSubflow(driver, n) for n in pause_after]
    for subflow in subflows:
        driver.attach(subflow)
    assert [s.sid for s in subflows] == list(range(1, len(subflows) + 1))
    local = FakeLocal()
    stream_id = driver.open_stream("example.com", 80)
    driver.register_stream(stream_id, local)
    one_timer_at_the_deadline(clock, driver)
    written = [f for s in subflows for f in s.frames()]
    assert written == [wire.Data(0, 0, control.encode(control.Open(1, "example.com", 80)))]
    ok = control.encode(control.OpenOk(stream_id, "10.0.0.1", 8080))
    driver.frames(1, [wire.Data(0, 0, ok)])
    assert local.calls == [("open_result", 0, "10.0.0.1", 8080)]
    return driver, subflows, local, stream_id


def test_a_pause_during_a_write_steers_the_next_chunk_elsewhere() -> None:
    clock = Clock()
    driver, (a, b), _, stream_id = opened_client(clock, None, None)
    for subflow in (a, b):
        subflow.transport.clear()
        subflow.data_writes = 0
    a.pause_after = 1  # subflow 1 is full after one chunk
    driver.local_data(stream_id, b"x" * (4 * 64 * KiB))  # the initial credit
    # The chunks are placed one by one: the two subflows take turns until the
    # write on subflow 1 says it is full; then every further chunk goes to 2.
    # (Placed blind, as a batch, they would have alternated: two each.)
    offsets = {s.sid: [f.offset for f in s.frames() if isinstance(f, wire.Data)] for s in (a, b)}
    assert offsets == {1: [64 * KiB], 2: [0, 128 * KiB, 192 * KiB]}
    assert not driver.session.subflow(1).writable
    one_timer_at_the_deadline(clock, driver)
    driver.writable(1, True)
    driver.close("test over")
    assert clock.getDelayedCalls() == []


def test_events_reach_the_local_peer_and_close_leaves_no_timer() -> None:
    clock = Clock()
    driver, (a,), local, stream_id = opened_client(clock, None)
    driver.frames(1, [wire.Data(stream_id, 0, b"hello")])
    assert local.calls[-1] == ("write", b"hello")
    one_timer_at_the_deadline(clock, driver)
    clock.advance(CONFIG.ack_delay)  # the delayed ACK leaves from the timer
    acks = [f for f in a.frames() if isinstance(f, wire.Ack) and f.stream_id == stream_id]
    assert acks and acks[-1].cumulative == 5
    one_timer_at_the_deadline(clock, driver)
    driver.close("test over")
    assert local.calls[-1] == ("abort",)
    assert a.aborted and driver.closed and driver.subflow_count == 0
    assert clock.getDelayedCalls() == []


def test_a_local_reset_forgets_the_local_peer_at_once() -> None:
    clock = Clock()
    driver, (a,), local, stream_id = opened_client(clock, None)
    a.transport.clear()
    driver.local_reset(stream_id)
    assert driver.local_stream(stream_id) is None and not driver.has_stream(stream_id)
    clock.advance(CONFIG.ack_delay)
    driver.frames(1, [wire.Data(stream_id, 0, b"late")])  # late data: acknowledged, not delivered
    assert all(call[0] != "write" for call in local.calls)
    rst = control.encode(control.Rst(stream_id, 1))
    assert any(isinstance(f, wire.Data) and f.payload == rst for f in a.frames())
    driver.close("test over")
    assert clock.getDelayedCalls() == []


def test_the_deadline_is_asked_once_per_reactor_turn() -> None:
    """Walking every subflow for the next deadline is the costly part of
    arming the timer: several inputs in one turn ask for it once."""
    clock = Clock()
    driver, _, _, stream_id = opened_client(clock, None, None)
    clock.advance(0)  # the opening's turn ends
    session = driver.session
    asked: list[float | None] = []
    real = session.next_deadline

    def next_deadline() -> float | None:
        asked.append(real())
        return asked[-1]

    session.next_deadline = next_deadline  # type: ignore[method-assign]
    driver.local_data(stream_id, b"x" * (64 * KiB))
    driver.writable(2, False)
    driver.writable(2, True)
    driver.frames(1, [wire.Ack(stream_id, 64 * KiB, 512 * KiB)])
    driver.local_data(stream_id, b"y" * 100)
    assert asked == []
    clock.advance(0)
    assert len(asked) == 1
    (call,) = clock.getDelayedCalls()
    assert asked[0] is not None and call.getTime() <= asked[0]
    driver.close("test over")
    assert clock.getDelayedCalls() == []


def test_a_download_is_acknowledged_by_bytes_then_by_the_timer() -> None:
    """ACK cadence through the driver (SPEC.md section 4): the first ACK at
    half the initial credit, then every 512 KiB; the rest 2 ms later."""
    clock = Clock()
    driver, (a,), local, stream_id = opened_client(clock, None)
    clock.advance(0)
    a.transport.clear()
    chunk = 64 * KiB
    for n in range(12):  # 768 KiB, each chunk its own input
        driver.frames(1, [wire.Data(stream_id, n * chunk, bytes([n]) * chunk)])
    acks = [f for f in a.frames() if isinstance(f, wire.Ack) and f.stream_id == stream_id]
    assert [f.cumulative for f in acks] == [128 * KiB, 640 * KiB]
    assert sum(len(c[1]) for c in local.calls if c[0] == "write") == 12 * chunk
    clock.advance(CONFIG.ack_delay)
    acks = [f for f in a.frames() if isinstance(f, wire.Ack) and f.stream_id == stream_id]
    assert [f.cumulative for f in acks] == [128 * KiB, 640 * KiB, 768 * KiB]
    one_timer_at_the_deadline(clock, driver)
    driver.close("test over")
    assert clock.getDelayedCalls() == []


def test_reorder_waits_reach_the_monitor_per_subflow() -> None:
    """A chunk that arrives on subflow 2 ahead of subflow 1's waits in the
    reorder buffer: subflow_info charges the wait to 2 (it waited) and to 1
    (it held the chunk up), as the dashboard and metrics show them."""
    clock = Clock()
    driver, _subflows, local, stream_id = opened_client(clock, None, None)
    chunk = 16 * KiB
    driver.frames(2, [wire.Data(stream_id, chunk, b"y" * chunk)])
    clock.advance(0.040)
    driver.frames(1, [wire.Data(stream_id, 0, b"x" * chunk)])
    info = {row.sid: row for row in driver.subflow_info()}
    assert info[2].reorder_waits == 1 and abs(info[2].reorder_wait_s - 0.040) < 1e-9
    assert abs(info[1].blocked_wait_s - 0.040) < 1e-9
    assert (info[1].reorder_waits, info[2].blocked_wait_s) == (0, 0.0)
    assert b"".join(c[1] for c in local.calls if c[0] == "write") == b"x" * chunk + b"y" * chunk
    driver.close("test over")
