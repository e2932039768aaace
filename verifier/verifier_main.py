"""Run one verifier process: connect, verify until SIGTERM/SIGINT, finish the check in
progress, exit 0."""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis

from controlplane.artifacts import open_artifact_store
from controlplane.probes import ProbeAddress, serving_probes
from controlplane.settings import Settings
from controlplane.signals import on_stop_signals
from controlplane.telemetry import setup_tracing, shutdown_tracing
from verifier.typography import set_ocr_threads
from verifier.worker import Verifier, VerifierOptions


async def _serve(settings: Settings, probe: ProbeAddress | None) -> None:
    assert settings.redis_url
    redis = aioredis.Redis.from_url(settings.redis_url)
    verifier = Verifier(redis, VerifierOptions(
        name=settings.consumer_name("verifier"),
        artifacts=open_artifact_store(settings.artifacts),
        job_ttl_s=settings.job_ttl_s, claim_idle_ms=settings.verify_claim_idle_ms,
    ))
    on_stop_signals(verifier.stop)
    try:
        async with serving_probes(probe, redis_url=settings.redis_url,
                                  problems=verifier.not_ready):
            await verifier.run()
    finally:
        await redis.aclose()


def run_verifier(settings: Settings, *, probe: ProbeAddress | None = None) -> None:
    """Block verifying completed jobs until a stop signal; ``probe``: where to answer
    ``/livez`` and ``/readyz``."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s verifier %(levelname)s %(message)s")
    set_ocr_threads(settings.ocr_threads)
    setup_tracing("laneway-verifier")
    try:
        asyncio.run(_serve(settings, probe))
    finally:
        shutdown_tracing()
