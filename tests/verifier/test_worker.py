"""The verifier process against a real Redis: real job records, real OCR, real stream."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis
from PIL import Image, ImageFilter

from controlplane import keys
from controlplane.artifacts import LocalArtifactStore, final_key
from controlplane.jobs import (
    ImageRef,
    Job,
    JobRequest,
    JobStatus,
    JobStore,
    StageRecord,
    StageStatus,
)
from controlplane.policy import Policy
from controlplane.policy_store import PolicyStore
from controlplane.verification import JobVerification, VerificationStatus
from controlplane.version_stats import read_stats
from router.submit import new_job_id
from tests.job_edits import edit_job
from tests.verifier.conftest import poster
from tests.verifier.test_quality import numpy_to_pil
from verifier.outcome import REGENERATE_SEED_STEP
from verifier.worker import Verifier, VerifierOptions

PHRASE = "OPEN 24 HOURS"
CHECKS = {"typography": True, "quality": True}
POLICY = Policy.model_validate({
    "engines": {"base": {"kind": "diffusers.text2image", "model": "tiny-sdxl"}},
    "routes": [
        {"name": "flagging", "stages": [{"engine": "base"}],
         "verify": {**CHECKS, "on_fail": "flag"}},
        {"name": "regenerating", "stages": [{"engine": "base"}], "timeout_s": 90,
         "verify": {**CHECKS, "on_fail": "regenerate", "max_attempts": 2}},
        {"name": "quality_only", "stages": [{"engine": "base"}],
         "verify": {"quality": True, "on_fail": "flag"}},
    ],
})
VERIFY_TIMEOUT_S = 60


class Fixture:
    def __init__(self, redis: aioredis.Redis, artifacts: LocalArtifactStore) -> None:
        self.redis = redis
        self.artifacts = artifacts
        self.jobs = JobStore(redis)

    async def completed_job(self, route: str, images: list[Image.Image], *,
                            text: list[str], seed: int = 7) -> Job:
        """A job record as the submitter writes it, completed as the worker completes it:
        final images in the artifact store, verification pending, an entry on the stream."""
        width, height = images[0].size
        job = Job(id=new_job_id(), intent="auto", route=route,
                  policy_version=POLICY.version_id,
                  request=JobRequest(prompt="a shop sign", width=width, height=height,
                                     n=len(images), seed=seed, text=text, tier="standard"),
                  stages=[StageRecord(engine="base", model="tiny-sdxl", model_version="1",
                                      status=StageStatus.queued)])
        await self.redis.set(keys.job(job.id), job.model_dump_json())
        job.transition(JobStatus.running)
        return await self.complete(job, images)

    async def complete(self, job: Job, images: list[Image.Image]) -> Job:
        for i, image in enumerate(images):
            self.artifacts.save(final_key(job.id, i), image)

        def change(j: Job) -> None:
            if j.status is JobStatus.queued:
                j.transition(JobStatus.running)
            j.stages[0].status = StageStatus.completed
            j.images = [ImageRef(index=i, url=f"/v1/jobs/{j.id}/images/{i}", width=im.width,
                                 height=im.height, seed=j.request.seed + i)
                        for i, im in enumerate(images)]
            # what the worker writes on completion (earlier attempts stay in the history)
            j.verification = j.verification.model_copy(
                update={"status": VerificationStatus.pending})
            j.transition(JobStatus.completed)

        job = await edit_job(self.redis, job.id, change)
        await self.redis.xadd(keys.VERIFY_STREAM, {"job": job.id})
        return job

    def verifier(self, *, claim_idle_ms: int = 60_000) -> Verifier:
        return Verifier(self.redis, VerifierOptions(
            name=f"test/verifier/{os.getpid()}", artifacts=self.artifacts, job_ttl_s=3600,
            claim_idle_ms=claim_idle_ms))

    async def verify(self, entries: int) -> Verifier:
        """Run a real verifier loop until it has acknowledged ``entries`` entries."""
        verifier = self.verifier()
        task = asyncio.create_task(verifier.run())
        deadline = time.monotonic() + VERIFY_TIMEOUT_S
        try:
            while verifier.acknowledged < entries and not task.done():
                assert time.monotonic() < deadline, "the verifier did not commit in time"
                await asyncio.sleep(0.02)
        finally:
            verifier.stop()
            await task
        return verifier

    async def verification(self, job_id: str) -> dict:
        """The job's ``verification`` as clients see it."""
        return (await self.jobs.get(job_id)).public()["verification"]

    async def events(self, job_id: str) -> list[tuple[str, dict]]:
        entries = await self.redis.xrange(keys.job_events(job_id))
        return [(f[b"kind"].decode(), json.loads(f[b"data"])) for _, f in entries]

    async def pending_entries(self) -> int:
        return (await self.redis.xpending(keys.VERIFY_STREAM, keys.VERIFY_GROUP))["pending"]


@pytest.fixture
async def fx(redis_url: str, tmp_path: Path) -> AsyncIterator[Fixture]:
    redis = aioredis.Redis.from_url(redis_url)
    await PolicyStore(redis).apply(POLICY, actor="test", reason="verifier tests")
    yield Fixture(redis, LocalArtifactStore(tmp_path / "artifacts"))
    await redis.aclose()


async def test_job_showing_the_requested_text_passes(fx: Fixture) -> None:
    job = await fx.completed_job("flagging", [poster(PHRASE)], text=[PHRASE])
    await fx.verify(1)
    job = await fx.jobs.get(job.id)
    verification = job.public()["verification"]
    assert job.status is JobStatus.completed
    assert verification["status"] == "passed" and verification["action"] == "none"
    typography = verification["typography"]
    assert typography["expected"] == [PHRASE] and typography["passed"]
    assert typography["score"] == 1.0 and typography["found"][0] is not None
    assert verification["quality"]["passed"]
    assert set(verification["quality"]["metrics"]) >= {"mean_luma", "sharpness",
                                                         "size_error_px"}
    assert [a["status"] for a in verification["attempts"]] == ["passed"]
    kinds = [kind for kind, _ in await fx.events(job.id)]
    assert kinds == ["verified"]
    stats = await read_stats(fx.redis, "tiny-sdxl", "1")
    assert (stats.verdicts, stats.verdicts_passed) == (1, 1)
    assert await fx.pending_entries() == 0
    assert await fx.redis.xlen(keys.VERIFY_STREAM) == 0


@pytest.mark.parametrize("shown", ["CL0SED T0DAY", None], ids=["wrong", "missing"])
async def test_wrong_or_missing_text_fails_and_is_flagged(fx: Fixture, shown: str | None
                                                          ) -> None:
    job = await fx.completed_job("flagging", [poster(shown)], text=[PHRASE])
    await fx.verify(1)
    job = await fx.jobs.get(job.id)
    verification = job.public()["verification"]
    assert verification["status"] == "failed"
    assert verification["action"] == "flagged"
    typography = verification["typography"]
    assert typography["expected"] == [PHRASE] and not typography["passed"]
    assert typography["score"] < typography["threshold"]
    if shown is None:
        assert typography["found"] == [None] and typography["score"] == 0.0
    else:
        assert typography["found"][0]
    # flag only marks: the job stays completed and nothing is generated again
    assert job.status is JobStatus.completed and job.images
    assert await fx.redis.xlen(keys.engine_stream("base", "standard")) == 0
    ((kind, data),) = await fx.events(job.id)
    assert kind == "verified" and data["status"] == "failed" and "typography" in data[
        "failed_metrics"]
    stats = await read_stats(fx.redis, "tiny-sdxl", "1")
    assert (stats.verdicts, stats.verdicts_passed) == (1, 0)


def _nan_produced() -> Image.Image:
    decoded = np.full((1, 256, 256, 3), np.nan, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        (image,) = numpy_to_pil(np.clip(decoded / 2 + 0.5, 0, 1))
    return image


@pytest.mark.parametrize(("image", "metric"), [
    (Image.new("RGB", (256, 256)), "mean_luma"),
    (_nan_produced(), "mean_luma"),
    (poster("Grand Opening", blur_px=0).resize((256, 256)).filter(ImageFilter.GaussianBlur(6)),
     "sharpness"),
], ids=["black", "nan", "blurred"])
async def test_bad_frames_fail_the_quality_gate_with_the_metric_named(
        fx: Fixture, image: Image.Image, metric: str) -> None:
    job = await fx.completed_job("quality_only", [image], text=[])
    await fx.verify(1)
    verification = await fx.verification(job.id)
    assert verification["status"] == "failed" and "typography" not in verification
    metrics = verification["quality"]["metrics"]
    assert not metrics[metric]["passed"]
    assert metrics[metric]["threshold"] > 0 and metrics[metric]["limit"] == "min"
    ((_, data),) = await fx.events(job.id)
    assert metric in data["failed_metrics"]


async def test_one_bad_image_fails_the_job_and_each_image_is_reported(fx: Fixture) -> None:
    job = await fx.completed_job("quality_only", [poster("Grand Opening").resize((256, 256)),
                                                  Image.new("RGB", (256, 256))], text=[])
    await fx.verify(1)
    verification = await fx.verification(job.id)
    assert verification["status"] == "failed"
    assert [i["status"] for i in verification["images"]] == ["passed", "failed"]


async def test_regenerate_queues_a_new_attempt_with_a_new_seed_up_to_max_attempts(
        fx: Fixture) -> None:
    job = await fx.completed_job("regenerating", [poster("WRONG")], text=[PHRASE], seed=41)
    await fx.verify(1)
    job = await fx.jobs.get(job.id)
    # attempt 1 failed: the job is generating again, with a new seed, stage 0 queued
    assert job.status is JobStatus.queued and job.completed_at is None and job.images == []
    assert job.request.seed == 41 + REGENERATE_SEED_STEP
    assert job.stages[0].status is StageStatus.queued and job.stages[0].attempts == 0
    ((_, entry),) = await fx.redis.xrange(keys.engine_stream("base", "standard"))
    assert entry[b"job"].decode() == job.id and entry[b"stage"] == b"0"
    assert int(await fx.redis.get(keys.route_inflight("regenerating"))) == 1
    assert job.verification.pending and job.verification.attempt == 2
    (first,) = job.verification.attempts
    assert (first.status, first.action, first.seed) == ("failed", "regenerated", 41)

    # attempt 2 (the worker completes it again) fails too: max_attempts reached, flagged
    job.transition(JobStatus.running)
    await fx.complete(job, [poster("STILL WRONG")])
    await fx.verify(1)
    job = await fx.jobs.get(job.id)
    assert job.status is JobStatus.completed
    verification = job.public()["verification"]
    assert (verification["status"], verification["action"]) == ("failed", "flagged")
    assert verification["attempt"] == 2
    assert [(a["attempt"], a["action"], a["seed"]) for a in verification["attempts"]] == [
        (1, "regenerated", 41), (2, "flagged", 41 + REGENERATE_SEED_STEP)]
    assert await fx.redis.xlen(keys.engine_stream("base", "standard")) == 1  # no third
    kinds = [kind for kind, _ in await fx.events(job.id)]
    assert kinds == ["verified", "queued", "verified"]


async def test_regenerated_attempt_that_passes_ends_the_cycle(fx: Fixture) -> None:
    job = await fx.completed_job("regenerating", [Image.new("RGB", (1024, 1024))],
                                 text=[PHRASE])
    await fx.verify(1)
    job = await fx.jobs.get(job.id)
    job.transition(JobStatus.running)
    await fx.complete(job, [poster(PHRASE)])
    await fx.verify(1)
    verification = await fx.verification(job.id)
    assert (verification["status"], verification["action"]) == ("passed", "none")
    assert [a["status"] for a in verification["attempts"]] == ["failed", "passed"]


async def test_stale_entries_are_acknowledged_without_a_verdict(fx: Fixture) -> None:
    job = await fx.completed_job("flagging", [poster(PHRASE)], text=[PHRASE])
    await edit_job(fx.redis, job.id, lambda j: setattr(
        j, "verification", JobVerification(status=VerificationStatus.passed)))
    await fx.redis.xadd(keys.VERIFY_STREAM, {"job": "j_gone"})
    await fx.verify(2)
    assert await fx.events(job.id) == []
    assert (await fx.jobs.get(job.id)).verification.attempts == []
    assert await fx.pending_entries() == 0


def _start_verifier(redis_url: str, artifacts: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LANEWAY_", "OTEL_"))}
    env.update({"LANEWAY_REDIS_URL": redis_url, "LANEWAY_ARTIFACTS": str(artifacts),
                "LANEWAY_VERIFY_CLAIM_IDLE_MS": "500", "LANEWAY_OCR_THREADS": "1",
                "PYTHONUNBUFFERED": "1"})
    return subprocess.Popen([sys.executable, "-m", "laneway.cli", "verifier"], env=env,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


async def _wait_for(condition, what: str, timeout_s: float = VERIFY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_killed_verifier_loses_nothing_another_reclaims_the_entry(
        fx: Fixture, redis_url: str, tmp_path: Path) -> None:
    # Four 1024² images keep the check busy for a while, so the kill lands mid-check.
    images = [poster(PHRASE, seed=s) for s in range(4)]
    log = tmp_path / "verifier.log"
    first = _start_verifier(redis_url, fx.artifacts.root, log)
    try:
        await _wait_for(lambda: _group_exists(fx.redis), "the first verifier's group")
        job = await fx.completed_job("flagging", images, text=[PHRASE])
        await _wait_for(lambda: _delivered(fx.redis), "the entry to be delivered")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    assert await fx.verification(job.id) == {"status": "pending"}
    assert await fx.pending_entries() == 1

    second = _start_verifier(redis_url, fx.artifacts.root, log)
    try:
        async def verdict_stored() -> bool:
            return (await fx.verification(job.id))["status"] != "pending"
        await _wait_for(verdict_stored, "the second verifier's verdict")
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0, log.read_text()
    verification = await fx.verification(job.id)
    assert verification["status"] == "passed" and len(verification["images"]) == 4
    assert len(verification["attempts"]) == 1
    assert await fx.pending_entries() == 0
    assert "reclaimed" in log.read_text()


async def _group_exists(redis: aioredis.Redis) -> bool:
    try:
        return any(g["name"] == keys.VERIFY_GROUP.encode()
                   for g in await redis.xinfo_groups(keys.VERIFY_STREAM))
    except aioredis.ResponseError:
        return False


async def _delivered(redis: aioredis.Redis) -> bool:
    return (await redis.xpending(keys.VERIFY_STREAM, keys.VERIFY_GROUP))["pending"] > 0


async def test_a_flushed_server_gets_its_verify_group_back(fx: Fixture) -> None:
    verifier = fx.verifier()
    task = asyncio.create_task(verifier.run())
    try:
        deadline = time.monotonic() + VERIFY_TIMEOUT_S
        while not await fx.redis.exists(keys.VERIFY_STREAM):
            assert time.monotonic() < deadline and not task.done(), "no verify group made"
            await asyncio.sleep(0.02)
        await fx.redis.flushall()  # the server lost everything, the group included
        await PolicyStore(fx.redis).apply(POLICY, actor="test", reason="after the flush")
        job = await fx.completed_job("flagging", [poster(PHRASE)], text=[PHRASE])
        while verifier.acknowledged < 1:
            assert time.monotonic() < deadline and not task.done(), "the entry was not read"
            await asyncio.sleep(0.02)
    finally:
        verifier.stop()
        await task
    assert (await fx.verification(job.id))["status"] == "passed"
