"""Moves subflows to a loss-tolerant congestion control once their path shows random loss.

``--congestion auto`` starts subflows on the system default (CUBIC on Linux),
which fills a clean path and shares it like any TCP flow, and moves them to
BBR only when their own readings say the path drops packets with no queue
to blame (:func:`stripeproxy.core.congestion.random_loss`).  One
:class:`LossWatch` per process reads ``TCP_INFO`` of every watched subflow
each ``interval`` while there are any (no timer runs otherwise).  Subflows
are judged per *route*, their local and peer address: the subflows of one
path pool their evidence (:class:`~stripeproxy.core.congestion.RandomLossVote`),
move together, and a route once judged lossy puts its later subflows (a
re-dial, one more under ``--subflows auto``) on BBR at once; with several
uplinks each is judged on its own.  Linux switches a connected socket's
algorithm in place, so the subflow, its session and its data are untouched.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TypedDict

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from stripeproxy.core.congestion import Choice, RandomLossVote, random_loss
from stripeproxy.core.escape import printable
from stripeproxy.core.kcontrol import TcpSample
from stripeproxy.core.throttle import Throttle
from stripeproxy.net import tcpinfo
from stripeproxy.net.congestion import in_use, set_algorithm

__all__ = ["LossWatch", "SubflowCongestion", "route_of", "subflow_congestion"]

#: Routes remembered as lossy (oldest forgotten first): bounds a busy server.
MAX_LOSSY_ROUTES = 4096

Route = tuple[str, str]


class SubflowCongestion(TypedDict):
    congestion: str | None
    loss_watch: LossWatch | None


def route_of(sock: socket.socket) -> Route:
    """The local and the peer address of a connected socket (no ports)."""
    try:
        return str(sock.getsockname()[0]), str(sock.getpeername()[0])
    except (OSError, IndexError, TypeError):
        return "", ""


class _Watched:
    def __init__(self, name: str, route: Route, switched: Callable[[str | None], None]) -> None:
        self.name = name
        self.route = route
        self.switched = switched
        self.last: TcpSample | None = None


class LossWatch:
    """Every watched subflow socket by route, and the algorithm they move to."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        upgrade: str,
        interval: float = 0.5,
        read: Callable[[socket.socket], TcpSample | None] = tcpinfo.read,
        switch: Callable[[socket.socket, str], str] = set_algorithm,
        algorithm: Callable[[socket.socket], str | None] = in_use,
        route: Callable[[socket.socket], Route] = route_of,
    ) -> None:
        self.upgrade = upgrade
        self.interval = interval
        self._read = read
        self._switch = switch
        self._algorithm = algorithm
        self._route = route
        self._watched: dict[socket.socket, _Watched] = {}
        self._votes: dict[Route, RandomLossVote] = {}
        self._lossy: dict[Route, None] = {}  # an ordered set
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self._clock = clock
        self._throttle = Throttle()
        self.switches = 0

    def watch(self, sock: socket.socket, name: str, switched: Callable[[str | None], None]) -> None:
        """Judge ``sock`` (a subflow, ``name`` for the log) from now on, or move
        it at once if its route is known to be lossy; ``switched`` gets the
        algorithm it uses after a move."""
        w = _Watched(name, self._route(sock), switched)
        if w.route in self._lossy:
            self._move(sock, w, None)
            return
        self._watched[sock] = w
        if not self._loop.running:
            self._loop.start(self.interval, now=True)

    def forget(self, sock: socket.socket) -> None:
        w = self._watched.pop(sock, None)
        if w is not None and not any(o.route == w.route for o in self._watched.values()):
            self._votes.pop(w.route, None)
        if not self._watched and self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        verdicts: dict[Route, list[bool | None]] = {}
        evidence: dict[Route, TcpSample] = {}
        for sock, w in self._watched.items():
            sample = self._read(sock)
            if sample is None:
                continue
            before, w.last = w.last, sample
            verdict = random_loss(before, sample) if before is not None else None
            verdicts.setdefault(w.route, []).append(verdict)
            if verdict:
                evidence[w.route] = sample
        for route, votes in verdicts.items():
            if self._votes.setdefault(route, RandomLossVote()).round(votes):
                self._lossy[route] = None
                while len(self._lossy) > MAX_LOSSY_ROUTES:
                    del self._lossy[next(iter(self._lossy))]
                for sock, w in list(self._watched.items()):
                    if w.route == route:
                        self.forget(sock)
                        self._move(sock, w, evidence.get(route))

    def _move(self, sock: socket.socket, w: _Watched, sample: TcpSample | None) -> None:
        error = self._switch(sock, self.upgrade)
        if error:
            self.log.warn(
                "congestion control: subflow {name} keeps its algorithm: "
                "{upgrade} could not be set ({error})",
                name=printable(w.name),
                upgrade=self.upgrade,
                error=error,
            )
            return
        self.switches += 1
        w.switched(self._algorithm(sock))
        # A line a minute at most: a busy server moves many subflows.
        others = self._throttle.due(self._clock.seconds())
        if others is None:
            return
        why = (
            f"it lost packets at {sample.rtt_us / 1000:.1f} ms RTT (lowest "
            f"{sample.min_rtt_us / 1000:.1f} ms), so no queue was full"
            if sample is not None
            else "its route is known to lose packets at random"
        )
        self.log.info(
            "congestion control: subflow {name} moved to {upgrade}: {why}{more}",
            name=printable(w.name),
            upgrade=self.upgrade,
            why=why,
            more=f" ({others} more moved since the last line)" if others else "",
        )


def subflow_congestion(clock: IReactorTime, choice: Choice | None) -> SubflowCongestion:
    """The settings' ``congestion`` and ``loss_watch`` for a start-up choice."""
    if choice is None:
        return {"congestion": None, "loss_watch": None}
    return {
        "congestion": choice.algorithm if choice.apply else None,
        "loss_watch": LossWatch(clock, choice.upgrade) if choice.upgrade else None,
    }
