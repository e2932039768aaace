from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from controlplane.errors import RegistryError
from controlplane.registry import MANIFEST_NAME, Registry


def _model_dir(path: Path, value: float = 1.0) -> Path:
    (path / "unet").mkdir(parents=True)
    save_file({"w": torch.full((4,), value)}, str(path / "unet" / "model.safetensors"))
    (path / "unet" / "config.json").write_text(json.dumps({"sample_size": 32}))
    return path


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


def test_register_copies_and_writes_manifest(registry: Registry, tmp_path: Path) -> None:
    source = _model_dir(tmp_path / "src")
    manifest = registry.register("m", "1", source, kind="sdxl", notes="first")
    folder = registry.root / "m" / "1"
    assert (folder / "unet" / "model.safetensors").is_file()
    assert not (folder / "unet" / "model.safetensors").is_symlink()
    assert set(manifest.files) == {"unet/model.safetensors", "unet/config.json"}
    assert json.loads((folder / MANIFEST_NAME).read_text())["kind"] == "sdxl"
    assert registry.manifest("m", "1") == manifest
    assert registry.verified_path("m", "1") == folder
    assert registry.models() == ["m"]


def test_register_link_symlinks_files(registry: Registry, tmp_path: Path) -> None:
    source = _model_dir(tmp_path / "src")
    registry.register("m", "1", source, kind="sdxl", link=True)
    assert (registry.root / "m" / "1" / "unet" / "model.safetensors").is_symlink()
    assert registry.verified_path("m", "1").is_dir()


def test_versions_sort_naturally(registry: Registry, tmp_path: Path) -> None:
    source = _model_dir(tmp_path / "src")
    for version in ["2", "10", "1"]:
        registry.register("m", version, source, kind="sdxl")
    assert registry.versions("m") == ["1", "2", "10"]
    assert registry.latest_version("m") == "10"
    assert registry.latest_version("absent") is None


def test_tampered_weight_is_refused_even_after_a_cached_verification(
        registry: Registry, tmp_path: Path) -> None:
    registry.register("m", "1", _model_dir(tmp_path / "src"), kind="sdxl")
    registry.verified_path("m", "1")
    weight = registry.root / "m" / "1" / "unet" / "model.safetensors"
    save_file({"w": torch.full((4,), 2.0)}, str(weight))
    with pytest.raises(RegistryError, match=r"m version 1: checksum mismatch for "
                                            r"unet/model.safetensors"):
        registry.verified_path("m", "1")


@pytest.mark.parametrize("name", ["unet/model.bin", "extra.ckpt", "vae/x.pt"])
def test_pickle_files_are_refused(registry: Registry, tmp_path: Path, name: str) -> None:
    registry.register("m", "1", _model_dir(tmp_path / "src"), kind="sdxl")
    pickled = registry.root / "m" / "1" / name
    pickled.parent.mkdir(exist_ok=True)
    pickled.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(RegistryError, match=f"m version 1: refusing pickle-format file {name}"):
        registry.verified_path("m", "1")


def test_missing_file_is_refused(registry: Registry, tmp_path: Path) -> None:
    registry.register("m", "1", _model_dir(tmp_path / "src"), kind="sdxl")
    (registry.root / "m" / "1" / "unet" / "config.json").unlink()
    with pytest.raises(RegistryError, match="m version 1: missing file unet/config.json"):
        registry.verified_path("m", "1")


def test_unknown_model_is_refused(registry: Registry) -> None:
    with pytest.raises(RegistryError, match="nope version 3: no folder"):
        registry.verified_path("nope", "3")


def test_register_refusals(registry: Registry, tmp_path: Path) -> None:
    source = _model_dir(tmp_path / "src")
    registry.register("m", "1", source, kind="sdxl")
    with pytest.raises(RegistryError, match="m version 1: already registered"):
        registry.register("m", "1", source, kind="sdxl")
    pickled = _model_dir(tmp_path / "pickled")
    (pickled / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04.")
    with pytest.raises(RegistryError, match="m version 2: source holds pickle-format file "
                                            "unet/diffusion_pytorch_model.bin"):
        registry.register("m", "2", pickled, kind="sdxl")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(RegistryError, match="m version 3: .* holds no .safetensors file"):
        registry.register("m", "3", empty, kind="sdxl")
    with pytest.raises(RegistryError, match="base_model is required for kind lora"):
        registry.register("l", "1", source, kind="lora")
    assert registry.versions("m") == ["1"]
