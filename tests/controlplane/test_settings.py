"""Settings: every ``LANEWAY_*`` variable is a setting or exempt, and a misspelt one stops
the process at start with the closest valid name."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from controlplane.errors import SettingsError
from controlplane.policy import Tenant
from controlplane.settings import (
    NOT_SETTINGS,
    RESERVED_PREFIXES,
    Settings,
    child_environ,
    load_settings,
    setting_names,
    unknown_variables,
)
from tests.conftest import REPO

#: a command refused at start has loaded nothing heavy; far below serve's start-up
REFUSED_WITHIN_S = 15.0
NAME = re.compile(r"LANEWAY_[A-Z0-9_]*[A-Z0-9]")


def clean_environ() -> dict[str, str]:
    """This process's environment without any Laneway or OpenTelemetry variable."""
    return {k: v for k, v in os.environ.items()
            if not k.upper().startswith(("LANEWAY_", "OTEL_"))}


def test_an_unknown_variable_is_refused_with_the_closest_name() -> None:
    (error,) = unknown_variables({"LANEWAY_REDIS_ULR": "redis://x", "PATH": "/bin"})
    assert error.field == "LANEWAY_REDIS_ULR"
    assert error.message == ("unknown setting LANEWAY_REDIS_ULR "
                             "(did you mean LANEWAY_REDIS_URL?)")
    (error,) = unknown_variables({"laneway_ocr_thread": "1"})  # matched without case
    assert "did you mean LANEWAY_OCR_THREADS?" in error.message
    (error,) = unknown_variables({"LANEWAY_OPENAI": "sk-..."})
    assert "not a setting" in error.message and "LANEWAY_KEY_" in error.message


def test_settings_reserved_prefixes_and_other_names_pass() -> None:
    environ = {name: "1" for name in setting_names()}
    environ |= {"LANEWAY_KEY_ACME": "secret", "LANEWAY_PROVIDER_OPENAI": "sk-...",
                "LANEWAY_TEST_ANYTHING": "1", "LW_OTHER": "1", "laneway_port": "1",
                **dict.fromkeys(NOT_SETTINGS, "x")}
    assert unknown_variables(environ) == []


def test_load_settings_names_every_unknown_and_invalid_variable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("LANEWAY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("LANEWAY_REDIS_ULR", "x")
    monkeypatch.setenv("LANEWAY_ADMN_TOKEN", "x")
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert [d.field for d in refused.value.details] == ["LANEWAY_ADMN_TOKEN",
                                                        "LANEWAY_REDIS_ULR"]
    monkeypatch.delenv("LANEWAY_REDIS_ULR")
    monkeypatch.delenv("LANEWAY_ADMN_TOKEN")
    monkeypatch.setenv("LANEWAY_PORT", "eighty")
    monkeypatch.setenv("LANEWAY_OCR_THREADS", "0")
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert {d.field for d in refused.value.details} == {"LANEWAY_PORT", "LANEWAY_OCR_THREADS"}
    assert "invalid setting LANEWAY_OCR_THREADS" in refused.value.details[-1].message
    monkeypatch.setenv("LANEWAY_PORT", "8123")
    monkeypatch.setenv("LANEWAY_OCR_THREADS", "2")
    monkeypatch.setenv("LANEWAY_KEY_ACME", "secret")
    settings = load_settings()
    assert settings.port == 8123 and settings.ocr_threads == 2


def test_serve_with_a_misspelt_variable_exits_2_at_once_naming_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = clean_environ() | {"LANEWAY_HOME": str(home), "LANEWAY_REDIS_ULR": "redis://x"}
    # should the check let it through, serve stops at once on the missing policy (exit 1)
    absent = tmp_path / "absent.yaml"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "laneway.cli", "serve", "--policy",
                           str(absent)], env=env, capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    elapsed_s = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    assert ("laneway: unknown setting LANEWAY_REDIS_ULR (did you mean LANEWAY_REDIS_URL?)"
            in done.stderr)
    assert "Traceback" not in done.stderr
    assert elapsed_s < REFUSED_WITHIN_S
    assert not home.exists()  # no bundled server, no state: nothing was started


def test_a_child_loads_the_parents_settings_and_keeps_other_variables(
        monkeypatch: pytest.MonkeyPatch) -> None:
    parent = Settings(redis_url="redis://127.0.0.1:1/0", port=8123, registry=Path("/r"),
                      ocr_threads=1, admin_token=None, provider_key_prefixes=("ACME_",),
                      remote_hosts=("api.example.com", "images.example.com"))
    environ = {"PATH": "/bin", "LANEWAY_KEY_ACME": "secret", "LANEWAY_PORT": "9",
               "LANEWAY_ADMIN_TOKEN": "stale"}
    child = child_environ(parent, environ)
    assert child["PATH"] == "/bin" and child["LANEWAY_KEY_ACME"] == "secret"
    assert child["LANEWAY_PORT"] == "8123" and "LANEWAY_ADMIN_TOKEN" not in child
    monkeypatch.setattr(os, "environ", child)
    assert load_settings() == parent


def test_list_settings_are_comma_separated_and_checked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("LANEWAY_"):
            monkeypatch.delenv(name)
    assert (load_settings().provider_key_prefixes, load_settings().remote_hosts) == ((), ())
    monkeypatch.setenv("LANEWAY_PROVIDER_KEY_PREFIXES", "OPENAI_, ACME_KEY_")
    monkeypatch.setenv("LANEWAY_REMOTE_HOSTS", "API.example.com,::1")
    settings = load_settings()
    assert settings.provider_key_prefixes == ("OPENAI_", "ACME_KEY_")
    assert settings.remote_hosts == ("api.example.com", "::1")
    monkeypatch.setenv("LANEWAY_REMOTE_HOSTS", "")
    assert load_settings().remote_hosts == ()


@pytest.mark.parametrize(("name", "value", "reason"), [
    ("LANEWAY_PROVIDER_KEY_PREFIXES", "OPENAI_,,ACME_", "an empty item"),
    ("LANEWAY_PROVIDER_KEY_PREFIXES", "OPEN-AI", "letters, digits and _"),
    # its variables would be unknown settings: every process would refuse to start
    ("LANEWAY_PROVIDER_KEY_PREFIXES", "LANEWAY_OPENAI_", "is under LANEWAY_"),
    ("LANEWAY_REMOTE_HOSTS", "https://api.example.com", "without scheme, port or path"),
    ("LANEWAY_REMOTE_HOSTS", "api.example.com:443", "without scheme, port or path"),
])
def test_bad_list_settings_are_refused_naming_the_variable(
        monkeypatch: pytest.MonkeyPatch, name: str, value: str, reason: str) -> None:
    for variable in list(os.environ):
        if variable.upper().startswith("LANEWAY_"):
            monkeypatch.delenv(variable)
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    (detail,) = refused.value.details
    assert detail.field == name and reason in detail.message


def test_a_policy_cannot_name_a_secret_like_a_setting() -> None:
    assert Tenant(api_key_env="LANEWAY_KEY_ACME").api_key_env == "LANEWAY_KEY_ACME"
    assert Tenant(api_key_env="ACME_KEY").api_key_env == "ACME_KEY"
    with pytest.raises(ValidationError, match="name a secret LANEWAY_KEY_ACME"):
        Tenant(api_key_env="LANEWAY_ACME")


def test_every_laneway_name_tests_benchmarks_and_ci_set_passes_the_check() -> None:
    """What the test suite, the benchmarks, the policies and CI put in the environment of
    the processes they start (docs and messages may spell a misspelling on purpose)."""
    this_file = Path(__file__).resolve()
    names: set[str] = set()
    for folder in ("tests", "bench", "policies", ".ci", "deploy"):
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and path.suffix in {".py", ".yaml", ".yml", ""} and (
                    path.resolve() != this_file):
                names |= set(NAME.findall(path.read_text(errors="ignore")))
    names = {n for n in names if n + "_" not in RESERVED_PREFIXES}  # the prefixes, spelt
    assert "LANEWAY_REDIS_URL" in names and "LANEWAY_TORCH_SPEC" in names
    assert unknown_variables(dict.fromkeys(names, "x")) == []


def test_an_artifact_store_that_is_not_a_directory_or_s3_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANEWAY_ARTIFACTS", "gs://bucket/images")
    with pytest.raises(SettingsError) as refused:
        load_settings()
    (detail,) = refused.value.details
    assert detail.field == "LANEWAY_ARTIFACTS" and "s3://BUCKET[/PREFIX]" in detail.message
    monkeypatch.setenv("LANEWAY_ARTIFACTS", "s3://bucket/images")
    assert load_settings().artifacts == "s3://bucket/images"


def test_presigned_urls_with_a_local_store_stop_the_process(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LANEWAY_ARTIFACTS", str(tmp_path))
    monkeypatch.setenv("LANEWAY_IMAGE_URLS", "presigned")
    with pytest.raises(SettingsError) as refused:
        load_settings()
    (detail,) = refused.value.details
    assert detail.field == "LANEWAY_IMAGE_URLS"
    assert "need an s3:// store" in detail.message and str(tmp_path) in detail.message
    monkeypatch.setenv("LANEWAY_ARTIFACTS", "s3://bucket")
    assert load_settings().image_urls == "presigned"
