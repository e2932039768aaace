"""LoRA and torch.compile sections of bench/gpu_pipelines.py.

Eager: loading and switching two cached adapters the way ``engines.adapters`` does. Compiled:
``torch.compile(unet)`` as ``EngineSpec.compile`` does (first call, steady state), then one
adapter slot hot-swapped on the compiled UNet, with dynamo's count of compiled graphs after
each change, so a recompile shows as a count and not only as a slow step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import diffusers
import torch

from bench.gpu_measure import Clock, Figures, PeakMemory, once_ms, skipped
from bench.gpu_models import save_random_lora
from bench.gpu_sections import Models, run_measure, unet_inputs
from engines.adapters import LORA_WEIGHT_NAME
from engines.pipelines import Pipeline

if TYPE_CHECKING:
    from bench.gpu_pipelines import Plan


def _lora_folders(m: Models, work: Path) -> list[Path]:
    folders = [work / "lora-a", work / "lora-b"]
    for seed, folder in enumerate(folders):
        if not (folder / LORA_WEIGHT_NAME).exists():
            save_random_lora(m.sdxl.unet, folder, rank=m.arch.lora_rank, seed=seed)
    return folders


def _load(pipe: Pipeline, folder: Path, name: str, *, hotswap: bool = False) -> None:
    with warnings.catch_warnings():  # peft warns that a second adapter joins the first
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        pipe.load_lora_weights(folder, adapter_name=name, weight_name=LORA_WEIGHT_NAME,
                               hotswap=hotswap)


def lora_eager(m: Models, plan: Plan, clock: Clock, reserve_s: float, work: Path) -> Figures:
    """Loading and switching two adapters the way engines.adapters does, without compile."""
    if clock.left_s() - reserve_s <= 0:
        return skipped("time budget")
    clock.log(f"{m.dtype}: LoRA, eager")
    pipe = m.sdxl
    folders = _lora_folders(m, work)
    inputs = unet_inputs(m)
    figures: Figures = {"dtype": m.dtype, "rank": m.arch.lora_rank,
                        "targets": "attention q/k/v/out"}
    try:
        figures["first_load_ms"] = [once_ms(partial(_load, pipe, f, n), m.device)
                                    for f, n in zip(folders, ("a", "b"), strict=True)]
        turn = iter(range(10**9))

        def switch() -> None:
            pipe.set_adapters(["a" if next(turn) % 2 else "b"], [1.0])

        def activate() -> None:  # AdapterCache.activate on a cached adapter, body empty
            pipe.enable_lora()
            pipe.set_adapters(["a" if next(turn) % 2 else "b"], [0.8])
            pipe.disable_lora()

        figures["switch_ms"] = run_measure(m, plan, clock, reserve_s, "lora", switch)
        figures["activate_cycle_ms"] = run_measure(m, plan, clock, reserve_s, "lora", activate)
        pipe.enable_lora()
        pipe.set_adapters(["a"], [1.0])
        figures["step_with_lora_ms"] = run_measure(m, plan, clock, reserve_s, "lora",
                                            lambda: pipe.unet(**inputs, return_dict=False))
        pipe.disable_lora()
        figures["step_lora_disabled_ms"] = run_measure(m, plan, clock, reserve_s, "lora",
                                                lambda: pipe.unet(**inputs, return_dict=False))
    finally:
        figures["unload_ms"] = once_ms(pipe.unload_lora_weights, m.device)
    return figures


def _graphs() -> int | None:
    """Graphs dynamo has compiled so far in this process (a private counter; None if gone)."""
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except (ImportError, KeyError, AttributeError):
        return None


def _delta(before: int | None, after: int | None) -> int | None:
    return None if before is None or after is None else after - before


def compile_unet(m: Models, plan: Plan, clock: Clock, reserve_s: float,
                 min_s: float) -> tuple[Figures, Any]:
    """``torch.compile(unet)`` as ``EngineSpec.compile`` does: first call, then steady state."""
    if plan.compile is not None:
        return skipped(plan.compile), None
    if clock.left_s() - reserve_s < min_s:
        return skipped("time budget"), None
    clock.log(f"{m.dtype}: torch.compile(unet), first call (minutes)")
    unet = m.sdxl.unet
    inputs = unet_inputs(m)
    compiled = torch.compile(unet, backend=plan.compile_backend)
    before = _graphs()
    memory = PeakMemory(m.device)
    with memory:
        first_ms = once_ms(lambda: compiled(**inputs, return_dict=False), m.device)
    figures: Figures = {"dtype": m.dtype, "backend": plan.compile_backend, "mode": "default",
                        "first_call_s": round(first_ms / 1000, 2),
                        "graphs": _delta(before, _graphs()),
                        "first_call_memory": memory.figures()}
    clock.log(f"{m.dtype}: compiled in {figures['first_call_s']} s; steady state")
    figures["steady_ms"] = run_measure(m, plan, clock, 0, "compiled",
                                lambda: compiled(**inputs, return_dict=False))
    figures["eager_ms"] = run_measure(m, plan, clock, 0, "compiled",
                               lambda: unet(**inputs, return_dict=False))
    steady, eager = figures["steady_ms"], figures["eager_ms"]
    if "median_ms" in steady and "median_ms" in eager:
        figures["speedup"] = round(eager["median_ms"] / steady["median_ms"], 3)
    return figures, compiled


def lora_hotswap(m: Models, plan: Plan, clock: Clock, work: Path, compiled: Any,
                 recompile_s: float) -> Figures:
    """Hot-swapping one adapter slot on the compiled UNet (on the eager one without compile).

    diffusers wants ``enable_lora_hotswap`` before the first adapter; the first step after
    that load recompiles (the UNet gained LoRA layers), a hot swap should not. Then what
    ``engines.adapters`` does around every batch: ``disable_lora`` and ``enable_lora``.
    Each probe that may recompile runs only if ``recompile_s`` (the first compile's time)
    is left.
    """
    pipe = m.sdxl
    if not hasattr(pipe, "enable_lora_hotswap"):
        return skipped(f"diffusers {diffusers.__version__} has no hotswap API")
    if clock.left_s() < recompile_s:
        return skipped("time budget")
    clock.log(f"{m.dtype}: LoRA hot swap on the {'eager' if compiled is None else 'compiled'} UNet")
    model = compiled if compiled is not None else pipe.unet
    folders = _lora_folders(m, work)
    inputs = unet_inputs(m)

    def step() -> object:
        return model(**inputs, return_dict=False)

    def probe(name: str, action: Callable[[], object]) -> None:
        figures[f"{name}_ms"] = once_ms(action, m.device)
        before = _graphs()
        figures[f"first_step_after_{name}_ms"] = once_ms(step, m.device)
        figures[f"graphs_compiled_after_{name}"] = _delta(before, _graphs())

    figures: Figures = {"dtype": m.dtype, "compiled": compiled is not None,
                        "rank": m.arch.lora_rank}
    try:
        pipe.enable_lora_hotswap(target_rank=m.arch.lora_rank)
        probe("load", lambda: _load(pipe, folders[0], "hot"))
        figures["steady_ms"] = run_measure(m, plan, clock, 0, "compiled", step)
        probe("hotswap", lambda: _load(pipe, folders[1], "hot", hotswap=True))
        figures["steady_after_hotswap_ms"] = run_measure(m, plan, clock, 0, "compiled", step)
        for name, action in (("disable_lora", pipe.disable_lora),
                             ("enable_lora", pipe.enable_lora)):
            if clock.left_s() < recompile_s:
                figures[name] = skipped("time budget")
                break
            probe(name, action)
    finally:
        pipe.unload_lora_weights()
    steady = figures["steady_ms"]
    if "median_ms" in steady:
        figures["hotswap_first_step_vs_steady"] = round(
            figures["first_step_after_hotswap_ms"] / steady["median_ms"], 2)
    return figures
