"""Monitor snapshots on a deterministic clock, and the metrics endpoint for real."""

from __future__ import annotations

import random
import urllib.request
from dataclasses import dataclass

import pytest
import pytest_twisted
from helpers import (
    Cleanup,
    EchoFactory,
    Keys,
    in_thread,
    listening_port,
    socks_echo,
    start_pair,
    start_target,
)
from prometheus_client.parser import text_string_to_metric_families
from twisted.application.internet import StreamServerEndpointService
from twisted.web.server import Site

from stripeproxy.core.congestion import AUTO
from stripeproxy.core.session import KiB, MiB, Session
from stripeproxy.net.congestion import decide, read_kernel
from stripeproxy.net.driver import StreamInfo, SubflowInfo
from stripeproxy.ops.observe import Monitor
from stripeproxy.testing import CLIENT, SessionPair


@dataclass
class FakeDriver:
    """The parts of a SessionDriver the monitor reads, over a bare session."""

    session: Session
    label: str = "c0ffee00"

    def counters(self) -> dict[str, int]:
        return self.session.counters()

    def buffered_bytes(self) -> int:
        return self.session.buffered_bytes()

    def subflow_info(self) -> list[SubflowInfo]:
        rows = []
        for sid in self.session.subflow_ids:
            sf = self.session.subflow(sid)
            totals = {
                name: getattr(sf, name) for name in ("tx_real", "tx_dummy", "rx_real", "rx_dummy")
            }
            rows.append(
                SubflowInfo(sid, "?", sf.writable, sf.srtt, sf.inflight, totals, sf.tx_retransmit)
            )
        return rows

    def stream_info(self) -> list[StreamInfo]:
        return [
            StreamInfo(stream_id, "", None, *self.session.stream_progress(stream_id))
            for stream_id in self.session.stream_ids
        ]


def test_monitor_rates_and_totals_are_exact_on_a_clock() -> None:
    pair = SessionPair(k=2)
    driver = FakeDriver(pair.client)
    monitor = Monitor("client", pair.clock, lambda: [driver])
    stream_id = pair.open_stream()
    pair.settle()
    t0 = pair.clock.seconds()
    base = monitor.sample().totals["tx_real"]
    # Every 0.5 s, 128 KiB of payload: 256 KiB/s, sampled for exactly 10 s.
    for i in range(1, 21):
        pair.write(CLIENT, stream_id, random.randbytes(128 * KiB))
        pair.settle()
        pair.clock.advance(t0 + i * 0.5 - pair.clock.seconds())
        monitor.sample()
    snap = monitor.latest
    assert snap.totals["tx_real"] - base == 20 * 128 * KiB
    assert snap.rates["tx_real"] == pytest.approx(256 * KiB, rel=0.001)
    assert {row.sid for row in snap.subflows} == {1, 2}
    assert sum(row.totals["tx_real"] for row in snap.subflows) == snap.totals["tx_real"]
    (stream,) = snap.streams
    assert stream.sent == 20 * 128 * KiB
    assert stream.send_rate == pytest.approx(256 * KiB, rel=0.001)
    # Counters survive a lost subflow and stay monotonic; rates fall to 0 when idle.
    before = snap.totals["tx_real"]
    pair.kill_subflow(1)
    pair.settle()
    monitor.startService()  # now the LoopingCall samples every 0.5 s
    for _ in range(22):
        pair.clock.advance(0.5)
        pair.settle()
    snap = monitor.latest
    assert snap.totals["tx_real"] == before
    assert snap.rates["tx_real"] == 0.0
    assert snap.subflows_lost == 1
    monitor.stopService()
    pair.shutdown()


def metrics_port(top: object) -> StreamServerEndpointService:
    (service,) = [
        s
        for s in top  # type: ignore[attr-defined]
        if isinstance(s, StreamServerEndpointService) and isinstance(s.factory, Site)
    ]
    return service


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


@pytest_twisted.ensureDeferred
async def test_metrics_endpoint_moves_during_a_transfer(cleanup: Cleanup, keys: Keys) -> None:
    target = await start_target(cleanup, EchoFactory())
    metrics = ["--metrics", "tcp:0:interface=127.0.0.1"]
    pair = await start_pair(cleanup, keys, False, k=3, client_extra=metrics, server_extra=metrics)
    client_port = (await listening_port(metrics_port(pair.client.service))).getHost().port
    server_port = (await listening_port(metrics_port(pair.server.service))).getHost().port
    before = await in_thread(scrape, client_port)
    result = await in_thread(socks_echo, pair.socks_port, target.port, 8 * MiB)
    assert result.sent_sha == result.received_sha
    await pair_sample(pair)
    after = await in_thread(scrape, client_port)
    server = await in_thread(scrape, server_port)
    up = (("direction", "tx"), ("kind", "real"), ("role", "client"))
    assert after[("stripeproxy_bytes_total", up)] - before[("stripeproxy_bytes_total", up)] >= (
        8 * MiB
    )
    down = (("direction", "tx"), ("kind", "real"), ("role", "server"))
    assert server[("stripeproxy_bytes_total", down)] >= 8 * MiB
    assert after[("stripeproxy_subflows", ())] == 3
    assert after[("stripeproxy_sessions", ())] == 1
    rtts = [v for (name, _), v in after.items() if name == "stripeproxy_subflow_rtt_seconds"]
    assert all(v >= 0 for v in rtts)
    # Both taps default to --congestion auto; every subflow socket reports what it
    # uses, and that is what the start-up decision said (issue 11, item 1).
    expected = decide(AUTO, read_kernel()).algorithm
    for scraped in (after, server):
        ccs = [
            dict(labels)["cc"]
            for (name, labels) in scraped
            if name == "stripeproxy_subflow_inflight_bytes"
        ]
        assert ccs == [expected] * 3, ccs


async def pair_sample(pair: object) -> None:
    """Let one monitor period pass so the last bytes are in the snapshot."""
    from helpers import sleep

    await sleep(0.6)
