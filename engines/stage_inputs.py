"""Turn a job's stage into the engine's input: settings and input images (sizes by
``controlplane.stage_sizes``)."""

from __future__ import annotations

from PIL import Image

from controlplane.artifacts import ArtifactStore, input_key, stage_key
from controlplane.jobs import Job
from controlplane.policy import Policy
from controlplane.stage_sizes import stage_size, stage_steps
from engines.base import LoraRef, StageItem, StepCallback


def load_inputs(job: Job, stage_index: int, artifacts: ArtifactStore) -> list[Image.Image]:
    """The previous stage's outputs, or the request's image for a first stage."""
    if stage_index > 0:
        return [artifacts.load(stage_key(job.id, stage_index - 1, i))
                for i in range(job.request.n)]
    if job.request.has_image:
        return [artifacts.load(input_key(job.id, "image"))]
    return []


def build_item(job: Job, policy: Policy, stage_index: int, artifacts: ArtifactStore,
               *, on_step: StepCallback) -> StageItem:
    stage = policy.route(job.route).stages[stage_index]
    spec = policy.engines[job.stages[stage_index].engine]
    request = job.request
    images = load_inputs(job, stage_index, artifacts)
    width, height = stage_size(job, policy, stage, stage_index, images)
    mask = artifacts.load(input_key(job.id, "mask")) if request.has_mask else None
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
