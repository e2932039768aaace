"""Image to image and inpainting with SDXL-family pipelines, sharing the text2image weights.

Both engines load ``StableDiffusionXLPipeline`` weights (the same cache entry a text2image
engine on that model version uses) and call an img2img or inpaint view made with
``AutoPipelineFor….from_pipe``. The input is ``item.images[0]`` (and ``item.mask``); each
item gets ``n`` images seeded ``seed, seed+1, …``.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, ClassVar

from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    StableDiffusionXLPipeline,
)
from PIL import Image

from controlplane.errors import StageFailed
from engines.base import StageItem
from engines.pipelines import DiffusersEngine, call_sdxl


class Image2ImageEngine(DiffusersEngine):
    family = "sdxl"
    load_class = StableDiffusionXLPipeline
    view_class: ClassVar[Any] = AutoPipelineForImage2Image
    default_steps = 30
    default_guidance = 5.0
    default_strength = 0.5

    def strength(self, item: StageItem) -> float:
        if item.strength is not None:
            return item.strength
        return self.spec.strength if self.spec.strength is not None else self.default_strength

    def group_key(self, item: StageItem) -> Hashable:
        size = item.images[0].size if item.images else None
        return (super().group_key(item), self.strength(item), size,
                item.negative_prompt is None)

    def inputs(self, items: list[StageItem]) -> dict[str, Any]:
        for item in items:
            if not item.images:
                raise StageFailed(f"{self.label}: job {item.job_id} has no input image")
        return {"image": [it.images[0].convert("RGB") for it in items for _ in range(it.n)]}

    def call(self, items: list[StageItem]) -> list[list[Image.Image]]:
        return call_sdxl(self, items, strength=self.strength(items[0]), **self.inputs(items))


class InpaintEngine(Image2ImageEngine):
    view_class = AutoPipelineForInpainting
    default_strength = 0.99

    def inputs(self, items: list[StageItem]) -> dict[str, Any]:
        for item in items:
            if item.mask is None:
                raise StageFailed(f"{self.label}: job {item.job_id} has no mask")
            if item.images and item.mask.size != item.images[0].size:
                raise StageFailed(f"{self.label}: job {item.job_id} mask size {item.mask.size} "
                                  f"differs from image size {item.images[0].size}")
        width, height = items[0].images[0].size if items[0].images else (None, None)
        return {**super().inputs(items), "width": width, "height": height,
                "mask_image": [it.mask.convert("L") for it in items for _ in range(it.n)
                               if it.mask is not None]}
