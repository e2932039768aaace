from __future__ import annotations

from controlplane.registry import Registry
from engines.tiny_models import make_tiny


def test_make_tiny_registers_every_model_once(tiny_registry: Registry) -> None:
    before = {m.name: m for m in make_tiny(tiny_registry)}
    assert tiny_registry.models() == sorted(
        ["tiny-sdxl", "tiny-sdxl-turbo", "tiny-latent-upscaler", "tiny-x4-upscaler",
         "tiny-lora-a", "tiny-lora-b"])
    assert tiny_registry.versions("tiny-sdxl") == ["1", "2"]
    assert before["tiny-lora-a"].kind == "lora"
    assert before["tiny-lora-a"].base_model == "tiny-sdxl"
    again = make_tiny(tiny_registry)  # idempotent: nothing rebuilt, manifests unchanged
    assert {m.name: m for m in again} == before
    for name in tiny_registry.models():
        for version in tiny_registry.versions(name):
            tiny_registry.verified_path(name, version)


def test_versions_have_different_weights(tiny_registry: Registry) -> None:
    one = tiny_registry.manifest("tiny-sdxl", "1").files
    two = tiny_registry.manifest("tiny-sdxl", "2").files
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert one[weights] != two[weights]
    assert one["unet/config.json"] == two["unet/config.json"]
