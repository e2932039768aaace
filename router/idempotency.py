"""``Idempotency-Key``: the same key from the same tenant within the TTL gives one job.

A request claims the key for its new job id with ``SET NX`` and a short expiry before it
is accepted; the accept transaction extends the claim to the full TTL; a refused request
releases it. A second request with the key finds the claim and answers with the job it
names, waiting briefly while the first request's accept is still in flight::

    original = await idem.claim_or_original(tenant, key, job_id, jobs)
    if original is not None:
        return original          # never a second job
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as aioredis

from controlplane import keys
from controlplane.errors import Conflict, NotFound, ValidationFailed
from controlplane.jobs import Job, JobStore
from controlplane.transitions import Effects

MAX_KEY_CHARS = 255
#: a claim whose accept never committed (a crashed process) frees the key after this
CLAIM_TTL_S = 30
#: how long a repeat waits for the first request's accept to commit
WAIT_FOR_ORIGINAL_S = 10.0
POLL_S = 0.02

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def check_key(key: str) -> None:
    if not 0 < len(key) <= MAX_KEY_CHARS or not key.isprintable():
        raise ValidationFailed.of(
            "Idempotency-Key", f"must be 1..{MAX_KEY_CHARS} printable characters", key[:64])


class IdempotencyKeys:
    def __init__(self, redis: aioredis.Redis, *, ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self._release = redis.register_script(_RELEASE)

    async def claim_or_original(self, tenant: str, key: str, job_id: str,
                                jobs: JobStore) -> Job | None:
        """Claim ``key`` for ``job_id`` (None), or return the job that already holds it."""
        name = keys.idempotency(tenant, key)
        deadline = time.monotonic() + WAIT_FOR_ORIGINAL_S
        while True:
            if await self.redis.set(name, job_id, nx=True, ex=CLAIM_TTL_S):
                return None
            owner: Any = await self.redis.get(name)
            if owner is not None:
                try:
                    return await jobs.get(owner.decode())
                except NotFound:
                    pass  # the first request's accept has not committed yet
            if time.monotonic() > deadline:
                raise Conflict(f"Idempotency-Key: {key!r} is held by a request that is still "
                               "being accepted; retry shortly")
            if owner is not None:
                await asyncio.sleep(POLL_S)

    def commit(self, writes: Effects, tenant: str, key: str, job_id: str) -> None:
        """Keep the claim for the full TTL (written by the accept transition)."""
        writes.set(keys.idempotency(tenant, key), job_id, ex=self.ttl_s)

    async def release(self, tenant: str, key: str, job_id: str) -> None:
        """Free a claim whose request was not accepted, if it is still ours."""
        await self._release(keys=[keys.idempotency(tenant, key)], args=[job_id])
