"""Latency of ``GET /healthz`` and ``POST /v1/images`` while 300 SSE streams are open.

One API process (``laneway serve --no-workers``, a simulated lane, so jobs stay queued and
their streams stay open with keep-alives). Each repeat measures sequential requests of
both endpoints without streams, then with the streams open (held by a client process of
their own, one stream per job); figures are medians over the repeats. Target (issue 12,
acceptance 5): p95 within 100 ms with the streams open.

    python bench/sse_streams.py [--streams 300] [--requests 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BENCH, median, percentile, write_result  # noqa: E402
from tests.service import Service, bundled_redis_url  # noqa: E402

POLICY = BENCH / "policies" / "sse_streams.yaml"
TARGET_P95_MS = 100
SUBMIT = {"prompt": "a heron", "intent": "draft"}


async def _hold_streams(url: str, count: int, ready: Any, stop: Any) -> None:
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=count + 10)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        job_ids = [(await client.post("/v1/images", json=SUBMIT)).json()["id"]
                   for _ in range(count)]
        joined = 0

        async def one(job_id: str) -> None:
            nonlocal joined
            async with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
                if response.status_code != 200:
                    raise RuntimeError(f"stream refused: {response.status_code}")
                async for line in response.aiter_lines():
                    if line.startswith("event: queued"):
                        joined += 1
                        if joined == count:
                            ready.set()

        tasks = [asyncio.create_task(one(job_id)) for job_id in job_ids]
        while not stop.is_set():
            failed = [task for task in tasks if task.done()]
            if failed:
                raise RuntimeError(f"a stream ended: {failed[0].exception()!r}")
            await asyncio.sleep(0.2)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _stream_process(url: str, count: int, ready: Any, stop: Any, out: Any) -> None:
    try:
        asyncio.run(_hold_streams(url, count, ready, stop))
        out.put(None)
    except Exception as exc:  # report instead of leaving the parent waiting
        out.put(repr(exc))
        ready.set()


def measure(client: httpx.Client, requests: int) -> dict[str, float]:
    """p50/p95 of sequential /healthz and POST /v1/images (ms)."""
    figures: dict[str, float] = {}
    for name, call in (("healthz", lambda: client.get("/healthz")),
                       ("submit", lambda: client.post("/v1/images", json=SUBMIT))):
        for _ in range(10):  # warm
            call()
        times = []
        for _ in range(requests):
            started = time.perf_counter()
            response = call()
            times.append((time.perf_counter() - started) * 1000)
            if response.status_code not in (200, 202):
                raise RuntimeError(f"{name}: {response.status_code} {response.text}")
        figures[f"{name}_p50_ms"] = percentile(times, 50)
        figures[f"{name}_p95_ms"] = percentile(times, 95)
    return figures


def redis_clients(service: Service) -> int:
    """Connections the bundled server holds (the API's, the bench's own)."""
    client = redis.Redis.from_url(bundled_redis_url(service.home))
    try:
        return int(client.info("clients")["connected_clients"])
    finally:
        client.close()


def one_repeat(service: Service, streams: int, requests: int) -> dict[str, dict[str, float]]:
    spawn = multiprocessing.get_context("spawn")
    ready, stop, out = spawn.Event(), spawn.Event(), spawn.Queue()
    with service.client() as client:
        without = measure(client, requests) | {"redis_clients": redis_clients(service)}
        proc = spawn.Process(target=_stream_process,
                             args=(service.url, streams, ready, stop, out))
        proc.start()
        try:
            if not ready.wait(timeout=120) or not out.empty():
                raise RuntimeError(f"streams did not open: {out.get() if not out.empty() else ''}")
            with_streams = measure(client, requests) | {
                "redis_clients": redis_clients(service)}
        finally:
            stop.set()
            failure = out.get(timeout=60)
            proc.join(timeout=60)
        if failure:
            raise RuntimeError(f"stream client failed: {failure}")
    return {"without_streams": without, "with_streams": with_streams}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lw-bench-") as tmp:
        service = Service(home=Path(tmp) / "home", registry=Path(tmp) / "registry",
                          policy=POLICY, extra_args=["--no-workers"], ready_path="/healthz",
                          wait_for_worker=False,
                          extra_env={"LANEWAY_NO_ENGINE_GRACE_S": "1000000"})
        service.start()
        try:
            repeats = [one_repeat(service, args.streams, args.requests)
                       for _ in range(args.repeats)]
        finally:
            service.stop()
    figures: dict[str, Any] = {"streams": args.streams, "requests": args.requests,
                               "repeats": args.repeats, "target_p95_ms": TARGET_P95_MS}
    for case in ("without_streams", "with_streams"):
        figures[case] = {key: round(median([r[case][key] for r in repeats]), 2)
                         for key in repeats[0][case]}
    for endpoint in ("healthz", "submit"):
        figures[f"{endpoint}_p95_ratio"] = round(
            figures["with_streams"][f"{endpoint}_p95_ms"]
            / figures["without_streams"][f"{endpoint}_p95_ms"], 2)
    # the pool keeps what a burst opened: only the first repeat shows the streams' effect
    figures["redis_clients_first_repeat"] = {
        case: repeats[0][case]["redis_clients"] for case in ("without_streams", "with_streams")}
    figures["repeat_figures"] = repeats
    with_streams = figures["with_streams"]
    clients = figures["redis_clients_first_repeat"]
    summary = (f"{args.streams} open streams: /healthz p95 {with_streams['healthz_p95_ms']} ms "
               f"({figures['healthz_p95_ratio']}x), POST /v1/images p95 "
               f"{with_streams['submit_p95_ms']} ms ({figures['submit_p95_ratio']}x); "
               f"target ≤ {TARGET_P95_MS} ms; medians of {args.repeats} repeats; Redis "
               f"clients {clients['without_streams']} → {clients['with_streams']} "
               f"(pool growth from {args.streams} concurrent opens)")
    write_result("sse_streams", "python bench/sse_streams.py", figures, summary)
    print(summary)


if __name__ == "__main__":
    main()
