"""``--congestion auto`` moves a subflow to BBR once it shows random loss:
the pure verdict on kernel readings, the watcher on ``task.Clock``, the
subflow's registration, and a real socket switched in place (issue 11)."""

from __future__ import annotations

import socket

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from stripeproxy.core.congestion import (
    RANDOM_LOSS_RTT_SLACK_US,
    Choice,
    RandomLossVote,
    random_loss,
)
from stripeproxy.core.kcontrol import TcpSample
from stripeproxy.net import loss_watch
from stripeproxy.net.congestion import in_use, read_kernel, set_algorithm
from stripeproxy.net.loss_watch import LossWatch, subflow_congestion
from stripeproxy.net.subflow import SubflowProtocol


def reading(retrans: int, rtt_ms: float, min_rtt_ms: float = 80.0) -> TcpSample:
    return TcpSample(
        ca_state=0,
        total_retrans=retrans,
        snd_cwnd=40,
        unacked=20,
        notsent_bytes=0,
        delivery_rate=1_000_000,
        app_limited=False,
        rtt_us=int(rtt_ms * 1000),
        min_rtt_us=int(min_rtt_ms * 1000),
    )


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        (reading(10, 81), None),  # no new loss: no verdict
        (reading(11, 81), True),  # lost at the base RTT: random
        (reading(11, 100), True),  # within 1.25 x lowest + 2 ms
        (reading(11, 103), False),  # behind a standing queue: congestion
        (reading(11, 140), False),
        (reading(11, 0), None),  # the kernel gave no RTT
        (reading(11, 81, 0), None),
        # A LAN path: a millisecond of noise is not a queue, 10 ms is.
        (reading(11, 0.2 + RANDOM_LOSS_RTT_SLACK_US / 1000, 0.2), True),
        (reading(11, 10, 0.2), False),
    ],
)
def test_random_loss(after: TcpSample, expected: bool | None) -> None:
    assert random_loss(reading(10, 80), after) is expected


def test_a_route_needs_two_random_rounds_more_than_congested_ones() -> None:
    v = RandomLossVote()
    assert v.round([None, None]) is False  # no loss: no change
    assert v.round([True, None]) is False  # one random-loss round: +1
    assert v.round([False, False, True]) is False  # mostly congested: -1
    assert v.round([True, False]) is False  # a tie: no change
    assert v.round([True]) is False  # +1
    assert v.round([True, True]) is True  # +1: the verdict
    assert v.decided and v.round([True]) is False  # given once only


def test_a_congested_route_never_decides() -> None:
    """A slow start that overshoots (one round of losses at a low smoothed
    RTT) followed by losses behind a full queue: no move."""
    v = RandomLossVote()
    rounds = [[True, True, None], *[[False, False, None]] * 40]
    assert not any(v.round(r) for r in rounds)


class Recorder:
    """Stand-ins for TCP_INFO, setsockopt and the algorithm in use."""

    def __init__(self, refuse: str = "") -> None:
        self.routes: dict[socket.socket, tuple[str, str]] = {}
        self.readings: dict[socket.socket, list[TcpSample]] = {}
        self.reads = 0
        self.set: list[tuple[socket.socket, str]] = []
        self.refuse = refuse

    def read(self, sock: socket.socket) -> TcpSample | None:
        self.reads += 1
        queue = self.readings.get(sock, [])
        return queue.pop(0) if queue else None

    def switch(self, sock: socket.socket, name: str) -> str:
        self.set.append((sock, name))
        return self.refuse

    def route(self, sock: socket.socket) -> tuple[str, str]:
        return self.routes.get(sock, ("192.0.2.1", "198.51.100.1"))

    def algorithm(self, sock: socket.socket) -> str:
        return "bbr" if any(s is sock for s, _ in self.set) and not self.refuse else "cubic"


def watch_with(clock: Clock, rec: Recorder) -> LossWatch:
    return LossWatch(
        clock,
        "bbr",
        0.5,
        read=rec.read,
        switch=rec.switch,
        algorithm=rec.algorithm,
        route=rec.route,
    )


def capture() -> tuple[list[str], object]:
    lines: list[str] = []

    def observer(event: LogEvent) -> None:
        if event.get("log_namespace", "").startswith(loss_watch.__name__):
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    return lines, observer


def test_only_the_lossy_subflow_moves_and_the_timer_stops_when_none_is_left() -> None:
    clock, rec = Clock(), Recorder()
    w = watch_with(clock, rec)
    lossy, clean = socket.socket(), socket.socket()
    rec.routes = {lossy: ("10.0.0.9", "10.0.0.1"), clean: ("10.0.0.9", "10.0.0.2")}
    moved: dict[str, str | None] = {}
    rec.readings[lossy] = [reading(0, 80), reading(2, 81), reading(4, 80)]
    rec.readings[clean] = [reading(0, 40, 40)] + [reading(5 * i, 110, 40) for i in range(1, 9)]
    lines, observer = capture()
    try:
        w.watch(lossy, "10.0.0.1:8443", lambda cc: moved.__setitem__("lossy", cc))
        w.watch(clean, "10.0.0.2:8443", lambda cc: moved.__setitem__("clean", cc))
        for _ in range(8):
            clock.advance(0.5)
    finally:
        globalLogPublisher.removeObserver(observer)  # type: ignore[arg-type]
        lossy.close()
        clean.close()
    assert moved == {"lossy": "bbr"}
    assert rec.set == [(lossy, "bbr")]
    assert w.switches == 1
    assert len(lines) == 1 and "subflow 10.0.0.1:8443 moved to bbr" in lines[0]
    assert "80.0 ms RTT (lowest 80.0 ms)" in lines[0]
    # The clean subflow is still read; once it goes, nothing runs.
    before = rec.reads
    clock.advance(0.5)
    assert rec.reads == before + 1
    w.forget(clean)
    assert clock.getDelayedCalls() == []


def test_a_refused_switch_is_logged_and_not_retried() -> None:
    clock, rec = Clock(), Recorder(refuse="Operation not permitted")
    w = watch_with(clock, rec)
    sock = socket.socket()
    rec.readings[sock] = [reading(0, 80), reading(2, 81), reading(4, 80), reading(6, 80)]
    moved: list[str | None] = []
    lines, observer = capture()
    try:
        w.watch(sock, "peer\x1b[2J", moved.append)
        for _ in range(5):
            clock.advance(0.5)
    finally:
        globalLogPublisher.removeObserver(observer)  # type: ignore[arg-type]
        sock.close()
    assert moved == [] and len(rec.set) == 1 and w.switches == 0
    assert len(lines) == 1 and "keeps its algorithm" in lines[0]
    assert "\x1b" not in lines[0]  # the name is escaped
    assert clock.getDelayedCalls() == []


def test_settings_follow_the_start_up_choice() -> None:
    clock = Clock()
    assert subflow_congestion(clock, None) == {"congestion": None, "loss_watch": None}
    fixed = subflow_congestion(clock, Choice("reno", True, ""))
    assert fixed == {"congestion": "reno", "loss_watch": None}
    auto = subflow_congestion(clock, Choice("cubic", False, "", "bbr"))
    assert auto["congestion"] is None
    assert auto["loss_watch"] is not None and auto["loss_watch"].upgrade == "bbr"


class _Transport:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def getHandle(self) -> socket.socket:
        return self.sock

    def getPeer(self) -> str:
        return "peer"


class _Subflow(SubflowProtocol):
    def start_handshake(self) -> None:
        pass


def test_a_subflow_is_watched_while_connected() -> None:
    clock, rec = Clock(), Recorder()
    w = watch_with(clock, rec)
    with socket.socket() as sock:
        proto = _Subflow(clock, False, 10.0, loss_watch=w)
        proto.makeConnection(_Transport(sock))  # type: ignore[arg-type]
        assert clock.getDelayedCalls()  # the handshake timer and the watch
        rec.readings[sock] = [reading(0, 80), reading(2, 81), reading(4, 80)]
        proto.cc = "cubic"
        for _ in range(3):
            clock.advance(0.5)
        assert rec.set == [(sock, "bbr")] and proto.cc == "bbr"
        proto.connectionLost(None)
    assert w.switches == 1
    assert clock.getDelayedCalls() == []


_KERNEL = read_kernel()


@pytest.mark.skipif(
    "bbr" not in _KERNEL.available or not (_KERNEL.privileged or "bbr" in _KERNEL.allowed),
    reason="needs BBR loaded and settable",
)
def test_a_connected_socket_moves_in_place_and_keeps_its_data() -> None:
    """Linux switches a live connection's algorithm: bytes before and after arrive."""
    with socket.create_server(("127.0.0.1", 0)) as ls:
        a = socket.create_connection(ls.getsockname())
        b, _ = ls.accept()
        with a, b:
            a.sendall(b"before ")
            clock = Clock()
            w = LossWatch(clock, "bbr", read=lambda s: None)
            assert in_use(a) != "bbr" or _KERNEL.default == "bbr"
            assert set_algorithm(a, w.upgrade) == ""
            a.sendall(b"after")
            a.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := b.recv(100):
                got += chunk
            assert got == b"before after"
            assert in_use(a) == "bbr"


def test_moves_are_logged_once_a_minute_with_a_count() -> None:
    clock, rec = Clock(), Recorder()
    w = watch_with(clock, rec)
    socks = [socket.socket() for _ in range(4)]
    lines, observer = capture()
    try:
        for i, sock in enumerate(socks[:3]):
            rec.readings[sock] = [reading(0, 80), reading(2, 81), reading(4, 80)]
            w.watch(sock, f"s{i}", lambda cc: None)
        for _ in range(3):
            clock.advance(0.5)
        clock.advance(60)
        rec.readings[socks[3]] = [reading(0, 80), reading(2, 81), reading(4, 80)]
        w.watch(socks[3], "s3", lambda cc: None)
        for _ in range(3):
            clock.advance(0.5)
    finally:
        globalLogPublisher.removeObserver(observer)  # type: ignore[arg-type]
        for sock in socks:
            sock.close()
    assert w.switches == 4
    assert len(lines) == 2
    assert "subflow s0 moved" in lines[0] and "more moved" not in lines[0]
    assert "subflow s3 moved" in lines[1] and "(2 more moved since the last line)" in lines[1]
    assert "its route is known to lose packets at random" in lines[1]


def test_a_route_moves_together_and_its_later_subflows_start_moved() -> None:
    """Two subflows of one path: one sees random loss, the other (given little
    data) none; both move.  A re-dial on that route moves at once; a subflow
    of another route is judged on its own."""
    clock, rec = Clock(), Recorder()
    w = watch_with(clock, rec)
    busy, quiet, again, other = (socket.socket() for _ in range(4))
    lte = ("10.64.3.2", "203.0.113.7")
    rec.routes = {busy: lte, quiet: lte, again: lte, other: ("192.168.1.20", "203.0.113.7")}
    rec.readings[busy] = [reading(0, 80), reading(2, 81), reading(4, 80)]
    rec.readings[quiet] = [reading(0, 80)] * 3
    rec.readings[other] = [reading(0, 20, 20)] * 6
    try:
        for sock in (busy, quiet, other):
            w.watch(sock, "x", lambda cc: None)
        for _ in range(3):
            clock.advance(0.5)
        assert {s for s, _ in rec.set} == {busy, quiet}
        w.forget(busy)
        w.watch(again, "re-dial", lambda cc: None)
        assert [s for s, _ in rec.set][-1] is again
        clock.advance(0.5)
        assert other not in {s for s, _ in rec.set} and w.switches == 3
    finally:
        for sock in (busy, quiet, again, other):
            sock.close()
