"""Paths on the client: subflows bound to a local source, a pool of dial slots each.

A :class:`PathPool` is one ``--path`` (or the implicit path without one):
its dial slots (one ``DialService`` each), the endpoint that binds every dial
to the path's source, and the path's state, logged once per change ("path
lte down: interface wwan0 has no IPv4 address", "path lte up").  The pool
grows and shrinks one slot at a time, which is how ``--subflows auto``
(:class:`AutoK`) changes K.

An interface is resolved at every dial, not once: mobile uplinks get a new
address after each reconnect.  A path whose source is unusable fails its
own dials (classified ``no-source``), so only its own slots back off; the
other paths, with their own re-dial policy, are not disturbed.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import ifaddr
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from stripeproxy.core.escape import printable
from stripeproxy.core.kcontrol import TcpSample, loss_limited, session_loss_limited
from stripeproxy.core.paths import PathSpec, PathState, PathStatus, SourceKind
from stripeproxy.net import congestion, tcpinfo
from stripeproxy.net.dial import DialError, DialFailed, DialKind, DialService, DialSlot
from stripeproxy.net.driver import SessionDriver
from stripeproxy.net.subflow import find_socket

__all__ = [
    "AutoK",
    "KControl",
    "PathEndpoint",
    "PathPool",
    "SourceUnavailable",
    "check_source",
    "resolve_source",
    "tcp_retransmits",
]

log = Logger()

# /sys/class/net/NAME/operstate words for an interface that cannot carry traffic.
_DOWN = frozenset({"down", "lowerlayerdown", "notpresent"})
_SYS_NET = Path("/sys/class/net")


class SourceUnavailable(Exception):
    """The path's source has no usable address now (said in words for the log)."""


def _operstate(name: str, sys_net: Path = _SYS_NET) -> str | None:
    """The kernel's operational state of interface ``name`` (Linux), or None."""
    try:
        return (sys_net / name / "operstate").read_text().strip()
    except OSError:
        return None


def _adapter_addresses() -> dict[str, list[str]]:
    """Every interface's addresses as text, by name (IPv6 without scope)."""
    found: dict[str, list[str]] = {}
    for adapter in ifaddr.get_adapters():
        names = {adapter.name, getattr(adapter, "nice_name", adapter.name)}
        ips = [ip.ip if isinstance(ip.ip, str) else ip.ip[0] for ip in adapter.ips]
        for name in names:
            found.setdefault(str(name), []).extend(ips)
    return found


def _usable(text: str, family: int) -> bool:
    """An address a subflow can leave from: right family, not link-local (those
    reach no server beyond the link, and IPv6 ones need a scope to bind)."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return address.version == family and not address.is_link_local


def resolve_source(
    spec: PathSpec,
    family: int,
    adapters: Callable[[], dict[str, list[str]]] = _adapter_addresses,
    operstate: Callable[[str], str | None] = _operstate,
) -> str:
    """The address a subflow of ``spec`` binds to now; raises SourceUnavailable.

    ``family`` (4 or 6) is the server's, when known from its address: an
    interface has addresses of both kinds, and a socket bound to one kind
    cannot reach the other.
    """
    if spec.kind is SourceKind.ADDRESS:
        return spec.source
    name = spec.source
    if operstate(name) in _DOWN:
        raise SourceUnavailable(f"interface {name} is down")
    known = adapters()
    if name not in known:
        raise SourceUnavailable(f"there is no interface {name}")
    for text in known[name]:
        if _usable(text, family):
            return text
    raise SourceUnavailable(f"interface {name} has no IPv{family} address")


def check_source(address: str) -> str | None:
    """Why ``address`` cannot be a local source (None if it can): bind a probe socket."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
    except OSError as e:
        return e.strerror or str(e)
    return None


def tcp_retransmits(transport: Any) -> int | None:
    """Segments the kernel has re-sent on a subflow's socket (Linux), or None."""
    sample = _tcp_sample(transport)
    return sample.total_retrans if sample is not None else None


def _tcp_sample(transport: Any) -> TcpSample | None:
    sock = find_socket(transport)
    return tcpinfo.read(sock) if sock is not None else None


# ------------------------------------------------------------------ endpoint


@implementer(IStreamClientEndpoint)
class PathEndpoint:
    """Dials ``host:port`` from the path's source, resolved afresh at every dial.

    ``family`` is the server's address family when the server is given as
    an address, else 4 (the usual case for a name; an IPv6-only server is
    named by its address or reached without ``--path``).
    """

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        timeout: float,
        spec: PathSpec,
        pool: PathPool,
        resolve: Callable[[PathSpec, int], str] = resolve_source,
        dial: Callable[[str], IStreamClientEndpoint] | None = None,
    ) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port
        self._timeout = timeout
        self.spec = spec
        self.family: int
        try:
            self.family = ipaddress.ip_address(host).version
        except ValueError:
            self.family = spec.family or 4
        self._pool = pool
        self._resolve = resolve
        self._dial = dial or self._hostname

    def _hostname(self, address: str) -> IStreamClientEndpoint:
        """The server, reached from ``address``; its name resolves at every dial."""
        return HostnameEndpoint(
            self._reactor, self._host, self._port, self._timeout, bindAddress=(address, 0)
        )

    def current(self) -> str:
        """The source's address now; raises SourceUnavailable."""
        return self._resolve(self.spec, self.family)

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        try:
            address = self.current()
        except SourceUnavailable as e:
            why = printable(str(e))
            self._pool.unavailable(why)
            return defer.fail(DialFailed(DialError(DialKind.NO_SOURCE, why)))
        self._pool.address = address
        return self._dial(address).connect(factory)


# ---------------------------------------------------------------------- pool

#: Seconds between two looks at an interface path's address while it has subflows.
WATCH = 1.0
#: How long a retired subflow may take to see its data acknowledged before it
#: is closed anyway (the session then sends what it still held elsewhere).
RETIRE_WAIT = 2.0
#: How often a retiring subflow's unacknowledged bytes are looked at.
RETIRE_POLL = 0.1


class KDecisionView(Protocol):
    """What :class:`AutoK` reads of a decision (core/kcontrol.py's ``KDecision``)."""

    @property
    def target(self) -> int: ...
    @property
    def reason(self) -> str: ...


class KControl(Protocol):
    """The K controller as the adapter drives it (core/kcontrol.py's ``KController``)."""

    def observe(
        self, now: float, k_open: int, goodput_bps: float, busy: bool, loss_limited: bool
    ) -> KDecisionView | None: ...

    @property
    def target(self) -> int: ...

    @property
    def reason(self) -> str:
        """Why the target is what it is (changes without a decision when a probe is kept)."""


class PathPool(MultiService):
    """One path's dial slots, its state, and K (fixed, or moved by :class:`AutoK`).

    ``build(number, pool)`` makes the ``DialService`` of a new slot (the tap
    knows the server, TLS and the endpoint); the pool numbers slots with
    ``numbers`` (shared by every path, so slot numbers stay unique) and
    watches each slot's joins, losses and failures to keep the path's state.
    """

    def __init__(
        self,
        name: str,
        source: str,
        clock: IReactorTime,
        build: Callable[[int, PathPool], DialService],
        numbers: Iterator[int],
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's services are untyped
        self.path = name
        self.source = source
        self.clock = clock
        # Set by the tap before the first resize(): what every slot dials
        # through, the factory of its subflows, and the K controller (auto).
        self.endpoint: IStreamClientEndpoint | None = None
        self.factory: IProtocolFactory | None = None
        self.autok: AutoK | None = None
        # An interface path: its address now (raises SourceUnavailable), watched
        # every WATCH seconds so that subflows do not outlive their address.
        self.source_check: Callable[[], str] | None = None
        self._watch = LoopingCall(self.check_source)
        self._watch.clock = clock
        self._moving: set[DialSlot] = set()  # slots closed to re-dial from a new address
        self.k_reason = ""
        self.state = PathState(name, clock.seconds())
        self.address = ""  # the source's address at the last dial
        self.slots: list[DialService] = []
        self.slots_joined = 0  # slots that joined at least once (the others' joins are re-dials)
        self._build = build
        self._numbers = numbers
        self._retiring: dict[DialService, IDelayedCall | None] = {}

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self.autok is not None:
            self.autok.start()
        if self.source_check is not None:
            self._watch.start(WATCH, now=False)

    @property
    def target(self) -> int:
        return len(self.slots)

    @property
    def open(self) -> int:
        """Slots whose subflow is joined now."""
        return sum(1 for service in self.slots if service.slot.subflow is not None)

    def status(self) -> PathStatus:
        retrans = 0
        for service in self.slots:
            subflow = service.slot.subflow
            if subflow is not None:
                retrans += tcp_retransmits(subflow.transport) or 0
        state = self.state
        return PathStatus(
            name=self.path,
            source=self.source,
            state=state.state,
            why=state.why,
            address=self.address,
            open=self.open,
            target=self.target,
            auto=self.autok is not None,
            k_reason=self.k_reason,
            tcp_retransmits=retrans,
            since=state.since,
        )

    # ------------------------------------------------------------ size

    def resize(self, k: int) -> None:
        """Keep ``k`` slots: dial new ones, or retire the newest (idle first)."""
        while len(self.slots) < k:
            service = self._build(next(self._numbers), self)
            service.slot.watcher = self
            self.slots.append(service)
            service.setServiceParent(self)  # type: ignore[no-untyped-call]
        while len(self.slots) > max(k, 0):
            self._retire(self._newest_idle())

    def _newest_idle(self) -> DialService:
        """The slot to retire: the newest with nothing in flight, else the newest."""
        for service in reversed(self.slots):
            if _inflight(service) == 0:
                return service
        return self.slots[-1]

    def _retire(self, service: DialService) -> None:
        """Stop a slot without losing data: its subflow takes no new chunk, and
        is closed once what it carried is acknowledged (or after RETIRE_WAIT,
        when the session's loss handling sends the rest on the others)."""
        self.slots.remove(service)
        subflow = service.slot.subflow
        if subflow is None or subflow.driver is None:
            self._stop(service)
            return
        # The session's input for "this transport is full": nothing new goes on it.
        subflow.driver.writable(subflow.sid, False)
        deadline = self.clock.seconds() + RETIRE_WAIT

        def check() -> None:
            if _inflight(service) and self.clock.seconds() < deadline:
                self._retiring[service] = self.clock.callLater(RETIRE_POLL, check)
                return
            self._retiring.pop(service, None)
            self._stop(service)

        self._retiring[service] = None
        check()

    def _stop(self, service: DialService) -> None:
        subflow = service.slot.subflow
        if service.parent is self:
            service.disownServiceParent()  # type: ignore[no-untyped-call]  # stops dialling
        if subflow is not None:
            subflow.abort()  # ClientService's loseConnection would wait on the TLS producer

    def stopService(self) -> defer.Deferred[Any]:
        if self.autok is not None:
            self.autok.stop()
        if self._watch.running:
            self._watch.stop()
        for service, call in list(self._retiring.items()):
            if call is not None and call.active():
                call.cancel()
            self._stop(service)
        self._retiring.clear()
        return MultiService.stopService(self)  # type: ignore[no-untyped-call,no-any-return]

    # ---------------------------------------------------------- the source

    def check_source(self) -> None:
        """Close the subflows whose local address is no longer the source's.

        The kernel does not reset a connection whose address was removed (or
        whose interface went down): it would stall until a timeout noticed.
        Closing it now hands its unacknowledged chunks to the other paths at
        once (the session's subflow-loss handling), and its slot dials again:
        from the new address, or, while there is none, failing on its own.
        """
        assert self.source_check is not None
        try:
            address, why = self.source_check(), ""
        except SourceUnavailable as e:
            address, why = "", printable(str(e))
        stale = [
            subflow
            for service in self.slots
            if (subflow := service.slot.subflow) is not None and _local_host(subflow) != address
        ]
        if not stale:
            return
        if address:
            log.info(
                "path {path}: {source} has a new address, {address}: moving its subflows there",
                path=self.path,
                source=self.source,
                address=address,
            )
            self._moving.update(s.slot for s in self.slots if s.slot.subflow in stale)
        else:
            self.address = ""
            self._say(self.state.source_gone(why, self.clock.seconds()), warn=True)
        for subflow in stale:
            subflow.abort()

    # ---------------------------------------------------- SlotWatcher

    def _say(self, line: str | None, warn: bool = False) -> None:
        if line is None or not self.path:
            return  # no --path: the slots' own lines say it all, as before
        if not getattr(self.parent, "running", True):
            return  # the client is stopping (OverlayService): its subflows go on purpose
        (log.warn if warn else log.info)("{line}", line=line, path=self.path)

    def unavailable(self, why: str) -> None:
        """The endpoint found no usable source address for a dial."""
        self.address = ""
        self._say(self.state.down(why, self.clock.seconds()), warn=True)

    def slot_joined(self, slot: DialSlot) -> None:
        if slot.joins == 1:
            self.slots_joined += 1
        self._say(self.state.subflow_joined(self.clock.seconds()))

    def slot_failed(self, slot: DialSlot, dial_error: DialError) -> None:
        if dial_error.kind is not DialKind.NO_SOURCE:
            self._say(self.state.down(dial_error.message, self.clock.seconds()), warn=True)

    def slot_lost(self, slot: DialSlot, why: str) -> None:
        if slot in self._moving:  # to the source's new address: not a failure
            self._moving.discard(slot)
            self.state.joined = max(0, self.state.joined - 1)
        elif any(s.slot is slot for s in self.slots):
            self._say(self.state.subflow_lost(why, self.clock.seconds()), warn=True)
        else:
            self.state.joined = max(0, self.state.joined - 1)  # retired on purpose


def _local_host(subflow: Any) -> str:
    """The local address a subflow's connection leaves from."""
    transport = subflow.transport
    return str(getattr(transport.getHost(), "host", "")) if transport is not None else ""


def _inflight(service: DialService) -> int:
    """Unacknowledged bytes the slot's subflow carries (0 if none is joined)."""
    subflow = service.slot.subflow
    driver = subflow.driver if subflow is not None else None
    if subflow is None or driver is None:
        return 0
    for row in driver.subflow_info():
        if row.sid == subflow.sid:
            return row.inflight
    return 0


# ----------------------------------------------------------------- auto K

#: Seconds between two looks at a path's goodput (the controller expects ~0.5 s).
TICK = 0.5


@dataclass(frozen=True)
class Reading:
    """One tick's view of a path, as :meth:`KControl.observe` takes it."""

    k_open: int
    goodput: float  # payload bytes per second, both directions
    busy: bool
    loss_limited: bool


@dataclass
class _Sample:
    real: int  # payload bytes both ways on the subflow
    retransmitted: int  # the overlay's re-sends on it
    tcp: TcpSample | None = None  # the kernel's view of its sending side (Linux)
    algorithm: str | None = None  # its congestion control, as the kernel reports it


class AutoK:
    """Feeds one path's controller every :data:`TICK` and applies its decisions.

    What it tells the controller, from the path's live subflows since the
    last tick: how many are open; the goodput (payload carried both ways,
    per second); *busy*: payload moved or a session holds data to send or
    reassemble; *loss-limited*: at least half of the subflows that carried
    data re-sent some (the kernel's retransmits, read from ``TCP_INFO`` on
    Linux, or the overlay's) or could take no more (transport full).  Half,
    not any: one subflow on a bad route must not make the path grow.  A
    change of K is logged with the controller's reason and shown by the
    dashboard and the metrics.
    """

    def __init__(
        self, pool: PathPool, controller: KControl, clock: IReactorTime, tick: float = TICK
    ) -> None:
        self.pool = pool
        self.controller = controller
        self.clock = clock
        self._last: dict[tuple[str, int], _Sample] = {}
        self._at = clock.seconds()
        self.loop = LoopingCall(self.tick)
        self.loop.clock = clock
        self.tick_seconds = tick

    def start(self) -> None:
        self._at = self.clock.seconds()
        self.loop.start(self.tick_seconds, now=False)

    def stop(self) -> None:
        if self.loop.running:
            self.loop.stop()

    def measure(self) -> Reading:
        """What the path did since the last call."""
        now = self.clock.seconds()
        elapsed = max(now - self._at, 1e-6)
        self._at = now
        seen: dict[tuple[str, int], _Sample] = {}
        moved = 0
        votes: list[bool] = []
        drivers: dict[int, SessionDriver] = {}
        for service in self.pool.slots:
            subflow = service.slot.subflow
            driver = subflow.driver if subflow is not None else None
            if subflow is None or driver is None:
                continue
            drivers[id(driver)] = driver
            row = next((r for r in driver.subflow_info() if r.sid == subflow.sid), None)
            if row is None:
                continue
            key = (driver.label, subflow.sid)
            sock = find_socket(subflow.transport)
            sample = _Sample(
                row.totals["tx_real"] + row.totals["rx_real"],
                row.retransmitted,
                tcpinfo.read(sock) if sock is not None else None,
                congestion.in_use(sock) if sock is not None else None,
            )
            seen[key] = sample
            before = self._last.get(key, _Sample(0, 0))
            carried = sample.real - before.real
            moved += carried
            if carried > 0 or not row.writable:
                kernel = (
                    before.tcp is not None
                    and sample.tcp is not None
                    and loss_limited(before.tcp, sample.tcp, sample.algorithm)
                )
                votes.append(
                    sample.retransmitted > before.retransmitted or not row.writable or kernel
                )
        self._last = seen
        busy = moved > 0 or any(d.buffered_bytes() > 0 for d in drivers.values())
        limited = session_loss_limited(votes)
        return Reading(len(seen), moved / elapsed, busy, limited)

    def tick(self) -> None:
        reading = self.measure()
        controller = self.controller
        decision = controller.observe(
            self.clock.seconds(),
            reading.k_open,
            reading.goodput,
            reading.busy,
            reading.loss_limited,
        )
        pool = self.pool
        # The controller's own account of its target: after a kept probe it
        # changes without a decision ("goodput +18% with 7").
        pool.k_reason = controller.reason
        if decision is None or decision.target == pool.target:
            return
        log.info(
            "{label}: subflows {before} -> {after} ({reason})",
            label=f"path {pool.path}" if pool.path else "subflows auto",
            before=pool.target,
            after=decision.target,
            reason=printable(decision.reason),
        )
        pool.k_reason = decision.reason
        pool.resize(decision.target)
