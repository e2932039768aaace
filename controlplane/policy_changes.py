"""Putting a policy in force from YAML text, and going back to an earlier one, with audit.

Used by the admin API (``laneway policy apply|rollback``) and by ``--watch``. A policy is
refused (PolicyError, with every field and line) before anything is written, so the policy
in force stays the last good one.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import redis.asyncio as aioredis

from controlplane import audit
from controlplane.deployments import DeploymentStore
from controlplane.errors import Conflict, NotFound, PolicyError
from controlplane.policy import Policy, RemoteRules, check_models, check_remote_engines
from controlplane.policy_loader import parse_policy
from controlplane.policy_store import PolicyStore
from controlplane.registry import Registry


@dataclass(frozen=True)
class PolicyApplied:
    version: str
    previous: str | None
    changed: bool


async def put_in_force(redis: aioredis.Redis, policy: Policy, registry: Registry, *,
                       remote: RemoteRules, actor: str, reason: str,
                       action: str = "policy.apply") -> PolicyApplied:
    """Apply a validated policy, giving every model it uses a stable version first.

    ``remote`` holds the operator's rules for remote engines (from this process's
    settings); every way into force passes here, a rollback to an older policy included.
    """
    missing = check_models(policy, set(await asyncio.to_thread(registry.models)))
    if missing:
        raise PolicyError(f"the policy names models that are not in the registry "
                          f"{registry.root}", details=missing)
    refused = check_remote_engines(policy, remote)
    if refused:
        raise PolicyError("the policy's remote engines break this deployment's rules",
                          details=refused)
    store = PolicyStore(redis)
    previous = await store.current_version()
    deployments = DeploymentStore(redis)
    for spec in policy.engines.values():
        if spec.is_local_model and spec.model:
            latest = await asyncio.to_thread(registry.latest_version, spec.model)
            if latest is not None:
                await deployments.ensure_stable(spec.model, latest)
    changed = await store.apply(policy, actor=actor, reason=reason)
    if changed:
        await audit.add(redis, audit.AuditEntry.now(
            actor, action, "policy", reason, version=policy.version_id,
            previous=previous or ""))
    return PolicyApplied(policy.version_id, previous, changed)


async def apply_policy_text(redis: aioredis.Redis, text: str, registry: Registry, *,
                            remote: RemoteRules, actor: str, reason: str,
                            source: str) -> PolicyApplied:
    """Validate YAML and put it in force; raise PolicyError (nothing changes) if invalid."""
    policy = parse_policy(text, source=source, remote=remote)  # errors with their lines
    return await put_in_force(redis, policy, registry, remote=remote, actor=actor,
                              reason=reason, action="policy.apply")


async def rollback_policy(redis: aioredis.Redis, registry: Registry, *,
                          remote: RemoteRules, actor: str, reason: str,
                          to: str | None = None) -> PolicyApplied:
    """Put the previously applied (or the ``to``) policy version back in force."""
    store = PolicyStore(redis)
    current = await store.current_version()
    if to is None:
        earlier = [c.version for c in await store.history() if c.version != current]
        if not earlier:
            raise Conflict("no earlier policy version to roll back to")
        to = earlier[-1]
    else:  # a unique prefix, as the history table shows them, is enough
        known = {c.version for c in await store.history()}
        matches = sorted(v for v in known if v.startswith(to))
        to = matches[0] if len(matches) == 1 else to
    policy = await store.get(to)
    if policy is None:
        raise NotFound(f"policy version {to!r} was never applied here")
    return await put_in_force(redis, policy, registry, remote=remote, actor=actor,
                              reason=reason or f"rollback to {to[:19]}",
                              action="policy.rollback")
