"""Accepting a request: validate, route, honour Idempotency-Key, admit, pick versions, enqueue.

The accepted job, its first stage entry (or its deferred entry), the route's in-flight
count, the admission outcome and the idempotency claim are written by one transition
(``controlplane.transitions``) that also checks the route's bound, so a job is either fully
queued or not accepted at all, and a route never holds more than ``max_queue`` jobs.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from opentelemetry.trace import Status, StatusCode
from PIL import Image

from controlplane import keys, route_counters
from controlplane.artifacts import ArtifactStore, input_key, job_prefix
from controlplane.circuit import is_open
from controlplane.errors import FieldError, LanewayError, NoEngine, ValidationFailed
from controlplane.jobs import (
    Job,
    JobRequest,
    JobStore,
    LoraRequest,
    StageRecord,
    now_ms,
)
from controlplane.live_config import LiveConfig, Snapshot
from controlplane.policy import EngineKind, Mode, Policy, Route, Stage
from controlplane.registry import Registry
from controlplane.retention import record_expiry
from controlplane.telemetry import current_carrier, current_trace_id, tracer
from controlplane.transitions import Change, Transitions
from router.admission import AdmissionControl, Admitted, Outcome, record_outcome
from router.engine_liveness import EngineLiveness
from router.idempotency import Claim, IdempotencyKeys, check_key
from router.image_input import decode_image
from router.requests import ImageRequest, check_against_policy, raise_if_any
from router.routing import RequestFacts, choose_route
from router.tenants import DEFAULT_TENANT, check_tier

_tracer = tracer("laneway.router")

#: engine kinds that apply a request's LoRA adapter
LORA_KINDS = frozenset({EngineKind.text2image, EngineKind.image2image, EngineKind.inpaint})
#: accepted job ids kept in ``lw:recent-jobs`` for the console (approximately: MAXLEN ~)
RECENT_JOBS_KEPT = 1000


def _has_inputs(req: ImageRequest) -> bool:
    """Whether the request carries images that its mode reads."""
    return req.mode is not Mode.txt2img and (req.image is not None or req.mask is not None)


def new_job_id() -> str:
    return "j_" + secrets.token_hex(10)


@dataclass(frozen=True)
class Accepted:
    job: Job
    #: the job was accepted earlier under the same Idempotency-Key
    replayed: bool = False


@dataclass
class Submitter:
    redis: aioredis.Redis
    live: LiveConfig
    artifacts: ArtifactStore
    job_ttl_s: int
    idempotency_ttl_s: int = 24 * 3600
    registry: Registry | None = None
    #: refuses routes whose first engine no live worker serves (None: accept regardless)
    liveness: EngineLiveness | None = None

    def __post_init__(self) -> None:
        self.admission = AdmissionControl(self.redis)
        self.idempotency = IdempotencyKeys(self.redis, ttl_s=self.idempotency_ttl_s)
        self.jobs = JobStore(self.redis)
        self.transitions = Transitions(self.redis, job_ttl_s=self.job_ttl_s)

    async def submit(self, req: ImageRequest, *, tenant: str = DEFAULT_TENANT,
                     idempotency_key: str | None = None,
                     route_name: str | None = None, job_id: str | None = None) -> Accepted:
        """Accept ``req`` (or return the job its Idempotency-Key already names).

        ``route_name`` names the route to use instead of matching the policy's rules (an alias
        of the OpenAI-compatible endpoint may name one); ``job_id`` is the id to give the
        job (a waiting request registers it before the job can end).
        """
        if idempotency_key is not None:
            check_key(idempotency_key)
        snapshot = self.live.snapshot
        policy = snapshot.policy
        errors = check_against_policy(req, policy)
        # decoding images and reading the registry are CPU and disk work: off the event loop
        images = (await asyncio.to_thread(self._decode_inputs, req, snapshot, errors)
                  if _has_inputs(req) else {})
        lora, lora_base = (await asyncio.to_thread(self._resolve_lora, req, errors)
                           if req.lora is not None else (None, None))
        raise_if_any(errors)

        tier = req.tier or policy.default_tier
        check_tier(policy, tenant, tier)
        width = req.width or policy.limits.default_width
        height = req.height or policy.limits.default_height
        facts = RequestFacts(intent=req.intent, has_text=bool(req.expected_text()), tier=tier,
                             mode=req.mode, pixels=width * height)
        job_id = job_id or new_job_id()
        claim = (None if idempotency_key is None
                 else Claim.of(tenant, idempotency_key, job_id, req.model_dump_json()))
        with _tracer.start_as_current_span("laneway.route") as span:
            try:
                asked = (policy.route(route_name) if route_name
                         else choose_route(policy, facts))
                if claim is not None:
                    original = await self.idempotency.claim_or_original(claim, self.jobs)
                    if original is not None:
                        span.set_attribute("laneway.idempotent_replay", original.id)
                        return Accepted(original, replayed=True)
                if images:
                    await self._store_inputs(job_id, images)
                try:
                    job, admitted = await self._admit(
                        asked, snapshot, job_id, tier, claim, lora, lora_base,
                        lambda route, stages, admitted: self._new_job(
                            job_id, req, route, stages, admitted, tenant=tenant, tier=tier,
                            lora=lora, width=width, height=height))
                except LanewayError:
                    if claim is not None:
                        await self.idempotency.release(claim)
                    if images:  # refused: nothing will ever read them
                        await asyncio.to_thread(self.artifacts.delete_prefix,
                                                job_prefix(job_id))
                    raise
            except LanewayError as exc:
                span.set_status(Status(StatusCode.ERROR, exc.message))
                raise
            span.set_attributes({
                "laneway.job_id": job_id, "laneway.route": job.route,
                "laneway.engine": job.stages[0].engine,
                "laneway.policy_version": policy.version_id, "laneway.tier": tier,
                "laneway.admission": admitted.outcome.value,
            })
        return Accepted(job)

    async def _admit(self, asked: Route, snapshot: Snapshot, job_id: str, tier: str,
                     claim: Claim | None, lora: LoraRequest | None, lora_base: str | None,
                     make_job: Callable[[Route, list[StageRecord], Admitted], Job],
                     ) -> tuple[Job, Admitted]:
        """Accept the job on ``asked``, or where its ``on_full`` sends it when it is full.

        Each try is one atomic accept that checks the route's bound itself, so concurrent
        submits never push a route past ``max_queue``.
        """
        policy = snapshot.policy
        admitted, seen = Admitted(asked, Outcome.accepted), {asked.name}
        while True:
            route = admitted.route
            self._check_lora_base(lora, lora_base, route, policy)
            job = make_job(route, await self._stage_records(route, snapshot, job_id), admitted)
            with _tracer.start_as_current_span("laneway.enqueue") as span:
                span.set_attribute("laneway.stream", keys.deferred_stream() if admitted.deferred
                                   else keys.engine_stream(job.stages[0].engine, tier))
                created = await self.transitions.create(
                    self._accept_change(job, asked, admitted, claim),
                    bound=self.admission.deferred_bound(policy) if admitted.deferred
                    else self.admission.bound(route))
            if created.created:
                return job, admitted
            assert created.full_at is not None
            if admitted.deferred:
                raise await self.admission.deferred_full(policy, asked, tier=tier,
                                                         depth=created.full_at)
            admitted = await self.admission.when_full(policy, asked, route, tier=tier,
                                                      inflight=created.full_at, seen=seen)

    async def _store_inputs(self, job_id: str, images: dict[str, Image.Image]) -> None:
        """Store the request's images, listed for the sweeper first: if this process dies
        before the accept, they still go when the job would have expired."""
        await self.redis.zadd(keys.artifact_expiry(),
                              {job_id: now_ms() + self.job_ttl_s * 1000})
        for name, image in images.items():
            await asyncio.to_thread(self.artifacts.save, input_key(job_id, name), image)

    def _new_job(self, job_id: str, req: ImageRequest, route: Route,
                 stages: list[StageRecord], admitted: Admitted, *, tenant: str, tier: str,
                 lora: LoraRequest | None, width: int, height: int) -> Job:
        policy = self.live.snapshot.policy
        return Job(
            id=job_id,
            intent=req.intent.value,
            route=route.name,
            degraded_from=admitted.degraded_from,
            policy_version=policy.version_id,
            request=JobRequest(
                prompt=req.prompt, negative_prompt=req.negative_prompt, width=width,
                height=height, n=req.n,
                seed=req.seed if req.seed is not None else secrets.randbelow(2**31),
                mode=req.mode.value, strength=req.strength, lora=lora,
                text=req.expected_text(), tier=tier, tenant=tenant, metadata=req.metadata,
                has_image=req.image is not None, has_mask=req.mask is not None,
            ),
            stages=stages,
            trace_id=current_trace_id(),
            trace_context=current_carrier(),
            # a deferred job's deadline starts when it is released
            deadline_ms=None if admitted.deferred else now_ms() + int(route.timeout_s * 1000),
        )

    def _accept_change(self, job: Job, asked: Route, admitted: Admitted,
                       claim: Claim | None) -> Change:
        """The accepted job: its first stage entry, or a deferred entry, and counters."""
        change = Change(job)
        if admitted.deferred:
            change.effects.xadd(keys.deferred_stream(), {"job": job.id})
            kind = "deferred"
        else:
            change.enqueue(0)
            kind = "queued"
        change.event(kind, route=job.route, stage=0, engine=job.stages[0].engine,
                     degraded_from=job.degraded_from)
        route_counters.on_accept(change.effects, job.route)
        # O(1) per submit; the console's recent jobs list reads it (GET /v1/admin/jobs)
        change.effects.xadd(keys.recent_jobs(), {"job": job.id}, maxlen=RECENT_JOBS_KEPT)
        record_expiry(change.effects, job.id, at_ms=now_ms() + self.job_ttl_s * 1000)
        record_outcome(change.effects, route=asked.name, tier=job.request.tier,
                       outcome=admitted.outcome)
        if claim is not None:
            self.idempotency.commit(change.effects, claim)
        return change

    def _resolve_lora(self, req: ImageRequest, errors: list[FieldError]
                      ) -> tuple[LoraRequest | None, str | None]:
        """The adapter a request names, at its latest registry version, and the base model
        it was made for (an error when unknown). Reads the registry: call it in a thread."""
        assert req.lora is not None
        versions = self.registry.versions(req.lora.id) if self.registry else []
        manifests = [self.registry.manifest(req.lora.id, v) for v in versions] \
            if self.registry else []
        if not manifests or {m.kind for m in manifests} != {"lora"}:
            errors.append(FieldError("lora.id", "is not a LoRA adapter in the registry",
                                     req.lora.id))
            return None, None
        return (LoraRequest(id=req.lora.id, version=versions[-1], scale=req.lora.scale),
                manifests[-1].base_model)

    def _check_lora_base(self, lora: LoraRequest | None, base: str | None, route: Route,
                         policy: Policy) -> None:
        """An adapter must be made for the model of every diffusion stage of its route."""
        if lora is None:
            return
        for stage in route.stages:
            spec = policy.engines[stage.engine]
            if spec.kind in LORA_KINDS and spec.model != base:
                raise ValidationFailed.of(
                    "lora.id", f"adapter is for base model {base}, but route {route.name} "
                               f"runs {spec.model} on engine {stage.engine}", lora.id)

    def _decode_inputs(self, req: ImageRequest, snapshot: Snapshot,
                       errors: list[FieldError]) -> dict[str, Image.Image]:
        limits = snapshot.policy.limits
        decoded: dict[str, Image.Image] = {}
        for name, payload, mode in (("image", req.image, "RGB"), ("mask", req.mask, "L")):
            if payload is None or req.mode is Mode.txt2img:
                continue
            image, error = decode_image(name, payload, max_bytes=limits.max_image_bytes,
                                        max_pixels=limits.max_pixels, mode=mode)
            if image is not None:
                decoded[name] = image
            if error is not None:
                errors.append(error)
        if "image" in decoded and "mask" in decoded:
            size_i, size_m = decoded["image"].size, decoded["mask"].size
            if size_i != size_m:
                errors.append(FieldError(
                    "mask", f"is {size_m[0]}x{size_m[1]} but image is {size_i[0]}x{size_i[1]}"))
        return decoded

    async def _stage_records(self, route: Route, snapshot: Snapshot,
                             job_id: str) -> list[StageRecord]:
        """One record per stage; a stage whose engine's circuit is open goes to the first
        of its ``fallback`` engines whose circuit is closed (recorded as ``fallback_from``).
        Raises NoEngine when no live worker serves the first stage's engine."""
        records = []
        for index, stage in enumerate(route.stages):
            engine = await self._available_engine(stage, snapshot.policy)
            if index == 0 and self.liveness is not None:
                await self.liveness.check(engine)
            spec = snapshot.policy.engines[engine]
            model = spec.model if spec.is_local_model else None
            records.append(StageRecord(
                engine=engine,
                model=model,
                model_version=snapshot.pick_model_version(model, job_id) if model else None,
                fallback_from=stage.engine if engine != stage.engine else None,
            ))
        return records

    async def _available_engine(self, stage: Stage, policy: Policy) -> str:
        """The stage's engine, or its first fallback when its circuit is open."""
        for engine in (stage.engine, *stage.fallback):
            # only remote engines have circuits: local routes cost no round trip here
            if (policy.engines[engine].kind is not EngineKind.openai_images
                    or not await is_open(self.redis, engine)):
                return engine
        tried = ", ".join((stage.engine, *stage.fallback))
        raise NoEngine(f"engine {stage.engine}: circuit open and no fallback engine is "
                       f"available (tried: {tried})")
