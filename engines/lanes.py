"""Reading an engine's lanes: one stream per tier, chosen by smooth weighted round robin.

A tier with weight 4 is read four times as often as a tier with weight 1 while both have
work waiting; an empty tier is skipped and earns no credit, so a low tier is slowed but
never starved. Reads never block on an empty lane while another lane has work: the
reader tries lanes in weight order without blocking, and only when all are empty does it
wait (XREAD BLOCK from each lane's last id, so an entry added in between is not missed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from controlplane import keys
from controlplane.stage_messages import StageMessage

WAIT_BLOCK_MS = 1000


@dataclass(frozen=True)
class Entry:
    """One stream entry handed to a slot."""

    stream: str
    entry_id: bytes
    tier: str
    message: StageMessage


@dataclass
class WeightedTiers:
    """Smooth weighted round robin (as in nginx) over the tiers that have work waiting.

    Only tiers with waiting work take part in a round; an idle tier's credit is reset, so
    it neither hoards turns while idle nor pays for them when it comes back.
    """

    current: dict[str, int] = field(default_factory=dict)

    def pick(self, weights: dict[str, int], waiting: set[str]) -> str:
        for tier in weights:
            if tier not in waiting:
                self.current[tier] = 0
        total = sum(weights[t] for t in waiting)
        for tier in waiting:
            self.current[tier] = self.current.get(tier, 0) + weights[tier]
        best = max(sorted(waiting), key=lambda t: (self.current[t], weights[t]))
        self.current[best] -= total
        return best


class LaneReader:
    """Reads entries of one engine's lanes for one consumer (this worker)."""

    def __init__(self, redis: aioredis.Redis, consumer: str) -> None:
        self.redis = redis
        self.consumer = consumer
        self._groups: set[str] = set()
        self._turns: dict[str, WeightedTiers] = {}

    async def ensure_groups(self, engine: str, tiers: list[str]) -> None:
        for tier in tiers:
            stream = keys.engine_stream(engine, tier)
            if stream in self._groups:
                continue
            try:
                await self.redis.xgroup_create(stream, keys.ENGINE_GROUP, id="0", mkstream=True)
            except aioredis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self._groups.add(stream)

    async def take(self, engine: str, weights: dict[str, int], *, count: int = 1,
                   block: bool = True) -> list[Entry]:
        """Up to ``count`` new entries from the lane whose turn it is (waiting if ``block``).

        Entries are deleted on acknowledgement, so a lane's undelivered work is its length
        minus its pending count; both come in one round trip with each lane's last id.
        """
        await self.ensure_groups(engine, list(weights))
        turns = self._turns.setdefault(engine, WeightedTiers())
        streams = {tier: keys.engine_stream(engine, tier) for tier in weights}
        for _ in range(2 if block else 1):
            async with self.redis.pipeline(transaction=False) as pipe:
                for stream in streams.values():
                    pipe.xlen(stream)
                    pipe.xpending(stream, keys.ENGINE_GROUP)
                    pipe.xrevrange(stream, count=1)
                replies = await pipe.execute()
            waiting: set[str] = set()
            last_ids: dict[Any, Any] = {}
            for i, (tier, stream) in enumerate(streams.items()):
                length, pending, last = replies[3 * i: 3 * i + 3]
                if length - pending["pending"] > 0:
                    waiting.add(tier)
                last_ids[stream] = last[0][0] if last else b"0-0"
            while waiting:
                tier = turns.pick(weights, waiting)
                reply: Any = await self.redis.xreadgroup(
                    keys.ENGINE_GROUP, self.consumer, {streams[tier]: ">"}, count=count)
                entries = _entries(reply, tier)
                if entries:
                    return entries
                waiting.discard(tier)  # another consumer was faster
            if block:
                await self.redis.xread(last_ids, count=1, block=WAIT_BLOCK_MS)
        return []

    async def claim_stale(self, engine: str, tiers: list[str], *, min_idle_ms: int,
                          count: int) -> list[Entry]:
        """Take over entries another consumer left unacknowledged for ``min_idle_ms``."""
        claimed: list[Entry] = []
        for tier in tiers:
            stream = keys.engine_stream(engine, tier)
            if stream not in self._groups:
                continue
            _, entries, _ = await self.redis.xautoclaim(
                stream, keys.ENGINE_GROUP, self.consumer, min_idle_time=min_idle_ms,
                start_id="0-0", count=count - len(claimed))
            claimed.extend(_entries([(stream.encode(), entries)], tier))
            if len(claimed) >= count:
                break
        return claimed


def _entries(reply: list | None, tier: str) -> list[Entry]:
    out = []
    for stream, rows in reply or []:
        name = stream.decode() if isinstance(stream, bytes) else stream
        for entry_id, fields in rows:
            if fields:  # XAUTOCLAIM reports deleted entries with no fields
                out.append(Entry(name, entry_id, tier, StageMessage.parse(fields)))
    return out
