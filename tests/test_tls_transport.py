"""The subflows' TLS transport (stripeproxy.net.tls_transport), in memory.

Real OpenSSL on both sides, joined by twisted.test.iosim: what one side
writes arrives intact and in order, a whole frame goes down in one TCP write
and comes up in one ``dataReceived``, and the close and error paths Twisted
handles still reach the protocol.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient

from stripeproxy.cli.keygen import generate_self_signed
from stripeproxy.core import wire
from stripeproxy.net.tls import certificate_fingerprint, client_tls_creator, load_server_tls
from stripeproxy.net.tls_transport import (
    SubflowTLSEndpoint,
    SubflowTLSFactory,
    SubflowTLSTransport,
    server_tls_factory,
)

FRAME = 64 * 1024 + 18  # the largest DATA frame over TLS: header and a full chunk


class Recorder(Protocol):
    """Keeps every ``dataReceived`` call and how the connection ended."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []
        self.lost: Failure | None = None

    @property
    def received(self) -> bytes:
        return b"".join(self.calls)

    def dataReceived(self, data: bytes) -> None:
        self.calls.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


class OneShot(Factory):
    def __init__(self, proto: Protocol) -> None:
        self.proto = proto

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.proto


class Pair:
    """A connected client and server over :class:`SubflowTLSTransport`, after the handshake."""

    def __init__(self, creators: tuple[Any, Any]) -> None:
        server_creator, client_creator = creators
        self.server, self.client = Recorder(), Recorder()
        self.clock = Clock()
        server_factory = server_tls_factory(server_creator, OneShot(self.server))
        server_factory._clock = self.clock
        client_factory = SubflowTLSFactory(client_creator, True, OneShot(self.client), self.clock)
        client_tls, server_tls, pump = connectedServerAndClient(
            lambda: server_factory.buildProtocol(None),
            lambda: client_factory.buildProtocol(None),
            clock=self.clock,
        )
        self.client_tls: SubflowTLSTransport = client_tls
        self.server_tls: SubflowTLSTransport = server_tls
        self.pump: IOPump = pump
        pump.flush()
        assert client_tls._handshakeDone and server_tls._handshakeDone

    def count_tcp_writes(self, tls: SubflowTLSTransport) -> list[int]:
        """Record the size of every write ``tls`` makes to its TCP transport from now on."""
        sizes: list[int] = []
        transport = tls.transport
        assert transport is not None
        real = transport.write

        def write(data: bytes) -> None:
            sizes.append(len(data))
            real(data)

        transport.write = write  # type: ignore[method-assign]
        return sizes


@pytest.fixture(scope="module")
def creators(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    directory: Path = tmp_path_factory.mktemp("tls-transport")
    cert_pem, key_pem = generate_self_signed("localhost", 30)
    (directory / "server.crt").write_bytes(cert_pem)
    (directory / "server.key").write_bytes(key_pem)
    server = load_server_tls(str(directory / "server.crt"), str(directory / "server.key"))
    pin = certificate_fingerprint(str(directory / "server.crt"))
    return server, client_tls_creator("localhost", fingerprint=pin)


def test_a_frame_goes_down_in_one_tcp_write_and_up_in_one_call(creators: tuple[Any, Any]) -> None:
    pair = Pair(creators)
    writes = pair.count_tcp_writes(pair.client_tls)
    frame = wire.encode_data(3, 0, bytes(range(256)) * 256, crc=False)
    assert len(b"".join(frame)) == FRAME
    pair.client_tls.writeSequence(frame)
    # Five TLS records (four full ones and the header's spill-over), one write.
    assert len(writes) == 1
    assert FRAME < writes[0] < FRAME + 5 * 64
    pair.pump.flush()
    assert pair.server.calls == [b"".join(frame)]
    decoded = wire.FrameDecoder(crc=False).feed(pair.server.received)
    assert decoded == [wire.Data(3, 0, bytes(range(256)) * 256)]


def test_bytes_arrive_intact_and_in_order_both_ways(creators: tuple[Any, Any]) -> None:
    """Large, small and odd-sized writes, interleaved with pumping, both directions."""
    pair = Pair(creators)
    rng = random.Random(7)
    sent = {"client": bytearray(), "server": bytearray()}
    for _ in range(60):
        side = rng.choice(("client", "server"))
        tls = pair.client_tls if side == "client" else pair.server_tls
        data = rng.randbytes(rng.choice((1, 17, 4000, 16384, 16385, FRAME, 200_000)))
        if rng.random() < 0.5:
            tls.write(data)
        else:
            tls.writeSequence([data[:7], data[7:]])
        sent[side] += data
        if rng.random() < 0.3:
            pair.clock.advance(0)  # Twisted's aggregation of small writes runs
            pair.pump.flush()
    pair.clock.advance(0)
    pair.pump.flush()
    assert pair.server.received == bytes(sent["client"])
    assert pair.client.received == bytes(sent["server"])
    assert pair.client.lost is None and pair.server.lost is None


def test_bytes_before_a_close_arrive_then_the_close(creators: tuple[Any, Any]) -> None:
    pair = Pair(creators)
    payload = b"last words " * 10_000
    pair.client_tls.write(payload)
    pair.client_tls.loseConnection()
    pair.pump.flush()
    assert pair.server.received == payload
    assert pair.server.lost is not None and pair.server.lost.check(ConnectionDone)
    assert pair.client.lost is not None


def test_a_corrupt_record_ends_the_connection_with_the_tls_error(
    creators: tuple[Any, Any],
) -> None:
    pair = Pair(creators)
    pair.client_tls.write(b"x" * 1000)
    pair.clock.advance(0)  # Twisted's aggregation of small writes runs
    data = bytearray(pair.pump.clientIO.getOutBuffer())
    data[-5] ^= 0xFF  # inside the record's authentication tag
    pair.server_tls.dataReceived(bytes(data))
    pair.pump.flush()
    assert pair.server.received == b""
    assert pair.server.lost is not None
    assert not pair.server.lost.check(ConnectionDone)


def test_the_client_endpoint_wraps_in_subflow_tls(creators: tuple[Any, Any]) -> None:
    built: list[Any] = []

    class Endpoint:
        def connect(self, factory: Any) -> Any:
            built.append(factory)
            tls = factory.buildProtocol(None)
            return succeed(tls)

    app = Recorder()
    results: list[Any] = []
    SubflowTLSEndpoint(creators[1], Endpoint()).connect(OneShot(app)).addCallback(results.append)
    assert isinstance(built[0], SubflowTLSFactory)
    assert results == [app]
