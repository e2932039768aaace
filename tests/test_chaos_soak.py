"""The chaos soak, shortened (``bench/chaos.py`` runs it for minutes): every kind of fault
at least once under mixed traffic, and afterwards nothing is lost, stuck or off contract."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import FAULTS, SoakConfig, problems, soak

pytestmark = pytest.mark.slow


def test_a_short_soak_loses_nothing(tmp_path: Path) -> None:
    config = SoakConfig(duration_s=40, seed=11, clients=3, gap_s=(2.5, 3.5), stop_s=(2.0, 3.0))
    figures = soak(config, tmp_path)
    assert set(figures["faults"]) == set(FAULTS), figures["faults"]
    assert figures["accepted"] > 20, figures
    assert figures["final"].get("completed", 0) > 0, figures
    assert problems(figures) == [], figures
