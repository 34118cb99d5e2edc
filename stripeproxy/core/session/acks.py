"""ACK batching: which streams owe the peer an ACK, when, and on which subflow.

ACKs are sent once a stream has received ``ack_threshold`` bytes since its
last one, or half the credit its sender had then (whichever is less), when
its direction completes, or ``ack_delay`` after the first byte that is still
unacknowledged (SPEC.md section 4).

Every ACK costs both ends a wake-up, a TLS record and a pass through the
session; on loopback an ACK every 128 KiB (the old rule) cost the sending
side 6-16 % more CPU per byte than one every 512 KiB.  The credit rule keeps the
first ACK of a stream (initial credit 256 KiB) as early as before, and a
sender whose window is small (many streams) is never left waiting for the
timer.
"""

from __future__ import annotations

from collections.abc import Sequence

from stripeproxy.core import wire
from stripeproxy.core.session.config import SessionConfig
from stripeproxy.core.session.credit import Credit
from stripeproxy.core.session.recovery import SubflowState
from stripeproxy.core.session.stream import Stream, StreamState


class AckBatcher:
    """Streams waiting to acknowledge, and the deadline of the oldest wait."""

    def __init__(self, config: SessionConfig) -> None:
        self.config = config
        self.pending: list[Stream] = []
        self.deadline: float | None = None
        self._turn = 0

    def want(self, st: Stream) -> None:
        if not st.ack_pending:
            st.ack_pending = True
            self.pending.append(st)

    def flush(
        self, force: bool, now: float, subflows: Sequence[SubflowState], credit: Credit
    ) -> tuple[SubflowState, list[bytes]] | None:
        """Build the ACKs that are due (all of them if ``force``): the subflow
        to send them on and the encoded frames, or None."""
        if not self.pending:
            self.deadline = None
            return None
        sf = self.subflow(subflows)
        if sf is None:
            # Nowhere to send: keep the ACKs queued for the next subflow, but no
            # deadline, or the timer would fire at once, forever (grace period).
            self.deadline = None
            return None
        threshold = self.config.ack_threshold
        crc = self.config.crc
        frames: list[bytes] = []
        keep: list[Stream] = []
        for st in self.pending:
            recv = st.recv
            due = recv.ack_due
            if (
                not force
                and due < threshold
                and not recv.complete
                # The sender's credit left, at most (a hole makes it less): ACK
                # once it has used half of what it had at our last ACK.
                and recv.advertised - recv.next_offset - recv.buffered > due
            ):
                keep.append(st)  # not urgent: a completed direction is acknowledged at once
                continue
            st.ack_pending = False
            if st.state is StreamState.RESET:
                # The peer drops the stream too.  A stream that finished because
                # its last bytes just arrived still owes the peer the ACK for
                # them, or the peer's side never finishes.
                continue
            credit.grant(st)
            recv.ack_due = 0
            ack = wire.Ack(st.id, recv.next_offset, recv.advertised, recv.sack_ranges())
            frames.append(wire.encode_ack(ack, crc))
        self.pending = keep
        if keep:
            if self.deadline is None:
                self.deadline = now + self.config.ack_delay
        else:
            self.deadline = None
        return (sf, frames) if frames else None

    def subflow(self, subflows: Sequence[SubflowState]) -> SubflowState | None:
        """The healthy, writable subflow with the least of our data in flight;
        ties take turns.

        Taking turns matters: a side that only receives never times anything
        out, so it would never learn that a black-holed subflow swallows its
        ACKs; with ACKs spread out, the next cumulative ACK gets through.
        """
        n = len(subflows)
        best: SubflowState | None = None
        best_rank = (False, False, 0)
        best_index = 0
        for i in range(n):
            index = (self._turn + i) % n
            sf = subflows[index]
            rank = (not sf.suspect, sf.writable, -sf.inflight)
            if best is None or rank > best_rank:
                best, best_rank, best_index = sf, rank, index
        self._turn = best_index + 1
        return best
