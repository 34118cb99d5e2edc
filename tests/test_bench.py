"""Tests of stripe-bench: its pure parts, and one tiny real loopback run.

The benchmark's figures are never asserted (the machine is shared and
noisy); what is tested is that they are aggregated, compared and reported
correctly, and that the loopback scenario runs end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import traffic
from bench.loopback import summarize_collapsed
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
