"""Shared fixtures: the bundled Valkey server, a SeaweedFS S3 server, a tiny model registry."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from controlplane.registry import Registry
from engines.tiny_models import make_tiny
from laneway.embedded_redis import EmbeddedRedis
from tests.s3 import SeaweedS3
from tests.span_collector import SpanCollector

torch.set_num_threads(1)

POLICIES = Path(__file__).parent / "policies"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """The tiny random-weight models, built once per test session."""
    registry = Registry(tmp_path_factory.mktemp("registry"))
    make_tiny(registry)
    return registry


@pytest.fixture(scope="session")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("valkey"), die_with_parent=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(valkey: EmbeddedRedis) -> str:
    """A URL to the bundled server, emptied before the test."""
    client = redis.Redis.from_url(valkey.url)
    client.flushall()
    client.close()
    return valkey.url


@pytest.fixture(scope="module")
def collector() -> Iterator[SpanCollector]:
    """An OTLP span receiver on loopback for one test module."""
    spans = SpanCollector()
    yield spans
    spans.close()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One SeaweedFS S3 server for the session (started on first use)."""
    with SeaweedS3(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture
def s3_location(seaweed: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> str:
    """``s3://BUCKET/PREFIX`` with a prefix of the test's own, and the standard ``AWS_*``
    variables set for the test (an API or worker in this process reads them)."""
    for name, value in seaweed.environ.items():
        monkeypatch.setenv(name, value)
    return f"s3://{seaweed.bucket}/test-{secrets.token_hex(6)}"
