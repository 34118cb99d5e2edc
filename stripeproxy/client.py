"""stripe-client: the local SOCKS5 proxy and its K prewarmed subflows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from stripeproxy import handshake, socks5, wire
from stripeproxy.address import format_host_port
from stripeproxy.driver import SessionDriver
from stripeproxy.local import LocalStream
from stripeproxy.session import SessionConfig
from stripeproxy.subflow import SubflowProtocol


@dataclass
class ClientSettings:
    """Everything the client's protocols need, built once by the tap."""

    reactor: Any
    psk: bytes
    key_id: str = ""
    config: SessionConfig = field(default_factory=SessionConfig)
    socks_credentials: tuple[bytes, bytes] | None = None
    open_timeout: float = 30.0
    handshake_timeout: float = 10.0
    congestion: str | None = None
    max_frame: int = wire.DEFAULT_MAX_BODY


class ClientSessionDriver(SessionDriver):
    """A client session: OPEN answers go back to the waiting SOCKS connection."""

    is_client = True
    established = False  # the server has accepted at least one subflow

    def stream_open_result(self, stream_id: int, code: int, host: str, port: int) -> None:
        stream = self.streams.get(stream_id)
        if code:
            self.streams.pop(stream_id, None)
        if isinstance(stream, SocksProtocol):
            stream.open_result(code, host, port)


class Overlay:
    """The client's one live session, replaced when it ends.

    Subflows (one per ``ClientService``) and SOCKS connections both ask for
    the current session; a session that closed (grace period over, or the
    server forgot it) is replaced by a fresh one on the next request.
    """

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self.driver: ClientSessionDriver | None = None
        self.joins = 0  # subflows the server accepted, over the client's life
        # Sessions whose server sent GOAWAY: their streams finish, new ones go elsewhere.
        self.draining: set[ClientSessionDriver] = set()

    def current(self) -> ClientSessionDriver:
        driver = self.driver
        if driver is not None and driver.session.peer_going_away and not driver.session.closed:
            self.draining.add(driver)
            driver = self.driver = None
        if driver is None or driver.session.closed:
            self.driver = ClientSessionDriver(
                self.settings.reactor,
                self.settings.config,
                handshake.new_session_id(),
                self._closed,
            )
        return self.driver

    def _closed(self, driver: SessionDriver) -> None:
        self.draining.discard(driver)  # type: ignore[arg-type]
        if self.driver is driver:
            self.driver = None

    def close(self, reason: str) -> None:
        for driver in [*self.draining, self.driver]:
            if driver is not None:
                driver.session.close(reason)


class OverlayService(Service):
    """Ends the overlay's session when the client stops (SIGTERM, stopService).

    ``ClientService`` stops a subflow with ``loseConnection()``, but a joined
    subflow is registered as its transport's producer for life, and a TLS
    transport defers its shutdown until the producer unregisters: stopping
    the client would hang until the server dropped the subflows.  Closing the
    session first resets open streams and aborts every subflow.  Add this
    service after the ``ClientService``s so that it stops before them.
    """

    def __init__(self, overlay: Overlay) -> None:
        self.overlay = overlay

    def stopService(self) -> None:
        super().stopService()
        self.overlay.close("the client is stopping")


class ClientSubflow(SubflowProtocol):
    """Client end of a subflow: answer the challenge, check the server's proof."""

    def __init__(self, overlay: Overlay) -> None:
        settings = overlay.settings
        super().__init__(
            settings.reactor,
            settings.config.crc,
            settings.handshake_timeout,
            max_body=settings.max_frame,
            congestion=settings.congestion,
        )
        self.overlay = overlay
        self.nonce = handshake.new_nonce()
        self._target: ClientSessionDriver | None = None
        self._server_nonce = b""
        self._flags = 0

    def start_handshake(self) -> None:
        """The server speaks first (CHALLENGE); nothing to send yet."""

    def handshake_frame(self, frame: wire.Frame) -> None:
        settings = self.overlay.settings
        if self._target is None:
            if not isinstance(frame, wire.Challenge):
                raise wire.ProtocolError(f"expected CHALLENGE, got {type(frame).__name__}")
            if frame.version != wire.PROTOCOL_VERSION:
                raise wire.ProtocolError(f"server speaks protocol version {frame.version}")
            self._server_nonce = frame.nonce
            self._target = self.overlay.current()
            self._flags = wire.AUTH_JOIN_ONLY if self._target.established else 0
            session_id = self._target.session_id
            mac = handshake.client_proof(
                settings.psk, frame.nonce, self.nonce, session_id, self._flags, settings.key_id
            )
            auth = wire.Auth(
                wire.PROTOCOL_VERSION, self.nonce, session_id, self._flags, settings.key_id, mac
            )
            self.write_frame(wire.encode_auth(auth, self.crc))
            return
        target = self._target
        if isinstance(frame, wire.Reject):
            if frame.code == wire.REJECT_UNKNOWN_SESSION:
                # The server restarted: its streams are gone, so are ours.
                target.session.close("the server no longer knows this session")
            self.fail(f"server rejected the subflow: {frame.reason or frame.code}")
            return
        if not isinstance(frame, wire.Welcome):
            raise wire.ProtocolError(f"expected WELCOME, got {type(frame).__name__}")
        expected = handshake.server_proof(
            settings.psk, self._server_nonce, self.nonce, target.session_id, frame.flags
        )
        if not handshake.proofs_equal(expected, frame.mac):
            self.fail("the server could not prove it holds the key; check --psk-file")
            return
        if target.session.closed:
            self.fail("session ended during the handshake")
            return
        if target.established and frame.flags & wire.WELCOME_CREATED:
            raise wire.ProtocolError("server created a session we asked to join")
        target.established = True
        self.overlay.joins += 1
        self.joined(target)


class SubflowFactory(Factory):
    noisy = False

    def __init__(self, overlay: Overlay) -> None:
        self.overlay = overlay

    def buildProtocol(self, addr: Any) -> ClientSubflow:
        return ClientSubflow(self.overlay)


class SocksProtocol(LocalStream):
    """One SOCKS5 client connection, then one stream of the session."""

    def __init__(self, overlay: Overlay) -> None:
        self.overlay = overlay
        self.negotiation = socks5.Socks5Negotiation(credentials=overlay.settings.socks_credentials)
        self._open_timer: IDelayedCall | None = None
        self._replied = False

    def connectionMade(self) -> None:
        super().connectionMade()
        # A client that connects and never finishes the SOCKS negotiation
        # (slowloris) is dropped after the handshake timeout.
        settings = self.overlay.settings
        self._open_timer = settings.reactor.callLater(
            settings.handshake_timeout, self._negotiation_timeout
        )

    def _negotiation_timeout(self) -> None:
        self._open_timer = None
        assert self.transport is not None
        self.log.info("SOCKS client {peer}: negotiation timed out", peer=self.transport.getPeer())
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._replied:
            self.forward(data)
            return
        events = self.negotiation.receive(data)
        out = self.negotiation.data_to_send()
        assert self.transport is not None
        if out:
            self.transport.write(out)
        for event in events:
            if isinstance(event, socks5.NegotiationFailed):
                self.log.info(
                    "SOCKS client {peer}: {reason}",
                    peer=self.transport.getPeer(),
                    reason=event.reason,
                )
                if self.driver is not None and not self._finished:
                    self._finished = True
                    self.driver.streams.pop(self.stream_id, None)
                    self.driver.session.local_reset(self.stream_id)
                self.transport.loseConnection()
                return
            self._connect(event)

    def _connect(self, request: socks5.ConnectRequest) -> None:
        assert self.transport is not None
        if self._open_timer is not None:
            self._open_timer.cancel()  # the negotiation is over; the open timeout starts
        self.transport.pauseProducing()  # nothing to forward until the server answers
        driver = self.overlay.current()
        stream_id = driver.session.open_stream(request.host, request.port)
        self.bind(driver, stream_id, format_host_port(request.host, request.port))
        driver.rearm()
        clock = self.overlay.settings.reactor
        self._open_timer = clock.callLater(self.overlay.settings.open_timeout, self._open_timeout)

    def _open_timeout(self) -> None:
        self._open_timer = None
        self.log.info("stream {id}: no answer from the server in time", id=self.stream_id)
        self._fail_open(socks5.REPLY_GENERAL_FAILURE)
        if self.driver is not None:
            self.driver.streams.pop(self.stream_id, None)
            self.driver.session.local_reset(self.stream_id)
            self.driver.rearm()

    def open_result(self, code: int, host: str, port: int) -> None:
        if self._open_timer is not None:
            self._open_timer.cancel()
            self._open_timer = None
        if code:
            self._fail_open(code)
            return
        assert self.transport is not None
        self.transport.write(self.negotiation.reply(socks5.REPLY_SUCCEEDED, host, port))
        self._replied = True
        early = self.negotiation.take_unused_data()
        if early:
            self.forward(early)
        self.transport.resumeProducing()

    def _fail_open(self, code: int) -> None:
        self._finished = True
        assert self.transport is not None
        if not self._replied:
            self._replied = True
            self.transport.write(self.negotiation.reply(code))
        self.transport.loseConnection()

    def abort_local(self) -> None:
        if not self._replied:
            self._fail_open(socks5.REPLY_GENERAL_FAILURE)
        else:
            super().abort_local()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._open_timer is not None:
            self._open_timer.cancel()
            self._open_timer = None
        super().connectionLost(reason)


class SocksFactory(Factory):
    noisy = False

    def __init__(self, overlay: Overlay) -> None:
        self.overlay = overlay

    def buildProtocol(self, addr: Any) -> SocksProtocol:
        return SocksProtocol(self.overlay)
