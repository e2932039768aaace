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
from controlplane.policy import MAX_BODY_BYTES_CEILING
from controlplane.registry import Registry
from controlplane.settings import Settings
from controlplane.telemetry import setup_tracing, shutdown_tracing
from router import http_errors
from router.admin_api import AdminController
from router.api import ApiState, JobsController, SystemController
from router.console import ConsoleController
from router.deferral import DeferralDispatcher
from router.engine_liveness import EngineLiveness
from router.event_fanout import EventFanout
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
    fanout = EventFanout(redis, max_streams=settings.sse_max_streams,
                         max_streams_per_tenant=settings.sse_max_streams_per_tenant)
    live = LiveConfig(redis)
    waiters = JobWaiters(redis)
    artifacts = open_artifact_store(settings.artifacts)
    liveness = EngineLiveness(redis, grace_s=settings.no_engine_grace_s)
    state = ApiState(
        settings=settings,
        redis=redis,
        secrets=secrets,
        live=live,
        jobs=JobStore(redis),
        waiters=waiters,
        fanout=fanout,
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
            await fanout.stop()
            await liveness.stop()
            await deferral.stop()
            await waiters.stop()
            await live.stop()
            await redis.aclose()
            shutdown_tracing()

    return Litestar(
        route_handlers=[JobsController, SystemController, AdminController,
                        OpenAIImagesController, ConsoleController],
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
        request_max_body_size=MAX_BODY_BYTES_CEILING,
    )
