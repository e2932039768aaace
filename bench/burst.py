"""Burst after the marketplace outage: intent routing against one FIFO lane.

Steady Poisson load, then a 10x spike, then steady again; 80 % drafts, 20 % finals. The
devices are SIMULATED (engine kind ``sim``, for capacity planning and benchmarks only): real
``laneway worker`` processes on the real queue that hold a slot for a drawn service time
(draft ~0.2 s, final base ~2.5 s, upscale ~0.3 s alone / ~0.4 s per batch of 8). Both
policies run on the same 14 devices with the same routes and admission bounds; only the
lanes differ (``bench/policies/burst_routing.yaml`` and ``burst_fifo.yaml``)::

    python bench/burst.py            # 60 s steady, 60 s spike, 30 s steady, per policy
    python bench/burst.py --quick    # 8 s / 6 s / 6 s smoke run; writes no result

Latency is the job record's ``completed_at - created_at`` (server clock); utilisation is
busy slot time (union of stage ``started_at..finished_at`` per device and engine) over
slot time in the saturated window (the spike after its first seconds); a lost job is one
answered 202 that has no final status after the drain.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.burst_report import analyse, summary_line  # noqa: E402
from bench.common import BENCH, write_result  # noqa: E402
from controlplane import keys
from laneway.child_process import stop_process
from laneway.embedded_redis import EmbeddedRedis
from tests.service import Service  # noqa: E402

#: engine name -> number of devices serving it; the same 14 devices for both policies
DEVICES = {
    "routing": {"draft": 10, "base": 3, "upscale": 1},
    "fifo": {"gpu": 14},
}
POLICIES = {"routing": BENCH / "policies" / "burst_routing.yaml",
            "fifo": BENCH / "policies" / "burst_fifo.yaml"}
DRAFT_SERVICE_S = 0.2
WORKER_STOP_S = 30.0


@dataclass(frozen=True)
class Scenario:
    steady_rps: float = 3.0
    spike_factor: float = 10.0
    before_s: float = 60.0
    spike_s: float = 60.0
    after_s: float = 30.0
    drain_s: float = 120.0
    settle_s: float = 5.0
    draft_share: float = 0.8
    seed: int = 7

    @property
    def spike_start_s(self) -> float:
        return self.before_s

    @property
    def spike_end_s(self) -> float:
        return self.before_s + self.spike_s

    @property
    def load_s(self) -> float:
        return self.before_s + self.spike_s + self.after_s


QUICK = Scenario(before_s=8, spike_s=6, after_s=6, drain_s=40, settle_s=1)


@dataclass(frozen=True)
class Arrival:
    at_s: float
    intent: str
    seed: int


@dataclass
class Submission:
    arrival: Arrival
    status_code: int = 0
    job_id: str | None = None
    retry_after_s: int | None = None
    degraded_from: str | None = None
    answered_s: float = 0.0
    error: str | None = None


def arrivals(scenario: Scenario) -> list[Arrival]:
    """Open-loop Poisson arrivals, piecewise constant rate; reproducible from the seed."""
    rng = random.Random(scenario.seed)
    out: list[Arrival] = []
    phases = [(0.0, scenario.spike_start_s, scenario.steady_rps),
              (scenario.spike_start_s, scenario.spike_end_s,
               scenario.steady_rps * scenario.spike_factor),
              (scenario.spike_end_s, scenario.load_s, scenario.steady_rps)]
    for start_s, end_s, rate in phases:
        t = start_s + rng.expovariate(rate)
        while t < end_s:
            intent = "draft" if rng.random() < scenario.draft_share else "final"
            out.append(Arrival(at_s=t, intent=intent, seed=rng.randrange(2**31)))
            t += rng.expovariate(rate)
    return out


# -- the cluster: bundled server, API, simulated devices ------------------------------------

class Cluster:
    """A bundled server, ``laneway serve --no-workers`` and one worker process per device."""

    def __init__(self, home: Path, policy: Path, devices: dict[str, int]) -> None:
        self.home = home
        self.devices = devices
        self.server = EmbeddedRedis(home / "valkey")
        self.service = Service(home=home, registry=home / "registry", policy=policy,
                               extra_args=["--no-workers"], ready_path="/healthz")
        self.workers: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        (self.home / "registry").mkdir(parents=True, exist_ok=True)
        url = self.server.start()
        self.service.extra_args += ["--redis-url", url]
        self.service.start()
        env = {**self.service.env(), "LANEWAY_REDIS_URL": url}
        index = 0
        for engine, count in self.devices.items():
            for _ in range(count):
                log = (self.home / f"worker-sim{index}.log").open("ab")
                self.workers.append(subprocess.Popen(
                    [sys.executable, "-m", "laneway.cli", "worker", "--engines", engine,
                     "--device", f"sim{index}"], env=env, stdout=log, stderr=subprocess.STDOUT))
                index += 1
        self._wait_for_workers(url, index)

    def _wait_for_workers(self, url: str, count: int, timeout_s: float = 180) -> None:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + timeout_s
        try:
            while client.scard(keys.workers()) < count:
                if time.monotonic() > deadline:
                    log = (self.home / "worker-sim0.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"only {client.scard(keys.workers())} of {count} "
                                       f"workers registered in {timeout_s} s; sim0:\n{log}")
                dead = [i for i, w in enumerate(self.workers) if w.poll() is not None]
                if dead:
                    raise RuntimeError(f"worker sim{dead[0]} exited at start; see "
                                       f"{self.home / f'worker-sim{dead[0]}.log'}")
                time.sleep(0.5)
        finally:
            client.close()
        time.sleep(2.0)  # slot loops start right after the first heartbeat

    def stop(self) -> None:
        for worker in self.workers:
            stop_process(worker, timeout_s=WORKER_STOP_S)
        if self.service.process is not None:
            self.service.stop()
        self.server.stop()


# -- load and collection ----------------------------------------------------------------------

async def submit_all(url: str, schedule: list[Arrival]) -> tuple[float, list[Submission]]:
    """Submit every arrival at its time (``wait: 0``); return the start epoch and answers."""
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    out = [Submission(a) for a in schedule]
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def one(sub: Submission) -> None:
            body = {"prompt": f"listing photo {sub.arrival.seed}", "intent": sub.arrival.intent,
                    "seed": sub.arrival.seed, "wait": 0}
            try:
                response = await client.post("/v1/images", json=body)
            except httpx.HTTPError as exc:
                sub.error = f"{type(exc).__name__}: {exc}"
                return
            finally:
                sub.answered_s = loop.time() - started
            sub.status_code = response.status_code
            if response.status_code in (200, 202):
                job = response.json()
                sub.job_id, sub.degraded_from = job["id"], job.get("degraded_from")
            elif response.status_code == 429:
                sub.retry_after_s = int(response.headers.get("Retry-After", "0"))
            else:
                sub.error = response.text[:300]

        loop = asyncio.get_running_loop()
        started, t0 = loop.time(), time.time()
        tasks = []
        for sub in out:
            delay_s = sub.arrival.at_s - (loop.time() - started)
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            tasks.append(asyncio.create_task(one(sub)))
        await asyncio.gather(*tasks)
    return t0, out


async def collect(url: str, job_ids: list[str], drain_s: float) -> dict[str, dict[str, Any]]:
    """Fetch every job until all are final or ``drain_s`` has passed; return the last seen."""
    jobs: dict[str, dict[str, Any]] = {}
    pending = list(job_ids)
    deadline = time.monotonic() + drain_s
    gate = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        async def fetch(job_id: str) -> None:
            async with gate:
                response = await client.get(f"/v1/jobs/{job_id}")
            if response.status_code == 200:
                jobs[job_id] = response.json()

        while True:
            await asyncio.gather(*(fetch(j) for j in pending))
            pending = [j for j in pending if jobs.get(j, {}).get("status") not in
                       ("completed", "failed", "cancelled")]
            if not pending or time.monotonic() > deadline:
                return jobs
            await asyncio.sleep(2.0)


def run_policy(name: str, scenario: Scenario, home: Path) -> dict[str, Any]:
    cluster = Cluster(home, POLICIES[name], DEVICES[name])
    print(f"[{name}] starting {sum(DEVICES[name].values())} simulated devices", flush=True)
    cluster.start()
    try:
        print(f"[{name}] load for {scenario.load_s:.0f} s", flush=True)
        t0, submissions = asyncio.run(submit_all(cluster.service.url, arrivals(scenario)))
        accepted = [s.job_id for s in submissions if s.job_id]
        print(f"[{name}] {len(accepted)} accepted; draining up to {scenario.drain_s:.0f} s",
              flush=True)
        jobs = asyncio.run(collect(cluster.service.url, accepted, scenario.drain_s))
    finally:
        cluster.stop()
    figures = analyse(scenario, t0, submissions, jobs, DEVICES[name], DRAFT_SERVICE_S)
    print(f"[{name}] {summary_line(name, figures)}", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~20 s smoke run per policy; "
                        "prints figures, writes no result")
    parser.add_argument("--policies", default="routing,fifo")
    args = parser.parse_args()
    scenario = QUICK if args.quick else Scenario()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lw-burst-") as tmp:
        for name in args.policies.split(","):
            results[name] = run_policy(name, scenario, Path(tmp) / name)
    if args.quick or set(results) != set(POLICIES):
        print(json.dumps(results, indent=1))
        return
    figures = {"scenario": scenario.__dict__, "devices": DEVICES,
               "draft_service_s": DRAFT_SERVICE_S, "policies": results,
               "targets": targets(results)}
    summary = "; ".join(summary_line(name, results[name]) for name in POLICIES)
    write_result("burst", "python bench/burst.py", figures, summary)


def targets(results: dict[str, Any]) -> dict[str, Any]:
    routing, fifo = results["routing"], results["fifo"]
    draft_x = routing["spike"]["draft"]["p95_x_service"]
    fifo_x = fifo["spike"]["draft"]["p95_x_service"]
    return {
        "draft_p95_spike_x_service": {"routing": draft_x, "fifo": fifo_x,
                                      "target": "routing <= 1.5, fifo >= 5",
                                      "met": draft_x <= 1.5 and fifo_x >= 5},
        "saturated_utilisation": {name: r["utilisation"]["saturated"]
                                  for name, r in results.items()} | {
            "target": ">= 0.95",
            "met": all(r["utilisation"]["saturated"] >= 0.95 for r in results.values())},
        "lost_jobs": {name: r["lost"] for name, r in results.items()} | {
            "target": 0, "met": all(r["lost"] == 0 for r in results.values())},
    }


if __name__ == "__main__":
    main()
