"""Every error the API answers, in the contract's shape ``{"error": {"code", "message",
"details"}}``, 5xx included.

``router/app.py`` maps exceptions to these handlers in its one table; Litestar picks the
handler of the closest class in the exception's MRO::

    LanewayError           its own status and code (Retry-After when it has one: 429, 503)
    ValidationException    422 invalid_request: Litestar's checks of the request
    HTTPException          its status: 404 not_found, 405 method_not_allowed, ...
    REDIS_UNAVAILABLE      503 redis_unavailable with Retry-After
    Exception              500 internal_error: logged with its traceback, never echoed
"""

from __future__ import annotations

import logging
from typing import Any

import redis.exceptions
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from controlplane.errors import LanewayError

log = logging.getLogger(__name__)

#: Redis did not answer: refused or reset connections (``BusyLoadingError``, a server still
#: loading its data, is one) and connect or reply timeouts
REDIS_UNAVAILABLE: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
#: what a client is told to wait before trying again when Redis is unreachable
REDIS_RETRY_AFTER_S = 1
INTERNAL_ERROR_MESSAGE = "internal error; the server logged the details"
_CODE_OF_STATUS = {400: "bad_request", 401: "unauthorized", 403: "forbidden",
                   404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                   415: "unsupported_media_type", 429: "too_many_requests"}

AnyRequest = Request[Any, Any, Any]


def error_body(code: str, message: str,
               details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """``{"error": {"code": ..., "message": ..., "details": [...]}}``."""
    return {"error": {"code": code, "message": message, "details": details or []}}


def log_failure(what: str, exc: LanewayError) -> None:
    """A 5xx is logged: as an error, or as a warning when trying again helps (Retry-After:
    no live worker yet, Redis restarting)."""
    if exc.status_code < 500:
        return
    log.log(logging.WARNING if exc.retry_after_s is not None else logging.ERROR,
            "%s failed: %s", what, exc.message)


def laneway_error(_: AnyRequest, exc: LanewayError) -> Response[dict[str, Any]]:
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(exc.retry_after_s)
    log_failure("request", exc)
    return Response(exc.as_body(), status_code=exc.status_code, headers=headers)


def validation_error(_: AnyRequest, exc: ValidationException) -> Response[dict[str, Any]]:
    details = []
    for item in exc.extra if isinstance(exc.extra, list) else []:
        field = item.get("key") or item.get("source") or "body"
        details.append({"field": field, "message": item.get("message", "invalid")})
    message = "; ".join(f"{d['field']}: {d['message']}" for d in details) or exc.detail
    return Response(error_body("invalid_request", message, details), status_code=422)


def http_error(request: AnyRequest, exc: HTTPException) -> Response[dict[str, Any]]:
    """Litestar's own refusals (unknown path or method, unreadable body, ...)."""
    if exc.status_code >= 500:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        message = INTERNAL_ERROR_MESSAGE
    else:
        message = exc.detail
    code = _CODE_OF_STATUS.get(exc.status_code, "http_error")
    return Response(error_body(code, message), status_code=exc.status_code,
                    headers=exc.headers)


def redis_unavailable(request: AnyRequest, exc: Exception) -> Response[dict[str, Any]]:
    """503 with Retry-After: the request may succeed once Redis answers again."""
    log.warning("%s %s: Redis unavailable: %s", request.method, request.url.path, exc)
    body = error_body("redis_unavailable", "the state store (Redis) did not answer; retry "
                                           f"in {REDIS_RETRY_AFTER_S} s")
    return Response(body, status_code=503, headers={"Retry-After": str(REDIS_RETRY_AFTER_S)})


def unexpected_error(request: AnyRequest, exc: Exception) -> Response[dict[str, Any]]:
    """500 for a bug: the traceback goes to the log, never to the client."""
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return Response(error_body("internal_error", INTERNAL_ERROR_MESSAGE), status_code=500)
