"""Degraded-subflow scenario: one of six subflows on a much worse path.

Striping over K paths is only worth it if a bad path does not drag the good
ones down.  The shared emulator can give individual TCP flows their own loss
or extra delay (``--flow-loss-spread`` / ``--flow-delay-spread``, assigned
round-robin by the order flows are first seen), so three stripe-clients with
K = 6 are started one after another on a P2 link (40 ms RTT, 0.5 % loss,
200 Mbit/s) and the spread list is laid out so that:

- client A (adaptive scheduler) has one subflow on the bad path,
- client B (least-queued scheduler) has one subflow on the bad path,
- client C (adaptive) has six healthy subflows: the reference.

Each repetition uploads through A, B and C in turn for ``--time`` seconds.
The goal is that A keeps at least the five healthy subflows' share of C,
5/6 of it.  Variants: the bad subflow has 5 % loss (ten times the link's),
or 100 ms of extra one-way delay (a 240 ms RTT path among 40 ms ones).
This needs root and a wanem-style userspace emulator named by ``--wanem DIR``
or ``$STRIPE_WANEM`` (kernel netem cannot treat flows apart); without one the
scenario is skipped with a message saying how to get one.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from bench.common import Context, send_argv, skip, transfer
from bench.link import (
    HOW_TO_PER_FLOW,
    NS_A,
    NS_B,
    available,
    find_wanem,
    ns_exists,
)
from bench.procs import (
    BenchError,
    Proc,
    ProcessGroup,
    sysctl,
)
from bench.stats import Goal, Result, ScenarioReport
from bench.wan import (
    PROFILES,
    SINK_PORT,
    keep_idle_connections_warm,
    start_client,
    start_far_end,
    wait_client,
)

log = logging.getLogger("bench.degraded")

K = 6
PROFILE = "P2"
# name: (linkem option, value on the bad subflow, value on the others, title)
VARIANTS: dict[str, tuple[str, float, float, str]] = {
    "loss": ("--flow-loss-spread", 5.0, PROFILES[PROFILE][1], "one subflow at 5 % loss"),
    "delay": ("--flow-delay-spread", 100.0, 0.0, "one subflow +100 ms one way"),
}
# (case, scheduler, degraded) in start order: the order decides the ordinals.
CLIENTS = [
    ("adaptive, one degraded", "adaptive", True),
    ("least-queued, one degraded", "least-queued", True),
    ("adaptive, all healthy", "adaptive", False),
]
HEALTHY = "adaptive, all healthy"
GOAL = Goal(">=", 5 / 6, ">= 5/6 of all healthy (the healthy five's share)")


def spread(bad: float, good: float) -> str:
    """The per-flow list: flows 0-5 are client A's subflows, 6-11 B's, 12-17 C's."""
    values: list[float] = []
    for _, _, degraded in CLIENTS:
        values += [good] * (K - 1) + [bad if degraded else good]
    return ",".join(f"{v:g}" for v in values)


def run(ctx: Context) -> list[ScenarioReport]:
    """Both variants over the named emulator, or one skip saying what is missing."""
    link = available(lambda: find_wanem(ctx.wanem, os.environ), HOW_TO_PER_FLOW)
    if isinstance(link, str):
        return skip(ctx, "degraded", "degraded subflow", link)
    reports = []
    cc = "cubic" if "cubic" in ctx.ccs else ctx.ccs[0]
    for variant, (option, bad, good, title) in VARIANTS.items():
        delay, loss, rate = PROFILES[PROFILE]
        sc = ScenarioReport(
            f"degraded-{variant}-{cc}",
            f"degraded subflow, {title} ({PROFILE} link, K={K})",
            cc,
            {"variant": variant, "option": option, "spread": spread(bad, good), "k": K},
        )
        t0 = time.monotonic()
        try:
            if ns_exists(NS_A) or ns_exists(NS_B):
                raise BenchError("namespaces wa/wb already exist: the emulator is in use")
            workdir = ctx.workdir / sc.name
            workdir.mkdir(parents=True, exist_ok=True)
            try:
                link.up(delay, loss, rate, cc, [option, spread(bad, good)])
                keep_idle_connections_warm()
                with ProcessGroup(workdir) as g:
                    _measure(ctx, g, sc)
            finally:
                sc.data["link_down"] = link.down()[-3000:]
        except Exception as e:
            log.error("degraded %s failed: %s", variant, e)
            sc.error = str(e)
        sc.seconds = time.monotonic() - t0
        reports.append(sc)
        if ctx.extra.get("on_report"):
            ctx.extra["on_report"](sc)
    return reports


def _measure(ctx: Context, g: ProcessGroup, sc: ScenarioReport) -> None:
    start_far_end(ctx, g)
    clients: list[Proc] = []
    for n, (_, scheduler, _) in enumerate(CLIENTS):
        client = start_client(ctx, g, f"stripe-client-{n}", 1081 + n, K, ["--scheduler", scheduler])
        # One client's subflows all reach the emulator before the next starts.
        wait_client(client, 1081 + n, K)
        clients.append(client)
    sc.congestion_control = sysctl("net.ipv4.tcp_congestion_control", NS_A)
    goodput: dict[str, list[float | None]] = {case: [] for case, _, _ in CLIENTS}
    extra: dict[str, list[dict[str, Any]]] = {case: [] for case, _, _ in CLIENTS}
    for rep in range(ctx.reps):
        for n, (case, _, _) in enumerate(CLIENTS):
            argv = send_argv(("127.0.0.1", SINK_PORT), ("127.0.0.1", 1081 + n), 1, 0, ctx.seconds)
            try:
                t = transfer(argv, {"client": clients[n]}, ns=NS_A, timeout=ctx.seconds + 240)
            except Exception as e:
                log.warning("degraded %s rep %d failed: %s", case, rep + 1, e)
                sc.notes.append(f"{case} rep {rep + 1} failed: {e}")
                goodput[case].append(None)
                continue
            goodput[case].append(t.mbit_per_s)
            extra[case].append({"seconds": t.seconds, "client_busy": t.cpu_share("client")})
            log.info("%s rep %d %s: %.2f Mbit/s", sc.name, rep + 1, case, t.mbit_per_s)
            time.sleep(1.0)
    for case, _, _ in CLIENTS:
        sc.add(Result(case, "goodput", "Mbit/s", goodput[case], extra={"runs": extra[case]}))
    for case, scheduler, degraded in CLIENTS:
        if degraded:
            sc.ratio(
                f"{case} / all healthy",
                (case, "goodput"),
                (HEALTHY, "goodput"),
                GOAL if scheduler == "adaptive" else None,
            )
    sc.notes.append(
        f"link wanem, {sc.params['option']} {sc.params['spread']}: flows are numbered as first "
        "seen, and each client's subflows connect before the next client starts"
    )
