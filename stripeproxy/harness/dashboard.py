"""Live terminal dashboards for ``stripe-test-target`` and ``stripe-test-consumer``.

Built like the proxy's dashboard (:mod:`stripeproxy.ops.dashboard`): a sampler
turns the live counters (:class:`~stripeproxy.harness.target.TargetStats`,
:class:`~stripeproxy.harness.consumer.ConsumerProgress`) into a frozen view
every 500 ms on an injected clock, with 10-second sliding-window rates from
:class:`~stripeproxy.ops.rates.SlidingRate`; drawing is a pure function of a
view, so tests can draw a known state into a fixed-size virtual terminal and
read the numbers back.

The harness has no overlay, so every byte it counts is payload: the target
shows a real/dummy split only so that its numbers line up with the proxy
dashboards' columns, and its dummy column is always zero.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import FilteringLogObserver, LogPublisher, globalLogPublisher

from stripeproxy.harness._cli import StderrLog, drop_factory_chatter, isatty
from stripeproxy.ops.dashboard import LogTail, human_bytes, human_rate
from stripeproxy.ops.rates import PERIOD, WINDOW, SlidingRate

if TYPE_CHECKING:
    from stripeproxy.harness.consumer import ConsumerProgress, UploadResult
    from stripeproxy.harness.target import TargetStats

__all__ = [
    "SHA256_PREFIX",
    "ConsumerSampler",
    "ConsumerView",
    "LiveDashboard",
    "TargetSampler",
    "TargetView",
    "render_consumer",
    "render_target",
    "terminal_console",
]

SHA256_PREFIX = 16
"""Hex digits of a SHA-256 shown: enough to compare by eye with the other end."""


# ------------------------------------------------------------------ target


@dataclass(frozen=True)
class TargetView:
    """What the target dashboard shows at one instant (all sizes in bytes)."""

    listening: str
    uptime: float
    window: float
    bytes_received: int
    receive_rate: float
    """Body bytes per second over the window."""
    requests: int
    request_rate: float
    """Requests per second over the window."""
    uploads: int
    last_upload_bytes: int | None = None
    last_upload_seconds: float | None = None
    last_upload_sha256: str | None = None
    last_upload_age: float | None = None
    """Seconds since the most recent upload completed."""

    @property
    def real_bytes(self) -> int:
        return self.bytes_received

    @property
    def dummy_bytes(self) -> int:
        """Always 0: no overlay framing reaches the target (see the module docstring)."""
        return 0


class TargetSampler:
    """Samples :class:`TargetStats` into :class:`TargetView` with sliding-window rates."""

    def __init__(self, stats: TargetStats, listening: str, window: float = WINDOW) -> None:
        self.stats = stats
        self.listening = listening
        self.window = window
        self._bytes = SlidingRate(window)
        self._requests = SlidingRate(window)

    def __call__(self, now: float) -> TargetView:
        stats = self.stats
        self._bytes.sample(now, stats.bytes_received)
        self._requests.sample(now, stats.requests)
        return TargetView(
            listening=self.listening,
            uptime=max(0.0, now - stats.started_at),
            window=self.window,
            bytes_received=stats.bytes_received,
            receive_rate=self._bytes.rate(),
            requests=stats.requests,
            request_rate=self._requests.rate(),
            uploads=stats.uploads,
            last_upload_bytes=stats.last_upload_bytes,
            last_upload_seconds=stats.last_upload_seconds,
            last_upload_sha256=stats.last_upload_sha256,
            last_upload_age=(
                max(0.0, now - stats.last_upload_at) if stats.last_upload_at is not None else None
            ),
        )


# Every table shares its width out by fixed ratios (the SHA-256 column has
# exactly its prefix's width): columns then stay put from one frame to the
# next instead of following the lengths of changing numbers. Five columns at
# most, so that the numbers still fit on an 80-column terminal.


def _log_panel(log_lines: list[str] | None) -> list[RenderableType]:
    if log_lines is None:
        return []
    return [Panel("\n".join(log_lines) or " ", title="log", title_align="left")]


def render_target(view: TargetView, log_lines: list[str] | None = None) -> RenderableType:
    """Draw the target's view: header, what arrived (totals and rates), the last upload, log."""
    header = Text.assemble(
        ("stripe-test-target", "bold"),
        f"  listening on {view.listening}  up {view.uptime:.0f} s  window {view.window:g} s"
        f"  requests {view.requests}  req/s {view.request_rate:.1f}  uploads {view.uploads}",
    )
    received = Table(title="received", expand=True, title_justify="left")
    for name in ("total", "real", "dummy", "RX real", "RX dummy"):
        received.add_column(name, justify="right", ratio=1)
    received.add_row(
        human_bytes(view.bytes_received),
        human_bytes(view.real_bytes),
        human_bytes(view.dummy_bytes),
        human_rate(view.receive_rate),
        human_rate(0.0),
    )
    last = Table(title="last upload", expand=True, title_justify="left")
    for name in ("size", "time ms", "throughput", "sha256", "ago s"):
        if name == "sha256":
            last.add_column(name, width=SHA256_PREFIX)
        else:
            last.add_column(name, justify="right", ratio=1)
    if view.last_upload_bytes is None:
        last.add_row("-", "-", "-", "-", "-")
    else:
        seconds = view.last_upload_seconds or 0.0
        last.add_row(
            human_bytes(view.last_upload_bytes),
            f"{seconds * 1000:.1f}",
            human_rate(view.last_upload_bytes / seconds) if seconds > 0 else "-",
            (view.last_upload_sha256 or "")[:SHA256_PREFIX],
            f"{view.last_upload_age:.0f}" if view.last_upload_age is not None else "-",
        )
    return Group(header, received, last, *_log_panel(log_lines))


# ---------------------------------------------------------------- consumer


@dataclass(frozen=True)
class ConsumerView:
    """What the consumer dashboard shows at one instant."""

    mode: str
    target: str
    window: float
    instant_window: float
    """The span of ``instant_rate``: one sample period."""
    elapsed: float | None
    """Seconds since the request started (frozen once the answer is in); None before."""
    bytes_sent: int
    total_bytes: int
    average_rate: float
    """Bytes per second since the request started (connection setup included)."""
    instant_rate: float
    window_rate: float
    result: UploadResult | None = None
    error: str | None = None

    @property
    def fraction(self) -> float:
        if self.total_bytes <= 0:
            return 1.0 if self.result is not None else 0.0
        return min(1.0, self.bytes_sent / self.total_bytes)


class ConsumerSampler:
    """Samples :class:`ConsumerProgress` into :class:`ConsumerView`.

    The instantaneous rate uses a window of one sample period, so it is the
    rate over the last 500 ms sample (:class:`SlidingRate` keeps one sample
    at the window's start, so the span never shrinks below that).
    """

    def __init__(
        self,
        progress: ConsumerProgress,
        target: str,
        window: float = WINDOW,
        period: float = PERIOD,
    ) -> None:
        self.progress = progress
        self.target = target
        self.window = window
        self.period = period
        self._window = SlidingRate(window)
        self._instant = SlidingRate(period)

    def __call__(self, now: float) -> ConsumerView:
        progress = self.progress
        sent = progress.bytes_sent
        self._window.sample(now, sent)
        self._instant.sample(now, sent)
        elapsed: float | None = None
        average = 0.0
        if progress.started_at is not None:
            end = progress.finished_at if progress.finished_at is not None else now
            elapsed = max(0.0, end - progress.started_at)
            if elapsed > 0:
                average = sent / elapsed
        return ConsumerView(
            mode=progress.mode,
            target=self.target,
            window=self.window,
            instant_window=self.period,
            elapsed=elapsed,
            bytes_sent=sent,
            total_bytes=progress.total_bytes,
            average_rate=average,
            instant_rate=self._instant.rate(),
            window_rate=self._window.rate(),
            result=progress.result,
            error=progress.error,
        )


def render_consumer(view: ConsumerView, log_lines: list[str] | None = None) -> RenderableType:
    """Draw the consumer's view: header, progress bar, throughput, the server's answer, log."""
    header = Text.assemble(
        ("stripe-test-consumer", "bold"),
        f"  {view.mode} → {view.target}",
    )
    bar = Table.grid(expand=True, padding=(0, 1))
    bar.add_column(ratio=1)
    bar.add_column(justify="right")
    bar.add_column(justify="right")
    bar.add_row(
        ProgressBar(total=1.0, completed=view.fraction),
        f"{view.fraction * 100:5.1f}%",
        f"{human_bytes(view.bytes_sent)} / {human_bytes(view.total_bytes)}",
    )
    upload = Table(title="upload", expand=True, title_justify="left")
    for name in (
        "elapsed s",
        "sent",
        "average",
        f"last {view.instant_window:g} s",
        f"last {view.window:g} s",
    ):
        upload.add_column(name, justify="right", ratio=1)
    upload.add_row(
        f"{view.elapsed:.1f}" if view.elapsed is not None else "-",
        str(view.bytes_sent),
        human_rate(view.average_rate),
        human_rate(view.instant_rate),
        human_rate(view.window_rate),
    )
    server = Table(title="server", expand=True, title_justify="left")
    for name in ("state", "bytes", "time ms", "sha256", "check"):
        if name == "sha256":
            server.add_column(name, width=SHA256_PREFIX)
        else:
            server.add_column(
                name, justify="right" if name in ("bytes", "time ms") else "left", ratio=1
            )
    result = view.result
    if result is not None:
        matches = result.server_sha256 == result.sha256 and result.server_bytes == result.bytes_sent
        server.add_row(
            "answered",
            str(result.server_bytes),
            str(result.server_time_ms),
            result.server_sha256[:SHA256_PREFIX],
            "matches" if matches else "MISMATCH",
        )
    elif view.error is not None:
        server.add_row("failed", "-", "-", "-", "-")
    else:
        state = "waiting" if view.elapsed is not None else "connecting"
        server.add_row(state, "-", "-", "-", "-")
    parts: list[RenderableType] = [header, bar, upload, server]
    if view.error is not None:
        # On a line of its own: a table cell would wrap the sentence into a column.
        parts.append(Text(f"error: {view.error}", style="red"))
    return Group(*parts, *_log_panel(log_lines))


# --------------------------------------------------------------- the loop

V = TypeVar("V")


def terminal_console() -> Console:
    """A console on the terminal: stdout if it is one, else stderr.

    Drawing on stdout's terminal keeps the result lines next to the final
    frame; when stdout is piped into a script, stderr gets the display and
    stdout stays clean. With no terminal at all (``--tui`` forced), rich
    writes only the final frame, once, to stderr.
    """
    for stream in (sys.__stdout__, sys.__stderr__):
        if stream is not None and isatty(stream):
            return Console(file=stream)
    return Console(file=sys.__stderr__ or sys.stderr)


class LiveDashboard(Generic[V]):
    """Samples and redraws every ``period`` seconds between :meth:`start` and :meth:`stop`.

    Drawing happens on the reactor's thread from a :class:`LoopingCall` on
    the given clock (``auto_refresh=False``: no rich thread reads counters
    the reactor is changing). While it runs, log events are shown in a
    panel and, when the display is on a terminal and stderr is one too,
    held back from stderr (see :class:`~stripeproxy.harness._cli.StderrLog`)
    so they cannot tear the screen. Stdout is never redirected: result
    lines a script reads must not pass through the display.
    """

    def __init__(
        self,
        clock: IReactorTime,
        sample: Callable[[float], V],
        render: Callable[[V, list[str] | None], RenderableType],
        console: Console,
        *,
        log: StderrLog | None = None,
        hold_log: bool | None = None,
        publisher: LogPublisher = globalLogPublisher,
        period: float = PERIOD,
        tail_size: int = 8,
    ) -> None:
        self.clock = clock
        self.console = console
        self.period = period
        self.tail = LogTail(tail_size)
        self._tail_observer = FilteringLogObserver(self.tail, [drop_factory_chatter])
        self.latest: V | None = None
        self._sample = sample
        self._render = render
        self._log = log
        if hold_log is None:
            hold_log = console.is_terminal and isatty(sys.stderr)
        self._hold_log = hold_log and log is not None
        self._publisher = publisher
        self._live: Live | None = None
        self._loop = LoopingCall(self.tick)
        self._loop.clock = clock

    @property
    def running(self) -> bool:
        return self._live is not None

    def start(self) -> None:
        if self._live is not None:
            return
        self._publisher.addObserver(self._tail_observer)
        if self._hold_log and self._log is not None:
            self._log.hold()
        self._live = Live(
            console=self.console,
            auto_refresh=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._live.start()
        self._loop.start(self.period, now=True)

    def tick(self) -> V:
        """Sample now and redraw; returns the view drawn."""
        view = self._sample(self.clock.seconds())
        self.latest = view
        if self._live is not None:
            self._live.update(self._render(view, list(self.tail.lines)), refresh=True)
        return view

    def stop(self) -> None:
        """Draw the final state, leave it on screen and give the terminal back.

        Safe to call twice (the entry points also call it before reactor
        shutdown, for Ctrl+C).
        """
        if self._live is None:
            return
        if self._loop.running:
            self._loop.stop()
        self.tick()
        live, self._live = self._live, None
        live.stop()
        if self.console.is_terminal:
            # rich ends with the show-cursor sequence; a blank line after it
            # makes whatever is written next (the consumer's result lines)
            # start a clean line, even in a raw capture of the terminal.
            self.console.line()
        self._publisher.removeObserver(self._tail_observer)
        if self._hold_log and self._log is not None:
            self._log.release()
