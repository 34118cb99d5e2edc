"""The server side of a session: OPEN requests become outgoing TCP connections."""

from __future__ import annotations

from collections.abc import Callable, Set
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, error
from twisted.logger import ILogObserver
from twisted.python.failure import Failure

from stripeproxy.core import wire
from stripeproxy.core.address import format_host_port
from stripeproxy.core.escape import printable
from stripeproxy.core.policy import IPAddress, TargetPolicy
from stripeproxy.core.session import (
    RESET_GENERAL,
    RESET_IDLE,
    OpenRequested,
    SessionConfig,
    StreamClosed,
    StreamReset,
)
from stripeproxy.net.access import TARGET_LIMIT, StreamRecords, stream_debug, stream_log
from stripeproxy.net.driver import SessionDriver
from stripeproxy.net.loss_watch import LossWatch
from stripeproxy.net.target import (
    TargetDenied,
    TargetProtocol,
    dial_literal,
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
    # Set on subflow sockets at connect (None: the system default), and what
    # moves them to the upgrade on random loss (--congestion auto).
    congestion: str | None = None
    loss_watch: LossWatch | None = None
    max_frame: int = wire.DEFAULT_MAX_BODY
    max_handshakes: int = 256
    # Of those, how many one address may hold (0: no per-address share, as
    # behind a PROXY-protocol balancer, where every connection starts out
    # with the balancer's address).
    handshakes_per_address: int = 32
    # Bytes all sessions together may hold in buffers (see SessionRegistry).
    memory_limit: int = 1024 * 1024 * 1024
    policy: TargetPolicy = field(default_factory=TargetPolicy)
    # This host's own addresses, which the policy denies like loopback (the
    # tap passes net.interfaces.LocalAddresses(reactor).current).
    local_addresses: Callable[[], Set[IPAddress]] = frozenset
    # Failed logins (SPEC.md section 2): they delay the failing address's next
    # CHALLENGE (doubling per failure up to auth_delay_max, which is kept below
    # half the handshake timeout) and are forgotten after auth_failure_window
    # quiet seconds; auth_failure_limit of them per address are logged one by
    # one, then one line per minute.  They never refuse a client that proves the key.
    auth_failure_limit: int = 10
    auth_failure_window: float = 60.0
    auth_delay_max: float = 5.0
    # Per-key quotas (0: none), so one key holder cannot fill max_sessions.
    sessions_per_key: int = 32
    session_creations_per_key: int = 30
    session_creation_interval: float = 60.0
    # Where each stream's access-log event goes when it ends (--access-log); None: nowhere.
    access_log: ILogObserver | None = None


class ServerSessionDriver(SessionDriver):
    """A server session: OPEN requests become outgoing TCP connections."""

    def __init__(
        self,
        settings: ServerSettings,
        session_id: bytes,
        on_closed: Callable[[SessionDriver], None],
        key_id: str = "",
        client: str = "",
    ) -> None:
        self.settings = settings
        self._pending: dict[int, defer.Deferred[Any]] = {}
        super().__init__(settings.reactor, settings.config, session_id, on_closed)
        # ``client``: the address of the subflow that created the session.
        self.records = StreamRecords(settings.access_log, self.label, key_id, client)

    def _on_open_requested(self, event: OpenRequested) -> None:
        stream_id, host, port = event.stream_id, event.host, event.port
        name = format_host_port(host, port)
        self.records.opened(stream_id, name, self.clock.seconds())
        if stream_debug():
            stream_log.debug(
                "session {s}: stream {id} -> {target}",
                s=self.label,
                id=stream_id,
                target=printable(name, TARGET_LIMIT),
            )
        # Every target is resolved and every address checked (SPEC.md section
        # 8); only a checked literal is dialled, so a name cannot resolve to
        # something else between the check and the connect.
        d = resolve(self.settings.reactor, host, port).addCallback(
            self._permitted, stream_id, name, port
        )
        self._pending[stream_id] = d
        d.addCallbacks(
            self._connected,
            self._failed,
            callbackArgs=(stream_id, name),
            errbackArgs=(stream_id,),
        )

    def _dial(self, address: str, port: int) -> defer.Deferred[TargetProtocol]:
        return dial_literal(self.settings.reactor, address, port, self.settings.connect_timeout)

    def _permitted(
        self, addresses: list[str], stream_id: int, name: str, port: int
    ) -> defer.Deferred[TargetProtocol]:
        if not addresses:
            raise error.DNSLookupError(name)  # escaped where it is logged
        policy, local = self.settings.policy, self.settings.local_addresses()
        allowed = policy.filter(addresses, port, local)
        if not allowed:
            try:
                why = policy.check(addresses[0], port, local).reason
            except ValueError:
                why = "the resolver answered with something that is not an address"
            raise TargetDenied(f"{name}: {why}")
        return self._dial_in_turn(allowed, port)

    def _dial_in_turn(self, addresses: list[str], port: int) -> defer.Deferred[TargetProtocol]:
        """Dial the checked addresses one after the other until one connects."""
        d = self._dial(addresses[0], port)
        if len(addresses) > 1:

            def next_one(failure: Failure) -> defer.Deferred[TargetProtocol] | Failure:
                if failure.check(defer.CancelledError):  # type: ignore[no-untyped-call]
                    return failure
                return self._dial_in_turn(addresses[1:], port)

            d.addErrback(next_one)
        return d

    def _connected(self, target: TargetProtocol, stream_id: int, name: str) -> None:
        self._pending.pop(stream_id, None)
        if not self.has_stream(stream_id):
            target.tcp.abortConnection()
            return
        target.bind(self, stream_id, name)
        self.records.connected(stream_id, target)
        bound = target.tcp.getHost()
        host, port = getattr(bound, "host", ""), getattr(bound, "port", 0)
        self.session.open_succeeded(stream_id, host, port, self.clock.seconds())
        self._flush()

    def _failed(self, failure: Failure, stream_id: int) -> None:
        if self._pending.pop(stream_id, None) is None:
            return  # cancelled because the stream was reset meanwhile
        code = reply_code_for(failure)
        self.records.ended(stream_id, "failed", self.clock.seconds(), code)
        stream_log.debug(
            "session {s}: stream {id} failed: {why}",
            s=self.label,
            id=stream_id,
            why=printable(failure.getErrorMessage(), 2 * TARGET_LIMIT),  # it quotes the name
        )
        self.session.open_failed(stream_id, code, self.clock.seconds())
        self._flush()

    def local_reset(self, stream_id: int, code: int = RESET_GENERAL) -> None:
        self.records.ended(stream_id, "reset", self.clock.seconds())
        super().local_reset(stream_id, code)

    def _on_stream_closed(self, event: StreamClosed) -> None:
        self.records.ended(event.stream_id, "closed", self.clock.seconds())
        super()._on_stream_closed(event)

    def _on_stream_reset(self, event: StreamReset) -> None:
        result = "idle" if event.code == RESET_IDLE else "reset"
        self.records.ended(event.stream_id, result, self.clock.seconds())
        pending = self._pending.pop(event.stream_id, None)
        if pending is not None:
            pending.cancel()
        super()._on_stream_reset(event)
