"""bench/gpu_pipelines.py: the smoke run's sections, the full run's refusal without a GPU,
and the compiled path (dynamo only) that otherwise runs on a GPU alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from numbers import Real
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.common import RESULTS_DIR, RESULTS_MD
from bench.gpu_lora_compile import compile_unet, lora_hotswap
from bench.gpu_measure import Clock
from bench.gpu_pipelines import SMOKE_PLAN, _build
from bench.gpu_sections import STAGES
from engines.tiny_models import train_tokenizer

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_pipelines.py"


def _timing(entry: Any) -> float:
    """The median of a measured figure; fails on a skipped, unavailable or failed one."""
    assert isinstance(entry, dict) and isinstance(entry.get("median_ms"), Real), entry
    assert entry["n"] >= 1 and entry["min_ms"] <= entry["median_ms"] <= entry["max_ms"]
    return float(entry["median_ms"])


def _errors(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        found = [f"{path}: {node['error']}"] if "error" in node else []
        return found + [e for k, v in node.items() for e in _errors(v, f"{path}.{k}")]
    return []


def _snapshot() -> dict[str, str | None]:
    files = [RESULTS_DIR / "gpu_pipelines.json", RESULTS_MD]
    return {str(f): f.read_text() if f.exists() else None for f in files}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("gpu-bench") / "smoke.json"
    before = _snapshot()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _snapshot() == before, "--smoke touched bench/results or RESULTS.md"
    figures: dict[str, Any] = json.loads(out.read_text())
    figures["_stderr"] = proc.stderr
    return figures


def test_smoke_measures_every_stage_in_float32_and_bfloat16(smoke: dict[str, Any]) -> None:
    assert smoke["mode"] == "smoke" and smoke["device"] == "cpu"
    assert _errors(smoke) == []
    assert set(smoke["stages"]) == set(STAGES)
    for stage in STAGES:
        for dtype in ("float32", "bfloat16"):
            _timing(smoke["stages"][stage][dtype])
        assert "float32 on the CPU" in smoke["stages"][stage]["float16"]["skipped"]
    for dtype in ("float32", "bfloat16"):
        _timing(smoke["pipeline_call"][dtype])
    assert smoke["architecture"]["parameters_m"]["sdxl_unet"] < 5  # tiny, not SDXL


def test_smoke_sections(smoke: dict[str, Any]) -> None:
    assert "skipped in --smoke" in smoke["compile"]["skipped"]
    attention = smoke["attention"]
    for name in ("sdpa", "sdpa_math", "classic"):
        _timing(attention[name])
    batches = smoke["upscaler_batches"]
    for batch in ("1", "4", "8"):
        per_image = batches[batch]["median_ms_per_image"]
        assert per_image == pytest.approx(_timing(batches[batch]) / int(batch), rel=1e-3)
    assert set(batches["speedup_per_image_vs_batch_1"]) == {"1", "4", "8"}
    slots = smoke["slots"]
    assert slots["one"]["n"] >= 2 and slots["two"]["n"] >= 4
    assert slots["two"]["slot_1"]["n"] >= 2 and slots["two"]["slot_2"]["n"] >= 2
    for ratio in slots["two_vs_one"].values():
        assert isinstance(ratio, Real) and ratio > 0
    assert "p95" in slots["answer"]
    eager = smoke["lora"]["eager"]
    assert len(eager["first_load_ms"]) == 2
    for name in ("switch_ms", "activate_cycle_ms", "step_with_lora_ms", "step_lora_disabled_ms"):
        _timing(eager[name])
    hotswap = smoke["lora"]["hotswap"]
    assert hotswap["compiled"] is False
    _timing(hotswap["steady_after_hotswap_ms"])
    assert hotswap["hotswap_ms"] > 0 and hotswap["first_step_after_hotswap_ms"] > 0
    memory = smoke["memory"]
    assert memory["weights_gb"]["float32"]["sdxl_gb"] > memory["weights_gb"]["bfloat16"]["sdxl_gb"]
    assert memory["memory_gb"] == {} and "CPU" in memory["source"]
    assert "done; figures in" in smoke["_stderr"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_full_run_without_a_gpu_exits_2_and_writes_nothing() -> None:
    before = _snapshot()
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stderr and "--smoke" in proc.stderr
    assert _snapshot() == before


@pytest.mark.slow
def test_compiled_path_recompiles_on_first_adapter_not_on_hot_swap(tmp_path: Path) -> None:
    """The GPU-only sections on tiny models, compiled by dynamo alone (no code generation)."""
    plan = replace(SMOKE_PLAN, compile=None, compile_backend="eager")
    clock = Clock(limit_s=600)
    models = _build(plan, train_tokenizer(tmp_path / "tokenizer"), "float32", clock)
    try:
        figures, compiled = compile_unet(models, plan, clock, 0, 0)
        assert figures["graphs"] >= 1 and figures["first_call_s"] > 0
        _timing(figures["steady_ms"])
        hotswap = lora_hotswap(models, plan, clock, tmp_path, compiled,
                               figures["first_call_s"] + 10)
    finally:
        torch._dynamo.reset()
    assert hotswap["compiled"] is True
    assert hotswap["graphs_compiled_after_load"] >= 1  # the UNet gained LoRA layers
    assert hotswap["graphs_compiled_after_hotswap"] == 0
    _timing(hotswap["steady_after_hotswap_ms"])
    assert "graphs_compiled_after_disable_lora" in hotswap
