"""Schemathesis against the API's own OpenAPI document: every public operation, with
bounded and reproducible examples (Hypothesis, derandomized), never answers a 5xx and
answers every refusal in the contract's error shape."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.core.result import Ok

from controlplane.policy import Policy
from controlplane.policy_loader import load_policy
from tests.conftest import POLICIES
from tests.router.test_errors import router_at

EXAMPLES_PER_OPERATION = 50
ADMIN_TOKEN = "fuzz-admin"
#: the OpenAI-compatible endpoint answers errors in OpenAI's shape
OPENAI_PATHS = ("/v1/images/generations",)


@pytest.fixture
def policy() -> Policy:
    return load_policy(POLICIES / "fuzz.yaml")


def check_error_shape(path: str, body: Any) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    if path in OPENAI_PATHS:
        assert {"message", "type", "code"} <= set(error), body
    else:
        assert set(error) == {"code", "message", "details"}, body
        assert isinstance(error["details"], list), body


def fuzz(base_url: str) -> list[str]:
    """Every operation's examples against ``base_url``; what went wrong, one line each."""
    schema = schemathesis.openapi.from_url(f"{base_url}/schema/openapi.json")
    problems: list[str] = []
    for result in schema.get_all_operations():
        if isinstance(result, Ok):
            fuzz_operation(result.ok(), base_url, problems)
        else:
            problems.append(f"an operation schemathesis cannot read: {result.err()}")
    return problems


def fuzz_operation(operation: schemathesis.APIOperation, base_url: str,
                   problems: list[str]) -> None:
    headers = ({"Authorization": f"Bearer {ADMIN_TOKEN}"}
               if operation.path.startswith("/v1/admin") else {})

    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
              derandomize=True, suppress_health_check=list(HealthCheck))
    def examples(case: schemathesis.Case) -> None:
        response = case.call(base_url=base_url, headers=headers, timeout=30)
        where = f"{case.method} {case.formatted_path} -> {response.status_code}"
        if response.status_code >= 500:
            problems.append(f"{where}: {response.text[:300]}")
        elif response.status_code >= 400:
            try:
                check_error_shape(operation.path, response.json())
            except (AssertionError, ValueError) as exc:
                problems.append(f"{where}: not the error shape: {exc}")

    examples()


async def test_fuzzed_requests_get_no_server_error_and_errors_in_the_contract_shape(
        redis_url: str, policy: Policy, tmp_path: Path) -> None:
    async with router_at(redis_url, policy, tmp_path, admin_token=ADMIN_TOKEN) as router:
        await router.start_worker("sim-fast")
        problems = await asyncio.to_thread(fuzz, str(router.http.base_url).rstrip("/"))
    assert problems == [], "\n".join(problems[:20])
