"""Dispatch-time fallback: a stage whose remote engine's circuit is open goes elsewhere."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from controlplane.artifacts import LocalArtifactStore
from controlplane.circuit import CircuitBreaker
from controlplane.errors import NoEngine
from controlplane.live_config import LiveConfig
from controlplane.policy import Circuit
from controlplane.policy_loader import parse_policy
from controlplane.policy_store import PolicyStore
from router.requests import ImageRequest
from router.submit import Submitter

POLICY = """
version: 1
limits: {max_pixels: 262144, max_n: 4, default_width: 64, default_height: 64}
engines:
  local: {kind: resize}
  hosted-a: {kind: http.openai_images, base_url: "http://127.0.0.1:9/v1", model: m,
             allow_insecure: true}
  hosted-b: {kind: http.openai_images, base_url: "http://127.0.0.1:9/v1", model: m,
             allow_insecure: true}
routes:
  - name: lone
    match: {intent: final}
    stages: [{engine: hosted-a}]
  - name: pool
    match: {intent: draft}
    stages: [{engine: hosted-a, fallback: [hosted-b, local]}]
"""


@pytest.fixture
async def submitter(redis_url: str, tmp_path: Path) -> AsyncIterator[Submitter]:
    client = aioredis.Redis.from_url(redis_url)
    await PolicyStore(client).apply(parse_policy(POLICY), actor="test", reason="test")
    live = LiveConfig(client)
    await live.start()
    yield Submitter(client, live, LocalArtifactStore(tmp_path), job_ttl_s=60)
    await live.stop()
    await client.aclose()


def open_circuit(redis_url: str, engine: str) -> None:
    client = redis.Redis.from_url(redis_url)
    circuit = CircuitBreaker(client, engine, Circuit(failures=1), probe_ttl_s=60)
    circuit.record_failure(circuit.acquire())
    client.close()


async def test_closed_circuits_keep_the_stage_engine(submitter: Submitter) -> None:
    accepted = await submitter.submit(ImageRequest(prompt="x", intent="draft"))
    (stage,) = accepted.job.stages
    assert (stage.engine, stage.fallback_from) == ("hosted-a", None)


async def test_open_circuits_skip_to_the_first_closed_fallback(submitter: Submitter,
                                                               redis_url: str) -> None:
    open_circuit(redis_url, "hosted-a")
    accepted = await submitter.submit(ImageRequest(prompt="x", intent="draft"))
    assert (accepted.job.stages[0].engine, accepted.job.stages[0].fallback_from) == (
        "hosted-b", "hosted-a")
    open_circuit(redis_url, "hosted-b")
    accepted = await submitter.submit(ImageRequest(prompt="x", intent="draft"))
    assert (accepted.job.stages[0].engine, accepted.job.stages[0].fallback_from) == (
        "local", "hosted-a")


async def test_no_fallback_fails_fast_with_no_engine(submitter: Submitter,
                                                     redis_url: str) -> None:
    open_circuit(redis_url, "hosted-a")
    with pytest.raises(NoEngine, match="engine hosted-a: circuit open") as raised:
        await submitter.submit(ImageRequest(prompt="x", intent="final"))
    assert raised.value.status_code == 503


async def test_a_forced_route_skips_the_rules(submitter: Submitter) -> None:
    accepted = await submitter.submit(ImageRequest(prompt="x", intent="draft"),
                                      route_name="lone")
    assert accepted.job.route == "lone"
