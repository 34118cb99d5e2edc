"""Starting, watching and stopping the benchmark's processes.

Every participant is a separate process so that CPU time and memory can be
read per process from ``/proc/PID`` and so that the load generator never
competes with the proxy for a GIL.  Processes are stopped by their own PID
(SIGTERM, then SIGKILL) and never by name: other people's processes run on
the same machine.  A process in a network namespace is started through
``ip netns exec``, which ``exec``s, so the PID we hold is the program's own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import stripeproxy

log = logging.getLogger("bench")

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


class BenchError(RuntimeError):
    """A run could not be measured (a process died, a port never opened, ...)."""


def project_root() -> Path | None:
    """The checkout this package was imported from, if it looks like one.

    Child processes get it on ``PYTHONPATH`` so that ``twistd`` runs the very
    code the benchmark imported (and finds ``twisted/plugins`` there) even
    when an older copy is installed in site-packages.
    """
    root = Path(stripeproxy.__file__).resolve().parent.parent
    return root if (root / "twisted" / "plugins").is_dir() else None


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    root = project_root()
    if root is not None:
        parts = [str(root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def twistd_command() -> list[str]:
    """``twistd`` of this interpreter (the script next to it, else the same code via -c)."""
    script = shutil.which("twistd", path=str(Path(sys.executable).parent))
    if script:
        return [script]
    code = "import sys; from twisted.scripts.twistd import run; sys.argv[0]='twistd'; run()"
    return [sys.executable, "-c", code]


def in_netns(ns: str | None, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv] if ns else list(argv)


def read_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def read_schedstat(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of ``pid``'s main thread.

    The second figure tells a CPU-bound process from a CPU-starved one: on a
    shared 2-core machine a proxy can be ready to run and still wait.
    """
    with open(f"/proc/{pid}/schedstat") as f:
        run_ns, wait_ns, _ = f.read().split()
    return int(run_ns) / 1e9, int(wait_ns) / 1e9


def read_rss_bytes(pid: int) -> int:
    """VmRSS of ``pid`` in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def tcp_sockets(pid: int) -> list[tuple[int, int, int]]:
    """(local port, remote port, state) of the TCP sockets in ``pid``'s network namespace.

    Reading ``/proc/PID/net/tcp*`` shows the namespace of that process, so this
    works for processes in the emulator's namespaces too.
    """
    out: list[tuple[int, int, int]] = []
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, remote, state = parts[1], parts[2], parts[3]
                    out.append(
                        (
                            int(local.rsplit(":", 1)[1], 16),
                            int(remote.rsplit(":", 1)[1], 16),
                            int(state, 16),
                        )
                    )
        except OSError:
            continue
    return out


TCP_ESTABLISHED = 1
TCP_LISTEN = 10


def free_port() -> int:
    """A port free on loopback right now (the usual bind-to-0 trick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """A started child process and where its output goes."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu(self) -> float:
        return read_cpu_seconds(self.pid)

    def rss(self) -> int:
        return read_rss_bytes(self.pid)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check(self) -> None:
        if not self.alive():
            raise BenchError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")

    def stop(self, timeout: float = 5.0) -> None:
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) ignored SIGTERM; killing it", self.name, self.pid)
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
            self.popen.wait()


@dataclass
class ProcessGroup:
    """Every process a scenario started; stopped in reverse order on exit, by PID."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()

    def stop_all(self) -> None:
        while self.procs:
            self.procs.pop().stop()

    def start(
        self, name: str, argv: Sequence[str], ns: str | None = None, stdout_pipe: bool = False
    ) -> Proc:
        """Start ``argv`` (in namespace ``ns``); stderr (and stdout unless piped) go to a log."""
        log_path = self.workdir / f"{name}.log"
        logf = open(log_path, "ab")  # noqa: SIM115 - the child owns it
        try:
            popen = subprocess.Popen(
                in_netns(ns, argv),
                stdout=subprocess.PIPE if stdout_pipe else logf,
                stderr=logf,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                env=child_env(),
                start_new_session=True,
            )
        finally:
            logf.close()
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        log.debug("started %s pid %d: %s", name, popen.pid, " ".join(argv))
        return proc

    def start_traffic_server(
        self,
        name: str,
        ns: str | None = None,
        bind: str = "127.0.0.1",
        port: int = 0,
        hello: bool = False,
        rate: float = 0.0,
    ) -> tuple[Proc, dict[str, int]]:
        """Start ``traffic serve`` and read the ports it reports."""
        args = ["serve", "--bind", bind, "--port", str(port)]
        if hello:
            args += ["--hello-port", "0"]
        if rate:
            args += ["--rate", str(rate)]
        proc = self.start(name, python_module("bench.traffic", *args), ns, stdout_pipe=True)
        assert proc.popen.stdout is not None
        ready, _, _ = select.select([proc.popen.stdout], [], [], 20.0)
        line = proc.popen.stdout.readline() if ready else b""
        if not line:
            proc.check()
            raise BenchError(f"{name} did not report its ports")
        return proc, json.loads(line)

    def start_twistd(
        self, name: str, plugin: str, args: Sequence[str], ns: str | None = None
    ) -> Proc:
        """``twistd -n PLUGIN ARGS``: the way users run the proxy, logging to a file."""
        log_file = self.workdir / f"{name}.twistd.log"
        argv = [
            *twistd_command(),
            "-n",
            "--pidfile=",
            "--logfile",
            str(log_file),
            plugin,
            "--no-tui",
            *args,
        ]
        proc = self.start(name, argv, ns)
        proc.log_path = log_file
        return proc


def wait_until(predicate: Any, what: str, timeout: float, procs: Sequence[Proc] = ()) -> None:
    """Poll ``predicate`` every 50 ms; fail early if one of ``procs`` died."""
    deadline = time.monotonic() + timeout
    while not predicate():
        for p in procs:
            p.check()
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def wait_listening(proc: Proc, port: int, timeout: float = 20.0) -> None:
    wait_until(
        lambda: any(lp == port and st == TCP_LISTEN for lp, _, st in tcp_sockets(proc.pid)),
        f"{proc.name} to listen on {port}",
        timeout,
        [proc],
    )


def wait_subflows(client: Proc, server_port: int, k: int, timeout: float = 30.0) -> None:
    """Wait until ``client`` has ``k`` established TCP connections to ``server_port``."""

    def up() -> bool:
        socks = tcp_sockets(client.pid)
        return sum(1 for _, rp, st in socks if rp == server_port and st == TCP_ESTABLISHED) >= k

    wait_until(up, f"{client.name} to open {k} subflows", timeout, [client])


def run_json(argv: Sequence[str], ns: str | None = None, timeout: float = 600.0) -> Any:
    """Run a traffic client to completion and parse the JSON line it prints."""
    r = subprocess.run(
        in_netns(ns, argv),
        capture_output=True,
        env=child_env(),
        timeout=timeout,
        check=False,
    )
    if r.returncode != 0:
        raise BenchError(
            f"{' '.join(argv[:6])}... failed ({r.returncode}): {r.stderr.decode()[-800:]}"
        )
    try:
        return json.loads(r.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError) as e:
        raise BenchError(f"no JSON from {' '.join(argv[:6])}: {r.stdout[-300:]!r}") from e


def keygen(directory: Path, hostname: str) -> str:
    """``stripe-keygen --dir``; returns the certificate fingerprint it prints."""
    r = subprocess.run(
        python_module(
            "stripeproxy.cli.keygen", "--dir", str(directory), "--hostname", hostname, "--force"
        ),
        capture_output=True,
        text=True,
        env=child_env(),
        check=True,
    )
    for line in r.stdout.splitlines():
        if "fingerprint:" in line:
            return line.split("fingerprint:", 1)[1].strip()
    raise BenchError(f"stripe-keygen printed no fingerprint: {r.stdout!r}")


@dataclass(frozen=True)
class Keys:
    directory: Path
    fingerprint: str

    @property
    def psk(self) -> str:
        return str(self.directory / "psk.key")

    @property
    def cert(self) -> str:
        return str(self.directory / "server.crt")

    @property
    def key(self) -> str:
        return str(self.directory / "server.key")


def make_keys(directory: Path, hostname: str = "localhost") -> Keys:
    return Keys(directory, keygen(directory, hostname))


def server_args(keys: Keys, listen: str, tls: bool) -> list[str]:
    # The sink listens on the server's loopback, which is denied unless allowed.
    args = ["--listen", listen, "--psk-file", keys.psk, "--allow", "127.0.0.0/8"]
    return args + (["--cert", keys.cert, "--key", keys.key] if tls else ["--no-tls"])


def client_args(keys: Keys, server: str, listen: str, k: int, tls: bool) -> list[str]:
    args = ["--server", server, "--listen", listen, "--subflows", str(k), "--psk-file", keys.psk]
    return args + (["--server-fingerprint", keys.fingerprint] if tls else ["--no-tls"])


def sysctl(name: str, ns: str | None = None) -> str | None:
    """A sysctl as seen in ``ns`` (the host when None); None if unreadable."""
    r = subprocess.run(
        in_netns(ns, ["sysctl", "-n", name]), capture_output=True, text=True, check=False
    )
    return r.stdout.strip() or None if r.returncode == 0 else None


@dataclass
class CpuWindow:
    """CPU seconds a set of processes used between ``start`` and ``stop``."""

    procs: dict[str, Proc]
    before: dict[str, float] = field(default_factory=dict)
    t0: float = 0.0
    used: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0
    sched_before: dict[str, tuple[float, float]] = field(default_factory=dict)
    waited: dict[str, float] = field(default_factory=dict)

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.before = {k: p.cpu() for k, p in self.procs.items()}
        self.sched_before = {k: read_schedstat(p.pid) for k, p in self.procs.items()}

    def stop(self) -> None:
        self.wall = time.monotonic() - self.t0
        self.used = {k: p.cpu() - self.before[k] for k, p in self.procs.items()}
        self.waited = {
            k: read_schedstat(p.pid)[1] - self.sched_before[k][1] for k, p in self.procs.items()
        }


@dataclass
class OverlayPair:
    """A running stripe-server and stripe-client on loopback, all subflows up."""

    server: Proc
    client: Proc
    server_port: int
    socks: tuple[str, int]


def start_overlay(g: ProcessGroup, keys: Keys, k: int = 6, tls: bool = True) -> OverlayPair:
    """Start the proxy pair on free loopback ports and wait for its K subflows."""
    sport, cport = free_port(), free_port()
    server = g.start_twistd(
        "stripe-server", "stripe-server", server_args(keys, f"127.0.0.1:{sport}", tls)
    )
    wait_listening(server, sport)
    client = g.start_twistd(
        "stripe-client",
        "stripe-client",
        client_args(keys, f"127.0.0.1:{sport}", f"127.0.0.1:{cport}", k, tls),
    )
    wait_listening(client, cport)
    wait_subflows(client, sport, k)
    return OverlayPair(server, client, sport, ("127.0.0.1", cport))
