"""The Dockerfile's promises that can be checked without building it (no registry here).

The ``api`` image leaves out the GPU-only packages (deploy/image_requirements.py): the
processes it runs are started here in an interpreter that cannot import them.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

from tests.conftest import REPO


def _script(path: Path) -> ModuleType:
    """Import a script that is no package's module (it sits beside the Dockerfile)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


image_requirements = _script(REPO / "deploy" / "image_requirements.py")

DOCKERFILE = (REPO / "Dockerfile").read_text()

#: an interpreter without the GPU-only packages, as in the api image
HIDE_GPU_PACKAGES = f"""
import importlib.abc, sys
HIDDEN = {sorted(image_requirements.GPU_ONLY)!r}
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"{{name}} is not in the api image", name=name)
sys.meta_path.insert(0, Hide())
"""


def run_hidden(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", HIDE_GPU_PACKAGES + code, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_the_hiding_works() -> None:
    hidden = run_hidden("import torch")
    assert hidden.returncode != 0
    assert "torch is not in the api image" in hidden.stderr


def test_the_api_image_processes_start_without_gpu_packages(tmp_path: Path) -> None:
    probe = run_hidden(
        "import router.app, laneway.serve, verifier.verifier_main, controlplane.reconcile\n"
        "from laneway.cli import main\n"
        "sys.argv = ['laneway', *sys.argv[1:]]\n"
        "main()\n",
        "deploy", "render", "--policy", "policies/default.yaml", "--out", str(tmp_path))
    assert probe.returncode == 0, probe.stderr
    assert (tmp_path / "kustomization.yaml").is_file()


def test_gpu_only_packages_are_project_dependencies() -> None:
    """The api image's filter names real dependencies (a renamed one would slip through)."""
    worker = {image_requirements.distribution(r)
              for r in image_requirements.requirements(gpu=True)}
    api = {image_requirements.distribution(r)
           for r in image_requirements.requirements(gpu=False)}
    assert worker >= image_requirements.GPU_ONLY
    assert api == worker - image_requirements.GPU_ONLY
    assert {"rapidocr", "onnxruntime", "litestar", "redis"} <= api


def test_the_dockerfile_has_both_targets_and_the_ci_torch_pin() -> None:
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\} AS api$", DOCKERFILE, re.M)
    assert re.search(r"^FROM \$\{CUDA_IMAGE\} AS worker$", DOCKERFILE, re.M)
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in DOCKERFILE
    assert "ARG CUDA_IMAGE=nvidia/cuda:" in DOCKERFILE
    ci_pin = re.search(r"LANEWAY_TORCH_SPEC:-([^}]+)\}", (REPO / ".ci" / "setup").read_text())
    assert ci_pin is not None
    assert f"ARG TORCH_SPEC={ci_pin.group(1)}\n" in DOCKERFILE


def test_every_package_the_project_installs_is_copied_into_the_images() -> None:
    copied = set(re.findall(r"^COPY (\w+) \1$", DOCKERFILE, re.M))
    with (REPO / "pyproject.toml").open("rb") as f:
        found = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in found}
    assert packages <= copied
    assert DOCKERFILE.count("COPY controlplane controlplane") == 2  # both targets


def test_the_build_context_leaves_out_state_and_caches() -> None:
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "var", "registry", "bench/results", "**/__pycache__",
            "**/*.png"} <= ignored
