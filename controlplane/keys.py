"""Every Redis key, stream and channel name Laneway uses; nothing else spells them."""

from __future__ import annotations

PREFIX = "lw"

#: pub/sub channel carrying finished job records to the API processes that wait on them
JOB_DONE_CHANNEL = f"{PREFIX}:job-done"
#: pub/sub channel announcing policy/deployment changes
CONTROL_CHANNEL = f"{PREFIX}:control"

#: consumer group name on every engine stream
ENGINE_GROUP = "workers"


def job(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def job_transitions(job_id: str) -> str:
    """Set of the transition ids applied to a job (a replayed call finds its own here)."""
    return f"{PREFIX}:job:{job_id}:transitions"


def job_events(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:events"


def engine_stream(engine: str, tier: str) -> str:
    return f"{PREFIX}:lane:{engine}:{tier}"


def dead_letter_stream() -> str:
    return f"{PREFIX}:dead-letter"


def policy_current() -> str:
    return f"{PREFIX}:policy:current"


def policy_versions() -> str:
    return f"{PREFIX}:policy:versions"


#: a worker whose last heartbeat (``heartbeat_at`` of its hash) is older than this is gone
WORKER_STALE_S = 10.0


def worker_heartbeat(worker: str) -> str:
    return f"{PREFIX}:worker:{worker}"


def workers() -> str:
    return f"{PREFIX}:workers"


def idempotency(tenant: str, key: str) -> str:
    return f"{PREFIX}:idem:{tenant}:{key}"


def policy_history() -> str:
    return f"{PREFIX}:policy:history"


def deployment(model: str) -> str:
    return f"{PREFIX}:deploy:{model}"


def deployments() -> str:
    return f"{PREFIX}:deploys"


#: stream of completed jobs waiting for the verifier, and its consumer group
VERIFY_STREAM = f"{PREFIX}:verify"
VERIFY_GROUP = "verifiers"



def version_stats(model: str, version: str) -> str:
    return f"{PREFIX}:vstats:{model}:{version}"


def version_run_times(model: str, version: str) -> str:
    return f"{PREFIX}:vstats:{model}:{version}:run-ms"


#: pub/sub channel carrying ids of cancelled jobs to the workers running them
CANCEL_CHANNEL = f"{PREFIX}:cancel"


def route_inflight(route: str) -> str:
    """Accepted, unfinished jobs of a route (admission's queue bound)."""
    return f"{PREFIX}:route:{route}:inflight"


def route_drained(route: str, epoch_s: int) -> str:
    """Jobs of a route that finished in one wall-clock second (drain rate)."""
    return f"{PREFIX}:route:{route}:drained:{epoch_s}"


def stage_histograms() -> str:
    return f"{PREFIX}:metrics:stage-ms"


def job_outcomes() -> str:
    return f"{PREFIX}:metrics:jobs"


def engine_spend() -> str:
    return f"{PREFIX}:metrics:spend"


def rollouts() -> str:
    """Hash: model → its current (or last) rollout record."""
    return f"{PREFIX}:rollouts"


def controller_lock() -> str:
    """Held (with expiry) by the one process running the rollout reconcile loop."""
    return f"{PREFIX}:controller:lock"


def audit_log() -> str:
    return f"{PREFIX}:audit"


def stable_history(model: str) -> str:
    """List of the stable versions a model has had, oldest first."""
    return f"{PREFIX}:deploy:{model}:stable-history"


def admission_outcomes() -> str:
    """Admission decisions, fields ``route|tier|outcome`` (accepted/rejected/degraded/deferred)."""
    return f"{PREFIX}:metrics:admission"


def recent_jobs() -> str:
    """Stream of accepted job ids, newest last, capped (``MAXLEN ~``) at submit."""
    return f"{PREFIX}:recent-jobs"


def deferred_stream() -> str:
    """Accepted deferrable jobs waiting for interactive load to fall (entries name the job)."""
    return f"{PREFIX}:deferred"


def deferred_released(epoch_s: int) -> str:
    """Deferred jobs released in one wall-clock second (the deferred queue's drain rate)."""
    return f"{PREFIX}:deferred:released:{epoch_s}"


def deferral_lock() -> str:
    """Held (with expiry) by the one API process that releases deferred jobs."""
    return f"{PREFIX}:deferred:lock"


def artifact_expiry() -> str:
    """Sorted set: job id -> when (ms) its record expires at the earliest; the sweeper
    deletes the job's artifacts once that has passed and the record is gone."""
    return f"{PREFIX}:artifacts:expiry"


def artifact_sweeper_lock() -> str:
    """Held (with expiry) by the one process deleting expired jobs' artifacts."""
    return f"{PREFIX}:artifacts:sweeper-lock"


def circuit(engine: str) -> str:
    """A remote engine's circuit breaker state (hash: state, failures, open_until_s)."""
    return f"{PREFIX}:circuit:{engine}"


def circuit_probe(engine: str) -> str:
    """Held (SET NX with expiry) by the one call probing a half-open circuit."""
    return f"{PREFIX}:circuit:{engine}:probe"


def rate_slot(engine: str) -> str:
    """Held for 60/rpm seconds after each call to a remote engine with ``rpm``."""
    return f"{PREFIX}:rate:{engine}"
