from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from controlplane.policy import Verify
from controlplane.verification import Verification, VerificationStatus
from tests.verifier.conftest import poster
from verifier.on_file import run


@pytest.fixture(scope="module")
def sale_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("on_file") / "sale.png"
    poster("SALE 50% OFF").save(path)
    return path


def test_passing_file_exits_0_with_json(sale_png: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    assert run(sale_png, texts=["SALE 50% OFF"], verify=Verify(), as_json=True) == 0
    verdict = Verification.model_validate(json.loads(capsys.readouterr().out))
    assert verdict.status is VerificationStatus.passed
    assert verdict.typography is not None and verdict.typography.expected == ["SALE 50% OFF"]
    assert verdict.quality is not None


def test_failing_file_exits_1_with_table(sale_png: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    assert run(sale_png, texts=["SALE 60% OFF"], verify=Verify(), as_json=False) == 1
    out = capsys.readouterr().out
    assert out.startswith("verification: failed")
    assert "'SALE 60% OFF'" in out and "FAIL" in out


def test_quality_runs_without_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "black.png"
    Image.new("RGB", (256, 256)).save(path)
    assert run(path, texts=[], verify=Verify(), as_json=False) == 1
    assert "mean_luma" in capsys.readouterr().out


def test_unreadable_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    assert run(path, texts=[], verify=Verify(), as_json=True) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert run(tmp_path / "absent.png", texts=[], verify=Verify(), as_json=True) == 2
