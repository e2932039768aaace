from __future__ import annotations

import pytest

from controlplane.errors import RegistryError
from engines.base import LoraRef, StageItem
from engines.pipelines import DiffusersEngine
from tests.engines.conftest import EngineMaker, max_diff, same

A = LoraRef("tiny-lora-a", "1")
B = LoraRef("tiny-lora-b", "1")


def _item(lora: LoraRef | None = None) -> StageItem:
    return StageItem(job_id="j", prompt="a castle", width=64, height=64, seed=11, lora=lora)


def _engine(make_engine: EngineMaker, **fields: object) -> DiffusersEngine:
    engine = make_engine("diffusers.text2image", "tiny-sdxl", steps=2, **fields)
    assert isinstance(engine, DiffusersEngine)
    return engine


def test_lora_changes_the_image_and_leaves_the_pipeline_clean(make_engine: EngineMaker) -> None:
    fresh_engine = _engine(make_engine)
    [[fresh]] = fresh_engine.run([_item()])
    fresh_engine.close()  # the next engine loads the weights again from disk

    engine = _engine(make_engine)
    [[with_a]] = engine.run([_item(A)])
    assert not same(with_a, fresh)
    [[after]] = engine.run([_item()])
    assert same(after, fresh)
    [[half_a]] = engine.run([_item(LoraRef(A.id, A.version, scale=0.5))])
    assert not same(half_a, with_a) and not same(half_a, fresh)


def test_switching_between_cached_adapters(make_engine: EngineMaker) -> None:
    engine = _engine(make_engine, max_loaded_adapters=2)
    [[a1]] = engine.run([_item(A)])
    [[b1]] = engine.run([_item(B)])
    [[a2]] = engine.run([_item(A)])
    [[b2]] = engine.run([_item(B)])
    assert not same(a1, b1)
    assert same(a1, a2) and same(b1, b2)
    assert engine.adapters.loads == 2 and engine.adapters.evictions == 0


def test_batch_with_two_adapters_runs_each_group_with_its_own(make_engine: EngineMaker) -> None:
    engine = _engine(make_engine)
    [[a]], [[b]], [[none]] = (engine.run([_item(A)]), engine.run([_item(B)]),
                              engine.run([_item()]))
    mixed = engine.run([_item(A), _item(), _item(B)])
    assert [same(x[0], y) for x, y in zip(mixed, [a, none, b], strict=True)] == [True] * 3


def test_lru_evicts_the_least_recently_used(make_engine: EngineMaker) -> None:
    engine = _engine(make_engine, max_loaded_adapters=1)
    [[a1]] = engine.run([_item(A)])
    engine.run([_item(B)])
    assert engine.adapters.loaded == ["tiny-lora-b@1"]
    assert engine.adapters.evictions == 1
    [[a2]] = engine.run([_item(A)])  # loaded again from the registry
    assert engine.adapters.loads == 3
    assert same(a1, a2)
    assert set(engine.pipe.unet.peft_config) == {"tiny-lora-a@1"}


def test_adapter_must_be_a_lora_for_the_base(make_engine: EngineMaker) -> None:
    engine = _engine(make_engine)
    with pytest.raises(RegistryError, match="tiny-sdxl-turbo version 1: kind sdxl"):
        engine.run([_item(LoraRef("tiny-sdxl-turbo", "1"))])
    [[after]] = engine.run([_item()])  # still usable
    assert after.size == (64, 64)


def test_fuse_lora_bakes_the_adapter_in(make_engine: EngineMaker) -> None:
    base = _engine(make_engine)
    [[plain]] = base.run([_item()])
    [[with_a]] = base.run([_item(A)])
    fused = _engine(make_engine, fuse_lora="tiny-lora-a")
    assert fused.pipe.unet is not base.pipe.unet  # fused weights are their own cache entry
    [[fused_image]] = fused.run([_item()])
    assert not same(fused_image, plain)
    # fused weights match the unfused adapter up to float rounding
    assert max_diff(fused_image, with_a) <= 1
    [[plain_again]] = base.run([_item()])
    assert same(plain_again, plain)
