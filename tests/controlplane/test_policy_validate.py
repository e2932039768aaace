"""``laneway policy validate`` and the policy loader: paths, lines and exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.errors import PolicyError
from controlplane.policy_loader import parse_policy
from tests.conftest import REPO

TINY = (REPO / "policies" / "tiny.yaml").read_text()


def validate(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return subprocess.run([sys.executable, "-m", "laneway.cli", "policy", "validate",
                           str(path)], capture_output=True, text=True, timeout=60)


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize("name", ["tiny.yaml", "default.yaml"])
def test_shipped_policies_are_valid(tmp_path: Path, name: str) -> None:
    result = validate(tmp_path, (REPO / "policies" / name).read_text())
    assert result.returncode == 0, result.stderr
    assert "valid, version sha256:" in result.stdout


def test_each_error_names_path_and_line(tmp_path: Path) -> None:
    broken = (TINY.replace("    steps: 8\n", "    steps: eight\n    colour: red\n")
              .replace("stages: [{engine: turbo}]\n    admission: {max_queue: 200",
                       "stages: [{engine: turbro}]\n    admission: {max_queue: 200"))
    result = validate(tmp_path, broken)
    assert result.returncode == 1
    assert f"engines.base.steps: line {line_of(broken, 'steps: eight')}" in result.stderr
    assert f"engines.base.colour: line {line_of(broken, 'colour: red')}: unknown key" \
        in result.stderr
    # cross-references are checked once the shapes are right
    only_dangling = TINY.replace("stages: [{engine: turbo}]\n    admission: {max_queue: 200",
                                 "stages: [{engine: turbro}]\n    admission: {max_queue: 200")
    result = validate(tmp_path, only_dangling)
    assert result.returncode == 1
    assert (f"routes[2].stages[0].engine: line {line_of(only_dangling, 'turbro')}: "
            "unknown engine (got 'turbro')") in result.stderr


@pytest.mark.parametrize(("change", "field"), [
    (("degrade_to: fast_draft", "degrade_to: nowhere"), "routes[3].admission.degrade_to"),
    (("max_concurrency: 2", "max_concurrency: -2"), "engines.turbo.max_concurrency"),
    (("match: {intent: draft}", "match: {intent: sketch}"), "routes[2].match.intent"),
    (("{weight: 4}", "{weight: 4, deferrable: maybe}"), "tiers.premium.deferrable"),
    (("version: 1", "version: 2"), "version"),
])
def test_bad_fields_are_refused(change: tuple[str, str], field: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(TINY.replace(*change))
    assert field in [d.field for d in info.value.details]
    assert all(d.message.startswith("line ") for d in info.value.details)


def test_duplicate_keys_and_garbage_are_refused(tmp_path: Path) -> None:
    result = validate(tmp_path, TINY.replace("default_tier: standard",
                                             "default_tier: standard\ndefault_tier: batch"))
    assert result.returncode == 1 and "duplicate key" in result.stderr
    result = validate(tmp_path, "engines: [unclosed")
    assert result.returncode == 1 and "not valid YAML" in result.stderr


def test_version_is_canonical() -> None:
    reordered = TINY.replace("premium:  {weight: 4}\n  standard: {weight: 2}",
                             "standard: {weight: 2}\n  premium:  {weight: 4}")
    assert reordered != TINY
    assert parse_policy(reordered).version_id == parse_policy(TINY).version_id
    assert parse_policy(TINY.replace("steps: 8", "steps: 9")).version_id != \
        parse_policy(TINY).version_id
