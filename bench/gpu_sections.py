"""The per-stage, attention, upscaler-batch, slot and memory sections of bench/gpu_pipelines.py.

Every section takes the models of one dtype, the run's plan and clock, and the seconds it
must leave to the sections after it (``reserve_s``); it returns JSON-ready figures. The LoRA
and compile sections are in bench/gpu_lora_compile.py.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.common import percentile
from bench.gpu_measure import Clock, Figures, PeakMemory, allocated_gb, measure, skipped
from bench.gpu_models import Arch
from engines.pipelines import Loaded, Pipeline, view

if TYPE_CHECKING:
    from bench.gpu_pipelines import Plan

#: the per-stage table's rows
STAGES = ("text_encode", "denoise_step", "vae_decode", "upscaler")
PROMPT = "a watercolor painting of a lighthouse at dusk, high detail"


@dataclass
class Models:
    """One dtype's SDXL and x2 upscaler pipelines, on the run's device."""

    dtype: str
    device: str
    arch: Arch
    sdxl: Pipeline
    upscaler: Pipeline


def run_measure(m: Models, plan: Plan, clock: Clock, reserve_s: float, budget: str,
                fn: Callable[[], object]) -> Figures:
    """``measure`` with the plan's budget named ``budget`` and its repeats."""
    return measure(fn, clock=clock, budget_s=plan.budget_s[budget], repeats=plan.repeats,
                   device=m.device, reserve_s=reserve_s)


def unet_inputs(m: Models) -> dict[str, Any]:
    """One denoising step's UNet inputs at batch 1 with classifier-free guidance (2 rows)."""
    pipe, px = m.sdxl, m.arch.image_px
    latent_px = px // pipe.vae_scale_factor
    dtype, rows = pipe.unet.dtype, 2
    generator = torch.Generator("cpu").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(m.device, dtype)

    time_ids = torch.tensor([[px, px, 0, 0, px, px]] * rows, device=m.device, dtype=dtype)
    return {"sample": rand(rows, 4, latent_px, latent_px),
            "timestep": torch.tensor(500, device=m.device),
            "encoder_hidden_states": rand(rows, 77, pipe.unet.config.cross_attention_dim),
            "added_cond_kwargs": {
                "text_embeds": rand(rows, pipe.text_encoder_2.config.projection_dim),
                "time_ids": time_ids}}


def input_images(px: int, count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8))
            for _ in range(count)]


def upscale(pipe: Pipeline, images: list[Image.Image], steps: int) -> object:
    """The call engines.upscalers makes: one prompt per image, guidance 0 (the policy's)."""
    return pipe(prompt=[PROMPT] * len(images), image=images, num_inference_steps=steps,
                guidance_scale=0.0,
                generator=[torch.Generator("cpu").manual_seed(k) for k in range(len(images))])


def text2image(pipe: Pipeline, px: int, steps: int) -> object:
    return pipe(prompt=PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=px,
                width=px, generator=torch.Generator("cpu").manual_seed(0))


def stages(m: Models, plan: Plan, clock: Clock, reserve_s: float) -> tuple[Figures, Figures]:
    """Per-stage times of one dtype, and a whole text-to-image call (for its peak memory)."""
    clock.log(f"{m.dtype}: stages")
    pipe, px = m.sdxl, m.arch.image_px
    inputs = unet_inputs(m)
    latents = inputs["sample"][:1] / pipe.vae.config.scaling_factor
    images = input_images(px, 1)

    def run(budget: str, fn: Callable[[], object]) -> Figures:
        return run_measure(m, plan, clock, reserve_s, budget, fn)

    figures = {
        "text_encode": run("text_encode", lambda: pipe.encode_prompt(
            PROMPT, device=m.device, num_images_per_prompt=1, do_classifier_free_guidance=True)),
        "denoise_step": run("denoise_step", lambda: pipe.unet(**inputs, return_dict=False)),
        "vae_decode": run("vae_decode", lambda: pipe.vae.decode(latents, return_dict=False)),
        "upscaler": {**run("upscaler", lambda: upscale(m.upscaler, images, plan.upscaler_steps)),
                     "steps": plan.upscaler_steps},
    }
    call = {**run("pipeline_call", lambda: text2image(pipe, px, plan.call_steps)),
            "steps": plan.call_steps}
    return figures, call


_SDPA_BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION,
                  "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
                  "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_math": SDPBackend.MATH}


def attention_variants(m: Models, plan: Plan, clock: Clock, reserve_s: float) -> Figures:
    """The UNet step with SDPA (torch's pick, then each kernel forced) and without SDPA."""
    clock.log(f"{m.dtype}: attention variants")
    unet = m.sdxl.unet
    inputs = unet_inputs(m)

    def step() -> object:
        return unet(**inputs, return_dict=False)

    figures: Figures = {"dtype": m.dtype}
    contexts: dict[str, AbstractContextManager[object]] = {"sdpa": nullcontext()}
    contexts.update({name: sdpa_kernel(backend) for name, backend in _SDPA_BACKENDS.items()})
    for name, context in contexts.items():
        try:
            with warnings.catch_warnings(), context:
                warnings.simplefilter("ignore")  # "Flash attention was not compiled..." and such
                figures[name] = run_measure(m, plan, clock, reserve_s, "attention", step)
        except RuntimeError as error:  # this kernel cannot run these inputs here
            figures[name] = {"unavailable": str(error).splitlines()[0][:200]}
    unet.set_attn_processor(AttnProcessor())  # matmul + softmax, diffusers' pre-SDPA path
    try:
        figures["classic"] = run_measure(m, plan, clock, reserve_s, "attention", step)
    finally:
        unet.set_attn_processor(AttnProcessor2_0())
    return figures


def upscaler_batches(m: Models, plan: Plan, clock: Clock, reserve_s: float) -> Figures:
    """The x2 upscaler stage at each batch size, per image (the batched lane's question)."""
    figures: Figures = {"dtype": m.dtype, "steps": plan.upscaler_steps,
                        "input_px": m.arch.image_px}
    for batch in plan.upscaler_batches:
        clock.log(f"{m.dtype}: upscaler batch {batch}")
        images = input_images(m.arch.image_px, batch)
        result = run_measure(m, plan, clock, reserve_s, "upscaler_batch",
                      partial(upscale, m.upscaler, images, plan.upscaler_steps))
        if "median_ms" in result:
            result["median_ms_per_image"] = round(result["median_ms"] / batch, 3)
        figures[str(batch)] = result
    per_image = {b: figures[str(b)].get("median_ms_per_image") for b in plan.upscaler_batches}
    first = per_image[plan.upscaler_batches[0]]
    figures["speedup_per_image_vs_batch_1"] = {
        str(b): round(first / v, 3) for b, v in per_image.items() if first and v}
    return figures


def _latency(samples_ms: list[float]) -> Figures:
    return {"p50_ms": round(percentile(samples_ms, 50), 3),
            "p95_ms": round(percentile(samples_ms, 95), 3), "n": len(samples_ms)}


def _run_slots(views: list[Pipeline], call: Callable[[Pipeline], object], calls: int,
               budget_s: float) -> tuple[list[list[float]], float]:
    """Each view in its own thread, started together; per-slot latencies and the wall time."""
    latencies: list[list[float]] = [[] for _ in views]
    barrier = threading.Barrier(len(views))

    def slot(i: int) -> None:
        barrier.wait()
        started = time.perf_counter()
        while len(latencies[i]) < calls:
            t0 = time.perf_counter()
            call(views[i])  # returns PIL images: the call has synchronised with the GPU
            latencies[i].append((time.perf_counter() - t0) * 1000)
            if time.perf_counter() - started > budget_s and len(latencies[i]) >= 2:
                break

    started = time.perf_counter()
    with ThreadPoolExecutor(len(views)) as pool:
        for future in [pool.submit(slot, i) for i in range(len(views))]:
            future.result()
    return latencies, time.perf_counter() - started


def slots(m: Models, plan: Plan, clock: Clock, reserve_s: float) -> Figures:
    """One slot against two on one device: each slot a pipeline view on the shared weights.

    The views are what workers use (``engines.pipelines.view``: own scheduler and tokenizers,
    and an own VAE where float16 calls upcast it), so their memory counts here.
    """
    budget_s = min(plan.budget_s["slots"], clock.left_s() - reserve_s)
    if budget_s <= 0:
        return skipped("time budget")
    clock.log(f"{m.dtype}: one slot vs two, {plan.slot_steps} steps")
    px, steps = m.arch.image_px, plan.slot_steps
    base_gb = allocated_gb(m.device)
    entry = Loaded(key=("gpu-bench", "1", m.dtype, None, m.device), pipe=m.sdxl)
    views = [view(entry, StableDiffusionXLPipeline) for _ in range(2)]
    for v in views:
        text2image(v, px, steps)  # warm-up

    def call(v: Pipeline) -> object:
        return text2image(v, px, steps)

    figures: Figures = {"dtype": m.dtype, "steps": steps, "image_px": px}
    for name, count in (("one", 1), ("two", 2)):
        memory = PeakMemory(m.device)
        with memory:
            latencies, wall_s = _run_slots(views[:count], call, plan.slot_calls,
                                           budget_s * count / 3)
        pooled = [ms for per_slot in latencies for ms in per_slot]
        result = {**_latency(pooled), "images_per_s": round(len(pooled) / wall_s, 3)}
        if count > 1:
            result.update({f"slot_{i + 1}": _latency(s) for i, s in enumerate(latencies)})
        if memory.peak_gb is not None and base_gb is not None:
            result.update(peak_gb=round(memory.peak_gb, 3),
                          activation_gb=round(memory.peak_gb - base_gb, 3))
        figures[name] = result
    one, two = figures["one"], figures["two"]
    figures["two_vs_one"] = {
        "p50_ratio": round(two["p50_ms"] / one["p50_ms"], 3),
        "p95_ratio": round(two["p95_ms"] / one["p95_ms"], 3),
        "throughput_ratio": round(two["images_per_s"] / one["images_per_s"], 3)}
    ratios = figures["two_vs_one"]
    figures["answer"] = (
        f"with a second slot each call's p95 is {ratios['p95_ratio']}x one slot's "
        f"({'worse' if ratios['p95_ratio'] > 1 else 'better'}) for "
        f"{ratios['throughput_ratio']}x the images per second")
    return figures


def memory_summary(weights: Figures, figures: Figures, plan: Plan) -> Figures:
    """Peaks per configuration, and the ``memory_gb`` an engine of each kind would declare."""
    if torch.device(plan.device).type != "cuda":
        return {"source": "not measured: no allocator counter on the CPU",
                "weights_gb": weights, "memory_gb": {}}
    main = plan.dtypes[0]

    def activation(entry: object) -> float | None:
        return entry.get("activation_gb") if isinstance(entry, dict) else None

    memory_gb: dict[str, float] = {}
    for dtype in plan.dtypes:
        call = activation(figures["pipeline_call"].get(dtype))
        if call is not None:
            memory_gb[f"sdxl text2image batch 1 {dtype}"] = round(
                weights[dtype]["sdxl_gb"] + call, 2)
    two = activation(figures["slots"].get("two"))
    if two is not None:
        memory_gb[f"sdxl text2image 2 slots {main}"] = round(weights[main]["sdxl_gb"] + two, 2)
    for batch in plan.upscaler_batches:
        act = activation(figures["upscaler_batches"].get(str(batch)))
        if act is not None:
            memory_gb[f"x2 upscaler batch {batch} {main}"] = round(
                weights[main]["upscaler_gb"] + act, 2)
    peaks = {dtype: {stage: (per_dtype.get(dtype) or {}).get("peak_gb")
                     for stage, per_dtype in figures["stages"].items()}
             for dtype in plan.dtypes}
    return {"source": "torch.cuda.max_memory_allocated",
            "how": "memory_gb = the model's weights_gb + activation_gb (peak minus what was "
                   "allocated before) of the engine's call at its batch size",
            "weights_gb": weights, "stage_peak_gb": peaks, "memory_gb": memory_gb}
