"""Pure parts of the benchmark: aggregation, goals, the report schema and the table.

Nothing here touches processes or sockets, so it is unit-tested directly.

Every figure keeps all of its repetitions (``reps``) next to the median:
the machine is shared and noisy, and a reader should see the spread.  A
ratio between two cases is taken per repetition -- both measured back to
back in the same repetition -- and then the median of those ratios is
reported, so slow phases of the machine cancel out instead of landing on
one side of the comparison.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA = "stripeproxy-bench/1"


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that are not None; None when there are none."""
    v = [x for x in values if x is not None and not math.isnan(x)]
    return statistics.median(v) if v else None


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0..100) with linear interpolation between ranks."""
    if not values:
        return None
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * p / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def jain_index(values: Sequence[float]) -> float | None:
    """Jain's fairness index (sum x)^2 / (n * sum x^2): 1 is perfectly fair, 1/n worst."""
    if not values:
        return None
    sq = sum(x * x for x in values)
    if sq == 0:
        return None
    return sum(values) ** 2 / (len(values) * sq)


def paired_ratios(
    numerator: Sequence[float | None], denominator: Sequence[float | None]
) -> list[float | None]:
    """Per-repetition ratios; None where either side is missing or the divisor is 0."""
    out: list[float | None] = []
    for a, b in zip(numerator, denominator, strict=False):
        out.append(a / b if a is not None and b else None)
    return out


@dataclass
class Goal:
    """A target a figure is compared with; reported, never asserted."""

    op: str  # ">=" or "<="
    target: float
    text: str

    def met(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return value >= self.target if self.op == ">=" else value <= self.target

    def describe(self, value: float | None) -> str:
        met = self.met(value)
        verdict = "n/a" if met is None else ("met" if met else "NOT met")
        return f"{self.text}: {verdict}"


@dataclass
class Result:
    """One figure of one case, with every repetition.

    ``kind`` is "figure" for a measurement and "ratio" for a comparison of
    two cases of the same repetitions.
    """

    case: str
    metric: str
    unit: str
    reps: list[float | None]
    kind: str = "figure"
    params: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    goal: Goal | None = None

    @property
    def median(self) -> float | None:
        return median(self.reps)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Result:
        g = d.get("goal")
        goal = Goal(g["op"], g["target"], g["text"]) if g else None
        return cls(
            d["case"],
            d["metric"],
            d["unit"],
            list(d["reps"]),
            d.get("kind", "figure"),
            d.get("params", {}),
            d.get("extra", {}),
            goal,
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["median"] = self.median
        if self.goal is not None:
            d["goal"]["met"] = self.goal.met(self.median)
        return d


@dataclass
class ScenarioReport:
    """Everything one scenario (or one WAN profile x cc) produced."""

    name: str
    title: str
    congestion_control: str | None
    params: dict[str, Any]
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float | None = None
    # Why the scenario did not run (e.g. no link emulator): not an error.
    skipped: str | None = None

    def add(self, result: Result) -> Result:
        self.results.append(result)
        return result

    def find(self, case: str, metric: str) -> Result | None:
        for r in self.results:
            if r.case == case and r.metric == metric:
                return r
        return None

    def ratio(
        self,
        case: str,
        numerator: tuple[str, str],
        denominator: tuple[str, str],
        goal: Goal | None = None,
    ) -> Result | None:
        """Add ``numerator / denominator`` per repetition, if both figures exist."""
        a, b = self.find(*numerator), self.find(*denominator)
        if a is None or b is None:
            return None
        return self.add(
            Result(
                case,
                f"{numerator[1]} ratio",
                "x",
                paired_ratios(a.reps, b.reps),
                kind="ratio",
                params={"numerator": list(numerator), "denominator": list(denominator)},
                goal=goal,
            )
        )

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ScenarioReport:
        """Back from a report file, e.g. to render its table again."""
        return cls(
            d["name"],
            d["title"],
            d["congestion_control"],
            d.get("params", {}),
            [Result.from_json(r) for r in d.get("results", [])],
            list(d.get("notes", [])),
            d.get("data", {}),
            d.get("error"),
            d.get("seconds"),
            d.get("skipped"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "congestion_control": self.congestion_control,
            "params": self.params,
            "results": [r.to_json() for r in self.results],
            "notes": self.notes,
            "data": self.data,
            "error": self.error,
            "seconds": self.seconds,
            "skipped": self.skipped,
        }


def build_report(
    machine: dict[str, Any],
    options: dict[str, Any],
    scenarios: Sequence[ScenarioReport],
    started: str,
    finished: str | None,
) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "started": started,
        "finished": finished,
        "machine": machine,
        "options": options,
        "scenarios": [s.to_json() for s in scenarios],
    }


_TOP_KEYS = {"schema", "started", "finished", "machine", "options", "scenarios"}
_MACHINE_KEYS = {"nproc", "kernel", "cpu_model", "python", "twisted", "pyopenssl", "git_commit"}
_SCENARIO_KEYS = {"name", "title", "congestion_control", "params", "results", "notes", "error"}
_RESULT_KEYS = {"case", "metric", "unit", "reps", "median", "kind", "params", "extra", "goal"}


def validate_report(report: dict[str, Any]) -> list[str]:
    """Problems with a report's shape (an empty list when it is well-formed)."""
    problems: list[str] = []
    missing = _TOP_KEYS - report.keys()
    if missing:
        return [f"missing top-level keys: {sorted(missing)}"]
    if report["schema"] != SCHEMA:
        problems.append(f"schema is {report['schema']!r}, expected {SCHEMA!r}")
    missing = _MACHINE_KEYS - report["machine"].keys()
    if missing:
        problems.append(f"machine lacks {sorted(missing)}")
    for i, sc in enumerate(report["scenarios"]):
        missing = _SCENARIO_KEYS - sc.keys()
        if missing:
            problems.append(f"scenario {i} lacks {sorted(missing)}")
            continue
        for j, r in enumerate(sc["results"]):
            where = f"{sc['name']}[{j}]"
            missing = _RESULT_KEYS - r.keys()
            if missing:
                problems.append(f"{where} lacks {sorted(missing)}")
                continue
            if not isinstance(r["reps"], list) or not all(
                x is None or isinstance(x, int | float) for x in r["reps"]
            ):
                problems.append(f"{where}: reps must be a list of numbers or nulls")
            elif r["median"] != median(r["reps"]):
                problems.append(f"{where}: median {r['median']} is not the median of reps")
            if r["goal"] is not None and not {"op", "target", "text", "met"} <= r["goal"].keys():
                problems.append(f"{where}: goal lacks fields")
    return problems


# ------------------------------------------------------------------ table


def fmt(value: float | None) -> str:
    """About three significant digits; '-' for a missing value."""
    if value is None:
        return "-"
    a = abs(value)
    if a >= 100:
        return f"{value:.0f}"
    if a >= 10:
        return f"{value:.1f}"
    if a >= 1:
        return f"{value:.2f}"
    if a == 0:
        return "0"
    return f"{value:.3f}"


def format_reps(reps: Sequence[float | None]) -> str:
    return " / ".join(fmt(x) for x in reps)


def cell(reps: Sequence[float | None]) -> str:
    """``median (min-max)``, or just the median when the repetitions agree or there is one."""
    v = [x for x in reps if x is not None]
    if not v:
        return "-"
    m = fmt(median(v))
    lo, hi = fmt(min(v)), fmt(max(v))
    return m if lo == hi else f"{m} ({lo}-{hi})"


def format_table(scenarios: Sequence[ScenarioReport]) -> str:
    """Markdown per scenario: one row per case, one column per metric, then the ratios.

    Cells are ``median (min-max)`` over the repetitions; every repetition is
    in the JSON.
    """
    out: list[str] = []
    for sc in scenarios:
        cc = f", cc {sc.congestion_control}" if sc.congestion_control else ""
        out += [f"### {sc.title}{cc}", ""]
        if sc.skipped:
            out += [f"**skipped:** {sc.skipped}", ""]
        if sc.error:
            out += [f"**error:** {sc.error}", ""]
        figures = [r for r in sc.results if r.kind != "ratio"]
        ratios = [r for r in sc.results if r.kind == "ratio"]
        if figures:
            columns = list(dict.fromkeys((r.metric, r.unit) for r in figures))
            cases = list(dict.fromkeys(r.case for r in figures))
            has_goal = any(r.goal for r in figures)
            head = ["case"] + [f"{m} ({u})" if u else m for m, u in columns]
            head += ["goal"] if has_goal else []
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "---|" * len(head))
            for case in cases:
                mine = {(r.metric, r.unit): r for r in figures if r.case == case}
                row = [case] + [cell(mine[c].reps) if c in mine else "" for c in columns]
                if has_goal:
                    row.append(
                        "; ".join(
                            r.goal.describe(r.median) for r in mine.values() if r.goal is not None
                        )
                    )
                out.append("| " + " | ".join(row) + " |")
            out.append("")
        if ratios:
            out += ["| ratio (same repetition) | median (min-max) | goal |", "|---|---|---|"]
            for r in ratios:
                goal = r.goal.describe(r.median) if r.goal else ""
                out.append(f"| {r.case} | {cell(r.reps)} | {goal} |")
            out.append("")
        out += [f"- {note}" for note in sc.notes]
        if sc.notes:
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def goal_summary(scenarios: Sequence[ScenarioReport]) -> str:
    """One line per goal: where it stands."""
    lines = ["| scenario | cc | case | median | goal |", "|---|---|---|---|---|"]
    for sc in scenarios:
        for r in sc.results:
            if r.goal is not None:
                lines.append(
                    f"| {sc.title} | {sc.congestion_control or ''} | {r.case} "
                    f"| {fmt(r.median)} {r.unit} | {r.goal.describe(r.median)} |"
                )
    return "\n".join(lines) + "\n"
