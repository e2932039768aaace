"""A typed Python client of the Laneway HTTP API (CONTRACT.md), blocking and asyncio, on
httpx. Answers are the API's own models (``controlplane/api_models.py``)::

    from laneway.client import Client

    with Client("http://127.0.0.1:8000", api_key=KEY) as client:
        job = client.submit("a lighthouse at dusk", intent="draft", width=512, height=512)
        for event in client.events(job.id):
            print(event.event, event.data)
        job = client.wait(job.id, timeout_s=60)
        png = client.image(job.id, 0)                 # bytes; as_pil=True: a PIL image

    async with AsyncClient("http://127.0.0.1:8000") as client:
        job = await client.submit("a lighthouse", intent="final", wait=30)

Errors are the server's own classes (``controlplane.errors``), picked by the answer's
``code``, with its ``message``, ``details`` (field, message, value), ``status_code`` and
``retry_after_s``::

    LanewayError
    ├── ClientError            4xx
    │   ├── ValidationFailed   422: details name each refused field
    │   ├── NotFound · Unauthorized · Forbidden · Conflict · PayloadTooLarge
    │   └── AdmissionRefused   429: the route is full
    ├── RetryableError         503 redis_unavailable
    └── InternalError          5xx
        └── NoEngine           503: no live worker serves the route

A 429 or 503 is sent again after its ``Retry-After`` (:class:`RetryPolicy`: bounded tries,
then the error is raised); no answer at all raises ``httpx.TransportError``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import httpx
from tenacity import AsyncRetrying, Retrying

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
from laneway import client_calls as calls
from laneway.client_calls import (
    Base,
    Call,
    RetryPolicy,
    WaitTimeout,
    error_from,
    is_done,
    retry_options,
    to_pil,
)
from laneway.sse import JobEvent, Resumption, SseParser

if TYPE_CHECKING:
    from PIL.Image import Image

T = TypeVar("T")
DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT_S = 30.0
#: ``wait``'s polls: the first after this, doubling up to POLL_MAX_S
POLL_FIRST_S = 0.05
POLL_MAX_S = 1.0
#: the retry policy of clients that name none
DEFAULT_RETRY = RetryPolicy()


class Client(Base):
    """The blocking client; ``api_key`` for jobs (with tenants), ``admin_token`` for the
    admin calls (and the full ``routes``/``status``). ``sleep`` waits between tries and
    polls (tests pass a fake)."""

    def __init__(self, base_url: str = DEFAULT_URL, *, api_key: str | None = None,
                 admin_token: str | None = None, actor: str | None = None,
                 timeout_s: float = TIMEOUT_S, retry: RetryPolicy = DEFAULT_RETRY,
                 transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__(api_key=api_key, admin_token=admin_token, actor=actor,
                         timeout_s=timeout_s, retry=retry)
        self.http = httpx.Client(base_url=base_url, transport=transport)
        self._sleep = sleep

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _send(self, call: Call[Any], *, stream: bool = False) -> httpx.Response:
        response = self.http.send(self._request(self.http, call), stream=stream)
        if response.status_code >= 400:
            response.read()
            response.close()
            raise error_from(response)
        return response

    def _run(self, call: Call[T]) -> T:
        retrying = Retrying(sleep=self._sleep, **retry_options(self.retry))
        return call.parse(retrying(self._send, call))

    # -- jobs ----------------------------------------------------------------------------

    def submit(self, prompt: str, *, intent: str = "auto", idempotency_key: str | None = None,
               **fields: Any) -> JobOut:
        """``client.submit("a fox", intent="draft", n=2, seed=7)``; fields as in
        CONTRACT.md (``wait=10`` holds the call until the job ends or 10 s pass)."""
        return self._run(calls.submit(prompt, intent=intent, idempotency_key=idempotency_key,
                                      fields=fields))

    def job(self, job_id: str) -> JobOut:
        return self._run(calls.get_job(job_id))

    def wait(self, job_id: str, *, timeout_s: float = 60.0, verified: bool = False) -> JobOut:
        """The job once it has ended (with ``verified``, once its verdict is in too); polls
        with backoff; ``WaitTimeout`` after ``timeout_s``. ``client.wait(job.id)``"""
        deadline, delay_s = time.monotonic() + timeout_s, POLL_FIRST_S
        while True:
            job = self.job(job_id)
            left_s = deadline - time.monotonic()
            if is_done(job, verified):
                return job
            if left_s <= 0:
                raise WaitTimeout(job, timeout_s)
            self._sleep(min(delay_s, left_s))
            delay_s = min(delay_s * 2, POLL_MAX_S)

    def cancel(self, job_id: str) -> JobOut:
        """Cancel (idempotent: an ended job comes back unchanged). ``client.cancel(job.id)``"""
        return self._run(calls.cancel(job_id))

    @overload
    def image(self, job_id: str, index: int = 0, *, as_pil: Literal[False] = False,
              format: str = "png") -> bytes: ...
    @overload
    def image(self, job_id: str, index: int = 0, *, as_pil: Literal[True],
              format: str = "png") -> Image: ...
    def image(self, job_id: str, index: int = 0, *, as_pil: bool = False,
              format: str = "png") -> bytes | Image:
        """An image's bytes (PNG with provenance; ``format="webp"|"jpeg"``), or a loaded
        PIL image with ``as_pil=True``. ``client.image(job.id, 0, as_pil=True).size``"""
        data = self._run(calls.image(job_id, index, format=format))
        return to_pil(data) if as_pil else data

    def events(self, job_id: str, *, last_event_id: str | None = None) -> Iterator[JobEvent]:
        """The job's events until the server ends the stream (after its final event).

        A stream the server ends with ``retry:``, or that drops, is opened again with
        ``Last-Event-ID``: nothing is missed or repeated (each connection starts with a
        fresh ``state`` event). ``for e in client.events(job.id): print(e.event)``
        """
        stream = Resumption(last_event_id)
        retrying = Retrying(sleep=self._sleep, **retry_options(self.retry))
        while True:
            response = retrying(self._send, self._events_call(job_id, stream), stream=True)
            parser, dropped = SseParser(), None
            try:
                for line in response.iter_lines():
                    for event in parser.feed(line):
                        stream.saw(event)
                        yield event
            except httpx.TransportError as exc:
                dropped = exc
            finally:
                response.close()
            delay_s = stream.reconnect_after_s(parser.retry_ms, dropped)
            if delay_s is None:
                return
            self._sleep(delay_s)

    def routes(self) -> RoutesOut:
        return self._run(calls.routes())

    def status(self) -> StatusOut:
        return self._run(calls.status())

    # -- admin (admin token) -------------------------------------------------------------

    def get_policy(self) -> PolicyYamlOut:
        return self._run(calls.get_policy())

    def apply_policy(self, yaml_text: str, *, reason: str = "") -> PolicyAppliedOut:
        """``client.apply_policy(Path("policy.yaml").read_text(), reason="more drafts")``;
        an invalid policy raises PolicyError/ValidationFailed with every error."""
        return self._run(calls.apply_policy(yaml_text, reason=reason))

    def rollback_policy(self, *, to: str | None = None, reason: str = "") -> PolicyAppliedOut:
        return self._run(calls.rollback_policy(to=to, reason=reason))

    def policy_history(self) -> list[PolicyChangeOut]:
        return self._run(calls.policy_history())

    def start_rollout(self, model: str, version: str, **options: Any) -> RolloutOut:
        """``client.start_rollout("sdxl", "4", steps=[10, 50, 100], interval_s=60)``"""
        return self._run(calls.start_rollout(model, version, options=options))

    def rollouts(self) -> list[RolloutOut]:
        return self._run(calls.rollouts())

    def rollout(self, model: str) -> RolloutOut:
        return self._run(calls.rollout(model))

    def rollout_action(self, model: str, action: Literal["promote", "pause", "resume", "abort"],
                       *, reason: str = "") -> RolloutOut:
        """``client.rollout_action("sdxl", "abort", reason="p95")``"""
        return self._run(calls.rollout_action(model, action, reason=reason))

    def rollback_model(self, model: str, *, to: str | None = None,
                       reason: str = "") -> ModelRollbackOut:
        """The on-call rollback: ``client.rollback_model("sdxl", reason="bad hands")``"""
        return self._run(calls.rollback_model(model, to=to, reason=reason))

    def audit(self, *, limit: int = 50, target: str | None = None) -> list[AuditEntryOut]:
        return self._run(calls.audit(limit=limit, target=target))


class AsyncClient(Base):
    """The asyncio client: :class:`Client`'s calls, awaited (``events`` is an async
    iterator); ``sleep`` is awaited between tries and polls."""

    def __init__(self, base_url: str = DEFAULT_URL, *, api_key: str | None = None,
                 admin_token: str | None = None, actor: str | None = None,
                 timeout_s: float = TIMEOUT_S, retry: RetryPolicy = DEFAULT_RETRY,
                 transport: httpx.AsyncBaseTransport | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        super().__init__(api_key=api_key, admin_token=admin_token, actor=actor,
                         timeout_s=timeout_s, retry=retry)
        self.http = httpx.AsyncClient(base_url=base_url, transport=transport)
        self._sleep = sleep

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _send(self, call: Call[Any], *, stream: bool = False) -> httpx.Response:
        response = await self.http.send(self._request(self.http, call), stream=stream)
        if response.status_code >= 400:
            await response.aread()
            await response.aclose()
            raise error_from(response)
        return response

    async def _run(self, call: Call[T]) -> T:
        retrying = AsyncRetrying(sleep=self._sleep, **retry_options(self.retry))
        return call.parse(await retrying(self._send, call))

    # -- jobs ----------------------------------------------------------------------------

    async def submit(self, prompt: str, *, intent: str = "auto",
                     idempotency_key: str | None = None, **fields: Any) -> JobOut:
        """``await client.submit("a fox", intent="draft", n=2)``"""
        return await self._run(calls.submit(prompt, intent=intent,
                                            idempotency_key=idempotency_key, fields=fields))

    async def job(self, job_id: str) -> JobOut:
        return await self._run(calls.get_job(job_id))

    async def wait(self, job_id: str, *, timeout_s: float = 60.0,
                   verified: bool = False) -> JobOut:
        """``await client.wait(job.id, timeout_s=30)``: see :meth:`Client.wait`."""
        deadline, delay_s = time.monotonic() + timeout_s, POLL_FIRST_S
        while True:
            job = await self.job(job_id)
            left_s = deadline - time.monotonic()
            if is_done(job, verified):
                return job
            if left_s <= 0:
                raise WaitTimeout(job, timeout_s)
            await self._sleep(min(delay_s, left_s))
            delay_s = min(delay_s * 2, POLL_MAX_S)

    async def cancel(self, job_id: str) -> JobOut:
        return await self._run(calls.cancel(job_id))

    @overload
    async def image(self, job_id: str, index: int = 0, *, as_pil: Literal[False] = False,
                    format: str = "png") -> bytes: ...
    @overload
    async def image(self, job_id: str, index: int = 0, *, as_pil: Literal[True],
                    format: str = "png") -> Image: ...
    async def image(self, job_id: str, index: int = 0, *, as_pil: bool = False,
                    format: str = "png") -> bytes | Image:
        """``await client.image(job.id, 0)``: see :meth:`Client.image`."""
        data = await self._run(calls.image(job_id, index, format=format))
        return to_pil(data) if as_pil else data

    async def events(self, job_id: str, *, last_event_id: str | None = None
                     ) -> AsyncIterator[JobEvent]:
        """``async for e in client.events(job.id): ...``: see :meth:`Client.events`."""
        stream = Resumption(last_event_id)
        retrying = AsyncRetrying(sleep=self._sleep, **retry_options(self.retry))
        while True:
            response: httpx.Response = await retrying(
                self._send, self._events_call(job_id, stream), stream=True)
            parser, dropped = SseParser(), None
            try:
                async for line in response.aiter_lines():
                    for event in parser.feed(line):
                        stream.saw(event)
                        yield event
            except httpx.TransportError as exc:
                dropped = exc
            finally:
                await response.aclose()
            delay_s = stream.reconnect_after_s(parser.retry_ms, dropped)
            if delay_s is None:
                return
            await self._sleep(delay_s)

    async def routes(self) -> RoutesOut:
        return await self._run(calls.routes())

    async def status(self) -> StatusOut:
        return await self._run(calls.status())

    # -- admin (admin token) -------------------------------------------------------------

    async def get_policy(self) -> PolicyYamlOut:
        return await self._run(calls.get_policy())

    async def apply_policy(self, yaml_text: str, *, reason: str = "") -> PolicyAppliedOut:
        return await self._run(calls.apply_policy(yaml_text, reason=reason))

    async def rollback_policy(self, *, to: str | None = None,
                              reason: str = "") -> PolicyAppliedOut:
        return await self._run(calls.rollback_policy(to=to, reason=reason))

    async def policy_history(self) -> list[PolicyChangeOut]:
        return await self._run(calls.policy_history())

    async def start_rollout(self, model: str, version: str, **options: Any) -> RolloutOut:
        return await self._run(calls.start_rollout(model, version, options=options))

    async def rollouts(self) -> list[RolloutOut]:
        return await self._run(calls.rollouts())

    async def rollout(self, model: str) -> RolloutOut:
        return await self._run(calls.rollout(model))

    async def rollout_action(self, model: str,
                             action: Literal["promote", "pause", "resume", "abort"], *,
                             reason: str = "") -> RolloutOut:
        return await self._run(calls.rollout_action(model, action, reason=reason))

    async def rollback_model(self, model: str, *, to: str | None = None,
                             reason: str = "") -> ModelRollbackOut:
        return await self._run(calls.rollback_model(model, to=to, reason=reason))

    async def audit(self, *, limit: int = 50,
                    target: str | None = None) -> list[AuditEntryOut]:
        return await self._run(calls.audit(limit=limit, target=target))


__all__ = ["AsyncClient", "Client", "JobEvent", "RetryPolicy", "WaitTimeout"]
