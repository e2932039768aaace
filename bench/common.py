"""Shared bench plumbing: percentiles, result files and the RESULTS.md table."""

from __future__ import annotations

import json
import platform
import statistics
from datetime import UTC, datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS_DIR = BENCH / "results"
RESULTS_MD = BENCH / "RESULTS.md"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_result(name: str, command: str, figures: dict[str, object], summary: str) -> Path:
    """Write ``results/NAME.json`` and replace NAME's row in RESULTS.md."""
    RESULTS_DIR.mkdir(exist_ok=True)
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    body = {"name": name, "command": command, "date": date,
            "machine": f"{platform.machine()}, {platform.python_version()}", **figures}
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(body, indent=2) + "\n")
    header = ["# Benchmark results", "",
              "Each row is rewritten by the benchmark's own command; the JSON beside it in",
              "`bench/results/` holds every figure.", "",
              "| benchmark | command | date | figures |", "|---|---|---|---|"]
    rows = []
    if RESULTS_MD.exists():
        rows = [line for line in RESULTS_MD.read_text().splitlines()
                if line.startswith("| ") and not line.startswith(("| benchmark", "|---"))
                and not line.startswith(f"| {name} |")]
    rows.append(f"| {name} | `{command}` | {date} | {summary} |")
    RESULTS_MD.write_text("\n".join(header + sorted(rows)) + "\n")
    return path
