"""Metrics that workers push through Redis and the API serves on ``/metrics``.

Stage run and queue times are bucketed into fixed histogram buckets per engine and model
version (HINCRBY on one hash); job outcomes and spend are counters. The API turns these
into Prometheus histograms and counters, so every API process reports the same totals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from controlplane import keys

if TYPE_CHECKING:
    from controlplane.transitions import Effects

BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000)


def _bucket(value_ms: float) -> str:
    for bound in BUCKETS_MS:
        if value_ms <= bound:
            return str(bound)
    return "+Inf"


def record_stage_times(writes: Effects, *, engine: str, version: str, queued_ms: int | None,
                       run_ms: int | None) -> None:
    """Add one stage's queue and run time (fields ``kind|engine|version|bucket`` and sums)."""
    key = keys.stage_histograms()
    for kind, value in (("queue", queued_ms), ("run", run_ms)):
        if value is None:
            continue
        prefix = f"{kind}|{engine}|{version}"
        writes.hincrby(key, f"{prefix}|{_bucket(value)}", 1)
        writes.hincrbyfloat(key, f"{prefix}|sum", value)
        writes.hincrby(key, f"{prefix}|count", 1)


def record_job_outcome(writes: Effects, *, route: str, status: str) -> None:
    writes.hincrby(keys.job_outcomes(), f"{route}|{status}", 1)


def record_spend(writes: Effects, *, engine: str, cost: float) -> None:
    if cost:
        writes.hincrbyfloat(keys.engine_spend(), engine, cost)
