"""Tier lanes on a real server: weighted turns, waiting without polling, reclaiming."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import redis.asyncio as aioredis

from controlplane import keys
from controlplane.stage_messages import StageMessage
from engines.lanes import LaneReader, WeightedTiers


def test_turns_follow_weights_while_both_tiers_wait() -> None:
    turns = WeightedTiers()
    weights = {"premium": 4, "batch": 1}
    picks = Counter(turns.pick(weights, {"premium", "batch"}) for _ in range(500))
    assert picks == {"premium": 400, "batch": 100}


def test_an_idle_tier_hoards_no_credit() -> None:
    turns = WeightedTiers()
    weights = {"premium": 4, "batch": 1}
    for _ in range(200):  # premium idle for a long time
        assert turns.pick(weights, {"batch"}) == "batch"
    picks = [turns.pick(weights, {"premium", "batch"}) for _ in range(10)]
    assert picks.count("batch") == 2  # back to 4:1 at once: no burst either way


async def _fill(redis: aioredis.Redis, engine: str, tier: str, count: int) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(count):
            pipe.xadd(keys.engine_stream(engine, tier),
                      StageMessage(f"j_{tier}_{i}", 0, {}, 0).fields())
        await pipe.execute()


async def test_reader_takes_lanes_by_weight(redis_url: str) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    reader = LaneReader(redis, "w1")
    weights = {"premium": 3, "batch": 1}
    await reader.ensure_groups("eng", list(weights))
    await _fill(redis, "eng", "premium", 60)
    await _fill(redis, "eng", "batch", 60)
    taken = [(await reader.take("eng", weights))[0].tier for _ in range(40)]
    assert Counter(taken) == {"premium": 30, "batch": 10}
    await redis.aclose()


async def test_reader_wakes_for_new_work_and_returns_empty_when_idle(redis_url: str) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    reader = LaneReader(redis, "w1")
    weights = {"standard": 1}
    await reader.ensure_groups("eng", list(weights))
    assert await reader.take("eng", weights, block=False) == []

    async def add_later() -> None:
        await asyncio.sleep(0.05)
        await _fill(redis, "eng", "standard", 1)

    started = time.monotonic()
    adder = asyncio.create_task(add_later())
    (entry,) = await reader.take("eng", weights)
    await adder
    assert entry.message.job_id == "j_standard_0"
    assert time.monotonic() - started < 0.9  # woken by the arrival, not by the 1 s timeout
    await redis.aclose()


async def test_entries_of_a_silent_consumer_are_reclaimed(redis_url: str) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    dead, alive = LaneReader(redis, "dead"), LaneReader(redis, "alive")
    weights = {"standard": 1}
    await dead.ensure_groups("eng", list(weights))
    await alive.ensure_groups("eng", list(weights))
    await _fill(redis, "eng", "standard", 1)
    (lost,) = await dead.take("eng", weights)
    assert await alive.claim_stale("eng", ["standard"], min_idle_ms=60_000, count=1) == []
    await asyncio.sleep(0.1)
    (claimed,) = await alive.claim_stale("eng", ["standard"], min_idle_ms=50, count=1)
    assert claimed.entry_id == lost.entry_id
    await redis.aclose()


async def test_a_gone_workers_consumer_is_removed_once_its_entries_are_claimed(
        redis_url: str) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    dead, alive = LaneReader(redis, "dead"), LaneReader(redis, "alive")
    weights = {"standard": 1}
    stream = keys.engine_stream("eng", "standard")
    await dead.ensure_groups("eng", list(weights))
    await alive.ensure_groups("eng", list(weights))
    await _fill(redis, "eng", "standard", 1)
    await dead.take("eng", weights)
    await redis.hset(keys.worker_heartbeat("alive"), "heartbeat_at", f"{time.time():.3f}")
    # the dead one's last heartbeat is past keys.WORKER_STALE_S (its key lingers 30 s)
    await redis.hset(keys.worker_heartbeat("dead"), "heartbeat_at",
                     f"{time.time() - keys.WORKER_STALE_S - 1:.3f}")

    async def consumers() -> set[str]:
        return {c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
                for c in await redis.xinfo_consumers(stream, keys.ENGINE_GROUP)}

    # its entry is still pending: it stays
    assert await alive.forget_gone_consumers("eng", ["standard"], min_idle_ms=0) == []
    (claimed,) = await alive.claim_stale("eng", ["standard"], min_idle_ms=0, count=1)
    await redis.xack(stream, keys.ENGINE_GROUP, claimed.entry_id)
    # a live worker (it has a heartbeat) is never removed, nor is the caller itself
    await alive.take("eng", weights, block=False)
    assert await alive.forget_gone_consumers("eng", ["standard"], min_idle_ms=0) == ["dead"]
    assert await consumers() == {"alive"}
    await redis.aclose()
