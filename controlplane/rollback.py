"""``laneway rollback MODEL``: put a model back on a known-good version, now.

With a rollout in progress (or paused) the rollout is aborted: the canary's weight goes to 0
and every new job gets the stable version it had before. Without one, the previous stable
version (or ``to``) becomes stable. Either way one deployment write publishes a control
message, so routers pick the new version within a second; jobs already running finish on the
version they started with.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from controlplane import audit, keys, stable_history
from controlplane.deployments import Deployment, put_in
from controlplane.errors import Conflict, NotFound, ValidationFailed
from controlplane.rollouts import Phase, RolloutStore, apply_transition
from controlplane.telemetry import tracer

_tracer = tracer("laneway.controlplane")


@dataclass(frozen=True)
class RollbackResult:
    model: str
    stable_before: str
    stable_after: str
    aborted_canary: str | None


async def rollback_model(redis: aioredis.Redis, model: str, *, actor: str, reason: str,
                         now_s: float, to: str | None = None,
                         known_versions: list[str] | None = None) -> RollbackResult:
    """Abort ``model``'s rollout and/or make the previous (or ``to``) version stable.

    ``known_versions`` (the registry's) guards ``to`` against typos.
    """
    if to is not None and known_versions is not None and to not in known_versions:
        raise ValidationFailed.of("to", f"is not a registered version of {model} "
                                  f"(known: {', '.join(known_versions) or 'none'})", to)
    with _tracer.start_as_current_span("laneway.rollback") as span:
        span.set_attributes({"laneway.model": model, "laneway.reason": reason,
                             "laneway.to": to or ""})
        aborted = None
        rollout = await RolloutStore(redis).get(model)
        if rollout is not None and rollout.phase.is_active:
            await apply_transition(redis, rollout, Phase.aborted, now_s=now_s, actor=actor,
                                   reason=f"rollback: {reason}")
            aborted = rollout.canary
        result = await _set_stable(redis, model, to=to, actor=actor, reason=reason,
                                   after_abort=aborted)
        span.set_attribute("laneway.stable", result.stable_after)
        return result


async def _set_stable(redis: aioredis.Redis, model: str, *, to: str | None, actor: str,
                      reason: str, after_abort: str | None) -> RollbackResult:
    async with redis.pipeline(transaction=True) as pipe:
        await pipe.watch(keys.deployments(), keys.stable_history(model))
        raw = await pipe.hget(keys.deployments(), model)
        if raw is None:
            raise NotFound(f"model {model!r} has no deployment")
        current = Deployment.model_validate_json(raw)
        history = await stable_history.versions(pipe, model)  # type: ignore[arg-type]
        if to is None and after_abort is not None:
            # aborting the rollout was the rollback: stable never changed
            await audit.add(redis, audit.AuditEntry.now(
                actor, "rollback", model, reason, stable_before=current.stable,
                stable_after=current.stable, aborted_canary=after_abort))
            return RollbackResult(model, current.stable, current.stable, after_abort)
        target = to or stable_history.previous_stable(history, current.stable)
        if target is None:
            raise Conflict(f"{model} has no previous stable version to roll back to "
                           f"(stable is {current.stable}); name one with --to")
        pipe.multi()
        put_in(pipe, Deployment(model=model, stable=target))
        stable_history.change_in(pipe, history, model, current.stable, target,
                                 reason=f"rollback: {reason}")
        audit.add_in(pipe, audit.AuditEntry.now(actor, "rollback", model, reason,
                                                stable_before=current.stable,
                                                stable_after=target))
        try:
            await pipe.execute()
        except aioredis.WatchError:
            raise Conflict(f"deployment of {model!r} changed meanwhile (a concurrent admin write); "
                           "try again") from None
    return RollbackResult(model, current.stable, target, after_abort)
