"""The batch window: full batches go at once, partial ones when max_wait_ms has passed."""

from __future__ import annotations

from engines.batching import fill_batch


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def arrivals(schedule: dict[float, list[str]], clock: FakeClock):
    """``more(n)``: items whose arrival time has come, at most n."""
    waiting: list[tuple[float, str]] = sorted((t, i) for t, items in schedule.items()
                                              for i in items)

    async def more(n: int) -> list[str]:
        due = [item for at, item in waiting if at <= clock.now][:n]
        for item in due:
            waiting.remove(next(w for w in waiting if w[1] == item))
        return due

    return more


async def test_a_full_batch_goes_without_waiting() -> None:
    clock = FakeClock()
    more = arrivals({0.0: ["b", "c", "d", "e"]}, clock)
    batch = await fill_batch(["a"], more, max_batch=4, max_wait_ms=50, clock=clock,
                             sleep=clock.sleep)
    assert batch == ["a", "b", "c", "d"]
    assert clock.slept == []


async def test_a_partial_batch_goes_at_the_deadline() -> None:
    clock = FakeClock()
    more = arrivals({0.010: ["b"], 0.080: ["late"]}, clock)
    batch = await fill_batch(["a"], more, max_batch=8, max_wait_ms=50, clock=clock,
                             sleep=clock.sleep)
    assert batch == ["a", "b"]
    assert 0.050 <= clock.now < 0.055


async def test_a_lone_item_waits_max_wait_ms_at_most() -> None:
    clock = FakeClock()
    batch = await fill_batch(["a"], arrivals({}, clock), max_batch=8, max_wait_ms=30,
                             clock=clock, sleep=clock.sleep)
    assert batch == ["a"]
    assert clock.now <= 0.030 + 1e-9
