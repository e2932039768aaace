"""A tiny model registry built once per test session, and engine helpers."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from controlplane.policy import EngineSpec
from controlplane.registry import Registry
from engines.base import Engine
from engines.factory import build_engine
from engines.tiny_models import make_tiny

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    registry = Registry(tmp_path_factory.mktemp("registry"))
    make_tiny(registry)
    return registry


EngineMaker = Callable[..., Engine]


@pytest.fixture
def make_engine(tiny_registry: Registry) -> Iterator[EngineMaker]:
    """Build engines from spec fields; every engine is closed after the test."""
    built: list[Engine] = []

    def make(kind: str, model: str | None = None, version: str = "1", **fields: object) -> Engine:
        spec = EngineSpec.model_validate({"kind": kind, "model": model, **fields})
        engine = build_engine(spec, registry=tiny_registry, model_version=version, device="cpu")
        built.append(engine)
        return engine

    yield make
    for engine in built:
        engine.close()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(pixels(a), pixels(b))


def max_diff(a: Image.Image, b: Image.Image) -> int:
    assert a.size == b.size
    return int(np.abs(pixels(a) - pixels(b)).max())


@pytest.fixture
def source_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
