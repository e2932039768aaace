"""Acceptance 6: a job's Server-Sent Events, live and for a client that connects late."""

from __future__ import annotations

import asyncio
import json

import pytest

from controlplane.jobs import Event, Job, JobStatus, JobStore
from controlplane.policy import Policy
from controlplane.policy_loader import load_policy
from controlplane.verification import JobVerification, VerificationStatus
from router.job_events import job_event_messages
from tests.conftest import POLICIES
from tests.job_edits import edit_job
from tests.router.conftest import RouterFactory


@pytest.fixture
def policy() -> Policy:
    return load_policy(POLICIES / "admission.yaml")


async def test_live_stream_shows_queued_dispatched_completed_in_order(
        make_router: RouterFactory, policy: Policy) -> None:
    async with make_router(policy) as router:
        job = (await router.submit(intent="final")).json()
        live = asyncio.create_task(router.events(job["id"]))
        await asyncio.sleep(0.2)  # the client is connected and waiting before any work
        assert not live.done()
        await router.start_worker("base")
        events = await asyncio.wait_for(live, timeout=60)

        kinds = [kind for kind, _, _ in events]
        assert kinds[0] == "state" and events[0][1]["status"] == "queued"
        assert kinds[1] == "queued" and kinds[-1] == "completed"
        assert kinds.index("queued") < kinds.index("dispatched") < kinds.index(
            "stage_completed") < kinds.index("completed")
        assert events[kinds.index("dispatched")][1]["worker"] == "test/cpu/0"
        ids = [event_id for _, _, event_id in events[1:]]
        assert all(ids) and ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))

        # a late client gets the current state first, then the whole history, then the end
        late = await router.events(job["id"])
        assert late[0][0] == "state" and late[0][1]["status"] == "completed"
        assert [kind for kind, _, _ in late] == kinds

        # reconnecting with Last-Event-ID resumes after that event
        dispatched_id = ids[kinds.index("dispatched") - 1]
        resumed = await router.events(job["id"], last_event_id=dispatched_id)
        assert [kind for kind, _, _ in resumed] == ["state", *kinds[kinds.index("dispatched")
                                                                   + 1:]]

        assert (await router.http.get("/v1/jobs/j_nope/events")).status_code == 404


async def test_stream_waits_for_a_pending_verification(make_router: RouterFactory,
                                                       policy: Policy) -> None:
    async with make_router(policy) as router:
        jobs = JobStore(router.redis)
        job_ids = [(await router.submit(intent="draft")).json()["id"] for _ in range(2)]
        for job_id in job_ids:  # completed with verification pending, as a worker leaves it
            def complete(job: Job) -> None:
                job.transition(JobStatus.running)
                job.transition(JobStatus.completed)
                job.verification = JobVerification(status=VerificationStatus.pending)

            await edit_job(router.redis, job_id, complete,
                           events=(Event("completed", {"status": "completed"}),))

        async def kinds(job_id: str, verified_wait_s: float) -> list[str]:
            messages = await job_event_messages(router.redis, jobs, job_id,
                                                verified_wait_s=verified_wait_s)
            return [m.event async for m in messages if m.event]

        verified_later = asyncio.create_task(kinds(job_ids[0], 30))
        await asyncio.sleep(0.3)
        assert not verified_later.done()  # held open after `completed`
        def passed(job: Job) -> None:
            job.verification = JobVerification(status=VerificationStatus.passed)

        await edit_job(router.redis, job_ids[0], passed,
                       events=(Event("verified", {"status": "passed"}),))
        assert await asyncio.wait_for(verified_later, 10) == [
            "state", "queued", "completed", "verified"]

        # no verdict within the bound: the stream still ends
        assert await asyncio.wait_for(kinds(job_ids[1], 0.2), 15) == [
            "state", "queued", "completed"]
        first = await anext(await job_event_messages(router.redis, jobs, job_ids[1]))
        assert json.loads(str(first.data))["verification"] == {"status": "pending"}
