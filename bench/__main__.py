"""``python -m bench`` (from a checkout): run scenarios, print a table, write JSON.

The JSON is rewritten after every scenario, so a run that is interrupted
(or whose WAN part fails) keeps what it measured.  The table goes to
stdout and to a ``.txt`` next to the JSON; diagnostics go to stderr
through :mod:`logging`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import (
    degraded,
    failover,
    fairness,
    latency,
    link,
    loopback,
    memory,
    multipath,
    setup,
    wan,
)
from bench.common import Context
from bench.machine import machine_info
from bench.procs import make_keys
from bench.stats import (
    ScenarioReport,
    build_report,
    format_table,
    goal_summary,
    validate_report,
)

log = logging.getLogger("bench")

SCENARIOS = (
    "loopback",
    "memory",
    "latency",
    "setup",
    "wan",
    "degraded",
    "fairness",
    "multipath",
    "failover",
)


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("K values must be >= 1")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark stripeproxy against direct TCP and plain Twisted relays.",
    )
    ap.add_argument(
        "--scenarios",
        type=_csv,
        default=list(SCENARIOS),
        help=f"comma list of {','.join(SCENARIOS)} (default: all)",
    )
    ap.add_argument("--reps", type=int, default=3, help="repetitions per figure (default 3)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes and counts")
    ap.add_argument("--out", type=Path, help="JSON output (default results/DATE-bench.json)")
    ap.add_argument("--profiles", type=_csv, default=list(wan.PROFILES), help="WAN profiles")
    ap.add_argument("--cc", type=_csv, default=["cubic", "bbr"], help="WAN congestion controls")
    ap.add_argument("--k", type=_ints, default=[1, 2, 4, 6, 8], help="WAN subflow counts")
    ap.add_argument("--time", type=float, default=10.0, help="WAN seconds of sending per run")
    ap.add_argument("--size", type=int, help="loopback MiB per case (default 256, quick 32)")
    ap.add_argument(
        "--wanem",
        type=Path,
        metavar="DIR",
        help=f"wanem-style link emulator for wan/degraded (default: ${link.ENV}, "
        "else tc netem if the kernel has it, else those scenarios are skipped)",
    )
    ap.add_argument("--wan-no-tls", action="store_true", help="WAN overlay with --no-tls")
    ap.add_argument(
        "--profile-cpu",
        action="store_true",
        help="sample the loopback proxies with py-spy during one extra transfer",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="print the table of an existing report (and write it next to it) and exit",
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    bad = set(a.scenarios) - set(SCENARIOS)
    if bad:
        ap.error(f"unknown scenarios: {sorted(bad)}")
    bad = set(a.profiles) - set(wan.PROFILES)
    if bad:
        ap.error(f"unknown profiles: {sorted(bad)}")
    if a.reps < 1:
        ap.error("--reps must be >= 1")
    return a


def default_out(now: datetime.datetime) -> Path:
    return Path("results") / f"{now:%Y%m%d-%H%M}-bench.json"


class Writer:
    """Keeps the JSON (and the table) on disk current after every scenario."""

    def __init__(self, out: Path, machine: dict[str, Any], options: dict[str, Any]) -> None:
        self.out = out
        self.machine = machine
        self.options = options
        self.started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        self.scenarios: list[ScenarioReport] = []

    def add(self, sc: ScenarioReport) -> None:
        self.scenarios.append(sc)
        self.write(finished=None)

    def report(self, finished: str | None) -> dict[str, Any]:
        self.machine["loadavg_end"] = list(os.getloadavg())
        return build_report(self.machine, self.options, self.scenarios, self.started, finished)

    def write(self, finished: str | None) -> dict[str, Any]:
        data = self.report(finished)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(self.out)
        return data

    def table(self) -> str:
        return render_table(self.machine, self.options, self.started, self.scenarios)


def render_table(
    machine: dict[str, Any],
    options: dict[str, Any],
    started: str,
    scenarios: Sequence[ScenarioReport],
) -> str:
    """The printed report: one line on the machine, a table per scenario, the goals."""
    m = machine
    head = (
        f"stripe-bench {started} on {m.get('hostname')}: {m.get('nproc')} x "
        f"{m.get('cpu_model')}, kernel {m.get('kernel')}, Python {m.get('python')}, "
        f"Twisted {m.get('twisted')}, pyOpenSSL {m.get('pyopenssl')}, "
        f"commit {(m.get('git_commit') or '?')[:10]}, reps {options.get('reps')}"
        f"{', quick' if options.get('quick') else ''}\n\n"
    )
    return head + format_table(scenarios) + "\n### Goals\n\n" + goal_summary(scenarios)


def render_file(path: Path) -> str:
    """Render the table of an existing report (e.g. after the table format changed)."""
    data = json.loads(path.read_text())
    problems = validate_report(data)
    if problems:
        raise SystemExit(f"{path}: not a stripe-bench report: {problems[0]}")
    scenarios = [ScenarioReport.from_json(sc) for sc in data["scenarios"]]
    return render_table(data["machine"], data["options"], data["started"], scenarios)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen scenarios; always exits 0 unless the bench itself broke."""
    a = parse_args(argv)
    if a.render is not None:
        table = render_file(a.render)
        a.render.with_suffix(".txt").write_text(table)
        sys.stdout.write(table)
        return 0
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    now = datetime.datetime.now()
    out = a.out or default_out(now)
    # What was run, without the path of this checkout or of the emulator
    # (meaningless elsewhere, and not to be published): the emulator's
    # directory is recorded by its name only.
    local = {str(a.wanem): f".../{a.wanem.name}"} if a.wanem is not None else {}
    options = {
        k: (local.get(str(v), str(v)) if isinstance(v, Path) else v) for k, v in vars(a).items()
    }
    args = sys.argv[1:] if argv is None else argv
    options["argv"] = ["python -m bench", *(local.get(x, x) for x in args)]
    writer = Writer(out, machine_info(), options)
    workdir = Path(tempfile.mkdtemp(prefix="stripe-bench-"))
    log.info("work directory %s, results to %s", workdir, out)
    try:
        ctx = Context(
            workdir=workdir,
            reps=a.reps,
            quick=a.quick,
            keys=make_keys(workdir / "keys"),
            profile=a.profile_cpu,
            size_mib=a.size,
            seconds=a.time,
            profiles=a.profiles,
            ccs=a.cc,
            ks=a.k,
            wanem=a.wanem,
            wan_tls=not a.wan_no_tls,
        )
        runners: dict[str, Callable[[Context], ScenarioReport | list[ScenarioReport]]] = {
            "loopback": loopback.run,
            "memory": memory.run,
            "latency": latency.run,
            "setup": setup.run,
            "fairness": fairness.run,
        }
        per_profile: dict[str, Callable[[Context], list[ScenarioReport]]] = {
            "wan": wan.run,
            "degraded": degraded.run,
            "multipath": multipath.run,
            "failover": failover.run,
        }
        ctx.extra["on_report"] = writer.add
        for name in a.scenarios:
            t0 = time.monotonic()
            log.info("scenario %s", name)
            if name in per_profile:
                # Each profile x cc (or variant) is added through on_report.
                per_profile[name](ctx)
                continue
            try:
                got = runners[name](ctx)
            except Exception as e:
                log.exception("scenario %s failed", name)
                got = ScenarioReport(name, name, None, {})
                got.error = f"{type(e).__name__}: {e}"
            for sc in got if isinstance(got, list) else [got]:
                sc.seconds = time.monotonic() - t0
                writer.add(sc)
    finally:
        data = writer.write(
            finished=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        )
        table = writer.table()
        out.with_suffix(".txt").write_text(table)
        sys.stdout.write(table)
        sys.stdout.flush()
        problems = validate_report(json.loads(json.dumps(data)))
        for p in problems:
            log.error("report: %s", p)
        log.info("wrote %s and %s", out, out.with_suffix(".txt"))
        if a.keep:
            log.info("logs kept in %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
