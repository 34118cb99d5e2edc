"""Binds a sans-I/O :class:`~stripeproxy.core.session.Session` to Twisted.

The driver is the session's :class:`~stripeproxy.core.session.SessionOwner`: it
maps subflow ids to subflow protocols and stream ids to the local TCP peers
(SOCKS clients on the client, targets on the server), and it keeps exactly one
delayed call for the session's next deadline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from stripeproxy.core import wire
from stripeproxy.core.session import RESET_IDLE, Session, SessionConfig

if TYPE_CHECKING:
    from stripeproxy.net.local import LocalStream
    from stripeproxy.net.subflow import SubflowProtocol


class SessionDriver:
    """Twisted side of one session; subclasses add the role-specific callbacks."""

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
        self.session = Session(self, clock, config, is_client=self.is_client)
        self.subflows: dict[int, SubflowProtocol] = {}
        self.streams: dict[int, LocalStream] = {}
        self._on_closed = on_closed
        self._timer: IDelayedCall | None = None
        self._next_sid = 0
        self.rearm()

    # ----------------------------------------------------- called by adapters

    def attach(self, subflow: SubflowProtocol) -> None:
        """A subflow finished its handshake: give it its id within the session
        (before the first write, so that a pause names this subflow) and use it."""
        self._next_sid += 1
        sid = self._next_sid
        self.subflows[sid] = subflow
        subflow.sid = sid
        self.session.add_subflow(sid)
        self.rearm()

    def detach(self, sid: int) -> None:
        if self.subflows.pop(sid, None) is not None:
            self.session.subflow_lost(sid)
            self.rearm()

    def frames(self, sid: int, frames: Sequence[wire.Frame]) -> None:
        self.session.frames_received(sid, frames)
        self.rearm()

    def writable(self, sid: int, writable: bool) -> None:
        self.session.subflow_writable(sid, writable)
        self.rearm()

    @property
    def closed(self) -> bool:
        """The session is over."""
        return self.session.closed

    def close(self, reason: str) -> None:
        """End the session: reset every stream, drop every subflow."""
        self.session.close(reason)

    @property
    def subflow_count(self) -> int:
        """Live subflows of this session."""
        return len(self.subflows)

    @property
    def stream_count(self) -> int:
        """Open streams of this session."""
        return len(self.session.stream_ids)

    def set_memory_budget(self, budget: int) -> None:
        """Bytes this session may hold for its peer (the server shares one limit)."""
        if self.session.memory_budget != budget:
            self.session.set_memory_budget(budget)
            self.rearm()  # the budget may have let chunks go out

    def register_stream(self, stream_id: int, stream: LocalStream) -> None:
        self.streams[stream_id] = stream

    def rearm(self) -> None:
        """Keep one delayed call, no later than the session's next deadline."""
        deadline = self.session.next_deadline()
        timer = self._timer
        if deadline is None:
            if timer is not None:
                timer.cancel()
                self._timer = None
            return
        if timer is not None:
            if timer.getTime() <= deadline:
                return  # fires early at worst; on_timer then re-arms
            timer.cancel()
        delay = max(0.0, deadline - self.clock.seconds())
        self._timer = self.clock.callLater(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self.session.on_timer()
        if not self.session.closed:
            self.rearm()

    # ---------------------------------------------------------- SessionOwner

    def send(self, sid: int, pieces: Sequence[bytes]) -> None:
        subflow = self.subflows.get(sid)
        if subflow is not None and subflow.transport is not None:
            subflow.transport.writeSequence(pieces)

    def close_subflow(self, sid: int, reason: str) -> None:
        subflow = self.subflows.pop(sid, None)
        if subflow is not None:
            self.log.info(
                "session {session}: dropping subflow {sid}: {reason}",
                session=self.label,
                sid=sid,
                reason=reason,
            )
            subflow.abort()

    def stream_open_requested(self, stream_id: int, host: str, port: int) -> None:
        raise NotImplementedError("server sessions override this")

    def stream_open_result(self, stream_id: int, code: int, host: str, port: int) -> None:
        raise NotImplementedError("client sessions override this")

    def stream_data(self, stream_id: int, data: bytes) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.write_local(data)

    def stream_eof(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.half_close_local()

    def stream_reset(self, stream_id: int, code: int) -> None:
        if code == RESET_IDLE:
            self.log.info(
                "session {session}: stream {stream} idle too long: reset",
                session=self.label,
                stream=stream_id,
            )
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            stream.abort_local()

    def stream_closed(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            stream.close_local()

    def stream_pause(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.pause_reading()

    def stream_resume(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.resume_reading()

    def session_going_away(self, reason: str) -> None:
        self.log.info(
            "session {session}: peer is going away: {reason}", session=self.label, reason=reason
        )

    def session_closed(self, reason: str) -> None:
        self.log.info("session {session} closed: {reason}", session=self.label, reason=reason)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for subflow in list(self.subflows.values()):
            subflow.abort()
        self.subflows.clear()
        if self._on_closed is not None:
            self._on_closed(self)
