"""HTTP controllers: thin handlers over the submitter, the job store and the live config."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import redis.asyncio as aioredis
from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.di import Provide
from litestar.enums import MediaType
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter
from litestar.response import ServerSentEvent, ServerSentEventMessage, Stream
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST

from controlplane.api_models import HealthOut, JobOut, ReadyOut, RoutesOut, StatusOut, strict
from controlplane.artifacts import ArtifactStore, final_key
from controlplane.errors import FieldError, Forbidden, NotFound, PayloadTooLarge, ValidationFailed
from controlplane.jobs import Job, JobStore
from controlplane.live_config import LiveConfig
from controlplane.settings import Settings
from router.cancel import cancel_job
from router.engine_liveness import EngineLiveness
from router.event_fanout import EventFanout
from router.job_events import check_last_event_id, event_messages
from router.metrics import render_metrics
from router.openapi_responses import JOB_ERRORS, errors
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
    #: where tenants' keys are read: ``api_key_env`` name → key (the process environment)
    secrets: Mapping[str, str]
    live: LiveConfig
    jobs: JobStore
    waiters: JobWaiters
    #: the process's one reader of job event streams, serving every SSE client
    fanout: EventFanout
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


async def refuse_large_body(request: Request[Any, Any, Any]) -> None:
    """413 when a submit's body is larger than the policy's ``limits.body_limit_bytes``,
    before it is parsed: by its ``Content-Length`` without reading it, else by its length
    once read (Litestar stops reading at ``MAX_BODY_BYTES_CEILING``)."""
    limit = provide_api(request.app.state).live.snapshot.policy.limits.body_limit_bytes
    size = request.content_length
    if size is None:
        size = len(await request.body())  # kept by the request for the handler's ``data``
    if size > limit:
        reason = f"is {size} bytes; the limit is {limit} (limits.max_body_bytes)"
        raise PayloadTooLarge(f"request body {reason}", details=[FieldError("body", reason)])


def public_job(api: ApiState, job: Job) -> JobOut:
    """The job as clients see it; with ``LANEWAY_IMAGE_URLS=presigned`` each image's
    ``url`` is a presigned URL of its object, valid for ``image_url_ttl_s``."""
    body = job.public()
    if api.settings.image_urls == "presigned":
        for image in body["images"]:
            image["url"] = api.artifacts.presigned_url(
                final_key(job.id, image["index"]), expires_s=api.settings.image_url_ttl_s)
    return strict(JobOut, body)


def _job_response(api: ApiState, job: Job, *, status_code: int = 200) -> Response[JobOut]:
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


async def image_response(api: ApiState, job: Job, index: int,
                         format: str) -> Response[bytes] | Stream:
    """Image ``index`` of ``job``: the stored PNG streamed from the artifact store, or
    re-encoded as webp or jpeg (in a thread)."""
    if not 0 <= index < len(job.images):
        raise NotFound(f"job {job.id} has no image {index} (it has {len(job.images)})")
    if format not in {"png", "webp", "jpeg"}:
        raise ValidationFailed.of("format", "must be png, webp or jpeg", format)
    key = final_key(job.id, index)
    try:
        if format == "png":
            download = await api.artifacts.open(key)
            return Stream(download.chunks, media_type="image/png", headers={
                "Content-Length": str(download.size), "Content-Disposition": "inline"})
        image = await asyncio.to_thread(api.artifacts.load, key)
    except FileNotFoundError:
        raise NotFound(f"image {index} of job {job.id} is not in the artifact store "
                       "(any more)") from None
    return Response(await asyncio.to_thread(_encode, image, format),
                    media_type=f"image/{format}")


def _encode(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=format.upper())
    return buffer.getvalue()


class JobsController(Controller):
    path = "/v1"
    dependencies = {"api": Provide(provide_api, sync_to_thread=False)}

    @post("/images", operation_id="submitImage", status_code=202,
          before_request=refuse_large_body, responses={
              200: ResponseSpec(JobOut, description="the job ended within `wait`",
                                generate_examples=False),
              **errors(400, 401, 403, 409, 413, 422, 429, 503)})
    async def submit(
        self, data: ImageRequest, api: ApiState, authorization: AuthorizationHeader = None,
        idempotency_key: Annotated[str | None, Parameter(
            header="Idempotency-Key", required=False)] = None,
    ) -> Response[JobOut]:
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

    @delete("/jobs/{job_id:str}", operation_id="cancelJob", status_code=200,
            responses=errors(*JOB_ERRORS))
    async def cancel(self, job_id: str, api: ApiState,
                     authorization: AuthorizationHeader = None) -> Response[JobOut]:
        """Cancel a job; idempotent: an ended job is returned unchanged."""
        policy = api.live.snapshot.policy
        tenant = (authenticate(policy, authorization, secrets=api.secrets)
                  if policy.tenants else None)
        job, _ = await cancel_job(api.jobs, api.submitter.transitions, job_id, tenant=tenant)
        return _job_response(api, job)

    @get("/jobs/{job_id:str}/events", operation_id="getJobEvents",
         media_type="text/event-stream", responses=errors(*JOB_ERRORS))
    async def events(self, job_id: str, api: ApiState, last_event_id: Annotated[
            str | None, Parameter(header="Last-Event-ID", required=False)] = None,
                     authorization: AuthorizationHeader = None) -> ServerSentEvent:
        """The job's events as Server-Sent Events: its state first, then its history, live.

        400 for a malformed ``Last-Event-ID``; 429 ``too_many_streams`` (Retry-After) when
        this process has ``sse_max_streams`` open, or the caller's tenant
        ``sse_max_streams_per_tenant``.
        """
        check_last_event_id(last_event_id)
        job = await _visible_job(api, job_id, authorization)
        tenant = job.request.tenant if api.live.snapshot.policy.tenants else None
        messages: AsyncIterator[ServerSentEventMessage] = event_messages(
            api.fanout, api.jobs, job, tenant=tenant, last_event_id=last_event_id,
            max_duration_s=api.settings.sse_max_duration_s,
            public=lambda job: public_job(api, job).model_dump(mode="json"))
        return ServerSentEvent(messages)

    @get("/jobs/{job_id:str}", operation_id="getJob", responses=errors(*JOB_ERRORS))
    async def get_job(self, job_id: str, api: ApiState,
                      authorization: AuthorizationHeader = None) -> Response[JobOut]:
        return _job_response(api, await _visible_job(api, job_id, authorization))

    @get("/jobs/{job_id:str}/images/{index:int}", operation_id="getJobImage",
         media_type="image/png", responses=errors(*JOB_ERRORS))
    async def get_image(self, job_id: str, index: int, api: ApiState, format: str = "png",
                        authorization: AuthorizationHeader = None) -> Response[bytes] | Stream:
        """The image, PNG by default (streamed from the artifact store as stored), with its
        provenance as JSON in its ``laneway`` text chunk (job, prompt, seed, model
        versions, policy version, route)."""
        job = await _visible_job(api, job_id, authorization)
        return await image_response(api, job, index, format)


class SystemController(Controller):
    dependencies = {"api": Provide(provide_api, sync_to_thread=False)}

    @get("/v1/routes", operation_id="getRoutes", responses=errors(400, 401, 503))
    async def routes(self, api: ApiState,
                     authorization: AuthorizationHeader = None) -> RoutesOut:
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
        return strict(RoutesOut, body)

    @get("/v1/status", operation_id="getStatus", responses=errors(400, 401, 503))
    async def status(self, api: ApiState,
                     authorization: AuthorizationHeader = None) -> StatusOut:
        """Lanes (depth, oldest age), live workers (slots, heartbeat) and deployments.

        With tenants it takes a tenant key or the admin token; a tenant sees the lanes of
        the tiers it may use and the deferred queue, not workers, deployments or rollouts.
        """
        snapshot = api.live.snapshot
        who = viewer(snapshot.policy, authorization, secrets=api.secrets,
                     admin_token=api.settings.admin_token)
        body = await status_body(api.redis, snapshot)
        if who.sees_all:
            return strict(StatusOut, body)
        spec = snapshot.policy.tenants[who.tenant or ""]
        tiers = set(spec.tiers or snapshot.policy.tiers)
        return strict(StatusOut, {
            "policy_version": body["policy_version"], "deferred": body["deferred"],
            "lanes": [lane for lane in body["lanes"] if lane["tier"] in tiers]})

    @get("/metrics", operation_id="metrics", media_type=CONTENT_TYPE_LATEST,
         responses=errors(400, 403, 503))
    async def metrics(self, api: ApiState,
                      authorization: AuthorizationHeader = None) -> Response[bytes]:
        """Prometheus text: lanes, slots, stage times, admission, job outcomes, spend,
        per-version counters, rollouts, dead letters.

        With ``LANEWAY_METRICS_TOKEN`` set, scrapes carry ``Authorization: Bearer TOKEN``.
        """
        token = api.settings.metrics_token
        if token and not token_matches(authorization, token):
            raise Forbidden("metrics token not accepted")
        snapshot = api.live.snapshot
        body = await render_metrics(api.redis, snapshot.policy,
                                    deployments=snapshot.deployments)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @get("/healthz", operation_id="healthz", media_type=MediaType.JSON, responses=errors())
    async def healthz(self) -> HealthOut:
        return HealthOut(status="ok")

    @get("/readyz", operation_id="readyz", responses={
        503: ResponseSpec(ReadyOut, description="not ready: the problems are listed",
                          generate_examples=False), **errors()})
    async def readyz(self, api: ApiState) -> Response[ReadyOut]:
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
        return Response(strict(ReadyOut, body), status_code=200 if not problems else 503)

