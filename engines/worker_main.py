"""Run one worker process: connect, serve until SIGTERM/SIGINT, drain, exit 0."""

from __future__ import annotations

import asyncio
import logging
import os

import redis.asyncio as aioredis
import torch

from controlplane.artifacts import open_artifact_store
from controlplane.registry import Registry
from controlplane.settings import Settings
from controlplane.signals import on_stop_signals
from controlplane.telemetry import setup_tracing, shutdown_tracing
from engines.worker import Worker, WorkerOptions


def worker_name(settings: Settings, device: str) -> str:
    return f"{settings.node_name}/{device}/{os.getpid()}"


async def _serve(settings: Settings, device: str, engines: frozenset[str] | None) -> None:
    assert settings.redis_url
    redis = aioredis.Redis.from_url(settings.redis_url, max_connections=128)
    worker = Worker(redis, WorkerOptions(
        name=worker_name(settings, device), device=device,
        registry=Registry(settings.registry), artifacts=open_artifact_store(settings.artifacts),
        job_ttl_s=settings.job_ttl_s, engines=engines,
        drain_timeout_s=settings.drain_timeout_s, redis_url=settings.redis_url,
    ))
    on_stop_signals(worker.stop)
    try:
        await worker.run()
    finally:
        await redis.aclose()


def run_worker(settings: Settings, *, device: str, engines: frozenset[str] | None) -> None:
    """Block serving stage entries until a stop signal; return when drained."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    torch.set_num_threads(settings.torch_threads)
    setup_tracing("laneway-worker")
    try:
        asyncio.run(_serve(settings, device, engines))
    finally:
        shutdown_tracing()
