"""Engines sharing weights (a worker's slots) run calls at the same time; none sees another's state.

Every test starts its calls from threads released together by a barrier, round after round,
the way a worker's slots start on a burst of drafts, with prompts of different token
lengths: a tokenizer shared by two slots left padding to "longest" by one call made the other
call's embeddings as long as its prompt (issue 12).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from PIL import Image

from engines.base import Engine, StageItem
from tests.engines.conftest import EngineMaker

#: token lengths differ from each other and from the 77 a prompt is padded to
PROMPTS = ["tree", "a cube", "a red cube on a table", "a small blue boat on a lake at dawn",
           "a tall tree in a field of yellow flowers under a grey sky, painted in oils"]


def at_once(calls: list[Callable[[int], None]], rounds: int) -> list[str]:
    """Run ``calls[i](round)`` in thread ``i`` for every round, all threads released together
    by one barrier per round; return what the calls raised."""
    barrier = threading.Barrier(len(calls))
    errors: list[str] = []

    def loop(call: Callable[[int], None]) -> None:
        for round_ in range(rounds):
            barrier.wait()
            try:
                call(round_)
            except Exception as exc:  # collected: every thread must reach every barrier
                errors.append(f"round {round_}: {exc!r}")

    threads = [threading.Thread(target=loop, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


Encode = Callable[[Any, str], tuple[torch.Tensor | None, ...]]

ENCODERS: dict[str, tuple[str, str, Encode]] = {
    "sdxl": ("diffusers.text2image", "tiny-sdxl",
             lambda pipe, prompt: pipe.encode_prompt(prompt, device="cpu",
                                                     do_classifier_free_guidance=True)),
    "latent-upscaler": ("diffusers.latent_upscale", "tiny-latent-upscaler",
                        lambda pipe, prompt: pipe.encode_prompt(prompt, "cpu", True)),
}


@pytest.mark.parametrize(("family", "slots"),
                         [("sdxl", 2), ("sdxl", 3), ("latent-upscaler", 2)])
def test_prompts_encoded_at_once_on_slots_match_a_lone_encode(
        make_engine: EngineMaker, family: str, slots: int) -> None:
    kind, model, encode = ENCODERS[family]
    engines: list[Any] = [make_engine(kind, model) for _ in range(slots)]
    alone = {prompt: encode(engines[0].pipe, prompt) for prompt in PROMPTS}

    def encoder(slot: int) -> Callable[[int], None]:
        def call(round_: int) -> None:
            prompt = PROMPTS[(round_ + slot) % len(PROMPTS)]
            for got, want in zip(encode(engines[slot].pipe, prompt), alone[prompt], strict=True):
                if got is not None and want is not None and not torch.equal(got, want):
                    raise AssertionError(f"{prompt!r}: embeddings {tuple(got.shape)} differ "
                                         f"from those encoded alone {tuple(want.shape)}")
        return call

    errors = at_once([encoder(slot) for slot in range(slots)], rounds=300)  # issue 12: 300
    assert errors == [], f"{len(errors)} of {100 * slots} calls failed: {errors[:3]}"


def text_item(k: int, **fields: object) -> StageItem:
    return StageItem(job_id=f"job-{k}", prompt=PROMPTS[k % len(PROMPTS)], width=64,
                     height=64, seed=k, **fields)  # type: ignore[arg-type]


def runner(engine: Engine, slot: int, make_item: Callable[[int], StageItem]
           ) -> Callable[[int], None]:
    def call(round_: int) -> None:
        [images] = engine.run([make_item(round_ + slot)])
        assert len(images) == 1
    return call


def test_text2image_slots_run_at_once(make_engine: EngineMaker) -> None:
    engines = [make_engine("diffusers.text2image", "tiny-sdxl-turbo", steps=1, guidance=0.0)
               for _ in range(3)]
    errors = at_once([runner(e, slot, text_item) for slot, e in enumerate(engines)], rounds=15)
    assert errors == [], f"{len(errors)} of {15 * 3} calls failed: {errors[:3]}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_text2image_image2image_and_inpaint_on_one_model_run_at_once(
        make_engine: EngineMaker, source_image: Image.Image, dtype: str) -> None:
    # in bfloat16 img2img and inpaint cast a force_upcast VAE to float32 and back
    mask = Image.new("L", source_image.size, 255)
    engines = [make_engine(kind, "tiny-sdxl", steps=2, dtype=dtype)
               for kind in ("diffusers.text2image", "diffusers.image2image", "diffusers.inpaint")]

    def item(k: int) -> StageItem:
        return text_item(k, images=[source_image], mask=mask)

    errors = at_once([runner(e, slot, item) for slot, e in enumerate(engines)], rounds=10)
    assert errors == [], f"{len(errors)} of {10 * 3} calls failed: {errors[:3]}"


@pytest.mark.parametrize(("kind", "model"), [
    ("diffusers.text2image", "tiny-sdxl"), ("diffusers.inpaint", "tiny-sdxl"),
    ("diffusers.latent_upscale", "tiny-latent-upscaler"),
    ("diffusers.upscale", "tiny-x4-upscaler")])
def test_views_share_weights_and_own_schedulers_and_tokenizers(make_engine: EngineMaker,
                                                              kind: str, model: str) -> None:
    one: Any = make_engine(kind, model)
    two: Any = make_engine(kind, model)
    for name, component in one.pipe.components.items():
        if component is None:
            continue
        if name.endswith("scheduler") or name.startswith("tokenizer"):
            assert two.pipe.components[name] is not component, name
        else:
            assert two.pipe.components[name] is component, name


def test_views_of_low_precision_weights_own_a_vae_that_calls_upcast(
        make_engine: EngineMaker) -> None:
    t2i: Any = make_engine("diffusers.text2image", "tiny-sdxl", dtype="bfloat16")
    i2i: Any = make_engine("diffusers.image2image", "tiny-sdxl", dtype="bfloat16")
    assert t2i.pipe.vae.config.force_upcast
    assert t2i.pipe.unet is i2i.pipe.unet and t2i.pipe.vae is not i2i.pipe.vae
    assert t2i.pipe.vae.dtype == i2i.pipe.vae.dtype == torch.bfloat16
