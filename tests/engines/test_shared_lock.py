"""The weights' readers-writer lock is fair: queued exclusive and shared waiters go in turns.

Orderings are proved with an instrumented condition that reports which threads wait inside
the lock, and with counters of acquisitions; nothing here sleeps or reads a clock. Timeouts
only keep a broken lock from hanging the suite.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from PIL import Image

from engines.base import LoraRef, StageItem
from engines.pipelines import DiffusersEngine
from engines.shared_lock import SharedLock
from tests.engines.conftest import EngineMaker, same

#: a generous bound for a thread that should finish at once; never hit by a working lock
HANG_S = 30
READERS = 3
A = LoraRef("tiny-lora-a", "1")


class WaitRecorder(threading.Condition):
    """A stand-in for the lock's condition that reports each thread that waits in it."""

    def __init__(self, watch: threading.Condition,
                 on_wait: Callable[[str], None] = lambda name: None) -> None:
        super().__init__()
        self.watch = watch
        self.on_wait = on_wait
        #: names of the threads waiting in the lock now
        self.waiting: set[str] = set()

    def wait(self, timeout: float | None = None) -> bool:
        name = threading.current_thread().name
        with self.watch:
            self.waiting.add(name)
            self.on_wait(name)
            self.watch.notify_all()
        try:
            return super().wait(timeout)
        finally:
            with self.watch:
                self.waiting.discard(name)
                self.watch.notify_all()


def recorded(lock: SharedLock, recorder: WaitRecorder) -> SharedLock:
    # the lock waits on its condition only when it makes a thread wait: swapping in a
    # recorder shows every wait the lock decides on, without changing the lock
    lock._cond = recorder
    return lock


def start(name: str, target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def join(*threads: threading.Thread) -> None:
    for thread in threads:
        thread.join(timeout=HANG_S)
        assert not thread.is_alive(), f"{thread.name} is stuck"


class Stream:
    """Shared holders that overlap: each stays until another has come in, so shared holds
    never drop to zero, unless the lock makes a reader wait (behind a queued exclusive
    request). Threads named ``reader-*`` hold shared; the one named ``writer`` asks for the
    lock exclusively once ``writer_asks_at`` shared holds have come in."""

    def __init__(self, lock: SharedLock, *, end: int, writer_asks_at: int) -> None:
        self.end = end
        self.writer_asks_at = writer_asks_at
        self.acquisitions = 0
        self.writer_queued_at: int | None = None
        self.writer_granted_at: int | None = None
        self.state = threading.Condition()
        self.recorder = WaitRecorder(self.state, self._on_wait)
        recorded(lock, self.recorder)

    def _on_wait(self, name: str) -> None:
        if name == "writer" and self.writer_queued_at is None:
            self.writer_queued_at = self.acquisitions

    def _reader_blocked(self) -> bool:
        return any(name.startswith("reader") for name in self.recorder.waiting)

    @property
    def over(self) -> bool:
        with self.state:
            return self.acquisitions >= self.end

    def shared_turn(self) -> None:
        """Called inside a shared hold: count it, and stay until another holder comes in."""
        with self.state:
            if self.acquisitions >= self.end:
                return
            self.acquisitions += 1
            mine = self.acquisitions
            self.state.notify_all()
            self.state.wait_for(lambda: self.acquisitions > mine or self._reader_blocked()
                                or self.acquisitions >= self.end, timeout=HANG_S)

    def writer_may_ask(self) -> None:
        with self.state:
            self.state.wait_for(lambda: self.acquisitions >= self.writer_asks_at,
                                timeout=HANG_S)

    def writer_in(self) -> None:
        """Called inside the exclusive hold."""
        with self.state:
            self.writer_granted_at = self.acquisitions

    def assert_writer_got_in_mid_stream(self) -> None:
        assert self.writer_queued_at is not None and self.writer_granted_at is not None
        # holders that came in before the writer queued may count after it: at most one each
        assert self.writer_granted_at - self.writer_queued_at <= READERS, (
            f"writer queued at acquisition {self.writer_queued_at}, "
            f"got in at {self.writer_granted_at}")
        assert self.writer_granted_at < self.acquisitions == self.end  # readers went on


def test_a_lora_run_gets_in_while_adapter_less_runs_keep_arriving() -> None:
    """The lock is never free, yet an exclusive request made mid-stream gets in within a
    few shared acquisitions of queueing, and the stream goes on after it."""
    lock = SharedLock()
    stream = Stream(lock, end=300, writer_asks_at=20)

    def reader() -> None:
        while not stream.over:
            with lock.hold(exclusive=False):
                stream.shared_turn()

    def writer() -> None:
        stream.writer_may_ask()
        with lock.hold(exclusive=True):
            stream.writer_in()

    threads = [start(f"reader-{i}", reader) for i in range(READERS)] + [start("writer", writer)]
    join(*threads)
    stream.assert_writer_got_in_mid_stream()


def _item(lora: LoraRef | None = None) -> StageItem:
    return StageItem(job_id="j", prompt="a castle", width=64, height=64, seed=11, lora=lora)


def test_an_engine_serves_a_lora_request_among_a_stream_of_plain_ones(
        make_engine: EngineMaker) -> None:
    """Slots of one engine (shared weights): three run adapter-less requests back to back,
    overlapping; a fourth's LoRA request is served mid-stream, and no image is touched by
    another run's adapter."""
    slots = [make_engine("diffusers.text2image", "tiny-sdxl", steps=1)
             for _ in range(READERS + 1)]
    assert all(isinstance(slot, DiffusersEngine) for slot in slots)
    [[plain]], [[with_a]] = slots[0].run([_item()]), slots[0].run([_item(A)])
    lock = slots[0]._entry.lock
    assert all(slot._entry.lock is lock for slot in slots)
    stream = Stream(lock, end=24, writer_asks_at=6)
    images: dict[str, list[Image.Image]] = {}

    def in_hold(slot: DiffusersEngine, turn: Callable[[], None]) -> None:
        call = slot.call

        def call_in_turn(items: list[StageItem]) -> list[list[Image.Image]]:
            turn()  # inside the lock, as the pipeline call is
            return call(items)

        slot.call = call_in_turn  # type: ignore[method-assign]

    def plain_slot(slot: DiffusersEngine) -> Callable[[], None]:
        in_hold(slot, stream.shared_turn)

        def serve() -> None:
            while not stream.over:
                [[image]] = slot.run([_item()])
                images.setdefault("plain", []).append(image)
        return serve

    def lora_slot() -> None:
        in_hold(slots[-1], stream.writer_in)
        stream.writer_may_ask()
        [[image]] = slots[-1].run([_item(A)])
        images["lora"] = [image]

    threads = ([start(f"reader-{i}", plain_slot(slot)) for i, slot in enumerate(slots[:-1])]
               + [start("writer", lora_slot)])
    join(*threads)
    stream.assert_writer_got_in_mid_stream()
    assert same(images["lora"][0], with_a)
    assert len(images["plain"]) >= stream.end and all(same(im, plain) for im in images["plain"])


def test_waiters_go_in_turns_and_shared_waiters_of_one_turn_together() -> None:
    state = threading.Condition()
    recorder = WaitRecorder(state)
    lock = recorded(SharedLock(), recorder)
    order: list[str] = []
    together = threading.Barrier(2, timeout=HANG_S)  # both of the last turn inside at once

    def holder(name: str, *, exclusive: bool, meet: bool = False) -> Callable[[], None]:
        def run() -> None:
            with lock.hold(exclusive=exclusive):
                with state:
                    order.append(name)
                if meet:
                    together.wait()
        return run

    def queue(name: str, *, exclusive: bool, meet: bool = False) -> threading.Thread:
        thread = start(name, holder(name, exclusive=exclusive, meet=meet))
        with state:
            assert state.wait_for(lambda: name in recorder.waiting, timeout=HANG_S)
        return thread

    with lock.hold(exclusive=True):
        threads = [queue("shared-1", exclusive=False), queue("exclusive-2", exclusive=True),
                   queue("shared-3", exclusive=False, meet=True),
                   queue("shared-4", exclusive=False, meet=True)]
    join(*threads)
    assert order[:2] == ["shared-1", "exclusive-2"]
    assert sorted(order[2:]) == ["shared-3", "shared-4"]


def test_a_waiter_that_fails_while_queued_gives_its_turn_back() -> None:
    state = threading.Condition()

    class FailingRecorder(WaitRecorder):
        def wait(self, timeout: float | None = None) -> bool:
            if threading.current_thread().name == "writer":
                raise RuntimeError("interrupted")
            return super().wait(timeout)

    lock = recorded(SharedLock(), FailingRecorder(state))
    failed: list[BaseException] = []

    def writer() -> None:
        try:
            with lock.hold(exclusive=True):
                pass
        except RuntimeError as exc:
            failed.append(exc)

    def reader() -> None:
        with lock.hold(exclusive=False):
            pass

    with lock.hold(exclusive=False):
        join(start("writer", writer))
        join(start("reader", reader))  # not queued behind the writer that gave up
    assert [str(exc) for exc in failed] == ["interrupted"]
    with lock.hold(exclusive=True):
        pass


@pytest.mark.parametrize("exclusive", [False, True])
def test_a_free_lock_is_taken_without_waiting(exclusive: bool) -> None:
    recorder = WaitRecorder(threading.Condition())
    lock = recorded(SharedLock(), recorder)
    with lock.hold(exclusive=exclusive):
        pass
    with lock.hold(exclusive=False), lock.hold(exclusive=False):
        pass
    assert recorder.waiting == set()
