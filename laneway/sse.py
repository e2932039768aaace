"""Server-Sent Events as the client reads them: a line parser and the typed event.

The parser follows the HTML standard's rules (``event``, ``data`` joined by newlines,
``id``, ``retry``; comments and unknown fields ignored; an event is dispatched at a blank
line when it has data)::

    parser = SseParser()
    for line in response.iter_lines():
        for event in parser.feed(line):
            print(event.event, event.id, event.data)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from controlplane.api_models import JobOut
from controlplane.errors import InternalError

#: a stream that drops this many times in a row, with no new event between, is raised
MAX_STREAM_DROPS = 5
#: reconnection delay after a dropped stream when the server gave no ``retry:``
RECONNECT_S = 1.0


@dataclass(frozen=True)
class JobEvent:
    """One event of a job's stream: ``state`` (the job as it was when the stream opened),
    then ``queued``, ``dispatched``, ``progress`` (stage, step, steps), ``stage_completed``,
    ``completed``, ``verified``, ``failed``, ``cancelled``, ...; ``id`` is the stream id the
    server resumes after (``Last-Event-ID``), None for ``state``."""

    event: str
    data: dict[str, Any] = field(default_factory=dict)
    id: str | None = None

    def job(self) -> JobOut:
        """A ``state`` event's job."""
        if self.event != "state":
            raise ValueError(f"a {self.event!r} event carries no job; only 'state' does")
        return JobOut.model_validate(self.data, extra="ignore")


class SseParser:
    """Turns a stream's lines into JobEvents; ``retry_ms`` is the last ``retry:`` seen
    (the server's reconnection delay: it asks to be called again)."""

    def __init__(self) -> None:
        self.retry_ms: int | None = None
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, line: str) -> Iterator[JobEvent]:
        """The events that ``line`` (without its line break) completes: none or one."""
        if not line:
            if self._data:
                yield self._dispatch()
            self._event, self._data, self._id = "", [], None
            return
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)

    def _dispatch(self) -> JobEvent:
        raw = "\n".join(self._data)
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise InternalError(f"event {self._event or 'message'!r}: data is not a JSON "
                                f"object (got {raw[:200]!r})")
        return JobEvent(event=self._event or "message", data=data, id=self._id or None)


class Resumption:
    """Where a job's event stream resumes, and whether to reconnect after it ends."""

    def __init__(self, last_event_id: str | None) -> None:
        self.last_event_id = last_event_id
        self.drops = 0

    def headers(self) -> dict[str, str]:
        return {"Last-Event-ID": self.last_event_id} if self.last_event_id else {}

    def saw(self, event: JobEvent) -> None:
        if event.id:
            self.last_event_id, self.drops = event.id, 0

    def reconnect_after_s(self, retry_ms: int | None, dropped: Exception | None) -> float | None:
        """Seconds until the next connection; None: the stream is over. A clean end is the
        end unless the server sent ``retry:``; a drop is retried MAX_STREAM_DROPS times."""
        if dropped is None:
            return None if retry_ms is None else retry_ms / 1000
        self.drops += 1
        if self.drops > MAX_STREAM_DROPS:
            raise dropped
        return RECONNECT_S if retry_ms is None else retry_ms / 1000
