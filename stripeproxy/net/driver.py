"""Binds a sans-I/O :class:`~stripeproxy.core.session.Session` to Twisted.

The driver maps subflow ids to subflow transports and stream ids to the local
TCP peers (SOCKS clients on the client, targets on the server).  Adapters
call its inputs; every input goes into the session with the current time and
is followed by :meth:`SessionDriver._flush`, the one door out: it hands the
session's events to the local peers, writes the session's frames one subflow
write at a time (a write that fills a transport pauses that subflow before
the next chunk is placed), and has the session's one timer re-armed once the
reactor turn's inputs are all in (:meth:`~stripeproxy.net.timer.Timer.arm_after_turn`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from stripeproxy.core import wire
from stripeproxy.core.escape import printable
from stripeproxy.core.session import (
    RESET_GENERAL,
    RESET_IDLE,
    CloseSubflow,
    GoingAway,
    OpenRefused,
    OpenRequested,
    OpenResult,
    Session,
    SessionClosed,
    SessionConfig,
    StreamClosed,
    StreamData,
    StreamEof,
    StreamPaused,
    StreamReset,
    StreamResumed,
)
from stripeproxy.core.throttle import Throttle
from stripeproxy.net.timer import Timer


class Subflow(Protocol):
    """What the driver needs of a subflow (:class:`~stripeproxy.net.subflow.SubflowProtocol`)."""

    sid: int
    transport: Any  # an ITransport once connected; None before

    @property
    def peer(self) -> str: ...

    def abort(self) -> None: ...


class LocalPeer(Protocol):
    """What the driver needs of a stream's local TCP peer
    (:class:`~stripeproxy.net.local.LocalStream`)."""

    target: str
    opened_at: float

    def open_result(self, code: int, host: str, port: int) -> None: ...
    def write_local(self, data: bytes) -> None: ...
    def half_close_local(self) -> None: ...
    def close_local(self) -> None: ...
    def abort_local(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


@dataclass(frozen=True)
class SubflowInfo:
    """One subflow as the monitor shows it."""

    sid: int
    peer: str
    writable: bool
    srtt: float | None
    inflight: int
    totals: dict[str, int]  # cumulative bytes: tx_real, tx_dummy, rx_real, rx_dummy
    retransmitted: int
    cc: str | None = None  # the socket's congestion control (None: unknown)
    # Chunks it brought that waited in our reorder buffer for another
    # subflow's earlier chunk (head-of-line) and their waits summed up, and
    # the seconds other chunks waited for *its* late ones (cumulative).
    reorder_waits: int = 0
    reorder_wait_s: float = 0.0
    blocked_wait_s: float = 0.0


@dataclass(frozen=True)
class StreamInfo:
    """One open stream as the monitor shows it."""

    stream_id: int
    target: str
    opened_at: float | None
    sent: int  # bytes read from the local peer
    received: int  # bytes received from the remote side


class SessionDriver:
    """Twisted side of one session; subclasses add the role-specific handling."""

    log = Logger()
    is_client = False

    def __init__(
        self,
        clock: IReactorTime,
        config: SessionConfig,
        session_id: bytes,
        on_closed: Callable[[SessionDriver], None] | None = None,
    ) -> None:
        self.clock = clock
        self.config = config
        self.session_id = session_id
        self.label = session_id.hex()[-8:]
        self.session = Session(config, is_client=self.is_client, now=clock.seconds())
        # Read-only outside the driver (observers and tests): adapters go
        # through the inputs below, which keep these and the session in step.
        self.subflows: dict[int, Subflow] = {}
        self.streams: dict[int, LocalPeer] = {}
        self._on_closed = on_closed
        self._timer = Timer(clock, self._fire)
        self._next_sid = 0
        self._flushing = False
        self._again = False
        self._stream_limit = Throttle()
        self._handlers: dict[type, Callable[[Any], None]] = {
            StreamData: self._on_stream_data,
            StreamPaused: self._on_stream_paused,
            StreamResumed: self._on_stream_resumed,
            StreamEof: self._on_stream_eof,
            StreamClosed: self._on_stream_closed,
            StreamReset: self._on_stream_reset,
            OpenRequested: self._on_open_requested,
            OpenResult: self._on_open_result,
            OpenRefused: self._on_open_refused,
            CloseSubflow: self._on_close_subflow,
            GoingAway: self._on_going_away,
            SessionClosed: self._on_session_closed,
        }
        self._flush()

    # ------------------------------------------------------------- queries

    @property
    def closed(self) -> bool:
        """The session is over."""
        return self.session.closed

    @property
    def peer_going_away(self) -> bool:
        """The peer sent GOAWAY: open no new streams in this session."""
        return self.session.peer_going_away

    @property
    def subflow_count(self) -> int:
        """Live subflows of this session."""
        return len(self.subflows)

    @property
    def stream_count(self) -> int:
        """Open streams of this session."""
        return len(self.session.stream_ids)

    @property
    def memory_budget(self) -> int:
        return self.session.memory_budget

    def has_stream(self, stream_id: int) -> bool:
        return self.session.has_stream(stream_id)

    def local_stream(self, stream_id: int) -> LocalPeer | None:
        """The local peer bound to ``stream_id``, if it is still there."""
        return self.streams.get(stream_id)

    def counters(self) -> dict[str, int]:
        """Cumulative counters of the session (see ``Session.counters``)."""
        return self.session.counters()

    def buffered_bytes(self) -> int:
        return self.session.buffered_bytes()

    def subflow_info(self) -> list[SubflowInfo]:
        session = self.session
        waits = session.reorder_waits()
        rows = []
        for sid in session.subflow_ids:
            sf = session.subflow(sid)
            subflow = self.subflows.get(sid)
            w = waits.get(sid, {})
            rows.append(
                SubflowInfo(
                    sid=sid,
                    peer=subflow.peer if subflow is not None else "?",
                    writable=sf.writable,
                    srtt=sf.srtt,
                    inflight=sf.inflight,
                    totals={
                        "tx_real": sf.tx_real,
                        "tx_dummy": sf.tx_dummy,
                        "rx_real": sf.rx_real,
                        "rx_dummy": sf.rx_dummy,
                    },
                    retransmitted=sf.tx_retransmit,
                    # Fakes in tests and testing/ need not know it.
                    cc=getattr(subflow, "cc", None),
                    reorder_waits=int(w.get("waited_chunks", 0)),
                    reorder_wait_s=w.get("waited_s", 0.0),
                    blocked_wait_s=w.get("blocked_s", 0.0),
                )
            )
        return rows

    def stream_info(self) -> list[StreamInfo]:
        rows = []
        for stream_id in self.session.stream_ids:
            sent, received = self.session.stream_progress(stream_id)
            local = self.streams.get(stream_id)
            rows.append(
                StreamInfo(
                    stream_id=stream_id,
                    target=local.target if local is not None else "",
                    opened_at=local.opened_at if local is not None else None,
                    sent=sent,
                    received=received,
                )
            )
        return rows

    # ----------------------------------------------------- called by subflows

    def attach(self, subflow: Subflow) -> None:
        """A subflow finished its handshake: give it its id within the session
        (before the first write, so that a pause names this subflow) and use it."""
        self._next_sid += 1
        sid = self._next_sid
        self.subflows[sid] = subflow
        subflow.sid = sid
        self.session.add_subflow(sid, self.clock.seconds())
        self._flush()

    def detach(self, sid: int) -> None:
        """The subflow's connection is gone."""
        if self.subflows.pop(sid, None) is not None:
            self.session.subflow_lost(sid, self.clock.seconds())
            self._flush()

    def frames(self, sid: int, frames: Sequence[wire.Frame]) -> None:
        """A batch of decoded frames from subflow ``sid``."""
        self.session.frames_received(sid, frames, self.clock.seconds())
        self._flush()

    def writable(self, sid: int, writable: bool) -> None:
        """The subflow's transport paused or resumed its producer."""
        self.session.subflow_writable(sid, writable, self.clock.seconds())
        if writable:
            self._flush()  # a pause changes nothing to send; a flush under way sees it

    # ------------------------------------------------ called by local streams

    def register_stream(self, stream_id: int, stream: LocalPeer) -> None:
        self.streams[stream_id] = stream

    def local_data(self, stream_id: int, data: bytes) -> None:
        """Bytes read from the local peer of ``stream_id``."""
        self.session.local_data(stream_id, data, self.clock.seconds())
        self._flush()

    def local_eof(self, stream_id: int) -> None:
        """The local peer half-closed."""
        self.session.local_eof(stream_id, self.clock.seconds())
        self._flush()

    def local_reset(self, stream_id: int, code: int = RESET_GENERAL) -> None:
        """The local peer aborted (or went away early): forget it, reset the stream."""
        self.streams.pop(stream_id, None)
        self.session.local_reset(stream_id, code, self.clock.seconds())
        self._flush()

    def local_closed(self, stream_id: int) -> None:
        """The local peer is gone after both directions ended cleanly: the
        session finishes the stream on its own once the last ACK arrives."""
        self.streams.pop(stream_id, None)

    def local_sink_paused(self, stream_id: int, paused: bool) -> None:
        """The local peer's transport is full (True) or drained (False)."""
        self.session.local_sink_paused(stream_id, paused, self.clock.seconds())
        self._flush()

    # ------------------------------------------------------- session-wide

    def close(self, reason: str) -> None:
        """End the session: reset every stream, drop every subflow."""
        self.session.close(reason, self.clock.seconds())
        self._flush()

    def go_away(self, reason: str) -> None:
        """Graceful shutdown: GOAWAY to the peer, no new streams; open ones go on."""
        self.session.go_away(reason, self.clock.seconds())
        self._flush()

    def set_memory_budget(self, budget: int) -> None:
        """Bytes this session may hold for its peer (the server shares one limit)."""
        if self.session.memory_budget != budget:
            self.session.set_memory_budget(budget, self.clock.seconds())
            self._flush()  # the budget may have let chunks go out

    # ------------------------------------------------------------ the door

    def _fire(self) -> None:
        self.session.on_timer(self.clock.seconds())
        self._flush()

    def _flush(self) -> None:
        """The one door out: events to local peers, frames to subflows, timer.

        Writes and deliveries may call inputs back synchronously (a full
        transport pauses its producer); those inputs reach the session at
        once and make this loop go round again instead of nesting.
        """
        if self._flushing:
            self._again = True
            return
        self._flushing = True
        session = self.session
        clock = self.clock
        subflows = self.subflows
        handlers = self._handlers
        try:
            while True:
                self._again = False
                for event in session.events():
                    handlers[type(event)](event)
                while (out := session.next_transmit(clock.seconds())) is not None:
                    sid, pieces = out
                    subflow = subflows.get(sid)
                    if subflow is not None and subflow.transport is not None:
                        subflow.transport.writeSequence(pieces)
                if not (self._again or session.has_events):
                    break
        finally:
            self._flushing = False
        if session.closed:
            self._timer.cancel()  # a closed session has no deadline: nothing left behind
        else:
            self._timer.arm_after_turn(session.next_deadline)

    # --------------------------------------------------------- the events

    def _on_stream_data(self, event: StreamData) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.write_local(event.data)

    def _on_stream_paused(self, event: StreamPaused) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.pause_reading()

    def _on_stream_resumed(self, event: StreamResumed) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.resume_reading()

    def _on_stream_eof(self, event: StreamEof) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.half_close_local()

    def _on_stream_closed(self, event: StreamClosed) -> None:
        stream = self.streams.pop(event.stream_id, None)
        if stream is not None:
            stream.close_local()

    def _on_stream_reset(self, event: StreamReset) -> None:
        if event.code == RESET_IDLE:
            self.log.info(
                "session {session}: stream {stream} idle too long: reset",
                session=self.label,
                stream=event.stream_id,
            )
        stream = self.streams.pop(event.stream_id, None)
        if stream is not None:
            stream.abort_local()

    def _on_open_requested(self, event: OpenRequested) -> None:
        raise NotImplementedError("server sessions handle OPEN requests")

    def _on_open_result(self, event: OpenResult) -> None:
        raise NotImplementedError("client sessions handle OPEN results")

    def _on_open_refused(self, event: OpenRefused) -> None:
        suppressed = self._stream_limit.due(self.clock.seconds())
        if suppressed is not None:
            self.log.warn(
                "session {session}: new stream refused: {streams} streams open, the limit "
                "per session (--max-streams) ({suppressed} more refused since the last line)",
                session=self.label,
                streams=event.streams,
                suppressed=suppressed,
            )

    def _on_close_subflow(self, event: CloseSubflow) -> None:
        subflow = self.subflows.pop(event.sid, None)
        if subflow is not None:
            self.log.info(
                "session {session}: dropping subflow {sid}: {reason}",
                session=self.label,
                sid=event.sid,
                reason=printable(event.reason),  # a protocol error may quote the peer
            )
            subflow.abort()

    def _on_going_away(self, event: GoingAway) -> None:
        self.log.info(
            "session {session}: peer is going away: {reason}",
            session=self.label,
            reason=printable(event.reason),  # the peer's GOAWAY text
        )

    def _on_session_closed(self, event: SessionClosed) -> None:
        self.log.info(
            "session {session} closed: {reason}", session=self.label, reason=printable(event.reason)
        )
        for subflow in list(self.subflows.values()):
            subflow.abort()
        self.subflows.clear()
        if self._on_closed is not None:
            self._on_closed(self)
