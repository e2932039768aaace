"""The one way a job record changes: a planned change, applied by one atomic script.

A caller hands :meth:`Transitions.apply` the job as it last saw it (revision N) and a
*plan*: a function that makes the change on a copy, checked against the state machines
of ``controlplane.jobs``, and returns the :class:`Change` (the new record, its events, the
stage entries to queue, counters, acknowledgements, whether to publish the job), or None
when there is nothing to do (the job ended meanwhile, the stage was taken over).

The script (:data:`SCRIPT`, loaded once and called by SHA) writes all of it only while the
record is still at revision N, and remembers the call's transition id (its name, N and a
token of the call) with the job, so the same call sent again after a lost reply changes
nothing: never a second entry, count or event. A record that moved on comes back with
the refusal, and the plan runs again on it, at most ``MAX_PLANS`` times. One call is one
round trip::

    applied = await transitions.apply(job, f"start:{stage}", plan)
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from controlplane import keys, route_counters
from controlplane.errors import Conflict, NotFound
from controlplane.jobs import Event, Job, JobStatus, StageStatus, now_ms
from controlplane.metrics_store import record_job_outcome
from controlplane.stage_messages import StageMessage

#: how often a plan is re-run on a record that changed under it before giving up
MAX_PLANS = 8
#: sends of one call when the connection fails (the same call: replaying it is a no-op).
#: A reply that timed out is not sent again: the server is not answering, and the
#: client's socket timeout is the whole wait its caller allowed (the API answers 503).
SEND_TRIES = 3
EVENTS_TTL_S = 7 * 24 * 3600

#: KEYS: job record, applied transition ids, events stream.
#: ARGV: transition id, expected revision ('' = create), new record, record TTL s,
#: events TTL s, events [[kind, data, ts]], stage entries [[stream, field, value, ...]]
#: (each gets the new record as its ``record`` field), effects [[COMMAND, arg, ...]],
#: publish channel ('' = none), bound key ('' = none), bound, bound measure ('count': the
#: key is a counter, 'xlen': a stream whose length is bounded).
SCRIPT = """
local record, applied, events = KEYS[1], KEYS[2], KEYS[3]
if redis.call('SISMEMBER', applied, ARGV[1]) == 1 then
  return {'replayed', redis.call('GET', record)}
end
local current = redis.call('GET', record)
if ARGV[2] == '' then
  if current then return {'replayed', current} end
elseif not current then
  return {'missing', false}
elseif string.match(current, '^{"rev":(%d+),') ~= ARGV[2] then
  return {'conflict', current}
end
if ARGV[10] ~= '' then
  local count
  if ARGV[12] == 'xlen' then count = redis.call('XLEN', ARGV[10])
  else count = tonumber(redis.call('GET', ARGV[10]) or '0') end
  if count >= tonumber(ARGV[11]) then return {'full', tostring(count)} end
end
local effects = cjson.decode(ARGV[8])
local allowed = {XADD=1, XACK=1, XDEL=1, INCRBY=1, DECRBY=1, EXPIRE=1, HINCRBY=1,
                 HINCRBYFLOAT=1, LPUSH=1, LTRIM=1, SET=1, PUBLISH=1, ZADD=1}
for _, command in ipairs(effects) do
  if not allowed[command[1]] then
    return redis.error_reply('transition: command not allowed: ' .. command[1])
  end
end
redis.call('SET', record, ARGV[3], 'EX', ARGV[4])
redis.call('SADD', applied, ARGV[1])
redis.call('EXPIRE', applied, ARGV[4])
local listed = cjson.decode(ARGV[6])
for _, e in ipairs(listed) do
  redis.call('XADD', events, '*', 'kind', e[1], 'data', e[2], 'ts', e[3])
end
if #listed > 0 then redis.call('EXPIRE', events, ARGV[5]) end
for _, entry in ipairs(cjson.decode(ARGV[7])) do
  table.insert(entry, 2, '*')
  table.insert(entry, 'record')
  table.insert(entry, ARGV[3])
  redis.call('XADD', unpack(entry))
end
for _, command in ipairs(effects) do redis.call(unpack(command)) end
if ARGV[9] ~= '' then redis.call('PUBLISH', ARGV[9], ARGV[3]) end
return {'applied', false}
"""


class Effects:
    """Redis writes that go with a transition, applied by the script after the record.

    The method names follow redis-py's, so the counter helpers write to either this or a
    plain pipeline (:meth:`send`) for writes that go with no job change.
    """

    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    def _add(self, *args: object) -> None:
        self.commands.append([str(a) for a in args])

    def incr(self, key: str, amount: int = 1) -> None:
        self._add("INCRBY", key, amount)

    def decr(self, key: str, amount: int = 1) -> None:
        self._add("DECRBY", key, amount)

    def expire(self, key: str, seconds: int) -> None:
        self._add("EXPIRE", key, int(seconds))

    def hincrby(self, key: str, name: str, amount: int = 1) -> None:
        self._add("HINCRBY", key, name, amount)

    def hincrbyfloat(self, key: str, name: str, amount: float) -> None:
        self._add("HINCRBYFLOAT", key, name, repr(float(amount)))

    def lpush(self, key: str, value: object) -> None:
        self._add("LPUSH", key, value)

    def ltrim(self, key: str, start: int, end: int) -> None:
        self._add("LTRIM", key, start, end)

    def set(self, key: str, value: object, *, ex: int) -> None:
        self._add("SET", key, value, "EX", ex)

    def publish(self, channel: str, message: object) -> None:
        self._add("PUBLISH", channel, message)

    def zadd(self, key: str, mapping: Mapping[str, int]) -> None:
        self._add("ZADD", key, *[v for member, score in mapping.items()
                                 for v in (int(score), member)])

    def xack(self, stream: str, group: str, entry_id: bytes | str) -> None:
        self._add("XACK", stream, group, _text(entry_id))

    def xdel(self, stream: str, entry_id: bytes | str) -> None:
        self._add("XDEL", stream, _text(entry_id))

    def xadd(self, stream: str, fields: Mapping[str, object], *,
             maxlen: int | None = None) -> None:
        trim = ["MAXLEN", "~", maxlen] if maxlen is not None else []
        self._add("XADD", stream, *trim, "*", *[v for kv in fields.items() for v in kv])

    async def send(self, redis: aioredis.Redis) -> None:
        """Apply the writes in one round trip, without a job change (e.g. a refusal count)."""
        if not self.commands:
            return
        async with redis.pipeline(transaction=False) as pipe:
            for command in self.commands:
                pipe.execute_command(*command)
            await pipe.execute()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class Change:
    """A planned change of one job: the new record and everything written with it."""

    job: Job
    events: list[Event] = field(default_factory=list)
    effects: Effects = field(default_factory=Effects)
    #: stage entries to queue: (stream, message); each carries the new record
    entries: list[tuple[str, StageMessage]] = field(default_factory=list)
    #: publish the new record on ``JOB_DONE_CHANNEL`` (waiting requests wake on it)
    publish: bool = False

    def event(self, kind: str, **data: object) -> None:
        self.events.append(Event(kind, dict(data)))

    def enqueue(self, stage: int) -> None:
        """Queue stage ``stage`` on its engine's lane for the job's tier."""
        record = self.job.stages[stage]
        record.transition(StageStatus.queued)
        record.enqueued_at_ms = now_ms()
        stream = keys.engine_stream(record.engine, self.job.request.tier)
        message = StageMessage(self.job.id, stage, self.job.trace_context,
                               record.enqueued_at_ms)
        self.entries.append((stream, message))

    def finish(self, status: JobStatus, **data: object) -> None:
        """End the job: its final event, the route's counters, and the publication."""
        self.job.transition(status)
        route_counters.on_finish(self.effects, self.job.route)
        record_job_outcome(self.effects, route=self.job.route, status=status.value)
        self.event(status.value, status=status.value, error=self.job.error, **data)
        self.publish = True


Plan = Callable[[Job], Change | None]
"""Makes a change on a copy of the job; None when there is nothing to do."""


@dataclass(frozen=True)
class Bound:
    """Refuse a new job while the counter at ``key`` (or, with ``measure="xlen"``, the
    length of the stream at ``key``) is at ``limit`` or above."""

    key: str
    limit: int
    measure: Literal["count", "xlen"] = "count"


@dataclass(frozen=True)
class Applied:
    """The record after a transition, and whether this call changed it."""

    job: Job
    changed: bool


@dataclass(frozen=True)
class Created:
    #: the counter of a bound that refused the job (None: the job was created)
    full_at: int | None = None

    @property
    def created(self) -> bool:
        return self.full_at is None


class Transitions:
    def __init__(self, redis: aioredis.Redis, *, job_ttl_s: int,
                 events_ttl_s: int = EVENTS_TTL_S) -> None:
        self.redis = redis
        self.job_ttl_s = job_ttl_s
        self.events_ttl_s = events_ttl_s
        self._script = redis.register_script(SCRIPT)

    async def create(self, change: Change, *, bound: Bound | None = None) -> Created:
        """Write a new job (``change.job``) and its writes, unless ``bound`` refuses it."""
        status, current = await self._send("create", None, change, bound)
        if status == "full":
            return Created(full_at=int(current))
        return Created()

    async def apply(self, job: Job, name: str, plan: Plan) -> Applied:
        """Apply ``plan`` to ``job`` (as the caller last saw it); ``changed`` is False when
        the plan found nothing to do. Raises NotFound for a job that is gone."""
        token = secrets.token_hex(6)  # tells this call's resends from another caller's
        for _ in range(MAX_PLANS):
            change = plan(job.model_copy(deep=True))
            if change is None:
                return Applied(job, changed=False)
            change.job.rev = job.rev + 1
            status, current = await self._send(f"{name}@{job.rev}/{token}", job.rev, change,
                                               None)
            if status == "applied":
                return Applied(change.job, changed=True)
            if status == "missing":
                raise NotFound(f"job {job.id!r} does not exist")
            if status == "replayed":
                return Applied(Job.model_validate_json(current), changed=True)
            job = Job.model_validate_json(current)  # conflict: plan again on what is there
        raise Conflict(f"job {job.id}: the record kept changing while {name} was applied")

    async def _send(self, transition_id: str, expected_rev: int | None, change: Change,
                    bound: Bound | None) -> tuple[str, Any]:
        job = change.job
        args = [
            transition_id, "" if expected_rev is None else str(expected_rev),
            job.model_dump_json(), str(self.job_ttl_s), str(self.events_ttl_s),
            json.dumps([e.encoded() for e in change.events]),
            json.dumps([[stream, *_flat(m.fields())] for stream, m in change.entries]),
            json.dumps(change.effects.commands),
            keys.JOB_DONE_CHANNEL if change.publish else "",
            bound.key if bound else "", str(bound.limit) if bound else "0",
            bound.measure if bound else "count",
        ]
        script_keys = [keys.job(job.id), keys.job_transitions(job.id), keys.job_events(job.id)]
        async for attempt in AsyncRetrying(
                stop=stop_after_attempt(SEND_TRIES), wait=wait_exponential(min=0.05, max=0.5),
                retry=retry_if_exception_type(RedisConnectionError),
                reraise=True):
            with attempt:
                status, current = await self._script(keys=script_keys, args=args)
        return status.decode(), current


def _flat(fields: Mapping[Any, Any]) -> list[str]:
    return [str(v) for kv in fields.items() for v in kv]
