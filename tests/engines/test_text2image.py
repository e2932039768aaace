from __future__ import annotations

import pytest

from engines.base import StageItem
from tests.engines.conftest import EngineMaker, max_diff, same

T2I = "diffusers.text2image"


def _item(seed: int, prompt: str = "a red cube", **fields: object) -> StageItem:
    return StageItem(job_id=f"job-{seed}", prompt=prompt, width=64, height=64, seed=seed,
                     **fields)  # type: ignore[arg-type]


def test_size_count_and_determinism(make_engine: EngineMaker) -> None:
    engine = make_engine(T2I, "tiny-sdxl", steps=2)
    [images] = engine.run([_item(1, n=2)])
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    assert not same(images[0], images[1])  # seeds 1 and 2
    [again] = engine.run([_item(1)])
    assert same(again[0], images[0])
    [other] = engine.run([_item(7)])
    assert not same(other[0], images[0])


def test_non_native_size(make_engine: EngineMaker) -> None:
    engine = make_engine(T2I, "tiny-sdxl", steps=1)
    [[image]] = engine.run([StageItem(job_id="j", prompt="p", width=96, height=64, seed=0)])
    assert image.size == (96, 64)


def test_versions_differ(make_engine: EngineMaker) -> None:
    one = make_engine(T2I, "tiny-sdxl", version="1", steps=2)
    two = make_engine(T2I, "tiny-sdxl", version="2", steps=2)
    assert one.model_version == "1" and two.model_version == "2"
    assert not same(one.run([_item(3)])[0][0], two.run([_item(3)])[0][0])


def test_batch_equals_single_calls(make_engine: EngineMaker) -> None:
    # batched matmuls sum in another order: pixels may move by one level of 255 (measured: 1)
    engine = make_engine(T2I, "tiny-sdxl", steps=2)
    items = [_item(10, "a red cube"), _item(20, "a blue sphere", n=2), _item(30, "a tree")]
    batched = engine.run(items)
    assert [len(images) for images in batched] == [1, 2, 1]
    for item, images in zip(items, batched, strict=True):
        [single] = engine.run([item])
        assert all(max_diff(a, b) <= 1 for a, b in zip(single, images, strict=True))


def test_mixed_negative_prompts_in_one_batch(make_engine: EngineMaker) -> None:
    engine = make_engine(T2I, "tiny-sdxl", steps=1)
    items = [_item(1), _item(2, negative_prompt="blurry")]
    batched = engine.run(items)
    assert max_diff(batched[0][0], engine.run([items[0]])[0][0]) <= 1
    assert max_diff(batched[1][0], engine.run([items[1]])[0][0]) <= 1
    assert not same(batched[1][0], engine.run([_item(2)])[0][0])


def test_on_step_is_called_every_step_and_can_stop_the_run(make_engine: EngineMaker) -> None:
    engine = make_engine(T2I, "tiny-sdxl", steps=3)
    seen: list[tuple[int, int]] = []
    engine.run([_item(1, on_step=lambda step, steps: seen.append((step, steps)))])
    assert seen == [(1, 3), (2, 3), (3, 3)]

    class Cancelled(Exception):
        pass

    calls: list[int] = []

    def cancel(step: int, steps: int) -> None:
        calls.append(step)
        raise Cancelled(f"job cancelled at step {step}")

    with pytest.raises(Cancelled):
        engine.run([_item(1, on_step=cancel)])
    assert calls == [1]


def test_item_steps_override_spec_steps(make_engine: EngineMaker) -> None:
    engine = make_engine(T2I, "tiny-sdxl-turbo", steps=4, guidance=0.0)
    seen: list[int] = []
    engine.run([_item(1, steps=1, on_step=lambda step, steps: seen.append(steps))])
    assert seen == [1]
