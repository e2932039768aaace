"""Canary analysis: is the canary worse than stable on error rate, p95 run time or verifier
pass rate?

The canary is judged on what it did since its rollout started (counters minus the rollout's
baseline). Stable is judged on the same window when it has ``min_samples`` there, else on its
whole kept history (at a 100 % step stable gets no new traffic). A check with too little data
on either side is left out, except that the canary must reach ``min_samples`` stages before
any verdict at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import redis.asyncio as aioredis

from controlplane.rollouts import Counts, Rollout, Thresholds
from controlplane.version_stats import VersionStats, read_stats


class Outcome(StrEnum):
    wait = "wait"        # not enough canary samples yet
    passed = "passed"
    failed = "failed"


@dataclass(frozen=True)
class Check:
    name: str
    canary: float
    stable: float
    limit: str
    passed: bool

    def describe(self) -> str:
        return (f"{self.name} canary {self.canary:.1f} vs stable {self.stable:.1f} "
                f"({self.limit}): {'ok' if self.passed else 'FAILED'}")


@dataclass(frozen=True)
class Analysis:
    outcome: Outcome
    canary_samples: int
    checks: tuple[Check, ...] = ()

    @property
    def summary(self) -> str:
        failed = [c for c in self.checks if not c.passed]
        shown = failed or list(self.checks)
        text = "; ".join(c.describe() for c in shown) or "no checks had data"
        return f"{self.outcome}: {text} [{self.canary_samples} canary stages]"


def p95(values: list[int]) -> float:
    """Nearest-rank 95th percentile."""
    ordered = sorted(values)
    rank = max(1, -(-95 * len(ordered) // 100))
    return float(ordered[rank - 1])


def since(stats: VersionStats, baseline: Counts) -> VersionStats:
    """Counters after ``baseline``; run times limited to the newest successful stages."""
    stages = max(0, stats.stages - baseline.stages)
    errors = max(0, stats.errors - baseline.errors)
    newest_ok = max(0, stages - errors)
    return VersionStats(
        stages=stages, errors=errors,
        verdicts=max(0, stats.verdicts - baseline.verdicts),
        verdicts_passed=max(0, stats.verdicts_passed - baseline.verdicts_passed),
        run_ms=stats.run_ms[:newest_ok],  # newest first (LPUSH)
    )


def analyse(canary: VersionStats, stable: VersionStats, *, min_samples: int,
            thresholds: Thresholds) -> Analysis:
    """Compare a canary's window with stable's; see the module docstring for the rules."""
    if canary.stages < min_samples:
        return Analysis(Outcome.wait, canary.stages)
    checks = []
    limit = thresholds.max_error_rate_increase_pts
    canary_pct, stable_pct = canary.error_rate * 100, stable.error_rate * 100
    checks.append(Check("error rate %", canary_pct, stable_pct, f"at most +{limit:g} points",
                        canary_pct - stable_pct <= limit))
    if canary.run_ms and stable.run_ms:
        ratio = thresholds.max_p95_ratio
        canary_p95, stable_p95 = p95(canary.run_ms), p95(stable.run_ms)
        checks.append(Check("p95 run ms", canary_p95, stable_p95, f"at most x{ratio:g}",
                            canary_p95 <= stable_p95 * ratio))
    canary_pass, stable_pass = canary.pass_rate, stable.pass_rate
    if canary.verdicts >= min_samples and canary_pass is not None and stable_pass is not None:
        drop = thresholds.max_pass_rate_drop_pts
        checks.append(Check("verifier pass %", canary_pass * 100, stable_pass * 100,
                            f"at most -{drop:g} points",
                            (stable_pass - canary_pass) * 100 <= drop))
    outcome = Outcome.passed if all(c.passed for c in checks) else Outcome.failed
    return Analysis(outcome, canary.stages, tuple(checks))


async def analyse_rollout(redis: aioredis.Redis, rollout: Rollout) -> Analysis:
    """Read both versions' counters from Redis and analyse the rollout's canary."""
    canary_all = await read_stats(redis, rollout.model, rollout.canary)
    stable_all = await read_stats(redis, rollout.model, rollout.stable)
    canary = since(canary_all, rollout.baseline.get(rollout.canary, Counts()))
    stable = since(stable_all, rollout.baseline.get(rollout.stable, Counts()))
    if stable.stages < rollout.min_samples:
        stable = stable_all
    return analyse(canary, stable, min_samples=rollout.min_samples,
                   thresholds=rollout.thresholds)
