"""A fair readers-writer lock guarding one set of shared weights (see :mod:`engines.pipelines`).

Runs without an adapter hold it shared and run side by side; runs with a LoRA hold it
exclusively, because an active adapter is state on the shared UNet and text encoders::

    with entry.lock.hold(exclusive=item.lora is not None):
        images = engine.call(items)

Fairness, and why runs of one adapter are not grouped, are in :class:`SharedLock`.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager


class _Turn:
    """One place in a :class:`SharedLock`'s queue: one exclusive waiter, or shared waiters."""

    def __init__(self, *, exclusive: bool) -> None:
        self.exclusive = exclusive
        self.waiters = 1
        self.granted = False


class SharedLock:
    """A fair readers-writer lock: many holders in shared mode, or one in exclusive mode.

    Waiters queue in turns, first come first in. A shared request goes straight in only
    while nobody holds the lock exclusively and nobody waits; otherwise it joins the last
    turn when that one is shared, or opens a new one. A queued exclusive request therefore
    stops new shared holders, gets the lock once the current ones leave, and hands it on
    to every shared waiter that queued meanwhile, all at once, before the next exclusive
    waiter: a stream of adapter-less runs cannot starve a LoRA run, nor a stream of LoRA
    runs the adapter-less ones.

    Runs of one adapter do not share an exclusive hold: :meth:`AdapterCache.activate
    <engines.adapters.AdapterCache.activate>` enables the adapter for one call and disables
    it in ``finally``, which would switch LoRA off under another run of the same adapter,
    and its LRU is not thread-safe. Items of one adapter already batch into one call.

    Not reentrant: a thread holding the lock that asks again may wait behind a queued
    exclusive request forever.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._queue: deque[_Turn] = deque()

    @contextmanager
    def hold(self, *, exclusive: bool) -> Iterator[None]:
        """Hold the lock for the body, exclusively or shared with other shared holders."""
        with self._cond:
            self._enter(exclusive=exclusive)
        try:
            yield
        finally:
            with self._cond:
                self._leave(exclusive=exclusive)

    def _enter(self, *, exclusive: bool) -> None:
        if not self._queue and not self._writer and (not exclusive or self._readers == 0):
            self._take(exclusive=exclusive, count=1)
            return
        last = self._queue[-1] if self._queue else None
        if not exclusive and last is not None and not last.exclusive:
            turn = last
            turn.waiters += 1
        else:
            turn = _Turn(exclusive=exclusive)
            self._queue.append(turn)
        try:
            self._cond.wait_for(lambda: turn.granted)
        except BaseException:  # interrupted while queued: give the place (or the lock) back
            if turn.granted:
                self._leave(exclusive=exclusive)
            else:
                turn.waiters -= 1
                if turn.waiters == 0:
                    self._queue.remove(turn)
                    self._hand_on()
            raise

    def _take(self, *, exclusive: bool, count: int) -> None:
        if exclusive:
            self._writer = True
        else:
            self._readers += count

    def _leave(self, *, exclusive: bool) -> None:
        if exclusive:
            self._writer = False
        else:
            self._readers -= 1
        self._hand_on()

    def _hand_on(self) -> None:
        """Let the next turn in if it can go in now."""
        if self._writer or not self._queue or (self._queue[0].exclusive and self._readers):
            return
        turn = self._queue.popleft()
        turn.granted = True
        self._take(exclusive=turn.exclusive, count=turn.waiters)
        self._cond.notify_all()
