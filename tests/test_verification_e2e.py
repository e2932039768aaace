"""Verification end to end through ``laneway serve``: worker, verifier process, API."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from controlplane import keys
from controlplane.registry import Registry
from laneway.embedded_redis import EmbeddedRedis
from tests.conftest import POLICIES
from tests.service import Service
from verifier.outcome import REGENERATE_SEED_STEP

VERDICT_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def server(valkey: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(valkey.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="module")
def service(tiny_registry: Registry, tmp_path_factory: pytest.TempPathFactory,
            valkey: EmbeddedRedis, server: redis.Redis) -> Iterator[Service]:
    svc = Service(home=tmp_path_factory.mktemp("verify"), registry=tiny_registry.root,
                  policy=POLICIES / "verify.yaml", extra_args=["--redis-url", valkey.url],
                  extra_env={"LANEWAY_OCR_THREADS": "1"})
    svc.start()
    yield svc
    svc.stop()


def submit(service: Service, **body: object) -> dict[str, Any]:
    with service.client() as client:
        response = client.post("/v1/images", json={"prompt": "a shop sign", "text": ["HELLO"],
                                                   "wait": 60, **body})
    assert response.status_code in (200, 202), response.text
    return response.json()


def wait_for_verdict(service: Service, job_id: str) -> dict[str, Any]:
    """Poll the job until it is completed with a verdict that is no longer pending."""
    deadline = time.monotonic() + VERDICT_TIMEOUT_S
    with service.client() as client:
        while True:
            job = client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] == "completed" and job["verification"]["status"] != "pending":
                return job
            assert time.monotonic() < deadline, f"no verdict in time: {job}\n{service.log()}"
            time.sleep(0.1)


def events(server: redis.Redis, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    return [(f[b"kind"].decode(), json.loads(f[b"data"]))
            for _, f in server.xrange(keys.job_events(job_id))]


def test_completed_at_once_then_the_verdict_arrives_on_the_job_and_as_an_event(
        service: Service, server: redis.Redis) -> None:
    job = submit(service, intent="draft")
    # the client has its completed job before any verdict exists
    assert job["status"] == "completed" and job["images"]
    assert job["verification"] == {"status": "pending"}

    job = wait_for_verdict(service, job["id"])
    verification = job["verification"]
    # the tiny models draw noise: the requested text is not there, the frame itself is fine
    assert verification["status"] == "failed" and verification["action"] == "flagged"
    typography = verification["typography"]
    assert typography["expected"] == ["HELLO"] and not typography["passed"]
    assert 0 <= typography["score"] < typography["threshold"]
    quality = verification["quality"]
    assert quality["passed"]
    assert {"mean_luma", "std_luma", "sharpness", "aspect_error", "size_error_px"} <= set(
        quality["metrics"])
    assert quality["metrics"]["size_error_px"]["value"] == 0
    assert job["status"] == "completed" and len(verification["attempts"]) == 1

    kinds = [kind for kind, _ in events(server, job["id"])]
    assert kinds.index("completed") < kinds.index("verified")
    verified = dict(events(server, job["id"]))["verified"]
    assert verified["status"] == "failed" and "typography" in verified["failed_metrics"]
    stage = job["stages"][0]
    counters = server.hgetall(keys.version_stats(stage["model"], stage["model_version"]))
    assert int(counters[b"verdicts"]) >= 1


def test_regenerate_runs_a_second_attempt_with_a_new_seed_then_flags(
        service: Service, server: redis.Redis) -> None:
    first = submit(service, intent="final", seed=1234)
    assert first["status"] == "completed" and first["verification"] == {"status": "pending"}

    job = wait_for_verdict(service, first["id"])
    verification = job["verification"]
    assert (verification["status"], verification["action"]) == ("failed", "flagged")
    attempts = verification["attempts"]
    assert [(a["attempt"], a["action"], a["seed"]) for a in attempts] == [
        (1, "regenerated", 1234), (2, "flagged", 1234 + REGENERATE_SEED_STEP)]
    assert job["seed"] == 1234 + REGENERATE_SEED_STEP
    assert job["images"][0]["seed"] == 1234 + REGENERATE_SEED_STEP
    assert job["stages"][0]["status"] == "completed"

    kinds = [kind for kind, _ in events(server, job["id"])]
    assert kinds.count("completed") == 2 and kinds.count("verified") == 2
    second_queue = kinds.index("queued", 1)
    assert kinds.index("verified") < second_queue < len(kinds) - 1 - kinds[::-1].index(
        "completed")
    assert kinds[-1] == "verified"
