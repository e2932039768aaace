"""Circuit breakers for remote engines, with their state in Redis so every worker sees it.

A circuit is ``closed`` until ``failures`` consecutive failed calls happen within
``window_s``; then it is ``open`` for ``cooldown_s`` and calls are refused at once. After
the cooldown the first caller to take the probe key (SET NX with expiry) makes the one
``half_open`` probe call: success closes the circuit, failure opens it for another
cooldown. Any success resets the failure count, so the failures are consecutive::

    breaker = CircuitBreaker(redis, "hosted-turbo", spec.circuit)
    permit = breaker.acquire()          # raises EngineUnavailable while open
    try:
        images = call_provider()
    except ProviderDown:
        breaker.record_failure(permit)
        raise
    breaker.record_success(permit)

The engine thread uses this synchronous class; routers and workers choosing a fallback
ask :func:`is_open` from asyncio.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis
import redis.asyncio as aioredis
from opentelemetry import trace

from controlplane import keys
from controlplane.errors import EngineUnavailable, InternalError
from controlplane.policy import Circuit

log = logging.getLogger(__name__)


#: Count one failed call of a closed circuit, atomically: consecutive failures within the
#: window, opening the circuit at the threshold. KEYS: circuit hash; ARGV: now_s, window_s,
#: failures to open, open_until_s. Returns nil when the circuit is not closed, else
#: {failures, opened (0/1)}.
COUNT_FAILURE = """
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if state ~= 'closed' then return nil end
local now = tonumber(ARGV[1])
local failures = tonumber(redis.call('HGET', KEYS[1], 'failures') or '0')
local first = tonumber(redis.call('HGET', KEYS[1], 'first_failure_s') or '0')
if failures > 0 and now - first <= tonumber(ARGV[2]) then
  failures = failures + 1
else
  failures, first = 1, now
end
redis.call('HSET', KEYS[1], 'failures', failures, 'first_failure_s', first)
if failures >= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'state', 'open', 'open_until_s', ARGV[4])
  return {failures, 1}
end
return {failures, 0}
"""


class CircuitState(StrEnum):
    closed = "closed"
    open = "open"
    half_open = "half_open"


#: allowed state changes; ``open -> open`` re-opens after a failed probe taken from open
CIRCUIT_TRANSITIONS: dict[CircuitState, frozenset[CircuitState]] = {
    CircuitState.closed: frozenset({CircuitState.open}),
    CircuitState.open: frozenset({CircuitState.half_open}),
    CircuitState.half_open: frozenset({CircuitState.closed, CircuitState.open}),
}


@dataclass(frozen=True)
class CircuitStatus:
    state: CircuitState
    failures: int = 0
    first_failure_s: float = 0.0
    open_until_s: float = 0.0

    @classmethod
    def parse(cls, raw: Mapping[Any, Any]) -> CircuitStatus:
        def number(name: bytes) -> float:
            return float(raw.get(name, b"0"))

        return cls(state=CircuitState(raw.get(b"state", b"closed").decode()),
                   failures=int(number(b"failures")),
                   first_failure_s=number(b"first_failure_s"),
                   open_until_s=number(b"open_until_s"))

    def refuses(self, now_s: float, *, probing: bool) -> bool:
        """Whether a call now must go elsewhere (``probing``: a probe holds the key)."""
        if self.state is CircuitState.open and now_s < self.open_until_s:
            return True
        return self.state is not CircuitState.closed and probing


@dataclass(frozen=True)
class Permit:
    """Leave to make one call; ``probe`` when it is the half-open circuit's one probe."""

    probe: bool
    failures: int


class CircuitBreaker:
    def __init__(self, client: redis.Redis, engine: str, config: Circuit, *,
                 probe_ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self.redis = client
        self.engine = engine
        self.config = config
        self.probe_ttl_s = probe_ttl_s
        self.clock = clock
        self._key = keys.circuit(engine)
        self._probe_key = keys.circuit_probe(engine)
        self._count_failure = client.register_script(COUNT_FAILURE)

    def status(self) -> CircuitStatus:
        return CircuitStatus.parse(self.redis.hgetall(self._key))

    def acquire(self) -> Permit:
        """Leave for one call, or EngineUnavailable while the circuit refuses calls."""
        status = self.status()
        now_s = self.clock()
        if status.state is CircuitState.closed:
            return Permit(probe=False, failures=status.failures)
        if status.state is CircuitState.open and now_s < status.open_until_s:
            raise EngineUnavailable(
                f"engine {self.engine}: circuit open for another "
                f"{status.open_until_s - now_s:.1f} s", delay_s=status.open_until_s - now_s)
        ttl_ms = max(1, int(self.probe_ttl_s * 1000))
        if not self.redis.set(self._probe_key, "1", nx=True, px=ttl_ms):
            raise EngineUnavailable(f"engine {self.engine}: circuit half-open and its probe "
                                    "is in flight")
        if status.state is CircuitState.open:
            self._transition(status.state, CircuitState.half_open)
        return Permit(probe=True, failures=status.failures)

    def record_success(self, permit: Permit) -> None:
        if permit.probe:
            self._transition(CircuitState.half_open, CircuitState.closed, failures=0,
                             first_failure_s=0, open_until_s=0)
            self.redis.delete(self._probe_key)
        elif permit.failures:
            self.redis.hset(self._key, mapping={"failures": 0, "first_failure_s": 0})

    def record_failure(self, permit: Permit) -> None:
        now_s = self.clock()
        if permit.probe:
            self._transition(CircuitState.half_open, CircuitState.open,
                             open_until_s=now_s + self.config.cooldown_s)
            self.redis.delete(self._probe_key)
            return
        reply = self._count_failure(keys=[self._key], args=[
            f"{now_s:.6f}", str(self.config.window_s), str(self.config.failures),
            f"{now_s + self.config.cooldown_s:.6f}"])
        if reply is None:
            return  # a late failure of a call admitted before the circuit opened
        failures, opens = int(reply[0]), bool(int(reply[1]))
        if opens:
            self._announce(CircuitState.closed, CircuitState.open, failures=failures)

    def _transition(self, from_state: CircuitState, to_state: CircuitState,
                    **fields: float) -> None:
        """Apply one allowed state change, persist it, log it and mark the current span."""
        if to_state not in CIRCUIT_TRANSITIONS[from_state]:
            raise InternalError(f"circuit {self.engine}: illegal transition "
                                f"{from_state} -> {to_state}")
        mapping: dict[Any, str | float] = {"state": to_state.value, **fields}
        self.redis.hset(self._key, mapping=mapping)
        self._announce(from_state, to_state)

    def _announce(self, from_state: CircuitState, to_state: CircuitState,
                  **details: int) -> None:
        log.warning("engine %s: circuit %s -> %s %s", self.engine, from_state.value,
                    to_state.value, details or "")
        trace.get_current_span().add_event("laneway.circuit", {
            "laneway.engine": self.engine, "laneway.circuit.from": from_state.value,
            "laneway.circuit.to": to_state.value})


async def is_open(client: aioredis.Redis, engine: str, *, now_s: float | None = None) -> bool:
    """Whether ``engine``'s circuit refuses calls now (open, or half-open with its probe out)."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.circuit(engine))
        pipe.exists(keys.circuit_probe(engine))
        raw, probing = await pipe.execute()
    if not raw:
        return False
    status = CircuitStatus.parse(raw)
    return status.refuses(time.time() if now_s is None else now_s, probing=bool(probing))
