"""The audit trail: who changed what, when and why, kept in Redis.

Every control-plane change (policy apply/rollback, rollout start/step/promote/abort, model
rollback, registry change) adds one entry, inside the transaction that makes the change
where there is one::

    async with redis.pipeline(transaction=True) as pipe:
        ...                                    # the change itself
        add_in(pipe, AuditEntry.now("alice", "rollback", "tiny-sdxl", "p95 regression"))
        await pipe.execute()
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel, Field
from redis.asyncio.client import Pipeline

from controlplane import keys
from controlplane.jobs import utc_now

#: entries kept; older ones are trimmed
AUDIT_KEPT = 10_000


class AuditEntry(BaseModel):
    at: str
    actor: str
    action: str
    target: str
    reason: str = ""
    details: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def now(cls, actor: str, action: str, target: str, reason: str = "",
            **details: Any) -> AuditEntry:
        return cls(at=utc_now(), actor=actor, action=action, target=target, reason=reason,
                   details=details)


def add_in(pipe: Pipeline, entry: AuditEntry) -> None:
    """Append ``entry`` inside the caller's pipeline."""
    pipe.rpush(keys.audit_log(), entry.model_dump_json())
    pipe.ltrim(keys.audit_log(), -AUDIT_KEPT, -1)


async def add(redis: aioredis.Redis, entry: AuditEntry) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        add_in(pipe, entry)
        await pipe.execute()


async def recent(redis: aioredis.Redis, *, limit_n: int = 50,
                 target: str | None = None) -> list[AuditEntry]:
    """The newest ``limit_n`` entries (for ``target`` only, when given), oldest first."""
    rows = await redis.lrange(keys.audit_log(), 0, -1)
    entries = [AuditEntry.model_validate_json(row) for row in rows]
    if target is not None:
        entries = [e for e in entries if e.target == target]
    return entries[-limit_n:] if limit_n > 0 else entries
