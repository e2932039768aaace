"""The worker: per-device slots that pull stage entries, run them, store, ack, chain.

Each engine gets ``max_concurrency`` slots on this device. A slot reads one entry only
when it is free (pull-based: a device never holds more work than its cap), and owns its
engine instances, so pipelines are never shared between concurrent calls.

One entry's life: read → start (job running) → run (engine, in a thread) → store images →
commit (job record, ack, next stage or completion, events, notification) in one
transaction. An engine that raises fails the job with the error text; nothing is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from opentelemetry.trace import SpanKind, Status, StatusCode
from PIL import Image

from controlplane.live_config import LiveConfig
from controlplane.policy import DIFFUSERS_KINDS, EngineKind, EngineSpec, Policy
from controlplane.policy_store import PolicyStore
from controlplane.version_stats import record_stage
from engines.artifacts import ArtifactStore
from engines.base import Engine
from engines.factory import build_engine
from engines.registry import Registry
from engines.stage_inputs import build_item, stage_steps
from router import keys
from router.jobs import ImageRef, Job, JobStatus, JobStore, StageStatus, now_ms, utc_now
from router.queue import StageMessage, add_event, enqueue_stage
from router.telemetry import context_from, tracer

log = logging.getLogger(__name__)
_tracer = tracer("laneway.worker")

READ_BLOCK_MS = 1000
#: engine kinds a worker serves on its device when not told which engines to serve
DEVICE_KINDS = DIFFUSERS_KINDS | {EngineKind.resize}
HEARTBEAT_S = 2.0
HEARTBEAT_TTL_S = 30


@dataclass
class Slot:
    """One unit of an engine's concurrency on this device, with its own engine instances."""

    engine: str
    index: int
    engines: dict[str, Engine] = field(default_factory=dict)
    busy: bool = False


@dataclass
class WorkerOptions:
    name: str
    device: str
    registry: Registry
    artifacts: ArtifactStore
    job_ttl_s: int
    engines: frozenset[str] | None = None


class Worker:
    def __init__(self, redis: aioredis.Redis, options: WorkerOptions) -> None:
        self.redis = redis
        self.options = options
        self.live = LiveConfig(redis)
        self.jobs = JobStore(redis, ttl_s=options.job_ttl_s)
        self.policies = PolicyStore(redis)
        self._policy_cache: dict[str, Policy] = {}
        self._slots: dict[str, list[Slot]] = {}
        self._slot_tasks: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._groups: set[str] = set()
        self._stopping = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None

    @property
    def name(self) -> str:
        return self.options.name

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until :meth:`stop`; then let running stages finish and return."""
        await self.live.start()
        self._executor = ThreadPoolExecutor(max_workers=64, thread_name_prefix="slot")
        heartbeat = asyncio.create_task(self._heartbeat_loop())
        try:
            await self._reconcile_slots()
            while not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=1.0)
                await self._reconcile_slots()
        finally:
            await asyncio.gather(*self._slot_tasks.values(), return_exceptions=True)
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            await self.redis.srem(keys.workers(), self.name)
            await self.redis.delete(keys.worker_heartbeat(self.name))
            await self.live.stop()
            self._executor.shutdown(wait=True)
            for slots in self._slots.values():
                for slot in slots:
                    for engine in slot.engines.values():
                        engine.close()

    def stop(self) -> None:
        self._stopping.set()

    def _served(self, policy: Policy) -> dict[str, EngineSpec]:
        wanted = self.options.engines
        if wanted is not None:
            return {name: spec for name, spec in policy.engines.items() if name in wanted}
        return {name: spec for name, spec in policy.engines.items()
                if spec.kind in DEVICE_KINDS}

    async def _reconcile_slots(self) -> None:
        """Start slot loops for the engines the policy in force gives this worker."""
        policy = self.live.snapshot.policy
        for engine, spec in self._served(policy).items():
            slots = self._slots.setdefault(engine, [])
            while len(slots) < spec.max_concurrency:
                slot = Slot(engine, len(slots))
                slots.append(slot)
                self._slot_tasks[(engine, slot.index)] = asyncio.create_task(
                    self._slot_loop(slot))

    # -- the slot loop -----------------------------------------------------------------

    async def _slot_loop(self, slot: Slot) -> None:
        while not self._stopping.is_set():
            policy = self.live.snapshot.policy
            spec = policy.engines.get(slot.engine)
            if spec is None or slot.index >= spec.max_concurrency:
                await asyncio.sleep(1.0)  # engine removed or cap lowered: this slot idles
                continue
            try:
                entry = await self._read_one(slot.engine, policy)
                if entry is None:
                    continue
                stream, entry_id, message = entry
                slot.busy = True
                try:
                    await self._process(slot, stream, entry_id, message)
                finally:
                    slot.busy = False
            except aioredis.ConnectionError:
                log.warning("slot %s/%d lost Redis; retrying in 1 s", slot.engine, slot.index)
                await asyncio.sleep(1.0)

    async def _read_one(self, engine: str, policy: Policy
                        ) -> tuple[str, bytes, StageMessage] | None:
        streams = [keys.engine_stream(engine, tier) for tier in policy.tiers]
        await self._ensure_groups(streams)
        reply = await self.redis.xreadgroup(
            keys.ENGINE_GROUP, self.name, {s: ">" for s in streams}, count=1,
            block=READ_BLOCK_MS)
        for stream, entries in reply or []:
            for entry_id, fields in entries:
                return stream.decode(), entry_id, StageMessage.parse(fields)
        return None

    async def _ensure_groups(self, streams: list[str]) -> None:
        for stream in streams:
            if stream in self._groups:
                continue
            try:
                await self.redis.xgroup_create(stream, keys.ENGINE_GROUP, id="0", mkstream=True)
            except aioredis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self._groups.add(stream)

    # -- one entry ---------------------------------------------------------------------

    async def _policy_of(self, job: Job) -> Policy:
        """The policy version the job was routed with (cached; falls back to the current)."""
        policy = self._policy_cache.get(job.policy_version)
        if policy is None:
            policy = await self.policies.get(job.policy_version) or self.live.snapshot.policy
            self._policy_cache[job.policy_version] = policy
        return policy

    async def _process(self, slot: Slot, stream: str, entry_id: bytes,
                       message: StageMessage) -> None:
        try:
            job = await self.jobs.get(message.job_id)
        except Exception:
            log.exception("entry %s names an unreadable job; acknowledging it", entry_id)
            await self._ack(stream, entry_id)
            return
        if job.status.is_final:
            await self._ack(stream, entry_id)
            return
        policy = await self._policy_of(job)
        stage = job.stages[message.stage]
        with _tracer.start_as_current_span(
            "laneway.stage", context=context_from(message.trace), kind=SpanKind.CONSUMER,
            attributes={"laneway.job_id": job.id, "laneway.stage": message.stage,
                        "laneway.engine": stage.engine, "laneway.model": stage.model or "",
                        "laneway.model_version": stage.model_version or "",
                        "laneway.worker": self.name},
        ) as span:
            started_ms = now_ms()
            job = await self._start(job, message, started_ms,
                                    stage_steps(job, policy, message.stage))
            try:
                images, run_ms = await self._run(slot, job, policy, message.stage)
                self._store(job, message.stage, images, last=self._is_last(job, message.stage))
            except Exception as exc:  # the engine's failure is the job's failure, recorded
                log.exception("stage %d of job %s failed", message.stage, job.id)
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                await self._fail(job, message, stream, entry_id, f"{type(exc).__name__}: {exc}",
                                 started_ms)
                return
            await self._complete(job, message, stream, entry_id, images, run_ms,
                                 verify=policy.route(job.route).verify is not None)

    @staticmethod
    def _is_last(job: Job, stage: int) -> bool:
        return stage == len(job.stages) - 1

    async def _start(self, job: Job, message: StageMessage, started_ms: int,
                     steps: int | None) -> Job:
        def change(j: Job) -> None:
            record = j.stages[message.stage]
            if j.status is JobStatus.queued:
                j.transition(JobStatus.running)
            record.status = StageStatus.running
            record.worker = self.name
            record.attempts += 1
            record.steps = steps
            record.started_at = utc_now()
            record.queued_ms = max(0, started_ms - message.enqueued_ms)
            j.current_stage = message.stage

        job = await self.jobs.update(job.id, change)
        async with self.redis.pipeline(transaction=False) as pipe:
            add_event(pipe, job.id, "dispatched", stage=message.stage,
                      engine=job.stages[message.stage].engine, worker=self.name)
            await pipe.execute()
        return job

    async def _run(self, slot: Slot, job: Job, policy: Policy,
                   stage_index: int) -> tuple[list[Image.Image], int]:
        """Run the stage's engine; return its images and the engine call's own time."""
        record = job.stages[stage_index]
        spec = policy.engines[record.engine]
        options = self.options

        def work() -> tuple[list[Image.Image], int]:
            version = record.model_version or ""
            engine = slot.engines.get(version)
            if engine is None:
                engine = build_engine(spec, registry=options.registry, model_version=version,
                                      device=options.device)
                slot.engines[version] = engine
            item = build_item(job, policy, stage_index, options.artifacts,
                              on_step=lambda step, steps: None)
            started = time.perf_counter()
            (images,) = engine.run([item])
            return images, round((time.perf_counter() - started) * 1000)

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, work)

    def _store(self, job: Job, stage: int, images: list[Image.Image], *, last: bool) -> None:
        artifacts = self.options.artifacts
        versions = {s.engine: f"{s.model}@{s.model_version}" for s in job.stages if s.model}
        for i, image in enumerate(images):
            if last:
                metadata = {
                    "laneway:job_id": job.id, "laneway:prompt": job.request.prompt,
                    "laneway:seed": str(job.request.seed + i),
                    "laneway:model_versions": json.dumps(versions),
                    "laneway:policy_version": job.policy_version, "laneway:route": job.route,
                }
                artifacts.save(artifacts.final_path(job.id, i), image, metadata)
            else:
                artifacts.save(artifacts.stage_path(job.id, stage, i), image)

    async def _complete(self, job: Job, message: StageMessage, stream: str, entry_id: bytes,
                        images: list[Image.Image], run_ms: int, *, verify: bool) -> None:
        last = self._is_last(job, message.stage)
        next_stage: list[int] = []

        def change(j: Job) -> None:
            record = j.stages[message.stage]
            record.status = StageStatus.completed
            record.run_ms = run_ms
            record.batch_size = 1
            record.finished_at = utc_now()
            if last:
                j.images = [
                    ImageRef(index=i, url=f"/v1/jobs/{j.id}/images/{i}", width=im.width,
                             height=im.height, seed=j.request.seed + i)
                    for i, im in enumerate(images)
                ]
                if verify:
                    j.verification = {"status": "pending"}
                j.transition(JobStatus.completed)
            else:
                next_stage.append(message.stage + 1)

        await self._commit(job.id, change, stream, entry_id, message, next_stage,
                           "completed" if last else "stage_completed")

    async def _fail(self, job: Job, message: StageMessage, stream: str, entry_id: bytes,
                    error: str, started_ms: int) -> None:
        finished_ms = now_ms()

        def change(j: Job) -> None:
            record = j.stages[message.stage]
            record.status = StageStatus.failed
            record.error = error
            record.run_ms = finished_ms - started_ms
            record.finished_at = utc_now()
            j.error = f"stage {message.stage} ({record.engine}) failed: {error}"
            j.transition(JobStatus.failed)

        await self._commit(job.id, change, stream, entry_id, message, [], "failed")

    async def _commit(self, job_id: str, change, stream: str, entry_id: bytes,
                      message: StageMessage, next_stage: list[int], event: str) -> None:
        """Write the job, ack the entry, queue the next stage and notify, atomically."""
        key = keys.job(job_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    job = Job.model_validate_json(await pipe.get(key))
                    next_stage.clear()
                    change(job)
                    pipe.multi()
                    pipe.xack(stream, keys.ENGINE_GROUP, entry_id)
                    pipe.xdel(stream, entry_id)
                    for stage in next_stage:
                        enqueue_stage(pipe, job, stage)
                    record = job.stages[message.stage]
                    record_stage(pipe, record, ok=record.status is StageStatus.completed)
                    if job.status is JobStatus.completed and job.verification.get(
                            "status") == "pending":
                        pipe.xadd(keys.VERIFY_STREAM, {"job": job_id})
                    pipe.set(key, job.model_dump_json(), ex=self.options.job_ttl_s)
                    add_event(pipe, job_id, event, stage=message.stage, status=job.status.value)
                    if job.status.is_final:
                        pipe.publish(keys.JOB_DONE_CHANNEL, job.model_dump_json())
                    await pipe.execute()
                    return
                except aioredis.WatchError:
                    continue

    async def _ack(self, stream: str, entry_id: bytes) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(stream, keys.ENGINE_GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            await pipe.execute()

    # -- heartbeat ---------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            with contextlib.suppress(aioredis.RedisError):
                await self._heartbeat()
            await asyncio.sleep(HEARTBEAT_S)

    async def _heartbeat(self) -> None:
        slots = {engine: {"busy": sum(s.busy for s in slots), "total": len(slots)}
                 for engine, slots in self._slots.items()}
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(keys.worker_heartbeat(self.name), mapping={
                "name": self.name, "device": self.options.device, "pid": os.getpid(),
                "slots": json.dumps(slots), "heartbeat_at": f"{time.time():.3f}",
            })
            pipe.expire(keys.worker_heartbeat(self.name), HEARTBEAT_TTL_S)
            pipe.sadd(keys.workers(), self.name)
            await pipe.execute()
