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


class Scheduler(Protocol):
    def pick(self, subflows: Sequence[SubflowView]) -> SubflowView | None:
        """Return the subflow for the next chunk, or None if none can take one now."""


class LeastQueuedScheduler:
    """Among writable subflows, the one with the fewest unacknowledged bytes.

    Unacknowledged bytes are the best local proxy for "queued": a subflow
    whose path is slow acknowledges late, so it accumulates in-flight bytes
    and is picked less.  Ties rotate, so equal subflows share the load evenly.
    """

    def __init__(self) -> None:
        self._turn = 0

    def pick(self, subflows: Sequence[SubflowView]) -> SubflowView | None:
        n = len(subflows)
        if n == 0:
            return None
        best: SubflowView | None = None
        start = self._turn % n
        for i in range(n):
            sf = subflows[(start + i) % n]
            if sf.writable and (best is None or sf.inflight < best.inflight):
                best = sf
        self._turn += 1
        return best
