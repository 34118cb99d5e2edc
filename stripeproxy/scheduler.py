"""Which subflow carries the next chunk: a small pure policy object.

The session core asks the scheduler once per chunk; the scheduler only reads
per-subflow state and never does I/O, so policies are easy to swap and test.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class SubflowView(Protocol):
    """What a scheduler may read about a subflow."""

    sid: int
    writable: bool
    inflight: int
    srtt: float | None
    suspect: bool


class Scheduler(Protocol):
    def pick(self, subflows: Sequence[SubflowView]) -> SubflowView | None:
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

    def pick(self, subflows: Sequence[SubflowView]) -> SubflowView | None:
        n = len(subflows)
        if n == 0:
            return None
        best: SubflowView | None = None
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
