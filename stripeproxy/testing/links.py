"""The fake network of :class:`~stripeproxy.testing.pair.SessionPair`: sides,
directions, and per-subflow queues of frames in flight."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from stripeproxy.core import wire

Side = Literal["client", "server"]
Direction = Literal["c2s", "s2c"]
CLIENT: Side = "client"
SERVER: Side = "server"
C2S: Direction = "c2s"  # written by the client, read by the server
S2C: Direction = "s2c"  # written by the server, read by the client
DIRECTIONS: tuple[Direction, Direction] = (C2S, S2C)


def wire_size(frame: wire.Frame, crc: bool) -> int:
    """Bytes a frame takes on the wire (see :func:`~stripeproxy.core.wire.frame_size`)."""
    return wire.frame_size(frame, crc)


@dataclass
class FakeSubflow:
    """One fake subflow: per direction, a decoder and a queue of frames in flight.

    ``queued`` counts the wire bytes in each queue; ``blocked`` is what the
    test asked with :meth:`SessionPair.set_writable`; ``writable`` is what the
    writing side was last told.
    """

    sid: int
    crc: bool
    alive: bool = True
    queues: dict[Direction, deque[wire.Frame]] = field(default_factory=dict)
    decoders: dict[Direction, wire.FrameDecoder] = field(default_factory=dict)
    queued: dict[Direction, int] = field(default_factory=dict)
    held: set[Direction] = field(default_factory=set)
    blocked: set[Direction] = field(default_factory=set)
    writable: dict[Direction, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for direction in DIRECTIONS:
            self.queues[direction] = deque()
            self.decoders[direction] = wire.FrameDecoder(self.crc)
            self.queued[direction] = 0
            self.writable[direction] = True


@dataclass
class Source:
    """Bytes a test wants a local peer to send, fed as back-pressure allows."""

    pending: deque[bytes] = field(default_factory=deque)
    eof: bool = False
    eof_sent: bool = False
