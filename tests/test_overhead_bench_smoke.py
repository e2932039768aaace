"""The overhead benchmark against the floor runs end to end with tiny counts: every section
comes back with numbers, and ``--out`` leaves the recorded results alone. No thresholds:
figures from a few jobs on a shared machine mean nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

BENCH = REPO / "bench" / "control_plane_overhead.py"
RECORDED = [REPO / "bench" / "RESULTS.md",
            REPO / "bench" / "results" / "control_plane_overhead.json"]


def numbers(figures: dict[str, Any], *path: str) -> list[float]:
    """The numeric leaves below ``path`` (failing on a missing key or a non-number)."""
    node: Any = figures
    for key in path:
        node = node[key]
    if isinstance(node, dict):
        return [n for key in node for n in numbers(node, key)]
    assert isinstance(node, int | float) and not isinstance(node, bool), (path, node)
    assert math.isfinite(node), (path, node)
    return [node]


def test_bench_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    before = {path: path.read_bytes() for path in RECORDED if path.exists()}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(BENCH), "--jobs", "5", "--submits", "100", "--batch-jobs", "16",
         "--repeats", "1", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    figures = json.loads(out.read_text())

    for stack in ("laneway", "floor"):
        for figure in ("e2e_p50_ms", "e2e_p99_ms", "queued_p50_ms", "run_p50_ms",
                       "rest_p50_ms"):
            numbers(figures, "sequential", stack, figure)
    numbers(figures, "sequential", "overhead_p50_ms")
    numbers(figures, "sequential", "overhead_p99_ms")
    assert set(figures["sequential"]["gap_p50_ms"]) == {"queued", "run", "rest"}
    for n in (1, 2):
        numbers(figures, "throughput", f"ratio_{n}_api")
        for stack in ("laneway", "floor"):
            run = figures["throughput"][f"{stack}_{n}_api"]
            assert run["accepted"] == 100 and run["clients"] == 32
            assert numbers(run, "submits_per_s")[0] > 0
    for stack in ("laneway", "floor"):
        numbers(figures, "batched", stack, "gain")
        for lane in ("one", "batch"):
            assert numbers(figures, "batched", stack, lane, "jobs_per_s")[0] > 0
            numbers(figures, "batched", stack, lane, "beyond_call_ms")
        assert figures["batched"][stack]["one"]["mean_batch_size"] == 1
    numbers(figures, "batched", "gain_share")
    assert set(figures["verdicts"]) == {"overhead_p50_ms", "overhead_p99_ms",
                                        "throughput_ratio_2_api", "batched_gain_share"}
    assert all(isinstance(v["met"], bool) for v in figures["verdicts"].values())
    assert len(figures["per_repeat"]) == 1
    assert "above the floor" in figures["summary"]
    assert {path: path.read_bytes() for path in RECORDED if path.exists()} == before
