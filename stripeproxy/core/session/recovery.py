"""Loss recovery: per-subflow RTT and RTO, timeouts, re-injection, goodput (SPEC.md section 6).

:class:`Recovery` keeps the subflows' measured state and decides what must
go again; it never queues anything itself: :meth:`Recovery.expire`,
:meth:`Recovery.reinject` and :meth:`Recovery.remove` return the chunks to
re-queue, and the session puts them back on their streams.  It also says
which subflows may take new chunks (:meth:`Recovery.usable`) and which
streams must repeat a grant their peer may never have seen
(:meth:`Recovery.due_grants`).
"""

from __future__ import annotations

from collections import deque

from stripeproxy.core.session.config import GOODPUT_SAMPLE, SessionConfig
from stripeproxy.core.session.stream import Chunk, Stream

#: The cumulative byte counters of a subflow (and of the session).
DIRECTIONS = ("tx_real", "tx_dummy", "rx_real", "rx_dummy")
#: A subflow this many times slower (by RTT) than the fastest other one, and
#: delivering this many times less than the best one, holds a hole long enough
#: that a copy on a fast subflow arrives first (see :meth:`Recovery.reinject_due`).
SLOW_FACTOR = 4.0


class SubflowState:
    """What the session knows about one subflow; the scheduler reads it too."""

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
        self.sent: deque[tuple[float, Chunk]] = deque()
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

    def rtt_sample(self, rtt: float) -> None:
        """RFC 6298 smoothing; samples come from ACKed chunks and PONGs."""
        if rtt < 0:
            return
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt

    def goodput_sample(self, size: int, now: float) -> None:
        self._rate_bytes += size
        elapsed = now - self._rate_start
        if elapsed >= GOODPUT_SAMPLE:
            rate = self._rate_bytes / elapsed
            self.goodput = rate if self.goodput == 0 else 0.75 * self.goodput + 0.25 * rate
            self._rate_start = now
            self._rate_bytes = 0

    def oldest(self) -> Chunk | None:
        """The oldest chunk still in flight here (stale entries dropped)."""
        sent = self.sent
        while sent:
            sent_at, chunk = sent[0]
            if chunk.sid == self.sid and chunk.sent_at == sent_at and not chunk.done:
                return chunk
            sent.popleft()
        return None


class GrantWatch:
    """A limit the peer reached, and when to repeat the ACK that raised it."""

    __slots__ = ("due", "interval", "limit")

    def __init__(self, limit: int, interval: float) -> None:
        self.limit = limit
        self.due: float | None = None  # None: we have not granted more yet
        self.interval = interval


class Recovery:
    """The session's subflows and its retransmission decisions."""

    def __init__(self, config: SessionConfig) -> None:
        self.config = config
        self.subflows: dict[int, SubflowState] = {}
        self.subflow_list: list[SubflowState] = []  # in join order (the scheduler's view)
        # Streams whose head-of-line chunk may need re-injection, and when.
        self.reinject_checks: dict[Stream, float] = {}
        # Streams whose peer reached the credit limit we announced (peer_at_limit()).
        self.credit_checks: dict[Stream, GrantWatch] = {}
        self.retransmitted = 0
        self.reinjected = 0  # bytes re-sent to unblock a hole (head-of-line)
        self.timeouts = 0
        # Bytes queued to go again, by cause (some are acknowledged before they
        # go, so these bound what timeouts and lost subflows cost on the wire).
        self.requeued_timeout = 0
        self.requeued_lost = 0
        self.subflows_lost = 0
        self._usable: list[SubflowState] | None = None  # see usable()
        self._retired = dict.fromkeys(DIRECTIONS, 0)  # counters of subflows gone

    # ----------------------------------------------------------- membership

    def add(self, sid: int, now: float) -> SubflowState:
        sf = SubflowState(sid, now)
        self.subflows[sid] = sf
        self.subflow_list.append(sf)
        self._usable = None
        return sf

    def remove(self, sid: int, streams: list[Stream]) -> list[Chunk] | None:
        """Forget subflow ``sid``; return every chunk it carried unacknowledged
        (to be sent again), or None if there was no such subflow."""
        sf = self.subflows.pop(sid, None)
        if sf is None:
            return None
        self.subflow_list.remove(sf)
        self._usable = None
        self.subflows_lost += 1
        for name in DIRECTIONS:
            self._retired[name] += getattr(sf, name)
        sf.sent.clear()
        requeue: list[Chunk] = []
        for st in streams:
            send = st.send
            for chunk in send.unacked.values():
                if chunk.sid == sid:
                    chunk.sid = None
                    chunk.avoid = None
                    requeue.append(chunk)
                    self.requeued_lost += len(chunk.data)
            if send.unacked and send.fin_offset is not None and send.next_offset == send.fin_offset:
                # The peer may have received everything and finished the stream;
                # then it cannot repeat a final ACK lost with this subflow.  Send
                # the last chunk again: a finished peer acknowledges it up to the
                # final offset (SPEC.md section 4), a live one just re-ACKs.
                chunk = next(reversed(send.unacked.values()))
                if chunk.sid is not None:
                    self.release(chunk)
                    requeue.append(chunk)
                    self.requeued_lost += len(chunk.data)
        if len(self.subflow_list) < 2:
            self.reinject_checks.clear()  # nowhere else to re-inject to
        return requeue

    def clear(self) -> None:
        self.subflows.clear()
        self.subflow_list.clear()
        self._usable = None
        self.reinject_checks.clear()
        self.credit_checks.clear()

    def usable(self) -> list[SubflowState]:
        """The subflows new chunks may go on: the healthy ones, or all if none is.

        A suspect subflow gets nothing while a healthy one exists, even when
        every healthy one is momentarily full: a stalled subflow that takes
        a chunk whenever the others are busy (a fast sender keeps them busy)
        holds a hole for a whole timeout each time, and with a few of those
        in one credit window the stream crawls (SPEC.md section 6).  The list
        is kept between calls, since the scheduler reads it for every chunk.
        """
        usable = self._usable
        if usable is None:
            usable = [sf for sf in self.subflow_list if not sf.suspect] or list(self.subflow_list)
            self._usable = usable
        return usable

    def set_suspect(self, sf: SubflowState, suspect: bool) -> None:
        """Mark ``sf`` stalled (a chunk timed out there) or alive again (a sign of life)."""
        if sf.suspect != suspect:
            sf.suspect = suspect
            self._usable = None

    # ------------------------------------------------------------- per chunk

    def sent(self, sf: SubflowState, chunk: Chunk, now: float) -> None:
        chunk.sid = sf.sid
        chunk.sent_at = now
        sf.inflight += len(chunk.data)
        sf.sent.append((now, chunk))

    def acked(self, chunk: Chunk, now: float) -> None:
        """A chunk was acknowledged: RTT (Karn's rule) and goodput samples."""
        chunk.done = True
        sf = self.subflows.get(chunk.sid) if chunk.sid is not None else None
        if sf is None:
            return
        sf.inflight -= len(chunk.data)
        self.set_suspect(sf, False)
        if chunk.retries == 0 and not chunk.reinjected:
            sf.rtt_sample(now - chunk.sent_at)
        sf.goodput_sample(len(chunk.data), now)

    def release(self, chunk: Chunk) -> None:
        """Take an unacknowledged chunk off its subflow (to send it elsewhere, or drop it)."""
        sf = self.subflows.get(chunk.sid) if chunk.sid is not None else None
        if sf is not None:
            sf.inflight -= len(chunk.data)
        chunk.avoid = chunk.sid
        chunk.sid = None

    # -------------------------------------------------------------- timeouts

    def rto(self, sf: SubflowState) -> float:
        cfg = self.config
        if sf.srtt is None:
            return cfg.initial_rto
        # 2 x srtt: a chunk behind a segment that TCP itself recovers arrives
        # about one round trip late; that is no stall (SPEC.md section 6).
        rto = 2 * sf.srtt + 4 * sf.rttvar + cfg.ack_delay
        return min(cfg.max_rto, max(cfg.min_rto, rto))

    def rto_expiry(self, sf: SubflowState) -> float | None:
        chunk = sf.oldest()
        if chunk is None:
            return None
        return chunk.sent_at + min(self.config.max_rto, self.rto(sf) * (1 << chunk.retries))

    def expire(self, sf: SubflowState, now: float) -> tuple[list[Chunk], bool]:
        """Chunks unacknowledged past the RTO: (those to send again elsewhere,
        whether ``sf`` just became suspect and should be probed with a PING).

        TCP does not lose data, so a timeout means the subflow is stalled (a
        black hole, a dead path not yet detected) or far slower than its RTT
        said; the subflow is marked suspect so that it gets no new chunks
        until it shows a sign of life (:meth:`usable`).  TCP also delivers in
        order: nothing sent on ``sf`` after the overdue chunk can arrive before
        it, so every chunk in flight there goes again at once, not each one
        a timeout later (a dead path would otherwise stall the stream for as
        many timeouts as it held holes in one credit window).
        """
        expiry = self.rto_expiry(sf)
        if expiry is None or now < expiry:
            return [], False
        requeue: list[Chunk] = []
        # Another copy only helps on another subflow: on this one TCP already
        # delivers it, or the subflow dies and remove() hands it back.
        if any(s is not sf and not s.suspect for s in self.subflow_list):
            self.timeouts += 1
            while (chunk := sf.oldest()) is not None:
                sf.sent.popleft()
                chunk.retries += 1  # backs its next timeout off, and no RTT sample
                self.release(chunk)
                requeue.append(chunk)
                self.requeued_timeout += len(chunk.data)
        else:
            kept: list[tuple[float, Chunk]] = []
            while expiry is not None and now >= expiry:
                chunk = sf.oldest()
                assert chunk is not None
                sf.sent.popleft()
                chunk.retries += 1
                self.timeouts += 1
                chunk.sent_at = now  # watched afresh from now, with the longer timeout
                kept.append((now, chunk))
                expiry = self.rto_expiry(sf)
            sf.sent.extend(kept)
        probe = not sf.suspect
        self.set_suspect(sf, True)
        return requeue, probe

    # ------------------------------------------------------------ re-injection

    def reinject(self, st: Stream, head: Chunk, now: float) -> bool:
        """The receiver holds a quarter of the window beyond a hole: True if the
        hole (``head``) should go again now, on a faster subflow (at most once
        per chunk); the caller re-queues it first in line.  When is in
        :meth:`reinject_due`; a check that is not due yet is planned for then.
        """
        if head.reinjected or head.sid is None or len(self.subflow_list) < 2:
            return False
        due = self.reinject_due(head)
        if due is None:
            return False
        if now < due:
            self.reinject_checks[st] = due
            return False
        self.reinject_checks.pop(st, None)
        head.reinjected = True
        self.reinjected += len(head.data)
        self.release(head)
        return True

    def reinject_due(self, head: Chunk) -> float | None:
        """When the hole ``head`` counts as stuck behind a slow subflow (None: never).

        A copy only helps if it beats the original.  Where the head's subflow
        is *slow* -- another subflow has a quarter of its RTT and another
        delivers four times its goodput (:data:`SLOW_FACTOR`) -- a copy on a
        fast one arrives first, so the head goes again once it is older than
        twice the fastest other subflow's RTT.  A head on a subflow that is
        not slow is left to the timeout: if that subflow stalls, :meth:`expire`
        moves the head and everything behind it, and :meth:`usable` keeps new
        chunks off it; if it merely hiccups, the timeout's floor (``min_rto``)
        lets it recover on its own, as TCP's own floor does.

        RTT samples include the queueing a chunk meets on its subflow (the
        transport's buffer, the kernel's backlog, the receiver's turn to read
        it), so the subflow the scheduler keeps busiest has the longest RTT
        without being slow: it also has the highest goodput.  Comparing a
        head's age with the RTT of an idle subflow alone re-sent ordinary
        queueing (issue 11: 0.15 to 0.34 % of a loopback transfer went
        twice); comparing it with its own subflow's RTT and deviation still
        re-sent a few chunks per GiB, delayed 25-90 ms on a loopback whose
        RTT was 10 ms when the host was busy.
        """
        others = [
            sf
            for sf in self.subflow_list
            if sf.sid != head.sid and sf.srtt is not None and not sf.suspect
        ]
        if not others:
            return None
        fastest = min(sf.srtt for sf in others if sf.srtt is not None)
        due = head.sent_at + 2 * fastest + self.config.ack_delay
        own = self.subflows.get(head.sid) if head.sid is not None else None
        if own is None or own.srtt is None:
            return due  # nothing measured there: judged by the others alone
        best = max(sf.goodput for sf in others)
        if own.srtt >= SLOW_FACTOR * fastest and SLOW_FACTOR * own.goodput <= best:
            return due
        return None

    def due_checks(self, now: float) -> list[Stream]:
        """Streams whose planned re-injection check is due (and no longer planned)."""
        due = [st for st, when in self.reinject_checks.items() if now >= when]
        for st in due:
            del self.reinject_checks[st]
        return due

    # ------------------------------------------------------ lost window updates

    def peer_at_limit(self, st: Stream) -> None:
        """The peer's DATA reached the limit we announced for ``st``: it waits for
        our next grant, and only an ACK tells it.

        Any other lost ACK is repaired by the next one, or by the peer's
        timeout.  Not this one: a peer that sent up to our limit and had
        everything acknowledged has nothing in flight to time out, and we
        send nothing more until it sends, so a grant lost with a stalled
        subflow (a black hole on the ACK path) would stall the stream until
        the dead interval.  Hence TCP's persist timer, from our side: once we
        grant more (:meth:`granted`), if nothing beyond the old limit arrives
        within a timeout, the ACK goes again (on another subflow, as ACKs take
        turns), backing off; at ``max_rto`` the peer evidently had no more to send.
        """
        if st not in self.credit_checks:
            self.credit_checks[st] = GrantWatch(st.recv.advertised, self._persist_interval())

    def granted(self, now: float) -> None:
        """ACKs went out: start the clock for each watched stream that got more credit."""
        for st, watch in self.credit_checks.items():
            if watch.due is None and st.recv.advertised > watch.limit:
                watch.due = now + watch.interval

    def credit_used(self, st: Stream, end: int) -> None:
        """DATA up to ``end`` arrived: beyond the watched limit, our grant got through."""
        watch = self.credit_checks.get(st)
        if watch is not None and end > watch.limit:
            del self.credit_checks[st]

    def due_grants(self, now: float) -> list[Stream]:
        """Streams whose grant seems lost: repeat their ACK now (planned again, backed off)."""
        out: list[Stream] = []
        for st, watch in list(self.credit_checks.items()):
            if watch.due is None or now < watch.due:
                continue
            final = st.recv.final
            interval = 2 * watch.interval
            if (final is not None and final <= watch.limit) or interval > self.config.max_rto:
                del self.credit_checks[st]  # nothing more is coming
                continue
            out.append(st)
            watch.due, watch.interval = now + interval, interval
        return out

    def _persist_interval(self) -> float:
        return min((self.rto(sf) for sf in self.usable()), default=self.config.initial_rto)

    # ---------------------------------------------------------------- queries

    def deadlines(self) -> list[float]:
        """Heartbeat, silence, RTO, re-injection and repeated-grant deadlines."""
        cfg = self.config
        out: list[float] = []
        for sf in self.subflow_list:
            out.append(min(sf.last_tx + cfg.heartbeat_interval, sf.last_rx + cfg.dead_interval))
            expiry = self.rto_expiry(sf)
            if expiry is not None:
                out.append(expiry)
        out.extend(self.reinject_checks.values())
        out.extend(w.due for w in self.credit_checks.values() if w.due is not None)
        return out

    def counters(self) -> dict[str, int]:
        """Cumulative counters, including those of subflows that are gone."""
        totals = dict(self._retired)
        for sf in self.subflow_list:
            totals["tx_real"] += sf.tx_real
            totals["tx_dummy"] += sf.tx_dummy
            totals["rx_real"] += sf.rx_real
            totals["rx_dummy"] += sf.rx_dummy
        totals["retransmitted"] = self.retransmitted
        totals["reinjected"] = self.reinjected
        totals["timeouts"] = self.timeouts
        totals["requeued_timeout"] = self.requeued_timeout
        totals["requeued_lost"] = self.requeued_lost
        totals["subflows_lost"] = self.subflows_lost
        return totals
