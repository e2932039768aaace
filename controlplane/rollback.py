"""``laneway rollback MODEL``: put a model back on a known-good version, now.

With a rollout in progress (or paused) the rollout is aborted: the canary's weight goes to 0
and every new job gets the stable version it had before (or ``to``). Without one, the
previous stable version (or ``to``) becomes stable. Either way it is one compare-and-set
write of the model's deployment (``controlplane/deployment_writes.py``) that publishes a
control message, so routers pick the new version within a second; jobs already running
finish on the version they started with.

Rollback is idempotent: when nothing is in progress and the model already sits where a
rollback or an abort left it (or on ``to``), it changes nothing — no deployment write, no
audit entry — and answers "already at VERSION". A second rollback never walks further
back; name an older version with ``to`` for that.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from controlplane import audit, deployment_writes, stable_history
from controlplane.deployment_writes import ModelState, ModelWrite
from controlplane.deployments import Deployment
from controlplane.errors import Conflict, ValidationFailed
from controlplane.rollouts import Phase, Rollout, advanced, rollout_in
from controlplane.telemetry import tracer

_tracer = tracer("laneway.controlplane")

#: the deployment's ``last_change`` values after which the stable version is the one an
#: operator chose to stay on: a second rollback leaves it there
SETTLED_BY = frozenset({"rollback", "rollout.aborted"})


@dataclass(frozen=True)
class RollbackResult:
    model: str
    stable_before: str
    stable_after: str
    aborted_canary: str | None
    #: False when the model was already where the rollback would put it
    changed: bool = True

    @property
    def message(self) -> str:
        if not self.changed:
            return f"already at {self.stable_after}"
        aborted = f", canary {self.aborted_canary} aborted" if self.aborted_canary else ""
        return f"stable {self.stable_after} (was {self.stable_before}){aborted}"


async def rollback_model(redis: aioredis.Redis, model: str, *, actor: str, reason: str,
                         now_s: float, to: str | None = None,
                         known_versions: list[str] | None = None) -> RollbackResult:
    """Abort ``model``'s rollout and/or make the previous (or ``to``) version stable.

    ``known_versions`` (the registry's) guards ``to`` against typos. Raises Conflict when
    there is no version to go back to, or when the deployment changed between this call's
    read and its write (a concurrent rollout start or rollback won; run it again).
    """
    if to is not None and known_versions is not None and to not in known_versions:
        raise ValidationFailed.of("to", f"is not a registered version of {model} "
                                  f"(known: {', '.join(known_versions) or 'none'})", to)
    with _tracer.start_as_current_span("laneway.rollback") as span:
        span.set_attributes({"laneway.model": model, "laneway.reason": reason,
                             "laneway.to": to or ""})
        state = await deployment_writes.read_model_state(redis, model)
        result = await _roll_back(redis, state, to=to, actor=actor, reason=reason,
                                  now_s=now_s)
        span.set_attributes({"laneway.stable": result.stable_after,
                             "laneway.changed": result.changed})
        return result


def _active_rollout(state: ModelState) -> Rollout | None:
    rollout = rollout_in(state)
    return rollout if rollout is not None and rollout.phase.is_active else None


def _target(state: ModelState, current: Deployment, active: Rollout | None,
            to: str | None) -> str | None:
    """The version the rollback makes stable: ``to``, else the current stable when a
    rollout is aborted or the model was settled already, else the previous stable."""
    if to is not None:
        return to
    if active is not None or current.last_change in SETTLED_BY:
        return current.stable
    return stable_history.previous_stable(state.history, current.stable)


async def _roll_back(redis: aioredis.Redis, state: ModelState, *, to: str | None,
                     actor: str, reason: str, now_s: float) -> RollbackResult:
    model, current = state.model, state.require_deployment()
    active = _active_rollout(state)
    target = _target(state, current, active, to)
    if target is None:
        raise Conflict(f"{model} has no previous stable version to roll back to "
                       f"(stable is {current.stable}); name one with --to")
    if active is None and current.canary is None and target == current.stable:
        return RollbackResult(model, current.stable, current.stable, None, changed=False)

    entries: list[audit.AuditEntry] = []
    rollout_json = None
    if active is not None:
        aborted = advanced(active, Phase.aborted, now_s=now_s, reason=f"rollback: {reason}")
        rollout_json = aborted.model_dump_json()
        entries.append(audit.AuditEntry.now(
            actor, "rollout.aborted", model, aborted.message, phase=aborted.phase.value,
            weight=aborted.weight, stable=aborted.stable, canary=aborted.canary))
    aborted_canary = active.canary if active is not None else None
    entries.append(audit.AuditEntry.now(actor, "rollback", model, reason,
                                        stable_before=current.stable, stable_after=target,
                                        aborted_canary=aborted_canary))
    history = () if target == current.stable else tuple(stable_history.rows_for_change(
        state.history, current.stable, target, reason=f"rollback: {reason}"))
    await deployment_writes.commit(redis, state, ModelWrite(
        Deployment(model=model, stable=target, last_change="rollback"),
        rollout_json=rollout_json, history_rows=history, audit=tuple(entries)))
    return RollbackResult(model, current.stable, target, aborted_canary)
