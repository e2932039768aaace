"""Stage messages on the engine streams: what goes in an entry and how it is added.

An entry names the job and the stage to run; everything else is read from the job record.
Entries are deleted once acknowledged, so a stream's length is its lane's depth.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from redis.asyncio.client import Pipeline
from redis.typing import EncodableT, FieldT

from controlplane import keys
from controlplane.jobs import Job, StageStatus, event_fields, now_ms

EVENTS_TTL_S = 7 * 24 * 3600


@dataclass(frozen=True)
class StageMessage:
    job_id: str
    stage: int
    trace: dict[str, str]
    enqueued_ms: int

    def fields(self) -> dict[FieldT, EncodableT]:
        return {"job": self.job_id, "stage": str(self.stage), "trace": json.dumps(self.trace),
                "enqueued_ms": str(self.enqueued_ms)}

    @classmethod
    def parse(cls, fields: dict[bytes, bytes]) -> StageMessage:
        return cls(
            job_id=fields[b"job"].decode(),
            stage=int(fields[b"stage"]),
            trace=json.loads(fields.get(b"trace", b"{}")),
            enqueued_ms=int(fields.get(b"enqueued_ms", b"0")),
        )


def stage_stream(job: Job, stage: int) -> str:
    return keys.engine_stream(job.stages[stage].engine, job.request.tier)


def enqueue_stage(pipe: Pipeline, job: Job, stage: int) -> StageMessage:
    """Queue ``job``'s stage ``stage`` on its engine's lane (inside the caller's pipeline).

    Marks the stage queued on ``job``; the caller writes the job in the same transaction.
    """
    message = StageMessage(job.id, stage, job.trace_context, now_ms())
    job.stages[stage].status = StageStatus.queued
    job.stages[stage].enqueued_at_ms = message.enqueued_ms
    pipe.xadd(stage_stream(job, stage), message.fields())
    return message


def add_event(pipe: Pipeline, job_id: str, kind: str, **data: object) -> None:
    pipe.xadd(keys.job_events(job_id), event_fields(kind, **data))
    pipe.expire(keys.job_events(job_id), EVENTS_TTL_S)
