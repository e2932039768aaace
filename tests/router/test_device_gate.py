"""Acceptance (issue 11): two engines on one device with ``max_concurrent_stages: 1`` never
run stages at the same time; without the cap, their slots do."""

from __future__ import annotations

import asyncio
from datetime import datetime

import pytest

from controlplane.policy import Devices, Policy
from controlplane.policy_loader import load_policy
from tests.conftest import POLICIES
from tests.router.conftest import RouterFactory

JOBS_PER_ENGINE = 4


@pytest.fixture
def policy() -> Policy:
    return load_policy(POLICIES / "device_gate.yaml")


async def stage_intervals(make_router: RouterFactory, policy: Policy
                          ) -> list[tuple[datetime, datetime]]:
    """Run drafts on sim-a and finals on sim-b through one worker; each stage's
    (started, finished) as the job records them."""
    async with make_router(policy) as router:
        await router.start_worker("sim-a", "sim-b")
        submitted = await asyncio.gather(*(
            router.submit(intent=intent) for intent in ["draft", "final"] * JOBS_PER_ENGINE))
        jobs = [await router.wait_job(r.json()["id"], "completed") for r in submitted]
    assert {job["stages"][0]["engine"] for job in jobs} == {"sim-a", "sim-b"}
    return sorted((datetime.fromisoformat(job["stages"][0]["started_at"]),
                   datetime.fromisoformat(job["stages"][0]["finished_at"])) for job in jobs)


def overlaps(intervals: list[tuple[datetime, datetime]]) -> int:
    """How many stages started before every earlier-started one had finished."""
    count, busy_until = 0, intervals[0][1]
    for started, finished in intervals[1:]:
        count += started < busy_until
        busy_until = max(busy_until, finished)
    return count


async def test_one_stage_at_a_time_on_the_device(make_router: RouterFactory,
                                                 policy: Policy) -> None:
    assert overlaps(await stage_intervals(make_router, policy)) == 0


async def test_without_the_cap_the_engines_overlap(make_router: RouterFactory,
                                                   policy: Policy) -> None:
    uncapped = policy.model_copy(update={"devices": Devices()})
    assert overlaps(await stage_intervals(make_router, uncapped)) > 0
