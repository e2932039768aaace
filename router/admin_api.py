"""Admin endpoints (CONTRACT.md): policy, rollouts, model rollback and registry, audit,
and the recent jobs of every tenant (the on-call console's list).

Every handler is behind ``admin_guard``: no ``Authorization: Bearer`` header → 401, a wrong
token or an API without ``LANEWAY_ADMIN_TOKEN`` → 403. The actor recorded in the audit
trail is the ``X-Laneway-Actor`` header (the CLI's ``--actor``), else the token's name.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from litestar import Controller, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.di import Provide
from litestar.handlers import BaseRouteHandler
from litestar.response import Stream
from pydantic import BaseModel, ConfigDict, Field

from controlplane import audit
from controlplane.api_models import (
    AuditEntryOut,
    ModelRollbackOut,
    ModelVersionOut,
    PolicyAppliedOut,
    PolicyChangeOut,
    PolicyYamlOut,
    RecentJobOut,
    RegisteredModelOut,
    RolloutOut,
    strict,
)
from controlplane.deployments import DeploymentStore
from controlplane.errors import Forbidden, RegistryError, Unauthorized, ValidationFailed
from controlplane.policy import Policy, RemoteRules
from controlplane.policy_changes import apply_policy_text, rollback_policy
from controlplane.policy_store import PolicyStore
from controlplane.registry import MANIFEST_NAME, ModelKind, Registry
from controlplane.rollback import rollback_model
from controlplane.rollouts import (
    DEFAULT_INTERVAL_S,
    DEFAULT_MIN_SAMPLES,
    DEFAULT_STEPS,
    Phase,
    RolloutStore,
    Thresholds,
    apply_transition,
    start_rollout,
)
from router.api import ApiState, image_response, provide_api
from router.openapi_responses import ADMIN_ERRORS, errors

TOKEN_NAME = "admin"
#: the most jobs one ``GET /v1/admin/jobs`` returns
MAX_RECENT_JOBS = 200
#: what every admin operation documents: the guard's and the actions' refusals
ERRORS = errors(*ADMIN_ERRORS)
ACTOR_HEADER = "x-laneway-actor"


def admin_guard(connection: ASGIConnection[Any, Any, Any, Any],
                handler: BaseRouteHandler) -> None:
    api: ApiState = connection.app.state["api"]
    expected = api.settings.admin_token
    if not expected:
        raise Forbidden("the admin API is disabled: the server has no LANEWAY_ADMIN_TOKEN")
    header = connection.headers.get("authorization", "")
    scheme, _sep, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("admin token required: Authorization: Bearer <LANEWAY_ADMIN_TOKEN>")
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise Forbidden("admin token not accepted")


def actor_of(request: Request[Any, Any, Any]) -> str:
    return request.headers.get(ACTOR_HEADER) or TOKEN_NAME


def canonical_yaml(policy: Policy) -> str:
    return yaml.safe_dump(policy.model_dump(mode="json"), sort_keys=True)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Reason(Strict):
    reason: str = ""


class ToVersion(Strict):
    to: str | None = None
    reason: str = ""


class RolloutRequest(Strict):
    model: str
    version: str
    steps: tuple[float, ...] = DEFAULT_STEPS
    interval_s: float = Field(default=DEFAULT_INTERVAL_S, gt=0)
    min_samples: int = Field(default=DEFAULT_MIN_SAMPLES, ge=1)
    thresholds: Thresholds = Thresholds()
    reason: str = ""


class RegisterRequest(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    path: str
    kind: ModelKind | None = None
    base_model: str | None = None
    notes: str = ""
    link: bool = False
    reason: str = ""


_ACTION_PHASE: dict[str, Phase] = {"promote": Phase.promoted, "pause": Phase.paused,
                                   "resume": Phase.progressing, "abort": Phase.aborted}


def _registered(registry: Registry) -> list[tuple[str, str, ModelKind]]:
    """(model, version, kind) of every registered version; reads the disk (call in a thread)."""
    return [(model, version, registry.manifest(model, version).kind)
            for model in registry.models() for version in registry.versions(model)]


def _register(registry: Registry, req: RegisterRequest) -> RegisteredModelOut:
    """Verify a source that carries its own manifest, then copy it in (blocking)."""
    source = Path(req.path)
    kind, base_model = req.kind, req.base_model
    if (source / MANIFEST_NAME).is_file():
        # a version folder from another registry: it must still match its manifest
        manifest = Registry(source.parent.parent).manifest(source.parent.name, source.name)
        Registry(source.parent.parent).verified_path(source.parent.name, source.name)
        kind, base_model = kind or manifest.kind, base_model or manifest.base_model
    if kind is None:
        raise ValidationFailed.of("kind", f"is required: {source} has no {MANIFEST_NAME}")
    manifest = registry.register(req.name, req.version, source, kind=kind,
                                 base_model=base_model, notes=req.notes, link=req.link)
    return strict(RegisteredModelOut, manifest.model_dump(mode="json", exclude={"files"})
                  | {"files": len(manifest.files)})


class AdminController(Controller):
    path = "/v1/admin"
    guards = [admin_guard]
    dependencies = {"api": Provide(provide_api, sync_to_thread=False)}

    # -- policy ------------------------------------------------------------------------

    @get("/policy", operation_id="adminGetPolicy", responses=ERRORS)
    async def get_policy(self, api: ApiState) -> PolicyYamlOut:
        """The policy in force as canonical YAML (what `laneway policy diff` compares)."""
        policy = api.live.snapshot.policy
        return PolicyYamlOut(version=policy.version_id, yaml=canonical_yaml(policy))

    @post("/policy", operation_id="adminApplyPolicy", status_code=200, responses=ERRORS)
    async def apply_policy(self, request: Request[Any, Any, Any], api: ApiState,
                           reason: str = "") -> PolicyAppliedOut:
        """Validate the YAML body and put it in force; 422 with every error otherwise."""
        text = (await request.body()).decode("utf-8", errors="replace")
        applied = await apply_policy_text(api.redis, text, Registry(api.settings.registry),
                                          remote=RemoteRules.from_settings(api.settings),
                                          actor=actor_of(request), reason=reason,
                                          source="request body")
        await api.live.reload()
        return strict(PolicyAppliedOut, asdict(applied))

    @post("/policy/rollback", operation_id="adminRollbackPolicy", status_code=200,
          responses=ERRORS)
    async def rollback_policy(self, request: Request[Any, Any, Any], data: ToVersion,
                              api: ApiState) -> PolicyAppliedOut:
        applied = await rollback_policy(api.redis, Registry(api.settings.registry),
                                        remote=RemoteRules.from_settings(api.settings),
                                        actor=actor_of(request), reason=data.reason,
                                        to=data.to)
        await api.live.reload()
        return strict(PolicyAppliedOut, asdict(applied))

    @get("/policy/history", operation_id="adminPolicyHistory", responses=ERRORS)
    async def policy_history(self, api: ApiState) -> list[PolicyChangeOut]:
        store = PolicyStore(api.redis)
        current = await store.current_version()
        return [strict(PolicyChangeOut, asdict(c) | {"current": c.version == current})
                for c in await store.history()]

    # -- rollouts ----------------------------------------------------------------------

    @post("/rollouts", operation_id="adminStartRollout", status_code=201, responses=ERRORS)
    async def start(self, request: Request[Any, Any, Any], data: RolloutRequest,
                    api: ApiState) -> RolloutOut:
        registry = Registry(api.settings.registry)
        if data.version not in await asyncio.to_thread(registry.versions, data.model):
            raise ValidationFailed.of("version", f"is not a registered version of "
                                      f"{data.model}", data.version)
        rollout = await start_rollout(
            api.redis, model=data.model, version=data.version, now_s=time.time(),
            actor=actor_of(request), reason=data.reason, steps=data.steps,
            interval_s=data.interval_s, min_samples=data.min_samples,
            thresholds=data.thresholds)
        return RolloutOut.of(rollout)

    @get("/rollouts", operation_id="adminListRollouts", responses=ERRORS)
    async def list_rollouts(self, api: ApiState) -> list[RolloutOut]:
        return [RolloutOut.of(r) for r in await RolloutStore(api.redis).all()]

    @get("/rollouts/{model:str}", operation_id="adminGetRollout", responses=ERRORS)
    async def get_rollout(self, model: str, api: ApiState) -> RolloutOut:
        return RolloutOut.of(await RolloutStore(api.redis).require(model))

    @post("/rollouts/{model:str}/{action:str}", operation_id="adminRolloutAction",
          status_code=200, responses=ERRORS)
    async def act(self, request: Request[Any, Any, Any], model: str, action: str,
                  api: ApiState, data: Reason | None = None) -> RolloutOut:
        """promote | pause | resume | abort."""
        phase = _ACTION_PHASE.get(action)
        if phase is None:
            raise ValidationFailed.of("action", "must be promote, pause, resume or abort",
                                      action)
        rollout = await RolloutStore(api.redis).require(model)
        reason = (data.reason if data else "") or f"{action} by {actor_of(request)}"
        after = await apply_transition(api.redis, rollout, phase, now_s=time.time(),
                                       actor=actor_of(request), reason=reason)
        return RolloutOut.of(after)

    # -- models ------------------------------------------------------------------------

    @post("/models/{model:str}/rollback", operation_id="adminRollbackModel", status_code=200,
          responses=ERRORS)
    async def rollback(self, request: Request[Any, Any, Any], model: str, api: ApiState,
                       data: ToVersion | None = None) -> ModelRollbackOut:
        """Abort the model's rollout or go back a stable version; idempotent: with nothing
        to undo it answers ``changed: false``, "already at VERSION", and writes nothing.
        409 ``conflict`` when a concurrent admin or controller write got there first."""
        data = data or ToVersion()
        result = await rollback_model(
            api.redis, model, actor=actor_of(request), reason=data.reason or "on-call rollback",
            now_s=time.time(), to=data.to,
            known_versions=await asyncio.to_thread(Registry(api.settings.registry).versions,
                                                   model))
        if result.changed:
            await api.live.reload()
        return strict(ModelRollbackOut, asdict(result) | {"message": result.message})

    @get("/models", operation_id="adminListModels", responses=ERRORS)
    async def models(self, api: ApiState) -> list[ModelVersionOut]:
        """Every registered version with its role: stable, canary (with weight) or idle."""
        registered = await asyncio.to_thread(_registered, Registry(api.settings.registry))
        deployments = await DeploymentStore(api.redis).all()
        rows = []
        for model, version, kind in registered:
            deployment = deployments.get(model)
            role, weight = "", 0.0
            if deployment and version == deployment.stable:
                role = "stable"
                weight = 100.0 - (deployment.canary_weight if deployment.canary else 0.0)
            elif deployment and version == deployment.canary:
                role, weight = "canary", deployment.canary_weight
            rows.append(ModelVersionOut(model=model, version=version, role=role,
                                        weight=weight, kind=kind))
        return rows

    @post("/models", operation_id="adminRegisterModel", status_code=201, responses=ERRORS)
    async def register(self, request: Request[Any, Any, Any], data: RegisterRequest,
                       api: ApiState) -> RegisteredModelOut:
        """Copy (or link) a folder into the registry as NAME/VERSION, after checking it."""
        registry = Registry(api.settings.registry)
        try:
            manifest = await asyncio.to_thread(_register, registry, data)
        except RegistryError as exc:
            raise ValidationFailed.of("path", exc.message, data.path) from None
        await audit.add(api.redis, audit.AuditEntry.now(
            actor_of(request), "models.register", data.name, data.reason,
            version=data.version, path=data.path))
        return manifest

    # -- jobs --------------------------------------------------------------------------

    @get("/jobs", operation_id="adminRecentJobs", responses=ERRORS)
    async def recent_jobs(self, api: ApiState, limit: int = 20) -> list[RecentJobOut]:
        """The newest accepted jobs of every tenant, newest first, with prompt and tenant."""
        if not 1 <= limit <= MAX_RECENT_JOBS:
            raise ValidationFailed.of("limit", f"must be 1..{MAX_RECENT_JOBS}", limit)
        return [RecentJobOut.of(job) for job in await api.jobs.recent(limit_n=limit)]

    @get("/jobs/{job_id:str}/images/{index:int}", operation_id="adminJobImage",
         media_type="image/png", responses=ERRORS)
    async def job_image(self, job_id: str, index: int, api: ApiState,
                        format: str = "png") -> Response[bytes] | Stream:
        """A job's image for the admin, whatever its tenant (the console's thumbnails)."""
        return await image_response(api, await api.jobs.get(job_id), index, format)

    # -- audit -------------------------------------------------------------------------

    @get("/audit", operation_id="adminAudit", responses=ERRORS)
    async def audit_log(self, api: ApiState, limit: int = 50,
                        target: str | None = None) -> list[AuditEntryOut]:
        if limit < 1:
            raise ValidationFailed.of("limit", "must be at least 1", limit)
        entries = await audit.recent(api.redis, limit_n=limit, target=target)
        return entries


__all__ = ["AdminController", "admin_guard"]
