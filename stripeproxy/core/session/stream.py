"""One stream of a session: its lifecycle, its send queue and its reorder buffer.

The lifecycle is one table (:data:`TRANSITIONS`) over the states a stream
goes through, from OPEN to both FINs and the ACK of ours (SPEC.md sections 4
and 5).  Anything not in the table is a protocol error; the two terminal
states absorb late inputs.  The send side cuts local bytes into chunks and
keeps the unacknowledged ones; the receive side puts chunks back in order,
reports what arrived beyond the first hole (SACK ranges) and measures how
long chunks waited in the reorder buffer, per subflow (:class:`Residence`).
"""

from __future__ import annotations

import enum
from collections import deque

from stripeproxy.core import wire
from stripeproxy.core.wire import ProtocolError


class StreamState(enum.Enum):
    """Where a stream is in its life; one line each."""

    OPENING = "opening"  # OPEN sent (client) or received (server), not yet answered
    OPENING_FIN = "opening-fin"  # the same, and the local peer already half-closed
    OPEN = "open"  # both directions flow
    SEND_CLOSED = "send-closed"  # our FIN is queued; the peer's direction still flows
    RECV_CLOSED = "recv-closed"  # the peer's EOF was delivered; ours still flows
    CLOSING = "closing"  # both directions ended; waiting for the ACK of our final offset
    CLOSED = "closed"  # terminal: both directions finished cleanly
    RESET = "reset"  # terminal: aborted (RST, OPEN_FAIL, idle, session over)


class StreamInput(enum.Enum):
    """What moves a stream on; one line each."""

    OPENED = "opened"  # OPEN_OK arrived (client) or the target connected (server)
    LOCAL_FIN = "local-fin"  # the local peer half-closed: FIN with our final offset
    REMOTE_EOF = "remote-eof"  # every byte up to the peer's FIN was delivered
    FIN_ACKED = "fin-acked"  # the peer acknowledged everything up to our FIN
    RESET = "reset"  # either side aborted


_S = StreamState
_I = StreamInput

#: The whole lifecycle.  Terminal states are not listed: they absorb everything.
TRANSITIONS: dict[tuple[StreamState, StreamInput], StreamState] = {
    (_S.OPENING, _I.OPENED): _S.OPEN,
    (_S.OPENING, _I.LOCAL_FIN): _S.OPENING_FIN,
    (_S.OPENING, _I.RESET): _S.RESET,
    (_S.OPENING_FIN, _I.OPENED): _S.SEND_CLOSED,
    (_S.OPENING_FIN, _I.RESET): _S.RESET,
    (_S.OPEN, _I.LOCAL_FIN): _S.SEND_CLOSED,
    (_S.OPEN, _I.REMOTE_EOF): _S.RECV_CLOSED,
    (_S.OPEN, _I.RESET): _S.RESET,
    (_S.SEND_CLOSED, _I.REMOTE_EOF): _S.CLOSING,
    (_S.SEND_CLOSED, _I.RESET): _S.RESET,
    (_S.RECV_CLOSED, _I.LOCAL_FIN): _S.CLOSING,
    (_S.RECV_CLOSED, _I.RESET): _S.RESET,
    (_S.CLOSING, _I.FIN_ACKED): _S.CLOSED,
    (_S.CLOSING, _I.RESET): _S.RESET,
}
TERMINAL = frozenset({_S.CLOSED, _S.RESET})
#: States in which the stream's OPEN is still unanswered: nothing is sent or delivered.
OPENING = frozenset({_S.OPENING, _S.OPENING_FIN})
#: States in which our FIN has been queued.
LOCAL_FIN_SENT = frozenset({_S.OPENING_FIN, _S.SEND_CLOSED, _S.CLOSING, _S.CLOSED})
#: States in which the peer's EOF has been delivered.
REMOTE_EOF_DELIVERED = frozenset({_S.RECV_CLOSED, _S.CLOSING, _S.CLOSED})


class StreamStateError(ProtocolError):
    """An input the lifecycle table has no transition for."""


def next_state(state: StreamState, event: StreamInput) -> StreamState:
    """The state after ``event``; terminal states stay as they are."""
    if state in TERMINAL:
        return state
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise StreamStateError(f"{event.value} while {state.value}") from None


class Chunk:
    """A piece of one stream direction, from first send to acknowledgement."""

    __slots__ = (
        "avoid",
        "data",
        "done",
        "offset",
        "reinjected",
        "retries",
        "sent_at",
        "sid",
        "stream",
    )

    def __init__(self, stream: Stream, offset: int, data: bytes) -> None:
        self.stream = stream
        self.offset = offset
        self.data = data
        self.sid: int | None = None  # the subflow carrying it now (None: to be sent)
        self.sent_at = 0.0
        self.done = False  # acknowledged (or its stream dropped)
        self.retries = 0  # retransmission timeouts so far (Karn: no RTT sample then)
        self.reinjected = False
        self.avoid: int | None = None  # the subflow it was taken away from


class SendSide:
    """One direction we send: local bytes -> chunks -> subflows."""

    __slots__ = (
        "acked",
        "fin_offset",
        "limit",
        "next_offset",
        "queue",
        "queued",
        "read_total",
        "retx",
        "source_paused",
        "unacked",
    )

    def __init__(self, limit: int) -> None:
        self.queue: deque[bytes] = deque()
        self.queued = 0
        self.next_offset = 0  # offset of the first unsent byte
        self.read_total = 0  # offset of the next byte the local peer gives us
        self.limit = limit  # peer's credit: we may send offsets below this
        self.acked = 0  # cumulative acknowledgement
        self.unacked: dict[int, Chunk] = {}  # by offset, in offset order
        self.retx: deque[int] = deque()  # offsets to send again, oldest first
        self.fin_offset: int | None = None  # our final offset, once the local peer ended
        self.source_paused = False

    def enqueue(self, data: bytes, chunk_size: int) -> None:
        """Queue local bytes; small reads are coalesced so a chatty peer does
        not cost a frame per byte."""
        queue = self.queue
        if queue and len(queue[-1]) + len(data) <= chunk_size and len(data) < 4096:
            queue[-1] += data
        else:
            queue.append(data)
        self.queued += len(data)
        self.read_total += len(data)

    def take(self, stream: Stream, room: int) -> Chunk:
        """Cut the next chunk (at most ``room`` bytes) off the queue, unacknowledged."""
        head = self.queue[0]
        if len(head) <= room:
            data = self.queue.popleft()
        else:
            data = head[:room]
            self.queue[0] = head[room:]
        chunk = Chunk(stream, self.next_offset, data)
        self.unacked[self.next_offset] = chunk
        self.next_offset += len(data)
        self.queued -= len(data)
        return chunk

    def next_retransmission(self) -> Chunk | None:
        """The oldest chunk waiting to go again, if any (stale offsets dropped)."""
        retx = self.retx
        while retx:
            chunk = self.unacked.get(retx.popleft())
            if chunk is not None and chunk.sid is None:
                return chunk
        return None

    def apply_ack(self, ack: wire.Ack) -> list[Chunk]:
        """Take the chunks an ACK covers (cumulatively or by SACK range) off
        the unacknowledged set and return them; an ACK for bytes never sent
        is a :class:`ProtocolError`."""
        if ack.cumulative > self.next_offset or (
            ack.ranges and ack.ranges[-1][1] > self.next_offset
        ):
            raise ProtocolError(f"stream {ack.stream_id}: ACK for data never sent")
        unacked = self.unacked
        done: list[Chunk] = []
        if ack.cumulative > self.acked:
            self.acked = ack.cumulative
            while unacked:
                offset = next(iter(unacked))
                chunk = unacked[offset]
                if offset + len(chunk.data) > ack.cumulative:
                    break
                del unacked[offset]
                done.append(chunk)
        for start, end in ack.ranges:
            covered = []
            for offset, chunk in unacked.items():  # in offset order: stop past the range
                if offset >= end:
                    break
                if offset >= start and offset + len(chunk.data) <= end:
                    covered.append(offset)
            for offset in covered:
                done.append(unacked.pop(offset))
        # SACKs are firm (SPEC.md section 4): everything below the first chunk
        # still unacknowledged has arrived, even if no cumulative ACK says so.
        self.acked = max(self.acked, next(iter(unacked), self.next_offset))
        return done

    def unacked_bytes(self) -> int:
        return sum(len(c.data) for c in self.unacked.values())


class Waits:
    """Reorder-buffer waits tied to one subflow, in both roles it can play.

    ``waited`` counts chunks this subflow delivered early, which sat in the
    buffer until a hole before them was filled; ``blocked`` counts the waits
    this subflow caused, by delivering the chunk that filled the hole late.
    A slow path shows up in ``blocked``: what the receiver lost waiting on it.
    """

    __slots__ = ("blocked", "blocked_chunks", "blocked_max", "waited", "waited_chunks")

    def __init__(self) -> None:
        self.waited = 0.0  # seconds, summed over this subflow's chunks that waited
        self.waited_chunks = 0
        self.blocked = 0.0  # seconds, summed over the chunks a late arrival here released
        self.blocked_chunks = 0
        self.blocked_max = 0.0  # the longest single wait this subflow ended

    def as_dict(self) -> dict[str, float]:
        return {
            "waited_s": self.waited,
            "waited_chunks": self.waited_chunks,
            "blocked_s": self.blocked,
            "blocked_chunks": self.blocked_chunks,
            "blocked_max_s": self.blocked_max,
        }


class Residence:
    """How long chunks sat in a session's reorder buffers, per subflow.

    This is the head-of-line cost of striping over unequal paths (issue 12):
    a chunk that arrives ahead of a hole cannot be delivered until the hole
    is filled, however fast its own path was.  Each wait is recorded twice,
    against the subflow that brought the waiting chunk and against the one
    that brought the hole-filler, so a scheduler can be judged per path.
    """

    __slots__ = ("subflows",)

    def __init__(self) -> None:
        self.subflows: dict[int, Waits] = {}

    def record(self, early: int, late: int, seconds: float) -> None:
        subflows = self.subflows
        waits = subflows.get(early) or subflows.setdefault(early, Waits())
        waits.waited += seconds
        waits.waited_chunks += 1
        blamed = subflows.get(late) or subflows.setdefault(late, Waits())
        blamed.blocked += seconds
        blamed.blocked_chunks += 1
        blamed.blocked_max = max(blamed.blocked_max, seconds)


class RecvSide:
    """One direction we receive: chunks from subflows -> in-order bytes."""

    __slots__ = (
        "ack_due",
        "advertised",
        "arrivals",
        "buffer",
        "buffered",
        "final",
        "held",
        "held_bytes",
        "next_offset",
        "sink_paused",
        "window",
    )

    def __init__(self, window: int) -> None:
        self.next_offset = 0  # every byte below this has arrived
        self.buffer: dict[int, bytes] = {}  # out-of-order chunks by offset
        self.arrivals: dict[int, tuple[float, int]] = {}  # their (arrival time, subflow)
        self.buffered = 0
        self.advertised = window  # the limit we last told the peer
        self.final: int | None = None  # the peer's final offset, once its FIN came
        self.sink_paused = False
        self.ack_due = 0  # bytes received since our last ACK
        self.held: list[bytes] = []  # in-order bytes waiting for the stream to open
        self.held_bytes = 0
        self.window = 0  # this stream's grown window; 0 until reordering grows it

    def receive(
        self,
        stream_id: int,
        offset: int,
        data: bytes,
        sid: int = 0,
        now: float = 0.0,
        residence: Residence | None = None,
    ) -> list[bytes]:
        """Take a DATA payload that came on subflow ``sid``; return the bytes
        that are now in order (maybe none).

        Raises :class:`ProtocolError` for data beyond the credit or the FIN,
        and for overlapping chunks.  Duplicates (a retransmission that
        crossed an ACK) are dropped by offset.  Chunks this one releases from
        the reorder buffer have their wait recorded in ``residence``.
        """
        end = offset + len(data)
        if end > self.advertised:
            raise ProtocolError(f"stream {stream_id}: DATA beyond the credit limit")
        if self.final is not None and end > self.final:
            raise ProtocolError(f"stream {stream_id}: DATA beyond FIN")
        self.ack_due += len(data)
        if end <= self.next_offset or offset in self.buffer:
            return []
        if offset > self.next_offset:
            self.buffer[offset] = data
            self.arrivals[offset] = (now, sid)
            self.buffered += len(data)
            if self.buffered > max(self.advertised - self.next_offset, 0):
                raise ProtocolError(f"stream {stream_id}: overlapping DATA")
            return []
        if offset < self.next_offset:
            data = data[self.next_offset - offset :]
        pieces = [data]
        self.next_offset += len(data)
        buffer = self.buffer
        arrivals = self.arrivals
        while self.next_offset in buffer:
            arrived, early = arrivals.pop(self.next_offset)
            if residence is not None:
                residence.record(early, sid, now - arrived)
            nxt = buffer.pop(self.next_offset)
            self.buffered -= len(nxt)
            pieces.append(nxt)
            self.next_offset += len(nxt)
        return pieces

    def set_final(self, stream_id: int, final: int) -> None:
        """The peer's FIN: it must not contradict what already arrived."""
        if self.final is not None or final < self.next_offset:
            raise ProtocolError(f"stream {stream_id}: inconsistent FIN")
        highest = max((o + len(d) for o, d in self.buffer.items()), default=0)
        if highest > final:
            raise ProtocolError(f"stream {stream_id}: FIN below received data")
        self.final = final

    @property
    def complete(self) -> bool:
        """Every byte up to the peer's FIN has arrived."""
        return self.final is not None and self.next_offset == self.final

    def sack_ranges(self) -> tuple[tuple[int, int], ...]:
        """What arrived beyond the first hole, as at most 16 merged ranges."""
        if not self.buffer:
            return ()
        ranges: list[tuple[int, int]] = []
        for offset in sorted(self.buffer):
            end = offset + len(self.buffer[offset])
            if ranges and ranges[-1][1] == offset:
                ranges[-1] = (ranges[-1][0], end)
            elif len(ranges) < wire.MAX_SACK_RANGES:
                ranges.append((offset, end))
            else:
                break
        return tuple(ranges)


class Stream:
    """Both directions of one stream and where it is in its lifecycle."""

    __slots__ = ("ack_pending", "active", "id", "ready", "recv", "send", "state")

    def __init__(
        self, stream_id: int, send_limit: int, recv_window: int, state: StreamState, now: float
    ) -> None:
        self.id = stream_id
        self.send = SendSide(send_limit)
        self.recv = RecvSide(recv_window)
        self.state = state
        self.ready = False  # queued in the session's ready list
        self.ack_pending = False  # queued in the ACK batch
        self.active = now  # the last byte from or to the local peer (idle timeout)

    def advance(self, event: StreamInput) -> StreamState:
        """Apply ``event`` to the lifecycle (see :data:`TRANSITIONS`)."""
        self.state = next_state(self.state, event)
        return self.state

    @property
    def opening(self) -> bool:
        return self.state in OPENING
