"""The rollout reconcile loop: one process at a time (a Redis lock with expiry) advances each
progressing rollout by one step per interval, from the canary analysis.

Pass: next weight step, or promote after the last. Fail: abort (traffic back on stable
first). Not enough canary samples yet: look again at the next tick. Run it with
``laneway controller`` (``laneway serve`` starts one); extra copies wait for the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid

import redis.asyncio as aioredis

from controlplane.rollout_analysis import Outcome, analyse_rollout
from controlplane.rollouts import Phase, Rollout, RolloutStore, apply_transition
from router import keys
from router.errors import Conflict

log = logging.getLogger("laneway.controller")

ACTOR = "controller"
TICK_S = 0.25
LOCK_TTL_MS = 5_000

# Extend the lock only while we still hold it (the token is ours).
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


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
        self.lock_ttl_ms = lock_ttl_ms
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.rollouts = RolloutStore(redis)
        self.holding = False

    async def hold_lock(self) -> bool:
        """Take the lock if free, or extend it if ours; True while we hold it."""
        if self.holding:
            renewed = await self.redis.eval(_RENEW, 1, keys.controller_lock(), self.token,
                                             self.lock_ttl_ms)
            self.holding = bool(renewed)
        if not self.holding:
            self.holding = bool(await self.redis.set(keys.controller_lock(), self.token,
                                                     nx=True, px=self.lock_ttl_ms))
            if self.holding:
                log.info("controller lock taken by %s", self.token)
        return self.holding

    async def release_lock(self) -> None:
        await self.redis.eval(_RELEASE, 1, keys.controller_lock(), self.token)
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


async def run_controller(redis_url: str) -> None:
    """Run the loop until SIGTERM/SIGINT."""
    import signal

    from router.telemetry import setup_tracing, shutdown_tracing

    setup_tracing("laneway-controller")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    redis = aioredis.Redis.from_url(redis_url)
    try:
        await Controller(redis).run(stop)
    finally:
        await redis.aclose()
        shutdown_tracing()
