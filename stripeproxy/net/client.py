"""stripe-client: the client's one live session and the services around it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from stripeproxy.core import handshake, wire
from stripeproxy.core.escape import printable
from stripeproxy.core.session import (
    RESET_GENERAL,
    OpenResult,
    SessionClosed,
    SessionConfig,
    StreamReset,
)
from stripeproxy.core.throttle import Throttle
from stripeproxy.net.driver import LocalPeer, SessionDriver, Subflow
from stripeproxy.net.loss_watch import LossWatch

#: Seconds between two spare dials towards a fresh session while the server drains.
SPARE_INTERVAL = 1.0


@dataclass
class ClientSettings:
    """Everything the client's protocols need, built once by the tap."""

    reactor: Any
    psk: bytes
    key_id: str = ""
    config: SessionConfig = field(default_factory=SessionConfig)
    socks_credentials: tuple[bytes, bytes] | None = None
    open_timeout: float = 30.0
    # Seconds a CONNECT waits for a subflow when no session is up; 5 s covers
    # the first re-dials (0.5 s, 1 s, 2 s) without leaving an application hanging.
    connect_wait: float = 5.0
    # On SIGTERM: seconds the streams in flight get to finish (as the server's).
    drain_timeout: float = 10.0
    handshake_timeout: float = 10.0
    # Set on subflow sockets at connect (None: the system default), and what
    # moves them to the upgrade on random loss (--congestion auto).
    congestion: str | None = None
    loss_watch: LossWatch | None = None
    max_frame: int = wire.DEFAULT_MAX_BODY


class OpenWaiter(Protocol):
    """A SOCKS connection whose OPEN is not answered yet
    (:class:`~stripeproxy.net.socks.SocksProtocol`)."""

    def subflow_up(self) -> None:
        """Its session has a subflow now: the OPEN is on its way."""

    def no_server(self, reason: str) -> None:
        """No subflow can carry its OPEN soon: refuse the CONNECT."""

    def session_ended(self, reason: str) -> None:
        """Its session ended (or refused it while going away) before the OPEN
        was answered; the server never saw a byte of it: open it again."""


class ClientSessionDriver(SessionDriver):
    """A client session: OPEN answers go back to the waiting SOCKS connection."""

    is_client = True
    established = False  # the server has accepted at least one subflow
    # Called when a subflow joins (the overlay releases the CONNECTs waiting for one).
    on_subflow: Callable[[ClientSessionDriver], None] | None = None

    def __init__(
        self,
        clock: IReactorTime,
        config: SessionConfig,
        session_id: bytes,
        on_closed: Callable[[SessionDriver], None] | None = None,
    ) -> None:
        # Streams whose OPEN is unanswered, and those of them a closing session
        # hands back (after SessionClosed, so that the overlay has moved on).
        self.awaiting: dict[int, OpenWaiter] = {}
        self._orphans: list[OpenWaiter] = []
        super().__init__(clock, config, session_id, on_closed)

    def open_stream(self, host: str, port: int, waiter: OpenWaiter | None = None) -> int:
        """Start a new stream to host:port (OPEN goes out at once); returns its id."""
        stream_id = self.session.open_stream(host, port, self.clock.seconds())
        if waiter is not None:
            self.awaiting[stream_id] = waiter
        self._flush()
        return stream_id

    def attach(self, subflow: Subflow) -> None:
        super().attach(subflow)
        if self.on_subflow is not None:
            self.on_subflow(self)

    def local_reset(self, stream_id: int, code: int = RESET_GENERAL) -> None:
        self.awaiting.pop(stream_id, None)
        super().local_reset(stream_id, code)

    def _on_open_result(self, event: OpenResult) -> None:
        stream: LocalPeer | None = self.streams.get(event.stream_id)
        waiter = self.awaiting.pop(event.stream_id, None)
        if event.code:
            self.streams.pop(event.stream_id, None)
            if waiter is not None and self.peer_going_away:
                # Refused by a server that is draining, not by the target.
                waiter.session_ended("the server is going away")
                return
        if stream is not None:
            stream.open_result(event.code, event.host, event.port)

    def _on_stream_reset(self, event: StreamReset) -> None:
        waiter = self.awaiting.pop(event.stream_id, None)
        if waiter is not None and self.closed:
            self.streams.pop(event.stream_id, None)
            self._orphans.append(waiter)
            return
        super()._on_stream_reset(event)

    def _on_session_closed(self, event: SessionClosed) -> None:
        super()._on_session_closed(event)
        orphans, self._orphans = self._orphans, []
        for waiter in orphans:
            waiter.session_ended(event.reason)


class Overlay:
    """The client's one live session, replaced when it ends.

    Subflows (one per ``ClientService``) and SOCKS connections both ask for
    the current session; a session that closed (grace period over, or the
    server forgot it) is replaced by a fresh one on the next request.

    It also decides whether a new CONNECT can be carried soon
    (:meth:`session_for`): it watches the subflow dials (:meth:`watch`), and
    while a draining server's session is the only one up it dials one spare
    subflow (``spare_dial``) to find out whether a fresh session can be had.
    """

    log = Logger()

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self.driver: ClientSessionDriver | None = None
        self.joins = 0  # subflows the server accepted, over the client's life
        # Sessions whose server sent GOAWAY: their streams finish, new ones go elsewhere.
        self.draining: set[ClientSessionDriver] = set()
        self.stopping = False  # the client drains: new CONNECTs are refused
        self.dials = 0  # TCP connects under way
        # Why the last dial failed; None once a dial connects or a subflow joins.
        self.dial_error: str | None = None
        # CONNECTs waiting for a subflow of their session.
        self.waiting: dict[OpenWaiter, ClientSessionDriver] = {}
        # Dials one extra subflow (the tap sets it); see session_for().
        self.spare_dial: Callable[[], defer.Deferred[Any]] | None = None
        self._spare: defer.Deferred[Any] | None = None
        self._spare_at: float | None = None
        self._stream_limit = Throttle()

    @property
    def clock(self) -> IReactorTime:
        return self.settings.reactor  # type: ignore[no-any-return]

    def current(self) -> ClientSessionDriver:
        driver = self.driver
        if driver is not None and driver.peer_going_away and not driver.closed:
            self.draining.add(driver)
            driver = self.driver = None
        if driver is None or driver.closed:
            driver = self.driver = ClientSessionDriver(
                self.settings.reactor,
                self.settings.config,
                handshake.new_session_id(),
                self._closed,
            )
            driver.on_subflow = self._subflow_joined
        return driver

    def sessions(self) -> list[ClientSessionDriver]:
        """Every live session: the current one and those draining."""
        live = [*self.draining, self.driver]
        return [d for d in live if d is not None and not d.closed]

    # ------------------------------------------------------- new CONNECTs

    def session_for(self, waiter: OpenWaiter) -> ClientSessionDriver | str:
        """The session a new stream goes to, or why the CONNECT is refused now.

        A CONNECT is refused at once when no subflow can come up soon: the
        client is stopping; every dial has just failed and none is under way
        (the server refuses connections, say); or the only session up is a
        draining server's and the spare dial for a fresh one failed.
        Otherwise a session without a subflow keeps the waiter until one
        joins (``subflow_up``) or a dial fails (``no_server``); the SOCKS side
        bounds the wait with ``connect_wait``.
        """
        if self.stopping:
            return "the client is stopping"
        driver = self.current()
        self._check_stream_limit(driver)
        if driver.subflow_count:
            return driver
        if any(d.subflow_count for d in self.draining):
            refused = self._dial_spare()
            if refused is not None:
                return refused
        elif self.dials == 0 and self.dial_error is not None:
            return f"no server reachable: {self.dial_error}"
        self.waiting[waiter] = driver
        return driver

    def unwait(self, waiter: OpenWaiter) -> None:
        self.waiting.pop(waiter, None)

    def _check_stream_limit(self, driver: ClientSessionDriver) -> None:
        """One line per interval when CONNECTs arrive at a session's stream limit
        (the server refuses the extra ones unless its --max-streams is higher)."""
        limit = driver.config.max_streams
        if driver.stream_count < limit:
            return
        suppressed = self._stream_limit.due(self.clock.seconds())
        if suppressed is not None:
            self.log.warn(
                "session {session} has {count} streams open, the limit is {limit} per "
                "session: the server refuses new CONNECTs until some end "
                "({suppressed} more since the last line)",
                session=driver.label,
                count=driver.stream_count,
                limit=limit,
                suppressed=suppressed,
            )

    def _dial_spare(self) -> str | None:
        """The server is draining: dial one subflow for a fresh session (at most
        one at a time, one a second); None while it may still join."""
        if self._spare is not None:
            return None
        now = self.clock.seconds()
        if self.spare_dial is None or (
            self._spare_at is not None and now - self._spare_at < SPARE_INTERVAL
        ):
            why = self.dial_error or "no other server answered"
            return f"the server is draining and no fresh session could be opened: {why}"
        self._spare_at = now
        self.dial_error = None
        spare = self._spare = self.spare_dial()

        def done(result: object) -> None:
            self._spare = None
            if isinstance(result, Failure):
                self._answer_waiters(self.dial_error or result.getErrorMessage())

        spare.addBoth(done)
        return None

    # --------------------------------------------------- dials and joins

    def watch(self, endpoint: IStreamClientEndpoint) -> IStreamClientEndpoint:
        """Wrap a subflow endpoint so that the overlay sees its dials."""
        return _WatchedEndpoint(endpoint, self)

    def dial_started(self) -> None:
        self.dials += 1

    def dial_connected(self) -> None:
        self.dials -= 1
        self.dial_error = None

    def dial_failed(self, reason: str) -> None:
        """A dial failed before connecting: if none is left under way, no
        subflow comes up before the next re-dial, so the waiting CONNECTs
        are answered now."""
        self.dials -= 1
        self.dial_error = printable(reason)
        if self.dials == 0 and self._spare is None:
            self._answer_waiters(self.dial_error)

    def _answer_waiters(self, reason: str) -> None:
        for waiter, driver in list(self.waiting.items()):
            if not driver.subflow_count:
                del self.waiting[waiter]
                waiter.no_server(f"no server reachable: {reason}")

    def _subflow_joined(self, driver: ClientSessionDriver) -> None:
        self.dial_error = None
        for waiter, waited in list(self.waiting.items()):
            if waited is driver:
                del self.waiting[waiter]
                waiter.subflow_up()

    # ------------------------------------------------------------- ending

    def _closed(self, driver: SessionDriver) -> None:
        self.draining.discard(driver)  # type: ignore[arg-type,unused-ignore]
        if self.driver is driver:
            self.driver = None

    def stop_accepting(self) -> None:
        """The client drains: refuse new CONNECTs and those still waiting for a subflow."""
        self.stopping = True
        for waiter in list(self.waiting):
            del self.waiting[waiter]
            waiter.no_server("the client is stopping")
        if self._spare is not None:
            self._spare.cancel()

    def close(self, reason: str) -> None:
        for driver in [*self.draining, self.driver]:
            if driver is not None:
                driver.close(reason)


@implementer(IStreamClientEndpoint)
class _WatchedEndpoint:
    """A subflow's client endpoint that tells the overlay how each dial went."""

    def __init__(self, endpoint: IStreamClientEndpoint, overlay: Overlay) -> None:
        self._endpoint = endpoint
        self._overlay = overlay

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        overlay = self._overlay
        overlay.dial_started()
        d: defer.Deferred[Any] = self._endpoint.connect(factory)

        def connected(protocol: Any) -> Any:
            overlay.dial_connected()
            return protocol

        def failed(failure: Failure) -> Failure:
            overlay.dial_failed(failure.getErrorMessage())
            return failure

        return d.addCallbacks(connected, failed)


class OverlayService(MultiService):
    """The subflow services' parent: drains the client when it stops (SIGTERM).

    The SOCKS listener is added after it and so is stopped before it: no new
    SOCKS connection is accepted.  Then new CONNECTs (and those still waiting
    for a subflow) are refused, the streams in flight get ``drain_timeout``
    seconds to finish, the sessions are closed (resetting what is left), and
    only then are the subflow services stopped.  The order matters:
    ``ClientService`` stops a subflow with ``loseConnection()``, which stops
    reading it at once (a drain would stall), and a joined subflow is
    registered as its transport's producer for life, so a TLS transport would
    defer its shutdown until the server dropped the subflow.  Closing the
    session first aborts every subflow.
    """

    log = Logger()

    def __init__(self, overlay: Overlay, clock: IReactorTime, drain_timeout: float) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's services are untyped
        self.overlay = overlay
        self.clock = clock
        self.drain_timeout = drain_timeout

    def stopService(self) -> defer.Deferred[Any]:
        Service.stopService(self)  # type: ignore[no-untyped-call]
        overlay = self.overlay
        overlay.stop_accepting()
        deadline = self.clock.seconds() + self.drain_timeout
        done: defer.Deferred[None] = defer.Deferred()
        pending: list[IDelayedCall] = []

        def check() -> None:
            pending.clear()
            busy = sum(d.stream_count for d in overlay.sessions())
            if busy and self.clock.seconds() < deadline:
                pending.append(self.clock.callLater(0.1, check))
                return
            if busy:
                self.log.info("drain timeout: resetting {n} open streams", n=busy)
            overlay.close("the client is stopping")
            done.callback(None)

        def stop_subflows(_: None) -> Any:
            return MultiService.stopService(self)  # type: ignore[no-untyped-call]

        check()
        return done.addCallback(stop_subflows)
