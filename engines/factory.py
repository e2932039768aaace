"""Building an engine from its policy spec: one builder per engine kind.

``BUILDERS`` is the dispatch table, one entry per :class:`EngineKind` (a test holds it to
that)::

    engine = build_engine(spec, registry=registry, model_version="2", device="cpu",
                          redis_url=settings.redis_url)
"""

from __future__ import annotations

from collections.abc import Callable

from controlplane.policy import EngineKind, EngineSpec
from controlplane.registry import Registry
from engines.base import Engine
from engines.image2image import Image2ImageEngine, InpaintEngine
from engines.openai_images import build_openai_images
from engines.resize import ResizeEngine
from engines.sim import SimEngine
from engines.text2image import Text2ImageEngine
from engines.upscalers import LatentUpscaleEngine, X4UpscaleEngine

EngineBuilder = Callable[[EngineSpec, Registry, str, str, str | None], Engine]
"""``(spec, registry, model_version, device, redis_url) -> Engine``."""


def _diffusers(engine_class: type[Text2ImageEngine] | type[Image2ImageEngine]
               | type[LatentUpscaleEngine] | type[X4UpscaleEngine]) -> EngineBuilder:
    def build(spec: EngineSpec, registry: Registry, model_version: str, device: str,
              redis_url: str | None) -> Engine:
        return engine_class(spec, registry=registry, model_version=model_version, device=device)

    return build


BUILDERS: dict[EngineKind, EngineBuilder] = {
    EngineKind.text2image: _diffusers(Text2ImageEngine),
    EngineKind.image2image: _diffusers(Image2ImageEngine),
    EngineKind.inpaint: _diffusers(InpaintEngine),
    EngineKind.latent_upscale: _diffusers(LatentUpscaleEngine),
    EngineKind.upscale: _diffusers(X4UpscaleEngine),
    EngineKind.resize: lambda spec, registry, model_version, device, redis_url: ResizeEngine(
        spec),
    EngineKind.sim: lambda spec, registry, model_version, device, redis_url: SimEngine(spec),
    EngineKind.openai_images: build_openai_images,
}


def build_engine(spec: EngineSpec, *, registry: Registry, model_version: str,
                 device: str, name: str = "", redis_url: str | None = None) -> Engine:
    """The engine for ``spec``, loaded from ``registry`` at ``model_version`` on ``device``.

    ``name`` is the policy's name for the engine; remote engines key their circuit
    breaker and rate limit by it, and keep them in Redis at ``redis_url``.
    """
    engine = BUILDERS[spec.kind](spec, registry, model_version, device, redis_url)
    engine.name = name
    return engine
