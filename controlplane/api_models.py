"""The HTTP API's response bodies as pydantic models, defined once for both sides: the API
declares them (Litestar builds the OpenAPI document from them) and the Python client
(``laneway/client.py``) parses answers into them. Nothing here imports Litestar.

Two rules keep the models and the wire honest:

- The server builds each body with :func:`strict` (``extra="forbid"``): a field added to a
  record but not here fails loudly (every test that reads it) instead of going out
  undocumented. ``JobOut.of(job)`` is exactly ``job.public()``, checked field by field.
- The models themselves accept unknown keys (pydantic's default, and the client validates
  with ``extra="ignore"``), so a client keeps working against a newer server that added
  fields, as CONTRACT.md allows.

Fields listed in a model's ``omitted_when_none`` are left out of its JSON when they are
None (a tenant's ``/v1/status`` has no ``workers``), those in ``omitted_when_empty`` also
when they are ``[]`` (``verification`` is ``{"status": "pending"}`` until verified).
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, SerializerFunctionWrapHandler, model_serializer

from controlplane.audit import AuditEntry
from controlplane.deployments import Deployment
from controlplane.jobs import ImageRef, Job, JobStatus, StageStatus
from controlplane.registry import ModelKind, WeightDType
from controlplane.rollouts import Rollout, RolloutFields
from controlplane.verification import JobVerification

Model = TypeVar("Model", bound=BaseModel)


def strict(model: type[Model], body: Any) -> Model:
    """``body`` as ``model``, refusing any key the model does not name (the server's side)."""
    return model.model_validate(body, extra="forbid")


class Body(BaseModel):
    """A response body; leaves out the fields of ``omitted_when_none`` that are None and
    those of ``omitted_when_empty`` that are None or []."""

    omitted_when_none: ClassVar[frozenset[str]] = frozenset()
    omitted_when_empty: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> Any:
        out = handler(self)
        if isinstance(out, dict):
            for name in self.omitted_when_none:
                if name in out and out[name] is None:
                    del out[name]
            for name in self.omitted_when_empty:
                if name in out and out[name] in (None, []):
                    del out[name]
        return out


# -- errors ------------------------------------------------------------------------------


class ErrorDetail(Body):
    """One refused field: where it is, what was wrong, the bad value (when known)."""

    omitted_when_none = frozenset({"value"})

    field: str
    message: str
    value: Any = None


class ErrorInfo(Body):
    code: str
    message: str
    details: list[ErrorDetail]


class ErrorBody(Body):
    """Every error of the API (CONTRACT.md): ``{"error": {"code", "message", "details"}}``."""

    error: ErrorInfo


# -- jobs --------------------------------------------------------------------------------


class StageOut(Body):
    """One stage of a job: engine, model version, where and how long it ran."""

    engine: str
    model: str | None = None
    model_version: str | None = None
    status: StageStatus = StageStatus.pending
    worker: str | None = None
    attempts: int = 0
    queued_ms: int | None = None
    run_ms: int | None = None
    batch_size: int | None = None
    steps: int | None = None
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = None
    fallback_from: str | None = None
    cost: float | None = None


class ImageOut(ImageRef):
    """One final image: ``url`` is ``/v1/jobs/{id}/images/{index}``."""


class VerificationOut(Body, JobVerification):
    """A job's ``verification``: ``{"status": "pending"}`` until the verifier's verdict;
    then its typography, quality and action, with every attempt."""

    omitted_when_empty = frozenset(set(JobVerification.model_fields) - {"status"})


class JobOut(Body):
    """The job as clients see it (``GET /v1/jobs/{id}``; CONTRACT.md's job object)."""

    id: str
    status: JobStatus
    intent: str
    route: str
    degraded_from: str | None = None
    policy_version: str
    stages: list[StageOut]
    images: list[ImageOut] = []
    verification: VerificationOut
    error: str | None = None
    trace_id: str | None = None
    created_at: str
    completed_at: str | None = None
    cost: float | None = None
    tier: str
    seed: int
    metadata: dict[str, Any] = {}

    @classmethod
    def of(cls, job: Job) -> JobOut:
        """``job.public()`` as a JobOut; raises on a field this model does not document."""
        return strict(cls, job.public())


class RecentJobOut(JobOut):
    """A job in the admin's list of recent jobs: with its prompt and tenant."""

    prompt: str
    tenant: str

    @classmethod
    def of(cls, job: Job) -> RecentJobOut:
        return strict(cls, job.public() | {"prompt": job.request.prompt,
                                           "tenant": job.request.tenant})


# -- system ------------------------------------------------------------------------------


class LaneOut(Body):
    engine: str
    tier: str
    depth: int
    oldest_age_s: float | None = None


class QueueOut(Body):
    depth: int
    oldest_age_s: float | None = None


class SlotsOut(Body):
    busy: int
    total: int


class StagesOut(Body):
    """Stages running on a worker's device, and how many its cap allows (None: no cap)."""

    running: int = 0
    allowed: int | None = None


class CudaMemoryOut(Body):
    """What torch's caching allocator holds on a CUDA worker's device."""

    allocated_bytes: int
    reserved_bytes: int


class MemoryOut(Body):
    """A worker device's memory budget: loaded engines and their ``memory_gb``; ``cuda``
    is None on other devices (cpu, sim, none)."""

    used_gb: float = 0.0
    total_gb: float | None = None
    loaded: list[str] = []
    unloads: dict[str, int] = {}
    cuda: CudaMemoryOut | None = None


class WorkerOut(Body):
    name: str | None = None
    device: str | None = None
    slots: dict[str, SlotsOut]
    engines: list[str]
    stages: StagesOut = StagesOut()
    memory: MemoryOut = MemoryOut()
    last_heartbeat_s: float


class StatusOut(Body):
    """``GET /v1/status``; a tenant's view has only ``policy_version``, ``lanes`` (of its
    tiers) and ``deferred``."""

    omitted_when_none = frozenset({"workers", "deployments", "rollouts"})

    policy_version: str
    lanes: list[LaneOut]
    deferred: QueueOut
    workers: list[WorkerOut] | None = None
    deployments: dict[str, Deployment] | None = None
    rollouts: list[Rollout] | None = None


class RoutesOut(Body):
    """``GET /v1/routes``: the policy in force (its YAML format, as JSON) and its version.

    The policy's parts are loose here: their schema is the policy format, which
    ``laneway policy validate`` checks.
    """

    policy_version: str
    version: int
    limits: dict[str, Any]
    tiers: dict[str, dict[str, Any]]
    default_tier: str
    engines: dict[str, dict[str, Any]]
    routes: list[dict[str, Any]]
    aliases: dict[str, dict[str, Any]]
    tenants: dict[str, dict[str, Any]]
    defer: dict[str, Any]
    devices: dict[str, Any]


class HealthOut(Body):
    status: str


class ReadyOut(Body):
    """``GET /readyz``: 200 when ready, 503 with the same body listing the problems."""

    status: str
    problems: list[str]
    policy_version: str
    engines_without_workers: list[str]


# -- admin -------------------------------------------------------------------------------


class PolicyYamlOut(Body):
    version: str
    yaml: str


class PolicyAppliedOut(Body):
    """What a policy apply or rollback did; ``changed`` is false when it was in force."""

    version: str
    previous: str | None = None
    changed: bool


class PolicyChangeOut(Body):
    version: str
    applied_at: str
    actor: str
    reason: str
    current: bool


class RolloutOut(RolloutFields):
    """A rollout with the canary's current traffic share in percent."""

    weight: float

    @classmethod
    def of(cls, rollout: Rollout) -> RolloutOut:
        return strict(cls, rollout.model_dump() | {"weight": rollout.weight})


class ModelRollbackOut(Body):
    model: str
    stable_before: str
    stable_after: str
    aborted_canary: str | None = None
    #: False when the model was already where the rollback would put it (nothing written)
    changed: bool = True
    message: str = ""


class ModelVersionOut(Body):
    """One registered version and its role: ``stable``, ``canary`` or ``""`` (idle)."""

    model: str
    version: str
    role: str
    weight: float
    kind: ModelKind


class RegisteredModelOut(Body):
    """A registered version's manifest; ``files`` is how many files it holds."""

    name: str
    version: str
    kind: ModelKind
    base_model: str | None = None
    dtype: WeightDType
    files: int
    created_at: str
    notes: str = ""


AuditEntryOut = AuditEntry


# -- the OpenAI-compatible endpoint ------------------------------------------------------


class OpenAIImage(Body):
    omitted_when_none = frozenset({"url", "b64_json"})

    url: str | None = None
    b64_json: str | None = None


class OpenAIImagesOut(Body):
    """``POST /v1/images/generations``: the OpenAI Images API's answer."""

    created: int
    data: list[OpenAIImage]


class OpenAIErrorInfo(Body):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(Body):
    """Errors of the OpenAI-compatible endpoint, in that API's shape."""

    error: OpenAIErrorInfo


__all__ = [
    "AuditEntryOut", "Body", "ErrorBody", "ErrorDetail", "ErrorInfo", "HealthOut", "ImageOut",
    "JobOut", "LaneOut", "ModelRollbackOut", "ModelVersionOut", "OpenAIErrorBody",
    "OpenAIErrorInfo", "OpenAIImage", "OpenAIImagesOut", "PolicyAppliedOut", "PolicyChangeOut",
    "PolicyYamlOut", "QueueOut", "ReadyOut", "RegisteredModelOut", "RolloutOut", "RoutesOut",
    "SlotsOut", "StageOut", "StatusOut", "VerificationOut", "WorkerOut", "strict",
]
