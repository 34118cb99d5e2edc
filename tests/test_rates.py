"""Sliding-window rates on a deterministic clock."""

from __future__ import annotations

import pytest

from stripeproxy.ops.rates import RateBook, SlidingRate


def test_rate_is_zero_until_two_samples() -> None:
    rate = SlidingRate(10.0)
    assert rate.rate() == 0.0
    rate.sample(0.0, 100)
    assert rate.rate() == 0.0
    assert rate.total == 100


def test_constant_rate_is_exact() -> None:
    rate = SlidingRate(10.0)
    for i in range(41):  # 20 s of samples every 0.5 s at 1000 units/s
        rate.sample(i * 0.5, i * 500)
    assert rate.rate() == pytest.approx(1000.0)


def test_window_forgets_old_traffic_exactly() -> None:
    rate = SlidingRate(10.0)
    # 5 s at 2000/s, then 12 s of silence: the burst leaves the window.
    value = 0
    t = 0.0
    while t < 5.0:
        rate.sample(t, value)
        t += 0.5
        value += 1000
    burst_total = value
    assert rate.rate() == pytest.approx(2000.0)
    for i in range(1, 25):
        rate.sample(5.0 + i * 0.5, burst_total)
        if i == 10:
            # now = 10 s; window [0, 10] still covers the whole 10 000-unit burst
            assert rate.rate() == pytest.approx(burst_total / 10.0)
    assert rate.rate() == 0.0


def test_window_is_ten_seconds_wide() -> None:
    rate = SlidingRate(10.0)
    for i in range(0, 61):
        t = i * 0.5
        rate.sample(t, 0 if t <= 20.0 else int((t - 20.0) * 100))
    # At t = 30 the window [20, 30] holds exactly 10 s of 100 units/s.
    assert rate.rate() == pytest.approx(100.0)


def test_rate_book_sweeps_vanished_keys() -> None:
    book = RateBook(10.0)
    book.sample(0.0, ("a",), 0)
    book.sample(0.0, ("b",), 0)
    book.sweep()
    book.sample(1.0, ("a",), 100)
    book.sweep()
    assert book.rate(("a",)) == pytest.approx(100.0)
    assert book.rate(("b",)) == 0.0
    book.sample(2.0, ("b",), 5)
    assert book.rate(("b",)) == 0.0  # a fresh counter, not the old one
