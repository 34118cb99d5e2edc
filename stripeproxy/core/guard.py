"""Rate limit for failed subflow authentications, per peer address.

A peer that fails to authenticate ``limit`` times within ``window`` seconds
is refused at once (before any challenge) until the window has passed, so
a key-guessing or misconfigured client cannot keep the server busy or flood
its log.  Pure: the clock is injected.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime


class AuthGuard:
    def __init__(self, clock: IReactorTime, limit: int = 10, window: float = 60.0) -> None:
        self.clock = clock
        self.limit = limit
        self.window = window
        self._failures: dict[str, tuple[float, int]] = {}  # host -> (window start, count)

    def _count(self, host: str) -> int:
        entry = self._failures.get(host)
        if entry is None:
            return 0
        start, count = entry
        if self.clock.seconds() - start >= self.window:
            del self._failures[host]
            return 0
        return count

    def blocked(self, host: str) -> bool:
        return self._count(host) >= self.limit

    def failed(self, host: str) -> int:
        """Record a failure; returns the count in the current window."""
        count = self._count(host) + 1
        start = self._failures.get(host, (self.clock.seconds(), 0))[0]
        self._failures[host] = (start, count)
        if len(self._failures) > 10_000:  # bound memory under a spray of addresses
            now = self.clock.seconds()
            self._failures = {h: e for h, e in self._failures.items() if now - e[0] < self.window}
        return count
