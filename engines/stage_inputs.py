"""Turn a job's stage into the engine's input: sizes, settings and input images."""

from __future__ import annotations

from controlplane.policy import EngineSpec, Policy, Stage
from engines.artifacts import ArtifactStore
from engines.base import LoraRef, StageItem, StepCallback
from router.jobs import Job


def stage_size(job: Job, policy: Policy, stage_index: int) -> tuple[int, int]:
    """Output size of a stage: the request's target unless the stage says otherwise.

    ``size: native`` keeps the input's size (or the request's for a first stage),
    ``scale: S`` multiplies the previous stage's output size, and ``size: target`` (the
    default for stages without ``scale``) resizes to what the client asked for.
    """
    target = (job.request.width, job.request.height)
    route = policy.route(job.route)
    stage = route.stages[stage_index]
    if stage_index == 0:
        return target
    previous = stage_size(job, policy, stage_index - 1)
    if stage.scale is not None:
        return int(previous[0] * stage.scale), int(previous[1] * stage.scale)
    if stage.size == "native":
        return previous
    return target


def stage_steps(job: Job, policy: Policy, stage_index: int) -> int | None:
    """Denoising steps of a stage: the route stage's own, else its engine's."""
    stage = policy.route(job.route).stages[stage_index]
    return stage.steps or policy.engines[stage.engine].steps


def build_item(job: Job, policy: Policy, stage_index: int, artifacts: ArtifactStore,
               *, on_step: StepCallback) -> StageItem:
    route = policy.route(job.route)
    stage: Stage = route.stages[stage_index]
    spec: EngineSpec = policy.engines[stage.engine]
    request = job.request
    width, height = stage_size(job, policy, stage_index)
    images = []
    if stage_index > 0:
        previous_n = request.n
        images = [artifacts.load(artifacts.stage_path(job.id, stage_index - 1, i))
                  for i in range(previous_n)]
    elif request.has_image:
        images = [artifacts.load(artifacts.input_path(job.id, "image"))]
    mask = artifacts.load(artifacts.input_path(job.id, "mask")) if request.has_mask else None
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
