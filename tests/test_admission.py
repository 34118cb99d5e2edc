"""Server admission and the client's re-dial policy: pure objects on plain-float time."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from stripeproxy.core import wire
from stripeproxy.core.admission import Admission, AdmissionLimits
from stripeproxy.core.redial import RedialPolicy


class RecordingLog:
    """Stands in for txaio's logger: keeps (format, fields) of every line."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def warn(self, format: str, **kwargs: Any) -> None:
        self.lines.append((format, kwargs))

    def info(self, format: str, **kwargs: Any) -> None:
        self.lines.append((format, kwargs))

    def text(self) -> list[str]:
        """The lines as twisted.logger would format them (``{key!r}`` included)."""
        from twisted.logger import formatEvent

        return [formatEvent({"log_format": f, **kw}) for f, kw in self.lines]


def admission(**limits: Any) -> tuple[Admission, RecordingLog]:
    log = RecordingLog()
    return Admission(AdmissionLimits(**limits), log=log), log


# ------------------------------------------------------------ the handshake pool


def test_the_pool_and_each_addresss_share_are_bounded() -> None:
    adm, log = admission(max_handshakes=4, handshakes_per_address=2)
    assert adm.begin_handshake("a", 0.0) == 0.0
    assert adm.begin_handshake("a", 0.0) == 0.0
    assert adm.begin_handshake("a", 0.0) is None  # a's share is full
    assert adm.begin_handshake("b", 0.0) == 0.0  # b is not affected
    assert adm.begin_handshake("c", 0.0) == 0.0
    assert adm.begin_handshake("d", 0.0) is None  # the pool is full
    assert adm.handshaking == 4 and adm.handshaking_from == {"a": 2, "b": 1, "c": 1}
    adm.end_handshake("a")
    assert adm.begin_handshake("a", 1.0) == 0.0
    for host in ("a", "a", "b", "c"):
        adm.end_handshake(host)
    assert adm.handshaking == 0 and adm.handshaking_from == {}
    assert [kw.get("host", "pool") for _, kw in log.lines] == ["a", "pool"]


def test_no_share_behind_a_balancer() -> None:
    adm, _ = admission(max_handshakes=3, handshakes_per_address=0)
    assert [adm.begin_handshake("lb", 0.0) for _ in range(4)] == [0.0, 0.0, 0.0, None]
    adm.move_handshake("lb", "203.0.113.7")
    assert adm.handshaking == 3 and adm.handshaking_from == {"lb": 2, "203.0.113.7": 1}


def test_limit_hits_are_logged_once_per_interval_with_a_count() -> None:
    adm, log = admission(max_handshakes=0, log_interval=60.0)
    for t in range(0, 120, 10):  # 12 hits: at 0 and at 60 s a line
        assert adm.begin_handshake("a", float(t)) is None
    assert len(log.lines) == 2
    assert log.lines[0][1]["more"] == ""
    assert log.lines[1][1]["more"] == " (5 more since the last such line)"


# ------------------------------------------------------------------ failed logins


def test_failures_double_the_delay_up_to_the_cap_and_never_refuse() -> None:
    adm, _ = admission(delay_base=0.5, delay_max=5.0, failure_window=60.0)
    delays = [adm.auth_failed("a", "", 0.0) for _ in range(6)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    # A new connection from the failing address is admitted, only later challenged.
    assert adm.begin_handshake("a", 1.0) == 4.0
    assert adm.begin_handshake("b", 1.0) == 0.0
    assert adm.challenge_delay("a", 5.0) == 0.0  # served


@given(st.lists(st.floats(0, 30), min_size=1, max_size=200))
def test_a_correct_key_is_never_kept_out_by_failures(gaps: list[float]) -> None:
    """However failures are spread, a connection from the failing address is
    admitted and its CHALLENGE waits no longer than delay_max."""
    adm, _ = admission(delay_max=5.0, max_handshakes=1000, handshakes_per_address=1000)
    now = 0.0
    for gap in gaps:
        now += gap
        adm.auth_failed("nat", "", now)
        delay = adm.begin_handshake("nat", now)
        assert delay is not None and 0.0 <= delay <= 5.0
        adm.end_handshake("nat")


def test_failures_are_forgotten_after_a_quiet_window_only() -> None:
    adm, _ = admission(failure_window=60.0)
    adm.auth_failed("a", "", 0.0)
    adm.auth_failed("a", "", 50.0)  # not quiet: the streak goes on
    assert adm.failures("a", 109.0) == 2
    assert adm.failures("a", 110.0) == 0


def test_failures_are_logged_one_by_one_then_once_per_interval() -> None:
    adm, log = admission(failures_logged=3, log_interval=60.0)
    for t in range(10):
        adm.auth_failed("10.0.0.9", "ev\nil\0", float(t), peer="10.0.0.9:5555")
    text = log.text()
    assert len(text) == 3
    assert "further failures are logged once a minute" in text[-1]
    # The key id came from the network: escaped, so it cannot forge a line.
    assert "key id 'ev\\nil\\x00'" in text[0] and "\n" not in text[0]
    assert text[0].startswith("subflow 10.0.0.9:5555: authentication failed")
    adm.auth_failed("10.0.0.9", "x", 62.5)
    assert len(log.lines) == 4 and "7 more since the last such line" in log.text()[-1]


def test_failure_tables_stay_bounded_under_a_spray_of_addresses() -> None:
    adm, _ = admission(failures_logged=0)
    for n in range(12_000):
        adm.auth_failed(f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}", "", 1.0)
    assert len(adm._failures) <= 10_000
    assert len(adm._throttles) <= 10_000
    assert adm.failures("10.0.46.223", 1.0) == 1  # the newest are kept


# ------------------------------------------------------------------- sessions


def test_one_key_cannot_take_every_session() -> None:
    adm, log = admission(max_sessions=10, sessions_per_key=3, session_creations_per_key=0)
    codes = [adm.open_session("mallory", "1.2.3.4", 0.0) for _ in range(5)]
    assert codes == [0, 0, 0, wire.REJECT_TOO_MANY_SESSIONS, wire.REJECT_TOO_MANY_SESSIONS]
    assert adm.open_session("alice", "5.6.7.8", 0.0) == 0  # another key holder gets in
    assert len(log.lines) == 1
    assert "key 'mallory' from 1.2.3.4: 3 live sessions" in log.text()[0]
    adm.session_closed("mallory")
    assert adm.open_session("mallory", "1.2.3.4", 1.0) == 0
    assert adm.sessions == 4 and adm.sessions_of == {"mallory": 3, "alice": 1}


def test_session_creations_per_key_are_limited_per_interval() -> None:
    adm, log = admission(sessions_per_key=0, session_creations_per_key=3, log_interval=60.0)
    for t in range(3):
        assert adm.open_session("k", "h", float(t)) == 0
        adm.session_closed("k")  # connect and close
    assert adm.open_session("k", "h", 3.0) == wire.REJECT_TOO_MANY_SESSIONS
    assert adm.open_session("other", "h", 3.0) == 0
    assert adm.open_session("k", "h", 59.9) == wire.REJECT_TOO_MANY_SESSIONS
    assert adm.open_session("k", "h", 60.0) == 0  # the first creation left the interval
    assert len(log.lines) == 1 and "3 sessions created in 60 s" in log.text()[0]


def test_the_servers_session_limit_holds_for_all_keys() -> None:
    adm, log = admission(max_sessions=2)
    assert [adm.open_session(k, "h", 0.0) for k in "abc"] == [0, 0, wire.REJECT_TOO_MANY_SESSIONS]
    assert "(--max-sessions)" in log.text()[0] and "key 'c' from h" in log.text()[0]


# ----------------------------------------------------------------- re-dialling


def test_redial_backs_off_over_failed_handshakes_not_only_failed_connects() -> None:
    policy = RedialPolicy(initial=0.5, factor=2.0, max_delay=10.0, jitter=lambda: 0.0)
    # ClientService says attempt 1 after every connection that was made.
    assert policy.delay(1) == 0.5
    for _ in range(3):
        policy.handshake_failed()
    assert policy.delay(1) == 2.0
    for _ in range(10):
        policy.handshake_failed()
    assert policy.delay(1) == 10.0
    policy.joined()
    assert policy.delay(1) == 0.5
    assert policy.delay(4) == 4.0  # failed connects count as before


def test_redial_waits_long_after_a_bad_key_and_says_so_once() -> None:
    policy = RedialPolicy(max_delay=10.0, rejected_delay=60.0, jitter=lambda: 0.25)
    assert [policy.bad_key() for _ in range(6)] == [True, False, False, False, False, False]
    assert policy.delay(1) == 60.25
    policy.joined()  # the key was fixed on the server
    assert policy.delay(1) == 0.75
    assert policy.bad_key() is True
