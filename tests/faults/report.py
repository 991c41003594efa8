"""What each fault scenario measured, printed as a table at the end of the session."""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ScenarioResult:
    name: str
    runs: int = 0
    faults: int = 0
    recovery_s: list[float] = field(default_factory=list)  # fault end -> run ended
    duration_s: list[float] = field(default_factory=list)  # run first seen -> run ended
    lost: int = 0
    duplicates: int = 0
    stalled: int = 0
    retried: int = 0  # API attempts repeated with the same Idempotency-Key (after a 5xx)
    statuses: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def p50(self) -> str:
        return f"{statistics.median(self.recovery_s):.1f}" if self.recovery_s else "-"

    def worst(self) -> str:
        return f"{max(self.recovery_s):.1f}" if self.recovery_s else "-"

    def durations(self) -> str:
        if not self.duration_s:
            return "-"
        return f"{statistics.median(self.duration_s):.1f}/{max(self.duration_s):.1f}"


RESULTS: list[ScenarioResult] = []  # the scenarios this process ran
# The scenarios whose reports reached this process: under pytest-xdist the table is printed by
# the controller, which ran none of them; each scenario travels on its test's report.
REPORTED: list[ScenarioResult] = []
_KEY = "fault_scenario"
_attached = 0


def attach(report: Any) -> None:
    """Put the scenarios run since the last call on this test's report."""
    global _attached
    for result in RESULTS[_attached:]:
        report.user_properties.append((_KEY, dataclasses.asdict(result)))
    _attached = len(RESULTS)


def collect(report: Any) -> None:
    for key, value in report.user_properties:
        if key == _KEY:
            REPORTED.append(ScenarioResult(**value))


def write_summary(terminalreporter: Any) -> None:
    if not REPORTED:
        return
    tr = terminalreporter
    tr.write_sep("=", "fault injection summary")
    header = (f"{'scenario':<28} {'runs':>5} {'faults':>6} {'rec p50 s':>9} {'rec max s':>9} "
              f"{'lost':>5} {'dups':>5} {'stalled':>7} {'retried':>7} {'run p50/max s':>13}"
              "  statuses")
    tr.write_line(header)
    for r in REPORTED:
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(r.statuses.items()))
        tr.write_line(f"{r.name:<28} {r.runs:>5} {r.faults:>6} {r.p50():>9} {r.worst():>9} "
                      f"{r.lost:>5} {r.duplicates:>5} {r.stalled:>7} {r.retried:>7} "
                      f"{r.durations():>13}  {statuses}")
    for r in REPORTED:
        for failure in r.failures[:8]:
            tr.write_line(f"  {r.name}: {failure}")
        if len(r.failures) > 8:
            tr.write_line(f"  {r.name}: ... and {len(r.failures) - 8} more")
