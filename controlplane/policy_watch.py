"""``laneway serve --policy FILE --watch``: re-apply the policy file whenever it changes.

The way a git-sync sidecar updates a mounted file: poll the file's content hash every
``poll_s``; a changed file is validated and put in force for every process; an invalid one
is refused with its errors logged and the last good policy stays in force. A file whose
apply did not reach Redis (not answering, restarting) is tried again at the next poll: its
hash is recorded only once the apply has answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from pathlib import Path

import redis.asyncio as aioredis

from controlplane.errors import PolicyError
from controlplane.policy import RemoteRules
from controlplane.policy_changes import PolicyApplied, apply_policy_text
from controlplane.registry import Registry
from controlplane.signals import on_stop_signals

log = logging.getLogger("laneway.policy-watch")

ACTOR = "policy-watch"
POLL_S = 0.5


class PolicyWatcher:
    def __init__(self, redis: aioredis.Redis, path: Path, registry: Registry, *,
                 remote: RemoteRules, poll_s: float = POLL_S) -> None:
        self.redis = redis
        self.path = path
        self.registry = registry
        self.remote = remote
        self.poll_s = poll_s
        self.seen_sha256: str | None = None
        self.last_errors: list[str] = []

    async def check_once(self) -> PolicyApplied | None:
        """Apply the file if its content changed since the last look; None otherwise."""
        try:
            text = self.path.read_text()
        except OSError as exc:  # a sidecar swapping the file: try again next poll
            log.warning("cannot read %s: %s", self.path, exc.strerror)
            return None
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest == self.seen_sha256:
            return None
        try:
            applied = await apply_policy_text(
                self.redis, text, self.registry, remote=self.remote, actor=ACTOR,
                source=str(self.path),
                reason=f"{self.path.name} changed (file sha256 {digest[:12]})")
        except aioredis.RedisError as exc:
            log.warning("%s not applied yet (Redis: %s); trying again", self.path, exc)
            return None
        except PolicyError as exc:
            self.seen_sha256 = digest
            self.last_errors = [f"{d.field}: {d.message}" for d in exc.details] or [exc.message]
            log.error("%s refused, the last good policy stays in force: %s", self.path,
                      "; ".join(self.last_errors))
            return None
        self.seen_sha256, self.last_errors = digest, []
        if applied.changed:
            log.info("%s applied: policy %s", self.path, applied.version[:19])
        return applied

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.check_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.poll_s)


async def run_policy_watch(redis_url: str, path: Path, registry: Registry, *,
                           remote: RemoteRules) -> None:
    """Watch until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    on_stop_signals(stop.set)
    redis = aioredis.Redis.from_url(redis_url)
    try:
        await PolicyWatcher(redis, path, registry, remote=remote).run(stop)
    finally:
        await redis.aclose()
