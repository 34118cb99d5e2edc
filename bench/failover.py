"""Failover scenario: path 1 of a bonded session fails mid-upload (issue 12 item 3).

Needs root and the wanem-style emulator's ``multipath.sh`` (as
:mod:`bench.multipath`).  One bonded client (``--path p1=tw0:K --path
p2=tw2:K``: interface names, so the client watches their addresses) uploads
for ``SECONDS`` through the overlay to a sink in ``wb`` that hashes what it
gets and timestamps every read.  At ``T_FAIL`` path 1 fails, at ``T_BACK`` it
comes back, in one of two ways:

- **black hole**: path 1's emulator process is stopped (SIGSTOP), so its
  packets vanish in both directions and nothing tells the client: the
  session's retransmission timeouts must find out;
- **address removed**: the client's address on path 1 is deleted (as when
  a mobile uplink loses its lease); the client sees it at its next
  interface check.

Per repetition and fault it reports the longest pause in bytes reaching the
sink (goal: at most 1 s; the 15 s dead interval must not be what detects
it), whether the sink's SHA-256 and byte count equal the sender's, and the
sink's rate before the fault, while path 1 is down and after it returns
(a rate well above path 2's alone says path 1 carries traffic again).

``python -m bench.failover sink|send ...`` are the two traffic ends.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import os
import random
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import Background, Context, run_reported, skip
from bench.link import NS_A, NS_B, Wanem, available, find_wanem, ns_exists, sh
from bench.multipath import HOW_TO as MULTIPATH_HOW_TO
from bench.multipath import PROFILES, SERVER, find_multipath, path_spec
from bench.procs import (
    BenchError,
    ProcessGroup,
    client_args,
    python_module,
    server_args,
    wait_listening,
    wait_subflows,
)
from bench.stats import Goal, Result, ScenarioReport
from bench.traffic import socks_connect_request, socks_reply_length
from bench.wan import keep_idle_connections_warm

log = logging.getLogger("bench.failover")

SINK_PORT = 5303
SERVER_PORT = 8443
SOCKS_PORT = 1090
K = 3  # subflows per path
PROFILE = "M1"
SECONDS = 20.0
T_FAIL = 5.0
T_BACK = 11.0
SETTLE = 2.0  # seconds after a change before a rate window starts
FAULTS = ("black hole", "address removed")
BLOCK = 64 * 1024
# What multipath.sh builds: path 1 is tw0 in wa with this address, routed to SERVER.
P1_DEV, P1_ADDR = "tw0", "10.199.1.1/24"
HOW_TO = MULTIPATH_HOW_TO.replace("the multipath scenario", "the failover scenario")
WANEM_RUN = Path(os.environ.get("WANEM_RUN", "/run/wanem"))


def run(ctx: Context) -> list[ScenarioReport]:
    """One report per congestion control, or one skip saying what is missing."""
    wanem = available(lambda: find_wanem(ctx.wanem, os.environ), HOW_TO)
    if isinstance(wanem, str):
        return skip(ctx, "failover", "failover", wanem)
    try:
        script = find_multipath(ctx.wanem, HOW_TO)
    except BenchError as e:
        return skip(ctx, "failover", "failover", str(e))
    reports = []
    for cc in ctx.ccs:
        params = {
            "profile": PROFILE,
            "paths": {
                p: dict(zip(("delay_ms", "loss_pct", "rate_mbit"), v, strict=True))
                for p, v in PROFILES[PROFILE].items()
            },
            "k_per_path": K,
            "seconds": SECONDS,
            "fail_at": T_FAIL,
            "back_at": T_BACK,
            "reps": ctx.reps,
            "tls": ctx.wan_tls,
            "link": f"{Wanem.kind} multipath.sh from {wanem.source}",
        }
        sc = ScenarioReport(
            f"failover-{cc}",
            f"failover: path 1 fails at {T_FAIL:g} s of a {SECONDS:g} s bonded upload "
            f"and returns at {T_BACK:g} s ({PROFILE})",
            cc,
            params,
        )
        reports.append(run_reported(ctx, sc, functools.partial(_run, ctx, script, sc)))
    return reports


def _run(ctx: Context, script: Path, sc: ScenarioReport) -> None:
    cc = sc.congestion_control or ""
    if ns_exists(NS_A) or ns_exists(NS_B):
        raise BenchError("namespaces wa/wb already exist: the emulator is in use; not touching it")
    workdir = ctx.workdir / f"failover-{cc}"
    workdir.mkdir(parents=True, exist_ok=True)
    up = [str(script), "up", "--path1", path_spec(PROFILE, "p1")]
    up += ["--path2", path_spec(PROFILE, "p2"), "--cc", cc]
    try:
        sh(up)
        keep_idle_connections_warm()
        with ProcessGroup(workdir) as g:
            _measure(ctx, g, sc)
    finally:
        r = sh([str(script), "down"], check=False)
        sc.data["link_down"] = (r.stdout + r.stderr)[-3000:]


def _measure(ctx: Context, g: ProcessGroup, sc: ScenarioReport) -> None:
    server = g.start_twistd(
        "stripe-server",
        "stripe-server",
        server_args(ctx.keys, f"0.0.0.0:{SERVER_PORT}", ctx.wan_tls),
        ns=NS_B,
    )
    wait_listening(server, SERVER_PORT)
    args = client_args(
        ctx.keys, f"{SERVER}:{SERVER_PORT}", f"127.0.0.1:{SOCKS_PORT}", K, ctx.wan_tls
    )
    args += ["--path", f"p1={P1_DEV}:{K}", "--path", f"p2=tw2:{K}"]
    client = g.start_twistd("stripe-client", "stripe-client", args, ns=NS_A)
    wait_listening(client, SOCKS_PORT)
    figures: dict[str, dict[str, list[float | None]]] = {
        f: {m: [] for m in ("gap", "exact", "before", "down", "after")} for f in FAULTS
    }
    for rep in range(ctx.reps):
        for fault in FAULTS:
            wait_subflows(client, SERVER_PORT, 2 * K, timeout=60)
            try:
                got = _one(g, fault, f"{rep}-{fault.replace(' ', '-')}")
            except Exception as e:
                log.warning("failover %s rep %d failed: %s", fault, rep + 1, e)
                sc.notes.append(f"{fault} rep {rep + 1} failed: {e}")
                got = dict.fromkeys(figures[fault])
            finally:
                _restore(fault)
            for m, v in got.items():
                figures[fault][m].append(v)
            log.info("failover %s rep %d: %s", fault, rep + 1, got)
            client.check()
            server.check()
    for fault, fig in figures.items():
        sc.add(
            Result(f"{fault}: longest pause", "pause", "s", fig["gap"],
                   goal=Goal("<=", 1.0, "<= 1 s"))
        )  # fmt: skip
        sc.add(
            Result(f"{fault}: bit-exact", "sha256 and length equal", "", fig["exact"],
                   goal=Goal(">=", 1.0, "every byte, in order"))
        )  # fmt: skip
        for m, what in (("before", "both paths"), ("down", "path 1 down"), ("after", "returned")):
            sc.add(Result(f"{fault}: {what}", "goodput", "Mbit/s", fig[m]))
        sc.ratio(
            f"{fault}: returned / path 1 down",
            (f"{fault}: returned", "goodput"),
            (f"{fault}: path 1 down", "goodput"),
            Goal(">=", 1.5, ">= 1.5: path 1 carries again"),
        )
    sc.notes.append(f"K={K} per path; interfaces as sources (--path p1={P1_DEV}:{K})")


def _one(g: ProcessGroup, fault: str, tag: str) -> dict[str, float | None]:
    """One upload with ``fault`` applied from T_FAIL to T_BACK; its figures."""
    sink = g.start(
        f"sink-{tag}",
        python_module("bench.failover", "sink", "--port", str(SINK_PORT)),
        NS_B,
        stdout_pipe=True,
    )
    out = sink.popen.stdout
    assert out is not None
    ready, _, _ = select.select([out], [], [], 20.0)
    if not ready or not out.readline().startswith(b"ready"):
        sink.check()
        raise BenchError("the failover sink did not start")
    sender = Background(
        python_module(
            "bench.failover",
            "send",
            "--socks",
            f"127.0.0.1:{SOCKS_PORT}",
            "--target",
            f"127.0.0.1:{SINK_PORT}",
            "--seconds",
            str(SECONDS),
        ),
        NS_A,
    )
    t0 = sender.t0
    try:
        time.sleep(max(0.0, t0 + T_FAIL - time.monotonic()))
        t_fail = time.monotonic()
        _apply(fault)
        time.sleep(max(0.0, t0 + T_BACK - time.monotonic()))
        t_back = time.monotonic()
        _restore(fault)
        sent = sender.result(timeout=SECONDS + 120)
    finally:
        sender.kill()
    ready, _, _ = select.select([out], [], [], 60.0)
    line = out.readline() if ready else b""
    sink.popen.wait(timeout=10)
    if not line:
        raise BenchError("the failover sink reported nothing")
    got = json.loads(line)
    exact = got["sha256"] == sent["sha256"] and got["bytes"] == sent["bytes"]
    if not exact:
        log.error("failover %s: sink %s, sender %s", fault, got, sent)

    def rate(a: float, b: float) -> float | None:
        inside = [n for t, n in got["bins"] if a <= t and t + got["bin"] <= b]
        return sum(inside) * 8 / (len(inside) * got["bin"]) / 1e6 if inside else None

    return {
        "gap": got["max_gap"],
        "exact": 1.0 if exact else 0.0,
        "before": rate(t0 + SETTLE, t_fail),
        "down": rate(t_fail + SETTLE, t_back),
        "after": rate(t_back + 2 * SETTLE, got["last"]),
    }


def _linkem_pid() -> int:
    return int((WANEM_RUN / "linkem-path1.pid").read_text().strip())


def _apply(fault: str) -> None:
    if fault == "black hole":
        os.kill(_linkem_pid(), signal.SIGSTOP)
    else:
        sh(["ip", "-n", NS_A, "addr", "del", P1_ADDR, "dev", P1_DEV])


def _restore(fault: str) -> None:
    """Undo ``fault``; harmless when it was not applied."""
    if fault == "black hole":
        with contextlib.suppress(OSError, ValueError):
            os.kill(_linkem_pid(), signal.SIGCONT)
        return
    sh(["ip", "-n", NS_A, "addr", "replace", P1_ADDR, "dev", P1_DEV], check=False)
    sh(
        ["ip", "-n", NS_A, "route", "replace", f"{SERVER}/32", "dev", P1_DEV, "src",
         P1_ADDR.split("/")[0]],
        check=False,
    )  # fmt: skip


# ------------------------------------------------------------ traffic ends


def blocks(seed: int = 12) -> Any:
    """An endless upload: 64 KiB blocks, each numbered, cut from a random pool,
    so a block delivered twice, lost or out of order changes the hash."""
    pool = random.Random(seed).randbytes(8 << 20)
    i = 0
    while True:
        at = (i * 7919 * 4096) % (len(pool) - BLOCK)
        yield struct.pack("!Q", i) + pool[at : at + BLOCK - 8]
        i += 1


def _send(a: argparse.Namespace) -> int:
    host, port = a.socks.rsplit(":", 1)
    thost, tport = a.target.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(b"\x05\x01\x00")
    if s.recv(2) != b"\x05\x00":
        raise SystemExit("SOCKS5: no-auth refused")
    s.sendall(socks_connect_request(thost, int(tport)))
    head = b""
    while (total := socks_reply_length(head)) is None or len(head) < total:
        chunk = s.recv(64)
        if not chunk:
            raise SystemExit("SOCKS5: closed during CONNECT")
        head += chunk
    if head[1] != 0:
        raise SystemExit(f"SOCKS5 CONNECT failed with reply {head[1]}")
    s.settimeout(None)
    digest, sent = hashlib.sha256(), 0
    end = time.monotonic() + a.seconds
    for block in blocks():
        if time.monotonic() >= end:
            break
        s.sendall(block)
        digest.update(block)
        sent += len(block)
    s.shutdown(socket.SHUT_WR)
    while s.recv(4096):  # the sink closes once it has read everything
        pass
    print(json.dumps({"bytes": sent, "sha256": digest.hexdigest()}), flush=True)
    return 0


def _sink(a: argparse.Namespace) -> int:
    bin_s = 0.25
    ls = socket.create_server(("0.0.0.0", a.port), reuse_port=False)
    print("ready", ls.getsockname()[1], flush=True)
    conn, _ = ls.accept()
    digest, total = hashlib.sha256(), 0
    first = last = 0.0
    max_gap = 0.0
    bins: dict[int, int] = {}
    buf = bytearray(1 << 20)
    while n := conn.recv_into(buf):
        now = time.monotonic()
        if total == 0:
            first = last = now
        max_gap = max(max_gap, now - last)
        last = now
        digest.update(memoryview(buf)[:n])
        total += n
        k = int(now / bin_s)
        bins[k] = bins.get(k, 0) + n
    conn.close()
    span = range(int(first / bin_s), int(last / bin_s) + 1) if total else range(0)
    out = {
        "bytes": total,
        "sha256": digest.hexdigest(),
        "first": first,
        "last": last,
        "max_gap": max_gap,
        "bin": bin_s,
        "bins": [(k * bin_s, bins.get(k, 0)) for k in span],
    }
    print(json.dumps(out), flush=True)
    return 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.failover")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("send")
    s.add_argument("--socks", required=True)
    s.add_argument("--target", required=True)
    s.add_argument("--seconds", type=float, required=True)
    k = sub.add_parser("sink")
    k.add_argument("--port", type=int, required=True)
    a = ap.parse_args(argv)
    return _send(a) if a.cmd == "send" else _sink(a)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
