"""Prometheus metrics endpoint (``--metrics HOST:PORT``).

The exposition format comes from ``prometheus_client``; the values come from
the monitor's latest snapshot, read in the reactor thread, so scraping
never touches the session core.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from stripeproxy.ops.observe import Monitor, Snapshot

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
# Every per-subflow series: path is the client's --path ("" without one, and on the server).
_SUBFLOW_LABELS = ["role", "session", "subflow", "cc", "path"]


class SnapshotCollector(Collector):
    """Turns the latest :class:`~stripeproxy.ops.observe.Snapshot` into metric families."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        snap = self.monitor.latest
        role = snap.role
        total = CounterMetricFamily(
            "stripeproxy_bytes",
            "Bytes on all subflows, by direction and kind (real = payload).",
            labels=["role", "direction", "kind"],
        )
        for name, value in snap.totals.items():
            if name.startswith(("tx_", "rx_")):
                direction, kind = name.split("_")
                total.add_metric([role, direction, kind], value)
        yield total
        per_subflow = CounterMetricFamily(
            "stripeproxy_subflow_bytes",
            "Bytes on one live subflow, by direction and kind.",
            labels=[*_SUBFLOW_LABELS, "direction", "kind"],
        )
        rtt = GaugeMetricFamily(
            "stripeproxy_subflow_rtt_seconds",
            "Smoothed heartbeat round-trip time of a subflow.",
            labels=_SUBFLOW_LABELS,
        )
        inflight = GaugeMetricFamily(
            "stripeproxy_subflow_inflight_bytes",
            "Unacknowledged bytes sent on a subflow.",
            labels=_SUBFLOW_LABELS,
        )
        waits = CounterMetricFamily(
            "stripeproxy_subflow_reorder_waits",
            "Chunks a subflow brought that waited in this end's reorder buffer for "
            "an earlier chunk of another subflow (head-of-line).",
            labels=_SUBFLOW_LABELS,
        )
        waited = CounterMetricFamily(
            "stripeproxy_subflow_reorder_wait_seconds",
            "Seconds those chunks waited, summed.",
            labels=_SUBFLOW_LABELS,
        )
        blocked = CounterMetricFamily(
            "stripeproxy_subflow_reorder_blocking_seconds",
            "Seconds other subflows' chunks waited for this subflow's late ones, summed.",
            labels=_SUBFLOW_LABELS,
        )
        for row in snap.subflows:
            # cc: the socket's congestion control, path: the client's uplink
            # (--path; "" without), so a dashboard can split by either.
            ids = [role, row.session, str(row.sid), row.cc, row.path]
            waits.add_metric(ids, row.reorder_waits)
            waited.add_metric(ids, row.reorder_wait_s)
            blocked.add_metric(ids, row.blocked_wait_s)
            for name, value in row.totals.items():
                direction, kind = name.split("_")
                per_subflow.add_metric([*ids, direction, kind], value)
            if row.rtt_ms is not None:
                rtt.add_metric(ids, row.rtt_ms / 1000)
            inflight.add_metric(ids, row.inflight)
        yield per_subflow
        yield rtt
        yield inflight
        yield waits
        yield waited
        yield blocked
        yield from _dial_metrics(snap)
        yield from _path_metrics(snap)
        yield CounterMetricFamily(
            "stripeproxy_retransmitted_bytes",
            "Payload bytes sent more than once.",
            value=snap.retransmitted,
        )
        yield CounterMetricFamily(
            "stripeproxy_reinjected_bytes",
            "Of the retransmitted bytes, those re-sent to unblock a hole (head-of-line).",
            value=snap.reinjected,
        )
        yield CounterMetricFamily(
            "stripeproxy_timeouts",
            "Chunks whose acknowledgement was overdue (each then goes out again).",
            value=snap.timeouts,
        )
        yield CounterMetricFamily(
            "stripeproxy_subflows_lost", "Subflows that went away.", value=snap.subflows_lost
        )
        yield CounterMetricFamily(
            "stripeproxy_redials", "Subflows dialled again after a loss.", value=snap.redials
        )
        for name, doc, value in (
            ("stripeproxy_sessions", "Live sessions.", snap.sessions),
            ("stripeproxy_subflows", "Live subflows.", len(snap.subflows)),
            ("stripeproxy_streams", "Open streams.", snap.streams_open),
            (
                "stripeproxy_buffered_bytes",
                "Bytes held in send and reorder buffers.",
                snap.buffered,
            ),
        ):
            yield GaugeMetricFamily(name, doc, value=value)


def _path_metrics(snap: Snapshot) -> Iterator[Metric]:
    """The client's paths: up or not, subflows open and kept (K), and why K moved.

    The reason is a label of an info-style gauge (value 1): it changes
    seldom (a K controller holds off for seconds to minutes between moves),
    so the series it makes stay few.
    """
    if not snap.paths:
        return
    labels = ["role", "path"]
    up = GaugeMetricFamily(
        "stripeproxy_path_up", "1 while a subflow of the path is joined.", labels=labels
    )
    open_ = GaugeMetricFamily(
        "stripeproxy_path_subflows", "Subflows of the path joined now.", labels=labels
    )
    target = GaugeMetricFamily(
        "stripeproxy_path_subflows_target",
        "Subflows the path keeps (K; under --subflows auto, the controller's target).",
        labels=labels,
    )
    real = GaugeMetricFamily(
        "stripeproxy_path_real_bytes_per_second",
        "Payload bytes per second on the path's subflows over the window, by direction.",
        labels=[*labels, "direction"],
    )
    tcp = GaugeMetricFamily(
        "stripeproxy_path_tcp_retransmits",
        "Segments the kernel re-sent on the path's live subflows (falls when one closes).",
        labels=labels,
    )
    reason = GaugeMetricFamily(
        "stripeproxy_path_k_reason",
        "1 for why the path's K last moved (--subflows auto).",
        labels=[*labels, "reason"],
    )
    for path in snap.paths:
        ids = [snap.role, path.name]
        up.add_metric(ids, 1 if path.state == "up" else 0)
        open_.add_metric(ids, path.open)
        target.add_metric(ids, path.target)
        for name, value in path.rates.items():
            real.add_metric([*ids, name.split("_")[0]], value)
        tcp.add_metric(ids, path.tcp_retransmits)
        if path.k_reason:
            reason.add_metric([*ids, path.k_reason], 1)
    yield from (up, open_, target, real, tcp, reason)


def _dial_metrics(snap: Snapshot) -> Iterator[Metric]:
    """The client's subflow slots: up or not, failures, and the kind of the last one.

    The error's kind is a label (a short fixed word); its sentence is not (it
    may carry text from the server and would make a new series per message).
    """
    up = GaugeMetricFamily(
        "stripeproxy_dial_up",
        "1 while the subflow slot has joined a session.",
        labels=["role", "slot"],
    )
    in_a_row = GaugeMetricFamily(
        "stripeproxy_dial_failed_attempts",
        "Failed dial attempts of a slot since it was last joined.",
        labels=["role", "slot"],
    )
    failures = CounterMetricFamily(
        "stripeproxy_dial_failures",
        "Failed dial attempts of a slot over the client's life.",
        labels=["role", "slot"],
    )
    last = GaugeMetricFamily(
        "stripeproxy_dial_last_error",
        "1 for the kind of the slot's last dial error (kept after it recovers).",
        labels=["role", "slot", "kind"],
    )
    for dial in snap.dials:
        ids = [snap.role, str(dial.slot)]
        up.add_metric(ids, 1 if dial.state == "up" else 0)
        in_a_row.add_metric(ids, dial.failures)
        failures.add_metric(ids, dial.failed_total)
        if dial.error is not None:
            last.add_metric([*ids, str(dial.error.kind)], 1)
    yield from (up, in_a_row, failures, last)


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE)
        return generate_latest(self.registry)


class _QuietSite(Site):
    """No access-log line per scrape: a scraper every 15 s would fill the log."""

    def log(self, request: http.Request) -> None:
        pass


def metrics_site(monitor: Monitor) -> Site:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(monitor))
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry))
    site = _QuietSite(root)
    site.noisy = False
    return site
