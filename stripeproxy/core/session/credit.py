"""Flow control: the credit we grant per stream and the session's memory budget.

Credit per stream (the highest offset the peer may send) bounds each reorder
buffer; the budget, shared by the streams, bounds them together and also
what we keep unacknowledged in flight, whatever credit the peer grants us
(SPEC.md sections 4 and 8).
"""

from __future__ import annotations

from stripeproxy.core.control import CONTROL_STREAM
from stripeproxy.core.session.config import CONTROL_WINDOW, SessionConfig
from stripeproxy.core.session.stream import Stream


class Credit:
    """Windows, the memory budget, and the bytes held against it."""

    def __init__(self, config: SessionConfig) -> None:
        self.config = config
        #: Bytes this session may hold for its peer: the credit it hands out
        #: (reorder buffers) and, separately, what it keeps unacknowledged in
        #: flight whatever credit the peer grants.  A server sharing one
        #: memory limit among its sessions lowers it.
        self.memory_budget = config.session_window
        self.data_streams = 0
        self.unacked_bytes = 0
        self.send_blocked = False  # a chunk waited for unacknowledged bytes to drop

    def window(self, st: Stream) -> int:
        """The credit a stream gets beyond what it has delivered."""
        if st.id == CONTROL_STREAM:
            return CONTROL_WINDOW
        cfg = self.config
        share = self.memory_budget // max(self.data_streams, 1)
        return max(cfg.min_stream_window, min(st.recv.window or cfg.stream_window, share))

    def reordered(self, st: Stream) -> bool:
        """Out-of-order bytes fill half of the stream's window: double it (True).

        Bytes beyond a hole wait for a slower subflow (a far path, or one
        repairing a loss), not for the local peer; with a window that only
        covers the fast subflows' share of the wait, they stop until the hole
        closes.  The window grows to the session window at most, and the
        share of the memory budget still bounds it (SPEC.md section 4).
        """
        recv = st.recv
        current = recv.window or self.config.stream_window
        cap = self.config.session_window
        if current >= cap or recv.buffered * 2 < current:
            return False
        if self.window(st) < current:
            return False  # the budget's share binds, not the window
        recv.window = min(2 * current, cap)
        return True

    def update_due(self, st: Stream) -> bool:
        """The stream's window grew enough to announce: mark its ACK as due.

        A sender blocked on credit sees a growth of a whole window; windows
        smaller than ack_threshold (many streams) must still be announced.
        """
        recv = st.recv
        delivered = recv.next_offset - recv.held_bytes
        window = self.window(st)
        threshold = self.config.ack_threshold
        if delivered + window - recv.advertised >= min(threshold, window):
            recv.ack_due = max(recv.ack_due, threshold)
            return True
        return False

    def grant(self, st: Stream) -> None:
        """Extend the stream's advertised limit, unless its local peer is full.

        Bytes held for a stream that is not open yet still occupy the window.
        """
        recv = st.recv
        if not recv.sink_paused:
            delivered = recv.next_offset - recv.held_bytes
            recv.advertised = max(recv.advertised, delivered + self.window(st))

    def may_send(self) -> bool:
        """Below the budget, a new chunk may go out; otherwise remember we waited."""
        if self.unacked_bytes >= self.memory_budget:
            self.send_blocked = True
            return False
        return True

    def unblocked(self) -> bool:
        """True once, when sending waited for the budget and may go on now."""
        if self.send_blocked and self.unacked_bytes < self.memory_budget:
            self.send_blocked = False
            return True
        return False
