"""How a stage entry ends: each outcome is one Redis transaction.

Every outcome writes the job record, acknowledges and deletes the entry, and, as the case
may be, queues the next stage (or the same stage again, elsewhere), records metrics and
per-version counters, enqueues verification, and publishes the finished job. A job that is
already final when its entry ends (cancelled while running) is only acknowledged: whoever
made it final has counted it.
"""

from __future__ import annotations

from collections.abc import Callable

import redis.asyncio as aioredis
from PIL import Image

from controlplane import keys, route_counters
from controlplane.jobs import ImageRef, Job, JobStatus, StageRecord, StageStatus, utc_now
from controlplane.metrics_store import record_job_outcome, record_spend, record_stage_times
from controlplane.stage_messages import add_event, enqueue_stage
from controlplane.version_stats import record_stage
from engines.lanes import Entry

Change = Callable[[Job], list[int]]
"""Mutates the job; returns the stage indexes to queue in the same transaction."""


class Outcomes:
    def __init__(self, redis: aioredis.Redis, *, job_ttl_s: int) -> None:
        self.redis = redis
        self.job_ttl_s = job_ttl_s

    async def commit(self, entry: Entry, change: Change, *, event: str,
                     **event_data: object) -> Job | None:
        """Apply ``change`` and end ``entry`` atomically; None when the job was already final."""
        key = keys.job(entry.message.job_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    job = Job.model_validate_json(raw) if raw is not None else None
                    pipe.multi()
                    _end_entry(pipe, entry)
                    if job is None or job.status.is_final:
                        await pipe.execute()
                        return None
                    to_queue = change(job)
                    for stage in to_queue:
                        enqueue_stage(pipe, job, stage)
                    pipe.set(key, job.model_dump_json(), ex=self.job_ttl_s)
                    add_event(pipe, job.id, event, stage=entry.message.stage, **event_data)
                    self._record(pipe, job, job.stages[entry.message.stage])
                    await pipe.execute()
                    return job
                except aioredis.WatchError:
                    continue

    def _record(self, pipe: aioredis.client.Pipeline, job: Job, stage: StageRecord) -> None:
        if stage.status in (StageStatus.completed, StageStatus.failed):
            record_stage(pipe, stage, ok=stage.status is StageStatus.completed)
            record_stage_times(pipe, engine=stage.engine, version=stage.model_version or "",
                               queued_ms=stage.queued_ms, run_ms=stage.run_ms)
            record_spend(pipe, engine=stage.engine, cost=stage.cost or 0.0)
        if job.status.is_final:
            route_counters.on_finish(pipe, job.route)
            record_job_outcome(pipe, route=job.route, status=job.status.value)
            add_event(pipe, job.id, job.status.value, status=job.status.value,
                      error=job.error)
            pipe.publish(keys.JOB_DONE_CHANNEL, job.model_dump_json())
        if job.status is JobStatus.completed and job.verification.get("status") == "pending":
            pipe.xadd(keys.VERIFY_STREAM, {"job": job.id})

    async def acknowledge(self, entry: Entry) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            _end_entry(pipe, entry)
            await pipe.execute()

    async def complete(self, entry: Entry, images: list[Image.Image], *, run_ms: int,
                       batch_size: int, cost: float | None, verify: bool) -> Job | None:
        index = entry.message.stage

        def change(job: Job) -> list[int]:
            record = job.stages[index]
            record.status = StageStatus.completed
            record.run_ms, record.batch_size, record.cost = run_ms, batch_size, cost
            record.finished_at = utc_now()
            if index < len(job.stages) - 1:
                return [index + 1]
            job.images = [
                ImageRef(index=i, url=f"/v1/jobs/{job.id}/images/{i}", width=im.width,
                         height=im.height, seed=job.request.seed + i)
                for i, im in enumerate(images)
            ]
            if verify:
                job.verification = {"status": "pending"}
            job.transition(JobStatus.completed)
            return []

        return await self.commit(entry, change, event="stage_completed", run_ms=run_ms,
                                 batch_size=batch_size)

    async def fail(self, entry: Entry, error: str, *, run_ms: int | None = None) -> Job | None:
        index = entry.message.stage

        def change(job: Job) -> list[int]:
            record = job.stages[index]
            record.status, record.error, record.run_ms = StageStatus.failed, error, run_ms
            record.finished_at = utc_now()
            job.error = f"stage {index} ({record.engine}) failed: {error}"
            job.transition(JobStatus.failed)
            return []

        return await self.commit(entry, change, event="stage_failed", error=error)

    async def dead_letter(self, entry: Entry, cause: str) -> Job | None:
        """Fail the job for good and keep the entry in the dead-letter stream."""
        job = await self.fail(entry, cause)
        await self.redis.xadd(keys.dead_letter_stream(), {
            "job": entry.message.job_id, "stage": str(entry.message.stage),
            "stream": entry.stream, "entry_id": entry.entry_id, "cause": cause,
            "failed_at": utc_now()})
        return job

    async def hand_back(self, entry: Entry, reason: str) -> Job | None:
        """Queue the stage again (same lane) for another worker; the job stays accepted."""
        index = entry.message.stage

        def change(job: Job) -> list[int]:
            record = job.stages[index]
            record.status, record.worker = StageStatus.queued, None
            record.error = f"handed back: {reason}"
            if index == 0:
                job.transition(JobStatus.queued)
            return [index]

        return await self.commit(entry, change, event="requeued", reason=reason)

    async def reroute(self, entry: Entry, *, engine: str, model: str | None,
                      model_version: str | None, reason: str) -> Job | None:
        """Move the stage to a fallback engine's lane, recording where it came from."""
        index = entry.message.stage

        def change(job: Job) -> list[int]:
            record = job.stages[index]
            job.stages[index] = StageRecord(
                engine=engine, model=model, model_version=model_version,
                attempts=record.attempts, fallback_from=record.engine,
                error=f"{record.engine}: {reason}")
            return [index]

        return await self.commit(entry, change, event="rerouted", engine=engine,
                                 reason=reason)


def _end_entry(pipe: aioredis.client.Pipeline, entry: Entry) -> None:
    pipe.xack(entry.stream, keys.ENGINE_GROUP, entry.entry_id)
    pipe.xdel(entry.stream, entry.entry_id)


def describe(exc: BaseException) -> str:
    """An error's text for the job record (never a traceback)."""
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}" if not text.startswith(type(exc).__name__) else text

