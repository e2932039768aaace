"""A mixed pool across two Laneway instances: A routes through B as a remote engine.

Instance B (the tiny policy behind OpenAI-style aliases, its own bundled server and port)
is the provider of A's ``remote`` engine; small loopback providers stand in for hosted APIs
where a test needs a provider to misbehave (a concurrency cap, an error echoing the key, an
error telling internals).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from string import Template
from typing import Any

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
from PIL import Image

from controlplane import keys
from controlplane.circuit import CircuitState, CircuitStatus, is_open
from controlplane.registry import Registry
from tests.conftest import POLICIES
from tests.provider import Provider, Reply
from tests.service import Service, bundled_redis_url
from tests.span_collector import SpanCollector

API_KEY = "sk-remote-7f3a9c1e5b2d-must-not-leak"
INTERNALS = "shard db-7 (10.2.0.14) down; account acme-prod"
CLIENT_KIND = 3  # opentelemetry.proto Span.SpanKind.SPAN_KIND_CLIENT


@pytest.fixture(scope="module")
def providers() -> Iterator[dict[str, Provider]]:
    made = {"capped": Provider(delay_s=0.4),
            "leaky": Provider(always=Reply(401, {"error": {
                "message": f"Incorrect API key provided: {API_KEY}"}})),
            "opaque": Provider(always=Reply(500, {"error": {"message": INTERNALS}}))}
    yield made
    for provider in made.values():
        provider.close()


@pytest.fixture(scope="module")
def instances(tiny_registry: Registry, tmp_path_factory: pytest.TempPathFactory,
              collector: SpanCollector, providers: dict[str, Provider]
              ) -> Iterator[tuple[Service, Service]]:
    """Instances A and B, started (and stopped) side by side."""
    b = Service(home=tmp_path_factory.mktemp("instance-b"), registry=tiny_registry.root,
                policy=POLICIES / "remote_provider.yaml",
                extra_env=collector.env("laneway-b"))
    home = tmp_path_factory.mktemp("instance-a")
    policy = home / "remote_pool.yaml"
    policy.write_text(Template((POLICIES / "remote_pool.yaml").read_text()).substitute(
        B_URL=f"{b.url}/v1", CAPPED_URL=providers["capped"].base_url,
        LEAKY_URL=providers["leaky"].base_url, OPAQUE_URL=providers["opaque"].base_url))
    a = Service(home=home, registry=tiny_registry.root, policy=policy, extra_env={
        "LANEWAY_PROVIDER_TEST_KEY": API_KEY, **collector.env("laneway-a")})
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(Service.start, (a, b)))
    yield a, b
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(Service.stop, (a, b)))


@pytest.fixture(scope="module")
def instance_a(instances: tuple[Service, Service]) -> Service:
    return instances[0]


@pytest.fixture(scope="module")
def instance_b(instances: tuple[Service, Service]) -> Service:
    return instances[1]


def submit(service: Service, **body: object) -> dict[str, Any]:
    with service.client() as client:
        response = client.post("/v1/images", json={"prompt": "a lighthouse", "wait": 60,
                                                    **body})
    assert response.status_code in (200, 202), response.text
    return response.json()


def pixels(service: Service, job: dict[str, Any]) -> np.ndarray:
    with service.client() as client:
        png = client.get(job["images"][0]["url"])
    assert png.status_code == 200
    return np.asarray(Image.open(BytesIO(png.content)).convert("RGB"))


def full_log(service: Service) -> str:
    assert service.log_path is not None
    return service.log_path.read_text(errors="replace")


def wait_for_spans(collector: SpanCollector, predicate: Any, *, timeout_s: float = 10
                   ) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [s for s in list(collector.spans) if predicate(s)]
        if found:
            return found
        time.sleep(0.1)
    return []


def test_a_returns_bs_image_and_the_trace_shows_the_remote_call(
        instance_a: Service, instance_b: Service, collector: SpanCollector) -> None:
    job = submit(instance_a, intent="draft", n=2, width=64, height=48)
    assert job["status"] == "completed", job
    (stage,) = job["stages"]
    assert stage["engine"] == "remote" and stage["fallback_from"] is None
    assert "/none/" in stage["worker"]  # the no-device worker serve starts for remote engines
    assert stage["cost"] == pytest.approx(0.04) and job["cost"] == pytest.approx(0.04)
    assert [(i["width"], i["height"]) for i in job["images"]] == [(64, 48), (64, 48)]

    trace_id = job["trace_id"]
    calls = wait_for_spans(collector, lambda s: s["service"] == "laneway-a"
                           and s["kind"] == CLIENT_KIND and s["trace_id"] == trace_id
                           and s["attributes"].get("db.system") != "redis")
    assert len(calls) == 1, calls  # one attempt: B answered at once
    call = calls[0]
    assert call["attributes"]["laneway.engine"] == "remote"
    stages = [s for s in collector.spans if s["span_id"] == call["parent"]]
    assert [s["name"] for s in stages] == ["laneway.stage"]
    b_routes = wait_for_spans(collector, lambda s: s["service"] == "laneway-b"
                              and s["name"] == "laneway.route" and s["trace_id"] == trace_id)
    assert b_routes, "B's spans are not on A's trace"
    b_server = wait_for_spans(collector, lambda s: s["service"] == "laneway-b"
                              and s["parent"] == call["span_id"])
    assert b_server, "B's server span is not a child of A's client span"

    b_job_id = b_routes[0]["attributes"]["laneway.job_id"]
    with instance_b.client() as client:
        b_job = client.get(f"/v1/jobs/{b_job_id}").json()
    assert b_job["status"] == "completed" and b_job["route"] == "fast_draft"
    assert np.array_equal(pixels(instance_a, job), pixels(instance_b, b_job))


def test_max_concurrency_caps_requests_in_flight_at_the_provider(
        instance_a: Service, providers: dict[str, Provider]) -> None:
    capped = providers["capped"]
    with ThreadPoolExecutor(max_workers=6) as pool:
        jobs = list(pool.map(lambda _: submit(instance_a, tier="capped"), range(6)))
    assert all(job["status"] == "completed" for job in jobs), jobs
    assert len(capped.seen) == 6
    assert capped.max_in_flight == 2  # never more than the cap, and the cap is used
    assert all(seen.headers["Authorization"] == f"Bearer {API_KEY}" for seen in capped.seen)


def test_a_provider_error_echoing_the_key_is_logged_scrubbed(instance_a: Service) -> None:
    job = submit(instance_a, tier="leaky")
    assert job["status"] == "failed", job
    assert job["error"].endswith("provider_error: HTTP 401")
    assert job["stages"][0]["error"].endswith("provider_error: HTTP 401")
    assert API_KEY not in json.dumps(job) and "Incorrect API key" not in json.dumps(job)
    assert "Incorrect API key provided: [redacted]" in full_log(instance_a)


def test_a_provider_error_answer_reaches_the_client_as_code_and_status_only(
        instance_a: Service, providers: dict[str, Provider]) -> None:
    job = submit(instance_a, tier="opaque")
    assert job["status"] == "failed", job
    assert len(providers["opaque"].seen) == 2  # max_attempts, then no fallback
    assert "provider_error: HTTP 500" in job["error"]
    assert "provider_error: HTTP 500" in job["stages"][0]["error"]
    assert INTERNALS not in json.dumps(job)
    with instance_a.client() as client:
        events = client.get(f"/v1/jobs/{job['id']}/events").text
    assert INTERNALS not in events
    assert INTERNALS in full_log(instance_a)  # the operator sees what the provider said


async def test_b_down_opens_the_circuit_and_b_back_closes_it(
        instance_a: Service, instance_b: Service) -> None:
    a_redis = aioredis.Redis.from_url(bundled_redis_url(instance_a.home))
    try:
        instance_b.stop()
        # the first two jobs try B, give up after their retries and fall back to turbo
        for _ in range(2):
            job = submit(instance_a, intent="draft")
            assert job["status"] == "completed", job
            assert (job["stages"][0]["engine"], job["stages"][0]["fallback_from"]) == (
                "turbo", "remote")
        assert await is_open(a_redis, "remote")
        # with the circuit open the router sends the next job to the fallback at once
        with instance_a.client() as client:
            response = client.post("/v1/images", json={"prompt": "a lighthouse",
                                                       "intent": "draft", "wait": 0})
        queued = response.json()
        assert queued["stages"][0]["engine"] == "turbo"
        assert queued["stages"][0]["fallback_from"] == "remote"

        instance_b.start()  # takes longer than the 2 s cooldown
        job = submit(instance_a, intent="draft")  # the probe
        assert job["status"] == "completed", job
        assert (job["stages"][0]["engine"], job["stages"][0]["fallback_from"]) == (
            "remote", None)
        status = CircuitStatus.parse(await a_redis.hgetall(keys.circuit("remote")))
        assert status.state is CircuitState.closed and status.failures == 0
        assert not await is_open(a_redis, "remote")
    finally:
        await a_redis.aclose()


def test_the_api_key_appears_nowhere(instance_a: Service, collector: SpanCollector) -> None:
    submit(instance_a, intent="draft")
    submit(instance_a, tier="leaky")
    wait_for_spans(collector, lambda s: s["service"] == "laneway-a"
                   and s["kind"] == CLIENT_KIND)
    assert API_KEY not in full_log(instance_a)
    assert all(API_KEY not in span["text"] for span in collector.spans)
    client = redis.Redis.from_url(bundled_redis_url(instance_a.home))
    try:
        stored = []
        for key in client.scan_iter(count=500):
            kind = client.type(key).decode()
            if kind == "string":
                stored.append(client.get(key))
            elif kind == "hash":
                stored.append(repr(client.hgetall(key)).encode())
            elif kind == "stream":
                stored.append(repr(client.xrange(key)).encode())
            elif kind == "list":
                stored.append(repr(client.lrange(key, 0, -1)).encode())
            elif kind in {"set", "zset"}:
                stored.append(repr(client.smembers(key) if kind == "set"
                                   else client.zrange(key, 0, -1)).encode())
        jobs = [raw for raw in stored if raw and b'"trace_context"' in raw]
        assert len(jobs) >= 10  # the job records of this module are among them
        assert all(API_KEY.encode() not in raw for raw in stored if raw)
    finally:
        client.close()
