"""What goes out next: streams with data take turns, the scheduler picks the subflow.

Stream 0 (control messages) always goes first.  A retransmission goes before
new data of its stream, and, if it can, to another subflow than the one it
got stuck on.  New data needs the peer's credit and room in our memory
budget (:class:`~stripeproxy.core.session.credit.Credit`).
"""

from __future__ import annotations

from collections import deque

from stripeproxy.core.control import CONTROL_STREAM
from stripeproxy.core.scheduler import Scheduler
from stripeproxy.core.session.config import SessionConfig
from stripeproxy.core.session.credit import Credit
from stripeproxy.core.session.recovery import SubflowState
from stripeproxy.core.session.stream import Chunk, Stream


class Sender:
    """The streams that may have something to send, in turn order."""

    def __init__(self, config: SessionConfig, scheduler: Scheduler, credit: Credit) -> None:
        self.config = config
        self.scheduler = scheduler
        self.credit = credit
        self.ready: deque[Stream] = deque()

    def mark_ready(self, st: Stream) -> None:
        if not st.ready:
            st.ready = True
            if st.id == CONTROL_STREAM:
                self.ready.appendleft(st)
            else:
                self.ready.append(st)

    def next(self, subflows: list[SubflowState]) -> tuple[SubflowState, Chunk, bool] | None:
        """The next chunk, the subflow to carry it and whether it is a second
        copy; None if no subflow can take one or no stream has one."""
        ready = self.ready
        pick = self.scheduler.pick
        while ready:
            st = ready[0]
            if not self._has_chunk(st):
                ready.popleft()
                st.ready = False
                continue
            # Asked only when a chunk waits: the scheduler's pass over the
            # subflows is the costliest step here, and most flushes end on a
            # stream that has nothing left.
            sf = pick(subflows)
            if sf is None:
                return None
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
            return sf, chunk, is_retx
        return None

    def _has_chunk(self, st: Stream) -> bool:
        """Whether :meth:`_next_chunk` may find one (a queued retransmission may
        turn out stale: then it finds none, at the cost of one pick)."""
        return bool(st.send.retx) or self._may_send_new(st)

    def _may_send_new(self, st: Stream) -> bool:
        """New data waits, the peer's credit allows it and so does our budget."""
        send = st.send
        if not send.queue or send.next_offset >= send.limit or st.opening:
            return False
        # The peer's credit does not decide what we hold: our budget does.
        return st.id == CONTROL_STREAM or self.credit.may_send()

    def _next_chunk(self, st: Stream) -> tuple[Chunk | None, bool]:
        """The chunk :meth:`_has_chunk` promised: a retransmission first, else
        new data (checked here only when the retransmissions were stale)."""
        send = st.send
        if send.retx:
            chunk = send.next_retransmission()
            if chunk is not None:
                return chunk, True
            if not self._may_send_new(st):
                return None, False
        chunk = send.take(st, min(self.config.chunk_size, send.limit - send.next_offset))
        self.credit.unacked_bytes += len(chunk.data)
        return chunk, False
