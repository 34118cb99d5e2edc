"""What the scenarios share: the run context and one measured transfer."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import (
    BenchError,
    CpuWindow,
    Keys,
    Proc,
    child_env,
    in_netns,
    python_module,
    run_json,
)
from bench.stats import ScenarioReport

log = logging.getLogger("bench")

MiB = 1 << 20
TRAFFIC = "bench.traffic"


@dataclass
class Context:
    """Options and shared state of one benchmark run."""

    workdir: Path
    reps: int
    quick: bool
    keys: Keys
    profile: bool = False
    size_mib: int | None = None
    seconds: float = 10.0
    profiles: Sequence[str] = ("P1", "P2", "P3", "P4")
    ccs: Sequence[str] = ("cubic", "bbr")
    ks: Sequence[int] = (1, 2, 4, 6, 8)
    # --wanem DIR; None means $STRIPE_WANEM or netem (bench.link.find_link).
    wanem: Path | None = None
    wan_tls: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def skip(ctx: Context, name: str, title: str, why: str) -> list[ScenarioReport]:
    """A scenario that cannot run here: logged, and reported with the reason."""
    log.warning("%s skipped: %s", name, why)
    sc = ScenarioReport(name, title, None, {})
    sc.skipped = why
    if ctx.extra.get("on_report"):
        ctx.extra["on_report"](sc)
    return [sc]


def run_reported(ctx: Context, sc: ScenarioReport, run: Callable[[], None]) -> ScenarioReport:
    """Run one profile of a scenario into ``sc``: a failure becomes its error,
    not the end of the benchmark; timed, then handed to ``on_report``."""
    t0 = time.monotonic()
    try:
        run()
    except Exception as e:
        log.error("%s failed: %s", sc.name, e)
        sc.error = str(e)
    sc.seconds = time.monotonic() - t0
    if ctx.extra.get("on_report"):
        ctx.extra["on_report"](sc)
    return sc


def send_argv(
    target: tuple[str, int],
    socks: tuple[str, int] | None = None,
    streams: int = 1,
    bytes_per_stream: int = 0,
    seconds: float = 0.0,
    download: bool = False,
) -> list[str]:
    args = ["send", "--target", f"{target[0]}:{target[1]}", "--streams", str(streams)]
    if socks is not None:
        args += ["--socks", f"{socks[0]}:{socks[1]}"]
    args += ["--bytes", str(bytes_per_stream)] if bytes_per_stream else ["--time", str(seconds)]
    if download:
        args.append("--download")
    return python_module(TRAFFIC, *args)


@dataclass
class Transfer:
    """One sender run and what the watched processes spent on it."""

    bytes: int
    seconds: float
    flows: list[dict[str, Any]]
    cpu: dict[str, float]
    wall: float
    waited: dict[str, float] = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6

    @property
    def mbit_per_s(self) -> float:
        return self.bytes * 8 / self.seconds / 1e6

    def cpu_per_gb(self, name: str) -> float | None:
        return self.cpu[name] / (self.bytes / 1e9) if name in self.cpu and self.bytes else None

    def cpu_share(self, name: str) -> float | None:
        """CPU seconds per wall second: 1.0 is one core busy the whole time."""
        return self.cpu[name] / self.wall if name in self.cpu and self.wall else None

    def wait_share(self, name: str) -> float | None:
        """Share of the wall time the process was runnable but had no CPU (run queue)."""
        return self.waited[name] / self.wall if name in self.waited and self.wall else None


def transfer(
    argv: Sequence[str],
    watch: Mapping[str, Proc] | None = None,
    ns: str | None = None,
    timeout: float = 600.0,
) -> Transfer:
    """Run a sender to completion while counting the CPU time of ``watch``."""
    window = CpuWindow(dict(watch or {}))
    window.start()
    out = run_json(argv, ns, timeout)
    window.stop()
    for p in (watch or {}).values():
        p.check()
    if out.get("n_errors"):
        raise BenchError(f"{out['n_errors']} stream(s) failed: {out['errors']}")
    if not out.get("bytes"):
        raise BenchError(f"nothing was transferred: {out}")
    return Transfer(
        out["bytes"], out["seconds"], out.get("flows", []), window.used, window.wall, window.waited
    )


class Background:
    """A traffic client running while the caller samples something else."""

    def __init__(self, argv: Sequence[str], ns: str | None = None) -> None:
        self.t0 = time.monotonic()
        self.popen = subprocess.Popen(
            in_netns(ns, argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
            start_new_session=True,
        )

    def running(self) -> bool:
        return self.popen.poll() is None

    def result(self, timeout: float = 600.0) -> dict[str, Any]:
        import json

        try:
            out, err = self.popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.communicate()
            raise BenchError("traffic client timed out") from None
        if self.popen.returncode != 0:
            raise BenchError(f"traffic client failed: {err.decode()[-800:]}")
        data: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        return data

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.communicate()
