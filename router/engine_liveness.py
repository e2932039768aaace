"""Which engines have a live worker, as this API process last saw them.

Workers name the engines they run slots for in their heartbeats. A background loop reads
those once a second (never on the request path), and submit refuses a job with 503
``no_engine`` when its first stage's engine has had no live worker for longer than the
grace period: the first moments after a start, before any worker has beaten, and a worker's
restart are not refused, but a policy nobody serves is, at once and with ``Retry-After``,
instead of queueing work that waits forever::

    liveness = EngineLiveness(redis, grace_s=30)
    await liveness.start()
    await liveness.check("sdxl_turbo")   # raises NoEngine
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable

import redis.asyncio as aioredis

from controlplane.errors import NoEngine
from router.status import live_workers, worker_slots

log = logging.getLogger(__name__)

REFRESH_S = 1.0
#: a refusal re-reads the heartbeats when the view is older than this
RECHECK_S = 0.1


class EngineLiveness:
    def __init__(self, redis: aioredis.Redis, *, grace_s: float, refresh_s: float = REFRESH_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis
        self.grace_s = grace_s
        self.refresh_s = refresh_s
        self._clock = clock
        self._started_s = clock()
        #: engine → when a live worker was last seen serving it (``clock`` seconds)
        self._served_at: dict[str, float] = {}
        #: engines a live worker served at the last read
        self._serving: set[str] = set()
        #: when the view was last read; a stale view (Redis not answering) refuses nothing
        self._read_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._refresh_loop())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def refresh(self) -> None:
        """Read the live workers' heartbeats (one SMEMBERS and one pipeline)."""
        workers = await live_workers(self.redis)
        now = self._clock()
        self._serving = {engine for info in workers for engine in worker_slots(info)}
        for engine in self._serving:
            self._served_at[engine] = now
        self._read_at = now

    def unserved(self, engines: Iterable[str]) -> list[str]:
        """Those of ``engines`` that no live worker has served for longer than the grace."""
        now = self._clock()
        if self._read_at is None or now - self._read_at > max(self.grace_s, 3 * self.refresh_s):
            return []
        return [engine for engine in engines if engine not in self._serving
                and now - self._served_at.get(engine, self._started_s) > self.grace_s]

    async def check(self, engine: str) -> None:
        """Raise NoEngine when ``engine`` has had no live worker for longer than the grace.

        A refusal is confirmed by reading the heartbeats again first (at most every
        ``RECHECK_S``), so a worker that started since the last read is never missed; an
        accepted request costs no round trip.
        """
        if not self.unserved([engine]):
            return
        if self._read_at is None or self._clock() - self._read_at >= RECHECK_S:
            with contextlib.suppress(aioredis.RedisError):
                await self.refresh()
        if self.unserved([engine]):
            seen = self._served_at.get(engine)
            since = ("since this API started" if seen is None
                     else f"for {self._clock() - seen:.0f} s")
            raise NoEngine(f"engine {engine}: no live worker serves it ({since}); start a "
                           "worker for it (laneway worker) or route elsewhere")

    async def _refresh_loop(self) -> None:
        while not self._stop.is_set():
            try:
                await self.refresh()
            except aioredis.RedisError as exc:
                log.debug("engine liveness not refreshed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.refresh_s)
