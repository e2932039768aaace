"""The overhead benchmark's clients, the same for Laneway and the floor (httpx on loopback).

- :func:`sequential_jobs`: one client, one ``wait`` job after another; per-job latency and
  the job's own ``queued_ms``/``run_ms``.
- :func:`accepted_submits`: 32 clients (async, in two processes) submitting ``wait: 0``
  jobs as fast as they are answered; accepted submits per second.
- :func:`preload`: queue jobs before any worker runs (the batched workload).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from dataclasses import dataclass
from typing import Any

import httpx

from bench.common import percentile

WARMUP_JOBS = 20
#: a freshly started stack may answer 503 ``no_engine`` until its worker's first heartbeat
READY_TIMEOUT_S = 60.0
#: requests each client connection makes before the clock starts
WARMUP_PER_CONNECTION = 2


@dataclass(frozen=True)
class JobTimes:
    """One job seen from the client: ``e2e_ms`` (submit → completed response) and the
    stack's own enqueue → start (``queued_ms``) and engine time (``run_ms``)."""

    e2e_ms: float
    queued_ms: float
    run_ms: float

    @property
    def rest_ms(self) -> float:
        """Everything else: API handling, the worker's start and commit, the wake-up."""
        return self.e2e_ms - self.queued_ms - self.run_ms


def _times(body: dict[str, Any], e2e_ms: float) -> JobTimes:
    stage = body["stages"][0] if "stages" in body else body  # Laneway's job, the floor's
    return JobTimes(e2e_ms, float(stage["queued_ms"]), float(stage["run_ms"]))


def _until_served(client: httpx.Client, body: dict[str, Any]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while (response := client.post("/v1/images", json=body)).status_code == 503:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no worker serves the lane after {READY_TIMEOUT_S}s: "
                               f"{response.text}")
        time.sleep(0.2)


def sequential_jobs(url: str, jobs: int, body: dict[str, Any]) -> list[JobTimes]:
    """``jobs`` jobs one after another, each submitted with ``wait`` (after a warm-up)."""
    samples = []
    with httpx.Client(base_url=url, timeout=30) as client:
        _until_served(client, {**body, "wait": 10})
        for i in range(jobs + WARMUP_JOBS):
            started = time.perf_counter()
            response = client.post("/v1/images", json={**body, "prompt": f"a fox {i}",
                                                       "wait": 10})
            elapsed_ms = (time.perf_counter() - started) * 1000
            job = response.json()
            if response.status_code != 200 or job["status"] != "completed":
                raise RuntimeError(f"job did not complete: {response.status_code} {job}")
            if i >= WARMUP_JOBS:
                samples.append(_times(job, elapsed_ms))
    return samples


def phase_figures(samples: list[JobTimes]) -> dict[str, float]:
    """Percentiles of the end-to-end latency and the medians of its phases."""
    e2e = [s.e2e_ms for s in samples]
    return {"e2e_p50_ms": round(percentile(e2e, 50), 2),
            "e2e_p99_ms": round(percentile(e2e, 99), 2),
            "queued_p50_ms": round(percentile([s.queued_ms for s in samples], 50), 2),
            "run_p50_ms": round(percentile([s.run_ms for s in samples], 50), 2),
            "rest_p50_ms": round(percentile([s.rest_ms for s in samples], 50), 2),
            "over_run_p50_ms": round(percentile([s.e2e_ms - s.run_ms for s in samples], 50),
                                     2)}


async def _submit_loop(url: str, counts: list[int], body: dict[str, Any], ready: Any,
                       go: Any) -> tuple[int, float, float]:
    accepted = 0
    limits = httpx.Limits(max_connections=len(counts), max_keepalive_connections=len(counts))
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        async def one_client(n: int) -> None:
            nonlocal accepted
            for i in range(n):
                response = await client.post("/v1/images", json={**body,
                                                                  "prompt": f"a heron {i}"})
                accepted += response.status_code == 202

        await asyncio.gather(*(one_client(WARMUP_PER_CONNECTION) for _ in counts))
        accepted = 0
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        started = time.monotonic()
        await asyncio.gather(*(one_client(n) for n in counts))
        return accepted, started, time.monotonic()


def _client_process(url: str, counts: list[int], body: dict[str, Any], ready: Any, go: Any,
                    out: multiprocessing.Queue) -> None:
    try:
        out.put(asyncio.run(_submit_loop(url, counts, body, ready, go)))
    except Exception as exc:  # report instead of leaving the parent waiting
        ready.set()
        out.put(exc)


def accepted_submits(url: str, submits: int, body: dict[str, Any], *, clients: int = 32,
                     processes: int = 2) -> dict[str, float]:
    """Accepted (202) submits per second from ``clients`` connections in ``processes``
    client processes, timed from a common start (after each connection's warm-up) to the
    last answer; the client processes' own start-up is not timed."""
    spawn = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue = spawn.Queue()
    go = spawn.Event()
    per_client = [submits // clients + (k < submits % clients) for k in range(clients)]
    shares = [per_client[p::processes] for p in range(processes)]
    readies = [spawn.Event() for _ in shares]
    procs = [spawn.Process(target=_client_process, args=(url, share, body, ready, go, out))
             for share, ready in zip(shares, readies, strict=True)]
    for proc in procs:
        proc.start()
    for ready in readies:
        if not ready.wait(timeout=120):
            raise RuntimeError("a submit client did not get ready in 120 s")
    go.set()
    results = [out.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    failures = [r for r in results if isinstance(r, Exception)]
    if failures:
        raise RuntimeError(f"submit client failed: {failures[0]!r}")
    accepted = sum(r[0] for r in results)
    elapsed_s = max(r[2] for r in results) - min(r[1] for r in results)
    return {"submits": submits, "accepted": accepted, "clients": clients,
            "client_processes": processes, "submits_per_s": round(accepted / elapsed_s, 1)}


def preload(url: str, jobs: int, body: dict[str, Any]) -> list[str]:
    """Queue ``jobs`` jobs (``wait: 0``) and return their ids."""
    with httpx.Client(base_url=url, timeout=30) as client:
        ids = []
        for i in range(jobs):
            response = client.post("/v1/images", json={**body, "prompt": f"a crane {i}"})
            if response.status_code != 202:
                raise RuntimeError(f"submit refused: {response.status_code} {response.text}")
            ids.append(response.json()["id"])
    return ids
