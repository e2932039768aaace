"""The Litestar application: resources opened in the lifespan, one error-to-HTTP table."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from litestar import Litestar
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin

from controlplane.artifacts import open_artifact_store
from controlplane.errors import LanewayError
from controlplane.jobs import JobStore
from controlplane.live_config import LiveConfig
from controlplane.registry import Registry
from controlplane.settings import Settings
from controlplane.telemetry import setup_tracing, shutdown_tracing
from router import http_errors
from router.admin_api import AdminController
from router.api import ApiState, JobsController, SystemController
from router.deferral import DeferralDispatcher
from router.engine_liveness import EngineLiveness
from router.job_events import READ_BLOCK_MS
from router.openai_compat import OpenAIImagesController
from router.submit import Submitter
from router.waiters import JobWaiters


def request_redis(settings: Settings) -> aioredis.Redis:
    """The client of request-path commands: when Redis is stopped or unreachable they fail
    within ``redis_timeout_s`` (the request answers 503) instead of holding the request."""
    assert settings.redis_url
    return aioredis.Redis.from_url(settings.redis_url, max_connections=256,
                                   socket_connect_timeout=settings.redis_timeout_s,
                                   socket_timeout=settings.redis_timeout_s)


def blocking_redis(settings: Settings) -> aioredis.Redis:
    """The client of blocking reads (an event stream's XREAD BLOCK): its reply timeout is
    the BLOCK plus ``redis_timeout_s``, so a quiet stream is not taken for a dead server."""
    assert settings.redis_url
    return aioredis.Redis.from_url(
        settings.redis_url, socket_connect_timeout=settings.redis_timeout_s,
        socket_timeout=READ_BLOCK_MS / 1000 + settings.redis_timeout_s)


def create_app(settings: Settings, *, secrets: Mapping[str, str],
               host_problems: Callable[[], list[str]] = list) -> Litestar:
    """The API against ``settings.redis_url``; tenants' keys are read from ``secrets``
    (``api_key_env`` name → key: the process environment). ``host_problems`` names what
    is wrong with the processes hosting it (``laneway serve``'s supervisor): ``/readyz``
    reports them."""
    setup_tracing("laneway-router")
    if not settings.redis_url:
        raise RuntimeError("the API needs LANEWAY_REDIS_URL (laneway serve sets it)")
    redis = request_redis(settings)
    blocking = blocking_redis(settings)
    live = LiveConfig(redis)
    waiters = JobWaiters(redis)
    artifacts = open_artifact_store(settings.artifacts)
    liveness = EngineLiveness(redis, grace_s=settings.no_engine_grace_s)
    state = ApiState(
        settings=settings,
        redis=redis,
        blocking_redis=blocking,
        secrets=secrets,
        live=live,
        jobs=JobStore(redis),
        waiters=waiters,
        artifacts=artifacts,
        submitter=Submitter(redis, live, artifacts, settings.job_ttl_s,
                            idempotency_ttl_s=settings.idempotency_ttl_s,
                            registry=Registry(settings.registry), liveness=liveness),
        liveness=liveness,
        host_problems=host_problems,
    )
    deferral = DeferralDispatcher(redis, live, job_ttl_s=settings.job_ttl_s)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await live.start()
        await waiters.start()
        await deferral.start()
        await liveness.start()
        try:
            yield
        finally:
            await liveness.stop()
            await deferral.stop()
            await waiters.stop()
            await live.stop()
            await blocking.aclose()
            await redis.aclose()
            shutdown_tracing()

    return Litestar(
        route_handlers=[JobsController, SystemController, AdminController,
                        OpenAIImagesController],
        lifespan=[lifespan],
        dependencies={},
        state=state.as_litestar_state(),
        exception_handlers={  # router/http_errors.py: the contract's shape for all
            LanewayError: http_errors.laneway_error,
            ValidationException: http_errors.validation_error,
            HTTPException: http_errors.http_error,
            **dict.fromkeys(http_errors.REDIS_UNAVAILABLE, http_errors.redis_unavailable),
            Exception: http_errors.unexpected_error,
        },
        plugins=[OpenTelemetryPlugin(OpenTelemetryConfig(exclude=["/healthz", "/readyz",
                                                                   "/metrics"]))],
        openapi_config=OpenAPIConfig(title="Laneway", version="0.1.0", path="/schema"),
        request_max_body_size=64 * 1024 * 1024,
    )
