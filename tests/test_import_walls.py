"""The walls between packages (ARCHITECTURE.md), checked from the import statements.

``controlplane`` is the ground floor and imports none of the others; ``router``,
``engines`` and ``verifier`` import ``controlplane`` and nothing of each other; only
``laneway`` (the CLI, ``serve`` and the client) may import several of them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("controlplane", "router", "engines", "verifier", "laneway")

#: what each package may import of the others
ALLOWED: dict[str, frozenset[str]] = {
    "controlplane": frozenset(),
    "router": frozenset({"controlplane"}),
    "engines": frozenset({"controlplane"}),
    "verifier": frozenset({"controlplane"}),
    "laneway": frozenset({"controlplane", "router", "engines", "verifier"}),
}


def imported_packages(source: str) -> set[str]:
    """Top-level Laneway packages named by the import statements of ``source``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
    return found & set(PACKAGES)


def wall_violations(root: Path) -> list[str]:
    """``path: imports PACKAGE`` for every import that crosses a wall under ``root``."""
    problems = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            forbidden = imported_packages(path.read_text()) - ALLOWED[package] - {package}
            problems.extend(f"{path.relative_to(root)}: imports {name}"
                            for name in sorted(forbidden))
    return problems


def test_no_import_crosses_a_wall() -> None:
    assert wall_violations(ROOT) == []


@pytest.mark.parametrize(("package", "statement"), [
    ("controlplane", "from router.api import ApiState"),
    ("router", "import engines.worker"),
    ("engines", "from verifier import checks"),
    ("verifier", "from router import submit"),
    ("controlplane", "from laneway.cli import main"),
])
def test_a_forbidden_import_is_caught(tmp_path: Path, package: str, statement: str) -> None:
    for name in PACKAGES:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("from controlplane import keys\n")
    (tmp_path / package / "sneaky.py").write_text(f"def f():\n    {statement}\n")
    problems = wall_violations(tmp_path)
    assert problems == [f"{package}/sneaky.py: imports {statement.split()[1].split('.')[0]}"]


def test_the_api_application_imports_no_torch() -> None:
    """The API process stays small: no torch, diffusers or transformers (a subprocess, so
    the rest of the suite's imports do not count)."""
    probe = ("import sys, router.app, laneway.serve; "
             "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"
