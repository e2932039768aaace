"""The Litestar application: resources opened in the lifespan, one error-to-HTTP table."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from litestar import Litestar, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin

from controlplane.artifacts import ArtifactStore
from controlplane.errors import AdmissionRefused, LanewayError
from controlplane.jobs import JobStore
from controlplane.live_config import LiveConfig
from controlplane.registry import Registry
from controlplane.settings import Settings
from controlplane.telemetry import setup_tracing, shutdown_tracing
from router.admin_api import AdminController
from router.api import ApiState, JobsController, SystemController
from router.deferral import DeferralDispatcher
from router.openai_compat import OpenAIImagesController
from router.submit import Submitter
from router.waiters import JobWaiters

log = logging.getLogger(__name__)


def _laneway_error(_: Request, exc: LanewayError) -> Response:
    headers = {}
    if isinstance(exc, AdmissionRefused):
        headers["Retry-After"] = str(exc.retry_after_s)
    if exc.status_code >= 500:
        log.error("request failed: %s", exc.message)
    return Response(exc.as_body(), status_code=exc.status_code, headers=headers)


def _validation_error(_: Request, exc: ValidationException) -> Response:
    details = []
    for item in exc.extra if isinstance(exc.extra, list) else []:
        field = item.get("key") or item.get("source") or "body"
        details.append({"field": field, "message": item.get("message", "invalid")})
    message = "; ".join(f"{d['field']}: {d['message']}" for d in details) or exc.detail
    body = {"error": {"code": "invalid_request", "message": message, "details": details}}
    return Response(body, status_code=422)


def _http_error(_: Request, exc: HTTPException) -> Response:
    body = {"error": {"code": "http_error", "message": exc.detail, "details": []}}
    return Response(body, status_code=exc.status_code, headers=exc.headers)


def create_app(settings: Settings, *, secrets: Mapping[str, str]) -> Litestar:
    """The API against ``settings.redis_url``; tenants' keys are read from ``secrets``
    (``api_key_env`` name → key: the process environment)."""
    setup_tracing("laneway-router")
    if not settings.redis_url:
        raise RuntimeError("the API needs LANEWAY_REDIS_URL (laneway serve sets it)")
    redis = aioredis.Redis.from_url(settings.redis_url, max_connections=256)
    live = LiveConfig(redis)
    waiters = JobWaiters(redis)
    artifacts = ArtifactStore(settings.artifacts)
    state = ApiState(
        settings=settings,
        redis=redis,
        secrets=secrets,
        live=live,
        jobs=JobStore(redis, ttl_s=settings.job_ttl_s),
        waiters=waiters,
        artifacts=artifacts,
        submitter=Submitter(redis, live, artifacts, settings.job_ttl_s,
                            idempotency_ttl_s=settings.idempotency_ttl_s,
                            registry=Registry(settings.registry)),
    )
    deferral = DeferralDispatcher(redis, live, job_ttl_s=settings.job_ttl_s)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await live.start()
        await waiters.start()
        await deferral.start()
        try:
            yield
        finally:
            await deferral.stop()
            await waiters.stop()
            await live.stop()
            await redis.aclose()
            shutdown_tracing()

    return Litestar(
        route_handlers=[JobsController, SystemController, AdminController,
                        OpenAIImagesController],
        lifespan=[lifespan],
        dependencies={},
        state=state.as_litestar_state(),
        exception_handlers={
            LanewayError: _laneway_error,
            ValidationException: _validation_error,
            HTTPException: _http_error,
        },
        plugins=[OpenTelemetryPlugin(OpenTelemetryConfig(exclude=["/healthz", "/readyz",
                                                                   "/metrics"]))],
        openapi_config=OpenAPIConfig(title="Laneway", version="0.1.0", path="/schema"),
        request_max_body_size=64 * 1024 * 1024,
    )
