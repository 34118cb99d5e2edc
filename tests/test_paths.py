"""Paths on the client: ``--path NAME=SOURCE[:K]`` parsed, resolved and pooled.

Pure parsing (tables and Hypothesis), the options' start-up checks, source
resolution with an injected interface list, and pools of dial slots on
``task.Clock`` against the played server of test_dial: a path whose
interface is missing waits and retries on its own, logs one line per
change, and binds to the interface's address once it has one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import Keys
from hypothesis import given
from hypothesis import strategies as st
from test_cli import twistd
from test_dial import PSK, RETRY_MAX, PlayedServer
from twisted.application.service import MultiService
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.python import usage
from zope.interface import implementer

from stripeproxy.cli.client_tap import Options
from stripeproxy.core.paths import (
    AUTO,
    PathSpec,
    PathState,
    SourceKind,
    parse_path,
    parse_subflows,
    validate_paths,
)
from stripeproxy.core.session import SessionConfig
from stripeproxy.net.client import ClientSettings, Overlay
from stripeproxy.net.client_subflow import ClientSubflow, SubflowFactory
from stripeproxy.net.dial import DialEndpoint, DialKind, DialService, DialSlot
from stripeproxy.net.driver import SubflowInfo
from stripeproxy.net.paths import (
    AutoK,
    PathEndpoint,
    PathPool,
    SourceUnavailable,
    check_source,
    resolve_source,
)

A = SourceKind.ADDRESS
I = SourceKind.INTERFACE  # noqa: E741


# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("wifi=wlan0:3", PathSpec("wifi", "wlan0", I, 3)),
        ("lte=wwan0", PathSpec("lte", "wwan0", I, None)),
        ("lte=wwan0:auto", PathSpec("lte", "wwan0", I, AUTO)),
        ("dsl=192.0.2.7", PathSpec("dsl", "192.0.2.7", A, None)),
        ("dsl=192.0.2.7:2", PathSpec("dsl", "192.0.2.7", A, 2)),
        # An IPv6 address without K needs no brackets; with K it does.
        ("v6=2001:db8::7", PathSpec("v6", "2001:db8::7", A, None)),
        ("v6=[2001:DB8::7]:4", PathSpec("v6", "2001:db8::7", A, 4)),
        ("v6=[2001:db8::7]", PathSpec("v6", "2001:db8::7", A, None)),
        ("a_b-1=eth0.100", PathSpec("a_b-1", "eth0.100", I, None)),
        (" x = lo : 1 ", PathSpec("x", "lo", I, 1)),
    ],
)
def test_path_spellings(text: str, spec: PathSpec) -> None:
    assert parse_path(text) == spec


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("wlan0", "expected NAME=SOURCE[:K]"),
        ("wifi=", "expected NAME=SOURCE[:K]"),
        ("=wlan0", "the name must be"),
        ("wi fi=wlan0", "the name must be"),
        ("wifi=wlan0:0", "K must be a number from 1 to 64"),
        ("wifi=wlan0:65", "K must be a number from 1 to 64"),
        ("wifi=wlan0:-1", "K must be a number"),
        ("wifi=wlan0:many", "K must be a number"),
        ("v6=[2001:db8::7", "in brackets"),
        ("v6=[192.0.2.1]:2", "in brackets"),
        ("v6=[2001:db8::7]2", "expected :K after the brackets"),
        ("v6=2001:db8::zz:2", "put an IPv6 address in brackets"),
        ("x=1.2.3", "neither an IP address nor an interface"),
        ("x=wl/an0", "neither an IP address nor an interface"),
    ],
)
def test_bad_paths_say_why(text: str, words: str) -> None:
    with pytest.raises(ValueError, match="--path") as caught:
        parse_path(text)
    assert words in str(caught.value)


@given(st.text(max_size=40))
def test_any_text_is_a_path_or_a_clean_error(text: str) -> None:
    try:
        spec = parse_path(text)
    except ValueError as e:
        assert "\n" not in str(e)
        return
    assert spec.name and spec.source
    assert spec.k is None or spec.k == AUTO or 1 <= int(spec.k) <= 64


_names = st.from_regex(r"[A-Za-z0-9_-]{1,32}", fullmatch=True)
_interfaces = st.from_regex(r"[a-z][a-z0-9_.@-]{0,14}", fullmatch=True)
_counts = st.none() | st.just(AUTO) | st.integers(1, 64)


@given(_names, st.ip_addresses() | _interfaces, _counts)
def test_parse_round_trips(name: str, source: Any, k: int | str | None) -> None:
    text = str(source)
    kind = I if isinstance(source, str) else A
    written = f"[{text}]" if kind is A and source.version == 6 and k is not None else text
    spec = parse_path(f"{name}={written}" + ("" if k is None else f":{k}"))
    assert spec == PathSpec(name, text, kind, k)


def test_subflow_counts() -> None:
    assert parse_subflows("6") == 6
    assert parse_subflows("AUTO") == AUTO
    for bad in ("0", "65", "x", ""):
        with pytest.raises(ValueError, match="--subflows must be"):
            parse_subflows(bad)


def test_names_and_sources_must_differ() -> None:
    wifi = parse_path("wifi=wlan0")
    validate_paths([wifi, parse_path("lte=wwan0")])
    with pytest.raises(ValueError, match="--path wifi is given twice"):
        validate_paths([wifi, parse_path("wifi=wwan0")])
    with pytest.raises(ValueError, match="--path wifi and --path other both leave from wlan0"):
        validate_paths([wifi, parse_path("other=wlan0:2")])


# ------------------------------------------------------------------ options


def _options(keys: Keys, *argv: str) -> Options:
    options = Options()
    options.parseOptions(["--psk-file", keys.psk, "--no-tls", "--no-tui", *argv])
    return options


def test_paths_and_auto_in_the_options(keys: Keys) -> None:
    options = _options(keys, "--path", "a=127.0.0.1:2", "--path", "b=lo", "--subflows", "auto")
    assert options["paths"] == [PathSpec("a", "127.0.0.1", A, 2), PathSpec("b", "lo", I, None)]
    assert options["subflows"] == AUTO
    assert (options["subflows-min"], options["subflows-max"]) == (2, 16)
    assert _options(keys)["paths"] == []
    assert _options(keys)["subflows"] == 6


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--path", "a=lo", "--path", "a=eth9"], "--path a is given twice"),
        (["--path", "a=lo:0"], "--path a: K must be a number from 1 to 64"),
        (["--path", "a=198.51.100.77"], "--path a: 198.51.100.77 is not an address of this host"),
        (["--path", "a=::1", "--server", "127.0.0.1:1"], "IPv6 source cannot reach an IPv4"),
        (["--path", "a=lo", "--server", "tcp:127.0.0.1:1"], "--path needs --server as host:port"),
        (["--subflows", "auto", "--subflows-min", "5", "--subflows-max", "4"], "--subflows-min"),
        (["--subflows-max", "65"], "--subflows-max (65) <= 64"),
        (["--subflows", "0"], "--subflows must be a number from 1 to 64"),
    ],
)
def test_path_option_errors(keys: Keys, argv: list[str], words: str) -> None:
    with pytest.raises(usage.UsageError) as caught:
        _options(keys, *argv)
    assert words in str(caught.value)


def test_under_twistd_a_bad_path_is_one_line_and_status_2(keys: Keys, tmp_path: Path) -> None:
    result = twistd(
        tmp_path, "stripe-client", "--psk-file", keys.psk, "--no-tls", "--path", "a=198.51.100.77"
    )
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("stripe-client: --path a: 198.51.100.77 is not an address of this host")
    assert line.endswith("(see: twistd stripe-client --help)")


def test_a_local_address_binds_and_a_foreign_one_does_not() -> None:
    assert check_source("127.0.0.1") is None
    assert check_source("127.0.0.2") is None  # Linux routes all of 127/8 to lo
    assert check_source("198.51.100.77") is not None


# --------------------------------------------------------------- resolution


def _adapters(table: dict[str, list[str]]) -> Any:
    return lambda: table


def test_resolve_an_address_or_an_interface() -> None:
    table = {"wlan0": ["fe80::1", "192.0.2.7", "2001:db8::7"], "tun0": ["fe80::2"]}
    up: Any = lambda name: "up"  # noqa: E731
    assert resolve_source(parse_path("a=198.51.100.1"), 4, _adapters({}), up) == "198.51.100.1"
    assert resolve_source(parse_path("w=wlan0"), 4, _adapters(table), up) == "192.0.2.7"
    # IPv6: not the link-local one (it reaches nothing beyond the link).
    assert resolve_source(parse_path("w=wlan0"), 6, _adapters(table), up) == "2001:db8::7"
    with pytest.raises(SourceUnavailable, match="interface tun0 has no IPv4 address"):
        resolve_source(parse_path("t=tun0"), 4, _adapters(table), up)
    with pytest.raises(SourceUnavailable, match="there is no interface wwan0"):
        resolve_source(parse_path("l=wwan0"), 4, _adapters(table), up)
    down: Any = lambda name: "down"  # noqa: E731
    with pytest.raises(SourceUnavailable, match="interface wlan0 is down"):
        resolve_source(parse_path("w=wlan0"), 4, _adapters(table), down)


def test_the_real_loopback_interface_resolves() -> None:
    assert resolve_source(parse_path("l=lo"), 4) == "127.0.0.1"


# ------------------------------------------------------------------- state


def test_path_state_lines() -> None:
    state = PathState("lte", 0.0)
    assert state.down("there is no interface wwan0", 1.0) == (
        "path lte down: there is no interface wwan0"
    )
    assert state.down("there is no interface wwan0", 2.0) is None  # said already
    assert state.down("interface wwan0 has no IPv4 address", 3.0) == (
        "path lte down: interface wwan0 has no IPv4 address"
    )
    assert state.subflow_joined(4.0) == "path lte up"
    assert state.subflow_joined(4.5) is None
    assert state.down("connection refused", 5.0) is None  # one slot failed, one is up
    assert state.subflow_lost("reset", 6.0) is None
    assert state.subflow_lost("reset", 7.0) == "path lte down: its last subflow was lost (reset)"
    assert (state.state, state.since) == ("down", 7.0)
    # The address goes while subflows use it: down at once, their losses say nothing more.
    assert state.subflow_joined(8.0) == "path lte up"
    assert state.source_gone("there is no interface wwan0", 9.0) == (
        "path lte down: there is no interface wwan0"
    )
    assert state.subflow_lost("closed by this client", 9.1) is None
    assert (state.state, state.why, state.joined) == ("down", "there is no interface wwan0", 0)


# ------------------------------------------------------------- pools on a Clock


@implementer(IStreamClientEndpoint)
class Bound:
    """The played server, reached from ``address`` (the transport's local end says so)."""

    def __init__(self, server: PlayedServer, address: str) -> None:
        self.server = server
        self.address = address

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        d = self.server.connect(factory)
        if self.server.transports:
            self.server.transports[-1].hostAddr = IPv4Address("TCP", self.address, 40000)
        return d


class Bench:
    """Pools of slots on a clock, each path dialling the same played server."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.server = PlayedServer(self.clock, "welcome")
        # The played server answers no PING: no heartbeat silence within a test.
        config = SessionConfig(heartbeat_interval=1000.0, dead_interval=3000.0)
        settings = ClientSettings(reactor=self.clock, psk=PSK, config=config, handshake_timeout=2.0)
        self.overlay = Overlay(settings)
        self.top = MultiService()  # type: ignore[no-untyped-call]
        self.numbers = itertools.count(1)
        self.interfaces: dict[str, list[str]] = {}
        self.bound: list[tuple[str, str]] = []  # (path, source address) per dial

    def pool(self, text: str, k: int) -> PathPool:
        spec = parse_path(text)
        factory = SubflowFactory(self.overlay, RETRY_MAX, spec.name)
        factory.redial.jitter = lambda: 0.0

        def build(number: int, pool: PathPool) -> DialService:
            assert pool.endpoint is not None
            slot = DialSlot(number, "server:1", False, RETRY_MAX, self.clock, path=pool.path)
            return DialService(
                DialEndpoint(pool.endpoint, factory, slot), factory.redial.delay, self.clock
            )

        def dial(address: str) -> IStreamClientEndpoint:
            self.bound.append((spec.name, address))
            return Bound(self.server, address)

        pool = PathPool(spec.name, spec.source, self.clock, build, self.numbers)
        pool.endpoint = PathEndpoint(
            self.clock,
            "192.0.2.1",
            1,
            5.0,
            spec,
            pool,
            resolve=lambda spec, family: resolve_source(
                spec, family, lambda: self.interfaces, lambda name: None
            ),
            dial=dial,
        )
        pool.factory = factory
        if spec.kind is I:
            assert isinstance(pool.endpoint, PathEndpoint)
            pool.source_check = pool.endpoint.current
        pool.resize(k)
        pool.setServiceParent(self.top)  # type: ignore[no-untyped-call]
        return pool

    def run(self, seconds: float, step: float = 0.05) -> None:
        for _ in range(round(seconds / step)):
            self.clock.advance(step)

    def stop(self) -> None:
        self.top.stopService()  # type: ignore[no-untyped-call]
        self.overlay.close("test finished")
        self.run(1)
        assert self.clock.getDelayedCalls() == []


def _subflows(pool: PathPool) -> list[ClientSubflow]:
    return [s.slot.subflow for s in pool.slots if s.slot.subflow is not None]


def test_a_missing_interface_waits_alone_and_comes_back(log_messages: list[str]) -> None:
    bench = Bench()
    wifi = bench.pool("wifi=198.51.100.3:2", 2)
    lte = bench.pool("lte=wwan0:2", 2)
    bench.top.startService()  # type: ignore[no-untyped-call]
    bench.run(1)
    # wifi joined at once; lte failed without dialling anything, and backs off.
    assert [s.path for s in _subflows(wifi)] == ["wifi", "wifi"]
    assert _subflows(lte) == []
    assert {s.slot.error.kind for s in lte.slots if s.slot.error} == {DialKind.NO_SOURCE}
    assert lte.status().state == "down" and wifi.status().state == "up"
    bench.run(20)
    tries = sum(s.slot.failed_total for s in lte.slots)
    assert 4 <= tries <= 2 * 6  # 0.5, 1, 2, 4, 8, 10 s apart: backoff, not a busy loop
    assert all(s.slot.failed_total == 0 for s in wifi.slots)  # undisturbed
    lines = [m for m in log_messages if m.startswith("path ")]
    assert lines == ["path lte down: there is no interface wwan0", "path wifi up"]
    bench.interfaces["wwan0"] = ["fe80::9"]
    bench.run(11)
    assert lte.status().why == "interface wwan0 has no IPv4 address"
    bench.interfaces["wwan0"] = ["fe80::9", "203.0.113.9"]
    bench.run(11)
    assert len(_subflows(lte)) == 2
    assert lte.status().address == "203.0.113.9"
    assert {a for p, a in bench.bound if p == "lte"} == {"203.0.113.9"}
    assert {a for p, a in bench.bound if p == "wifi"} == {"198.51.100.3"}
    lines = [m for m in log_messages if m.startswith("path ")]
    assert lines[2:] == ["path lte down: interface wwan0 has no IPv4 address", "path lte up"]
    # A new address is picked at the next dial.
    bench.interfaces["wwan0"] = ["203.0.113.10"]
    _subflows(lte)[0].transport.loseConnection()
    bench.run(2)
    assert bench.bound[-1] == ("lte", "203.0.113.10")
    assert len(_subflows(lte)) == 2
    said = len([m for m in log_messages if m.startswith("path ")])
    bench.stop()
    # Stopping the client closes every subflow on purpose: no path is "down".
    assert len([m for m in log_messages if m.startswith("path ")]) == said


def test_losing_every_subflow_takes_the_path_down(log_messages: list[str]) -> None:
    bench = Bench()
    lte = bench.pool("lte=198.51.100.4:2", 2)
    bench.top.startService()  # type: ignore[no-untyped-call]
    bench.run(1)
    bench.server.behaviour = "refuse"
    for subflow in _subflows(lte):
        subflow.transport.loseConnection()
    bench.run(3)
    lines = [m for m in log_messages if m.startswith("path ")]
    assert lines == [
        "path lte up",
        "path lte down: its last subflow was lost (closed by the server)",
        # A new reason is a new line; the same one again is not.
        "path lte down: connection refused (is stripe-server running and listening there?)",
    ]
    bench.stop()


def test_an_address_that_goes_closes_its_subflows_at_once(log_messages: list[str]) -> None:
    bench = Bench()
    bench.interfaces["wwan0"] = ["203.0.113.9"]
    lte = bench.pool("lte=wwan0:2", 2)
    bench.top.startService()  # type: ignore[no-untyped-call]
    bench.run(1)
    first = _subflows(lte)
    assert len(first) == 2
    # The address changes: within WATCH (1 s) the subflows move to the new one.
    bench.interfaces["wwan0"] = ["203.0.113.10"]
    bench.run(2.5)
    assert all(s.transport.disconnected for s in first)
    assert len(_subflows(lte)) == 2
    assert {a for _, a in bench.bound[-2:]} == {"203.0.113.10"}
    # The interface goes: down at once, with the reason, and the slots wait.
    del bench.interfaces["wwan0"]
    bench.run(1.5)
    assert _subflows(lte) == []
    bench.run(10)
    bench.interfaces["wwan0"] = ["203.0.113.11"]
    bench.run(12)
    assert len(_subflows(lte)) == 2
    lines = [m for m in log_messages if m.startswith("path ")]
    assert lines == [
        "path lte up",
        "path lte: wwan0 has a new address, 203.0.113.10: moving its subflows there",
        "path lte down: there is no interface wwan0",
        "path lte up",
    ]
    bench.stop()


# -------------------------------------------------------------- auto K on a Clock


class FakeDriver:
    label = "c0ffee00"

    def __init__(self) -> None:
        self.rows: dict[int, SubflowInfo] = {}
        self.buffered = 0

    def set(self, sid: int, real: int, retransmitted: int = 0, writable: bool = True) -> None:
        totals = {"tx_real": real, "tx_dummy": 0, "rx_real": real, "rx_dummy": 0}
        self.rows[sid] = SubflowInfo(sid, "?", writable, 0.01, 0, totals, retransmitted)

    def subflow_info(self) -> list[SubflowInfo]:
        return list(self.rows.values())

    def buffered_bytes(self) -> int:
        return self.buffered


class FakeSubflow:
    transport = None

    def __init__(self, driver: FakeDriver, sid: int) -> None:
        self.driver = driver
        self.sid = sid


class FakeService:
    def __init__(self, subflow: FakeSubflow | None) -> None:
        self.slot = type("Slot", (), {"subflow": subflow})()


class FakePool:
    path = "lte"

    def __init__(self, services: list[FakeService]) -> None:
        self.slots = services
        self.k_reason = ""
        self.sizes: list[int] = []

    @property
    def target(self) -> int:
        return len(self.slots)

    def resize(self, k: int) -> None:
        self.sizes.append(k)


@dataclass(frozen=True)
class Decision:
    target: int
    reason: str


class OneDecision:
    """Says 5 on its third look, nothing otherwise; keeps what it heard."""

    def __init__(self) -> None:
        self.heard: list[tuple[float, int, float, bool, bool]] = []
        self.reason = "start"
        self.target = 3

    def observe(
        self, now: float, k_open: int, goodput_bps: float, busy: bool, loss_limited: bool
    ) -> Decision | None:
        self.heard.append((now, k_open, goodput_bps, busy, loss_limited))
        if len(self.heard) == 3:
            self.target, self.reason = 5, "goodput +18% with 5"
            return Decision(5, self.reason)
        return None


def test_auto_k_feeds_the_controller_and_applies_its_decision(log_messages: list[str]) -> None:
    clock = Clock()
    driver = FakeDriver()
    pool = FakePool([FakeService(FakeSubflow(driver, sid)) for sid in (1, 2, 3)])
    pool.slots.append(FakeService(None))  # a slot still dialling
    controller = OneDecision()
    auto = AutoK(pool, controller, clock)  # type: ignore[arg-type]
    for sid in (1, 2, 3):
        driver.set(sid, 0)
    auto.start()
    clock.advance(0.5)  # the first look: nothing moved yet
    driver.set(1, 256 * 1024)
    driver.set(2, 256 * 1024, retransmitted=4096)  # one of two busy subflows re-sent
    clock.advance(0.5)
    driver.set(3, 0, writable=False)  # idle, but full: limited too
    driver.buffered = 1
    clock.advance(0.5)
    assert controller.heard == [
        (0.5, 3, 0.0, False, False),
        (1.0, 3, 2 * 1024 * 1024.0, True, True),
        (1.5, 3, 0.0, True, True),
    ]
    assert pool.sizes == [5] and pool.k_reason == "goodput +18% with 5"
    assert "path lte: subflows 4 -> 5 (goodput +18% with 5)" in log_messages
    auto.stop()
    assert clock.getDelayedCalls() == []


def test_a_subflow_this_client_closes_is_no_news(log_messages: list[str]) -> None:
    """With TLS an abort reads "connection lost"; the slot knows it closed it itself."""
    bench = Bench()
    lte = bench.pool("lte=198.51.100.4:2", 2)
    bench.top.startService()  # type: ignore[no-untyped-call]
    bench.run(1)
    first, second = _subflows(lte)
    first.transport.abortConnection = lambda: first.transport._close(error.ConnectionLost())
    first.abort()
    second.transport.loseConnection()  # the server closed this one
    bench.run(0.1)
    lost = [m for m in log_messages if ": lost (" in m]
    assert lost == ["subflow 2 to server:1: lost (closed by the server); dialling again"]
    assert lte.status().state == "down"
    assert lte.status().why == "its last subflow was lost (closed by the server)"
    bench.stop()
