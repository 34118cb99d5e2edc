"""Tests of stripe-bench: its pure parts, and one tiny real loopback run.

The benchmark's figures are never asserted (the machine is shared and
noisy); what is tested is that they are aggregated, compared and reported
correctly, and that the loopback scenario runs end to end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bench import degraded, failover, fairness, link, multipath, traffic, wan
from bench.__main__ import SCENARIOS, parse_args
from bench.common import Context
from bench.loopback import summarize_collapsed
from bench.procs import Keys, Proc
from bench.stats import (
    SCHEMA,
    Goal,
    Result,
    ScenarioReport,
    build_report,
    cell,
    fmt,
    format_table,
    goal_summary,
    jain_index,
    median,
    paired_ratios,
    percentile,
    validate_report,
)

ROOT = Path(__file__).resolve().parent.parent

MACHINE = {
    "nproc": 2,
    "kernel": "6.0",
    "cpu_model": "test",
    "python": "3.11",
    "twisted": "24",
    "pyopenssl": "24",
    "git_commit": None,
}

# ------------------------------------------------------------ aggregation


def test_median_ignores_missing_values() -> None:
    assert median([3.0, None, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0]) == 2.5
    assert median([None, None]) is None
    assert median([]) is None


def test_percentile_interpolates_between_ranks() -> None:
    values = [float(x) for x in range(1, 101)]  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_jain_index_bounds() -> None:
    assert jain_index([5.0, 5.0, 5.0, 5.0]) == pytest.approx(1.0)
    assert jain_index([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)  # 1/n: one gets all
    assert jain_index([1.0, 2.0]) == pytest.approx(9 / 10)
    assert jain_index([]) is None
    assert jain_index([0.0, 0.0]) is None


def test_ratios_pair_repetitions_and_skip_missing_ones() -> None:
    assert paired_ratios([2.0, None, 9.0], [1.0, 4.0, 0.0]) == [2.0, None, None]


def test_goal_verdicts() -> None:
    at_least = Goal(">=", 0.5, ">= 0.5 x relay")
    assert at_least.met(0.5) is True
    assert at_least.met(0.49) is False
    assert at_least.met(None) is None
    at_most = Goal("<=", 64, "<= 64 MiB")
    assert at_most.describe(70) == "<= 64 MiB: NOT met"
    assert at_most.describe(10) == "<= 64 MiB: met"
    assert at_most.describe(None) == "<= 64 MiB: n/a"


def _scenario() -> ScenarioReport:
    sc = ScenarioReport("loopback", "loopback: push 1 MiB", "cubic", {"mib": 1})
    sc.add(Result("relay tls, 1 stream", "throughput", "MB/s", [100.0, 200.0, 150.0]))
    sc.add(Result("overlay tls K=6, 1 stream", "throughput", "MB/s", [60.0, 80.0, None]))
    sc.add(Result("overlay tls K=6, 1 stream", "server CPU", "s/GB", [1.5, 1.5, 1.5]))
    sc.ratio(
        "overlay / relay",
        ("overlay tls K=6, 1 stream", "throughput"),
        ("relay tls, 1 stream", "throughput"),
        Goal(">=", 0.5, ">= 0.5 x relay tls"),
    )
    return sc


def test_scenario_ratio_is_the_median_of_per_repetition_ratios() -> None:
    sc = _scenario()
    ratio = sc.results[-1]
    assert ratio.kind == "ratio"
    assert ratio.reps == [0.6, 0.4, None]
    assert ratio.median == pytest.approx(0.5)
    assert ratio.goal is not None and ratio.goal.met(ratio.median)
    assert sc.ratio("missing", ("nope", "throughput"), ("relay tls, 1 stream", "x")) is None


# ------------------------------------------------------------ report schema


def test_report_round_trips_through_json_and_validates() -> None:
    report = build_report(MACHINE, {"reps": 3}, [_scenario()], "2026-01-01T00:00:00", None)
    data = json.loads(json.dumps(report))
    assert data["schema"] == SCHEMA
    assert validate_report(data) == []
    result = data["scenarios"][0]["results"][0]
    assert result["reps"] == [100.0, 200.0, 150.0]
    assert result["median"] == 150.0
    ratio = data["scenarios"][0]["results"][-1]
    assert ratio["goal"]["met"] is True
    again = ScenarioReport.from_json(data["scenarios"][0])
    assert format_table([again]) == format_table([_scenario()])


def test_validate_report_finds_broken_reports() -> None:
    report = json.loads(
        json.dumps(build_report(MACHINE, {}, [_scenario()], "2026-01-01T00:00:00", None))
    )
    report["scenarios"][0]["results"][0]["median"] = 1.0
    del report["machine"]["kernel"]
    problems = validate_report(report)
    assert any("kernel" in p for p in problems)
    assert any("not the median" in p for p in problems)
    assert validate_report({"schema": SCHEMA}) != []


# ------------------------------------------------------------ table


def test_number_formatting() -> None:
    assert fmt(None) == "-"
    assert fmt(1234.5) == "1234"  # rounds half to even, like format()
    assert fmt(12.345) == "12.3"
    assert fmt(1.2345) == "1.23"
    assert fmt(0.01234) == "0.012"
    assert fmt(0) == "0"
    assert cell([1.0, 3.0, 2.0]) == "2.00 (1.00-3.00)"
    assert cell([5.0, 5.0]) == "5.00"
    assert cell([None]) == "-"


def test_table_has_a_row_per_case_a_column_per_metric_and_the_ratios() -> None:
    text = format_table([_scenario()])
    lines = text.splitlines()
    assert lines[0] == "### loopback: push 1 MiB, cc cubic"
    assert "| case | throughput (MB/s) | server CPU (s/GB) |" in text
    assert "| relay tls, 1 stream | 150 (100-200) |  |" in text
    assert "| overlay tls K=6, 1 stream | 70.0 (60.0-80.0) | 1.50 |" in text
    assert "| overlay / relay | 0.500 (0.400-0.600) | >= 0.5 x relay tls: met |" in text
    summary = goal_summary([_scenario()])
    assert "| loopback: push 1 MiB | cubic | overlay / relay | 0.500 x |" in summary
    assert ">= 0.5 x relay tls: met" in summary


def test_table_shows_errors_and_notes() -> None:
    sc = ScenarioReport("wan-P2-cubic", "wan P2", "cubic", {})
    sc.error = "namespaces wa/wb already exist"
    sc.notes.append("link wanem")
    text = format_table([sc])
    assert "**error:** namespaces wa/wb already exist" in text
    assert "- link wanem" in text


def test_a_skipped_scenario_says_why_and_round_trips() -> None:
    sc = ScenarioReport("wan", "wan", None, {})
    sc.skipped = "no link emulator"
    assert "**skipped:** no link emulator" in format_table([sc])
    assert "**error:**" not in format_table([sc])
    data = json.loads(json.dumps(build_report(MACHINE, {}, [sc], "t0", None)))
    assert validate_report(data) == []
    assert ScenarioReport.from_json(data["scenarios"][0]).skipped == "no link emulator"


# ------------------------------------------------------------ the link emulator


def fake_wanem(directory: Path) -> Path:
    directory.mkdir()
    setup = directory / "setup.sh"
    setup.write_text("#!/bin/sh\nexit 0\n")
    setup.chmod(0o755)
    return directory


def netem(answer: bool) -> Callable[[], bool]:
    """A stand-in for the netem probe (the real one needs root and creates a namespace)."""
    return lambda: answer


def test_emulator_option_beats_environment_beats_netem(tmp_path: Path) -> None:
    opt, env = fake_wanem(tmp_path / "opt"), fake_wanem(tmp_path / "env")
    environ = {link.ENV: str(env)}

    chosen = link.find_link(opt, environ, netem(True))
    assert isinstance(chosen, link.Wanem)
    assert (chosen.directory, chosen.source) == (opt, "--wanem")
    assert link.describe(chosen) == "wanem (userspace linkem) from --wanem"

    chosen = link.find_link(None, environ, netem(True))
    assert isinstance(chosen, link.Wanem)
    assert (chosen.directory, chosen.source) == (env, "$STRIPE_WANEM")

    chosen = link.find_link(None, {link.ENV: "  "}, netem(True))
    assert isinstance(chosen, link.Netem)
    assert link.describe(chosen) == "netem (veth)"


def test_without_any_emulator_the_error_says_how_to_get_one() -> None:
    with pytest.raises(link.NoEmulator) as caught:
        link.find_link(None, {}, netem(False))
    message = str(caught.value)
    for hint in ("no link emulator", "netem", "modprobe sch_netem", "--wanem DIR", "STRIPE_WANEM"):
        assert hint in message, hint
    assert link.find_wanem(None, {}) is None


def test_a_named_emulator_that_is_not_there_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    # netem works, but the user asked for a directory: say what is wrong with it.
    with pytest.raises(link.NoEmulator, match=r"--wanem .*nowhere: no setup\.sh there"):
        link.find_link(tmp_path / "nowhere", {}, netem(True))
    with pytest.raises(link.NoEmulator, match=r"\$STRIPE_WANEM .*nowhere: no setup\.sh"):
        link.find_link(None, {link.ENV: str(tmp_path / "nowhere")}, netem(True))
    not_executable = fake_wanem(tmp_path / "plain")
    (not_executable / "setup.sh").chmod(0o644)
    if not os.access(not_executable / "setup.sh", os.X_OK):  # root may execute anything
        with pytest.raises(link.NoEmulator, match="not executable"):
            link.find_link(not_executable, {}, netem(True))


def context(tmp_path: Path, wanem: Path | None = None) -> Context:
    reports: list[ScenarioReport] = []
    ctx = Context(tmp_path, 1, True, Keys(tmp_path, "sha256:00"), wanem=wanem)
    ctx.extra["on_report"] = reports.append
    ctx.extra["reports"] = reports
    return ctx


def test_wan_scenarios_are_skipped_with_the_how_to_when_there_is_no_emulator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(link, "netem_works", lambda: False)
    monkeypatch.delenv(link.ENV, raising=False)
    ctx = context(tmp_path)
    (sc,) = wan.run(ctx)
    assert sc.name == "wan" and sc.error is None and sc.skipped == link.HOW_TO
    (sc,) = degraded.run(ctx)
    assert sc.name == "degraded" and sc.error is None
    assert sc.skipped == link.HOW_TO_PER_FLOW and "netem cannot" in sc.skipped
    assert [r.name for r in ctx.extra["reports"]] == ["wan", "degraded"]


def test_wan_scenarios_are_skipped_without_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    probed: list[str] = []

    def netem_works() -> bool:
        probed.append("netem")
        return True

    monkeypatch.setattr(link, "netem_works", netem_works)
    ctx = context(tmp_path, fake_wanem(tmp_path / "wanem"))
    for run in (wan.run, degraded.run):
        (sc,) = run(ctx)
        assert sc.skipped == link.NEEDS_ROOT and "root" in sc.skipped
    assert probed == []


def test_multipath_cases_dial_each_path_and_bond_both() -> None:
    cases = {case: (how, path) for case, how, path in multipath.CASES}
    assert set(cases) == {
        "TCP path 1",
        "TCP path 2",
        "MPTCP",
        "overlay path 1",
        "overlay path 2",
        "overlay bonded",
    }
    # One path: the far end's address on that path, no binding needed.
    assert multipath.client_extra("p1") == ("10.199.1.2", [])
    assert multipath.client_extra("p2") == ("10.199.2.2", [])
    # Bonded: the address both paths reach, one --path per source, K each.
    server, extra = multipath.client_extra(cases["overlay bonded"][1])
    assert server == "10.199.9.2"
    assert extra == ["--path", "p1=10.199.1.1:3", "--path", "p2=10.199.2.1:3"]
    assert multipath.path_spec("M1", "p2") == "30,0.5,20"
    assert multipath.path_spec("M2", "p2") == "150,0.5,20"
    assert multipath.mptcp_argv("send")[-3:] == ["bench.multipath", "mptcp", "send"]


@pytest.mark.parametrize(
    ("prof", "goals"),
    [
        ("M1", {"bonded / (path 1 + path 2)": True, "bonded / MPTCP": False}),
        ("M2", {"bonded / better path": True}),
    ],
)
def test_multipath_goals_follow_the_issue(prof: str, goals: dict[str, bool]) -> None:
    sc = ScenarioReport(f"multipath-{prof}-cubic", "t", "cubic", {})
    goodput: dict[str, list[float | None]] = {
        "TCP path 1": [46.0, 45.0],
        "TCP path 2": [18.0, 18.0],
        "MPTCP": [62.0, 64.0],
        "overlay path 1": [40.0, 42.0],
        "overlay path 2": [16.0, None],
        "overlay bonded": [52.0, 60.0],
    }
    multipath.add_results(sc, prof, goodput, {case: [] for case in goodput})
    total = sc.find("overlay path 1 + path 2", "goodput")
    assert total is not None and total.reps == [56.0, None]
    best = sc.find("overlay better path", "goodput")
    assert best is not None and best.reps == [40.0, None]
    with_goals = {r.case: r for r in sc.results if r.goal is not None}
    assert set(with_goals) == set(goals)
    for case, met in goals.items():
        r = with_goals[case]
        assert r.goal is not None and r.goal.met(median(r.reps)) is met
    ratio = sc.find("bonded / (path 1 + path 2)", "goodput ratio")
    assert ratio is not None and ratio.reps == [pytest.approx(52 / 56), None]


def test_multipath_is_skipped_without_a_two_path_emulator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.delenv(link.ENV, raising=False)
    (sc,) = multipath.run(context(tmp_path))
    assert sc.name == "multipath" and sc.error is None and sc.skipped == multipath.HOW_TO
    (sc,) = multipath.run(context(tmp_path, fake_wanem(tmp_path / "wanem")))  # no multipath.sh
    assert sc.skipped is not None and "no executable multipath.sh" in sc.skipped
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    (sc,) = multipath.run(context(tmp_path, tmp_path / "wanem"))
    assert sc.skipped == link.NEEDS_ROOT


def test_failover_is_skipped_without_a_two_path_emulator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.delenv(link.ENV, raising=False)
    (sc,) = failover.run(context(tmp_path))
    assert sc.name == "failover" and sc.error is None and sc.skipped == failover.HOW_TO
    assert "failover scenario needs" in failover.HOW_TO
    (sc,) = failover.run(context(tmp_path, fake_wanem(tmp_path / "wanem")))
    assert sc.skipped is not None and "no executable multipath.sh" in sc.skipped
    assert parse_args(["--scenarios", "failover"]).scenarios == ["failover"]


def _socks_relay(drop_byte_at: int | None) -> tuple[int, threading.Thread]:
    """A one-connection SOCKS5 (no auth, IPv4 CONNECT) relay, optionally losing one byte."""
    ls = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with ls, ls.accept()[0] as c:
            assert c.recv(3) == b"\x05\x01\x00"
            c.sendall(b"\x05\x00")
            req = c.recv(10)
            with socket.create_connection(
                (socket.inet_ntoa(req[4:8]), int.from_bytes(req[8:10], "big"))
            ) as up:
                c.sendall(b"\x05\x00\x00\x01" + bytes(6))
                seen = 0
                while data := c.recv(65536):
                    if drop_byte_at is not None and seen <= drop_byte_at < seen + len(data):
                        i = drop_byte_at - seen
                        data = data[:i] + data[i + 1 :]
                        seen += 1
                    seen += len(data)
                    up.sendall(data)
                up.shutdown(socket.SHUT_WR)
                while up.recv(4096):
                    pass
            c.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return ls.getsockname()[1], t


@pytest.mark.parametrize("drop", [None, 100_000])
def test_failover_traffic_ends_agree_only_on_an_exact_copy(drop: int | None) -> None:
    """The sender's and the sink's SHA-256 match for a faithful path and differ
    when one byte is lost; the sink's rate bins add up to what it got."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    sink = subprocess.Popen(
        [sys.executable, "-m", "bench.failover", "sink", "--port", "0"],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert sink.stdout is not None
        head = sink.stdout.readline().split()
        assert head[0] == b"ready"
        relay, t = _socks_relay(drop)
        send = [sys.executable, "-m", "bench.failover", "send", "--socks", f"127.0.0.1:{relay}"]
        send += ["--target", f"127.0.0.1:{int(head[1])}", "--seconds", "0.3"]
        sent = json.loads(subprocess.run(send, capture_output=True, env=env, timeout=60).stdout)
        got = json.loads(sink.stdout.readline())
        t.join(10)
    finally:
        sink.kill()
        sink.wait()
    assert sent["bytes"] > 200_000
    assert sum(n for _, n in got["bins"]) == got["bytes"]
    if drop is None:
        assert (got["bytes"], got["sha256"]) == (sent["bytes"], sent["sha256"])
    else:
        assert got["bytes"] == sent["bytes"] - 1 and got["sha256"] != sent["sha256"]


def test_failover_blocks_are_numbered_so_a_repeat_changes_the_stream() -> None:
    gen = failover.blocks()
    first = [next(gen) for _ in range(3)]
    assert all(len(b) == failover.BLOCK for b in first)
    assert [int.from_bytes(b[:8], "big") for b in first] == [0, 1, 2]
    assert len(set(first)) == 3


def test_bench_skips_wan_and_says_why_from_the_command_line(tmp_path: Path) -> None:
    """``python -m bench`` with a wrong $STRIPE_WANEM: a skip with the reason, exit 0."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), STRIPE_WANEM=str(tmp_path / "nowhere"))
    argv = [sys.executable, "-m", "bench", "--scenarios", "wan", "--out", str(out)]
    r = subprocess.run(
        argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (sc,) = json.loads(out.read_text())["scenarios"]
    reason = link.NEEDS_ROOT if os.geteuid() != 0 else "$STRIPE_WANEM"
    assert sc["error"] is None and reason in sc["skipped"]
    assert f"wan skipped: {sc['skipped']}" in r.stderr
    assert f"**skipped:** {sc['skipped']}" in r.stdout


def test_the_report_names_the_emulator_without_its_local_path(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    emulator = tmp_path / "somewhere" / "wanem"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-m", "bench", "--scenarios", "wan", "--wanem", str(emulator)]
    r = subprocess.run(
        [*argv, "--out", "bench.json"], capture_output=True, text=True, env=env, cwd=tmp_path,
        timeout=120, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    options = json.loads(out.read_text())["options"]
    assert options["wanem"] == ".../wanem"
    assert ".../wanem" in options["argv"] and "somewhere" not in json.dumps(options)


def test_fairness_is_skipped_with_the_how_to_and_returns_its_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m bench`` adds what the scenario returns, so it must not
    also hand the report to on_report (it would be listed twice)."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(link, "netem_works", lambda: False)
    monkeypatch.delenv(link.ENV, raising=False)
    ctx = context(tmp_path)
    (sc,) = fairness.run(ctx)
    assert sc.name == "fairness" and sc.error is None and sc.skipped == link.HOW_TO
    assert ctx.extra["reports"] == []
    assert "fairness" in SCENARIOS
    assert parse_args(["--scenarios", "fairness"]).scenarios == ["fairness"]


def test_wan_goals_of_issue_11() -> None:
    p3 = wan.goals_for("P3", "cubic")
    assert p3["link"].target == 60 and p3["link download"].target == 60
    assert p3["auto-K cubic vs tcp6"].target == 1.5 and p3["vs tcp6"].target == 0.9
    p4 = wan.goals_for("P4", "cubic")
    assert p4["vs direct"].target == p4["vs direct download"].target == 0.95
    assert p4["auto-K subflows"].met(4) and not p4["auto-K subflows"].met(5)
    assert set(wan.goals_for("P1", "bbr")) == {"vs direct"}


def test_wan_variants_run_on_cubic_hosts_and_auto_k_only_where_the_client_has_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert wan.variants("bbr", True) == {}
    assert list(wan.variants("cubic", False)) == ["overlay K=6 cubic subflows"]
    assert list(wan.variants("cubic", True)) == list(wan.VARIANTS)
    cases, k_down = wan._cases([1, 6], ["overlay auto-K"])
    assert ("overlay auto-K", 1, "overlay auto-K", False) in cases and k_down == 6
    from stripeproxy.cli import client_tap

    def subflows(value: str) -> int | str:
        return value if value == "auto" else int(value)

    params = [
        p for p in client_tap.Options.optParameters if isinstance(p, list) and p[0] != "subflows"
    ]
    monkeypatch.setattr(client_tap.Options, "optParameters", [*params])
    assert not wan.auto_subflows_supported()
    monkeypatch.setattr(
        client_tap.Options, "optParameters", [*params, ["subflows", "k", 6, "K", int]]
    )
    assert not wan.auto_subflows_supported()
    monkeypatch.setattr(
        client_tap.Options, "optParameters", [*params, ["subflows", "k", 6, "K", subflows]]
    )
    assert wan.auto_subflows_supported()


def test_open_subflows_counts_only_the_clients_own_connections(tmp_path: Path) -> None:
    """Every client of a namespace shows in /proc/PID/net/tcp; only its own count."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        code = (
            "import socket, sys; "
            f"s = [socket.create_connection(('127.0.0.1', {port})) for _ in range(3)]; "
            "print('up', flush=True); sys.stdin.read()"
        )
        child = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        try:
            assert child.stdout is not None and child.stdout.readline() == b"up\n"
            with socket.create_connection(("127.0.0.1", port)):
                proc = Proc("client", child, tmp_path / "log")
                assert wan.open_subflows(proc, port) == 3
                assert wan.open_subflows(proc, port + 1 if port < 65535 else port - 1) == 0
        finally:
            child.kill()
            child.communicate()


def test_fairness_shares() -> None:
    assert fairness.shares(75.0, 25.0, 100.0) == {"share": 75.0, "link use": 100.0, "jain": 0.8}
    assert fairness.shares(30.0, 30.0, 120.0) == {"share": 50.0, "link use": 50.0, "jain": 1.0}
    assert fairness.shares(0.0, 0.0, 100.0) == {"share": None, "link use": 0.0, "jain": None}


def test_fairness_reads_the_clients_choice_from_its_log() -> None:
    text = (
        "2026-12-01 [-] Loading ...\n"
        "2026-12-01 [-] congestion control: bbr for subflows (available, allowed)\n"
        "2026-12-01 [-] listening\n"
    )
    assert fairness.chosen_algorithm(text) == "bbr for subflows (available, allowed)"
    assert fairness.chosen_algorithm("nothing here") is None


def test_no_development_machine_path_in_the_repository() -> None:
    """Nothing in the checkout points at the machine it was developed on."""
    needle = "/" + "work" + "/"
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False
    ).stdout.split(b"\0")
    if not any(tracked):
        pytest.skip("not a git checkout")
    hits = [
        name.decode()
        for name in tracked
        if name
        and (ROOT / name.decode()).is_file()
        and needle.encode() in (ROOT / name.decode()).read_bytes()
    ]
    assert hits == []


# ------------------------------------------------------------ helpers


def test_py_spy_summary_counts_leaf_frames_of_the_reactor_thread_only() -> None:
    raw = "\n".join(
        [
            "<module> (twistd:6);run (twisted/scripts/twistd.py:35);"
            "doPoll (twisted/internet/epollreactor.py:2) 6",
            "<module> (twistd:6);feed (stripeproxy/wire.py:10) 3",
            "feed (stripeproxy/wire.py:12) 1",
            "Thread._bootstrap (threading.py:1002);wait (threading.py:320) 50",
            "garbage line",
        ]
    )
    s = summarize_collapsed(raw)
    assert s["samples"] == 10
    assert s["other_thread_samples"] == 50
    assert s["self_by_function"][0] == ["doPoll (internet/epollreactor.py)", 60.0]
    assert ["feed (stripeproxy/wire.py)", 40.0] in s["self_by_function"]
    assert s["self_by_file"] == [["internet/epollreactor.py", 60.0], ["stripeproxy/wire.py", 40.0]]


def test_socks_messages() -> None:
    assert (
        traffic.socks_connect_request("127.0.0.1", 80) == b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00P"
    )
    name = traffic.socks_connect_request("example.com", 443)
    assert name == b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"
    assert traffic.socks_reply_length(b"\x05\x00\x00\x01\x00") == 10
    assert traffic.socks_reply_length(b"\x05\x00\x00\x04\x00") == 22
    assert traffic.socks_reply_length(b"\x05\x00\x00\x03\x04") == 11
    assert traffic.socks_reply_length(b"\x05\x00") is None


# ------------------------------------------------------------ smoke run


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_loopback_smoke_run(tmp_path: Path) -> None:
    """The real thing, tiny: twistd proxy pairs, relays, sender and sink, 2 MiB, 1 rep.

    Meant to stay well under 30 s so that it runs with the rest of the suite.
    """
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.monotonic()
    argv = [sys.executable, "-m", "bench", "--scenarios", "loopback"]
    argv += ["--reps", "1", "--size", "2", "--out", str(out)]
    r = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert validate_report(data) == []
    (sc,) = data["scenarios"]
    assert sc["name"] == "loopback" and sc["error"] is None, sc["error"]
    throughput = {r["case"]: r["median"] for r in sc["results"] if r["metric"] == "throughput"}
    for route in ("direct", "relay tcp", "relay tls", "overlay plain K=6", "overlay tls K=6"):
        for streams in ("1 stream", "16 streams"):
            assert throughput[f"{route}, {streams}"] > 0, (route, streams)
    assert "### loopback: push 2 MiB" in r.stdout
    assert out.with_suffix(".txt").read_text() == r.stdout
    assert elapsed < 120
