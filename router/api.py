"""HTTP controllers: thin handlers over the submitter, the job store and the live config."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import redis.asyncio as aioredis
from litestar import Controller, Response, delete, get, post
from litestar.datastructures import State
from litestar.di import Provide
from litestar.enums import MediaType
from litestar.params import Parameter
from litestar.response import ServerSentEvent, ServerSentEventMessage, Stream
from prometheus_client import CONTENT_TYPE_LATEST

from controlplane.artifacts import ArtifactStore, final_key
from controlplane.errors import Forbidden, NotFound, ValidationFailed
from controlplane.jobs import Job, JobStore
from controlplane.live_config import LiveConfig
from controlplane.settings import Settings
from router.cancel import cancel_job
from router.engine_liveness import EngineLiveness
from router.job_events import job_event_messages
from router.metrics import render_metrics
from router.requests import ImageRequest
from router.status import status_body
from router.submit import Submitter, new_job_id
from router.tenants import authenticate, token_matches, viewer
from router.waiters import JobWaiters

AuthorizationHeader = Annotated[str | None, Parameter(header="Authorization", required=False)]


@dataclass
class ApiState:
    settings: Settings
    #: request-path commands; fails within ``settings.redis_timeout_s`` when Redis is down
    redis: aioredis.Redis
    #: blocking reads (XREAD BLOCK of event streams): its reply timeout outlasts the BLOCK
    blocking_redis: aioredis.Redis
    #: where tenants' keys are read: ``api_key_env`` name → key (the process environment)
    secrets: Mapping[str, str]
    live: LiveConfig
    jobs: JobStore
    waiters: JobWaiters
    artifacts: ArtifactStore
    submitter: Submitter
    liveness: EngineLiveness
    #: what is wrong with the processes hosting the API (``laneway serve``'s supervisor)
    host_problems: Callable[[], list[str]] = list

    def as_litestar_state(self) -> State:
        return State({"api": self})


def provide_api(state: State) -> ApiState:
    api: ApiState = state["api"]
    return api


def public_job(api: ApiState, job: Job) -> dict[str, Any]:
    """The job as clients see it; with ``LANEWAY_IMAGE_URLS=presigned`` each image's
    ``url`` is a presigned URL of its object, valid for ``image_url_ttl_s``."""
    body = job.public()
    if api.settings.image_urls == "presigned":
        for image in body["images"]:
            image["url"] = api.artifacts.presigned_url(
                final_key(job.id, image["index"]), expires_s=api.settings.image_url_ttl_s)
    return body


def _job_response(api: ApiState, job: Job, *, status_code: int = 200
                  ) -> Response[dict[str, Any]]:
    return Response(public_job(api, job), status_code=status_code)


async def _visible_job(api: ApiState, job_id: str, authorization: str | None) -> Job:
    """The job, if the caller may see it: with tenants, only the tenant's own (else 404)."""
    policy = api.live.snapshot.policy
    # authenticate first: an unknown caller learns nothing, not even whether the id exists
    tenant = authenticate(policy, authorization, secrets=api.secrets)
    job = await api.jobs.get(job_id)
    if policy.tenants and job.request.tenant != tenant:
        raise NotFound(f"job {job_id!r} does not exist")
    return job


class JobsController(Controller):
    path = "/v1"
    dependencies = {"api": Provide(provide_api, sync_to_thread=False)}

    @post("/images", operation_id="submitImage", status_code=202)
    async def submit(
        self, data: ImageRequest, api: ApiState, authorization: AuthorizationHeader = None,
        idempotency_key: Annotated[str | None, Parameter(
            header="Idempotency-Key", required=False)] = None,
    ) -> Response[dict[str, Any]]:
        """Accept a generation; with ``wait`` > 0, hold the request until it ends or times out.

        A repeated ``Idempotency-Key`` answers with the original job (header
        ``Idempotent-Replayed: true``): 200 when it has ended, else 202.
        """
        tenant = authenticate(api.live.snapshot.policy, authorization, secrets=api.secrets)
        job_id = new_job_id()
        with api.waiters.waiting(job_id) as ended:
            accepted = await api.submitter.submit(data, tenant=tenant, job_id=job_id,
                                                  idempotency_key=idempotency_key)
            job = accepted.job
            headers = {"Idempotent-Replayed": "true"} if accepted.replayed else {}
            if data.wait > 0:
                try:
                    job = await api.waiters.until_final(accepted, ended, api.jobs,
                                                        timeout_s=data.wait)
                except TimeoutError:
                    job = await api.jobs.get(job.id)
        return Response(public_job(api, job), status_code=200 if job.status.is_final else 202,
                        headers=headers)

    @delete("/jobs/{job_id:str}", operation_id="cancelJob", status_code=200)
    async def cancel(self, job_id: str, api: ApiState,
                     authorization: AuthorizationHeader = None) -> Response[dict[str, Any]]:
        """Cancel a job; idempotent: an ended job is returned unchanged."""
        policy = api.live.snapshot.policy
        tenant = (authenticate(policy, authorization, secrets=api.secrets)
                  if policy.tenants else None)
        job, _ = await cancel_job(api.jobs, api.submitter.transitions, job_id, tenant=tenant)
        return _job_response(api, job)

    @get("/jobs/{job_id:str}/events", operation_id="getJobEvents")
    async def events(self, job_id: str, api: ApiState, last_event_id: Annotated[
            str | None, Parameter(header="Last-Event-ID", required=False)] = None,
                     authorization: AuthorizationHeader = None) -> ServerSentEvent:
        """The job's events as Server-Sent Events: its state first, then its history, live."""
        await _visible_job(api, job_id, authorization)
        messages: AsyncIterator[ServerSentEventMessage] = await job_event_messages(
            api.blocking_redis, api.jobs, job_id, last_event_id=last_event_id,
            public=lambda job: public_job(api, job))
        return ServerSentEvent(messages)

    @get("/jobs/{job_id:str}", operation_id="getJob")
    async def get_job(self, job_id: str, api: ApiState,
                      authorization: AuthorizationHeader = None) -> Response[dict[str, Any]]:
        return _job_response(api, await _visible_job(api, job_id, authorization))

    @get("/jobs/{job_id:str}/images/{index:int}", operation_id="getJobImage",
         media_type="image/png")
    async def get_image(self, job_id: str, index: int, api: ApiState, format: str = "png",
                        authorization: AuthorizationHeader = None) -> Response[bytes] | Stream:
        """The image, PNG by default (streamed from the artifact store as stored, with
        generation metadata in its text chunks)."""
        job = await _visible_job(api, job_id, authorization)
        if not 0 <= index < len(job.images):
            raise NotFound(f"job {job_id} has no image {index} (it has {len(job.images)})")
        if format not in {"png", "webp", "jpeg"}:
            raise ValidationFailed.of("format", "must be png, webp or jpeg", format)
        key = final_key(job_id, index)
        try:
            if format == "png":
                download = await api.artifacts.open(key)
                return Stream(download.chunks, media_type="image/png", headers={
                    "Content-Length": str(download.size), "Content-Disposition": "inline"})
            image = await asyncio.to_thread(api.artifacts.load, key)
        except FileNotFoundError:
            raise NotFound(f"image {index} of job {job_id} is not in the artifact store "
                           f"(any more)") from None
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format=format.upper())
        return Response(buffer.getvalue(), media_type=f"image/{format}")


class SystemController(Controller):
    dependencies = {"api": Provide(provide_api, sync_to_thread=False)}

    @get("/v1/routes", operation_id="getRoutes")
    async def routes(self, api: ApiState,
                     authorization: AuthorizationHeader = None) -> dict[str, Any]:
        """The policy in force: its version, routes and engines.

        With tenants it takes a tenant key (which sees its own tenant entry only) or the
        admin token.
        """
        policy = api.live.snapshot.policy
        who = viewer(policy, authorization, secrets=api.secrets,
                     admin_token=api.settings.admin_token)
        body = policy.model_dump(mode="json")
        if not who.sees_all:
            body["tenants"] = {who.tenant: body["tenants"][who.tenant]}
        body["policy_version"] = policy.version_id
        return body

    @get("/v1/status", operation_id="getStatus")
    async def status(self, api: ApiState,
                     authorization: AuthorizationHeader = None) -> dict[str, Any]:
        """Lanes (depth, oldest age), live workers (slots, heartbeat) and deployments.

        With tenants it takes a tenant key or the admin token; a tenant sees the lanes of
        the tiers it may use and the deferred queue, not workers, deployments or rollouts.
        """
        snapshot = api.live.snapshot
        who = viewer(snapshot.policy, authorization, secrets=api.secrets,
                     admin_token=api.settings.admin_token)
        body = await status_body(api.redis, snapshot)
        if who.sees_all:
            return body
        spec = snapshot.policy.tenants[who.tenant or ""]
        tiers = set(spec.tiers or snapshot.policy.tiers)
        return {"policy_version": body["policy_version"], "deferred": body["deferred"],
                "lanes": [lane for lane in body["lanes"] if lane["tier"] in tiers]}

    @get("/metrics", operation_id="metrics", media_type=CONTENT_TYPE_LATEST)
    async def metrics(self, api: ApiState,
                      authorization: AuthorizationHeader = None) -> Response[bytes]:
        """Prometheus text: lanes, slots, stage times, admission, job outcomes, spend.

        With ``LANEWAY_METRICS_TOKEN`` set, scrapes carry ``Authorization: Bearer TOKEN``.
        """
        token = api.settings.metrics_token
        if token and not token_matches(authorization, token):
            raise Forbidden("metrics token not accepted")
        body = await render_metrics(api.redis, api.live.snapshot.policy)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @get("/healthz", operation_id="healthz", media_type=MediaType.JSON)
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @get("/readyz", operation_id="readyz")
    async def readyz(self, api: ApiState) -> Response[dict[str, Any]]:
        """Ready when Redis answers and the processes hosting the API are well.

        Workers are not asked for: API pods stay ready while workers scale to zero (a
        route nobody serves is refused by submit with 503 ``no_engine``). The engines that
        no live worker has served for the grace period are listed.
        """
        problems = list(api.host_problems())
        try:
            await api.redis.ping()
        except aioredis.RedisError as exc:
            problems.append(f"redis: {exc}")
        policy = api.live.snapshot.policy
        body = {"status": "ready" if not problems else "not_ready", "problems": problems,
                "policy_version": policy.version_id,
                "engines_without_workers": api.liveness.unserved(policy.engines)}
        return Response(body, status_code=200 if not problems else 503)

