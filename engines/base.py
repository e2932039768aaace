"""The engine interface: what a worker hands an engine and what it gets back.

An engine runs one *stage* of a route for a batch of items (a batch of one for engines
without ``max_batch``). It is built once per worker slot, owns its pipeline state, and is
only ever called by one thread at a time.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

StepCallback = Callable[[int, int], None]
"""Called after each denoising step with ``(step, steps)``; raising stops the run."""


def _no_progress(step: int, steps: int) -> None:
    return None


@dataclass(frozen=True)
class LoraRef:
    id: str
    version: str
    scale: float = 1.0


@dataclass
class StageItem:
    """One job's share of a stage: its request, its inputs and the stage's settings."""

    job_id: str
    prompt: str
    width: int
    height: int
    seed: int
    n: int = 1
    negative_prompt: str | None = None
    steps: int | None = None
    guidance: float | None = None
    strength: float | None = None
    images: list[Image.Image] = field(default_factory=list)
    mask: Image.Image | None = None
    lora: LoraRef | None = None
    params: dict[str, Any] = field(default_factory=dict)
    on_step: StepCallback = _no_progress

    def batch_key(self) -> tuple[Any, ...]:
        """Items with equal keys may share one pipeline call."""
        lora = (self.lora.id, self.lora.version, self.lora.scale) if self.lora else None
        return (self.width, self.height, self.steps, self.guidance, self.strength, lora,
                tuple(sorted(self.params.items())), self.n,
                tuple(im.size for im in self.images))


class Engine(abc.ABC):
    """A loaded model that turns stage items into images."""

    #: registry model name and version this instance was loaded from ("" for no model)
    model: str = ""
    model_version: str = ""
    #: the policy's name for the engine this instance serves (set by ``build_engine``)
    name: str = ""

    @abc.abstractmethod
    def run(self, items: list[StageItem]) -> list[list[Image.Image]]:
        """Run one pipeline call for ``items``; return one list of images per item, in order."""

    def close(self) -> None:
        """Release what the engine holds (pipelines, adapters)."""
        return None
