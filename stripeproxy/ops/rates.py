"""Sliding-window rates of monotonically growing counters.

The session core only keeps cumulative byte counters (cheap on the hot
path); rates are derived here by sampling them on a fixed period.  The rate
over the window is the difference between the newest sample and the oldest
sample still inside the window, divided by the time between them: exact for
whatever was sampled, and no per-byte work.
"""

from __future__ import annotations

from collections import deque

WINDOW = 10.0
PERIOD = 0.5


class SlidingRate:
    """Rate of one cumulative counter over the last ``window`` seconds."""

    __slots__ = ("_samples", "window")

    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def sample(self, now: float, value: int) -> None:
        samples = self._samples
        samples.append((now, value))
        # Keep one sample at or before the window start, so the window is full.
        while len(samples) > 2 and samples[1][0] <= now - self.window:
            samples.popleft()

    @property
    def total(self) -> int:
        return self._samples[-1][1] if self._samples else 0

    def rate(self) -> float:
        """Units per second over the window (0 until two samples exist)."""
        if len(self._samples) < 2:
            return 0.0
        t0, v0 = self._samples[0]
        t1, v1 = self._samples[-1]
        if t1 <= t0:
            return 0.0
        return (v1 - v0) / (t1 - t0)


class RateBook:
    """Named sliding rates that appear and disappear with what they measure."""

    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self._rates: dict[tuple[object, ...], SlidingRate] = {}
        self._seen: set[tuple[object, ...]] = set()

    def sample(self, now: float, key: tuple[object, ...], value: int) -> SlidingRate:
        rate = self._rates.get(key)
        if rate is None:
            rate = self._rates[key] = SlidingRate(self.window)
        rate.sample(now, value)
        self._seen.add(key)
        return rate

    def rate(self, key: tuple[object, ...]) -> float:
        rate = self._rates.get(key)
        return rate.rate() if rate is not None else 0.0

    def sweep(self) -> None:
        """Forget counters not sampled since the last sweep (closed subflows, streams)."""
        for key in set(self._rates) - self._seen:
            del self._rates[key]
        self._seen.clear()
