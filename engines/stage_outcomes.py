"""How a stage entry ends: each outcome is one transition (``controlplane.transitions``).

Every outcome writes the job record, acknowledges and deletes the entry, and, as the case
may be, queues the next stage (or the same stage again, elsewhere), records metrics and
per-version counters, enqueues verification, and publishes the finished job. Outcomes are
named by stage and attempt: a worker whose entry was taken over (the stage was started
again elsewhere) or whose job ended meanwhile (cancelled while running) changes nothing
and only acknowledges its entry, since whoever made the job final has counted it.
"""

from __future__ import annotations

from collections.abc import Callable

import redis.asyncio as aioredis
from PIL import Image

from controlplane import keys
from controlplane.errors import NotFound
from controlplane.jobs import Event, ImageRef, Job, JobStatus, StageRecord, StageStatus, utc_now
from controlplane.metrics_store import record_spend, record_stage_times
from controlplane.transitions import Change, Transitions
from controlplane.verification import VerificationStatus
from controlplane.version_stats import record_stage
from engines.lanes import Entry

RUNNING = frozenset({StageStatus.running})
#: a stage failed before this worker started it: queued, or left running by a dead worker
UNSTARTED = frozenset({StageStatus.queued, StageStatus.running})
#: entries kept in the dead-letter stream (approximately: MAXLEN ~)
DEAD_LETTER_MAXLEN = 10_000

Edit = Callable[[Job, StageRecord, Change], None]
"""Changes the job (and its stage's record) on the plan's copy."""


class Outcomes:
    def __init__(self, redis: aioredis.Redis, *, job_ttl_s: int) -> None:
        self.redis = redis
        self.transitions = Transitions(redis, job_ttl_s=job_ttl_s)

    async def commit(self, entry: Entry, job: Job, attempt: int, name: str, edit: Edit, *,
                     events: list[Event] | None = None,
                     from_statuses: frozenset[StageStatus] = RUNNING, event: str,
                     **event_data: object) -> Job | None:
        """End ``entry`` with ``edit`` applied to its stage (``attempt``, in one of
        ``from_statuses``); None when the stage is no longer this attempt's (taken over, or
        the job ended), after acknowledging the entry."""
        index = entry.message.stage

        def plan(current: Job) -> Change | None:
            record = current.stages[index]
            if (current.status.is_final or record.status not in from_statuses
                    or record.attempts != attempt):
                return None
            change = Change(current, events=list(events or []))
            end_entry(change, entry)
            change.event(event, stage=index, **event_data)
            edit(current, record, change)
            _record(change, record)
            return change

        try:
            applied = await self.transitions.apply(job, f"{name}:{index}:{attempt}", plan)
        except NotFound:  # the record expired: nothing is left to change
            applied = None
        if applied is None or not applied.changed:
            await self.acknowledge(entry)
            return None
        return applied.job

    async def acknowledge(self, entry: Entry) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(entry.stream, keys.ENGINE_GROUP, entry.entry_id)
            pipe.xdel(entry.stream, entry.entry_id)
            await pipe.execute()

    async def complete(self, entry: Entry, job: Job, attempt: int, images: list[Image.Image],
                       *, run_ms: int, batch_size: int, cost: float | None, verify: bool,
                       progress: list[Event] | None = None) -> Job | None:
        def edit(current: Job, record: StageRecord, change: Change) -> None:
            record.transition(StageStatus.completed)
            record.run_ms, record.batch_size, record.cost = run_ms, batch_size, cost
            record.finished_at = utc_now()
            index = entry.message.stage
            if index < len(current.stages) - 1:
                change.enqueue(index + 1)
                return
            current.images = [
                ImageRef(index=i, url=f"/v1/jobs/{current.id}/images/{i}", width=im.width,
                         height=im.height, seed=current.request.seed + i)
                for i, im in enumerate(images)
            ]
            if verify:
                current.verification = current.verification.model_copy(
                    update={"status": VerificationStatus.pending})
                change.effects.xadd(keys.VERIFY_STREAM, {"job": current.id})
            change.finish(JobStatus.completed)

        return await self.commit(entry, job, attempt, "complete", edit, events=progress,
                                 event="stage_completed", run_ms=run_ms,
                                 batch_size=batch_size)

    async def fail(self, entry: Entry, job: Job, attempt: int, error: str, *,
                   run_ms: int | None = None, dead_letter: bool = False,
                   started: bool = True, progress: list[Event] | None = None) -> Job | None:
        """Fail the stage and the job; with ``dead_letter`` keep the entry for inspection;
        ``started=False`` for a stage that fails before this worker starts it."""
        def edit(current: Job, record: StageRecord, change: Change) -> None:
            record.transition(StageStatus.failed)
            record.error, record.run_ms = error, run_ms
            record.finished_at = utc_now()
            current.error = f"stage {entry.message.stage} ({record.engine}) failed: {error}"
            if dead_letter:
                change.effects.xadd(keys.dead_letter_stream(), {
                    "job": current.id, "stage": str(entry.message.stage),
                    "stream": entry.stream, "entry_id": entry.entry_id.decode(),
                    "cause": error, "failed_at": utc_now()}, maxlen=DEAD_LETTER_MAXLEN)
            change.finish(JobStatus.failed)

        return await self.commit(entry, job, attempt, "fail", edit, events=progress,
                                 event="stage_failed",
                                 from_statuses=RUNNING if started else UNSTARTED, error=error)

    async def hand_back(self, entry: Entry, job: Job, attempt: int,
                        reason: str) -> Job | None:
        """Queue the stage again (same lane) for another worker; the job stays accepted."""
        def edit(current: Job, record: StageRecord, change: Change) -> None:
            record.worker, record.error = None, f"handed back: {reason}"
            if entry.message.stage == 0:
                current.transition(JobStatus.queued)
            change.enqueue(entry.message.stage)

        return await self.commit(entry, job, attempt, "hand-back", edit, event="requeued",
                                 reason=reason)

    async def reroute(self, entry: Entry, job: Job, attempt: int, *, engine: str,
                      model: str | None, model_version: str | None,
                      reason: str) -> Job | None:
        """Move the stage to a fallback engine's lane, recording where it came from."""
        def edit(current: Job, record: StageRecord, change: Change) -> None:
            index = entry.message.stage
            current.stages[index] = StageRecord(
                engine=engine, model=model, model_version=model_version,
                attempts=record.attempts, fallback_from=record.engine,
                error=f"{record.engine}: {reason}")
            change.enqueue(index)

        return await self.commit(entry, job, attempt, "reroute", edit, event="rerouted",
                                 engine=engine, reason=reason)


def end_entry(change: Change, entry: Entry) -> None:
    change.effects.xack(entry.stream, keys.ENGINE_GROUP, entry.entry_id)
    change.effects.xdel(entry.stream, entry.entry_id)


def _record(change: Change, stage: StageRecord) -> None:
    """Per-version counters and stage metrics of a stage that ended."""
    if stage.status in (StageStatus.completed, StageStatus.failed):
        record_stage(change.effects, stage, ok=stage.status is StageStatus.completed)
        record_stage_times(change.effects, engine=stage.engine,
                           version=stage.model_version or "", queued_ms=stage.queued_ms,
                           run_ms=stage.run_ms)
        record_spend(change.effects, engine=stage.engine, cost=stage.cost or 0.0)


def describe(exc: BaseException) -> str:
    """An error's text for the job record (never a traceback)."""
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}" if not text.startswith(type(exc).__name__) else text
