"""The baselines for the overlay: a plain Twisted relay, over TCP or TLS.

``python -m bench.relay --listen PORT --connect HOST:PORT`` forwards
every accepted connection to one fixed destination over one TCP connection,
the way ``twisted.protocols.portforward`` does, with back-pressure both ways
(each transport is registered as the streaming producer of the other) and
half-close passed on.  Two of them make a pair with the same shape as the
overlay (client process -> one connection -> server process -> target):

- ``--tls-client --fingerprint FP`` wraps the outgoing connection in TLS,
  verified by the pinned fingerprint exactly as stripe-client does;
- ``--tls-server --cert C --key K`` terminates TLS on the listener with the
  certificate stripe-server uses.

So "overlay / relay" isolates what striping, framing and the session core
cost on top of what any Twisted proxy pays for moving bytes (and for TLS).
"""

from __future__ import annotations

import argparse
import sys
from typing import cast

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IProtocolFactory,
    IPushProducer,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()


def _consumer(transport: ITransport) -> IConsumer:
    """TCP and TLS transports are consumers too; ITransport does not say so."""
    return cast(IConsumer, transport)


def _producer(transport: ITransport) -> IPushProducer:
    """TCP and TLS transports are push producers too; ITransport does not say so."""
    return cast(IPushProducer, transport)


@implementer(IHalfCloseableProtocol)
class Pipe(Protocol):
    """One side of a relayed connection; ``peer`` is the other side."""

    peer: Pipe | None = None
    _pending: list[bytes]

    def __init__(self) -> None:
        self._pending = []

    def link(self, peer: Pipe) -> None:
        """Join the two sides; each transport throttles the other's reading."""
        assert self.transport is not None and peer.transport is not None
        self.peer = peer
        peer.peer = self
        _consumer(self.transport).registerProducer(_producer(peer.transport), True)
        _consumer(peer.transport).registerProducer(_producer(self.transport), True)
        for data in self._pending:
            peer.transport.write(data)
        self._pending.clear()

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self._pending.append(data)

    def readConnectionLost(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            half_close = getattr(self.peer.transport, "loseWriteConnection", None)
            if half_close is not None:
                half_close()
            else:
                self.peer.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """Nothing to do: the other direction keeps going."""

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()
            self.peer.peer = None
        self.peer = None


class Inbound(Pipe):
    """An accepted connection: hold its data until the outgoing leg is connected."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        super().__init__()
        self.endpoint = endpoint

    def connectionMade(self) -> None:
        assert self.transport is not None
        _producer(self.transport).pauseProducing()
        d = self.endpoint.connect(Factory.forProtocol(Pipe))
        d.addCallbacks(self._connected, self._failed)

    def _connected(self, outbound: Pipe) -> None:
        assert self.transport is not None
        if not self.connected:
            outbound.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.link(outbound)
        _producer(self.transport).resumeProducing()

    def _failed(self, reason: Failure) -> None:
        log.warn("relay: cannot connect: {reason}", reason=reason.getErrorMessage())
        assert self.transport is not None
        self.transport.loseConnection()


def main(argv: list[str] | None = None) -> int:
    """Run one relay until killed."""
    from stripeproxy.net.tls import client_tls_creator, load_server_tls

    ap = argparse.ArgumentParser(prog="python -m bench.relay")
    ap.add_argument("--listen", type=int, required=True, help="TCP port on --bind")
    ap.add_argument("--bind", default="127.0.0.1")
    ap.add_argument("--connect", required=True, help="HOST:PORT to forward to")
    ap.add_argument("--tls-client", action="store_true")
    ap.add_argument("--fingerprint", help="pinned server certificate fingerprint")
    ap.add_argument("--tls-server", action="store_true")
    ap.add_argument("--cert")
    ap.add_argument("--key")
    a = ap.parse_args(argv)
    host, _, port = a.connect.rpartition(":")
    endpoint: IStreamClientEndpoint = TCP4ClientEndpoint(reactor, host, int(port))
    if a.tls_client:
        endpoint = wrapClientTLS(client_tls_creator(host, fingerprint=a.fingerprint), endpoint)
    factory: IProtocolFactory = Factory.forProtocol(lambda: Inbound(endpoint))
    if a.tls_server:
        factory = TLSMemoryBIOFactory(load_server_tls(a.cert, a.key), False, factory)
    # Twisted's endpoint constructors and listen() are untyped.
    server = TCP4ServerEndpoint(reactor, a.listen, backlog=1024, interface=a.bind)  # type: ignore[no-untyped-call]
    server.listen(factory)  # type: ignore[no-untyped-call]
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
