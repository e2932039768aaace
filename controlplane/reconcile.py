"""The rollout reconcile loop: one process at a time (a Redis lock with expiry) advances each
progressing rollout by one step per interval, from the canary analysis.

Pass: next weight step, or promote after the last. Fail: abort (traffic back on stable
first). Not enough canary samples yet: look again at the next tick. Run it with
``laneway controller`` (``laneway serve`` starts one); extra copies wait for the lock. The
same process runs the artifact sweeper (``controlplane/retention.py``) under its own lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import redis.asyncio as aioredis

from controlplane import keys
from controlplane.artifacts import open_artifact_store
from controlplane.errors import Conflict
from controlplane.leases import Lease
from controlplane.retention import ArtifactSweeper
from controlplane.rollout_analysis import Outcome, analyse_rollout
from controlplane.rollouts import Phase, Rollout, RolloutStore, apply_transition
from controlplane.settings import Settings
from controlplane.signals import on_stop_signals

log = logging.getLogger("laneway.controller")

ACTOR = "controller"
TICK_S = 0.25
LOCK_TTL_MS = 5_000

async def reconcile_rollout(redis: aioredis.Redis, rollout: Rollout, *,
                            now_s: float) -> Rollout | None:
    """One step for one rollout if its interval has passed; the new state, or None."""
    if rollout.phase is not Phase.progressing:
        return None
    if now_s - rollout.last_step_at_s < rollout.interval_s:
        return None
    analysis = await analyse_rollout(redis, rollout)
    if analysis.outcome is Outcome.wait:
        return None
    if analysis.outcome is Outcome.failed:
        return await apply_transition(redis, rollout, Phase.aborted, now_s=now_s, actor=ACTOR,
                                      reason=f"analysis {analysis.summary}")
    if rollout.is_last_step:
        return await apply_transition(redis, rollout, Phase.promoted, now_s=now_s,
                                      actor=ACTOR, reason=f"analysis {analysis.summary}")
    return await apply_transition(
        redis, rollout, Phase.progressing, now_s=now_s, actor=ACTOR,
        step_index=rollout.step_index + 1,
        reason=f"to {rollout.steps[rollout.step_index + 1]:g}% after analysis "
               f"{analysis.summary}")


class Controller:
    """Holds the controller lock and reconciles every rollout each tick while it does."""

    def __init__(self, redis: aioredis.Redis, *, tick_s: float = TICK_S,
                 lock_ttl_ms: int = LOCK_TTL_MS) -> None:
        self.redis = redis
        self.tick_s = tick_s
        self.lease = Lease(redis, keys.controller_lock(), ttl_ms=lock_ttl_ms)
        self.rollouts = RolloutStore(redis)
        self.holding = False

    async def hold_lock(self) -> bool:
        """Take the lock if free, or extend it if ours; True while we hold it."""
        was_holding, self.holding = self.holding, await self.lease.hold()
        if self.holding and not was_holding:
            log.info("controller lock taken by %s", self.lease.token)
        return self.holding

    async def release_lock(self) -> None:
        await self.lease.release()
        self.holding = False

    async def tick(self, now_s: float) -> list[Rollout]:
        """Reconcile every rollout once (if we hold the lock); return those that changed."""
        if not await self.hold_lock():
            return []
        changed = []
        for rollout in await self.rollouts.all():
            try:
                after = await reconcile_rollout(self.redis, rollout, now_s=now_s)
            except Conflict as exc:  # on-call changed it meanwhile; re-read next tick
                log.info("rollout of %s: %s", rollout.model, exc.message)
                continue
            if after is not None:
                log.info("rollout of %s: %s (%s)", after.model, after.phase, after.message)
                changed.append(after)
        return changed

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    await self.tick(time.time())
                except aioredis.RedisError:
                    log.exception("controller tick failed; retrying")
                    self.holding = False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.tick_s)
        finally:
            with contextlib.suppress(aioredis.RedisError):
                await self.release_lock()


async def run_controller(settings: Settings) -> None:
    """Run the reconcile loop and the artifact sweeper until SIGTERM/SIGINT."""
    from controlplane.telemetry import setup_tracing, shutdown_tracing

    assert settings.redis_url
    setup_tracing("laneway-controller")
    stop = asyncio.Event()
    on_stop_signals(stop.set)
    redis = aioredis.Redis.from_url(settings.redis_url)
    sweeper = ArtifactSweeper(redis, open_artifact_store(settings.artifacts),
                              interval_s=settings.artifact_sweep_interval_s,
                              job_ttl_s=settings.job_ttl_s)
    try:
        await asyncio.gather(Controller(redis).run(stop), sweeper.run(stop))
    finally:
        await redis.aclose()
        shutdown_tracing()
