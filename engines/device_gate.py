"""At most so many stages at once on one worker's device, whichever engines they run.

Each engine caps its own slots (``max_concurrency``); the device cap is across engines:
two engines of 3 slots each on one GPU would otherwise run 6 pipeline calls at once, the
out-of-memory case this exists to prevent. A slot that has taken an entry waits here for
the device before it starts the stage (the worker's heartbeat keeps the waiting entry
claimed); slots are let in in the order they came::

    gate = DeviceGate(lambda: 1)
    async with gate.stage():
        await runner.run(slot, entries)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable


class DeviceGate:
    def __init__(self, limit: Callable[[], int | None]) -> None:
        """``limit()`` is read each time a slot asks (a policy change applies at once);
        None means no device cap."""
        self._limit = limit
        self.running = 0
        self._changed = asyncio.Condition()

    @property
    def allowed(self) -> int | None:
        return self._limit()

    def _has_room(self) -> bool:
        limit = self._limit()
        return limit is None or self.running < limit

    @contextlib.asynccontextmanager
    async def stage(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(self._has_room)
            self.running += 1
        try:
            yield
        finally:
            async with self._changed:
                self.running -= 1
                self._changed.notify_all()

    async def recheck(self) -> None:
        """Let waiting slots look again (the limit may have been raised)."""
        async with self._changed:
            self._changed.notify_all()
