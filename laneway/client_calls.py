"""What the Python client sends and how it reads the answers, shared by ``Client`` and
``AsyncClient`` (``laneway/client.py``): one :class:`Call` per API operation, the error
mapping (the server's ``code`` → the ``controlplane.errors`` class), the retry rule and
the parts of the two clients that do no I/O.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter
from tenacity import RetryCallState, retry_if_exception, stop_after_attempt

from controlplane.api_models import (
    AuditEntryOut,
    JobOut,
    ModelRollbackOut,
    PolicyAppliedOut,
    PolicyChangeOut,
    PolicyYamlOut,
    RolloutOut,
    RoutesOut,
    StatusOut,
)
from controlplane.errors import (
    AdmissionRefused,
    ClientError,
    Conflict,
    EngineUnavailable,
    FieldError,
    Forbidden,
    IdempotencyMismatch,
    InternalError,
    LanewayError,
    NoEngine,
    NotFound,
    PayloadTooLarge,
    PolicyError,
    RegistryError,
    RetryableError,
    StageFailed,
    Unauthorized,
    ValidationFailed,
)
from controlplane.verification import VerificationStatus
from laneway.sse import Resumption

if TYPE_CHECKING:
    from PIL.Image import Image

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

#: the classes a server's error ``code`` names; other codes fall back on the status
ERROR_CLASSES: dict[str, type[LanewayError]] = {cls.code: cls for cls in (
    ValidationFailed, IdempotencyMismatch, NotFound, Unauthorized, Forbidden, Conflict,
    PayloadTooLarge, AdmissionRefused, ClientError, RetryableError, EngineUnavailable,
    InternalError, NoEngine, PolicyError, RegistryError, StageFailed)}
#: the codes of Litestar's own refusals and of Redis being down (``router/http_errors.py``)
ERROR_CLASSES["redis_unavailable"] = RetryableError
#: statuses a call is tried again on, after the server's Retry-After
RETRY_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class RetryPolicy:
    """How often a call is sent when the server answers 429 or 503.

    ``attempts`` counts every try (1: never again). The wait is the answer's
    ``Retry-After``, else ``backoff_s`` doubling per try; an answer asking for more than
    ``max_retry_after_s`` is raised at once (waiting that long is the caller's choice).
    """

    attempts: int = 4
    backoff_s: float = 0.5
    max_retry_after_s: float = 60.0

    def delay_s(self, exc: BaseException, attempt: int) -> float | None:
        """Seconds before the next try after ``exc`` on try ``attempt``; None: raise it."""
        if not isinstance(exc, LanewayError) or exc.status_code not in RETRY_STATUSES:
            return None
        if exc.retry_after_s is None:
            return self.backoff_s * 2 ** (attempt - 1)
        if exc.retry_after_s > self.max_retry_after_s:
            return None
        return float(exc.retry_after_s)


def _retry_after_s(response: httpx.Response) -> int | None:
    value = response.headers.get("retry-after", "")
    return int(value) if value.isdigit() else None


def error_from(response: httpx.Response) -> LanewayError:
    """The error an answer of 400 or more stands for, as the server's own class.

    ``status_code`` is the answer's status, ``retry_after_s`` its Retry-After; a code with
    no class here becomes ClientError (4xx) or InternalError (5xx) keeping that ``code``.
    """
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
        details = [FieldError(str(d.get("field", "")), str(d.get("message", "")),
                              d.get("value")) for d in error.get("details") or []]
    except (ValueError, KeyError, TypeError, AttributeError):
        code = "http_error"
        message = f"HTTP {response.status_code}: {response.text[:300]}"
        details = []
    retry_after_s = _retry_after_s(response)
    cls = ERROR_CLASSES.get(code) or (ClientError if response.status_code < 500
                                      else InternalError)
    exc: LanewayError
    if issubclass(cls, AdmissionRefused):
        exc = cls(message, retry_after_s=retry_after_s or 0)
    elif issubclass(cls, RetryableError):
        exc = cls(message, delay_s=float(retry_after_s or 0))
    else:
        exc = cls(message, details=details)
    exc.details = details
    exc.retry_after_s = retry_after_s
    exc.status_code = response.status_code
    exc.code = code
    return exc


def model_of(model: type[M]) -> Callable[[httpx.Response], M]:
    """A parser of a JSON body into ``model``, ignoring fields it does not know."""
    return lambda response: model.model_validate_json(response.content, extra="ignore")


def list_of(model: type[M]) -> Callable[[httpx.Response], list[M]]:
    adapter = TypeAdapter(list[model])  # type: ignore[valid-type]
    return lambda response: adapter.validate_json(response.content, extra="ignore")


def raw_bytes(response: httpx.Response) -> bytes:
    return response.content


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request and the parser of its successful answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: Any = None
    content: str | None = None
    params: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    #: sent with the admin token instead of the API key
    admin: bool = False
    #: added to the client's timeout (a submit that waits for its job)
    extra_timeout_s: float = 0.0


class WaitTimeout(TimeoutError):
    """The job did not end within ``wait``'s ``timeout_s``; ``job`` is the last one read."""

    def __init__(self, job: JobOut, timeout_s: float) -> None:
        super().__init__(f"job {job.id} is still {job.status.value} after {timeout_s:g} s")
        self.job = job


def is_done(job: JobOut, verified: bool) -> bool:
    return job.status.is_final and not (
        verified and job.verification.status is VerificationStatus.pending)


def to_pil(data: bytes) -> Image:
    from PIL import Image as PILImage

    image = PILImage.open(io.BytesIO(data))
    image.load()
    return image


class Base:
    """What both clients hold (tokens, timeout, retry policy) and how they build requests:
    ``api_key`` on job calls (the admin token when there is none), the admin token on
    admin calls."""

    def __init__(self, *, api_key: str | None, admin_token: str | None, actor: str | None,
                 timeout_s: float, retry: RetryPolicy) -> None:
        self.api_key, self.admin_token = api_key, admin_token
        self.timeout_s, self.retry = timeout_s, retry
        self.headers = {"X-Laneway-Actor": actor} if actor else {}

    def _headers(self, call_headers: dict[str, str], *, admin: bool) -> dict[str, str]:
        token = self.admin_token if admin else (self.api_key or self.admin_token)
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        return {**self.headers, **auth, **call_headers}

    def _request(self, http: httpx.Client | httpx.AsyncClient, call: Call[Any]
                 ) -> httpx.Request:
        timeout = self.timeout_s + call.extra_timeout_s
        return http.build_request(call.method, call.path, json=call.json, content=call.content,
                                  params=call.params, timeout=timeout,
                                  headers=self._headers(call.headers, admin=call.admin))

    def _events_call(self, job_id: str, stream: Resumption) -> Call[None]:
        return Call("GET", f"/v1/jobs/{job_id}/events", lambda _: None,
                    headers=stream.headers())


# -- jobs --------------------------------------------------------------------------------


def submit(prompt: str, *, intent: str, idempotency_key: str | None,
           fields: dict[str, Any]) -> Call[JobOut]:
    """``POST /v1/images``; a key is made when none is given, so a retried submit (after a
    429, or a 503 whose request may have been accepted) never makes a second job."""
    key = idempotency_key or f"lw-client-{uuid.uuid4()}"
    wait_s = float(fields.get("wait") or 0)
    return Call("POST", "/v1/images", model_of(JobOut),
                json={"prompt": prompt, "intent": intent, **fields},
                headers={"Idempotency-Key": key}, extra_timeout_s=wait_s)


def get_job(job_id: str) -> Call[JobOut]:
    return Call("GET", f"/v1/jobs/{job_id}", model_of(JobOut))


def cancel(job_id: str) -> Call[JobOut]:
    return Call("DELETE", f"/v1/jobs/{job_id}", model_of(JobOut))


def image(job_id: str, index: int, *, format: str) -> Call[bytes]:
    return Call("GET", f"/v1/jobs/{job_id}/images/{index}", raw_bytes,
                params=None if format == "png" else {"format": format})


def routes() -> Call[RoutesOut]:
    return Call("GET", "/v1/routes", model_of(RoutesOut))


def status() -> Call[StatusOut]:
    return Call("GET", "/v1/status", model_of(StatusOut))


# -- admin -------------------------------------------------------------------------------


def get_policy() -> Call[PolicyYamlOut]:
    return Call("GET", "/v1/admin/policy", model_of(PolicyYamlOut), admin=True)


def apply_policy(yaml_text: str, *, reason: str) -> Call[PolicyAppliedOut]:
    return Call("POST", "/v1/admin/policy", model_of(PolicyAppliedOut), content=yaml_text,
                params={"reason": reason} if reason else None,
                headers={"Content-Type": "application/yaml"}, admin=True)


def rollback_policy(*, to: str | None, reason: str) -> Call[PolicyAppliedOut]:
    return Call("POST", "/v1/admin/policy/rollback", model_of(PolicyAppliedOut),
                json={"to": to, "reason": reason}, admin=True)


def policy_history() -> Call[list[PolicyChangeOut]]:
    return Call("GET", "/v1/admin/policy/history", list_of(PolicyChangeOut), admin=True)


def start_rollout(model: str, version: str, *, options: dict[str, Any]) -> Call[RolloutOut]:
    return Call("POST", "/v1/admin/rollouts", model_of(RolloutOut),
                json={"model": model, "version": version, **options}, admin=True)


def rollouts() -> Call[list[RolloutOut]]:
    return Call("GET", "/v1/admin/rollouts", list_of(RolloutOut), admin=True)


def rollout(model: str) -> Call[RolloutOut]:
    return Call("GET", f"/v1/admin/rollouts/{model}", model_of(RolloutOut), admin=True)


def rollout_action(model: str, action: str, *, reason: str) -> Call[RolloutOut]:
    return Call("POST", f"/v1/admin/rollouts/{model}/{action}", model_of(RolloutOut),
                json={"reason": reason}, admin=True)


def rollback_model(model: str, *, to: str | None, reason: str) -> Call[ModelRollbackOut]:
    return Call("POST", f"/v1/admin/models/{model}/rollback", model_of(ModelRollbackOut),
                json={"to": to, "reason": reason}, admin=True)


def audit(*, limit: int, target: str | None) -> Call[list[AuditEntryOut]]:
    params: dict[str, Any] = {"limit": limit}
    if target is not None:
        params["target"] = target
    return Call("GET", "/v1/admin/audit", list_of(AuditEntryOut), params=params, admin=True)


def retry_options(policy: RetryPolicy) -> dict[str, Any]:
    """tenacity's ``Retrying``/``AsyncRetrying`` arguments for ``policy`` (the last error
    is raised as it is)."""

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        return (policy.delay_s(exc, state.attempt_number) or 0.0) if exc else 0.0

    return {"retry": retry_if_exception(lambda exc: policy.delay_s(exc, 1) is not None),
            "wait": wait, "stop": stop_after_attempt(policy.attempts), "reraise": True}
