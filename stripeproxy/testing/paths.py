"""Paths with a delay and a rate for :class:`~stripeproxy.testing.pair.SessionPair`.

The pair's subflows deliver only when a test says so.  :class:`TimedPaths`
says so the way a network would: each frame arrives a one-way delay after it
was written (plus jitter, never overtaking the frame before it: TCP order),
and each subflow direction passes at most its rate in bytes per second.  The
pair's ``capacity`` then plays the part of the congestion window and the
socket buffer: a subflow holding that much in flight stops taking chunks.
Time moves in ticks of simulated time, so RTTs, queueing and timeouts behave
as on a real path while the test stays deterministic (one seeded RNG).

Black holes come in two kinds: :meth:`SessionPair.hold` keeps frames queued
and never delivers them, so the subflow fills up and stops taking chunks (a
path that died: the sender's TCP window closes), while :attr:`TimedPaths.swallowed`
directions lose every frame and stay writable (a middlebox that reads and
discards, as the fault relay's black hole does).  Killing a subflow and
deciding when the run is over are the test's.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable

from stripeproxy.testing.links import DIRECTIONS, Direction, wire_size
from stripeproxy.testing.pair import SessionPair


class TimedPaths:
    """Delivers a pair's frames after per-subflow delays, at per-subflow rates.

    ``delay`` (seconds, one way) and ``rate`` (bytes per second, each way)
    are given per subflow id; ``jitter`` adds up to that many seconds to
    each frame's delay, and ``rate_jitter`` (0 to 1) lets each tick pass
    between ``1 - rate_jitter`` and ``1 + rate_jitter`` times its share of
    the rate, as a receiver that reads its sockets in turn drains them
    unevenly.  Subflows added later get ``default_delay`` and ``default_rate``.
    """

    def __init__(
        self,
        pair: SessionPair,
        delay: dict[int, float],
        rate: dict[int, float],
        *,
        jitter: float = 0.0,
        rate_jitter: float = 0.0,
        seed: int = 0,
        tick: float = 0.001,
        default_delay: float = 0.025,
        default_rate: float = 8e6,
    ) -> None:
        self.pair = pair
        self.delay = dict(delay)
        self.rate = dict(rate)
        self.jitter = jitter
        self.rate_jitter = rate_jitter
        self.tick = tick
        self.default_delay = default_delay
        self.default_rate = default_rate
        #: (subflow, direction) pairs whose frames vanish on the way.
        self.swallowed: set[tuple[int, Direction]] = set()
        self._rng = random.Random(seed)
        self._arrivals: dict[tuple[int, Direction], deque[float]] = {}
        self._tokens: dict[tuple[int, Direction], float] = {}

    def run(
        self, done: Callable[[], bool], limit: float, each: Callable[[], None] | None = None
    ) -> None:
        """Tick until ``done()``; fail if that takes more than ``limit`` simulated seconds.

        ``each`` is called after every tick (to sample progress).
        """
        start = self.pair.clock.seconds()
        while not done():
            assert self.pair.clock.seconds() - start < limit, "did not finish in time"
            self.step()
            if each is not None:
                each()

    def step(self) -> None:
        """One tick: time passes (timers run), then every due frame that fits the rate arrives."""
        pair = self.pair
        pair.advance(self.tick)
        for sid, direction in self.swallowed:
            if pair.subflows[sid].alive:
                pair.swallow(sid, direction)
        self._stamp()
        keys = [(sid, d) for sid, sf in pair.subflows.items() if sf.alive for d in DIRECTIONS]
        self._rng.shuffle(keys)  # a receiver reads its sockets in no fixed order
        now = pair.clock.seconds()
        for key in keys:
            sid, direction = key
            sf = pair.subflows[sid]
            rate = self.rate.get(sid, self.default_rate)
            share = rate * self.tick
            spread = self.rate_jitter
            budget = self._tokens.get(key, 0.0) + share * self._rng.uniform(1 - spread, 1 + spread)
            arrivals = self._arrivals.get(key)
            count = 0
            if direction not in sf.held and arrivals:
                queue = sf.queues[direction]
                while count < len(arrivals) and arrivals[count] <= now and budget > 0:
                    budget -= wire_size(queue[count], pair.crc)
                    count += 1
            # An idle path saves no more than one tick's worth: no bursts after a pause.
            self._tokens[key] = min(budget, share)
            if count:
                pair.deliver(sid, direction, count)
                self._stamp()

    def _stamp(self) -> None:
        """Give every newly queued frame its arrival time (kept in TCP order)."""
        now = self.pair.clock.seconds()
        for sid, sf in self.pair.subflows.items():
            for direction in DIRECTIONS:
                key = (sid, direction)
                arrivals = self._arrivals.setdefault(key, deque())
                queued = len(sf.queues[direction])
                while len(arrivals) > queued:  # delivered or dropped behind our back
                    arrivals.popleft()
                delay = self.delay.get(sid, self.default_delay)
                while len(arrivals) < queued:
                    at = now + delay + self._rng.uniform(0.0, self.jitter)
                    arrivals.append(max(at, arrivals[-1]) if arrivals else at)
