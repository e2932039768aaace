"""Resize without a model: Lanczos to the item's ``width`` x ``height``."""

from __future__ import annotations

from PIL import Image

from controlplane.errors import StageFailed
from controlplane.policy import EngineSpec
from engines.base import Engine, StageItem


class ResizeEngine(Engine):
    """Resizes every input image of every item; returns them in order."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec

    def run(self, items: list[StageItem]) -> list[list[Image.Image]]:
        out = []
        for item in items:
            if not item.images:
                raise StageFailed(f"resize: job {item.job_id} has no input image")
            size = (item.width, item.height)
            out.append([im.resize(size, Image.Resampling.LANCZOS) for im in item.images])
        return out
