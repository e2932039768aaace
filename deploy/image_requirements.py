"""Print the requirements an image installs, one a line, from pyproject.toml.

The ``api`` image (API, verifier, controller) leaves out the packages only the GPU workers
import, so it carries no torch; a test (tests/test_deploy_image.py) runs those processes'
entry modules with these packages hidden. ::

    python deploy/image_requirements.py              # everything (worker image)
    python deploy/image_requirements.py --no-gpu     # the api image's share
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

#: distributions only workers import (engines/); their import names are the same
GPU_ONLY = frozenset({"torch", "diffusers", "transformers", "peft", "accelerate",
                      "safetensors", "tokenizers"})

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def distribution(requirement: str) -> str:
    """The normalised distribution name of a requirement: ``uvicorn[standard]>=0.30`` →
    ``uvicorn``."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def requirements(*, gpu: bool, pyproject: Path = PYPROJECT) -> list[str]:
    """The project's dependencies, without the GPU-only ones unless ``gpu``."""
    with pyproject.open("rb") as f:
        dependencies: list[str] = tomllib.load(f)["project"]["dependencies"]
    return [r for r in dependencies if gpu or distribution(r) not in GPU_ONLY]


def main(argv: list[str]) -> int:
    if argv not in ([], ["--no-gpu"]):
        print("usage: image_requirements.py [--no-gpu]", file=sys.stderr)
        return 2
    print("\n".join(requirements(gpu=not argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
