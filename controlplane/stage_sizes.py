"""Stage sizes and steps: the cascade's size rule, read by the workers and the verifier.

A stage's ``size`` is

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

from controlplane.jobs import Job
from controlplane.policy import Policy, Stage


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
