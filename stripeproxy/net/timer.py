"""One delayed call, re-armed to a deadline: a sans-I/O core's only timer.

The session core answers ``next_deadline()``; its adapter keeps exactly one
:class:`~twisted.internet.interfaces.IDelayedCall` for it (aioquic's and h11's
adapters do the same), never one per chunk.

Asking the core for its deadline costs a walk over every subflow (heartbeat,
silence and RTO expiry each), and a busy session takes several inputs per
reactor turn (a local read, a subflow drained, an ACK).  :meth:`Timer.arm_after_turn`
therefore asks once per turn, after the turn's inputs: a zero-delay call
runs right after the reactor has handled the I/O it woke up for, before it
sleeps again, so the timer is never armed later than it would have been.

The real driver and the test pair (:class:`~stripeproxy.testing.SessionPair`)
both use this class, so the tests exercise the timer that runs in production.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Timer:
    """Holds at most one delayed call, no later than the deadline asked for.

    :meth:`arm` keeps a call that is due at or before the new deadline: it
    fires early at worst, and the core, finding nothing due, asks to be
    re-armed.  That saves a cancel and a heap insertion on most inputs, since
    deadlines mostly move later (an ACK postpones a timeout).
    """

    def __init__(self, clock: IReactorTime, fire: Callable[[], None]) -> None:
        self.clock = clock
        self._fire = fire
        self._call: IDelayedCall | None = None
        #: The deadline the live call was armed for (None: no call).
        self.deadline: float | None = None
        # The zero-delay call of arm_after_turn, while one is pending.
        self._settle: IDelayedCall | None = None

    @property
    def when(self) -> float | None:
        """When the live call runs: its deadline, or a hair off it if the
        reactor's own sum rounds differently (see :attr:`deadline`)."""
        return self._call.getTime() if self._call is not None else None

    def arm(self, deadline: float | None) -> None:
        """Make sure the call runs no later than ``deadline`` (None: cancel it)."""
        call = self._call
        if deadline is None:
            self.cancel()
            return
        if call is not None:
            if self.deadline is not None and self.deadline <= deadline:
                return  # fires early at worst; the owner then re-arms
            call.cancel()
        self.deadline = deadline
        delay = max(0.0, deadline - self.clock.seconds())
        self._call = self.clock.callLater(delay, self._run)

    def arm_after_turn(self, deadline: Callable[[], float | None]) -> None:
        """:meth:`arm` for ``deadline()``, asked once the inputs of this reactor
        turn are in (however many times this is called meanwhile)."""
        if self._settle is None:
            self._settle = self.clock.callLater(0, self._arm_now, deadline)

    def _arm_now(self, deadline: Callable[[], float | None]) -> None:
        self._settle = None
        self.arm(deadline())

    def cancel(self) -> None:
        """No call left: neither the timer's nor a pending :meth:`arm_after_turn`."""
        if self._call is not None:
            self._call.cancel()
            self._call = None
        self.deadline = None
        if self._settle is not None:
            self._settle.cancel()
            self._settle = None

    def _run(self) -> None:
        self._call = None
        self.deadline = None
        self._fire()
