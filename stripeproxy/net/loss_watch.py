"""Moves a subflow to a loss-tolerant congestion control once its path shows random loss.

``--congestion auto`` starts subflows on the system default (CUBIC on Linux),
which fills a clean path and shares it like any TCP flow, and moves a subflow
to BBR only when its own readings say the path drops packets with no queue
to blame (:class:`stripeproxy.core.congestion.RandomLossDetector`).  One
:class:`LossWatch` per process reads ``TCP_INFO`` of every watched subflow
each ``interval`` while there are any (no timer runs otherwise), and each
subflow is judged on its own path: with several uplinks one may be lossy
and the other clean.  Linux switches a connected socket's algorithm in
place, so the subflow, its session and its data are untouched.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TypedDict

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from stripeproxy.core.congestion import Choice, RandomLossDetector
from stripeproxy.core.escape import printable
from stripeproxy.core.kcontrol import TcpSample
from stripeproxy.core.throttle import Throttle
from stripeproxy.net import tcpinfo
from stripeproxy.net.congestion import in_use, set_algorithm

__all__ = ["LossWatch", "SubflowCongestion", "subflow_congestion"]


class SubflowCongestion(TypedDict):
    congestion: str | None
    loss_watch: LossWatch | None


class _Watched:
    def __init__(self, name: str, switched: Callable[[str | None], None]) -> None:
        self.name = name
        self.switched = switched
        self.detector = RandomLossDetector()


class LossWatch:
    """Every watched subflow socket, and the algorithm it moves to."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        upgrade: str,
        interval: float = 0.5,
        read: Callable[[socket.socket], TcpSample | None] = tcpinfo.read,
        switch: Callable[[socket.socket, str], str] = set_algorithm,
        algorithm: Callable[[socket.socket], str | None] = in_use,
    ) -> None:
        self.upgrade = upgrade
        self.interval = interval
        self._read = read
        self._switch = switch
        self._algorithm = algorithm
        self._watched: dict[socket.socket, _Watched] = {}
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self._clock = clock
        self._throttle = Throttle()
        self.switches = 0

    def watch(self, sock: socket.socket, name: str, switched: Callable[[str | None], None]) -> None:
        """Judge ``sock`` (a subflow, ``name`` for the log) from now on;
        ``switched`` gets the algorithm it uses after a move."""
        self._watched[sock] = _Watched(name, switched)
        if not self._loop.running:
            self._loop.start(self.interval, now=True)

    def forget(self, sock: socket.socket) -> None:
        self._watched.pop(sock, None)
        if not self._watched and self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        for sock, w in list(self._watched.items()):
            sample = self._read(sock)
            if sample is None or not w.detector.feed(sample):
                continue
            # Judged once: a moved subflow (or one the kernel refused) is not read again.
            self.forget(sock)
            error = self._switch(sock, self.upgrade)
            if error:
                self.log.warn(
                    "congestion control: subflow {name} keeps its algorithm: "
                    "{upgrade} could not be set ({error})",
                    name=printable(w.name),
                    upgrade=self.upgrade,
                    error=error,
                )
                continue
            self.switches += 1
            w.switched(self._algorithm(sock))
            # A line a minute at most: a busy server moves many subflows.
            others = self._throttle.due(self._clock.seconds())
            if others is None:
                continue
            self.log.info(
                "congestion control: subflow {name} moved to {upgrade}: it lost packets "
                "at {rtt:.1f} ms RTT (lowest {min_rtt:.1f} ms), so no queue was full{more}",
                name=printable(w.name),
                upgrade=self.upgrade,
                rtt=sample.rtt_us / 1000,
                min_rtt=sample.min_rtt_us / 1000,
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
