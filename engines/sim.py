"""SIMULATED devices (engine kind ``sim``): for capacity planning and benchmarks only.

A sim engine generates nothing. It holds its worker slot for a service time drawn from the
policy's ``sim`` settings and returns solid magenta placeholder images of the item's size,
so queues, admission, batching, cancellation and progress can be measured on real worker
processes and the real queue without a GPU::

    engines:
      gpu-draft:
        kind: sim
        steps: 4
        sim: {mean_ms: 200, jitter: 0.1, dist: lognormal}

Service time of one call on ``k`` images (the items' ``n`` summed)::

    draw(mean_ms * item_steps / spec_steps) + per_item_ms * (k - 1)

``mean_ms`` is the time at the engine's own ``steps``; a stage asking for other steps
scales it (diffusion time is proportional to steps), which lets one engine serve stages
of different lengths. The draw is reproducible: its random generator is seeded from the
first item's seed, steps and size. The run reports ``on_step(step, steps)`` to every item
at evenly spaced points of the service time (every ``STEP_MS`` when the engine has no
steps); a callback that raises stops the call at once, as with a diffusers pipeline.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

from PIL import Image

from controlplane.policy import EngineSpec, SimService
from engines.base import Engine, StageItem

#: progress interval of engines without denoising steps
STEP_MS = 50.0
#: lognormal draws are clipped to this many standard deviations of the underlying normal
CLIP_SIGMAS = 3.0
#: the placeholder colour: magenta, the conventional "not a real texture" marker
SIMULATED_COLOUR = (255, 0, 255)


def service_bounds_ms(sim: SimService, mean_ms: float) -> tuple[float, float]:
    """The smallest and largest draw for a configured mean (equal for ``dist: fixed``)."""
    if sim.dist == "fixed" or sim.jitter == 0:
        return mean_ms, mean_ms
    sigma = math.sqrt(math.log1p(sim.jitter ** 2))
    mu = math.log(mean_ms) - sigma ** 2 / 2
    return math.exp(mu - CLIP_SIGMAS * sigma), math.exp(mu + CLIP_SIGMAS * sigma)


def draw_ms(sim: SimService, mean_ms: float, rng: random.Random) -> float:
    """One service time with mean ``mean_ms`` and coefficient of variation ``jitter``."""
    if sim.dist == "fixed" or sim.jitter == 0:
        return mean_ms
    sigma = math.sqrt(math.log1p(sim.jitter ** 2))
    mu = math.log(mean_ms) - sigma ** 2 / 2
    z = max(-CLIP_SIGMAS, min(CLIP_SIGMAS, rng.gauss(0.0, 1.0)))
    return math.exp(mu + sigma * z)


class SimEngine(Engine):
    """Holds the slot for a drawn service time; returns labelled placeholder images.

    ``clock`` and ``sleep`` are injectable so tests need not wait for real.
    """

    def __init__(self, spec: EngineSpec, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if spec.sim is None:
            raise ValueError("engines of kind sim need 'sim: {mean_ms: ...}'")
        self.spec = spec
        self.sim: SimService = spec.sim
        self._clock = clock
        self._sleep = sleep

    def _steps_of(self, item: StageItem) -> int | None:
        return item.steps or self.spec.steps

    def mean_ms(self, item: StageItem) -> float:
        """The configured mean, scaled to the item's steps when they differ from the spec's."""
        steps = self._steps_of(item)
        if self.spec.steps and steps:
            return self.sim.mean_ms * steps / self.spec.steps
        return self.sim.mean_ms

    def service_ms(self, items: list[StageItem]) -> float:
        """The service time of one call on ``items`` (reproducible for the same items)."""
        first = items[0]
        rng = random.Random(f"{first.seed}:{self._steps_of(first)}:{first.width}x{first.height}")
        images = sum(item.n for item in items)
        return draw_ms(self.sim, self.mean_ms(first), rng) + self.sim.per_item_ms * (images - 1)

    def run(self, items: list[StageItem]) -> list[list[Image.Image]]:
        if not items:
            return []
        service_s = self.service_ms(items) / 1000
        steps = self._steps_of(items[0]) or max(1, round(service_s * 1000 / STEP_MS))
        started = self._clock()
        for step in range(1, steps + 1):
            remaining_s = started + service_s * step / steps - self._clock()
            if remaining_s > 0:
                self._sleep(remaining_s)
            for item in items:
                item.on_step(step, steps)
        return [[Image.new("RGB", (item.width, item.height), SIMULATED_COLOUR)
                 for _ in range(item.n)] for item in items]
