"""Wake requests that wait for their job (``wait`` > 0) from one pub/sub subscription.

Workers publish each finished job record on ``JOB_DONE_CHANNEL``; this process keeps one
subscription and resolves the futures of the requests waiting on those ids, so a waiting
request costs no polling round trips.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis

from controlplane import keys
from controlplane.jobs import Job
from controlplane.pubsub import follow

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

    def forget(self, job_id: str, future: asyncio.Future[Job]) -> None:
        futures = self._waiting.get(job_id, [])
        if future in futures:
            futures.remove(future)
        if not futures:
            self._waiting.pop(job_id, None)

    async def _listen(self) -> None:
        await follow(self.redis, keys.JOB_DONE_CHANNEL, self._wake, stop=self._stop,
                     subscribed=self._ready)

    async def _wake(self, data: bytes) -> None:
        try:
            job = Job.model_validate_json(data)
        except ValueError:
            log.exception("unreadable job-done message")
            return
        for future in self._waiting.pop(job.id, []):
            if not future.done():
                future.set_result(job)
