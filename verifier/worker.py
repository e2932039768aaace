"""The verifier process: reads completed jobs from the verify stream and records verdicts.

One entry's life: read (or reclaim from a dead verifier after ``claim_idle_ms``) → load the
job and its route's ``verify`` block → check every final image (OCR in a thread, so the
loop stays responsive) → commit in one transition: the job's ``verification`` with the
attempt's verdict in its history, a ``verified`` event, per-model-version verdict
counters, a regeneration when the route asks for one, and the acknowledgement. An entry is
acknowledged only with its verdict, so a verifier killed mid-check loses nothing; an
attempt is named by its number, so a verdict is never recorded twice.

A process checks one image at a time; run several verifier processes to verify faster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from opentelemetry.trace import SpanKind
from PIL import Image

from controlplane import keys, route_counters
from controlplane.artifacts import ArtifactStore, final_key
from controlplane.errors import NotFound
from controlplane.jobs import Job, JobStatus, JobStore
from controlplane.policy import Policy, Route, Verify
from controlplane.policy_store import PolicyStore
from controlplane.stage_sizes import stage_size
from controlplane.telemetry import context_from, tracer
from controlplane.transitions import Change, Transitions
from controlplane.verification import (
    Action,
    JobVerification,
    Verification,
    VerificationStatus,
)
from controlplane.version_stats import record_verdict
from verifier.checks import check_image
from verifier.outcome import (
    attempt_record,
    decide_action,
    job_verdict,
    next_seed,
    reset_for_regeneration,
)
from verifier.typography import ocr_engine

log = logging.getLogger(__name__)
_tracer = tracer("laneway.verifier")

READ_BLOCK_MS = 1000


@dataclass(frozen=True)
class VerifierOptions:
    name: str
    artifacts: ArtifactStore
    job_ttl_s: int
    claim_idle_ms: int


@dataclass(frozen=True)
class Checked:
    """One attempt's outcome before it is committed."""

    verdict: Verification
    per_image: list[Verification]
    error: str | None = None


class Verifier:
    def __init__(self, redis: aioredis.Redis, options: VerifierOptions) -> None:
        self.redis = redis
        self.options = options
        self.jobs = JobStore(redis)
        self.transitions = Transitions(redis, job_ttl_s=options.job_ttl_s)
        self.policies = PolicyStore(redis)
        self._policy_cache: dict[str, Policy] = {}
        self._stopping = asyncio.Event()
        self._models_loaded = False
        self._executor: ThreadPoolExecutor | None = None
        #: entries this process acknowledged, with or without a verdict (tests read it)
        self.acknowledged = 0

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self) -> None:
        """Verify entries until :meth:`stop`; the entry in progress is finished first."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify")
        try:
            await self._ensure_group()
            await asyncio.get_running_loop().run_in_executor(self._executor, ocr_engine)
            self._models_loaded = True
            log.info("verifier %s ready", self.name)
            while not self._stopping.is_set():
                try:
                    entry = await self._next_entry()
                    if entry is not None:
                        await self._process(*entry)
                except aioredis.ConnectionError:
                    log.warning("verifier %s lost Redis; retrying in 1 s", self.name)
                    await self._pause()
                except Exception:  # the entry stays pending; it is reclaimed after idling
                    log.exception("verifier %s failed an entry; retrying in 1 s", self.name)
                    await self._pause()
        finally:
            self._executor.shutdown(wait=True)

    def stop(self) -> None:
        self._stopping.set()

    def not_ready(self) -> list[str]:
        """Why this verifier cannot take work now (empty: it can); its readiness probe
        adds whether Redis answers."""
        if self._stopping.is_set():
            return ["stopping: finishing the check in progress"]
        if not self._models_loaded:
            return ["loading the OCR models"]
        return []

    async def _pause(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=1.0)

    @property
    def name(self) -> str:
        return self.options.name

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(keys.VERIFY_STREAM, keys.VERIFY_GROUP, id="0",
                                           mkstream=True)
        except aioredis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _next_entry(self) -> tuple[bytes, dict[bytes, bytes]] | None:
        """An entry a dead verifier left pending past ``claim_idle_ms``, else a new one."""
        # redis-py types this reply loosely: [next start id, [(id, fields)], [deleted ids]]
        try:
            autoclaim: list[Any] = await self.redis.xautoclaim(
                keys.VERIFY_STREAM, keys.VERIFY_GROUP, self.name,
                min_idle_time=self.options.claim_idle_ms, start_id="0-0", count=1)
        except aioredis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("verifier %s: the server lost the verify group (restarted without "
                        "its data); making it again", self.name)
            await self._ensure_group()
            return None
        claimed: list[tuple[bytes, dict[bytes, bytes]]] = autoclaim[1]
        if claimed:
            entry_id, fields = claimed[0]
            log.info("verifier %s reclaimed %s", self.name, entry_id.decode())
            return entry_id, fields
        reply: Any = await self.redis.xreadgroup(
            keys.VERIFY_GROUP, self.name, {keys.VERIFY_STREAM: ">"}, count=1,
            block=READ_BLOCK_MS)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                return entry_id, fields
        return None

    # -- one entry ---------------------------------------------------------------------

    async def _process(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        job_id = fields.get(b"job", b"").decode()
        try:
            job = await self.jobs.get(job_id)
        except NotFound:
            log.warning("verify entry %s names no job (%r); acknowledging it",
                        entry_id.decode(), job_id)
            await self._ack(entry_id)
            return
        if not awaits_verdict(job):
            await self._ack(entry_id)
            return
        policy = await self._policy_of(job)
        route = route_named(policy, job.route)
        attempt = len(job.verification.attempts) + 1
        with _tracer.start_as_current_span(
            "laneway.verify", context=context_from(job.trace_context), kind=SpanKind.CONSUMER,
            attributes={"laneway.job_id": job.id, "laneway.route": job.route,
                        "laneway.attempt": attempt, "laneway.verifier": self.name},
        ) as span:
            loop = asyncio.get_running_loop()
            checked = await loop.run_in_executor(
                self._executor, self._check, job, policy, route)
            span.set_attribute("laneway.verdict", checked.verdict.status.value)
        await self._commit(job, entry_id, checked, route, attempt)

    async def _policy_of(self, job: Job) -> Policy | None:
        """The policy version the job was routed with (cached; None if it is gone)."""
        policy = self._policy_cache.get(job.policy_version)
        if policy is None:
            policy = await self.policies.get(job.policy_version)
            if policy is not None:
                self._policy_cache[job.policy_version] = policy
        return policy

    def _check(self, job: Job, policy: Policy | None, route: Route | None) -> Checked:
        """Check every final image (runs in the verifier's thread).

        A check that raises is recorded as a ``skipped`` verdict with the error, so a
        defect in a check never leaves an entry to be redelivered forever.
        """
        if policy is None or route is None or route.verify is None:
            skipped = Verification(status=VerificationStatus.skipped)
            return Checked(skipped, [skipped], "the job's route has no verify block")
        try:
            return self._check_images(job, route.verify, final_size(job, policy, route))
        except Exception as exc:
            log.exception("checking job %s raised", job.id)
            skipped = Verification(status=VerificationStatus.skipped)
            return Checked(skipped, [skipped], f"the check raised {type(exc).__name__}: {exc}")

    def _check_images(self, job: Job, verify: Verify,
                      expected_size: tuple[int, int]) -> Checked:
        artifacts = self.options.artifacts
        per_image: list[Verification] = []
        for ref in job.images:
            try:
                image = artifacts.load(final_key(job.id, ref.index)).convert("RGB")
            except OSError as exc:
                failed = Verification(status=VerificationStatus.failed)
                return Checked(failed, [*per_image, failed],
                               f"image {ref.index} is unreadable: {exc}")
            per_image.append(check_image(image, verify=verify, expected_text=job.request.text,
                                         expected_size=expected_size))
        if not per_image:
            failed = Verification(status=VerificationStatus.failed)
            return Checked(failed, [failed], "the job has no images")
        return Checked(job_verdict(per_image), per_image)

    async def _commit(self, job: Job, entry_id: bytes, checked: Checked,
                      route: Route | None, attempt: int) -> None:
        """Store the verdict, act on it, count it and acknowledge, in one transition."""
        verify = route.verify if route is not None else None

        def plan(current: Job) -> Change | None:
            if not awaits_verdict(current) or len(current.verification.attempts) + 1 != attempt:
                return None  # verified meanwhile (a reclaimed entry), or no longer pending
            change = Change(current)
            change.effects.xack(keys.VERIFY_STREAM, keys.VERIFY_GROUP, entry_id)
            change.effects.xdel(keys.VERIFY_STREAM, entry_id)
            self._write_verdict(change, checked, route, verify, attempt)
            return change

        try:
            applied = await self.transitions.apply(job, f"verdict:{attempt}", plan)
        except NotFound:
            applied = None
        if applied is None or not applied.changed:
            await self._ack(entry_id)
            return
        self.acknowledged += 1

    def _write_verdict(self, change: Change, checked: Checked, route: Route | None,
                       verify: Verify | None, attempt: int) -> None:
        job = change.job
        action = decide_action(checked.verdict.status, verify, attempt=attempt)
        verdict = checked.verdict.model_copy(update={"action": action, "attempt": attempt})
        record = attempt_record(verdict, per_image=checked.per_image, seed=job.request.seed,
                                error=checked.error)
        job.verification = JobVerification.after(record, job.verification.attempts)
        if verdict.status is not VerificationStatus.skipped:
            for stage in job.stages:
                if stage.model and stage.model_version:
                    record_verdict(change.effects, stage.model, stage.model_version,
                                   passed=verdict.status is VerificationStatus.passed)
        change.event("verified", status=verdict.status.value, action=action.value,
                     attempt=attempt, failed_metrics=failed_metrics(verdict))
        if action is Action.regenerated:
            assert route is not None  # a regenerate action needs the route's verify block
            seed = next_seed(job.request.seed)
            reset_for_regeneration(job, seed=seed, timeout_s=route.timeout_s,
                                   attempts=job.verification.attempts)
            change.enqueue(0)
            route_counters.on_accept(change.effects, job.route)
            change.event("queued", route=job.route, stage=0, engine=job.stages[0].engine,
                         attempt=attempt + 1, seed=seed)

    async def _ack(self, entry_id: bytes) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(keys.VERIFY_STREAM, keys.VERIFY_GROUP, entry_id)
            pipe.xdel(keys.VERIFY_STREAM, entry_id)
            await pipe.execute()
        self.acknowledged += 1


def final_size(job: Job, policy: Policy, route: Route) -> tuple[int, int]:
    """The size the route's last stage produces for this request, by the workers' own rule
    (``engines.stage_inputs.stage_size``, which reads only its inputs' sizes)."""
    size = (job.request.width, job.request.height)
    for index, stage in enumerate(route.stages):
        inputs = [Image.new("1", size)] if index > 0 else []
        size = stage_size(job, policy, stage, index, inputs)
    return size


def route_named(policy: Policy | None, name: str) -> Route | None:
    if policy is None:
        return None
    try:
        return policy.route(name)
    except KeyError:
        return None


def awaits_verdict(job: Job) -> bool:
    """A completed job whose verification is pending (anything else is a stale entry)."""
    return job.status is JobStatus.completed and job.verification.pending


def failed_metrics(verdict: Verification) -> list[str]:
    """Names of the failed checks: ``typography`` and each failed quality metric."""
    names = []
    if verdict.typography is not None and not verdict.typography.passed:
        names.append("typography")
    if verdict.quality is not None:
        names.extend(verdict.quality.failed_metrics)
    return names
