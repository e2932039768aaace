"""Which version of each model serves traffic: ``stable``, optional ``canary`` and its weight.

Kept in Redis per model; read by routers at dispatch. The canary split is sticky on a hash
of the job id, so a job keeps its version across retries and stages.
"""

from __future__ import annotations

import hashlib
import json

import redis.asyncio as aioredis
from pydantic import BaseModel, Field
from redis.asyncio.client import Pipeline

from controlplane import keys


def control_message(model: str) -> str:
    """What the control channel carries when ``model``'s deployment changed."""
    return json.dumps({"kind": "deployment", "model": model})


def put_in(pipe: Pipeline, deployment: Deployment) -> None:
    """Write ``deployment`` and announce it, inside the caller's transaction (set-up and
    tests; control-plane changes go through ``controlplane/deployment_writes.py``)."""
    pipe.hset(keys.deployments(), deployment.model, deployment.model_dump_json())
    pipe.publish(keys.CONTROL_CHANNEL, control_message(deployment.model))


class Deployment(BaseModel):
    model: str
    stable: str
    canary: str | None = None
    canary_weight: float = Field(default=0.0, ge=0, le=100)
    #: +1 with every change (the compare-and-set token of ``deployment_writes.commit``)
    revision: int = Field(default=0, ge=0)
    #: the audit action that wrote this record (``rollback``, ``rollout.promoted``, ...)
    last_change: str = ""

    def pick(self, job_id: str) -> str:
        """Stable or canary for this job, by weight, sticky on the job id."""
        if self.canary is None or self.canary_weight <= 0:
            return self.stable
        bucket = int.from_bytes(hashlib.sha256(f"{self.model}:{job_id}".encode()).digest()[:4])
        return self.canary if (bucket % 10_000) < self.canary_weight * 100 else self.stable


class DeploymentStore:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def all(self) -> dict[str, Deployment]:
        raw = await self.redis.hgetall(keys.deployments())
        return {
            (k.decode() if isinstance(k, bytes) else k): Deployment.model_validate_json(v)
            for k, v in raw.items()
        }

    async def get(self, model: str) -> Deployment | None:
        raw = await self.redis.hget(keys.deployments(), model)
        return None if raw is None else Deployment.model_validate_json(raw)

    async def put(self, deployment: Deployment) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            put_in(pipe, deployment)
            await pipe.execute()

    async def ensure_stable(self, model: str, version: str) -> Deployment:
        """Give ``model`` a stable version if it has none yet; return its deployment."""
        fresh = Deployment(model=model, stable=version)
        if await self.redis.hsetnx(keys.deployments(), model, fresh.model_dump_json()):
            return fresh
        existing = await self.get(model)
        assert existing is not None
        return existing
