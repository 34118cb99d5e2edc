"""The server's live sessions, keyed by (key id, session id), and their shared memory limit.

Who may authenticate and which sessions may be created is decided by the
pure :class:`~stripeproxy.core.admission.Admission` it holds; this module
only keeps the drivers and hands the decisions the time.
"""

from __future__ import annotations

import txaio

from stripeproxy.core import wire
from stripeproxy.core.admission import Admission, AdmissionLimits
from stripeproxy.net.driver import SessionDriver
from stripeproxy.net.server import ServerSessionDriver, ServerSettings


def admission_limits(settings: ServerSettings) -> AdmissionLimits:
    """The admission limits the operator chose (one place that maps settings to limits)."""
    return AdmissionLimits(
        max_handshakes=settings.max_handshakes,
        handshakes_per_address=settings.handshakes_per_address,
        max_sessions=settings.max_sessions,
        sessions_per_key=settings.sessions_per_key,
        session_creations_per_key=settings.session_creations_per_key,
        session_creation_interval=settings.session_creation_interval,
        failure_window=settings.auth_failure_window,
        failures_logged=settings.auth_failure_limit,
        # The delay before a CHALLENGE counts against both sides' handshake
        # timers: keep it well inside them, so that a correct key always gets in.
        delay_max=min(settings.auth_delay_max, settings.handshake_timeout / 2),
    )


class SessionRegistry:
    """The server's live sessions, keyed by (key id, session id)."""

    def __init__(self, settings: ServerSettings) -> None:
        # core.admission logs through txaio's framework-neutral logger; under
        # Twisted it must be told so once, before the first logger is made.
        txaio.use_twisted()  # type: ignore[no-untyped-call]
        self.settings = settings
        self.sessions: dict[bytes, ServerSessionDriver] = {}
        self._key_of: dict[bytes, str] = {}  # registry key -> key id, for the quotas
        self.admission = Admission(admission_limits(settings))

    @property
    def handshaking(self) -> int:
        """Subflows connected but not yet authenticated."""
        return self.admission.handshaking

    def now(self) -> float:
        return float(self.settings.reactor.seconds())

    def attach(
        self, key_id: str, session_id: bytes, flags: int, host: str = ""
    ) -> tuple[ServerSessionDriver | None, int]:
        """Find or create the session for a new subflow: (driver, WELCOME flags or REJECT code)."""
        key = key_id.encode() + b"\0" + session_id
        driver = self.sessions.get(key)
        if driver is not None:
            count = driver.subflow_count
            if count >= self.settings.max_subflows:
                self.admission.subflows_full(key_id, host, self.now(), count)
                return None, wire.REJECT_TOO_MANY_SUBFLOWS
            return driver, 0
        if flags & wire.AUTH_JOIN_ONLY:
            return None, wire.REJECT_UNKNOWN_SESSION
        code = self.admission.open_session(key_id, host, self.now())
        if code:
            return None, code
        driver = ServerSessionDriver(self.settings, key, self.forget, key_id, host)
        self.sessions[key] = driver
        self._key_of[key] = key_id
        self._share_memory()
        return driver, wire.WELCOME_CREATED

    def forget(self, driver: SessionDriver) -> None:
        if self.sessions.pop(driver.session_id, None) is not None:
            self.admission.session_closed(self._key_of.pop(driver.session_id))
            self._share_memory()

    def _share_memory(self) -> None:
        """Split ``--memory-limit`` evenly among the live sessions.

        Each session's budget bounds both the credit it hands out and what it
        keeps unacknowledged in flight, so all sessions together hold about
        twice the limit at most (plus a 64 KiB floor per busy stream, SPEC.md
        section 8); one session alone gets its full window.
        """
        config = self.settings.config
        share = self.settings.memory_limit // max(len(self.sessions), 1)
        budget = max(config.min_stream_window, min(config.session_window, share))
        for driver in self.sessions.values():
            driver.set_memory_budget(budget)
