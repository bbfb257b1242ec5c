"""Shared reporting for benchmarks: each figure is printed as a human line and as one
`BENCH {json}` line that `benchmarks/run_all.py` collects into docs/performance.md.

    record("collector polls per CPU-second", 10_000, "polls/s", reference=15_800,
           reference_label="raw pymodbus loop, same run", goal=">= 80 % of raw")
"""

from __future__ import annotations

import json
import sys


def record(figure: str, value: float, unit: str, reference: float | None = None, reference_label: str | None = None,
           goal: str | None = None, note: str | None = None, higher_is_better: bool = True) -> None:
    ratio = (value / reference) if reference not in (None, 0) else None
    line = f"{figure}: {value:,.4g} {unit}"
    if reference is not None:
        line += f" | reference ({reference_label}): {reference:,.4g} {unit}"
        line += f" | ratio {ratio:.2f}" if ratio is not None else " | ratio n/a"
    if goal:
        line += f" | goal {goal}"
    print(line, flush=True)
    print("BENCH " + json.dumps({
        "benchmark": sys.argv[0].rsplit("/", 1)[-1], "figure": figure, "value": value, "unit": unit,
        "reference": reference, "reference_label": reference_label, "ratio": ratio, "goal": goal, "note": note,
        "higher_is_better": higher_is_better}), flush=True)
