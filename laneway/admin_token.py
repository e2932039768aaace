"""The embedded default's admin token: made on the first start, kept in a file that only
its owner can read, and used by the CLI on the same machine.

``laneway serve`` on the bundled server with no ``LANEWAY_ADMIN_TOKEN`` creates
``LANEWAY_HOME/admin-token`` (mode 0600) once and prints its path; the admin commands use
``LANEWAY_ADMIN_TOKEN`` when set, else that file when the server is on loopback::

    token, created = ensure_token(settings.home)      # serve
    token = admin_token_for(settings)                 # the CLI
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from urllib.parse import urlsplit

from controlplane.settings import Settings

TOKEN_FILE = "admin-token"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def token_path(home: Path) -> Path:
    return home / TOKEN_FILE


def ensure_token(home: Path) -> tuple[str, bool]:
    """The token in ``home``'s file, made (mode 0600) when missing; whether it was made."""
    path = token_path(home)
    if path.exists():
        return path.read_text().strip(), False
    home.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    # O_EXCL: two starts at once never both write; 0600 from the first byte
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return token, True


def admin_token_for(settings: Settings) -> str | None:
    """``LANEWAY_ADMIN_TOKEN``, else the embedded default's file for a server on loopback."""
    if settings.admin_token:
        return settings.admin_token
    path = token_path(settings.home)
    if urlsplit(settings.url).hostname in LOOPBACK_HOSTS and path.exists():
        return path.read_text().strip()
    return None
