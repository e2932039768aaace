"""What ``GET /v1/status`` shows: lanes, workers, deployments and rollouts, from Redis.

A lane is one engine stream per tier; entries are deleted on ack, so its length is its
depth (queued and running stages), and the first entry's id carries the enqueue time in
milliseconds, which gives the age of the oldest entry.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis.asyncio as aioredis

from controlplane import keys
from controlplane.live_config import Snapshot
from controlplane.policy import Policy
from controlplane.rollouts import RolloutStore


async def live_workers(redis: aioredis.Redis, *, now_s: float | None = None
                       ) -> list[dict[str, Any]]:
    """Heartbeats of workers seen within ``keys.WORKER_STALE_S`` (string fields, as
    stored)."""
    now_s = time.time() if now_s is None else now_s
    names: Any = await redis.smembers(keys.workers())
    if not names:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(keys.worker_heartbeat(name.decode()))
        rows = await pipe.execute()
    out = []
    for row in rows:
        if not row:
            continue
        info = {k.decode(): v.decode() for k, v in row.items()}
        if now_s - float(info.get("heartbeat_at", 0)) <= keys.WORKER_STALE_S:
            out.append(info)
    return sorted(out, key=lambda w: w.get("name", ""))


def worker_slots(info: dict[str, Any]) -> dict[str, dict[str, int]]:
    """``{engine: {"busy": n, "total": n}}`` from a heartbeat's ``slots`` JSON."""
    try:
        slots = json.loads(info.get("slots", "{}"))
    except ValueError:
        return {}
    return {engine: {"busy": int(s.get("busy", 0)), "total": int(s.get("total", 0))}
            for engine, s in slots.items()}


async def lane_stats(redis: aioredis.Redis, streams: list[str], *, now_ms: int
                     ) -> list[tuple[int, float | None]]:
    """``(depth, oldest entry age in seconds or None)`` per stream, in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xlen(stream)
            pipe.xrange(stream, count=1)
        replies = await pipe.execute()
    out = []
    for depth, first in zip(replies[::2], replies[1::2], strict=True):
        age_s = None
        if first:
            enqueued_ms = int(first[0][0].split(b"-")[0])
            age_s = max(0, now_ms - enqueued_ms) / 1000
        out.append((int(depth), age_s))
    return out


async def lanes(redis: aioredis.Redis, policy: Policy, *, now_ms: int
                ) -> list[dict[str, Any]]:
    """Every engine × tier lane of the policy with its depth and oldest age."""
    pairs = [(engine, tier) for engine in policy.engines for tier in policy.tiers]
    stats = await lane_stats(redis, [keys.engine_stream(e, t) for e, t in pairs],
                             now_ms=now_ms)
    return [{"engine": engine, "tier": tier, "depth": depth, "oldest_age_s": age_s}
            for (engine, tier), (depth, age_s) in zip(pairs, stats, strict=True)]


async def status_body(redis: aioredis.Redis, snapshot: Snapshot) -> dict[str, Any]:
    now_s = time.time()
    now_ms = int(now_s * 1000)
    policy = snapshot.policy
    (deferred_depth, deferred_age_s), = await lane_stats(redis, [keys.deferred_stream()],
                                                         now_ms=now_ms)
    workers = [{
        "name": w.get("name"), "device": w.get("device"), "slots": worker_slots(w),
        "engines": sorted(worker_slots(w)),
        "stages": json.loads(w.get("stages") or "{}"),  # running / allowed on its device
        # used / total GB, loaded engines; on CUDA torch.cuda's allocated / reserved bytes
        "memory": json.loads(w.get("memory") or "{}"),
        "last_heartbeat_s": round(now_s - float(w.get("heartbeat_at", 0)), 3),
    } for w in await live_workers(redis, now_s=now_s)]
    return {
        "policy_version": policy.version_id,
        "lanes": await lanes(redis, policy, now_ms=now_ms),
        "deferred": {"depth": deferred_depth, "oldest_age_s": deferred_age_s},
        "workers": workers,
        "deployments": {name: d.model_dump(mode="json")
                        for name, d in sorted(snapshot.deployments.items())},
        "rollouts": [r.model_dump(mode="json") for r in await RolloutStore(redis).all()],
    }
