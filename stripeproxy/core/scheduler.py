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


#: How much later than on a busy subflow a chunk must be expected on a free one
#: before the scheduler waits: estimates are rough, and between near-equal
#: subflows waiting only costs time.
WAIT_MARGIN = 1.5

#: The receiver's reorder window per stream assumed by default (SPEC.md section 8's
#: stream window); :class:`~stripeproxy.core.session.Session` passes its own.
WINDOW = 4 * 1024 * 1024
#: Use at most 1/BLEST_SAFETY of that window for chunks held behind a slow subflow's.
BLEST_SAFETY = 2.0

#: A path is nearer than another if its round trip is shorter by this much (s):
#: more than the jitter of RTTs measured on one path.
NEARER = 0.005

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
    """Earliest expected delivery first, and waiting when that is sooner.

    A chunk placed on a subflow arrives after the subflow has delivered what
    it already holds: roughly ``(inflight + chunk) / rate`` seconds, plus
    half an RTT, where ``rate`` is the subflow's recent goodput.  Picking
    the smallest such time sends chunks to the subflows in proportion to
    their goodput.  On unequal paths that is not enough: when the fast
    subflows are full (not writable), the next chunk would go to a slow one
    and arrive after everything the fast ones deliver meanwhile, and the
    receiver's reorder buffer waits for it (head-of-line blocking; issue
    12).  So, as MPTCP's ECF and BLEST schedulers do, a chunk goes to a
    writable subflow only if it is expected there no later than on a busy
    subflow once that one has room; otherwise the scheduler answers None
    and the chunk waits for the busy subflow to drain (its resume, or the
    next ACK, brings the sender back).  Busy subflows that are suspect or
    never measured are not waited for.

    A subflow with no goodput measured yet is assumed to deliver one chunk
    per round trip, or, before its first RTT sample, as fast as the best
    one; but until that first sample it carries at most one chunk, so that
    a new subflow on a slow path cannot swallow a burst.  Every
    ``probe_every`` picks the least recently used writable subflow gets a
    chunk whatever its estimate, so a subflow that recovered can earn its
    weight back.  Suspect subflows are used only when nothing else can take
    data.
    """

    def __init__(
        self, chunk: int = CHUNK_SIZE, probe_every: int = 64, window: int = WINDOW
    ) -> None:
        self.chunk = chunk
        self.window = window
        self.probe_every = probe_every
        self._picks = 0
        self._last_pick: dict[int, int] = {}
        self._min_rtt: dict[int, float] = {}

    def pick(self, subflows: Sequence[V]) -> V | None:
        writable = [sf for sf in subflows if sf.writable]
        if not writable:
            return None
        healthy = [sf for sf in writable if not sf.suspect] or writable
        fallback = max((sf.goodput for sf in subflows if not sf.suspect), default=0.0)
        if fallback > 0:
            # Something is measured: a subflow that never was carries one chunk
            # until it is (or the whole burst would go to a new, maybe slow, path).
            healthy = [sf for sf in healthy if self._measured(sf) or sf.inflight < self.chunk]
            if not healthy:
                return None  # the next ACK brings the sender back
        self._picks += 1
        if len(healthy) > 1 and self._picks % self.probe_every == 0:
            choice = min(healthy, key=lambda sf: self._last_pick.get(sf.sid, -1))
        else:
            choice = min(healthy, key=lambda sf: self._delivery_time(sf, fallback))
            if self._better_to_wait(subflows, choice, fallback):
                return None
        self._last_pick[choice.sid] = self._picks
        return choice

    def _better_to_wait(self, subflows: Sequence[V], choice: V, fallback: float) -> bool:
        """A busy subflow on a nearer path would deliver the chunk sooner than
        ``choice`` once it has room, and the receiver's reorder buffer could
        not absorb the difference.

        Only a farther path (a longer round trip, which load does not change)
        is waited out: goodput only measures what a subflow was given, so a
        starved subflow of the same path would look slow, be waited out, and
        starve for good.
        """
        late = self._delivery_time(choice, fallback)
        far = self._base_rtt(choice)
        soonest = min(
            (
                self._delivery_time(sf, fallback)
                for sf in subflows
                if not sf.writable
                and not sf.suspect
                and self._measured(sf)
                and far > self._base_rtt(sf) + NEARER
            ),
            default=None,
        )
        if soonest is None or soonest * WAIT_MARGIN >= late:
            return False
        # BLEST: while this chunk is on its way, the faster subflows deliver
        # what follows it, and the receiver holds all that until it arrives.
        # A bulk transfer gains the slow path's rate as long as that fits in
        # the window with room to spare; past that the fast path would stall.
        faster = sum(
            sf.goodput or fallback
            for sf in subflows
            if sf is not choice and not sf.suspect and self._delivery_time(sf, fallback) < late
        )
        return (late - soonest) * faster * BLEST_SAFETY > self.window

    @staticmethod
    def _measured(sf: SubflowView) -> bool:
        return sf.srtt is not None or sf.goodput > 0

    def _delivery_time(self, sf: SubflowView, fallback: float) -> float:
        rate = sf.goodput or fallback
        if rate <= 0:
            return float(sf.inflight)  # nothing measured anywhere yet: least queued
        return (sf.inflight + self.chunk) / rate + (sf.srtt or 0.0) / 2

    def _base_rtt(self, sf: SubflowView) -> float:
        """The smallest smoothed RTT seen on ``sf``: its path's round trip, queues aside."""
        srtt = sf.srtt
        if srtt is None:
            return 0.0
        base = self._min_rtt.get(sf.sid)
        if base is None or srtt < base:
            self._min_rtt[sf.sid] = base = srtt
        return base


SCHEDULERS = ("adaptive", "least-queued")


def make_scheduler(name: str, chunk: int = CHUNK_SIZE, window: int = WINDOW) -> Scheduler:
    if name == "adaptive":
        return AdaptiveScheduler(chunk, window=window)
    if name == "least-queued":
        return LeastQueuedScheduler()
    raise ValueError(f"unknown scheduler {name!r}: choose from {', '.join(SCHEDULERS)}")
