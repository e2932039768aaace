"""One way to follow a pub/sub channel until told to stop.

``get_message`` with a timeout instead of ``async for ... in pubsub.listen()``: cancelling a
task inside ``listen()`` can be swallowed by the client's read and hang the shutdown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

POLL_S = 0.5


async def follow(redis: aioredis.Redis, channel: str, handle: Callable[[bytes], Awaitable[None]],
                 *, stop: asyncio.Event, subscribed: asyncio.Event | None = None) -> None:
    """Call ``handle(data)`` for each message on ``channel`` until ``stop`` is set."""
    pubsub = redis.pubsub()
    await pubsub.subscribe(channel)
    if subscribed is not None:
        subscribed.set()
    try:
        while not stop.is_set():
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=POLL_S)
            if message is not None and message["type"] == "message":
                await handle(message["data"])
    finally:
        await pubsub.aclose()
