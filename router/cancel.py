"""Cancelling a job (``DELETE /v1/jobs/{id}``): targeted, idempotent, counted once.

A queued job becomes ``cancelled`` at once and its stage entry is acknowledged unrun by
the worker that reads it (workers skip entries of final jobs); a deferred one is dropped
by the deferral loop. A running job becomes ``cancelled`` too and its id goes out on
``CANCEL_CHANNEL``, so the worker running it stops at the next denoising step and frees
the slot. The change, its event, the route's in-flight count and the outcome counter are
one transition, which only the first cancel applies::

    job, changed = await cancel_job(jobs, transitions, "j_…")
"""

from __future__ import annotations

import logging

from controlplane import keys
from controlplane.errors import NotFound
from controlplane.jobs import Job, JobStatus, JobStore, StageStatus, utc_now
from controlplane.transitions import Change, Transitions

log = logging.getLogger(__name__)

_STOPPED_STAGES = frozenset({StageStatus.pending, StageStatus.queued, StageStatus.running})


def cancelled(job: Job) -> Change | None:
    """The plan of a cancel: every unfinished stage stops; None when the job is final."""
    if job.status.is_final:
        return None
    change = Change(job)
    was = job.status
    for record in job.stages:
        if record.status in _STOPPED_STAGES:
            if record.status is StageStatus.running:
                record.finished_at = utc_now()
            record.transition(StageStatus.cancelled)
    change.finish(JobStatus.cancelled, was=was.value, stage=job.current_stage)
    # queued jobs too: a worker may have read the entry a moment ago
    change.effects.publish(keys.CANCEL_CHANNEL, job.id)
    return change


async def cancel_job(jobs: JobStore, transitions: Transitions, job_id: str, *,
                     tenant: str | None = None) -> tuple[Job, bool]:
    """Cancel ``job_id``; return the job and whether this call cancelled it.

    With ``tenant``, a job of another tenant is reported as not found.
    """
    job = await jobs.get(job_id)
    if tenant is not None and job.request.tenant != tenant:
        raise NotFound(f"job {job_id!r} does not exist")
    applied = await transitions.apply(job, "cancel", cancelled)
    if applied.changed:
        log.info("job %s: %s -> cancelled", job_id, job.status.value)
    return applied.job, applied.changed
