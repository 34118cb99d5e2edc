"""Views per path: the monitor tags subflows with their path and sums each path up;
the dashboard groups by path; the metrics carry a ``path`` label."""

from __future__ import annotations

import io
from dataclasses import replace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from test_dashboard import LOG, _busy, _live_screen, _screen_text
from twisted.internet.task import Clock

from stripeproxy.core.paths import PathStatus
from stripeproxy.net.dial import DialStatus
from stripeproxy.net.driver import StreamInfo, SubflowInfo
from stripeproxy.ops.dashboard import _Fit, _Frame, render
from stripeproxy.ops.metrics import SnapshotCollector
from stripeproxy.ops.observe import Monitor, Snapshot

MiB = 1024 * 1024


class Driver:
    """A session as the monitor reads it: three subflows with fixed figures."""

    label = "c0ffee00"

    def __init__(self) -> None:
        self.sent = {1: 0, 2: 0, 3: 0}
        # sid -> (chunks that waited for another subflow's, seconds they waited,
        # seconds others waited for this one's)
        self.waits = {1: (0, 0.0, 0.0), 2: (0, 0.0, 0.0), 3: (0, 0.0, 0.0)}

    def counters(self) -> dict[str, int]:
        names = ("tx_real", "tx_dummy", "rx_real", "rx_dummy", "retransmitted", "reinjected")
        return dict.fromkeys((*names, "timeouts", "subflows_lost"), 0)

    def buffered_bytes(self) -> int:
        return 0

    def subflow_info(self) -> list[SubflowInfo]:
        return [
            SubflowInfo(
                sid,
                f"192.0.2.9:{sid}",
                True,
                rtt,
                0,
                {"tx_real": self.sent[sid], "tx_dummy": 0, "rx_real": 0, "rx_dummy": 0},
                retx,
                reorder_waits=self.waits[sid][0],
                reorder_wait_s=self.waits[sid][1],
                blocked_wait_s=self.waits[sid][2],
            )
            for sid, rtt, retx in ((1, 0.020, 0), (2, 0.050, 4096), (3, 0.030, 0))
        ]

    def stream_info(self) -> list[StreamInfo]:
        return []


def _dial(slot: int, path: str, sid: int) -> DialStatus:
    return DialStatus(slot, "server:443", "up", None, 0, 0, 0.0, path, "c0ffee00", sid)


def _path(name: str, target: int, **more: object) -> PathStatus:
    fields: dict[str, object] = {
        "name": name,
        "source": {"wifi": "wlan0", "lte": "wwan0"}.get(name, ""),
        "state": "up",
        "why": "",
        "address": {"wifi": "192.168.1.20", "lte": "10.64.3.2"}.get(name, ""),
        "open": target,
        "target": target,
        "auto": False,
        "k_reason": "",
        "tcp_retransmits": 0,
        "since": 0.0,
    }
    fields.update(more)
    return PathStatus(**fields)  # type: ignore[arg-type]


def _monitor() -> tuple[Monitor, Driver, Clock]:
    clock = Clock()
    driver = Driver()
    dials = [_dial(1, "wifi", 1), _dial(2, "lte", 2), _dial(3, "wifi", 3), _dial(4, "lte", 0)]
    paths = [
        _path("wifi", 2, auto=True, k_reason="goodput +18% with 2", tcp_retransmits=7),
        _path("lte", 2, open=1),
    ]
    monitor = Monitor("client", clock, lambda: [driver], dials=lambda: dials, paths=lambda: paths)
    return monitor, driver, clock


def _sampled() -> tuple[Monitor, Snapshot]:
    """The monitor after one second in which wifi's subflow 1 sent 3 MiB and lte's 1 MiB,
    and 10 chunks of wifi's subflow 3 waited 50 ms each for lte's late ones."""
    monitor, driver, clock = _monitor()
    monitor.sample()
    clock.advance(1.0)
    driver.sent = {1: 3 * MiB, 2: 1 * MiB, 3: 0}
    driver.waits = {1: (0, 0.0, 0.0), 2: (0, 0.0, 0.5), 3: (10, 0.5, 0.0)}
    return monitor, monitor.sample()


def test_the_monitor_tags_subflows_and_sums_paths() -> None:
    _, snap = _sampled()
    assert [(r.sid, r.path) for r in snap.subflows] == [(1, "wifi"), (2, "lte"), (3, "wifi")]
    wifi, lte = snap.paths
    assert (wifi.name, wifi.open, wifi.target, wifi.auto) == ("wifi", 2, 2, True)
    assert wifi.rtt_ms == 20.0  # the lower of its subflows' RTTs
    assert (lte.rtt_ms, lte.retransmitted, wifi.retransmitted) == (50.0, 4096, 0)
    assert wifi.rates["tx_real"] > 0 and lte.rates["tx_real"] > 0
    assert round(wifi.share, 2) == 0.75 and round(lte.share, 2) == 0.25
    assert (wifi.tcp_retransmits, wifi.k_reason) == (7, "goodput +18% with 2")
    # Head-of-line: wifi's chunks waited 50 ms on average; none of lte's waited.
    sf3 = snap.subflows[2]
    assert sf3.reorder_ms is not None and round(sf3.reorder_ms, 3) == 50.0
    assert snap.subflows[0].reorder_ms is None
    assert wifi.reorder_ms is not None and round(wifi.reorder_ms, 3) == 50.0
    assert lte.reorder_ms is None


def _snapshot() -> Snapshot:
    _, snap = _sampled()
    down = _path("lte", 2, open=0, state="down", why="interface wwan0 has no IPv4 address")
    return replace(snap, paths=(snap.paths[0], replace(snap.paths[1], state="down", why=down.why)))


def test_the_dashboard_groups_subflows_by_path() -> None:
    lines = _screen_text(render(_snapshot(), ["a log line"]), 180, 40)
    title = lines.index(next(line for line in lines if line.startswith("paths")))
    rows = [[c.strip() for c in line.split("│")] for line in lines[title:] if "│" in line]
    wifi = next(r for r in rows if r[1] == "wifi")
    lte = next(r for r in rows if r[1] == "lte")
    assert wifi[2:4] == ["up", "2/2 auto"] and wifi[6] == "75%" and wifi[7] == "20.0"
    assert wifi[9:] == ["7", "50.0", "wlan0 192.168.1.20", "K: goodput +18% with 2", ""]
    assert lte[2:4] == ["down", "1/2"] and lte[6] == "25%" and lte[8] == "4.0 KiB"
    assert lte[10] == "-" and lte[12] == "interface wwan0 has no IPv4 address"
    # The subflow table: a path column, rows grouped by it.
    header = next(line for line in lines if "RTT ms" in line and "peer" in line)
    assert [c.strip() for c in header.split("┃")][2] == "path"
    subflows = [line for line in lines if "192.0.2.9:" in line]
    assert [line.split("│")[2].strip() for line in subflows] == ["lte", "wifi", "wifi"]


def test_paths_fit_a_small_terminal_and_are_counted() -> None:
    snap = replace(_busy(), paths=_snapshot().paths)
    screen, height = _live_screen(render(snap, LOG, (80, 24)), 80, 24)
    assert height <= 24
    assert any(line.startswith("paths") for line in screen)
    assert any(line.startswith("wifi") for line in screen)
    for compact in (False, True):
        frame = _Frame(snap, LOG, 100)
        fit = _Fit(100, compact)
        console = Console(file=io.StringIO(), width=100, height=1000)
        drawn = console.render_lines(frame.draw(fit), console.options, pad=False)
        assert len(drawn) == frame.height(fit)


def test_no_paths_no_paths_table() -> None:
    lines = _screen_text(render(_busy()), 160, 40)
    assert not any(line.startswith("paths") for line in lines)
    header = next(line for line in lines if "RTT ms" in line)
    assert "path" not in header


def test_metrics_carry_the_path() -> None:
    monitor, _ = _sampled()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(monitor))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    paths = {
        dict(labels)["subflow"]: dict(labels)["path"]
        for name, labels in samples
        if name == "stripeproxy_subflow_rtt_seconds"
    }
    assert paths == {"1": "wifi", "2": "lte", "3": "wifi"}
    wifi = (("path", "wifi"), ("role", "client"))
    assert samples[("stripeproxy_path_up", wifi)] == 1
    assert samples[("stripeproxy_path_subflows_target", wifi)] == 2
    assert samples[("stripeproxy_path_tcp_retransmits", wifi)] == 7
    reason = (("path", "wifi"), ("reason", "goodput +18% with 2"), ("role", "client"))
    assert samples[("stripeproxy_path_k_reason", reason)] == 1
    lte = (("direction", "tx"), ("path", "lte"), ("role", "client"))
    assert samples[("stripeproxy_path_real_bytes_per_second", lte)] > 0
    waits = {
        (name, dict(labels)["subflow"]): value
        for (name, labels), value in samples.items()
        if name.startswith("stripeproxy_subflow_reorder")
    }
    assert waits[("stripeproxy_subflow_reorder_waits_total", "3")] == 10
    assert waits[("stripeproxy_subflow_reorder_wait_seconds_total", "3")] == 0.5
    assert waits[("stripeproxy_subflow_reorder_blocking_seconds_total", "2")] == 0.5
    assert waits[("stripeproxy_subflow_reorder_wait_seconds_total", "2")] == 0.0
