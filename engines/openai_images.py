"""The remote engine kind ``http.openai_images``: an OpenAI-Images-compatible provider.

Each stage item is one ``POST {base_url}/images/generations`` (``b64_json`` results) on a
pooled keep-alive client. Timeouts, connection errors, 429 and 5xx are retried with
exponential backoff and jitter, never sooner than the provider's ``Retry-After``; other 4xx
fail the stage at once. The engine's circuit breaker (state in Redis) refuses calls while
open; a call whose retries ran out counts as one failure and raises ``EngineUnavailable``,
on which the worker moves the stage to a fallback engine. Every attempt is an OTel CLIENT
span under the current (stage) span, with the W3C context sent to the provider.

The API key is read from the variable ``api_key_env`` names and goes only into the
``Authorization`` header: it is never logged, recorded on a span or put in an error.
An error answer's text is logged (scrubbed of the key, which a provider may echo) and goes
no further: the stage error, which clients see, carries ``provider_error: HTTP <status>``.
"""

from __future__ import annotations

import base64
import binascii
import io
import itertools
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis
from opentelemetry.propagate import inject
from opentelemetry.trace import SpanKind, Status, StatusCode
from PIL import Image, UnidentifiedImageError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    wait_random_exponential,
)

from controlplane import keys
from controlplane.circuit import CircuitBreaker
from controlplane.errors import EngineUnavailable, InternalError, RetryableError, StageFailed
from controlplane.policy import EngineSpec
from controlplane.registry import Registry
from controlplane.telemetry import tracer
from engines.base import Engine, StageItem

_tracer = tracer("laneway.engines.openai_images")
log = logging.getLogger(__name__)

BACKOFF_BASE_S = 0.2
BACKOFF_MAX_S = 5.0
PROVIDER_MESSAGE_CHARS = 300
#: the code of a stage error for an error answer from the provider
PROVIDER_ERROR = "provider_error"


class OpenAIImagesEngine(Engine):
    """Generates through a remote OpenAI-Images-compatible API; see the module docstring."""

    def __init__(self, spec: EngineSpec, *, redis_url: str,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.time) -> None:
        assert spec.base_url and spec.model  # guaranteed by EngineSpec's validator
        self.spec = spec
        self._api_key = self._read_api_key(spec)
        self._url = spec.base_url.rstrip("/") + "/images/generations"
        self._sleep = sleep
        self._clock = clock
        self._redis = redis.Redis.from_url(redis_url)
        self._client = httpx.Client(
            timeout=httpx.Timeout(spec.timeout_s),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )
        #: a fresh backoff strategy; full jitter on an exponential base
        self._backoff = wait_random_exponential(multiplier=BACKOFF_BASE_S, max=BACKOFF_MAX_S)

    @staticmethod
    def _read_api_key(spec: EngineSpec) -> str | None:
        if spec.api_key_env is None:
            return None
        key = os.environ.get(spec.api_key_env)
        if not key:
            raise InternalError(f"api_key_env: environment variable {spec.api_key_env} is "
                                "not set in this worker")
        return key

    def run(self, items: list[StageItem]) -> list[list[Image.Image]]:
        return [self._generate(item) for item in items]

    def close(self) -> None:
        self._client.close()
        self._redis.close()

    # -- one item ----------------------------------------------------------------------

    def _generate(self, item: StageItem) -> list[Image.Image]:
        if not self.name:
            raise InternalError("an http.openai_images engine needs its policy name "
                                "(build_engine(..., name=ENGINE))")
        breaker = CircuitBreaker(self._redis, self.name, self.spec.circuit,
                                 probe_ttl_s=self.spec.timeout_s * self.spec.max_attempts,
                                 clock=self._clock)
        permit = breaker.acquire()
        try:
            body = self._post_with_retries(item)
        except RetryableError as exc:
            breaker.record_failure(permit)
            raise EngineUnavailable(f"engine {self.name}: gave up after "
                                    f"{self.spec.max_attempts} attempts; last: {exc.message}"
                                    ) from None
        except StageFailed:
            breaker.record_success(permit)  # the provider is up; it refused this request
            raise
        breaker.record_success(permit)
        return self._decode(body, item)

    def _post_with_retries(self, item: StageItem) -> dict[str, Any]:
        retrying = Retrying(
            retry=retry_if_exception_type(RetryableError),
            stop=self._stop,
            wait=self._wait,
            sleep=self._sleep,
            reraise=True,
        )
        attempts = itertools.count(1)
        return retrying(lambda: self._post(item, next(attempts)))

    def _wait(self, state: RetryCallState) -> float:
        """Backoff with jitter, but never less than the provider's ``Retry-After``."""
        backoff = float(self._backoff(state))
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, RetryableError):
            return max(error.delay_s, backoff)
        return backoff

    def _stop(self, state: RetryCallState) -> bool:
        """Stop after ``max_attempts``, or at once when ``Retry-After`` exceeds ``timeout_s``
        (give up rather than hold a slot longer than one request may take)."""
        if state.attempt_number >= self.spec.max_attempts:
            return True
        error = state.outcome.exception() if state.outcome else None
        return isinstance(error, RetryableError) and error.delay_s > self.spec.timeout_s

    def _post(self, item: StageItem, attempt: int) -> dict[str, Any]:
        self._pace()
        payload = {"model": self.spec.model, "prompt": item.prompt, "n": item.n,
                   "size": f"{item.width}x{item.height}", "response_format": "b64_json"}
        parts = urlsplit(self._url)
        attributes: dict[str, str | int] = {
            "http.request.method": "POST", "url.full": self._url,
            "server.address": parts.hostname or "", "server.port": parts.port or 443,
            "laneway.engine": self.name, "laneway.job_id": item.job_id,
            "laneway.attempt": attempt,
        }
        if attempt > 1:
            attributes["http.request.resend_count"] = attempt - 1
        with _tracer.start_as_current_span("POST", kind=SpanKind.CLIENT,
                                           attributes=attributes) as span:
            headers: dict[str, str] = {}
            inject(headers)  # W3C traceparent of this attempt's span
            if self._api_key is not None:
                headers["Authorization"] = f"Bearer {self._api_key}"
            try:
                response = self._client.post(self._url, json=payload, headers=headers)
            except httpx.TimeoutException as exc:
                self._mark(span, type(exc).__name__, f"timed out after {self.spec.timeout_s} s")
                raise RetryableError(f"POST {self._url} timed out after "
                                     f"{self.spec.timeout_s} s") from None
            except httpx.TransportError as exc:
                reason = self._scrub(str(exc)) or type(exc).__name__
                self._mark(span, type(exc).__name__, reason)
                raise RetryableError(f"POST {self._url} failed: {reason}") from None
            span.set_attribute("http.response.status_code", response.status_code)
            if response.is_success:
                return self._json(response)
            status = response.status_code
            # the provider's text is for operators (it may name accounts, quotas, internals)
            log.warning("engine %s: POST %s answered %d (job %s, attempt %d): %r", self.name,
                        self._url, status, item.job_id, attempt,
                        self._provider_message(response))
            message = f"{PROVIDER_ERROR}: HTTP {status}"
            self._mark(span, str(status), message)
            if status == 429 or status >= 500:
                raise RetryableError(message, delay_s=retry_after_s(response) or 0.0)
            raise StageFailed(message)

    def _pace(self) -> None:
        """Keep calls ``60/rpm`` seconds apart across every worker (one Redis key)."""
        if self.spec.rpm is None:
            return
        interval_ms = max(1, round(60_000 / self.spec.rpm))
        key = keys.rate_slot(self.name)
        while not self._redis.set(key, "1", nx=True, px=interval_ms):
            remaining_ms = int(self._redis.pttl(key))
            self._sleep(max(remaining_ms, 1) / 1000)

    # -- responses ---------------------------------------------------------------------

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            raise StageFailed(f"POST {self._url} answered {response.status_code} with a "
                              "body that is not JSON") from None
        if not isinstance(body, dict):
            raise StageFailed(f"POST {self._url} answered a JSON {type(body).__name__}, "
                              "not an object")
        return body

    def _decode(self, body: dict[str, Any], item: StageItem) -> list[Image.Image]:
        data = body.get("data")
        if not isinstance(data, list) or len(data) != item.n:
            count = len(data) if isinstance(data, list) else "no"
            raise StageFailed(f"POST {self._url} returned {count} images for n={item.n}")
        images = []
        for i, entry in enumerate(data):
            encoded = entry.get("b64_json") if isinstance(entry, dict) else None
            if not isinstance(encoded, str):
                raise StageFailed(f"POST {self._url}: data[{i}] has no b64_json")
            try:
                image = Image.open(io.BytesIO(base64.b64decode(encoded, validate=True)))
                image.load()
            except (binascii.Error, UnidentifiedImageError, OSError) as exc:
                raise StageFailed(f"POST {self._url}: data[{i}].b64_json is not an image "
                                  f"({type(exc).__name__})") from None
            images.append(image.convert("RGB"))
        return images

    def _provider_message(self, response: httpx.Response) -> str:
        try:
            body = response.json()
            error = body.get("error") if isinstance(body, dict) else None
            text = str(error.get("message") if isinstance(error, dict) else error or body)
        except ValueError:
            text = response.text
        return self._scrub(text[:PROVIDER_MESSAGE_CHARS])

    def _scrub(self, text: str) -> str:
        """Provider text may echo the credential back; never pass it on."""
        return text.replace(self._api_key, "[redacted]") if self._api_key else text

    @staticmethod
    def _mark(span: Any, error_type: str, message: str) -> None:
        span.set_attribute("error.type", error_type)
        span.set_status(Status(StatusCode.ERROR, message))


def retry_after_s(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), or None when absent/bad."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def build_openai_images(spec: EngineSpec, registry: Registry, model_version: str,
                        device: str, redis_url: str | None) -> Engine:
    """The factory's builder: the circuit breaker lives in Redis at ``redis_url``."""
    if not redis_url:
        raise InternalError("http.openai_images engines need a Redis URL (their "
                            "circuit breaker lives in Redis)")
    return OpenAIImagesEngine(spec, redis_url=redis_url)
