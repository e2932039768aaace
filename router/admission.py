"""Bounded admission per route: accept, or answer a full route as its ``on_full`` says.

A route is full when its accepted, unfinished jobs (``keys.route_inflight``, kept by
``router/route_counters.py``) reach ``admission.max_queue``. A full route then

- ``reject``: refuses with 429 and a ``Retry-After`` from the route's recent drain rate;
- ``degrade``: serves the job through ``degrade_to`` (whose own bound and ``on_full`` then
  apply; a cycle of full routes refuses);
- ``defer``: accepts a job of a deferrable tier into the deferred stream, released by
  ``router/deferral.py`` when interactive load falls; other tiers are refused.

The bound is read before the accept transaction (which increments the counter), so
requests accepted in the same instant can pass it together: the overshoot is at most the
number of concurrent submits. The counter itself never drifts. Every decision is counted
per route and tier (``keys.admission_outcomes``)::

    admitted = await AdmissionControl(redis).admit(policy, route, tier="standard")
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from controlplane import keys
from controlplane.errors import AdmissionRefused
from controlplane.policy import OnFull, Policy, Route
from controlplane.route_counters import DRAIN_WINDOW_S

RETRY_AFTER_MIN_S = 1
RETRY_AFTER_MAX_S = 300


class Outcome(StrEnum):
    accepted = "accepted"
    rejected = "rejected"
    degraded = "degraded"
    deferred = "deferred"


@dataclass(frozen=True)
class Admitted:
    """The route that serves an accepted job, and how it got there."""

    route: Route
    outcome: Outcome
    degraded_from: str | None = None

    @property
    def deferred(self) -> bool:
        return self.outcome is Outcome.deferred


def record_outcome(pipe: Pipeline, *, route: str, tier: str, outcome: Outcome) -> None:
    pipe.hincrby(keys.admission_outcomes(), f"{route}|{tier}|{outcome.value}", 1)


def retry_after_s(drained: int, excess: int, *, window_s: int = DRAIN_WINDOW_S) -> int:
    """Seconds until ``excess`` jobs drain at the rate of ``drained`` jobs per ``window_s``.

    With nothing drained in the window the rate is below one job per window, so the wait
    is at least ``window_s`` per excess job: that lower bound is the answer (clamped).
    """
    rate_per_s = max(drained, 1) / window_s
    wait_s = math.ceil(max(excess, 1) / rate_per_s)
    return min(max(wait_s, RETRY_AFTER_MIN_S), RETRY_AFTER_MAX_S)


class AdmissionControl:
    def __init__(self, redis: aioredis.Redis, *, clock_s: Callable[[], float] = time.time
                 ) -> None:
        self.redis = redis
        self.clock_s = clock_s

    async def admit(self, policy: Policy, route: Route, *, tier: str) -> Admitted:
        """Where a job of ``tier`` asking for ``route`` goes; raise AdmissionRefused if nowhere.

        Refusals are counted here; the caller counts the other outcomes in its accept
        transaction (:func:`record_outcome`), so a failed accept is not counted.
        """
        current, seen = route, {route.name}
        while True:
            inflight = await self.inflight(current.name)
            if inflight < current.admission.max_queue:
                if current is route:
                    return Admitted(route, Outcome.accepted)
                return Admitted(current, Outcome.degraded, degraded_from=route.name)
            on_full = current.admission.on_full
            if on_full is OnFull.defer and policy.tiers[tier].deferrable:
                return Admitted(current, Outcome.deferred,
                                degraded_from=None if current is route else route.name)
            if on_full is OnFull.degrade and current.admission.degrade_to not in seen:
                assert current.admission.degrade_to is not None  # checked at policy load
                current = policy.route(current.admission.degrade_to)
                seen.add(current.name)
                continue
            raise await self._refusal(route, current, inflight, tier=tier)

    async def inflight(self, route: str) -> int:
        return int(await self.redis.get(keys.route_inflight(route)) or 0)

    async def drained(self, route: str) -> int:
        """Jobs of ``route`` that finished in the last DRAIN_WINDOW_S whole seconds."""
        now_s = int(self.clock_s())
        counts = await self.redis.mget(
            [keys.route_drained(route, s) for s in range(now_s - DRAIN_WINDOW_S, now_s)])
        return sum(int(c) for c in counts if c)

    async def _refusal(self, asked: Route, full: Route, inflight: int, *,
                       tier: str) -> AdmissionRefused:
        excess = inflight - full.admission.max_queue + 1
        wait_s = retry_after_s(await self.drained(full.name), excess)
        async with self.redis.pipeline(transaction=False) as pipe:
            record_outcome(pipe, route=asked.name, tier=tier, outcome=Outcome.rejected)
            await pipe.execute()
        why = (f"tier {tier!r} is not deferrable" if full.admission.on_full is OnFull.defer
               else f"on_full: {full.admission.on_full.value}")
        via = f" (degraded from {asked.name!r})" if full is not asked else ""
        return AdmissionRefused(
            f"route {full.name!r}{via} is full: {inflight} jobs in flight, max_queue "
            f"{full.admission.max_queue} ({why}); retry after {wait_s} s",
            retry_after_s=wait_s)
