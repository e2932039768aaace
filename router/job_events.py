"""A job's events as Server-Sent Events (``GET /v1/jobs/{id}/events``).

The job's events stream (``keys.job_events``) holds its whole history, so a client first
gets a ``state`` event with the job as it is now, then every event from the start (or
after ``Last-Event-ID`` when it reconnects), each with its stream id as the SSE id, then
new ones as they come (XREAD BLOCK). The response ends after the job's final event
(``completed``, ``failed``, ``cancelled``) once the job is final — unless its verification
is pending, then after ``verified`` or ``VERIFIED_WAIT_S``, whichever comes first. A job
regenerated after a failed verification goes on, so its stream continues.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
from litestar.response import ServerSentEventMessage

from controlplane import keys
from controlplane.jobs import Job, JobStore

FINAL_EVENTS = frozenset({"completed", "failed", "cancelled"})
#: the API gives the client of these reads a reply timeout of this plus its usual one
READ_BLOCK_MS = 2000
VERIFIED_WAIT_S = 120.0
#: an idle stream gets a comment this often, so proxies keep the connection open
KEEPALIVE_COMMENT = "keep-alive"


async def job_event_messages(redis: aioredis.Redis, jobs: JobStore, job_id: str, *,
                             last_event_id: str | None = None,
                             verified_wait_s: float = VERIFIED_WAIT_S,
                             public: Callable[[Job], dict[str, Any]] = Job.public,
                             ) -> AsyncIterator[ServerSentEventMessage]:
    """The SSE messages of one job; raises NotFound before the first one if it is unknown.
    ``public`` makes the ``state`` event's body (the API's presigns image URLs)."""
    job = await jobs.get(job_id)
    return _messages(redis, jobs, job_id, public(job), last_event_id, verified_wait_s)


async def _messages(redis: aioredis.Redis, jobs: JobStore, job_id: str, state: dict[str, Any],
                    last_event_id: str | None, verified_wait_s: float
                    ) -> AsyncIterator[ServerSentEventMessage]:
    yield ServerSentEventMessage(data=json.dumps(state), event="state")
    stream = keys.job_events(job_id)
    cursor = last_event_id or "0"
    ended_at: float | None = None  # when the final event arrived, with verification pending
    while True:
        if ended_at is not None and time.monotonic() - ended_at > verified_wait_s:
            return
        reply: Any = await redis.xread({stream: cursor}, count=100, block=READ_BLOCK_MS)
        if not reply:
            if ended_at is None and (await jobs.get(job_id)).status.is_final:
                return  # the final event expired from the stream; nothing more will come
            yield ServerSentEventMessage(comment=KEEPALIVE_COMMENT)
            continue
        kind = ""
        for entry_id, fields in reply[0][1]:
            cursor = entry_id.decode()
            kind = fields[b"kind"].decode()
            data = json.loads(fields[b"data"])
            data["ts"] = fields[b"ts"].decode()
            yield ServerSentEventMessage(data=json.dumps(data), event=kind, id=cursor)
        if kind in FINAL_EVENTS or kind == "verified":
            job = await jobs.get(job_id)
            if not job.status.is_final:  # regenerated after a failed verification
                ended_at = None
            elif kind == "verified" or not job.verification.pending:
                return
            elif ended_at is None:
                ended_at = time.monotonic()
