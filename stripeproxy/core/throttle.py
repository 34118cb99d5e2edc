"""One log line per interval about a limit, with a count of the hits between.

A limit that is hit in a loop (a flood of logins, CONNECTs past the stream
ceiling) must be visible to the operator without flooding the log: the first
hit is logged, the next ones within ``interval`` are only counted, and the
next line says how many there were.  Pure: the time comes in as an argument.
"""

from __future__ import annotations

#: Seconds between two log lines about the same limit.
LIMIT_LOG_INTERVAL = 60.0


class Throttle:
    """When the next line about one limit (and one subject) may be logged."""

    __slots__ = ("interval", "logged_at", "suppressed")

    def __init__(self, interval: float = LIMIT_LOG_INTERVAL) -> None:
        self.interval = interval
        self.logged_at: float | None = None
        self.suppressed = 0

    def due(self, now: float) -> int | None:
        """The hits not logged since the last line if a line is due now (and
        counts it as logged), else None (and counts the hit)."""
        if self.logged_at is not None and now - self.logged_at < self.interval:
            self.suppressed += 1
            return None
        suppressed, self.suppressed, self.logged_at = self.suppressed, 0, now
        return suppressed
