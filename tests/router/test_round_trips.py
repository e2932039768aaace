"""Redis round trips per sequential draft job, API and worker together (at most 6).

Every round trip goes through one ``send_packed_command`` call of a connection (a pipeline
is one call), so the test counts those calls in this process, where both the API (in its
server thread) and the worker (in the test's loop) run, by the task that makes them.
Periodic loops that cost the same whether or not jobs run (heartbeats, policy polling,
deferral ticks, pub/sub listeners) are not the job's cost and are left out by name.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from redis.asyncio.connection import AbstractConnection

from controlplane.policy_loader import parse_policy
from tests.router.conftest import RouterFactory

POLICY = parse_policy("""
version: 1
limits: {max_pixels: 262144, max_n: 1, max_prompt_chars: 200, default_width: 64,
         default_height: 64}
engines:
  draft: {kind: sim, steps: 1, max_concurrency: 1, sim: {mean_ms: 5, jitter: 0}}
routes:
  - name: fast_draft
    match: {intent: draft}
    stages: [{engine: draft}]
""")

#: loops that run on a timer whatever the traffic
BACKGROUND = ("_heartbeat_loop", "_cancel_listener", "LiveConfig.", "JobWaiters._listen",
              "DeferralDispatcher._run", "EngineLiveness._refresh_loop",
              "EventFanout._read_loop")
JOBS = 10
MAX_ROUND_TRIPS_PER_JOB = 6


class RoundTrips:
    """Counts ``send_packed_command`` calls by the coroutine of the task that makes them."""

    def __init__(self) -> None:
        self.by_task: Counter[str] = Counter()
        self.last_by_task: dict[str, str] = {}
        self.counting = False
        self._lock = threading.Lock()

    def record(self, command: Any) -> None:
        task = asyncio.current_task()
        name = task.get_coro().__qualname__ if task is not None else "?"  # type: ignore[union-attr]
        text = command if isinstance(command, bytes | str) else b"".join(command)
        with self._lock:
            self.last_by_task[name] = str(text[:200])
            if self.counting:
                self.by_task[name] += 1

    def job_path(self) -> int:
        return sum(n for name, n in self.by_task.items()
                   if not any(b in name for b in BACKGROUND))


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> Iterator[RoundTrips]:
    counter = RoundTrips()
    original = AbstractConnection.send_packed_command

    async def counted(self: AbstractConnection, command: Any, check_health: bool = True
                      ) -> None:
        counter.record(command)
        await original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counted)
    yield counter


async def _slot_waits(round_trips: RoundTrips) -> None:
    """Until the worker's slot is back in its blocking read (the next job's read)."""
    deadline = time.monotonic() + 10
    while True:
        last = round_trips.last_by_task.get("Worker._slot_loop", "")
        if "XREADGROUP" in last and "BLOCK" in last:
            return
        assert time.monotonic() < deadline, f"the slot never went back to waiting: {last}"
        await asyncio.sleep(0.01)


async def test_a_sequential_draft_costs_at_most_six_round_trips(
        make_router: RouterFactory, round_trips: RoundTrips) -> None:
    async with make_router(POLICY) as router:
        await router.start_worker("draft")
        for _ in range(2):  # warm: scripts loaded, policy cached, lane groups made
            warm = await router.submit(intent="draft", wait=10)
            assert warm.json()["status"] == "completed", warm.text
        await _slot_waits(round_trips)
        round_trips.counting = True
        for _ in range(JOBS):
            response = await router.submit(intent="draft", wait=10)
            assert response.status_code == 200 and response.json()["status"] == "completed"
            await _slot_waits(round_trips)
        round_trips.counting = False
    per_job = round_trips.job_path() / JOBS
    assert per_job <= MAX_ROUND_TRIPS_PER_JOB, dict(round_trips.by_task)
