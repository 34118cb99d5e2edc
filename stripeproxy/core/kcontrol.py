"""How many subflows a session should have: the ``--subflows auto`` controller (pure).

Striping helps when each TCP subflow is held below its share of the path by
its own congestion control: a loss-based algorithm (CUBIC) on a lossy long
path settles at a window of a few dozen packets whatever the link's rate,
so K such flows carry about K times as much (issue 11: 80 ms, 1 % loss,
100 Mbit/s, six flows 12 Mbit/s, twelve 20).  A model-based one (BBR), or
any flow on a clean path, already fills the pipe alone, and more subflows
only add CPU, memory and unfairness to neighbours.  Nothing in the kernel
says which case a path is in, so the controller *measures*: while the
session has data queued and its subflows look loss-limited, it opens a few
more, measures the aggregate goodput for a while, and keeps them only if
goodput rose by a meaningful margin; otherwise it goes back and waits
longer before trying again (exponential hold-off, so a path where more
subflows never help costs one probe per minutes, not a sawtooth).  When the
session is idle for a while it shrinks back to the minimum.

Measurements are noisy (a loss burst, another process on the CPU), so
a decision compares the *mean* of the samples taken during a hold window
(the goodput over the whole window), never one sample, and only samples
taken while the session was busy and had exactly the target number of
subflows open count.  Not the median: a sample counts whole 64 KiB chunks
per half second, about 1 Mbit/s per step, and at a few Mbit/s the median of
such steps moves by a fifth when the true rate barely moves.

The controller is a plain object driven by :meth:`KController.observe`
with the time as an argument, so it is tested on floats with synthetic
goodput curves.  :func:`loss_limited` is the pure half of the
"loss-limited" signal: it compares two kernel readings of one subflow
(``stripeproxy.net.tcpinfo.read`` makes them from ``TCP_INFO``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = [
    "KController",
    "KDecision",
    "TcpSample",
    "loss_limited",
    "session_loss_limited",
]

# The kernel's TCP_CA_* states (include/uapi/linux/tcp.h).
CA_OPEN, CA_DISORDER, CA_CWR, CA_RECOVERY, CA_LOSS = range(5)
# Algorithms that do not take loss as their congestion signal: their
# retransmissions say nothing about whether another subflow would help.
MODEL_BASED = frozenset({"bbr", "bbr2", "bbr3"})


@dataclass(frozen=True)
class KDecision:
    """A new target subflow count, and why (short text for the dashboard and logs)."""

    target: int
    reason: str


@dataclass(frozen=True)
class TcpSample:
    """What the kernel says about one subflow's sending side at one moment.

    Counters are cumulative over the connection's life; ``app_limited`` is
    the kernel's flag on its last delivery-rate sample (the sender had
    nothing to send, so the rate says nothing about the path).  The RTTs
    tell a standing queue (smoothed RTT well above the lowest) from none.
    """

    ca_state: int
    total_retrans: int
    snd_cwnd: int
    unacked: int
    notsent_bytes: int
    delivery_rate: int
    app_limited: bool
    # Smoothed and lowest RTT seen, microseconds (0: the kernel did not say).
    rtt_us: int = 0
    min_rtt_us: int = 0


def loss_limited(before: TcpSample, after: TcpSample, algorithm: str | None = None) -> bool:
    """Whether a subflow was held back by its congestion window between two readings.

    Yes when it retransmitted or is in loss recovery (a loss-based
    algorithm has cut its window, or is about to) or when everything its
    window allows is in flight (cwnd-limited): either way the path could
    carry more than this flow's window lets it.  No when the kernel marked
    the last rate sample app-limited and nothing waits unsent: the sender,
    not the window, was the limit.  A model-based algorithm (``algorithm``
    is BBR) paces at the rate it measured and does not back off on loss,
    so for it only a full window with data waiting counts.
    """
    if after.app_limited and after.notsent_bytes == 0:
        return False
    cwnd_full = after.snd_cwnd > 0 and after.unacked >= after.snd_cwnd
    if algorithm is not None and algorithm.lower() in MODEL_BASED:
        return cwnd_full and after.notsent_bytes > 0
    retransmitted = after.total_retrans > before.total_retrans
    in_recovery = after.ca_state >= CA_RECOVERY
    return retransmitted or in_recovery or cwnd_full


def session_loss_limited(verdicts: Iterable[bool]) -> bool:
    """A session is loss-limited when at least half of its busy subflows are.

    Half, not all: with K subflows some are always between losses; not
    "any": one subflow on a bad route should not make the session grow.
    """
    votes = list(verdicts)
    return bool(votes) and 2 * sum(votes) >= len(votes)


def _mbit(bytes_per_s: float) -> str:
    return f"{bytes_per_s * 8 / 1e6:.1f} Mbit/s"


@dataclass(frozen=True)
class _Measure:
    """A measurement: the mean goodput and the standard error of that mean."""

    level: float
    error: float


@dataclass
class _Window:
    """The samples of one measurement at one subflow count."""

    opened: float
    samples: list[float] = field(default_factory=list)
    limited: int = 0
    first: float | None = None

    def add(self, now: float, goodput: float, limited: bool) -> None:
        if self.first is None:
            self.first = now
        self.samples.append(goodput)
        self.limited += limited

    def held(self, now: float) -> float:
        """Seconds since the first sample counted."""
        return 0.0 if self.first is None else now - self.first

    def measure(self) -> _Measure:
        n = len(self.samples)
        spread = statistics.stdev(self.samples) if n > 1 else 0.0
        return _Measure(statistics.fmean(self.samples), spread / math.sqrt(n))

    @property
    def mostly_limited(self) -> bool:
        return 2 * self.limited >= len(self.samples)


class KController:
    """Chooses the target subflow count of one session from measured goodput.

    Tunables (seconds unless said):

    - ``settle``: after a change, samples are ignored this long (new
      subflows handshake and leave slow start; closed ones drain);
    - ``hold``: then samples are collected this long, and their mean is
      the measurement (several RTTs on any path worth striping);
    - ``min_samples``: a measurement needs at least this many samples;
    - ``margin``: a probe is kept if the mean rose by at least this
      fraction (0.10: 10 %); below it the addition is not worth its cost;
    - ``confidence``: ... and by at least this many standard errors of the
      difference, so that noisy samples need a larger gain, or more of them:
      a probe whose gain is within that many standard errors of ``margin``,
      above or below, measures on, up to ``hold_max`` seconds, and is then
      judged against one standard error (a few CUBIC subflows on a lossy
      path swing +-50 % from one half second to the next, so a real +50 %
      from a third subflow can stay within two standard errors for as long
      as anyone would wait);
    - ``step_fraction``: a probe adds ``max(1, target * step_fraction)``
      subflows, so the step, like the gain it must show, scales with K; each
      addition kept in a row doubles the next one (as slow start does: a
      lossy CUBIC path that gained from 2 to 3 subflows will likely gain
      from 3 to 5, and measuring one subflow at a time would take minutes
      to reach 16); a doubled step taken back is followed, once the count
      it went back to is measured afresh, by a single step (the baseline a
      kept probe leaves is its own measurement, which noise biases upward:
      the probes kept are the ones measured high), and a single step taken
      back ends the run;
    - ``backoff`` / ``backoff_max``: after a failed probe, the next one
      waits ``backoff``, doubled after every further failure up to
      ``backoff_max``; a kept probe resets it;
    - ``idle_after``: not busy this long shrinks the target to ``k_min``;
    - ``give_up``: a probe whose subflows are not all open this long after
      ``settle`` is abandoned (the server refuses, dials fail).
    """

    def __init__(
        self,
        k_min: int,
        k_max: int,
        k_start: int,
        *,
        settle: float = 1.5,
        hold: float = 3.0,
        hold_max: float = 9.0,
        min_samples: int = 3,
        margin: float = 0.10,
        confidence: float = 2.0,
        step_fraction: float = 0.25,
        backoff: float = 8.0,
        backoff_max: float = 120.0,
        idle_after: float = 15.0,
        give_up: float = 10.0,
    ) -> None:
        if not 1 <= k_min <= k_max:
            raise ValueError(f"need 1 <= k_min <= k_max, got {k_min}, {k_max}")
        if not (
            settle >= 0
            and 0 < hold <= hold_max
            and margin >= 0
            and confidence >= 0
            and 0 < backoff <= backoff_max
        ):
            raise ValueError(
                "need settle >= 0, 0 < hold <= hold_max, margin >= 0, confidence >= 0, "
                "0 < backoff <= backoff_max"
            )
        self.k_min = k_min
        self.k_max = k_max
        self.settle = settle
        self.hold = hold
        self.hold_max = hold_max
        self.min_samples = max(1, min_samples)
        self.margin = margin
        self.confidence = confidence
        self.step_fraction = step_fraction
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.idle_after = idle_after
        self.give_up = give_up
        self._target = min(max(k_start, k_min), k_max)
        # The measurement in progress at the current target, the last complete
        # one (the baseline a probe must beat) and, during a probe, the count
        # to go back to.
        self._window: _Window | None = None
        self._baseline: _Measure | None = None
        self._probe_from: int | None = None
        # After an addition did not pay, the next probe checks the other way.
        self._down_next = False
        self._next_probe = -math.inf
        self._wait = backoff
        self._idle_since: float | None = None
        self._streak = 0  # additions kept in a row
        self._reason = "start"

    @property
    def target(self) -> int:
        """The subflow count the session should have now."""
        return self._target

    @property
    def reason(self) -> str:
        """Why the target is what it is: the last decision's reason, or, once a
        probe is kept without a further one (which changes no count, so
        :meth:`observe` returns None), the gain that kept it ("goodput +18% with 7")."""
        return self._reason

    @property
    def probing(self) -> bool:
        """Whether the current target is a trial that may be taken back."""
        return self._probe_from is not None

    def observe(
        self, now: float, k_open: int, goodput_bps: float, busy: bool, loss_limited: bool
    ) -> KDecision | None:
        """One sample (every ~0.5 s): the session's aggregate goodput in bytes/s over
        the recent window, how many subflows are open, whether data was queued and
        whether the subflows look loss-limited.  Returns a new target, or None
        (also when a probe is kept and no further one follows: :attr:`reason` says why)."""
        if self._window is None:
            self._window = _Window(now)
        if not busy:
            return self._idle(now)
        if self._idle_since is not None:
            # Busy again: what was measured before the pause is stale, and the
            # new transfer's first second (slow start) must settle first.
            self._idle_since = None
            self._window = _Window(now)
        window = self._window
        if now - window.opened < self.settle:
            return None
        if k_open != self._target:
            if self.probing and now - window.opened >= self.settle + self.give_up:
                return self._revert(now, f"{self._target} subflows did not open")
            return None
        window.add(now, max(0.0, goodput_bps), loss_limited)
        if window.held(now) < self.hold or len(window.samples) < self.min_samples:
            return None
        if self.probing:
            return self._judge(now, window)
        self._baseline = window.measure()
        self._window = _Window(now)
        if now < self._next_probe:
            return None
        return self._probe(now, window.mostly_limited)

    def _change(self, now: float, target: int, reason: str) -> KDecision:
        self._target = target
        self._reason = reason
        self._window = _Window(now)
        return KDecision(target, reason)

    def _probe(self, now: float, limited: bool, prefix: str = "") -> KDecision | None:
        """Try more subflows while they are loss-limited; fewer when they are
        not, or when the last addition did not pay (is the current count
        itself still worth it?  Without this check, one lucky measurement
        would keep subflows for good)."""
        assert self._baseline is not None
        step = max(1, int(self._target * self.step_fraction))
        at = _mbit(self._baseline.level)
        if (self._down_next or not limited) and self._target > self.k_min:
            self._down_next = False
            self._streak = 0
            target = max(self.k_min, self._target - step)
            why = (
                f"try {target}: not loss-limited at {at}"
                if not limited
                else f"try {target}: does {self._target} pay? ({at})"
            )
        elif limited and self._target < self.k_max:
            # At the minimum a pending check downwards gives way to an
            # addition, whose own judgement then answers it: left pending, it
            # would take back a kept addition's count at once.
            self._down_next = False
            target = min(self.k_max, self._target + (step << min(self._streak, 4)))
            why = f"try {target}: loss-limited at {at}"
        else:
            return None
        self._probe_from = self._target
        return self._change(now, target, prefix + why)

    def _judge(self, now: float, window: _Window) -> KDecision | None:
        """Keep the probe's count or go back: an addition must gain ``margin``
        (and stand out of the noise), a removal must lose less than ``margin``."""
        assert self._baseline is not None and self._probe_from is not None
        base = self._baseline
        measured = window.measure()
        if base.level > 0:
            gain = (measured.level - base.level) / base.level
            error = math.hypot(base.error, measured.error) / base.level
            change = f"goodput {gain:+.0%}"
        else:
            gain, error = (math.inf if measured.level > 0 else 0.0), 0.0
            change = "goodput up from 0"
        if self._target < self._probe_from:
            if gain > -self.margin:
                return self._keep(now, measured, window.mostly_limited, change)
        elif measured.level > base.level:
            needed = self._needed()
            noise = self.confidence * error
            final = window.held(now) >= self.hold_max
            if gain >= needed and gain >= (min(error, noise) if final else noise):
                return self._keep(now, measured, window.mostly_limited, change)
            if gain + noise >= needed and not final:
                # Either side of the bar within the noise: measure on.  Judging
                # now would take back a real gain one probe in ten at +-10 %
                # noise, and each revert doubles the wait for the next probe.
                return None
        return self._revert(now, f"{change} with {self._target}", measured=True)

    def _needed(self) -> float:
        """The gain an addition must show: ``margin``, and for a doubled step
        (one that follows kept additions) half of what the added subflows
        would bring if each carried as much as the others: a large step
        that gains little is more likely noise than a path that still grows."""
        assert self._probe_from is not None
        if self._streak == 0:
            return self.margin
        added = self._target - self._probe_from
        return max(self.margin, 0.5 * added / self._probe_from)

    def _keep(self, now: float, measured: _Measure, limited: bool, change: str) -> KDecision | None:
        """The probe's count stays and its measurement is the new baseline; the
        search goes on at once in the same direction while the reason for it
        holds (loss-limited: add; not: remove)."""
        added = self._probe_from is not None and self._target > self._probe_from
        self._streak = self._streak + 1 if added else 0
        self._probe_from = None
        self._baseline = measured
        self._window = _Window(now)
        self._reason = f"{change} with {self._target}"
        if added == limited:
            probe = self._probe(now, limited, f"{self._reason}; ")
            if probe is not None:
                return probe
        self._hold_off(now)
        return None

    def _revert(self, now: float, why: str, measured: bool = False) -> KDecision:
        """Back to the count before the probe.  A measured doubled step that
        did not pay leaves the search open: the next probe, a single step,
        follows as soon as that count is measured again (on a lossy CUBIC
        path, one lucky sample on the way up would otherwise stop the climb
        at a third of the link for a whole hold-off).  Any other revert ends
        the search."""
        assert self._probe_from is not None
        back = self._probe_from
        added = self._target > back
        retry = measured and added and self._streak > 0
        self._down_next = added and not retry
        self._streak = 0
        self._probe_from = None
        if retry:
            self._next_probe = now
        else:
            self._hold_off(now)
        return self._change(now, back, f"{why}: back to {back}")

    def _hold_off(self, now: float) -> None:
        """A search (a run of probes in one direction) ended: the next starts
        after the hold-off, which doubles every time, so that a controller
        that cannot tell noise from gain costs a probe per ``backoff_max``,
        not a sawtooth.  Only idleness resets it (a new transfer)."""
        self._next_probe = now + self._wait
        self._wait = min(self._wait * 2, self.backoff_max)

    def _idle(self, now: float) -> KDecision | None:
        if self._idle_since is None:
            self._idle_since = now
        if now - self._idle_since < self.idle_after:
            return None
        self._probe_from = None
        self._down_next = False
        self._baseline = None
        self._wait = self.backoff
        self._next_probe = -math.inf
        self._streak = 0
        if self._target == self.k_min:
            return None
        return self._change(now, self.k_min, f"idle {now - self._idle_since:.0f} s")
