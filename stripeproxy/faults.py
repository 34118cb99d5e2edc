"""A fault-injecting TCP relay, for tests: a middlebox between client and server.

Every connection accepted by :class:`FaultRelay` is relayed to the target
as a :class:`Link`, numbered in accept order, and each link can be told to
misbehave the way real paths do: reset, black-hole (silently swallow
everything, no reset), delay, throttle, or flip one byte.  Shipped in the
package (like txtorcon's testutil) so users can test their own deployments.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet import protocol
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

TICK = 0.01


class _Direction:
    """One direction of a link: what to do with the bytes flowing through it."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.sink: protocol.Protocol | None = None  # where bytes go
        self.source: protocol.Protocol | None = None  # where they come from
        self.blackholed = False
        self.delay = 0.0
        self.rate: float | None = None  # bytes per second
        self.flip_at: int | None = None  # absolute byte position to corrupt
        self.passed = 0
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._budget = 0.0
        self._loop: LoopingCall | None = None
        self._pending: list[IDelayedCall] = []

    def feed(self, data: bytes) -> None:
        if self.blackholed:
            return
        if self.flip_at is not None and self.passed <= self.flip_at < self.passed + len(data):
            i = self.flip_at - self.passed
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
            self.flip_at = None
        self.passed += len(data)
        if self.rate is not None:
            self._queue.append(data)
            self._queued += len(data)
            if self._queued > 256 * 1024 and self.source is not None:
                self.source.transport.pauseProducing()  # type: ignore[union-attr]
            self._ensure_loop()
        elif self.delay:
            call = self.link.relay.reactor.callLater(self.delay, self._write, data)
            self._pending.append(call)
        else:
            self._write(data)

    def _write(self, data: bytes) -> None:
        self._pending = [c for c in self._pending if c.active()]
        if not self.blackholed and self.sink is not None and self.sink.transport is not None:
            self.sink.transport.write(data)

    def _ensure_loop(self) -> None:
        if self._loop is None:
            self._loop = LoopingCall(self._drain)
            self._loop.clock = self.link.relay.reactor
            self._loop.start(TICK, now=False)

    def _drain(self) -> None:
        assert self.rate is not None
        self._budget = min(self._budget + self.rate * TICK, self.rate * TICK * 4)
        while self._queue and self._budget >= 1:
            head = self._queue[0]
            n = min(len(head), int(self._budget))
            self._budget -= n
            self._queued -= n
            if n == len(head):
                self._queue.popleft()
            else:
                self._queue[0] = head[n:]
            self._write(head[:n])
        if self._queued < 64 * 1024 and self.source is not None and self.source.transport:
            self.source.transport.resumeProducing()

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        for call in self._pending:
            if call.active():
                call.cancel()
        self._pending = []


class _End(protocol.Protocol):
    """One TCP end of a link (towards the client, or towards the server)."""

    def __init__(self, link: Link, outbound: _Direction) -> None:
        self.link = link
        self.outbound = outbound  # the direction this end's bytes feed

    def connectionMade(self) -> None:
        if self is self.link.client_end:
            self.link.relay.start_link(self.link)

    def dataReceived(self, data: bytes) -> None:
        self.outbound.feed(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.link.ended(self)


class Link:
    """One relayed connection; the fault switches act on both directions."""

    def __init__(self, relay: FaultRelay, index: int) -> None:
        self.relay = relay
        self.index = index
        self.up = _Direction(self)  # client -> server
        self.down = _Direction(self)  # server -> client
        self.client_end = _End(self, self.up)
        self.server_end: _End | None = None
        self.closed = False
        self.up.source = self.client_end
        self.down.sink = self.client_end

    def connected(self, server_end: _End) -> None:
        self.server_end = server_end
        self.up.sink = server_end
        self.down.source = server_end
        assert self.client_end.transport is not None
        self.client_end.transport.resumeProducing()

    # ----- faults

    def reset(self) -> None:
        """Abort both TCP connections (the endpoints see a reset)."""
        for end in (self.client_end, self.server_end):
            if end is not None and end.transport is not None:
                end.transport.abortConnection()

    def blackhole(self) -> None:
        """Silently drop everything from now on, both ways; no FIN, no reset."""
        self.up.blackholed = self.down.blackholed = True

    def set_delay(self, seconds: float) -> None:
        self.up.delay = self.down.delay = seconds

    def throttle(self, bytes_per_second: float) -> None:
        self.up.rate = self.down.rate = bytes_per_second

    def flip_byte(self, after: int, upstream: bool = True) -> None:
        """Invert the byte ``after`` bytes from now in one direction."""
        direction = self.up if upstream else self.down
        direction.flip_at = direction.passed + after

    def ended(self, end: _End) -> None:
        other = self.server_end if end is self.client_end else self.client_end
        if not self.closed:
            self.closed = True
            self.up.stop()
            self.down.stop()
        if other is not None and other.transport is not None:
            other.transport.loseConnection()


class _ServerSide(protocol.ClientFactory):
    noisy = False

    def __init__(self, link: Link) -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> _End:
        end = _End(self.link, self.link.down)
        self.link.connected(end)
        return end

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if self.link.client_end.transport is not None:
            self.link.client_end.transport.abortConnection()


class FaultRelay(protocol.ServerFactory):
    """Listens somewhere, relays each connection to ``host:port``."""

    noisy = False

    def __init__(self, reactor: Any, host: str, port: int) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.links: list[Link] = []
        self.refuse = False  # abort new connections at once (server "down")

    def buildProtocol(self, addr: Any) -> _End | None:
        link = Link(self, len(self.links))
        self.links.append(link)
        return link.client_end

    def start_link(self, link: Link) -> None:
        assert link.client_end.transport is not None
        if self.refuse:
            link.client_end.transport.abortConnection()
            return
        link.client_end.transport.pauseProducing()
        self.reactor.connectTCP(self.host, self.port, _ServerSide(link))

    def live(self) -> list[Link]:
        return [link for link in self.links if not link.closed and link.server_end is not None]
