"""Cancellation through ``DELETE /v1/jobs/{id}``: targeted, idempotent, counted once."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio.client import PubSub

from controlplane import keys
from controlplane.policy import Policy
from controlplane.policy_loader import load_policy
from tests.conftest import POLICIES
from tests.router.conftest import Router, RouterFactory


@pytest.fixture
def policy() -> Policy:
    return load_policy(POLICIES / "admission.yaml")


async def _outcomes(router: Router) -> dict[str, int]:
    raw = await router.redis.hgetall(keys.job_outcomes())
    return {k.decode(): int(v) for k, v in raw.items()}


async def _next_message(pubsub: PubSub, timeout_s: float = 5) -> bytes:
    async with asyncio.timeout(timeout_s):
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            if message is not None:
                return bytes(message["data"])


async def test_cancelled_queued_job_never_starts_and_cancelling_twice_is_fine(
        make_router: RouterFactory, policy: Policy) -> None:
    async with make_router(policy) as router:
        job = (await router.submit(intent="draft")).json()
        waiting = asyncio.create_task(router.submit(intent="draft", wait=30))
        pubsub = router.redis.pubsub()
        await pubsub.subscribe(keys.CANCEL_CHANNEL)
        assert await router.redis.get(keys.route_inflight("fast_draft")) == b"2"

        first = await router.http.delete(f"/v1/jobs/{job['id']}")
        assert first.status_code == 200
        assert first.json()["status"] == "cancelled"
        assert first.json()["stages"][0]["status"] == "cancelled"
        assert await _next_message(pubsub) == job["id"].encode()
        second = await router.http.delete(f"/v1/jobs/{job['id']}")
        assert second.status_code == 200
        assert second.json() == first.json()
        assert await _outcomes(router) == {"fast_draft|cancelled": 1}
        assert await router.redis.get(keys.route_inflight("fast_draft")) == b"1"

        # a request holding on with `wait` wakes when its job is cancelled
        async with asyncio.timeout(10):
            while await router.redis.xlen(keys.engine_stream("turbo", "standard")) != 2:
                await asyncio.sleep(0.02)
        other_id = (await router.redis.xrange(keys.engine_stream("turbo", "standard")))[
            1][1][b"job"].decode()
        await router.http.delete(f"/v1/jobs/{other_id}")
        woken = await asyncio.wait_for(waiting, timeout=10)
        assert woken.status_code == 200 and woken.json()["status"] == "cancelled"

        after = (await router.submit(intent="draft")).json()
        await router.start_worker("turbo")
        await router.wait_job(after["id"], "completed")
        assert await router.redis.xlen(keys.engine_stream("turbo", "standard")) == 0
        cancelled = await router.job(job["id"])
        assert cancelled["status"] == "cancelled"
        assert cancelled["stages"][0]["attempts"] == 0 and cancelled["stages"][0]["worker"] is None
        kinds = [kind for kind, _, _ in await router.events(job["id"])]
        assert kinds == ["state", "queued", "cancelled"]

        done = await router.http.delete(f"/v1/jobs/{after['id']}")
        assert done.status_code == 200 and done.json()["status"] == "completed"
        assert (await _outcomes(router))["fast_draft|cancelled"] == 2
        assert (await router.http.delete("/v1/jobs/j_nope")).status_code == 404
        await pubsub.aclose()


async def test_cancelling_a_running_job_keeps_it_cancelled_and_counted_once(
        make_router: RouterFactory) -> None:
    async with make_router(load_policy(POLICIES / "sim_lane.yaml")) as router:
        await router.start_worker("sim-draft")
        job = (await router.submit()).json()
        await router.wait_job(job["id"], "running")
        cancelled = await router.http.delete(f"/v1/jobs/{job['id']}")
        assert cancelled.json()["status"] == "cancelled"
        follower = (await router.submit()).json()
        await router.wait_job(follower["id"], "completed")  # the slot serves the next job
        assert (await router.job(job["id"]))["status"] == "cancelled"
        outcomes = await _outcomes(router)
        assert outcomes["sim_draft|cancelled"] == 1
        assert outcomes["sim_draft|completed"] == 1
        assert await router.redis.get(keys.route_inflight("sim_draft")) == b"0"
        kinds = [kind for kind, _, _ in await router.events(job["id"])]
        assert kinds[:3] == ["state", "queued", "dispatched"]
        assert kinds.count("cancelled") == 1 and "completed" not in kinds
