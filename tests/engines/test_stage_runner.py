"""The stage runner's failure rules, on the real queue with a real worker in this process.

The engine here is a resize engine that refuses one poisoned prompt: a real pipeline has no
input that fails only inside a batch on demand, and the rule under test is the runner's.
"""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from PIL import Image

from controlplane.policy import EngineKind
from controlplane.policy_loader import parse_policy
from engines import factory
from engines.base import StageItem
from engines.resize import ResizeEngine
from tests.router.conftest import make_router  # noqa: F401 (fixture)

POLICY = parse_policy("""
version: 1
limits: {max_pixels: 65536, default_width: 32, default_height: 32}
engines:
  shrink: {kind: resize, max_batch: 4, max_wait_ms: 500}
routes:
  - name: shrink
    stages: [{engine: shrink, size: target}]
""")


class PoisonedResize(ResizeEngine):
    """Resize that raises for any call containing a poisoned prompt, and logs its calls."""

    calls: list[int] = []

    def run(self, items: list[StageItem]) -> list[list[Image.Image]]:
        PoisonedResize.calls.append(len(items))
        if any("poison" in item.prompt for item in items):
            raise RuntimeError("poisoned prompt")
        return super().run(items)


def png_b64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 90)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def test_a_failing_batch_is_retried_item_by_item(
        make_router, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811 (the fixture)
    PoisonedResize.calls = []
    monkeypatch.setitem(factory.BUILDERS, EngineKind.resize,
                        lambda spec, *args, **kwargs: PoisonedResize(spec))
    async with make_router(POLICY) as router:
        prompts = ["a", "b", "poison pill", "c"]
        responses = await asyncio.gather(*(router.submit(prompt=p, mode="img2img",
                                                         image=png_b64()) for p in prompts))
        ids = [r.json()["id"] for r in responses]
        await router.start_worker("shrink")
        jobs = [await router.wait_job(i, s, timeout_s=60)
                for i, s in zip(ids, ["completed", "completed", "failed", "completed"],
                                strict=True)]
    assert PoisonedResize.calls[0] == 4  # one batched call first ...
    assert sorted(PoisonedResize.calls[1:]) == [1, 1, 1, 1]  # ... then each item alone
    assert "poisoned prompt" in jobs[2]["error"]
    assert all(j["images"][0]["width"] == 32 for j in jobs if j["status"] == "completed")
