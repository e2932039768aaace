"""Run one worker process: connect, serve until SIGTERM/SIGINT, drain, exit 0."""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis
import torch

from controlplane.artifacts import open_artifact_store
from controlplane.probes import ProbeAddress, serving_probes
from controlplane.registry import Registry
from controlplane.settings import Settings
from controlplane.signals import on_stop_signals
from controlplane.telemetry import setup_tracing, shutdown_tracing
from engines.device_memory import device_memory_gb
from engines.worker import Worker, WorkerOptions


async def _serve(settings: Settings, device: str, engines: frozenset[str] | None,
                 max_stages: int | None, memory_gb: float | None,
                 probe: ProbeAddress | None) -> None:
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
        async with serving_probes(probe, redis_url=settings.redis_url,
                                  problems=worker.not_ready):
            await worker.run()
    finally:
        await redis.aclose()


def run_worker(settings: Settings, *, device: str, engines: frozenset[str] | None,
               max_stages: int | None = None, memory_gb: float | None = None,
               probe: ProbeAddress | None = None) -> None:
    """Block serving stage entries until a stop signal; return when drained. ``probe``:
    where to answer ``/livez`` and ``/readyz`` (``controlplane/probes.py``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    torch.set_num_threads(settings.torch_threads)
    setup_tracing("laneway-worker")
    try:
        asyncio.run(_serve(settings, device, engines, max_stages, memory_gb, probe))
    finally:
        shutdown_tracing()
