"""Multipath scenario: one session bonded over two unequal uplinks (issue 12).

Needs root and the wanem-style emulator's ``multipath.sh`` (in the directory
named by ``--wanem DIR`` or ``$STRIPE_WANEM``; netem has no equivalent
here): two emulated paths between namespaces ``wa`` (client) and ``wb``
(server), chosen by the client's source address.  Path 1 leaves from
10.199.1.1 and reaches ``wb`` at 10.199.1.2, path 2 from 10.199.2.1 to
10.199.2.2, and ``wb``'s 10.199.9.2 is reachable over both (by source).

For every profile x congestion control, each repetition runs back to back,
``--time`` seconds of upload each:

- one plain TCP flow over path 1, one over path 2 (to the far end's
  address on that path, so no binding is needed);
- one MPTCP connection over both (sender and sink open MPTCP sockets; the
  path manager adds the second path as a subflow);
- the overlay with K subflows over path 1 alone, over path 2 alone, and
  bonded: ``--path p1=10.199.1.1:K --path p2=10.199.2.1:K``.

Goals (issue 12): on M1, bonded >= 0.9 x (overlay path 1 + overlay path 2)
and >= MPTCP; on M2 (path 2 far away), bonded >= the better overlay alone.
"""

from __future__ import annotations

import functools
import logging
import os
import select
import socket
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import Context, run_reported, send_argv, skip, transfer
from bench.link import NS_A, NS_B, Wanem, available, find_wanem, ns_exists, sh
from bench.procs import (
    BenchError,
    Proc,
    ProcessGroup,
    client_args,
    python_module,
    server_args,
    sysctl,
    wait_listening,
    wait_subflows,
)
from bench.stats import Goal, Result, ScenarioReport
from bench.wan import keep_idle_connections_warm

log = logging.getLogger("bench.multipath")

SINK_PORT = 5301
MPTCP_SINK_PORT = 5302
SERVER_PORT = 8443
K = 3  # subflows per path
# The addresses multipath.sh gives each path, client side and server side.
SOURCES = {"p1": "10.199.1.1", "p2": "10.199.2.1"}
FAR = {"p1": "10.199.1.2", "p2": "10.199.2.2"}
SERVER = "10.199.9.2"  # on wb's loopback, reachable over both paths

# name: per path (one-way delay ms, loss %, rate Mbit/s) -- issue 12's lab
PROFILES: dict[str, dict[str, tuple[float, float, float]]] = {
    "M1": {"p1": (20, 0.1, 50), "p2": (30, 0.5, 20)},
    "M2": {"p1": (20, 0.1, 50), "p2": (150, 0.5, 20)},
}

HOW_TO = (
    "the multipath scenario needs a wanem-style emulator with multipath.sh "
    "(--wanem DIR or $STRIPE_WANEM): two emulated uplinks between namespaces "
    f"{NS_A} and {NS_B}, chosen by source address; netem cannot build them here"
)

#: (case, how: "tcp" | "mptcp" | "overlay", path or None for both), in run order.
CASES: list[tuple[str, str, str | None]] = [
    ("TCP path 1", "tcp", "p1"),
    ("TCP path 2", "tcp", "p2"),
    ("MPTCP", "mptcp", None),
    ("overlay path 1", "overlay", "p1"),
    ("overlay path 2", "overlay", "p2"),
    ("overlay bonded", "overlay", None),
]


def profile_title(name: str) -> str:
    def one(p: str) -> str:
        delay, loss, rate = PROFILES[name][p]
        return f"{delay:g} ms/{loss:g} %/{rate:g} Mbit/s"

    return f"{name} path 1 {one('p1')} + path 2 {one('p2')} (one way)"


def path_spec(name: str, path: str) -> str:
    """multipath.sh's ``DELAY,LOSS,RATE`` for one path."""
    delay, loss, rate = PROFILES[name][path]
    return f"{delay:g},{loss:g},{rate:g}"


def client_extra(path: str | None) -> tuple[str, list[str]]:
    """The server address an overlay client dials, and its path options."""
    if path is not None:
        return FAR[path], []
    return SERVER, [a for p, src in SOURCES.items() for a in ("--path", f"{p}={src}:{K}")]


def find_multipath(wanem: Path | None, how_to: str = HOW_TO) -> Path:
    """The emulator's multipath.sh; :class:`BenchError` saying what is missing otherwise."""
    found = find_wanem(wanem, os.environ)
    if found is None:
        raise BenchError(how_to)
    script = found.directory / "multipath.sh"
    if not os.access(script, os.X_OK):
        raise BenchError(f"{found.source}: no executable multipath.sh there; {how_to}")
    return script


def run(ctx: Context) -> list[ScenarioReport]:
    """Every profile x cc, or one skip saying what is missing."""
    wanem = available(lambda: find_wanem(ctx.wanem, os.environ), HOW_TO)
    if isinstance(wanem, str):
        return skip(ctx, "multipath", "multipath", wanem)
    try:
        script = find_multipath(ctx.wanem)
    except BenchError as e:
        return skip(ctx, "multipath", "multipath", str(e))
    reports = []
    for cc in ctx.ccs:
        for prof in PROFILES:
            params = {
                "profile": prof,
                "paths": {
                    p: dict(zip(("delay_ms", "loss_pct", "rate_mbit"), v, strict=True))
                    for p, v in PROFILES[prof].items()
                },
                "k_per_path": K,
                "seconds": ctx.seconds,
                "reps": ctx.reps,
                "tls": ctx.wan_tls,
                "link": f"{Wanem.kind} multipath.sh from {wanem.source}",
            }
            sc = ScenarioReport(
                f"multipath-{prof}-{cc}", f"multipath {profile_title(prof)}", cc, params
            )
            reports.append(run_reported(ctx, sc, functools.partial(_run_profile, ctx, script, sc)))
    return reports


def _run_profile(ctx: Context, script: Path, sc: ScenarioReport) -> None:
    prof, cc = sc.params["profile"], sc.congestion_control or ""
    if ns_exists(NS_A) or ns_exists(NS_B):
        raise BenchError("namespaces wa/wb already exist: the emulator is in use; not touching it")
    workdir = ctx.workdir / f"multipath-{prof}-{cc}"
    workdir.mkdir(parents=True, exist_ok=True)
    up = [str(script), "up", "--path1", path_spec(prof, "p1"), "--path2", path_spec(prof, "p2")]
    try:
        sh([*up, "--cc", cc])
        keep_idle_connections_warm()
        with ProcessGroup(workdir) as g:
            _measure(ctx, g, sc, prof, cc)
    finally:
        r = sh([str(script), "down"], check=False)
        sc.data["link_down"] = (r.stdout + r.stderr)[-3000:]


def start_mptcp_sink(g: ProcessGroup) -> Proc:
    proc = g.start(
        "mptcp-sink",
        mptcp_argv("serve", "--bind", "0.0.0.0", "--port", str(MPTCP_SINK_PORT)),
        NS_B,
        stdout_pipe=True,
    )
    assert proc.popen.stdout is not None
    ready, _, _ = select.select([proc.popen.stdout], [], [], 20.0)
    if not ready or not proc.popen.stdout.readline():
        proc.check()
        raise BenchError("the MPTCP sink did not start")
    return proc


def _measure(ctx: Context, g: ProcessGroup, sc: ScenarioReport, prof: str, cc: str) -> None:
    g.start_traffic_server("sink", ns=NS_B, bind="0.0.0.0", port=SINK_PORT)
    start_mptcp_sink(g)
    server = g.start_twistd(
        "stripe-server",
        "stripe-server",
        server_args(ctx.keys, f"0.0.0.0:{SERVER_PORT}", ctx.wan_tls),
        ns=NS_B,
    )
    wait_listening(server, SERVER_PORT)
    clients: dict[str, tuple[Proc, int]] = {}
    for i, (case, how, path) in enumerate(CASES):
        if how != "overlay":
            continue
        server_ip, extra = client_extra(path)
        port = 1081 + i
        args = client_args(
            ctx.keys, f"{server_ip}:{SERVER_PORT}", f"127.0.0.1:{port}", K, ctx.wan_tls
        )
        name = "stripe-client-" + (path or "bonded")
        clients[case] = (g.start_twistd(name, "stripe-client", [*args, *extra], ns=NS_A), port)
    for case, (client, port) in list(clients.items()):
        try:
            wait_listening(client, port)
            wait_subflows(client, SERVER_PORT, K if "bonded" not in case else 2 * K, timeout=60)
        except BenchError as e:  # e.g. a client without --path: measure the rest
            log.warning("multipath %s %s: %s not started: %s", prof, cc, case, e)
            sc.notes.append(f"{case} not started: {e}")
            del clients[case]
    sc.congestion_control = sysctl("net.ipv4.tcp_congestion_control", NS_A)
    sc.data["cc_wb"] = sysctl("net.ipv4.tcp_congestion_control", NS_B)
    goodput: dict[str, list[float | None]] = {c[0]: [] for c in CASES}
    runs: dict[str, list[dict[str, Any]]] = {c[0]: [] for c in CASES}
    for rep in range(ctx.reps):
        for case, how, path in CASES:
            if how == "overlay" and case not in clients:
                goodput[case].append(None)
                continue
            if how == "overlay":
                client, port = clients[case]
                argv = send_argv(("127.0.0.1", SINK_PORT), ("127.0.0.1", port), 1, 0, ctx.seconds)
                watch = {"client": client, "server": server}
            elif how == "tcp":
                argv = send_argv((FAR[path or "p1"], SINK_PORT), None, 1, 0, ctx.seconds)
                watch = {}
            else:
                argv = send_argv((SERVER, MPTCP_SINK_PORT), None, 1, 0, ctx.seconds)
                argv = mptcp_argv(*argv[argv.index("send") :])
                watch = {}
            try:
                t = transfer(argv, watch, ns=NS_A, timeout=ctx.seconds + 240)
            except Exception as e:
                log.warning("multipath %s %s %s rep %d failed: %s", prof, cc, case, rep + 1, e)
                sc.notes.append(f"{case} rep {rep + 1} failed: {e}")
                goodput[case].append(None)
                continue
            goodput[case].append(t.mbit_per_s)
            runs[case].append(
                {"seconds": t.seconds, "bytes": t.bytes, "client_busy": t.cpu_share("client")}
            )
            log.info(
                "multipath %s %s rep %d %s: %.2f Mbit/s", prof, cc, rep + 1, case, t.mbit_per_s
            )
            time.sleep(1.0)
    add_results(sc, prof, goodput, runs)
    sc.notes.append(f"cc wa={sc.congestion_control} wb={sc.data['cc_wb']}; K={K} per path")


def add_results(
    sc: ScenarioReport,
    prof: str,
    goodput: dict[str, list[float | None]],
    runs: dict[str, list[dict[str, Any]]],
) -> None:
    """The figures of every case, the derived sums, and the issue's ratios and goals."""
    for case, _, _ in CASES:
        sc.add(Result(case, "goodput", "Mbit/s", goodput[case], extra={"runs": runs[case]}))
    one, two = goodput["overlay path 1"], goodput["overlay path 2"]
    sc.add(
        Result(
            "overlay path 1 + path 2",
            "goodput",
            "Mbit/s",
            [None if a is None or b is None else a + b for a, b in zip(one, two, strict=True)],
        )
    )
    sc.add(
        Result(
            "overlay better path",
            "goodput",
            "Mbit/s",
            [None if a is None or b is None else max(a, b) for a, b in zip(one, two, strict=True)],
        )
    )
    bonded = ("overlay bonded", "goodput")
    m1 = prof == "M1"
    sc.ratio(
        "bonded / (path 1 + path 2)",
        bonded,
        ("overlay path 1 + path 2", "goodput"),
        Goal(">=", 0.9, ">= 0.9 x (path 1 + path 2)") if m1 else None,
    )
    sc.ratio(
        "bonded / MPTCP", bonded, ("MPTCP", "goodput"), Goal(">=", 1.0, ">= MPTCP") if m1 else None
    )
    sc.ratio(
        "bonded / better path",
        bonded,
        ("overlay better path", "goodput"),
        None if m1 else Goal(">=", 1.0, ">= the better path alone"),
    )
    sc.ratio(
        "overlay path 1 / TCP path 1", ("overlay path 1", "goodput"), ("TCP path 1", "goodput")
    )
    sc.ratio(
        "overlay path 2 / TCP path 2", ("overlay path 2", "goodput"), ("TCP path 2", "goodput")
    )


# ------------------------------------------------------------------ MPTCP

IPPROTO_MPTCP = getattr(socket, "IPPROTO_MPTCP", 262)


def mptcp_argv(*args: str) -> list[str]:
    """``bench.traffic ARGS`` with every TCP socket it opens made an MPTCP one."""
    return python_module("bench.multipath", "mptcp", *args)


def _mptcp_traffic(argv: list[str]) -> int:
    """Run bench.traffic with MPTCP sockets, as ``mptcpize run`` would (no preload needed)."""
    from bench import traffic

    class MptcpSocket(socket.socket):
        def __init__(
            self, family: int = -1, type: int = -1, proto: int = -1, fileno: int | None = None
        ) -> None:
            if fileno is None and type == socket.SOCK_STREAM and proto in (-1, 0):
                proto = IPPROTO_MPTCP
            super().__init__(family, type, proto, fileno)

    socket.socket = MptcpSocket  # type: ignore[misc]
    return traffic.main(argv)


if __name__ == "__main__":
    if sys.argv[1:2] != ["mptcp"]:
        sys.exit("usage: python -m bench.multipath mptcp TRAFFIC-ARGS...")
    sys.exit(_mptcp_traffic(sys.argv[2:]))
