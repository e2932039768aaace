"""After the server restarts (killed with -9, AOF replayed) or loses its data (FLUSHALL),
the running API and workers carry on without a restart by hand: waiting requests are woken,
SSE streams end, cancels reach the worker, lanes' groups are made again."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from controlplane.policy import Policy, RemoteRules
from controlplane.policy_loader import load_policy
from engines.worker import Worker
from laneway.serve import publish_policy
from tests.conftest import POLICIES
from tests.router.conftest import Router
from tests.router.test_errors import assert_contract_error, frozen, own_valkey, router_at

TIMEOUT_S = 30.0
#: issue 12, acceptance 2: Redis stopped (SIGSTOP) this long, then continued
STOPPED_S = 20.0


@pytest.fixture
def policy() -> Policy:
    return load_policy(POLICIES / "sim_lane.yaml")


async def answered(make: Callable[[], Awaitable[httpx.Response]]) -> httpx.Response:
    """The first answer that is not the 503 of a server still coming back."""
    deadline = time.monotonic() + TIMEOUT_S
    while (response := await make()).status_code == 503:
        assert time.monotonic() < deadline, response.text
        await asyncio.sleep(0.1)
    return response


async def until(check: Callable[[], Awaitable[Any]], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def a_waited_job_completes(router: Router) -> dict[str, Any]:
    response = await answered(lambda: router.submit(intent="draft", wait=TIMEOUT_S))
    job = response.json()
    assert response.status_code == 200 and job["status"] == "completed", response.text
    return dict(job)


async def everything_works_again(router: Router, worker: Worker) -> None:
    """What clients do after an outage, without a restart of Laneway by hand."""
    # the API's job-done subscription is back: the wait ends with the job
    job = await a_waited_job_completes(router)
    events = await router.events(job["id"])
    assert events[-1][0] == "completed", events
    generated = await answered(lambda: router.http.post(
        "/v1/images/generations", json={"prompt": "after", "size": "64x64"}))
    assert generated.status_code == 200 and generated.json()["data"], generated.text

    # the worker's cancel subscription is back: a cancel reaches the running job
    running = (await answered(lambda: router.submit(intent="draft"))).json()
    await router.wait_job(running["id"], "running")
    cancelled = await router.http.delete(f"/v1/jobs/{running['id']}")
    assert cancelled.status_code == 200, cancelled.text
    await until(lambda: asyncio.sleep(0, running["id"] in worker.runner.cancelled),
                "the cancel never reached the worker")
    assert (await router.job(running["id"]))["status"] == "cancelled"


async def test_a_killed_and_restarted_server_changes_nothing_for_clients(
        policy: Policy, tmp_path: Path) -> None:
    with own_valkey(tmp_path / "valkey") as server:
        async with router_at(server.url, policy, tmp_path, redis_timeout_s=0.5) as router:
            worker = await router.start_worker("sim-draft")
            await a_waited_job_completes(router)
            assert server.pid is not None
            os.kill(server.pid, signal.SIGKILL)
            await until(lambda: asyncio.sleep(0, server.poll() is not None), "server dead")
            await asyncio.to_thread(server.restart)
            await everything_works_again(router, worker)


async def test_a_server_stopped_for_20_s_gives_503s_then_everything_works(
        policy: Policy, tmp_path: Path) -> None:
    with own_valkey(tmp_path / "valkey") as server:
        async with router_at(server.url, policy, tmp_path, redis_timeout_s=0.5) as router:
            worker = await router.start_worker("sim-draft")
            await a_waited_job_completes(router)
            with frozen(server):
                deadline = time.monotonic() + STOPPED_S
                while time.monotonic() < deadline:  # clients keep calling through it
                    refused = await router.submit(intent="draft", wait=5)
                    assert_contract_error(refused, 503, "redis_unavailable")
                    assert refused.headers["Retry-After"]
                    openai = await router.http.post("/v1/images/generations",
                                                    json={"prompt": "during"})
                    assert openai.status_code == 503, openai.text
                    assert set(openai.json()["error"]) >= {"message", "type", "code"}
            await everything_works_again(router, worker)


async def test_a_flushed_server_gets_its_lanes_back(redis_url: str, policy: Policy,
                                                     tmp_path: Path) -> None:
    async with router_at(redis_url, policy, tmp_path) as router:
        await router.start_worker("sim-draft")
        await a_waited_job_completes(router)
        await router.redis.flushall()  # everything lost, the lanes' groups included
        await publish_policy(redis_url, policy, router.registry, remote=RemoteRules())
        await a_waited_job_completes(router)
