"""``GET /console``: the on-call web console, a static page that reads the API from the
browser.

The page holds no data server-side and needs no token to load. It polls ``/v1/status``
and, with the admin token the operator types into it (kept in the tab's sessionStorage),
reads ``/v1/admin/jobs`` and ``/v1/admin/audit`` and calls the rollout and rollback
endpoints. Every value is rendered with ``textContent`` (prompts are user input), and a
strict Content-Security-Policy allows only this origin's script, style, images and API.
"""

from __future__ import annotations

from importlib import resources

from litestar import Controller, Response, get

#: the page's own files only: no inline script or style, no external resource, no framing
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _asset(name: str) -> str:
    return (resources.files("router") / "console_assets" / name).read_text(encoding="utf-8")


PAGE_HTML = _asset("console.html")
SCRIPT_JS = _asset("console.js")
STYLE_CSS = _asset("console.css")


def _served(body: str, media_type: str) -> Response[str]:
    return Response(body, media_type=media_type, headers=SECURITY_HEADERS)


class ConsoleController(Controller):
    path = "/console"
    include_in_schema = False

    @get("/", operation_id="console")
    async def page(self) -> Response[str]:
        return _served(PAGE_HTML, "text/html; charset=utf-8")

    @get("/console.js", operation_id="consoleScript")
    async def script(self) -> Response[str]:
        return _served(SCRIPT_JS, "text/javascript; charset=utf-8")

    @get("/console.css", operation_id="consoleStyle")
    async def style(self) -> Response[str]:
        return _served(STYLE_CSS, "text/css; charset=utf-8")


__all__ = ["CONTENT_SECURITY_POLICY", "ConsoleController"]
