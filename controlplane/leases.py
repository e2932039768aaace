"""A lease in Redis: one process at a time runs a loop (the controller, the deferral loop).

The holder's token is the key's value; the key expires after ``ttl_ms`` unless renewed,
so a dead holder's lease passes to another process. Renew and release only act while the
token is still ours.
"""

from __future__ import annotations

import os
import secrets
import socket

import redis.asyncio as aioredis

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease:
    def __init__(self, redis: aioredis.Redis, key: str, *, ttl_ms: int) -> None:
        self.redis = redis
        self.key = key
        self.ttl_ms = ttl_ms
        self.token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    async def hold(self) -> bool:
        """Take the lease when free, or extend it when ours; True while we hold it."""
        if await self._renew(keys=[self.key], args=[self.token, self.ttl_ms]):
            return True
        return bool(await self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms))

    async def release(self) -> None:
        await self._release(keys=[self.key], args=[self.token])
