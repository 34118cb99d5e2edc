"""The local TCP peer of a stream: a SOCKS client (client side) or a target.

Both ends of the overlay treat their ordinary TCP connection the same way:
bytes read go into the session, bytes from the session are written out, a
half-close travels as FIN, an abort as RST, and back-pressure works both
ways (the session pauses our reading when its send buffer is full; our
transport pauses the session's credit when its write buffer is full).
"""

from __future__ import annotations

from typing import Any, Protocol, cast

from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from stripeproxy.net.driver import SessionDriver


class _Transport(Protocol):
    """The parts of a TCP (or TLS) transport a local stream uses; Twisted's
    ``ITransport`` declares only some of them."""

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def loseWriteConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def registerProducer(self, producer: object, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def getPeer(self) -> Any: ...
    def getHost(self) -> Any: ...


@implementer(IPushProducer)
class _SinkProducer:
    """Registered on the local transport so a full write buffer stops credit."""

    def __init__(self, stream: LocalStream) -> None:
        self._stream = stream

    def pauseProducing(self) -> None:
        self._stream.sink_paused(True)

    def resumeProducing(self) -> None:
        self._stream.sink_paused(False)

    def stopProducing(self) -> None:
        """The transport is going away; connectionLost handles the rest."""


@implementer(IHalfCloseableProtocol)
class LocalStream(TwistedProtocol):
    """A TCP connection bound to one stream of a session once ``bind`` is called."""

    log = Logger()  # SocksProtocol logs negotiation failures and open timeouts
    driver: SessionDriver | None = None
    stream_id = 0
    _finished = False  # the session no longer knows this stream
    _read_eof = False  # the local peer half-closed
    _write_closed = False  # we half-closed towards the local peer

    target = ""  # host:port the stream goes to, for the dashboard and logs
    opened_at = 0.0

    @property
    def tcp(self) -> _Transport:
        """The connected transport (with the producer methods ITransport omits)."""
        return cast(_Transport, self.transport)

    def connectionMade(self) -> None:
        # A SOCKS reply or a request's first bytes are small writes: with
        # Nagle's algorithm each waits for the peer's delayed ACK (40 ms).
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)

    def bind(self, driver: SessionDriver, stream_id: int, target: str) -> None:
        self.driver = driver
        self.stream_id = stream_id
        self.target = target
        self.opened_at = driver.clock.seconds()
        driver.register_stream(stream_id, self)
        self.tcp.registerProducer(_SinkProducer(self), True)

    # ---------------------------------------------- local transport -> session

    def forward(self, data: bytes) -> None:
        if self.driver is not None and not self._finished:
            self.driver.local_data(self.stream_id, data)

    def readConnectionLost(self) -> None:
        self._read_eof = True
        if self.driver is not None and not self._finished:
            self.driver.local_eof(self.stream_id)

    def writeConnectionLost(self) -> None:
        """Our write side closed after the session's FIN; nothing to tell it."""

    def connectionLost(self, reason: Failure | None = None) -> None:
        driver = self.driver
        if driver is None or self._finished:
            return
        self._finished = True
        if self._read_eof and self._write_closed:
            # Both directions ended cleanly; the session finishes on its own
            # once the last ACK arrives.  A reset now could cut data the peer
            # has not delivered yet.
            driver.local_closed(self.stream_id)
            return
        driver.local_reset(self.stream_id)

    def sink_paused(self, paused: bool) -> None:
        if self.driver is not None and not self._finished:
            self.driver.local_sink_paused(self.stream_id, paused)

    # ---------------------------------------------- session -> local transport

    def open_result(self, code: int, host: str, port: int) -> None:
        """The server answered the stream's OPEN; only a SOCKS client waits for it."""

    def write_local(self, data: bytes) -> None:
        self.tcp.write(data)

    def half_close_local(self) -> None:
        self._write_closed = True
        self._stop_sink()
        self.tcp.loseWriteConnection()

    def close_local(self) -> None:
        self._finished = True
        self._stop_sink()
        self.tcp.loseConnection()

    def _stop_sink(self) -> None:
        """Nothing more will be written: unregister the sink producer first.

        A transport whose streaming producer is paused when its buffer drains
        resumes the producer instead of carrying out a pending
        ``loseWriteConnection``/``loseConnection`` (see
        ``abstract.FileDescriptor.doWrite``), so the peer would never see
        the FIN.  Unregistering restarts the pending shutdown.
        """
        self.tcp.unregisterProducer()

    def abort_local(self) -> None:
        self._finished = True
        self.tcp.abortConnection()

    def pause_reading(self) -> None:
        self.tcp.pauseProducing()

    def resume_reading(self) -> None:
        self.tcp.resumeProducing()
