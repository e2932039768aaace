"""The verifier's verdict: the ``verification`` object of a job (CONTRACT.md)."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class VerificationStatus(StrEnum):
    pending = "pending"
    passed = "passed"
    failed = "failed"
    skipped = "skipped"


class Action(StrEnum):
    none = "none"
    regenerated = "regenerated"
    flagged = "flagged"


Limit = Literal["min", "max"]


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Typography(Frozen):
    """OCR against the requested text: one ``found`` and one score per expected phrase."""

    expected: list[str]
    found: list[str | None]
    scores: list[float]
    score: float = Field(ge=0, le=1, description="the lowest of the per-phrase scores")
    threshold: float
    passed: bool


class Metric(Frozen):
    """One quality metric; ``limit`` says whether the threshold is a minimum or a maximum."""

    value: float
    threshold: float
    limit: Limit
    passed: bool


class Quality(Frozen):
    metrics: dict[str, Metric]
    passed: bool

    @property
    def failed_metrics(self) -> list[str]:
        return [name for name, metric in self.metrics.items() if not metric.passed]


class Verification(Frozen):
    status: VerificationStatus
    typography: Typography | None = None
    quality: Quality | None = None
    action: Action = Action.none
    attempt: int = Field(default=1, ge=1)
