"""Every error the API answers is ``{"error": {"code", "message", "details"}}``, 5xx
included: a bug, Redis not answering, and Litestar's own refusals."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from controlplane import keys
from controlplane.policy import Policy
from controlplane.policy_loader import load_policy
from controlplane.registry import Registry
from laneway.embedded_redis import EmbeddedRedis
from tests.conftest import POLICIES
from tests.router.conftest import Router, running_router

#: the API's Redis timeout in these tests: short, so a stopped server answers fast
REDIS_TIMEOUT_S = 0.5


@pytest.fixture
def policy() -> Policy:
    return load_policy(POLICIES / "sim_lane.yaml")


def assert_contract_error(response: httpx.Response, status_code: int, code: str) -> dict:
    """The response is the contract's error shape with this status and code."""
    assert response.status_code == status_code, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["code"] == code and body["error"]["message"], body
    assert isinstance(body["error"]["details"], list)
    return dict(body["error"])


@contextlib.asynccontextmanager
async def router_at(redis_url: str, policy: Policy, home: Path,
                    **settings_fields: Any) -> AsyncIterator[Router]:
    """The API against ``redis_url`` (the simulated lane needs no models)."""
    async with running_router(redis_url, policy, Registry(home / "registry"), home,
                              **settings_fields) as router:
        yield router


@contextlib.contextmanager
def own_valkey(data_dir: Path) -> Iterator[EmbeddedRedis]:
    """A Valkey server of the test's own, stopped at exit."""
    server = EmbeddedRedis(data_dir, die_with_parent=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def frozen(server: EmbeddedRedis) -> Iterator[None]:
    """The server stopped with SIGSTOP (it accepts connections but never answers), and
    always resumed at exit."""
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


class Records(logging.Handler):
    """Keeps what one logger emits (Litestar's logging set-up replaces the root's
    handlers, so pytest's caplog misses the API's records)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def records_of(name: str) -> Iterator[list[logging.LogRecord]]:
    handler, logger = Records(), logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


async def test_a_bug_answers_500_in_the_contract_shape_and_is_logged(
        redis_url: str, policy: Policy, tmp_path: Path) -> None:
    async with router_at(redis_url, policy, tmp_path) as router:
        # a job record no Job model can read: reading it raises a pydantic error, a bug
        # to the API, not a refusal it knows
        await router.redis.set(keys.job("j_corrupt"), b'{"id": "j_corrupt", "secret": 1}')
        with records_of("router.http_errors") as records:
            response = await router.http.get("/v1/jobs/j_corrupt")
        error = assert_contract_error(response, 500, "internal_error")
        assert "secret" not in response.text and "validation" not in response.text.lower()
        assert error["details"] == []
        (record,) = records
        assert record.exc_info is not None and "GET /v1/jobs/j_corrupt" in record.getMessage()


async def test_unknown_paths_methods_and_bad_bodies_answer_in_the_contract_shape(
        redis_url: str, policy: Policy, tmp_path: Path) -> None:
    async with router_at(redis_url, policy, tmp_path) as router:
        assert_contract_error(await router.http.get("/v1/nothing-here"), 404, "not_found")
        assert_contract_error(await router.http.put("/v1/status"), 405, "method_not_allowed")
        unreadable = await router.http.post("/v1/images", content=b"{not json",
                                            headers={"content-type": "application/json"})
        assert_contract_error(unreadable, 400, "bad_request")
        wrong_type = await router.http.post("/v1/images", json={"prompt": "x", "n": "many"})
        error = assert_contract_error(wrong_type, 422, "invalid_request")
        assert any(d["field"] == "n" for d in error["details"]), error


async def test_redis_not_answering_gives_503_with_retry_after(
        policy: Policy, tmp_path: Path) -> None:
    with own_valkey(tmp_path / "valkey") as server:
        async with router_at(server.url, policy, tmp_path,
                             redis_timeout_s=REDIS_TIMEOUT_S) as router:
            accepted = await router.submit(intent="draft")
            assert accepted.status_code == 202, accepted.text
            job_id = accepted.json()["id"]
            with frozen(server):
                # each answers after one socket timeout of the API's client: a timed-out
                # command is not retried (tests/controlplane/test_transitions.py)
                for method, path, body in [("POST", "/v1/images", {"prompt": "a lighthouse"}),
                                           ("GET", f"/v1/jobs/{job_id}", None),
                                           ("GET", "/v1/status", None)]:
                    response = await router.http.request(method, path, json=body)
                    assert_contract_error(response, 503, "redis_unavailable")
                    assert response.headers["Retry-After"] == "1"
                # the OpenAI-compatible endpoint says the same in that API's shape
                openai = await router.http.post("/v1/images/generations",
                                                json={"prompt": "a lighthouse"})
                assert openai.status_code == 503 and openai.headers["Retry-After"] == "1"
                assert openai.json()["error"]["code"] == "redis_unavailable"
                assert openai.json()["error"]["type"] == "server_error"
            # resumed: the same API answers again
            assert (await router.http.get(f"/v1/jobs/{job_id}")).status_code == 200
