"""stripe-client: the client's one live session and the services around it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service

from stripeproxy.core import handshake, wire
from stripeproxy.core.session import OpenResult, SessionConfig
from stripeproxy.net.driver import LocalPeer, SessionDriver


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

    def open_stream(self, host: str, port: int) -> int:
        """Start a new stream to host:port (OPEN goes out at once); returns its id."""
        stream_id = self.session.open_stream(host, port, self.clock.seconds())
        self._flush()
        return stream_id

    def _on_open_result(self, event: OpenResult) -> None:
        stream: LocalPeer | None = self.streams.get(event.stream_id)
        if event.code:
            self.streams.pop(event.stream_id, None)
        if stream is not None:
            stream.open_result(event.code, event.host, event.port)


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
        return driver

    def _closed(self, driver: SessionDriver) -> None:
        self.draining.discard(driver)  # type: ignore[arg-type,unused-ignore]
        if self.driver is driver:
            self.driver = None

    def close(self, reason: str) -> None:
        for driver in [*self.draining, self.driver]:
            if driver is not None:
                driver.close(reason)


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
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is untyped
        self.overlay.close("the client is stopping")
