"""One way to follow a pub/sub channel until told to stop, across Redis restarts.

``get_message`` with a timeout instead of ``async for ... in pubsub.listen()``: cancelling a
task inside ``listen()`` can be swallowed by the client's read and hang the shutdown.

A subscription does not survive its connection: when Redis restarts or the connection
drops, ``follow`` subscribes again with backoff (0.1 s doubling to 5 s), logs it, and calls
``on_resubscribed`` — whatever was published in the gap is lost, so the caller re-reads
what it was waiting for::

    await follow(redis, keys.JOB_DONE_CHANNEL, wake, stop=stop, on_resubscribed=recheck)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

log = logging.getLogger(__name__)

POLL_S = 0.5
RETRY_FIRST_S = 0.1
RETRY_MAX_S = 5.0


async def follow(redis: aioredis.Redis, channel: str, handle: Callable[[bytes], Awaitable[None]],
                 *, stop: asyncio.Event, subscribed: asyncio.Event | None = None,
                 on_resubscribed: Callable[[], Awaitable[None]] | None = None) -> None:
    """Call ``handle(data)`` for each message on ``channel`` until ``stop`` is set."""
    retry_s = RETRY_FIRST_S
    lost = False
    while not stop.is_set():
        pubsub = redis.pubsub()
        try:
            await pubsub.subscribe(channel)
            if lost:
                log.warning("subscribed to %s again", channel)
                if on_resubscribed is not None:
                    await on_resubscribed()
            lost, retry_s = False, RETRY_FIRST_S
            if subscribed is not None:
                subscribed.set()
            while not stop.is_set():
                message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                   timeout=POLL_S)
                if message is not None and message["type"] == "message":
                    await handle(message["data"])
        except (aioredis.ConnectionError, aioredis.TimeoutError) as exc:
            if not lost:
                log.warning("subscription to %s lost (%s); subscribing again", channel, exc)
            lost = True
        finally:
            with contextlib.suppress(aioredis.RedisError, OSError):
                await pubsub.aclose()
        if lost:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=retry_s)
            retry_s = min(retry_s * 2, RETRY_MAX_S)
