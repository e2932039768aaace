"""Wake requests that wait for their job (``wait`` > 0) from one pub/sub subscription.

Workers publish each finished job record on ``JOB_DONE_CHANNEL``; this process keeps one
subscription and resolves the futures of the requests waiting on those ids, so a waiting
request costs no round trip: it registers its job id before the job is accepted, and the
publication carries the finished record::

    job_id = new_job_id()
    with waiters.waiting(job_id) as ended:
        accepted = await submitter.submit(request, job_id=job_id)
        job = await waiters.until_final(accepted, ended, jobs, timeout_s=10)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis.asyncio as aioredis

from controlplane import keys
from controlplane.jobs import Job, JobStore
from controlplane.pubsub import follow
from router.submit import Accepted

log = logging.getLogger(__name__)


class JobWaiters:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._waiting: dict[str, list[asyncio.Future[Job]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen())
        await asyncio.wait_for(self._ready.wait(), timeout=10)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    def register(self, job_id: str) -> asyncio.Future[Job]:
        """Register interest before the job is enqueued, so its end cannot be missed."""
        future: asyncio.Future[Job] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(job_id, []).append(future)
        return future

    @contextmanager
    def waiting(self, job_id: str) -> Iterator[asyncio.Future[Job]]:
        """A future for ``job_id``'s end, registered for the block."""
        future = self.register(job_id)
        try:
            yield future
        finally:
            self.forget(job_id, future)

    async def until_final(self, accepted: Accepted, ended: asyncio.Future[Job],
                          jobs: JobStore, *, timeout_s: float) -> Job:
        """The job once it has ended (TimeoutError after ``timeout_s``).

        ``ended`` was registered before the accept; a job accepted earlier under the same
        Idempotency-Key has another id and may have ended before anyone listened, so it
        is registered now and read once.
        """
        job = accepted.job
        if job.status.is_final:
            return job
        if not accepted.replayed:
            return await asyncio.wait_for(asyncio.shield(ended), timeout=timeout_s)
        with self.waiting(job.id) as original:
            current = await jobs.get(job.id)
            if current.status.is_final:
                return current
            return await asyncio.wait_for(asyncio.shield(original), timeout=timeout_s)

    def forget(self, job_id: str, future: asyncio.Future[Job]) -> None:
        futures = self._waiting.get(job_id, [])
        if future in futures:
            futures.remove(future)
        if not futures:
            self._waiting.pop(job_id, None)

    async def _listen(self) -> None:
        await follow(self.redis, keys.JOB_DONE_CHANNEL, self._wake, stop=self._stop,
                     subscribed=self._ready, on_resubscribed=self._recheck)

    async def _recheck(self) -> None:
        """After a lost subscription: wake the waiters whose jobs ended in the gap (one
        MGET; an id not accepted yet has no record)."""
        job_ids = list(self._waiting)
        if not job_ids:
            return
        records: list[Any] = await self.redis.mget(
            [keys.job(job_id) for job_id in job_ids])
        for raw in records:
            if raw is not None:
                await self._wake(raw)

    async def _wake(self, data: bytes) -> None:
        try:
            job = Job.model_validate_json(data)
        except ValueError:
            log.exception("unreadable job-done message")
            return
        if not job.status.is_final:
            return
        for future in self._waiting.pop(job.id, []):
            if not future.done():
                future.set_result(job)
