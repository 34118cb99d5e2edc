"""Tests for the subflow scheduling policy."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest

from stripeproxy.core.scheduler import AdaptiveScheduler, LeastQueuedScheduler, make_scheduler


@dataclass
class View:
    sid: int
    writable: bool = True
    inflight: int = 0
    srtt: float | None = None
    suspect: bool = False
    goodput: float = 0.0


def picks(scheduler: LeastQueuedScheduler, views: list[View], n: int) -> list[int | None]:
    out: list[int | None] = []
    for _ in range(n):
        chosen = scheduler.pick(views)
        out.append(None if chosen is None else chosen.sid)
    return out


def test_least_queued_subflow_wins_whatever_the_turn() -> None:
    views = [View(1, inflight=300), View(2, inflight=100), View(3, inflight=200)]
    assert picks(LeastQueuedScheduler(), views, 6) == [2] * 6


def test_choice_follows_inflight_as_it_changes() -> None:
    scheduler = LeastQueuedScheduler()
    views = [View(1), View(2), View(3)]
    chosen: list[int] = []
    for _ in range(9):
        sf = scheduler.pick(views)
        assert sf is not None
        chosen.append(sf.sid)
        views[sf.sid - 1].inflight += 10 * sf.sid  # subflow 3 fills fastest
    # Always the least loaded; ties (20/20/30 and 40/40/60) go to the next in turn.
    assert chosen == [1, 2, 3, 1, 2, 1, 3, 1, 2]
    assert Counter(chosen) == {1: 4, 2: 3, 3: 2}
    assert [v.inflight for v in views] == [40, 60, 60]


def test_unwritable_subflows_are_skipped_even_if_empty() -> None:
    views = [View(1, writable=False), View(2, inflight=500), View(3, inflight=400)]
    assert picks(LeastQueuedScheduler(), views, 3) == [3, 3, 3]


def test_nothing_writable_or_no_subflow_gives_none() -> None:
    scheduler = LeastQueuedScheduler()
    assert scheduler.pick([View(1, writable=False), View(2, writable=False)]) is None
    assert scheduler.pick([]) is None


def test_writability_change_is_seen_on_the_next_pick() -> None:
    scheduler = LeastQueuedScheduler()
    views = [View(1), View(2, inflight=50)]
    assert picks(scheduler, views, 2) == [1, 1]
    views[0].writable = False
    assert picks(scheduler, views, 2) == [2, 2]
    views[0].writable = True
    assert picks(scheduler, views, 1) == [1]


def test_ties_rotate() -> None:
    views = [View(1, inflight=7), View(2, inflight=7), View(3, inflight=7)]
    assert picks(LeastQueuedScheduler(), views, 7) == [1, 2, 3, 1, 2, 3, 1]


def test_ties_rotate_evenly_around_an_unwritable_subflow() -> None:
    views = [View(1), View(2, writable=False), View(3)]
    assert picks(LeastQueuedScheduler(), views, 6) == [1, 3, 1, 3, 1, 3]


def test_ties_rotate_evenly_around_a_loaded_subflow() -> None:
    views = [View(1), View(2, inflight=100), View(3), View(4)]
    chosen = picks(LeastQueuedScheduler(), views, 9)
    assert chosen == [1, 3, 4, 1, 3, 4, 1, 3, 4]


def test_rotation_survives_a_shrinking_list() -> None:
    scheduler = LeastQueuedScheduler()
    views = [View(1), View(2), View(3)]
    assert picks(scheduler, views, 2) == [1, 2]
    del views[2]
    assert picks(scheduler, views, 3) == [1, 2, 1]


def test_suspect_subflow_only_when_no_healthy_one_can_take_data() -> None:
    scheduler = LeastQueuedScheduler()
    views = [View(1, suspect=True), View(2, inflight=500_000), View(3, writable=False)]
    assert picks(scheduler, views, 3) == [2, 2, 2]
    views[1].writable = False
    assert picks(scheduler, views, 2) == [1, 1]
    views[0].suspect = False
    views[1].writable = True
    assert picks(scheduler, views, 1) == [1]


def test_adaptive_spreads_chunks_in_proportion_to_goodput() -> None:
    # Two subflows at 30 and 10 MB/s: chunks go 3:1, modelled by draining
    # inflight at each subflow's goodput between picks.
    scheduler = AdaptiveScheduler(chunk=64 * 1024, probe_every=10_000)
    views = [View(1, goodput=30e6), View(2, goodput=10e6)]
    counts = {1: 0, 2: 0}
    for _ in range(400):
        chosen = scheduler.pick(views)
        assert chosen is not None
        counts[chosen.sid] += 1
        chosen.inflight += 64 * 1024
        for view in views:  # 1 ms passes
            view.inflight = max(0, view.inflight - int(view.goodput / 1000))
    assert 2.5 < counts[1] / counts[2] < 3.5, counts


def test_adaptive_starves_a_degraded_subflow_but_still_probes_it() -> None:
    scheduler = AdaptiveScheduler(chunk=64 * 1024, probe_every=8)
    views = [
        View(1, goodput=50e6),
        View(2, goodput=50e6),
        View(3, goodput=0.5e6, inflight=256 * 1024),
    ]
    chosen = [pick_sid(scheduler, views) for _ in range(64)]
    assert 0 < chosen.count(3) <= 64 // 8  # only the probes
    assert chosen.count(1) + chosen.count(2) >= 56


def test_adaptive_treats_unmeasured_subflows_as_fast_and_respects_state() -> None:
    scheduler = AdaptiveScheduler(probe_every=10_000)
    views = [View(1, goodput=20e6, inflight=1_000_000), View(2)]  # 2: new, no estimate yet
    assert pick_sid(scheduler, views) == 2
    views[1].writable = False
    assert pick_sid(scheduler, views) == 1
    views[0].suspect = True
    views[1].writable = True
    assert pick_sid(scheduler, views) == 2
    views[1].writable = False
    assert pick_sid(scheduler, views) == 1  # suspect, but the only one that can take data
    views[0].writable = False
    assert scheduler.pick(views) is None


def pick_sid(scheduler: AdaptiveScheduler, views: list[View]) -> int:
    chosen = scheduler.pick(views)
    assert chosen is not None
    return chosen.sid


def test_make_scheduler() -> None:
    assert isinstance(make_scheduler("adaptive"), AdaptiveScheduler)
    assert isinstance(make_scheduler("least-queued"), LeastQueuedScheduler)
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("random")


def test_adaptive_waits_for_a_full_fast_subflow_rather_than_use_a_slow_one() -> None:
    # ECF/BLEST: the fast subflow (50 MB/s) is full, the slow one (2 MB/s,
    # far) is free; a chunk there would arrive long after the fast one has
    # drained its queue and taken it, so the scheduler answers None.
    scheduler = AdaptiveScheduler(chunk=64 * 1024, probe_every=10_000)
    near = View(1, writable=False, inflight=256 * 1024, srtt=0.04, goodput=50e6)
    far = View(2, inflight=0, srtt=0.3, goodput=2e6)
    assert scheduler.pick([near, far]) is None
    # Once the far one would deliver sooner (the near one is badly backed up), it is used.
    near.inflight = 8 * 1024 * 1024
    assert pick_sid(scheduler, [near, far]) == 2
    # Once the fast one has room, it is used.
    near.inflight, near.writable = 256 * 1024, True
    assert pick_sid(scheduler, [near, far]) == 1


def test_adaptive_does_not_wait_for_near_equals_suspects_or_unmeasured_subflows() -> None:
    scheduler = AdaptiveScheduler(chunk=64 * 1024, probe_every=10_000, window=1024 * 1024)
    busy = View(1, writable=False, inflight=128 * 1024, srtt=0.04, goodput=10e6)
    free = View(2, inflight=128 * 1024, srtt=0.05, goodput=9e6)  # a little slower: no wait
    assert pick_sid(scheduler, [busy, free]) == 2
    free.goodput = 1e6
    assert scheduler.pick([busy, free]) is None
    busy.suspect = True  # a chunk timed out there: it may never drain
    assert pick_sid(scheduler, [busy, free]) == 2
    busy.suspect, busy.srtt, busy.goodput = False, None, 0.0  # nothing known about it
    assert pick_sid(scheduler, [busy, free]) == 2


def test_adaptive_uses_a_slow_subflow_while_the_window_absorbs_its_lateness() -> None:
    # BLEST: the chunk on the slow subflow arrives ~0.18 s after the busy
    # one would deliver it; the busy one delivers 1.8 MB meanwhile, which
    # the receiver holds.  A 4 MiB window takes that (with half to spare);
    # a 2 MiB one does not, and the scheduler waits.
    busy = View(1, writable=False, inflight=128 * 1024, srtt=0.04, goodput=10e6)
    slow = View(2, inflight=128 * 1024, srtt=0.05, goodput=1e6)
    assert (
        pick_sid(AdaptiveScheduler(probe_every=10_000, window=4 * 1024 * 1024), [busy, slow]) == 2
    )
    assert AdaptiveScheduler(probe_every=10_000, window=2 * 1024 * 1024).pick([busy, slow]) is None


def test_adaptive_never_waits_out_a_subflow_as_near_as_the_busy_one() -> None:
    # Same round trip: the free subflow's low goodput only says it was given
    # little (app-limited); waiting it out would starve it for good.
    scheduler = AdaptiveScheduler(chunk=64 * 1024, probe_every=10_000)
    busy = View(1, writable=False, inflight=128 * 1024, srtt=0.04, goodput=10e6)
    starved = View(2, srtt=0.042, goodput=0.2e6)
    assert pick_sid(scheduler, [busy, starved]) == 2
    # The smallest RTT seen counts, not the current one (queues inflate it).
    far = View(3, srtt=0.3, goodput=0.2e6)
    assert scheduler.pick([busy, far]) is None
    far.srtt = 0.04
    assert pick_sid(scheduler, [busy, far]) == 3
    far.srtt = 0.5
    assert pick_sid(scheduler, [busy, far]) == 3


def test_adaptive_gives_a_new_subflow_one_chunk_until_it_is_measured() -> None:
    # A new subflow may be on a slow path: it is not given a burst on trust.
    scheduler = AdaptiveScheduler(chunk=64 * 1024, probe_every=10_000)
    old = View(1, inflight=4 * 1024 * 1024, srtt=0.02, goodput=20e6)
    new = View(2)
    assert pick_sid(scheduler, [old, new]) == 2
    new.inflight = 64 * 1024
    assert pick_sid(scheduler, [old, new]) == 1
    old.writable = False
    assert scheduler.pick([old, new]) is None  # the next ACK brings the sender back
    new.srtt = 0.03  # its first ACK: measured now
    assert pick_sid(scheduler, [old, new]) == 2
