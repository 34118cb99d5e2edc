"""The SOCKS5 front end: one client connection, then one stream of the session."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from stripeproxy.core import socks5
from stripeproxy.core.address import format_host_port
from stripeproxy.core.escape import printable
from stripeproxy.net.client import Overlay
from stripeproxy.net.local import LocalStream


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
        self.log.info("SOCKS client {peer}: negotiation timed out", peer=self.tcp.getPeer())
        self.tcp.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._replied:
            self.forward(data)
            return
        events = self.negotiation.receive(data)
        out = self.negotiation.data_to_send()
        if out:
            self.tcp.write(out)
        for event in events:
            if isinstance(event, socks5.NegotiationFailed):
                self.log.info(
                    "SOCKS client {peer}: {reason}",
                    peer=self.tcp.getPeer(),
                    reason=printable(event.reason),  # may quote the client's bytes
                )
                if self.driver is not None and not self._finished:
                    self._finished = True
                    self.driver.local_reset(self.stream_id)
                self.tcp.loseConnection()
                return
            self._connect(event)

    def _connect(self, request: socks5.ConnectRequest) -> None:
        if self._open_timer is not None:
            self._open_timer.cancel()  # the negotiation is over; the open timeout starts
        self.tcp.pauseProducing()  # nothing to forward until the server answers
        driver = self.overlay.current()
        stream_id = driver.open_stream(request.host, request.port)
        self.bind(driver, stream_id, format_host_port(request.host, request.port))
        clock = self.overlay.settings.reactor
        self._open_timer = clock.callLater(self.overlay.settings.open_timeout, self._open_timeout)

    def _open_timeout(self) -> None:
        self._open_timer = None
        self.log.info("stream {id}: no answer from the server in time", id=self.stream_id)
        self._fail_open(socks5.REPLY_GENERAL_FAILURE)
        if self.driver is not None:
            self.driver.local_reset(self.stream_id)

    def open_result(self, code: int, host: str, port: int) -> None:
        if self._open_timer is not None:
            self._open_timer.cancel()
            self._open_timer = None
        if code:
            self._fail_open(code)
            return
        self.tcp.write(self.negotiation.reply(socks5.REPLY_SUCCEEDED, host, port))
        self._replied = True
        early = self.negotiation.take_unused_data()
        if early:
            self.forward(early)
        self.tcp.resumeProducing()

    def _fail_open(self, code: int) -> None:
        self._finished = True
        if not self._replied:
            self._replied = True
            self.tcp.write(self.negotiation.reply(code))
        self.tcp.loseConnection()

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
