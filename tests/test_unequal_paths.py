"""Striping over unequal paths (issue 12, item 2), on simulated time.

:class:`~stripeproxy.testing.network.PathNetwork` runs a
:class:`~stripeproxy.testing.SessionPair` over paths with a delay and a
rate, on its :class:`~twisted.internet.task.Clock`; every duration here is
simulated, none is measured on the wall clock.  The profiles are the
issue's two-uplink lab: path 1 at 20 ms one way and 50 Mbit/s, path 2 at
30 ms (or 150 ms) and 20 Mbit/s, three subflows each.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from stripeproxy.core.scheduler import (
    BLEST_SAFETY,
    WINDOW,
    AdaptiveScheduler,
    LeastQueuedScheduler,
    Scheduler,
)
from stripeproxy.testing import SessionPair
from stripeproxy.testing.links import CLIENT
from stripeproxy.testing.network import Path, PathNetwork

MiB = 1 << 20
SIZE = 16 * MiB


def fast() -> Path:
    return Path("p1", 0.020, 50e6 / 8)


def slow(delay: float) -> Path:
    return Path("p2", delay, 20e6 / 8)


class Run:
    """One upload of SIZE bytes over some paths, K subflows each."""

    def __init__(
        self, paths: list[Path], scheduler: Callable[[], Scheduler] = AdaptiveScheduler, k: int = 3
    ) -> None:
        self.pair = pair = SessionPair(k=0, client_scheduler=scheduler())
        self.net = net = PathNetwork(pair, seed=7)
        self.path_of = {net.add_subflow(path): path.name for path in paths for _ in range(k)}
        stream_id = pair.open_stream()
        net.run_until(lambda: bool(pair.client_owner.open_results), 5)
        self.data = bytes(range(256)) * (SIZE // 256)
        start = pair.clock.seconds()
        pair.write(CLIENT, stream_id, self.data, eof=True)
        received = pair.server_owner.received
        net.run_until(lambda: len(received.get(stream_id, b"")) >= SIZE, 120)
        self.seconds = pair.clock.seconds() - start
        assert pair.server_owner.data(stream_id) == self.data
        self.carried: dict[str, int] = {}
        for sid in pair.server.subflow_ids:
            name = self.path_of[sid]
            self.carried[name] = self.carried.get(name, 0) + pair.server.subflow(sid).rx_real

    def blocked(self, path: str) -> float:
        """Seconds chunks sat in the server's reorder buffer waiting for ``path``."""
        waits = self.pair.server.reorder_waits()
        return sum(w["blocked_s"] for sid, w in waits.items() if self.path_of[sid] == path)


def test_one_path_delivers_at_its_rate_after_its_delay() -> None:
    # The model itself: 16 MiB at 50 Mbit/s is 2.68 s, plus a one-way delay
    # and the ramp of the first round trips.
    run = Run([fast()])
    assert SIZE / (50e6 / 8) <= run.seconds <= 1.1 * SIZE / (50e6 / 8)


def test_near_equal_paths_add_up() -> None:
    one = Run([fast()]).seconds
    two = Run([slow(0.030)]).seconds
    bonded = Run([fast(), slow(0.030)])
    assert SIZE / bonded.seconds >= 0.9 * (SIZE / one + SIZE / two)
    assert bonded.carried["p2"] > SIZE // 5  # the second path carries its share


@pytest.mark.parametrize("delay", [0.030, 0.150])
def test_bonded_is_never_slower_than_the_better_path_alone(delay: float) -> None:
    best = min(Run([fast()]).seconds, Run([slow(delay)]).seconds)
    assert Run([fast(), slow(delay)]).seconds <= best


def test_the_fast_path_waits_less_on_a_far_one_than_with_plain_striping() -> None:
    # 150 ms one way: the least-queued policy fills the far path as it
    # drains, and the receiver holds the near path's chunks until the far
    # ones arrive; the adaptive policy uses the far path only as far as the
    # reorder window can hold what the near one delivers meanwhile.
    plain = Run([fast(), slow(0.150)], LeastQueuedScheduler)
    adaptive = Run([fast(), slow(0.150)])
    assert adaptive.blocked("p2") < 0.75 * plain.blocked("p2")
    # Since the receiver's window grows under reordering (SPEC.md section 4),
    # plain striping no longer stalls on the far path either: both finish
    # within a percent, and the difference is how long chunks wait (memory).
    assert adaptive.seconds <= 1.01 * plain.seconds
    longest = max(w["blocked_max_s"] for w in adaptive.pair.server.reorder_waits().values())
    assert longest <= (WINDOW / BLEST_SAFETY) / fast().rate  # half the window at the near rate
