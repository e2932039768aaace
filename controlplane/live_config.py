"""The policy and deployments a process acts on, kept current from Redis.

A control message on pub/sub triggers a re-read at once; a periodic re-read every
``refresh_s`` is the fallback for a missed message. Readers see one immutable snapshot:
the reference is swapped, never mutated, so a request routes against one policy version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from controlplane import keys
from controlplane.deployments import Deployment, DeploymentStore
from controlplane.policy import Policy
from controlplane.policy_store import PolicyStore
from controlplane.pubsub import follow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    policy: Policy
    deployments: dict[str, Deployment] = field(default_factory=dict)

    def pick_model_version(self, model: str, job_id: str) -> str | None:
        """Stable or canary version of ``model`` for a job (weighted, sticky on its id)."""
        deployment = self.deployments.get(model)
        return deployment.pick(job_id) if deployment else None


class LiveConfig:
    def __init__(self, redis: aioredis.Redis, *, refresh_s: float = 1.0) -> None:
        self.redis = redis
        self.refresh_s = refresh_s
        self.policies = PolicyStore(redis)
        self.deployment_store = DeploymentStore(redis)
        self._snapshot: Snapshot | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

    @property
    def loaded(self) -> bool:
        """Whether a policy has been read (``snapshot`` is there)."""
        return self._snapshot is not None

    @property
    def snapshot(self) -> Snapshot:
        if self._snapshot is None:
            raise RuntimeError("LiveConfig.start() has not loaded a policy yet")
        return self._snapshot

    async def reload(self) -> Snapshot:
        policy = await self.policies.current()
        if policy is None:
            raise RuntimeError("no policy in force: apply one (laneway serve --policy FILE)")
        deployments = await self.deployment_store.all()
        self._snapshot = Snapshot(policy, deployments)
        return self._snapshot

    async def start(self) -> None:
        await self.reload()
        self._tasks = [asyncio.create_task(self._listen()), asyncio.create_task(self._poll())]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _listen(self) -> None:
        async def on_message(_: bytes) -> None:
            await self._safe_reload()

        await follow(self.redis, keys.CONTROL_CHANNEL, on_message, stop=self._stop,
                     on_resubscribed=self._safe_reload)

    async def _poll(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.refresh_s)
            if not self._stop.is_set():
                await self._safe_reload()

    async def _safe_reload(self) -> None:
        try:
            await self.reload()
        except Exception:  # keep the last good snapshot; the next tick tries again
            log.exception("could not reload policy/deployments; keeping the last good one")
