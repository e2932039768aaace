"""Releasing deferred jobs when interactive load falls (``on_full: defer``).

Deferred jobs wait, accepted, in one stream (``keys.deferred_stream``) in arrival order.
Every ``tick_s`` the process holding the deferral lock (a Redis key with expiry, so one
API process releases at a time and another takes over within ``LOCK_TTL_MS`` when it
dies) measures interactive work in flight: the depth of the lanes of non-deferrable tiers
(entries are deleted on ack, so depth counts queued and running stages). While that is at
most ``policy.defer.max_interactive_depth`` (0: only when interactive lanes are empty), it
moves deferred jobs to their engine lanes in order, keeping at most
``MAX_RELEASED_DEPTH`` entries waiting in the deferrable lanes so deferred work stays
deferred if interactive load comes back. A job cancelled while deferred is dropped. A
release is one transition, so two processes never release a job twice, and the job's
deadline (its route's ``timeout_s``) starts at its release, not at its submission. Each
release is counted per second (``keys.deferred_released``): the rate that the
``Retry-After`` of a submit refused by ``defer.max_depth`` is computed from
(``router/admission.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio as aioredis

from controlplane import keys, route_counters
from controlplane.errors import NotFound
from controlplane.jobs import Job, JobStore, StageStatus, now_ms
from controlplane.leases import Lease
from controlplane.live_config import LiveConfig
from controlplane.policy import Policy
from controlplane.transitions import Change, Transitions

log = logging.getLogger(__name__)

TICK_S = 0.2
LOCK_TTL_MS = 5000
MAX_RELEASED_DEPTH = 32

async def lane_depths(redis: aioredis.Redis, policy: Policy) -> dict[tuple[str, str], int]:
    """XLEN of every ``(engine, tier)`` lane of the policy, in one round trip."""
    lanes = [(engine, tier) for engine in policy.engines for tier in policy.tiers]
    async with redis.pipeline(transaction=False) as pipe:
        for engine, tier in lanes:
            pipe.xlen(keys.engine_stream(engine, tier))
        depths = await pipe.execute()
    return dict(zip(lanes, (int(d) for d in depths), strict=True))


class DeferralDispatcher:
    def __init__(self, redis: aioredis.Redis, live: LiveConfig, *, job_ttl_s: int,
                 tick_s: float = TICK_S) -> None:
        self.redis = redis
        self.live = live
        self.jobs = JobStore(redis)
        self.transitions = Transitions(redis, job_ttl_s=job_ttl_s)
        self.tick_s = tick_s
        self.lease = Lease(redis, keys.deferral_lock(), ttl_ms=LOCK_TTL_MS)
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        self._stopping.clear()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        # An event, not Task.cancel(): a cancellation that lands inside a Redis call can be
        # swallowed by the client, which left the loop running (seen in tests).
        self._stopping.set()
        if self._task is not None:
            await self._task
        with contextlib.suppress(aioredis.RedisError):
            await self.lease.release()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                if await self.hold_lock():
                    await self.release_ready(self.live.snapshot.policy)
            except aioredis.RedisError:
                log.warning("deferral loop: Redis unavailable; retrying", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self.tick_s)

    async def hold_lock(self) -> bool:
        """Take the deferral lock, or extend it when this process holds it already."""
        return await self.lease.hold()

    async def release_ready(self, policy: Policy) -> int:
        """Move as many deferred jobs to their lanes as the load allows; return how many."""
        depths = await lane_depths(self.redis, policy)
        interactive = sum(d for (_, tier), d in depths.items()
                          if not policy.tiers[tier].deferrable)
        if interactive > policy.defer.max_interactive_depth:
            return 0
        waiting = sum(d for (_, tier), d in depths.items() if policy.tiers[tier].deferrable)
        budget = MAX_RELEASED_DEPTH - waiting
        if budget <= 0:
            return 0
        released = 0
        entries: Any = await self.redis.xrange(keys.deferred_stream(), count=budget)
        for entry_id, fields in entries:
            released += await self._release(entry_id, fields[b"job"].decode(), policy)
        return released

    async def _release(self, entry_id: bytes, job_id: str, policy: Policy) -> int:
        """Queue a deferred job's first stage, its deadline starting now; 1 if released."""
        try:
            job = await self.jobs.get(job_id)
            applied = await self.transitions.apply(
                job, "release", lambda j: released(j, entry_id, policy))
        except NotFound:  # expired meanwhile
            applied = None
        if applied is None or not applied.changed:  # gone, cancelled, or released elsewhere
            await self.redis.xdel(keys.deferred_stream(), entry_id)
            return 0
        return 1


def released(job: Job, entry_id: bytes, policy: Policy) -> Change | None:
    """The plan of a release: stage 0 queued, the deferred entry dropped; None when the job
    ended meanwhile or another process released it first."""
    if job.status.is_final or job.stages[0].status is not StageStatus.pending:
        return None
    change = Change(job)
    change.enqueue(0)
    with contextlib.suppress(KeyError):  # a route gone from the policy keeps no deadline
        job.deadline_ms = now_ms() + int(policy.route(job.route).timeout_s * 1000)
    change.effects.xdel(keys.deferred_stream(), entry_id)
    route_counters.on_release(change.effects)
    change.event("queued", route=job.route, stage=0, engine=job.stages[0].engine,
                 released=True)
    return change
