"""The overlay session core, sans-I/O (SPEC.md sections 4-7).

A :class:`Session` owns every stream of one client<->server session and the
bookkeeping that makes striping safe: per-direction byte offsets, send queues,
the unacknowledged set, reorder buffers, credit, ACK generation and
heartbeats.  It never touches a socket or the reactor: the adapter feeds it
events (a frame arrived on subflow 3, subflow 2 went away, stream 7 has bytes
from its local peer, the timer fired) and the core answers through the small
:class:`SessionOwner` interface (write these bytes on subflow 1, deliver these
bytes to stream 7, pause reading stream 7).  Time is read from an injected
``IReactorTime`` so tests run on ``task.Clock``.

Re-entrancy: owner callbacks may synchronously call back into the core (a
transport write can pause a producer).  Those entry points only record state
and ask for a "service" pass; :meth:`Session._service` never nests.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.interfaces import IReactorTime

from stripeproxy.core import control, wire
from stripeproxy.core.control import CONTROL_STREAM
from stripeproxy.core.scheduler import Scheduler, make_scheduler
from stripeproxy.core.wire import ProtocolError

KiB = 1024
MiB = 1024 * KiB

CONTROL_WINDOW = 256 * KiB
GOODPUT_SAMPLE = 0.1  # seconds of ACKs per goodput sample
INITIAL_WINDOW = 256 * KiB
RESET_GENERAL = 0x01
RESET_IDLE = 0x06  # SOCKS5 "TTL expired": the stream was idle too long


class SessionError(ProtocolError):
    """The peer broke the session itself (not one subflow): end the session."""


@dataclass
class SessionConfig:
    """Tunables of one session; defaults are explained in SPEC.md section 8."""

    chunk_size: int = 64 * KiB
    stream_window: int = 4 * MiB
    session_window: int = 32 * MiB
    min_stream_window: int = 64 * KiB
    send_buffer: int = 256 * KiB
    ack_threshold: int = 128 * KiB
    ack_delay: float = 0.002
    heartbeat_interval: float = 5.0
    dead_interval: float = 15.0
    grace_period: float = 30.0
    min_rto: float = 0.2
    initial_rto: float = 1.0
    max_rto: float = 10.0
    max_streams: int = 1024
    # Seconds without a byte from or to the local peer before a stream is
    # reset; 0 disables.
    idle_timeout: float = 0.0
    crc: bool = False
    # "least-queued" (the plain policy) or "adaptive" (goodput-weighted; the
    # taps' default).  See scheduler.py.
    scheduler: str = "least-queued"


class SessionOwner(Protocol):
    """How the core reaches the world; implemented by the Twisted adapter."""

    def send(self, sid: int, pieces: Sequence[bytes]) -> None:
        """Write these bytes, in order, on subflow ``sid``."""

    def close_subflow(self, sid: int, reason: str) -> None:
        """Drop subflow ``sid`` (protocol error, heartbeat silence)."""

    def stream_open_requested(self, stream_id: int, host: str, port: int) -> None:
        """Server only: connect stream ``stream_id`` to host:port."""

    def stream_open_result(self, stream_id: int, code: int, host: str, port: int) -> None:
        """Client only: the server answered an OPEN (code 0 means connected)."""

    def stream_data(self, stream_id: int, data: bytes) -> None:
        """In-order bytes for the local peer of ``stream_id``."""

    def stream_eof(self, stream_id: int) -> None:
        """The remote direction has ended: half-close the local peer's write side."""

    def stream_reset(self, stream_id: int, code: int) -> None:
        """The stream was aborted: abort the local peer."""

    def stream_closed(self, stream_id: int) -> None:
        """Both directions finished cleanly: close the local peer."""

    def stream_pause(self, stream_id: int) -> None:
        """Stop reading the local peer: its send buffer is full."""

    def stream_resume(self, stream_id: int) -> None:
        """Resume reading the local peer."""

    def session_closed(self, reason: str) -> None:
        """The session is over (grace period expired with no subflow)."""

    def session_going_away(self, reason: str) -> None:
        """The peer sent GOAWAY: open no new streams here; existing ones go on."""


class _Chunk:
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

    def __init__(self, stream: _Stream, offset: int, data: bytes) -> None:
        self.stream = stream
        self.offset = offset
        self.data = data
        self.sid: int | None = None  # the subflow carrying it now (None: to be sent)
        self.sent_at = 0.0
        self.done = False  # acknowledged
        self.retries = 0  # retransmission timeouts so far (Karn: no RTT sample then)
        self.reinjected = False
        self.avoid: int | None = None  # the subflow it was taken away from


class _Subflow:
    """Per-subflow state the core and the scheduler read."""

    __slots__ = (
        "_rate_bytes",
        "_rate_start",
        "goodput",
        "inflight",
        "last_rx",
        "last_tx",
        "rttvar",
        "rx_dummy",
        "rx_real",
        "sent",
        "sid",
        "srtt",
        "suspect",
        "tx_dummy",
        "tx_real",
        "tx_retransmit",
        "writable",
    )

    def __init__(self, sid: int, now: float) -> None:
        self.sid = sid
        self.writable = True
        self.inflight = 0
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.suspect = False  # a chunk timed out here; cleared by any sign of life
        # (sent_at, chunk) in send order; entries go stale when the chunk is
        # acknowledged or moves to another subflow, and are dropped lazily.
        self.sent: deque[tuple[float, _Chunk]] = deque()
        self.last_rx = now
        self.last_tx = now
        self.tx_real = 0
        self.tx_dummy = 0
        self.rx_real = 0
        self.rx_dummy = 0
        self.tx_retransmit = 0
        # Recent acknowledged bytes per second (EWMA over >= 100 ms samples).
        self.goodput = 0.0
        self._rate_start = now
        self._rate_bytes = 0


class _Send:
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
        self.unacked: dict[int, _Chunk] = {}  # by offset, in offset order
        self.retx: deque[int] = deque()  # offsets to send again, oldest first
        self.fin_offset: int | None = None
        self.source_paused = False


class _Recv:
    """One direction we receive: chunks from subflows -> in-order bytes."""

    __slots__ = (
        "ack_due",
        "advertised",
        "buffer",
        "buffered",
        "eof_delivered",
        "final",
        "held",
        "held_bytes",
        "next_offset",
        "sink_paused",
    )

    def __init__(self, window: int) -> None:
        self.next_offset = 0  # every byte below this has arrived
        self.buffer: dict[int, bytes] = {}  # out-of-order chunks by offset
        self.buffered = 0
        self.advertised = window  # the limit we last told the peer
        self.final: int | None = None
        self.sink_paused = False
        self.ack_due = 0  # bytes received since our last ACK
        self.held: list[bytes] = []  # in-order bytes waiting for the stream to open
        self.held_bytes = 0
        self.eof_delivered = False


class _Stream:
    __slots__ = ("ack_pending", "active", "id", "is_open", "ready", "recv", "send")

    def __init__(
        self, stream_id: int, send_limit: int, recv_window: int, is_open: bool, now: float
    ) -> None:
        self.id = stream_id
        self.send = _Send(send_limit)
        self.recv = _Recv(recv_window)
        self.is_open = is_open
        self.ready = False  # queued in Session._ready
        self.ack_pending = False  # queued in Session._acks
        self.active = now  # the last byte from or to the local peer (idle timeout)


class Session:
    """State of one overlay session; see the module docstring."""

    def __init__(
        self,
        owner: SessionOwner,
        clock: IReactorTime,
        config: SessionConfig,
        *,
        is_client: bool,
        scheduler: Scheduler | None = None,
    ) -> None:
        self._owner = owner
        self._clock = clock
        self.config = config
        self.is_client = is_client
        self._data_overhead = wire.data_overhead(config.crc)
        self._scheduler: Scheduler = scheduler or make_scheduler(
            config.scheduler, config.chunk_size
        )
        self._subflows: dict[int, _Subflow] = {}
        self._subflow_list: list[_Subflow] = []
        self._streams: dict[int, _Stream] = {}
        self._ready: deque[_Stream] = deque()
        self._acks: list[_Stream] = []
        self._ack_deadline: float | None = None
        self._grace_deadline: float | None = clock.seconds() + config.grace_period
        self._next_stream_id = 1  # client: next id to allocate
        self._max_stream_id = 0  # server: highest id opened by the client
        self._data_streams = 0
        self._in_service = False
        self._service_again = False
        self._reack_all = False
        self.closed = False
        self.going_away = False  # we sent GOAWAY: no new streams accepted
        self.peer_going_away = False
        self.stats_retransmitted = 0
        self.stats_reinjected = 0
        self.stats_timeouts = 0
        self.stats_subflows_lost = 0
        # Streams whose head-of-line chunk may need re-injection, and when.
        self._reinject_checks: dict[_Stream, float] = {}
        self._ack_turn = 0
        self._retired = dict.fromkeys(("tx_real", "tx_dummy", "rx_real", "rx_dummy"), 0)
        self._control_decoder = control.ControlDecoder()
        self._idle_deadline: float | None = None
        #: Bytes this session may hold for its peer: the credit it hands out
        #: (reorder buffers) and, separately, what it keeps unacknowledged in
        #: flight whatever credit the peer grants.  A server sharing one
        #: memory limit among its sessions lowers it (set_memory_budget).
        self.memory_budget = config.session_window
        self._unacked_bytes = 0
        self._send_blocked = False  # a chunk waited for unacknowledged bytes to drop
        control_stream = _Stream(
            CONTROL_STREAM, CONTROL_WINDOW, CONTROL_WINDOW, True, clock.seconds()
        )
        self._streams[CONTROL_STREAM] = control_stream

    # ------------------------------------------------------------------ queries

    @property
    def subflow_ids(self) -> list[int]:
        return list(self._subflows)

    def subflow(self, sid: int) -> _Subflow:
        return self._subflows[sid]

    @property
    def stream_ids(self) -> list[int]:
        return [s for s in self._streams if s != CONTROL_STREAM]

    def has_stream(self, stream_id: int) -> bool:
        return stream_id != CONTROL_STREAM and stream_id in self._streams

    def buffered_bytes(self) -> int:
        """Bytes held in reorder buffers plus unsent and unacknowledged send data."""
        total = 0
        for st in self._streams.values():
            total += st.recv.buffered + st.recv.held_bytes + st.send.queued
            total += sum(len(c.data) for c in st.send.unacked.values())
        return total

    def set_memory_budget(self, budget: int) -> None:
        """Change :attr:`memory_budget`; credit already announced stays valid
        (SPEC.md section 4), so a lower budget takes effect as data drains."""
        grew = budget > self.memory_budget
        self.memory_budget = budget
        if grew and not self.closed:
            for st in self._streams.values():
                self._maybe_window_update(st)
            self._unblock_sends()
            self._service()

    def stream_progress(self, stream_id: int) -> tuple[int, int]:
        """(bytes taken from the local peer, bytes received from the remote side)."""
        st = self._streams[stream_id]
        return st.send.read_total, st.recv.next_offset

    def counters(self) -> dict[str, int]:
        """Cumulative session counters, including those of subflows that are gone."""
        totals = dict(self._retired)
        for sf in self._subflow_list:
            totals["tx_real"] += sf.tx_real
            totals["tx_dummy"] += sf.tx_dummy
            totals["rx_real"] += sf.rx_real
            totals["rx_dummy"] += sf.rx_dummy
        totals["retransmitted"] = self.stats_retransmitted
        totals["reinjected"] = self.stats_reinjected
        totals["timeouts"] = self.stats_timeouts
        totals["subflows_lost"] = self.stats_subflows_lost
        return totals

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` must run next, or None if nothing is pending."""
        deadlines: list[float] = []
        if self._ack_deadline is not None:
            deadlines.append(self._ack_deadline)
        if self._grace_deadline is not None:
            deadlines.append(self._grace_deadline)
        if self._idle_deadline is not None:
            deadlines.append(self._idle_deadline)
        cfg = self.config
        for sf in self._subflow_list:
            deadlines.append(
                min(sf.last_tx + cfg.heartbeat_interval, sf.last_rx + cfg.dead_interval)
            )
            expiry = self._rto_expiry(sf)
            if expiry is not None:
                deadlines.append(expiry)
        deadlines.extend(self._reinject_checks.values())
        return min(deadlines) if deadlines else None

    # ----------------------------------------------------------------- subflows

    def add_subflow(self, sid: int) -> None:
        """A subflow finished its handshake and joined this session."""
        if self.closed or sid in self._subflows:
            return
        sf = _Subflow(sid, self._clock.seconds())
        self._subflows[sid] = sf
        self._subflow_list.append(sf)
        self._grace_deadline = None
        self._service()

    def subflow_lost(self, sid: int) -> None:
        """A subflow is gone: everything it carried unacknowledged goes again."""
        sf = self._subflows.pop(sid, None)
        if sf is None:
            return
        self._subflow_list.remove(sf)
        self.stats_subflows_lost += 1
        for name in self._retired:
            self._retired[name] += getattr(sf, name)
        sf.sent.clear()
        for st in self._streams.values():
            send = st.send
            for offset, chunk in send.unacked.items():
                if chunk.sid == sid:
                    chunk.sid = None
                    chunk.avoid = None
                    send.retx.append(offset)
            if send.unacked and send.fin_offset is not None and send.next_offset == send.fin_offset:
                # The peer may have received everything and finished the stream;
                # then it cannot repeat a final ACK lost with this subflow.  Send
                # the last chunk again: a finished peer acknowledges it up to the
                # final offset (SPEC.md section 4), a live one just re-ACKs.
                offset, chunk = next(reversed(send.unacked.items()))
                if chunk.sid is not None:
                    self._release(chunk)
                    send.retx.append(offset)
            if send.retx:
                self._mark_ready(st)
        # ACKs sent on the lost subflow may be gone too; repeat them all.
        self._reack_all = True
        if len(self._subflow_list) < 2:
            self._reinject_checks.clear()  # nowhere else to re-inject to
        if not self._subflows and not self.closed:
            if self.peer_going_away:
                self.close("the peer went away")  # it said so: no grace to wait for
                return
            self._grace_deadline = self._clock.seconds() + self.config.grace_period
        self._service()

    def subflow_writable(self, sid: int, writable: bool) -> None:
        """The subflow's transport asked us to pause or resume producing."""
        sf = self._subflows.get(sid)
        if sf is None:
            return
        sf.writable = writable
        if writable:
            self._service()

    def frames_received(self, sid: int, frames: Sequence[wire.Frame]) -> None:
        """Handle a batch of frames read from subflow ``sid``."""
        sf = self._subflows.get(sid)
        if sf is None:
            return
        sf.last_rx = self._clock.seconds()
        nested = self._in_service
        self._in_service = True  # owner callbacks below must not start a send pass
        try:
            for frame in frames:
                self._on_frame(sf, frame)
        except SessionError as e:
            self._in_service = nested
            self.close(f"protocol error: {e}")
            return
        except ProtocolError as e:
            self._in_service = nested
            self._owner.close_subflow(sid, str(e))
            self.subflow_lost(sid)
            return
        self._in_service = nested
        if nested:
            self._service_again = True
        else:
            self._service()

    # ------------------------------------------------------------------ streams

    def open_stream(self, host: str, port: int) -> int:
        """Client: start a new stream to host:port; returns its id."""
        if not self.is_client:
            raise RuntimeError("only the client opens streams")
        stream_id = self._next_stream_id
        self._next_stream_id += 1
        self._add_stream(stream_id, is_open=False)
        self._send_control(control.Open(stream_id, host, port))
        self._service()
        return stream_id

    def open_succeeded(self, stream_id: int, host: str, port: int) -> None:
        """Server: the target for ``stream_id`` is connected (host:port bound)."""
        st = self._streams.get(stream_id)
        if st is None:
            return
        st.is_open = True
        self._send_control(control.OpenOk(stream_id, host, port))
        self._deliver_held(st)
        self._service()

    def open_failed(self, stream_id: int, code: int) -> None:
        """Server: the target for ``stream_id`` could not be reached."""
        if self._drop_stream(stream_id):
            self._send_control(control.OpenFail(stream_id, code))
            self._service()

    def local_data(self, stream_id: int, data: bytes) -> None:
        """Bytes read from the local peer of ``stream_id``, to be striped."""
        st = self._streams.get(stream_id)
        if st is None or not data:
            return
        send = st.send
        if send.fin_offset is not None:
            raise RuntimeError("data after local EOF")
        st.active = self._clock.seconds()
        self._enqueue(st, data)
        if send.queued >= self.config.send_buffer and not send.source_paused:
            send.source_paused = True
            self._owner.stream_pause(stream_id)
        self._service()

    def local_eof(self, stream_id: int) -> None:
        """The local peer half-closed: send FIN with the final offset."""
        st = self._streams.get(stream_id)
        if st is None or st.send.fin_offset is not None:
            return
        st.send.fin_offset = st.send.read_total
        self._send_control(control.Fin(stream_id, st.send.read_total))
        self._check_done(st)
        self._service()

    def local_reset(self, stream_id: int, code: int = RESET_GENERAL) -> None:
        """The local peer aborted (or closed both ways early): abort the stream."""
        if self._drop_stream(stream_id):
            self._send_control(control.Rst(stream_id, code))
            self._service()

    def local_sink_paused(self, stream_id: int, paused: bool) -> None:
        """The local peer's transport is full (True) or drained (False)."""
        st = self._streams.get(stream_id)
        if st is None:
            return
        st.recv.sink_paused = paused
        if not paused:
            self._maybe_window_update(st)
            self._service()

    # -------------------------------------------------------------------- timer

    def on_timer(self) -> None:
        """Run everything whose deadline has passed."""
        now = self._clock.seconds()
        if self._grace_deadline is not None and now >= self._grace_deadline:
            self.close("no subflow for the grace period")
            return
        cfg = self.config
        for sf in list(self._subflow_list):
            # Same sums as next_deadline(): "now - last >= interval" can be false
            # at that deadline (float rounding), and the timer would spin.
            if now >= sf.last_rx + cfg.dead_interval:
                self._owner.close_subflow(sf.sid, f"silent for {cfg.dead_interval:g} s")
                self.subflow_lost(sf.sid)
                continue
            self._expire(sf, now)
            if now >= sf.last_tx + cfg.heartbeat_interval:
                self._emit(sf, [wire.encode_ping(int(now * 1e6), cfg.crc)], dummy=True)
        for st, due in list(self._reinject_checks.items()):
            if now >= due:
                del self._reinject_checks[st]
                unacked = st.send.unacked
                if unacked and st.send.acked < st.send.next_offset and st.id in self._streams:
                    self._maybe_reinject(st, unacked[next(iter(unacked))], now)
        if self._ack_deadline is not None and now >= self._ack_deadline:
            self._flush_acks(force=True)
        if self._idle_deadline is not None and now >= self._idle_deadline:
            self._reset_idle(now)
        self._service()

    def go_away(self, reason: str) -> None:
        """Begin a graceful shutdown: tell the peer (GOAWAY on every subflow)
        and refuse new streams; open streams continue until they finish."""
        if self.going_away or self.closed:
            return
        self.going_away = True
        frame = wire.encode_goaway(wire.GOAWAY_SHUTDOWN, reason, self.config.crc)
        for sf in self._subflow_list:
            self._emit(sf, [frame], dummy=True)

    def close(self, reason: str) -> None:
        """End the session: reset every stream and tell the owner."""
        if self.closed:
            return
        self.closed = True
        self._grace_deadline = None
        self._ack_deadline = None
        self._idle_deadline = None
        self._reinject_checks.clear()
        for stream_id in self.stream_ids:
            self._drop_stream(stream_id)
            self._owner.stream_reset(stream_id, RESET_GENERAL)
        for sid in list(self._subflows):
            self._owner.close_subflow(sid, reason)
        self._subflows.clear()
        self._subflow_list.clear()
        self._owner.session_closed(reason)

    # ---------------------------------------------------------------- internals

    def _add_stream(self, stream_id: int, is_open: bool) -> _Stream:
        now = self._clock.seconds()
        st = _Stream(stream_id, INITIAL_WINDOW, INITIAL_WINDOW, is_open, now)
        self._streams[stream_id] = st
        self._data_streams += 1
        timeout = self.config.idle_timeout
        if timeout > 0 and self._idle_deadline is None:
            self._idle_deadline = now + timeout
        return st

    def _reset_idle(self, now: float) -> None:
        """Reset the streams idle for the timeout; plan the next check.

        One deadline for all streams, checked no more than once a second (or
        once per timeout, if shorter): per-stream timers would cost a heap
        operation per byte read, and the limit needs no precision.
        """
        timeout = self.config.idle_timeout
        oldest: float | None = None
        for stream_id in self.stream_ids:
            st = self._streams.get(stream_id)
            if st is None:
                continue  # an owner callback dropped it meanwhile
            active = st.active
            if now >= active + timeout:
                self._drop_stream(stream_id)
                self._send_control(control.Rst(stream_id, RESET_IDLE))
                self._owner.stream_reset(stream_id, RESET_IDLE)
            elif oldest is None or active < oldest:
                oldest = active
        if oldest is None:
            self._idle_deadline = None
        else:
            self._idle_deadline = max(oldest + timeout, now + min(1.0, timeout))

    def _drop_stream(self, stream_id: int) -> bool:
        st = self._streams.pop(stream_id, None) if stream_id != CONTROL_STREAM else None
        if st is None:
            return False
        self._data_streams -= 1
        if not self._data_streams:
            self._idle_deadline = None
        self._reinject_checks.pop(st, None)
        for chunk in st.send.unacked.values():
            self._release(chunk)
            chunk.done = True
            self._unacked_bytes -= len(chunk.data)
        st.send.unacked.clear()
        self._unblock_sends()
        st.send.queue.clear()
        st.send.retx.clear()
        return True

    def _is_closed_id(self, stream_id: int) -> bool:
        limit = self._next_stream_id if self.is_client else self._max_stream_id + 1
        return 0 < stream_id < limit

    def _enqueue(self, st: _Stream, data: bytes) -> None:
        send = st.send
        queue = send.queue
        # Coalesce small reads so a chatty peer does not cost a frame per byte.
        if queue and len(queue[-1]) + len(data) <= self.config.chunk_size and len(data) < 4096:
            queue[-1] += data
        else:
            queue.append(data)
        send.queued += len(data)
        send.read_total += len(data)
        self._mark_ready(st)

    def _send_control(self, message: control.Message) -> None:
        self._enqueue(self._streams[CONTROL_STREAM], control.encode(message))

    def _mark_ready(self, st: _Stream) -> None:
        if not st.ready:
            st.ready = True
            if st.id == CONTROL_STREAM:
                self._ready.appendleft(st)
            else:
                self._ready.append(st)

    def _service(self) -> None:
        """Send what can be sent; never nests (see module docstring)."""
        if self._in_service:
            self._service_again = True
            return
        self._in_service = True
        try:
            while True:
                self._service_again = False
                if self._reack_all and self._subflows:
                    self._reack_all = False
                    for st in self._streams.values():
                        self._want_ack(st)
                self._pump()
                self._flush_acks(force=False)
                if not self._service_again:
                    break
        finally:
            self._in_service = False

    def _pump(self) -> None:
        ready = self._ready
        pick = self._scheduler.pick
        subflows = self._subflow_list
        while ready:
            sf = pick(subflows)
            if sf is None:
                return
            st = ready[0]
            chunk, is_retx = self._next_chunk(st)
            if chunk is None:
                ready.popleft()
                st.ready = False
                continue
            if st.id != CONTROL_STREAM:
                ready.rotate(-1)
            if is_retx and chunk.avoid == sf.sid and len(subflows) > 1:
                # Send it again somewhere else than where it got stuck, if we can.
                other = pick([s for s in subflows if s.sid != chunk.avoid])
                sf = other or sf
            self._transmit(sf, st, chunk, is_retx)  # type: ignore[arg-type]

    def _next_chunk(self, st: _Stream) -> tuple[_Chunk | None, bool]:
        send = st.send
        while send.retx:
            chunk = send.unacked.get(send.retx.popleft())
            if chunk is not None and chunk.sid is None:
                return chunk, True
        if not send.queue or send.next_offset >= send.limit or not st.is_open:
            return None, False
        if self._unacked_bytes >= self.memory_budget and st.id != CONTROL_STREAM:
            # The peer's credit does not decide what we hold: our budget does.
            self._send_blocked = True
            return None, False
        room = min(self.config.chunk_size, send.limit - send.next_offset)
        head = send.queue[0]
        if len(head) <= room:
            data = send.queue.popleft()
        else:
            data = head[:room]
            send.queue[0] = head[room:]
        chunk = _Chunk(st, send.next_offset, data)
        self._unacked_bytes += len(data)
        send.unacked[send.next_offset] = chunk
        send.next_offset += len(data)
        send.queued -= len(data)
        if send.source_paused and send.queued <= self.config.send_buffer // 2:
            send.source_paused = False
            self._owner.stream_resume(st.id)
        return chunk, False

    def _transmit(self, sf: _Subflow, st: _Stream, chunk: _Chunk, is_retx: bool) -> None:
        size = len(chunk.data)
        chunk.sid = sf.sid
        chunk.sent_at = self._clock.seconds()
        sf.inflight += size
        sf.sent.append((chunk.sent_at, chunk))
        pieces = wire.encode_data(st.id, chunk.offset, chunk.data, self.config.crc)
        if is_retx or st.id == CONTROL_STREAM:
            # Control messages and second copies are overhead, not payload.
            if is_retx:
                sf.tx_retransmit += size
                self.stats_retransmitted += size
            self._emit(sf, pieces, dummy=True)
        else:
            sf.tx_real += size
            sf.tx_dummy += self._data_overhead
            sf.last_tx = chunk.sent_at
            self._owner.send(sf.sid, pieces)

    def _emit(self, sf: _Subflow, pieces: Sequence[bytes], dummy: bool) -> None:
        if dummy:
            sf.tx_dummy += sum(len(p) for p in pieces)
        sf.last_tx = self._clock.seconds()
        self._owner.send(sf.sid, pieces)

    # ----- receiving

    def _on_frame(self, sf: _Subflow, frame: wire.Frame) -> None:
        if isinstance(frame, wire.Data):
            if frame.stream_id == CONTROL_STREAM:
                sf.rx_dummy += len(frame.payload) + self._data_overhead
            else:
                sf.rx_real += len(frame.payload)
                sf.rx_dummy += self._data_overhead
            self._on_data(frame)
        elif isinstance(frame, wire.Ack):
            sf.rx_dummy += wire.HEADER_SIZE + 21 + 16 * len(frame.ranges)
            self._on_ack(frame)
        elif isinstance(frame, wire.Ping):
            sf.rx_dummy += wire.HEADER_SIZE + 8
            self._emit(sf, [wire.encode_pong(frame.token, self.config.crc)], dummy=True)
        elif isinstance(frame, wire.Pong):
            sf.rx_dummy += wire.HEADER_SIZE + 8
            sf.suspect = False
            rtt = self._clock.seconds() - frame.token / 1e6
            if rtt < 3600:
                self._rtt_sample(sf, rtt)
        elif isinstance(frame, wire.GoAway):
            sf.rx_dummy += wire.HEADER_SIZE + 1 + len(frame.reason.encode())
            if not self.peer_going_away:
                self.peer_going_away = True
                self._owner.session_going_away(frame.reason)
        else:
            raise ProtocolError(f"unexpected {type(frame).__name__} frame in an open session")

    def _on_data(self, frame: wire.Data) -> None:
        st = self._streams.get(frame.stream_id)
        data = frame.payload
        offset = frame.offset
        end = offset + len(data)
        if st is None:
            if self._is_closed_id(frame.stream_id):
                # Late copy for a finished stream: acknowledge so it is not sent again.
                self._ack_closed(frame.stream_id, end)
                return
            raise ProtocolError(f"DATA for stream {frame.stream_id}, which was never opened")
        recv = st.recv
        if end > recv.advertised:
            raise ProtocolError(f"stream {st.id}: DATA beyond the credit limit")
        if recv.final is not None and end > recv.final:
            raise ProtocolError(f"stream {st.id}: DATA beyond FIN")
        recv.ack_due += len(data)
        self._want_ack(st)
        if end <= recv.next_offset or offset in recv.buffer:
            return  # duplicate (a retransmission that crossed an ACK)
        if offset > recv.next_offset:
            recv.buffer[offset] = data
            recv.buffered += len(data)
            if recv.buffered > max(recv.advertised - recv.next_offset, 0):
                raise ProtocolError(f"stream {st.id}: overlapping DATA")
            return
        if offset < recv.next_offset:
            data = data[recv.next_offset - offset :]
        pieces = [data]
        recv.next_offset += len(data)
        buffer = recv.buffer
        while recv.next_offset in buffer:
            nxt = buffer.pop(recv.next_offset)
            recv.buffered -= len(nxt)
            pieces.append(nxt)
            recv.next_offset += len(nxt)
        self._deliver(st, pieces)

    def _deliver(self, st: _Stream, pieces: list[bytes]) -> None:
        if st.id == CONTROL_STREAM:
            # Control bytes are consumed once accepted: a bad message leaves the
            # decoder and the stream table in doubt, so the whole session ends.
            try:
                for piece in pieces:
                    for message in self._control_decoder.feed(piece):
                        self._on_control(message)
            except SessionError:
                raise
            except ProtocolError as e:
                raise SessionError(str(e)) from None
            st.recv.advertised = st.recv.next_offset + CONTROL_WINDOW
            return
        if not st.is_open:
            st.recv.held.extend(pieces)
            st.recv.held_bytes += sum(len(p) for p in pieces)
            return
        st.active = self._clock.seconds()
        for piece in pieces:
            if st.id not in self._streams:
                return  # the owner reset the stream while we were delivering
            self._owner.stream_data(st.id, piece)
        self._maybe_eof(st)

    def _deliver_held(self, st: _Stream) -> None:
        held = st.recv.held
        st.recv.held = []
        st.recv.held_bytes = 0
        self._mark_ready(st)
        if held:
            self._deliver(st, held)
            # The held bytes filled the window the peer was given; now that they
            # are delivered, say so, or a peer that sent a whole window waits forever.
            self._maybe_window_update(st)
        else:
            self._maybe_eof(st)

    def _maybe_eof(self, st: _Stream) -> None:
        recv = st.recv
        if (
            st.is_open
            and not recv.eof_delivered
            and recv.final is not None
            and recv.next_offset == recv.final
            and st.id in self._streams
        ):
            recv.eof_delivered = True
            self._owner.stream_eof(st.id)
            self._check_done(st)

    def _check_done(self, st: _Stream) -> None:
        send = st.send
        if (
            st.recv.eof_delivered
            and send.fin_offset is not None
            and send.acked >= send.fin_offset
            and self._drop_stream(st.id)
        ):
            self._owner.stream_closed(st.id)

    def _on_control(self, message: control.Message) -> None:
        if isinstance(message, control.Open):
            if self.is_client:
                raise ProtocolError("the server may not open streams")
            if message.stream_id <= self._max_stream_id:
                raise ProtocolError(f"OPEN for stream {message.stream_id} reuses an id")
            self._max_stream_id = message.stream_id
            if self._data_streams >= self.config.max_streams or self.going_away:
                self._send_control(control.OpenFail(message.stream_id, RESET_GENERAL))
                return
            self._add_stream(message.stream_id, is_open=False)
            self._owner.stream_open_requested(message.stream_id, message.host, message.port)
            return
        st = self._streams.get(message.stream_id)
        if isinstance(message, control.OpenOk | control.OpenFail):
            if not self.is_client:
                raise ProtocolError("the client may not answer an OPEN")
            if st is None:
                return  # reset locally while the OPEN was in flight
            if isinstance(message, control.OpenFail):
                self._drop_stream(st.id)
                self._owner.stream_open_result(st.id, message.code or RESET_GENERAL, "", 0)
                return
            st.is_open = True
            self._owner.stream_open_result(st.id, 0, message.host, message.port)
            if st.id in self._streams:
                self._deliver_held(st)
            return
        if st is None:
            if message.stream_id == CONTROL_STREAM or not self._is_closed_id(message.stream_id):
                raise ProtocolError(f"control message for unknown stream {message.stream_id}")
            return
        if isinstance(message, control.Fin):
            recv = st.recv
            if recv.final is not None or message.final_offset < recv.next_offset:
                raise ProtocolError(f"stream {st.id}: inconsistent FIN")
            highest = max((o + len(d) for o, d in recv.buffer.items()), default=0)
            if highest > message.final_offset:
                raise ProtocolError(f"stream {st.id}: FIN below received data")
            recv.final = message.final_offset
            self._maybe_eof(st)
        else:
            self._drop_stream(st.id)
            self._owner.stream_reset(st.id, message.code)

    def _on_ack(self, ack: wire.Ack) -> None:
        st = self._streams.get(ack.stream_id)
        if st is None:
            return  # stream already finished or reset
        send = st.send
        if ack.cumulative > send.next_offset or (
            ack.ranges and ack.ranges[-1][1] > send.next_offset
        ):
            raise ProtocolError(f"stream {st.id}: ACK for data never sent")
        unacked = send.unacked
        now = self._clock.seconds()
        if ack.cumulative > send.acked:
            send.acked = ack.cumulative
            while unacked:
                offset = next(iter(unacked))
                chunk = unacked[offset]
                if offset + len(chunk.data) > ack.cumulative:
                    break
                del unacked[offset]
                self._acked(chunk, now)
        for start, end in ack.ranges:
            covered = []
            for offset, chunk in unacked.items():  # in offset order: stop past the range
                if offset >= end:
                    break
                if offset >= start and offset + len(chunk.data) <= end:
                    covered.append(offset)
            for offset in covered:
                self._acked(unacked.pop(offset), now)
        # SACKs are firm (SPEC.md section 4): everything below the first chunk
        # still unacknowledged has arrived, even if no cumulative ACK says so.
        send.acked = max(send.acked, next(iter(unacked), send.next_offset))
        if ack.ranges and unacked:
            # Only a hole that holds back a real share of the window is worth a
            # second copy; a chunk merely a few ms late on a busy subflow is not.
            beyond = sum(end - start for start, end in ack.ranges)
            if 4 * beyond >= send.limit - send.acked:
                self._maybe_reinject(st, unacked[next(iter(unacked))], now)
        if ack.limit > send.limit:
            send.limit = ack.limit
            if send.queue:
                self._mark_ready(st)
        if self._send_blocked:
            self._unblock_sends()
        if st.id != CONTROL_STREAM:
            self._check_done(st)

    def _unblock_sends(self) -> None:
        """Below the budget again: every stream with data waiting may send."""
        if self._send_blocked and self._unacked_bytes < self.memory_budget:
            self._send_blocked = False
            for st in self._streams.values():
                if st.send.queue:
                    self._mark_ready(st)

    def _acked(self, chunk: _Chunk, now: float) -> None:
        chunk.done = True
        self._unacked_bytes -= len(chunk.data)
        sf = self._subflows.get(chunk.sid) if chunk.sid is not None else None
        if sf is None:
            return
        sf.inflight -= len(chunk.data)
        sf.suspect = False
        if chunk.retries == 0 and not chunk.reinjected:
            self._rtt_sample(sf, now - chunk.sent_at)
        sf._rate_bytes += len(chunk.data)
        elapsed = now - sf._rate_start
        if elapsed >= GOODPUT_SAMPLE:
            rate = sf._rate_bytes / elapsed
            sf.goodput = rate if sf.goodput == 0 else 0.75 * sf.goodput + 0.25 * rate
            sf._rate_start = now
            sf._rate_bytes = 0

    def _release(self, chunk: _Chunk) -> None:
        """Take an unacknowledged chunk off its subflow (to send it elsewhere, or drop it)."""
        sf = self._subflows.get(chunk.sid) if chunk.sid is not None else None
        if sf is not None:
            sf.inflight -= len(chunk.data)
        chunk.avoid = chunk.sid
        chunk.sid = None

    # ----- loss recovery (SPEC.md section 6)

    @staticmethod
    def _rtt_sample(sf: _Subflow, rtt: float) -> None:
        """RFC 6298 smoothing; samples come from ACKed chunks and PONGs."""
        if rtt < 0:
            return
        if sf.srtt is None:
            sf.srtt = rtt
            sf.rttvar = rtt / 2
        else:
            sf.rttvar = 0.75 * sf.rttvar + 0.25 * abs(sf.srtt - rtt)
            sf.srtt = 0.875 * sf.srtt + 0.125 * rtt

    def _rto(self, sf: _Subflow) -> float:
        cfg = self.config
        if sf.srtt is None:
            return cfg.initial_rto
        # 2 x srtt: a chunk behind a segment that TCP itself recovers arrives
        # about one round trip late; that is no stall (SPEC.md section 6).
        rto = 2 * sf.srtt + 4 * sf.rttvar + cfg.ack_delay
        return min(cfg.max_rto, max(cfg.min_rto, rto))

    @staticmethod
    def _oldest(sf: _Subflow) -> _Chunk | None:
        """The oldest chunk still in flight on ``sf`` (stale entries dropped)."""
        sent = sf.sent
        while sent:
            sent_at, chunk = sent[0]
            if chunk.sid == sf.sid and chunk.sent_at == sent_at and not chunk.done:
                return chunk
            sent.popleft()
        return None

    def _rto_expiry(self, sf: _Subflow) -> float | None:
        chunk = self._oldest(sf)
        if chunk is None:
            return None
        return chunk.sent_at + min(self.config.max_rto, self._rto(sf) * 2**chunk.retries)

    def _expire(self, sf: _Subflow, now: float) -> None:
        """Chunks unacknowledged past the RTO go again on another subflow.

        TCP does not lose data, so a timeout means the subflow is stalled (a
        black hole, a dead path not yet detected) or far slower than its RTT
        said; the subflow is marked suspect so the scheduler prefers others
        until it shows a sign of life, and a PING probes it.
        """
        expired = False
        # Another copy only helps on another subflow: on this one TCP already
        # delivers it, or the subflow dies and subflow_lost() moves it.
        elsewhere = any(s is not sf and not s.suspect for s in self._subflow_list)
        kept: list[tuple[float, _Chunk]] = []
        while True:
            expiry = self._rto_expiry(sf)
            if expiry is None or now < expiry:
                break
            chunk = self._oldest(sf)
            assert chunk is not None
            sf.sent.popleft()
            chunk.retries += 1  # backs the next timeout off, and no RTT sample
            self.stats_timeouts += 1
            expired = True
            if not elsewhere:
                chunk.sent_at = now  # watched afresh from now, with the longer timeout
                kept.append((now, chunk))
                continue
            self._release(chunk)
            chunk.stream.send.retx.append(chunk.offset)
            self._mark_ready(chunk.stream)
        sf.sent.extend(kept)
        if expired and not sf.suspect:
            sf.suspect = True
            self._emit(sf, [wire.encode_ping(int(now * 1e6), self.config.crc)], dummy=True)
            # ACKs we sent there may be stuck too: repeat them elsewhere.
            self._reack_all = True

    def _maybe_reinject(self, st: _Stream, head: _Chunk, now: float) -> None:
        """The receiver holds a quarter of the window beyond a hole: if a slow
        subflow holds the hole, send that chunk again on a faster one (at most
        once per chunk).

        "Slow" means the chunk is older than twice the fastest other subflow's
        RTT; if it is not yet, the check is repeated when it would be.
        """
        if head.reinjected or head.sid is None or len(self._subflow_list) < 2:
            return
        others = [
            sf.srtt for sf in self._subflow_list if sf.sid != head.sid and sf.srtt is not None
        ]
        if not others:
            return
        due = head.sent_at + 2 * min(others) + self.config.ack_delay
        if now < due:
            self._reinject_checks[st] = due
            return
        self._reinject_checks.pop(st, None)
        head.reinjected = True
        self.stats_reinjected += len(head.data)
        self._release(head)
        st.send.retx.appendleft(head.offset)
        self._mark_ready(st)

    # ----- acknowledgements

    def _window(self, st: _Stream) -> int:
        if st.id == CONTROL_STREAM:
            return CONTROL_WINDOW
        cfg = self.config
        share = self.memory_budget // max(self._data_streams, 1)
        return max(cfg.min_stream_window, min(cfg.stream_window, share))

    def _maybe_window_update(self, st: _Stream) -> None:
        recv = st.recv
        delivered = recv.next_offset - recv.held_bytes
        window = self._window(st)
        # A sender blocked on credit sees a growth of a whole window; windows
        # smaller than ack_threshold (many streams) must still be announced.
        if delivered + window - recv.advertised >= min(self.config.ack_threshold, window):
            recv.ack_due = max(recv.ack_due, self.config.ack_threshold)
            self._want_ack(st)

    def _want_ack(self, st: _Stream) -> None:
        if not st.ack_pending:
            st.ack_pending = True
            self._acks.append(st)

    def _flush_acks(self, force: bool) -> None:
        if not self._acks:
            self._ack_deadline = None
            return
        sf = self._ack_subflow()
        if sf is None:
            # Nowhere to send: keep the ACKs queued for the next subflow, but no
            # deadline, or the timer would fire at once, forever (grace period).
            self._ack_deadline = None
            return
        threshold = self.config.ack_threshold
        keep: list[_Stream] = []
        for st in self._acks:
            recv = st.recv
            if not force and recv.ack_due < threshold and not self._ack_urgent(st):
                keep.append(st)
                continue
            st.ack_pending = False
            if (
                st.id != CONTROL_STREAM
                and self._streams.get(st.id) is not st
                and not recv.eof_delivered
            ):
                # Reset: the peer drops the stream too.  A stream that finished
                # because its last bytes just arrived still owes the peer the
                # ACK for them, or the peer's side never finishes.
                continue
            if not recv.sink_paused:
                # Bytes held for a stream that is not open yet still occupy the window.
                delivered = recv.next_offset - recv.held_bytes
                recv.advertised = max(recv.advertised, delivered + self._window(st))
            recv.ack_due = 0
            ack = wire.Ack(st.id, recv.next_offset, recv.advertised, self._sack_ranges(recv))
            self._emit(sf, [wire.encode_ack(ack, self.config.crc)], dummy=True)
        self._acks = keep
        if keep:
            if self._ack_deadline is None:
                self._ack_deadline = self._clock.seconds() + self.config.ack_delay
        else:
            self._ack_deadline = None

    @staticmethod
    def _ack_urgent(st: _Stream) -> bool:
        """The stream's direction just completed: tell the sender at once."""
        return st.recv.final is not None and st.recv.next_offset == st.recv.final

    def _ack_subflow(self) -> _Subflow | None:
        """The healthy, writable subflow with the least of our data in flight;
        ties take turns.

        Taking turns matters: a side that only receives never times anything
        out, so it would never learn that a black-holed subflow swallows its
        ACKs; with ACKs spread out, the next cumulative ACK gets through.
        """
        subflows = self._subflow_list
        n = len(subflows)
        best: _Subflow | None = None
        best_rank = (False, False, 0)
        best_index = 0
        for i in range(n):
            index = (self._ack_turn + i) % n
            sf = subflows[index]
            rank = (not sf.suspect, sf.writable, -sf.inflight)
            if best is None or rank > best_rank:
                best, best_rank, best_index = sf, rank, index
        self._ack_turn = best_index + 1
        return best

    @staticmethod
    def _sack_ranges(recv: _Recv) -> tuple[tuple[int, int], ...]:
        if not recv.buffer:
            return ()
        ranges: list[tuple[int, int]] = []
        for offset in sorted(recv.buffer):
            end = offset + len(recv.buffer[offset])
            if ranges and ranges[-1][1] == offset:
                ranges[-1] = (ranges[-1][0], end)
            elif len(ranges) < wire.MAX_SACK_RANGES:
                ranges.append((offset, end))
            else:
                break
        return tuple(ranges)

    def _ack_closed(self, stream_id: int, end: int) -> None:
        sf = self._ack_subflow()
        if sf is not None:
            ack = wire.Ack(stream_id, end, end)
            self._emit(sf, [wire.encode_ack(ack, self.config.crc)], dummy=True)
