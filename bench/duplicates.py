"""Duplicate bytes of the overlay, by cause: ``python -m bench.duplicates``.

A loopback path loses nothing, so every byte the overlay sends twice there
is a wrong guess of the sender's: a re-injection (a hole judged stuck), a
retransmission timeout, or a subflow lost.  This runs one stripe-server and
one stripe-client (TLS unless ``--no-tls``, K subflows) with their metrics
endpoints, pushes ``--size`` MiB up and down one stream, and reports, per
direction, the re-sent bytes of the sending side by cause as a share of
the payload (issue 11 item 4: below 0.01 % on loopback).

With ``--wanem DIR`` the same runs cross the link emulator instead (client
in namespace ``wa``, server and sink in ``wb``; ``--delay``, ``--loss``,
``--rate``, ``--cc``), where TCP's own loss recovery delays chunks and the
goal is at most 2 % of the payload.  The caller holds the emulator's lock.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import MiB, send_argv, transfer
from bench.link import IP_B, NS_A, NS_B, Link, Wanem, ns_exists
from bench.procs import (
    BenchError,
    ProcessGroup,
    child_env,
    client_args,
    free_port,
    in_netns,
    make_keys,
    server_args,
    wait_listening,
    wait_subflows,
)

log = logging.getLogger("bench.duplicates")

COUNTERS = {
    "stripeproxy_retransmitted_bytes_total": "retransmitted",
    "stripeproxy_reinjected_bytes_total": "reinjected",
    "stripeproxy_timeouts_total": "timeouts",
    "stripeproxy_subflows_lost_total": "subflows_lost",
}
#: Read a URL from inside a namespace (the root one cannot reach its loopback).
_FETCH = (
    "import sys, urllib.request;"
    " sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())"
)
#: Ports inside the emulator's namespaces (nothing else listens there).
SERVER_PORT, SINK_PORT = 7700, 7701


@dataclass
class Site:
    """Where each process runs: all on this host's loopback, or across the emulator."""

    client_ns: str | None = None
    server_ns: str | None = None
    server_host: str = "127.0.0.1"


_LINE = re.compile(r"^(?P<name>[a-z_]+)(?:\{[^}]*\})? (?P<value>\S+)$")
#: The monitor refreshes its snapshot every 500 ms: wait past that before reading.
SETTLE = 1.2


def scrape(port: int, ns: str | None) -> dict[str, float]:
    """The duplicate counters from a metrics endpoint (on 127.0.0.1 of namespace ``ns``)."""
    argv = in_netns(ns, [sys.executable, "-c", _FETCH, f"http://127.0.0.1:{port}/metrics"])
    text = subprocess.run(
        argv, capture_output=True, text=True, check=True, timeout=20, env=child_env()
    ).stdout
    out = dict.fromkeys(COUNTERS.values(), 0.0)
    for line in text.splitlines():
        m = _LINE.match(line)
        if m and m["name"] in COUNTERS:
            out[COUNTERS[m["name"]]] += float(m["value"])
    return out


def measure(size_mib: int, k: int, tls: bool, workdir: Path, site: Site) -> dict[str, Any]:
    keys = make_keys(workdir / "keys")
    results: dict[str, Any] = {"mib": size_mib, "k": k, "tls": tls}
    wan = site.server_ns is not None
    with ProcessGroup(workdir) as g:
        if wan:
            g.start_traffic_server("sink", ns=site.server_ns, port=SINK_PORT)
            port, sink = SERVER_PORT, ("127.0.0.1", SINK_PORT)
        else:
            _, ports = g.start_traffic_server("sink")
            port, sink = free_port(), ("127.0.0.1", ports["port"])
        listen, m_srv, m_cli = (free_port() for _ in range(3))
        srv = g.start_twistd(
            "stripe-server",
            "stripe-server",
            [
                *server_args(keys, f"{site.server_host}:{port}", tls),
                "--metrics",
                f"127.0.0.1:{m_srv}",
            ],
            ns=site.server_ns,
        )
        wait_listening(srv, port)
        cli = g.start_twistd(
            "stripe-client",
            "stripe-client",
            [
                *client_args(keys, f"{site.server_host}:{port}", f"127.0.0.1:{listen}", k, tls),
                "--metrics",
                f"127.0.0.1:{m_cli}",
            ],
            ns=site.client_ns,
        )
        wait_listening(cli, listen)
        wait_subflows(cli, port, k, timeout=60)
        wait_listening(cli, m_cli)
        wait_listening(srv, m_srv)
        watch = {"client": cli, "server": srv}
        entry = ("127.0.0.1", listen)
        limit = 3600.0
        # Warm up.
        transfer(send_argv(sink, entry, 1, 4 * MiB), watch, ns=site.client_ns, timeout=limit)
        for direction, download, sender in (
            ("upload", False, (m_cli, site.client_ns)),
            ("download", True, (m_srv, site.server_ns)),
        ):
            time.sleep(SETTLE)
            before = scrape(*sender)
            argv = send_argv(sink, entry, 1, size_mib * MiB, download=download)
            t = transfer(argv, watch, ns=site.client_ns, timeout=limit)
            time.sleep(SETTLE)
            after = scrape(*sender)
            delta = {name: after[name] - before[name] for name in after}
            dup = delta["retransmitted"]
            results[direction] = {
                "payload": t.bytes,
                "mb_per_s": round(t.mb_per_s, 2),
                **{name: int(v) for name, v in delta.items()},
                "other_retransmitted": int(dup - delta["reinjected"]),
                "duplicate_pct": round(100 * dup / t.bytes, 4),
            }
            log.info("%s: %s", direction, results[direction])
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.duplicates", description=__doc__)
    ap.add_argument("--size", type=int, default=512, help="MiB each way (default 512)")
    ap.add_argument("--k", type=int, default=6, help="subflows (default 6)")
    ap.add_argument("--no-tls", action="store_true")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--wanem", type=Path, help="run across this link emulator (hold its lock)")
    ap.add_argument("--delay", type=float, default=20.0, help="ms one way (default 20)")
    ap.add_argument("--loss", type=float, default=1.0, help="%% each way (default 1)")
    ap.add_argument("--rate", type=float, default=100.0, help="Mbit/s (default 100)")
    ap.add_argument("--cc", default="cubic", help="host congestion control (default cubic)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    link: Link | None = None
    site = Site()
    if a.wanem is not None:
        if ns_exists(NS_A) or ns_exists(NS_B):
            raise BenchError("namespaces wa/wb already exist: the emulator is in use")
        link = Wanem.at(a.wanem, "--wanem")
        site = Site(NS_A, NS_B, IP_B)
    runs = []
    try:
        if link is not None:
            link.up(a.delay, a.loss, a.rate, a.cc)
        for _ in range(a.reps):
            with tempfile.TemporaryDirectory(prefix="stripe-dups-") as tmp:
                run = measure(a.size, a.k, not a.no_tls, Path(tmp), site)
            if link is not None:
                run["link"] = {"delay_ms": a.delay, "loss_pct": a.loss, "mbit": a.rate, "cc": a.cc}
            runs.append(run)
    finally:
        if link is not None:
            link.down()
    print(json.dumps(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
