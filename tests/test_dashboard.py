"""The dashboard drawn from a known snapshot into a fixed-size virtual terminal."""

from __future__ import annotations

import io

import pyte
from rich.console import Console
from twisted.internet.task import Clock

from stripeproxy.net.driver import StreamInfo, SubflowInfo
from stripeproxy.ops.dashboard import LogTail, human_bytes, human_rate, render
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
