"""The worker: per-device slots that pull stage entries and hand them to the stage runner.

Each engine gets ``max_concurrency`` slots on this device. A slot reads only when it is
free (pull-based: a device never holds more work than its cap); engines with
``max_batch > 1`` collect a batch first. Beside the slots run a heartbeat (which also keeps
this worker's in-flight entries from looking abandoned), a listener for cancellations, and
the recovery of entries that dead workers left pending (XAUTOCLAIM after
``claim_idle_ms``).

Stopping (SIGTERM): slots stop reading, running stages get ``drain_timeout_s`` to finish,
and whatever is still running after that is stopped at its next step and handed back to
its lane for another worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import redis.asyncio as aioredis

from controlplane import keys
from controlplane.artifacts import ArtifactStore
from controlplane.jobs import Job, JobStatus, JobStore
from controlplane.live_config import LiveConfig
from controlplane.policy import DEVICE_KINDS, EngineSpec, Policy
from controlplane.pubsub import follow
from controlplane.registry import Registry
from engines.batching import fill_batch
from engines.device_gate import DeviceGate
from engines.device_memory import cuda_memory_bytes
from engines.lanes import Entry, LaneReader
from engines.memory_budget import MemoryBudget
from engines.stage_outcomes import Outcomes
from engines.stage_runner import RunnerContext, Slot, StageRunner

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
HEARTBEAT_TTL_S = 30


@dataclass
class WorkerOptions:
    name: str
    device: str
    registry: Registry
    artifacts: ArtifactStore
    job_ttl_s: int
    engines: frozenset[str] | None = None
    drain_timeout_s: float = 30.0
    redis_url: str | None = None  # for remote engines' circuit breakers
    #: stages at once on this device across engines (None: the policy's ``devices``)
    max_stages: int | None = None
    #: device memory for loaded engines (None: unlimited; see ``device_memory_gb``)
    memory_gb: float | None = None


class Worker:
    def __init__(self, redis: aioredis.Redis, options: WorkerOptions) -> None:
        self.redis = redis
        self.options = options
        self.live = LiveConfig(redis)
        self.reader = LaneReader(redis, options.name)
        self._executor = ThreadPoolExecutor(max_workers=64, thread_name_prefix="slot")
        self.runner = StageRunner(
            JobStore(redis), self.live,
            Outcomes(redis, job_ttl_s=options.job_ttl_s),
            RunnerContext(worker=options.name, device=options.device,
                          registry=options.registry, artifacts=options.artifacts,
                          executor=self._executor, redis_url=options.redis_url))
        self._slots: dict[str, list[Slot]] = {}
        self.gate = DeviceGate(self._max_stages)
        self.memory = MemoryBudget(options.memory_gb, self._unload_engine)
        #: engines whose memory_gb exceeds the device's budget (logged once, never served)
        self._refused: set[str] = set()
        #: entries taken by slots that wait for the device (the heartbeat keeps them claimed)
        self._waiting: dict[bytes, Entry] = {}
        self._slot_tasks: list[asyncio.Task[None]] = []
        self._next_claim_s: dict[str, float] = {}
        self._stopping = asyncio.Event()
        self._helpers_stop = asyncio.Event()

    @property
    def name(self) -> str:
        return self.options.name

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until :meth:`stop`; then drain (bounded) and return."""
        await self.live.start()
        helpers = [asyncio.create_task(self._heartbeat_loop()),
                   asyncio.create_task(self._cancel_listener())]
        try:
            self._reconcile_slots()
            while not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=1.0)
                self._reconcile_slots()
                await self.gate.recheck()
                await self.memory.unload_idle()
            await self._drain()
        finally:
            self._helpers_stop.set()
            await asyncio.gather(*helpers, return_exceptions=True)
            await self.runner.progress.close()
            with contextlib.suppress(aioredis.RedisError):
                await self.reader.release_held()
            with contextlib.suppress(aioredis.RedisError):
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

    def not_ready(self) -> list[str]:
        """Why this worker cannot take work now (empty: it can); its readiness probe
        adds whether Redis answers. Weights load on first use: ready is not loaded."""
        if self._stopping.is_set():
            return ["stopping: draining the stages it runs"]
        if self._slots:
            return []
        if self._refused:
            return [f"every engine it serves is over its memory budget of "
                    f"{self.memory.total_gb} GB: {', '.join(sorted(self._refused))}"]
        if not self.live.loaded:
            return ["the policy in force is not read yet"]
        return ["the policy in force has no engine this worker serves (see --engines)"]

    async def _drain(self) -> None:
        running = [t for t in self._slot_tasks if not t.done()]
        if not running:
            return
        _, pending = await asyncio.wait(running, timeout=self.options.drain_timeout_s)
        if pending:
            log.warning("%d slot(s) still busy after %.0fs; handing their work back",
                        len(pending), self.options.drain_timeout_s)
            self.runner.hand_back_now = True
            await asyncio.wait(pending)

    def _served(self, policy: Policy) -> dict[str, EngineSpec]:
        wanted = self.options.engines
        if wanted is not None:
            return {name: spec for name, spec in policy.engines.items() if name in wanted}
        return {name: spec for name, spec in policy.engines.items()
                if spec.kind in DEVICE_KINDS}

    def _reconcile_slots(self) -> None:
        """Start slot loops for the engines (and caps) the policy in force gives this worker."""
        for engine, spec in self._served(self.live.snapshot.policy).items():
            if not self.memory.fits(spec):
                if engine not in self._refused:
                    self._refused.add(engine)
                    log.error("engine %s needs memory_gb %s, more than this device's budget "
                              "of %s GB: not served here", engine, spec.memory_gb,
                              self.memory.total_gb)
                continue
            slots = self._slots.setdefault(engine, [])
            while len(slots) < spec.max_concurrency:
                slot = Slot(engine, len(slots))
                slots.append(slot)
                self._slot_tasks.append(asyncio.create_task(self._slot_loop(slot)))

    # -- the slot loop -----------------------------------------------------------------

    async def _slot_loop(self, slot: Slot) -> None:
        while not self._stopping.is_set():
            policy = self.live.snapshot.policy
            spec = policy.engines.get(slot.engine)
            if spec is None or slot.index >= spec.max_concurrency:
                await asyncio.sleep(1.0)  # engine removed or cap lowered: this slot idles
                continue
            try:
                entries = await self._next_entries(slot.engine, spec, policy)
                if entries:
                    await self._run_on_device(slot, entries)
            except aioredis.ConnectionError:
                log.warning("slot %s/%d lost Redis; retrying in 1 s", slot.engine, slot.index)
                await asyncio.sleep(1.0)
            except Exception:  # a bug must not kill the slot; the entry stays pending
                log.exception("slot %s/%d: unexpected error", slot.engine, slot.index)
                await asyncio.sleep(1.0)

    async def _run_on_device(self, slot: Slot, entries: list[Entry]) -> None:
        self._waiting.update((e.entry_id, e) for e in entries)
        try:
            spec = self.live.snapshot.policy.engines[slot.engine]
            async with self.gate.stage(), self.memory.use(slot.engine, spec):
                for entry in entries:
                    self._waiting.pop(entry.entry_id, None)
                slot.busy = True
                try:
                    await self.runner.run(slot, entries)
                finally:
                    slot.busy = False
        finally:
            for entry in entries:
                self._waiting.pop(entry.entry_id, None)

    def _unload_engine(self, engine: str) -> None:
        """Free every slot's pipelines of ``engine`` (none of them is running)."""
        for slot in self._slots.get(engine, []):
            for loaded in slot.engines.values():
                loaded.close()
            slot.engines.clear()

    def _max_stages(self) -> int | None:
        return (self.options.max_stages
                or self.live.snapshot.policy.devices.max_concurrent_stages)

    async def _next_entries(self, engine: str, spec: EngineSpec, policy: Policy
                            ) -> list[Entry]:
        weights = {tier: t.weight for tier, t in policy.tiers.items()}
        entries = await self._claim_abandoned(engine, spec, list(weights))
        if not entries:
            entries = await self.reader.take(engine, weights, count=1)
        if entries and spec.max_batch > 1:
            entries = await fill_batch(
                entries, lambda n: self.reader.take(engine, weights, count=n, block=False),
                max_batch=spec.max_batch, max_wait_ms=spec.max_wait_ms)
        return entries

    async def _claim_abandoned(self, engine: str, spec: EngineSpec,
                               tiers: list[str]) -> list[Entry]:
        """Now and then, take over one entry a dead worker left pending."""
        now = time.monotonic()
        if now < self._next_claim_s.get(engine, 0.0):
            return []
        self._next_claim_s[engine] = now + max(spec.claim_idle_ms / 2000, 0.2)
        claimed = await self.reader.claim_stale(engine, tiers, min_idle_ms=spec.claim_idle_ms,
                                                count=1)
        for entry in claimed:
            log.warning("claimed entry %s of job %s left by a dead worker", entry.entry_id,
                        entry.message.job_id)
        if not claimed:
            for name in await self.reader.forget_gone_consumers(
                    engine, tiers, min_idle_ms=spec.claim_idle_ms):
                log.info("removed consumer %s of a gone worker from %s's lanes", name, engine)
        return claimed

    # -- beside the slots ----------------------------------------------------------------

    async def _cancel_listener(self) -> None:
        async def on_cancel(job_id: bytes) -> None:
            self.runner.cancel(job_id.decode())

        await follow(self.redis, keys.CANCEL_CHANNEL, on_cancel, stop=self._helpers_stop,
                     on_resubscribed=self._recheck_cancelled)

    async def _recheck_cancelled(self) -> None:
        """After a lost subscription: stop the running jobs cancelled in the gap."""
        job_ids = sorted({e.message.job_id for e in self.runner.inflight.values()})
        if not job_ids:
            return
        for job_id, raw in zip(job_ids, await self.redis.mget([keys.job(j) for j in job_ids]),
                               strict=True):
            if raw is not None and Job.model_validate_json(raw).status is JobStatus.cancelled:
                log.warning("job %s was cancelled while the subscription was lost", job_id)
                self.runner.cancel(job_id)

    async def _heartbeat_loop(self) -> None:
        while not self._helpers_stop.is_set():
            try:
                await self._heartbeat()
            except aioredis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._helpers_stop.wait(), timeout=HEARTBEAT_S)

    async def _heartbeat(self) -> None:
        slots = {engine: {"busy": sum(s.busy for s in slots), "total": len(slots)}
                 for engine, slots in self._slots.items()}
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(keys.worker_heartbeat(self.name), mapping={
                "name": self.name, "device": self.options.device, "pid": os.getpid(),
                "slots": json.dumps(slots), "heartbeat_at": f"{time.time():.3f}",
                "stages": json.dumps({"running": self.gate.running,
                                      "allowed": self.gate.allowed}),
                # torch.cuda's own figures: null on other devices
                "memory": json.dumps(self.memory.snapshot()
                                     | {"cuda": cuda_memory_bytes(self.options.device)}),
            })
            pipe.expire(keys.worker_heartbeat(self.name), HEARTBEAT_TTL_S)
            pipe.sadd(keys.workers(), self.name)
            # Touch in-flight entries so a long stage is not mistaken for an abandoned one.
            for entry in [*self.runner.inflight.values(), *self.reader.held(),
                          *self._waiting.values()]:
                pipe.xclaim(entry.stream, keys.ENGINE_GROUP, self.name, 0, [entry.entry_id],
                            justid=True)
            await pipe.execute()
