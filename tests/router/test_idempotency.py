"""Acceptance 7: the same Idempotency-Key (same tenant) gives one job, also concurrently."""

from __future__ import annotations

import asyncio

import pytest

from controlplane import keys
from controlplane.policy import Policy, Tenant
from controlplane.policy_loader import load_policy
from tests.conftest import POLICIES
from tests.router.conftest import RouterFactory

LANE = keys.engine_stream("turbo", "standard")


@pytest.fixture
def policy() -> Policy:
    return load_policy(POLICIES / "admission.yaml")


async def test_same_key_twice_returns_the_original_job(make_router: RouterFactory,
                                                       policy: Policy) -> None:
    async with make_router(policy) as router:
        key = {"Idempotency-Key": "order-1"}
        first = await router.submit(key, intent="draft", seed=7)
        again = await router.submit(key, intent="draft", seed=7)
        assert (first.status_code, again.status_code) == (202, 202)
        assert again.json()["id"] == first.json()["id"]
        assert again.headers["Idempotent-Replayed"] == "true"
        assert "Idempotent-Replayed" not in first.headers
        other = await router.submit({"Idempotency-Key": "order-2"}, intent="draft")
        assert other.json()["id"] != first.json()["id"]
        assert await router.redis.xlen(LANE) == 2

        await router.start_worker("turbo")
        await router.wait_job(first.json()["id"], "completed")
        done = await router.submit(key, intent="draft", seed=7)
        assert done.status_code == 200 and done.json()["status"] == "completed"
        assert done.json()["id"] == first.json()["id"]

        bad = await router.submit({"Idempotency-Key": "k" * 300}, intent="draft")
        assert bad.status_code == 422 and "Idempotency-Key" in bad.json()["error"]["message"]


async def test_the_same_key_with_another_body_is_refused(make_router: RouterFactory,
                                                         policy: Policy) -> None:
    async with make_router(policy) as router:
        key = {"Idempotency-Key": "order-9"}
        first = await router.submit(key, intent="draft", seed=7)
        assert first.status_code == 202, first.text
        other = await router.submit(key, intent="draft", seed=8)
        assert other.status_code == 422, other.text
        error = other.json()["error"]
        assert error["code"] == "idempotency_mismatch"
        assert error["details"][0]["field"] == "Idempotency-Key"
        assert await router.redis.xlen(LANE) == 1  # nothing else was accepted
        again = await router.submit(key, intent="draft", seed=7)
        assert again.json()["id"] == first.json()["id"]


async def test_concurrent_requests_with_one_key_create_one_job(make_router: RouterFactory,
                                                               policy: Policy) -> None:
    async with make_router(policy) as router:
        responses = await asyncio.gather(*(
            router.submit({"Idempotency-Key": "burst-1"}, intent="auto") for _ in range(8)))
        assert {r.status_code for r in responses} == {202}
        assert len({r.json()["id"] for r in responses}) == 1
        assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in responses) == 7
        assert await router.redis.xlen(LANE) == 1
        assert await router.redis.hget(keys.admission_outcomes(),
                                       "auto_default|standard|accepted") == b"1"


async def test_a_refused_request_frees_its_key(make_router: RouterFactory,
                                               policy: Policy) -> None:
    async with make_router(policy) as router:
        queued = [(await router.submit(intent="draft")).json() for _ in range(3)]
        key = {"Idempotency-Key": "retry-me"}
        assert (await router.submit(key, intent="draft")).status_code == 429
        await router.http.delete(f"/v1/jobs/{queued[0]['id']}")  # one place frees up
        retried = await router.submit(key, intent="draft")
        assert retried.status_code == 202 and "Idempotent-Replayed" not in retried.headers
        assert retried.json()["id"] not in {job["id"] for job in queued}


async def test_keys_are_per_tenant(make_router: RouterFactory, policy: Policy,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LW_TEST_A_KEY", "a-secret")
    monkeypatch.setenv("LW_TEST_B_KEY", "b-secret")
    with_tenants = policy.model_copy(update={"tenants": {
        "a": Tenant(api_key_env="LW_TEST_A_KEY"), "b": Tenant(api_key_env="LW_TEST_B_KEY")}})
    async with make_router(with_tenants) as router:
        ids = set()
        for secret in ("a-secret", "b-secret", "a-secret"):
            response = await router.submit(
                {"Authorization": f"Bearer {secret}", "Idempotency-Key": "shared"},
                intent="draft")
            ids.add(response.json()["id"])
        assert len(ids) == 2
