"""Issue 12 (acceptance 10): the deferred queue on simulated devices — a cap
(``defer.max_depth``, 429 beyond it), deadlines that start at release, and a release that
happens once even with two dispatchers racing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from controlplane import keys
from controlplane.artifacts import LocalArtifactStore
from controlplane.errors import DeferredQueueFull
from controlplane.live_config import LiveConfig
from controlplane.policy import Defer, Policy
from controlplane.policy_loader import load_policy
from controlplane.policy_store import PolicyStore
from controlplane.route_counters import DRAIN_WINDOW_S
from controlplane.transitions import Transitions
from router.admission import AdmissionControl
from router.deferral import DeferralDispatcher
from router.requests import ImageRequest
from router.submit import Submitter
from tests.conftest import POLICIES
from tests.router.conftest import RouterFactory

POLICY = load_policy(POLICIES / "deferral.yaml")
BATCH = {"intent": "auto", "tier": "batch"}     # route backfill: max_queue 1, on_full defer


def _stream_ms(entry_id: str | None) -> int:
    assert entry_id is not None
    return int(entry_id.split("-")[0])


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


async def test_deferred_jobs_held_longer_than_their_timeout_complete_after_release(
        make_router: RouterFactory) -> None:
    timeout_ms = int(POLICY.route("backfill").timeout_s * 1000)
    async with make_router(POLICY) as router:
        interactive = (await router.submit(intent="draft")).json()   # sim-slow: 3 s
        assert (await router.submit(**BATCH)).json()["route"] == "backfill"
        deferred = [(await router.submit(**BATCH)).json() for _ in range(3)]
        assert await router.redis.xlen(keys.deferred_stream()) == 3

        await router.start_worker("sim-slow", "sim-fast")
        await router.wait_job(interactive["id"], "completed")
        for job in deferred:
            done = await router.wait_job(job["id"], "completed")
            assert done["error"] is None
            events = {kind: event_id for kind, _, event_id in await router.events(job["id"])}
            held_ms = _stream_ms(events["queued"]) - _stream_ms(events["deferred"])
            # the premise of the test: held back longer than the route's whole timeout
            assert held_ms > timeout_ms, (held_ms, timeout_ms)
        assert await router.redis.xlen(keys.deferred_stream()) == 0


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
        submitter = Submitter(redis, live, LocalArtifactStore(tmp_path), job_ttl_s=3600)
        request = ImageRequest(prompt="later", **BATCH)  # type: ignore[arg-type]
        await submitter.submit(request)
        ids = [(await submitter.submit(request)).job.id for _ in range(count)]
    finally:
        await live.stop()
    assert await redis.xlen(keys.deferred_stream()) == count
    return ids


class _FixedPolicy:
    """The part of LiveConfig the dispatcher reads, fixed to one policy."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy


async def test_two_dispatchers_racing_release_each_job_once(
        redis: aioredis.Redis, redis_url: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    policy = POLICY.model_copy(update={"defer": Defer(max_depth=100)})
    ids = await _deferred_jobs(redis, policy, tmp_path, 10)

    # Both dispatchers read every entry, then try each job at the same moment: the two
    # release transitions of one job meet on the same record revision.
    barrier = asyncio.Barrier(2)
    real_apply = Transitions.apply

    async def apply(self: Transitions, *args: Any, **kwargs: Any) -> Any:
        await barrier.wait()
        return await real_apply(self, *args, **kwargs)

    monkeypatch.setattr(Transitions, "apply", apply)
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(2)]
    try:
        dispatchers = [DeferralDispatcher(c, _FixedPolicy(policy), job_ttl_s=3600)  # type: ignore[arg-type]
                       for c in clients]
        async with asyncio.timeout(30):
            counts = await asyncio.gather(*(d.release_ready(policy) for d in dispatchers))
    finally:
        for client in clients:
            await client.aclose()

    assert sum(counts) == 10, counts
    assert await redis.xlen(keys.deferred_stream()) == 0
    assert await redis.xlen(keys.engine_stream("sim-fast", "batch")) == 11  # + the direct one
    for job_id in ids:
        kinds = [f[b"kind"] for _, f in await redis.xrange(keys.job_events(job_id))]
        assert kinds == [b"deferred", b"queued"], (job_id, kinds)
    assert await AdmissionControl(redis, clock_s=lambda: time.time() + 1).released() == 10


async def test_a_full_deferred_queue_refuses_in_process_too(
        redis: aioredis.Redis, tmp_path: Path) -> None:
    await _deferred_jobs(redis, POLICY, tmp_path, POLICY.defer.max_depth)
    live = LiveConfig(redis)
    await live.start()
    try:
        submitter = Submitter(redis, live, LocalArtifactStore(tmp_path), job_ttl_s=3600)
        with pytest.raises(DeferredQueueFull) as refused:
            await submitter.submit(ImageRequest(prompt="later", **BATCH))  # type: ignore[arg-type]
    finally:
        await live.stop()
    assert refused.value.status_code == 429 and refused.value.retry_after_s is not None
    assert await redis.xlen(keys.deferred_stream()) == POLICY.defer.max_depth
