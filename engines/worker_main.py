"""Run one worker process: connect, serve until SIGTERM/SIGINT, drain, exit 0."""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis
import torch

from controlplane.artifacts import open_artifact_store
from controlplane.registry import Registry
from controlplane.settings import Settings
from controlplane.signals import on_stop_signals
from controlplane.telemetry import setup_tracing, shutdown_tracing
from engines.worker import Worker, WorkerOptions


async def _serve(settings: Settings, device: str, engines: frozenset[str] | None,
                 max_stages: int | None, memory_gb: float | None) -> None:
    assert settings.redis_url
    redis = aioredis.Redis.from_url(settings.redis_url, max_connections=128)
    worker = Worker(redis, WorkerOptions(
        name=settings.consumer_name(device), device=device,
        registry=Registry(settings.registry), artifacts=open_artifact_store(settings.artifacts),
        job_ttl_s=settings.job_ttl_s, engines=engines,
        drain_timeout_s=settings.drain_timeout_s, redis_url=settings.redis_url,
        max_stages=max_stages, memory_gb=memory_gb or device_memory_gb(device),
    ))
    on_stop_signals(worker.stop)
    try:
        await worker.run()
    finally:
        await redis.aclose()


def device_memory_gb(device: str) -> float | None:
    """A CUDA device's total memory (the default budget); None (unlimited) elsewhere."""
    if not device.startswith("cuda"):
        return None
    import torch

    return float(torch.cuda.get_device_properties(torch.device(device)).total_memory) / 2**30


def run_worker(settings: Settings, *, device: str, engines: frozenset[str] | None,
               max_stages: int | None = None, memory_gb: float | None = None) -> None:
    """Block serving stage entries until a stop signal; return when drained."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    torch.set_num_threads(settings.torch_threads)
    setup_tracing("laneway-worker")
    try:
        asyncio.run(_serve(settings, device, engines, max_stages, memory_gb))
    finally:
        shutdown_tracing()
