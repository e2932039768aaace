"""Issue 12, acceptance 5: one reader of job events per API process serves every SSE client
(no Redis connection per client), open streams are capped per process and per tenant, and a
stream ends at its maximum duration with a ``retry`` field, resumed by Last-Event-ID."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from controlplane import keys
from controlplane.jobs import Event, JobStore
from controlplane.policy import Policy, Tenant
from controlplane.policy_loader import parse_policy
from controlplane.registry import Registry
from router import job_events
from router.event_fanout import EventFanout, StreamEvent, Subscription
from router.job_events import RECONNECT_MS, job_event_messages
from tests.router.conftest import Router, running_router
from tests.router.test_errors import own_valkey

POLICY = parse_policy("""
version: 1
limits: {max_pixels: 262144, max_n: 1, max_prompt_chars: 200, default_width: 64,
         default_height: 64}
engines:
  draft: {kind: sim, steps: 4, max_concurrency: 1, sim: {mean_ms: 300, jitter: 0}}
routes:
  - name: fast_draft
    stages: [{engine: draft}]
""")
TIMEOUT_S = 60

Triple = tuple[str, dict[str, Any], str | None]


@contextlib.asynccontextmanager
async def router_at(redis_url: str, tmp_path: Path, policy: Policy = POLICY,
                    **settings_fields: Any) -> AsyncIterator[Router]:
    """The API with ``policy`` in force (simulated engines need no models)."""
    async with running_router(redis_url, policy, Registry(tmp_path / "registry"), tmp_path,
                              **settings_fields) as router:
        yield router


@dataclass
class Stream:
    """What one SSE response carried."""

    status_code: int = 0
    events: list[Triple] = field(default_factory=list)
    retry_ms: int | None = None


async def read_stream(http: httpx.AsyncClient, job_id: str, *,
                      headers: dict[str, str] | None = None,
                      on_event: Callable[[str], None] = lambda kind: None) -> Stream:
    """The job's SSE response read to its end (``on_event`` is told each event's kind)."""
    out = Stream()
    async with http.stream("GET", f"/v1/jobs/{job_id}/events",
                           headers=headers or {}) as response:
        out.status_code = response.status_code
        if response.status_code != 200:
            await response.aread()
            return out
        event, event_id = None, None
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("id:"):
                event_id = line.split(":", 1)[1].strip()
            elif line.startswith("retry:"):
                out.retry_ms = int(line.split(":", 1)[1])
            elif line.startswith("data:") and event is not None:
                out.events.append((event, json.loads(line.split(":", 1)[1]), event_id))
                on_event(event)
                event, event_id = None, None
    return out


@dataclass
class OpenStream:
    """A stream read in a task of its own until the test closes it."""

    task: asyncio.Task[Stream]
    joined: asyncio.Event

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def start_stream(http: httpx.AsyncClient, job_id: str, *,
                       headers: dict[str, str] | None = None) -> OpenStream:
    """A stream once it has read its backlog (it got ``queued``) or has ended (refused)."""
    joined = asyncio.Event()

    def seen(kind: str) -> None:
        if kind == "queued":
            joined.set()

    task = asyncio.create_task(read_stream(http, job_id, headers=headers, on_event=seen))
    waiting = asyncio.create_task(joined.wait())
    await asyncio.wait({waiting, task}, timeout=TIMEOUT_S,
                       return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    return OpenStream(task, joined)


async def open_stream(http: httpx.AsyncClient, job_id: str, *,
                      headers: dict[str, str] | None = None) -> OpenStream:
    """A stream that has read its backlog and now waits for live events."""
    opened = await start_stream(http, job_id, headers=headers)
    assert opened.joined.is_set(), (opened.task.result() if opened.task.done()
                                    else "the stream never got its backlog")
    return opened


async def refused_status(http: httpx.AsyncClient, job_id: str,
                         headers: dict[str, str] | None = None) -> httpx.Response:
    """The response to one more stream, which the test expects to be refused."""
    async with http.stream("GET", f"/v1/jobs/{job_id}/events",
                           headers=headers or {}) as response:
        assert response.status_code != 200, "the stream was accepted"
        await response.aread()
        return response


def assert_too_many_streams(response: httpx.Response, *, naming: str) -> None:
    assert response.status_code == 429, response.text
    assert int(response.headers["Retry-After"]) > 0
    error = response.json()["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == "too_many_streams" and naming in error["message"], error


async def connected_clients(router: Router) -> int:
    info: dict[str, Any] = await router.redis.info("clients")
    return int(info["connected_clients"])


async def test_fifty_clients_on_three_jobs_all_get_every_event_in_order(
        redis_url: str, tmp_path: Path) -> None:
    async with router_at(redis_url, tmp_path) as router:
        http = httpx.AsyncClient(base_url=str(router.http.base_url), timeout=TIMEOUT_S,
                                 limits=httpx.Limits(max_connections=60))
        try:
            job_ids = [(await router.submit()).json()["id"] for _ in range(3)]
            clients = await asyncio.gather(*(open_stream(http, job_ids[i % 3])
                                             for i in range(50)))
            await router.start_worker("draft")  # every event from here on is live
            streams = await asyncio.wait_for(
                asyncio.gather(*(client.task for client in clients)), TIMEOUT_S)
        finally:
            await http.aclose()

        for job_id in job_ids:
            history = (await router.events(job_id))[1:]  # read late: the stream's whole
            kinds = [kind for kind, _, _ in history]
            assert kinds[0] == "queued" and kinds[-1] == "completed"
            assert {"dispatched", "progress", "stage_completed"} <= set(kinds)
            for i, stream in enumerate(streams):
                if job_ids[i % 3] == job_id:
                    assert stream.events[0][0] == "state"
                    assert stream.events[1:] == history, f"client {i} of {job_id}"


async def test_open_streams_do_not_hold_redis_connections(
        redis_url: str, tmp_path: Path) -> None:
    async with router_at(redis_url, tmp_path) as router:
        job_ids = [(await router.submit()).json()["id"] for _ in range(4)]
        clients = [await open_stream(router.http, job_ids[0])]
        before = await connected_clients(router)
        try:
            for i in range(39):
                clients.append(await open_stream(router.http, job_ids[i % 4]))
            after = await connected_clients(router)
        finally:
            for client in clients:
                await client.close()
        assert after <= before + 3, f"{before} Redis clients with 1 stream, {after} with 40"


async def test_streams_beyond_the_process_cap_are_refused_until_one_closes(
        redis_url: str, tmp_path: Path) -> None:
    async with router_at(redis_url, tmp_path, sse_max_streams=3) as router:
        job_ids = [(await router.submit()).json()["id"] for _ in range(2)]
        clients = [await open_stream(router.http, job_ids[i % 2]) for i in range(3)]
        try:
            assert_too_many_streams(await refused_status(router.http, job_ids[1]),
                                    naming="LANEWAY_SSE_MAX_STREAMS=3")
            await clients.pop(0).close()
            clients.append(await _accepted_once_freed(router, job_ids[1]))
        finally:
            for client in clients:
                await client.close()


async def _accepted_once_freed(router: Router, job_id: str) -> OpenStream:
    """A stream opened as soon as the server has noticed a closed one (refused until then)."""
    for _ in range(200):
        opened = await start_stream(router.http, job_id)
        if opened.joined.is_set():
            return opened
        assert (await opened.task).status_code == 429
        await asyncio.sleep(0.05)  # the server sees the disconnect on its own time
    raise AssertionError("a closed stream never freed its place")


async def test_streams_beyond_a_tenants_cap_are_refused_for_that_tenant_only(
        redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LW_TEST_ACME_KEY", "acme-secret")
    monkeypatch.setenv("LW_TEST_GLOBEX_KEY", "globex-secret")
    policy = POLICY.model_copy(update={"tenants": {
        "acme": Tenant(api_key_env="LW_TEST_ACME_KEY"),
        "globex": Tenant(api_key_env="LW_TEST_GLOBEX_KEY"),
    }})
    acme = {"Authorization": "Bearer acme-secret"}
    globex = {"Authorization": "Bearer globex-secret"}
    async with router_at(redis_url, tmp_path, policy, sse_max_streams=10,
                         sse_max_streams_per_tenant=2) as router:
        acme_job = (await router.submit(acme)).json()["id"]
        globex_job = (await router.submit(globex)).json()["id"]
        clients = [await open_stream(router.http, acme_job, headers=acme) for _ in range(2)]
        try:
            assert_too_many_streams(await refused_status(router.http, acme_job, acme),
                                    naming="'acme'")
            clients.append(await open_stream(router.http, globex_job, headers=globex))
        finally:
            for client in clients:
                await client.close()


async def test_a_stream_at_its_maximum_duration_ends_with_retry_and_resumes(
        redis_url: str, tmp_path: Path) -> None:
    async with router_at(redis_url, tmp_path, sse_max_duration_s=0.5) as router:
        job_id = (await router.submit()).json()["id"]
        first = await read_stream(router.http, job_id)  # nothing runs it yet
        assert [kind for kind, _, _ in first.events] == ["state", "queued"]
        assert first.retry_ms == RECONNECT_MS

        await router.start_worker("draft")
        seen = first.events[1:]
        for _ in range(100):
            assert seen[-1][2] is not None
            resumed = await read_stream(router.http, job_id,
                                        headers={"Last-Event-ID": seen[-1][2]})
            assert resumed.events[0][0] == "state"
            seen += resumed.events[1:]
            if seen[-1][0] == "completed":
                break
            assert resumed.retry_ms == RECONNECT_MS  # ended by the bound, not by the job
        assert seen == (await router.events(job_id))[1:]  # no event twice, none missed

        # an ended job's stream ends after its backlog, without its final event too
        after_end = await read_stream(router.http, job_id,
                                      headers={"Last-Event-ID": str(seen[-1][2])})
        await router.redis.delete(keys.job_events(job_id))  # as if it had expired
        expired = await read_stream(router.http, job_id)
        for ended in (after_end, expired):
            assert [kind for kind, _, _ in ended.events] == ["state"]
            assert ended.retry_ms is None  # not held open until the bound

        malformed = await router.http.get(f"/v1/jobs/{job_id}/events",
                                          headers={"Last-Event-ID": "yesterday"})
        assert malformed.status_code == 400  # issue 12: a malformed Last-Event-ID is a 400
        assert malformed.json()["error"]["details"][0]["field"] == "Last-Event-ID"


async def test_an_open_stream_carries_on_after_the_server_restarts(tmp_path: Path) -> None:
    with own_valkey(tmp_path / "valkey") as server:
        async with router_at(server.url, tmp_path, redis_timeout_s=0.5) as router:
            job_id = (await router.submit()).json()["id"]
            client = await open_stream(router.http, job_id)
            assert server.pid is not None
            os.kill(server.pid, signal.SIGKILL)
            for _ in range(1000):
                if server.poll() is not None:
                    break
                await asyncio.sleep(0.01)
            await asyncio.to_thread(server.restart)
            await router.start_worker("draft")  # its events come after the restart
            stream = await asyncio.wait_for(client.task, TIMEOUT_S)
            history = (await router.events(job_id))[1:]
            assert history[-1][0] == "completed"
            assert stream.events[1:] == history


@pytest.mark.parametrize("shared_read_from", ["later", "earlier"])
async def test_a_client_joining_with_another_gets_each_event_once_whichever_reads_first(
        redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        shared_read_from: str) -> None:
    """Two clients join a job at once and the other one starts the shared read: after an
    event this one's backlog lacks (it reads the gap itself), or from the start (it drops
    what its backlog had)."""
    async with router_at(redis_url, tmp_path) as router:
        job_id = (await router.submit()).json()["id"]
        stream = keys.job_events(job_id)
        fanout = EventFanout(router.redis)
        other: list[Subscription] = []
        read_range = job_events._read_range

        async def raced(redis: Any, job: str, *, after: str, until: str = "+"
                        ) -> list[StreamEvent]:
            events = await read_range(redis, job, after=after, until=until)
            if not other:  # between this client's backlog read and its follow
                entry_id = await router.redis.xadd(stream, Event("progress", {
                    "step": 1}).fields())
                other.append(fanout.open(job))
                fanout.follow(other[0], after=entry_id.decode()
                              if shared_read_from == "later" else "0")
            return events

        monkeypatch.setattr(job_events, "_read_range", raced)
        messages = await job_event_messages(router.redis, JobStore(router.redis), job_id,
                                            fanout=fanout)
        try:
            got = [await asyncio.wait_for(anext(messages), TIMEOUT_S) for _ in range(2)]
            await router.redis.xadd(stream, Event("progress", {"step": 2}).fields())
            got += [await asyncio.wait_for(anext(messages), TIMEOUT_S) for _ in range(2)]
        finally:
            await messages.aclose()  # type: ignore[attr-defined]
            fanout.close(other[0])
            await fanout.stop()
        assert [m.event for m in got] == ["state", "queued", "progress", "progress"]
        assert [json.loads(str(m.data))["step"] for m in got[2:]] == [1, 2]
        entries = await router.redis.xrange(stream)
        assert [m.id for m in got[1:]] == [entry_id.decode() for entry_id, _ in entries]
        assert fanout.open_streams == 0
