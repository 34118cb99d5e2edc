"""``scripts/run-local`` stops cleanly on Ctrl+C.

Ctrl+C in a terminal is SIGINT to the terminal's foreground process group:
the script, the client in the foreground and the server in the background
(which ignores it, as bash makes background jobs of a script do).  The
script must then stop the server with exactly one SIGTERM and wait for it:
two (its INT and EXIT traps both used to send one) made Twisted stop the
reactor twice, a ``ReactorNotRunning`` traceback in the server log, or
killed the server in the middle of its drain; not waiting left it running
after the script had returned.

The script runs from a scratch copy of the checkout whose ``.venv/bin``
holds stand-ins: ``pip`` does nothing (the suite's environment already has
everything), the other commands run this checkout's code with the suite's
Python, and ``twistd`` records its pid so the test can tell whether the
server outlived the script.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

PYTHON_STUB = """#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then exit 0; fi
exec {python} "$@"
"""
KEYGEN_STUB = """#!/bin/sh
exec {python} -m stripeproxy.cli.keygen "$@"
"""
TWISTD_STUB = """#!/bin/sh
echo $$ >> "{pids}"
exec {python} -c "from twisted.scripts.twistd import run; run()" "$@"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (its parent, the script, is gone).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def established(port: int) -> int:
    """Established TCP connections whose local port is ``port`` (the server's side)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            count += int(local.rsplit(":", 1)[1], 16) == port and state == "01"
    return count


def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_ctrl_c_stops_server_once_and_waits_for_it(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy2(REPO / "scripts" / "run-local", checkout / "scripts" / "run-local")
    shutil.copy2(REPO / "constraints.txt", checkout / "constraints.txt")
    bin_dir = checkout / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    pids = tmp_path / "pids"
    for name, text in (
        ("python", PYTHON_STUB),
        ("stripe-keygen", KEYGEN_STUB),
        ("twistd", TWISTD_STUB),
    ):
        (bin_dir / name).write_text(text.format(python=sys.executable, pids=pids))
        (bin_dir / name).chmod(0o755)

    socks, server = free_port(), free_port()
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        SOCKS=f"127.0.0.1:{socks}",
        SERVER=f"127.0.0.1:{server}",
        SUBFLOWS="2",
    )
    run_dir = checkout / ".run"
    out = tmp_path / "out.txt"
    # Output to a file, not a pipe: the server would hold a pipe open, and
    # the test must see when the script itself returns.
    with out.open("wb") as sink:
        script = subprocess.Popen(
            [str(checkout / "scripts" / "run-local")],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, like a terminal's foreground job
        )
    try:

        def subflows_up() -> bool:
            assert script.poll() is None, out.read_text()
            return established(server) >= 2

        until(subflows_up, 60, "the client's two subflows")
        os.killpg(script.pid, signal.SIGINT)  # what Ctrl+C does
        script.wait(timeout=60)
        # The moment the script has returned, nothing it started is left.
        started = [int(p) for p in pids.read_text().split()]
        assert len(started) == 2
        assert [pid for pid in started if alive(pid)] == []
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
            script.wait()
        for pid in [int(p) for p in pids.read_text().split()] if pids.exists() else []:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)

    server_log = (run_dir / "server.log").read_text()
    client_log = (run_dir / "client.log").read_text()
    assert server_log.count("Received SIGTERM") == 1, server_log
    assert "Received SIGINT" not in server_log
    assert client_log.count("Received SIGINT") == 1, client_log
    for log in (server_log, client_log):
        assert "Traceback" not in log and "ReactorNotRunning" not in log, log
        assert "Main loop terminated." in log, log
    text = out.read_text()
    assert script.returncode == 130, text
    assert ".venv/bin/stripe-test-target" in text  # how to reach the harness commands
