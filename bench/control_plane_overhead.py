"""Control-plane overhead: Laneway beside the floor (``bench/floor.py``), in one run.

The floor is the least a request path like Laneway's can do (an HTTP POST that XADDs to a
Valkey stream and awaits a pub/sub completion; a worker that XREADGROUP BLOCKs, sleeps and
publishes), on the same server binary, framework, client and machine. Every engine is
simulated with fixed service times (``bench/policies/overhead.yaml``); the floor's worker
sleeps the same times. Three workloads, each run on both stacks in every repeat:

- sequential drafts: one client, ``wait`` jobs one after another on a 20 ms lane; the
  overhead is Laneway's end-to-end latency percentile minus the floor's.
- throughput: accepted submits/s (``wait: 0``, no worker consuming) from 32 clients, for
  1 and 2 API processes (``laneway serve --api-workers N`` vs ``uvicorn --workers N``).
  The API path alone, because that is what ``--api-workers`` scales; the workers' side is
  in the other two workloads.
- batched lane: jobs queued first, then one worker; jobs/s from the first stage start to
  the last finish with batches of up to 8 within 50 ms vs one at a time (50 ms per call
  either way); Laneway's gain as a share of the floor's.

Figures are medians over ``--repeats`` of each repeat's figures (differences and ratios
are taken within a repeat). Each job's ``queued_ms`` (enqueue → start) and ``run_ms``
(engine) split its latency; the rest is API handling, the worker's start and commit and the
wake-up; each batched lane's time per engine call beyond the call itself (``beyond_call_ms``)
does the same for batches, so a shortfall says where the time goes. ``--profile`` records py-spy
flame graphs of Laneway's API and sim worker during the sequential drafts, when py-spy is
installed.

    python bench/control_plane_overhead.py [--jobs 300] [--submits 6000] [--batch-jobs 240]
        [--repeats 3] [--profile] [--out PATH]

``--out PATH`` writes the JSON to PATH only (trial runs): no results file, no RESULTS.md row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BENCH, write_result  # noqa: E402
from bench.floor import GROUP, STREAM, FloorApi, FloorWorker, WorkerOptions  # noqa: E402
from bench.load_clients import (  # noqa: E402
    accepted_submits,
    phase_figures,
    preload,
    sequential_jobs,
)
from bench.profiling import PySpy  # noqa: E402
from controlplane.policy import EngineSpec  # noqa: E402
from controlplane.policy_loader import load_policy  # noqa: E402
from laneway.embedded_redis import EmbeddedRedis  # noqa: E402
from tests.service import Service, WorkerProcess, free_port  # noqa: E402

POLICY = BENCH / "policies" / "overhead.yaml"
COMMAND = "python bench/control_plane_overhead.py"
DRAFT = {"prompt": "a fox", "intent": "draft"}
#: the batched workload's lanes: tier → (engine, request body)
BATCH_LANES = {"one": "sim-one", "batch": "sim-batch"}
TARGETS = {"overhead_p50_ms": 2.0, "overhead_p99_ms": 10.0, "throughput_ratio_2_api": 0.8,
           "batched_gain_share": 0.9}
#: a --no-workers API refuses a lane nobody serves after this grace; the bench serves later
NO_WORKER_ENV = {"LANEWAY_NO_ENGINE_GRACE_S": "3600"}
FINAL = ("completed", "failed", "cancelled")
DRAIN_TIMEOUT_S = 600.0


def sim_engine(name: str) -> EngineSpec:
    spec = load_policy(POLICY).engines[name]
    if spec.sim is None or not (spec.sim.dist == "fixed" or spec.sim.jitter == 0):
        raise ValueError(f"{POLICY}: engine {name} needs a fixed sim service time "
                         f"(the floor sleeps the same), got {spec.sim}")
    return spec


def floor_options(spec: EngineSpec) -> WorkerOptions:
    assert spec.sim is not None
    return WorkerOptions(service_ms=spec.sim.mean_ms, per_item_ms=spec.sim.per_item_ms,
                         max_batch=spec.max_batch, max_wait_ms=spec.max_wait_ms)


# -- the stacks -------------------------------------------------------------------------


@contextmanager
def laneway(home: Path, *, workers: bool, api_workers: int = 1) -> Iterator[Service]:
    args = ["--api-workers", str(api_workers)] + ([] if workers else ["--no-workers"])
    service = Service(home=home, registry=home.parent / "registry", policy=POLICY,
                      extra_args=args, extra_env={} if workers else NO_WORKER_ENV,
                      ready_path="/readyz" if workers else "/healthz",
                      wait_for_worker=workers)
    service.start()
    try:
        yield service
    finally:
        service.stop()


@contextmanager
def floor(home: Path, *, processes: int = 1) -> Iterator[tuple[str, FloorApi]]:
    """The floor's Valkey server and API; yields the server's URL and the API."""
    server = EmbeddedRedis(home / "valkey", die_with_parent=True)
    url = server.start()
    api = FloorApi(url, free_port(), processes, log_path=home / "api.log")
    try:
        api.start()
        yield url, api
    finally:
        api.stop()
        server.stop()


@contextmanager
def floor_worker(url: str, options: WorkerOptions) -> Iterator[FloorWorker]:
    worker = FloorWorker(url, options).start()
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 60
        while not _consumers(client):  # it has made its group and blocks on the stream
            if time.monotonic() > deadline:
                raise RuntimeError("the floor worker did not start reading in 60 s")
            time.sleep(0.05)
        yield worker
    finally:
        worker.stop()


def _consumers(client: redis.Redis) -> list[Any]:
    try:
        return list(client.xinfo_consumers(STREAM, GROUP))
    except redis.ResponseError:  # no stream or group yet
        return []


# -- the workloads, one repeat each -----------------------------------------------------


def sequential(tmp: Path, jobs: int, profiler: PySpy | None) -> dict[str, Any]:
    with floor(tmp / "floor-seq") as (url, api), floor_worker(url, floor_options(
            sim_engine("draft"))):
        floor_jobs = sequential_jobs(api.url, jobs, DRAFT)
    with laneway(tmp / "lw-seq", workers=True) as service:
        if profiler is not None:
            profiler.attach(service)
        try:
            laneway_jobs = sequential_jobs(service.url, jobs, DRAFT)
        finally:
            if profiler is not None:
                profiler.detach()
    lw, fl = phase_figures(laneway_jobs), phase_figures(floor_jobs)
    return {"laneway": lw, "floor": fl,
            "overhead_p50_ms": round(lw["e2e_p50_ms"] - fl["e2e_p50_ms"], 2),
            "overhead_p99_ms": round(lw["e2e_p99_ms"] - fl["e2e_p99_ms"], 2),
            "gap_p50_ms": {phase: round(lw[f"{phase}_p50_ms"] - fl[f"{phase}_p50_ms"], 2)
                           for phase in ("queued", "run", "rest")}}


def throughput(tmp: Path, submits: int) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for n in (1, 2):
        with floor(tmp / f"floor-thr{n}", processes=n) as (_url, api):
            figures[f"floor_{n}_api"] = accepted_submits(api.url, submits, DRAFT)
        with laneway(tmp / f"lw-thr{n}", workers=False, api_workers=n) as service:
            figures[f"laneway_{n}_api"] = accepted_submits(service.url, submits, DRAFT)
        figures[f"ratio_{n}_api"] = round(figures[f"laneway_{n}_api"]["submits_per_s"]
                                          / figures[f"floor_{n}_api"]["submits_per_s"], 3)
    return figures


def _floor_lane(home: Path, options: WorkerOptions, jobs: int) -> dict[str, float]:
    times_file = home / "batches.txt"
    with floor(home) as (url, api):
        preload(api.url, jobs, {"prompt": "a crane", "intent": "final"})
        with floor_worker(url, replace(options, times_file=times_file)):
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while sum(int(line.split()[2]) for line in _lines(times_file)) < jobs:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the floor's lane did not finish {jobs} jobs")
                time.sleep(0.1)
    batches = [line.split() for line in _lines(times_file)]
    span_s = (max(float(b[1]) for b in batches) - min(float(b[0]) for b in batches)) / 1000
    sizes = [int(b[2]) for b in batches]
    return {"jobs_per_s": round(jobs / span_s, 2),
            "mean_batch_size": round(statistics.mean(sizes), 2)}


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _laneway_lane(service: Service, tier: str, jobs: int) -> dict[str, float]:
    ids = preload(service.url, jobs, {"prompt": "a crane", "intent": "final", "tier": tier})
    worker = WorkerProcess(service, BATCH_LANES[tier], extra_env={"LANEWAY_DEVICE": "sim"})
    worker.start()
    try:
        done = _drained(service.url, ids)
    finally:
        worker.stop()
    stages = [job["stages"][0] for job in done if job["status"] == "completed"]
    if len(stages) != jobs:
        raise RuntimeError(f"{jobs - len(stages)} of {jobs} batched-lane jobs did not complete")
    start = min(datetime.fromisoformat(s["started_at"]) for s in stages)
    end = max(datetime.fromisoformat(s["finished_at"]) for s in stages)
    return {"jobs_per_s": round(jobs / (end - start).total_seconds(), 2),
            "mean_batch_size": round(statistics.mean(s["batch_size"] for s in stages), 2)}


def _drained(url: str, ids: list[str]) -> list[dict[str, Any]]:
    """Every job once ended; polls one job at a time (the last queued first) so the polling
    costs the API little while the worker runs."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    done: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=url, timeout=30) as client:
        for job_id in [ids[-1], *ids]:
            while job_id not in done:
                job = client.get(f"/v1/jobs/{job_id}").json()
                if job["status"] in FINAL:
                    done[job_id] = job
                elif time.monotonic() > deadline:
                    raise RuntimeError(f"job {job_id} still {job['status']}")
                else:
                    time.sleep(0.1)
    return [done[job_id] for job_id in ids]


def _call_ms(spec: EngineSpec, lane: dict[str, float]) -> float:
    """The simulated engine call's time at the lane's mean batch size."""
    assert spec.sim is not None
    return spec.sim.mean_ms + spec.sim.per_item_ms * (lane["mean_batch_size"] - 1)


def batched(tmp: Path, jobs: int) -> dict[str, Any]:
    figures: dict[str, Any] = {"floor": {}, "laneway": {}}
    for tier, engine in BATCH_LANES.items():
        figures["floor"][tier] = _floor_lane(tmp / f"floor-{tier}",
                                             floor_options(sim_engine(engine)), jobs)
    with laneway(tmp / "lw-batch", workers=False) as service:
        for tier in BATCH_LANES:
            figures["laneway"][tier] = _laneway_lane(service, tier, jobs)
    for stack in ("floor", "laneway"):
        lanes = figures[stack]
        lanes["gain"] = round(lanes["batch"]["jobs_per_s"] / lanes["one"]["jobs_per_s"], 3)
        for tier, engine in BATCH_LANES.items():  # where a batch's time goes
            lane, call_ms = lanes[tier], _call_ms(sim_engine(engine), lanes[tier])
            lane["cycle_ms"] = round(1000 * lane["mean_batch_size"] / lane["jobs_per_s"], 2)
            lane["beyond_call_ms"] = round(lane["cycle_ms"] - call_ms, 2)
    figures["gain_share"] = round(figures["laneway"]["gain"] / figures["floor"]["gain"], 3)
    return figures


# -- figures ----------------------------------------------------------------------------


def medians(repeats: list[Any]) -> Any:
    """The per-leaf median of equally shaped figures (ints stay ints when all agree)."""
    first = repeats[0]
    if isinstance(first, dict):
        return {key: medians([r[key] for r in repeats]) for key in first}
    if isinstance(first, bool) or not isinstance(first, int | float):
        return first
    value = statistics.median(repeats)
    return round(value, 3) if isinstance(value, float) else value


def verdicts(figures: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target with its figure, whether it is met, and the margin (positive: to spare)."""
    seq, thr, bat = figures["sequential"], figures["throughput"], figures["batched"]
    upper = {"overhead_p50_ms": seq["overhead_p50_ms"], "overhead_p99_ms": seq["overhead_p99_ms"]}
    lower = {"throughput_ratio_2_api": thr["ratio_2_api"], "batched_gain_share": bat["gain_share"]}
    found = {name: {"value": value, "target": TARGETS[name], "met": value <= TARGETS[name],
                    "margin": round(TARGETS[name] - value, 3)} for name, value in upper.items()}
    found.update({name: {"value": value, "target": TARGETS[name], "met": value >= TARGETS[name],
                         "margin": round(value - TARGETS[name], 3)}
                  for name, value in lower.items()})
    return found


def _state(verdict: dict[str, Any], unit: str = "") -> str:
    margin = abs(verdict["margin"])
    return (f"met by {margin:g}{unit}" if verdict["met"] else f"MISSED by {margin:g}{unit}")


def summary(figures: dict[str, Any], repeats: int) -> str:
    seq, thr, bat, v = (figures["sequential"], figures["throughput"], figures["batched"],
                        figures["verdicts"])
    gap = seq["gap_p50_ms"]
    text = (
        f"above the floor: draft p50 +{seq['overhead_p50_ms']} ms (≤ 2: "
        f"{_state(v['overhead_p50_ms'], ' ms')}), p99 +{seq['overhead_p99_ms']} ms (≤ 10: "
        f"{_state(v['overhead_p99_ms'], ' ms')}); submits/s at 32 clients, 1/2 API processes: "
        f"floor {thr['floor_1_api']['submits_per_s']}/{thr['floor_2_api']['submits_per_s']}, "
        f"Laneway {thr['laneway_1_api']['submits_per_s']}/"
        f"{thr['laneway_2_api']['submits_per_s']} = {thr['ratio_1_api']}x/"
        f"{thr['ratio_2_api']}x the floor (≥ 0.8x with 2: "
        f"{_state(v['throughput_ratio_2_api'], 'x')}); batched gain floor "
        f"{bat['floor']['gain']}x, Laneway {bat['laneway']['gain']}x = "
        f"{bat['gain_share']:.0%} of the floor's (≥ 90 %: {_state(v['batched_gain_share'])})")
    if not all(verdict["met"] for verdict in v.values()):
        text += (f"; where a draft's time above the floor goes (p50): enqueue→start "
                 f"{gap['queued']:+g} ms, engine {gap['run']:+g} ms, API + start/commit + "
                 f"wake-up {gap['rest']:+g} ms")
    if not v["batched_gain_share"]["met"]:
        lw, fl = bat["laneway"], bat["floor"]
        text += (f"; per engine call beyond its own time: Laneway {lw['batch']['beyond_call_ms']}"
                 f" ms a batch of {lw['batch']['mean_batch_size']:g}, "
                 f"{lw['one']['beyond_call_ms']} ms a single job; the floor "
                 f"{fl['batch']['beyond_call_ms']} / {fl['one']['beyond_call_ms']} ms")
    return text + f"; medians of {repeats} repeats"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=300, help="sequential drafts per stack")
    parser.add_argument("--submits", type=int, default=6000, help="submits per throughput run")
    parser.add_argument("--batch-jobs", type=int, default=240, help="jobs per batched run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true",
                        help="py-spy flame graphs of Laneway's API and sim worker")
    parser.add_argument("--out", type=Path,
                        help="write the JSON here only (no results file, no RESULTS.md row)")
    args = parser.parse_args()
    profile_dir = (args.out.parent if args.out else BENCH / "results") / "profiles"
    profiler = PySpy.find(profile_dir) if args.profile else None
    runs = []
    with tempfile.TemporaryDirectory(prefix="lw-bench-") as tmp:
        for r in range(args.repeats):
            root = Path(tmp) / f"r{r}"
            runs.append({"sequential": sequential(root, args.jobs, profiler),
                         "throughput": throughput(root, args.submits),
                         "batched": batched(root, args.batch_jobs)})
            print(f"repeat {r + 1}/{args.repeats}: {json.dumps(runs[-1])}", flush=True)
    draft, batch = sim_engine("draft"), sim_engine("sim-batch")
    assert draft.sim is not None and batch.sim is not None
    figures: dict[str, Any] = {
        "repeats": args.repeats, "jobs": args.jobs, "submits": args.submits,
        "batch_jobs": args.batch_jobs,
        "service": {"draft_ms": draft.sim.mean_ms, "batch_call_ms": batch.sim.mean_ms,
                    "per_item_ms": batch.sim.per_item_ms, "max_batch": batch.max_batch,
                    "max_wait_ms": batch.max_wait_ms},
        "throughput_measure": "accepted (202) submits/s, wait 0, no worker consuming",
        **medians(runs), "targets": TARGETS, "per_repeat": runs,
        "profile": (profiler.report() if profiler else "not requested; phases only"),
    }
    figures["verdicts"] = verdicts(figures)
    line = summary(figures, args.repeats)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"name": "control_plane_overhead", "command": COMMAND,
                                        **figures, "summary": line}, indent=2) + "\n")
    else:
        write_result("control_plane_overhead", COMMAND, figures, line)
    print(line)


if __name__ == "__main__":
    main()
