"""How long a client subflow waits before it dials again (pure; SPEC.md section 2).

Twisted's ``ClientService`` counts only failed *connects*: a connection that
is made and then fails its handshake (REJECT, a bad server proof, a TLS
verify error, a timeout) resets its count, so with ``backoffPolicy`` alone
such a subflow re-dials every half second for ever.  This policy also counts
handshakes that failed in a row (all subflows together, since they share the
server and the key) and, after a REJECT for a bad key, waits long: that is
a configuration error, and hammering only fills the server's log.

Wire it as ``ClientService(..., retryPolicy=policy.delay)``.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["RedialPolicy"]


class RedialPolicy:
    """Backoff with jitter over failed connects and failed handshakes."""

    def __init__(
        self,
        initial: float = 0.5,
        factor: float = 2.0,
        max_delay: float = 10.0,
        rejected_delay: float = 60.0,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.initial = initial
        self.factor = factor
        self.max_delay = max_delay
        # After a bad-key REJECT: at least this long, and never shorter than max_delay.
        self.rejected_delay = max(rejected_delay, max_delay)
        self.jitter = jitter
        self.failures = 0  # handshakes failed in a row since the last join
        self.key_rejected = False  # the last verdict was "authentication failed"

    def joined(self) -> None:
        """A subflow joined: the path and the key work, re-dial promptly again."""
        self.failures = 0
        self.key_rejected = False

    def handshake_failed(self) -> None:
        """A connection was made but did not join (any reason but a bad key)."""
        self.failures += 1

    def bad_key(self) -> bool:
        """The server rejected our key; True the first time in a row (log it then, once)."""
        self.failures += 1
        first = not self.key_rejected
        self.key_rejected = True
        return first

    def delay(self, attempt: int) -> float:
        """Seconds before the next dial; ``attempt`` is ClientService's count of failed connects."""
        n = max(attempt, self.failures, 1)
        delay = min(self.initial * self.factor ** min(n - 1, 64), self.max_delay)
        if self.key_rejected:
            delay = self.rejected_delay
        return delay + self.jitter()
