"""Route matching: the first policy route whose ``match`` holds serves the request."""

from __future__ import annotations

from dataclasses import dataclass

from controlplane.errors import NoEngine
from controlplane.policy import Intent, Match, Mode, Policy, Route


@dataclass(frozen=True)
class RequestFacts:
    """What route rules may look at."""

    intent: Intent
    has_text: bool
    tier: str
    mode: Mode
    pixels: int


def matches(match: Match, facts: RequestFacts) -> bool:
    if match.intent is not None and match.intent is not facts.intent:
        return False
    if match.has_text is not None and match.has_text != facts.has_text:
        return False
    if match.tier is not None and match.tier != facts.tier:
        return False
    if match.mode is not None and match.mode is not facts.mode:
        return False
    if match.min_pixels is not None and facts.pixels < match.min_pixels:
        return False
    return match.max_pixels is None or facts.pixels <= match.max_pixels


def choose_route(policy: Policy, facts: RequestFacts) -> Route:
    for route in policy.routes:
        if matches(route.match, facts):
            return route
    raise NoEngine(
        f"no route of policy {policy.version_id[:19]} matches intent={facts.intent.value} "
        f"mode={facts.mode.value} tier={facts.tier} has_text={facts.has_text}"
    )
