"""Issue 12 (acceptance 10): the deferred queue on simulated devices — a cap
(``defer.max_depth``, 429 beyond it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from controlplane import keys
from controlplane.artifacts import ArtifactStore
from controlplane.errors import DeferredQueueFull
from controlplane.live_config import LiveConfig
from controlplane.policy import Policy
from controlplane.policy_loader import load_policy
from controlplane.policy_store import PolicyStore
from controlplane.route_counters import DRAIN_WINDOW_S
from router.requests import ImageRequest
from router.submit import Submitter
from tests.conftest import POLICIES
from tests.router.conftest import RouterFactory

POLICY = load_policy(POLICIES / "deferral.yaml")
BATCH = {"intent": "auto", "tier": "batch"}     # route backfill: max_queue 1, on_full defer


async def test_over_max_depth_submits_get_429_and_the_cap_holds_under_concurrency(
        make_router: RouterFactory) -> None:
    async with make_router(POLICY) as router:
        # no worker: the interactive job stays queued, so the deferral loop releases nothing
        assert (await router.submit(intent="draft")).status_code == 202
        direct = (await router.submit(**BATCH)).json()          # fills backfill (max_queue 1)
        assert direct["route"] == "backfill"
        burst = await asyncio.gather(*(router.submit(**BATCH) for _ in range(8)))
        codes = sorted(r.status_code for r in burst)
        assert codes == [202] * POLICY.defer.max_depth + [429] * (8 - POLICY.defer.max_depth)
        assert await router.redis.xlen(keys.deferred_stream()) == POLICY.defer.max_depth

        refused = next(r for r in burst if r.status_code == 429)
        error = refused.json()["error"]
        assert error["code"] == "deferred_queue_full"
        assert "defer.max_depth 3" in error["message"]
        assert error["details"] == [{"field": "defer.max_depth",
                                     "message": "deferred queue is full", "value": 3}]
        assert refused.headers["Retry-After"] == str(DRAIN_WINDOW_S)  # nothing released yet
        outcomes = await router.redis.hgetall(keys.admission_outcomes())
        assert int(outcomes[b"backfill|batch|rejected"]) == 8 - POLICY.defer.max_depth


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def _deferred_jobs(redis: aioredis.Redis, policy: Policy, tmp_path: Path,
                         count: int) -> list[str]:
    """Submit one job that fills the backfill route, then ``count`` that are deferred."""
    await PolicyStore(redis).apply(policy, actor="test", reason="deferral tests")
    live = LiveConfig(redis)
    await live.start()
    try:
        submitter = Submitter(redis, live, ArtifactStore(tmp_path), job_ttl_s=3600)
        request = ImageRequest(prompt="later", **BATCH)  # type: ignore[arg-type]
        await submitter.submit(request)
        ids = [(await submitter.submit(request)).job.id for _ in range(count)]
    finally:
        await live.stop()
    assert await redis.xlen(keys.deferred_stream()) == count
    return ids


async def test_a_full_deferred_queue_refuses_in_process_too(
        redis: aioredis.Redis, tmp_path: Path) -> None:
    await _deferred_jobs(redis, POLICY, tmp_path, POLICY.defer.max_depth)
    live = LiveConfig(redis)
    await live.start()
    try:
        submitter = Submitter(redis, live, ArtifactStore(tmp_path), job_ttl_s=3600)
        with pytest.raises(DeferredQueueFull) as refused:
            await submitter.submit(ImageRequest(prompt="later", **BATCH))  # type: ignore[arg-type]
    finally:
        await live.stop()
    assert refused.value.status_code == 429 and refused.value.retry_after_s is not None
    assert await redis.xlen(keys.deferred_stream()) == POLICY.defer.max_depth
