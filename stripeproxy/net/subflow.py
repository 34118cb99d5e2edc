"""One overlay subflow: a TCP (usually TLS) connection carrying frames.

The protocol authenticates first (SPEC.md section 2) and only then hands
frames to its session's driver.  It is also the transport's push producer,
so a full socket buffer pauses the scheduler's use of this subflow: that is
how the scheduler learns which subflow can take the next chunk.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from stripeproxy.core import wire
from stripeproxy.core.escape import printable
from stripeproxy.net.congestion import in_use, set_algorithm
from stripeproxy.net.driver import SessionDriver
from stripeproxy.net.loss_watch import LossWatch

# Keep the kernel's unsent backlog per subflow small, so the scheduler, not
# a deep socket buffer, decides where the next chunk goes (DESIGN.md).
NOTSENT_LOWAT = 128 * 1024
_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
# Bytes asked of a subflow socket per read.  Twisted asks 64 KiB, a few bytes
# short of a full DATA frame, so nearly every frame straddled two reads: it
# was copied into the decoder's buffer and out again, and each read was a
# reactor wake-up of its own.  Several frames per read cut the receiving
# side's CPU per byte by about a fifth on loopback (TLS and plaintext alike).
READ_SIZE = 256 * 1024


def _tcp_transport(transport: Any) -> Any:
    """The Twisted transport that owns the socket under a (possibly
    TLS-wrapped) transport, or None."""
    for _ in range(4):
        if transport is None:
            return None
        get_handle = getattr(transport, "getHandle", None)
        handle = get_handle() if get_handle is not None else None
        if isinstance(handle, socket.socket):
            return transport
        transport = getattr(transport, "transport", None)
    return None


def find_socket(transport: Any) -> socket.socket | None:
    """The TCP socket under a (possibly TLS-wrapped) Twisted transport."""
    tcp = _tcp_transport(transport)
    return tcp.getHandle() if tcp is not None else None


def read_whole_frames(tcp: Any) -> None:
    """Make a Twisted socket transport read :data:`READ_SIZE` at a time, and
    still call its send buffer full at the size it used before.

    Twisted's ``bufferSize`` is both what one read asks for and how much
    may wait in user space before the producer is paused.  Only the first
    should grow: with 256 KiB allowed to wait per subflow, a subflow stalled
    by its TCP's loss recovery keeps taking chunks the others could carry,
    and on P3 (80 ms, 1 %) the ``--subflows auto`` CUBIC upload fell from
    22-24 to 7-8 Mbit/s in two runs of three.  Twisted has no setting for
    the second, so the instance's ``_isSendBufferFull`` (private; the version
    is pinned in constraints.txt, and tests/test_subflow_reads.py checks it
    on a real transport) keeps the old limit.  A transport that is not
    Twisted's (a test fake) is left alone.
    """
    size = getattr(tcp, "bufferSize", None)
    if not hasattr(tcp, "_isSendBufferFull") or not isinstance(size, int):
        return

    def send_buffer_full() -> bool:
        return len(tcp.dataBuffer) + tcp._tempDataLen > size  # type: ignore[no-any-return]

    tcp._isSendBufferFull = send_buffer_full
    tcp.bufferSize = READ_SIZE


def tune_socket(transport: Any, congestion: str | None = None) -> str | None:
    """Low latency, a short unsent backlog and several frames per read for a
    subflow; ``congestion`` (already checked once at start,
    :func:`stripeproxy.net.congestion.resolve`) is set if given.  Returns the
    algorithm the socket uses, for the monitor."""
    tcp = _tcp_transport(transport)
    sock = tcp.getHandle() if tcp is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    read_whole_frames(tcp)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
    except OSError as e:
        Logger().warn("could not tune subflow socket: {error}", error=e)
    if congestion:
        # The start-up probe said it works; should the kernel change its mind,
        # the subflow's row shows what it got instead of a log line per subflow.
        set_algorithm(sock, congestion)
    return in_use(sock)


@implementer(IPushProducer)
class SubflowProtocol(Protocol):
    """Frames in, frames out; the handshake lives in the subclasses."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        crc: bool,
        handshake_timeout: float,
        max_body: int = wire.DEFAULT_MAX_BODY,
        congestion: str | None = None,
        loss_watch: LossWatch | None = None,
    ) -> None:
        self.clock = clock
        self.crc = crc
        # Small until the peer has authenticated (SPEC.md section 3).
        self.decoder = wire.FrameDecoder(crc, wire.HANDSHAKE_MAX_BODY)
        self.max_body = max_body
        self.handshake_timeout = handshake_timeout
        self.congestion = congestion
        self.loss_watch = loss_watch
        self._sock: socket.socket | None = None
        # The algorithm the socket really uses (None: unknown, or not TCP).
        self.cc: str | None = None
        self.driver: SessionDriver | None = None
        self.sid = 0
        self._handshake_timer: IDelayedCall | None = None
        self._gone = False
        # While a subclass holds a handshake frame back (pause_handshake), later
        # bytes wait here; a conforming peer sends none before our answer.
        self._paused: bytearray | None = None

    @property
    def peer(self) -> str:
        if self.transport is None:
            return "?"
        address = self.transport.getPeer()
        host = getattr(address, "host", None)
        return f"{host}:{getattr(address, 'port', '')}" if host else str(address)

    def connectionMade(self) -> None:
        self.cc = tune_socket(self.transport, self.congestion)
        if self.loss_watch is not None:
            self._sock = find_socket(self.transport)
            if self._sock is not None:
                self.loss_watch.watch(self._sock, self.peer, self._cc_moved)
        self._handshake_timer = self.clock.callLater(
            self.handshake_timeout, self._handshake_expired
        )
        self.start_handshake()

    def dataReceived(self, data: bytes) -> None:
        if self._gone:
            return
        if self._paused is not None:
            self._paused += data
            if len(self._paused) > wire.HANDSHAKE_MAX_BODY:
                self.fail("too much data before the handshake's answer")
            return
        try:
            # During the handshake, one frame at a time: the frames behind the
            # one that completes it are decoded under the session's frame limit.
            while self.driver is None:
                frames = self.decoder.feed(data, max_frames=1)
                data = b""
                if not frames:
                    return
                self.handshake_frame(frames[0])
                if self._gone or self._paused is not None:
                    return
            frames = self.decoder.feed(data)
        except wire.ProtocolError as e:
            self.fail(str(e))
            return
        if frames:
            self.driver.frames(self.sid, frames)

    def pause_handshake(self) -> None:
        """Stop decoding handshake frames until :meth:`resume_handshake`
        (the server holds an AUTH back while its source's delay runs)."""
        self._paused = bytearray()

    def resume_handshake(self) -> None:
        """Decode again, starting with whatever arrived meanwhile."""
        data, self._paused = self._paused, None
        if data is not None:
            self.dataReceived(bytes(data))

    def joined(self, driver: SessionDriver) -> None:
        """The handshake succeeded: from now on frames go to the session."""
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None
        self.decoder.max_body = self.max_body
        self.driver = driver
        transport: Any = self.transport  # an ITCPTransport or a TLS one: both are consumers
        transport.registerProducer(self, True)
        driver.attach(self)  # sets self.sid

    def _handshake_expired(self) -> None:
        """Still not in a session: close, even if a REJECT is already on its
        way (a peer that never closes after it must not keep the socket)."""
        self._handshake_timer = None
        if self._gone:
            self.abort()
        else:
            self.fail("handshake timed out" + self.timeout_hint())

    def fail(self, reason: str) -> None:
        """Close this subflow because of ``reason`` (logged with the peer)."""
        if self._gone:
            return
        # The peer's address may come from a PROXY header; the reason may quote the peer.
        self.log.info(
            "subflow {peer}: {reason}", peer=printable(self.peer), reason=printable(reason)
        )
        self.abort()

    def abort(self) -> None:
        self._gone = True
        transport: Any = self.transport  # ITransport lacks abortConnection; TCP and TLS have it
        if transport is not None:
            transport.abortConnection()

    def _cc_moved(self, algorithm: str | None) -> None:
        self.cc = algorithm

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._gone = True
        if self.loss_watch is not None and self._sock is not None:
            self.loss_watch.forget(self._sock)
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None
        if self.driver is not None:
            self.driver.detach(self.sid)
        self.lost(reason)

    # IPushProducer: the transport tells us when its buffer fills and drains.
    def pauseProducing(self) -> None:
        if self.driver is not None:
            self.driver.writable(self.sid, False)

    def resumeProducing(self) -> None:
        if self._closing_underneath():
            # A TLS error (or the peer's close_notify) makes TLSMemoryBIOProtocol
            # call loseConnection() on the TCP transport.  If that transport's
            # buffer was full, it has this subflow as a paused producer, and once
            # the buffer drains it resumes us instead of closing; the dead TLS
            # layer then drops every write and the subflow would linger, silent,
            # until the dead interval.  Finish the close now.
            self.fail("the connection under the subflow is closing (TLS error or close)")
            return
        if self.driver is not None:
            self.driver.writable(self.sid, True)

    def _closing_underneath(self) -> bool:
        """The TCP transport under our (TLS) transport is shutting down.

        We never call loseConnection() on a subflow ourselves (we abort), so a
        lower transport that is disconnecting was closed by the layer above it.
        """
        lower = getattr(self.transport, "transport", None)
        return bool(getattr(lower, "disconnecting", False))

    def stopProducing(self) -> None:
        """connectionLost follows; nothing to do here."""

    # Subclass hooks.
    def timeout_hint(self) -> str:
        """Said after "handshake timed out": what did not arrive."""
        return ""

    def start_handshake(self) -> None:
        raise NotImplementedError

    def handshake_frame(self, frame: wire.Frame) -> None:
        raise NotImplementedError

    def lost(self, reason: Failure | None) -> None:
        """Called after the subflow is gone (client re-dial bookkeeping)."""

    def write_frame(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)
