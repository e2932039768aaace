"""The simulated engine on an injected clock: service times, batches, progress, stopping."""

from __future__ import annotations

import statistics

import pytest
from pydantic import ValidationError

from controlplane.policy import EngineSpec
from engines.base import StageItem
from engines.sim import SIMULATED_COLOUR, SimEngine, service_bounds_ms


class FakeClock:
    """A monotonic clock that only moves when the engine sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.slept.append(seconds)
        self.now += seconds


def sim_engine(clock: FakeClock, **fields: object) -> SimEngine:
    sim = fields.pop("sim")
    spec = EngineSpec.model_validate({"kind": "sim", "sim": sim, **fields})
    return SimEngine(spec, clock=clock, sleep=clock.sleep)


def item(seed: int = 1, **fields: object) -> StageItem:
    values: dict[str, object] = {"job_id": f"j{seed}", "prompt": "p", "width": 32,
                                 "height": 24, "seed": seed, **fields}
    return StageItem(**values)  # type: ignore[arg-type]


def test_fixed_service_time_holds_the_slot_exactly_that_long() -> None:
    clock = FakeClock()
    engine = sim_engine(clock, sim={"mean_ms": 200, "dist": "fixed"}, steps=4)
    started = clock.now
    [[image]] = engine.run([item()])
    assert clock.now - started == pytest.approx(0.2)
    assert image.size == (32, 24)
    assert image.getpixel((0, 0)) == SIMULATED_COLOUR
    assert image.getextrema() == ((255, 255), (0, 0), (255, 255))


def test_lognormal_draws_stay_in_bounds_with_the_configured_mean_and_spread() -> None:
    engine = sim_engine(FakeClock(), sim={"mean_ms": 2500, "jitter": 0.2})
    draws = [engine.service_ms([item(seed)]) for seed in range(3000)]
    low, high = service_bounds_ms(engine.sim, 2500)
    assert 1000 < low < 2500 < high < 6000
    assert all(low <= d <= high for d in draws)
    assert statistics.fmean(draws) == pytest.approx(2500, rel=0.03)
    assert statistics.stdev(draws) / statistics.fmean(draws) == pytest.approx(0.2, rel=0.15)


def test_batch_time_is_the_draw_plus_per_item_time_for_each_further_image() -> None:
    engine = sim_engine(FakeClock(), sim={"mean_ms": 300, "per_item_ms": 25, "dist": "fixed"})
    assert engine.service_ms([item(1)]) == 300
    assert engine.service_ms([item(s) for s in range(8)]) == 300 + 25 * 7
    assert engine.service_ms([item(1, n=2), item(2, n=3)]) == 300 + 25 * 4


def test_stage_steps_scale_the_mean_from_the_engines_own_steps() -> None:
    engine = sim_engine(FakeClock(), sim={"mean_ms": 2500, "dist": "fixed"}, steps=50)
    assert engine.service_ms([item(steps=4)]) == pytest.approx(200)
    assert engine.service_ms([item(steps=50)]) == pytest.approx(2500)
    assert engine.service_ms([item()]) == pytest.approx(2500)


def test_progress_reaches_every_item_at_evenly_spaced_steps() -> None:
    clock = FakeClock()
    engine = sim_engine(clock, sim={"mean_ms": 400, "dist": "fixed"}, steps=4)
    calls: list[tuple[str, int, int, float]] = []
    items = [item(s) for s in (1, 2)]
    for it in items:
        it.on_step = lambda step, steps, job=it.job_id: calls.append(
            (job, step, steps, round(clock.now - 100.0, 6)))
    images = engine.run(items)
    assert [len(per_item) for per_item in images] == [1, 1]
    assert calls == [(job, step, 4, round(0.1 * step, 6))
                     for step in range(1, 5) for job in ("j1", "j2")]


def test_without_steps_progress_comes_every_step_ms() -> None:
    clock = FakeClock()
    engine = sim_engine(clock, sim={"mean_ms": 1000, "dist": "fixed"})
    steps_seen: list[tuple[int, int]] = []
    engine.run([item(on_step=lambda step, steps: steps_seen.append((step, steps)))])
    assert steps_seen == [(step, 20) for step in range(1, 21)]


def test_raising_from_on_step_stops_the_run_there() -> None:
    clock = FakeClock()
    engine = sim_engine(clock, sim={"mean_ms": 1000, "dist": "fixed"}, steps=10)
    seen: list[int] = []

    class Cancelled(Exception):
        pass

    def on_step(step: int, steps: int) -> None:
        seen.append(step)
        if step == 3:
            raise Cancelled(f"stopped at {step}/{steps}")

    with pytest.raises(Cancelled, match="stopped at 3/10"):
        engine.run([item(on_step=on_step)])
    assert seen == [1, 2, 3]
    assert clock.now - 100.0 == pytest.approx(0.3)


def test_draws_are_reproducible_per_seed() -> None:
    sim = {"mean_ms": 200, "jitter": 0.3}
    first = sim_engine(FakeClock(), sim=sim, steps=4)
    second = sim_engine(FakeClock(), sim=sim, steps=4)
    assert [first.service_ms([item(s)]) for s in range(20)] == \
        [second.service_ms([item(s)]) for s in range(20)]
    assert len({first.service_ms([item(s)]) for s in range(20)}) == 20


def test_n_images_per_item() -> None:
    engine = sim_engine(FakeClock(), sim={"mean_ms": 10, "dist": "fixed"})
    [images] = engine.run([item(n=3, width=16, height=8)])
    assert [im.size for im in images] == [(16, 8)] * 3


def test_unknown_distribution_is_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError, match=r"sim\.dist"):
        EngineSpec.model_validate({"kind": "sim", "sim": {"mean_ms": 5, "dist": "gamma"}})
