"""LoRA adapter switching on the tiny SDXL engine: cached switch vs uncached load.

``python bench/lora_switch.py`` builds the tiny registry in a temporary folder, then times
``AdapterCache.activate`` (enable, set_adapters, and disable on exit) alternating two
adapters: with both cached (capacity 2), and with capacity 1 so that every activation
evicts one adapter and loads the other from the registry. Writes
``bench/results/lora_switch.json``.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_result  # noqa: E402
from controlplane.policy import EngineSpec  # noqa: E402
from controlplane.registry import Registry
from engines.base import LoraRef  # noqa: E402
from engines.factory import build_engine  # noqa: E402
from engines.pipelines import DiffusersEngine  # noqa: E402
from engines.tiny_models import make_tiny  # noqa: E402

SAMPLES = 30
ADAPTERS = [LoraRef("tiny-lora-a", "1"), LoraRef("tiny-lora-b", "1")]


def _activation_ms(engine: DiffusersEngine, samples: int) -> list[float]:
    times_ms = []
    for i in range(samples):
        lora = ADAPTERS[i % 2]
        start = time.perf_counter()
        with engine.adapters.activate(engine.pipe, lora):
            pass
        times_ms.append((time.perf_counter() - start) * 1000)
    return times_ms


def _engine(registry: Registry, capacity: int) -> DiffusersEngine:
    spec = EngineSpec(kind="diffusers.text2image", model="tiny-sdxl", steps=2,
                      max_loaded_adapters=capacity)
    engine = build_engine(spec, registry=registry, model_version="1", device="cpu")
    assert isinstance(engine, DiffusersEngine)
    return engine


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="laneway-bench-") as tmp:
        registry = Registry(Path(tmp))
        make_tiny(registry)

        cached = _engine(registry, capacity=2)
        _activation_ms(cached, 2)  # load both once
        loads_before = cached.adapters.loads
        switch_ms = _activation_ms(cached, SAMPLES)
        assert cached.adapters.loads == loads_before, "a cached switch loaded an adapter"
        cached.close()

        uncached = _engine(registry, capacity=1)
        _activation_ms(uncached, 2)
        load_ms = _activation_ms(uncached, SAMPLES)
        assert uncached.adapters.evictions >= SAMPLES, "an uncached activation did not load"
        uncached.close()

    result = {
        "model": "tiny-sdxl/1 (UNet LoRA rank 4 on attention projections)",
        "samples": SAMPLES,
        "torch_threads": 1,
        "machine": f"{platform.machine()} {torch.get_num_threads()} thread(s), torch "
                   f"{torch.__version__}",
        "switch_cached_ms": {"median": round(statistics.median(switch_ms), 2),
                             "min": round(min(switch_ms), 2), "max": round(max(switch_ms), 2)},
        "load_uncached_with_eviction_ms": {"median": round(statistics.median(load_ms), 2),
                                           "min": round(min(load_ms), 2),
                                           "max": round(max(load_ms), 2)},
    }
    summary = (f"cached switch median {result['switch_cached_ms']['median']} ms (target "
               f"≤ 50), uncached load median "
               f"{result['load_uncached_with_eviction_ms']['median']} ms, {SAMPLES} samples")
    write_result("lora_switch", "python bench/lora_switch.py", result, summary)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
