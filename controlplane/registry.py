"""The model registry on disk: ``ROOT/MODEL/VERSION/`` folders with a ``laneway.json`` manifest.

Each version folder is a diffusers ``save_pretrained`` folder (or a LoRA folder), safetensors
only. The manifest records the sha256 of every file in the folder, so a loader can refuse a
folder that changed after it was registered::

    registry = Registry(Path("/models"))
    path = registry.verified_path("tiny-sdxl", "2")   # raises RegistryError if tampered
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from controlplane.errors import RegistryError

MANIFEST_NAME = "laneway.json"
PICKLE_SUFFIXES = frozenset({".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle"})

ModelKind = Literal["sdxl", "sd-latent-upscale", "sd-x4-upscale", "lora"]
WeightDType = Literal["float32", "float16", "bfloat16"]


class Manifest(BaseModel):
    """What a version folder holds; ``files`` maps every file's relative path to its sha256."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str
    kind: ModelKind
    base_model: str | None = None
    dtype: WeightDType = "float32"
    files: dict[str, str]
    created_at: str
    notes: str = ""


def _natural_key(text: str) -> list[tuple[int, int | str]]:
    """Sort key putting "2" before "10" and numbers before words."""
    return [(0, int(part)) if part.isdigit() else (1, part)
            for part in re.split(r"(\d+)", text) if part]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    """Every file under ``folder`` except the manifest, as sorted relative paths."""
    found = [p.relative_to(folder) for p in folder.rglob("*")
             if p.is_file() and p.name != MANIFEST_NAME]
    return sorted(found)


def _pickled(folder: Path) -> list[Path]:
    return [rel for rel in _files(folder) if rel.suffix.lower() in PICKLE_SUFFIXES]


class Registry:
    """A registry root; verification results are cached per process by (path, file mtimes)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._verified: dict[Path, tuple[tuple[str, int, int], ...]] = {}
        self._lock = threading.Lock()

    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def versions(self, model: str) -> list[str]:
        folder = self.root / model
        if not folder.is_dir():
            return []
        names = [p.name for p in folder.iterdir() if (p / MANIFEST_NAME).is_file()]
        return sorted(names, key=_natural_key)

    def latest_version(self, model: str) -> str | None:
        versions = self.versions(model)
        return versions[-1] if versions else None

    def manifest(self, model: str, version: str) -> Manifest:
        path = self.root / model / version / MANIFEST_NAME
        if not path.is_file():
            raise RegistryError(f"{model} version {version}: no {MANIFEST_NAME} at {path}")
        try:
            manifest = Manifest.model_validate_json(path.read_text())
        except ValidationError as exc:
            raise RegistryError(f"{model} version {version}: invalid {MANIFEST_NAME}: "
                                f"{exc.errors()[0]['loc']} {exc.errors()[0]['msg']}") from exc
        if (manifest.name, manifest.version) != (model, version):
            raise RegistryError(f"{model} version {version}: manifest names "
                                f"{manifest.name} version {manifest.version}")
        return manifest

    def verified_path(self, model: str, version: str) -> Path:
        """The version folder, after checking it holds exactly what its manifest says."""
        folder = self.root / model / version
        if not folder.is_dir():
            raise RegistryError(f"{model} version {version}: no folder {folder}")
        signature = self._signature(folder)
        with self._lock:
            if self._verified.get(folder) == signature:
                return folder
        manifest = self.manifest(model, version)
        for rel in _pickled(folder):
            raise RegistryError(f"{model} version {version}: refusing pickle-format file {rel}")
        for name, expected in manifest.files.items():
            path = folder / name
            if not path.is_file():
                raise RegistryError(f"{model} version {version}: missing file {name}")
            actual = _sha256(path)
            if actual != expected:
                raise RegistryError(f"{model} version {version}: checksum mismatch for {name} "
                                    f"(manifest {expected[:12]}…, file {actual[:12]}…)")
        unlisted = [str(rel) for rel in _files(folder) if str(rel) not in manifest.files]
        if unlisted:
            raise RegistryError(f"{model} version {version}: file {unlisted[0]} "
                                "is not in the manifest")
        with self._lock:
            self._verified[folder] = signature
        return folder

    def register(self, name: str, version: str, source_dir: Path, *, kind: ModelKind,
                 base_model: str | None = None, dtype: WeightDType = "float32", notes: str = "",
                 link: bool = False) -> Manifest:
        """Copy (or symlink each file of, with ``link``) a diffusers folder in as NAME/VERSION."""
        source_dir = Path(source_dir)
        target = self.root / name / version
        if target.exists():
            raise RegistryError(f"{name} version {version}: already registered at {target}")
        if not source_dir.is_dir():
            raise RegistryError(f"{name} version {version}: source {source_dir} is not a folder")
        for rel in _pickled(source_dir):
            raise RegistryError(f"{name} version {version}: source holds pickle-format file {rel}")
        files = _files(source_dir)
        if not any(rel.suffix == ".safetensors" for rel in files):
            raise RegistryError(f"{name} version {version}: source {source_dir} holds no "
                                ".safetensors file")
        if (kind == "lora") != (base_model is not None):
            raise RegistryError(f"{name} version {version}: base_model is required for kind "
                                f"lora and only for it (kind {kind}, base_model {base_model})")
        staging = target.with_name(f".{version}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        for rel in files:
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if link:
                dest.symlink_to((source_dir / rel).resolve())
            else:
                shutil.copy2(source_dir / rel, dest)
        manifest = Manifest(
            name=name, version=version, kind=kind, base_model=base_model, dtype=dtype,
            files={str(rel): _sha256(staging / rel) for rel in files},
            created_at=datetime.now(UTC).isoformat(timespec="seconds"), notes=notes,
        )
        (staging / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n")
        os.replace(staging, target)
        return manifest

    @staticmethod
    def _signature(folder: Path) -> tuple[tuple[str, int, int], ...]:
        entries = []
        for rel in _files(folder) + [Path(MANIFEST_NAME)]:
            try:
                stat = (folder / rel).stat()
            except FileNotFoundError:
                continue
            entries.append((str(rel), stat.st_mtime_ns, stat.st_size))
        return tuple(entries)
