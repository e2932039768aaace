"""Laneway's one error hierarchy, mapped to HTTP in one table (``router/app.py``).

::

    LanewayError
    ├── ClientError                 4xx: the caller sent something wrong; names field and value
    │   ├── ValidationFailed        422 (one or more field errors)
    │   │   └── IdempotencyMismatch 422: an Idempotency-Key reused with another body
    │   ├── NotFound                404
    │   ├── Unauthorized            401
    │   ├── Forbidden               403
    │   ├── PayloadTooLarge         413
    │   ├── Conflict                409 (the state changed under the request, or forbids it)
    │   └── AdmissionRefused        429 with Retry-After
    │       ├── TooManyStreams      429: open event streams at a cap (process or tenant)
    │       └── DeferredQueueFull   the deferred queue holds ``defer.max_depth`` jobs
    ├── RetryableError              transient; carries the delay before the next try
    │   └── EngineUnavailable       a remote engine's circuit is open or its retries ran out
    ├── StageStopped                a running stage stopped at a denoising step, on purpose
    │   ├── JobCancelled            the job was cancelled
    │   ├── StageTimeout            the job ran past its deadline
    │   └── WorkerDraining          the worker is stopping; the stage goes back to its lane
    └── InternalError               5xx: a bug or a broken deployment
        ├── NoEngine                503 with Retry-After: nothing can serve the route
        ├── PolicyError             a policy that does not load (field, line, reason)
        ├── RegistryError           a registry folder that must not be loaded
        ├── SettingsError           unknown or invalid LANEWAY_ variables at process start
        └── StageFailed             an engine raised while running a stage
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Any

#: how much of a bad value an error shows: a refusal never echoes a huge payload back
MAX_SHOWN_CHARS = 80
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = MAX_SHOWN_CHARS
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 8
_SHORT.maxlevel = 3


def shown(value: Any) -> str:
    """``repr(value)``, cut short (``'aaa...aaa'``) when it would be long; never quadratic."""
    return _SHORT.repr(value)


def _bounded(value: Any) -> Any:
    """``value`` itself when it is a short scalar, else its shortened repr."""
    if isinstance(value, bool | int | float) or (
            isinstance(value, str) and len(value) <= MAX_SHOWN_CHARS):
        return value
    return shown(value)


@dataclass(frozen=True)
class FieldError:
    """One reason a field was refused: where it is, what was wrong, the bad value (shown
    cut short when long)."""

    field: str
    message: str
    value: Any = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"field": self.field, "message": self.message}
        if self.value is not None:
            out["value"] = _bounded(self.value)
        return out


class LanewayError(Exception):
    """Root of every error Laneway raises on purpose."""

    status_code = 500
    code = "internal_error"
    #: seconds a client should wait before trying again (the ``Retry-After`` header); None
    #: when trying again will not help
    retry_after_s: int | None = None

    def __init__(self, message: str, *, details: list[FieldError] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: list[FieldError] = list(details or [])

    def as_body(self) -> dict[str, Any]:
        return {
            "error": {
                "code": self.code,
                "message": self.message,
                "details": [d.as_dict() for d in self.details],
            }
        }


class ClientError(LanewayError):
    status_code = 400
    code = "bad_request"


class ValidationFailed(ClientError):
    status_code = 422
    code = "invalid_request"

    @classmethod
    def of(cls, field: str, message: str, value: Any = None) -> ValidationFailed:
        got = f" (got {shown(value)})" if value is not None else ""
        return cls(f"{field}: {message}{got}", details=[FieldError(field, message, value)])


class IdempotencyMismatch(ValidationFailed):
    code = "idempotency_mismatch"


class NotFound(ClientError):
    status_code = 404
    code = "not_found"


class Unauthorized(ClientError):
    status_code = 401
    code = "unauthorized"


class Forbidden(ClientError):
    status_code = 403
    code = "forbidden"


class Conflict(ClientError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(ClientError):
    status_code = 413
    code = "payload_too_large"


class AdmissionRefused(ClientError):
    status_code = 429
    code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: int,
                 details: list[FieldError] | None = None) -> None:
        super().__init__(message, details=details)
        self.retry_after_s = retry_after_s


class TooManyStreams(AdmissionRefused):
    code = "too_many_streams"


class DeferredQueueFull(AdmissionRefused):
    """A deferrable job would have waited in a deferred queue already at its cap."""

    code = "deferred_queue_full"


class RetryableError(LanewayError):
    status_code = 503
    code = "retryable"

    def __init__(self, message: str, *, delay_s: float = 0.0) -> None:
        super().__init__(message)
        self.delay_s = delay_s


class EngineUnavailable(RetryableError):
    """The engine cannot take work now; the worker moves the stage to a fallback engine."""

    code = "engine_unavailable"


class StageStopped(LanewayError):
    """A running stage stopped at a denoising step on purpose; names the job it stopped."""

    def __init__(self, message: str, *, job_id: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class JobCancelled(StageStopped):
    """The job was cancelled while its stage ran."""

    code = "cancelled"
    status_code = 409


class StageTimeout(StageStopped):
    """The job ran past its route's ``timeout_s``."""

    code = "timeout"
    status_code = 504


class WorkerDraining(StageStopped):
    """The worker is shutting down and hands the stage back to its lane."""

    code = "draining"
    status_code = 503


class InternalError(LanewayError):
    status_code = 500
    code = "internal_error"


class NoEngine(InternalError):
    """Nothing can serve the route now: its engines' circuits are open, or no live worker
    has served its first stage's engine for longer than the grace period."""

    status_code = 503
    code = "no_engine"
    retry_after_s = 5


class PolicyError(InternalError):
    code = "invalid_policy"
    status_code = 422


class RegistryError(InternalError):
    code = "registry_error"


class SettingsError(InternalError):
    """The environment names a ``LANEWAY_`` variable that is not a setting, or gives one a
    bad value; one detail per variable (``field`` is its name)."""

    code = "invalid_settings"


class StageFailed(InternalError):
    code = "stage_failed"
