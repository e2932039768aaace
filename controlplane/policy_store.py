"""Policy versions in Redis: the one in force, every applied version, and the history.

Applying a policy writes its canonical JSON under its content version, points ``current`` at
it and publishes a control message; every router and worker swaps to it atomically (they
hold one immutable Policy object and replace the reference).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import redis.asyncio as aioredis

from controlplane import keys
from controlplane.jobs import utc_now
from controlplane.policy import Policy


@dataclass(frozen=True)
class PolicyChange:
    version: str
    applied_at: str
    actor: str
    reason: str


class PolicyStore:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def current(self) -> Policy | None:
        version = await self.redis.get(keys.policy_current())
        if version is None:
            return None
        return await self.get(version.decode() if isinstance(version, bytes) else version)

    async def current_version(self) -> str | None:
        raw = await self.redis.get(keys.policy_current())
        return raw.decode() if isinstance(raw, bytes) else raw

    async def get(self, version: str) -> Policy | None:
        raw = await self.redis.hget(keys.policy_versions(), version)
        return None if raw is None else Policy.model_validate_json(raw)

    async def apply(self, policy: Policy, *, actor: str, reason: str) -> bool:
        """Make ``policy`` the one in force; return False when it already was."""
        version = policy.version_id
        if await self.current_version() == version:
            return False
        change = PolicyChange(version, utc_now(), actor, reason)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.policy_versions(), version, policy.canonical_json())
            pipe.set(keys.policy_current(), version)
            pipe.rpush(keys.policy_history(), json.dumps(change.__dict__))
            pipe.publish(keys.CONTROL_CHANNEL, json.dumps({"kind": "policy", "version": version}))
            await pipe.execute()
        return True

    async def history(self) -> list[PolicyChange]:
        rows = await self.redis.lrange(keys.policy_history(), 0, -1)
        return [PolicyChange(**json.loads(row)) for row in rows]
