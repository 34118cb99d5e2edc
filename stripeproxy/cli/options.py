"""Options shared by ``twistd stripe-client`` and ``twistd stripe-server``."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceCollection
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python import usage

from stripeproxy.cli.keygen import load_keys
from stripeproxy.core.scheduler import SCHEDULERS
from stripeproxy.core.session import MiB, SessionConfig
from stripeproxy.net.driver import SessionDriver
from stripeproxy.net.endpoints import is_endpoint_string, parse_host_port, server_endpoint

# A full 64 KiB chunk plus its DATA header must fit (SPEC.md section 3).
MIN_MAX_FRAME_KIB = 65

SESSION_PARAMETERS = [
    ["psk-file", None, None, "Pre-shared key file: one hex key, or 'NAME HEX' lines."],
    ["heartbeat", None, 5.0, "Seconds between PINGs on an idle subflow.", float],
    ["dead-interval", None, 15.0, "Seconds of silence after which a subflow is dropped.", float],
    ["grace", None, 30.0, "Seconds a session outlives its last subflow.", float],
    ["idle-timeout", None, 3600.0, "Seconds a silent stream lives (0: for ever).", float],
    ["handshake-timeout", None, 10.0, "Seconds a new subflow has to authenticate.", float],
    ["max-frame", None, 256, "KiB: largest frame body accepted from the peer (>= 65).", int],
    ["congestion", None, None, "TCP congestion control for subflows (e.g. cubic, bbr)."],
    ["metrics", None, None, "Serve Prometheus metrics on host:port (path /metrics)."],
    ["stream-window", None, 4.0, "MiB a stream may have in flight towards us (credit).", float],
    ["session-window", None, 32.0, "MiB all streams of a session may have in flight to us.", float],
    [
        "scheduler",
        None,
        "adaptive",
        "Chunk placement: adaptive (goodput-weighted) or least-queued.",
    ],
]


class SessionOptions(usage.Options):
    """Base for both sides: key, timers, TLS switch."""

    optFlags = [
        ["no-tls", None, "Plaintext subflows with a CRC32C on every frame (lab use)."],
        ["tui", None, "Show the live dashboard (default: when stdout is a terminal)."],
        ["no-tui", None, "Never show the live dashboard."],
    ]
    role = ""

    def postOptions(self) -> None:
        if not self["psk-file"]:
            raise usage.UsageError("--psk-file is required (create one with stripe-keygen)")
        try:
            self["keys"] = load_keys(self["psk-file"])
        except (OSError, ValueError) as e:
            raise usage.UsageError(f"cannot read --psk-file: {e}") from None
        for name in (
            "heartbeat",
            "dead-interval",
            "grace",
            "handshake-timeout",
            "stream-window",
            "session-window",
        ):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be positive")
        if self["idle-timeout"] < 0:
            raise usage.UsageError("--idle-timeout must be 0 (off) or positive")
        if self["max-frame"] < MIN_MAX_FRAME_KIB:
            raise usage.UsageError(
                f"--max-frame must be at least {MIN_MAX_FRAME_KIB} (a 64 KiB DATA frame must fit)"
            )
        if self["dead-interval"] <= self["heartbeat"]:
            raise usage.UsageError("--dead-interval must be longer than --heartbeat")
        if self["scheduler"] not in SCHEDULERS:
            raise usage.UsageError(f"--scheduler must be one of {', '.join(SCHEDULERS)}")
        for name, listening in (("listen", True), ("metrics", True), ("server", False)):
            value = self.get(name)
            if value and not is_endpoint_string(value):
                try:
                    parse_host_port(value, allow_zero=listening)
                except ValueError as e:
                    raise usage.UsageError(f"--{name}: {e}") from None
        self._resolve_tui()

    def _resolve_tui(self) -> None:
        """Decide whether the dashboard runs, and keep log lines off its screen.

        Under twistd, ``self.parent`` holds twistd's own options: a daemon has
        no terminal, and a foreground process that would log to stdout logs to
        ``stripe-ROLE.log`` instead while the dashboard owns the screen (the
        dashboard shows the latest lines in a panel).
        """
        parent = getattr(self, "parent", None)
        daemon = parent is not None and not parent.get("nodaemon", True)
        if self["no-tui"]:
            self["tui"] = False
        elif not self["tui"]:
            self["tui"] = sys.stdout.isatty() and not daemon
        if self["tui"] and daemon:
            raise usage.UsageError("--tui needs a terminal: run twistd with -n")
        if self["tui"] and parent is not None and parent.get("logfile") in (None, "", "-"):
            parent["logfile"] = f"stripe-{self.role}.log"

    def session_config(self) -> SessionConfig:
        return SessionConfig(
            heartbeat_interval=self["heartbeat"],
            dead_interval=self["dead-interval"],
            grace_period=self["grace"],
            idle_timeout=self["idle-timeout"],
            crc=bool(self["no-tls"]),
            stream_window=int(self["stream-window"] * MiB),
            session_window=int(self["session-window"] * MiB),
            scheduler=self["scheduler"],
        )


_SLOW_START_AFTER_IDLE = "/proc/sys/net/ipv4/tcp_slow_start_after_idle"


def check_host_tuning(log: Logger, path: str = _SLOW_START_AFTER_IDLE) -> None:
    """Point out a host setting that slows every transfer on idle subflows."""
    try:
        with open(path) as f:
            value = f.read().strip()
    except OSError:
        return  # not Linux, or no /proc: nothing to say
    if value == "1":
        log.info(
            "net.ipv4.tcp_slow_start_after_idle is 1: idle subflows restart slowly on lossy "
            "paths; deploy/sysctl/90-stripeproxy.conf sets it to 0 (README, Performance)"
        )


def add_observability(
    top: IServiceCollection,
    options: SessionOptions,
    clock: IReactorTime,
    reactor: object,
    sessions: Callable[[], Iterable[SessionDriver]],
    redials: Callable[[], int] = lambda: 0,
) -> None:
    """Start the monitor, the dashboard and the metrics listener as asked.

    Nothing is sampled when neither is on, so the data path pays nothing.
    """
    if not (options["tui"] or options["metrics"]):
        return
    from stripeproxy.ops.observe import Monitor

    monitor = Monitor(options.role, clock, sessions, redials)
    monitor.setServiceParent(top)
    if options["metrics"]:
        from stripeproxy.ops.metrics import metrics_site

        endpoint = server_endpoint(reactor, options["metrics"])
        StreamServerEndpointService(endpoint, metrics_site(monitor)).setServiceParent(top)
    if options["tui"]:
        from stripeproxy.ops.dashboard import Dashboard

        Dashboard(monitor).setServiceParent(top)
