"""The router under test: the real Litestar app on a loopback port (uvicorn in a thread)
against the fixture server, and real workers in the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn

from controlplane.artifacts import open_artifact_store
from controlplane.policy import Policy, RemoteRules
from controlplane.registry import Registry
from controlplane.settings import Settings
from engines.worker import Worker, WorkerOptions
from laneway.serve import publish_policy
from router.app import create_app
from tests.service import free_port

START_TIMEOUT_S = 20.0


class ApiServer:
    """``create_app`` served by uvicorn on a free loopback port, in a thread."""

    def __init__(self, settings: Settings) -> None:
        self.port = free_port()
        config = uvicorn.Config(create_app(settings, secrets=os.environ), host="127.0.0.1",
                                port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the API did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        if self.thread.is_alive():
            raise RuntimeError("the API did not stop in 15 s")


@dataclass
class Router:
    """One running API with its Redis, plus helpers to submit and to start workers."""

    settings: Settings
    registry: Registry
    redis: aioredis.Redis
    http: httpx.AsyncClient
    workers: list[tuple[Worker, asyncio.Task[None], aioredis.Redis]] = field(
        default_factory=list)

    async def submit(self, headers: dict[str, str] | None = None, **body: Any
                     ) -> httpx.Response:
        return await self.http.post("/v1/images", json={"prompt": "a lighthouse", **body},
                                    headers=headers or {})

    async def start_worker(self, *engines: str, **options: Any) -> Worker:
        """An in-process worker for ``engines``; ``options`` are more WorkerOptions."""
        redis = aioredis.Redis.from_url(self.settings.redis_url or "")
        worker = Worker(redis, WorkerOptions(
            name=f"test/cpu/{len(self.workers)}", device="cpu", registry=self.registry,
            artifacts=open_artifact_store(self.settings.artifacts),
            job_ttl_s=self.settings.job_ttl_s, engines=frozenset(engines), **options))
        self.workers.append((worker, asyncio.create_task(worker.run()), redis))
        return worker

    async def stop_workers(self) -> None:
        for worker, task, redis in self.workers:
            worker.stop()
            await asyncio.wait_for(task, timeout=60)
            await redis.aclose()
        self.workers.clear()

    async def job(self, job_id: str) -> dict[str, Any]:
        response = await self.http.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    async def wait_job(self, job_id: str, status: str, *, timeout_s: float = 60) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            job = await self.job(job_id)
            if job["status"] == status:
                return job
            assert time.monotonic() < deadline, f"job never became {status}: {job}"
            await asyncio.sleep(0.05)

    async def events(self, job_id: str, *, last_event_id: str | None = None
                     ) -> list[tuple[str, dict[str, Any], str | None]]:
        """The job's SSE stream read to its end: ``(event, data, id)`` triples."""
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        out: list[tuple[str, dict[str, Any], str | None]] = []
        async with self.http.stream("GET", f"/v1/jobs/{job_id}/events",
                                    headers=headers) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            event, event_id = None, None
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("id:"):
                    event_id = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event is not None:
                    out.append((event, json.loads(line.split(":", 1)[1]), event_id))
                    event, event_id = None, None
        return out


RouterFactory = Callable[[Policy], contextlib.AbstractAsyncContextManager[Router]]


@contextlib.asynccontextmanager
async def running_router(redis_url: str, policy: Policy, registry: Registry,
                         home: Path, **settings_fields: Any) -> AsyncIterator[Router]:
    """The API up against ``redis_url`` with ``policy`` in force; workers stopped at exit.

    ``settings_fields`` override the API's settings (e.g. ``redis_timeout_s``).
    """
    fields = {"artifacts": home / "artifacts", **settings_fields}
    settings = Settings(redis_url=redis_url, home=home, registry=registry.root, **fields)
    await publish_policy(redis_url, policy, registry,
                         remote=RemoteRules.from_settings(settings))
    server = ApiServer(settings)
    await asyncio.to_thread(server.start)
    redis = aioredis.Redis.from_url(redis_url)
    http = httpx.AsyncClient(base_url=server.url, timeout=60)
    router = Router(settings, registry, redis, http)
    try:
        yield router
    finally:
        await router.stop_workers()
        await http.aclose()
        await redis.aclose()
        await asyncio.to_thread(server.stop)


@pytest.fixture
def make_router(redis_url: str, tiny_registry: Registry, tmp_path: Path) -> RouterFactory:
    """``async with make_router(policy) as router:`` — the API up with ``policy`` in force."""

    def running(policy: Policy) -> contextlib.AbstractAsyncContextManager[Router]:
        return running_router(redis_url, policy, tiny_registry, tmp_path)

    return running
