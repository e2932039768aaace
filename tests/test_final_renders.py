"""Issue 3 through the shipped tiny policy: the cascade, img2img/inpaint and LoRA adapters."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from controlplane.registry import Registry
from tests.conftest import REPO
from tests.service import Service


@pytest.fixture(scope="module")
def service(tiny_registry: Registry, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Service]:
    svc = Service(home=tmp_path_factory.mktemp("final"), registry=tiny_registry.root,
                  policy=REPO / "policies" / "tiny.yaml")
    svc.start()
    yield svc
    svc.stop()


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def bomb_png() -> str:
    """A valid 8x8 PNG whose header claims 100000x100000 pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    raw = bytearray(buffer.getvalue())
    ihdr = bytearray(raw[12:29])  # 'IHDR' + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", 100_000, 100_000)
    raw[12:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return base64.b64encode(bytes(raw)).decode()


def post(service: Service, **body: object) -> tuple[int, dict]:
    with service.client() as client:
        response = client.post("/v1/images", json={"prompt": "a red barn", "wait": 60, **body})
    return response.status_code, response.json()


def image_of(service: Service, job: dict) -> np.ndarray:
    with service.client() as client:
        data = client.get(job["images"][0]["url"]).content
    return np.asarray(Image.open(io.BytesIO(data)))


def test_final_render_runs_the_cascade_to_the_target_size(service: Service) -> None:
    status, job = post(service, intent="final", width=96, height=80, seed=7)
    assert status == 200 and job["status"] == "completed", job
    engines = [s["engine"] for s in job["stages"]]
    assert engines == ["base", "x2-upscaler", "resize", "refine", "x2-upscaler", "resize"]
    assert all(s["status"] == "completed" for s in job["stages"])
    assert (job["images"][0]["width"], job["images"][0]["height"]) == (96, 80)
    assert image_of(service, job).shape == (80, 96, 3)


def test_img2img_and_inpaint_produce_images(service: Service) -> None:
    source = Image.new("RGB", (64, 64), (30, 120, 200))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    status, job = post(service, mode="img2img", image=b64_png(source), strength=0.5)
    assert status == 200 and job["status"] == "completed" and job["route"] == "img2img", job
    status, job = post(service, mode="inpaint", image=b64_png(source), mask=b64_png(mask))
    assert status == 200 and job["status"] == "completed" and job["route"] == "inpaint", job
    assert image_of(service, job).shape == (64, 64, 3)


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"mode": "img2img", "image": "%%%not-base64%%%"}, "image", "base64"),
    ({"mode": "img2img", "image": base64.b64encode(b"GIF89a not an image").decode()},
     "image", "PNG or JPEG"),
    ({"mode": "img2img", "image": bomb_png()}, "image", "decompression bomb"),
    ({"mode": "inpaint", "image": b64_png(Image.new("RGB", (64, 64))),
      "mask": b64_png(Image.new("L", (32, 64)))}, "mask", "32x64"),
    ({"mode": "inpaint", "image": b64_png(Image.new("RGB", (64, 64)))}, "mask", "required"),
])
def test_bad_images_are_refused_naming_the_field(service: Service, body: dict, field: str,
                                                 words: str) -> None:
    status, response = post(service, **body)
    assert 400 <= status < 500, response
    details = response["error"]["details"]
    assert any(d["field"] == field and words in d["message"] for d in details), details


def test_lora_changes_the_image_and_leaves_no_trace(service: Service) -> None:
    # auto_text runs tiny-sdxl, the adapters' base model
    body = {"intent": "auto", "seed": 1234, "prompt": 'a teal owl with a sign "HI"'}
    status, plain = post(service, **body)
    assert status == 200 and plain["status"] == "completed", plain
    status, styled = post(service, **body, lora={"id": "tiny-lora-a", "scale": 1.0})
    assert status == 200 and styled["status"] == "completed", styled
    status, again = post(service, **body)
    assert status == 200 and again["status"] == "completed", again
    first, with_lora, after = (image_of(service, j) for j in (plain, styled, again))
    assert not np.array_equal(first, with_lora)
    assert np.array_equal(first, after)


def test_unknown_adapter_is_refused_at_submit(service: Service) -> None:
    status, response = post(service, intent="draft", lora={"id": "no-such-style"})
    assert status == 422
    assert response["error"]["details"][0]["field"] == "lora.id"
    status, response = post(service, intent="draft", lora={"id": "tiny-sdxl"})
    assert status == 422  # a model, not an adapter
    status, response = post(service, intent="draft", lora={"id": "tiny-lora-a"})
    assert status == 422  # the draft route runs tiny-sdxl-turbo, not the adapter's base
    assert "base model tiny-sdxl" in response["error"]["message"]
