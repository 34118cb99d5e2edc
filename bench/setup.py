"""Setup scenario: how fast new connections are made, and what each one waits for.

A *session* is what a short-lived client does: connect to the proxy's SOCKS
port, greet, CONNECT, write one byte, read it back from the echo target,
close.  The prober runs them one after the other, so the rate is the
inverse of one session's latency -- every wait inside the proxy (an ACK
held back, a timer, a resolver thread, a round trip that could overlap)
shows up in it.  Cases, measured back to back in each repetition:

- ``direct``: the same session without a proxy (no SOCKS; connect, echo, close);
- ``relay tcp``: a pair of plain Twisted relays (:mod:`bench.relay`), the
  two-process shape of the overlay without SOCKS, session or striping: what
  any Twisted proxy pays per connection (two accepts, one dial);
- ``overlay tls K=6``: through stripe-client and stripe-server (the goal's case);
- ``overlay tls K=1``: the same with one subflow, so that per-session work
  that grows with K (loops over subflows on every flush) shows.

Besides the rate, a second probe measures CONNECT-to-first-byte: from
``connect()`` to the first byte of a target that greets on accept (the
SOCKS handshake included for the overlay); the goal is p50 <= direct p50 +
1 ms.  CPU milliseconds per session of each proxy process are read from
``/proc`` (less noisy than rates on a shared machine).

The probe and the echo target are small stdlib programs in this module
(``python -m bench.setup serve|probe``), separate processes, so neither
competes with the proxy for a GIL.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import selectors
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.common import Context
from bench.procs import (
    BenchError,
    CpuWindow,
    OverlayPair,
    Proc,
    ProcessGroup,
    free_port,
    python_module,
    run_json,
    start_overlay,
    sysctl,
    wait_listening,
)
from bench.stats import Goal, Result, ScenarioReport, median, percentile

log = logging.getLogger("bench.setup")

GREETING = b"h"
RELAY = "bench.relay"


# ------------------------------------------------------------------ target


def serve(bind: str) -> None:
    """Echo everything on one port; greet with one byte, then echo, on another.

    Prints ``{"echo": PORT, "hello": PORT}`` and runs until killed.
    """
    sel = selectors.DefaultSelector()
    ports: dict[str, int] = {}
    for kind in ("echo", "hello"):
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((bind, 0))
        ls.listen(4096)
        ls.setblocking(False)
        sel.register(ls, selectors.EVENT_READ, kind)
        ports[kind] = ls.getsockname()[1]
    print(json.dumps(ports), flush=True)
    while True:
        for key, _ in sel.select():
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            if key.data in ("echo", "hello"):
                with contextlib.suppress(BlockingIOError):
                    while True:
                        conn, _ = sock.accept()
                        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        conn.setblocking(False)
                        if key.data == "hello":
                            with contextlib.suppress(OSError):
                                conn.send(GREETING)
                        sel.register(conn, selectors.EVENT_READ, "conn")
                continue
            try:
                data = sock.recv(65536)
                if data:
                    sock.send(data)
                    continue
            except OSError:
                pass
            sel.unregister(sock)
            sock.close()


# ------------------------------------------------------------------- probe


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed early")
        buf += chunk
    return buf


def _socks_connect(sock: socket.socket, host: str, port: int) -> None:
    """RFC 1928 greeting (no auth) and CONNECT to an IPv4 literal, one step at a
    time as curl does (no pipelining)."""
    sock.sendall(b"\x05\x01\x00")
    if _recv_exact(sock, 2) != b"\x05\x00":
        raise ConnectionError("SOCKS5 method refused")
    sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + port.to_bytes(2, "big"))
    head = _recv_exact(sock, 4)
    if head[1] != 0:
        raise ConnectionError(f"SOCKS5 CONNECT failed with reply {head[1]}")
    rest = {1: 4, 4: 16}.get(head[3])
    if rest is None:
        rest = _recv_exact(sock, 1)[0]
    _recv_exact(sock, rest + 2)


def session_once(
    entry: tuple[str, int], target: tuple[str, int] | None, greet: bool, timeout: float
) -> float:
    """One session; returns seconds from ``connect()`` to the first byte read
    from the target (its greeting if ``greet``, else the echo of ours)."""
    t0 = time.perf_counter()
    with socket.create_connection(entry, timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if target is not None:
            _socks_connect(s, *target)
        if greet:
            if _recv_exact(s, 1) != GREETING:
                raise ConnectionError("unexpected greeting")
            return time.perf_counter() - t0
        s.sendall(b"x")
        if _recv_exact(s, 1) != b"x":
            raise ConnectionError("unexpected echo")
        return time.perf_counter() - t0


def probe(
    entry: tuple[str, int],
    target: tuple[str, int] | None,
    count: int,
    greet: bool,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """``count`` sessions one after the other: latencies, errors, wall seconds."""
    latencies: list[float] = []
    errors: list[str] = []
    t0 = time.perf_counter()
    for _ in range(count):
        try:
            latencies.append(session_once(entry, target, greet, timeout))
        except OSError as e:
            errors.append(str(e))
    wall = time.perf_counter() - t0
    return {"latencies": latencies, "errors": errors[:5], "n_errors": len(errors), "wall": wall}


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.setup")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sv = sub.add_parser("serve", help="echo and greeting target (prints its ports)")
    sv.add_argument("--bind", default="127.0.0.1")
    pr = sub.add_parser("probe", help="sequential sessions (prints one JSON line)")
    pr.add_argument("--entry", type=_hostport, required=True, help="where to connect")
    pr.add_argument("--socks-target", type=_hostport, help="CONNECT there through SOCKS5")
    pr.add_argument("--count", type=int, default=1000)
    pr.add_argument("--greet", action="store_true", help="time the target's greeting")
    a = ap.parse_args(argv)
    if a.cmd == "serve":
        with contextlib.suppress(KeyboardInterrupt):
            serve(a.bind)
        return 0
    print(json.dumps(probe(a.entry, a.socks_target, a.count, a.greet)), flush=True)
    return 0


# ---------------------------------------------------------------- scenario


def probe_argv(
    entry: tuple[str, int], target: tuple[str, int] | None, count: int, greet: bool = False
) -> list[str]:
    args = ["probe", "--entry", f"{entry[0]}:{entry[1]}", "--count", str(count)]
    if target is not None:
        args += ["--socks-target", f"{target[0]}:{target[1]}"]
    if greet:
        args.append("--greet")
    return python_module("bench.setup", *args)


def _start_target(g: ProcessGroup) -> dict[str, int]:
    import select

    proc = g.start("setup-target", python_module("bench.setup", "serve"), stdout_pipe=True)
    assert proc.popen.stdout is not None
    ready, _, _ = select.select([proc.popen.stdout], [], [], 20.0)
    line = proc.popen.stdout.readline() if ready else b""
    if not line:
        proc.check()
        raise BenchError("the setup target did not report its ports")
    ports: dict[str, int] = json.loads(line)
    return ports


def _start_relay(g: ProcessGroup, target_port: int) -> tuple[int, dict[str, Proc]]:
    """A plain (TCP) relay pair in front of ``target_port``; returns its entry port."""
    p_srv, p_cli = free_port(), free_port()
    srv = g.start(
        "relay-server",
        python_module(RELAY, "--listen", str(p_srv), "--connect", f"127.0.0.1:{target_port}"),
    )
    cli = g.start(
        "relay-client",
        python_module(RELAY, "--listen", str(p_cli), "--connect", f"127.0.0.1:{p_srv}"),
    )
    wait_listening(srv, p_srv)
    wait_listening(cli, p_cli)
    return p_cli, {"client": cli, "server": srv}


def _procs(pair: OverlayPair) -> dict[str, Proc]:
    return {"client": pair.client, "server": pair.server}


def run(ctx: Context) -> ScenarioReport:
    count = 300 if ctx.quick else 1500
    report = ScenarioReport(
        "setup",
        f"setup: {count} sequential sessions (connect, CONNECT, 1-byte echo, close)",
        sysctl("net.ipv4.tcp_congestion_control"),
        {"sessions": count, "k": [6, 1], "tls": True},
    )
    fig: dict[tuple[str, str], list[float | None]] = collections.defaultdict(list)
    units: dict[str, str] = {}

    def put(case: str, metric: str, unit: str, value: float | None) -> None:
        fig[(case, metric)].append(value)
        units[metric] = unit

    workdir = ctx.workdir / "setup"
    workdir.mkdir(parents=True, exist_ok=True)
    with ProcessGroup(workdir) as g:
        ports = _start_target(g)
        echo = ("127.0.0.1", ports["echo"])
        hello = ("127.0.0.1", ports["hello"])
        relay_port, relay_procs = _start_relay(g, ports["echo"])
        overlay = start_overlay(g, ctx.keys)
        single = start_overlay(g, ctx.keys, k=1)
        for pair in (overlay, single):
            run_json(probe_argv(pair.socks, echo, 50))  # warm-up
        cases: list[tuple[str, tuple[str, int], bool, dict[str, Proc]]] = [
            ("direct", echo, False, {}),
            ("relay tcp", ("127.0.0.1", relay_port), False, relay_procs),
            ("overlay tls K=6", overlay.socks, True, _procs(overlay)),
            ("overlay tls K=1", single.socks, True, _procs(single)),
        ]
        for rep in range(ctx.reps):
            for case, entry, socks, procs in cases:
                try:
                    window = CpuWindow(procs)
                    window.start()
                    out = run_json(probe_argv(entry, echo if socks else None, count))
                    window.stop()
                    n = len(out["latencies"])
                    put(case, "sessions/s", "1/s", n / out["wall"])
                    for name, used in window.used.items():
                        put(case, f"{name} CPU/session", "ms", used * 1000 / n if n else None)
                    if procs and n:
                        total = sum(window.used.values()) * 1000 / n
                        put(case, "proxy CPU/session", "ms", total)
                    if case != "relay tcp":
                        first = run_json(
                            probe_argv(
                                hello if not socks else entry,
                                hello if socks else None,
                                count,
                                greet=True,
                            )
                        )
                        lat = [x * 1000 for x in first["latencies"]]
                        put(case, "first byte p50", "ms", percentile(lat, 50))
                        put(case, "first byte p99", "ms", percentile(lat, 99))
                        out["n_errors"] += first["n_errors"]
                        out["errors"] += first["errors"]
                    if out["n_errors"]:
                        report.notes.append(
                            f"{case} rep {rep + 1}: {out['n_errors']} failed sessions, "
                            f"e.g. {out['errors'][:1]}"
                        )
                except BenchError as e:
                    log.warning("setup %s rep %d failed: %s", case, rep + 1, e)
                    report.notes.append(f"{case} rep {rep + 1} failed: {e}")
            log.info("setup rep %d done", rep + 1)
        for pair in (overlay, single):
            pair.client.check()
            pair.server.check()
    for (case, metric), reps in fig.items():
        goal = None
        if case == "overlay tls K=6" and metric == "sessions/s":
            goal = Goal(">=", 1000.0, ">= 1000 sessions/s")
        if case == "overlay tls K=6" and metric == "first byte p50":
            direct = median(fig[("direct", metric)])
            if direct is not None:
                goal = Goal("<=", direct + 1.0, f"<= direct + 1 ms = {direct + 1.0:.2f} ms")
        report.add(Result(case, metric, units[metric], reps, goal=goal))
    for case in ("relay tcp", "overlay tls K=6"):
        report.ratio(f"{case} / direct, sessions/s", (case, "sessions/s"), ("direct", "sessions/s"))
    for metric in ("sessions/s", "proxy CPU/session"):
        # CPU per session is the steadier comparison on a loaded machine.
        report.ratio(
            f"overlay / relay tcp, {metric}", ("overlay tls K=6", metric), ("relay tcp", metric)
        )
    return report


if __name__ == "__main__":
    sys.exit(main())
