"""What a verification attempt does to its job: the verdict over all its images, the action
the route's ``verify`` block asks for, the ``verification`` object clients see, and the
reset of a job that is regenerated with a new seed."""

from __future__ import annotations

from controlplane.jobs import Job, JobStatus, StageRecord, StageStatus, now_ms, utc_now
from controlplane.policy import OnFail, Verify
from controlplane.verification import (
    Action,
    ImageVerdict,
    JobVerification,
    Verification,
    VerificationAttempt,
    VerificationStatus,
)

#: seed offset between generation attempts (a prime, so attempts' seeds for the n images of
#: a request, ``seed + i``, never collide with another attempt's)
REGENERATE_SEED_STEP = 1_000_003
SEED_MODULUS = 2**32


def job_verdict(per_image: list[Verification]) -> Verification:
    """The job's verdict: failed when any image failed (the first failing image's checks are
    shown), passed when every checked image passed, skipped when no check applied."""
    if not per_image:
        raise ValueError("job_verdict needs at least one image verdict, got []")
    failed = [v for v in per_image if v.status is VerificationStatus.failed]
    if failed:
        return failed[0]
    passed = [v for v in per_image if v.status is VerificationStatus.passed]
    return passed[0] if passed else per_image[0]


def decide_action(status: VerificationStatus, verify: Verify | None, *,
                  attempt: int) -> Action:
    """``regenerated`` while a failed job has attempts left under ``on_fail: regenerate``;
    ``flagged`` for a failure under ``flag`` or once regeneration is exhausted; else none."""
    if status is not VerificationStatus.failed or verify is None:
        return Action.none
    if verify.on_fail is OnFail.regenerate:
        return Action.regenerated if attempt < verify.max_attempts else Action.flagged
    if verify.on_fail is OnFail.flag:
        return Action.flagged
    return Action.none


def attempt_record(verdict: Verification, *, per_image: list[Verification], seed: int,
                   error: str | None) -> VerificationAttempt:
    """One attempt's verdict as stored in the job's history and shown in ``attempts``."""
    return VerificationAttempt(
        **verdict.model_dump(), seed=seed, verified_at=utc_now(), error=error,
        images=[ImageVerdict(index=i, status=v.status, typography=v.typography,
                             quality=v.quality) for i, v in enumerate(per_image)])


def next_seed(seed: int) -> int:
    return (seed + REGENERATE_SEED_STEP) % SEED_MODULUS


def reset_for_regeneration(job: Job, *, seed: int, timeout_s: float,
                           attempts: list[VerificationAttempt]) -> None:
    """Turn a completed job back into a queued one that generates again with ``seed``.

    Stages keep their engine, model and version (the attempt is compared like for like);
    their run records, the images and the deadline start afresh. The caller enqueues
    stage 0 in the same transaction that writes the job.
    """
    job.transition(JobStatus.queued)
    job.completed_at = None
    job.images = []
    job.error = None
    job.current_stage = 0
    job.request.seed = seed
    job.deadline_ms = now_ms() + int(timeout_s * 1000)
    job.stages = [StageRecord(engine=s.engine, model=s.model, model_version=s.model_version,
                              fallback_from=s.fallback_from, status=StageStatus.pending)
                  for s in job.stages]
    job.verification = JobVerification(status=VerificationStatus.pending,
                                       attempt=len(attempts) + 1, attempts=attempts)
