"""The API's event loop stays free: decoding request images and reading the model
registry happen in the thread pool, never on the loop that serves every other request."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import router.submit as submit_module
from controlplane.policy_loader import load_policy
from controlplane.registry import Registry
from tests.conftest import POLICIES
from tests.router.test_errors import router_at

ADMIN_TOKEN = "loop-free-admin"


@pytest.fixture
async def router(redis_url: str, tmp_path: Path) -> AsyncIterator[Any]:
    async with router_at(redis_url, load_policy(POLICIES / "sim_lane.yaml"), tmp_path,
                         admin_token=ADMIN_TOKEN) as running:
        yield running


def on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def recording(name: str, real: Callable[..., Any], seen: list[tuple[str, bool]]
              ) -> Callable[..., Any]:
    """``real``, noting whether each call ran on an event loop's thread."""
    def call(*args: Any, **kwargs: Any) -> Any:
        seen.append((name, on_event_loop()))
        return real(*args, **kwargs)
    return call


def png_base64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "teal").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def test_image_decode_and_registry_reads_run_off_the_event_loop(
        router: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, bool]] = []
    monkeypatch.setattr(submit_module, "decode_image",
                        recording("decode", submit_module.decode_image, seen))
    monkeypatch.setattr(Registry, "versions", recording("registry", Registry.versions, seen))

    await router.submit(intent="draft", mode="img2img", image=png_base64())
    refused = await router.submit(intent="draft", lora={"id": "no-such-adapter"})
    assert refused.status_code == 422, refused.text
    listed = await router.http.get("/v1/admin/models",
                                   headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert listed.status_code == 200, listed.text

    assert {name for name, _ in seen} == {"decode", "registry"}, seen
    assert not [name for name, loop in seen if loop], seen
