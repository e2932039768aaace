"""The batched lane's collection step: wait for the first item, then take more until
``max_batch`` or until ``max_wait_ms`` has passed since the first.

The window is timed here with a local clock, not with short server-side BLOCK timeouts
(those fire on the server's tick, 100 ms at Redis' default ``hz``). While the window is
open, the lanes are polled without blocking every ``POLL_MS``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
POLL_MS = 3.0


async def fill_batch(
    first: list[T],
    more: Callable[[int], Awaitable[list[T]]],
    *,
    max_batch: int,
    max_wait_ms: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> list[T]:
    """Return ``first`` plus whatever ``more(n)`` yields before the batch is full or due."""
    batch = list(first)
    deadline = clock() + max_wait_ms / 1000
    while len(batch) < max_batch:
        got = await more(max_batch - len(batch))
        batch.extend(got)
        remaining_s = deadline - clock()
        if len(batch) >= max_batch or remaining_s <= 0:
            break
        if not got:
            await sleep(min(POLL_MS / 1000, remaining_s))
    return batch
