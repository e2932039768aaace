"""The supervisor's restart plan: backoff that doubles while a child keeps dying, and a
loud give-up after too many quick deaths, reported for ``/readyz``."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from controlplane.settings import Settings
from laneway.supervisor import (
    GIVE_UP_AFTER,
    GIVE_UP_WINDOW_S,
    Command,
    Supervisor,
    _Child,
    _Watched,
)


def watched() -> _Watched:
    return _Watched("laneway worker", start=lambda: None, alive=lambda: False)


def test_restarts_back_off_and_give_up_after_quick_deaths(
        caplog: pytest.LogCaptureFixture) -> None:
    child = watched()
    delays = []
    for death in range(GIVE_UP_AFTER - 1):
        child.died(float(death))
        assert child.restart_at is not None and not child.given_up
        delays.append(child.restart_at - death)
    assert delays == [0.5, 1.0, 2.0, 4.0]
    with caplog.at_level(logging.ERROR, logger="laneway.serve"):
        child.died(float(GIVE_UP_AFTER))
    assert child.given_up and child.restart_at is None
    assert "not starting it again" in caplog.text


def test_deaths_far_apart_never_give_up_nor_back_off_further() -> None:
    child = watched()
    for death in range(3 * GIVE_UP_AFTER):
        child.died(death * (GIVE_UP_WINDOW_S + 1))
        assert not child.given_up
        assert child.restart_at == death * (GIVE_UP_WINDOW_S + 1) + 0.5


def test_a_child_that_keeps_dying_is_reported(tmp_path: Path) -> None:
    supervisor = Supervisor(Settings(home=tmp_path), None)
    child = watched()
    supervisor._watched.append(child)
    assert supervisor.problems() == []
    for death in range(GIVE_UP_AFTER):
        child.died(float(death))
    (problem,) = supervisor.problems()
    assert problem.startswith("laneway worker: died 5 times")


def test_a_child_gets_serve_s_settings_and_its_command_s_variables(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-a,MIG-b")
    settings = Settings(home=tmp_path, redis_url="redis://127.0.0.1:1/0")
    slice_b = _Child(settings, Command(["worker", "--device", "cuda:0"],
                                       {"CUDA_VISIBLE_DEVICES": "MIG-b"}))
    assert slice_b.name == "CUDA_VISIBLE_DEVICES=MIG-b laneway worker --device cuda:0"
    environ = slice_b.environ()
    assert environ["CUDA_VISIBLE_DEVICES"] == "MIG-b"
    assert environ["LANEWAY_REDIS_URL"] == "redis://127.0.0.1:1/0"
    assert _Child(settings, Command(["verifier"])).environ()["CUDA_VISIBLE_DEVICES"] == (
        "MIG-a,MIG-b")
