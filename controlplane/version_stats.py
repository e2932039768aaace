"""Per-model-version counters that canary analysis reads: stages, errors, run times, verdicts.

Workers add to them in the same transaction that records a stage's outcome; the verifier
adds verdicts. Run times keep the most recent RUN_TIMES_KEPT samples for percentiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis.asyncio as aioredis

from controlplane import keys
from controlplane.jobs import StageRecord

if TYPE_CHECKING:
    from controlplane.transitions import Effects

RUN_TIMES_KEPT = 2000


def record_stage(writes: Effects, stage: StageRecord, *, ok: bool) -> None:
    """Count one finished stage for its model version (inside the caller's transaction)."""
    if not stage.model or not stage.model_version:
        return
    key = keys.version_stats(stage.model, stage.model_version)
    writes.hincrby(key, "stages", 1)
    if not ok:
        writes.hincrby(key, "errors", 1)
    elif stage.run_ms is not None:
        times = keys.version_run_times(stage.model, stage.model_version)
        writes.lpush(times, stage.run_ms)
        writes.ltrim(times, 0, RUN_TIMES_KEPT - 1)


def record_verdict(writes: Effects, model: str, version: str, *, passed: bool) -> None:
    key = keys.version_stats(model, version)
    writes.hincrby(key, "verdicts", 1)
    if passed:
        writes.hincrby(key, "verdicts_passed", 1)


@dataclass(frozen=True)
class VersionStats:
    stages: int
    errors: int
    verdicts: int
    verdicts_passed: int
    run_ms: list[int]

    @property
    def error_rate(self) -> float:
        return self.errors / self.stages if self.stages else 0.0

    @property
    def pass_rate(self) -> float | None:
        return self.verdicts_passed / self.verdicts if self.verdicts else None


async def read_stats(redis: aioredis.Redis, model: str, version: str) -> VersionStats:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.version_stats(model, version))
        pipe.lrange(keys.version_run_times(model, version), 0, -1)
        counters, times = await pipe.execute()
    counts = {k.decode(): int(v) for k, v in counters.items()}
    return VersionStats(
        stages=counts.get("stages", 0), errors=counts.get("errors", 0),
        verdicts=counts.get("verdicts", 0), verdicts_passed=counts.get("verdicts_passed", 0),
        run_ms=[int(t) for t in times],
    )
