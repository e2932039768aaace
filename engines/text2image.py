"""Text to image with SDXL-family pipelines (base and turbo-style distilled models).

Item ``i`` gets ``n`` images from generators seeded ``seed, seed+1, …, seed+n-1``; several
items run as one pipeline call when they share size, steps, guidance and adapter.
"""

from __future__ import annotations

from collections.abc import Hashable

from diffusers import AutoPipelineForText2Image, StableDiffusionXLPipeline
from PIL import Image

from engines.base import StageItem
from engines.pipelines import DiffusersEngine, call_sdxl


class Text2ImageEngine(DiffusersEngine):
    family = "sdxl"
    load_class = StableDiffusionXLPipeline
    view_class = AutoPipelineForText2Image
    default_steps = 30
    default_guidance = 5.0

    def group_key(self, item: StageItem) -> Hashable:
        # SDXL encodes a missing negative prompt as zeros and "" as text: never mix them
        return (super().group_key(item), item.width, item.height, item.negative_prompt is None)

    def call(self, items: list[StageItem]) -> list[list[Image.Image]]:
        return call_sdxl(self, items, width=items[0].width, height=items[0].height)
