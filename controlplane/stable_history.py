"""The stable versions each model has had, oldest first: what `laneway rollback` goes back to."""

from __future__ import annotations

import json

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from controlplane import keys
from controlplane.jobs import utc_now


def push_in(pipe: Pipeline, model: str, version: str, *, reason: str) -> None:
    """Record ``version`` as the model's newest stable, inside the caller's transaction."""
    pipe.rpush(keys.stable_history(model),
               json.dumps({"version": version, "at": utc_now(), "reason": reason}))


async def versions(redis: aioredis.Redis, model: str) -> list[str]:
    rows = await redis.lrange(keys.stable_history(model), 0, -1)
    return [json.loads(row)["version"] for row in rows]


def previous_stable(history: list[str], current: str) -> str | None:
    """The newest version before ``current`` that differs from it, or None."""
    for version in reversed(history):
        if version != current:
            return version
    return None


def change_in(pipe: Pipeline, history: list[str], model: str, old: str, new: str, *,
              reason: str) -> None:
    """Record a stable change old → new; the first change also records ``old``."""
    if not history:
        push_in(pipe, model, old, reason="stable before the first recorded change")
    push_in(pipe, model, new, reason=reason)
