"""Duplicate bytes on a loss-free loopback path: ``python -m bench.duplicates``.

A loopback path loses nothing, so every byte the overlay sends twice there
is a wrong guess of the sender's: a re-injection (a hole judged stuck), a
retransmission timeout, or a subflow lost.  This runs one stripe-server and
one stripe-client (TLS unless ``--no-tls``, K subflows) with their metrics
endpoints, pushes ``--size`` MiB up and down one stream, and reports, per
direction, the re-sent bytes of the sending side by cause as a share of
the payload (issue 11 item 4: below 0.01 %).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import MiB, send_argv, transfer
from bench.procs import (
    ProcessGroup,
    client_args,
    free_port,
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
_LINE = re.compile(r"^(?P<name>[a-z_]+)(?:\{[^}]*\})? (?P<value>\S+)$")
#: The monitor refreshes its snapshot every 500 ms: wait past that before reading.
SETTLE = 1.2


def scrape(port: int) -> dict[str, float]:
    """The duplicate counters from a metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = dict.fromkeys(COUNTERS.values(), 0.0)
    for line in text.splitlines():
        m = _LINE.match(line)
        if m and m["name"] in COUNTERS:
            out[COUNTERS[m["name"]]] += float(m["value"])
    return out


def measure(size_mib: int, k: int, tls: bool, workdir: Path) -> dict[str, Any]:
    keys = make_keys(workdir / "keys")
    results: dict[str, Any] = {"mib": size_mib, "k": k, "tls": tls}
    with ProcessGroup(workdir) as g:
        _, ports = g.start_traffic_server("sink")
        sink = ("127.0.0.1", ports["port"])
        port, listen, m_srv, m_cli = (free_port() for _ in range(4))
        srv = g.start_twistd(
            "stripe-server",
            "stripe-server",
            [*server_args(keys, f"127.0.0.1:{port}", tls), "--metrics", f"127.0.0.1:{m_srv}"],
        )
        wait_listening(srv, port)
        cli = g.start_twistd(
            "stripe-client",
            "stripe-client",
            [
                *client_args(keys, f"127.0.0.1:{port}", f"127.0.0.1:{listen}", k, tls),
                "--metrics",
                f"127.0.0.1:{m_cli}",
            ],
        )
        wait_listening(cli, listen)
        wait_subflows(cli, port, k)
        wait_listening(cli, m_cli)
        wait_listening(srv, m_srv)
        watch = {"client": cli, "server": srv}
        entry = ("127.0.0.1", listen)
        transfer(send_argv(sink, entry, 1, 4 * MiB), watch)  # warm up
        for direction, download, sender_port in (
            ("upload", False, m_cli),
            ("download", True, m_srv),
        ):
            time.sleep(SETTLE)
            before = scrape(sender_port)
            t = transfer(send_argv(sink, entry, 1, size_mib * MiB, download=download), watch)
            time.sleep(SETTLE)
            after = scrape(sender_port)
            delta = {name: after[name] - before[name] for name in after}
            dup = delta["retransmitted"]
            results[direction] = {
                "payload": t.bytes,
                "mb_per_s": round(t.mb_per_s, 1),
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
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    runs = []
    for _ in range(a.reps):
        with tempfile.TemporaryDirectory(prefix="stripe-dups-") as tmp:
            runs.append(measure(a.size, a.k, not a.no_tls, Path(tmp)))
    print(json.dumps(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
