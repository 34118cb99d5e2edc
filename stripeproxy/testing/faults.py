"""A fault-injecting TCP relay, for tests: a middlebox between client and server.

Every connection accepted by :class:`FaultRelay` is relayed to the target
as a :class:`Link`, numbered in accept order, and each link can be told to
misbehave the way real paths do: reset, black-hole (silently swallow
everything, no reset), delay, throttle, or flip one byte.  Shipped in the
package (like txtorcon's testutil) so users can test their own deployments.

Typical use (on a running reactor)::

    relay = FaultRelay(reactor, "127.0.0.1", server_port)
    port = reactor.listenTCP(0, relay, interface="127.0.0.1")
    # ... point the client at port.getHost().port, then, mid-transfer:
    relay.live()[0].reset()
    # ... and at the end:
    await relay.close(port)

Each direction of a link keeps the byte order of TCP whatever the faults
do, and applies back-pressure: while the receiving side does not read (its
transport's buffer is full) or a throttled direction has a backlog, the
relay stops reading the sending side, so the sender's socket fills up as it
would on a slow path.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections import deque
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    ITCPTransport,
)
from twisted.python.failure import Failure
from zope.interface import implementer

# Bytes a direction may hold (delayed or throttled) before it stops reading its source.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
# A throttled direction writes at most this many seconds' worth of its rate at once.
BURST = 0.02
# Shortest wait between two throttled writes (the reactor's timers are not finer).
MIN_WAIT = 0.005
CONNECT_TIMEOUT = 10.0


class _ITCPConnection(ITCPTransport, IConsumer, IPushProducer):
    """What a reactor's TCP connection is: ``twisted.internet.tcp.Connection`` provides
    ITCPTransport and, through ``FileDescriptor``, IConsumer and IPushProducer.

    Only a name for a type: ``Protocol.transport`` is declared as a plain
    ITransport, and the relay's ends use all three sides of theirs.
    """


def _socket_of(transport: object) -> socket.socket | None:
    get_handle = getattr(transport, "getHandle", None)
    handle = get_handle() if get_handle is not None else None
    return handle if isinstance(handle, socket.socket) else None


def _abort_with_reset(transport: ITCPTransport | None) -> None:
    """Abort a TCP transport so that the peer sees an RST, not a FIN."""
    if transport is None:
        return
    sock = _socket_of(transport)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abortConnection()


@implementer(IPushProducer)
class _Direction:
    """One direction of a link: what happens to the bytes flowing through it.

    It is registered as the streaming producer of its sink's transport, so
    it learns when the sink's write buffer is full, and it pauses reading
    its source while the sink is full or its own backlog is too long.
    """

    def __init__(self, link: Link, name: str) -> None:
        self.link = link
        self.name = name
        self.source: _End | None = None  # where the bytes come from
        self.sink: _End | None = None  # where they go
        self.blackholed = False
        self.delay = 0.0
        self.rate: float | None = None  # bytes per second
        self.flip_at: int | None = None  # absolute byte position to corrupt
        self.flipped: int | None = None  # where a byte was corrupted, once done
        self.passed = 0  # bytes read from the source and not black-holed
        self.dropped = 0  # bytes swallowed by the black hole
        self.written = 0  # bytes handed to the sink
        self.fin_pending = False  # close the sink once the backlog is written
        self._queue: deque[tuple[float, bytes]] = deque()  # (due time, bytes), in order
        self._queued = 0
        self._budget = 0.0
        self._refilled = 0.0
        self._timer: IDelayedCall | None = None
        self._sink_full = False
        self._reading = True
        self._stopped = False

    @property
    def clock(self) -> Any:
        return self.link.relay.reactor

    # ----- bytes in

    def feed(self, data: bytes) -> None:
        if self._stopped:
            return
        if self.blackholed:
            self.dropped += len(data)
            return
        if self.flip_at is not None and self.passed <= self.flip_at < self.passed + len(data):
            i = self.flip_at - self.passed
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
            self.flipped = self.flip_at
            self.flip_at = None
        self.passed += len(data)
        if not self._queue and not self.delay and self.rate is None:
            self._write(data)
            return
        self._queue.append((self.clock.seconds() + self.delay, data))
        self._queued += len(data)
        self._pump()

    # ----- bytes out

    def _write(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None and sink.transport is not None and not sink.gone:
            self.written += len(data)
            sink.transport.write(data)

    def _pump(self) -> None:
        """Write what is due (and within the rate), then wait for the next piece."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if self._stopped:
            return
        now = self.clock.seconds()
        rate = self.rate
        if rate is not None:
            burst = max(rate * BURST, 1.0)
            self._budget = min(self._budget + (now - self._refilled) * rate, burst)
        self._refilled = now
        wait: float | None = None
        while self._queue:
            due, head = self._queue[0]
            if due > now:
                wait = due - now
                break
            n = len(head)
            if rate is not None:
                if self._budget < 1:
                    wait = max(MIN_WAIT, (min(n, burst) - self._budget) / rate)
                    break
                n = min(n, int(self._budget))
                self._budget -= n
            if n == len(head):
                self._queue.popleft()
            else:
                self._queue[0] = (due, head[n:])
            self._queued -= n
            self._write(head[:n])
        if wait is not None:
            self._timer = self.clock.callLater(max(wait, MIN_WAIT), self._pump)
        elif self.fin_pending:
            self._finish()
        self._update_source()

    def _update_source(self) -> None:
        source = self.source
        if source is None or source.transport is None or source.gone or not self.link.ready:
            return
        if self._reading and (self._sink_full or self._queued > HIGH_WATER):
            self._reading = False
            source.transport.pauseProducing()
        elif not self._reading and not self._sink_full and self._queued <= LOW_WATER:
            self._reading = True
            source.transport.resumeProducing()

    def _finish(self) -> None:
        """The source half-closed and everything it sent is written: pass the FIN on."""
        self.fin_pending = False
        sink = self.sink
        if sink is not None and sink.transport is not None and not sink.gone:
            sink.transport.unregisterProducer()  # or a paused producer blocks the FIN
            sink.transport.loseWriteConnection()

    def close_after_backlog(self) -> None:
        """Half-close the sink once the bytes still held have been written."""
        if self._stopped:
            return
        self.fin_pending = True
        if not self._queue:
            self._finish()

    # ----- IPushProducer, for the sink's transport

    def pauseProducing(self) -> None:
        self._sink_full = True
        self._update_source()

    def resumeProducing(self) -> None:
        self._sink_full = False
        self._update_source()

    def stopProducing(self) -> None:
        self.stop()

    def set_rate(self, rate: float | None) -> None:
        self.rate = rate
        self._budget = 0.0
        self._refilled = self.clock.seconds()
        self._pump()

    def swallow(self) -> None:
        """Black-hole from now on: the backlog goes too."""
        self.blackholed = True
        self.dropped += self._queued
        self._queue.clear()
        self._queued = 0
        self._sink_full = False
        self._pump()

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._queue.clear()
        self._queued = 0


@implementer(IHalfCloseableProtocol)
class _End(protocol.Protocol):
    """One TCP end of a link (towards the client, or towards the server).

    A half-close (FIN) travels to the other end as a half-close, after the
    bytes still on their way; a reset travels as a reset.
    """

    transport: _ITCPConnection | None

    def __init__(self, link: Link, outbound: _Direction, inbound: _Direction) -> None:
        self.link = link
        self.outbound = outbound  # the direction this end's bytes feed
        self.inbound = inbound  # the direction that writes to this end
        self.read_closed = False  # this end's peer sent FIN
        self.write_closed = False  # we sent FIN to this end's peer
        self.gone = False
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        sock = _socket_of(self.transport)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert self.transport is not None
        self.transport.registerProducer(self.inbound, True)
        if self is self.link.client_end:
            self.link.relay.start_link(self.link)
        else:
            self.link.connected()

    def dataReceived(self, data: bytes) -> None:
        self.outbound.feed(data)

    def readConnectionLost(self) -> None:
        self.read_closed = True
        self.link.half_closed(self)
        self._close_if_done()

    def writeConnectionLost(self) -> None:
        self.write_closed = True
        self._close_if_done()

    def _close_if_done(self) -> None:
        if self.read_closed and self.write_closed and self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.gone = True
        self.reason = reason
        self.link.ended(self, reason)


class Link:
    """One relayed connection; the fault switches act on both directions
    unless said otherwise."""

    def __init__(self, relay: FaultRelay, index: int) -> None:
        self.relay = relay
        self.index = index
        self.up = _Direction(self, "up")  # client -> server
        self.down = _Direction(self, "down")  # server -> client
        self.client_end = _End(self, self.up, self.down)
        self.server_end: _End | None = None
        self.connector: Any = None
        self.ready = False  # both ends connected
        self.closed = False  # one end is gone: the link is broken
        self.was_reset = False
        self.up.source = self.client_end
        self.down.sink = self.client_end

    def __repr__(self) -> str:
        state = "closed" if self.closed else "live" if self.ready else "connecting"
        return f"<Link {self.index} {state} up={self.up.passed} down={self.down.passed}>"

    @property
    def passed(self) -> int:
        """Bytes relayed so far, both directions."""
        return self.up.passed + self.down.passed

    @property
    def blackholed(self) -> bool:
        return self.up.blackholed or self.down.blackholed

    def client_port(self) -> int | None:
        """The client's local port of this connection (the client's ``getHost()``)."""
        transport = self.client_end.transport
        return getattr(transport.getPeer(), "port", None) if transport is not None else None

    def server_port(self) -> int | None:
        """The relay's local port towards the server (the server's ``getPeer()``)."""
        end = self.server_end
        if end is None or end.transport is None:
            return None
        return getattr(end.transport.getHost(), "port", None)

    def _server_end(self) -> _End:
        end = _End(self, self.down, self.up)
        self.server_end = end
        self.up.sink = end
        self.down.source = end
        return end

    def connected(self) -> None:
        """The connection to the server is up: start relaying."""
        self.ready = True
        transport = self.client_end.transport
        if self.client_end.gone or transport is None:
            _abort_with_reset(self.server_end.transport if self.server_end else None)
            return
        self.up._reading = False  # paused by start_link until now
        self.up._update_source()
        self.down._update_source()

    # ----- faults

    def reset(self) -> None:
        """Abort both TCP connections; both endpoints see a reset (RST)."""
        self.was_reset = True
        self.up.stop()
        self.down.stop()
        for end in (self.client_end, self.server_end):
            if end is not None and not end.gone:
                _abort_with_reset(end.transport)
        self._stop_connecting()

    def blackhole(self) -> None:
        """Silently drop everything from now on, both ways; no FIN, no reset.

        The relay keeps reading (and discarding) both sides, and a close of
        one side is not passed on: each endpoint has to notice the silence
        itself, as behind a real black hole.
        """
        self.up.swallow()
        self.down.swallow()

    def set_delay(self, seconds: float) -> None:
        """Hold every byte for ``seconds`` from now on, both ways (order is kept)."""
        self.up.delay = self.down.delay = seconds

    def throttle(self, bytes_per_second: float | None) -> None:
        """Limit each direction to ``bytes_per_second`` (None: no limit)."""
        self.up.set_rate(bytes_per_second)
        self.down.set_rate(bytes_per_second)

    def flip_byte(self, after: int, upstream: bool = True) -> None:
        """Invert the byte ``after`` bytes from now in one direction
        (upstream: client to server)."""
        direction = self.up if upstream else self.down
        direction.flip_at = direction.passed + after

    # ----- lifecycle

    def half_closed(self, end: _End) -> None:
        """``end``'s peer sent FIN: pass it on, after what is still on its way."""
        if end.outbound.blackholed:
            # Nothing crosses a black hole, not even a FIN; this end is done.
            if end.transport is not None:
                end.transport.loseConnection()
            return
        end.outbound.close_after_backlog()

    def ended(self, end: _End, reason: Failure | None) -> None:
        """One end is gone: a reset travels on as a reset, a clean close as a FIN."""
        self.closed = True
        other = self.server_end if end is self.client_end else self.client_end
        end.inbound.stop()  # nothing can be written to this end any more
        if other is None or other.gone:
            self.up.stop()
            self.down.stop()
            self._stop_connecting()
            return
        if self.blackholed:
            # The other endpoint has to notice the silence itself.
            end.outbound.stop()
            return
        if reason is None or reason.check(error.ConnectionDone) is not None:  # type: ignore[no-untyped-call]
            if not end.read_closed:
                end.outbound.close_after_backlog()
        else:
            end.outbound.stop()
            _abort_with_reset(other.transport)

    def _stop_connecting(self) -> None:
        connector = self.connector
        if connector is not None and self.server_end is None and connector.state == "connecting":
            connector.stopConnecting()

    def abort(self) -> None:
        """Tear the link down (test cleanup): reset both ends, stop any timer."""
        self.reset()


class _ServerSide(protocol.ClientFactory):
    noisy = False

    def __init__(self, link: Link) -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> _End:
        return self.link._server_end()

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.link.closed = True
        self.link.up.stop()
        self.link.down.stop()
        if not self.link.client_end.gone:
            _abort_with_reset(self.link.client_end.transport)


class FaultRelay(protocol.ServerFactory):
    """Listens somewhere, relays each connection to ``host:port``."""

    noisy = False

    def __init__(self, reactor: Any, host: str, port: int) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.links: list[Link] = []
        self.refuse = False  # reset new connections at once (server "down")
        self.refused = 0

    def buildProtocol(self, addr: Any) -> _End | None:
        link = Link(self, len(self.links))
        self.links.append(link)
        return link.client_end

    def start_link(self, link: Link) -> None:
        transport = link.client_end.transport
        assert transport is not None
        if self.refuse:
            self.refused += 1
            link.closed = True
            _abort_with_reset(transport)
            return
        link.up._reading = False
        transport.pauseProducing()  # nothing to relay until the server answers
        link.connector = self.reactor.connectTCP(
            self.host, self.port, _ServerSide(link), timeout=CONNECT_TIMEOUT
        )

    def live(self) -> list[Link]:
        """Links with both ends connected and neither gone, in accept order."""
        return [link for link in self.links if link.ready and not link.closed]

    def passed(self) -> int:
        """Bytes relayed so far by every link, both directions."""
        return sum(link.passed for link in self.links)

    def passed_up(self) -> int:
        """Bytes relayed client -> server so far by every link."""
        return sum(link.up.passed for link in self.links)

    def abort_all(self) -> None:
        for link in self.links:
            link.abort()

    async def close(self, listening: Any | None = None) -> None:
        """Stop listening (if given) and reset every link."""
        if listening is not None:
            await defer.maybeDeferred(listening.stopListening)
        self.abort_all()
