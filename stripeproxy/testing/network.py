"""Paths with a delay, a rate and loss, for :class:`~stripeproxy.testing.pair.SessionPair`.

A :class:`SessionPair` lets a test decide when each frame arrives; this
module decides it the way a network would, on the pair's clock, so that a
scheduler can be tried against unequal uplinks (issue 12) without sockets.

Each subflow belongs to a :class:`Path`.  Per direction, a path serialises
the frames of all its subflows, in write order, at its rate, and delivers
each one its one-way delay later.  A subflow is writable while it holds
fewer than ``lowat`` bytes not yet serialised, like a TCP socket with
``TCP_NOTSENT_LOWAT`` whose congestion window fills the path: the writer is
told at once when a write fills it (as ``pauseProducing`` would be called
inside ``write``), and again when it drains.  Loss is TCP's loss as the
session sees it: a frame that loses a packet arrives a round trip late,
and the frames behind it on the same subflow wait for it (TCP keeps order).
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from stripeproxy.core import wire
from stripeproxy.testing.links import C2S, CLIENT, DIRECTIONS, S2C, SERVER, Direction
from stripeproxy.testing.pair import SessionPair

#: Payload bytes per packet, to turn a packet loss rate into a frame loss rate.
MSS = 1448


@dataclass
class Path:
    """One uplink: one-way delay (s), rate (bytes/s, both ways) and packet loss (0..1)."""

    name: str
    delay: float
    rate: float
    loss: float = 0.0
    #: When each direction's serialiser is next free.
    free_at: dict[Direction, float] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0.0))


@dataclass
class _Lane:
    """One subflow direction: when its queued frames arrive, and what is not yet serialised."""

    arrivals: deque[float] = field(default_factory=deque)
    unsent: deque[tuple[float, int]] = field(default_factory=deque)  # (serialised at, bytes)
    last_arrival: float = 0.0

    def unsent_bytes(self, now: float) -> int:
        unsent = self.unsent
        while unsent and unsent[0][0] <= now:
            unsent.popleft()
        return sum(size for _, size in unsent)


class PathNetwork:
    """Runs a :class:`SessionPair` in time over :class:`Path` objects.

    Subflows are added with :meth:`add_subflow` (the pair should be created
    with ``k=0``).  :meth:`run_until` moves the clock from event to event
    (the next frame arrival, the next subflow that drains, the sessions'
    timers) until a condition holds.
    """

    def __init__(self, pair: SessionPair, lowat: int = 192 * 1024, seed: int = 0) -> None:
        self.pair = pair
        self.lowat = lowat
        self.rng = random.Random(seed)
        self.path_of: dict[int, Path] = {}
        self._joining: Path | None = None  # the path of the subflow being added
        self._lanes: dict[tuple[int, Direction], _Lane] = {}
        self._paused: set[tuple[int, Direction]] = set()
        for direction, owner in ((C2S, pair.client_owner), (S2C, pair.server_owner)):
            owner.on_send = self._sender(direction, owner.on_send)

    def _sender(
        self, direction: Direction, inner: Callable[[int, bytes], None] | None
    ) -> Callable[[int, bytes], None]:
        def on_send(sid: int, data: bytes) -> None:
            if inner is not None:
                inner(sid, data)
            self._sent(sid, direction)

        return on_send

    def add_subflow(self, path: Path) -> int:
        """A new subflow on ``path``; returns its id."""
        self._joining = path  # its first frames may go out before add_subflow() returns
        sid = self.pair.add_subflow()
        self._lane(sid, C2S)
        self._joining = None
        return sid

    def kill(self, sid: int) -> None:
        """The subflow dies: what it had in flight is gone."""
        self.pair.kill_subflow(sid)
        self._forget(sid)

    def _lane(self, sid: int, direction: Direction) -> _Lane:
        if sid not in self.path_of:
            assert self._joining is not None, f"subflow {sid} was not added here"
            self.path_of[sid] = self._joining
            for d in DIRECTIONS:
                self._lanes[sid, d] = _Lane()
        return self._lanes[sid, direction]

    def _forget(self, sid: int) -> None:
        for direction in DIRECTIONS:
            self._lanes.pop((sid, direction), None)
            self._paused.discard((sid, direction))

    # -------------------------------------------------------------- the model

    def _sent(self, sid: int, direction: Direction) -> None:
        """Frames were just queued on ``sid``: give each an arrival time."""
        pair = self.pair
        queue = pair.subflows[sid].queues[direction]
        lane = self._lane(sid, direction)
        path = self.path_of[sid]
        now = pair.clock.seconds()
        for frame in list(queue)[len(lane.arrivals) :]:
            size = wire.frame_size(frame, pair.crc)
            start = max(now, path.free_at[direction])
            done = start + size / path.rate
            path.free_at[direction] = done
            arrival = done + path.delay
            packets = max(1, math.ceil(size / MSS))
            if path.loss and self.rng.random() < 1 - (1 - path.loss) ** packets:
                arrival += 2 * path.delay + 0.001  # fast retransmit: about one round trip
            lane.last_arrival = max(lane.last_arrival, arrival)  # TCP delivers in order
            lane.arrivals.append(lane.last_arrival)
            lane.unsent.append((done, size))
        if lane.unsent_bytes(now) >= self.lowat and (sid, direction) not in self._paused:
            # As a transport calls pauseProducing() inside write(): the writer
            # knows before it places its next chunk.
            self._paused.add((sid, direction))
            pair.subflows[sid].blocked.add(direction)
            pair.subflows[sid].writable[direction] = False
            writer = pair.client if direction == C2S else pair.server
            writer.subflow_writable(sid, False, now)

    def _next_event(self) -> float | None:
        times = [lane.arrivals[0] for lane in self._lanes.values() if lane.arrivals]
        now = self.pair.clock.seconds()
        for key in self._paused:
            # Writable again once the bytes not yet serialised drop below lowat.
            lane = self._lanes[key]
            total = lane.unsent_bytes(now)
            if total < self.lowat:
                times.append(now)
                continue
            for done, size in lane.unsent:
                total -= size
                if total < self.lowat:
                    times.append(done)
                    break
        for timer in self.pair.timers.values():
            if timer.deadline is not None:
                times.append(timer.deadline)
        return min(times, default=None)

    def _step(self) -> None:
        pair = self.pair
        now = pair.clock.seconds()
        for sid in [sid for sid, sf in pair.subflows.items() if not sf.alive]:
            self._forget(sid)  # closed by a session: its frames in flight were dropped
        for key in sorted(self._paused):
            sid, direction = key
            if self._lanes[key].unsent_bytes(now) < self.lowat:
                self._paused.discard(key)
                pair.set_writable(sid, True, CLIENT if direction == C2S else SERVER)
        for (sid, direction), lane in sorted(self._lanes.items()):
            arrivals = lane.arrivals
            count = 0
            for when in arrivals:
                if when > now:
                    break
                count += 1
            if count:
                for _ in range(count):
                    arrivals.popleft()
                pair.deliver(sid, direction, count)

    def run_until(self, done: Callable[[], bool], limit: float) -> float:
        """Move time until ``done()``; returns the clock then.  Raises
        :class:`AssertionError` if ``limit`` seconds pass first."""
        pair = self.pair
        deadline = pair.clock.seconds() + limit
        while not done():
            when = self._next_event()
            if when is None or when > deadline:
                raise AssertionError(f"not done after {limit} s (next event at {when})")
            pair.advance(max(0.0, when - pair.clock.seconds()))
            self._step()
        return pair.clock.seconds()
