"""stripe-server: accepts subflows, groups them into sessions, dials targets."""

from __future__ import annotations

import errno
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHostResolution,
    IReactorTime,
    IResolutionReceiver,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from stripeproxy import handshake, socks5, wire
from stripeproxy.address import format_host_port
from stripeproxy.driver import SessionDriver
from stripeproxy.guard import AuthGuard
from stripeproxy.local import LocalStream
from stripeproxy.policy import TargetPolicy
from stripeproxy.session import SessionConfig
from stripeproxy.subflow import SubflowProtocol


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


@implementer(IResolutionReceiver)
class _Addresses:
    """Collects every address a name resolves to (Twisted's resolver API)."""

    def __init__(self) -> None:
        self.result: defer.Deferred[list[str]] = defer.Deferred()
        self.hosts: list[str] = []

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        """Nothing to do until addresses arrive."""

    def addressResolved(self, address: IAddress) -> None:
        self.hosts.append(address.host)  # type: ignore[attr-defined]

    def resolutionComplete(self) -> None:
        if not self.result.called:
            self.result.callback(self.hosts)


def resolve(reactor: Any, host: str, port: int) -> defer.Deferred[list[str]]:
    """Every address of ``host`` (an IP literal resolves to itself)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        receiver = _Addresses()
        reactor.nameResolver.resolveHostName(receiver, host, port)
        return receiver.result
    return defer.succeed([host])


class TargetDenied(Exception):
    """The target policy forbids every address of the requested target."""


def reply_code_for(failure: Failure) -> int:
    """Map a failed target connection to the SOCKS5 reply the client will see."""
    exc = failure.value
    if isinstance(exc, TargetDenied):
        return socks5.REPLY_NOT_ALLOWED
    if isinstance(exc, error.ConnectionRefusedError):
        return socks5.REPLY_CONNECTION_REFUSED
    if isinstance(exc, error.DNSLookupError):
        return socks5.REPLY_HOST_UNREACHABLE
    if isinstance(exc, error.TimeoutError | defer.TimeoutError | defer.CancelledError):
        return socks5.REPLY_TTL_EXPIRED
    if isinstance(exc, error.NoRouteError):
        return socks5.REPLY_HOST_UNREACHABLE
    if isinstance(exc, error.ConnectError) and exc.osError is not None:
        if exc.osError == errno.ENETUNREACH:
            return socks5.REPLY_NETWORK_UNREACHABLE
        if exc.osError == errno.EHOSTUNREACH:
            return socks5.REPLY_HOST_UNREACHABLE
    return socks5.REPLY_GENERAL_FAILURE


class TargetProtocol(LocalStream):
    """The server's ordinary TCP connection to the requested target."""

    def dataReceived(self, data: bytes) -> None:
        self.forward(data)


_TARGET_FACTORY = Factory.forProtocol(TargetProtocol)
_TARGET_FACTORY.noisy = False


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


_REJECT_REASONS = {
    wire.REJECT_BAD_AUTH: "authentication failed",
    wire.REJECT_UNKNOWN_SESSION: "unknown session",
    wire.REJECT_TOO_MANY_SUBFLOWS: "too many subflows in this session",
    wire.REJECT_TOO_MANY_SESSIONS: "too many sessions",
    wire.REJECT_VERSION: "unsupported protocol version",
}


class ServerSubflow(SubflowProtocol):
    """Server end of a subflow: challenge, verify the proof, join a session."""

    def __init__(self, settings: ServerSettings, registry: SessionRegistry) -> None:
        super().__init__(
            settings.reactor,
            settings.config.crc,
            settings.handshake_timeout,
            max_body=settings.max_frame,
            congestion=settings.congestion,
        )
        self.settings = settings
        self.registry = registry
        self.nonce = handshake.new_nonce()
        self._handshaking = False
        self._host = ""

    def start_handshake(self) -> None:
        registry = self.registry
        if registry.guard.blocked(self.peer_host):
            self.abort()  # too many failures: not even a challenge
            return
        if registry.handshaking >= self.settings.max_handshakes:
            # A flood of connections that never authenticate must not grow
            # memory without bound; established subflows are not affected.
            if not registry.handshakes_full:
                registry.handshakes_full = True
                self.log.warn(
                    "{count} subflows are authenticating at once: refusing new "
                    "connections until some finish (--max-handshakes)",
                    count=registry.handshaking,
                )
            self.abort()
            return
        host = self.peer_host
        share = self.settings.handshakes_per_address
        if share and registry.handshaking_from.get(host, 0) >= share:
            # One address may not take the whole pool and lock everybody out.
            if host not in registry.addresses_full:
                registry.addresses_full.add(host)
                self.log.warn(
                    "{host} has {share} subflows authenticating at once: refusing its new "
                    "connections until some finish",
                    host=host,
                    share=share,
                )
            self.abort()
            return
        registry.handshaking += 1
        registry.handshaking_from[host] = registry.handshaking_from.get(host, 0) + 1
        self._handshaking = True
        self._host = host
        self.write_frame(wire.encode_challenge(self.nonce, self.crc))

    def _handshake_over(self) -> None:
        if self._handshaking:
            self._handshaking = False
            registry = self.registry
            registry.handshaking -= 1
            if registry.handshaking < max(1, self.settings.max_handshakes // 2):
                registry.handshakes_full = False
            left = registry.handshaking_from[self._host] - 1
            if left:
                registry.handshaking_from[self._host] = left
            else:
                del registry.handshaking_from[self._host]
                registry.addresses_full.discard(self._host)

    def joined(self, driver: SessionDriver) -> None:
        self._handshake_over()
        super().joined(driver)

    def lost(self, reason: Failure | None) -> None:
        self._handshake_over()

    @property
    def peer_host(self) -> str:
        assert self.transport is not None
        return str(getattr(self.transport.getPeer(), "host", ""))

    def handshake_frame(self, frame: wire.Frame) -> None:
        if not isinstance(frame, wire.Auth):
            raise wire.ProtocolError(f"expected AUTH, got {type(frame).__name__}")
        if self.registry.guard.blocked(self.peer_host):
            # Checked again here: behind a PROXY-protocol load balancer the
            # client's own address is only known once the header has arrived.
            self.reject(wire.REJECT_BAD_AUTH)
            return
        if frame.version != wire.PROTOCOL_VERSION:
            self.reject(wire.REJECT_VERSION)
            return
        psk = self.settings.keys.get(frame.key_id)
        expected = handshake.client_proof(
            psk or b"\0" * 32, self.nonce, frame.nonce, frame.session_id, frame.flags, frame.key_id
        )
        if not handshake.proofs_equal(expected, frame.mac) or psk is None:
            guard = self.registry.guard
            count = guard.failed(self.peer_host)
            if count <= guard.limit:
                self.log.warn(
                    "subflow {peer}: authentication failed (key id {key!r}); "
                    "{count} of {limit} allowed in {window:g} s{more}",
                    peer=self.peer,
                    key=frame.key_id,
                    count=count,
                    limit=guard.limit,
                    window=guard.window,
                    more="; refusing this address for now" if count == guard.limit else "",
                )
            self.reject(wire.REJECT_BAD_AUTH)
            return
        driver, code = self.registry.attach(frame.key_id, frame.session_id, frame.flags)
        if driver is None:
            self.reject(code)
            return
        proof = handshake.server_proof(psk, self.nonce, frame.nonce, frame.session_id, code)
        self.write_frame(wire.encode_welcome(wire.Welcome(code, proof), self.crc))
        self.joined(driver)

    def reject(self, code: int) -> None:
        """Send REJECT and close; the handshake timer aborts the connection
        if the peer does not let it close (a TLS close waits for the peer)."""
        self._handshake_over()  # its slot is free at once, whatever the peer does
        self.write_frame(wire.encode_reject(code, _REJECT_REASONS.get(code, ""), self.crc))
        self._gone = True
        assert self.transport is not None
        self.transport.loseConnection()


class SubflowFactory(Factory):
    """Builds a :class:`ServerSubflow` per accepted connection."""

    noisy = False

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.registry = SessionRegistry(settings)

    def buildProtocol(self, addr: Any) -> ServerSubflow:
        return ServerSubflow(self.settings, self.registry)


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
