from __future__ import annotations

import pytest
from PIL import Image

from controlplane.errors import StageFailed
from engines.base import StageItem
from engines.pipelines import DiffusersEngine
from tests.engines.conftest import EngineMaker, max_diff, same


def _item(source: Image.Image, **fields: object) -> StageItem:
    return StageItem(job_id="j", prompt="a boat", width=64, height=64, seed=5,
                     images=[source], **fields)  # type: ignore[arg-type]


def test_img2img_and_inpaint_share_weights_with_text2image(
        make_engine: EngineMaker, source_image: Image.Image) -> None:
    t2i = make_engine("diffusers.text2image", "tiny-sdxl", steps=2)
    i2i = make_engine("diffusers.image2image", "tiny-sdxl", steps=4, strength=0.5)
    inpaint = make_engine("diffusers.inpaint", "tiny-sdxl", steps=2)
    engines = [t2i, i2i, inpaint]
    assert all(isinstance(e, DiffusersEngine) for e in engines)
    pipes = [e.pipe for e in engines]  # type: ignore[attr-defined]
    assert type(pipes[1]).__name__ == "StableDiffusionXLImg2ImgPipeline"
    assert type(pipes[2]).__name__ == "StableDiffusionXLInpaintPipeline"
    for pipe in pipes[1:]:
        assert pipe.unet is pipes[0].unet and pipe.vae is pipes[0].vae
        assert pipe.text_encoder_2 is pipes[0].text_encoder_2
        assert pipe.scheduler is not pipes[0].scheduler
    # a second engine on the same weights gets its own pipeline object and scheduler
    t2i_b = make_engine("diffusers.text2image", "tiny-sdxl", steps=2)
    assert t2i_b.pipe is not pipes[0]  # type: ignore[attr-defined]
    assert t2i_b.pipe.unet is pipes[0].unet  # type: ignore[attr-defined]
    assert t2i_b.pipe.scheduler is not pipes[0].scheduler  # type: ignore[attr-defined]


def test_img2img(make_engine: EngineMaker, source_image: Image.Image) -> None:
    engine = make_engine("diffusers.image2image", "tiny-sdxl", steps=4)
    seen: list[tuple[int, int]] = []
    [images] = engine.run([_item(source_image, strength=0.5, n=2,
                                 on_step=lambda step, steps: seen.append((step, steps)))])
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    assert seen == [(1, 2), (2, 2)]  # 4 steps at strength 0.5
    assert not same(images[0], source_image)
    [again] = engine.run([_item(source_image, strength=0.5, n=2)])
    assert all(same(a, b) for a, b in zip(again, images, strict=True))
    # a batch encodes its inputs with the VAE together, which moves pixels by at most one
    # level against a batch of one (measured: 1); text2image batches are exact
    [single] = engine.run([_item(source_image, strength=0.5)])
    assert max_diff(single[0], images[0]) <= 1


def test_inpaint(make_engine: EngineMaker, source_image: Image.Image) -> None:
    engine = make_engine("diffusers.inpaint", "tiny-sdxl", steps=2)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    [[image]] = engine.run([_item(source_image, mask=mask)])
    assert image.size == (64, 64)
    with pytest.raises(StageFailed, match="job j has no mask"):
        engine.run([_item(source_image)])


def test_missing_input_image_is_refused(make_engine: EngineMaker) -> None:
    engine = make_engine("diffusers.image2image", "tiny-sdxl", steps=2)
    with pytest.raises(StageFailed, match="job j has no input image"):
        engine.run([StageItem(job_id="j", prompt="p", width=64, height=64, seed=0)])
