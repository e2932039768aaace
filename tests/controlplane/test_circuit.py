"""The circuit breaker's state machine on a real Redis, with an injected clock."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
import redis.asyncio as aioredis

from controlplane.circuit import CircuitBreaker, CircuitState, is_open
from controlplane.errors import EngineUnavailable
from controlplane.policy import Circuit


class Clock:
    def __init__(self) -> None:
        self.now_s = 1_000_000.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


def breaker(client: redis.Redis, clock: Clock, **config: float) -> CircuitBreaker:
    settings = Circuit(**{"failures": 3, "window_s": 10, "cooldown_s": 5, **config})
    return CircuitBreaker(client, "hosted", settings, probe_ttl_s=60, clock=clock)


def fail(circuit: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        circuit.record_failure(circuit.acquire())


def test_consecutive_failures_within_the_window_open_it(client: redis.Redis) -> None:
    clock = Clock()
    circuit = breaker(client, clock)
    fail(circuit, 2)
    assert circuit.status().state is CircuitState.closed
    fail(circuit, 1)
    status = circuit.status()
    assert status.state is CircuitState.open and status.open_until_s == clock.now_s + 5
    with pytest.raises(EngineUnavailable, match="circuit open for another 5.0 s") as raised:
        circuit.acquire()
    assert raised.value.delay_s == pytest.approx(5)


def test_a_success_resets_the_count(client: redis.Redis) -> None:
    circuit = breaker(client, Clock())
    fail(circuit, 2)
    circuit.record_success(circuit.acquire())
    fail(circuit, 2)
    assert circuit.status().state is CircuitState.closed


def test_failures_spread_beyond_the_window_do_not_open_it(client: redis.Redis) -> None:
    clock = Clock()
    circuit = breaker(client, clock)
    fail(circuit, 2)
    clock.now_s += 11
    fail(circuit, 2)
    assert circuit.status().state is CircuitState.closed and circuit.status().failures == 2


async def test_half_open_lets_exactly_one_probe_through(client: redis.Redis,
                                                        redis_url: str) -> None:
    clock = Clock()
    a, b = breaker(client, clock, failures=1), breaker(client, clock, failures=1)
    async_client = aioredis.Redis.from_url(redis_url)
    try:
        fail(a, 1)
        assert await is_open(async_client, "hosted", now_s=clock.now_s)
        clock.now_s += 5
        assert not await is_open(async_client, "hosted", now_s=clock.now_s)
        probe = a.acquire()
        assert probe.probe and a.status().state is CircuitState.half_open
        assert await is_open(async_client, "hosted", now_s=clock.now_s)  # probe in flight
        with pytest.raises(EngineUnavailable, match="probe is in flight"):
            b.acquire()
        a.record_failure(probe)  # the probe failed: open for another cooldown
        with pytest.raises(EngineUnavailable, match="circuit open"):
            b.acquire()
        clock.now_s += 5
        probe = b.acquire()
        b.record_success(probe)
        assert b.status().state is CircuitState.closed
        assert not b.acquire().probe
    finally:
        await async_client.aclose()


async def test_an_unknown_engine_is_closed(redis_url: str) -> None:
    async_client = aioredis.Redis.from_url(redis_url)
    try:
        assert not await is_open(async_client, "never-failed")
    finally:
        await async_client.aclose()
