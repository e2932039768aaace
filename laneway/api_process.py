"""One API process of ``laneway serve --api-workers N`` (N > 1): uvicorn starts N of these
on one port, each building the app from the settings ``serve`` put in the environment.

They share nothing but Redis, which holds all the state, so any of them answers any
request. ``/readyz`` of each reports what ``serve``'s supervisor wrote to its problems
file (``LANEWAY_HOME/serve-problems.json``)::

    uvicorn.run("laneway.api_process:app", factory=True, workers=2, ...)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from litestar import Litestar

from controlplane.settings import Settings, load_settings

PROBLEMS_FILE = "serve-problems.json"


def problems_path(settings: Settings) -> Path:
    return settings.home / PROBLEMS_FILE


def read_problems(path: Path) -> Callable[[], list[str]]:
    """What the supervisor last wrote to ``path`` (nothing when it wrote nothing)."""

    def problems() -> list[str]:
        try:
            found: list[str] = json.loads(path.read_text())
        except (OSError, ValueError):
            return []
        return found

    return problems


def app() -> Litestar:
    from router.app import create_app

    settings = load_settings()
    return create_app(settings, secrets=os.environ,
                      host_problems=read_problems(problems_path(settings)))
