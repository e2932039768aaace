"""Retention: a job's images and inputs leave the artifact store once its record expired.

The accept transition writes the job's id into ``keys.artifact_expiry()`` (a sorted set)
with the time its record expires if nothing changes it again: ``now + job_ttl_s``
(:func:`record_expiry`; a request with input images writes it before storing them, so a
job that is never accepted is swept too). Every later transition renews the record's TTL,
so the score is the earliest the record can be gone, never later.

Every ``interval_s`` the process holding ``keys.artifact_sweeper_lock()`` (the controller,
``laneway controller``) takes the ids whose time has passed, oldest first: a record still
there is rescored to when it now expires; for a record that is gone, everything under the
job's prefix is deleted from the store, then the id is removed. Deleting twice is harmless,
so a sweeper that dies between the two steps only leaves work for the next one::

    sweeper = ArtifactSweeper(redis, store, interval_s=60, job_ttl_s=7 * 24 * 3600)
    swept = await sweeper.sweep(now_ms())   # ids of the jobs whose artifacts went
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio as aioredis

from controlplane import keys
from controlplane.artifacts import ArtifactStore, job_prefix
from controlplane.jobs import now_ms
from controlplane.leases import Lease
from controlplane.transitions import Effects

log = logging.getLogger("laneway.retention")

#: ids looked at per round trip; a sweep goes on while whole batches come back
BATCH = 100


def record_expiry(effects: Effects, job_id: str, *, at_ms: int) -> None:
    """Write (with a transition's effects) that the job's record expires at ``at_ms``."""
    effects.zadd(keys.artifact_expiry(), {job_id: at_ms})


class ArtifactSweeper:
    def __init__(self, redis: aioredis.Redis, artifacts: ArtifactStore, *, interval_s: float,
                 job_ttl_s: int) -> None:
        self.redis = redis
        self.artifacts = artifacts
        self.interval_s = interval_s
        self.job_ttl_s = job_ttl_s
        # outlives the interval, so the holder keeps it from one sweep to the next; a dead
        # holder's passes to another process within two intervals
        self.lease = Lease(redis, keys.artifact_sweeper_lock(),
                           ttl_ms=int((2 * interval_s + 5) * 1000))

    async def sweep(self, now: int) -> list[str]:
        """Delete the artifacts of every job whose record expired by ``now`` (ms)."""
        swept: list[str] = []
        deleted = 0
        while True:
            raw: Any = await self.redis.zrangebyscore(keys.artifact_expiry(), "-inf", now,
                                                      start=0, num=BATCH)
            due = [job_id.decode() for job_id in raw]
            if not due:
                break
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id in due:
                    pipe.pttl(keys.job(job_id))
                ttls = await pipe.execute()
            later = {job_id: now + (ttl if ttl > 0 else self.job_ttl_s * 1000)
                     for job_id, ttl in zip(due, ttls, strict=True) if ttl != -2}
            gone = [job_id for job_id in due if job_id not in later]
            if later:  # still there: every transition renewed its TTL
                await self.redis.zadd(keys.artifact_expiry(), later)
            for job_id in gone:
                deleted += await asyncio.to_thread(self.artifacts.delete_prefix,
                                                   job_prefix(job_id))
            if gone:
                await self.redis.zrem(keys.artifact_expiry(), *gone)
            swept.extend(gone)
            if len(due) < BATCH:
                break
        if swept:
            log.info("%d expired jobs swept: %d artifacts deleted from %s", len(swept),
                     deleted, self.artifacts.location)
        return swept

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep every ``interval_s`` while holding the lease, until ``stop`` is set."""
        try:
            while not stop.is_set():
                try:
                    if await self.lease.hold():
                        await self.sweep(now_ms())
                except Exception:  # Redis or the store (obstore has its own error types)
                    log.exception("artifact sweep failed; trying again next interval")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.interval_s)
        finally:
            with contextlib.suppress(aioredis.RedisError):
                await self.lease.release()
