"""A device's memory budget: engines that do not fit together are never loaded together,
the least recently used idle one goes first, ``keep_warm`` ones stay, idle ones unload."""

from __future__ import annotations

import asyncio

from controlplane.policy import EngineKind, EngineSpec
from engines.memory_budget import MemoryBudget


def spec(memory_gb: float, **fields: object) -> EngineSpec:
    return EngineSpec.model_validate({"kind": EngineKind.sim, "sim": {"mean_ms": 1},
                                      "memory_gb": memory_gb, **fields})


class Device:
    """A budget whose unloads are recorded, with the loaded set checked at each one."""

    def __init__(self, total_gb: float | None, clock: list[float] | None = None) -> None:
        self.unloaded: list[str] = []
        self.now = clock or [0.0]
        self.budget = MemoryBudget(total_gb, self.unloaded.append,
                                   clock=lambda: self.now[0])


async def test_two_engines_over_the_budget_are_never_loaded_together() -> None:
    device = Device(total_gb=2)
    a, b = spec(1.5), spec(1.5)
    async with device.budget.use("a", a):
        assert device.budget.loaded() == ["a"]
    async with device.budget.use("b", b):
        assert device.budget.loaded() == ["b"]  # a was unloaded to make room
    assert device.unloaded == ["a"]
    assert device.budget.unloads == {"a": 1}


async def test_a_running_engine_is_not_unloaded_the_other_waits() -> None:
    device = Device(total_gb=2)
    a, b = spec(1.5), spec(1.5)
    release_a = asyncio.Event()
    b_started = asyncio.Event()

    async def run_a() -> None:
        async with device.budget.use("a", a):
            await release_a.wait()

    async def run_b() -> None:
        async with device.budget.use("b", b):
            b_started.set()

    task_a = asyncio.create_task(run_a())
    await asyncio.sleep(0)
    task_b = asyncio.create_task(run_b())
    await asyncio.sleep(0.05)
    assert not b_started.is_set() and device.unloaded == []
    release_a.set()
    await asyncio.wait_for(asyncio.gather(task_a, task_b), timeout=5)
    assert b_started.is_set() and device.unloaded == ["a"]


async def test_least_recently_used_goes_first_and_keep_warm_stays() -> None:
    device = Device(total_gb=3)
    device.now[0] = 1
    async with device.budget.use("warm", spec(1, keep_warm=True)):
        pass
    device.now[0] = 2
    async with device.budget.use("old", spec(1)):
        pass
    device.now[0] = 3
    async with device.budget.use("new", spec(1)):
        pass
    device.now[0] = 4
    async with device.budget.use("more", spec(1)):
        pass
    assert device.unloaded == ["old"]
    assert device.budget.loaded() == ["more", "new", "warm"]


async def test_idle_engines_unload_after_their_idle_time() -> None:
    device = Device(total_gb=None)
    async with device.budget.use("lazy", spec(1, idle_unload_s=10)):
        pass
    async with device.budget.use("warm", spec(1, keep_warm=True, idle_unload_s=10)):
        pass
    device.now[0] = 9
    await device.budget.unload_idle()
    assert device.unloaded == []
    device.now[0] = 10
    await device.budget.unload_idle()
    assert device.unloaded == ["lazy"] and device.budget.loaded() == ["warm"]
