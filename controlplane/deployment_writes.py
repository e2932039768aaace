"""The one way a model's deployment state changes: one compare-and-set script per change.

A model's deployment record (``keys.deployments``), its rollout record (``keys.rollouts``)
and its stable history change together, and only here. A caller reads the three in one
snapshot (:func:`read_model_state`), plans the change from it, and :func:`commit` writes
it — deployment first (traffic moves), rollout record, history rows, audit entries, the
control-channel message — in one Lua script that applies it only while the deployment's
``revision`` is still the one the snapshot saw, and bumps it. Every write of the rollout
record or the history goes with a deployment write, so that one revision guards all three.

A write that lost the race raises Conflict (409) at once: no retry loop here. The caller
reads again (the controller at its next tick; an on-call command when it is run again).
The check is per model, so a write to one model never refuses another's::

    state = await read_model_state(redis, "tiny-sdxl")
    await commit(redis, state, ModelWrite(Deployment(model="tiny-sdxl", stable="1"),
                                          audit=(entry,)))
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import redis.asyncio as aioredis

from controlplane import keys, stable_history
from controlplane.audit import AUDIT_KEPT, AuditEntry
from controlplane.deployments import Deployment, control_message
from controlplane.errors import Conflict, NotFound

#: KEYS: deployments hash, rollouts hash, the model's stable history, audit log.
#: ARGV: model, expected revision, new deployment, new rollout record ('' = unchanged),
#: history rows (JSON list), audit entries (JSON list), audit entries kept, control
#: channel, control message.
SCRIPT = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return {'missing', false} end
local revision = cjson.decode(current)['revision'] or 0
if revision ~= tonumber(ARGV[2]) then return {'conflict', current} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[2], ARGV[1], ARGV[4]) end
for _, row in ipairs(cjson.decode(ARGV[5])) do redis.call('RPUSH', KEYS[3], row) end
local entries = cjson.decode(ARGV[6])
for _, row in ipairs(entries) do redis.call('RPUSH', KEYS[4], row) end
if #entries > 0 then redis.call('LTRIM', KEYS[4], -tonumber(ARGV[7]), -1) end
redis.call('PUBLISH', ARGV[8], ARGV[9])
return {'applied', false}
"""


@dataclass(frozen=True)
class ModelState:
    """A model's deployment, rollout record (JSON) and stable history, read together."""

    model: str
    deployment: Deployment | None
    rollout_json: bytes | None
    history: list[str]

    def require_deployment(self) -> Deployment:
        if self.deployment is None:
            raise NotFound(f"model {self.model!r} has no deployment (is it in the policy?)")
        return self.deployment


@dataclass(frozen=True)
class ModelWrite:
    """One planned change: the new deployment (its ``revision`` is set by :func:`commit`)
    and what goes with it."""

    deployment: Deployment
    rollout_json: str | None = None
    history_rows: tuple[str, ...] = ()
    audit: tuple[AuditEntry, ...] = ()


async def read_model_state(redis: aioredis.Redis, model: str) -> ModelState:
    """The three records of ``model`` as one consistent snapshot (MULTI/EXEC)."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hget(keys.deployments(), model)
        pipe.hget(keys.rollouts(), model)
        pipe.lrange(keys.stable_history(model), 0, -1)
        raw_deployment, raw_rollout, rows = await pipe.execute()
    deployment = (None if raw_deployment is None
                  else Deployment.model_validate_json(raw_deployment))
    return ModelState(model, deployment, raw_rollout, stable_history.versions_of(rows))


async def commit(redis: aioredis.Redis, state: ModelState, write: ModelWrite) -> Deployment:
    """Apply ``write`` if ``state.model``'s deployment is still at the snapshot's revision;
    return the deployment as written. Raises Conflict when it moved on, NotFound when the
    model has no deployment."""
    model = state.model
    before = state.require_deployment()
    assert write.deployment.model == model, (write.deployment.model, model)
    deployment = write.deployment.model_copy(update={"revision": before.revision + 1})
    script = redis.register_script(SCRIPT)
    status, _current = await script(
        keys=[keys.deployments(), keys.rollouts(), keys.stable_history(model),
              keys.audit_log()],
        args=[model, str(before.revision), deployment.model_dump_json(),
              write.rollout_json or "", json.dumps(list(write.history_rows)),
              json.dumps([e.model_dump_json() for e in write.audit]), str(AUDIT_KEPT),
              keys.CONTROL_CHANNEL, control_message(model)])
    if status == b"missing":
        raise NotFound(f"model {model!r} has no deployment")
    if status == b"conflict":
        raise Conflict(f"the deployment of {model!r} changed meanwhile (a concurrent "
                       f"admin or controller write); read it again and retry")
    return deployment
