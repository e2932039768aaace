"""Shared set-up for control-plane tests: a policy with one tiny model and its deployment."""

from __future__ import annotations

import redis.asyncio as aioredis

from controlplane.deployments import Deployment, DeploymentStore
from controlplane.jobs import StageRecord, StageStatus
from controlplane.policy import Policy
from controlplane.policy_loader import parse_policy
from controlplane.policy_store import PolicyStore
from controlplane.version_stats import record_stage

MODEL = "tiny-sdxl"

POLICY_YAML = """\
version: 1
limits: {max_pixels: 262144, max_n: 2, max_prompt_chars: 200, default_width: 64,
         default_height: 64}
engines:
  base: {kind: diffusers.text2image, model: tiny-sdxl, steps: 1, guidance: 0.0,
         max_concurrency: 2}
routes:
  - name: default
    match: {}
    stages: [{engine: base}]
"""


def policy(steps: int = 1) -> Policy:
    return parse_policy(POLICY_YAML.replace("steps: 1", f"steps: {steps}"))


async def deployed(redis: aioredis.Redis, stable: str = "1") -> None:
    await PolicyStore(redis).apply(policy(), actor="test", reason="fixture")
    await DeploymentStore(redis).put(Deployment(model=MODEL, stable=stable))


async def record(redis: aioredis.Redis, version: str, *, ok: int, failed: int = 0,
                 run_ms: int = 100) -> None:
    """Count finished stages for a version, as the worker's commit does."""
    async with redis.pipeline(transaction=True) as pipe:
        for i in range(ok + failed):
            stage = StageRecord(engine="base", model=MODEL, model_version=version,
                                status=StageStatus.completed if i < ok else StageStatus.failed,
                                run_ms=run_ms)
            record_stage(pipe, stage, ok=i < ok)
        await pipe.execute()
