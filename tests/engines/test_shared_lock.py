"""The weights' readers-writer lock is fair: queued exclusive and shared waiters go in turns.

Orderings are proved with an instrumented condition that reports which threads wait inside
the lock, and with counters of acquisitions; nothing here sleeps or reads a clock. Timeouts
only keep a broken lock from hanging the suite.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from engines.shared_lock import SharedLock

#: a generous bound for a thread that should finish at once; never hit by a working lock
HANG_S = 30
READERS = 3


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


@dataclass
class Stream:
    acquisitions: int = 0
    writer_queued_at: int | None = None
    writer_granted_at: int | None = None


def test_a_lora_run_gets_in_while_adapter_less_runs_keep_arriving() -> None:
    """Shared holders overlap (each leaves only once another has come in), so the lock is
    never free; an exclusive request made mid-stream still gets in, within a few shared
    acquisitions of queueing, and the stream goes on after it."""
    stream_end, writer_asks_at = 300, 20
    state = threading.Condition()
    stream = Stream()

    def on_wait(name: str) -> None:
        if name == "writer" and stream.writer_queued_at is None:
            stream.writer_queued_at = stream.acquisitions

    recorder = WaitRecorder(state, on_wait)
    lock = recorded(SharedLock(), recorder)

    def reader_blocked() -> bool:
        return any(name.startswith("reader") for name in recorder.waiting)

    def reader() -> None:
        while True:
            with lock.hold(exclusive=False), state:
                if stream.acquisitions >= stream_end:
                    return
                stream.acquisitions += 1
                mine = stream.acquisitions
                state.notify_all()
                # stay until another holder has come in: shared holds never drop to zero,
                # unless the lock makes a reader wait (behind a queued exclusive request)
                state.wait_for(lambda mine=mine: stream.acquisitions > mine or reader_blocked()
                               or stream.acquisitions >= stream_end, timeout=HANG_S)

    def writer() -> None:
        with state:
            state.wait_for(lambda: stream.acquisitions >= writer_asks_at, timeout=HANG_S)
        with lock.hold(exclusive=True), state:
            stream.writer_granted_at = stream.acquisitions

    threads = [start(f"reader-{i}", reader) for i in range(READERS)] + [start("writer", writer)]
    join(*threads)

    assert stream.writer_queued_at is not None and stream.writer_granted_at is not None
    # holders that came in before the writer queued may count after it: at most one each
    assert stream.writer_granted_at - stream.writer_queued_at <= READERS, (
        f"writer queued at acquisition {stream.writer_queued_at}, "
        f"got in at {stream.writer_granted_at}")
    assert stream.writer_granted_at < stream.acquisitions == stream_end  # readers went on


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
