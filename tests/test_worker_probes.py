"""A worker's own liveness and readiness probe (``laneway worker --probe-port``): ready
once it serves its engines, not ready while Redis does not answer, gone when it stops."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from controlplane.artifacts import open_artifact_store
from controlplane.policy import RemoteRules
from controlplane.policy_loader import load_policy
from controlplane.registry import Registry
from engines.worker import Worker, WorkerOptions
from laneway.embedded_redis import EmbeddedRedis
from laneway.serve import publish_policy
from tests.conftest import POLICIES
from tests.service import free_port
from verifier.worker import Verifier, VerifierOptions

START_TIMEOUT_S = 60.0


@pytest.fixture
def own_valkey(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A server of this test's own: the test stops it (SIGSTOP) for a while."""
    server = EmbeddedRedis(tmp_path / "valkey", die_with_parent=True)
    server.start()
    yield server
    server.stop()


def wait_status(url: str, status: int, timeout_s: float = START_TIMEOUT_S) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=5)
            if response.status_code == status:
                return response
            last = response.text
        except httpx.TransportError as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered {status}; last: {last}")


def test_readyz_follows_redis_and_the_probe_goes_with_the_process(
        own_valkey: EmbeddedRedis, tmp_path: Path) -> None:
    asyncio.run(publish_policy(own_valkey.url, load_policy(POLICIES / "sim_lane.yaml"),
                               Registry(tmp_path / "registry"), remote=RemoteRules()))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LANEWAY_", "OTEL_"))}
    env |= {"LANEWAY_REDIS_URL": own_valkey.url, "LANEWAY_HOME": str(tmp_path),
            "LANEWAY_ARTIFACTS": str(tmp_path / "artifacts")}
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "laneway.cli", "worker", "--engines", "sim-draft",
         "--device", "sim", "--probe-port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        ready = wait_status(f"{base}/readyz", 200)
        assert ready.json() == {"status": "ready"}
        assert httpx.get(f"{base}/livez").json() == {"status": "alive"}
        assert httpx.get(f"{base}/metrics").status_code == 404
        assert own_valkey.pid is not None
        os.kill(own_valkey.pid, signal.SIGSTOP)
        try:
            stopped = wait_status(f"{base}/readyz", 503, timeout_s=10)
            (problem,) = stopped.json()["problems"]
            assert problem.startswith("Redis did not answer a PING"), problem
            assert httpx.get(f"{base}/livez", timeout=5).status_code == 200
        finally:
            os.kill(own_valkey.pid, signal.SIGCONT)
        wait_status(f"{base}/readyz", 200, timeout_s=10)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/livez")
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        log.close()
    assert "probes on http://127.0.0.1:" in (tmp_path / "worker.log").read_text()


async def test_a_worker_with_nothing_to_serve_says_why_it_is_not_ready(
        redis_url: str, tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    await publish_policy(redis_url, load_policy(POLICIES / "memory_budget.yaml"), registry,
                         remote=RemoteRules())
    redis = aioredis.Redis.from_url(redis_url)

    def worker(*engines: str, memory_gb: float | None = None) -> Worker:
        return Worker(redis, WorkerOptions(
            name=f"test/sim/{len(engines)}-{memory_gb}", device="sim", registry=registry,
            artifacts=open_artifact_store(str(tmp_path / "artifacts")), job_ttl_s=60,
            engines=frozenset(engines), memory_gb=memory_gb))

    stranger, too_big, serving = (worker("no-such-engine"),
                                  worker("sim-a", "sim-b", memory_gb=1.0), worker("sim-a"))
    assert stranger.not_ready() == ["the policy in force is not read yet"]
    tasks = [asyncio.create_task(w.run()) for w in (stranger, too_big, serving)]
    try:
        deadline = time.monotonic() + 10
        while not (stranger.live.loaded and too_big.live.loaded and serving.not_ready() == []):
            assert time.monotonic() < deadline, "the workers never read the policy"
            await asyncio.sleep(0.02)
        assert stranger.not_ready() == [
            "the policy in force has no engine this worker serves (see --engines)"]
        assert too_big.not_ready() == [
            "every engine it serves is over its memory budget of 1.0 GB: sim-a, sim-b"]
        serving.stop()
        assert serving.not_ready() == ["stopping: draining the stages it runs"]
    finally:
        for w in (stranger, too_big, serving):
            w.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
        await redis.aclose()


async def test_a_verifier_is_ready_once_its_ocr_models_are_loaded(redis_url: str,
                                                                  tmp_path: Path) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    verifier = Verifier(redis, VerifierOptions(
        name="test/verifier", artifacts=open_artifact_store(str(tmp_path)), job_ttl_s=60,
        claim_idle_ms=60_000))
    assert verifier.not_ready() == ["loading the OCR models"]
    task = asyncio.create_task(verifier.run())
    try:
        deadline = time.monotonic() + 60
        while verifier.not_ready():
            assert time.monotonic() < deadline, verifier.not_ready()
            await asyncio.sleep(0.05)
        verifier.stop()
        assert verifier.not_ready() == ["stopping: finishing the check in progress"]
    finally:
        verifier.stop()
        await asyncio.wait_for(task, timeout=30)
        await redis.aclose()
