"""GPU figures for the SDXL engines, from full-size random-weight pipelines on one GPU.

Per stage (text encode, denoise step, VAE decode, x2 upscaler) and dtype (float16, bfloat16,
float32): median times and peak memory. For float16 also: SDPA kernels against the classic
attention processor, ``torch.compile`` (first call with a cold cache, steady state), the
upscaler at batch 1/4/8 per image, one vs two concurrent slots on shared weights, LoRA
switching eager and hot-swapped on the compiled UNet, and the ``memory_gb`` each engine of
``policies/default.yaml`` would declare. See bench/gpu_models.py for the architectures::

    python bench/gpu_pipelines.py               # one H100/H200-class GPU, ≤ 8 minutes;
                                                # writes bench/results/gpu_pipelines.json
    python bench/gpu_pipelines.py --smoke [--out PATH]   # tiny models on the CPU, seconds

Without a CUDA GPU the full run exits 2. ``--smoke`` writes only to ``--out`` (default: a
temporary file), never to bench/results or RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import diffusers
import torch
from transformers import CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_result  # noqa: E402
from bench.gpu_lora_compile import compile_unet, lora_eager, lora_hotswap  # noqa: E402
from bench.gpu_measure import Clock, Figures, allocated_gb, free, skipped  # noqa: E402
from bench.gpu_models import (  # noqa: E402
    FULL,
    TINY,
    Arch,
    build_sdxl,
    build_upscaler,
    parameters_m,
    size_gb,
)
from bench.gpu_sections import (  # noqa: E402
    STAGES,
    Models,
    attention_variants,
    memory_summary,
    slots,
    stages,
    upscaler_batches,
)
from engines.pipelines import TORCH_DTYPES, quiet  # noqa: E402
from engines.tiny_models import train_tokenizer  # noqa: E402

COMMAND = "python bench/gpu_pipelines.py"


#: The sections in run order; the float16 pipelines are built again for the last two.
SECTIONS = ("stages", "attention", "upscaler_batches", "slots", "lora", "late_stages",
            "compile", "lora_hotswap")


@dataclass(frozen=True)
class Plan:
    """What one run measures, how often, and the seconds it may spend."""

    arch: Arch
    device: str
    #: the first is the one every section beyond the per-stage times uses
    dtypes: tuple[str, ...]
    not_measured: dict[str, str]
    limit_s: float
    repeats: int
    #: per measurement, seconds of repeats after the warm-up (at least one sample is taken)
    budget_s: dict[str, float]
    #: the seconds each section needs at least; what later sections need is kept back
    min_s: dict[str, float]
    call_steps: int
    upscaler_steps: int
    slot_steps: int
    slot_calls: int
    upscaler_batches: tuple[int, ...] = (1, 4, 8)
    compile: str | None = None  # why not, when it is not measured
    #: "inductor" as engines compile; a test passes "eager" (dynamo's guards and recompiles
    #: without code generation) to run the compiled path on a CPU in seconds
    compile_backend: str = "inductor"
    notes: tuple[str, ...] = ()

    def reserve_after(self, section: str) -> float:
        later = SECTIONS[SECTIONS.index(section) + 1:]
        return sum(self.min_s.get(name, 0.0) for name in later)


_TOKENIZER_NOTE = ("tokenizer: a byte-level BPE trained locally (none can be downloaded); "
                   "prompts split into other tokens than with CLIP's vocabulary, but both "
                   "text encoders see 77 positions either way")

# Guesses for one H100 (no GPU run yet): SDXL UNet step ~70 ms in float16 (CFG batch 2,
# 1024²), a whole-UNet compile 1-2 minutes cold. Budgets cap repeats; they are not targets.
FULL_PLAN = Plan(
    arch=FULL, device="cuda", dtypes=("float16", "bfloat16", "float32"), not_measured={},
    limit_s=450, repeats=10,
    budget_s={"text_encode": 2, "denoise_step": 4, "vae_decode": 4, "upscaler": 6,
              "pipeline_call": 5, "attention": 2, "upscaler_batch": 8, "slots": 24,
              "lora": 2, "compiled": 3},
    min_s={"stages": 20, "attention": 6, "upscaler_batches": 25, "slots": 25, "lora": 8,
           "late_stages": 50, "compile": 90, "lora_hotswap": 90},
    call_steps=4, upscaler_steps=20, slot_steps=10, slot_calls=8,
    notes=(_TOKENIZER_NOTE,
           "the first compile runs with an empty inductor and triton cache (fresh "
           "TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR)",
           "vae_decode runs the VAE in the stage's dtype; a float16 text-to-image call "
           "upcasts it to float32 first (force_upcast, as SDXL's VAE asks), which "
           "pipeline_call includes"),
)

SMOKE_PLAN = Plan(
    arch=TINY, device="cpu", dtypes=("float32", "bfloat16"),
    not_measured={"float16": "float16 runs as float32 on the CPU "
                             "(engines.pipelines.check_device_dtype)"},
    limit_s=600, repeats=2,
    budget_s={k: 0.2 for k in FULL_PLAN.budget_s}, min_s={},
    call_steps=2, upscaler_steps=2, slot_steps=2, slot_calls=3,
    compile=("skipped in --smoke: compiling even the tiny UNet takes minutes on this CPU "
             "(docs/OFFLINE-MODELS.md: 134 s cold); the full run measures it"),
    notes=(_TOKENIZER_NOTE,
           "smoke: tiny models on the CPU with 1 thread; the times are no GPU figures and "
           "memory peaks are not measured (torch keeps no allocator counter on the CPU)",),
)


def _weights(models: Models) -> Figures:
    sdxl, up = models.sdxl, models.upscaler
    parts = {"unet": sdxl.unet, "vae": sdxl.vae, "text_encoder": sdxl.text_encoder,
             "text_encoder_2": sdxl.text_encoder_2}
    return {"sdxl_gb": round(sum(size_gb(m) for m in parts.values()), 4),
            **{f"sdxl_{name}_gb": round(size_gb(m), 4) for name, m in parts.items()},
            "upscaler_gb": round(sum(size_gb(m) for m in up.components.values()
                                     if isinstance(m, torch.nn.Module)), 4)}


def _architecture(models: Models, arch: Arch) -> Figures:
    sdxl, up = models.sdxl, models.upscaler
    return {"name": arch.name, "image_px": arch.image_px,
            "upscaler_output_px": 2 * arch.image_px, "lora_rank": arch.lora_rank,
            "parameters_m": {
                "sdxl_unet": round(parameters_m(sdxl.unet), 2),
                "sdxl_vae": round(parameters_m(sdxl.vae), 2),
                "sdxl_text_encoder": round(parameters_m(sdxl.text_encoder), 2),
                "sdxl_text_encoder_2": round(parameters_m(sdxl.text_encoder_2), 2),
                "upscaler_unet": round(parameters_m(up.unet), 2),
                "upscaler_vae": round(parameters_m(up.vae), 2),
                "upscaler_text_encoder": round(parameters_m(up.text_encoder), 2)}}


def _build(plan: Plan, tokenizer: CLIPTokenizer, dtype: str, clock: Clock) -> Models:
    clock.log(f"building {plan.arch.name} in {dtype} on {plan.device}")
    torch_dtype = TORCH_DTYPES[dtype]
    return Models(dtype=dtype, device=plan.device, arch=plan.arch,
                  sdxl=build_sdxl(plan.arch, tokenizer, device=plan.device, dtype=torch_dtype,
                                  seed=0),
                  upscaler=build_upscaler(plan.arch, tokenizer, device=plan.device,
                                          dtype=torch_dtype, seed=1))


def _failure(name: str, clock: Clock, error: Exception) -> Figures:
    clock.log(f"{name} failed: {traceback.format_exc()}")
    return {"error": f"{type(error).__name__}: {error}"[:500]}


def _guarded(name: str, clock: Clock, section: Callable[..., Figures], *args: Any) -> Figures:
    """A section's figures, or its error: one failing section must not lose a GPU run."""
    try:
        return section(*args)
    except Exception as error:  # recorded in the figures and printed with its traceback
        return _failure(name, clock, error)


def _measure_stages(m: Models, plan: Plan, clock: Clock, reserve_s: float,
                    figures: Figures) -> None:
    figures["weights"][m.dtype] = _weights(m)
    try:
        figures["stages"][m.dtype], figures["pipeline_call"][m.dtype] = stages(
            m, plan, clock, reserve_s)
    except Exception as error:
        failed = _failure(f"{m.dtype} stages", clock, error)
        figures["stages"][m.dtype] = dict.fromkeys(STAGES, failed)
        figures["pipeline_call"][m.dtype] = failed


def _first_dtype(m: Models, plan: Plan, clock: Clock, work: Path, figures: Figures) -> None:
    """Stages, attention, upscaler batches, slots and eager LoRA, in the first dtype."""
    reserve = plan.reserve_after
    figures["architecture"] = _architecture(m, plan.arch)
    _measure_stages(m, plan, clock, reserve("stages"), figures)
    figures["attention"] = _guarded("attention", clock, attention_variants, m, plan, clock,
                                    reserve("attention"))
    figures["upscaler_batches"] = _guarded("upscaler_batches", clock, upscaler_batches, m, plan,
                                           clock, reserve("upscaler_batches"))
    figures["slots"] = _guarded("slots", clock, slots, m, plan, clock, reserve("slots"))
    figures["lora"] = {"eager": _guarded("lora", clock, lora_eager, m, plan, clock,
                                         reserve("lora"), work)}


def _compiled(m: Models, plan: Plan, clock: Clock, work: Path, figures: Figures) -> None:
    """torch.compile and the LoRA hot swap on the compiled UNet (last: the costliest)."""
    compiled = None
    try:
        figures["compile"], compiled = compile_unet(m, plan, clock, plan.reserve_after("compile"),
                                                    plan.min_s.get("compile", 0.0))
    except Exception as error:
        figures["compile"] = _failure("compile", clock, error)
    first_call_s = figures["compile"].get("first_call_s", 0.0)
    figures["lora"]["hotswap"] = _guarded("lora_hotswap", clock, lora_hotswap, m, plan, clock,
                                          work, compiled,
                                          first_call_s + 10 if compiled is not None else 0)


def run(plan: Plan, clock: Clock, work: Path) -> Figures:
    """Every section of the bench in ``SECTIONS`` order; returns the figures."""
    tokenizer = train_tokenizer(work / "tokenizer")
    main, *others = plan.dtypes
    figures: Figures = {"stages": {}, "pipeline_call": {}, "weights": {}}
    for dtype, reason in plan.not_measured.items():
        figures["weights"][dtype] = skipped(reason)
        figures["pipeline_call"][dtype] = skipped(reason)
    _first_dtype(_build(plan, tokenizer, main, clock), plan, clock, work, figures)
    free(plan.device)
    for k, dtype in enumerate(others):
        later = plan.min_s.get("late_stages", 0.0) * (len(others) - k - 1) / len(others)
        _measure_stages(_build(plan, tokenizer, dtype, clock), plan, clock,
                        plan.reserve_after("late_stages") + later, figures)
        free(plan.device)
    _compiled(_build(plan, tokenizer, main, clock), plan, clock, work, figures)
    free(plan.device)

    # stages x dtypes: one table per stage
    by_stage: Figures = {stage: {} for stage in STAGES}
    for dtype, per_stage in figures["stages"].items():
        for stage, stage_figures in per_stage.items():
            by_stage[stage][dtype] = stage_figures
    for stage in by_stage:
        for dtype, reason in plan.not_measured.items():
            by_stage[stage][dtype] = skipped(reason)
    figures["stages"] = by_stage
    figures["memory"] = memory_summary(figures.pop("weights"), figures, plan)
    return figures


def _environment(plan: Plan, smoke: bool) -> Figures:
    cuda = torch.device(plan.device).type == "cuda"
    return {
        "mode": "smoke" if smoke else "full",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "device_memory_gb": (round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
                             if cuda else None),
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "cuda": torch.version.cuda, "torch_threads": torch.get_num_threads(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "limit_s": plan.limit_s, "repeats_at_most": plan.repeats,
        "notes": plan.notes,
    }


def _summary(figures: Figures) -> str:
    def ms(entry: Figures) -> str:
        return f"{entry['median_ms']:.0f} ms" if "median_ms" in entry else "n/a"

    step = figures["stages"]["denoise_step"]
    parts = [f"{figures['device']}: UNet step fp16 {ms(step['float16'])}, "
             f"bf16 {ms(step['bfloat16'])}, fp32 {ms(step['float32'])}"]
    compiled = figures["compile"]
    if "steady_ms" in compiled:
        parts.append(f"compiled {compiled['steady_ms']['median_ms']:.0f} ms "
                     f"(first call {compiled['first_call_s']:.0f} s)")
    batches = figures["upscaler_batches"]
    if "median_ms_per_image" in batches.get("8", {}):
        parts.append(f"x2 upscaler per image b1 {batches['1']['median_ms_per_image']:.0f} ms, "
                     f"b8 {batches['8']['median_ms_per_image']:.0f} ms")
    two = figures["slots"].get("two_vs_one", {})
    if two:
        parts.append(f"2 slots p95 {two['p95_ratio']}x, throughput {two['throughput_ratio']}x")
    memory = {k: v for k, v in figures["memory"].get("memory_gb", {}).items()
              if k.endswith("float16")}
    if memory:
        parts.append("memory_gb " + ", ".join(f"{k} {v}" for k, v in memory.items()))
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny models on the CPU, the same code paths, in seconds")
    parser.add_argument("--out", type=Path,
                        help="write the JSON here (--smoke default: a temporary file; a full "
                             "run given --out writes only there, not to bench/results)")
    args = parser.parse_args(argv)
    quiet()
    if args.smoke:
        torch.set_num_threads(1)
        plan = SMOKE_PLAN
    else:
        if not torch.cuda.is_available():
            print(f"gpu_pipelines: no CUDA GPU here (torch {torch.__version__}); the full run "
                  "needs one H100/H200-class GPU and never falls back to the CPU. "
                  "Run `python bench/gpu_pipelines.py --smoke` for the CPU check.",
                  file=sys.stderr)
            return 2
        plan = FULL_PLAN
        if not torch.cuda.is_bf16_supported():
            plan = replace(plan, dtypes=("float16", "float32"),
                           not_measured={"bfloat16": "not supported on this GPU"})
    clock = Clock(limit_s=plan.limit_s)
    with tempfile.TemporaryDirectory(prefix="laneway-gpu-bench-") as tmp:
        work = Path(tmp)
        if not args.smoke:  # a cold compile cache, so the first call shows the real cost
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor")
            os.environ["TRITON_CACHE_DIR"] = str(work / "triton")
        figures = {**_environment(plan, args.smoke), **run(plan, clock, work)}
    figures["elapsed_s"] = round(clock.elapsed_s(), 1)
    figures["memory_allocated_at_end_gb"] = allocated_gb(plan.device)
    if args.smoke or args.out:
        out = args.out
        if out is None:
            fd, name = tempfile.mkstemp(prefix="gpu_pipelines-", suffix=".json")
            os.close(fd)
            out = Path(name)
        out.write_text(json.dumps(figures, indent=2) + "\n")
    else:
        out = write_result("gpu_pipelines", COMMAND, figures, _summary(figures))
    clock.log(f"done; figures in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
