"""Cancelling a job (``DELETE /v1/jobs/{id}``): targeted, idempotent, counted once.

A queued job becomes ``cancelled`` at once and its stage entry is acknowledged unrun by
the worker that reads it (workers skip entries of final jobs); a deferred one is dropped
by the deferral loop. A running job becomes ``cancelled`` too and its id goes out on
``CANCEL_CHANNEL``, so the worker running it stops at the next denoising step and frees
the slot. The transition, its event, the route's in-flight count and the outcome counter
are written in one transaction that only the first cancel commits::

    job, changed = await cancel_job(redis, "j_…", job_ttl_s=3600)
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis

from controlplane import keys, route_counters
from controlplane.errors import NotFound
from controlplane.jobs import Job, JobStatus, StageStatus, utc_now
from controlplane.metrics_store import record_job_outcome
from controlplane.stage_messages import add_event

log = logging.getLogger(__name__)

_STOPPED_STAGES = frozenset({StageStatus.queued, StageStatus.running})


async def cancel_job(redis: aioredis.Redis, job_id: str, *, job_ttl_s: int,
                     tenant: str | None = None) -> tuple[Job, bool]:
    """Cancel ``job_id``; return the job and whether this call cancelled it.

    With ``tenant``, a job of another tenant is reported as not found.
    """
    key = keys.job(job_id)
    async with redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(key)
                raw = await pipe.get(key)
                job = None if raw is None else Job.model_validate_json(raw)
                if job is None or (tenant is not None and job.request.tenant != tenant):
                    raise NotFound(f"job {job_id!r} does not exist")
                if job.status.is_final:
                    return job, False
                was = job.status
                job.transition(JobStatus.cancelled)
                for record in job.stages:
                    if record.status in _STOPPED_STAGES:
                        if record.status is StageStatus.running:
                            record.finished_at = utc_now()
                        record.status = StageStatus.cancelled
                pipe.multi()
                pipe.set(key, job.model_dump_json(), ex=job_ttl_s)
                add_event(pipe, job_id, "cancelled", was=was.value, stage=job.current_stage)
                route_counters.on_finish(pipe, job.route)
                record_job_outcome(pipe, route=job.route, status=JobStatus.cancelled.value)
                # queued jobs too: a worker may have read the entry a moment ago
                pipe.publish(keys.CANCEL_CHANNEL, job_id)
                pipe.publish(keys.JOB_DONE_CHANNEL, job.model_dump_json())
                await pipe.execute()
            except aioredis.WatchError:
                continue
            log.info("job %s: %s -> cancelled", job_id, was.value)
            return job, True
