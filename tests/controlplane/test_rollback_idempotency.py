"""Issue 12 (acceptance 9): rollback is idempotent, and concurrent writes to one model's
deployment state give exactly one winner and one 409, against a real Redis."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from controlplane import deployment_writes, keys
from controlplane.deployment_writes import ModelState, ModelWrite
from controlplane.deployments import Deployment, DeploymentStore
from controlplane.errors import Conflict
from controlplane.registry import Registry
from controlplane.rollback import rollback_model
from controlplane.rollouts import Phase, Rollout, RolloutStore, apply_transition, start_rollout
from tests.controlplane.rollout_fixtures import MODEL, deployed, policy
from tests.router.conftest import running_router

T0 = 1_000_000.0
OTHER = "other-model"
TOKEN = "s3cret-admin"


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    await deployed(client)
    yield client
    await client.aclose()


async def _start(redis: aioredis.Redis, version: str = "2", model: str = MODEL) -> Rollout:
    return await start_rollout(redis, model=model, version=version, now_s=T0, actor="alice",
                               steps=(50.0, 100.0), interval_s=10.0, min_samples=5)


async def _rollback(redis: aioredis.Redis, to: str | None = None):  # noqa: ANN202
    return await rollback_model(redis, MODEL, actor="oncall", reason="pages", now_s=T0,
                                to=to)


async def _stored(redis: aioredis.Redis) -> tuple[int, Any, int, Any]:
    """What a rollback may write: audit length, deployment record, history, rollout."""
    return (await redis.llen(keys.audit_log()), await redis.hget(keys.deployments(), MODEL),
            await redis.llen(keys.stable_history(MODEL)),
            await redis.hget(keys.rollouts(), MODEL))


def _both_read_before_either_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hold every commit until two callers have read and planned: the race, made certain."""
    barrier = asyncio.Barrier(2)
    real = deployment_writes.commit

    async def commit(redis: aioredis.Redis, state: ModelState, write: ModelWrite
                     ) -> Deployment:
        await barrier.wait()
        return await real(redis, state, write)

    monkeypatch.setattr(deployment_writes, "commit", commit)


async def _race(*calls: Awaitable[Any]) -> list[Any]:
    async with asyncio.timeout(10):
        return await asyncio.gather(*calls, return_exceptions=True)


async def test_a_second_rollback_after_a_promotion_changes_nothing(
        redis: aioredis.Redis) -> None:
    rollout = await _start(redis)
    await apply_transition(redis, rollout, Phase.promoted, now_s=T0, actor="alice",
                           reason="good")
    first = await _rollback(redis)
    assert (first.stable_before, first.stable_after, first.changed) == ("2", "1", True)
    before = await _stored(redis)

    second = await _rollback(redis)
    assert (second.stable_after, second.changed) == ("1", False)
    assert second.message == "already at 1"
    assert await _stored(redis) == before       # no audit entry, no deployment write

    # --to still moves, once
    moved = await _rollback(redis, to="2")
    assert (moved.stable_before, moved.stable_after, moved.changed) == ("1", "2", True)
    after_move = await _stored(redis)
    assert after_move[0] == before[0] + 1
    again = await _rollback(redis, to="2")
    assert (again.changed, again.message) == (False, "already at 2")
    assert await _stored(redis) == after_move


async def test_a_second_rollback_after_aborting_a_rollout_changes_nothing(
        redis: aioredis.Redis) -> None:
    await _start(redis)
    first = await _rollback(redis)
    assert (first.stable_after, first.aborted_canary, first.changed) == ("1", "2", True)
    assert (await RolloutStore(redis).require(MODEL)).phase is Phase.aborted
    before = await _stored(redis)
    deployment = await DeploymentStore(redis).get(MODEL)
    assert deployment is not None and deployment.canary is None

    second = await _rollback(redis)
    assert (second.stable_after, second.aborted_canary, second.changed) == ("1", None, False)
    assert await _stored(redis) == before


async def test_the_first_rollback_still_needs_somewhere_to_go(redis: aioredis.Redis) -> None:
    before = await _stored(redis)
    with pytest.raises(Conflict, match="no previous stable"):
        await _rollback(redis)
    assert await _stored(redis) == before


async def test_two_concurrent_rollout_starts_one_wins_the_other_gets_409(
        redis: aioredis.Redis) -> None:
    results = await _race(_start(redis, "2"), _start(redis, "3"))
    won = [r for r in results if isinstance(r, Rollout)]
    lost = [r for r in results if isinstance(r, BaseException)]
    assert len(won) == 1 and len(lost) == 1 and isinstance(lost[0], Conflict), results
    deployment = await DeploymentStore(redis).get(MODEL)
    assert deployment is not None and deployment.canary == won[0].canary
    stored = await RolloutStore(redis).require(MODEL)
    assert stored.canary == won[0].canary
    actions = [json.loads(row)["action"] for row in await redis.lrange(keys.audit_log(), 0, -1)]
    assert actions.count("rollout.start") == 1


async def test_two_starts_that_both_read_before_either_writes_give_one_409(
        redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    _both_read_before_either_writes(monkeypatch)
    results = await _race(_start(redis, "2"), _start(redis, "3"))
    assert sorted(type(r).__name__ for r in results) == ["Conflict", "Rollout"], results
    (lost,) = [r for r in results if isinstance(r, Conflict)]
    assert lost.status_code == 409 and lost.code == "conflict"
    assert "changed meanwhile" in lost.message


async def test_a_start_racing_a_rollback_leaves_one_consistent_winner(
        redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    _both_read_before_either_writes(monkeypatch)
    started, rolled_back = await _race(_start(redis, "2"), _rollback(redis, to="3"))
    deployment = await DeploymentStore(redis).get(MODEL)
    rollout = await RolloutStore(redis).get(MODEL)
    assert deployment is not None
    if isinstance(started, Rollout):
        assert isinstance(rolled_back, Conflict)
        assert (deployment.stable, deployment.canary) == ("1", "2")
        assert rollout is not None and rollout.phase is Phase.progressing
    else:
        assert isinstance(started, Conflict), started
        assert rolled_back.stable_after == "3"
        assert (deployment.stable, deployment.canary) == ("3", None)
        assert rollout is None


async def test_writes_to_different_models_never_refuse_each_other(
        redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    await DeploymentStore(redis).put(Deployment(model=OTHER, stable="1"))
    _both_read_before_either_writes(monkeypatch)
    results = await _race(_start(redis, "2"), _start(redis, "2", model=OTHER))
    assert all(isinstance(r, Rollout) for r in results), results


async def test_a_stale_rollout_copy_is_refused_after_a_new_rollout_began(
        redis: aioredis.Redis) -> None:
    old = await _start(redis)
    await _rollback(redis)                       # aborts it
    await _start(redis, "3")                     # a new rollout, revision 0 again
    with pytest.raises(Conflict, match="changed meanwhile"):
        await apply_transition(redis, old, Phase.promoted, now_s=T0, actor="bob",
                               reason="stale")
    deployment = await DeploymentStore(redis).get(MODEL)
    assert deployment is not None and (deployment.stable, deployment.canary) == ("1", "3")


# -- through the admin API and the CLI --------------------------------------------------


async def test_admin_api_and_cli(redis_url: str, tiny_registry: Registry, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_router(redis_url, policy(), tiny_registry, tmp_path,
                              admin_token=TOKEN) as router:
        headers = {"Authorization": f"Bearer {TOKEN}"}

        async def post(path: str, body: dict[str, Any]) -> Any:
            return await router.http.post(path, json=body, headers=headers)

        stable = (await DeploymentStore(router.redis).get(MODEL)).stable  # type: ignore[union-attr]
        other = "1" if stable != "1" else "2"
        _both_read_before_either_writes(monkeypatch)
        start = {"model": MODEL, "version": other, "steps": [50]}
        responses = await _race(post("/v1/admin/rollouts", start),
                                post("/v1/admin/rollouts", start))
        assert sorted(r.status_code for r in responses) == [201, 409], responses
        (refused,) = [r for r in responses if r.status_code == 409]
        assert refused.json()["error"]["code"] == "conflict"
        assert set(refused.json()["error"]) == {"code", "message", "details"}
        monkeypatch.undo()

        first = await post(f"/v1/admin/models/{MODEL}/rollback", {"reason": "pages"})
        assert first.status_code == 200, first.text
        assert first.json() | {"changed": True} == first.json()
        assert first.json()["aborted_canary"] == other
        audit_n = await router.redis.llen(keys.audit_log())
        second = await post(f"/v1/admin/models/{MODEL}/rollback", {"reason": "pages"})
        assert second.status_code == 200
        assert (second.json()["changed"], second.json()["message"]) == (
            False, f"already at {stable}")

        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parents[2]),
               "LANEWAY_URL": str(router.http.base_url).rstrip("/"),
               "LANEWAY_ADMIN_TOKEN": TOKEN}
        done = await asyncio.to_thread(_run_cli, env, "rollback", MODEL)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"{MODEL}: already at {stable}"
        assert await router.redis.llen(keys.audit_log()) == audit_n


def _run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "laneway.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)

