"""How much a subflow's socket transport reads at once, and when it still
pauses its producer (``stripeproxy.net.subflow.read_whole_frames``), on a
real Twisted TCP transport over a socket pair."""

from __future__ import annotations

import socket

from twisted.internet import tcp
from twisted.internet.protocol import Protocol

from stripeproxy.core import wire
from stripeproxy.net.subflow import READ_SIZE, read_whole_frames


class QuietReactor:
    """What a socket transport asks of its reactor here: nothing to run."""

    def addReader(self, _reader: object) -> None:
        pass

    def addWriter(self, _writer: object) -> None:
        pass

    def removeReader(self, _reader: object) -> None:
        pass

    def removeWriter(self, _writer: object) -> None:
        pass


class Producer:
    paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


class Reads(Protocol):
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def dataReceived(self, data: bytes) -> None:
        self.sizes.append(len(data))


def test_several_frames_per_read_and_the_producer_paused_as_before() -> None:
    mine, peer = socket.socketpair()
    with mine, peer:
        mine.setblocking(False)
        protocol = Reads()
        transport = tcp.Connection(mine, protocol, QuietReactor())  # type: ignore[arg-type]
        transport.connected = True  # as tcp.Server and tcp.Client mark it
        limit = transport.bufferSize
        read_whole_frames(transport)
        assert 3 * (wire.CHUNK_SIZE + wire.data_overhead(True)) < READ_SIZE
        # Reads: what is there, up to READ_SIZE, in one call.
        peer.sendall(b"f" * (3 * limit))
        transport.doRead()
        assert protocol.sizes == [3 * limit]
        # Writes: the producer is paused past Twisted's own limit, not READ_SIZE.
        producer = Producer()
        transport.registerProducer(producer, True)
        transport.write(b"x" * limit)
        assert not producer.paused
        transport.write(b"x")
        assert producer.paused


def test_a_transport_that_is_not_twisted_s_is_left_alone() -> None:
    class Fake:
        bufferSize = 1

    fake = Fake()
    read_whole_frames(fake)
    assert fake.bufferSize == 1
