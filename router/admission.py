"""Bounded admission per route: accept, or answer a full route as its ``on_full`` says.

A route is full when its accepted, unfinished jobs (``keys.route_inflight``, kept by
``router/route_counters.py``) reach ``admission.max_queue``. A full route then

- ``reject``: refuses with 429 and a ``Retry-After`` from the route's recent drain rate;
- ``degrade``: serves the job through ``degrade_to`` (whose own bound and ``on_full`` then
  apply; a cycle of full routes refuses);
- ``defer``: accepts a job of a deferrable tier into the deferred stream, released by
  ``router/deferral.py`` when interactive load falls; other tiers are refused. The
  deferred stream holds at most ``defer.max_depth`` jobs (:meth:`AdmissionControl.
  deferred_bound`); beyond it a submit gets 429 ``deferred_queue_full``, its
  ``Retry-After`` from the rate deferred jobs were released over the last minute.

The bound is checked by the accept transition itself (:meth:`AdmissionControl.bound`), so
concurrent submits never pass it together; only when it refuses does :meth:`when_full`
decide where the job goes instead. Every decision is counted per route and tier
(``keys.admission_outcomes``)::

    created = await transitions.create(change, bound=admission.bound(route))
    if not created.created:
        admitted = await admission.when_full(policy, asked, route, tier=tier,
                                             inflight=created.full_at, seen={asked.name})
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import redis.asyncio as aioredis

from controlplane import keys
from controlplane.errors import AdmissionRefused, DeferredQueueFull, FieldError
from controlplane.policy import OnFull, Policy, Route
from controlplane.route_counters import DRAIN_WINDOW_S
from controlplane.transitions import Bound, Effects

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


def record_outcome(writes: Effects, *, route: str, tier: str, outcome: Outcome) -> None:
    writes.hincrby(keys.admission_outcomes(), f"{route}|{tier}|{outcome.value}", 1)


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

    @staticmethod
    def bound(route: Route) -> Bound:
        """The bound the accept transition checks: the route's jobs in flight."""
        return Bound(keys.route_inflight(route.name), route.admission.max_queue)

    @staticmethod
    def deferred_bound(policy: Policy) -> Bound:
        """The bound the accept transition of a deferred job checks: the deferred queue's
        length (cancelled jobs count until the deferral loop drops them)."""
        return Bound(keys.deferred_stream(), policy.defer.max_depth, measure="xlen")

    async def when_full(self, policy: Policy, asked: Route, full: Route, *, tier: str,
                        inflight: int, seen: set[str]) -> Admitted:
        """Where a job of ``tier`` that asked for ``asked`` goes now that ``full`` refused
        it (``seen``: routes tried so far, updated); raise AdmissionRefused if nowhere.

        Refusals are counted here; the accept transition counts the other outcomes.
        """
        on_full = full.admission.on_full
        degraded_from = None if full is asked else asked.name
        if on_full is OnFull.defer and policy.tiers[tier].deferrable:
            return Admitted(full, Outcome.deferred, degraded_from=degraded_from)
        if on_full is OnFull.degrade and full.admission.degrade_to not in seen:
            assert full.admission.degrade_to is not None  # checked at policy load
            seen.add(full.admission.degrade_to)
            return Admitted(policy.route(full.admission.degrade_to), Outcome.degraded,
                            degraded_from=asked.name)
        raise await self._refusal(asked, full, inflight, tier=tier)

    async def drained(self, route: str) -> int:
        """Jobs of ``route`` that finished in the last DRAIN_WINDOW_S whole seconds."""
        return await self._window_sum(lambda s: keys.route_drained(route, s))

    async def released(self) -> int:
        """Deferred jobs released in the last DRAIN_WINDOW_S whole seconds."""
        return await self._window_sum(keys.deferred_released)

    async def _window_sum(self, key_of: Callable[[int], str]) -> int:
        now_s = int(self.clock_s())
        counts = await self.redis.mget(
            [key_of(s) for s in range(now_s - DRAIN_WINDOW_S, now_s)])
        return sum(int(c) for c in counts if c)

    async def deferred_full(self, policy: Policy, asked: Route, *, tier: str,
                            depth: int) -> DeferredQueueFull:
        """The refusal of a job that would wait in a deferred queue of ``depth`` jobs."""
        max_depth = policy.defer.max_depth
        wait_s = retry_after_s(await self.released(), depth - max_depth + 1)
        refused = Effects()
        record_outcome(refused, route=asked.name, tier=tier, outcome=Outcome.rejected)
        await refused.send(self.redis)
        return DeferredQueueFull(
            f"the deferred queue is full: {depth} jobs waiting, defer.max_depth "
            f"{max_depth}; retry after {wait_s} s", retry_after_s=wait_s,
            details=[FieldError("defer.max_depth", "deferred queue is full", max_depth)])

    async def _refusal(self, asked: Route, full: Route, inflight: int, *,
                       tier: str) -> AdmissionRefused:
        excess = inflight - full.admission.max_queue + 1
        wait_s = retry_after_s(await self.drained(full.name), excess)
        refused = Effects()
        record_outcome(refused, route=asked.name, tier=tier, outcome=Outcome.rejected)
        await refused.send(self.redis)
        why = (f"tier {tier!r} is not deferrable" if full.admission.on_full is OnFull.defer
               else f"on_full: {full.admission.on_full.value}")
        via = f" (degraded from {asked.name!r})" if full is not asked else ""
        return AdmissionRefused(
            f"route {full.name!r}{via} is full: {inflight} jobs in flight, max_queue "
            f"{full.admission.max_queue} ({why}); retry after {wait_s} s",
            retry_after_s=wait_s)
