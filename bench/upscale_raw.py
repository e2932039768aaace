"""Raw throughput of the tiny latent upscaler called directly: batch 8 vs batch 1.

``python bench/upscale_raw.py`` builds the tiny registry in a temporary folder, loads
``tiny-latent-upscaler`` and times pipeline calls upscaling 64x64 images to 128x128 with
10 steps and no guidance, on one torch thread. Reports the median per-image time over
repeats. Writes ``bench/results/upscale_raw.json``.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionLatentUpscalePipeline
from PIL import Image

from engines.pipelines import quiet
from engines.registry import Registry
from engines.tiny_models import make_tiny

STEPS = 10
REPEATS = 7
BATCHES = (1, 8)
RESULTS = Path(__file__).parent / "results" / "upscale_raw.json"


def _per_image_ms(pipe: StableDiffusionLatentUpscalePipeline, images: list[Image.Image],
                  repeats: int) -> list[float]:
    times_ms = []
    for r in range(repeats):
        generators = [torch.Generator().manual_seed(r * 100 + k) for k in range(len(images))]
        start = time.perf_counter()
        pipe(prompt=["sharp"] * len(images), image=images, num_inference_steps=STEPS,
             guidance_scale=0.0, generator=generators)
        times_ms.append((time.perf_counter() - start) * 1000 / len(images))
    return times_ms


def main() -> None:
    torch.set_num_threads(1)
    quiet()
    rng = np.random.default_rng(0)
    inputs = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
              for _ in range(max(BATCHES))]
    with tempfile.TemporaryDirectory(prefix="laneway-bench-") as tmp:
        registry = Registry(Path(tmp))
        make_tiny(registry)
        pipe = StableDiffusionLatentUpscalePipeline.from_pretrained(
            registry.verified_path("tiny-latent-upscaler", "1"), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    results = {}
    for batch in BATCHES:
        _per_image_ms(pipe, inputs[:batch], 1)  # warm-up
        times_ms = _per_image_ms(pipe, inputs[:batch], REPEATS)
        results[f"batch_{batch}"] = {
            "per_image_ms_median": round(statistics.median(times_ms), 1),
            "per_image_ms_min": round(min(times_ms), 1),
            "images_per_s": round(1000 / statistics.median(times_ms), 2),
        }
    speedup = (results["batch_1"]["per_image_ms_median"]
               / results["batch_8"]["per_image_ms_median"])
    result = {
        "model": "tiny-latent-upscaler/1, 64x64 -> 128x128",
        "steps": STEPS, "guidance": 0.0, "repeats": REPEATS, "torch_threads": 1,
        "torch": torch.__version__,
        **results,
        "batch_8_speedup_per_image": round(speedup, 2),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
