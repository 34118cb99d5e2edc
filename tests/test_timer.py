"""The one delayed call of a session (stripeproxy.net.timer.Timer), on a Clock."""

from __future__ import annotations

from twisted.internet.task import Clock

from stripeproxy.net.timer import Timer


class Deadline:
    """A deadline the test sets, counting how often the timer asks for it."""

    def __init__(self, value: float | None) -> None:
        self.value = value
        self.asked = 0

    def __call__(self) -> float | None:
        self.asked += 1
        return self.value


def test_arm_keeps_an_earlier_call_and_replaces_a_later_one() -> None:
    clock = Clock()
    fired: list[float] = []
    timer = Timer(clock, lambda: fired.append(clock.seconds()))
    timer.arm(5.0)
    (first,) = clock.getDelayedCalls()
    timer.arm(7.0)  # later: the call at 5 stays (fires early at worst)
    assert clock.getDelayedCalls() == [first] and timer.deadline == 5.0
    timer.arm(2.0)  # earlier: replaced
    (second,) = clock.getDelayedCalls()
    assert second is not first and second.getTime() == 2.0
    clock.advance(2.0)
    assert fired == [2.0] and clock.getDelayedCalls() == [] and timer.deadline is None


def test_arm_after_turn_asks_once_per_turn_however_many_inputs() -> None:
    clock = Clock()
    fired: list[float] = []
    timer = Timer(clock, lambda: fired.append(clock.seconds()))
    deadline = Deadline(3.0)
    for _ in range(5):  # five inputs in one reactor turn
        timer.arm_after_turn(deadline)
    assert deadline.asked == 0 and timer.deadline is None
    clock.advance(0)  # the turn ends
    assert deadline.asked == 1 and timer.deadline == 3.0
    (call,) = clock.getDelayedCalls()
    assert call.getTime() == 3.0
    deadline.value = 1.0
    timer.arm_after_turn(deadline)
    timer.arm_after_turn(deadline)
    clock.advance(0)
    assert deadline.asked == 2 and timer.deadline == 1.0
    clock.advance(1.0)
    assert fired == [1.0]
    assert clock.getDelayedCalls() == []


def test_a_deadline_due_within_the_advance_still_fires() -> None:
    """On a Clock, an advance past the deadline runs the settle call, then the timer."""
    clock = Clock()
    fired: list[float] = []
    timer = Timer(clock, lambda: fired.append(clock.seconds()))
    timer.arm_after_turn(Deadline(0.002))
    clock.advance(0.01)
    # A Clock runs every call due within the advance, at the advance's end time.
    assert fired == [0.01] and clock.getDelayedCalls() == []


def test_cancel_leaves_no_call_behind() -> None:
    clock = Clock()
    timer = Timer(clock, lambda: None)
    timer.arm(4.0)
    timer.arm_after_turn(Deadline(1.0))
    assert len(clock.getDelayedCalls()) == 2
    timer.cancel()
    assert clock.getDelayedCalls() == [] and timer.deadline is None
    timer.arm_after_turn(Deadline(None))  # nothing due: no call once the turn ends
    clock.advance(0)
    assert clock.getDelayedCalls() == []
