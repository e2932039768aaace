"""Job transitions on a real server: a lost reply, and the caller's retry, change nothing twice.

The client under test runs on a connection that drops the reply of the next EVALSHA after
the server has run the script (what a network fault between the two does); the caller
retries the same call, and the job must show exactly one stream entry, one in-flight count
and one event for the transition — for accept, a stage's completion that queues the next
stage, cancel, and release from deferral.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis.asyncio as aioredis
from PIL import Image
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from controlplane import keys
from controlplane.artifacts import LocalArtifactStore
from controlplane.jobs import Job, JobRequest, JobStatus, JobStore, StageRecord, StageStatus
from controlplane.live_config import LiveConfig
from controlplane.policy_loader import parse_policy
from controlplane.policy_store import PolicyStore
from controlplane.transitions import SCRIPT, Change, Transitions
from engines.lanes import LaneReader
from engines.stage_outcomes import Outcomes
from router.cancel import cancel_job
from router.deferral import DeferralDispatcher
from router.requests import ImageRequest
from router.submit import Submitter, new_job_id
from tests.job_edits import edit_job

POLICY = parse_policy("""
version: 1
limits: {max_pixels: 262144, max_n: 2, max_prompt_chars: 200, default_width: 64,
         default_height: 64}
tiers:
  standard: {weight: 2}
  batch: {weight: 1, deferrable: true}
engines:
  first: {kind: sim, steps: 1, sim: {mean_ms: 10, jitter: 0}}
  second: {kind: sim, steps: 1, sim: {mean_ms: 10, jitter: 0}}
routes:
  - name: two_stages
    stages: [{engine: first}, {engine: second}]
""")


class LosesAReply(aioredis.Connection):
    """A connection that, when armed, drops the reply of the next EVALSHA it sends and
    raises ``error`` (a broken connection, or a reply that never came)."""

    armed: ClassVar[bool] = False
    error: ClassVar[type[Exception]] = RedisConnectionError
    lost: ClassVar[int] = 0
    evalshas: ClassVar[int] = 0

    async def send_command(self, *args: Any, **kwargs: Any) -> None:
        self._last_command = str(args[0]).upper()
        type(self).evalshas += self._last_command == "EVALSHA"
        await super().send_command(*args, **kwargs)

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        response = await super().read_response(*args, **kwargs)
        if type(self).armed and getattr(self, "_last_command", "") == "EVALSHA":
            type(self).armed = False
            type(self).lost += 1
            await self.disconnect()
            raise type(self).error("reply lost (injected by the test)")
        return response


@dataclass
class Fixture:
    redis: aioredis.Redis   # plain client, for setting up and looking
    lossy: aioredis.Redis   # the client under test
    artifacts: LocalArtifactStore

    async def event_kinds(self, job_id: str) -> list[str]:
        return [f[b"kind"].decode() for _, f in await self.redis.xrange(keys.job_events(job_id))]

    async def inflight(self) -> int:
        return int(await self.redis.get(keys.route_inflight("two_stages")) or 0)

    async def lane(self, engine: str, tier: str = "standard") -> int:
        return int(await self.redis.xlen(keys.engine_stream(engine, tier)))


@pytest.fixture
async def fx(redis_url: str, tmp_path: Path) -> AsyncIterator[Fixture]:
    redis = aioredis.Redis.from_url(redis_url)
    lossy = aioredis.Redis(connection_pool=aioredis.ConnectionPool.from_url(
        redis_url, connection_class=LosesAReply))
    await PolicyStore(redis).apply(POLICY, actor="test", reason="transition tests")
    LosesAReply.armed, LosesAReply.lost, LosesAReply.evalshas = False, 0, 0
    LosesAReply.error = RedisConnectionError
    yield Fixture(redis, lossy, LocalArtifactStore(tmp_path / "artifacts"))
    await lossy.aclose()
    await redis.aclose()


def lose_next_reply(error: type[Exception] = RedisConnectionError) -> None:
    LosesAReply.armed, LosesAReply.error = True, error


def assert_one_reply_was_lost() -> None:
    assert LosesAReply.lost == 1 and not LosesAReply.armed


async def submitted(fx: Fixture, client: aioredis.Redis) -> Job:
    live = LiveConfig(client)
    await live.start()
    try:
        submitter = Submitter(client, live, fx.artifacts, job_ttl_s=3600)
        accepted = await submitter.submit(ImageRequest(prompt="a lighthouse", intent="auto"),
                                          job_id=new_job_id())
    finally:
        await live.stop()
    return accepted.job


async def test_a_replayed_accept_queues_the_job_once(fx: Fixture) -> None:
    lose_next_reply()
    job = await submitted(fx, fx.lossy)
    assert_one_reply_was_lost()
    assert await fx.lane("first") == 1
    assert await fx.inflight() == 1
    assert await fx.event_kinds(job.id) == ["queued"]
    stored = await JobStore(fx.redis).get(job.id)
    assert stored.status is JobStatus.queued and stored.stages[0].status is StageStatus.queued


async def test_a_reply_that_timed_out_is_not_waited_for_again(fx: Fixture) -> None:
    # a timeout means the server is not answering: the caller's socket timeout was the
    # whole wait it allowed, so the call fails at once (the API answers 503) instead of
    # waiting that long again per retry
    await fx.redis.script_load(SCRIPT)  # so the counted sends are the calls' own
    lose_next_reply(RedisTimeoutError)
    with pytest.raises(RedisTimeoutError):
        await submitted(fx, fx.lossy)
    assert_one_reply_was_lost()
    assert LosesAReply.evalshas == 1
    # a broken connection is sent again (it fails fast, and the resend is a no-op)
    lose_next_reply(RedisConnectionError)
    await submitted(fx, fx.lossy)
    assert LosesAReply.evalshas == 3


async def test_a_replayed_stage_completion_queues_the_next_stage_once(fx: Fixture) -> None:
    job = await submitted(fx, fx.redis)
    (entry,) = await LaneReader(fx.redis, "w1").take("first", {"standard": 2}, block=False)

    def started(j: Job) -> None:
        j.transition(JobStatus.running)
        j.stages[0].transition(StageStatus.running)
        j.stages[0].attempts = 1

    job = await edit_job(fx.redis, job.id, started)
    lose_next_reply()
    done = await Outcomes(fx.lossy, job_ttl_s=3600).complete(
        entry, job, 1, [Image.new("RGB", (64, 64))], run_ms=5, batch_size=1, cost=None,
        verify=False)
    assert_one_reply_was_lost()
    assert done is not None and done.stages[0].status is StageStatus.completed
    assert (await fx.lane("first"), await fx.lane("second")) == (0, 1)
    assert await fx.inflight() == 1
    assert await fx.event_kinds(job.id) == ["queued", "stage_completed"]
    assert (await JobStore(fx.redis).get(job.id)).stages[1].status is StageStatus.queued


async def test_a_replayed_cancel_counts_the_job_out_once(fx: Fixture) -> None:
    job = await submitted(fx, fx.redis)
    lose_next_reply()
    cancelled, changed = await cancel_job(JobStore(fx.lossy),
                                          Transitions(fx.lossy, job_ttl_s=3600), job.id)
    assert_one_reply_was_lost()
    assert changed and cancelled.status is JobStatus.cancelled
    assert await fx.inflight() == 0
    assert await fx.event_kinds(job.id) == ["queued", "cancelled"]
    again, changed = await cancel_job(JobStore(fx.redis),
                                      Transitions(fx.redis, job_ttl_s=3600), job.id)
    assert not changed and again.status is JobStatus.cancelled
    assert await fx.inflight() == 0


async def test_a_replayed_release_from_deferral_queues_the_job_once(fx: Fixture) -> None:
    job = Job(id=new_job_id(), intent="auto", route="two_stages",
              policy_version=POLICY.version_id,
              request=JobRequest(prompt="later", width=64, height=64, seed=1, tier="batch"),
              stages=[StageRecord(engine="first"), StageRecord(engine="second")])
    change = Change(job)
    change.effects.xadd(keys.deferred_stream(), {"job": job.id})
    change.effects.incr(keys.route_inflight("two_stages"))
    change.event("deferred", route=job.route)
    await Transitions(fx.redis, job_ttl_s=3600).create(change)
    assert job.deadline_ms is None  # a deferred job's deadline starts at its release
    live = LiveConfig(fx.lossy)
    await live.start()
    try:
        dispatcher = DeferralDispatcher(fx.lossy, live, job_ttl_s=3600)
        lose_next_reply()
        assert await dispatcher.release_ready(POLICY) == 1
        assert await dispatcher.release_ready(POLICY) == 0
    finally:
        await live.stop()
    assert_one_reply_was_lost()
    assert await fx.lane("first", "batch") == 1
    assert await fx.redis.xlen(keys.deferred_stream()) == 0
    assert await fx.inflight() == 1
    assert await fx.event_kinds(job.id) == ["deferred", "queued"]
    released = await JobStore(fx.redis).get(job.id)
    assert released.deadline_ms is not None


def test_a_plan_is_checked_against_the_state_machine() -> None:
    job = Job(id="j_x", intent="auto", route="r", policy_version="v",
              request=JobRequest(prompt="p", width=64, height=64, seed=1, tier="standard"),
              stages=[StageRecord(engine="first", status=StageStatus.completed)])
    with pytest.raises(Exception, match="illegal transition"):
        job.stages[0].transition(StageStatus.running)
    job.transition(JobStatus.cancelled)
    with pytest.raises(Exception, match="illegal transition"):
        job.transition(JobStatus.running)
