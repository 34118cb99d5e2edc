"""Which subflow carries the next chunk: a small pure policy object.

The session core asks the scheduler once per chunk; the scheduler only reads
per-subflow state and never does I/O, so policies are easy to swap and test.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from stripeproxy.core.wire import CHUNK_SIZE


class SubflowView(Protocol):
    """What a scheduler may read about a subflow."""

    sid: int
    writable: bool
    inflight: int
    srtt: float | None
    suspect: bool
    goodput: float


#: The caller's own subflow type: a scheduler hands back one of the objects it was given.
V = TypeVar("V", bound=SubflowView)


class Scheduler(Protocol):
    def pick(self, subflows: Sequence[V]) -> V | None:
        """Return the subflow for the next chunk, or None if none can take one now."""


class LeastQueuedScheduler:
    """Among writable subflows, the one with the fewest unacknowledged bytes.

    Unacknowledged bytes are the best local proxy for "queued": a subflow
    whose path is slow acknowledges late, so it accumulates in-flight bytes
    and is picked less.  Ties rotate, so equal subflows share the load evenly.
    A suspect subflow (one whose chunk timed out) only gets data when no
    healthy subflow can take it.
    """

    def __init__(self) -> None:
        self._turn = 0

    def pick(self, subflows: Sequence[V]) -> V | None:
        n = len(subflows)
        if n == 0:
            return None
        best: V | None = None
        best_index = 0
        start = self._turn % n
        for i in range(n):
            index = (start + i) % n
            sf = subflows[index]
            if sf.writable and (
                best is None or (sf.suspect, sf.inflight) < (best.suspect, best.inflight)
            ):
                best = sf
                best_index = index
        # The next search starts just after the winner, not one past the last
        # start: a tied subflow that follows a skipped one would win twice.
        self._turn = best_index + 1
        return best


class AdaptiveScheduler:
    """Earliest expected delivery first, weighted by recent goodput.

    A chunk placed on a subflow arrives after the subflow has delivered what
    it already holds: roughly ``(inflight + chunk) / goodput`` seconds, plus
    half an RTT.  Picking the smallest such time sends most chunks to the
    subflows that are delivering fastest right now, in proportion to their
    goodput, and few to a degraded one, which keeps the receiver's reorder
    buffer from waiting on it.  A subflow with no goodput measured yet (new,
    or idle) is assumed as fast as the best one; and every ``probe_every``
    picks the least recently used writable subflow gets a chunk whatever
    its estimate, so a subflow that recovered can earn its weight back.
    Suspect subflows are used only when nothing else can take data.
    """

    def __init__(self, chunk: int = CHUNK_SIZE, probe_every: int = 64) -> None:
        self.chunk = chunk
        self.probe_every = probe_every
        self._picks = 0
        self._last_pick: dict[int, int] = {}

    def pick(self, subflows: Sequence[V]) -> V | None:
        writable = [sf for sf in subflows if sf.writable]
        if not writable:
            return None
        healthy = [sf for sf in writable if not sf.suspect] or writable
        self._picks += 1
        if len(healthy) > 1 and self._picks % self.probe_every == 0:
            choice = min(healthy, key=lambda sf: self._last_pick.get(sf.sid, -1))
        else:
            best_rate = max((sf.goodput for sf in healthy), default=0.0)
            choice = min(healthy, key=lambda sf: self._delivery_time(sf, best_rate))
        self._last_pick[choice.sid] = self._picks
        return choice

    def _delivery_time(self, sf: SubflowView, best_rate: float) -> float:
        rate = sf.goodput or best_rate
        if rate <= 0:
            return float(sf.inflight)  # nothing measured anywhere yet: least queued
        return (sf.inflight + self.chunk) / rate + (sf.srtt or 0.0) / 2


SCHEDULERS = ("adaptive", "least-queued")


def make_scheduler(name: str, chunk: int = CHUNK_SIZE) -> Scheduler:
    if name == "adaptive":
        return AdaptiveScheduler(chunk)
    if name == "least-queued":
        return LeastQueuedScheduler()
    raise ValueError(f"unknown scheduler {name!r}: choose from {', '.join(SCHEDULERS)}")
