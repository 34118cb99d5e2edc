"""The test-target and test-consumer dashboards (``--tui``).

Views are drawn from known states into a fixed-size virtual terminal (pyte)
and the numbers read back off the screen, as in test_dashboard.py. The
sampling loop runs on a ``task.Clock`` so its rates can be checked exactly.
The entry points run as subprocesses (``react`` owns its process's
reactor), on pipes and on a pseudo-terminal, to check that the result lines
scripts read survive the live display, and that a target's log lines are
held off its screen and written out afterwards.
"""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pyte
import pytest
import pytest_twisted
from helpers import Cleanup, in_thread
from rich.console import Console, RenderableType
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.logger import Logger, LogPublisher

from stripeproxy.harness import _cli, target
from stripeproxy.harness.consumer import (
    MIB,
    ConsumerOptions,
    ConsumerProgress,
    UploadResult,
    generate_payload,
)
from stripeproxy.harness.dashboard import (
    ConsumerSampler,
    ConsumerView,
    LiveDashboard,
    TargetSampler,
    TargetView,
    render_consumer,
    render_target,
)
from stripeproxy.harness.target import TargetOptions, TargetSite, TargetStats

REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT = 20.0
DIGEST = "0123456789abcdef" * 4

RESULT_LINES = re.compile(
    r"\Amode: (?P<mode>direct|SOCKS \S+)\n"
    r"client_time_ms=(?P<client_ms>\d+)\n"
    r"throughput_mibps=(?P<mibps>\d+\.\d{2})\n"
    r"server_bytes=(?P<bytes>\d+) server_time_ms=(?P<server_ms>\d+)\n\Z"
)

# ----------------------------------------------------------------- screens


def _feed(data: str, columns: int, lines: int) -> list[str]:
    screen = pyte.Screen(columns, lines)
    pyte.Stream(screen).feed(data)
    return [line.rstrip() for line in screen.display]


def _screen_text(renderable: RenderableType, columns: int = 120, lines: int = 40) -> list[str]:
    """Render with rich's ANSI output, replay it in a pyte terminal, read the screen."""
    out = io.StringIO()
    console = Console(file=out, width=columns, force_terminal=True, color_system="standard")
    console.print(renderable)
    return _feed(out.getvalue().replace("\n", "\r\n"), columns, lines)


def _cells(line: str) -> list[str]:
    """The cells of a table row, without the outer borders."""
    return [cell.strip() for cell in line.split("│")[1:-1]]


def _row_under(lines: list[str], heading: str) -> list[str]:
    """Cells of the first data row of the table whose column headings include ``heading``."""
    at = next(i for i, line in enumerate(lines) if "┃" in line and heading in line)
    row = next(line for line in lines[at + 1 :] if line.startswith("│"))
    return _cells(row)


def _headings(lines: list[str], heading: str) -> list[str]:
    line = next(line for line in lines if "┃" in line and heading in line)
    return [cell.strip() for cell in line.split("┃")[1:-1]]


# ------------------------------------------------------------ target view


def test_target_view_shows_totals_rates_and_last_upload() -> None:
    view = TargetView(
        listening="127.0.0.1:9000",
        uptime=125.4,
        window=10.0,
        bytes_received=12 * MIB + 512 * 1024,
        receive_rate=2 * MIB,
        requests=7,
        request_rate=0.3,
        uploads=5,
        last_upload_bytes=5 * MIB,
        last_upload_seconds=0.25,
        last_upload_sha256=DIGEST,
        last_upload_age=3.2,
    )
    lines = _screen_text(render_target(view, ["upload from 127.0.0.1:5555: 5242880 bytes"]))
    header = next(line for line in lines if line.startswith("stripe-test-target"))
    assert "listening on 127.0.0.1:9000" in header
    assert "up 125 s" in header and "window 10 s" in header
    assert "requests 7  req/s 0.3  uploads 5" in header
    assert _headings(lines, "RX dummy") == ["total", "real", "dummy", "RX real", "RX dummy"]
    assert _row_under(lines, "RX dummy") == ["12.5 MiB", "12.5 MiB", "0 B", "2.0 MiB/s", "0 B/s"]
    assert _headings(lines, "sha256") == ["size", "time ms", "throughput", "sha256", "ago s"]
    assert _row_under(lines, "sha256") == [
        "5.0 MiB",
        "250.0",
        "20.0 MiB/s",
        DIGEST[:16],
        "3",
    ]
    assert any("upload from 127.0.0.1:5555: 5242880 bytes" in line for line in lines)


def test_target_view_before_any_upload() -> None:
    view = TargetView("[::1]:9000", 0.0, 10.0, 0, 0.0, 0, 0.0, 0)
    lines = _screen_text(render_target(view))
    assert _row_under(lines, "RX dummy") == ["0 B", "0 B", "0 B", "0 B/s", "0 B/s"]
    assert "requests 0  req/s 0.0  uploads 0" in lines[0]
    assert _row_under(lines, "sha256") == ["-"] * 5
    assert not any("log" in line for line in lines)  # no panel without log lines


# ---------------------------------------------------------- consumer view


def _consumer_view(**changes: object) -> ConsumerView:
    fields: dict[str, object] = {
        "mode": "SOCKS 127.0.0.1:1080",
        "target": "http://127.0.0.1:9000/upload",
        "window": 10.0,
        "instant_window": 0.5,
        "elapsed": 1.5,
        "bytes_sent": 3 * MIB,
        "total_bytes": 4 * MIB,
        "average_rate": 2 * MIB,
        "instant_rate": 3 * MIB,
        "window_rate": 2 * MIB,
    }
    fields.update(changes)
    return ConsumerView(**fields)  # type: ignore[arg-type]


def test_consumer_view_while_sending() -> None:
    lines = _screen_text(render_consumer(_consumer_view(), ["a log line"]))
    header = next(line for line in lines if line.startswith("stripe-test-consumer"))
    assert "SOCKS 127.0.0.1:1080 → http://127.0.0.1:9000/upload" in header
    bar = next(line for line in lines if "%" in line)
    assert bar.endswith(" 75.0% 3.0 MiB / 4.0 MiB")
    assert _headings(lines, "elapsed s") == [
        "elapsed s",
        "sent",
        "average",
        "last 0.5 s",
        "last 10 s",
    ]
    assert _row_under(lines, "elapsed s") == [
        "1.5",
        str(3 * MIB),
        "2.0 MiB/s",
        "3.0 MiB/s",
        "2.0 MiB/s",
    ]
    assert _row_under(lines, "check") == ["waiting", "-", "-", "-", "-"]
    assert any("a log line" in line for line in lines)


def test_consumer_view_with_the_answer() -> None:
    result = UploadResult(4 * MIB, DIGEST, 2.0, 4 * MIB, 1875, DIGEST)
    lines = _screen_text(render_consumer(_consumer_view(bytes_sent=4 * MIB, result=result)))
    assert next(line for line in lines if "%" in line).endswith("100.0% 4.0 MiB / 4.0 MiB")
    assert _row_under(lines, "check") == [
        "answered",
        str(4 * MIB),
        "1875",
        DIGEST[:16],
        "matches",
    ]


def test_consumer_view_when_failed_or_not_started() -> None:
    lines = _screen_text(render_consumer(_consumer_view(error="connection refused")))
    assert _row_under(lines, "check") == ["failed", "-", "-", "-", "-"]
    assert "error: connection refused" in lines
    lines = _screen_text(render_consumer(_consumer_view(elapsed=None, bytes_sent=0)))
    assert _row_under(lines, "elapsed s")[0] == "-"
    assert _row_under(lines, "check")[0] == "connecting"


# ------------------------------------------------- the loop, on a fake clock


def _dashboard(
    clock: Clock,
    sample: Callable[[float], object],
    render: Callable[..., RenderableType],
    publisher: LogPublisher,
) -> tuple[LiveDashboard[object], io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, width=120, height=40, force_terminal=True, color_system="standard")
    dashboard = LiveDashboard(clock, sample, render, console, publisher=publisher)
    return dashboard, out


def test_target_rates_are_exact_on_the_loop() -> None:
    """1 MiB and one request every 0.5 s, sampled every 0.5 s: 2.0 MiB/s and 2 req/s."""
    clock = Clock()
    clock.advance(1000)
    stats = TargetStats(started_at=clock.seconds())
    publisher = LogPublisher()
    dashboard, out = _dashboard(
        clock, TargetSampler(stats, "127.0.0.1:9000"), render_target, publisher
    )
    dashboard.start()
    for _ in range(40):  # 20 s: the window has filled and slid
        stats.bytes_received += MIB
        stats.requests += 1
        clock.advance(0.5)
        view = dashboard.latest
        assert isinstance(view, TargetView)
        assert view.receive_rate == 2 * MIB
        assert view.request_rate == 2.0
    assert view.uptime == 20.0 and view.bytes_received == 40 * MIB
    Logger(observer=publisher).info("upload from {peer}", peer="127.0.0.1:4242")
    dashboard.stop()
    assert not clock.getDelayedCalls()  # the loop has stopped
    # Every frame was drawn over the previous one: the final screen holds one
    # dashboard, with the log line that arrived last.
    lines = _feed(out.getvalue().replace("\n", "\r\n"), 120, 40)
    assert sum(line.startswith("stripe-test-target") for line in lines) == 1
    assert _row_under(lines, "RX dummy") == ["40.0 MiB", "40.0 MiB", "0 B", "2.0 MiB/s", "0 B/s"]
    assert "requests 40  req/s 2.0  uploads 0" in lines[0]
    assert any("upload from 127.0.0.1:4242" in line for line in lines)


def test_consumer_rates_are_exact_on_the_loop() -> None:
    """1 MiB per 0.5 s: 2.0 MiB/s on average, over the last 0.5 s and over 10 s."""
    clock = Clock()
    progress = ConsumerProgress(total_bytes=32 * MIB, started_at=0.0)
    dashboard, out = _dashboard(
        clock, ConsumerSampler(progress, "http://t/upload"), render_consumer, LogPublisher()
    )
    dashboard.start()
    for step in range(1, 25):
        progress.bytes_sent += MIB
        clock.advance(0.5)
        view = dashboard.latest
        assert isinstance(view, ConsumerView)
        assert (view.average_rate, view.instant_rate, view.window_rate) == (2 * MIB,) * 3
        assert view.elapsed == step * 0.5
    # A burst of 3 MiB in one period: the last-0.5-s rate shows all of it,
    # the 10 s window a twentieth, the average since the start less.
    progress.bytes_sent += 3 * MIB
    clock.advance(0.5)
    view = dashboard.latest
    assert isinstance(view, ConsumerView)
    assert view.instant_rate == 6 * MIB
    assert view.window_rate == (27 * MIB - 5 * MIB) / 10  # minus what had been sent at 2.5 s
    assert view.average_rate == 27 * MIB / 12.5
    lines = _feed(out.getvalue().replace("\n", "\r\n"), 120, 40)
    assert _row_under(lines, "elapsed s")[2:] == ["2.2 MiB/s", "6.0 MiB/s", "2.2 MiB/s"]
    progress.finished_at = clock.seconds()
    progress.result = UploadResult(27 * MIB, DIGEST, 12.5, 27 * MIB, 12400, DIGEST)
    dashboard.stop()
    dashboard.stop()  # twice is harmless
    lines = _feed(out.getvalue().replace("\n", "\r\n"), 120, 40)
    assert sum(line.startswith("stripe-test-consumer") for line in lines) == 1
    assert _row_under(lines, "check")[0] == "answered"


def test_held_log_is_written_after_the_display() -> None:
    out = io.StringIO()
    log = _cli.StderrLog(out, limit=3)
    log({"log_format": "before", "log_time": 0.0})
    log.hold()
    for i in range(5):
        log({"log_format": "held {i}", "i": i, "log_time": 0.0})
    assert out.getvalue().count("\n") == 1
    log.release()
    log({"log_format": "after", "log_time": 0.0})
    lines = [line.split(" ", 2)[-1] for line in out.getvalue().splitlines()]
    assert lines == [
        "before",
        "(2 earlier log lines dropped while the dashboard ran)",
        "held 2",
        "held 3",
        "held 4",
        "after",
    ]


@pytest.mark.parametrize("options_class", [TargetOptions, ConsumerOptions])
def test_tui_default_follows_stdout(
    options_class: type[_cli.HarnessOptions], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As with the proxy: on when stdout is a terminal, unless told; last switch wins."""
    for terminal, argv, expected in [
        (True, [], True),
        (False, [], False),
        (True, ["--no-tui"], False),
        (False, ["--tui"], True),
        (True, ["--tui", "--no-tui"], False),
        (False, ["--no-tui", "--tui"], True),
    ]:
        monkeypatch.setattr(sys, "stdout", _Stdout(terminal))
        options = options_class()
        options.parseOptions(argv)
        assert options["tui"] is expected, (terminal, argv)


class _Stdout(io.StringIO):
    def __init__(self, terminal: bool) -> None:
        super().__init__()
        self._terminal = terminal

    def isatty(self) -> bool:
        return self._terminal


# ------------------------------------------------------------ entry points


def _env(tmp_path: Path) -> dict[str, str]:
    """Import this checkout; a plain xterm whatever the outer environment says."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["TMPDIR"] = str(tmp_path)
    env["TERM"] = "xterm-256color"
    return env


class PtyProcess:
    """A subprocess whose stderr (and, unless piped, stdout) is a pseudo-terminal.

    A thread collects what it writes to the terminal, so the test can wait
    for text while the reactor keeps running.
    """

    def __init__(self, argv: list[str], env: dict[str, str], *, pipe_stdout: bool = False) -> None:
        self.columns, self.rows = 120, 50
        master, slave = pty.openpty()
        size = struct.pack("HHHH", self.rows, self.columns, 0, 0)
        fcntl.ioctl(slave, termios.TIOCSWINSZ, size)
        self.process = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=subprocess.PIPE if pipe_stdout else slave,
            stderr=slave,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        self._master = master
        self._output = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            ready, _, _ = select.select([self._master], [], [], SUBPROCESS_TIMEOUT)
            if not ready:
                return
            try:
                data = os.read(self._master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                return
            if not data:
                return
            with self._lock:
                self._output += data

    @property
    def output(self) -> str:
        with self._lock:
            return self._output.decode("utf-8", "replace")

    def wait_for(self, pattern: str) -> re.Match[str]:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        while time.monotonic() < deadline:
            found = re.search(pattern, self.output)
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError(f"never saw {pattern!r} in:\n{self.output}")

    def finish(self) -> tuple[int, str]:
        """Wait for the exit; the exit code and stdout, if piped."""
        try:
            stdout, _ = self.process.communicate(timeout=SUBPROCESS_TIMEOUT)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._reader.join(SUBPROCESS_TIMEOUT)
            os.close(self._master)
        return self.process.returncode, (stdout or b"").decode()

    def screen(self) -> list[str]:
        return _feed(self.output, self.columns, self.rows)


def _consumer_argv(port: int, path: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "stripeproxy.harness.consumer",
        *("--target", f"http://127.0.0.1:{port}/upload", "--file", path, "--tui"),
    ]


async def _start_target(cleanup: Cleanup) -> tuple[int, TargetSite]:
    port = await target.listen(reactor, TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
    cleanup.add(port.stopListening, "stop test target")
    site = port.factory  # type: ignore[attr-defined]
    assert isinstance(site, TargetSite)
    return port.getHost().port, site


def _payload(tmp_path: Path, size: int) -> str:
    path = str(tmp_path / "payload.txt")
    generate_payload(path, size, seed=3)
    return path


@pytest_twisted.ensureDeferred
async def test_consumer_tui_on_pipes_keeps_stdout_clean(cleanup: Cleanup, tmp_path: Path) -> None:
    """``--tui`` forced with no terminal: stdout has exactly the result lines.

    The display goes to stderr, where rich writes only the final frame.
    """
    port, site = await _start_target(cleanup)
    path = _payload(tmp_path, 2 * MIB)
    run = await in_thread(
        subprocess.run,
        _consumer_argv(port, path),
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    lines = RESULT_LINES.match(run.stdout)
    assert lines, run.stdout
    assert lines["mode"] == "direct" and int(lines["bytes"]) == 2 * MIB
    assert float(lines["mibps"]) > 0
    assert "stripe-test-consumer" in run.stderr and "matches" in run.stderr
    assert "\x1b[" not in run.stderr  # not a terminal: no escape sequences
    assert site.stats.uploads == 1


@pytest_twisted.ensureDeferred
async def test_consumer_tui_on_a_terminal_leaves_result_lines_whole(
    cleanup: Cleanup, tmp_path: Path
) -> None:
    """Display and results on one terminal: the result lines come after the
    final frame, each a whole line with no escape sequence inside."""
    port, _ = await _start_target(cleanup)
    path = _payload(tmp_path, 4 * MIB)
    child = PtyProcess(_consumer_argv(port, path), _env(tmp_path))
    code, _ = await in_thread(child.finish)
    raw = child.output
    assert code == 0, raw
    text_lines = raw.split("\r\n")  # as a raw capture of the terminal (script, tmux) has them
    assert "mode: direct" in text_lines
    assert any(re.fullmatch(r"client_time_ms=\d+", line) for line in text_lines), raw
    assert any(re.fullmatch(r"throughput_mibps=\d+\.\d\d", line) for line in text_lines), raw
    assert f"server_bytes={4 * MIB} server_time_ms=" in raw
    screen = child.screen()
    assert "\x1b[?25h" in raw  # the cursor was shown again
    header = next(i for i, line in enumerate(screen) if line.startswith("stripe-test-consumer"))
    assert screen.index("mode: direct") < header
    assert _row_under(screen, "check")[:2] == ["answered", str(4 * MIB)]
    assert _row_under(screen, "check")[4] == "matches"
    frame_end = max(i for i, line in enumerate(screen) if line.startswith("╰"))
    at = next(i for i, line in enumerate(screen) if line.startswith("client_time_ms="))
    assert at > frame_end, screen  # after the final frame (a blank line between)
    assert re.fullmatch(r"client_time_ms=\d+", screen[at]), screen
    assert re.fullmatch(r"throughput_mibps=\d+\.\d\d", screen[at + 1]), screen
    assert re.fullmatch(rf"server_bytes={4 * MIB} server_time_ms=\d+", screen[at + 2]), screen


@pytest_twisted.ensureDeferred
async def test_consumer_tui_on_stderr_when_stdout_is_piped(
    cleanup: Cleanup, tmp_path: Path
) -> None:
    port, _ = await _start_target(cleanup)
    path = _payload(tmp_path, MIB)
    child = PtyProcess(_consumer_argv(port, path), _env(tmp_path), pipe_stdout=True)
    code, stdout = await in_thread(child.finish)
    assert code == 0, child.output
    assert RESULT_LINES.match(stdout), stdout
    assert "mode: direct" not in child.output
    assert _row_under(child.screen(), "check")[0] == "answered"


def _post(url: str, body: bytes) -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, body), timeout=10) as answer:
        data: bytes = answer.read()
        return data


def test_target_tui_on_a_terminal(tmp_path: Path) -> None:
    """The target's dashboard counts an upload; its log lines are held off the
    screen while it runs and written out after it, on Ctrl+C."""
    child = PtyProcess(
        [
            sys.executable,
            "-m",
            "stripeproxy.harness.target",
            *("--listen", "tcp:0:interface=127.0.0.1"),
        ],
        _env(tmp_path),
    )
    try:
        port = child.wait_for(r"test-target listening on 127\.0\.0\.1:(\d+)")[1]
        child.wait_for(r"stripe-test-target")  # on by default: stdout is a terminal
        answer = _post(f"http://127.0.0.1:{port}/upload", b"x" * 300_000)
        assert b'"bytes": 300000' in answer
        child.wait_for(r"uploads 1\b")
        assert "upload from" not in child.output.split("stripe-test-target", 1)[0]
        child.process.send_signal(signal.SIGINT)
    finally:
        code, _ = child.finish()
    assert code == 0, child.output
    screen = child.screen()
    header = next(line for line in screen if line.startswith("stripe-test-target"))
    assert "requests 1 " in header and "uploads 1" in header
    row = _row_under(screen, "RX dummy")
    assert row[0] == row[1] == "293.0 KiB" and row[2] == "0 B"
    last = _row_under(screen, "sha256")
    assert last[0] == "293.0 KiB"
    # The held log line comes after the final frame, as a line of its own.
    frame_end = max(i for i, line in enumerate(screen) if line.startswith("╰"))
    assert any("upload from 127.0.0.1:" in line for line in screen[frame_end + 1 :]), screen
