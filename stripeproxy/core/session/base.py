"""A session's state and bookkeeping, and the door out (SPEC.md sections 4-7).

:class:`SessionBase` holds the parts (:mod:`.stream`, :mod:`.recovery`,
:mod:`.credit`, :mod:`.acks`, :mod:`.sender`) and the stream table, does the
bookkeeping every input shares (adding and dropping streams, placing and
accounting chunks, queueing frames and events), and answers the driver:
:meth:`~SessionBase.events`, :meth:`~SessionBase.next_transmit`,
:meth:`~SessionBase.next_deadline`.  :class:`~.session.Session` adds the
inputs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from stripeproxy.core import control, wire
from stripeproxy.core.control import CONTROL_STREAM
from stripeproxy.core.scheduler import Scheduler, make_scheduler
from stripeproxy.core.session import config as _config
from stripeproxy.core.session.acks import AckBatcher
from stripeproxy.core.session.config import (
    CONTROL_WINDOW,
    RESET_IDLE,
    SessionConfig,
)
from stripeproxy.core.session.credit import Credit
from stripeproxy.core.session.events import (
    Event,
    StreamClosed,
    StreamReset,
    StreamResumed,
)
from stripeproxy.core.session.recovery import Recovery, SubflowState
from stripeproxy.core.session.sender import Sender
from stripeproxy.core.session.stream import (
    Chunk,
    Residence,
    Stream,
    StreamInput,
    StreamState,
)

#: What :meth:`Session.next_transmit` returns: a subflow id and the bytes to write on it.
Transmit = tuple[int, Sequence[bytes]]


class SessionBase:
    """The state of a session and its bookkeeping; :class:`~.session.Session` adds the inputs."""

    """State of one overlay session; see the module docstring."""

    def __init__(
        self,
        config: SessionConfig,
        *,
        is_client: bool,
        now: float,
        scheduler: Scheduler | None = None,
    ) -> None:
        self.config = config
        self.is_client = is_client
        self._data_overhead = wire.data_overhead(config.crc)
        self._scheduler: Scheduler = scheduler or make_scheduler(
            config.scheduler, config.chunk_size, config.stream_window
        )
        self._recovery = Recovery(config)
        self._credit = Credit(config)
        self._acks = AckBatcher(config)
        self._sender = Sender(config, self._scheduler, self._credit)
        self._residence = Residence()
        self._streams: dict[int, Stream] = {}
        self._events: list[Event] = []
        self._outbox: deque[Transmit] = deque()  # frames other than DATA, in order
        self._grace_deadline: float | None = now + config.grace_period
        self._idle_deadline: float | None = None
        self._next_stream_id = 1  # client: next id to allocate
        self._max_stream_id = 0  # server: highest id opened by the client
        self._reack_all = False
        self._control_decoder = control.ControlDecoder()
        self.closed = False
        self.going_away = False  # we sent GOAWAY: no new streams accepted
        self.peer_going_away = False
        self._streams[CONTROL_STREAM] = Stream(
            CONTROL_STREAM, CONTROL_WINDOW, CONTROL_WINDOW, StreamState.OPEN, now
        )

    # ------------------------------------------------------------------ output

    def events(self) -> list[Event]:
        """Take the events queued since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    @property
    def has_events(self) -> bool:
        return bool(self._events)

    def next_transmit(self, now: float) -> Transmit | None:
        """The next frames to write, or None when there is nothing to send now.

        Call again after each write: a write may pause its subflow, and the
        next DATA chunk is then placed with that known.  Control frames (PONG,
        PING, GOAWAY, ACKs) come first, then DATA, then the ACKs that are due.
        """
        outbox = self._outbox
        if outbox:
            return outbox.popleft()
        if self._reack_all and self._recovery.subflows:
            self._reack_all = False
            for st in self._streams.values():
                self._acks.want(st)
        out = self._next_data(now)
        if out is not None:
            return out
        acks = self._acks.flush(False, now, self._recovery.subflow_list, self._credit)
        if acks is None:
            return None
        if self._recovery.credit_checks:
            self._recovery.granted(now)
        sf, frames = acks
        self._account(sf, frames, now)
        return sf.sid, frames

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` must run next, or None if nothing is pending."""
        deadlines = self._recovery.deadlines()
        for deadline in (self._acks.deadline, self._grace_deadline, self._idle_deadline):
            if deadline is not None:
                deadlines.append(deadline)
        return min(deadlines) if deadlines else None

    # ----------------------------------------------------------------- queries

    @property
    def subflow_ids(self) -> list[int]:
        return list(self._recovery.subflows)

    def subflow(self, sid: int) -> SubflowState:
        return self._recovery.subflows[sid]

    @property
    def stream_ids(self) -> list[int]:
        return [s for s in self._streams if s != CONTROL_STREAM]

    def has_stream(self, stream_id: int) -> bool:
        return stream_id != CONTROL_STREAM and stream_id in self._streams

    def stream_progress(self, stream_id: int) -> tuple[int, int]:
        """(bytes taken from the local peer, bytes received from the remote side)."""
        st = self._streams[stream_id]
        return st.send.read_total, st.recv.next_offset

    def buffered_bytes(self) -> int:
        """Bytes held in reorder buffers plus unsent and unacknowledged send data."""
        total = 0
        for st in self._streams.values():
            total += st.recv.buffered + st.recv.held_bytes + st.send.queued
            total += st.send.unacked_bytes()
        return total

    def reorder_waits(self) -> dict[int, dict[str, float]]:
        """Seconds chunks sat in our reorder buffers, per subflow that brought
        them (``waited``) and per subflow whose late chunk they waited for
        (``blocked``); subflows that are gone included."""
        return {sid: w.as_dict() for sid, w in self._residence.subflows.items()}

    def counters(self) -> dict[str, int]:
        """Cumulative session counters, including those of subflows that are gone."""
        return self._recovery.counters()

    @property
    def memory_budget(self) -> int:
        return self._credit.memory_budget

    @property
    def stats_retransmitted(self) -> int:
        return self._recovery.retransmitted

    @property
    def stats_reinjected(self) -> int:
        return self._recovery.reinjected

    @property
    def stats_timeouts(self) -> int:
        return self._recovery.timeouts

    @property
    def stats_subflows_lost(self) -> int:
        return self._recovery.subflows_lost

    # ------------------------------------------------------------ stream table

    def _add_stream(self, stream_id: int, now: float) -> Stream:
        # Read at call time, so that a test may patch the initial credit.
        window = _config.INITIAL_WINDOW
        st = Stream(stream_id, window, window, StreamState.OPENING, now)
        self._streams[stream_id] = st
        self._credit.data_streams += 1
        timeout = self.config.idle_timeout
        if timeout > 0 and self._idle_deadline is None:
            self._idle_deadline = now + timeout
        return st

    def _drop_stream(self, stream_id: int) -> bool:
        """Forget a stream (reset, unless it just closed cleanly); False if unknown."""
        st = self._streams.pop(stream_id, None) if stream_id != CONTROL_STREAM else None
        if st is None:
            return False
        st.advance(StreamInput.RESET)  # a stream that closed cleanly stays CLOSED
        credit = self._credit
        credit.data_streams -= 1
        if not credit.data_streams:
            self._idle_deadline = None
        self._recovery.reinject_checks.pop(st, None)
        self._recovery.credit_checks.pop(st, None)
        for chunk in st.send.unacked.values():
            self._recovery.release(chunk)
            chunk.done = True
            credit.unacked_bytes -= len(chunk.data)
        st.send.unacked.clear()
        self._unblock_sends()
        st.send.queue.clear()
        st.send.retx.clear()
        return True

    def _reset_idle(self, now: float) -> None:
        """Reset the streams idle for the timeout; plan the next check.

        One deadline for all streams, checked no more than once a second (or
        once per timeout, if shorter): per-stream timers would cost a heap
        operation per byte read, and the limit needs no precision.
        """
        timeout = self.config.idle_timeout
        oldest: float | None = None
        for stream_id in self.stream_ids:
            active = self._streams[stream_id].active
            if now >= active + timeout:
                self._drop_stream(stream_id)
                self._send_control(control.Rst(stream_id, RESET_IDLE))
                self._events.append(StreamReset(stream_id, RESET_IDLE))
            elif oldest is None or active < oldest:
                oldest = active
        if oldest is None:
            self._idle_deadline = None
        else:
            self._idle_deadline = max(oldest + timeout, now + min(1.0, timeout))

    def _is_closed_id(self, stream_id: int) -> bool:
        limit = self._next_stream_id if self.is_client else self._max_stream_id + 1
        return 0 < stream_id < limit

    def _check_done(self, st: Stream) -> None:
        fin = st.send.fin_offset
        if st.state is StreamState.CLOSING and fin is not None and st.send.acked >= fin:
            st.advance(StreamInput.FIN_ACKED)
            self._drop_stream(st.id)
            self._events.append(StreamClosed(st.id))

    # ----------------------------------------------------------------- sending

    def _send_control(self, message: control.Message) -> None:
        st = self._streams[CONTROL_STREAM]
        st.send.enqueue(control.encode(message), self.config.chunk_size)
        self._sender.mark_ready(st)

    def _requeue(self, chunks: list[Chunk]) -> None:
        for chunk in chunks:
            chunk.stream.send.retx.append(chunk.offset)
            self._sender.mark_ready(chunk.stream)

    def _unblock_sends(self) -> None:
        """Below the budget again: every stream with data waiting may send."""
        if self._credit.unblocked():
            for st in self._streams.values():
                if st.send.queue:
                    self._sender.mark_ready(st)

    def _next_data(self, now: float) -> Transmit | None:
        """Place one chunk (see :class:`~.sender.Sender`) and account for it."""
        out = self._sender.next(self._recovery.usable())
        if out is None:
            return None
        sf, chunk, is_retx = out
        send = chunk.stream.send
        if send.source_paused and send.queued <= self.config.send_buffer // 2:
            send.source_paused = False
            self._events.append(StreamResumed(chunk.stream.id))
        return self._transmit(sf, chunk.stream, chunk, is_retx, now)

    def _transmit(
        self, sf: SubflowState, st: Stream, chunk: Chunk, is_retx: bool, now: float
    ) -> Transmit:
        size = len(chunk.data)
        self._recovery.sent(sf, chunk, now)
        pieces = wire.encode_data(st.id, chunk.offset, chunk.data, self.config.crc)
        if is_retx or st.id == CONTROL_STREAM:
            # Control messages and second copies are overhead, not payload.
            if is_retx:
                sf.tx_retransmit += size
                self._recovery.retransmitted += size
            sf.tx_dummy += size + self._data_overhead
        else:
            sf.tx_real += size
            sf.tx_dummy += self._data_overhead
        sf.last_tx = now
        return sf.sid, pieces

    def _account(self, sf: SubflowState, pieces: Sequence[bytes], now: float) -> None:
        sf.tx_dummy += sum(len(p) for p in pieces)
        sf.last_tx = now

    def _emit(self, sf: SubflowState, pieces: list[bytes], now: float) -> None:
        """Queue non-DATA frames (overhead) for ``sf``."""
        self._account(sf, pieces, now)
        self._outbox.append((sf.sid, pieces))

    def _flush_acks(self, force: bool, now: float) -> None:
        out = self._acks.flush(force, now, self._recovery.subflow_list, self._credit)
        if out is not None:
            self._emit(out[0], out[1], now)
            if self._recovery.credit_checks:
                self._recovery.granted(now)

    def _maybe_window_update(self, st: Stream) -> None:
        if self._credit.update_due(st):
            self._acks.want(st)

    def _maybe_reinject(self, st: Stream, head: Chunk, now: float) -> None:
        if self._recovery.reinject(st, head, now):
            st.send.retx.appendleft(head.offset)
            self._sender.mark_ready(st)

    def _acked(self, chunk: Chunk, now: float) -> None:
        self._credit.unacked_bytes -= len(chunk.data)
        self._recovery.acked(chunk, now)
