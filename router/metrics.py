"""``GET /metrics``: Prometheus text built from Redis at scrape time.

Workers push their figures through Redis (heartbeats with slot occupancy, the stage-time
histograms and counters of ``router/metrics_store.py``); the API reads them when scraped
and serves them, so every API process reports the same totals and workers need no port.
Stage times are stored in milliseconds with non-cumulative bucket counts; they are served
in seconds with cumulative buckets, as Prometheus expects::

    body = await render_metrics(redis, policy)   # bytes, CONTENT_TYPE_LATEST
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Iterator

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from controlplane import keys
from controlplane.metrics_store import BUCKETS_MS
from controlplane.policy import Policy
from router.status import lane_stats, live_workers, worker_slots

_STAGE_HISTOGRAMS = {"run": ("laneway_stage_run_seconds", "Engine run time of a stage"),
                     "queue": ("laneway_stage_queue_seconds",
                               "Time a stage waited in its lane before a slot took it")}


class _Families(Collector):
    """A collector over metric families already read from Redis."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def _decoded(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


def stage_histograms(fields: dict[str, str]) -> list[Metric]:
    """Histogram families from ``kind|engine|version|bucket`` (and ``|sum``, ``|count``)."""
    series: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    for field, value in fields.items():
        kind, engine, version, part = field.split("|")
        series[(kind, engine, version)][part] = float(value)
    families = {kind: HistogramMetricFamily(name, doc, labels=["engine", "version"])
                for kind, (name, doc) in _STAGE_HISTOGRAMS.items()}
    for (kind, engine, version), parts in sorted(series.items()):
        if kind not in families:
            continue
        running, buckets = 0.0, []
        for bound in BUCKETS_MS:
            running += parts.get(str(bound), 0)
            buckets.append((str(bound / 1000), running))
        buckets.append(("+Inf", parts.get("count", running + parts.get("+Inf", 0))))
        families[kind].add_metric([engine, version], buckets,
                                  sum_value=parts.get("sum", 0) / 1000)
    return list(families.values())


def _counter(name: str, doc: str, labels: list[str], fields: dict[str, str]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for field, value in sorted(fields.items()):
        family.add_metric(field.split("|"), float(value))
    return family


async def collect(redis: aioredis.Redis, policy: Policy) -> list[Metric]:
    now_s = time.time()
    pairs = [(engine, tier) for engine in policy.engines for tier in policy.tiers]
    streams = [keys.engine_stream(e, t) for e, t in pairs] + [keys.deferred_stream()]
    stats = await lane_stats(redis, streams, now_ms=int(now_s * 1000))
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.stage_histograms())
        pipe.hgetall(keys.admission_outcomes())
        pipe.hgetall(keys.job_outcomes())
        pipe.hgetall(keys.engine_spend())
        for route in policy.routes:
            pipe.get(keys.route_inflight(route.name))
        replies = await pipe.execute()
    histograms, admission, outcomes, spend = (_decoded(r) for r in replies[:4])
    inflight = replies[4:]

    depth = GaugeMetricFamily("laneway_lane_depth",
                              "Stage entries in a lane (queued and running)",
                              labels=["engine", "tier"])
    age = GaugeMetricFamily("laneway_lane_oldest_age_seconds",
                            "Age of the oldest entry in a lane (0 when empty)",
                            labels=["engine", "tier"])
    for (engine, tier), (n, age_s) in zip(pairs, stats[:-1], strict=True):
        depth.add_metric([engine, tier], n)
        age.add_metric([engine, tier], age_s or 0.0)
    deferred_n, deferred_age_s = stats[-1]
    deferred = GaugeMetricFamily("laneway_deferred_depth", "Accepted jobs waiting deferred")
    deferred.add_metric([], deferred_n)
    deferred_age = GaugeMetricFamily("laneway_deferred_oldest_age_seconds",
                                     "Age of the oldest deferred job (0 when none)")
    deferred_age.add_metric([], deferred_age_s or 0.0)
    route_inflight = GaugeMetricFamily("laneway_route_inflight",
                                       "Accepted, unfinished jobs of a route (admission bound)",
                                       labels=["route"])
    for route, n in zip(policy.routes, inflight, strict=True):
        route_inflight.add_metric([route.name], float(n or 0))

    busy = GaugeMetricFamily("laneway_worker_slots_busy", "Slots running a stage",
                             labels=["worker", "device", "engine"])
    total = GaugeMetricFamily("laneway_worker_slots", "Slots a worker has for an engine",
                              labels=["worker", "device", "engine"])
    heartbeat = GaugeMetricFamily("laneway_worker_heartbeat_age_seconds",
                                  "Seconds since the worker's last heartbeat",
                                  labels=["worker", "device"])
    for worker in await live_workers(redis, now_s=now_s):
        name, device = worker.get("name", ""), worker.get("device", "")
        heartbeat.add_metric([name, device], now_s - float(worker.get("heartbeat_at", 0)))
        for engine, slots in worker_slots(worker).items():
            busy.add_metric([name, device, engine], slots["busy"])
            total.add_metric([name, device, engine], slots["total"])

    return [
        depth, age, deferred, deferred_age, route_inflight, busy, total, heartbeat,
        *stage_histograms(histograms),
        _counter("laneway_admission", "Admission decisions per requested route and tier",
                 ["route", "tier", "outcome"], admission),
        _counter("laneway_jobs", "Jobs that ended, per route and final status",
                 ["route", "status"], outcomes),
        _counter("laneway_engine_spend", "Cost of stages run per engine (policy units)",
                 ["engine"], spend),
    ]


async def render_metrics(redis: aioredis.Redis, policy: Policy) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(await collect(redis, policy)))
    return generate_latest(registry)
