"""Two sessions joined by K fake subflows on one clock: the core's test bench.

:class:`SessionPair` joins a client and a server
:class:`~stripeproxy.core.session.Session` on one
:class:`~twisted.internet.task.Clock`.  Each side is drained by a
:class:`~stripeproxy.testing.owner.FakeOwner` after every input, as the real
driver does, and has one :class:`~stripeproxy.net.timer.Timer` (the real
driver's class) armed for its ``next_deadline()``.  What one side writes is
decoded with :class:`~stripeproxy.core.wire.FrameDecoder` and queued per
subflow and direction; the test decides when each queued frame arrives.  The
order inside one subflow and direction is TCP order and is always kept; only
the interleaving across subflows varies.  A subflow can be held (slow), killed
(everything in flight on it is dropped and both sides see ``subflow_lost``),
made unwritable, and the clock can be advanced.

A test that ends with both sessions closed must find
``clock.getDelayedCalls()`` empty.  Move time with :meth:`SessionPair.advance`
(which steps through every deadline on the way), not with ``clock.advance``
directly.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence

from twisted.internet.task import Clock

from stripeproxy.core import wire
from stripeproxy.core.scheduler import Scheduler
from stripeproxy.core.session import RESET_GENERAL, Session, SessionConfig
from stripeproxy.core.wire import CHUNK_SIZE
from stripeproxy.net.timer import Timer
from stripeproxy.testing.links import (
    C2S,
    CLIENT,
    DIRECTIONS,
    S2C,
    SERVER,
    Direction,
    FakeSubflow,
    Side,
    Source,
    wire_size,
)
from stripeproxy.testing.owner import FakeOwner

#: Consecutive timer firings at one clock time after which the pair gives up:
#: a session whose deadline does not move past "now" would spin the reactor.
MAX_SPINS = 100
#: Deadlines this close past the end of an :meth:`SessionPair.advance` still
#: run in it, so that float sums such as ``4.9 + 0.1`` reach a deadline of 5.
TIME_SLACK = 1e-9


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
        read_size: int = CHUNK_SIZE,
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
        now = self.clock.seconds()
        self.client = Session(client_config, is_client=True, now=now, scheduler=client_scheduler)
        self.server = Session(server_config, is_client=False, now=now, scheduler=server_scheduler)
        self.client_owner.session = self.client
        self.server_owner.session = self.server
        self.client_owner.on_send = lambda sid, data: self._on_send(C2S, sid, data)
        self.server_owner.on_send = lambda sid, data: self._on_send(S2C, sid, data)
        self.client_owner.on_close_subflow = lambda sid, _r: self._on_close(CLIENT, sid)
        self.server_owner.on_close_subflow = lambda sid, _r: self._on_close(SERVER, sid)
        self.subflows: dict[int, FakeSubflow] = {}
        self._next_sid = 0
        self.timers: dict[Side, Timer] = {
            CLIENT: Timer(self.clock, lambda: self._fire(CLIENT)),
            SERVER: Timer(self.clock, lambda: self._fire(SERVER)),
        }
        self._fired: dict[Side, tuple[float, int]] = {CLIENT: (-1.0, 0), SERVER: (-1.0, 0)}
        self._sources: dict[tuple[Side, int], Source] = {}
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
        now = self.clock.seconds()
        self.server.add_subflow(sid, now)
        self._drain(self.server)
        self.client.add_subflow(sid, now)
        self._drain(self.client)
        self._after()
        return sid

    def kill_subflow(self, sid: int) -> None:
        """The subflow dies (say a TCP reset): its frames in flight are lost."""
        sf = self.subflows[sid]
        if not sf.alive:
            return
        self._drop(sf)
        self.client.subflow_lost(sid, self.clock.seconds())
        self._drain(self.client)
        self.server.subflow_lost(sid, self.clock.seconds())
        self._drain(self.server)
        self._after()

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
        self._after()

    # ------------------------------------------------------- local peers' inputs

    def reset(self, side: Side, stream_id: int, code: int = RESET_GENERAL) -> None:
        """The local peer of ``side`` aborts the stream (it hears nothing more of it)."""
        self.owner(side).forget(stream_id)
        self.session(side).local_reset(stream_id, code, self.clock.seconds())
        self._after()

    def sink_paused(self, side: Side, stream_id: int, paused: bool) -> None:
        """The local peer of ``side`` stops (or resumes) reading what it is sent."""
        self.session(side).local_sink_paused(stream_id, paused, self.clock.seconds())
        self._after()

    def accept(self, stream_id: int, host: str = "127.0.0.1", port: int = 4242) -> None:
        """The server's target for ``stream_id`` connected (without ``auto_accept``)."""
        self.server.open_succeeded(stream_id, host, port, self.clock.seconds())
        self._after()

    def refuse(self, stream_id: int, code: int) -> None:
        """The server's target for ``stream_id`` could not be reached."""
        self.server.open_failed(stream_id, code, self.clock.seconds())
        self._after()

    def set_memory_budget(self, side: Side, budget: int) -> None:
        self.session(side).set_memory_budget(budget, self.clock.seconds())
        self._after()

    def close(self, side: Side, reason: str) -> None:
        self.session(side).close(reason, self.clock.seconds())
        self._after()

    def go_away(self, side: Side, reason: str) -> None:
        self.session(side).go_away(reason, self.clock.seconds())
        self._after()

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
        receiver.frames_received(sid, batch, self.clock.seconds())
        self._drain(receiver)
        if sf.alive:
            self._update_writable(sf, direction)
        self._pump_sources()
        self._after()
        if self.on_delivery is not None:
            self.on_delivery()
        return n

    def swallow(self, sid: int, direction: Direction) -> int:
        """Drop the frames in flight on one queue unseen, as a black hole that
        keeps accepting bytes does (a middlebox that reads and discards): the
        writer stays writable, unlike behind :meth:`hold`.  Returns how many."""
        sf = self.subflows[sid]
        queue = sf.queues[direction]
        n = len(queue)
        queue.clear()
        sf.queued[direction] = 0
        if sf.alive:
            self._update_writable(sf, direction)
        self._pump_sources()
        self._after()
        return n

    def inject(self, sid: int, direction: Direction, frames: Sequence[wire.Frame]) -> None:
        """Hand forged frames to the receiving side as if they came off subflow ``sid``."""
        receiver = self.server if direction == C2S else self.client
        receiver.frames_received(sid, list(frames), self.clock.seconds())
        self._drain(receiver)
        self._pump_sources()
        self._after()

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
            self._after()
            due = [
                max(timer.when, timer.deadline or 0.0)
                for timer in self.timers.values()
                if timer.when is not None
            ]
            when = min(due, default=None)
            if when is None or when > target + TIME_SLACK:
                break
            # Land exactly on the deadline (callLater's own sum may be an ulp off).
            clock.rightNow = max(clock.rightNow, when)
            clock.advance(0)
        clock.advance(max(0.0, target - clock.seconds()))
        self._after()

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
            self._after()
            nxt = min(
                (t.deadline for t in self.timers.values() if t.deadline is not None), default=None
            )
            now = self.clock.seconds()
            if nxt is None or nxt > now + horizon + TIME_SLACK:
                if not self._feedable():
                    return
                continue
            self.advance(max(0.0, nxt - now))
        raise AssertionError("the session pair did not settle")

    # ------------------------------------------------------------- streams

    def open_stream(self, host: str = "example.com", port: int = 80) -> int:
        stream_id = self.client.open_stream(host, port, self.clock.seconds())
        self._after()
        return stream_id

    def write(self, side: Side, stream_id: int, data: bytes, eof: bool = False) -> None:
        """Let the local peer of ``side`` send ``data`` (then EOF) on a stream.

        Bytes are handed to the core in ``read_size`` pieces for as long as
        the owner has not paused the stream, like a transport registered as a
        producer; the rest waits for ``stream_resume`` and is fed by later
        delivery calls.  A server-side write waits until the server knows the
        stream.
        """
        source = self._sources.setdefault((side, stream_id), Source())
        if source.eof:
            raise ValueError("write after EOF")
        view = memoryview(data)
        for start in range(0, len(data), self.read_size):
            source.pending.append(bytes(view[start : start + self.read_size]))
        source.eof = eof
        self._pump_sources()
        self._after()

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
        self.client.close(reason, self.clock.seconds())
        self.server.close(reason, self.clock.seconds())
        self._after()

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
            writer.subflow_writable(sf.sid, writable, self.clock.seconds())
            self._drain(writer)

    def _on_close(self, side: Side, sid: int) -> None:
        """A session dropped a subflow: the connection goes, the peer notices."""
        sf = self.subflows.get(sid)
        if sf is None or not sf.alive:
            return
        self._drop(sf)
        peer = self.server if side == CLIENT else self.client
        peer.subflow_lost(sid, self.clock.seconds())
        self._drain(peer)

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
            # Each read is one input, drained before the next, as in the driver:
            # a read that fills the send buffer pauses the source at once.
            while source.pending and stream_id not in owner.paused:
                session.local_data(stream_id, source.pending.popleft(), self.clock.seconds())
                owner.drain(self.clock.seconds)
            if source.eof and not source.eof_sent and not source.pending:
                source.eof_sent = True
                session.local_eof(stream_id, self.clock.seconds())
                owner.drain(self.clock.seconds)

    def _drain(self, session: Session) -> None:
        """Right after an input, the side that took it says what it has to say."""
        owner = self.client_owner if session is self.client else self.server_owner
        owner.drain(self.clock.seconds)

    def _after(self) -> None:
        """After every input: drain both sides, then re-arm their timers (the
        driver's one door out, twice).  Inputs made during a drain only make
        that drain go round again."""
        now = self.clock.seconds
        for side in (CLIENT, SERVER):
            self.owner(side).drain(now)
        for side in (CLIENT, SERVER):
            self.timers[side].arm(self.session(side).next_deadline())

    def _fire(self, side: Side) -> None:
        now = self.clock.seconds()
        last, count = self._fired[side]
        count = count + 1 if last == now else 1
        self._fired[side] = (now, count)
        if count > MAX_SPINS:
            raise AssertionError(f"{side} session timer keeps firing at t={now}")
        self.session(side).on_timer(now)
        self._pump_sources()
        self._after()
