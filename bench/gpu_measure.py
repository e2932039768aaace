"""Timing and memory plumbing for bench/gpu_pipelines.py: a run clock, repeats within a budget.

Every figure is a median over repeats after one warm-up call. A measurement repeats until it
has ``repeats`` samples or its budget is spent (with at least one sample), so the whole run
keeps to its time limit on a GPU whose speed is not known in advance; ``n`` says how many
samples a median has. On CUDA each measurement also records the allocator's peak
(``torch.cuda.max_memory_allocated``) and what the measurement added on top of what was
already allocated (``activation_gb``)::

    clock = Clock(limit_s=450)
    figures = measure(lambda: unet(*inputs), clock=clock, budget_s=4, repeats=10,
                      device="cuda")
    # {"median_ms": 71.2, "min_ms": 70.9, "max_ms": 72.0, "n": 10,
    #  "peak_gb": 9.1, "activation_gb": 1.3}
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

Figures = dict[str, Any]


@dataclass
class Clock:
    """Seconds since the run started, and how many are left of ``limit_s``."""

    limit_s: float
    started: float = field(default_factory=time.perf_counter)

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    def left_s(self) -> float:
        return self.limit_s - self.elapsed_s()

    def log(self, message: str) -> None:
        print(f"[{self.elapsed_s():6.1f} s] {message}", file=sys.stderr, flush=True)


def sync(device: str) -> None:
    """Wait for queued GPU work, so that a timer stops when the work is done."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def free(device: str) -> None:
    """Return freed blocks to the device, so the next configuration starts from its own weights."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def allocated_gb(device: str) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.memory_allocated() / 1e9


class PeakMemory:
    """The allocator's peak while the block runs, and what it added to the resident memory.

    None on the CPU, where torch keeps no such counter.
    """

    def __init__(self, device: str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.resident_gb: float | None = None
        self.peak_gb: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            sync("cuda")
            torch.cuda.reset_peak_memory_stats()
            self.resident_gb = torch.cuda.memory_allocated() / 1e9
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            sync("cuda")
            self.peak_gb = torch.cuda.max_memory_allocated() / 1e9

    def figures(self) -> Figures:
        if self.peak_gb is None or self.resident_gb is None:
            return {"peak_gb": None, "activation_gb": None}
        return {"peak_gb": round(self.peak_gb, 3),
                "activation_gb": round(self.peak_gb - self.resident_gb, 3)}


def stats_ms(samples_ms: list[float]) -> Figures:
    return {"median_ms": round(statistics.median(samples_ms), 3),
            "min_ms": round(min(samples_ms), 3), "max_ms": round(max(samples_ms), 3),
            "n": len(samples_ms)}


def skipped(reason: str) -> Figures:
    return {"skipped": reason}


def out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error)


def measure(fn: Callable[[], object], *, clock: Clock, budget_s: float, repeats: int,
            device: str, reserve_s: float = 0.0, warmup: int = 1) -> Figures:
    """Median time of ``fn`` over up to ``repeats`` calls after ``warmup`` calls (see module).

    ``reserve_s`` is kept for later measurements: the budget shrinks to what the run has left
    beyond it, and the measurement is skipped when nothing is left. Out of memory is a
    figure too: ``{"error": "out of memory", ...}``.
    """
    budget_s = min(budget_s, clock.left_s() - reserve_s)
    if budget_s <= 0:
        return skipped("time budget")
    samples_ms: list[float] = []
    memory = PeakMemory(device)
    try:
        with memory, torch.no_grad():
            for _ in range(warmup):
                fn()
            sync(device)
            started = time.perf_counter()
            while len(samples_ms) < repeats:
                t0 = time.perf_counter()
                fn()
                sync(device)
                samples_ms.append((time.perf_counter() - t0) * 1000)
                if time.perf_counter() - started > budget_s:
                    break
    except RuntimeError as error:
        if not out_of_memory(error):
            raise
        free(device)
        return {"error": "out of memory", **memory.figures(), "samples": len(samples_ms)}
    return {**stats_ms(samples_ms), **memory.figures()}


def once_ms(fn: Callable[[], object], device: str) -> float:
    """The time of one call of ``fn`` (a first call: compile, load), in ms."""
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        fn()
    sync(device)
    return round((time.perf_counter() - t0) * 1000, 3)
