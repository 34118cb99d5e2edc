"""stripe-server: groups subflows into sessions, dials targets, drains on stop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from stripeproxy.core import wire
from stripeproxy.core.address import format_host_port
from stripeproxy.core.guard import AuthGuard
from stripeproxy.core.policy import TargetPolicy
from stripeproxy.core.session import SessionConfig
from stripeproxy.net.driver import SessionDriver
from stripeproxy.net.target import (
    _TARGET_FACTORY,
    TargetDenied,
    TargetProtocol,
    reply_code_for,
    resolve,
)


@dataclass
class ServerSettings:
    """Everything the server's protocols need, built once by the tap."""

    reactor: Any
    keys: dict[str, bytes]
    config: SessionConfig = field(default_factory=SessionConfig)
    max_subflows: int = 16
    max_sessions: int = 256
    connect_timeout: float = 10.0
    handshake_timeout: float = 10.0
    congestion: str | None = None
    max_frame: int = wire.DEFAULT_MAX_BODY
    max_handshakes: int = 256
    # Of those, how many one address may hold (0: no per-address share, as
    # behind a PROXY-protocol balancer, where every connection starts out
    # with the balancer's address).
    handshakes_per_address: int = 32
    # Bytes all sessions together may hold in buffers (see SessionRegistry).
    memory_limit: int = 1024 * 1024 * 1024
    policy: TargetPolicy = field(default_factory=TargetPolicy)
    auth_failure_limit: int = 10
    auth_failure_window: float = 60.0


class ServerSessionDriver(SessionDriver):
    """A server session: OPEN requests become outgoing TCP connections."""

    def __init__(self, settings: ServerSettings, registry: SessionRegistry, session_id: bytes):
        self.settings = settings
        self._pending: dict[int, defer.Deferred[Any]] = {}
        super().__init__(settings.reactor, settings.config, session_id, registry.forget)

    def stream_open_requested(self, stream_id: int, host: str, port: int) -> None:
        self.log.debug(
            "session {s}: stream {id} -> {host}:{port}",
            s=self.label,
            id=stream_id,
            host=host,
            port=port,
        )
        name = format_host_port(host, port)
        if self.settings.policy.unrestricted:
            d = self._dial(host, port)
        else:
            # Check the addresses the name resolves to, then dial the checked one.
            d = resolve(self.settings.reactor, host, port)
            d.addCallback(self._permitted, stream_id, name, port)
        self._pending[stream_id] = d
        d.addCallbacks(self._connected, self._failed, (stream_id, name), None, (stream_id,))

    def _dial(self, host: str, port: int) -> defer.Deferred[TargetProtocol]:
        endpoint = HostnameEndpoint(
            self.settings.reactor, host, port, timeout=self.settings.connect_timeout
        )
        return endpoint.connect(_TARGET_FACTORY)

    def _permitted(
        self, addresses: list[str], stream_id: int, name: str, port: int
    ) -> defer.Deferred[TargetProtocol]:
        if not addresses:
            raise error.DNSLookupError(name)
        allowed = [a for a in addresses if self.settings.policy.permits(a, port)]
        if not allowed:
            raise TargetDenied(f"{name} ({', '.join(addresses)}) is not allowed by the policy")
        return self._dial(allowed[0], port)

    def _connected(self, target: TargetProtocol, stream_id: int, name: str) -> None:
        self._pending.pop(stream_id, None)
        assert target.transport is not None
        if not self.session.has_stream(stream_id):
            target.transport.abortConnection()
            return
        target.bind(self, stream_id, name)
        bound = target.transport.getHost()
        self.session.open_succeeded(
            stream_id, getattr(bound, "host", ""), getattr(bound, "port", 0)
        )
        self.rearm()

    def _failed(self, failure: Failure, stream_id: int) -> None:
        if self._pending.pop(stream_id, None) is None:
            return  # cancelled because the stream was reset meanwhile
        code = reply_code_for(failure)
        self.log.info(
            "session {s}: stream {id} failed: {why}",
            s=self.label,
            id=stream_id,
            why=failure.getErrorMessage(),
        )
        self.session.open_failed(stream_id, code)
        self.rearm()

    def stream_reset(self, stream_id: int, code: int) -> None:
        pending = self._pending.pop(stream_id, None)
        if pending is not None:
            pending.cancel()
        super().stream_reset(stream_id, code)


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
        driver = ServerSessionDriver(self.settings, self, key)
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
            if driver.session.memory_budget != budget:
                driver.session.set_memory_budget(budget)
                driver.rearm()  # the budget may have let chunks go out


class DrainService(Service):
    """Graceful shutdown (SIGTERM): GOAWAY, let open streams finish, then close.

    Added before the listener, so it stops after it: by the time it runs, no
    new subflow is accepted.  Every session sends GOAWAY and refuses new
    streams; the returned Deferred fires once no session has an open stream
    or ``timeout`` seconds have passed, and the remaining sessions are closed.
    """

    log = Logger()

    def __init__(self, registry: SessionRegistry, clock: IReactorTime, timeout: float) -> None:
        self.registry = registry
        self.clock = clock
        self.timeout = timeout

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        sessions = list(self.registry.sessions.values())
        for driver in sessions:
            driver.session.go_away("the server is shutting down")
            driver.rearm()
        deadline = self.clock.seconds() + self.timeout
        pending: list[IDelayedCall] = []

        def close_all() -> None:
            busy = [d for d in self.registry.sessions.values() if d.session.stream_ids]
            if busy:
                self.log.info(
                    "drain timeout: resetting {n} open streams",
                    n=sum(len(d.session.stream_ids) for d in busy),
                )
            for driver in list(self.registry.sessions.values()):
                driver.session.close("the server is shutting down")

        def cancel(_: defer.Deferred[None]) -> None:
            for call in pending:
                if call.active():
                    call.cancel()
            close_all()

        done: defer.Deferred[None] = defer.Deferred(cancel)

        def check() -> None:
            pending.clear()
            busy = any(d.session.stream_ids for d in self.registry.sessions.values())
            if busy and self.clock.seconds() < deadline:
                pending.append(self.clock.callLater(0.1, check))
                return
            close_all()
            done.callback(None)

        check()
        return done
