"""Acceptance 1: over-full routes answer per ``on_full`` (reject, degrade, defer); tenants."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from controlplane import keys
from controlplane.policy import Admission, Policy, Tenant
from controlplane.policy_loader import load_policy
from controlplane.registry import Registry
from controlplane.route_counters import DRAIN_WINDOW_S
from router.admission import RETRY_AFTER_MAX_S, retry_after_s
from router.deferral import DeferralDispatcher
from tests.conftest import POLICIES
from tests.router.conftest import RouterFactory, running_router

ADMISSION_POLICY = POLICIES / "admission.yaml"


@pytest.fixture
def policy() -> Policy:
    return load_policy(ADMISSION_POLICY)


@pytest.mark.parametrize(("drained", "excess", "expected_s"), [
    (30, 1, 2),                    # 0.5 jobs/s: one job drains in 2 s
    (600, 5, 1),                   # fast drain: at least 1 s
    (1, 10, RETRY_AFTER_MAX_S),    # slow drain: at most the cap
    (0, 1, DRAIN_WINDOW_S),        # nothing drained: a window per excess job
    (0, 2, 2 * DRAIN_WINDOW_S),
])
def test_retry_after_follows_the_drain_rate(drained: int, excess: int, expected_s: int) -> None:
    assert retry_after_s(drained, excess) == expected_s


async def _hgetall(router, key: str) -> dict[str, int]:  # noqa: ANN001
    raw = await router.redis.hgetall(key)
    return {k.decode(): int(v) for k, v in raw.items()}


async def test_full_reject_route_answers_429_with_retry_after_from_drain_rate(
        make_router: RouterFactory, policy: Policy) -> None:
    async with make_router(policy) as router:
        for _ in range(3):  # fast_draft: max_queue 3, no worker, so nothing drains
            assert (await router.submit(intent="draft")).status_code == 202
        refused = await router.submit(intent="draft")
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "queue_full"
        assert "fast_draft" in refused.json()["error"]["message"]
        assert refused.headers["Retry-After"] == str(DRAIN_WINDOW_S)

        # 30 jobs finished 10 s ago: 0.5 jobs/s, so one free place is 2 s away
        await router.redis.incrby(keys.route_drained("fast_draft", int(time.time()) - 10), 30)
        refused = await router.submit(intent="draft")
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "2"
        assert await router.redis.xlen(keys.engine_stream("turbo", "standard")) == 3
        assert await _hgetall(router, keys.admission_outcomes()) == {
            "fast_draft|standard|accepted": 3, "fast_draft|standard|rejected": 2}
        status = (await router.http.get("/v1/status")).json()
        lanes = {(lane["engine"], lane["tier"]): lane["depth"] for lane in status["lanes"]}
        assert lanes[("turbo", "standard")] == 3 and lanes[("base", "standard")] == 0
        assert set(status["deployments"]) == {"tiny-sdxl", "tiny-sdxl-turbo"}


async def test_full_degrade_route_serves_through_its_fallback_marked_degraded(
        make_router: RouterFactory, policy: Policy) -> None:
    async with make_router(policy) as router:
        first = (await router.submit(intent="final")).json()
        assert (first["route"], first["degraded_from"]) == ("final_render", None)
        second = await router.submit(intent="final")
        assert second.status_code == 202
        job = second.json()
        assert (job["route"], job["degraded_from"]) == ("fast_draft", "final_render")
        assert [s["engine"] for s in job["stages"]] == ["turbo"]
        assert job == await router.job(job["id"])

        for _ in range(2):  # fill fast_draft (3 with the degraded job): the next is refused
            assert (await router.submit(intent="draft")).status_code == 202
        refused = await router.submit(intent="final")
        assert refused.status_code == 429
        assert "degraded from 'final_render'" in refused.json()["error"]["message"]
        assert await _hgetall(router, keys.admission_outcomes()) == {
            "final_render|standard|accepted": 1, "final_render|standard|degraded": 1,
            "final_render|standard|rejected": 1, "fast_draft|standard|accepted": 2}

        await router.start_worker("turbo")
        done = await router.wait_job(job["id"], "completed")
        assert done["degraded_from"] == "final_render"


async def test_deferred_job_waits_for_interactive_work_then_runs(
        make_router: RouterFactory, policy: Policy) -> None:
    big = {"intent": "auto", "width": 128, "height": 128}  # backfill: max_queue 1, defer
    async with make_router(policy) as router:
        interactive = (await router.submit(intent="draft")).json()
        direct = (await router.submit(tier="batch", **big)).json()
        deferred = await router.submit(tier="batch", **big)
        assert deferred.status_code == 202
        deferred_job = deferred.json()
        assert deferred_job["status"] == "queued" and deferred_job["route"] == "backfill"
        dropped = (await router.submit(tier="batch", **big)).json()
        refused = await router.submit(tier="standard", **big)
        assert refused.status_code == 429
        assert "tier 'standard' is not deferrable" in refused.json()["error"]["message"]

        # interactive work is queued, so nothing is released, however often the loop runs
        dispatcher = DeferralDispatcher(router.redis, _LivePolicy(policy), job_ttl_s=3600)
        assert await dispatcher.release_ready(policy) == 0
        assert await router.redis.xlen(keys.deferred_stream()) == 2
        assert await router.redis.xlen(keys.engine_stream("turbo", "batch")) == 1
        cancelled = await router.http.delete(f"/v1/jobs/{dropped['id']}")
        assert cancelled.json()["status"] == "cancelled"

        await router.start_worker("turbo")
        await router.wait_job(interactive["id"], "completed")
        await router.wait_job(direct["id"], "completed")
        await router.wait_job(deferred_job["id"], "completed")
        assert (await router.job(dropped["id"]))["status"] == "cancelled"
        assert await router.redis.xlen(keys.deferred_stream()) == 0
        kinds = [kind for kind, _, _ in await router.events(deferred_job["id"])]
        assert kinds[:4] == ["state", "deferred", "queued", "dispatched"]
        assert kinds[-1] == "completed"
        assert await _hgetall(router, keys.admission_outcomes()) == {
            "fast_draft|standard|accepted": 1, "backfill|batch|accepted": 1,
            "backfill|batch|deferred": 2, "backfill|standard|rejected": 1}


class _LivePolicy:
    """The part of LiveConfig the dispatcher reads, fixed to one policy."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy


async def test_only_one_process_holds_the_deferral_lock(redis_url: str, policy: Policy) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    first = DeferralDispatcher(redis, _LivePolicy(policy), job_ttl_s=60)
    second = DeferralDispatcher(redis, _LivePolicy(policy), job_ttl_s=60)
    try:
        assert await first.hold_lock()
        assert not await second.hold_lock()
        assert await first.hold_lock()  # renewal by the holder
        await first.stop()  # releases it
        assert await second.hold_lock()
    finally:
        await redis.aclose()


async def test_tenants_need_a_key_and_an_allowed_tier(
        make_router: RouterFactory, policy: Policy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LW_TEST_ACME_KEY", "acme-secret")
    monkeypatch.setenv("LW_TEST_GLOBEX_KEY", "globex-secret")
    with_tenants = policy.model_copy(update={"tenants": {
        "acme": Tenant(api_key_env="LW_TEST_ACME_KEY", tiers=("standard",)),
        "globex": Tenant(api_key_env="LW_TEST_GLOBEX_KEY"),
    }})
    async with make_router(with_tenants) as router:
        missing = await router.submit(intent="draft")
        assert missing.status_code == 401
        wrong = await router.submit({"Authorization": "Bearer nope"}, intent="draft")
        assert wrong.status_code == 401 and "nope" not in wrong.text
        acme = {"Authorization": "Bearer acme-secret"}
        forbidden = await router.submit(acme, intent="draft", tier="premium")
        assert forbidden.status_code == 403
        assert "premium" in forbidden.json()["error"]["message"]
        job = await router.submit(acme, intent="draft")
        assert job.status_code == 202 and job.json()["tier"] == "standard"
        premium = await router.submit({"Authorization": "Bearer globex-secret"},
                                      intent="draft", tier="premium")
        assert premium.status_code == 202

        # reading and cancelling need the key too, and only reach the tenant's own jobs
        job_id = job.json()["id"]
        assert (await router.http.get(f"/v1/jobs/{job_id}")).status_code == 401
        assert (await router.http.get(f"/v1/jobs/{job_id}", headers={
            "Authorization": "Bearer globex-secret"})).status_code == 404
        assert (await router.http.get(f"/v1/jobs/{job_id}/events", headers={
            "Authorization": "Bearer globex-secret"})).status_code == 404
        assert (await router.http.get(f"/v1/jobs/{job_id}", headers=acme)).status_code == 200
        assert (await router.http.delete(f"/v1/jobs/{job_id}")).status_code == 401
        other = await router.http.delete(f"/v1/jobs/{job_id}",
                                         headers={"Authorization": "Bearer globex-secret"})
        assert other.status_code == 404
        own = await router.http.delete(f"/v1/jobs/{job_id}", headers=acme)
        assert own.status_code == 200 and own.json()["status"] == "cancelled"


async def test_a_burst_of_concurrent_submits_never_passes_max_queue(
        redis_url: str, tiny_registry: Registry, tmp_path: Path) -> None:
    """Issue 12, acceptance 8: the accept checks the route's bound in its own script."""
    sim = load_policy(POLICIES / "sim_lane.yaml")
    route = sim.routes[0].model_copy(update={"admission": Admission(max_queue=10)})
    policy = sim.model_copy(update={"routes": (route,)})
    # no worker drains the lane; nobody is refused for a missing worker meanwhile
    async with running_router(redis_url, policy, tiny_registry, tmp_path,
                              no_engine_grace_s=3600) as router:
        responses = await asyncio.gather(*(router.submit() for _ in range(500)))
        codes = Counter(r.status_code for r in responses)
        assert codes == {202: 10, 429: 490}, codes
        assert {r.json()["error"]["code"] for r in responses if r.status_code == 429} == {
            "queue_full"}
        assert await router.redis.get(keys.route_inflight(route.name)) == b"10"
        assert await router.redis.xlen(keys.engine_stream("sim-draft", "standard")) == 10
