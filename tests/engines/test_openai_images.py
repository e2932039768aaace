"""The remote engine against a real HTTP provider on loopback and a real Redis."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator

import pytest
import redis
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from controlplane.circuit import is_open
from controlplane.errors import EngineUnavailable, InternalError, StageFailed
from controlplane.policy import EngineSpec
from controlplane.registry import Registry
from engines.base import StageItem
from engines.factory import build_engine
from engines.openai_images import OpenAIImagesEngine
from tests.controlplane.test_circuit import Clock
from tests.provider import Provider, Reply

API_KEY = "sk-test-1f2e3d4c5b6a-never-print-me"
KEY_ENV = "LANEWAY_PROVIDER_TEST_KEY"


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    """Finished spans of this process (installs an SDK provider unless one is set)."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def provider() -> Iterator[Provider]:
    server = Provider()
    yield server
    server.close()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


Maker = Callable[..., OpenAIImagesEngine]


@pytest.fixture
def make(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Maker]:
    monkeypatch.setenv(KEY_ENV, API_KEY)
    built: list[OpenAIImagesEngine] = []

    def make_engine(base_url: str, *, name: str = "hosted", sleeps: list[float] | None = None,
                    clock: Clock | None = None, **fields: object) -> OpenAIImagesEngine:
        spec = EngineSpec.model_validate({
            "kind": "http.openai_images", "base_url": base_url, "allow_insecure": True,
            "model": "hosted-turbo", "api_key_env": KEY_ENV, "timeout_s": 2,
            "max_attempts": 3, **fields})
        engine = OpenAIImagesEngine(
            spec, redis_url=redis_url,
            sleep=sleeps.append if sleeps is not None else time.sleep,
            clock=clock or time.time)
        engine.name = name
        built.append(engine)
        return engine

    yield make_engine
    for engine in built:
        engine.close()


def item(n: int = 1, width: int = 64, height: int = 48) -> StageItem:
    return StageItem(job_id="j_test", prompt="a lighthouse", width=width, height=height,
                     seed=1, n=n)


def test_generates_decoded_images_of_the_requested_size(make: Maker, provider: Provider,
                                                        spans: InMemorySpanExporter) -> None:
    engine = make(provider.base_url)
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("laneway.stage") as stage:
        (images,) = engine.run([item(n=2)])
    assert [im.size for im in images] == [(64, 48), (64, 48)]
    (seen,) = provider.seen
    assert seen.path == "/v1/images/generations"
    assert seen.body == {"model": "hosted-turbo", "prompt": "a lighthouse", "n": 2,
                         "size": "64x48", "response_format": "b64_json"}
    assert seen.headers["Authorization"] == f"Bearer {API_KEY}"
    (client,) = [s for s in spans.get_finished_spans()
                 if s.kind is SpanKind.CLIENT and s.attributes["laneway.job_id"] == "j_test"
                 and s.parent is not None
                 and s.parent.span_id == stage.get_span_context().span_id]
    assert client.attributes["http.response.status_code"] == 200
    # the provider got this attempt's span as its parent (W3C traceparent)
    trace_id = format(client.context.trace_id, "032x")
    span_id = format(client.context.span_id, "016x")
    assert seen.headers["traceparent"].startswith(f"00-{trace_id}-{span_id}-")
    assert API_KEY not in str(dict(client.attributes or {}))


def test_the_factory_builds_it_named_with_the_redis_url_it_is_given(
        redis_url: str, provider: Provider, tiny_registry: Registry) -> None:
    spec = EngineSpec.model_validate({"kind": "http.openai_images", "model": "m",
                                      "base_url": provider.base_url, "allow_insecure": True})
    with pytest.raises(InternalError, match="need a Redis URL"):
        build_engine(spec, registry=tiny_registry, model_version="", device="none",
                     name="hosted")
    engine = build_engine(spec, registry=tiny_registry, model_version="", device="none",
                          name="hosted", redis_url=redis_url)
    try:
        assert isinstance(engine, OpenAIImagesEngine) and engine.name == "hosted"
        (images,) = engine.run([item()])
        assert images[0].size == (64, 48)
        assert "Authorization" not in provider.seen[0].headers  # no api_key_env, no header
    finally:
        engine.close()


def test_429_is_retried_after_retry_after_and_completes(make: Maker,
                                                        provider: Provider) -> None:
    provider.script.append(Reply(429, {"error": {"message": "slow down"}},
                                 {"Retry-After": "1"}))
    engine = make(provider.base_url)
    (images,) = engine.run([item()])
    assert len(images) == 1
    first, second = provider.seen
    assert 0.95 <= second.at_s - first.at_s < 3.0


def test_5xx_is_retried_with_backoff_then_gives_up_as_unavailable(
        make: Maker, provider: Provider, spans: InMemorySpanExporter) -> None:
    provider.script.extend([Reply(503, {"error": {"message": "overloaded"}})] * 3)
    sleeps: list[float] = []
    engine = make(provider.base_url, sleeps=sleeps, name="flaky")
    with pytest.raises(EngineUnavailable) as raised:
        engine.run([item()])
    assert raised.value.message == ("engine flaky: gave up after 3 attempts; last: "
                                    "provider_error: HTTP 503")
    assert len(provider.seen) == 3
    assert len(sleeps) == 2 and all(0 <= s <= 5.0 for s in sleeps)
    attempts = sorted(s.attributes["laneway.attempt"] for s in spans.get_finished_spans()
                      if s.kind is SpanKind.CLIENT and s.attributes["laneway.engine"] == "flaky")
    assert attempts == [1, 2, 3]


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_other_4xx_fail_at_once_and_never_leak_the_key(
        make: Maker, provider: Provider, status: int, caplog: pytest.LogCaptureFixture) -> None:
    provider.script.append(Reply(status, {"error": {"message": f"bad key {API_KEY}"}}))
    engine = make(provider.base_url)
    with caplog.at_level(logging.WARNING, logger="engines.openai_images"), \
            pytest.raises(StageFailed) as raised:
        engine.run([item()])
    assert len(provider.seen) == 1
    assert raised.value.message == f"provider_error: HTTP {status}"
    assert "bad key [redacted]" in caplog.text and API_KEY not in caplog.text


def test_the_providers_error_text_is_logged_never_put_in_the_stage_error(
        make: Maker, provider: Provider, caplog: pytest.LogCaptureFixture,
        spans: InMemorySpanExporter) -> None:
    detail = "db-7 at 10.2.0.14 refused: account acme-prod over quota"
    provider.script.extend([Reply(500, {"error": {"message": detail}})] * 2)
    engine = make(provider.base_url, sleeps=[], name="opaque", max_attempts=2)
    with caplog.at_level(logging.WARNING, logger="engines.openai_images"), \
            pytest.raises(EngineUnavailable) as raised:
        engine.run([item()])
    assert raised.value.message.endswith("last: provider_error: HTTP 500")
    assert detail not in raised.value.message
    logged = [r.getMessage() for r in caplog.records if detail in r.getMessage()]
    assert len(logged) == 2 and "engine opaque" in logged[0] and "500" in logged[0]
    calls = [s for s in spans.get_finished_spans()
             if s.kind is SpanKind.CLIENT and s.attributes["laneway.engine"] == "opaque"]
    assert len(calls) == 2
    assert all("provider_error: HTTP 500" in (s.status.description or "") for s in calls)
    assert detail not in str([(s.status.description, [dict(e.attributes or {}) for e in s.events])
                              for s in calls])


def test_a_missing_key_variable_is_named_without_a_value(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LANEWAY_PROVIDER_TEST_MISSING_KEY", raising=False)
    spec = EngineSpec.model_validate({"kind": "http.openai_images", "model": "m",
                                      "base_url": "http://127.0.0.1:9/v1",
                                      "allow_insecure": True,
                                      "api_key_env": "LANEWAY_PROVIDER_TEST_MISSING_KEY"})
    with pytest.raises(Exception, match="api_key_env: environment variable "
                                        "LANEWAY_PROVIDER_TEST_MISSING_KEY is not set"):
        OpenAIImagesEngine(spec, redis_url=redis_url)


async def test_failures_open_the_circuit_and_a_probe_closes_it(
        make: Maker, provider: Provider, redis_url: str) -> None:
    clock = Clock()
    circuit = {"failures": 2, "window_s": 30, "cooldown_s": 10}
    down = make(closed_port_url(), sleeps=[], clock=clock, circuit=circuit)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        for _ in range(2):
            with pytest.raises(EngineUnavailable, match="gave up"):
                down.run([item()])
        assert await is_open(client, "hosted", now_s=clock.now_s)
        up = make(provider.base_url, clock=clock, circuit=circuit)
        with pytest.raises(EngineUnavailable, match="circuit open"):
            up.run([item()])
        assert provider.seen == []  # refused without calling the provider
        clock.now_s += 10
        assert not await is_open(client, "hosted", now_s=clock.now_s)
        (images,) = up.run([item()])  # the probe
        assert len(images) == 1 and len(provider.seen) == 1
        assert not await is_open(client, "hosted", now_s=clock.now_s)
    finally:
        await client.aclose()


def test_rpm_spaces_calls_across_engine_instances(make: Maker, provider: Provider) -> None:
    first, second = make(provider.base_url, rpm=600), make(provider.base_url, rpm=600)
    for engine in (first, second, first):
        engine.run([item()])
    gaps = [b.at_s - a.at_s for a, b in zip(provider.seen, provider.seen[1:], strict=False)]
    assert all(gap >= 0.09 for gap in gaps), gaps
