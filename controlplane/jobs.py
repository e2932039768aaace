"""Job and stage records: the models, their status state machines, and reading them.

Records change only through ``controlplane.transitions`` (one atomic script per change);
``Job.transition`` and ``StageRecord.transition`` check a change against the tables here
on the copy a transition plans with.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel, Field
from redis.typing import EncodableT, FieldT

from controlplane import keys
from controlplane.errors import InternalError, NotFound
from controlplane.verification import JobVerification, VerificationStatus


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


#: allowed stage status changes (``running -> running``: started again by a worker that
#: claimed it from a silent one; ``running -> queued``: handed back or moved to a
#: fallback; ``completed -> pending``: the job is regenerated with a new seed)
STAGE_TRANSITIONS: dict[StageStatus, frozenset[StageStatus]] = {
    StageStatus.pending: frozenset({StageStatus.queued, StageStatus.cancelled}),
    StageStatus.queued: frozenset(
        {StageStatus.queued, StageStatus.running, StageStatus.failed, StageStatus.cancelled}),
    StageStatus.running: frozenset(
        {StageStatus.running, StageStatus.queued, StageStatus.completed, StageStatus.failed,
         StageStatus.cancelled}),
    StageStatus.completed: frozenset({StageStatus.pending}),
    StageStatus.failed: frozenset(),
    StageStatus.cancelled: frozenset(),
}


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

    def transition(self, to: StageStatus) -> None:
        """Apply a status change allowed by STAGE_TRANSITIONS (raise on any other)."""
        if to not in STAGE_TRANSITIONS[self.status]:
            raise InternalError(f"stage {self.engine}: illegal transition {self.status} -> {to}")
        self.status = to


class ImageRef(BaseModel):
    index: int
    url: str
    width: int
    height: int
    seed: int


class Job(BaseModel):
    #: bumped by every transition; first, so the transition script finds it at the start
    rev: int = 0
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
    verification: JobVerification = Field(
        default_factory=lambda: JobVerification(status=VerificationStatus.skipped))
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
            mode="json",
            exclude={"rev", "request", "current_stage", "trace_context", "deadline_ms"})
        body["verification"] = self.verification.public()
        for stage in body["stages"]:
            stage.pop("enqueued_at_ms", None)
        costs = [s.cost for s in self.stages if s.cost is not None]
        body["cost"] = round(sum(costs), 6) if costs else None
        body["tier"] = self.request.tier
        body["seed"] = self.request.seed
        body["metadata"] = self.request.metadata
        return body


class JobStore:
    """Reads job records (JSON strings in Redis); ``controlplane.transitions`` writes them."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def get(self, job_id: str) -> Job:
        raw = await self.redis.get(keys.job(job_id))
        if raw is None:
            raise NotFound(f"job {job_id!r} does not exist", details=[])
        return Job.model_validate_json(raw)

    async def recent(self, *, limit_n: int) -> list[Job]:
        """The newest ``limit_n`` accepted jobs, newest first (``lw:recent-jobs``, written
        by the accept transition); jobs whose records have expired are left out."""
        entries: list[tuple[bytes, dict[bytes, bytes]]] = await self.redis.xrevrange(
            keys.recent_jobs(), count=limit_n)  # type: ignore[assignment]
        if not entries:
            return []
        rows = await self.redis.mget([keys.job(fields[b"job"].decode())
                                      for _id, fields in entries])
        return [Job.model_validate_json(raw) for raw in rows if raw is not None]


@dataclass(frozen=True)
class Event:
    """One entry of a job's events stream; ``ts`` is taken where the event happens."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    ts: str = field(default_factory=utc_now)

    def encoded(self) -> list[str]:
        return [self.kind, json.dumps(self.data, separators=(",", ":")), self.ts]

    def fields(self) -> dict[FieldT, EncodableT]:
        kind, data, ts = self.encoded()
        return {"kind": kind, "data": data, "ts": ts}
