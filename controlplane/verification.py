"""Verdicts and the ``verification`` object of a job (CONTRACT.md), as typed models.

A :class:`Verification` is one check's verdict (one image, or a whole attempt); a
:class:`VerificationAttempt` is one attempt as the job keeps it; :class:`JobVerification`
is the job's ``verification``: ``pending`` until the verifier commits an attempt, then the
latest attempt's verdict with every attempt's in ``attempts``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

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


class ImageVerdict(Frozen):
    """One final image's checks within an attempt."""

    index: int
    status: VerificationStatus
    typography: Typography | None = None
    quality: Quality | None = None


class VerificationAttempt(Verification):
    """One verification attempt of a job, as stored in its history."""

    seed: int
    verified_at: str
    images: list[ImageVerdict] = Field(default_factory=list)
    error: str | None = None


class JobVerification(BaseModel):
    """A job's ``verification``; fields other than ``status`` are set once verified."""

    model_config = ConfigDict(extra="forbid")

    status: VerificationStatus
    typography: Typography | None = None
    quality: Quality | None = None
    action: Action | None = None
    attempt: int | None = None
    seed: int | None = None
    verified_at: str | None = None
    images: list[ImageVerdict] = Field(default_factory=list)
    error: str | None = None
    attempts: list[VerificationAttempt] = Field(default_factory=list)

    @property
    def pending(self) -> bool:
        return self.status is VerificationStatus.pending

    def public(self) -> dict[str, Any]:
        """As clients see it: only what is known (``{"status": "pending"}`` at first)."""
        body = self.model_dump(mode="json", exclude_none=True)
        return {name: value for name, value in body.items() if value != []}

    @classmethod
    def after(cls, latest: VerificationAttempt,
              history: list[VerificationAttempt]) -> JobVerification:
        """The latest attempt's verdict, with every attempt (``history`` plus it)."""
        return cls(**{name: getattr(latest, name) for name in VerificationAttempt.model_fields
                      if name in cls.model_fields}, attempts=[*history, latest])
