"""One reader of job event streams per API process, fanning entries out to its SSE clients.

Each SSE client of ``GET /v1/jobs/{id}/events`` opens a :class:`Subscription` here and is
handed batches on an asyncio queue; no client holds a Redis connection. One task reads the
events streams (``keys.job_events``) of every job that has clients with a single XREAD
BLOCK of ``BLOCK_MS``: short, so a job that gains its first client is in the next read
without interrupting the current one (an interrupted reply would cost the connection). The
task runs only while there are subscriptions::

    fanout = EventFanout(redis, max_streams=1000, max_streams_per_tenant=100)
    subscription = fanout.open(job_id, tenant="acme")   # TooManyStreams beyond a cap
    ...                                                 # read the backlog (XRANGE)
    fanout.follow(subscription, after=last_id)          # read live from there on
    batch = await subscription.queue.get()
    fanout.close(subscription)

Batches of one job are contiguous: each says after which id it was read (``after``), so a
client whose backlog ends before that id reads the gap itself (``router/job_events.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from controlplane import keys
from controlplane.errors import TooManyStreams

log = logging.getLogger(__name__)

#: the reader's XREAD BLOCK: the longest a job that gains its first client waits to be read
BLOCK_MS = 100
#: entries per stream and read
READ_COUNT = 100
#: what a client refused by a cap is told to wait; a slot frees whenever any stream ends
STREAMS_RETRY_AFTER_S = 5
RETRY_FIRST_S = 0.1
RETRY_MAX_S = 5.0


def id_order(entry_id: str) -> tuple[int, int]:
    """A stream id as a sortable pair: ``"1700000000000-3"`` → ``(1700000000000, 3)``."""
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)


@dataclass(frozen=True)
class StreamEvent:
    """One entry of a job's events stream, decoded once for all its clients."""

    id: str
    kind: str
    #: the event's data as JSON, with the entry's ``ts`` added
    data: str

    @classmethod
    def decode(cls, entry_id: bytes, fields: dict[bytes, bytes]) -> StreamEvent:
        data = json.loads(fields[b"data"])
        data["ts"] = fields[b"ts"].decode()
        return cls(entry_id.decode(), fields[b"kind"].decode(), json.dumps(data))


@dataclass(frozen=True)
class Batch:
    """Entries of one job read after ``after`` (exclusive), in stream order."""

    after: str
    events: list[StreamEvent]


@dataclass(eq=False)
class Subscription:
    """One SSE client's place in the fan-out."""

    job_id: str
    #: counted against the per-tenant cap; None when the policy has no tenants
    tenant: str | None
    #: unbounded: a job's events are bounded by its life, and the client reads them all
    queue: asyncio.Queue[Batch] = field(default_factory=asyncio.Queue)
    closed: bool = False


@dataclass(eq=False)
class _Job:
    subscriptions: set[Subscription] = field(default_factory=set)
    #: the last id read; None until a client has read its backlog and asked to follow
    cursor: str | None = None


class EventFanout:
    """The event streams of the jobs this process's SSE clients watch, read by one task."""

    def __init__(self, redis: aioredis.Redis, *, max_streams: int | None = None,
                 max_streams_per_tenant: int | None = None, block_ms: int = BLOCK_MS) -> None:
        self.redis = redis
        self.max_streams = max_streams
        self.max_streams_per_tenant = max_streams_per_tenant
        self.block_ms = block_ms
        self._jobs: dict[str, _Job] = {}
        self._open = 0
        self._by_tenant: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    @property
    def open_streams(self) -> int:
        return self._open

    def open(self, job_id: str, *, tenant: str | None = None) -> Subscription:
        """A new client of ``job_id``'s events; raises TooManyStreams at a cap."""
        if self.max_streams is not None and self._open >= self.max_streams:
            raise TooManyStreams(
                f"this API process has {self._open} open event streams, the most it "
                f"allows (LANEWAY_SSE_MAX_STREAMS={self.max_streams})",
                retry_after_s=STREAMS_RETRY_AFTER_S)
        if (tenant is not None and self.max_streams_per_tenant is not None
                and self._by_tenant[tenant] >= self.max_streams_per_tenant):
            raise TooManyStreams(
                f"tenant {tenant!r} has {self._by_tenant[tenant]} open event streams on "
                f"this API process, the most it allows "
                f"(LANEWAY_SSE_MAX_STREAMS_PER_TENANT={self.max_streams_per_tenant})",
                retry_after_s=STREAMS_RETRY_AFTER_S)
        subscription = Subscription(job_id, tenant)
        self._jobs.setdefault(job_id, _Job()).subscriptions.add(subscription)
        self._open += 1
        if tenant is not None:
            self._by_tenant[tenant] += 1
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._read_loop(), name="sse-fanout")
        return subscription

    def follow(self, subscription: Subscription, *, after: str) -> None:
        """Read the job live from ``after`` on, unless another client made it read already
        (then the batches say where they start, and the client reads the gap)."""
        job = self._jobs.get(subscription.job_id)
        if job is not None and job.cursor is None:
            job.cursor = after
            self._wake.set()

    def close(self, subscription: Subscription) -> None:
        """The client is gone; idempotent."""
        if subscription.closed:
            return
        subscription.closed = True
        self._open -= 1
        if subscription.tenant is not None:
            self._by_tenant[subscription.tenant] -= 1
            if not self._by_tenant[subscription.tenant]:
                del self._by_tenant[subscription.tenant]
        job = self._jobs.get(subscription.job_id)
        if job is not None:
            job.subscriptions.discard(subscription)
            if not job.subscriptions:
                del self._jobs[subscription.job_id]
        self._wake.set()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _read_loop(self) -> None:
        """Until no client is left: read every followed job's new entries, hand them out."""
        retry_s = RETRY_FIRST_S
        while self._jobs:
            reading = {job_id: (job, job.cursor) for job_id, job in self._jobs.items()
                       if job.cursor is not None}
            if not reading:  # clients still reading their backlogs
                self._wake.clear()
                await self._wake.wait()
                continue
            streams = {keys.job_events(job_id): job_id for job_id in reading}
            try:
                reply: Any = await self.redis.xread(
                    {stream: reading[job_id][1] for stream, job_id in streams.items()},
                    count=READ_COUNT, block=self.block_ms)
            except aioredis.RedisError as exc:
                if retry_s == RETRY_FIRST_S:  # once per outage
                    log.warning("reading job events failed (%s); trying again", exc)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=retry_s)
                retry_s = min(retry_s * 2, RETRY_MAX_S)
                continue
            if retry_s != RETRY_FIRST_S:
                log.warning("reading job events again")
            retry_s = RETRY_FIRST_S
            for stream, entries in reply or []:
                job_id = streams[stream.decode()]
                self._deliver(job_id, *reading[job_id], entries)
        self._task = None

    def _deliver(self, job_id: str, job: _Job, cursor: str | None, entries: list[Any]) -> None:
        if self._jobs.get(job_id) is not job or cursor is None:
            return  # its clients left while the read was out
        batch = Batch(cursor, [StreamEvent.decode(entry_id, fields)
                               for entry_id, fields in entries])
        job.cursor = batch.events[-1].id
        for subscription in job.subscriptions:
            subscription.queue.put_nowait(batch)
