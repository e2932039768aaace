"""Which engines a worker's device holds loaded, within a memory budget.

Engines declare ``memory_gb`` (weights plus activations at their batch size). Before a
slot runs an engine whose pipelines are not loaded, :meth:`MemoryBudget.reserve` makes
room: the least recently used engine that is loaded, idle and not ``keep_warm`` is
unloaded first, and the slot waits while every candidate is running. Engines that are
not ``keep_warm`` also unload after ``idle_unload_s`` without a stage. An engine without
``memory_gb`` is not counted; a budget of None (the CPU's default) unloads only idle ones::

    budget = MemoryBudget(total_gb=24, unload=close_the_slots_engines)
    async with budget.use("sdxl", spec):
        ...  # the stage; the engine stays accounted while it runs
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from controlplane.policy import EngineSpec

log = logging.getLogger(__name__)


@dataclass
class _Loaded:
    memory_gb: float
    keep_warm: bool
    idle_unload_s: float | None
    last_used_s: float
    running: int = 0


class MemoryBudget:
    def __init__(self, total_gb: float | None, unload: Callable[[str], None], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``unload(engine)`` frees what the engine holds on the device (every slot's
        pipelines for it)."""
        self.total_gb = total_gb
        self._unload = unload
        self._clock = clock
        self._loaded: dict[str, _Loaded] = {}
        self._changed = asyncio.Condition()
        #: unloads per engine since the worker started (``/metrics``)
        self.unloads: dict[str, int] = {}

    @property
    def used_gb(self) -> float:
        return sum(entry.memory_gb for entry in self._loaded.values())

    def loaded(self) -> list[str]:
        return sorted(self._loaded)

    def fits(self, spec: EngineSpec) -> bool:
        """Whether the engine fits the device at all (the worker refuses it otherwise)."""
        return self.total_gb is None or (spec.memory_gb or 0.0) <= self.total_gb

    def snapshot(self) -> dict[str, object]:
        """What the heartbeat reports."""
        return {"used_gb": round(self.used_gb, 3), "total_gb": self.total_gb,
                "loaded": self.loaded(), "unloads": dict(self.unloads)}

    @contextlib.asynccontextmanager
    async def use(self, engine: str, spec: EngineSpec) -> AsyncIterator[None]:
        """Hold ``engine`` loaded (making room for it first) while the block runs."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._make_room(engine, spec))
            entry = self._loaded.setdefault(engine, _Loaded(
                memory_gb=spec.memory_gb or 0.0, keep_warm=spec.keep_warm,
                idle_unload_s=spec.idle_unload_s, last_used_s=self._clock()))
            entry.running += 1
        try:
            yield
        finally:
            async with self._changed:
                entry.running -= 1
                entry.last_used_s = self._clock()
                self._changed.notify_all()

    async def unload_idle(self) -> None:
        """Unload the engines idle past their ``idle_unload_s`` (the worker calls this
        every second)."""
        now = self._clock()
        async with self._changed:
            for engine, entry in list(self._loaded.items()):
                if (not entry.keep_warm and not entry.running
                        and entry.idle_unload_s is not None
                        and now - entry.last_used_s >= entry.idle_unload_s):
                    self._drop(engine, f"idle for {now - entry.last_used_s:.0f} s")
            self._changed.notify_all()

    def _make_room(self, engine: str, spec: EngineSpec) -> bool:
        """Whether ``engine`` fits now, unloading idle engines (least recently used first)
        until it does; False when it must wait for a running one."""
        if engine in self._loaded or self.total_gb is None or not spec.memory_gb:
            return True
        while self.used_gb + spec.memory_gb > self.total_gb:
            idle = [(entry.last_used_s, name) for name, entry in self._loaded.items()
                    if not entry.running and not entry.keep_warm and entry.memory_gb]
            if not idle:
                return False
            self._drop(min(idle)[1], f"to make room for {engine}")
        return True

    def _drop(self, engine: str, why: str) -> None:
        self._loaded.pop(engine)
        self._unload(engine)
        self.unloads[engine] = self.unloads.get(engine, 0) + 1
        log.info("unloaded engine %s (%s)", engine, why)
