"""Hostile input: every free-form field of a submit has a size limit from the policy, a
body over its limit is refused by size, and a refusal stores nothing and echoes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from controlplane import keys
from controlplane.policy import BODY_ALLOWANCE_BYTES, MAX_BODY_BYTES_CEILING, Limits, Policy
from controlplane.policy_loader import load_policy
from tests.conftest import POLICIES
from tests.router.test_errors import assert_contract_error, router_at

#: the body limit of these tests: room for the 2,000,000-character fields, not for 4 MB
BODY_LIMIT_BYTES = 3 * 1024 * 1024
HUGE_CHARS = 2_000_000
#: the longest answer a refusal may give: it never carries the request back
MAX_ANSWER_BYTES = 2048


@pytest.fixture
def policy() -> Policy:
    """The simulated lane (prompts up to 200 characters), its other limits the defaults
    but for the body's."""
    base = load_policy(POLICIES / "sim_lane.yaml").model_dump(mode="json")
    base["limits"]["max_body_bytes"] = BODY_LIMIT_BYTES
    return Policy.model_validate(base)


def stored_patterns() -> list[str]:
    """What an accepted submit writes: the job and its events, the Idempotency-Key claim,
    the route's in-flight count, its lane, the deferred lane and the admission counters."""
    return [keys.job("*"), keys.idempotency("*", "*"), keys.route_inflight("*"),
            keys.engine_stream("*", "*"), keys.deferred_stream(), keys.admission_outcomes()]


async def stored(redis: aioredis.Redis) -> set[bytes]:
    found: set[bytes] = set()
    for pattern in stored_patterns():
        found.update([key async for key in redis.scan_iter(match=pattern)])
    return found


def nested(depth: int) -> dict[str, Any]:
    """``{"a": {"a": ... {"a": 1}}}``, ``depth`` objects deep."""
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return dict(value)


#: (the oversized part of a submit, the field its refusal names)
OVERSIZED_FIELDS = [
    ({"prompt": "p" * HUGE_CHARS}, "prompt"),
    ({"negative_prompt": "n" * HUGE_CHARS}, "negative_prompt"),
    ({"negative_prompt": "n" * 201}, "negative_prompt"),
    ({"text": ["t" * HUGE_CHARS]}, "text[0]"),
    ({"text": ["ok", "t" * 201]}, "text[1]"),
    ({"text": ["t"] * 9}, "text"),
    ({"text": ["t"] * 100_000}, "text"),
    ({"metadata": {f"k{i}": i for i in range(100_000)}}, "metadata"),
    ({"metadata": {f"k{i}": i for i in range(65)}}, "metadata"),
    ({"metadata": {"note": "m" * HUGE_CHARS}}, "metadata"),
    ({"metadata": {"note": "m" * 4096}}, "metadata"),
    ({"metadata": nested(5)}, "metadata"),
    ({"metadata": {"a": [[[[1]]]]}}, "metadata"),
    ({"metadata": {"a": [0] * 500_000}}, "metadata"),
    ({"metadata": {"a": [[1]] * 5000}}, "metadata"),
    ({"tier": "x" * HUGE_CHARS}, "tier"),
]


@pytest.fixture
async def router(redis_url: str, policy: Policy, tmp_path: Path) -> AsyncIterator[Any]:
    async with router_at(redis_url, policy, tmp_path) as running:
        yield running


def assert_not_echoed(response: httpx.Response) -> None:
    assert len(response.content) < MAX_ANSWER_BYTES, response.content[:300]


async def test_oversized_fields_answer_422_naming_the_field_and_store_nothing(
        router: Any) -> None:
    before = await stored(router.redis)
    for n, (oversized, field) in enumerate(OVERSIZED_FIELDS):
        response = await router.submit(headers={"Idempotency-Key": f"limits-{n}"},
                                       intent="draft", **oversized)
        error = assert_contract_error(response, 422, "invalid_request")
        assert [d["field"] for d in error["details"]] == [field], (field, error)
        assert_not_echoed(response)
        assert await stored(router.redis) == before, field
    # within every limit, the same request is accepted, and what it stores is seen
    at_limits = await router.submit(
        headers={"Idempotency-Key": "limits-ok"}, intent="draft", prompt="p" * 200,
        negative_prompt="n" * 200, text=["t" * 200] * 8,
        metadata={"campaign": "x", "deep": nested(3), "keys": {f"k{i}": i for i in range(55)}})
    assert at_limits.status_code == 202, at_limits.text
    job_id = at_limits.json()["id"]
    now = await stored(router.redis)
    assert keys.job(job_id).encode() in now
    assert keys.idempotency("default", "limits-ok").encode() in now


async def test_a_body_over_its_limit_answers_413_before_it_is_parsed(router: Any) -> None:
    before = await stored(router.redis)
    body = b'{"prompt": "' + b"p" * (BODY_LIMIT_BYTES + 1) + b'"}'
    announced = await router.http.post("/v1/images", content=body,
                                       headers={"content-type": "application/json",
                                                "Idempotency-Key": "big-body"})
    error = assert_contract_error(announced, 413, "payload_too_large")
    assert [d["field"] for d in error["details"]] == ["body"]
    assert str(BODY_LIMIT_BYTES) in error["message"]
    assert_not_echoed(announced)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted once read
        for start in range(0, len(body), 1 << 20):
            yield body[start:start + (1 << 20)]

    chunked = await router.http.post("/v1/images", content=chunks(),
                                     headers={"content-type": "application/json"})
    assert_contract_error(chunked, 413, "payload_too_large")
    assert_not_echoed(chunked)
    assert await stored(router.redis) == before


async def test_the_openai_endpoint_has_the_same_limits(router: Any) -> None:
    before = await stored(router.redis)
    for body, param in [({"prompt": "p" * HUGE_CHARS}, "prompt"),
                        ({"prompt": "x", "user": "u" * HUGE_CHARS}, "user"),
                        ({"prompt": ["p"] * 100_000}, "prompt"),
                        ({"prompt": "x", "size": "s" * HUGE_CHARS}, "size"),
                        ({"prompt": "x", "model": "m" * HUGE_CHARS}, "model")]:
        response = await router.http.post("/v1/images/generations", json=body)
        assert response.status_code in (400, 404), response.text[:300]
        assert response.json()["error"]["param"] == param, response.text[:300]
        assert_not_echoed(response)
    too_big = await router.http.post(
        "/v1/images/generations", content=b'{"prompt": "' + b"p" * BODY_LIMIT_BYTES + b'"}',
        headers={"content-type": "application/json"})
    assert too_big.status_code == 413, too_big.text[:300]
    assert too_big.json()["error"]["code"] == "payload_too_large"
    assert await stored(router.redis) == before


@pytest.mark.parametrize("last_event_id", ["abc", "1712345678901", "1-2-3", "-1-0",
                                           "1712345678901-0; DROP", "9" * 21 + "-0",
                                           "18446744073709551616-0", "x" * 10_000])
async def test_a_malformed_last_event_id_answers_400_naming_the_header(
        router: Any, last_event_id: str) -> None:
    accepted = await router.submit(intent="draft")
    assert accepted.status_code == 202, accepted.text
    # streamed: a stream wrongly opened fails here instead of never ending
    async with router.http.stream("GET", f"/v1/jobs/{accepted.json()['id']}/events",
                                  headers={"Last-Event-ID": last_event_id}) as response:
        assert response.status_code == 400, response.headers
        await response.aread()
    error = assert_contract_error(response, 400, "bad_request")
    assert [d["field"] for d in error["details"]] == ["Last-Event-ID"]
    assert_not_echoed(response)


async def test_a_well_formed_last_event_id_still_resumes_the_stream(router: Any) -> None:
    accepted = await router.submit(intent="draft")
    job_id = accepted.json()["id"]
    async with router.http.stream("GET", f"/v1/jobs/{job_id}/events",
                                  headers={"Last-Event-ID": "0-0"}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                assert line.split(":", 1)[1].strip() == "state"
                break


def test_the_body_limit_is_derived_from_the_image_limit() -> None:
    default = Limits()
    two_images = 2 * (-(-default.max_image_bytes // 3) * 4)
    assert default.body_limit_bytes == two_images + BODY_ALLOWANCE_BYTES
    assert Limits(max_image_bytes=3 * 1024).body_limit_bytes == 8 * 1024 + BODY_ALLOWANCE_BYTES
    assert Limits(max_body_bytes=1000).body_limit_bytes == 1000
    assert Limits(max_image_bytes=10 * MAX_BODY_BYTES_CEILING).body_limit_bytes == \
        MAX_BODY_BYTES_CEILING
    with pytest.raises(ValueError, match="max_body_bytes"):
        Limits(max_body_bytes=MAX_BODY_BYTES_CEILING + 1)
