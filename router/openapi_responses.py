"""The error responses each operation documents in the OpenAPI document.

Every error the API answers is ``ErrorBody`` (``router/http_errors.py``), so an operation
lists its statuses and they all share that schema; 500 is on every operation (a bug
answers it in the same shape). Litestar documents a 400 of its own shape for operations
with parameters; listing 400 here replaces it with ours (unreadable bodies are 400).
"""

from __future__ import annotations

from litestar.openapi.datastructures import ResponseSpec
from pydantic import BaseModel

from controlplane.api_models import ErrorBody

#: what each error status means in this API
MEANING: dict[int, str] = {
    400: "unreadable request (not JSON, wrong content type)",
    401: "no or unknown API key / admin token",
    403: "key or token not accepted for this (tier outside the tenant's, wrong admin token)",
    404: "no such job, image, model or rollout (or another tenant's)",
    409: "the state changed under the request or forbids it",
    413: "payload too large",
    422: "invalid input: each bad field with its value in details",
    429: "admission refused: the route is full; Retry-After says when to try again",
    500: "internal error (logged by the server, never echoed)",
    503: "Redis unreachable or no live worker for the route; Retry-After says when",
    504: "the job did not finish within the route's timeout_s (it goes on)",
}


def errors(*status_codes: int, body: type[BaseModel] = ErrorBody) -> dict[int, ResponseSpec]:
    """``responses=`` for a handler: each status (and 500) with the error schema."""
    return {code: ResponseSpec(body, description=MEANING[code], generate_examples=False)
            for code in sorted({*status_codes, 500})}


#: the statuses of every call that reads or changes one job (``Authorization`` with tenants)
JOB_ERRORS = (400, 401, 404, 422, 503)
#: the statuses of every admin call (the admin guard, then the action's own refusals)
ADMIN_ERRORS = (400, 401, 403, 404, 409, 422, 503)
