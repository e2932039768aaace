"""``POST /v1/images/generations``: the OpenAI Images API's common subset over Laneway.

The request's ``model`` is looked up in the policy's ``aliases`` (an intent or a route);
the job is submitted like any other and the request is held until it ends, bounded by the
route's ``timeout_s``. Answers use that API's shapes, so its clients work unchanged::

    client = openai.OpenAI(base_url="http://laneway:8000/v1", api_key="...")
    client.images.generate(model="laneway-draft", prompt="a lighthouse", size="512x512",
                           response_format="b64_json")

Errors, including Laneway's own, are ``{"error": {"message", "type", "param", "code"}}``
with the status that API uses (400 for every invalid parameter).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from typing import Any, Literal

from litestar import Controller, Request, Response, post
from litestar.di import Provide
from litestar.exceptions import HTTPException, ValidationException
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from controlplane.api_models import OpenAIErrorBody, OpenAIImagesOut, strict
from controlplane.artifacts import final_key
from controlplane.errors import LanewayError, ValidationFailed, shown
from controlplane.jobs import Job, JobStatus
from controlplane.policy import Intent
from router.api import (
    ApiState,
    AuthorizationHeader,
    provide_api,
    public_job,
    refuse_large_body,
)
from router.http_errors import (
    INTERNAL_ERROR_MESSAGE,
    REDIS_RETRY_AFTER_S,
    REDIS_UNAVAILABLE,
    log_failure,
)
from router.openapi_responses import errors
from router.requests import ImageRequest
from router.submit import new_job_id
from router.tenants import authenticate

log = logging.getLogger(__name__)

_SIZE = re.compile(r"^([1-9][0-9]{0,5})x([1-9][0-9]{0,5})$")
#: Laneway request fields and the OpenAI parameter they come from
_PARAM_OF_FIELD = {"width": "size", "height": "size", "metadata": "user"}
_TYPE_OF_STATUS = {401: "authentication_error", 403: "permission_error",
                   404: "invalid_request_error", 429: "rate_limit_error"}


class ImagesGeneration(BaseModel):
    """The accepted subset of the OpenAI ``images.generate`` request."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    n: int = Field(default=1, ge=1)
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "url"
    user: str | None = None


class OpenAIError(Exception):
    """An error already in the OpenAI shape."""

    def __init__(self, status_code: int, message: str, *, param: str | None = None,
                 code: str | None = None, error_type: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = {"error": {
            "message": message,
            "type": error_type or _error_type(status_code),
            "param": param,
            "code": code,
        }}


def _error_type(status_code: int) -> str:
    if status_code >= 500:
        return "server_error"
    return _TYPE_OF_STATUS.get(status_code, "invalid_request_error")


def parse_size(size: str) -> tuple[int, int]:
    """``"WxH"`` as ``(W, H)``; OpenAIError naming ``size`` otherwise."""
    match = _SIZE.match(size)
    if match is None:
        raise OpenAIError(400, f"size: expected 'WIDTHxHEIGHT' such as '512x512' "
                               f"(got {shown(size)})", param="size", code="invalid_size")
    return int(match.group(1)), int(match.group(2))


def parse_body(raw: Any) -> ImagesGeneration:
    try:
        return ImagesGeneration.model_validate(raw)
    except PydanticValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        got = f" (got {shown(first['input'])})" if first["type"] != "missing" else ""
        raise OpenAIError(400, f"{param}: {first['msg']}{got}", param=param,
                          code=first["type"]) from None


async def _images(api: ApiState, request: Request[Any, Any, Any], job: Job,
                  response_format: str) -> list[dict[str, str]]:
    if response_format == "url":
        if api.settings.image_urls == "presigned":
            return [{"url": image.url} for image in public_job(api, job).images]
        base = str(request.base_url).rstrip("/")
        return [{"url": base + image.url} for image in job.images]
    keys = [final_key(job.id, image.index) for image in job.images]
    blobs = await asyncio.to_thread(lambda: [api.artifacts.get(key) for key in keys])
    return [{"b64_json": base64.b64encode(blob).decode()} for blob in blobs]


def _laneway_error(_: Request[Any, Any, Any], exc: LanewayError) -> Response[dict[str, Any]]:
    """Laneway's own errors, reshaped: the first detail names the OpenAI parameter."""
    field = exc.details[0].field if exc.details else None
    param = _PARAM_OF_FIELD.get(field, field) if field else None
    status_code = 400 if isinstance(exc, ValidationFailed) else exc.status_code
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(exc.retry_after_s)
    log_failure("images/generations", exc)
    error = OpenAIError(status_code, exc.message, param=param, code=exc.code)
    return Response(error.body, status_code=status_code, headers=headers)


def _http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    status_code = 400 if isinstance(exc, ValidationException) else exc.status_code
    error = OpenAIError(status_code, str(exc.detail), code="invalid_request"
                        if status_code == 400 else None)
    return Response(error.body, status_code=status_code)



def _openai_error(_: Request[Any, Any, Any], exc: OpenAIError) -> Response[dict[str, Any]]:
    return Response(exc.body, status_code=exc.status_code)


def _redis_unavailable(request: Request[Any, Any, Any], exc: Exception
                       ) -> Response[dict[str, Any]]:
    log.warning("%s %s: Redis unavailable: %s", request.method, request.url.path, exc)
    error = OpenAIError(503, "the state store (Redis) did not answer; retry in "
                             f"{REDIS_RETRY_AFTER_S} s", code="redis_unavailable")
    return Response(error.body, status_code=503,
                    headers={"Retry-After": str(REDIS_RETRY_AFTER_S)})


def _unexpected_error(request: Request[Any, Any, Any], exc: Exception
                      ) -> Response[dict[str, Any]]:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    error = OpenAIError(500, INTERNAL_ERROR_MESSAGE, code="internal_error")
    return Response(error.body, status_code=500)


class OpenAIImagesController(Controller):
    path = "/v1/images/generations"
    dependencies = {"api": Provide(provide_api, sync_to_thread=False)}
    exception_handlers = {
        OpenAIError: _openai_error,
        LanewayError: _laneway_error,
        ValidationException: _http_error,
        HTTPException: _http_error,
        **dict.fromkeys(REDIS_UNAVAILABLE, _redis_unavailable),
        Exception: _unexpected_error,
    }

    @post("/", operation_id="createImage", status_code=200, before_request=refuse_large_body,
          responses=errors(400, 401, 403, 404, 413, 429, 503, 504, body=OpenAIErrorBody))
    async def create(self, request: Request[Any, Any, Any], data: dict[str, Any],
                     api: ApiState, authorization: AuthorizationHeader = None
                     ) -> Response[OpenAIImagesOut]:
        """Generate images and answer once they exist, in the OpenAI Images shape."""
        body = parse_body(data)
        policy = api.live.snapshot.policy
        tenant = authenticate(policy, authorization, secrets=api.secrets)
        intent, route_name = Intent.auto, None
        if body.model is not None:
            alias = policy.aliases.get(body.model)
            if alias is None:
                raise OpenAIError(404, f"model: {shown(body.model)} does not exist (known: "
                                       f"{', '.join(sorted(policy.aliases)) or 'none'})",
                                  param="model", code="model_not_found")
            intent, route_name = alias.intent or Intent.auto, alias.route
        width, height = parse_size(body.size) if body.size is not None else (None, None)
        image_request = ImageRequest(
            prompt=body.prompt, intent=intent, width=width, height=height, n=body.n,
            metadata={"user": body.user} if body.user is not None else {})
        job_id = new_job_id()
        with api.waiters.waiting(job_id) as ended:
            accepted = await api.submitter.submit(image_request, tenant=tenant,
                                                  route_name=route_name, job_id=job_id)
            timeout_s = policy.route(accepted.job.route).timeout_s
            try:
                job = await api.waiters.until_final(accepted, ended, api.jobs,
                                                    timeout_s=timeout_s)
            except TimeoutError:
                job_id = accepted.job.id
                raise OpenAIError(504, f"job {job_id} did not finish within the route's "
                                       f"{timeout_s:g} s; it continues at /v1/jobs/{job_id}",
                                  code="timeout") from None
        if job.status is not JobStatus.completed:
            raise OpenAIError(500, f"job {job.id} {job.status.value}: {job.error or 'no error'}",
                              code=f"job_{job.status.value}")
        return Response(strict(OpenAIImagesOut, {
            "created": int(time.time()),
            "data": await _images(api, request, job, body.response_format)}))
