"""The stable versions each model has had, oldest first: what `laneway rollback` goes back to.

Rows are appended only with a change of the model's deployment, by the same script
(``controlplane/deployment_writes.py``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from controlplane.jobs import utc_now


def row(version: str, *, reason: str) -> str:
    """One history row: ``version`` became stable now, for ``reason``."""
    return json.dumps({"version": version, "at": utc_now(), "reason": reason})


def versions_of(rows: Sequence[bytes | str]) -> list[str]:
    return [json.loads(r)["version"] for r in rows]


def previous_stable(history: list[str], current: str) -> str | None:
    """The newest version before ``current`` that differs from it, or None."""
    for version in reversed(history):
        if version != current:
            return version
    return None


def rows_for_change(history: list[str], old: str, new: str, *, reason: str) -> list[str]:
    """The rows recording a stable change old → new; the first change also records ``old``."""
    first = [] if history else [row(old, reason="stable before the first recorded change")]
    return [*first, row(new, reason=reason)]
