"""The server's live sessions, keyed by (key id, session id), and their shared memory limit."""

from __future__ import annotations

from stripeproxy.core import wire
from stripeproxy.core.guard import AuthGuard
from stripeproxy.net.driver import SessionDriver
from stripeproxy.net.server import ServerSessionDriver, ServerSettings


class SessionRegistry:
    """The server's live sessions, keyed by (key id, session id)."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.sessions: dict[bytes, ServerSessionDriver] = {}
        self.handshaking = 0  # subflows connected but not yet authenticated
        self.handshakes_full = False  # the limit was hit and logged; reset below it
        self.handshaking_from: dict[str, int] = {}  # the same, per peer address
        self.addresses_full: set[str] = set()  # addresses whose share was hit and logged
        self.guard = AuthGuard(
            settings.reactor, settings.auth_failure_limit, settings.auth_failure_window
        )

    def attach(
        self, key_id: str, session_id: bytes, flags: int
    ) -> tuple[ServerSessionDriver | None, int]:
        """Find or create the session for a new subflow: (driver, WELCOME flags or REJECT code)."""
        key = key_id.encode() + b"\0" + session_id
        driver = self.sessions.get(key)
        if driver is not None:
            if len(driver.subflows) >= self.settings.max_subflows:
                return None, wire.REJECT_TOO_MANY_SUBFLOWS
            return driver, 0
        if flags & wire.AUTH_JOIN_ONLY:
            return None, wire.REJECT_UNKNOWN_SESSION
        if len(self.sessions) >= self.settings.max_sessions:
            return None, wire.REJECT_TOO_MANY_SESSIONS
        driver = ServerSessionDriver(self.settings, key, self.forget)
        self.sessions[key] = driver
        self._share_memory()
        return driver, wire.WELCOME_CREATED

    def forget(self, driver: SessionDriver) -> None:
        if self.sessions.pop(driver.session_id, None) is not None:
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
