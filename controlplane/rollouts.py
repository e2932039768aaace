"""Canary rollouts: a phase enum, an explicit transition table, and one function applying a
transition (deployment first, then the rollout record and its audit entry, in one
compare-and-set on the model's deployment revision — ``controlplane/deployment_writes.py``
— under an OpenTelemetry span).

::

    progressing ──step──▶ progressing ──▶ promoted
         │  ▲                  │
     pause  resume           abort (analysis failed, on-call, rollback)
         ▼  │                  ▼
        paused ─────────────▶ aborted

A rollout moves the model's canary weight through ``steps``; the reconcile loop
(``controlplane/reconcile.py``) decides when, from the analysis.
"""

from __future__ import annotations

from enum import StrEnum

import redis.asyncio as aioredis
from opentelemetry.trace import Status, StatusCode
from pydantic import BaseModel, ConfigDict, Field

from controlplane import audit, deployment_writes, keys, stable_history
from controlplane.deployment_writes import ModelState, ModelWrite
from controlplane.deployments import Deployment
from controlplane.errors import Conflict, NotFound, ValidationFailed
from controlplane.jobs import utc_now
from controlplane.telemetry import tracer
from controlplane.version_stats import read_stats

_tracer = tracer("laneway.controlplane")

DEFAULT_STEPS = (10.0, 25.0, 50.0, 100.0)
DEFAULT_INTERVAL_S = 60.0
DEFAULT_MIN_SAMPLES = 20


class Phase(StrEnum):
    progressing = "progressing"
    paused = "paused"
    promoted = "promoted"
    aborted = "aborted"

    @property
    def is_active(self) -> bool:
        return self in (Phase.progressing, Phase.paused)


#: allowed phase changes; progressing → progressing is a weight step
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.progressing: frozenset({Phase.progressing, Phase.paused, Phase.promoted,
                                  Phase.aborted}),
    Phase.paused: frozenset({Phase.progressing, Phase.promoted, Phase.aborted}),
    Phase.promoted: frozenset(),
    Phase.aborted: frozenset(),
}


class Thresholds(BaseModel):
    """How much worse than stable a canary may be before it is aborted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_error_rate_increase_pts: float = Field(default=5.0, ge=0)
    max_p95_ratio: float = Field(default=1.5, gt=0)
    max_pass_rate_drop_pts: float = Field(default=10.0, ge=0)


class Counts(BaseModel):
    """A version's counters when the rollout started; analysis counts what came after."""

    stages: int = 0
    errors: int = 0
    verdicts: int = 0
    verdicts_passed: int = 0


class RolloutFields(BaseModel):
    """A rollout's stored fields (``controlplane.api_models.RolloutOut`` adds ``weight``)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    stable: str
    canary: str
    steps: tuple[float, ...] = DEFAULT_STEPS
    step_index: int = 0
    interval_s: float = Field(default=DEFAULT_INTERVAL_S, gt=0)
    min_samples: int = Field(default=DEFAULT_MIN_SAMPLES, ge=1)
    thresholds: Thresholds = Thresholds()
    phase: Phase = Phase.progressing
    started_at: str
    updated_at: str
    last_step_at_s: float
    iterations: int = 0
    revision: int = 0
    message: str = ""
    baseline: dict[str, Counts] = Field(default_factory=dict)


class Rollout(RolloutFields):
    """One model's rollout as stored, with what follows from its fields."""

    @property
    def weight(self) -> float:
        """The canary's traffic share in percent while the rollout is active."""
        return self.steps[self.step_index] if self.phase.is_active else 0.0

    @property
    def is_last_step(self) -> bool:
        return self.step_index == len(self.steps) - 1


def check_steps(steps: tuple[float, ...]) -> None:
    """Refuse bad weight steps with the field named (called before a rollout exists)."""
    if not steps:
        raise ValidationFailed.of("steps", "at least one weight step is needed")
    if any(not 0 < s <= 100 for s in steps):
        raise ValidationFailed.of("steps", "weights must be in (0, 100]", list(steps))
    if any(b >= a for a, b in zip(steps[1:], steps, strict=False)):
        raise ValidationFailed.of("steps", "weights must increase", list(steps))


class RolloutStore:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def get(self, model: str) -> Rollout | None:
        raw = await self.redis.hget(keys.rollouts(), model)
        return None if raw is None else Rollout.model_validate_json(raw)

    async def require(self, model: str) -> Rollout:
        rollout = await self.get(model)
        if rollout is None:
            raise NotFound(f"model {model!r} has no rollout")
        return rollout

    async def all(self) -> list[Rollout]:
        raw = await self.redis.hgetall(keys.rollouts())
        return sorted((Rollout.model_validate_json(v) for v in raw.values()),
                      key=lambda r: r.model)


def rollout_in(state: ModelState) -> Rollout | None:
    """The rollout record of a snapshot, if the model has one."""
    raw = state.rollout_json
    return None if raw is None else Rollout.model_validate_json(raw)


def _deployment_for(rollout: Rollout, *, action: str) -> Deployment:
    """The deployment a rollout in its (new) phase implies."""
    if rollout.phase is Phase.promoted:
        return Deployment(model=rollout.model, stable=rollout.canary, last_change=action)
    if rollout.phase is Phase.aborted:
        return Deployment(model=rollout.model, stable=rollout.stable, last_change=action)
    return Deployment(model=rollout.model, stable=rollout.stable, canary=rollout.canary,
                      canary_weight=rollout.weight, last_change=action)


async def _write(redis: aioredis.Redis, state: ModelState, after: Rollout, *, action: str,
                 actor: str, reason: str) -> None:
    """Persist ``after`` with the deployment it implies, if ``state`` is still current;
    else raise Conflict. One compare-and-set: deployment (traffic moves first), stable
    history, rollout record, audit entry, control-channel message."""
    current = state.require_deployment()
    if current.stable != after.stable:
        raise Conflict(f"{after.model}: stable is {current.stable}, the rollout expected "
                       f"{after.stable}")
    history: tuple[str, ...] = ()
    if after.phase is Phase.promoted:
        history = tuple(stable_history.rows_for_change(
            state.history, after.stable, after.canary,
            reason=f"promoted by rollout: {reason}"))
    entry = audit.AuditEntry.now(actor, action, after.model, reason, phase=after.phase.value,
                                 weight=after.weight, stable=after.stable,
                                 canary=after.canary)
    await deployment_writes.commit(redis, state, ModelWrite(
        _deployment_for(after, action=action), rollout_json=after.model_dump_json(),
        history_rows=history, audit=(entry,)))


async def start_rollout(redis: aioredis.Redis, *, model: str, version: str, now_s: float,
                        actor: str, reason: str = "", steps: tuple[float, ...] = DEFAULT_STEPS,
                        interval_s: float = DEFAULT_INTERVAL_S,
                        min_samples: int = DEFAULT_MIN_SAMPLES,
                        thresholds: Thresholds | None = None) -> Rollout:
    """Start sending ``steps[0]`` percent of ``model``'s traffic to ``version``.

    Raises Conflict when the model has an active rollout, or when its deployment changed
    between this call's read and its write (a concurrent start or rollback won).
    """
    check_steps(steps)
    state = await deployment_writes.read_model_state(redis, model)
    stable = state.require_deployment().stable
    if version == stable:
        raise ValidationFailed.of("version", f"is already the stable version of {model}",
                                  version)
    stored = rollout_in(state)
    if stored is not None and stored.phase.is_active:
        raise Conflict(f"model {model!r} already has a {stored.phase} rollout "
                       f"to version {stored.canary}")
    baseline = {}
    for name in (stable, version):
        stats = await read_stats(redis, model, name)
        baseline[name] = Counts(stages=stats.stages, errors=stats.errors,
                                verdicts=stats.verdicts, verdicts_passed=stats.verdicts_passed)
    now = utc_now()
    rollout = Rollout(model=model, stable=stable, canary=version, steps=steps,
                      interval_s=interval_s, min_samples=min_samples,
                      thresholds=thresholds or Thresholds(), started_at=now, updated_at=now,
                      last_step_at_s=now_s, baseline=baseline,
                      message=f"started at {steps[0]:g}%")
    with _tracer.start_as_current_span("laneway.rollout.start") as span:
        span.set_attributes({"laneway.model": model, "laneway.stable": stable,
                             "laneway.canary": version, "laneway.weight": rollout.weight})
        await _write(redis, state, rollout, action="rollout.start", actor=actor,
                     reason=reason or rollout.message)
    return rollout


def advanced(rollout: Rollout, phase: Phase, *, now_s: float, reason: str,
             step_index: int | None = None) -> Rollout:
    """``rollout`` moved to ``phase`` (and weight step ``step_index``), not yet persisted.

    Raises Conflict for a transition the table forbids.
    """
    if phase not in TRANSITIONS[rollout.phase]:
        raise Conflict(f"rollout of {rollout.model} is {rollout.phase}; cannot move to {phase}")
    index = rollout.step_index if step_index is None else step_index
    if not 0 <= index < len(rollout.steps):
        raise ValidationFailed.of("step_index", f"must be below {len(rollout.steps)}", index)
    return rollout.model_copy(update={
        "phase": phase, "step_index": index, "updated_at": utc_now(), "message": reason,
        "last_step_at_s": now_s if phase is Phase.progressing else rollout.last_step_at_s,
        "iterations": rollout.iterations + 1, "revision": rollout.revision + 1,
    })


def check_current(state: ModelState, rollout: Rollout) -> None:
    """Raise Conflict unless ``rollout`` is the model's stored rollout as it is now."""
    stored = rollout_in(state)
    if (stored is None or stored.started_at != rollout.started_at
            or stored.revision != rollout.revision):
        raise Conflict(f"rollout of {rollout.model!r} changed meanwhile; read it again "
                       "and retry")


async def apply_transition(redis: aioredis.Redis, rollout: Rollout, phase: Phase, *,
                           now_s: float, actor: str, reason: str,
                           step_index: int | None = None) -> Rollout:
    """Move ``rollout`` to ``phase`` (and weight step ``step_index``), persisted and audited.

    Raises Conflict for a transition the table forbids or when the stored rollout (or the
    model's deployment) changed since ``rollout`` was read.
    """
    after = advanced(rollout, phase, now_s=now_s, reason=reason, step_index=step_index)
    is_step = phase is Phase.progressing and rollout.phase is Phase.progressing
    action = "rollout.step" if is_step else f"rollout.{phase}"
    with _tracer.start_as_current_span("laneway.rollout.transition") as span:
        span.set_attributes({
            "laneway.model": rollout.model, "laneway.from_phase": rollout.phase.value,
            "laneway.to_phase": phase.value, "laneway.weight": after.weight,
            "laneway.canary": rollout.canary, "laneway.reason": reason,
        })
        try:
            state = await deployment_writes.read_model_state(redis, rollout.model)
            check_current(state, rollout)
            await _write(redis, state, after, action=action, actor=actor, reason=reason)
        except Conflict as exc:
            span.set_status(Status(StatusCode.ERROR, exc.message))
            raise
    return after
