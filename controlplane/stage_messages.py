"""Stage messages on the engine streams: what an entry holds.

An entry names the job and the stage to run and carries the job record as it was when the
entry was queued (written by the same transition), so a worker starts the stage without
reading the record first; the start transition's revision check catches a record that
changed since. Entries are deleted once acknowledged, so a stream's length is its lane's
depth.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from redis.typing import EncodableT, FieldT


@dataclass(frozen=True)
class StageMessage:
    job_id: str
    stage: int
    trace: dict[str, str]
    enqueued_ms: int
    #: the job record (JSON) the entry was queued with; None for an entry written by hand
    record: bytes | None = None

    def fields(self) -> dict[FieldT, EncodableT]:
        """The entry's fields except ``record``, which the transition script adds."""
        return {"job": self.job_id, "stage": str(self.stage), "trace": json.dumps(self.trace),
                "enqueued_ms": str(self.enqueued_ms)}

    @classmethod
    def parse(cls, fields: dict[bytes, bytes]) -> StageMessage:
        return cls(
            job_id=fields[b"job"].decode(),
            stage=int(fields[b"stage"]),
            trace=json.loads(fields.get(b"trace", b"{}")),
            enqueued_ms=int(fields.get(b"enqueued_ms", b"0")),
            record=fields.get(b"record"),
        )
