"""A route whose first engine no live worker serves is refused with 503 ``no_engine`` once
the grace period has passed, ``/readyz`` lists the engine but stays ready, and the refusal
ends when a worker for it beats."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from controlplane.policy import Policy
from controlplane.policy_loader import load_policy
from tests.conftest import POLICIES
from tests.router.test_errors import assert_contract_error, router_at


@pytest.fixture
def policy() -> Policy:
    return load_policy(POLICIES / "sim_lane.yaml")


async def until_status(make: Callable[[], Awaitable[httpx.Response]], status: int,
                       *, timeout_s: float = 15) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        response = await make()
        if response.status_code == status:
            return response
        assert time.monotonic() < deadline, f"never {status}: {response.text}"
        await asyncio.sleep(0.05)


async def test_an_engine_nobody_serves_is_refused_and_listed(
        redis_url: str, policy: Policy, tmp_path: Path) -> None:
    async with router_at(redis_url, policy, tmp_path, no_engine_grace_s=0) as router:
        refused = await until_status(lambda: router.submit(intent="draft"), 503)
        error = assert_contract_error(refused, 503, "no_engine")
        assert "sim-draft" in error["message"]
        assert refused.headers["Retry-After"] == "5"

        ready = await router.http.get("/readyz")
        assert ready.status_code == 200, ready.text  # workers scale to zero; the API is fine
        assert ready.json()["engines_without_workers"] == ["sim-draft"]

        await router.start_worker("sim-draft")
        accepted = await until_status(lambda: router.submit(intent="draft"), 202)
        assert accepted.json()["status"] == "queued"
        assert (await router.http.get("/readyz")).json()["engines_without_workers"] == []
