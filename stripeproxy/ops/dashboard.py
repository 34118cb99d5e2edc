"""Live terminal dashboard for stripe-client and stripe-server (uses ``rich``).

Rendering is a pure function of a :class:`~stripeproxy.ops.observe.Snapshot`,
so tests can draw a known state into a fixed-size console and read it back.
The :class:`Dashboard` service redraws on every monitor sample (500 ms) and
shows recent log lines in a panel, so logging never tears the screen.
Values from the network (peers, targets, log lines) are drawn as plain
``Text``, never parsed as rich markup: ``[bold]`` in a host name stays text.
"""

from __future__ import annotations

import sys
from collections import deque
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from twisted.application.service import Service
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from zope.interface import implementer

from stripeproxy.net.dial import DialStatus
from stripeproxy.ops.observe import Monitor, Snapshot

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(value: float) -> str:
    """1536 -> '1.5 KiB': short and unambiguous (binary units)."""
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_rate(value: float) -> str:
    return human_bytes(value) + "/s"


def render(snapshot: Snapshot, log_lines: list[str] | None = None) -> RenderableType:
    """Draw one snapshot: header, subflow table with totals, streams, log panel."""
    rates = snapshot.rates
    header = Text.assemble(
        (f"stripe-{snapshot.role}", "bold"),
        f"  sessions {snapshot.sessions}  subflows {len(snapshot.subflows)}"
        f"  streams {snapshot.streams_open}  window {snapshot.window:g} s"
        f"  buffered {human_bytes(snapshot.buffered)}"
        f"  retransmitted {human_bytes(snapshot.retransmitted)}"
        f"  subflows lost {snapshot.subflows_lost}  re-dials {snapshot.redials}",
    )
    subflows = Table(title="subflows", expand=True, title_justify="left")
    for name in ("session", "#", "peer", "state", "RTT ms"):
        subflows.add_column(name)
    for name in ("TX real", "TX dummy", "RX real", "RX dummy", "retx", "in flight"):
        subflows.add_column(name, justify="right")
    for row in snapshot.subflows:
        subflows.add_row(
            row.session,
            str(row.sid),
            Text(row.peer),
            "up" if row.writable else "full",
            f"{row.rtt_ms:.1f}" if row.rtt_ms is not None else "-",
            human_rate(row.rates["tx_real"]),
            human_rate(row.rates["tx_dummy"]),
            human_rate(row.rates["rx_real"]),
            human_rate(row.rates["rx_dummy"]),
            human_bytes(row.retransmitted),
            human_bytes(row.inflight),
        )
    subflows.add_section()
    subflows.add_row(
        "total",
        "",
        "",
        "",
        "",
        human_rate(rates.get("tx_real", 0.0)),
        human_rate(rates.get("tx_dummy", 0.0)),
        human_rate(rates.get("rx_real", 0.0)),
        human_rate(rates.get("rx_dummy", 0.0)),
        human_bytes(snapshot.retransmitted),
        "",
        style="bold",
    )
    streams = Table(title="streams", expand=True, title_justify="left")
    for name in ("session", "id", "target"):
        streams.add_column(name)
    for name in ("age s", "sent", "received", "send rate", "receive rate"):
        streams.add_column(name, justify="right")
    for st in sorted(snapshot.streams, key=lambda s: -(s.send_rate + s.receive_rate))[:20]:
        streams.add_row(
            st.session,
            str(st.stream_id),
            Text(st.target),
            f"{st.age:.0f}",
            human_bytes(st.sent),
            human_bytes(st.received),
            human_rate(st.send_rate),
            human_rate(st.receive_rate),
        )
    parts: list[RenderableType] = [header, *dial_lines(snapshot), subflows, streams]
    if log_lines is not None:
        parts.append(Panel(Text("\n".join(log_lines) or " "), title="log", title_align="left"))
    return Group(*parts)


# Dial errors get at most this many lines: at 80x24 every line counts.
DIAL_LINES = 3


def dial_lines(snapshot: Snapshot) -> list[Text]:
    """The client's subflow slots that are not up, or were not: one line per
    distinct last error with the slots it concerns, e.g.
    ``dial 1,2 down (37 failed): connection refused (...)``.

    Cut at the console's width, never wrapped; messages were escaped when
    they were made (they may quote the server).
    """
    groups: dict[tuple[bool, str], list[DialStatus]] = {}
    for dial in snapshot.dials:
        if dial.error is not None:
            groups.setdefault((dial.state == "up", dial.error.message), []).append(dial)
    lines: list[Text] = []
    for (up, message), dials in sorted(groups.items()):
        slots = ",".join(str(d.slot) for d in dials)
        if up:
            text = Text.assemble(f"dial {slots} up; last error: ", message)
        else:
            failed = sum(d.failures for d in dials)
            state = dials[0].state
            text = Text.assemble(
                (f"dial {slots} {state}", "bold red"), f" ({failed} failed): ", message
            )
        text.no_wrap = True
        text.overflow = "ellipsis"
        lines.append(text)
    if len(lines) > DIAL_LINES:
        more = len(lines) - DIAL_LINES + 1
        lines = [*lines[: DIAL_LINES - 1], Text(f"dial: {more} more kinds of error")]
    return lines


@implementer(ILogObserver)
class LogTail:
    """Keeps the last few formatted log lines for the dashboard's log panel."""

    def __init__(self, size: int = 8) -> None:
        self.lines: deque[str] = deque(maxlen=size)

    def __call__(self, event: LogEvent) -> None:
        text = formatEvent(event)
        if event.get("log_failure") is not None:
            text += f" ({event['log_failure'].getErrorMessage()})"
        if text:
            self.lines.append(text.splitlines()[0][:200])


class Dashboard(Service):
    """Redraws the terminal on every monitor sample while the service runs."""

    def __init__(self, monitor: Monitor, console: Console | None = None) -> None:
        self.monitor = monitor
        # twistd points sys.stdout at its log; the dashboard wants the terminal.
        self.console = console or Console(file=sys.__stdout__)
        self.tail = LogTail()
        self._live: Live | None = None

    def startService(self) -> None:
        super().startService()
        globalLogPublisher.addObserver(self.tail)
        self._live = Live(console=self.console, auto_refresh=False, screen=False)
        self._live.start()
        self.monitor.listeners.append(self._draw)

    def _draw(self, snapshot: Snapshot) -> None:
        if self._live is not None:
            self._live.update(render(snapshot, list(self.tail.lines)), refresh=True)

    def stopService(self) -> Any:
        if self._draw in self.monitor.listeners:
            self.monitor.listeners.remove(self._draw)
        globalLogPublisher.removeObserver(self.tail)
        if self._live is not None:
            self._live.stop()
            self._live = None
        return super().stopService()
