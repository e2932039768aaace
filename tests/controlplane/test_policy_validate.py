"""``laneway policy validate`` and the policy loader: paths, lines and exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.errors import PolicyError
from controlplane.policy import RemoteRules
from controlplane.policy_loader import parse_policy
from controlplane.settings import setting_names
from tests.conftest import REPO

TINY = (REPO / "policies" / "tiny.yaml").read_text()


def validate(tmp_path: Path, text: str, **settings: str) -> subprocess.CompletedProcess[str]:
    """``laneway policy validate`` on ``text`` with these ``LANEWAY_*`` variables only."""
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("LANEWAY_")}
    return subprocess.run([sys.executable, "-m", "laneway.cli", "policy", "validate",
                           str(path)], capture_output=True, text=True, timeout=60,
                          env=env | settings)


def with_remote(**fields: str) -> str:
    """The tiny policy with one more engine, a remote one with ``fields`` on top."""
    spec = {"kind": "http.openai_images", "base_url": "https://images.example.com/v1",
            "model": "m", "api_key_env": "LANEWAY_PROVIDER_TEST_KEY", **fields}
    flow = ", ".join(f"{k}: {v}" for k, v in spec.items())
    return TINY.replace("engines:\n", f"engines:\n  hosted: {{{flow}}}\n", 1)


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


def test_a_remote_engine_key_starts_with_the_provider_prefix() -> None:
    assert parse_policy(with_remote(), remote=RemoteRules()).engines["hosted"].api_key_env \
        == "LANEWAY_PROVIDER_TEST_KEY"
    for name in ("OPENAI_API_KEY", "LANEWAY_KEY_ACME", "LANEWAY_TEST_KEY"):
        with pytest.raises(PolicyError) as refused:
            parse_policy(with_remote(api_key_env=name), remote=RemoteRules())
        (detail,) = refused.value.details
        assert (detail.field, detail.value) == ("engines.hosted.api_key_env", name)
        assert "starts with LANEWAY_PROVIDER_" in detail.message
    operator = RemoteRules(key_prefixes=("LANEWAY_PROVIDER_", "OPENAI_"))
    assert parse_policy(with_remote(api_key_env="OPENAI_API_KEY"), remote=operator)


@pytest.mark.parametrize("name", setting_names())
def test_no_api_key_env_names_a_setting(name: str) -> None:
    """Not the admin token, nor a setting under a reserved prefix (the operator's own
    LANEWAY_PROVIDER_KEY_PREFIXES), even where the operator's prefixes would allow it."""
    operator = RemoteRules(key_prefixes=("LANEWAY_PROVIDER_", "LANEWAY_"))
    with pytest.raises(PolicyError) as refused:
        parse_policy(with_remote(api_key_env=name), remote=operator)
    (detail,) = refused.value.details
    assert (detail.field, detail.value) == ("engines.hosted.api_key_env", name)
    assert f"{name} is a Laneway setting" in detail.message
    tenant = TINY + f"tenants:\n  acme: {{api_key_env: {name}}}\n"
    with pytest.raises(PolicyError) as refused:
        parse_policy(tenant)
    assert [d.field for d in refused.value.details] == ["tenants.acme.api_key_env"]


def test_validate_refuses_the_admin_token_as_a_key_naming_field_and_line(
        tmp_path: Path) -> None:
    text = with_remote(api_key_env="LANEWAY_ADMIN_TOKEN")
    result = validate(tmp_path, text)
    assert result.returncode == 1
    assert (f"engines.hosted.api_key_env: line {line_of(text, 'hosted:')}: Value error, "
            "LANEWAY_ADMIN_TOKEN is a Laneway setting") in result.stderr


def test_validate_reads_the_operators_key_prefixes(tmp_path: Path) -> None:
    text = with_remote(api_key_env="OPENAI_API_KEY")
    refused = validate(tmp_path, text)
    assert refused.returncode == 1
    assert "engines.hosted.api_key_env: line" in refused.stderr
    assert "(got 'OPENAI_API_KEY')" in refused.stderr
    allowed = validate(tmp_path, text, LANEWAY_PROVIDER_KEY_PREFIXES="ACME_,OPENAI_")
    assert allowed.returncode == 0, allowed.stderr


@pytest.mark.parametrize(("url", "reason"), [
    ("http://images.example.com/v1", "http:// sends the API key and the prompts in clear"),
    ("ftp://images.example.com/v1", "an https:// URL with a host"),
    ("https:///v1", "an https:// URL with a host"),
    ("https://images.example.com:99999/v1", "not a URL"),
])
def test_base_url_is_https(url: str, reason: str) -> None:
    with pytest.raises(PolicyError) as refused:
        parse_policy(with_remote(base_url=url))
    (detail,) = refused.value.details
    assert (detail.field, detail.value) == ("engines.hosted.base_url", url)
    assert reason in detail.message


def test_plain_http_needs_allow_insecure_and_only_a_base_url_takes_it() -> None:
    url = "http://127.0.0.1:9/v1"
    assert parse_policy(with_remote(base_url=url, allow_insecure="true")).engines[
        "hosted"].allow_insecure
    with pytest.raises(PolicyError) as refused:
        parse_policy(TINY.replace("engines:\n", "engines:\n  up: {kind: resize, "
                                  "allow_insecure: true}\n", 1))
    assert "'allow_insecure' only applies to engines with a 'base_url'" in \
        refused.value.details[0].message


def test_validate_refuses_hosts_outside_the_operators_list(tmp_path: Path) -> None:
    text = with_remote()
    assert validate(tmp_path, text, LANEWAY_REMOTE_HOSTS="").returncode == 0  # empty: any
    refused = validate(tmp_path, text, LANEWAY_REMOTE_HOSTS="api.example.com,localhost")
    assert refused.returncode == 1
    assert (f"engines.hosted.base_url: line {line_of(text, 'hosted:')}: host "
            "images.example.com is not in LANEWAY_REMOTE_HOSTS (api.example.com, localhost)"
            ) in refused.stderr
    allowed = validate(tmp_path, text, LANEWAY_REMOTE_HOSTS="api.example.com,Images.Example.com")
    assert allowed.returncode == 0, allowed.stderr


def test_an_img2img_stage_that_runs_no_step_is_refused(tmp_path: Path) -> None:
    # tiny.yaml's refine engine: steps 8, strength 0.3 (2 steps); 0.1 leaves none
    broken = TINY.replace("    strength: 0.3\n", "    strength: 0.1\n", 1)
    assert broken != TINY
    result = validate(tmp_path, broken)
    assert result.returncode == 1
    assert "runs no denoising step: steps 8 x strength 0.1 is under 1" in result.stderr
