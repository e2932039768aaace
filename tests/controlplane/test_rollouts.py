"""Rollout state machine, reconcile loop and rollback against a real Redis, time injected."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from controlplane import audit
from controlplane.artifacts import LocalArtifactStore
from controlplane.deployments import DeploymentStore
from controlplane.errors import Conflict, ValidationFailed
from controlplane.jobs import JobStore
from controlplane.live_config import LiveConfig
from controlplane.reconcile import Controller
from controlplane.rollback import rollback_model
from controlplane.rollouts import Phase, RolloutStore, apply_transition, start_rollout
from router.requests import ImageRequest
from router.submit import Submitter
from tests.controlplane.rollout_fixtures import MODEL, deployed, record

T0 = 1_000_000.0


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    await deployed(client)
    yield client
    await client.aclose()


async def _start(redis: aioredis.Redis, **kw: object) -> None:
    options = {"steps": (50.0, 100.0), "interval_s": 10.0, "min_samples": 5} | kw
    await start_rollout(redis, model=MODEL, version="2", now_s=T0, actor="alice",
                        reason="new weights", **options)  # type: ignore[arg-type]


async def test_a_25_percent_canary_gets_about_a_quarter_of_jobs_sticky_per_job(
        redis: aioredis.Redis, tmp_path: Path) -> None:
    await _start(redis, steps=(25.0, 60.0))
    live = LiveConfig(redis)
    await live.reload()  # one snapshot: the deployment at 25 %
    submitter = Submitter(redis, live, LocalArtifactStore(tmp_path), 3600)
    jobs = [(await submitter.submit(ImageRequest(prompt="a lighthouse"))).job
            for _ in range(200)]
    stored = [await JobStore(redis).get(job.id) for job in jobs]
    versions = [job.stages[0].model_version for job in stored]
    share = versions.count("2") / len(versions)
    assert 0.15 <= share <= 0.35, share
    assert set(versions) == {"1", "2"}
    # sticky: at a higher weight every job that had the canary still has it
    rollout = await RolloutStore(redis).require(MODEL)
    await apply_transition(redis, rollout, Phase.progressing, step_index=1, now_s=T0,
                           actor="alice", reason="test")
    deployment = await DeploymentStore(redis).get(MODEL)
    assert deployment is not None and deployment.canary_weight == 60.0
    for job, version in zip(stored, versions, strict=True):
        if version == "2":
            assert deployment.pick(job.id) == "2"


async def test_the_transition_table_refuses_leaving_a_final_phase(
        redis: aioredis.Redis) -> None:
    await _start(redis)
    rollout = await RolloutStore(redis).require(MODEL)
    aborted = await apply_transition(redis, rollout, Phase.aborted, now_s=T0, actor="bob",
                                     reason="looks wrong")
    deployment = await DeploymentStore(redis).get(MODEL)
    assert deployment is not None and (deployment.stable, deployment.canary) == ("1", None)
    with pytest.raises(Conflict, match="aborted"):
        await apply_transition(redis, aborted, Phase.progressing, now_s=T0, actor="bob",
                               reason="again")
    # a stale copy of the rollout is refused too
    with pytest.raises(Conflict):
        await apply_transition(redis, rollout, Phase.paused, now_s=T0, actor="bob", reason="x")


async def test_bad_steps_and_a_second_active_rollout_are_refused(
        redis: aioredis.Redis) -> None:
    with pytest.raises(ValidationFailed, match="steps"):
        await _start(redis, steps=(50.0, 20.0))
    with pytest.raises(ValidationFailed, match="version"):
        await start_rollout(redis, model=MODEL, version="1", now_s=T0, actor="a")
    await _start(redis)
    with pytest.raises(Conflict, match="already"):
        await _start(redis)


async def test_a_failing_canary_is_aborted_once_it_has_its_minimum_sample(
        redis: aioredis.Redis) -> None:
    await record(redis, "1", ok=40)
    await _start(redis)
    controller = Controller(redis)
    await record(redis, "2", ok=1, failed=3)           # below min_samples (5)
    assert await controller.tick(T0 + 11) == []
    await record(redis, "2", ok=0, failed=2)
    assert await controller.tick(T0 + 5) == []           # not yet an interval: waits
    (after,) = await controller.tick(T0 + 12)
    assert after.phase is Phase.aborted
    deployment = await DeploymentStore(redis).get(MODEL)
    assert deployment is not None and (deployment.stable, deployment.canary) == ("1", None)
    last = (await audit.recent(redis, target=MODEL))[-1]
    assert (last.actor, last.action) == ("controller", "rollout.aborted")
    assert "error rate" in last.reason and "FAILED" in last.reason


async def test_a_healthy_canary_is_promoted_step_by_step(redis: aioredis.Redis) -> None:
    await record(redis, "1", ok=30, failed=1)
    await _start(redis)
    controller = Controller(redis)
    await record(redis, "2", ok=6)
    (step,) = await controller.tick(T0 + 10)
    assert (step.phase, step.weight) == (Phase.progressing, 100.0)
    assert await controller.tick(T0 + 15) == []          # next interval not reached
    (done,) = await controller.tick(T0 + 20)
    assert done.phase is Phase.promoted
    deployment = await DeploymentStore(redis).get(MODEL)
    assert deployment is not None and (deployment.stable, deployment.canary) == ("2", None)
    actions = [e.action for e in await audit.recent(redis, target=MODEL)]
    assert actions == ["rollout.start", "rollout.step", "rollout.promoted"]
    # and the version before it is what rollback goes back to
    result = await rollback_model(redis, MODEL, actor="oncall", reason="p95", now_s=T0 + 30)
    assert (result.stable_before, result.stable_after) == ("2", "1")


async def test_a_slow_canary_fails_the_p95_check(redis: aioredis.Redis) -> None:
    await record(redis, "1", ok=30, run_ms=100)
    await _start(redis)
    await record(redis, "2", ok=6, run_ms=400)
    (after,) = await Controller(redis).tick(T0 + 10)
    assert after.phase is Phase.aborted and "p95" in after.message


async def test_only_the_lock_holder_reconciles(redis: aioredis.Redis) -> None:
    first, second = Controller(redis), Controller(redis)
    assert await first.hold_lock()
    assert not await second.hold_lock()
    await _start(redis)
    await record(redis, "2", ok=6)
    assert await second.tick(T0 + 10) == []
    assert len(await first.tick(T0 + 10)) == 1
    await first.release_lock()
    assert await second.hold_lock()


async def test_rollback_during_a_rollout_puts_all_traffic_on_stable(
        redis: aioredis.Redis) -> None:
    await _start(redis)
    result = await rollback_model(redis, MODEL, actor="oncall", reason="pages firing",
                                  now_s=T0 + 1)
    assert (result.stable_after, result.aborted_canary) == ("1", "2")
    deployment = await DeploymentStore(redis).get(MODEL)
    assert deployment is not None and deployment.canary is None
    rollout = await RolloutStore(redis).require(MODEL)
    assert rollout.phase is Phase.aborted
    entries = await audit.recent(redis, target=MODEL)
    assert [(e.actor, e.action, e.reason) for e in entries][-1] == (
        "oncall", "rollback", "pages firing")


async def test_rollback_without_history_or_to_an_unknown_version_is_refused(
        redis: aioredis.Redis) -> None:
    with pytest.raises(Conflict, match="no previous stable"):
        await rollback_model(redis, MODEL, actor="a", reason="r", now_s=T0)
    with pytest.raises(ValidationFailed, match="to"):
        await rollback_model(redis, MODEL, actor="a", reason="r", now_s=T0, to="9",
                             known_versions=["1", "2"])
    result = await rollback_model(redis, MODEL, actor="a", reason="r", now_s=T0, to="2",
                                  known_versions=["1", "2"])
    assert result.stable_after == "2"
