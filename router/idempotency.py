"""``Idempotency-Key``: the same key from the same tenant within the TTL gives one job.

A request claims the key for its new job id with ``SET NX`` and a short expiry before it
is accepted; the accept transaction extends the claim to the full TTL; a refused request
releases it. A second request with the key finds the claim and answers with the job it
names, waiting briefly while the first request's accept is still in flight. The claim
holds a fingerprint of the request body beside the job id: the same key with another
body is refused (422 ``idempotency_mismatch``), never answered with someone else's job::

    claim = Claim.of(tenant, key, job_id, request.model_dump_json())
    original = await idem.claim_or_original(claim, jobs)
    if original is not None:
        return original          # never a second job
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from controlplane import keys
from controlplane.errors import Conflict, IdempotencyMismatch, NotFound, ValidationFailed
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


@dataclass(frozen=True)
class Claim:
    """One request's claim on a key: ``JOB_ID:FINGERPRINT`` is what the key holds."""

    tenant: str
    key: str
    job_id: str
    fingerprint: str

    @classmethod
    def of(cls, tenant: str, key: str, job_id: str, body: str) -> Claim:
        return cls(tenant, key, job_id, hashlib.sha256(body.encode()).hexdigest()[:32])

    @property
    def name(self) -> str:
        return keys.idempotency(self.tenant, self.key)

    @property
    def value(self) -> str:
        return f"{self.job_id}:{self.fingerprint}"


class IdempotencyKeys:
    def __init__(self, redis: aioredis.Redis, *, ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self._release = redis.register_script(_RELEASE)

    async def claim_or_original(self, claim: Claim, jobs: JobStore) -> Job | None:
        """Take ``claim`` (None), or return the job that already holds its key."""
        deadline = time.monotonic() + WAIT_FOR_ORIGINAL_S
        while True:
            if await self.redis.set(claim.name, claim.value, nx=True, ex=CLAIM_TTL_S):
                return None
            held: Any = await self.redis.get(claim.name)
            if held is not None:
                owner, _, fingerprint = held.decode().partition(":")
                if fingerprint != claim.fingerprint:
                    raise IdempotencyMismatch.of(
                        "Idempotency-Key", "was used with another request body; use a new "
                        "key for a new request", claim.key[:64])
                try:
                    return await jobs.get(owner)
                except NotFound:
                    pass  # the first request's accept has not committed yet
            if time.monotonic() > deadline:
                raise Conflict(f"Idempotency-Key: {claim.key!r} is held by a request that is "
                               "still being accepted; retry shortly")
            if held is not None:
                await asyncio.sleep(POLL_S)

    def commit(self, writes: Effects, claim: Claim) -> None:
        """Keep the claim for the full TTL (written by the accept transition)."""
        writes.set(claim.name, claim.value, ex=self.ttl_s)

    async def release(self, claim: Claim) -> None:
        """Free a claim whose request was not accepted, if it is still ours."""
        await self._release(keys=[claim.name], args=[claim.value])
