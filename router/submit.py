"""Accepting a request: validate against the policy, route, pick versions, enqueue.

The accepted job and its first stage entry are written in one Redis transaction, so a job
is either fully queued or not accepted at all.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import redis.asyncio as aioredis
from opentelemetry.trace import Status, StatusCode

from controlplane.live_config import LiveConfig, Snapshot
from controlplane.policy import Mode, Route
from engines.artifacts import ArtifactStore
from router import keys
from router.errors import FieldError, LanewayError
from router.image_input import decode_image
from router.jobs import Job, JobRequest, LoraRequest, StageRecord, StageStatus, now_ms
from router.queue import add_event, enqueue_stage
from router.requests import ImageRequest, check_against_policy, raise_if_any
from router.routing import RequestFacts, choose_route
from router.telemetry import current_carrier, current_trace_id, tracer

_tracer = tracer("laneway.router")


def new_job_id() -> str:
    return "j_" + secrets.token_hex(10)


@dataclass
class Submitter:
    redis: aioredis.Redis
    live: LiveConfig
    artifacts: ArtifactStore
    job_ttl_s: int

    async def submit(self, req: ImageRequest, *, tenant: str = "default") -> Job:
        snapshot = self.live.snapshot
        policy = snapshot.policy
        errors = check_against_policy(req, policy)
        images = self._decode_inputs(req, snapshot, errors)
        raise_if_any(errors)

        tier = req.tier or policy.default_tier
        width = req.width or policy.limits.default_width
        height = req.height or policy.limits.default_height
        facts = RequestFacts(intent=req.intent, has_text=bool(req.expected_text()), tier=tier,
                             mode=req.mode, pixels=width * height)
        job_id = new_job_id()
        with _tracer.start_as_current_span("laneway.route") as span:
            try:
                route = choose_route(policy, facts)
            except LanewayError as exc:
                span.set_status(Status(StatusCode.ERROR, exc.message))
                raise
            span.set_attributes({
                "laneway.job_id": job_id, "laneway.route": route.name,
                "laneway.engine": route.stages[0].engine,
                "laneway.policy_version": policy.version_id, "laneway.tier": tier,
            })
            job = Job(
                id=job_id,
                intent=req.intent.value,
                route=route.name,
                policy_version=policy.version_id,
                request=JobRequest(
                    prompt=req.prompt, negative_prompt=req.negative_prompt, width=width,
                    height=height, n=req.n,
                    seed=req.seed if req.seed is not None else secrets.randbelow(2**31),
                    mode=req.mode.value, strength=req.strength,
                    lora=LoraRequest(id=req.lora.id, scale=req.lora.scale) if req.lora else None,
                    text=req.expected_text(), tier=tier, tenant=tenant, metadata=req.metadata,
                    has_image=req.image is not None, has_mask=req.mask is not None,
                ),
                stages=self._stage_records(route, snapshot, job_id),
                trace_id=current_trace_id(),
                trace_context=current_carrier(),
                deadline_ms=now_ms() + int(route.timeout_s * 1000),
            )
            for name, image in images.items():
                self.artifacts.save(self.artifacts.input_path(job_id, name), image)
            with _tracer.start_as_current_span("laneway.enqueue") as enqueue_span:
                await self._enqueue(job)
                enqueue_span.set_attribute("laneway.stream",
                                           keys.engine_stream(job.stages[0].engine, tier))
        return job

    def _decode_inputs(self, req: ImageRequest, snapshot: Snapshot,
                       errors: list[FieldError]) -> dict[str, object]:
        limits = snapshot.policy.limits
        decoded: dict[str, object] = {}
        for name, payload, mode in (("image", req.image, "RGB"), ("mask", req.mask, "L")):
            if payload is None or req.mode is Mode.txt2img:
                continue
            image, error = decode_image(name, payload, max_bytes=limits.max_image_bytes,
                                        max_pixels=limits.max_pixels, mode=mode)
            if error is not None:
                errors.append(error)
            else:
                decoded[name] = image
        if "image" in decoded and "mask" in decoded:
            size_i, size_m = decoded["image"].size, decoded["mask"].size  # type: ignore[attr-defined]
            if size_i != size_m:
                errors.append(FieldError(
                    "mask", f"is {size_m[0]}x{size_m[1]} but image is {size_i[0]}x{size_i[1]}"))
        return decoded

    @staticmethod
    def _stage_records(route: Route, snapshot: Snapshot, job_id: str) -> list[StageRecord]:
        records = []
        for i, stage in enumerate(route.stages):
            spec = snapshot.policy.engines[stage.engine]
            model = spec.model if spec.is_local_model else None
            records.append(StageRecord(
                engine=stage.engine,
                model=model,
                model_version=snapshot.model_version(model, job_id) if model else None,
                status=StageStatus.queued if i == 0 else StageStatus.pending,
            ))
        return records

    async def _enqueue(self, job: Job) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            enqueue_stage(pipe, job, 0)
            pipe.set(keys.job(job.id), job.model_dump_json(), ex=self.job_ttl_s, nx=True)
            add_event(pipe, job.id, "queued", route=job.route, stage=0,
                      engine=job.stages[0].engine)
            await pipe.execute()
