"""Reading an engine's lanes: one stream per tier, chosen by smooth weighted round robin.

A tier with weight 4 is read four times as often as a tier with weight 1 while both have
work waiting; an empty tier is skipped and earns no credit, so a low tier is slowed but
never starved.

The reader remembers which lanes gave work lately ("hot"). While some are, it reads the
one whose turn it is, without blocking; when none is, one ``XREADGROUP … BLOCK`` across
all the engine's lanes waits for the next entry (no polling: the server wakes the read).
That read may return entries of several lanes at once; the reader runs the one whose turn
it is and holds the others for this engine's next free slot (the heartbeat keeps them
from looking abandoned, and :meth:`LaneReader.release_held` puts them back on stop).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace
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
    #: taken over from a consumer that went silent: the record it carries may be stale
    reclaimed: bool = False


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
        self._hot: dict[str, set[str]] = {}
        self._held: dict[str, dict[str, deque[Entry]]] = {}

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

    def held(self) -> list[Entry]:
        """Entries read but not yet handed to a slot."""
        return [e for tiers in self._held.values() for lane in tiers.values() for e in lane]

    async def take(self, engine: str, weights: dict[str, int], *, count: int = 1,
                   block: bool = True) -> list[Entry]:
        """Up to ``count`` new entries from the lane whose turn it is (waiting if ``block``)."""
        await self.ensure_groups(engine, list(weights))
        turns = self._turns.setdefault(engine, WeightedTiers())
        hot = self._hot.setdefault(engine, set())
        held = self._held.setdefault(engine, {})
        streams = {tier: keys.engine_stream(engine, tier) for tier in weights}
        while True:
            known = {t for t in weights if held.get(t)} | (hot & set(weights))
            if not known:
                break
            tier = turns.pick(weights, known)
            if held.get(tier):
                lane = held[tier]
                return [lane.popleft() for _ in range(min(count, len(lane)))]
            entries = await self._read(engine, {tier: streams[tier]}, count, block_ms=None)
            if entries:
                return entries
            hot.discard(tier)  # drained (or another consumer was faster)
        entries = await self._read(engine, streams, count,
                                   block_ms=WAIT_BLOCK_MS if block else None)
        by_tier: dict[str, list[Entry]] = {}
        for entry in entries:
            by_tier.setdefault(entry.tier, []).append(entry)
        hot.update(by_tier)
        if len(by_tier) <= 1:
            return entries
        tier = turns.pick(weights, set(by_tier))
        for other, rest in by_tier.items():
            if other != tier:
                held.setdefault(other, deque()).extend(rest)
        return by_tier[tier]

    async def release_held(self) -> None:
        """Put held entries back at the end of their lanes for other workers (on stop)."""
        for entry in self.held():
            fields = entry.message.fields()
            if entry.message.record is not None:
                fields["record"] = entry.message.record
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xadd(entry.stream, fields)
                pipe.xack(entry.stream, keys.ENGINE_GROUP, entry.entry_id)
                pipe.xdel(entry.stream, entry.entry_id)
                await pipe.execute()
        self._held.clear()

    async def _read(self, engine: str, streams: dict[str, str], count: int, *,
                    block_ms: int | None) -> list[Entry]:
        """One XREADGROUP over ``streams`` (tier → stream); a lost group is made again."""
        tiers = {stream: tier for tier, stream in streams.items()}
        try:
            reply: Any = await self.redis.xreadgroup(
                keys.ENGINE_GROUP, self.consumer, dict.fromkeys(streams.values(), ">"),
                count=count, block=block_ms)
        except aioredis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._groups.difference_update(streams.values())  # the server lost its data
            await self.ensure_groups(engine, list(streams))
            return []
        out = []
        for stream, rows in reply or []:
            name = stream.decode() if isinstance(stream, bytes) else stream
            out.extend(_entries([(stream, rows)], tiers[name]))
        return out

    async def claim_stale(self, engine: str, tiers: list[str], *, min_idle_ms: int,
                          count: int) -> list[Entry]:
        """Take over entries another consumer left unacknowledged for ``min_idle_ms``."""
        claimed: list[Entry] = []
        for tier in tiers:
            stream = keys.engine_stream(engine, tier)
            if stream not in self._groups:
                continue
            try:
                _, entries, _ = await self.redis.xautoclaim(
                    stream, keys.ENGINE_GROUP, self.consumer, min_idle_time=min_idle_ms,
                    start_id="0-0", count=count - len(claimed))
            except aioredis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._groups.discard(stream)  # the server lost its data; make it again
                await self.ensure_groups(engine, [tier])
                continue
            claimed.extend(replace(e, reclaimed=True)
                           for e in _entries([(stream.encode(), entries)], tier))
            if len(claimed) >= count:
                break
        return claimed


    async def forget_gone_consumers(self, engine: str, tiers: list[str], *,
                                    min_idle_ms: int) -> list[str]:
        """Delete from the lanes' groups the consumers of workers that are gone: nothing
        pending (their entries were claimed), idle for ``min_idle_ms`` and no heartbeat
        within ``keys.WORKER_STALE_S``."""
        gone = []
        for tier in tiers:
            stream = keys.engine_stream(engine, tier)
            if stream not in self._groups:
                continue
            try:
                consumers: list[dict[str, Any]] = await self.redis.xinfo_consumers(
                    stream, keys.ENGINE_GROUP)
            except aioredis.ResponseError:  # the group is gone: _read makes it again
                continue
            for consumer in consumers:
                name = consumer["name"]
                name = name.decode() if isinstance(name, bytes) else str(name)
                if (name == self.consumer or int(consumer["pending"])
                        or int(consumer["idle"]) < min_idle_ms
                        or await self._beats(name)):
                    continue
                await self.redis.xgroup_delconsumer(stream, keys.ENGINE_GROUP, name)
                gone.append(name)
        return gone


    async def _beats(self, worker: str) -> bool:
        """Whether ``worker`` sent a heartbeat within ``keys.WORKER_STALE_S``."""
        beat: Any = await self.redis.hget(keys.worker_heartbeat(worker), "heartbeat_at")
        return beat is not None and time.time() - float(beat) <= keys.WORKER_STALE_S


def _entries(reply: list | None, tier: str) -> list[Entry]:
    out = []
    for stream, rows in reply or []:
        name = stream.decode() if isinstance(stream, bytes) else stream
        for entry_id, fields in rows:
            if fields:  # XAUTOCLAIM reports deleted entries with no fields
                out.append(Entry(name, entry_id, tier, StageMessage.parse(fields)))
    return out
