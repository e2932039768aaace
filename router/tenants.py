"""Who is asking: tenants from the policy, authenticated by ``Authorization: Bearer KEY``.

Without tenants in the policy every request belongs to ``default`` and needs no key. With
tenants, each names the environment variable that holds its key (keys never live in the
policy and are never logged), and may restrict the tiers it can ask for. The caller gives
the variables to read (the API process's environment, handed to ``create_app``)::

    tenant = authenticate(policy, request.headers.get("Authorization"), secrets=os.environ)
    check_tier(policy, tenant, "premium")

What the whole service looks like (``/v1/routes``, ``/v1/status``) is everyone's without
tenants; with tenants it takes a tenant key (the tenant's own view) or the admin token
(everything): ``viewer(policy, header, secrets=..., admin_token=...)``.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from controlplane.errors import Forbidden, Unauthorized
from controlplane.policy import Policy

DEFAULT_TENANT = "default"


def authenticate(policy: Policy, authorization: str | None, *,
                 secrets: Mapping[str, str]) -> str:
    """The tenant whose key the header carries; 401 when tenants exist and it carries none.

    ``secrets`` maps each tenant's ``api_key_env`` to its key.
    """
    if not policy.tenants:
        return DEFAULT_TENANT
    token = bearer_token(authorization)
    found = None
    for name, tenant in policy.tenants.items():
        expected = secrets.get(tenant.api_key_env)
        # compare with every configured key in constant time; do not stop at the first match
        if expected and hmac.compare_digest(expected.encode(), token.encode()):
            found = name
    if found is None:
        raise Unauthorized("Authorization: unknown API key")
    return found


def check_tier(policy: Policy, tenant: str, tier: str) -> None:
    """403 when the tenant's allowed tiers (empty: all) do not include ``tier``."""
    spec = policy.tenants.get(tenant)
    if spec is not None and spec.tiers and tier not in spec.tiers:
        raise Forbidden(f"tier: {tier!r} is not allowed for tenant {tenant!r} "
                        f"(allowed: {', '.join(spec.tiers)})")


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer TOKEN`` header (401 without one)."""
    if not authorization:
        raise Unauthorized("Authorization: a 'Bearer <api key>' header is required")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("Authorization: expected 'Bearer <api key>'")
    return token


def token_matches(authorization: str | None, expected: str) -> bool:
    """Whether the header carries ``expected`` (compared in constant time)."""
    return hmac.compare_digest(bearer_token(authorization).encode(), expected.encode())


@dataclass(frozen=True)
class Viewer:
    """Who looks at the service: everyone (no tenants), the admin, or one tenant."""

    tenant: str | None = None

    @property
    def sees_all(self) -> bool:
        return self.tenant is None


def viewer(policy: Policy, authorization: str | None, *, secrets: Mapping[str, str],
           admin_token: str | None) -> Viewer:
    """The admin token or no tenants: everything; else the tenant its key names (401)."""
    if not policy.tenants:
        return Viewer()
    if admin_token and authorization and token_matches(authorization, admin_token):
        return Viewer()
    return Viewer(authenticate(policy, authorization, secrets=secrets))
