"""What the dashboard, the metrics endpoint and the logs show.

A :class:`Monitor` samples the live sessions every 500 ms on an injected
clock and turns their cumulative counters into a :class:`Snapshot` with
10-second sliding-window rates.  Consumers only ever read snapshots, so they
never reach into the session core and cost nothing on the data path.

"Real" bytes are stream payload; "dummy" bytes are everything else on the
wire: frame headers, ACKs, heartbeats, and payload sent more than once.

Rows carry display text: a stream's target (the SOCKS client's choice) and a
subflow's peer (from a PROXY header, behind a balancer) are escaped here
(:func:`~stripeproxy.core.escape.printable`), once, for every consumer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from stripeproxy.core.escape import printable
from stripeproxy.core.paths import PathStatus
from stripeproxy.net.dial import DialStatus
from stripeproxy.net.driver import StreamInfo, SubflowInfo
from stripeproxy.ops.rates import PERIOD, WINDOW, RateBook

_DIRECTIONS = ("tx_real", "tx_dummy", "rx_real", "rx_dummy")


class Observed(Protocol):
    """What the monitor reads of a session (:class:`~stripeproxy.net.driver.SessionDriver`)."""

    label: str

    def counters(self) -> dict[str, int]: ...
    def buffered_bytes(self) -> int: ...
    def subflow_info(self) -> list[SubflowInfo]: ...
    def stream_info(self) -> list[StreamInfo]: ...


# Session-wide cumulative counters (Session.counters()).
_COUNTERS = (*_DIRECTIONS, "retransmitted", "reinjected", "timeouts", "subflows_lost")


@dataclass(frozen=True)
class SubflowRow:
    session: str
    sid: int
    peer: str
    writable: bool
    rtt_ms: float | None
    inflight: int
    totals: dict[str, int]  # cumulative bytes by direction (see _DIRECTIONS)
    rates: dict[str, float]  # bytes per second over the window
    retransmitted: int
    cc: str = ""  # the socket's congestion control ('': unknown)
    path: str = ""  # the client's --path it leaves by ('': none, or the server)
    # Head-of-line cost at this end: chunks it brought that waited for an
    # earlier one of another subflow (count and seconds, cumulative), and over
    # the window: such chunks per second and seconds of waiting per second.
    reorder_waits: int = 0
    reorder_wait_s: float = 0.0
    blocked_wait_s: float = 0.0
    reorder_rate: float = 0.0
    reorder_wait_rate: float = 0.0

    @property
    def reorder_ms(self) -> float | None:
        """The window's mean wait of its chunks that waited (None: none did)."""
        return _mean_ms(self.reorder_wait_rate, self.reorder_rate)


@dataclass(frozen=True)
class StreamRow:
    session: str
    stream_id: int
    target: str
    age: float
    sent: int  # bytes read from the local peer
    received: int  # bytes received from the remote side
    send_rate: float
    receive_rate: float


@dataclass(frozen=True)
class PathRow:
    """One client path (``--path``) with its subflows' figures summed up.

    ``name`` is "" for the implicit path (no ``--path``, shown under
    ``--subflows auto`` for its K).  Loss signals are the payload the path's
    live subflows sent again (time-outs and re-injections, as the overlay
    sees them) and the segments their kernels re-sent (TCP's own losses,
    which the overlay never sees: the sign that more subflows may help).
    """

    name: str
    source: str
    address: str  # the address its subflows bind to now ("" if none)
    state: str  # "starting", "up", "down"
    why: str  # why it is down
    open: int  # subflows joined
    target: int  # K: subflows it keeps
    auto: bool  # K follows the controller
    k_reason: str  # why K last moved
    rates: dict[str, float]  # real bytes per second: tx_real, rx_real
    share: float  # of all paths' real bytes per second, 0 to 1
    rtt_ms: float | None  # the lowest smoothed RTT among its subflows
    retransmitted: int
    tcp_retransmits: int
    # Mean reorder-buffer wait of its chunks that waited, over the window
    # (None: none waited): the fast path waiting on a slow one shows here.
    reorder_ms: float | None = None


def _mean_ms(wait_rate: float, rate: float) -> float | None:
    return wait_rate / rate * 1000 if rate > 0 else None


def path_rows(paths: Iterable[PathStatus], subflows: list[SubflowRow]) -> tuple[PathRow, ...]:
    """Each path with the sums of its subflow rows (all rows for the implicit path)."""
    grouped = []
    for path in paths:
        rows = [r for r in subflows if r.path == path.name or not path.name]
        rates = {name: sum(r.rates[name] for r in rows) for name in ("tx_real", "rx_real")}
        rtts = [r.rtt_ms for r in rows if r.rtt_ms is not None]
        grouped.append((path, rows, rates, min(rtts) if rtts else None))
    total = sum(sum(rates.values()) for _, _, rates, _ in grouped)
    return tuple(
        PathRow(
            name=path.name,
            source=path.source,
            address=path.address,
            state=path.state,
            why=printable(path.why),
            open=path.open,
            target=path.target,
            auto=path.auto,
            k_reason=printable(path.k_reason),
            rates=rates,
            share=sum(rates.values()) / total if total > 0 else 0.0,
            rtt_ms=rtt,
            retransmitted=sum(r.retransmitted for r in rows),
            tcp_retransmits=path.tcp_retransmits,
            reorder_ms=_mean_ms(
                sum(r.reorder_wait_rate for r in rows), sum(r.reorder_rate for r in rows)
            ),
        )
        for path, rows, rates, rtt in grouped
    )


@dataclass(frozen=True)
class Snapshot:
    role: str
    time: float
    window: float
    sessions: int
    subflows: list[SubflowRow] = field(default_factory=list)
    streams: list[StreamRow] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)
    retransmitted: int = 0
    reinjected: int = 0  # of the retransmitted bytes: re-sent to unblock a hole
    timeouts: int = 0  # chunks whose acknowledgement was overdue (RTO)
    subflows_lost: int = 0
    redials: int = 0
    buffered: int = 0
    # The client's subflow slots: state and last dial error of each (empty on the server).
    dials: tuple[DialStatus, ...] = ()
    # The client's paths (--path, or the one implicit path under --subflows auto).
    paths: tuple[PathRow, ...] = ()

    @property
    def streams_open(self) -> int:
        return len(self.streams)


class Monitor(Service):
    """Samples sessions on a period and keeps the latest :class:`Snapshot`."""

    def __init__(
        self,
        role: str,
        clock: IReactorTime,
        sessions: Callable[[], Iterable[Observed]],
        redials: Callable[[], int] = lambda: 0,
        period: float = PERIOD,
        window: float = WINDOW,
        dials: Callable[[], Iterable[DialStatus]] = tuple,
        paths: Callable[[], Iterable[PathStatus]] = tuple,
    ) -> None:
        self.role = role
        self._paths = paths
        self.clock = clock
        self._sessions = sessions
        self._redials = redials
        self._dials = dials
        self.period = period
        self._book = RateBook(window)
        self._last: dict[str, dict[str, int]] = {}  # counters of live sessions
        self._ended: dict[str, int] = {}  # counters of sessions that have ended
        self._loop = LoopingCall(self.sample)
        self._loop.clock = clock
        self.listeners: list[Callable[[Snapshot], None]] = []
        self.latest = Snapshot(role, clock.seconds(), window, 0)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is untyped
        self._loop.start(self.period, now=True)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is untyped
        if self._loop.running:
            self._loop.stop()

    def sample(self) -> Snapshot:
        now = self.clock.seconds()
        book = self._book
        subflow_rows: list[SubflowRow] = []
        stream_rows: list[StreamRow] = []
        buffered = 0
        live: dict[str, dict[str, int]] = {}
        drivers = list(self._sessions())
        dials = tuple(self._dials())
        # Which path each joined subflow leaves by, from its slot.
        path_of = {(d.session, d.sid): d.path for d in dials if d.sid}
        for driver in drivers:
            label = driver.label
            live[label] = driver.counters()
            buffered += driver.buffered_bytes()
            for sf in driver.subflow_info():
                rates = {
                    name: book.sample(now, ("sf", label, sf.sid, name), value).rate()
                    for name, value in sf.totals.items()
                }
                waiting = book.sample(now, ("sf", label, sf.sid, "waits"), sf.reorder_waits)
                waited_us = book.sample(
                    now, ("sf", label, sf.sid, "wait_us"), round(sf.reorder_wait_s * 1e6)
                )
                subflow_rows.append(
                    SubflowRow(
                        session=label,
                        sid=sf.sid,
                        peer=printable(sf.peer),
                        writable=sf.writable,
                        rtt_ms=sf.srtt * 1000 if sf.srtt is not None else None,
                        inflight=sf.inflight,
                        totals=sf.totals,
                        rates=rates,
                        retransmitted=sf.retransmitted,
                        cc=printable(sf.cc or ""),
                        path=path_of.get((label, sf.sid), ""),
                        reorder_waits=sf.reorder_waits,
                        reorder_wait_s=sf.reorder_wait_s,
                        blocked_wait_s=sf.blocked_wait_s,
                        reorder_rate=waiting.rate(),
                        reorder_wait_rate=waited_us.rate() / 1e6,
                    )
                )
            for st in driver.stream_info():
                stream_id, sent, received = st.stream_id, st.sent, st.received
                stream_rows.append(
                    StreamRow(
                        session=label,
                        stream_id=stream_id,
                        target=printable(st.target),
                        age=now - st.opened_at if st.opened_at is not None else 0.0,
                        sent=sent,
                        received=received,
                        send_rate=book.sample(now, ("st", label, stream_id, "tx"), sent).rate(),
                        receive_rate=book.sample(
                            now, ("st", label, stream_id, "rx"), received
                        ).rate(),
                    )
                )
        # Counters must not go down when a session ends: carry its final counts.
        for label, counts in self._last.items():
            if label not in live:
                for name, value in counts.items():
                    self._ended[name] = self._ended.get(name, 0) + value
        self._last = live
        totals = {
            name: self._ended.get(name, 0) + sum(c[name] for c in live.values())
            for name in _COUNTERS
        }
        rates = {name: book.sample(now, ("all", name), totals[name]).rate() for name in _DIRECTIONS}
        book.sweep()
        snapshot = Snapshot(
            role=self.role,
            time=now,
            window=book.window,
            sessions=len(drivers),
            subflows=subflow_rows,
            streams=stream_rows,
            totals=totals,
            rates=rates,
            retransmitted=totals["retransmitted"],
            reinjected=totals["reinjected"],
            timeouts=totals["timeouts"],
            subflows_lost=totals["subflows_lost"],
            redials=self._redials(),
            buffered=buffered,
            dials=dials,
            paths=path_rows(self._paths(), subflow_rows),
        )
        self.latest = snapshot
        for listener in list(self.listeners):
            listener(snapshot)
        return snapshot
