"""A scriptable OpenAI-Images-compatible provider on loopback, for remote-engine tests.

It is a real HTTP server (the boundary a remote engine talks to): it records every request
with its arrival time and headers, counts requests in flight, and answers either with the
next scripted reply, the ``always`` reply, or ``n`` PNG images of the requested size.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Seen:
    at_s: float
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


def png_b64(width: int, height: int, colour: tuple[int, int, int] = (200, 40, 40)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class Provider:
    """``POST /v1/images/generations`` on 127.0.0.1; ``base_url`` is ``{url}/v1``."""

    def __init__(self, *, delay_s: float = 0.0, always: Reply | None = None) -> None:
        self.delay_s = delay_s
        self.always = always
        self.seen: list[Seen] = []
        self.script: deque[Reply] = deque()
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        provider = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload, headers = provider._answer(self.path, dict(self.headers), body)
                raw = json.dumps(payload).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def _answer(self, path: str, headers: dict[str, str], body: dict[str, Any]
                ) -> tuple[int, dict[str, Any], dict[str, str]]:
        with self._lock:
            self.seen.append(Seen(time.monotonic(), path, headers, body))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            reply = self.script.popleft() if self.script else self.always
        try:
            time.sleep(self.delay_s)
            if reply is not None:
                return reply.status, reply.body, reply.headers
            width, height = (int(v) for v in body["size"].split("x"))
            data = [{"b64_json": png_b64(width, height)} for _ in range(body.get("n", 1))]
            return 200, {"created": int(time.time()), "data": data}, {}
        finally:
            with self._lock:
                self.in_flight -= 1

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
