"""The floor: the least a request path like Laneway's can do, for the overhead benchmark.

An HTTP POST appends the job to a Valkey stream and, when it asks to ``wait``, awaits the
job's completion from one pub/sub subscription; a worker process reads the stream with
XREADGROUP BLOCK, sleeps the simulated service time (a batch: up to ``max_batch`` entries
taken within ``max_wait_ms`` of the first, one sleep for all), then publishes each job's
completion and acknowledges the batch in one round trip. No job records, no validation
beyond the body's shape, no artifacts: what is left is the transport Laneway's request path
reduces to, on the same server binary, framework, ASGI server and Redis client::

    python -m bench.floor api --redis-url URL --port 8100 [--processes 2]
    python -m bench.floor worker --redis-url URL --service-ms 20 [--max-batch 8 --max-wait-ms 50]

The completion carries ``queued_ms`` (enqueue → start, from the stream entry's id) and
``run_ms`` (the sleep), defined as Laneway's stage fields are, so the two can be compared
phase by phase.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import redis
import redis.asyncio as aioredis
import uvicorn
from litestar import Litestar, Response, get, post
from litestar.datastructures import State

REPO = Path(__file__).resolve().parent.parent
STREAM = "floor:jobs"
GROUP = "floor"
DONE_CHANNEL = "floor:done"
#: the factory ``uvicorn --workers`` processes build the app with reads the URL from here
REDIS_URL_ENV = "FLOOR_REDIS_URL"
READY_TIMEOUT_S = 30.0
#: the batch window is polled without blocking this often (as ``engines/batching.py``)
POLL_MS = 3.0
BLOCK_MS = 200


# -- the API ----------------------------------------------------------------------------


class Submit(msgspec.Struct):
    """A job: only ``wait`` matters; other fields (``intent``, ``tier``) are ignored."""

    prompt: str
    wait: float = 0


class Waiters:
    """One subscription to ``DONE_CHANNEL`` resolving the futures of waiting requests."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        pubsub = self.client.pubsub()
        await pubsub.subscribe(DONE_CHANNEL)
        await pubsub.get_message(timeout=5)  # the subscribe confirmation: listening from now
        self._task = asyncio.create_task(self._listen(pubsub))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _listen(self, pubsub: Any) -> None:
        async for message in pubsub.listen():
            if message["type"] != "message":
                continue
            done = json.loads(message["data"])
            future = self.waiting.pop(done["id"], None)
            if future is not None and not future.done():
                future.set_result(done)


@post("/v1/images", status_code=202)
async def submit(data: Submit, state: State) -> Response[dict[str, Any]]:
    job_id = uuid.uuid4().hex
    client: aioredis.Redis = state.redis
    if data.wait <= 0:
        await client.xadd(STREAM, {"id": job_id, "prompt": data.prompt})
        return Response({"id": job_id, "status": "queued"}, status_code=202)
    waiters: Waiters = state.waiters
    # registered before the append, so the completion cannot be missed
    future = waiters.waiting[job_id] = asyncio.get_running_loop().create_future()
    try:
        await client.xadd(STREAM, {"id": job_id, "prompt": data.prompt})
        done = await asyncio.wait_for(future, timeout=data.wait)
    except TimeoutError:
        return Response({"id": job_id, "status": "queued"}, status_code=202)
    finally:
        waiters.waiting.pop(job_id, None)
    return Response({"status": "completed", **done}, status_code=200)


@get("/healthz")
async def healthz() -> str:
    return "ok"


def create_app(redis_url: str | None = None) -> Litestar:
    """The floor's API against ``redis_url`` (default: ``$FLOOR_REDIS_URL``)."""
    url = redis_url or os.environ[REDIS_URL_ENV]

    async def open_redis(app: Litestar) -> None:
        app.state.redis = aioredis.Redis.from_url(url, max_connections=256)
        app.state.waiters = Waiters(app.state.redis)
        await app.state.waiters.start()

    async def close_redis(app: Litestar) -> None:
        await app.state.waiters.stop()
        await app.state.redis.aclose()

    return Litestar([submit, healthz], on_startup=[open_redis], on_shutdown=[close_redis])


def run_api(redis_url: str, port: int, processes: int) -> None:
    """Serve the API on ``port``, as ``laneway serve`` runs its own (same uvicorn options)."""
    options: dict[str, Any] = {"host": "127.0.0.1", "port": port, "log_level": "warning",
                               "access_log": False}
    if processes == 1:
        uvicorn.run(create_app(redis_url), **options)
        return
    os.environ[REDIS_URL_ENV] = redis_url
    uvicorn.run("bench.floor:create_app", factory=True, workers=processes, **options)


# -- the worker -------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerOptions:
    service_ms: float
    per_item_ms: float = 0
    max_batch: int = 1
    max_wait_ms: float = 0
    #: one line per batch, ``started_ms finished_ms size`` (wall clock), when given
    times_file: Path | None = None


Entry = tuple[bytes, dict[bytes, bytes]]


def _read(client: redis.Redis, count: int, block_ms: int | None) -> list[Entry]:
    got: Any = client.xreadgroup(GROUP, "floor-worker", {STREAM: ">"}, count=count,
                                 block=block_ms)
    return [entry for _stream, entries in got for entry in entries] if got else []


def _fill(client: redis.Redis, first: list[Entry],
          options: WorkerOptions) -> list[Entry]:
    """``first`` plus what arrives before the batch is full or ``max_wait_ms`` has passed."""
    batch = list(first)
    deadline = time.monotonic() + options.max_wait_ms / 1000
    while len(batch) < options.max_batch:
        got = _read(client, options.max_batch - len(batch), None)
        batch.extend(got)
        remaining_s = deadline - time.monotonic()
        if len(batch) >= options.max_batch or remaining_s <= 0:
            break
        if not got:
            time.sleep(min(POLL_MS / 1000, remaining_s))
    return batch


def _complete(client: redis.Redis, batch: list[Entry], started_ms: float,
              run_ms: float) -> None:
    """Publish every job's completion and acknowledge the batch, in one round trip."""
    pipe = client.pipeline(transaction=False)
    for entry_id, fields in batch:
        enqueued_ms = int(entry_id.split(b"-")[0])
        pipe.publish(DONE_CHANNEL, json.dumps({
            "id": fields[b"id"].decode(), "queued_ms": round(started_ms - enqueued_ms, 2),
            "run_ms": round(run_ms, 2), "batch_size": len(batch)}))
    pipe.xack(STREAM, GROUP, *(entry_id for entry_id, _ in batch))
    pipe.execute()


def run_worker(redis_url: str, options: WorkerOptions) -> None:
    """Read → sleep → publish and ack, until SIGTERM."""
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    client = redis.Redis.from_url(redis_url)
    with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: made by an earlier start
        client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    times = options.times_file.open("a", buffering=1) if options.times_file else None
    while not stopping:
        first = _read(client, 1, BLOCK_MS)
        if not first:
            continue
        batch = _fill(client, first, options)
        started_ms, started = time.time() * 1000, time.perf_counter()
        time.sleep((options.service_ms + options.per_item_ms * (len(batch) - 1)) / 1000)
        run_ms = (time.perf_counter() - started) * 1000
        _complete(client, batch, started_ms, run_ms)
        if times is not None:
            times.write(f"{started_ms:.3f} {time.time() * 1000:.3f} {len(batch)}\n")
    if times is not None:
        times.close()


# -- process handles for the bench ------------------------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]), "PYTHONUNBUFFERED": "1"}


def _stop(process: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class FloorApi:
    """``python -m bench.floor api`` as a subprocess on a free port."""

    redis_url: str
    port: int
    processes: int = 1
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FloorApi:
        log = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.floor", "api", "--redis-url", self.redis_url,
             "--port", str(self.port), "--processes", str(self.processes)],
            cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"floor API exited {self.process.returncode} "
                                   f"(log: {self.log_path})")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"floor API not ready in {READY_TIMEOUT_S}s (log: {self.log_path})")

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)


@dataclass
class FloorWorker:
    """``python -m bench.floor worker`` as a subprocess."""

    redis_url: str
    options: WorkerOptions
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> FloorWorker:
        o = self.options
        command = [sys.executable, "-m", "bench.floor", "worker", "--redis-url", self.redis_url,
                   "--service-ms", str(o.service_ms), "--per-item-ms", str(o.per_item_ms),
                   "--max-batch", str(o.max_batch), "--max-wait-ms", str(o.max_wait_ms)]
        if o.times_file is not None:
            command += ["--times-file", str(o.times_file)]
        self.process = subprocess.Popen(command, cwd=REPO, env=_env())
        return self

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    api = commands.add_parser("api", help="the HTTP API")
    api.add_argument("--redis-url", required=True)
    api.add_argument("--port", type=int, required=True)
    api.add_argument("--processes", type=int, default=1)
    worker = commands.add_parser("worker", help="the stream worker")
    worker.add_argument("--redis-url", required=True)
    worker.add_argument("--service-ms", type=float, required=True)
    worker.add_argument("--per-item-ms", type=float, default=0)
    worker.add_argument("--max-batch", type=int, default=1)
    worker.add_argument("--max-wait-ms", type=float, default=0)
    worker.add_argument("--times-file", type=Path)
    args = parser.parse_args()
    if args.command == "api":
        run_api(args.redis_url, args.port, args.processes)
    else:
        run_worker(args.redis_url, WorkerOptions(
            service_ms=args.service_ms, per_item_ms=args.per_item_ms,
            max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
            times_file=args.times_file))


if __name__ == "__main__":
    main()
