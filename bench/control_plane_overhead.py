"""Control-plane overhead and submit throughput of one API process.

Overhead: end-to-end latency of a draft job (HTTP submit with ``wait`` → completed
response) minus the engine call's own time (``run_ms`` on the stage), over sequential jobs.
Throughput: accepted submits per second (``wait: 0``) by concurrent clients against one API
process with no workers consuming.

    python bench/control_plane_overhead.py [--jobs 300] [--submits 6000]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BENCH, median, percentile, write_result  # noqa: E402
from controlplane.registry import Registry
from engines.tiny_models import make_tiny  # noqa: E402
from tests.service import Service  # noqa: E402

POLICY = BENCH / "policies" / "overhead.yaml"


def measure_overhead(service: Service, jobs: int) -> dict[str, float]:
    overheads, e2e, runs = [], [], []
    with httpx.Client(base_url=service.url, timeout=30) as client:
        for i in range(jobs + 20):
            started = time.perf_counter()
            job = client.post("/v1/images", json={"prompt": f"a fox {i}", "intent": "draft",
                                                  "wait": 10}).json()
            elapsed_ms = (time.perf_counter() - started) * 1000
            if job["status"] != "completed":
                raise RuntimeError(f"job did not complete: {job}")
            if i < 20:  # warm-up: first loads, connection set-up
                continue
            run_ms = job["stages"][0]["run_ms"]
            e2e.append(elapsed_ms)
            runs.append(run_ms)
            overheads.append(elapsed_ms - run_ms)
    return {"jobs": jobs, "overhead_p50_ms": round(percentile(overheads, 50), 2),
            "overhead_p99_ms": round(percentile(overheads, 99), 2),
            "e2e_p50_ms": round(percentile(e2e, 50), 2),
            "engine_run_p50_ms": round(median(runs), 2)}


async def _submit_loop(url: str, count: int, concurrency: int) -> int:
    accepted = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        async def one_client(n: int) -> None:
            nonlocal accepted
            for i in range(n):
                response = await client.post("/v1/images", json={
                    "prompt": f"a heron {i}", "intent": "draft"})
                accepted += response.status_code == 202
        await asyncio.gather(*(one_client(count // concurrency) for _ in range(concurrency)))
    return accepted


def _client_process(url: str, count: int, concurrency: int, out: multiprocessing.Queue) -> None:
    try:
        out.put(asyncio.run(_submit_loop(url, count, concurrency)))
    except Exception as exc:  # report instead of leaving the parent waiting
        out.put(exc)


def measure_submits(service: Service, submits: int, processes: int = 2,
                    concurrency: int = 32) -> dict[str, float]:
    spawn = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue = spawn.Queue()
    procs = [spawn.Process(target=_client_process,
                                     args=(service.url, submits // processes, concurrency, out))
             for _ in range(processes)]
    started = time.perf_counter()
    for proc in procs:
        proc.start()
    results = [out.get(timeout=600) for _ in procs]
    failures = [r for r in results if isinstance(r, Exception)]
    if failures:
        raise RuntimeError(f"submit client failed: {failures[0]!r}")
    accepted = sum(results)
    elapsed = time.perf_counter() - started
    for proc in procs:
        proc.join()
    return {"submits": submits, "accepted": accepted, "client_processes": processes,
            "submits_per_s": round(accepted / elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--submits", type=int, default=6000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lw-bench-") as tmp:
        registry = Registry(Path(tmp) / "registry")
        make_tiny(registry)
        service = Service(home=Path(tmp) / "home", registry=registry.root, policy=POLICY)
        service.start()
        try:
            overhead = measure_overhead(service, args.jobs)
        finally:
            service.stop()
        api_only = Service(home=Path(tmp) / "home2", registry=registry.root, policy=POLICY,
                           extra_args=["--no-workers"], ready_path="/healthz")
        api_only.start()
        try:
            throughput = measure_submits(api_only, args.submits)
        finally:
            api_only.stop()
    figures = {**overhead, **throughput, "targets": {
        "overhead_p50_ms": 2, "overhead_p99_ms": 10, "submits_per_s": 1000}}
    summary = (f"overhead p50 {overhead['overhead_p50_ms']} ms, p99 "
               f"{overhead['overhead_p99_ms']} ms over {args.jobs} jobs; "
               f"{throughput['submits_per_s']} accepted submits/s (one API process)")
    write_result("control_plane_overhead", "python bench/control_plane_overhead.py", figures,
                 summary)
    print(summary)


if __name__ == "__main__":
    main()
