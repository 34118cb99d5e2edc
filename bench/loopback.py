"""Loopback scenario: how fast the overlay moves bytes when the network is free.

On loopback the path costs nothing, so this measures the proxy's own cost:
MB/s and CPU seconds per GB of the client and server processes, for

- ``direct``: sender -> sink (the ceiling of the machine and the tools);
- ``relay tcp`` / ``relay tls``: a pair of plain Twisted relays
  (:mod:`bench.relay`) -- the same two-process shape as the
  overlay but one connection and no framing; TLS on the middle leg;
- ``overlay plain`` / ``overlay tls``, K = 1 and K = 6 (``--no-tls`` or
  TLS with a pinned fingerprint).

With 1 stream and with 16 concurrent streams sharing the same total.
Ratios overlay / relay are per repetition, all cases of a repetition
measured back to back.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Context, MiB, Transfer, send_argv, transfer
from bench.procs import (
    Proc,
    ProcessGroup,
    client_args,
    free_port,
    python_module,
    server_args,
    sysctl,
    wait_listening,
    wait_subflows,
)
from bench.stats import Goal, Result, ScenarioReport

log = logging.getLogger("bench.loopback")

RELAY = "bench.relay"
STREAM_COUNTS = (1, 16)
PROFILE_SECONDS = 8.0


@dataclass
class Route:
    """One way from the sender to the sink."""

    name: str
    entry: tuple[str, int]
    socks: bool
    client: Proc | None = None
    server: Proc | None = None

    def argv(self, sink_port: int, streams: int, per_stream: int) -> list[str]:
        if self.socks:
            return send_argv(("127.0.0.1", sink_port), self.entry, streams, per_stream)
        return send_argv(self.entry, None, streams, per_stream)

    def watch(self) -> dict[str, Proc]:
        out = {}
        if self.client is not None:
            out["client"] = self.client
        if self.server is not None:
            out["server"] = self.server
        return out


def _start_paths(g: ProcessGroup, ctx: Context, sink_port: int) -> list[Route]:
    keys = ctx.keys
    paths = [Route("direct", ("127.0.0.1", sink_port), socks=False)]
    for tls in (False, True):
        kind = "tls" if tls else "tcp"
        p_srv, p_cli = free_port(), free_port()
        srv_args = ["--listen", str(p_srv), "--connect", f"127.0.0.1:{sink_port}"]
        cli_args = ["--listen", str(p_cli), "--connect", f"127.0.0.1:{p_srv}"]
        if tls:
            srv_args += ["--tls-server", "--cert", keys.cert, "--key", keys.key]
            cli_args += ["--tls-client", "--fingerprint", keys.fingerprint]
        srv = g.start(f"relay-{kind}-server", python_module(RELAY, *srv_args))
        cli = g.start(f"relay-{kind}-client", python_module(RELAY, *cli_args))
        wait_listening(srv, p_srv)
        wait_listening(cli, p_cli)
        paths.append(Route(f"relay {kind}", ("127.0.0.1", p_cli), False, cli, srv))
    for tls in (False, True):
        kind = "tls" if tls else "plain"
        port = free_port()
        server = g.start_twistd(
            f"stripe-server-{kind}", "stripe-server", server_args(keys, f"127.0.0.1:{port}", tls)
        )
        wait_listening(server, port)
        for k in (1, 6):
            listen = free_port()
            client = g.start_twistd(
                f"stripe-client-{kind}-k{k}",
                "stripe-client",
                client_args(keys, f"127.0.0.1:{port}", f"127.0.0.1:{listen}", k, tls),
            )
            wait_listening(client, listen)
            wait_subflows(client, port, k)
            paths.append(
                Route(f"overlay {kind} K={k}", ("127.0.0.1", listen), True, client, server)
            )
    return paths


def case_name(path: str, streams: int) -> str:
    return f"{path}, {streams} stream{'s' if streams > 1 else ''}"


def run(ctx: Context) -> ScenarioReport:
    size_mib = ctx.size_mib or (32 if ctx.quick else 256)
    total = size_mib * MiB
    report = ScenarioReport(
        "loopback",
        f"loopback: push {size_mib} MiB",
        sysctl("net.ipv4.tcp_congestion_control"),
        {"mib": size_mib, "streams": list(STREAM_COUNTS), "k": [1, 6], "reps": ctx.reps},
    )
    workdir = ctx.workdir / "loopback"
    workdir.mkdir(parents=True, exist_ok=True)
    figures: dict[tuple[str, str], list[float | None]] = collections.defaultdict(list)
    units = {"throughput": "MB/s", "client CPU": "s/GB", "server CPU": "s/GB"}
    units |= {"client busy": "cores", "server busy": "cores"}
    units |= {"client runq": "share", "server runq": "share"}
    with ProcessGroup(workdir) as g:
        _, ports = g.start_traffic_server("sink")
        sink_port = ports["port"]
        paths = _start_paths(g, ctx, sink_port)
        for p in paths:  # warm up: TLS sessions, lazy imports, socket buffers
            transfer(p.argv(sink_port, 1, 4 * MiB), p.watch(), timeout=120)
        for rep in range(ctx.reps):
            for streams in STREAM_COUNTS:
                for p in paths:
                    case = case_name(p.name, streams)
                    try:
                        t = transfer(p.argv(sink_port, streams, total // streams), p.watch())
                    except Exception as e:
                        log.warning("%s rep %d failed: %s", case, rep + 1, e)
                        report.notes.append(f"{case} rep {rep + 1} failed: {e}")
                        for metric in units:
                            figures[(case, metric)].append(None)
                        continue
                    _record(figures, case, t)
                    log.info(
                        "loopback rep %d %s: %.1f MB/s, client %s s/GB, server %s s/GB",
                        rep + 1,
                        case,
                        t.mb_per_s,
                        _f(t.cpu_per_gb("client")),
                        _f(t.cpu_per_gb("server")),
                    )
        for (case, metric), reps in figures.items():
            if all(v is None for v in reps):
                continue
            report.add(Result(case, metric, units[metric], reps))
        _ratios(report)
        if ctx.profile:
            prof = _profile(ctx, paths, sink_port, total, workdir)
            report.data["profile"] = prof
            report.notes += profile_notes(prof)
    return report


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _record(figures: dict[tuple[str, str], list[float | None]], case: str, t: Transfer) -> None:
    figures[(case, "throughput")].append(t.mb_per_s)
    figures[(case, "client CPU")].append(t.cpu_per_gb("client"))
    figures[(case, "server CPU")].append(t.cpu_per_gb("server"))
    figures[(case, "client busy")].append(t.cpu_share("client"))
    figures[(case, "server busy")].append(t.cpu_share("server"))
    figures[(case, "client runq")].append(t.wait_share("client"))
    figures[(case, "server runq")].append(t.wait_share("server"))


def _ratios(report: ScenarioReport) -> None:
    tp = "throughput"
    for streams in STREAM_COUNTS:
        for kind, relay in (("plain", "relay tcp"), ("tls", "relay tls")):
            for k in (1, 6):
                goal = None
                if streams == 1 and k == 6:  # issue 11
                    goal = Goal(">=", 0.75, f">= 0.75 x {relay}")
                report.ratio(
                    f"overlay {kind} K={k} / {relay}, {streams} stream{'s' * (streams > 1)}",
                    (case_name(f"overlay {kind} K={k}", streams), tp),
                    (case_name(relay, streams), tp),
                    goal,
                )
        report.ratio(
            f"relay tls / direct, {streams} stream{'s' * (streams > 1)}",
            (case_name("relay tls", streams), tp),
            (case_name("direct", streams), tp),
        )
    for kind in ("plain", "tls"):
        # What more subflows cost per byte (issue 11: within 10 %).
        report.ratio(
            f"client CPU per byte, {kind} K=6 / K=1, 1 stream",
            (case_name(f"overlay {kind} K=6", 1), "client CPU"),
            (case_name(f"overlay {kind} K=1", 1), "client CPU"),
            Goal("<=", 1.10, "<= 1.1 x K=1"),
        )


# ------------------------------------------------------------------ profile


def _py_spy() -> str | None:
    return shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*?)(?::\d+)?\)$")


def summarize_collapsed(text: str, top: int = 15) -> dict[str, Any]:
    """Self time by function and by file from py-spy's collapsed ("raw") output.

    A line is ``frame;frame;...;leaf COUNT``; the leaf is where the sample
    was taken, so counting leaves gives where the time goes.  Only the
    reactor thread counts: stacks rooted in ``threading`` belong to Twisted's
    (idle) thread pool and would otherwise swamp the idle-inclusive shares.
    """
    by_func: collections.Counter[str] = collections.Counter()
    by_file: collections.Counter[str] = collections.Counter()
    total = other_threads = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        if stack.startswith("Thread._bootstrap"):
            other_threads += n  # Twisted's idle thread pool, not the reactor
            continue
        leaf = stack.rsplit(";", 1)[-1]
        m = _FRAME.match(leaf)
        func, file = (m["func"], m["file"]) if m else (leaf, "?")
        short = "/".join(Path(file).parts[-2:]) if file else "?"
        by_func[f"{func} ({short})"] += n
        by_file[short] += n
        total += n

    def pct(c: collections.Counter[str]) -> list[list[Any]]:
        return [[k, round(100 * v / total, 1)] for k, v in c.most_common(top)] if total else []

    return {
        "samples": total,
        "other_thread_samples": other_threads,
        "self_by_function": pct(by_func),
        "self_by_file": pct(by_file),
    }


def profile_notes(prof: dict[str, Any]) -> list[str]:
    """The profile in two lines for the table: where each process spends its samples."""
    if "error" in prof:
        return [f"py-spy: {prof['error']}"]
    notes = []
    for role in ("client", "server"):
        summary = prof.get(role, {})
        if "self_by_file" not in summary:
            continue
        files = ", ".join(f"{name} {pct:g} %" for name, pct in summary["self_by_file"][:6])
        busy = prof.get("busy", {}).get(role)
        notes.append(
            f"py-spy {role} during {prof['case']} ({prof.get('mb_per_s', 0):.0f} MB/s, "
            f"{busy or 0:.2f} cores): {files}"
        )
    return notes


def _profile(
    ctx: Context, paths: list[Route], sink_port: int, total: int, workdir: Path
) -> dict[str, Any]:
    """Sample client and server with py-spy during one extra 1-stream TLS K=6 transfer.

    It runs after the measured repetitions, so sampling never perturbs a
    reported figure.  Idle samples are kept (``--idle``): the share in
    ``doPoll`` is then the time the reactor waited for events, which is what
    tells a CPU-bound process from one that waits on something else.
    """
    spy = _py_spy()
    if spy is None:
        return {"error": "py-spy not installed (pip install py-spy)"}
    path = next(p for p in paths if p.name == "overlay tls K=6")
    out: dict[str, Any] = {"case": case_name(path.name, 1), "seconds": PROFILE_SECONDS}
    recorders = {}
    for role, proc in path.watch().items():
        raw = workdir / f"py-spy-{role}.txt"
        argv = [spy, "record", "--nonblocking", "--idle", "--format", "raw", "--rate", "200"]
        argv += ["--output", str(raw), "--pid", str(proc.pid)]
        recorders[role] = (
            subprocess.Popen(
                argv,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            ),
            raw,
        )
    time.sleep(1.0)
    try:
        argv = send_argv(("127.0.0.1", sink_port), path.entry, 1, 0, PROFILE_SECONDS)
        t = transfer(argv, path.watch())
        out["mb_per_s"] = t.mb_per_s
        out["busy"] = {r: t.cpu_share(r) for r in ("client", "server")}
    finally:
        for role, (popen, raw) in recorders.items():
            with contextlib.suppress(ProcessLookupError):
                popen.send_signal(signal.SIGINT)
            try:
                popen.wait(30)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
            try:
                out[role] = summarize_collapsed(raw.read_text())
            except OSError as e:
                out[role] = {"error": str(e)}
    return out
