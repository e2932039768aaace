"""Changing a job record from a test, through the one transition function."""

from __future__ import annotations

from collections.abc import Callable

import redis.asyncio as aioredis

from controlplane.jobs import Event, Job, JobStore
from controlplane.transitions import Change, Transitions


async def edit_job(redis: aioredis.Redis, job_id: str, edit: Callable[[Job], None], *,
                   events: tuple[Event, ...] = ()) -> Job:
    """Apply ``edit`` to the stored job, writing ``events`` with it."""

    def plan(job: Job) -> Change:
        edit(job)
        return Change(job, events=list(events))

    job = await JobStore(redis).get(job_id)
    applied = await Transitions(redis, job_ttl_s=3600).apply(job, "test-edit", plan)
    return applied.job
