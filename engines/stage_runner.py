"""Running a slot's entries: prepare each (validate, mark running), group compatible items
into pipeline calls, run them in a thread, and end every entry with one outcome.

Failure rules: one item's bad input fails only that item (checked before batching); a
batched call that raises is retried item by item before any item fails; a stage stopped
at a denoising step (cancel, deadline, drain) ends only the item it names, and its
batch-mates run again without it; an unavailable engine moves its items to a fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from PIL import Image

from controlplane.artifacts import ArtifactStore, final_key, stage_key
from controlplane.circuit import is_open
from controlplane.errors import (
    EngineUnavailable,
    JobCancelled,
    NotFound,
    StageStopped,
    StageTimeout,
    WorkerDraining,
)
from controlplane.jobs import Event, Job, JobStatus, JobStore, StageStatus, now_ms, utc_now
from controlplane.live_config import LiveConfig
from controlplane.policy import EngineKind, EngineSpec, Policy
from controlplane.policy_store import PolicyStore
from controlplane.registry import Registry
from controlplane.stage_sizes import stage_steps
from controlplane.telemetry import context_from, tracer
from controlplane.transitions import Change
from engines.base import Engine, StageItem, StepCallback
from engines.factory import build_engine
from engines.lanes import Entry
from engines.progress import ProgressEvents
from engines.stage_inputs import build_item
from engines.stage_outcomes import Outcomes, describe

log = logging.getLogger(__name__)
_tracer = tracer("laneway.worker")

VERSIONS_PER_SLOT = 2
CANCELLED_KEPT = 10_000
#: the PNG text chunk of a final image: JSON of the job, prompt, seed, model versions,
#: policy version and route it came from
PROVENANCE_CHUNK = "laneway"


@dataclass
class Slot:
    """One unit of an engine's concurrency on this device, with its own engine instances."""

    engine: str
    index: int
    engines: OrderedDict[str, Engine] = field(default_factory=OrderedDict)
    busy: bool = False

    def engine_for(self, version: str, build: Callable[[], Engine]) -> Engine:
        """The engine for a model version, keeping the last VERSIONS_PER_SLOT loaded."""
        engine = self.engines.pop(version, None) or build()
        self.engines[version] = engine
        while len(self.engines) > VERSIONS_PER_SLOT:
            _, old = self.engines.popitem(last=False)
            old.close()
        return engine


@dataclass
class Work:
    entry: Entry
    #: the job as this worker's start left it, and the attempt that start made
    job: Job
    attempt: int
    policy: Policy
    spec: EngineSpec
    item: StageItem


@dataclass
class RunnerContext:
    worker: str
    device: str
    registry: Registry
    artifacts: ArtifactStore
    executor: Executor
    redis_url: str | None = None  # for remote engines' circuit breakers


class StageRunner:
    def __init__(self, jobs: JobStore, live: LiveConfig, outcomes: Outcomes,
                 context: RunnerContext) -> None:
        self.jobs = jobs
        self.live = live
        self.outcomes = outcomes
        self.ctx = context
        self.policies = PolicyStore(jobs.redis)
        self.progress = ProgressEvents(jobs.redis)
        self._policy_cache: dict[str, Policy] = {}
        self.cancelled: OrderedDict[str, None] = OrderedDict()
        self.hand_back_now = False
        self.inflight: dict[bytes, Entry] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def cancel(self, job_id: str) -> None:
        self.cancelled[job_id] = None
        while len(self.cancelled) > CANCELLED_KEPT:
            self.cancelled.popitem(last=False)

    async def run(self, slot: Slot, entries: list[Entry]) -> None:
        """Prepare, group and run ``entries``; every entry ends with an outcome."""
        self._loop = asyncio.get_running_loop()
        for entry in entries:
            self.inflight[entry.entry_id] = entry
        try:
            works = [w for w in [await self._prepare(e) for e in entries] if w is not None]
            groups: dict[tuple[object, ...], list[Work]] = {}
            for work in works:
                record = work.job.stages[work.entry.message.stage]
                key = (record.model_version, *work.item.batch_key())
                groups.setdefault(key, []).append(work)
            for group in groups.values():
                await self._run_group(slot, group)
        finally:
            for entry in entries:
                self.inflight.pop(entry.entry_id, None)

    # -- before the engine ---------------------------------------------------------------

    async def _policy_of(self, job: Job) -> Policy:
        policy = self._policy_cache.get(job.policy_version)
        if policy is None:
            policy = await self.policies.get(job.policy_version) or self.live.snapshot.policy
            self._policy_cache[job.policy_version] = policy
        return policy

    async def _job_of(self, entry: Entry) -> Job:
        """The job as its entry was queued with (no read), else as stored (a reclaimed
        entry's record predates the start of the worker that went silent)."""
        if entry.message.record is not None and not entry.reclaimed:
            return Job.model_validate_json(entry.message.record)
        return await self.jobs.get(entry.message.job_id)

    async def _prepare(self, entry: Entry) -> Work | None:
        """Check the job, build its item, start it; None if the entry ended here.

        An entry is acknowledged unrun only when its job is known gone or ended; on any
        other error reading it, it stays pending and is claimed again later.
        """
        try:
            job = await self._job_of(entry)
        except NotFound:
            log.warning("entry %s names a job that is gone; acknowledging it", entry.entry_id)
            await self.outcomes.acknowledge(entry)
            return None
        if job.status.is_final:
            await self.outcomes.acknowledge(entry)
            return None
        index = entry.message.stage
        record = job.stages[index]
        policy = await self._policy_of(job)
        spec = policy.engines[record.engine]
        if record.attempts >= spec.max_attempts:
            cause = record.error or (f"no acknowledgement from worker {record.worker} within "
                                     f"{spec.claim_idle_ms} ms")
            await self.outcomes.fail(
                entry, job, record.attempts,
                f"gave up after {record.attempts} attempts; last: {cause}",
                dead_letter=True, started=False)
            return None
        if job.deadline_ms is not None and now_ms() > job.deadline_ms:
            await self.outcomes.fail(entry, job, record.attempts,
                                     self._timeout_text(job, policy), started=False)
            return None
        try:
            item = build_item(job, policy, index, self.ctx.artifacts,
                              on_step=self._step_callback(job, index))
        except Exception as exc:  # bad input fails this item alone, before any batching
            await self.outcomes.fail(entry, job, record.attempts,
                                     f"cannot prepare stage input: {describe(exc)}",
                                     started=False)
            return None
        started = await self._start(entry, job, policy)
        if started is None:  # ended, or started elsewhere, since the entry was queued
            await self.outcomes.acknowledge(entry)
            return None
        return Work(entry, started, started.stages[index].attempts, policy, spec, item)

    async def _start(self, entry: Entry, job: Job, policy: Policy) -> Job | None:
        """Mark the stage running on this worker (one transition); None if it may not.

        Owning the entry is what entitles a worker to start its stage (the stream hands an
        entry to one consumer at a time; a stage still ``running`` was left by a worker that
        went silent), so the start checks only that the stage is still to be run.
        """
        index, started_ms = entry.message.stage, now_ms()
        steps = stage_steps(job, policy, index)

        def plan(current: Job) -> Change | None:
            record = current.stages[index]
            if (current.status.is_final
                    or record.status not in (StageStatus.queued, StageStatus.running)):
                return None
            change = Change(current)
            if current.status is JobStatus.queued:
                current.transition(JobStatus.running)
            record.transition(StageStatus.running)
            record.worker, record.steps = self.ctx.worker, steps
            record.attempts += 1
            record.started_at = utc_now()
            record.queued_ms = max(0, started_ms - entry.message.enqueued_ms)
            current.current_stage = index
            change.event("dispatched", stage=index, engine=record.engine,
                         worker=self.ctx.worker)
            return change

        try:
            applied = await self.outcomes.transitions.apply(job, f"start:{index}", plan)
        except NotFound:
            return None
        return applied.job if applied.changed else None

    @staticmethod
    def _timeout_text(job: Job, policy: Policy) -> str:
        return (f"timeout: job exceeded its route's timeout_s="
                f"{policy.route(job.route).timeout_s:g}")

    def _step_callback(self, job: Job, stage: int) -> StepCallback:
        job_id, deadline_ms = job.id, job.deadline_ms

        def on_step(step: int, steps: int) -> None:
            if self.hand_back_now:
                raise WorkerDraining("worker is draining", job_id=job_id)
            if job_id in self.cancelled:
                raise JobCancelled(f"job {job_id} was cancelled", job_id=job_id)
            if deadline_ms is not None and now_ms() > deadline_ms:
                raise StageTimeout("deadline passed", job_id=job_id)
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._progress, job_id, stage, step, steps)

        return on_step

    def _progress(self, job_id: str, stage: int, step: int, steps: int) -> None:
        self.progress.add(job_id, Event("progress", {"stage": stage, "step": step,
                                                     "steps": steps}))

    # -- the engine call -----------------------------------------------------------------

    async def _run_group(self, slot: Slot, works: list[Work]) -> None:
        """One engine call for ``works`` and the outcome it commits, in one stage span (the
        commit's Redis commands are its children)."""
        if self.hand_back_now:
            for work in works:
                await self.outcomes.hand_back(work.entry, work.job, work.attempt,
                                              "worker is draining")
            return
        with self._stage_span(works) as span:
            try:
                images, run_ms = await self._call(slot, works)
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, describe(exc)))
                await self._after_failure(slot, works, exc)
                return
            # each item's commit is its own transition: a batch commits them side by side
            await asyncio.gather(*(self._complete(work, outputs, run_ms, len(works))
                                   for work, outputs in zip(works, images, strict=True)))

    async def _complete(self, work: Work, outputs: list[Image.Image], run_ms: int,
                        batch_size: int) -> None:
        await self.outcomes.complete(
            work.entry, work.job, work.attempt, outputs, run_ms=run_ms,
            progress=await self.progress.take(work.job.id), batch_size=batch_size,
            cost=_cost(work.spec, outputs, run_ms, batch_size),
            verify=work.policy.route(work.job.route).verify is not None)

    async def _after_failure(self, slot: Slot, works: list[Work], exc: Exception) -> None:
        if isinstance(exc, StageStopped):
            await self._stopped(slot, works, exc)
        elif isinstance(exc, EngineUnavailable):
            for work in works:
                await self._fall_back(work, exc)
        elif len(works) > 1:  # retry singly before failing anyone
            log.warning("batch of %d failed (%s); retrying items singly", len(works),
                        describe(exc))
            for work in works:
                await self._run_group(slot, [work])
        else:
            log.warning("stage of job %s failed: %s", works[0].job.id, describe(exc))
            work = works[0]
            await self.outcomes.fail(work.entry, work.job, work.attempt, describe(exc),
                                     progress=await self.progress.take(work.job.id))

    async def _stopped(self, slot: Slot, works: list[Work], exc: StageStopped) -> None:
        if isinstance(exc, WorkerDraining):
            for work in works:
                await self.outcomes.hand_back(work.entry, work.job, work.attempt,
                                              "worker is draining")
            return
        stopped = [w for w in works if w.job.id == exc.job_id]
        for work in stopped:
            if isinstance(exc, JobCancelled):
                await self.outcomes.acknowledge(work.entry)  # the API made it final
            else:
                await self.outcomes.fail(work.entry, work.job, work.attempt,
                                         self._timeout_text(work.job, work.policy),
                                         progress=await self.progress.take(work.job.id))
        rest = [w for w in works if w not in stopped]
        if rest:
            await self._run_group(slot, rest)

    async def _fall_back(self, work: Work, exc: EngineUnavailable) -> None:
        index = work.entry.message.stage
        stage = work.policy.route(work.job.route).stages[index]
        current = work.job.stages[index].engine
        for name in stage.fallback:
            if name == current or await is_open(self.jobs.redis, name):
                continue
            spec = work.policy.engines[name]
            model = spec.model if spec.is_local_model else None
            version = self.live.snapshot.pick_model_version(model, work.job.id) if model else None
            await self.outcomes.reroute(work.entry, work.job, work.attempt, engine=name,
                                        model=model,
                                        model_version=version, reason=describe(exc))
            return
        await self.outcomes.fail(work.entry, work.job, work.attempt,
                                 f"{describe(exc)}; no fallback engine available")

    def _stage_span(self, works: list[Work]) -> contextlib.AbstractContextManager[trace.Span]:
        """The span of one engine call, in the first item's trace, linking every item's."""
        first = works[0]
        record = first.job.stages[first.entry.message.stage]
        links = [Link(trace.get_current_span(context_from(w.entry.message.trace))
                      .get_span_context()) for w in works]
        return _tracer.start_as_current_span(
            "laneway.stage", context=context_from(first.entry.message.trace),
            kind=SpanKind.CONSUMER, links=links,
            attributes={"laneway.job_id": first.job.id, "laneway.stage": first.entry.message.stage,
                        "laneway.engine": record.engine, "laneway.model": record.model or "",
                        "laneway.model_version": record.model_version or "",
                        "laneway.worker": self.ctx.worker, "laneway.batch_size": len(works)},
            record_exception=False, set_status_on_exception=False)

    async def _call(self, slot: Slot, works: list[Work]) -> tuple[list[list[Image.Image]], int]:
        """One pipeline call for ``works`` in a thread; outputs stored before returning."""
        slot.busy = True
        loop = asyncio.get_running_loop()
        # the engine's thread runs in this context, so its spans join the stage's trace
        return await loop.run_in_executor(
            self.ctx.executor, contextvars.copy_context().run, self._work, slot, works)

    def _work(self, slot: Slot, works: list[Work]) -> tuple[list[list[Image.Image]], int]:
        first = works[0]
        record = first.job.stages[first.entry.message.stage]
        version = record.model_version or ""
        engine = slot.engine_for(version, lambda: build_engine(
            first.spec, registry=self.ctx.registry, model_version=version,
            device=self.ctx.device, name=record.engine, redis_url=self.ctx.redis_url))
        started = time.perf_counter()
        outputs = engine.run([w.item for w in works])
        run_ms = round((time.perf_counter() - started) * 1000)
        for work, images in zip(works, outputs, strict=True):
            self._store(work, images)
        return outputs, run_ms

    def _store(self, work: Work, images: list[Image.Image]) -> None:
        job, index, artifacts = work.job, work.entry.message.stage, self.ctx.artifacts
        if index < len(job.stages) - 1:
            for i, image in enumerate(images):
                artifacts.save(stage_key(job.id, index, i), image)
            return
        versions = {s.engine: {"model": s.model, "version": s.model_version}
                    for s in job.stages if s.model}
        for i, image in enumerate(images):
            artifacts.save(final_key(job.id, i), image, {
                PROVENANCE_CHUNK: json.dumps({
                    "job_id": job.id, "prompt": job.request.prompt,
                    "seed": job.request.seed + i, "model_versions": versions,
                    "policy_version": job.policy_version, "route": job.route,
                }, sort_keys=True),
            })


def _cost(spec: EngineSpec, images: list[Image.Image], run_ms: int, batch_size: int
          ) -> float | None:
    """Remote: price per image; local: device-seconds (shared by the batch) times a rate."""
    if spec.kind is EngineKind.openai_images and spec.cost_per_image is not None:
        return round(spec.cost_per_image * len(images), 6)
    if spec.cost_per_device_s is not None:
        return round(run_ms / 1000 / batch_size * spec.cost_per_device_s, 6)
    return None
