"""Turn a job's stage into the engine's input: sizes, settings and input images.

Stage sizes make a cascade expressible in policy YAML. A stage's ``size`` is

* ``target`` — what the client asked for (the default of a first stage);
* ``native`` — the native size of the route's first engine (``native_size`` in the
  policy, e.g. 1024 for SDXL), at the requested aspect ratio;
* ``input`` — the size of the stage's input images (the default of later stages),
  times ``scale`` when the stage has one.

Upscalers produce their own factor whatever the item says; ``resize`` and the diffusion
engines produce exactly the item's size.
"""

from __future__ import annotations

import math

from PIL import Image

from controlplane.policy import Policy, Stage
from engines.artifacts import ArtifactStore
from engines.base import LoraRef, StageItem, StepCallback
from router.jobs import Job


def _multiple_of_8(value: float) -> int:
    return max(8, int(round(value / 8)) * 8)


def native_size(job: Job, policy: Policy) -> tuple[int, int]:
    """The route's first engine's native size, shaped to the requested aspect ratio."""
    first = policy.route(job.route).stages[0]
    side = policy.engines[first.engine].native_size
    target = (job.request.width, job.request.height)
    if side is None:
        return target
    aspect = target[0] / target[1]
    return _multiple_of_8(side * math.sqrt(aspect)), _multiple_of_8(side / math.sqrt(aspect))


def stage_size(job: Job, policy: Policy, stage: Stage, index: int,
               inputs: list[Image.Image]) -> tuple[int, int]:
    """Output size of stage ``index`` given its input images (see the module docstring)."""
    size = stage.size or ("target" if index == 0 else "input")
    if size == "target" or (size == "input" and not inputs):
        return job.request.width, job.request.height
    if size == "native":
        return native_size(job, policy)
    scale = stage.scale or 1.0
    width, height = inputs[0].size
    return _multiple_of_8(width * scale), _multiple_of_8(height * scale)


def stage_steps(job: Job, policy: Policy, stage_index: int) -> int | None:
    """Denoising steps of a stage: the route stage's own, else its engine's."""
    stage = policy.route(job.route).stages[stage_index]
    return stage.steps or policy.engines[job.stages[stage_index].engine].steps


def load_inputs(job: Job, stage_index: int, artifacts: ArtifactStore) -> list[Image.Image]:
    """The previous stage's outputs, or the request's image for a first stage."""
    if stage_index > 0:
        return [artifacts.load(artifacts.stage_path(job.id, stage_index - 1, i))
                for i in range(job.request.n)]
    if job.request.has_image:
        return [artifacts.load(artifacts.input_path(job.id, "image"))]
    return []


def build_item(job: Job, policy: Policy, stage_index: int, artifacts: ArtifactStore,
               *, on_step: StepCallback) -> StageItem:
    stage = policy.route(job.route).stages[stage_index]
    spec = policy.engines[job.stages[stage_index].engine]
    request = job.request
    images = load_inputs(job, stage_index, artifacts)
    width, height = stage_size(job, policy, stage, stage_index, images)
    mask = artifacts.load(artifacts.input_path(job.id, "mask")) if request.has_mask else None
    if mask is not None and images and mask.size != images[0].size:
        mask = mask.resize(images[0].size, Image.Resampling.NEAREST)
    lora = None
    if request.lora is not None:
        lora = LoraRef(id=request.lora.id, version=request.lora.version, scale=request.lora.scale)
    return StageItem(
        job_id=job.id,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        width=width,
        height=height,
        seed=request.seed,
        n=request.n,
        steps=stage_steps(job, policy, stage_index),
        guidance=spec.guidance,
        strength=stage.strength or request.strength or spec.strength,
        images=images,
        mask=mask,
        lora=lora,
        params={"scale": stage.scale} if stage.scale else {},
        on_step=on_step,
    )
