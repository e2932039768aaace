"""The CLI's HTTP client for the admin API, at ``Settings.url`` with ``Settings.admin_token``
(``LANEWAY_URL``, ``LANEWAY_ADMIN_TOKEN``).

::

    with AdminClient.from_settings(settings, actor="alice") as admin:
        admin.call("POST", "/v1/admin/models/tiny-sdxl/rollback", json={"reason": "p95"})

Raises ``ServerUnreachable`` (the CLI exits 3) or ``AdminRefused`` (exit 1) with the
server's error body.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import httpx

from controlplane.settings import Settings
from laneway.admin_token import admin_token_for

TIMEOUT_S = 30.0


class ServerUnreachable(Exception):
    """No answer from the server at all."""


class AdminRefused(Exception):
    """The server answered with an error status; ``error`` is its JSON error object."""

    def __init__(self, status_code: int, error: dict[str, Any]) -> None:
        super().__init__(f"{status_code}: {error.get('message', '')}")
        self.status_code = status_code
        self.error = error

    @property
    def lines(self) -> list[str]:
        out = [f"refused ({self.status_code} {self.error.get('code', 'error')}): "
               f"{self.error.get('message', '')}"]
        for detail in self.error.get("details") or []:
            shown = f" (got {detail['value']!r})" if detail.get("value") is not None else ""
            out.append(f"  {detail.get('field', '?')}: {detail.get('message', '')}{shown}")
        return out


class AdminClient:
    def __init__(self, *, url: str, token: str | None, actor: str | None = None,
                 timeout_s: float = TIMEOUT_S) -> None:
        headers = {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if actor:
            headers["X-Laneway-Actor"] = actor
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    @classmethod
    def from_settings(cls, settings: Settings, *, actor: str | None = None) -> AdminClient:
        """A client of the server at ``settings.url`` with the admin token, if any (the
        embedded default's token file for a server on loopback)."""
        return cls(url=settings.url, token=admin_token_for(settings), actor=actor)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.http.close()

    def call(self, method: str, path: str, *, json: Any = None, content: str | None = None,
             params: dict[str, Any] | None = None) -> Any:
        """One request; the decoded JSON body on success."""
        headers = {"Content-Type": "application/yaml"} if content is not None else None
        try:
            response = self.http.request(method, path, json=json, content=content,
                                         params=params, headers=headers)
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach {self.url}: {exc}") from exc
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                error = {"code": "http_error", "message": response.text[:500]}
            raise AdminRefused(response.status_code, error)
        return response.json()
