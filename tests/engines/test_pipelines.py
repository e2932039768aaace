"""Loading process-wide weights holds no lock that other slots need (engines/pipelines.py).

Loads are made slow by a stand-in pipeline class whose ``from_pretrained`` blocks on an event;
waiting on a load in progress is seen through an instrumented future. A load that finds its
event set was let go by the test after the other calls returned; one whose wait ran out
was not (the calls it should not block were stuck behind it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from controlplane.registry import Registry
from engines import pipelines
from engines.base import StageItem
from engines.pipelines import DiffusersEngine, Loaded, acquire, release
from engines.upscalers import LatentUpscaleEngine
from tests.engines.conftest import EngineMaker, same

#: a generous bound for a thread that should finish at once; never hit by working code
HANG_S = 30
#: a device of its own, so no stand-in weights meet a real engine's
DEVICE = "fake"


class FakePipe:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def to(self, device: str) -> FakePipe:
        return self


@dataclass
class SlowLoad:
    """How one dtype loads: after ``proceed`` is set (or the wait runs out), maybe raising."""

    proceed: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    fail: Exception | None = None
    #: per load: whether ``proceed`` was set when it went on (False: the wait ran out)
    let_go: list[bool] = field(default_factory=list)


class Loads:
    """A stand-in pipeline class; ``from_pretrained`` runs the :class:`SlowLoad` of the dtype."""

    def __init__(self) -> None:
        self.slow: dict[torch.dtype, SlowLoad] = {}
        self.calls: list[torch.dtype] = []

    def from_pretrained(self, path: object, *, dtype: torch.dtype,
                        use_safetensors: bool) -> FakePipe:
        self.calls.append(dtype)
        slow = self.slow.get(dtype)
        if slow is not None:
            slow.started.set()
            slow.let_go.append(slow.proceed.wait(timeout=HANG_S))
            if slow.fail is not None:
                raise slow.fail
        return FakePipe(dtype)


class WaitedFuture(Future[Loaded]):
    """A load in progress that counts the callers waiting for it."""

    watch = threading.Condition()
    waiting = 0

    def result(self, timeout: float | None = None) -> Loaded:
        with WaitedFuture.watch:
            WaitedFuture.waiting += 1
            WaitedFuture.watch.notify_all()
        return super().result(timeout)


def until_waiting(count: int) -> None:
    with WaitedFuture.watch:
        assert WaitedFuture.watch.wait_for(lambda: WaitedFuture.waiting >= count,
                                           timeout=HANG_S)


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[Loads]:
    # raising=False: code without load futures still runs, and fails on what it does
    monkeypatch.setattr(pipelines, "Future", WaitedFuture, raising=False)
    monkeypatch.setattr(WaitedFuture, "waiting", 0)
    made = Loads()
    yield made
    for slow in made.slow.values():  # a failed test leaves no load blocked
        slow.proceed.set()
    leaked = [key for key in pipelines._loaded if key[-1] == DEVICE]
    for key in leaked:
        del pipelines._loaded[key]
    assert leaked == [] and not pipelines._loading


Acquire = Callable[[torch.dtype], Loaded]


@pytest.fixture
def get(tiny_registry: Registry, loads: Loads) -> Acquire:
    def get(dtype: torch.dtype) -> Loaded:
        return acquire(tiny_registry, "tiny-sdxl", "1", kind="sdxl", pipeline_class=loads,
                       dtype=dtype, device=DEVICE)
    return get


class InThread:
    """``call`` run in a thread; its result or error kept for the test."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.result = call()
            except BaseException as exc:  # handed to the test
                self.error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def join(self) -> Any:
        self._thread.join(timeout=HANG_S * 2)
        assert not self._thread.is_alive()
        return self.result


def test_a_slow_load_blocks_no_loaded_weights_and_loads_take_turns(
        loads: Loads, get: Acquire) -> None:
    warm = get(torch.float16)
    slow = loads.slow[torch.float32] = SlowLoad()
    loading = InThread(lambda: get(torch.float32))
    assert slow.started.wait(timeout=HANG_S)

    again = get(torch.float16)  # weights already loaded
    release(again)  # a closing engine
    # another key's load waits its turn (diffusers' meta-device set-up is process-wide)
    other_loading = InThread(lambda: get(torch.bfloat16))
    assert loads.calls == [torch.float16, torch.float32]
    slow.proceed.set()
    slow_entry, other = loading.join(), other_loading.join()

    assert slow.let_go == [True], "the calls on loaded weights waited for the slow load"
    assert loads.calls == [torch.float16, torch.float32, torch.bfloat16]
    assert again is warm and other.pipe.dtype == torch.bfloat16
    assert slow_entry.pipe.dtype == torch.float32
    for entry in (warm, other, slow_entry):
        release(entry)


def test_callers_of_a_key_being_loaded_wait_for_that_load_and_share_it(
        loads: Loads, get: Acquire) -> None:
    slow = loads.slow[torch.float32] = SlowLoad()
    first = InThread(lambda: get(torch.float32))
    assert slow.started.wait(timeout=HANG_S)
    second, third = InThread(lambda: get(torch.float32)), InThread(lambda: get(torch.float32))
    until_waiting(2)
    slow.proceed.set()

    entries = [first.join(), second.join(), third.join()]
    assert entries[0] is entries[1] is entries[2]
    assert loads.calls == [torch.float32] and entries[0].users == 3
    for entry in entries:
        release(entry)
    assert ("tiny-sdxl", "1", str(torch.float32), None, DEVICE) not in pipelines._loaded


def test_a_failed_load_raises_to_its_waiters_and_the_next_caller_loads_again(
        loads: Loads, get: Acquire) -> None:
    slow = loads.slow[torch.float32] = SlowLoad(fail=RuntimeError("disk on fire"))
    first = InThread(lambda: get(torch.float32))
    assert slow.started.wait(timeout=HANG_S)
    second = InThread(lambda: get(torch.float32))
    until_waiting(1)
    slow.proceed.set()
    first.join()
    second.join()
    assert [str(call.error) for call in (first, second)] == ["disk on fire"] * 2

    del loads.slow[torch.float32]
    entry = get(torch.float32)  # the key is not poisoned: this caller loads again
    assert loads.calls == [torch.float32, torch.float32] and entry.users == 1
    release(entry)


def _item() -> StageItem:
    return StageItem(job_id="j", prompt="a castle", width=64, height=64, seed=11)


def test_a_slot_serves_a_warm_engine_while_another_engines_weights_load(
        make_engine: EngineMaker, monkeypatch: pytest.MonkeyPatch) -> None:
    warm = make_engine("diffusers.text2image", "tiny-sdxl", steps=2)
    [[before]] = warm.run([_item()])
    slow = SlowLoad()
    real_class = LatentUpscaleEngine.load_class

    class SlowUpscalerLoad:
        @staticmethod
        def from_pretrained(*args: Any, **kwargs: Any) -> Any:
            slow.started.set()
            slow.let_go.append(slow.proceed.wait(timeout=HANG_S))
            return real_class.from_pretrained(*args, **kwargs)

    monkeypatch.setattr(LatentUpscaleEngine, "load_class", SlowUpscalerLoad)
    loading = InThread(lambda: make_engine("diffusers.latent_upscale", "tiny-latent-upscaler"))
    assert slow.started.wait(timeout=HANG_S)

    [[during]] = warm.run([_item()])  # a slot keeps serving
    second_slot = make_engine("diffusers.text2image", "tiny-sdxl", steps=2)  # shared weights
    [[other_slot]] = second_slot.run([_item()])
    second_slot.close()
    slow.proceed.set()
    upscaler = loading.join()

    assert slow.let_go == [True], "the warm engine's slots waited for the other load"
    assert same(during, before) and same(other_slot, before)
    assert isinstance(upscaler, DiffusersEngine) and upscaler.pipe.unet is not None
