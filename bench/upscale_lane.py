"""The batched upscale lane against the raw pipeline: batch 8 versus batch 1, in one run.

Raw: the tiny latent upscaler called directly with 8 images per call versus 1 (median
per-image time over repeats). Lane: the same model, steps and inputs through the real queue
and a real worker process, with ``max_batch`` 8 versus 1, all jobs queued before the worker
starts (concurrent load); per-image throughput from the stage start/finish times. The
figure that matters is the share of the raw speed-up the lane keeps (target ≥ 90 %).

    python bench/upscale_lane.py [--jobs 48] [--repeats 7]
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
import torch
from diffusers import StableDiffusionLatentUpscalePipeline
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_result  # noqa: E402
from controlplane.registry import Registry
from engines.pipelines import quiet  # noqa: E402
from engines.tiny_models import make_tiny  # noqa: E402
from tests.service import Service, WorkerProcess  # noqa: E402

STEPS = 10
POLICY = """
version: 1
limits: {{max_pixels: 65536, max_n: 1, default_width: 64, default_height: 64}}
engines:
  x2:
    kind: diffusers.latent_upscale
    model: tiny-latent-upscaler
    steps: {steps}
    guidance: 0.0
    max_batch: {max_batch}
    max_wait_ms: 50
routes:
  - name: upscale
    match: {{mode: img2img}}
    stages: [{{engine: x2, scale: 2}}]
    admission: {{max_queue: 10000}}
"""


def inputs(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
            for _ in range(count)]


def raw_per_image_ms(registry: Registry, batch: int, repeats: int) -> float:
    pipe = StableDiffusionLatentUpscalePipeline.from_pretrained(
        registry.verified_path("tiny-latent-upscaler", "1"), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    images = inputs(batch)
    times_ms = []
    for r in range(repeats + 1):  # the first call warms up
        generators = [torch.Generator().manual_seed(r * 100 + k) for k in range(batch)]
        started = time.perf_counter()
        pipe(prompt=["a photo"] * batch, image=images, num_inference_steps=STEPS,
             guidance_scale=0.0, generator=generators)
        times_ms.append((time.perf_counter() - started) * 1000 / batch)
    return statistics.median(times_ms[1:])


def lane_images_per_s(registry: Registry, home: Path, max_batch: int, jobs: int) -> dict:
    policy = home / "policy.yaml"
    home.mkdir(parents=True)
    policy.write_text(POLICY.format(steps=STEPS, max_batch=max_batch))
    service = Service(home=home, registry=registry.root, policy=policy,
                      extra_args=["--no-workers"], ready_path="/healthz").start()
    payloads = []
    for image in inputs(jobs):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        payloads.append(base64.b64encode(buffer.getvalue()).decode())
    try:
        with httpx.Client(base_url=service.url, timeout=60) as client:
            ids = [client.post("/v1/images", json={
                "prompt": "a photo", "mode": "img2img", "image": p, "seed": i}).json()["id"]
                for i, p in enumerate(payloads)]
            worker = WorkerProcess(service, "x2",
                                   extra_env={"LANEWAY_TORCH_THREADS": "1"}).start()
            try:
                done = []
                for job_id in ids:
                    while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] in (
                            "queued", "running"):
                        time.sleep(0.1)
                    done.append(job)
            finally:
                worker.stop()
    finally:
        service.stop()
    stages = [j["stages"][0] for j in done if j["status"] == "completed"]
    if len(stages) != jobs:
        raise RuntimeError(f"{jobs - len(stages)} lane jobs did not complete")
    start = min(datetime.fromisoformat(s["started_at"]) for s in stages)
    end = max(datetime.fromisoformat(s["finished_at"]) for s in stages)
    sizes = [s["batch_size"] for s in stages]
    return {"images_per_s": round(jobs / (end - start).total_seconds(), 3),
            "mean_batch_size": round(statistics.mean(sizes), 2), "max_batch_size": max(sizes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    quiet()
    with tempfile.TemporaryDirectory(prefix="lw-bench-") as tmp:
        registry = Registry(Path(tmp) / "registry")
        make_tiny(registry)
        raw = {b: raw_per_image_ms(registry, b, args.repeats) for b in (1, 8)}
        lane = {b: lane_images_per_s(registry, Path(tmp) / f"lane{b}", b, args.jobs)
                for b in (1, 8)}
    raw_speedup = raw[1] / raw[8]
    lane_speedup = lane[8]["images_per_s"] / lane[1]["images_per_s"]
    kept = lane_speedup / raw_speedup
    figures = {
        "model": "tiny-latent-upscaler/1, 64x64 -> 128x128", "steps": STEPS,
        "torch_threads": 1, "jobs": args.jobs,
        "raw_per_image_ms": {"batch_1": round(raw[1], 1), "batch_8": round(raw[8], 1)},
        "raw_speedup": round(raw_speedup, 2),
        "lane": {"max_batch_1": lane[1], "max_batch_8": lane[8]},
        "lane_speedup": round(lane_speedup, 2),
        "share_of_raw_speedup_kept": round(kept, 3), "target_share": 0.9,
    }
    summary = (f"raw batch-8 speed-up {raw_speedup:.2f}x, lane {lane_speedup:.2f}x "
               f"(keeps {kept:.0%} of it; mean batch {lane[8]['mean_batch_size']})")
    write_result("upscale_lane", "python bench/upscale_lane.py", figures, summary)
    print(summary)


if __name__ == "__main__":
    main()
