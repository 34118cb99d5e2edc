"""The dashboard drawn from a known snapshot into a fixed-size virtual terminal."""

from __future__ import annotations

import io
import re

import pyte
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from rich.segment import Segments
from twisted.internet.task import Clock

from stripeproxy.net.driver import StreamInfo, SubflowInfo
from stripeproxy.ops.dashboard import (
    Dashboard,
    LogTail,
    _Fit,
    _Frame,
    human_bytes,
    human_rate,
    render,
)
from stripeproxy.ops.observe import Monitor, Snapshot, StreamRow, SubflowRow

MiB = 1024 * 1024


def _screen_text(renderable: object, columns: int = 160, lines: int = 40) -> list[str]:
    """Render with rich's ANSI output, replay it in a pyte terminal, read the screen."""
    out = io.StringIO()
    console = Console(file=out, width=columns, force_terminal=True, color_system="standard")
    console.print(renderable)
    screen = pyte.Screen(columns, lines)
    stream = pyte.Stream(screen)
    stream.feed(out.getvalue().replace("\n", "\r\n"))
    return [line.rstrip() for line in screen.display]


def _snapshot() -> Snapshot:
    def sf(sid: int, tx: float, rtt: float | None, writable: bool = True) -> SubflowRow:
        return SubflowRow(
            session="a1b2c3d4",
            sid=sid,
            peer=f"127.0.0.1:{40000 + sid}",
            writable=writable,
            rtt_ms=rtt,
            inflight=64 * 1024 * sid,
            totals={"tx_real": 0, "tx_dummy": 0, "rx_real": 0, "rx_dummy": 0},
            rates={"tx_real": tx, "tx_dummy": tx / 100, "rx_real": 0.0, "rx_dummy": 2048.0},
            retransmitted=0 if sid != 2 else 3 * MiB,
        )

    return Snapshot(
        role="client",
        time=100.0,
        window=10.0,
        sessions=1,
        subflows=[sf(1, 5 * MiB, 1.25), sf(2, 2.5 * MiB, None, writable=False)],
        streams=[
            StreamRow("a1b2c3d4", 7, "example.com:443", 12.0, 64 * MiB, 1024, 7.5 * MiB, 512.0)
        ],
        totals={},
        rates={
            "tx_real": 7.5 * MiB,
            "tx_dummy": 7.5 * MiB / 100,
            "rx_real": 0.0,
            "rx_dummy": 4096.0,
        },
        retransmitted=3 * MiB,
        subflows_lost=2,
        redials=1,
        buffered=256 * 1024,
    )


def test_units() -> None:
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_rate(5 * MiB) == "5.0 MiB/s"


def test_dashboard_shows_subflows_totals_and_streams() -> None:
    lines = _screen_text(render(_snapshot(), ["first log line", "second log line"]))
    text = "\n".join(lines)
    header = next(line for line in lines if line.startswith("stripe-client"))
    assert "sessions 1" in header and "subflows 2" in header and "streams 1" in header
    assert "window 10 s" in header and "subflows lost 2" in header and "re-dials 1" in header
    assert "retransmitted 3.0 MiB" in header and "buffered 256.0 KiB" in header
    row1 = next(line for line in lines if "127.0.0.1:40001" in line)
    assert row1.split("│")[4].strip() == "up"
    assert "1.2" in row1.split("│")[5]  # RTT 1.25 ms shown with one decimal
    cells = [c.strip() for c in row1.split("│")]
    assert cells[6:10] == ["5.0 MiB/s", "51.2 KiB/s", "0 B/s", "2.0 KiB/s"]
    row2 = next(line for line in lines if "127.0.0.1:40002" in line)
    cells2 = [c.strip() for c in row2.split("│")]
    assert cells2[4] == "full" and cells2[5] == "-" and cells2[10] == "3.0 MiB"
    total = next(line for line in lines if line.lstrip("│ ").startswith("total"))
    assert "7.5 MiB/s" in total and "76.8 KiB/s" in total and "4.0 KiB/s" in total
    stream = next(line for line in lines if "example.com:443" in line)
    cells3 = [c.strip() for c in stream.split("│")]
    assert cells3[2:] == [
        "7",
        "example.com:443",
        "12",
        "64.0 MiB",
        "1.0 KiB",
        "7.5 MiB/s",
        "512 B/s",
        "",
    ]
    assert "first log line" in text and "second log line" in text


def test_log_tail_keeps_the_last_lines() -> None:
    tail = LogTail(size=2)
    for i in range(3):
        tail({"log_format": "line {i}", "i": i})
    assert list(tail.lines) == ["line 1", "line 2"]


class _HostileSession:
    """A session whose stream target and subflow peer came from a hostile client."""

    label = "a1b2c3d4"
    target = "[bold]loud[/bold]\n\x1b[31mred:443"
    peer = "[blink]203.0.113.9\x00:1"

    def counters(self) -> dict[str, int]:
        return dict.fromkeys(
            (
                "tx_real",
                "tx_dummy",
                "rx_real",
                "rx_dummy",
                "retransmitted",
                "reinjected",
                "timeouts",
                "subflows_lost",
            ),
            0,
        )

    def buffered_bytes(self) -> int:
        return 0

    def subflow_info(self) -> list[SubflowInfo]:
        totals = {"tx_real": 0, "tx_dummy": 0, "rx_real": 0, "rx_dummy": 0}
        return [SubflowInfo(1, self.peer, True, None, 0, totals, 0)]

    def stream_info(self) -> list[StreamInfo]:
        return [StreamInfo(9, self.target, 0.0, 0, 0)]


def test_dashboard_shows_network_values_escaped_and_never_as_markup() -> None:
    """A target or peer chosen by a client, and a log line quoting one, are shown as
    their escaped text: one line each, no terminal control, no rich markup applied."""
    snapshot = Monitor("server", Clock(), lambda: [_HostileSession()]).sample()
    assert snapshot.streams[0].target == "[bold]loud[/bold]\\x0a\\x1b[31mred:443"
    assert snapshot.subflows[0].peer == "[blink]203.0.113.9\\x00:1"
    out = io.StringIO()
    console = Console(file=out, width=160, force_terminal=True, color_system="standard")
    console.print(render(snapshot, ["stream 9 -> [bold]quoted[/bold] \\x0a"]))
    screen = pyte.Screen(160, 40)
    pyte.Stream(screen).feed(out.getvalue().replace("\n", "\r\n"))
    lines = [line.rstrip() for line in screen.display]
    (row,) = [y for y, line in enumerate(lines) if "loud" in line]
    cells = [c.strip() for c in lines[row].split("│")]
    assert cells[3] == "[bold]loud[/bold]\\x0a\\x1b[31mred:443"
    assert not any(screen.buffer[row][x].bold for x in range(160))
    assert screen.buffer[row][lines[row].index("red")].fg == "default"
    assert any("[blink]203.0.113.9\\x00:1" in line for line in lines)
    (logged,) = [y for y, line in enumerate(lines) if "quoted" in line]
    assert "stream 9 -> [bold]quoted[/bold] \\x0a" in lines[logged]
    assert not any(screen.buffer[logged][x].bold for x in range(160))


# ------------------------------------------------------------ small terminals


def _live_screen(renderable: object, columns: int, lines: int) -> tuple[list[str], int]:
    """Replay a frame the way ``rich.live`` draws it: its lines, no newline after the last.

    Returns the screen and how many lines the frame had (more than ``lines``
    would scroll the top off a real terminal, or be cut by Live).
    """
    out = io.StringIO()
    console = Console(
        file=out, width=columns, height=lines, force_terminal=True, color_system="standard"
    )
    rendered = console.render_lines(renderable, console.options, pad=False)  # type: ignore[arg-type]
    for i, line in enumerate(rendered):
        console.print(Segments(line), end="")
        if i < len(rendered) - 1:
            out.write("\r\n")
    screen = pyte.Screen(columns, lines)
    pyte.Stream(screen).feed(out.getvalue())
    return [line.rstrip() for line in screen.display], len(rendered)


def _busy(subflows: int = 6, streams: int = 5) -> Snapshot:
    """A client at full speed: wide figures (``130.0 KiB/s``) in every cell."""
    rates = {"tx_real": 12.5 * MiB, "tx_dummy": 130 * 1024.0, "rx_real": 1.5 * MiB}
    rates["rx_dummy"] = 20 * 1024.0
    return Snapshot(
        role="client",
        time=100.0,
        window=10.0,
        sessions=1,
        subflows=[
            SubflowRow(
                "a1b2c3d4",
                sid,
                f"203.0.113.7:{40000 + sid}",
                sid != 3,
                41.25 + sid,
                512 * 1024 * sid,
                {},
                dict(rates),
                3 * MiB * sid,
                cc="bbr" if sid != 2 else "cubic",
            )
            for sid in range(1, subflows + 1)
        ],
        streams=[
            StreamRow(
                "a1b2c3d4",
                2 * i + 1,
                f"download{i}.example.com:443",
                120.0,
                900 * MiB,
                1500 * MiB,
                25.5 * MiB,
                1.5 * MiB * (i + 1),
            )
            for i in range(streams)
        ],
        rates={k: v * subflows for k, v in rates.items()},
        retransmitted=63 * MiB,
        subflows_lost=2,
        redials=1,
        buffered=256 * 1024,
    )


LOG = [
    f"2026-12-01T08:0{i}:00+0000 [stripeproxy.net.client#info] event {i} " + "x" * 60
    for i in range(8)
]

# A figure cut short by the terminal: "MiB…", "KiB/…", "12.5…".
CUT_FIGURE = re.compile(r"(\d|B|/s|/)…")


def _cells(line: str) -> list[str]:
    return line.split()


def test_dashboard_at_80x24_keeps_every_section_and_whole_figures() -> None:
    screen, height = _live_screen(render(_busy(), LOG, (80, 24)), 80, 24)
    text = "\n".join(screen)
    assert height <= 24
    assert screen[0].startswith("stripe-client  sessions 1  subflows 6  streams 5")
    assert "re-dials 1" in text and "retransmitted 63.0 MiB" in text  # header wrapped, not cut
    assert not CUT_FIGURE.search(text), text
    # Every subflow, its figures whole; the columns that did not fit are named.
    title = next(line for line in screen if line.startswith("subflows"))
    assert "too narrow for: session, peer" in title
    rows = [_cells(line) for line in screen if re.match(r"\d ", line)]
    assert [r[0] for r in rows[:6]] == ["1", "2", "3", "4", "5", "6"]
    assert rows[2][1:6] == ["full", "44.2", "12.5", "MiB/s", "130.0"]
    total = next(line for line in screen if "total" in line)
    assert "75.0 MiB/s" in total and "63.0 MiB" in total
    # The streams section, busiest first, with whole targets.
    assert any(line.startswith("streams") for line in screen)
    stream_rows = [line for line in screen if "example.com:443" in line]
    assert len(stream_rows) == 5
    assert _cells(stream_rows[0])[:2] == ["9", "download4.example.com:443"]
    assert _cells(stream_rows[0])[-2:] == ["7.5", "MiB/s"]
    # The log section, with the newest lines.
    assert any(line.startswith("log ─") for line in screen)
    assert screen[-1].startswith("2026-12-01T08:07:00+0000 [stripeproxy.net.client#info] event 7")


def test_dashboard_shows_each_subflows_congestion_control() -> None:
    """A wide terminal shows the cc column; at 80 columns it goes right after the peer."""
    screen = _screen_text(render(_busy(), LOG, (160, 40)), 160, 40)
    header = next(line for line in screen if "RTT ms" in line)
    assert _cells(header)[-1] == "cc" or header.rstrip(" ┃").endswith("cc"), header
    rows = [line for line in screen if re.search(r"203\.0\.113\.7:4000\d", line)]
    assert [line.rstrip(" ┃│").split()[-1] for line in rows] == [
        "bbr",
        "cubic",
        "bbr",
        "bbr",
        "bbr",
        "bbr",
    ]
    narrow, _ = _live_screen(render(_busy(), LOG, (80, 24)), 80, 24)
    title = next(line for line in narrow if line.startswith("subflows"))
    assert "too narrow for: session, peer, cc" in title


def test_dashboard_says_what_it_left_out_when_short() -> None:
    screen, height = _live_screen(render(_busy(subflows=8, streams=30), LOG, (80, 24)), 80, 24)
    text = "\n".join(screen)
    assert height <= 24
    assert not CUT_FIGURE.search(text), text
    assert len([line for line in screen if re.match(r"\d ", line)]) == 8  # all subflows
    shown = [line for line in screen if "example.com:443" in line]
    assert 1 <= len(shown) <= 3
    assert _cells(shown[0])[1] == "download29.example.com:443"  # the busiest
    assert f"… {30 - len(shown)} more streams (the busiest are shown)" in text
    assert any(line.startswith("log ─") for line in screen)
    assert "event 7" in screen[-1]


def test_dashboard_too_small_says_so() -> None:
    screen, height = _live_screen(render(_busy(subflows=8, streams=30), LOG, (80, 12)), 80, 12)
    assert height <= 12
    assert screen[0].startswith("stripe-client")
    assert any("terminal 80x12 is too small for the tables" in line for line in screen)


def test_a_wide_terminal_gets_the_boxed_layout_unchanged() -> None:
    snapshot = _snapshot()
    sized, _ = _live_screen(render(snapshot, ["a log line"], (160, 40)), 160, 40)
    unsized, _ = _live_screen(render(snapshot, ["a log line"]), 160, 40)
    assert sized == unsized
    assert any(line.startswith("┏━") for line in sized)
    assert any(re.match(r"│ a1b2c3d4 +│ 1 ", line) for line in sized)


def test_log_lines_are_shown_as_written_not_as_markup() -> None:
    line = "[stripeproxy.net.client#info] target [bold]evil[/bold] [/x]"
    for size in (None, (80, 24)):
        screen, _ = _live_screen(render(_snapshot(), [line], size), 160 if size is None else 80, 40)
        assert any(line in row for row in screen), (size, screen)


def test_dashboard_service_draws_for_its_terminal_size() -> None:
    """The running dashboard passes the terminal's size: at 80x24 nothing is dropped."""
    out = io.StringIO()
    console = Console(file=out, width=80, height=24, force_terminal=True, color_system="standard")
    monitor = Monitor("client", Clock(), lambda: [])
    dashboard = Dashboard(monitor, console)
    dashboard.startService()
    try:
        for text in LOG:
            dashboard.tail({"log_format": "{text}", "text": text})
        (draw,) = monitor.listeners
        draw(_busy())
    finally:
        dashboard.stopService()
    screen = pyte.Screen(80, 24)
    pyte.Stream(screen).feed(out.getvalue().replace("\n", "\r\n"))
    text = "\n".join(line.rstrip() for line in screen.display)
    assert "download4.example.com:443" in text and "log ─" in text and "event 7" in text
    assert not CUT_FIGURE.search(text), text


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(30, 220),
    subflows=st.integers(0, 12),
    streams=st.integers(0, 30),
    logs=st.integers(0, 8),
    compact=st.booleans(),
    limits=st.tuples(
        st.none() | st.integers(0, 12), st.integers(0, 20), st.none() | st.integers(0, 8)
    ),
)
def test_counted_height_is_the_drawn_height(
    width: int,
    subflows: int,
    streams: int,
    logs: int,
    compact: bool,
    limits: tuple[int | None, int, int | None],
) -> None:
    """The dashboard plans a frame by counting lines (it must not draw it twice a second
    to find out); the count must be what rich then draws, or a frame planned to fill
    the terminal would lose its last lines."""
    frame = _Frame(_busy(subflows, streams), LOG[:logs], width)
    fit = _Fit(width, compact, *limits)
    console = Console(file=io.StringIO(), width=width, height=1000)
    drawn = console.render_lines(frame.draw(fit), console.options, pad=False)
    assert len(drawn) == frame.height(fit)
