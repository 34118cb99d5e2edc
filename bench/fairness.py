"""Fairness scenario: what the overlay takes from a neighbour on a shared bottleneck.

K subflows are K TCP flows: against one plain TCP flow on the same
bottleneck, loss-based subflows (CUBIC) take about K/(K+1) of it, and BBR
subflows pace at the rate they measured and do not back off on loss, so
what they leave depends on the bottleneck's queue.  The user deserves the
figures (issue 11 item 2).  On each link profile the far end (sink and
stripe-server) runs in ``wb``; in ``wa`` two stripe-clients (K = 6), one
with ``--congestion auto`` (BBR where the kernel offers it) and one with
``--congestion cubic``; the namespaces' default algorithm is CUBIC, so the
competing plain flow is CUBIC.  Every repetition runs, ``--time`` seconds
each, back to back:

- ``2 x TCP``: two plain TCP uploads at once (the fair baseline);
- ``overlay auto + TCP``: an upload through the ``auto`` client and one
  plain TCP upload at once;
- ``overlay cubic + TCP``: the same through the ``cubic`` client.

Reported per case: each flow's goodput, the first flow's share of the sum
(the overlay's, or the first plain flow's in the baseline), the sum as a
fraction of the link, and Jain's index of the two.  Shares are reported,
never judged: there is no goal, only the figure the README quotes.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

from bench.common import Background, Context, send_argv
from bench.link import HOW_TO, IP_B, NS_A, NS_B, Link, available, describe, find_link, ns_exists
from bench.procs import BenchError, Proc, ProcessGroup, sysctl
from bench.stats import Result, ScenarioReport, jain_index
from bench.wan import (
    SINK_PORT,
    keep_idle_connections_warm,
    start_client,
    start_far_end,
    wait_client,
)

log = logging.getLogger("bench.fairness")

K = 6
# The host algorithm in both namespaces, hence the competing flow's.
HOST_CC = "cubic"
# name: (one-way delay ms, loss % per direction, rate Mbit/s)
PROFILES: dict[str, tuple[float, float, float]] = {
    "F0": (20, 0.0, 100),
    "F1": (20, 0.5, 100),
}
# client name: --congestion value
CLIENTS = {"auto": "auto", "cubic": "cubic"}
# case: the first flow's overlay client (None: plain TCP); the second is always plain.
CASES: dict[str, str | None] = {
    "2 x TCP": None,
    "overlay auto + TCP": "auto",
    "overlay cubic + TCP": "cubic",
}
_CHOSEN = re.compile(r"congestion control: (.*)")


def profile_title(name: str) -> str:
    delay, loss, rate = PROFILES[name]
    return f"{2 * delay:g} ms RTT, {loss:g} % loss, {rate:g} Mbit/s"


def shares(first: float, second: float, rate_mbit: float) -> dict[str, float | None]:
    """The figures of one repetition from the two flows' goodputs (Mbit/s)."""
    total = first + second
    return {
        "share": 100 * first / total if total else None,
        "link use": 100 * total / rate_mbit if rate_mbit else None,
        "jain": jain_index([first, second]),
    }


def chosen_algorithm(log_text: str) -> str | None:
    """What a client logged at start about its subflows' congestion control."""
    found = _CHOSEN.search(log_text)
    return found.group(1).strip() if found else None


def run(ctx: Context) -> list[ScenarioReport]:
    """Every profile over the link :func:`bench.link.find_link` finds, or one skip.

    The reports are returned, not passed to ``on_report``: ``python -m bench``
    adds what a scenario returns."""
    link = available(lambda: find_link(ctx.wanem, os.environ), HOW_TO)
    if isinstance(link, str):
        log.warning("fairness skipped: %s", link)
        skipped = ScenarioReport("fairness", "fairness", None, {})
        skipped.skipped = link
        return [skipped]
    reports = []
    for prof, (delay, loss, rate) in PROFILES.items():
        sc = ScenarioReport(
            f"fairness-{prof}",
            f"fairness: overlay K={K} vs one TCP flow, {profile_title(prof)}",
            HOST_CC,
            {
                "profile": prof,
                "delay_ms_one_way": delay,
                "loss_pct": loss,
                "rate_mbit": rate,
                "seconds": ctx.seconds,
                "k": K,
                "reps": ctx.reps,
                "tls": ctx.wan_tls,
                "link": describe(link),
            },
        )
        t0 = time.monotonic()
        try:
            _run_profile(ctx, link, sc)
        except Exception as e:
            log.error("fairness %s failed: %s", prof, e)
            sc.error = str(e)
        sc.seconds = time.monotonic() - t0
        reports.append(sc)
    return reports


def _run_profile(ctx: Context, link: Link, sc: ScenarioReport) -> None:
    if ns_exists(NS_A) or ns_exists(NS_B):
        raise BenchError("namespaces wa/wb already exist: the emulator is in use; not touching it")
    workdir = ctx.workdir / sc.name
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        delay, loss, rate = PROFILES[sc.params["profile"]]
        link.up(delay, loss, rate, HOST_CC)
        keep_idle_connections_warm()
        with ProcessGroup(workdir) as g:
            _measure(ctx, g, sc)
    finally:
        sc.data["link_down"] = link.down()[-3000:]


def _measure(ctx: Context, g: ProcessGroup, sc: ScenarioReport) -> None:
    start_far_end(ctx, g)
    clients: dict[str, Proc] = {}
    for n, (name, cc) in enumerate(CLIENTS.items()):
        clients[name] = start_client(
            ctx, g, f"stripe-client-{name}", 1081 + n, K, ["--congestion", cc]
        )
    for n, client in enumerate(clients.values()):
        wait_client(client, 1081 + n, K)
    socks = {name: ("127.0.0.1", 1081 + n) for n, name in enumerate(CLIENTS)}
    sc.data["subflow_cc"] = {n: chosen_algorithm(c.log_tail(200)) for n, c in clients.items()}
    sc.data["cc_wa"] = sysctl("net.ipv4.tcp_congestion_control", NS_A)
    rate = sc.params["rate_mbit"]
    figures: dict[str, dict[str, list[float | None]]] = {
        case: {m: [] for m in ("first", "second", "share", "link use", "jain")} for case in CASES
    }
    runs: dict[str, list[dict[str, Any]]] = {case: [] for case in CASES}
    for rep in range(ctx.reps):
        for case, via in CASES.items():
            try:
                first, second, info = _pair(ctx, None if via is None else socks[via])
            except Exception as e:
                log.warning("fairness %s %s rep %d failed: %s", sc.name, case, rep + 1, e)
                sc.notes.append(f"{case} rep {rep + 1} failed: {e}")
                for values in figures[case].values():
                    values.append(None)
                continue
            got: dict[str, float | None] = {"first": first, "second": second}
            got.update(shares(first, second, rate))
            for metric, value in got.items():
                figures[case][metric].append(value)
            runs[case].append(info)
            log.info(
                "fairness %s rep %d %s: %.1f + %.1f Mbit/s, share %.0f %%",
                sc.name,
                rep + 1,
                case,
                first,
                second,
                got["share"] or 0.0,
            )
            time.sleep(1.0)
    for case, via in CASES.items():
        f = figures[case]
        who = "TCP flow 1" if via is None else f"overlay {via}"
        sc.add(
            Result(
                case,
                "first goodput",
                "Mbit/s",
                f["first"],
                params={"flow": who},
                extra={"runs": runs[case]},
            )
        )
        sc.add(Result(case, "competing TCP", "Mbit/s", f["second"]))
        sc.add(Result(case, "first's share", "%", f["share"]))
        sc.add(Result(case, "link use", "%", f["link use"]))
        sc.add(Result(case, "Jain", "", f["jain"]))
    sc.notes.append(
        f"first flow: TCP flow 1 (2 x TCP) or the overlay upload (K={K}); the competing flow "
        f"is one plain TCP upload ({sc.data['cc_wa']}), both started at once; subflows: "
        + "; ".join(f"{n}: {c}" for n, c in sc.data["subflow_cc"].items())
    )


def _pair(ctx: Context, socks: tuple[str, int] | None) -> tuple[float, float, dict[str, Any]]:
    """Two uploads at once, the first through ``socks`` (None: plain); Mbit/s each."""
    target = (IP_B, SINK_PORT) if socks is None else ("127.0.0.1", SINK_PORT)
    first_argv = send_argv(target, socks, 1, 0, ctx.seconds)
    second_argv = send_argv((IP_B, SINK_PORT), None, 1, 0, ctx.seconds)
    flows = [Background(first_argv, NS_A), Background(second_argv, NS_A)]
    try:
        out = [f.result(timeout=ctx.seconds + 240) for f in flows]
    finally:
        for f in flows:
            f.kill()
    for o in out:
        if o.get("n_errors") or not o.get("bytes"):
            raise BenchError(f"a flow failed: {o.get('errors') or o}")
    mbit = [o["bytes"] * 8 / o["seconds"] / 1e6 for o in out]
    info = {
        "seconds": [o["seconds"] for o in out],
        "bytes": [o["bytes"] for o in out],
        # How far apart the two flows started and ended (their overlap matters).
        "start_skew": out[0]["start"] - out[1]["start"],
        "end_skew": out[0]["end"] - out[1]["end"],
    }
    return mbit[0], mbit[1], info
