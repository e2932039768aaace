from __future__ import annotations

from PIL import Image

from engines.base import StageItem
from tests.engines.conftest import EngineMaker, max_diff, same


def _item(images: list[Image.Image], seed: int = 0, **fields: object) -> StageItem:
    return StageItem(job_id=f"j{seed}", prompt="sharp", width=0, height=0, seed=seed,
                     images=images, **fields)  # type: ignore[arg-type]


def test_latent_upscaler_doubles_every_input(make_engine: EngineMaker,
                                             source_image: Image.Image) -> None:
    engine = make_engine("diffusers.latent_upscale", "tiny-latent-upscaler", steps=2)
    seen: list[tuple[int, int]] = []
    flipped = source_image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    [images] = engine.run([_item([source_image, flipped],
                                 on_step=lambda step, steps: seen.append((step, steps)))])
    assert [im.size for im in images] == [(128, 128), (128, 128)]
    assert seen == [(1, 2), (2, 2)]
    assert not same(images[0], images[1])


def test_latent_upscaler_batches_items_like_single_calls(make_engine: EngineMaker,
                                                         source_image: Image.Image) -> None:
    engine = make_engine("diffusers.latent_upscale", "tiny-latent-upscaler", steps=2)
    small = source_image.resize((32, 32))
    items = [_item([source_image], seed=1), _item([small], seed=2), _item([source_image], seed=3)]
    batched = engine.run(items)
    assert [[im.size for im in ims] for ims in batched] == [[(128, 128)], [(64, 64)],
                                                           [(128, 128)]]
    for item, images in zip(items, batched, strict=True):
        assert max_diff(engine.run([item])[0][0], images[0]) <= 1


def test_x4_upscaler_quadruples(make_engine: EngineMaker, source_image: Image.Image) -> None:
    engine = make_engine("diffusers.upscale", "tiny-x4-upscaler", steps=2)
    [[image]] = engine.run([_item([source_image.resize((32, 24))])])
    assert image.size == (128, 96)


def test_resize(make_engine: EngineMaker, source_image: Image.Image) -> None:
    engine = make_engine("resize")
    [images] = engine.run([StageItem(job_id="j", prompt="", width=100, height=40, seed=0,
                                     images=[source_image, source_image])])
    assert [im.size for im in images] == [(100, 40), (100, 40)]
    assert same(images[0], source_image.resize((100, 40), Image.Resampling.LANCZOS))
