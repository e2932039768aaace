"""Acceptance 8: ``/metrics`` and ``/v1/status`` follow the load: lane depth, slots, outcomes."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from controlplane import keys
from controlplane.deployments import Deployment
from controlplane.metrics_store import record_stage_times
from controlplane.policy_loader import load_policy
from controlplane.rollouts import Phase, Rollout
from router.metrics import render_metrics
from tests.conftest import POLICIES
from tests.router.conftest import Router, RouterFactory

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sample's value; labels not given match anything (one sample must match)."""
    found = [v for (n, ls), v in samples.items()
             if n == name and set(labels.items()) <= ls]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


async def scrape(router: Router) -> Samples:
    response = await router.http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


async def scrape_until(router: Router, check: Callable[[Samples], bool], *,
                       timeout_s: float = 30) -> Samples:
    deadline = time.monotonic() + timeout_s
    while True:
        samples = await scrape(router)
        if check(samples):
            return samples
        assert time.monotonic() < deadline, "metrics never reached the expected state"
        await asyncio.sleep(0.1)


LANE = {"engine": "sim-draft", "tier": "standard"}


async def test_depth_slots_and_outcomes_move_with_the_load(make_router: RouterFactory) -> None:
    async with make_router(load_policy(POLICIES / "sim_lane.yaml")) as router:
        jobs = [(await router.submit()).json() for _ in range(3)]
        samples = await scrape(router)
        assert value(samples, "laneway_lane_depth", **LANE) == 3
        assert value(samples, "laneway_lane_oldest_age_seconds", **LANE) >= 0
        assert value(samples, "laneway_route_inflight", route="sim_draft") == 3
        assert value(samples, "laneway_admission_total", route="sim_draft", tier="standard",
                     outcome="accepted") == 3
        assert value(samples, "laneway_worker_slots", engine="sim-draft") is None
        status = (await router.http.get("/v1/status")).json()
        lane = status["lanes"][0]
        assert (lane["engine"], lane["tier"], lane["depth"]) == ("sim-draft", "standard", 3)
        assert status["lanes"][0]["oldest_age_s"] >= 0 and status["workers"] == []
        assert status["rollouts"] == [] and status["deployments"] == {}  # a model-less policy

        await router.start_worker("sim-draft")
        busy = await scrape_until(router, lambda s: value(
            s, "laneway_worker_slots_busy", engine="sim-draft") == 1)
        assert value(busy, "laneway_worker_slots", engine="sim-draft") == 1
        assert value(busy, "laneway_lane_depth", **LANE) >= 1
        status = (await router.http.get("/v1/status")).json()
        assert status["workers"][0]["slots"]["sim-draft"]["total"] == 1
        assert status["workers"][0]["last_heartbeat_s"] >= 0

        for job in jobs:
            await router.wait_job(job["id"], "completed")
        idle = await scrape_until(router, lambda s: value(
            s, "laneway_worker_slots_busy", engine="sim-draft") == 0)
        assert value(idle, "laneway_lane_depth", **LANE) == 0
        assert value(idle, "laneway_route_inflight", route="sim_draft") == 0
        assert value(idle, "laneway_jobs_total", route="sim_draft", status="completed") == 3
        assert value(idle, "laneway_stage_run_seconds_count", engine="sim-draft") == 3
        assert value(idle, "laneway_stage_queue_seconds_count", engine="sim-draft") == 3


async def test_stage_histograms_are_served_cumulative_in_seconds(redis_url: str) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for run_ms in (30, 700, 700, 200_000):
                record_stage_times(pipe, engine="turbo", version="3", queued_ms=None,
                                   run_ms=run_ms)
            await pipe.execute()
        await redis.hincrby(keys.admission_outcomes(), "fast_draft|batch|deferred", 2)
        policy = load_policy(POLICIES / "admission.yaml")
        samples = parse((await render_metrics(redis, policy)).decode())
    finally:
        await redis.aclose()
    labels = {"engine": "turbo", "version": "3"}
    buckets = {le: value(samples, "laneway_stage_run_seconds_bucket", le=le, **labels)
               for le in ("0.025", "0.05", "0.5", "1.0", "120.0", "+Inf")}
    assert buckets == {"0.025": 0, "0.05": 1, "0.5": 1, "1.0": 3, "120.0": 3, "+Inf": 4}
    assert value(samples, "laneway_stage_run_seconds_count", **labels) == 4
    assert value(samples, "laneway_stage_run_seconds_sum", **labels) == 201.43
    assert value(samples, "laneway_stage_queue_seconds_count", **labels) is None
    assert value(samples, "laneway_admission_total", route="fast_draft", tier="batch",
                 outcome="deferred") == 2


async def test_live_slots_dead_letters_versions_and_rollouts(redis_url: str) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    now_s = time.time()
    try:
        for name, engines, seen_s in (("gpu0", ["sim-draft"], now_s),
                                      ("gpu1", ["sim-draft", "turbo"], now_s),
                                      ("dead", ["sim-draft"], now_s - 600)):
            await redis.sadd(keys.workers(), name)
            await redis.hset(keys.worker_heartbeat(name), mapping={
                "name": name, "device": "cuda:0", "heartbeat_at": f"{seen_s:.3f}",
                "slots": json.dumps({e: {"busy": 0, "total": 2} for e in engines})})
        for n in range(3):
            await redis.xadd(keys.dead_letter_stream(), {"job": f"j{n}"})
        await redis.hset(keys.version_stats("sdxl", "2"), mapping={
            "stages": 40, "errors": 3, "verdicts": 10, "verdicts_passed": 9})
        await redis.hset(keys.version_stats("sdxl", "1"), mapping={"stages": 5})
        await redis.hset(keys.version_stats("sdxl", "0"), mapping={"stages": 7})  # retired
        stamp = "2026-01-01T00:00:00Z"
        rollout = Rollout(model="sdxl", stable="1", canary="2", phase=Phase.aborted,
                          started_at=stamp, updated_at=stamp, last_step_at_s=now_s)
        await redis.hset(keys.rollouts(), "sdxl", rollout.model_dump_json())
        deployments = {"sdxl": Deployment(model="sdxl", stable="1", canary="2",
                                          canary_weight=10)}
        policy = load_policy(POLICIES / "sim_lane.yaml")
        samples = parse((await render_metrics(redis, policy,
                                              deployments=deployments)).decode())
        empty = parse((await render_metrics(redis, policy)).decode())
    finally:
        await redis.aclose()
    assert value(samples, "laneway_engine_live_slots", engine="sim-draft") == 4
    assert value(samples, "laneway_engine_live_slots", engine="turbo") == 2
    assert value(samples, "laneway_dead_letter_entries") == 3
    canary = {"model": "sdxl", "version": "2"}
    assert value(samples, "laneway_version_stages_total", **canary) == 40
    assert value(samples, "laneway_version_stage_errors_total", **canary) == 3
    assert value(samples, "laneway_version_verdicts_total", **canary) == 10
    assert value(samples, "laneway_version_verdicts_passed_total", **canary) == 9
    stable = {"model": "sdxl", "version": "1"}
    assert value(samples, "laneway_version_stages_total", **stable) == 5
    assert value(samples, "laneway_version_stage_errors_total", **stable) == 0
    assert value(samples, "laneway_version_stages_total", version="0") is None
    phases = {p: value(samples, "laneway_rollout_phase", model="sdxl", canary="2", phase=p)
              for p in Phase}
    assert phases == {"progressing": 0, "paused": 0, "promoted": 0, "aborted": 1}
    assert value(samples, "laneway_rollout_canary_weight_percent", model="sdxl") == 0
    assert value(empty, "laneway_version_stages_total") is None  # no deployments given


async def test_cuda_memory_figures_show_only_when_the_heartbeat_carries_them(
        make_router: RouterFactory) -> None:
    """This machine has no GPU: the CPU worker's real heartbeat carries ``cuda: null``, and
    the figures a CUDA worker's heartbeat would add to it are the test's own."""
    async with make_router(load_policy(POLICIES / "sim_lane.yaml")) as router:
        worker = await router.start_worker("sim-draft")
        await scrape_until(router, lambda s: value(
            s, "laneway_worker_slots", worker=worker.name) == 1)
        await worker._heartbeat()
        (seen,) = (await router.http.get("/v1/status")).json()["workers"]
        assert seen["device"] == "cpu" and seen["memory"]["cuda"] is None
        samples = await scrape(router)
        assert value(samples, "laneway_worker_cuda_allocated_bytes") is None
        assert value(samples, "laneway_worker_cuda_reserved_bytes") is None

        heartbeat = await router.redis.hgetall(keys.worker_heartbeat(worker.name))
        await router.stop_workers()  # no later heartbeat of its own overwrites the one below
        memory = json.loads(heartbeat[b"memory"])
        cuda = {"allocated_bytes": 3 * 2**30, "reserved_bytes": 4 * 2**30}
        await router.redis.sadd(keys.workers(), worker.name)
        await router.redis.hset(keys.worker_heartbeat(worker.name), mapping={
            **heartbeat, b"memory": json.dumps(memory | {"cuda": cuda}),
            b"heartbeat_at": f"{time.time():.3f}"})
        (seen,) = (await router.http.get("/v1/status")).json()["workers"]
        assert seen["memory"]["cuda"] == cuda
        samples = await scrape(router)
    labels = {"worker": worker.name, "device": "cpu"}
    assert value(samples, "laneway_worker_cuda_allocated_bytes", **labels) == 3 * 2**30
    assert value(samples, "laneway_worker_cuda_reserved_bytes", **labels) == 4 * 2**30
