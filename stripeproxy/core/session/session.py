"""The overlay session, sans-I/O (SPEC.md sections 4-7): the parts put together.

A :class:`Session` owns every stream of one client<->server session.  It is
driven by inputs (a frame arrived on subflow 3, subflow 2 went away, stream 7
has bytes from its local peer, the timer fired), each of which takes the
current time as ``now``; it never reads a clock, touches a socket or calls
out.  What it has to say waits until the driver asks, through one door:

* :meth:`Session.events` -- what happened to local streams and subflows;
* :meth:`Session.next_transmit` -- the next frames to write, one subflow at a
  time, so that a subflow that pauses during a write gets no further chunk
  (the scheduler sees the pause before it picks again);
* :meth:`Session.next_deadline` -- when :meth:`Session.on_timer` is due.

The concerns live in their own modules: :mod:`.stream` (lifecycle, send
queue, reassembly), :mod:`.recovery` (RTT, timeouts, re-injection),
:mod:`.credit` (windows, memory budget), :mod:`.acks` (ACK batching) and
:mod:`.sender` (which chunk goes next); :mod:`.base` holds them and the
bookkeeping, this module the inputs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from stripeproxy.core import control, wire
from stripeproxy.core.control import CONTROL_STREAM
from stripeproxy.core.session.base import SessionBase
from stripeproxy.core.session.config import (
    CONTROL_WINDOW,
    RESET_GENERAL,
    SessionError,
)
from stripeproxy.core.session.events import (
    CloseSubflow,
    GoingAway,
    OpenRefused,
    OpenRequested,
    OpenResult,
    SessionClosed,
    StreamData,
    StreamEof,
    StreamPaused,
    StreamReset,
)
from stripeproxy.core.session.recovery import SubflowState
from stripeproxy.core.session.stream import (
    LOCAL_FIN_SENT,
    TERMINAL,
    Stream,
    StreamInput,
    StreamState,
)
from stripeproxy.core.wire import ProtocolError


class Session(SessionBase):
    """State of one overlay session; see the module docstring."""

    # ---------------------------------------------------------------- subflows

    def add_subflow(self, sid: int, now: float) -> None:
        """A subflow finished its handshake and joined this session."""
        if self.closed or sid in self._recovery.subflows:
            return
        self._recovery.add(sid, now)
        self._grace_deadline = None

    def subflow_lost(self, sid: int, now: float) -> None:
        """A subflow is gone: everything it carried unacknowledged goes again."""
        requeue = self._recovery.remove(sid, list(self._streams.values()))
        if requeue is None:
            return
        if self._outbox:
            self._outbox = deque(t for t in self._outbox if t[0] != sid)
        self._requeue(requeue)
        # ACKs sent on the lost subflow may be gone too; repeat them all.
        self._reack_all = True
        if not self._recovery.subflows and not self.closed:
            if self.peer_going_away:
                self.close("the peer went away", now)  # it said so: no grace to wait for
                return
            self._grace_deadline = now + self.config.grace_period

    def subflow_writable(self, sid: int, writable: bool, now: float) -> None:
        """The subflow's transport asked us to pause or resume producing."""
        sf = self._recovery.subflows.get(sid)
        if sf is not None:
            sf.writable = writable

    def frames_received(self, sid: int, frames: Sequence[wire.Frame], now: float) -> None:
        """Handle a batch of frames read from subflow ``sid``."""
        sf = self._recovery.subflows.get(sid)
        if sf is None:
            return
        sf.last_rx = now
        try:
            for frame in frames:
                self._on_frame(sf, frame, now)
        except SessionError as e:
            self.close(f"protocol error: {e}", now)
        except ProtocolError as e:
            self._events.append(CloseSubflow(sid, str(e)))
            self.subflow_lost(sid, now)

    # ----------------------------------------------------------------- streams

    def open_stream(self, host: str, port: int, now: float) -> int:
        """Client: start a new stream to host:port; returns its id."""
        if not self.is_client:
            raise RuntimeError("only the client opens streams")
        stream_id = self._next_stream_id
        self._next_stream_id += 1
        self._add_stream(stream_id, now)
        self._send_control(control.Open(stream_id, host, port))
        return stream_id

    def open_succeeded(self, stream_id: int, host: str, port: int, now: float) -> None:
        """Server: the target for ``stream_id`` is connected (host:port bound)."""
        st = self._streams.get(stream_id)
        if st is None:
            return
        st.advance(StreamInput.OPENED)
        self._send_control(control.OpenOk(stream_id, host, port))
        self._deliver_held(st, now)

    def open_failed(self, stream_id: int, code: int, now: float) -> None:
        """Server: the target for ``stream_id`` could not be reached."""
        if self._drop_stream(stream_id):
            self._send_control(control.OpenFail(stream_id, code))

    def local_data(self, stream_id: int, data: bytes, now: float) -> None:
        """Bytes read from the local peer of ``stream_id``, to be striped."""
        st = self._streams.get(stream_id)
        if st is None or not data:
            return
        if st.state in LOCAL_FIN_SENT:
            raise RuntimeError("data after local EOF")
        st.active = now
        send = st.send
        send.enqueue(data, self.config.chunk_size)
        self._sender.mark_ready(st)
        if send.queued >= self.config.send_buffer and not send.source_paused:
            send.source_paused = True
            self._events.append(StreamPaused(stream_id))

    def local_eof(self, stream_id: int, now: float) -> None:
        """The local peer half-closed: send FIN with the final offset."""
        st = self._streams.get(stream_id)
        if st is None or st.state in LOCAL_FIN_SENT:
            return
        st.advance(StreamInput.LOCAL_FIN)
        st.send.fin_offset = st.send.read_total
        self._send_control(control.Fin(stream_id, st.send.read_total))
        self._check_done(st)

    def local_reset(self, stream_id: int, code: int, now: float) -> None:
        """The local peer aborted (or closed both ways early): abort the stream."""
        if self._drop_stream(stream_id):
            self._send_control(control.Rst(stream_id, code))

    def local_sink_paused(self, stream_id: int, paused: bool, now: float) -> None:
        """The local peer's transport is full (True) or drained (False)."""
        st = self._streams.get(stream_id)
        if st is None:
            return
        st.recv.sink_paused = paused
        if not paused:
            self._maybe_window_update(st)

    def set_memory_budget(self, budget: int, now: float) -> None:
        """Change the memory budget; credit already announced stays valid
        (SPEC.md section 4), so a lower budget takes effect as data drains."""
        grew = budget > self._credit.memory_budget
        self._credit.memory_budget = budget
        if grew and not self.closed:
            for st in self._streams.values():
                self._maybe_window_update(st)
            self._unblock_sends()

    # ------------------------------------------------------------------- timer

    def on_timer(self, now: float) -> None:
        """Run everything whose deadline has passed."""
        if self._grace_deadline is not None and now >= self._grace_deadline:
            self.close("no subflow for the grace period", now)
            return
        cfg = self.config
        for sf in list(self._recovery.subflow_list):
            # Same sums as next_deadline(): "now - last >= interval" can be false
            # at that deadline (float rounding), and the timer would spin.
            if now >= sf.last_rx + cfg.dead_interval:
                self._events.append(CloseSubflow(sf.sid, f"silent for {cfg.dead_interval:g} s"))
                self.subflow_lost(sf.sid, now)
                if self.closed:
                    return
                continue
            requeue, probe = self._recovery.expire(sf, now)
            self._requeue(requeue)
            if probe:
                self._emit(sf, [wire.encode_ping(int(now * 1e6), cfg.crc)], now)
                # ACKs we sent there may be stuck too: repeat them elsewhere.
                self._reack_all = True
            if now >= sf.last_tx + cfg.heartbeat_interval:
                self._emit(sf, [wire.encode_ping(int(now * 1e6), cfg.crc)], now)
        for st in self._recovery.due_checks(now):
            send = st.send
            if send.unacked and send.acked < send.next_offset and st.state not in TERMINAL:
                self._maybe_reinject(st, send.unacked[next(iter(send.unacked))], now)
        regrant = self._recovery.due_grants(now)
        for st in regrant:
            self._acks.want(st)
        if regrant or (self._acks.deadline is not None and now >= self._acks.deadline):
            self._flush_acks(True, now)
        if self._idle_deadline is not None and now >= self._idle_deadline:
            self._reset_idle(now)

    def go_away(self, reason: str, now: float) -> None:
        """Begin a graceful shutdown: tell the peer (GOAWAY on every subflow)
        and refuse new streams; open streams continue until they finish."""
        if self.going_away or self.closed:
            return
        self.going_away = True
        frame = wire.encode_goaway(wire.GOAWAY_SHUTDOWN, reason, self.config.crc)
        for sf in self._recovery.subflow_list:
            self._emit(sf, [frame], now)

    def close(self, reason: str, now: float) -> None:
        """End the session: reset every stream, drop every subflow, say so."""
        if self.closed:
            return
        self.closed = True
        self._grace_deadline = None
        self._acks.deadline = None
        self._idle_deadline = None
        self._outbox.clear()
        for stream_id in self.stream_ids:
            self._drop_stream(stream_id)
            self._events.append(StreamReset(stream_id, RESET_GENERAL))
        for sid in self._recovery.subflows:
            self._events.append(CloseSubflow(sid, reason))
        self._recovery.clear()
        self._events.append(SessionClosed(reason))

    # --------------------------------------------------------------- receiving

    def _on_frame(self, sf: SubflowState, frame: wire.Frame, now: float) -> None:
        size = frame.size or wire.frame_size(frame, self.config.crc)
        if isinstance(frame, wire.Data):
            if frame.stream_id == CONTROL_STREAM:
                sf.rx_dummy += size
            else:
                sf.rx_real += len(frame.payload)
                sf.rx_dummy += size - len(frame.payload)
            self._on_data(sf, frame, now)
            return
        sf.rx_dummy += size
        if isinstance(frame, wire.Ack):
            self._on_ack(frame, now)
        elif isinstance(frame, wire.Ping):
            self._emit(sf, [wire.encode_pong(frame.token, self.config.crc)], now)
        elif isinstance(frame, wire.Pong):
            self._recovery.set_suspect(sf, False)
            rtt = now - frame.token / 1e6
            if rtt < 3600:
                sf.rtt_sample(rtt)
        elif isinstance(frame, wire.GoAway):
            if not self.peer_going_away:
                self.peer_going_away = True
                self._events.append(GoingAway(frame.reason))
        else:
            raise ProtocolError(f"unexpected {type(frame).__name__} frame in an open session")

    def _on_data(self, sf: SubflowState, frame: wire.Data, now: float) -> None:
        st = self._streams.get(frame.stream_id)
        if st is None:
            if self._is_closed_id(frame.stream_id):
                # Late copy for a finished stream: acknowledge so it is not sent again.
                end = frame.offset + len(frame.payload)
                carrier = self._acks.subflow(self._recovery.subflow_list)
                if carrier is not None:
                    ack = wire.Ack(frame.stream_id, end, end)
                    self._emit(carrier, [wire.encode_ack(ack, self.config.crc)], now)
                return
            raise ProtocolError(f"DATA for stream {frame.stream_id}, which was never opened")
        pieces = st.recv.receive(st.id, frame.offset, frame.payload, sf.sid, now, self._residence)
        self._acks.want(st)
        end = frame.offset + len(frame.payload)
        recovery = self._recovery
        if recovery.credit_checks:
            recovery.credit_used(st, end)
        if end >= st.recv.advertised and st.id != CONTROL_STREAM:
            recovery.peer_at_limit(st)
        if pieces:
            self._deliver(st, pieces, now)
        elif st.id != CONTROL_STREAM and self._credit.reordered(st):
            self._maybe_window_update(st)

    def _deliver(self, st: Stream, pieces: list[bytes], now: float) -> None:
        if st.id == CONTROL_STREAM:
            # Control bytes are consumed once accepted: a bad message leaves the
            # decoder and the stream table in doubt, so the whole session ends.
            try:
                for piece in pieces:
                    for message in self._control_decoder.feed(piece):
                        self._on_control(message, now)
            except SessionError:
                raise
            except ProtocolError as e:
                raise SessionError(str(e)) from None
            st.recv.advertised = st.recv.next_offset + CONTROL_WINDOW
            return
        if st.opening:
            st.recv.held.extend(pieces)
            st.recv.held_bytes += sum(len(p) for p in pieces)
            return
        st.active = now
        events = self._events
        for piece in pieces:
            events.append(StreamData(st.id, piece))
        self._maybe_eof(st)

    def _deliver_held(self, st: Stream, now: float) -> None:
        held = st.recv.held
        st.recv.held = []
        st.recv.held_bytes = 0
        self._sender.mark_ready(st)
        if held:
            self._deliver(st, held, now)
            # The held bytes filled the window the peer was given; now that they
            # are delivered, say so, or a peer that sent a whole window waits forever.
            self._maybe_window_update(st)
        else:
            self._maybe_eof(st)

    def _maybe_eof(self, st: Stream) -> None:
        if st.state in (StreamState.OPEN, StreamState.SEND_CLOSED) and st.recv.complete:
            st.advance(StreamInput.REMOTE_EOF)
            self._events.append(StreamEof(st.id))
            self._check_done(st)

    def _on_control(self, message: control.Message, now: float) -> None:
        if isinstance(message, control.Open):
            if self.is_client:
                raise ProtocolError("the server may not open streams")
            if message.stream_id <= self._max_stream_id:
                raise ProtocolError(f"OPEN for stream {message.stream_id} reuses an id")
            self._max_stream_id = message.stream_id
            streams = self._credit.data_streams
            if streams >= self.config.max_streams or self.going_away:
                self._send_control(control.OpenFail(message.stream_id, RESET_GENERAL))
                if not self.going_away:
                    self._events.append(OpenRefused(message.stream_id, streams))
                return
            self._add_stream(message.stream_id, now)
            self._events.append(OpenRequested(message.stream_id, message.host, message.port))
            return
        st = self._streams.get(message.stream_id)
        if isinstance(message, control.OpenOk | control.OpenFail):
            if not self.is_client:
                raise ProtocolError("the client may not answer an OPEN")
            if st is None:
                return  # reset locally while the OPEN was in flight
            if isinstance(message, control.OpenFail):
                self._drop_stream(st.id)
                self._events.append(OpenResult(st.id, message.code or RESET_GENERAL, "", 0))
                return
            st.advance(StreamInput.OPENED)
            self._events.append(OpenResult(st.id, 0, message.host, message.port))
            self._deliver_held(st, now)
            return
        if st is None:
            if message.stream_id == CONTROL_STREAM or not self._is_closed_id(message.stream_id):
                raise ProtocolError(f"control message for unknown stream {message.stream_id}")
            return
        if isinstance(message, control.Fin):
            st.recv.set_final(st.id, message.final_offset)
            self._maybe_eof(st)
        else:
            self._drop_stream(st.id)
            self._events.append(StreamReset(st.id, message.code))

    def _on_ack(self, ack: wire.Ack, now: float) -> None:
        st = self._streams.get(ack.stream_id)
        if st is None:
            return  # stream already finished or reset
        send = st.send
        for chunk in send.apply_ack(ack):
            self._acked(chunk, now)
        unacked = send.unacked
        if ack.ranges and unacked:
            # Only a hole that holds back a real share of the window is worth a
            # second copy; a chunk merely a few ms late on a busy subflow is not.
            beyond = sum(end - start for start, end in ack.ranges)
            if 4 * beyond >= send.limit - send.acked:
                self._maybe_reinject(st, unacked[next(iter(unacked))], now)
        if ack.limit > send.limit:
            send.limit = ack.limit
            if send.queue:
                self._sender.mark_ready(st)
        if self._credit.send_blocked:
            self._unblock_sends()
        if st.id != CONTROL_STREAM:
            self._check_done(st)
