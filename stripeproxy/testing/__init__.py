"""Test fakes for the sans-I/O session core, shipped so users can test with them too.

Two pieces:

* :class:`FakeOwner` implements :class:`~stripeproxy.core.session.SessionOwner` and
  records every call: the bytes written on each subflow, the bytes delivered to
  each stream, EOFs, resets, closes, pause/resume calls, open requests and
  results.  A server-side owner can accept every OPEN at once.
* :class:`SessionPair` joins a client and a server :class:`Session` on one
  :class:`~twisted.internet.task.Clock` through K fake subflows.  What one side
  writes is decoded with :class:`~stripeproxy.core.wire.FrameDecoder` and queued per
  subflow and direction; the test decides when each queued frame arrives.  The
  order inside one subflow and direction is TCP order and is always kept; only
  the interleaving across subflows varies.  A subflow can be held (slow), killed
  (everything in flight on it is dropped and both sides see ``subflow_lost``),
  made unwritable, and the clock can be advanced.

Like :class:`~stripeproxy.net.driver.SessionDriver`, the pair keeps exactly one
delayed call per session, armed for that session's ``next_deadline()``; so a
test that ends with both sessions closed must find ``clock.getDelayedCalls()``
empty.  Move time with :meth:`SessionPair.advance` (which steps through every
deadline on the way), not with ``clock.advance`` directly.

Typical use::

    pair = SessionPair(k=3)
    stream_id = pair.open_stream()
    pair.settle()
    pair.write(CLIENT, stream_id, b"request", eof=True)
    pair.settle()
    assert pair.server_owner.data(stream_id) == b"request"
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock

from stripeproxy.core import wire
from stripeproxy.core.scheduler import Scheduler
from stripeproxy.core.session import Session, SessionConfig

__all__ = [
    "C2S",
    "CLIENT",
    "DIRECTIONS",
    "S2C",
    "SERVER",
    "Direction",
    "FakeOwner",
    "FakeSubflow",
    "SessionPair",
    "Side",
    "wire_size",
]

Side = Literal["client", "server"]
Direction = Literal["c2s", "s2c"]
CLIENT: Side = "client"
SERVER: Side = "server"
C2S: Direction = "c2s"  # written by the client, read by the server
S2C: Direction = "s2c"  # written by the server, read by the client
DIRECTIONS: tuple[Direction, Direction] = (C2S, S2C)

#: Consecutive timer firings at one clock time after which the pair gives up:
#: a session whose deadline does not move past "now" would spin the reactor.
MAX_SPINS = 100
#: Deadlines this close past the end of an :meth:`SessionPair.advance` still
#: run in it, so that float sums such as ``4.9 + 0.1`` reach a deadline of 5.
TIME_SLACK = 1e-9


class FakeOwner:
    """A :class:`~stripeproxy.core.session.SessionOwner` that records everything.

    ``events`` keeps every call in order as a tuple whose first item is the
    method name (``("stream_data", stream_id, len(data))`` for data, so that
    the log stays small); the other attributes index the same calls for easy
    assertions.  ``on_send`` and ``on_close_subflow`` let a network fake
    observe writes and subflow closes; ``on_data`` lets a test play a local
    peer that reacts to what it receives.
    """

    def __init__(
        self,
        *,
        auto_accept: bool = False,
        accept_address: tuple[str, int] = ("127.0.0.1", 4242),
    ) -> None:
        #: The session this owner serves; needed for ``auto_accept``.
        self.session: Session | None = None
        #: Call ``open_succeeded`` synchronously from ``stream_open_requested``.
        self.auto_accept = auto_accept
        self.accept_address = accept_address
        self.events: list[tuple[object, ...]] = []
        #: Every byte written, per subflow id.
        self.sent: dict[int, bytearray] = {}
        #: Every byte delivered, per stream id.
        self.received: dict[int, bytearray] = {}
        self.eofs: list[int] = []
        self.resets: list[tuple[int, int]] = []
        self.closed_streams: list[int] = []
        self.closed_subflows: list[tuple[int, str]] = []
        self.open_requests: list[tuple[int, str, int]] = []
        self.open_results: list[tuple[int, int, str, int]] = []
        self.pauses: list[int] = []
        self.resumes: list[int] = []
        #: Streams whose local source is paused right now.
        self.paused: set[int] = set()
        self.session_closes: list[str] = []
        self.on_send: Callable[[int, bytes], None] | None = None
        self.on_close_subflow: Callable[[int, str], None] | None = None
        #: Called after each ``stream_data`` is recorded: a local peer that
        #: reacts (answers, resets, pauses) from inside the delivery.
        self.on_data: Callable[[int, bytes], None] | None = None

    # ------------------------------------------------------------- queries

    def data(self, stream_id: int) -> bytes:
        """Every byte delivered so far to ``stream_id``."""
        return bytes(self.received.get(stream_id, b""))

    def frames_sent(self, sid: int, crc: bool) -> list[wire.Frame]:
        """Decode everything written on subflow ``sid``."""
        return wire.FrameDecoder(crc).feed(bytes(self.sent.get(sid, b"")))

    def finished(self, stream_id: int) -> bool:
        """The stream ended in any way (closed, reset or refused)."""
        return (
            stream_id in self.closed_streams
            or any(s == stream_id for s, _ in self.resets)
            or any(s == stream_id and code != 0 for s, code, _, _ in self.open_results)
        )

    # --------------------------------------------------------- SessionOwner

    def send(self, sid: int, pieces: Sequence[bytes]) -> None:
        data = b"".join(pieces)
        self.events.append(("send", sid, len(data)))
        self.sent.setdefault(sid, bytearray()).extend(data)
        if self.on_send is not None:
            self.on_send(sid, data)

    def close_subflow(self, sid: int, reason: str) -> None:
        self.events.append(("close_subflow", sid, reason))
        self.closed_subflows.append((sid, reason))
        if self.on_close_subflow is not None:
            self.on_close_subflow(sid, reason)

    def stream_open_requested(self, stream_id: int, host: str, port: int) -> None:
        self.events.append(("stream_open_requested", stream_id, host, port))
        self.open_requests.append((stream_id, host, port))
        if self.auto_accept:
            if self.session is None:
                raise RuntimeError("auto_accept needs FakeOwner.session")
            self.session.open_succeeded(stream_id, *self.accept_address)

    def stream_open_result(self, stream_id: int, code: int, host: str, port: int) -> None:
        self.events.append(("stream_open_result", stream_id, code, host, port))
        self.open_results.append((stream_id, code, host, port))

    def stream_data(self, stream_id: int, data: bytes) -> None:
        self.events.append(("stream_data", stream_id, len(data)))
        self.received.setdefault(stream_id, bytearray()).extend(data)
        if self.on_data is not None:
            self.on_data(stream_id, data)

    def stream_eof(self, stream_id: int) -> None:
        self.events.append(("stream_eof", stream_id))
        self.eofs.append(stream_id)

    def stream_reset(self, stream_id: int, code: int) -> None:
        self.events.append(("stream_reset", stream_id, code))
        self.resets.append((stream_id, code))
        self.paused.discard(stream_id)

    def stream_closed(self, stream_id: int) -> None:
        self.events.append(("stream_closed", stream_id))
        self.closed_streams.append(stream_id)
        self.paused.discard(stream_id)

    def stream_pause(self, stream_id: int) -> None:
        self.events.append(("stream_pause", stream_id))
        self.pauses.append(stream_id)
        self.paused.add(stream_id)

    def stream_resume(self, stream_id: int) -> None:
        self.events.append(("stream_resume", stream_id))
        self.resumes.append(stream_id)
        self.paused.discard(stream_id)

    def session_closed(self, reason: str) -> None:
        self.events.append(("session_closed", reason))
        self.session_closes.append(reason)

    def session_going_away(self, reason: str) -> None:
        self.events.append(("session_going_away", reason))


def wire_size(frame: wire.Frame, crc: bool) -> int:
    """Bytes a frame takes on the wire (DATA exactly, others by their header)."""
    size = wire.HEADER_SIZE + (wire.CRC_SIZE if crc else 0)
    if isinstance(frame, wire.Data):
        size += 12 + len(frame.payload)
    return size


@dataclass
class FakeSubflow:
    """One fake subflow: per direction, a decoder and a queue of frames in flight.

    ``queued`` counts the wire bytes in each queue; ``blocked`` is what the
    test asked with :meth:`SessionPair.set_writable`; ``writable`` is what the
    writing side was last told.
    """

    sid: int
    crc: bool
    alive: bool = True
    queues: dict[Direction, deque[wire.Frame]] = field(default_factory=dict)
    decoders: dict[Direction, wire.FrameDecoder] = field(default_factory=dict)
    queued: dict[Direction, int] = field(default_factory=dict)
    held: set[Direction] = field(default_factory=set)
    blocked: set[Direction] = field(default_factory=set)
    writable: dict[Direction, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for direction in DIRECTIONS:
            self.queues[direction] = deque()
            self.decoders[direction] = wire.FrameDecoder(self.crc)
            self.queued[direction] = 0
            self.writable[direction] = True


@dataclass
class _Source:
    """Bytes a test wants a local peer to send, fed as back-pressure allows."""

    pending: deque[bytes] = field(default_factory=deque)
    eof: bool = False
    eof_sent: bool = False


class SessionPair:
    """A client and a server session joined by K fake subflows on one clock.

    ``config`` applies to both sides unless ``server_config`` is given.  The
    server's owner accepts every OPEN at once unless ``auto_accept`` is
    False.  With ``capacity`` set, a subflow direction holding that many wire
    bytes in flight makes its writer see the subflow unwritable until
    deliveries drain it, like a transport with a shallow send buffer.
    """

    def __init__(
        self,
        k: int = 3,
        config: SessionConfig | None = None,
        *,
        server_config: SessionConfig | None = None,
        clock: Clock | None = None,
        auto_accept: bool = True,
        client_scheduler: Scheduler | None = None,
        server_scheduler: Scheduler | None = None,
        read_size: int = 64 * 1024,
        capacity: int | None = None,
    ) -> None:
        self.clock = clock if clock is not None else Clock()
        client_config = config if config is not None else SessionConfig()
        server_config = server_config if server_config is not None else client_config
        if client_config.crc != server_config.crc:
            raise ValueError("both sides must agree on CRC mode")
        self.crc = client_config.crc
        #: How many bytes a fake local peer hands the core per read.
        self.read_size = read_size
        #: Wire bytes a subflow direction holds before its writer is told that
        #: the subflow is not writable (a full transport); None: never.
        self.capacity = capacity
        #: Called after every delivery batch, to check invariants as things move.
        self.on_delivery: Callable[[], None] | None = None
        self.client_owner = FakeOwner()
        self.server_owner = FakeOwner(auto_accept=auto_accept)
        self.client = Session(
            self.client_owner,
            self.clock,
            client_config,
            is_client=True,
            scheduler=client_scheduler,
        )
        self.server = Session(
            self.server_owner,
            self.clock,
            server_config,
            is_client=False,
            scheduler=server_scheduler,
        )
        self.client_owner.session = self.client
        self.server_owner.session = self.server
        self.client_owner.on_send = lambda sid, data: self._on_send(C2S, sid, data)
        self.server_owner.on_send = lambda sid, data: self._on_send(S2C, sid, data)
        self.client_owner.on_close_subflow = lambda sid, _r: self._on_close(CLIENT, sid)
        self.server_owner.on_close_subflow = lambda sid, _r: self._on_close(SERVER, sid)
        self.subflows: dict[int, FakeSubflow] = {}
        self._next_sid = 0
        self._timers: dict[Side, IDelayedCall | None] = {CLIENT: None, SERVER: None}
        self._armed: dict[Side, float | None] = {CLIENT: None, SERVER: None}
        self._fired: dict[Side, tuple[float, int]] = {CLIENT: (-1.0, 0), SERVER: (-1.0, 0)}
        self._sources: dict[tuple[Side, int], _Source] = {}
        for _ in range(k):
            self.add_subflow()

    # ------------------------------------------------------------- lookups

    def session(self, side: Side) -> Session:
        return self.client if side == CLIENT else self.server

    def owner(self, side: Side) -> FakeOwner:
        return self.client_owner if side == CLIENT else self.server_owner

    @property
    def alive(self) -> list[int]:
        """Ids of the subflows that are up."""
        return [sid for sid, sf in self.subflows.items() if sf.alive]

    def in_flight(self, sid: int, direction: Direction) -> list[wire.Frame]:
        """Frames queued on subflow ``sid`` in ``direction`` (a copy)."""
        return list(self.subflows[sid].queues[direction])

    def pending(self, *, deliverable_only: bool = False) -> int:
        """How many frames are in flight (optionally: on directions not held)."""
        total = 0
        for sf in self.subflows.values():
            for direction, queue in sf.queues.items():
                if not (deliverable_only and direction in sf.held):
                    total += len(queue)
        return total

    # ------------------------------------------------------------ subflows

    def add_subflow(self) -> int:
        """Bring up a new subflow; the server learns of it first, as in the handshake."""
        self._next_sid += 1
        sid = self._next_sid
        self.subflows[sid] = FakeSubflow(sid, self.crc)
        self.server.add_subflow(sid)
        self.client.add_subflow(sid)
        self._rearm()
        return sid

    def kill_subflow(self, sid: int) -> None:
        """The subflow dies (say a TCP reset): its frames in flight are lost."""
        sf = self.subflows[sid]
        if not sf.alive:
            return
        self._drop(sf)
        self.client.subflow_lost(sid)
        self.server.subflow_lost(sid)
        self._rearm()

    def hold(self, sid: int, direction: Direction | None = None) -> None:
        """Stop delivering frames on subflow ``sid`` (both directions by default)."""
        self.subflows[sid].held.update(DIRECTIONS if direction is None else (direction,))

    def release(self, sid: int, direction: Direction | None = None) -> None:
        """Undo :meth:`hold`; queued frames are delivered by the next delivery call."""
        self.subflows[sid].held.difference_update(DIRECTIONS if direction is None else (direction,))

    def set_writable(self, sid: int, writable: bool, side: Side | None = None) -> None:
        """Make subflow ``sid`` unwritable (or writable again) for one side or both.

        The side is told at once; with ``capacity`` set, a full subflow stays
        unwritable until it drains, whatever this says.
        """
        sf = self.subflows[sid]
        for s in (CLIENT, SERVER) if side is None else (side,):
            direction = C2S if s == CLIENT else S2C
            if writable:
                sf.blocked.discard(direction)
            else:
                sf.blocked.add(direction)
            self._update_writable(sf, direction)
        self._pump_sources()
        self._rearm()

    # ------------------------------------------------------------ delivery

    def deliver(self, sid: int, direction: Direction, count: int | None = None) -> int:
        """Deliver up to ``count`` (default: all) queued frames of one queue.

        Holding does not apply: an explicit delivery is always made.  Frames
        are handed over in one ``frames_received`` batch, as one
        ``dataReceived`` call would.  Returns how many were delivered.
        """
        sf = self.subflows[sid]
        queue = sf.queues[direction]
        n = len(queue) if count is None else min(count, len(queue))
        if n == 0:
            return 0
        batch = [queue.popleft() for _ in range(n)]
        sf.queued[direction] -= sum(wire_size(f, self.crc) for f in batch)
        receiver = self.server if direction == C2S else self.client
        receiver.frames_received(sid, batch)
        if sf.alive:
            self._update_writable(sf, direction)
        self._pump_sources()
        self._rearm()
        if self.on_delivery is not None:
            self.on_delivery()
        return n

    def inject(self, sid: int, direction: Direction, frames: Sequence[wire.Frame]) -> None:
        """Hand forged frames to the receiving side as if they came off subflow ``sid``."""
        receiver = self.server if direction == C2S else self.client
        receiver.frames_received(sid, list(frames))
        self._pump_sources()
        self._rearm()

    def deliver_all(
        self,
        order: Iterable[int] | None = None,
        directions: Sequence[Direction] = DIRECTIONS,
    ) -> int:
        """Deliver everything in flight that is not held, subflow by subflow.

        ``order`` lists subflow ids: each pass empties the queues of the first
        before touching the second, so ``order=[3, 1]`` makes everything on
        subflow 3 arrive before anything on subflow 1.  Frames sent in
        response are delivered by later passes, in the same order.  Subflows
        not named come after the named ones.  Returns the number delivered.
        """
        first = list(order) if order is not None else []
        total = 0
        while True:
            sids = first + [sid for sid in self.subflows if sid not in first]
            moved = 0
            for sid in sids:
                sf = self.subflows.get(sid)
                if sf is None or not sf.alive:
                    continue
                for direction in directions:
                    if direction not in sf.held:
                        moved += self.deliver(sid, direction)
            total += moved
            if not moved:
                return total

    def deliver_round(self, directions: Sequence[Direction] = DIRECTIONS) -> int:
        """One pass: every subflow delivers what it held when the pass began.

        Frames sent in response wait for the next round, so a round is one
        one-way trip: use it to watch a transfer progress step by step.
        """
        counts = {
            (sid, direction): len(sf.queues[direction])
            for sid, sf in self.subflows.items()
            if sf.alive
            for direction in directions
            if direction not in sf.held
        }
        return sum(self.deliver(sid, d, n) for (sid, d), n in counts.items() if n)

    def deliver_random(self, rng: random.Random, count: int | None = None) -> int:
        """Deliver frames one at a time from randomly chosen non-held queues.

        Within one queue the order is kept; across queues it is random.
        Stops after ``count`` frames (default: when nothing deliverable is left).
        """
        delivered = 0
        while count is None or delivered < count:
            choices = [
                (sid, direction)
                for sid, sf in self.subflows.items()
                if sf.alive
                for direction in DIRECTIONS
                if sf.queues[direction] and direction not in sf.held
            ]
            if not choices:
                break
            sid, direction = rng.choice(choices)
            delivered += self.deliver(sid, direction, 1)
        return delivered

    # ---------------------------------------------------------------- time

    def advance(self, seconds: float) -> None:
        """Move the clock forward, running each session timer at its own deadline.

        Unlike one big ``clock.advance``, every timer runs with the clock set
        to its deadline, as a reactor would run it.
        """
        clock = self.clock
        target = clock.seconds() + seconds
        while True:
            self._rearm()
            due = [
                max(timer.getTime(), self._armed[side] or 0.0)
                for side, timer in self._timers.items()
                if timer is not None
            ]
            when = min(due, default=None)
            if when is None or when > target + TIME_SLACK:
                break
            # Land exactly on the deadline (callLater's own sum may be an ulp off).
            clock.rightNow = max(clock.rightNow, when)
            clock.advance(0)
        clock.advance(max(0.0, target - clock.seconds()))
        self._rearm()

    def settle(
        self,
        order: Iterable[int] | None = None,
        rng: random.Random | None = None,
        max_rounds: int = 100_000,
    ) -> None:
        """Deliver, feed sources and fire ACK timers until nothing is left to do.

        Frames on held subflows stay where they are.  Time moves only to the
        next deadline that is at most one ACK delay away, so heartbeats and
        the grace period are not reached by settling.
        """
        order_list = list(order) if order is not None else None
        horizon = max(self.client.config.ack_delay, self.server.config.ack_delay)
        for _ in range(max_rounds):
            self._pump_sources()
            if rng is not None:
                self.deliver_random(rng)
            else:
                self.deliver_all(order_list)
            if self.pending(deliverable_only=True):
                continue
            self._rearm()
            nxt = min((d for d in self._armed.values() if d is not None), default=None)
            now = self.clock.seconds()
            if nxt is None or nxt > now + horizon + TIME_SLACK:
                if not self._feedable():
                    return
                continue
            self.advance(max(0.0, nxt - now))
        raise AssertionError("the session pair did not settle")

    # ------------------------------------------------------------- streams

    def open_stream(self, host: str = "example.com", port: int = 80) -> int:
        stream_id = self.client.open_stream(host, port)
        self._rearm()
        return stream_id

    def write(self, side: Side, stream_id: int, data: bytes, eof: bool = False) -> None:
        """Let the local peer of ``side`` send ``data`` (then EOF) on a stream.

        Bytes are handed to the core in ``read_size`` pieces for as long as
        the owner has not paused the stream, like a transport registered as a
        producer; the rest waits for ``stream_resume`` and is fed by later
        delivery calls.  A server-side write waits until the server knows the
        stream.
        """
        source = self._sources.setdefault((side, stream_id), _Source())
        if source.eof:
            raise ValueError("write after EOF")
        view = memoryview(data)
        for start in range(0, len(data), self.read_size):
            source.pending.append(bytes(view[start : start + self.read_size]))
        source.eof = eof
        self._pump_sources()
        self._rearm()

    def unsent(self, side: Side, stream_id: int) -> int:
        """Bytes a :meth:`write` still holds back because of back-pressure."""
        source = self._sources.get((side, stream_id))
        return 0 if source is None else sum(len(p) for p in source.pending)

    # ------------------------------------------------------------ checking

    def assert_idle(self) -> None:
        """Nothing in flight, no stream left, no byte buffered, no subflow loaded."""
        assert self.pending() == 0, f"{self.pending()} frames still in flight"
        for side in (CLIENT, SERVER):
            session = self.session(side)
            assert session.stream_ids == [], f"{side} streams left: {session.stream_ids}"
            assert session.buffered_bytes() == 0, f"{side} buffers bytes"
            for sid in session.subflow_ids:
                assert session.subflow(sid).inflight == 0, f"{side} subflow {sid} inflight"
        for (side, stream_id), source in self._sources.items():
            if not self.owner(side).finished(stream_id):
                assert not source.pending, f"{side} stream {stream_id} has unsent bytes"

    def shutdown(self, reason: str = "test over") -> None:
        """Close both sessions and re-arm, which must cancel both timers."""
        self.client.close(reason)
        self.server.close(reason)
        self._rearm()

    # ----------------------------------------------------------- internals

    def _on_send(self, direction: Direction, sid: int, data: bytes) -> None:
        sf = self.subflows.get(sid)
        if sf is None or not sf.alive:
            raise AssertionError(f"{direction} write on subflow {sid}, which is down")
        frames = sf.decoders[direction].feed(data)
        sf.queues[direction].extend(frames)
        sf.queued[direction] += sum(wire_size(f, self.crc) for f in frames)
        self._update_writable(sf, direction)

    def _update_writable(self, sf: FakeSubflow, direction: Direction) -> None:
        """Tell the writer of ``direction`` when the subflow fills up or drains."""
        full = self.capacity is not None and sf.queued[direction] >= self.capacity
        writable = not full and direction not in sf.blocked
        if writable != sf.writable[direction]:
            sf.writable[direction] = writable
            writer = self.client if direction == C2S else self.server
            writer.subflow_writable(sf.sid, writable)

    def _on_close(self, side: Side, sid: int) -> None:
        """A session dropped a subflow: the connection goes, the peer notices."""
        sf = self.subflows.get(sid)
        if sf is None or not sf.alive:
            return
        self._drop(sf)
        peer = self.server if side == CLIENT else self.client
        peer.subflow_lost(sid)

    @staticmethod
    def _drop(sf: FakeSubflow) -> None:
        sf.alive = False
        for direction, queue in sf.queues.items():
            queue.clear()
            sf.queued[direction] = 0

    def _feedable(self) -> bool:
        """Some source has bytes or an EOF the core would accept right now."""
        for (side, stream_id), source in self._sources.items():
            session = self.session(side)
            if not session.has_stream(stream_id) or self.owner(side).finished(stream_id):
                continue
            if source.pending and stream_id not in self.owner(side).paused:
                return True
            if source.eof and not source.eof_sent and not source.pending:
                return True
        return False

    def _pump_sources(self) -> None:
        for (side, stream_id), source in list(self._sources.items()):
            session = self.session(side)
            owner = self.owner(side)
            if not session.has_stream(stream_id) or owner.finished(stream_id):
                continue
            while source.pending and stream_id not in owner.paused:
                session.local_data(stream_id, source.pending.popleft())
            if source.eof and not source.eof_sent and not source.pending:
                source.eof_sent = True
                session.local_eof(stream_id)

    def _rearm(self) -> None:
        for side in (CLIENT, SERVER):
            self._rearm_side(side)

    def _rearm_side(self, side: Side) -> None:
        """Keep one delayed call per session, at its ``next_deadline()``."""
        deadline = self.session(side).next_deadline()
        timer = self._timers[side]
        if timer is not None:
            if deadline == self._armed[side]:
                return
            timer.cancel()
            self._timers[side] = None
        self._armed[side] = deadline
        if deadline is not None:
            delay = max(0.0, deadline - self.clock.seconds())
            self._timers[side] = self.clock.callLater(delay, self._fire, side)

    def _fire(self, side: Side) -> None:
        now = self.clock.seconds()
        last, count = self._fired[side]
        count = count + 1 if last == now else 1
        self._fired[side] = (now, count)
        if count > MAX_SPINS:
            raise AssertionError(f"{side} session timer keeps firing at t={now}")
        self._timers[side] = None
        self.session(side).on_timer()
        self._pump_sources()
        self._rearm()
