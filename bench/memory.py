"""Memory scenario: does a slow target make the proxy buffer?

A sender pushes as fast as it can through the overlay (TLS, K = 6) to a
target that reads only 5 MB/s.  Back-pressure (credit on the server side,
the per-stream send buffer on the client side) should keep both proxy
processes near their idle size; a missing brake shows up as RSS growing
with the amount sent.  The issue's goal is at most 64 MiB above idle.

Each repetition starts a fresh proxy pair so that "idle" is really idle
(CPython rarely returns freed memory to the OS, so a second transfer in the
same process would start from the first one's high-water mark).  The peak
is the larger of 100 ms VmRSS samples and the kernel's VmHWM, reset through
``/proc/PID/clear_refs`` once idle was measured, so short spikes between
samples are not missed.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

from bench.common import Background, Context, MiB, send_argv, transfer
from bench.procs import (
    Proc,
    ProcessGroup,
    start_overlay,
    sysctl,
)
from bench.stats import Goal, Result, ScenarioReport

log = logging.getLogger("bench.memory")

TARGET_RATE = 5e6  # bytes/s the target reads
GOAL_MIB = 64.0


def read_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_hwm(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, needs permission); False if refused."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run(ctx: Context) -> ScenarioReport:
    size = (256 if ctx.quick else 1024) * MiB
    report = ScenarioReport(
        "memory",
        f"memory: {size // MiB} MiB to a target reading {TARGET_RATE / 1e6:g} MB/s",
        sysctl("net.ipv4.tcp_congestion_control"),
        {"mib": size // MiB, "target_rate_bytes_s": TARGET_RATE, "k": 6, "tls": True},
    )
    rows: dict[str, list[float | None]] = {
        k: []
        for k in (
            "client idle",
            "server idle",
            "client peak",
            "server peak",
            "client above idle",
            "server above idle",
            "goodput",
        )
    }
    for rep in range(ctx.reps):
        workdir = ctx.workdir / f"memory-{rep + 1}"
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            got = _one(ctx, workdir, size)
        except Exception as e:
            log.warning("memory rep %d failed: %s", rep + 1, e)
            report.notes.append(f"rep {rep + 1} failed: {e}")
            for column in rows.values():
                column.append(None)
            continue
        for name, value in got.items():
            rows[name].append(value)
        log.info(
            "memory rep %d: client +%.1f MiB, server +%.1f MiB, %.2f MB/s",
            rep + 1,
            got["client above idle"],
            got["server above idle"],
            got["goodput"],
        )
    goal = Goal("<=", GOAL_MIB, f"<= {GOAL_MIB:g} MiB above idle")
    for role in ("client", "server"):
        report.add(Result(f"stripe-{role}", "RSS idle", "MiB", rows[f"{role} idle"]))
        report.add(Result(f"stripe-{role}", "RSS peak", "MiB", rows[f"{role} peak"]))
        report.add(
            Result(
                f"stripe-{role}", "peak above idle", "MiB", rows[f"{role} above idle"], goal=goal
            )
        )
    report.add(Result("transfer", "goodput", "MB/s", rows["goodput"]))
    return report


def _one(ctx: Context, workdir: Path, size: int) -> dict[str, float]:
    keys = ctx.keys
    with ProcessGroup(workdir) as g:
        _, ports = g.start_traffic_server("slow-sink", rate=TARGET_RATE)
        sink = ("127.0.0.1", ports["port"])
        overlay = start_overlay(g, keys)
        server, client, socks = overlay.server, overlay.client, overlay.socks
        # one small stream first, so lazily imported code and first-use
        # allocations count as idle, not as the transfer's cost
        transfer(send_argv(sink, socks, 1, 32 * 1024), timeout=60)
        procs: dict[str, Proc] = {"client": client, "server": server}
        idle = {r: _idle_rss(p) for r, p in procs.items()}
        hwm_ok = all(reset_hwm(p.pid) for p in procs.values())
        peak = dict(idle)
        bg = Background(send_argv(sink, socks, 1, size))
        try:
            while bg.running():
                for r, p in procs.items():
                    peak[r] = max(peak[r], p.rss())
                    p.check()
                time.sleep(0.1)
            out = bg.result(timeout=60)
        finally:
            bg.kill()
        if hwm_ok:
            for r, p in procs.items():
                peak[r] = max(peak[r], read_hwm(p.pid))
        if out.get("n_errors"):
            raise RuntimeError(f"transfer failed: {out['errors']}")
    m = float(MiB)
    return {
        "client idle": idle["client"] / m,
        "server idle": idle["server"] / m,
        "client peak": peak["client"] / m,
        "server peak": peak["server"] / m,
        "client above idle": (peak["client"] - idle["client"]) / m,
        "server above idle": (peak["server"] - idle["server"]) / m,
        "goodput": out["bytes"] / out["seconds"] / 1e6,
    }


def _idle_rss(p: Proc) -> int:
    """Median of ten VmRSS samples over one second."""
    samples = []
    for _ in range(10):
        samples.append(p.rss())
        time.sleep(0.1)
    return int(statistics.median(samples))
