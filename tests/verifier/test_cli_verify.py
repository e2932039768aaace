"""``laneway verify IMAGE``: the policy's verify block, the verdict, the exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controlplane.policy import OnFail, Verify
from controlplane.verification import Action, VerificationStatus
from laneway.cli import app
from tests.verifier.conftest import poster
from verifier.outcome import decide_action

PHRASE = "Fresh Coffee Daily"
runner = CliRunner()


@pytest.fixture(scope="module")
def sign(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "sign.png"
    poster(PHRASE).save(path)
    return path


def test_the_requested_text_passes_with_exit_0(sign: Path) -> None:
    result = runner.invoke(app, ["verify", str(sign), "--text", PHRASE, "--json"])
    assert result.exit_code == 0, result.output
    verdict = json.loads(result.output)
    assert verdict["status"] == "passed" and verdict["typography"]["expected"] == [PHRASE]


def test_other_text_fails_with_exit_1_and_names_what_was_found(sign: Path) -> None:
    result = runner.invoke(app, ["verify", str(sign), "--text", "Fresh Tea Daily"])
    assert result.exit_code == 1, result.output
    assert "typography: FAIL" in result.output and "Fresh Coffee Daily" in result.output


def test_route_thresholds_apply(sign: Path, tmp_path: Path) -> None:
    policy = tmp_path / "strict.yaml"
    policy.write_text(
        "version: 1\nengines: {t: {kind: diffusers.text2image, model: tiny-sdxl}}\n"
        "routes:\n  - name: lax\n    stages: [{engine: t}]\n"
        "  - name: strict\n    stages: [{engine: t}]\n"
        "    verify: {quality: true, min_sharpness: 100000}\n")
    args = ["verify", str(sign), "--policy", str(policy), "--json"]
    assert runner.invoke(app, [*args, "--route", "lax"]).exit_code == 0
    result = runner.invoke(app, [*args, "--route", "strict"])
    assert result.exit_code == 1
    assert not json.loads(result.output)["quality"]["metrics"]["sharpness"]["passed"]
    assert runner.invoke(app, args).exit_code == 1  # the first route with verify: strict


def test_unreadable_image_and_unknown_route_exit_2(sign: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    assert runner.invoke(app, ["verify", str(junk)]).exit_code == 2
    result = runner.invoke(app, ["verify", str(sign), "--route", "nope"])
    assert result.exit_code == 2 and "nope" in result.output


@pytest.mark.parametrize(("on_fail", "attempt", "action"), [
    (OnFail.regenerate, 1, Action.regenerated),
    (OnFail.regenerate, 3, Action.flagged),
    (OnFail.flag, 1, Action.flagged),
    (OnFail.none, 1, Action.none),
])
def test_failed_verdict_actions(on_fail: OnFail, attempt: int, action: Action) -> None:
    verify = Verify(typography=True, on_fail=on_fail, max_attempts=3)
    assert decide_action(VerificationStatus.failed, verify, attempt=attempt) is action
    assert decide_action(VerificationStatus.passed, verify, attempt=attempt) is Action.none
