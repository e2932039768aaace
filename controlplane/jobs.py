"""Job and stage records: the models, the status state machine, and their store in Redis."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel, Field
from redis.asyncio.client import Pipeline
from redis.typing import EncodableT, FieldT

from controlplane import keys
from controlplane.errors import InternalError, NotFound


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_ms() -> int:
    return int(time.time() * 1000)


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({JobStatus.completed, JobStatus.failed, JobStatus.cancelled})

#: allowed job status changes; everything else is a bug and raises
JOB_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.queued: frozenset({JobStatus.running, JobStatus.failed, JobStatus.cancelled}),
    JobStatus.running: frozenset(
        {JobStatus.running, JobStatus.queued, JobStatus.completed, JobStatus.failed,
         JobStatus.cancelled}
    ),
    # only the verifier's regenerate-on-fail re-queues a completed job (new seed)
    JobStatus.completed: frozenset({JobStatus.queued}),
    JobStatus.failed: frozenset(),
    JobStatus.cancelled: frozenset(),
}


class StageStatus(StrEnum):
    pending = "pending"
    queued = "queued"
    running = "running"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"


class LoraRequest(BaseModel):
    id: str
    version: str = ""
    scale: float = 1.0


class JobRequest(BaseModel):
    """The normalised request a job was accepted with (images stored as artifacts)."""

    prompt: str
    negative_prompt: str | None = None
    width: int
    height: int
    n: int = 1
    seed: int
    mode: str = "txt2img"
    strength: float | None = None
    lora: LoraRequest | None = None
    text: list[str] = Field(default_factory=list)
    tier: str
    tenant: str = "default"
    metadata: dict[str, Any] = Field(default_factory=dict)
    has_image: bool = False
    has_mask: bool = False


class StageRecord(BaseModel):
    engine: str
    model: str | None = None
    model_version: str | None = None
    status: StageStatus = StageStatus.pending
    worker: str | None = None
    attempts: int = 0
    queued_ms: int | None = None
    run_ms: int | None = None
    batch_size: int | None = None
    steps: int | None = None
    started_at: str | None = None
    finished_at: str | None = None
    enqueued_at_ms: int | None = None
    error: str | None = None
    fallback_from: str | None = None
    cost: float | None = None


class ImageRef(BaseModel):
    index: int
    url: str
    width: int
    height: int
    seed: int


class Job(BaseModel):
    id: str
    status: JobStatus = JobStatus.queued
    intent: str
    route: str
    degraded_from: str | None = None
    policy_version: str
    request: JobRequest
    stages: list[StageRecord]
    current_stage: int = 0
    images: list[ImageRef] = Field(default_factory=list)
    verification: dict[str, Any] = Field(default_factory=lambda: {"status": "skipped"})
    error: str | None = None
    trace_id: str | None = None
    trace_context: dict[str, str] = Field(default_factory=dict)
    deadline_ms: int | None = None
    created_at: str = Field(default_factory=utc_now)
    completed_at: str | None = None

    def transition(self, to: JobStatus) -> None:
        """Apply a status change allowed by JOB_TRANSITIONS (raise on any other)."""
        if to not in JOB_TRANSITIONS[self.status]:
            raise InternalError(f"job {self.id}: illegal transition {self.status} -> {to}")
        self.status = to
        if to.is_final:
            self.completed_at = utc_now()

    def public(self) -> dict[str, Any]:
        """The job as clients see it (CONTRACT.md), without internal bookkeeping."""
        body = self.model_dump(
            mode="json", exclude={"request", "current_stage", "trace_context", "deadline_ms"}
        )
        for stage in body["stages"]:
            stage.pop("enqueued_at_ms", None)
        costs = [s.cost for s in self.stages if s.cost is not None]
        body["cost"] = round(sum(costs), 6) if costs else None
        body["tier"] = self.request.tier
        body["seed"] = self.request.seed
        body["metadata"] = self.request.metadata
        return body


class JobStore:
    """Job records as JSON strings in Redis, with optimistic updates."""

    def __init__(self, redis: aioredis.Redis, *, ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s

    async def get(self, job_id: str) -> Job:
        raw = await self.redis.get(keys.job(job_id))
        if raw is None:
            raise NotFound(f"job {job_id!r} does not exist", details=[])
        return Job.model_validate_json(raw)

    async def update(self, job_id: str, change: Callable[[Job], None], *,
                     also: Callable[[Pipeline, Job], None] | None = None) -> Job:
        """Read, change and write a job atomically (WATCH/MULTI, retried on conflict).

        ``also`` adds commands (events, counters) to the same transaction.
        """
        key = keys.job(job_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if raw is None:
                        raise NotFound(f"job {job_id!r} does not exist")
                    job = Job.model_validate_json(raw)
                    change(job)
                    pipe.multi()
                    pipe.set(key, job.model_dump_json(), ex=self.ttl_s)
                    if also is not None:
                        also(pipe, job)
                    await pipe.execute()
                    return job
                except aioredis.WatchError:
                    continue


def event_fields(kind: str, **data: Any) -> dict[FieldT, EncodableT]:
    """A job event as stream fields: ``kind`` plus a JSON body."""
    return {"kind": kind, "data": json.dumps(data, separators=(",", ":")), "ts": utc_now()}
