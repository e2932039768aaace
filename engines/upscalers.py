"""Diffusion upscalers: the x2 latent upscaler and the x4 upscaler.

An item may carry several input images (the ``n`` outputs of the previous stage); each is
upscaled and all are returned, in order. Input image ``k`` of an item uses a generator seeded
``seed + k``. Items whose inputs have one size run as one pipeline call. The output size is
the input size times the model's factor; ``item.width``/``item.height`` are not used (a
``resize`` stage fits the result to a target).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from diffusers import StableDiffusionLatentUpscalePipeline, StableDiffusionUpscalePipeline
from PIL import Image

from controlplane.errors import StageFailed
from engines.base import StageItem
from engines.pipelines import DiffusersEngine, generators, split


def _step_callback(items: list[StageItem], steps: int) -> Callable[[int, Any, torch.Tensor], None]:
    """These pipelines still take the older ``callback(step, timestep, latents)``."""

    def callback(step: int, timestep: Any, latents: torch.Tensor) -> None:
        for item in items:
            item.on_step(step + 1, steps)

    return callback


class _Upscaler(DiffusersEngine):
    """Upscales every input image of every item by the model's factor."""

    def group_key(self, item: StageItem) -> Hashable:
        sizes = {im.size for im in item.images}
        return (super().group_key(item), tuple(sorted(sizes)))

    def extra_args(self) -> dict[str, Any]:
        return {}

    def call(self, items: list[StageItem]) -> list[list[Image.Image]]:
        for item in items:
            if not item.images:
                raise StageFailed(f"{self.label}: job {item.job_id} has no input image")
            if len({im.size for im in item.images}) != 1:
                raise StageFailed(f"{self.label}: job {item.job_id} input images differ in "
                                  f"size: {[im.size for im in item.images]}")
        first = items[0]
        steps = self.steps(first)
        result = self.pipe(
            prompt=[it.prompt for it in items for _ in it.images],
            image=[im.convert("RGB") for it in items for im in it.images],
            num_inference_steps=steps, guidance_scale=self.guidance(first),
            generator=[g for it in items for g in generators(it.seed, len(it.images))],
            callback=_step_callback(items, steps), callback_steps=1,
            **self.extra_args(),
        )
        return split(result.images, [len(it.images) for it in items])


class LatentUpscaleEngine(_Upscaler):
    """x2: ``StableDiffusionLatentUpscalePipeline`` (the input is encoded with its own VAE)."""

    family = "sd-latent-upscale"
    load_class = StableDiffusionLatentUpscalePipeline
    view_class = StableDiffusionLatentUpscalePipeline
    default_steps = 20
    default_guidance = 0.0


class X4UpscaleEngine(_Upscaler):
    """x4: ``StableDiffusionUpscalePipeline`` with its default ``noise_level`` of 20."""

    family = "sd-x4-upscale"
    load_class = StableDiffusionUpscalePipeline
    view_class = StableDiffusionUpscalePipeline
    default_steps = 20
    default_guidance = 9.0
    noise_level = 20

    def extra_args(self) -> dict[str, Any]:
        return {"noise_level": self.noise_level}
