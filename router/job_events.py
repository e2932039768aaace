"""A job's events as Server-Sent Events (``GET /v1/jobs/{id}/events``).

The job's events stream (``keys.job_events``) holds its whole history, so a client first
gets a ``state`` event with the job as it is now, then every event from the start (or
after ``Last-Event-ID`` when it reconnects) read with one XRANGE, each with its stream id
as the SSE id, then new ones as the process's one reader hands them out
(``router/event_fanout.py``). The response ends after the job's final event (``completed``,
``failed``, ``cancelled``) once the job is final — unless its verification is pending, then
after ``verified`` or ``VERIFIED_WAIT_S``, whichever comes first. A job regenerated after a
failed verification goes on, so its stream continues. A job already final (verdict in) when
the client connects ends after its backlog, final event or not (it expired, or lies before
``Last-Event-ID``). An idle stream costs no Redis command: it gets a keep-alive comment every
``KEEPALIVE_S``. A stream open for ``max_duration_s`` ends with an SSE ``retry`` field: the
client reconnects with ``Last-Event-ID`` and resumes.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
from litestar.response import ServerSentEventMessage

from controlplane import keys
from controlplane.errors import ClientError, FieldError
from controlplane.jobs import Job, JobStore
from router.event_fanout import EventFanout, StreamEvent, Subscription, id_order

FINAL_EVENTS = frozenset({"completed", "failed", "cancelled"})
VERIFIED_WAIT_S = 120.0
#: an idle stream gets a comment this often, so proxies keep the connection open
KEEPALIVE_S = 2.0
KEEPALIVE_COMMENT = "keep-alive"
#: the reconnection delay a stream at its maximum duration gives its client
RECONNECT_MS = 1000
#: a stream entry id, as the events' SSE ids are: milliseconds and a sequence number
_STREAM_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
_MAX_ID_PART = 2**64 - 1


def check_last_event_id(value: str | None) -> None:
    """400 naming the header unless ``value`` is absent, empty or a stream entry id such
    as ``1712345678901-0`` (what Redis would refuse mid-stream)."""
    if not value:
        return
    if _STREAM_ID.fullmatch(value) is None or any(
            int(part) > _MAX_ID_PART for part in value.split("-")):
        reason = "must be an event id this stream sent, such as 1712345678901-0"
        raise ClientError(f"Last-Event-ID: {reason}",
                          details=[FieldError("Last-Event-ID", reason, value)])


async def job_event_messages(redis: aioredis.Redis, jobs: JobStore, job_id: str, *,
                             last_event_id: str | None = None,
                             verified_wait_s: float = VERIFIED_WAIT_S,
                             fanout: EventFanout | None = None,
                             ) -> AsyncIterator[ServerSentEventMessage]:
    """The SSE messages of one job; raises NotFound before the first one if it is unknown.

    Without ``fanout`` (scripts, tests) the stream is read by a reader of its own.
    """
    job = await jobs.get(job_id)
    return event_messages(fanout or EventFanout(redis), jobs, job,
                          last_event_id=last_event_id, verified_wait_s=verified_wait_s)


def event_messages(fanout: EventFanout, jobs: JobStore, job: Job, *,
                   tenant: str | None = None, last_event_id: str | None = None,
                   verified_wait_s: float = VERIFIED_WAIT_S,
                   max_duration_s: float | None = None,
                   public: Callable[[Job], Any] = Job.public,
                   ) -> AsyncIterator[ServerSentEventMessage]:
    """The SSE messages of ``job`` (as read now): raises ClientError (400) for a malformed
    ``Last-Event-ID`` and TooManyStreams at a cap of ``fanout``, before the first one."""
    check_last_event_id(last_event_id)
    subscription = fanout.open(job.id, tenant=tenant)
    messages = _messages(fanout, subscription, jobs, job, public(job), last_event_id or "0",
                         verified_wait_s, max_duration_s)
    # a response that never starts its body never runs the generator's `finally`
    weakref.finalize(messages, fanout.close, subscription).atexit = False
    return messages


async def _messages(fanout: EventFanout, subscription: Subscription, jobs: JobStore,
                    job: Job, state: Any, cursor: str, verified_wait_s: float,
                    max_duration_s: float | None) -> AsyncIterator[ServerSentEventMessage]:
    job_id = subscription.job_id
    deadline = time.monotonic() + max_duration_s if max_duration_s is not None else None
    try:
        yield ServerSentEventMessage(data=json.dumps(state), event="state")
        events = await _read_range(fanout.redis, job_id, after=cursor)
        fanout.follow(subscription, after=events[-1].id if events else cursor)
        ended_at: float | None = None  # when the final event arrived, verification pending
        backlog = True
        quiet_since = time.monotonic()
        while True:
            kind = ""
            for event in events:
                if id_order(event.id) <= id_order(cursor):
                    continue  # read with the backlog already
                cursor, kind = event.id, event.kind
                if kind not in FINAL_EVENTS and kind != "verified":
                    ended_at = None  # running (again, after a failed verification)
                yield ServerSentEventMessage(data=event.data, event=kind, id=cursor)
                quiet_since = time.monotonic()
            if kind in FINAL_EVENTS or kind == "verified":
                job = await jobs.get(job_id)
                if not job.status.is_final:  # regenerated after a failed verification
                    ended_at = None
                elif kind == "verified" or not job.verification.pending:
                    return
                elif ended_at is None:
                    ended_at = time.monotonic()
            elif backlog and job.status.is_final:
                # its final event lies before Last-Event-ID, or expired with the stream
                if not job.verification.pending:
                    return  # a final job's record and events no longer change
                ended_at = time.monotonic()
            backlog, events = False, []
            now = time.monotonic()
            if ended_at is not None and now - ended_at > verified_wait_s:
                return
            if deadline is not None and now >= deadline:
                yield ServerSentEventMessage(
                    data=None, retry=RECONNECT_MS,
                    comment="maximum stream duration; reconnect with Last-Event-ID")
                return
            wait_s = quiet_since + KEEPALIVE_S - now
            if ended_at is not None:
                wait_s = min(wait_s, ended_at + verified_wait_s - now)
            if deadline is not None:
                wait_s = min(wait_s, deadline - now)
            try:
                async with asyncio.timeout(max(wait_s, 0)):
                    batch = await subscription.queue.get()
            except TimeoutError:
                if time.monotonic() - quiet_since >= KEEPALIVE_S:
                    yield ServerSentEventMessage(comment=KEEPALIVE_COMMENT)
                    quiet_since = time.monotonic()
                continue  # the bounds are checked above
            events = batch.events
            if id_order(batch.after) > id_order(cursor):  # read before this client followed
                events = await _read_range(fanout.redis, job_id, after=cursor,
                                           until=batch.after) + events
    finally:
        fanout.close(subscription)


async def _read_range(redis: aioredis.Redis, job_id: str, *, after: str,
                      until: str = "+") -> list[StreamEvent]:
    """The job's events after ``after`` (exclusive) up to ``until`` (inclusive)."""
    start = "-" if id_order(after) == (0, 0) else f"({after}"
    entries: Any = await redis.xrange(keys.job_events(job_id), min=start, max=until)
    return [StreamEvent.decode(entry_id, fields) for entry_id, fields in entries]
