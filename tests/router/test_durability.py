"""Acceptance 4: restarting the bundled server between submit and dispatch loses no job."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis.asyncio as aioredis

from controlplane import keys
from controlplane.jobs import JobStatus, JobStore
from controlplane.policy_loader import load_policy
from controlplane.registry import Registry
from laneway.embedded_redis import EmbeddedRedis
from tests.conftest import POLICIES
from tests.router.conftest import running_router


async def test_server_restart_between_submit_and_dispatch_loses_no_job(
        tiny_registry: Registry, tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "valkey", die_with_parent=True)
    url = server.start()
    worker = None
    try:
        policy = load_policy(POLICIES / "admission.yaml")
        async with running_router(url, policy, tiny_registry, tmp_path) as router:
            draft = (await router.submit({"Idempotency-Key": "keep-me"}, intent="draft")).json()
            final = (await router.submit(intent="final")).json()
        await asyncio.to_thread(server.stop)  # SIGTERM: the server flushes its AOF and exits

        url = await asyncio.to_thread(server.start)
        assert not server.reused
        redis = aioredis.Redis.from_url(url)
        jobs = JobStore(redis)
        assert await redis.xlen(keys.engine_stream("turbo", "standard")) == 1
        assert await redis.xlen(keys.engine_stream("base", "standard")) == 1
        claim = await redis.get(keys.idempotency("default", "keep-me"))
        assert claim.decode().partition(":")[0] == draft["id"]
        assert (await jobs.get(draft["id"])).status is JobStatus.queued

        env = {**os.environ, "LANEWAY_REDIS_URL": url,
               "LANEWAY_REGISTRY": str(tiny_registry.root),
               "LANEWAY_ARTIFACTS": str(tmp_path / "artifacts")}
        worker = subprocess.Popen(
            [sys.executable, "-m", "laneway.cli", "worker", "--engines", "turbo,base"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 90
        for job_id in (draft["id"], final["id"]):
            while (job := await jobs.get(job_id)).status is not JobStatus.completed:
                assert worker.poll() is None, worker.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
                assert time.monotonic() < deadline, (job.error, job.stages)
                await asyncio.sleep(0.1)
            assert job.stages[0].attempts == 1 and len(job.images) == 1
        assert await redis.get(keys.route_inflight("fast_draft")) == b"0"
        await redis.aclose()
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
        await asyncio.to_thread(server.stop)
