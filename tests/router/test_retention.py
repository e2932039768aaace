"""Acceptance: the images and inputs of an expired job are gone from the store after the
sweeper's interval, local and S3 — with the sweeper run by ``laneway controller``."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from controlplane import keys
from controlplane.artifacts import final_key, input_key, job_prefix, open_artifact_store
from controlplane.policy_loader import parse_policy
from controlplane.registry import Registry
from tests.router.conftest import running_router

JOB_TTL_S = 2
SWEEP_INTERVAL_S = 0.2
GONE_WITHIN_S = 60.0
POLICY = parse_policy("""
version: 1
limits: {max_pixels: 262144, max_n: 2, max_prompt_chars: 200, default_width: 32,
         default_height: 32}
engines:
  draft: {kind: sim, steps: 1, max_concurrency: 2, sim: {mean_ms: 5, jitter: 0}}
  resize: {kind: resize}
routes:
  - name: edit
    match: {mode: img2img}
    stages: [{engine: resize}]
  - name: fast_draft
    match: {intent: draft}
    stages: [{engine: draft}]
""")


def png_b64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def start_controller(redis_url: str, location: str, log: Path) -> subprocess.Popen[bytes]:
    # AWS_* come from this process's environment (set by the s3_location fixture)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LANEWAY_", "OTEL_"))}
    env |= {"LANEWAY_REDIS_URL": redis_url, "LANEWAY_ARTIFACTS": location,
            "LANEWAY_JOB_TTL_S": str(JOB_TTL_S),
            "LANEWAY_ARTIFACT_SWEEP_INTERVAL_S": str(SWEEP_INTERVAL_S),
            "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "laneway.cli", "controller"], env=env,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


@pytest.mark.parametrize("backend", ["local", "s3"])
async def test_an_expired_job_s_images_and_inputs_are_swept(
        request: pytest.FixtureRequest, redis_url: str, tiny_registry: Registry,
        tmp_path: Path, backend: str) -> None:
    location = (str(tmp_path / "artifacts") if backend == "local"
                else str(request.getfixturevalue("s3_location")))
    store = open_artifact_store(location)
    log = tmp_path / "controller.log"
    controller = start_controller(redis_url, location, log)
    try:
        async with running_router(redis_url, POLICY, tiny_registry, tmp_path,
                                  artifacts=location, job_ttl_s=JOB_TTL_S) as router:
            await router.start_worker("draft", "resize")
            draft = (await router.submit(intent="draft", n=2, wait=30)).json()
            edit = (await router.submit(mode="img2img", image=png_b64(), wait=30)).json()
            assert (draft["status"], edit["status"]) == ("completed", "completed")
            # listed by the accept with its record's expiry
            score = await router.redis.zscore(keys.artifact_expiry(), draft["id"])
            assert score is not None and score > time.time() * 1000
            assert store.exists(final_key(draft["id"], 1))
            assert store.exists(input_key(edit["id"], "image"))
            assert store.exists(final_key(edit["id"], 0))

            deadline = time.monotonic() + GONE_WITHIN_S
            while (store.keys(job_prefix(draft["id"])) or store.keys(job_prefix(edit["id"]))
                   or await router.redis.zcard(keys.artifact_expiry())):
                assert controller.poll() is None, log.read_text()
                assert time.monotonic() < deadline, (
                    f"artifacts still there: {store.keys(job_prefix(draft['id']))} "
                    f"{store.keys(job_prefix(edit['id']))}\n{log.read_text()}")
                await asyncio.sleep(0.1)
            # the records are gone too (the unit test shows they go no sooner)
            assert not await router.redis.exists(keys.job(draft["id"]), keys.job(edit["id"]))
            assert (await router.http.get(f"/v1/jobs/{draft['id']}")).status_code == 404
    finally:
        controller.send_signal(signal.SIGTERM)
        controller.wait(timeout=30)
    assert "artifacts deleted" in log.read_text()


REFUSING = parse_policy("""
version: 1
limits: {max_pixels: 262144, max_n: 1, max_prompt_chars: 200, default_width: 32,
         default_height: 32}
engines:
  slow: {kind: sim, steps: 1, max_concurrency: 1, sim: {mean_ms: 3000, jitter: 0}}
routes:
  - name: edit
    match: {mode: img2img}
    stages: [{engine: slow}]
    admission: {max_queue: 1, on_full: reject}
""")


async def test_a_refused_request_leaves_no_input_behind(
        redis_url: str, tiny_registry: Registry, tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    async with running_router(redis_url, REFUSING, tiny_registry, tmp_path,
                              artifacts=root) as router:
        await router.start_worker("slow")
        first = await router.submit(mode="img2img", image=png_b64())
        assert first.status_code == 202, first.text
        refused = await router.submit(mode="img2img", image=png_b64())
        assert refused.status_code == 429, refused.text
        assert [p.name for p in root.iterdir()] == [first.json()["id"]]
        await router.http.delete(f"/v1/jobs/{first.json()['id']}")
