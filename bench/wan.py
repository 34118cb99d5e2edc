"""WAN scenario: goodput over an emulated long, lossy or fast link.

Needs root and network namespaces.  The link comes from
:func:`bench.link.find_link`: a wanem-style userspace emulator named by
``--wanem DIR`` or ``$STRIPE_WANEM`` (``setup.sh up/down``, between
namespaces ``wa`` 10.199.1.1 and ``wb`` 10.199.1.2), else kernel netem on a
veth pair when this kernel has it; with neither, the scenario is skipped
with a message saying how to get one.
The sender and stripe-client run in ``wa``; stripe-server and the sink in
``wb`` (the server reaches the sink on ``wb``'s loopback).  For every
profile x congestion control, each repetition runs back to back, ``--time``
seconds of sending each:

- upload: one direct TCP flow; K parallel TCP flows for every K > 1 in
  ``--k`` (aggregate); the overlay with every K, through SOCKS5;
- download: one direct flow and the overlay at K = 6;
- with the namespaces on CUBIC (issue 11's goals): the overlay at K = 6
  with its subflows forced to CUBIC (``--congestion cubic``; the others use
  the default, ``auto``), and, where the client has ``--subflows auto``,
  that controller with CUBIC subflows and with the default algorithm
  (upload; the subflows open at the end are recorded).

Goodput counts from the first byte written until the sink's receipt for
the last one (upload) or until EOF (download), in Mbit/s.  The emulator
is brought down in a ``finally`` even when a run fails; it is never taken
down if it was already up before we started (someone else's run).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import Context, send_argv, skip, transfer
from bench.latency import ttfb_argv
from bench.link import (
    HOW_TO,
    IP_B,
    NS_A,
    NS_B,
    Link,
    available,
    describe,
    find_link,
    ns_exists,
    sh,
)
from bench.procs import (
    TCP_ESTABLISHED,
    BenchError,
    Proc,
    ProcessGroup,
    client_args,
    read_cpu_seconds,
    run_json,
    server_args,
    sysctl,
    wait_listening,
    wait_subflows,
)
from bench.stats import Goal, Result, ScenarioReport, median

log = logging.getLogger("bench.wan")

SINK_PORT = 5301
SERVER_PORT = 8443

# name: (one-way delay ms, loss % per direction, rate Mbit/s) -- wanem README
PROFILES: dict[str, tuple[float, float, float]] = {
    "P1": (20, 0.0, 200),
    "P2": (20, 0.5, 200),
    "P3": (40, 1.0, 100),
    "P4": (1, 0.0, 500),
}


def profile_title(name: str) -> str:
    delay, loss, rate = PROFILES[name]
    return f"{name} {2 * delay:g} ms RTT, {loss:g} % loss, {rate:g} Mbit/s"


def goals_for(profile: str, cc: str) -> dict[str, Goal]:
    """The issues' goals in this profile x cc (keys: see :func:`_measure`).

    Issue 11 (host CUBIC, default options, so BBR subflows where offered):
    on P3 the overlay reaches 0.6 x the link in both directions, CUBIC
    subflows under ``--subflows auto`` reach 1.5 x six plain flows; on the
    clean P1 and P4 the overlay matches one TCP flow in both directions.
    """
    rate = PROFILES[profile][2]
    if cc == "cubic" and profile in ("P2", "P3"):
        goals = {
            "vs tcp6": Goal(">=", 0.9, ">= 0.9 x 6 x TCP"),
            "vs direct": Goal(">=", 4.0, ">= 4 x direct"),
            "auto-K cubic vs tcp6": Goal(">=", 1.5, ">= 1.5 x 6 x TCP"),
        }
        if profile == "P3":
            link = Goal(">=", 0.6 * rate, f">= 0.6 x link ({0.6 * rate:g} Mbit/s)")
            goals.update({"link": link, "link download": link})
        return goals
    goals = {"vs direct": Goal(">=", 0.95, ">= 0.95 x direct")}
    if cc == "cubic" and profile in ("P1", "P4"):
        goals["vs direct download"] = Goal(">=", 0.95, ">= 0.95 x direct")
        goals["auto-K subflows"] = Goal("<=", 4, "<= 4 subflows")
    return goals


# Issue 11's variants (namespaces on CUBIC), upload only:
# case -> (subflows to wait for at start, client options).
VARIANTS: dict[str, tuple[int, list[str]]] = {
    "overlay K=6 cubic subflows": (6, ["--subflows", "6", "--congestion", "cubic"]),
    "overlay auto-K": (1, ["--subflows", "auto"]),
    "overlay auto-K cubic subflows": (1, ["--subflows", "auto", "--congestion", "cubic"]),
}
VARIANT_PORT = 1100
# auto-K cases are measured after an upload this many times --time long.
WARM_UP = 2.0


def auto_subflows_supported() -> bool:
    """Whether this checkout's stripe-client takes ``--subflows auto`` (issue 11 item 3)."""
    from stripeproxy.cli.client_tap import Options

    for entry in Options.optParameters:
        if isinstance(entry, Sequence) and entry[0] == "subflows":
            coerce = entry[4] if len(entry) > 4 else None
            if not callable(coerce):
                return False
            try:
                coerce("auto")
            except ValueError:
                return False
            return True
    return False


def variants(cc: str, auto: bool) -> dict[str, tuple[int, list[str]]]:
    """The variant cases this cc runs (none but on CUBIC hosts; auto-K where supported)."""
    if cc != "cubic":
        return {}
    return {case: v for case, v in VARIANTS.items() if auto or "auto" not in v[1]}


def keep_idle_connections_warm() -> None:
    """Turn off TCP's slow start after idle in both namespaces.

    Prewarmed subflows sit idle between transfers; by default Linux then
    shrinks their congestion window back to the initial window while keeping
    the slow-start threshold a past loss left, so a new transfer crawls up
    in congestion avoidance, while a direct connection gets a fresh slow
    start.  Measured on P3 (80 ms, 1 %): overlay K=1 went from 0.73 x to
    about 1.1 x one direct flow.  README "Performance" tells operators to
    set the same sysctl; fresh connections (direct, K x TCP) are unaffected.
    """
    for ns in (NS_A, NS_B):
        sh(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.tcp_slow_start_after_idle=0"])


def run(ctx: Context) -> list[ScenarioReport]:
    """Every profile x cc over the link :func:`bench.link.find_link` finds, or one skip."""
    link = available(lambda: find_link(ctx.wanem, os.environ), HOW_TO)
    if isinstance(link, str):
        return skip(ctx, "wan", "wan", link)
    log.info("wan: using %s", describe(link))
    reports = []
    for cc in ctx.ccs:
        for prof in ctx.profiles:
            t0 = time.monotonic()
            sc = ScenarioReport(
                f"wan-{prof}-{cc}",
                f"wan {profile_title(prof)}",
                cc,
                {
                    "profile": prof,
                    "delay_ms_one_way": PROFILES[prof][0],
                    "loss_pct": PROFILES[prof][1],
                    "rate_mbit": PROFILES[prof][2],
                    "seconds": ctx.seconds,
                    "k": list(ctx.ks),
                    "reps": ctx.reps,
                    "tls": ctx.wan_tls,
                    "link": describe(link),
                },
            )
            try:
                _run_profile(ctx, link, prof, cc, sc)
            except Exception as e:
                log.error("wan %s %s failed: %s", prof, cc, e)
                sc.error = str(e)
            sc.seconds = time.monotonic() - t0
            reports.append(sc)
            if ctx.extra.get("on_report"):
                ctx.extra["on_report"](sc)
    return reports


def _cases(
    ks: list[int], extra: Sequence[str] = ()
) -> tuple[list[tuple[str, int, int | str | None, bool]], int]:
    """(case, streams, overlay client (K or variant) or None, download) in run order,
    and the download K."""
    cases: list[tuple[str, int, int | str | None, bool]] = [("direct", 1, None, False)]
    cases += [(f"{k} x TCP", k, None, False) for k in ks if k > 1]
    cases += [(f"overlay K={k}", 1, k, False) for k in ks]
    cases += [(case, 1, case, False) for case in extra]
    k_down = 6 if 6 in ks else max(ks)
    cases += [("direct download", 1, None, True), (f"overlay K={k_down} download", 1, k_down, True)]
    return cases, k_down


def _run_profile(ctx: Context, link: Link, prof: str, cc: str, sc: ScenarioReport) -> None:
    if ns_exists(NS_A) or ns_exists(NS_B):
        raise BenchError("namespaces wa/wb already exist: the emulator is in use; not touching it")
    delay, loss, rate = PROFILES[prof]
    ks = sorted(set(ctx.ks))
    workdir = ctx.workdir / f"wan-{prof}-{cc}"
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        link.up(delay, loss, rate, cc)
        keep_idle_connections_warm()
        sc.data["tcp_slow_start_after_idle"] = sysctl("net.ipv4.tcp_slow_start_after_idle", NS_A)
        with ProcessGroup(workdir) as g:
            _measure(ctx, link, g, sc, prof, cc, ks)
    finally:
        sc.data["link_down"] = link.down()[-3000:]


def start_far_end(ctx: Context, g: ProcessGroup) -> Proc:
    """The sink and stripe-server in namespace ``wb``; returns the server."""
    g.start_traffic_server("sink", ns=NS_B, bind="0.0.0.0", port=SINK_PORT)
    server = g.start_twistd(
        "stripe-server",
        "stripe-server",
        server_args(ctx.keys, f"{IP_B}:{SERVER_PORT}", ctx.wan_tls),
        ns=NS_B,
    )
    wait_listening(server, SERVER_PORT)
    return server


def start_client(
    ctx: Context, g: ProcessGroup, name: str, socks_port: int, k: int, extra: Sequence[str] = ()
) -> Proc:
    """A stripe-client in ``wa`` with SOCKS on ``socks_port``, started without waiting."""
    args = client_args(ctx.keys, f"{IP_B}:{SERVER_PORT}", f"127.0.0.1:{socks_port}", k, ctx.wan_tls)
    return g.start_twistd(name, "stripe-client", [*args, *extra], ns=NS_A)


def wait_client(client: Proc, socks_port: int, k: int) -> None:
    """Until the client listens for SOCKS and has its ``k`` subflows up."""
    wait_listening(client, socks_port)
    wait_subflows(client, SERVER_PORT, k, timeout=60)


def _measure(
    ctx: Context,
    link: Link,
    g: ProcessGroup,
    sc: ScenarioReport,
    prof: str,
    cc: str,
    ks: list[int],
) -> None:
    server = start_far_end(ctx, g)
    clients: dict[int | str, Proc] = {
        k: start_client(ctx, g, f"stripe-client-k{k}", 1080 + k, k) for k in ks
    }
    ports: dict[int | str, int] = {k: 1080 + k for k in ks}
    extra_cases = variants(cc, auto_subflows_supported())
    for n, (case, (_, args)) in enumerate(extra_cases.items()):
        ports[case] = VARIANT_PORT + n
        # start_client passes --subflows K first; the variant's own comes later and wins.
        clients[case] = start_client(ctx, g, f"stripe-client-v{n}", ports[case], 1, args)
    for key, c in clients.items():
        wait_client(c, ports[key], key if isinstance(key, int) else extra_cases[key][0])
    sc.congestion_control = sysctl("net.ipv4.tcp_congestion_control", NS_A)
    sc.data["cc_wb"] = sysctl("net.ipv4.tcp_congestion_control", NS_B)
    rtt = run_json(ttfb_argv((IP_B, SINK_PORT), None, 10, connect_only=True), ns=NS_A)
    sc.data["rtt_ms"] = median(x * 1000 for x in rtt["latencies"])
    cases, k_down = _cases(ks, list(extra_cases))
    goodput: dict[str, list[float | None]] = {c[0]: [] for c in cases}
    # Sending stops after --time, but whatever the path buffered still has to
    # arrive: the run length shows how much a path queues (the overlay's local
    # leg can hold megabytes in kernel socket buffers on a slow link).
    length: dict[str, list[float | None]] = {c[0]: [] for c in cases}
    extra: dict[str, list[dict[str, Any]]] = {c[0]: [] for c in cases}
    linkem = link.emulator_pid()
    warm: dict[str, list[float | None]] = {c: [] for c in extra_cases if "auto" in c}
    for rep in range(ctx.reps):
        for case, streams, via_k, download in cases:
            target = (IP_B, SINK_PORT) if via_k is None else ("127.0.0.1", SINK_PORT)
            socks = None if via_k is None else ("127.0.0.1", ports[via_k])
            argv = send_argv(target, socks, streams, 0, ctx.seconds, download)
            watch = {"client": clients[via_k], "server": server} if via_k is not None else {}
            if case in warm:
                warm[case].append(_warm_up(target, socks, ctx.seconds, case))
            emu0 = _cpu_or_none(linkem)
            try:
                t = transfer(argv, watch, ns=NS_A, timeout=ctx.seconds + 240)
            except Exception as e:
                log.warning("wan %s %s %s rep %d failed: %s", prof, cc, case, rep + 1, e)
                sc.notes.append(f"{case} rep {rep + 1} failed: {e}")
                goodput[case].append(None)
                length[case].append(None)
                continue
            emu1 = _cpu_or_none(linkem)
            info: dict[str, Any] = {
                "seconds": t.seconds,
                "bytes": t.bytes,
                "client_busy": t.cpu_share("client"),
                "server_busy": t.cpu_share("server"),
            }
            if emu0 is not None and emu1 is not None:
                info["emulator_busy"] = (emu1 - emu0) / t.wall
            if isinstance(via_k, str):
                info["subflows_open"] = open_subflows(clients[via_k])
            goodput[case].append(t.mbit_per_s)
            length[case].append(t.seconds)
            extra[case].append(info)
            log.info("wan %s %s rep %d %s: %.2f Mbit/s", prof, cc, rep + 1, case, t.mbit_per_s)
            time.sleep(1.0)
    for case, figures in warm.items():
        sc.add(Result(f"{case}, from idle", "goodput", "Mbit/s", figures))
    if warm:
        sc.notes.append(
            f"auto-K cases: measured right after an unmeasured {WARM_UP * ctx.seconds:g} s "
            "upload through the same client (the controller's steady state, as in a long "
            "transfer); 'from idle' is that warm-up's own goodput"
        )
    goals = goals_for(prof, cc)
    link_goals = {f"overlay K={k_down}": "link", f"overlay K={k_down} download": "link download"}
    for case, _, via, _ in cases:
        goal = goals.get(link_goals.get(case, ""))
        sc.add(
            Result(case, "goodput", "Mbit/s", goodput[case], extra={"runs": extra[case]}, goal=goal)
        )
        sc.add(Result(case, "run length", "s", length[case]))
        if isinstance(via, str):
            opened = [r.get("subflows_open") for r in extra[case]]
            auto_goal = goals.get("auto-K subflows") if "auto" in VARIANTS[via][1] else None
            sc.add(Result(case, "subflows at end", "", opened, goal=auto_goal))
    if 6 in ks:
        sc.ratio(
            "overlay K=6 / 6 x TCP",
            ("overlay K=6", "goodput"),
            ("6 x TCP", "goodput"),
            goals.get("vs tcp6"),
        )
    for k in ks:
        sc.ratio(
            f"overlay K={k} / direct",
            (f"overlay K={k}", "goodput"),
            ("direct", "goodput"),
            goals.get("vs direct") if k == 6 else None,
        )
    sc.ratio(
        f"overlay K={k_down} / direct, download",
        (f"overlay K={k_down} download", "goodput"),
        ("direct download", "goodput"),
        goals.get("vs direct download"),
    )
    for case in extra_cases:
        sc.ratio(
            f"{case} / 6 x TCP",
            (case, "goodput"),
            ("6 x TCP", "goodput"),
            goals.get("auto-K cubic vs tcp6") if "cubic" in case and "auto" in case else None,
        )
        sc.ratio(f"{case} / direct", (case, "goodput"), ("direct", "goodput"))
    rtt_ms = sc.data.get("rtt_ms")
    sc.notes.append(
        f"link {link.kind}; TCP connect RTT {rtt_ms:.1f} ms; cc wa={sc.congestion_control} "
        f"wb={sc.data['cc_wb']}"
        if rtt_ms is not None
        else f"link {link.kind}"
    )


def _warm_up(
    target: tuple[str, int], socks: tuple[str, int] | None, seconds: float, case: str
) -> float | None:
    """An upload of WARM_UP x ``seconds`` just before an auto-K case is measured:
    the controller searches from its idle count; its goodput (Mbit/s) is kept."""
    argv = send_argv(target, socks, 1, 0, WARM_UP * seconds)
    try:
        return transfer(argv, {}, ns=NS_A, timeout=WARM_UP * seconds + 240).mbit_per_s
    except Exception as e:
        log.warning("wan %s warm-up failed: %s", case, e)
        return None


def open_subflows(client: Proc, server_port: int = SERVER_PORT) -> int:
    """The client's own established connections to the server now.

    ``/proc/PID/net/tcp`` lists the whole namespace (every client in ``wa``),
    so the rows are matched to the process by the socket inodes among its
    file descriptors.
    """
    fd_dir = Path(f"/proc/{client.pid}/fd")
    mine = set()
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                mine.add(target[8:-1])
    count = 0
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{client.pid}/net/{name}") as f:
            next(f)
            for line in f:
                parts = line.split()
                rport = int(parts[2].rsplit(":", 1)[1], 16)
                if rport == server_port and int(parts[3], 16) == TCP_ESTABLISHED:
                    count += parts[9] in mine
    return count


def _cpu_or_none(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        return read_cpu_seconds(pid)
    except OSError:
        return None
