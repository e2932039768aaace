from __future__ import annotations

import logging
import threading

import pytest
import torch

from controlplane.errors import RegistryError
from controlplane.policy import EngineKind
from engines.base import StageItem
from engines.factory import BUILDERS
from engines.pipelines import DiffusersEngine, SharedLock
from engines.resize import ResizeEngine
from engines.sim import SimEngine
from engines.text2image import Text2ImageEngine
from engines.upscalers import LatentUpscaleEngine, X4UpscaleEngine
from tests.engines.conftest import EngineMaker


def test_dispatch_by_kind(make_engine: EngineMaker) -> None:
    assert isinstance(make_engine("diffusers.text2image", "tiny-sdxl"), Text2ImageEngine)
    assert isinstance(make_engine("diffusers.latent_upscale", "tiny-latent-upscaler"),
                      LatentUpscaleEngine)
    assert isinstance(make_engine("diffusers.upscale", "tiny-x4-upscaler"), X4UpscaleEngine)
    assert isinstance(make_engine("resize"), ResizeEngine)
    assert isinstance(make_engine("sim", sim={"mean_ms": 5}), SimEngine)


def test_every_engine_kind_has_a_builder() -> None:
    assert set(BUILDERS) == set(EngineKind)


def test_model_of_the_wrong_family_is_refused(make_engine: EngineMaker) -> None:
    with pytest.raises(RegistryError, match="tiny-x4-upscaler version 1: kind sd-x4-upscale, "
                                            "this engine needs kind sdxl"):
        make_engine("diffusers.text2image", "tiny-x4-upscaler")


def test_float16_on_cpu_loads_as_float32_with_one_warning(
        make_engine: EngineMaker, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="engines.pipelines"):
        engine = make_engine("diffusers.text2image", "tiny-sdxl", steps=1, dtype="float16")
        make_engine("diffusers.text2image", "tiny-sdxl", steps=1, dtype="float16")
    assert isinstance(engine, DiffusersEngine)
    assert engine.pipe.unet.dtype == torch.float32
    [[image]] = engine.run([StageItem(job_id="j", prompt="p", width=64, height=64, seed=0)])
    assert image.size == (64, 64)
    warnings = [r for r in caplog.records if "float16 does not run on cpu" in r.getMessage()]
    assert len(warnings) == 1


def test_bfloat16_runs_on_cpu(make_engine: EngineMaker) -> None:
    engine = make_engine("diffusers.text2image", "tiny-sdxl", steps=1, dtype="bfloat16")
    assert isinstance(engine, DiffusersEngine)
    assert engine.pipe.unet.dtype == torch.bfloat16
    [[image]] = engine.run([StageItem(job_id="j", prompt="p", width=64, height=64, seed=0)])
    assert image.size == (64, 64)


def test_compile_wraps_only_this_engines_unet(make_engine: EngineMaker) -> None:
    plain = make_engine("diffusers.text2image", "tiny-sdxl")
    compiled = make_engine("diffusers.text2image", "tiny-sdxl", compile=True)
    assert isinstance(plain, DiffusersEngine) and isinstance(compiled, DiffusersEngine)
    # never called here: the first compile takes minutes on this CPU
    assert isinstance(compiled.pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled.pipe.unet._orig_mod is plain.pipe.unet
    assert not isinstance(plain.pipe.unet, torch._dynamo.eval_frame.OptimizedModule)


def test_closed_engine_releases_its_weights(make_engine: EngineMaker) -> None:
    first = make_engine("diffusers.text2image", "tiny-sdxl")
    second = make_engine("diffusers.text2image", "tiny-sdxl")
    assert isinstance(first, DiffusersEngine) and isinstance(second, DiffusersEngine)
    unet = first.pipe.unet
    first.close()
    assert second.pipe.unet is unet  # still shared by the open engine
    second.close()
    third = make_engine("diffusers.text2image", "tiny-sdxl")
    assert isinstance(third, DiffusersEngine)
    assert third.pipe.unet is not unet  # loaded again


def test_shared_lock_lets_readers_share_and_writers_wait() -> None:
    lock = SharedLock()
    with lock.hold(exclusive=False), lock.hold(exclusive=False):
        pass  # two shared holders at once do not deadlock
    wrote = threading.Event()

    def writer() -> None:
        with lock.hold(exclusive=True):
            wrote.set()

    with lock.hold(exclusive=False):
        thread = threading.Thread(target=writer)
        thread.start()
        assert not wrote.wait(timeout=0.1)  # blocked while a reader holds the lock
    assert wrote.wait(timeout=5)
    thread.join(timeout=5)
