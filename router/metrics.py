"""``GET /metrics``: Prometheus text built from Redis at scrape time.

Workers push their figures through Redis (heartbeats with slot occupancy, the stage-time
histograms and counters of ``router/metrics_store.py``); the API reads them when scraped
and serves them, so every API process reports the same totals and workers need no port.
Stage times are stored in milliseconds with non-cumulative bucket counts; they are served
in seconds with cumulative buckets, as Prometheus expects. The per-version counters that
canary analysis reads are served for the versions the deployments name (stable, canary)::

    body = await render_metrics(redis, policy, deployments=snapshot.deployments)
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from controlplane import keys
from controlplane.deployments import Deployment
from controlplane.metrics_store import BUCKETS_MS
from controlplane.policy import Policy
from controlplane.rollouts import Phase, Rollout
from router.status import lane_stats, live_workers, worker_slots

_STAGE_HISTOGRAMS = {"run": ("laneway_stage_run_seconds", "Engine run time of a stage"),
                     "queue": ("laneway_stage_queue_seconds",
                               "Time a stage waited in its lane before a slot took it")}
#: fields of ``keys.version_stats`` served as counters per model and version
_VERSION_COUNTERS = {
    "stages": ("laneway_version_stages", "Stages that ended, per model version"),
    "errors": ("laneway_version_stage_errors", "Stages that failed, per model version"),
    "verdicts": ("laneway_version_verdicts", "Verifier verdicts, per model version"),
    "verdicts_passed": ("laneway_version_verdicts_passed",
                        "Verifier verdicts that passed, per model version"),
}


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


def version_counters(versions: list[tuple[str, str]],
                     rows: list[dict[str, str]]) -> list[Metric]:
    """Counter families from each ``(model, version)``'s ``keys.version_stats`` hash."""
    families = {field: CounterMetricFamily(name, doc, labels=["model", "version"])
                for field, (name, doc) in _VERSION_COUNTERS.items()}
    for (model, version), row in zip(versions, rows, strict=True):
        for field, family in families.items():
            family.add_metric([model, version], float(row.get(field, 0)))
    return list(families.values())


def rollout_gauges(raw: dict[bytes, bytes]) -> list[Metric]:
    """Each rollout's phase (1 for its phase, 0 for the others) and canary weight."""
    phase = GaugeMetricFamily("laneway_rollout_phase",
                              "Phase of a model's latest rollout (1: the phase it is in)",
                              labels=["model", "canary", "phase"])
    weight = GaugeMetricFamily("laneway_rollout_canary_weight_percent",
                               "Canary's traffic share while its rollout is active",
                               labels=["model", "canary"])
    for rollout in sorted((Rollout.model_validate_json(v) for v in raw.values()),
                          key=lambda r: r.model):
        for name in Phase:
            phase.add_metric([rollout.model, rollout.canary, name.value],
                             float(rollout.phase is name))
        weight.add_metric([rollout.model, rollout.canary], rollout.weight)
    return [phase, weight]


async def collect(redis: aioredis.Redis, policy: Policy, *,
                  deployments: Mapping[str, Deployment] | None = None) -> list[Metric]:
    now_s = time.time()
    pairs = [(engine, tier) for engine in policy.engines for tier in policy.tiers]
    versions = sorted({(d.model, version) for d in (deployments or {}).values()
                       for version in (d.stable, d.canary) if version})
    streams = [keys.engine_stream(e, t) for e, t in pairs] + [keys.deferred_stream()]
    stats = await lane_stats(redis, streams, now_ms=int(now_s * 1000))
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.stage_histograms())
        pipe.hgetall(keys.admission_outcomes())
        pipe.hgetall(keys.job_outcomes())
        pipe.hgetall(keys.engine_spend())
        pipe.hgetall(keys.rollouts())
        pipe.xlen(keys.dead_letter_stream())
        for route in policy.routes:
            pipe.get(keys.route_inflight(route.name))
        for model, version in versions:
            pipe.hgetall(keys.version_stats(model, version))
        replies = await pipe.execute()
    histograms, admission, outcomes, spend = (_decoded(r) for r in replies[:4])
    rollouts, dead_letter_n = replies[4:6]
    inflight = replies[6:6 + len(policy.routes)]
    version_rows = [_decoded(r) for r in replies[6 + len(policy.routes):]]

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
    dead_letter = GaugeMetricFamily("laneway_dead_letter_entries",
                                    "Entries in the dead-letter stream (trimmed near 10,000)")
    dead_letter.add_metric([], dead_letter_n)

    busy = GaugeMetricFamily("laneway_worker_slots_busy", "Slots running a stage",
                             labels=["worker", "device", "engine"])
    total = GaugeMetricFamily("laneway_worker_slots", "Slots a worker has for an engine",
                              labels=["worker", "device", "engine"])
    heartbeat = GaugeMetricFamily("laneway_worker_heartbeat_age_seconds",
                                  "Seconds since the worker's last heartbeat",
                                  labels=["worker", "device"])
    memory_used = GaugeMetricFamily("laneway_worker_memory_used_gb",
                                    "Device memory of the engines a worker holds loaded",
                                    labels=["worker", "device"])
    memory_total = GaugeMetricFamily("laneway_worker_memory_budget_gb",
                                     "A worker's device memory budget (absent: unlimited)",
                                     labels=["worker", "device"])
    loaded = GaugeMetricFamily("laneway_worker_engine_loaded",
                               "1 for each engine a worker holds loaded",
                               labels=["worker", "device", "engine"])
    cuda_allocated = GaugeMetricFamily(
        "laneway_worker_cuda_allocated_bytes",
        "torch.cuda.memory_allocated of a CUDA worker's device (no series on other devices)",
        labels=["worker", "device"])
    cuda_reserved = GaugeMetricFamily(
        "laneway_worker_cuda_reserved_bytes",
        "torch.cuda.memory_reserved of a CUDA worker's device (no series on other devices)",
        labels=["worker", "device"])
    unloads = CounterMetricFamily("laneway_worker_engine_unloads",
                                  "Engines unloaded for memory or idleness, since the "
                                  "worker started", labels=["worker", "device", "engine"])
    engine_slots = dict.fromkeys(policy.engines, 0)
    for worker in await live_workers(redis, now_s=now_s):
        name, device = worker.get("name", ""), worker.get("device", "")
        heartbeat.add_metric([name, device], now_s - float(worker.get("heartbeat_at", 0)))
        memory = json.loads(worker.get("memory") or "{}")
        memory_used.add_metric([name, device], float(memory.get("used_gb", 0)))
        if memory.get("total_gb") is not None:
            memory_total.add_metric([name, device], float(memory["total_gb"]))
        if memory.get("cuda") is not None:
            cuda_allocated.add_metric([name, device], memory["cuda"]["allocated_bytes"])
            cuda_reserved.add_metric([name, device], memory["cuda"]["reserved_bytes"])
        for engine in memory.get("loaded", []):
            loaded.add_metric([name, device, engine], 1)
        for engine, n in memory.get("unloads", {}).items():
            unloads.add_metric([name, device, engine], n)
        for engine, slots in worker_slots(worker).items():
            busy.add_metric([name, device, engine], slots["busy"])
            total.add_metric([name, device, engine], slots["total"])
            engine_slots[engine] = engine_slots.get(engine, 0) + slots["total"]
    live_slots = GaugeMetricFamily("laneway_engine_live_slots",
                                   "Slots of live workers per engine (0: no live worker)",
                                   labels=["engine"])
    for engine, n in sorted(engine_slots.items()):
        live_slots.add_metric([engine], n)

    return [
        depth, age, deferred, deferred_age, route_inflight, dead_letter, busy, total,
        heartbeat, live_slots, memory_used, memory_total, cuda_allocated, cuda_reserved,
        loaded, unloads,
        *stage_histograms(histograms),
        *version_counters(versions, version_rows), *rollout_gauges(rollouts),
        _counter("laneway_admission", "Admission decisions per requested route and tier",
                 ["route", "tier", "outcome"], admission),
        _counter("laneway_jobs", "Jobs that ended, per route and final status",
                 ["route", "status"], outcomes),
        _counter("laneway_engine_spend", "Cost of stages run per engine (policy units)",
                 ["engine"], spend),
    ]


async def render_metrics(redis: aioredis.Redis, policy: Policy, *,
                         deployments: Mapping[str, Deployment] | None = None) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(await collect(redis, policy, deployments=deployments)))
    return generate_latest(registry)
