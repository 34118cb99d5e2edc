"""The SOCKS5 front end: one client connection, then one stream of the session.

A CONNECT gets a fast, correct answer (SPEC.md section 7): when no subflow is
up it waits for one at most ``connect_wait`` seconds, less when the overlay
knows that none can come soon (every dial refused, the client stopping, the
server draining with no fresh session to be had); a stream whose session ends
before the server answered its OPEN is opened again in the next session, once
(nothing of it reached the server: the client's bytes wait for the reply).
"""

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
        self._wait_timer: IDelayedCall | None = None  # waiting for a subflow
        self._request: socks5.ConnectRequest | None = None
        self._reopened = False
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
        self._request = request
        self.target = format_host_port(request.host, request.port)
        clock = self.overlay.settings.reactor
        self._open_timer = clock.callLater(self.overlay.settings.open_timeout, self._open_timeout)
        self._open()

    def _open(self) -> None:
        """Open the stream in the session the overlay chooses, or refuse the CONNECT."""
        request = self._request
        assert request is not None
        choice = self.overlay.session_for(self)
        if isinstance(choice, str):
            self._refuse(choice)
            return
        if self.driver is not None:
            self.tcp.unregisterProducer()  # bound before: bind() registers it again
        stream_id = choice.open_stream(request.host, request.port, self)
        self.bind(choice, stream_id, self.target)
        if not choice.subflow_count and self.overlay.waiting.get(self) is choice:
            settings = self.overlay.settings
            self._cancel_wait()
            self._wait_timer = settings.reactor.callLater(settings.connect_wait, self._wait_over)

    def _wait_over(self) -> None:
        self._wait_timer = None
        self.overlay.unwait(self)
        if self.driver is not None and not self.driver.subflow_count:
            why = self.overlay.dial_error or "the server accepted no subflow"
            self.no_server(
                f"no server reachable in {self.overlay.settings.connect_wait:g} s "
                f"(--connect-wait): {why}"
            )

    def _cancel_wait(self) -> None:
        if self._wait_timer is not None:
            self._wait_timer.cancel()
            self._wait_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_wait()
        if self._open_timer is not None:
            self._open_timer.cancel()
            self._open_timer = None
        self.overlay.unwait(self)

    # ------------------------------------------------ from the overlay/driver

    def subflow_up(self) -> None:
        self._cancel_wait()  # the OPEN is on its way; the open timeout bounds the rest

    def no_server(self, reason: str) -> None:
        self._refuse(reason)

    def session_ended(self, reason: str) -> None:
        if self._replied:
            return
        if self._reopened:
            self._refuse(f"its session ended twice before the server answered ({reason})")
            return
        self._reopened = True
        self.log.info(
            "SOCKS client {peer}: CONNECT {target} goes to a new session ({reason})",
            peer=self.tcp.getPeer(),
            target=printable(self.target),
            reason=reason,
        )
        self._open()

    def _refuse(self, reason: str) -> None:
        """Answer the CONNECT with 0x01 (general failure) and say why, once."""
        if self._replied:
            return
        self._cancel_timers()
        self.log.info(
            "SOCKS client {peer}: CONNECT {target} refused: {reason}",
            peer=self.tcp.getPeer(),
            target=printable(self.target),
            reason=reason,
        )
        driver = self.driver
        finished = self._finished
        self._fail_open(socks5.REPLY_GENERAL_FAILURE)
        if driver is not None and not finished:
            driver.local_reset(self.stream_id)

    # -------------------------------------------------------------- answers

    def _open_timeout(self) -> None:
        self._open_timer = None
        self.log.info("stream {id}: no answer from the server in time", id=self.stream_id)
        self._cancel_timers()
        self._fail_open(socks5.REPLY_GENERAL_FAILURE)
        if self.driver is not None:
            self.driver.local_reset(self.stream_id)

    def open_result(self, code: int, host: str, port: int) -> None:
        self._cancel_timers()
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
            self._cancel_timers()
            self._fail_open(socks5.REPLY_GENERAL_FAILURE)
        else:
            super().abort_local()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._cancel_timers()
        super().connectionLost(reason)


class SocksFactory(Factory):
    noisy = False

    def __init__(self, overlay: Overlay) -> None:
        self.overlay = overlay

    def buildProtocol(self, addr: Any) -> SocksProtocol:
        return SocksProtocol(self.overlay)
