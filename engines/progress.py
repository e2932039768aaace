"""Progress events of running stages, written together at most every ``flush_s``.

Every denoising step makes a ``progress`` event; writing each one would cost a round trip
per step. Events wait here (stamped when the step happens) and go out in one pipeline for
all jobs at most every ``flush_s``; a stage's outcome takes its job's waiting events into
its own transition, so a short stage costs no extra round trip and progress never lands
after the stage's end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis

from controlplane import keys
from controlplane.jobs import Event
from controlplane.transitions import EVENTS_TTL_S

log = logging.getLogger(__name__)

FLUSH_S = 0.25


class ProgressEvents:
    def __init__(self, redis: aioredis.Redis, *, flush_s: float = FLUSH_S) -> None:
        self.redis = redis
        self.flush_s = flush_s
        self._waiting: dict[str, list[Event]] = {}
        self._lock = asyncio.Lock()  # a take waits for a flush in flight (event order)
        self._timer: asyncio.Task[None] | None = None

    def add(self, job_id: str, event: Event) -> None:
        """Queue an event (on the event loop); the next flush writes it."""
        self._waiting.setdefault(job_id, []).append(event)
        if self._timer is None or self._timer.done():
            self._timer = asyncio.create_task(self._flush_later())

    async def take(self, job_id: str) -> list[Event]:
        """The job's events not yet written, for its stage's outcome to write."""
        async with self._lock:
            return self._waiting.pop(job_id, [])

    async def flush(self) -> None:
        async with self._lock:
            waiting, self._waiting = self._waiting, {}
            if not waiting:
                return
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id, events in waiting.items():
                    for event in events:
                        pipe.xadd(keys.job_events(job_id), event.fields())
                    pipe.expire(keys.job_events(job_id), EVENTS_TTL_S)
                await pipe.execute()

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
        with contextlib.suppress(aioredis.RedisError):
            await self.flush()

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.flush_s)
        try:
            await self.flush()
        except aioredis.RedisError as exc:  # best effort: the stage's outcome still lands
            log.warning("progress events not written: %s", exc)
