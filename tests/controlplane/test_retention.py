"""The artifact sweeper on both stores: a job's artifacts go once its record has expired,
never while the record is there (every transition renews its TTL)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis

from controlplane import keys
from controlplane.artifacts import ArtifactStore, final_key, input_key, open_artifact_store
from controlplane.retention import ArtifactSweeper

JOB_TTL_S = 3600


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return open_artifact_store(tmp_path / "artifacts")
    return open_artifact_store(request.getfixturevalue("s3_location"))


@pytest.fixture
async def redis(redis_url: str) -> aioredis.Redis:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_only_jobs_whose_record_is_gone_lose_their_artifacts(
        redis: aioredis.Redis, store: ArtifactStore) -> None:
    for key in (final_key("j_old", 0), input_key("j_old", "image"), final_key("j_live", 0),
                final_key("j_later", 0), final_key("j_unlisted", 0)):
        store.put(key, b"png")
    await redis.set(keys.job("j_live"), "{}", px=60_000)  # renewed by a later transition
    await redis.zadd(keys.artifact_expiry(), {"j_old": 1_000, "j_live": 1_000,
                                              "j_later": 5_000})
    sweeper = ArtifactSweeper(redis, store, interval_s=1, job_ttl_s=JOB_TTL_S)

    assert await sweeper.sweep(2_000) == ["j_old"]
    assert store.keys("j_old/") == []
    assert all(store.exists(final_key(j, 0)) for j in ("j_live", "j_later", "j_unlisted"))
    remaining = dict(await redis.zrange(keys.artifact_expiry(), 0, -1, withscores=True))
    assert set(remaining) == {b"j_live", b"j_later"}
    # rescored to when its record now expires, so it is not looked at again before then
    assert 2_000 + 50_000 < remaining[b"j_live"] <= 2_000 + 60_000
    assert remaining[b"j_later"] == 5_000

    await redis.delete(keys.job("j_live"))
    assert await sweeper.sweep(2_000) == []  # not due yet
    assert sorted(await sweeper.sweep(10**13)) == ["j_later", "j_live"]
    assert not store.exists(final_key("j_live", 0))
    assert store.exists(final_key("j_unlisted", 0))  # only listed jobs are swept
    assert await redis.zcard(keys.artifact_expiry()) == 0


async def test_a_sweep_goes_through_more_than_one_batch(
        redis: aioredis.Redis, tmp_path: Path) -> None:
    store = open_artifact_store(tmp_path)
    ids = [f"j_{i:03d}" for i in range(250)]
    for job_id in ids:
        store.put(final_key(job_id, 0), b"png")
    await redis.zadd(keys.artifact_expiry(), dict.fromkeys(ids, 1))
    sweeper = ArtifactSweeper(redis, store, interval_s=1, job_ttl_s=JOB_TTL_S)
    assert sorted(await sweeper.sweep(2)) == ids
    assert list(tmp_path.iterdir()) == []
