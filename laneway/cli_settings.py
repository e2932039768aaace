"""The CLI's one Settings object: loaded from the environment when ``laneway`` starts,
before any command runs (the app's callback), and read by the commands.

An unknown or invalid ``LANEWAY_*`` variable stops every command with exit status 2::

    $ LANEWAY_REDIS_ULR=redis://x laneway serve
    laneway: unknown setting LANEWAY_REDIS_ULR (did you mean LANEWAY_REDIS_URL?)
"""

from __future__ import annotations

from typing import Any

import typer

from controlplane.errors import SettingsError
from controlplane.settings import Settings, load_settings

EXIT_USAGE = 2

#: what ``load_at_start`` loaded for the command this process runs
_loaded: Settings | None = None


def load_at_start() -> None:
    """Load the settings for the command about to run; exit 2 naming each bad variable."""
    global _loaded
    try:
        _loaded = load_settings()
    except SettingsError as exc:
        for detail in exc.details:
            typer.echo(f"laneway: {detail.message}", err=True)
        raise typer.Exit(EXIT_USAGE) from None


def current_settings(**options: Any) -> Settings:
    """The settings loaded at start, with the command-line options that were given (not
    None) over them; typer has already parsed the options to the fields' types."""
    if _loaded is None:
        raise RuntimeError("the settings are not loaded: laneway's app callback loads them")
    settings = _loaded
    given = {name: value for name, value in options.items() if value is not None}
    return settings.model_copy(update=given) if given else settings
