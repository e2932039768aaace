"""Issue 11, acceptance 5: ``laneway serve`` on the production policy (``float16`` engines)
on this CPU machine never fails a stage because of its device — here a copy of
``policies/default.yaml`` pointing at the tiny models, every dtype kept."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.registry import Registry
from tests.conftest import REPO
from tests.service import Service

pytestmark = pytest.mark.slow

#: the production names of policies/default.yaml → the tiny builds (same architectures)
TINY_NAMES = {"model: sdxl-turbo": "model: tiny-sdxl-turbo",
              "model: sdxl-base": "model: tiny-sdxl",
              "model: sd-x2-latent-upscaler": "model: tiny-latent-upscaler",
              "native_size: 1024": "native_size: 64", "steps: 50": "steps: 4",
              "steps: 30": "steps: 10", "steps: 20": "steps: 2"}


@pytest.fixture
def service(tiny_registry: Registry, tmp_path: Path) -> Iterator[Service]:
    text = (REPO / "policies" / "default.yaml").read_text()
    assert text.count("dtype: float16") >= 5
    for production, tiny in TINY_NAMES.items():
        assert production in text, production
        text = text.replace(production, tiny)
    policy = tmp_path / "default-on-tiny.yaml"
    policy.write_text(text)
    svc = Service(home=tmp_path / "home", registry=tiny_registry.root, policy=policy)
    svc.start()
    yield svc
    svc.stop()


@pytest.mark.parametrize("intent", ["draft", "final"])
def test_float16_engines_render_on_the_cpu(service: Service, intent: str) -> None:
    with service.client(timeout_s=180) as client:
        job = client.post("/v1/images", json={
            "prompt": "a red kite", "intent": intent, "width": 64, "height": 64,
            "wait": 150}).json()
    assert job.get("status") == "completed", job
    assert all(stage["status"] == "completed" for stage in job["stages"]), job["stages"]
    assert "float16 does not run on cpu; loading it as float32" in (
        service.log_path.read_text() if service.log_path else "")
