"""Per-route counters kept in Redis: jobs in flight (admission's bound) and the drain rate;
and the deferred queue's release rate.

Incremented when a job is accepted and decremented exactly once when it ends, inside the
same transactions that accept and end it (release it), so the bound never drifts.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from controlplane import keys

if TYPE_CHECKING:
    from controlplane.transitions import Effects

DRAIN_WINDOW_S = 60


def on_accept(writes: Effects, route: str) -> None:
    writes.incr(keys.route_inflight(route))


def on_finish(writes: Effects, route: str, *, now_s: float | None = None) -> None:
    second = int(now_s if now_s is not None else time.time())
    writes.decr(keys.route_inflight(route))
    drained = keys.route_drained(route, second)
    writes.incr(drained)
    writes.expire(drained, DRAIN_WINDOW_S * 2)


def on_release(writes: Effects, *, now_s: float | None = None) -> None:
    """A deferred job left the deferred queue for its lane (counted per second)."""
    released = keys.deferred_released(int(now_s if now_s is not None else time.time()))
    writes.incr(released)
    writes.expire(released, DRAIN_WINDOW_S * 2)
