"""Live terminal dashboard for stripe-client and stripe-server (uses ``rich``).

Rendering is a pure function of a :class:`~stripeproxy.ops.observe.Snapshot`,
so tests can draw a known state into a fixed-size console and read it back.
The :class:`Dashboard` service redraws on every monitor sample (500 ms) and
shows recent log lines in a panel, so logging never tears the screen.  It
draws for the terminal's size: on a small one (80x24) it drops the least
useful columns and rows and says so, rather than cut figures to ``MiB…`` or
lose the streams and log sections below the screen's edge.  Values from
the network (peers, targets, log lines) are drawn as plain ``Text``, never
parsed as rich markup: ``[bold]`` in a host name stays text.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from rich import box
from rich.cells import cell_len
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.rule import Rule
from rich.table import Table
from rich.text import Text
from twisted.application.service import Service
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from zope.interface import implementer

from stripeproxy.net.dial import DialStatus
from stripeproxy.ops.observe import Monitor, PathRow, Snapshot, StreamRow, SubflowRow

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


R = TypeVar("R")


@dataclass(frozen=True)
class _Column(Generic[R]):
    """A table column: its cell text per row, and how much it matters.

    When the terminal is too narrow for every column, the ones with the
    lowest ``keep`` go first (and the table's title names them), so the
    figures that stay are shown whole instead of cut to ``MiB…``.
    """

    name: str
    keep: int
    cell: Callable[[R], str]
    right: bool = False
    flexible: bool = False  # free text (a target name) that may be cut to fit


_SUBFLOW_COLUMNS: list[_Column[SubflowRow]] = [
    _Column("session", 0, lambda r: r.session),
    _Column("#", 10, lambda r: str(r.sid)),
    _Column("peer", 1, lambda r: r.peer),
    _Column("state", 9, lambda r: "up" if r.writable else "full"),
    _Column("RTT ms", 6, lambda r: f"{r.rtt_ms:.1f}" if r.rtt_ms is not None else "-"),
    _Column("TX real", 8, lambda r: human_rate(r.rates["tx_real"]), right=True),
    _Column("TX dummy", 3, lambda r: human_rate(r.rates["tx_dummy"]), right=True),
    _Column("RX real", 7, lambda r: human_rate(r.rates["rx_real"]), right=True),
    _Column("RX dummy", 2, lambda r: human_rate(r.rates["rx_dummy"]), right=True),
    _Column("retx", 4, lambda r: human_bytes(r.retransmitted), right=True),
    _Column("in flight", 5, lambda r: human_bytes(r.inflight), right=True),
    # Mean reorder-buffer wait of its chunks that waited (head-of-line), 10 s.
    _Column("reorder ms", 2, lambda r: _ms(r.reorder_ms), right=True),
    # The socket's congestion control: worth a glance, first to go after the peer.
    _Column("cc", 1, lambda r: r.cc or "-"),
]


# With --path: which uplink a subflow leaves by; the rows are grouped by it.
_PATH_COLUMN: _Column[SubflowRow] = _Column("path", 9, lambda r: r.path or "-")


def _subflow_columns(snapshot: Snapshot) -> list[_Column[SubflowRow]]:
    if not any(row.path for row in snapshot.subflows):
        return _SUBFLOW_COLUMNS
    return [_SUBFLOW_COLUMNS[0], _PATH_COLUMN, *_SUBFLOW_COLUMNS[1:]]


def _ms(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "-"


def _k_cell(row: PathRow) -> str:
    """Subflows up / kept, and "auto" when the controller sets K."""
    return f"{row.open}/{row.target}" + (" auto" if row.auto else "")


def _path_note(row: PathRow) -> str:
    """Why it is down, else why K last moved."""
    if row.state == "down":
        return row.why
    return f"K: {row.k_reason}" if row.k_reason else ""


_PATH_COLUMNS: list[_Column[PathRow]] = [
    _Column("path", 10, lambda p: p.name or "(all)"),
    _Column("state", 9, lambda p: p.state),
    _Column("subflows", 8, _k_cell),
    _Column("TX real", 7, lambda p: human_rate(p.rates["tx_real"]), right=True),
    _Column("RX real", 6, lambda p: human_rate(p.rates["rx_real"]), right=True),
    _Column("share", 7, lambda p: f"{p.share:.0%}", right=True),
    _Column("RTT ms", 5, lambda p: f"{p.rtt_ms:.1f}" if p.rtt_ms is not None else "-"),
    # Loss signals: payload the overlay sent again, segments TCP re-sent.
    _Column("re-sent", 4, lambda p: human_bytes(p.retransmitted), right=True),
    _Column("TCP retx", 3, lambda p: str(p.tcp_retransmits), right=True),
    _Column("reorder ms", 3, lambda p: _ms(p.reorder_ms), right=True),
    _Column("source", 2, lambda p: " ".join(x for x in (p.source, p.address) if x) or "-"),
    _Column("note", 1, _path_note, flexible=True),
]


def _subflow_total(snapshot: Snapshot, name: str) -> str:
    rates = snapshot.rates
    cells = {
        "TX real": human_rate(rates.get("tx_real", 0.0)),
        "TX dummy": human_rate(rates.get("tx_dummy", 0.0)),
        "RX real": human_rate(rates.get("rx_real", 0.0)),
        "RX dummy": human_rate(rates.get("rx_dummy", 0.0)),
        "retx": human_bytes(snapshot.retransmitted),
    }
    return cells.get(name, "")


_STREAM_COLUMNS: list[_Column[StreamRow]] = [
    _Column("session", 0, lambda s: s.session),
    _Column("id", 10, lambda s: str(s.stream_id)),
    _Column("target", 9, lambda s: s.target, flexible=True),
    _Column("age s", 3, lambda s: f"{s.age:.0f}", right=True),
    _Column("sent", 5, lambda s: human_bytes(s.sent), right=True),
    _Column("received", 4, lambda s: human_bytes(s.received), right=True),
    _Column("send rate", 8, lambda s: human_rate(s.send_rate), right=True),
    _Column("receive rate", 7, lambda s: human_rate(s.receive_rate), right=True),
]

# A target name gets up to this many cells before a less useful column goes
# to make room, and may be cut down to _TARGET_MIN (with "…") to fit.
_TARGET_WANTED = 32
_TARGET_MIN = 16


@dataclass(frozen=True)
class _Fit:
    """How one frame is drawn and how much of the snapshot it shows (``None``: all)."""

    width: int | None = None
    compact: bool = False
    subflows: int | None = None
    streams: int = 20  # the busiest
    log: int | None = None


class _Grid(Generic[R]):
    """One table's rows as text, and which columns fit a width without cutting a figure.

    Columns are dropped (least important first, and named in the title)
    until the rest fit at their natural width; only a flexible column (the
    target) may then be cut, and never below ``_TARGET_MIN``.  Every cell is
    one line (nothing wraps), so a table's height is known before it is drawn.
    """

    def __init__(
        self,
        title: str,
        columns: list[_Column[R]],
        rows: list[R],
        more: str,
        total: Callable[[str], str] | None = None,
    ) -> None:
        self.title = title
        self.columns = columns
        self.rows = rows
        self.more = more
        self.total = total
        self._widest = {
            col.name: max(cell_len(t) for t in [col.name, *(col.cell(r) for r in rows)])
            for col in columns
        }

    def totals(self, cols: list[_Column[R]]) -> list[str]:
        """The total row, labelled in the first empty cell wide enough for the label."""
        if self.total is None:
            return []
        cells = [self.total(c.name) for c in cols]
        free = [i for i, c in enumerate(cols) if not cells[i] and self._widest[c.name] >= 5]
        if cells:
            cells[free[0] if free else 0] = "total"
        return cells

    def natural(self, col: _Column[R], cols: list[_Column[R]]) -> int:
        wanted = self._widest[col.name]
        if self.total is not None:
            wanted = max(wanted, cell_len(self.totals(cols)[cols.index(col)]))
        return min(wanted, _TARGET_WANTED) if col.flexible else wanted

    def choose(self, width: int | None, compact: bool) -> tuple[list[_Column[R]], list[str]]:
        """The columns shown at ``width`` and the names of those left out."""
        shown = list(self.columns)
        hidden: list[str] = []

        def width_of(cols: list[_Column[R]]) -> int:
            # compact: a space between columns; boxed: "│ " + " " per column, "│" at the end
            pad = len(cols) - 1 if compact else 3 * len(cols) + 1
            return sum(self.natural(c, cols) for c in cols) + pad

        while width is not None and len(shown) > 1 and width_of(shown) > width:
            drop = min(shown, key=lambda c: c.keep)
            shown.remove(drop)
            hidden.append(drop.name)
        return shown, hidden

    def height(self, limit: int | None, compact: bool) -> int:
        """Lines the table takes: title, header, rule, rows, total, "… N more"."""
        rows = len(self.rows) if limit is None else min(limit, len(self.rows))
        lines = 3 + rows + (0 if compact else 2)  # boxed: top and bottom border
        if self.total is not None:
            lines += 2 if rows and not compact else 1  # boxed: a rule between rows and total
        return lines + (1 if rows < len(self.rows) else 0)

    def table(self, fit: _Fit, limit: int | None) -> Table:
        shown, hidden = self.choose(fit.width, fit.compact)
        title = self.title + (f" (too narrow for: {', '.join(hidden)})" if hidden else "")
        table = Table(
            # One line, like every row: the height is counted before drawing.
            title=Text(title, no_wrap=True, overflow="ellipsis"),
            expand=True,
            title_justify="left",
            box=box.SIMPLE_HEAD if fit.compact else box.HEAVY_HEAD,
            show_edge=not fit.compact,
            pad_edge=not fit.compact,
            padding=(0, 0 if fit.compact else 1),
            collapse_padding=fit.compact,
        )
        for col in shown:
            table.add_column(
                col.name,
                justify="right" if col.right else "left",
                no_wrap=True,
                overflow="ellipsis",
                min_width=min(self.natural(col, shown), _TARGET_MIN if col.flexible else 1000),
                ratio=1 if col.flexible else None,
            )
        keep = len(self.rows) if limit is None else limit
        for row in self.rows[:keep]:
            # Text, not str: a str is read as markup, and cells hold network values.
            table.add_row(*(Text(col.cell(row)) for col in shown))
        if len(self.rows) > keep:
            # A caption, not a row: it must not widen a column.
            more = f"… {len(self.rows) - keep} more {self.more}"
            table.caption = Text(more, no_wrap=True, overflow="ellipsis")
            table.caption_justify = "left"
        if self.total is not None:
            if not fit.compact:
                table.add_section()
            table.add_row(*self.totals(shown), style="bold")
        return table


def _header(snapshot: Snapshot, width: int | None) -> list[str]:
    """The summary; on a narrow terminal, wrapped between items, never inside one."""
    items = [
        f"stripe-{snapshot.role}",
        f"sessions {snapshot.sessions}",
        f"subflows {len(snapshot.subflows)}",
        f"streams {snapshot.streams_open}",
        f"window {snapshot.window:g} s",
        f"buffered {human_bytes(snapshot.buffered)}",
        f"retransmitted {human_bytes(snapshot.retransmitted)}",
        f"subflows lost {snapshot.subflows_lost}",
        f"re-dials {snapshot.redials}",
    ]
    lines = [items[0]]
    for item in items[1:]:
        if width is not None and cell_len(f"{lines[-1]}  {item}") > width:
            lines.append("")
        lines[-1] += f"  {item}"
    return lines


class _Frame:
    """The parts of one snapshot's frame, measured before they are drawn."""

    def __init__(self, snapshot: Snapshot, log_lines: list[str] | None, width: int | None):
        self.snapshot = snapshot
        self.log_lines = log_lines
        self.header = _header(snapshot, width)
        self.dials = dial_lines(snapshot)
        # Grouped by path (a stable sort: join order within each path).
        rows = sorted(snapshot.subflows, key=lambda r: r.path)
        self.subflows = _Grid(
            "subflows",
            _subflow_columns(snapshot),
            rows,
            "subflows",
            total=lambda name: _subflow_total(snapshot, name),
        )
        self.paths = (
            _Grid("paths", _PATH_COLUMNS, list(snapshot.paths), "paths") if snapshot.paths else None
        )
        busiest = sorted(snapshot.streams, key=lambda s: -(s.send_rate + s.receive_rate))
        self.streams = _Grid("streams", _STREAM_COLUMNS, busiest, "streams (the busiest are shown)")

    def fits_across(self, fit: _Fit) -> bool:
        return not any(g.choose(fit.width, fit.compact)[1] for g in (self.subflows, self.streams))

    def height(self, fit: _Fit) -> int:
        lines = len(self.header) + len(self.dials)
        if self.paths is not None:
            lines += self.paths.height(None, fit.compact)
        lines += self.subflows.height(fit.subflows, fit.compact)
        lines += self.streams.height(fit.streams, fit.compact)
        if self.log_lines is not None:
            shown = len(self.log_lines)
            shown = shown if fit.log is None else min(fit.log, shown)
            lines += max(1, shown) + (1 if fit.compact else 2)  # rule, or panel borders
        return lines

    def draw(self, fit: _Fit) -> RenderableType:
        first, *more = self.header
        header = Text.assemble((first[: first.index("  ")], "bold"), first[first.index("  ") :])
        for line in more:
            header.append("\n" + line)
        parts: list[RenderableType] = [
            header,
            *self.dials,
            *([self.paths.table(fit, None)] if self.paths is not None else []),
            self.subflows.table(fit, fit.subflows),
            self.streams.table(fit, fit.streams),
        ]
        if self.log_lines is not None:
            logs = self.log_lines
            shown = logs if fit.log is None else logs[max(0, len(logs) - fit.log) :]
            # Text, not a str: a str is read as console markup, so that
            # "[stripeproxy.net...#info]" (or whatever a peer put in a log
            # line) would vanish or raise.  One line each, cut at the edge.
            text = Text("\n".join(shown) if shown else " ", no_wrap=True, overflow="ellipsis")
            if fit.compact:
                parts += [Rule("log", align="left", characters="─"), text]
            else:
                parts.append(Panel(text, title="log", title_align="left"))
        return Group(*parts)


def render(
    snapshot: Snapshot,
    log_lines: list[str] | None = None,
    size: tuple[int, int] | None = None,
) -> RenderableType:
    """Draw one snapshot: header, subflow table with totals, streams, log panel.

    Without ``size`` everything is drawn at its natural size.  With the
    terminal's ``(columns, lines)``, the frame is made to fit: the boxed
    layout if all of it fits; else a compact one (no borders), without the
    least useful columns when too narrow, and with fewer log lines, then
    fewer streams, then fewer subflows when too short.  Each cut is said on
    screen ("… 3 more streams", "too narrow for: peer"), and the streams and
    log sections stay, if only with one line each.  Heights are counted, not
    measured by drawing: this runs twice a second in the proxy's reactor.
    """
    if size is None:
        return _Frame(snapshot, log_lines, None).draw(_Fit())
    width, height = size
    frame = _Frame(snapshot, log_lines, width)
    fit = _Fit(width=width)
    if frame.fits_across(fit) and frame.height(fit) <= height:
        return frame.draw(fit)
    fit = _Fit(width=width, compact=True)
    logs, streams, subflows = len(log_lines or []), len(snapshot.streams), len(snapshot.subflows)
    # Give up lines in this order, down to these floors; cutting a list costs
    # one line for its "… N more".
    for part, floor in (("log", 3), ("streams", 3), ("log", 1), ("streams", 1), ("subflows", 1)):
        excess = frame.height(fit) - height
        if excess <= 0:
            break
        if part == "log":
            now = logs if fit.log is None else fit.log
            fit = replace(fit, log=min(now, max(floor, now - excess)))
        elif part == "streams":
            now = min(fit.streams, streams)
            cut = 0 if now < streams else 1
            fit = replace(fit, streams=min(now, max(floor, now - excess - cut)))
        else:
            now = subflows if fit.subflows is None else fit.subflows
            cut = 0 if now < subflows else 1
            fit = replace(fit, subflows=min(now, max(floor, now - excess - cut)))
    if frame.height(fit) > height:
        # Smaller than the smallest frame: say so rather than be cut off.
        return Group(
            Text("\n".join(frame.header)),
            Text(
                f"terminal {width}x{height} is too small for the tables "
                f"({frame.height(fit)} lines needed)",
                style="bold",
            ),
        )
    return frame.draw(fit)


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
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is untyped
        globalLogPublisher.addObserver(self.tail)
        self._live = Live(console=self.console, auto_refresh=False, screen=False)
        self._live.start()
        self.monitor.listeners.append(self._draw)

    def _draw(self, snapshot: Snapshot) -> None:
        if self._live is not None:
            size = (self.console.width, self.console.height)
            self._live.update(render(snapshot, list(self.tail.lines), size), refresh=True)

    def stopService(self) -> Any:
        if self._draw in self.monitor.listeners:
            self.monitor.listeners.remove(self._draw)
        globalLogPublisher.removeObserver(self.tail)
        if self._live is not None:
            self._live.stop()
            self._live = None
        return super().stopService()  # type: ignore[no-untyped-call]  # untyped in Twisted


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
