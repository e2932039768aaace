"""Images through the API on both artifact stores (a local directory, a real S3 server):
request images stored at submit, stage outputs and finals written by a worker, the image
streamed back by ``GET /v1/jobs/{id}/images/{i}``, and presigned URLs on S3."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from controlplane.artifacts import (
    ArtifactStore,
    final_key,
    input_key,
    job_prefix,
    open_artifact_store,
    stage_key,
)
from controlplane.policy_loader import parse_policy
from controlplane.registry import Registry
from tests.router.conftest import Router, running_router

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
  - name: cascade
    match: {intent: final}
    stages: [{engine: draft}, {engine: resize, scale: 2}]
  - name: fast_draft
    match: {intent: draft}
    stages: [{engine: draft}]
""")


def png_b64(color: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(params=["local", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "artifacts")
    return str(request.getfixturevalue("s3_location"))


@pytest.fixture
async def router(redis_url: str, tiny_registry: Registry, tmp_path: Path,
                 location: str) -> AsyncIterator[Router]:
    async with running_router(redis_url, POLICY, tiny_registry, tmp_path,
                              artifacts=location) as router:
        await router.start_worker("draft", "resize")
        yield router


async def completed(router: Router, **body: object) -> dict:
    response = await router.submit(**body)
    assert response.status_code == 202, response.text
    return await router.wait_job(response.json()["id"], "completed")


async def test_a_final_image_is_streamed_from_the_store(router: Router, location: str) -> None:
    store = open_artifact_store(location)
    job = await completed(router, intent="draft", n=2)
    assert store.keys(job_prefix(job["id"])) == [final_key(job["id"], 0),
                                                  final_key(job["id"], 1)]
    for image in job["images"]:
        assert image["url"] == f"/v1/jobs/{job['id']}/images/{image['index']}"
        response = await router.http.get(image["url"])
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        assert int(response.headers["content-length"]) == len(response.content)
        assert response.content == store.get(final_key(job["id"], image["index"]))
        png = Image.open(io.BytesIO(response.content))
        assert png.size == (32, 32)
        assert json.loads(png.info["laneway"])["job_id"] == job["id"]  # the worker's provenance
    webp = await router.http.get(f"{job['images'][0]['url']}?format=webp")
    assert webp.status_code == 200 and webp.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(webp.content)).format == "WEBP"


async def test_an_image_gone_from_the_store_is_404(router: Router, location: str) -> None:
    job = await completed(router, intent="draft")
    open_artifact_store(location).delete(final_key(job["id"], 0))
    for url in (job["images"][0]["url"], job["images"][0]["url"] + "?format=jpeg"):
        response = await router.http.get(url)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


async def test_inputs_and_stage_outputs_go_through_the_store(router: Router,
                                                             location: str) -> None:
    store: ArtifactStore = open_artifact_store(location)
    edit = await completed(router, mode="img2img", image=png_b64((10, 200, 30)))
    assert store.exists(input_key(edit["id"], "image"))
    # the worker read the request image from the store: its colour came through resize
    final = await router.http.get(edit["images"][0]["url"])
    assert Image.open(io.BytesIO(final.content)).convert("RGB").getpixel((5, 5)) == (
        10, 200, 30)
    cascade = await completed(router, intent="final")
    assert store.exists(stage_key(cascade["id"], 0, 0))
    assert (cascade["images"][0]["width"], cascade["images"][0]["height"]) == (64, 64)


async def test_presigned_urls_on_s3(redis_url: str, tiny_registry: Registry, tmp_path: Path,
                                    s3_location: str) -> None:
    async with running_router(redis_url, POLICY, tiny_registry, tmp_path,
                              artifacts=s3_location, image_urls="presigned",
                              image_url_ttl_s=120) as router:
        await router.start_worker("draft")
        response = await router.submit(intent="draft", wait=30)
        assert response.status_code == 200, response.text
        waited = response.json()
        job = await router.job(waited["id"])
        for body in (waited, job):
            url = body["images"][0]["url"]
            assert url.startswith(f"{httpx.URL(url).scheme}://127.0.0.1:")
            assert "X-Amz-Expires=120" in url and "X-Amz-Signature=" in url
        direct = httpx.get(job["images"][0]["url"])  # no credentials but the URL's
        assert direct.status_code == 200
        through_api = await router.http.get(f"/v1/jobs/{job['id']}/images/0")
        assert direct.content == through_api.content
        async with router.http.stream("GET", f"/v1/jobs/{job['id']}/events") as events:
            async for line in events.aiter_lines():
                if line.startswith("data:"):  # the first event: the job's state
                    state = json.loads(line.split(":", 1)[1])
                    break
        assert "X-Amz-Signature=" in state["images"][0]["url"]

