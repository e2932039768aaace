"""With tenants, what the service looks like takes a key: a tenant sees its own view, the
admin token sees everything; ``/metrics`` can take a scrape token; a job is looked up only
after its caller is known."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.policy import Policy, Tenant
from controlplane.policy_loader import load_policy
from controlplane.registry import Registry
from tests.conftest import POLICIES
from tests.router.conftest import running_router

ADMIN = {"Authorization": "Bearer the-admin"}
ACME = {"Authorization": "Bearer acme-secret"}


@pytest.fixture
def policy(monkeypatch: pytest.MonkeyPatch) -> Policy:
    monkeypatch.setenv("LW_TEST_ACME_KEY", "acme-secret")
    monkeypatch.setenv("LW_TEST_GLOBEX_KEY", "globex-secret")
    return load_policy(POLICIES / "admission.yaml").model_copy(update={"tenants": {
        "acme": Tenant(api_key_env="LW_TEST_ACME_KEY", tiers=("standard",)),
        "globex": Tenant(api_key_env="LW_TEST_GLOBEX_KEY"),
    }})


async def test_routes_and_status_need_a_key_and_show_tenants_their_own_view(
        redis_url: str, policy: Policy, tiny_registry: Registry, tmp_path: Path) -> None:
    async with running_router(redis_url, policy, tiny_registry, tmp_path,
                              admin_token="the-admin") as router:
        for path in ("/v1/routes", "/v1/status"):
            assert (await router.http.get(path)).status_code == 401
            assert (await router.http.get(path, headers={
                "Authorization": "Bearer nope"})).status_code == 401

        mine = (await router.http.get("/v1/routes", headers=ACME)).json()
        assert set(mine["tenants"]) == {"acme"}
        everything = (await router.http.get("/v1/routes", headers=ADMIN)).json()
        assert set(everything["tenants"]) == {"acme", "globex"}

        status = (await router.http.get("/v1/status", headers=ACME)).json()
        assert {lane["tier"] for lane in status["lanes"]} == {"standard"}
        assert "workers" not in status and "deployments" not in status
        full = (await router.http.get("/v1/status", headers=ADMIN)).json()
        assert {lane["tier"] for lane in full["lanes"]} == set(policy.tiers)
        assert "workers" in full and "deployments" in full

        # an unknown caller learns nothing about a job id, existing or not
        job_id = (await router.submit(ACME, intent="draft")).json()["id"]
        assert (await router.http.get(f"/v1/jobs/{job_id}")).status_code == 401
        assert (await router.http.get("/v1/jobs/j_none")).status_code == 401


async def test_metrics_can_take_a_scrape_token(
        redis_url: str, tiny_registry: Registry, tmp_path: Path) -> None:
    policy = load_policy(POLICIES / "admission.yaml")
    async with running_router(redis_url, policy, tiny_registry, tmp_path,
                              metrics_token="scrape-me") as router:
        assert (await router.http.get("/metrics")).status_code == 401
        wrong = await router.http.get("/metrics", headers={"Authorization": "Bearer no"})
        assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden"
        scraped = await router.http.get("/metrics",
                                        headers={"Authorization": "Bearer scrape-me"})
        assert scraped.status_code == 200 and "laneway_" in scraped.text
        # without tenants, routes and status stay open
        assert (await router.http.get("/v1/status")).status_code == 200
