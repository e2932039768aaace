"""HTTP controllers: thin handlers over the submitter, the job store and the live config."""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from litestar import Controller, Response, get, post
from litestar.datastructures import State
from litestar.di import Provide
from litestar.enums import MediaType
from litestar.response import File

from controlplane.live_config import LiveConfig
from controlplane.settings import Settings
from engines.artifacts import ArtifactStore
from router import keys
from router.errors import NotFound, ValidationFailed
from router.jobs import Job, JobStore
from router.requests import ImageRequest
from router.submit import Submitter
from router.waiters import JobWaiters

WORKER_STALE_S = 10.0


@dataclass
class ApiState:
    settings: Settings
    redis: aioredis.Redis
    live: LiveConfig
    jobs: JobStore
    waiters: JobWaiters
    artifacts: ArtifactStore
    submitter: Submitter

    def as_litestar_state(self) -> State:
        return State({"api": self})


def provide_api(state: State) -> ApiState:
    api: ApiState = state["api"]
    return api


def _job_response(job: Job, *, status_code: int = 200) -> Response[dict[str, Any]]:
    return Response(job.public(), status_code=status_code)


class JobsController(Controller):
    path = "/v1"
    dependencies = {"api": Provide(provide_api, sync_to_thread=False)}

    @post("/images", operation_id="submitImage", status_code=202)
    async def submit(self, data: ImageRequest, api: ApiState) -> Response[dict[str, Any]]:
        """Accept a generation; with ``wait`` > 0, hold the request until it ends or times out."""
        if data.wait <= 0:
            job = await api.submitter.submit(data)
            return _job_response(job, status_code=202)
        job = await api.submitter.submit(data)
        # Register, then re-read: a job that ended before registration is seen by the read,
        # one that ends after it wakes the future.
        submitted = api.waiters.register(job.id)
        try:
            current = await api.jobs.get(job.id)
            if current.status.is_final:
                return _job_response(current)
            finished = await asyncio.wait_for(asyncio.shield(submitted), timeout=data.wait)
            return _job_response(finished)
        except TimeoutError:
            return _job_response(await api.jobs.get(job.id), status_code=202)
        finally:
            api.waiters.forget(job.id, submitted)

    @get("/jobs/{job_id:str}", operation_id="getJob")
    async def get_job(self, job_id: str, api: ApiState) -> Response[dict[str, Any]]:
        return _job_response(await api.jobs.get(job_id))

    @get("/jobs/{job_id:str}/images/{index:int}", operation_id="getJobImage",
         media_type="image/png")
    async def get_image(self, job_id: str, index: int, api: ApiState,
                        format: str = "png") -> Response[bytes] | File:
        """The image, PNG by default, with generation metadata in its text chunks."""
        job = await api.jobs.get(job_id)
        if not 0 <= index < len(job.images):
            raise NotFound(f"job {job_id} has no image {index} (it has {len(job.images)})")
        path = api.artifacts.final_path(job_id, index)
        if format == "png":
            return File(path, media_type="image/png", content_disposition_type="inline")
        if format not in {"webp", "jpeg"}:
            raise ValidationFailed.of("format", "must be png, webp or jpeg", format)
        buffer = io.BytesIO()
        image = await asyncio.to_thread(api.artifacts.load, path)
        image.convert("RGB").save(buffer, format=format.upper())
        return Response(buffer.getvalue(), media_type=f"image/{format}")


class SystemController(Controller):
    dependencies = {"api": Provide(provide_api, sync_to_thread=False)}

    @get("/v1/routes", operation_id="getRoutes")
    async def routes(self, api: ApiState) -> dict[str, Any]:
        """The policy in force: its version, routes and engines."""
        policy = api.live.snapshot.policy
        body = policy.model_dump(mode="json")
        body["policy_version"] = policy.version_id
        return body

    @get("/healthz", operation_id="healthz", media_type=MediaType.JSON)
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @get("/readyz", operation_id="readyz")
    async def readyz(self, api: ApiState) -> Response[dict[str, Any]]:
        """Ready when Redis answers, a policy is loaded and at least one worker is alive."""
        problems = []
        try:
            await api.redis.ping()
        except aioredis.RedisError as exc:
            problems.append(f"redis: {exc}")
        workers = await live_workers(api.redis) if not problems else []
        if not workers:
            problems.append("no live worker")
        body = {"status": "ready" if not problems else "not_ready", "problems": problems,
                "policy_version": api.live.snapshot.policy.version_id, "workers": len(workers)}
        return Response(body, status_code=200 if not problems else 503)


async def live_workers(redis: aioredis.Redis) -> list[dict[str, Any]]:
    """Workers whose heartbeat is fresher than WORKER_STALE_S."""
    names = await redis.smembers(keys.workers())
    if not names:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(keys.worker_heartbeat(name.decode()))
        rows = await pipe.execute()
    out = []
    for row in rows:
        if not row:
            continue
        info = {k.decode(): v.decode() for k, v in row.items()}
        if time.time() - float(info.get("heartbeat_at", 0)) <= WORKER_STALE_S:
            out.append(info)
    return out
