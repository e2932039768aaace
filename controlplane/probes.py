"""A process's own liveness and readiness probe for Kubernetes: a tiny HTTP server.

``GET /livez`` answers 200 while the process's event loop runs (a stuck loop cannot
answer, and the kubelet restarts the container); ``GET /readyz`` answers 200 when the
Redis server answers a PING within ``PING_TIMEOUT_S`` and ``problems()`` gives none, 503
with the reasons otherwise. Workers and verifiers run it with ``--probe-port``::

    async with serving_probes(ProbeAddress("127.0.0.1", 8081), redis_url=url,
                              problems=worker.not_ready):
        await worker.run()

One request per connection, GET and HEAD only: an asyncio server of its own rather than
an ASGI stack, so a worker takes on nothing but the standard library for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

log = logging.getLogger(__name__)

#: below the probes' timeoutSeconds (2 s in deploy/), so a stopped server reads as 503
PING_TIMEOUT_S = 0.5
READ_TIMEOUT_S = 2.0
MAX_HEADER_LINES = 100
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}


@dataclass(frozen=True)
class ProbeAddress:
    host: str
    port: int


class ProbeServer:
    def __init__(self, address: ProbeAddress, *, redis: aioredis.Redis,
                 problems: Callable[[], list[str]]) -> None:
        """``redis``: a client of the probe's own, with ``PING_TIMEOUT_S`` as its socket
        timeout; ``problems()``: why the process cannot take work now (empty: it can)."""
        self.address = address
        self.redis = redis
        self.problems = problems
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (the one asked for, or the one chosen for port 0)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.address.host,
                                                  self.address.port)
        log.info("probes on http://%s:%d (/livez, /readyz)", self.address.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def readiness(self) -> list[str]:
        """Why ``/readyz`` fails now (empty: ready)."""
        problems = list(self.problems())
        try:
            await self.redis.ping()
        except (aioredis.RedisError, OSError) as exc:
            problems.append(f"Redis did not answer a PING within {PING_TIMEOUT_S} s "
                            f"({type(exc).__name__}: {exc})")
        return problems

    async def _answer(self, method: str, path: str) -> tuple[int, dict[str, object]]:
        if path not in ("/livez", "/readyz"):
            return 404, {"error": f"no {path}: /livez or /readyz"}
        if method not in ("GET", "HEAD"):
            return 405, {"error": f"{method} {path}: GET or HEAD"}
        if path == "/livez":
            return 200, {"status": "alive"}
        problems = await self.readiness()
        if problems:
            return 503, {"status": "not ready", "problems": problems}
        return 200, {"status": "ready"}

    async def _handle(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        method = "GET"
        try:
            method, path = await _read_request(reader)
            status, body = await self._answer(method, path)
        except (TimeoutError, ValueError, ConnectionError) as exc:
            status, body = 400, {"error": f"not an HTTP request ({exc})"}
        payload = json.dumps(body).encode()
        head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
        with contextlib.suppress(ConnectionError):
            writer.write(head if method == "HEAD" else head + payload)
            await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    """``(method, path)`` of the request line; the headers are read and ignored."""
    line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError(f"request line {line[:80]!r}")
    for _ in range(MAX_HEADER_LINES):
        header = await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)
        if header in (b"\r\n", b"\n", b""):
            return parts[0], parts[1].split("?", 1)[0]
    raise ValueError(f"more than {MAX_HEADER_LINES} header lines")


@contextlib.asynccontextmanager
async def serving_probes(address: ProbeAddress | None, *, redis_url: str,
                         problems: Callable[[], list[str]]
                         ) -> AsyncIterator[ProbeServer | None]:
    """Answer ``/livez`` and ``/readyz`` on ``address`` while the block runs (nothing when
    ``address`` is None)."""
    if address is None:
        yield None
        return
    # a connection of its own: a probe never queues behind the process's commands, and a
    # server that stops answering fails it within the timeout
    redis = aioredis.Redis.from_url(redis_url, socket_timeout=PING_TIMEOUT_S,
                                    socket_connect_timeout=PING_TIMEOUT_S, max_connections=4)
    server = ProbeServer(address, redis=redis, problems=problems)
    try:
        await server.start()
        yield server
    finally:
        await server.close()
        await redis.aclose()
