"""Who is asking: tenants from the policy, authenticated by ``Authorization: Bearer KEY``.

Without tenants in the policy every request belongs to ``default`` and needs no key. With
tenants, each names the environment variable that holds its key (keys never live in the
policy and are never logged), and may restrict the tiers it can ask for. The caller gives
the variables to read (the API process's environment, handed to ``create_app``)::

    tenant = authenticate(policy, request.headers.get("Authorization"), secrets=os.environ)
    check_tier(policy, tenant, "premium")
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

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
    if not authorization:
        raise Unauthorized("Authorization: a 'Bearer <api key>' header is required")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("Authorization: expected 'Bearer <api key>'")
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
