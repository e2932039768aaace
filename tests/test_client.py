"""The typed Python client (``laneway/client.py``) against a real API with a simulated
worker; its models against the live answers and the OpenAPI document."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from controlplane.api_models import (
    AuditEntryOut,
    ErrorBody,
    HealthOut,
    JobOut,
    ModelRollbackOut,
    ModelVersionOut,
    OpenAIImagesOut,
    PolicyAppliedOut,
    PolicyChangeOut,
    PolicyYamlOut,
    ReadyOut,
    RecentJobOut,
    RegisteredModelOut,
    RolloutOut,
    RoutesOut,
    StatusOut,
)
from controlplane.deployments import Deployment, DeploymentStore
from controlplane.errors import (
    AdmissionRefused,
    ClientError,
    NoEngine,
    NotFound,
    RetryableError,
    Unauthorized,
    ValidationFailed,
)
from controlplane.jobs import JobStatus
from controlplane.policy import Policy, Tenant
from controlplane.policy_loader import parse_policy
from controlplane.registry import Registry
from laneway.client import AsyncClient, Client, JobEvent, RetryPolicy, WaitTimeout
from tests.router.conftest import Router
from tests.router.test_errors import router_at

ADMIN_TOKEN = "client-admin"
MODEL = "fake-sdxl"
POLICY_YAML = """\
version: 1
limits: {max_pixels: 262144, max_n: 2, max_prompt_chars: 200, default_width: 64,
         default_height: 64}
engines:
  sim:
    kind: sim
    steps: 2
    max_concurrency: 4
    sim: {mean_ms: 20, jitter: 0, dist: fixed}
routes:
  - name: bounded
    match: {intent: final}
    stages: [{engine: sim}]
    admission: {max_queue: 1, on_full: reject}
  - name: open
    stages: [{engine: sim}]
"""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAGENTA = (255, 0, 255)


@pytest.fixture
def policy() -> Policy:
    return parse_policy(POLICY_YAML)


@pytest.fixture
async def router(redis_url: str, policy: Policy, tmp_path: Path) -> AsyncIterator[Router]:
    async with router_at(redis_url, policy, tmp_path, admin_token=ADMIN_TOKEN) as running:
        yield running


def url_of(router: Router) -> str:
    return str(router.http.base_url).rstrip("/")


@contextlib.asynccontextmanager
async def client_of(router: Router, **options: Any) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(url_of(router), admin_token=ADMIN_TOKEN, **options) as client:
        yield client


class Sleeps:
    """An injected sleep: records each delay, runs ``then`` at the first, never waits."""

    def __init__(self, then: Any = None) -> None:
        self.delays: list[float] = []
        self.then = then

    async def __call__(self, delay_s: float) -> None:
        self.delays.append(delay_s)
        if self.then is not None and len(self.delays) == 1:
            await self.then()


# -- jobs --------------------------------------------------------------------------------


async def test_submit_and_wait_complete_with_the_blocking_and_the_async_client(
        router: Router) -> None:
    await router.start_worker("sim")

    def blocking() -> tuple[JobOut, JobOut, JobOut]:
        with Client(url_of(router)) as client:
            queued = client.submit("a lighthouse", intent="draft", seed=7)
            return queued, client.wait(queued.id, timeout_s=60), client.submit(
                "a lighthouse", intent="draft", wait=30)

    queued, done, held = await asyncio.to_thread(blocking)
    assert queued.status is JobStatus.queued and queued.route == "open" and queued.seed == 7
    assert done.id == queued.id and done.status is JobStatus.completed
    assert [(i.index, i.width, i.height) for i in done.images] == [(0, 64, 64)]
    assert done.stages[0].engine == "sim" and done.stages[0].worker == "test/cpu/0"
    assert held.status is JobStatus.completed  # `wait` on submit: the server held it

    async with client_of(router) as client:
        job = await client.submit("a lighthouse", intent="final")
        assert (await client.wait(job.id, timeout_s=60, verified=True)).status is \
            JobStatus.completed


async def test_wait_gives_up_after_its_timeout_with_the_last_job(router: Router) -> None:
    async with client_of(router) as client:  # no worker: the job stays queued
        job = await client.submit("a lighthouse", intent="draft")
        with pytest.raises(WaitTimeout) as caught:
            await client.wait(job.id, timeout_s=0.2)
    assert caught.value.job.id == job.id and caught.value.job.status is JobStatus.queued


async def test_events_yield_the_jobs_events_to_the_end_and_resume_after_an_id(
        router: Router) -> None:
    async with client_of(router) as client:
        job = await client.submit("a lighthouse", intent="draft")
        live = asyncio.create_task(_collect(client.events(job.id)))
        await asyncio.sleep(0.2)  # the stream is open and waiting before any work
        await router.start_worker("sim")
        events = await asyncio.wait_for(live, timeout=60)

        kinds = [e.event for e in events]
        assert kinds[0] == "state" and events[0].job().status is JobStatus.queued
        assert kinds[-1] == "completed"
        assert kinds.index("queued") < kinds.index("dispatched") < kinds.index("progress") \
            < kinds.index("stage_completed") < kinds.index("completed")
        assert events[0].id is None and all(e.id for e in events[1:])
        progress = events[kinds.index("progress")].data
        assert progress["steps"] == 2 and progress["step"] in (1, 2)

        dispatched = events[kinds.index("dispatched")]
        resumed = await _collect(client.events(job.id, last_event_id=dispatched.id))
        assert [e.event for e in resumed] == ["state", *kinds[kinds.index("dispatched") + 1:]]
        assert resumed[0].job().status is JobStatus.completed

        with pytest.raises(NotFound):
            await _collect(client.events("j_nope"))


async def _collect(events: AsyncIterator[JobEvent]) -> list[JobEvent]:
    return [event async for event in events]


async def test_cancel_a_queued_job_is_idempotent(router: Router) -> None:
    async with client_of(router) as client:  # no worker: the job stays queued
        job = await client.submit("a lighthouse", intent="draft")
        cancelled = await client.cancel(job.id)
        assert cancelled.status is JobStatus.cancelled and cancelled.completed_at
        assert await client.cancel(job.id) == cancelled
        assert (await client.job(job.id)).status is JobStatus.cancelled
        with pytest.raises(NotFound) as caught:
            await client.cancel("j_nope")
    assert caught.value.status_code == 404 and caught.value.code == "not_found"


async def test_image_as_bytes_and_as_pil(router: Router) -> None:
    await router.start_worker("sim")
    async with client_of(router) as client:
        job = await client.submit("a lighthouse", intent="draft", n=2, wait=30)
        assert job.status is JobStatus.completed, job
        png = await client.image(job.id, 1)
        assert png.startswith(PNG_SIGNATURE)
        pil = await client.image(job.id, 0, as_pil=True)
        assert pil.size == (64, 64) and pil.convert("RGB").getpixel((0, 0)) == MAGENTA
        jpeg = await client.image(job.id, 0, format="jpeg")
        assert jpeg.startswith(b"\xff\xd8")
        with pytest.raises(NotFound):
            await client.image(job.id, 2)
    with Client(url_of(router)) as blocking:
        pil = await asyncio.to_thread(blocking.image, job.id, 1, as_pil=True)
    assert pil.size == (64, 64)


async def test_a_refusal_raises_the_servers_error_class_with_its_details(
        router: Router) -> None:
    async with client_of(router) as client:
        with pytest.raises(ValidationFailed) as caught:
            await client.submit("a lighthouse", width=63)
        error = caught.value
        assert error.status_code == 422 and error.code == "invalid_request"
        assert [(d.field, d.value) for d in error.details] == [("width", 63)]
        assert "width" in error.message

        with pytest.raises(ValidationFailed) as caught:
            await client.submit("a lighthouse", colour="red")
        assert any("colour" in d.field for d in caught.value.details), caught.value.details

    async with AsyncClient(url_of(router), admin_token="wrong") as client:
        with pytest.raises(ClientError) as refused:
            await client.audit()
    assert refused.value.status_code == 403 and refused.value.code == "forbidden"
    async with AsyncClient(url_of(router)) as client:
        with pytest.raises(Unauthorized):
            await client.audit()


# -- retries -----------------------------------------------------------------------------


async def test_a_429_is_retried_after_retry_after_and_then_accepted(router: Router) -> None:
    first = (await router.submit(intent="final")).json()  # `bounded` holds one job
    refused = await router.submit(intent="final")
    assert refused.status_code == 429
    retry_after_s = int(refused.headers["Retry-After"])

    async def free_the_route() -> None:
        assert (await router.http.delete(f"/v1/jobs/{first['id']}")).status_code == 200

    sleeps = Sleeps(then=free_the_route)
    async with client_of(router, sleep=sleeps) as client:
        job = await client.submit("a lighthouse", intent="final")
    assert job.status is JobStatus.queued and job.route == "bounded"
    assert sleeps.delays == [retry_after_s]


async def test_a_429_that_stays_raises_admission_refused_after_bounded_tries(
        router: Router) -> None:
    assert (await router.submit(intent="final")).status_code == 202
    sleeps = Sleeps()
    async with client_of(router, sleep=sleeps,
                         retry=RetryPolicy(attempts=3, max_retry_after_s=3600)) as client:
        with pytest.raises(AdmissionRefused) as caught:
            await client.submit("a lighthouse", intent="final")
    error = caught.value
    assert error.status_code == 429 and error.code == "queue_full" and "bounded" in error.message
    assert error.retry_after_s is not None and error.retry_after_s >= 1
    assert sleeps.delays == [error.retry_after_s] * 2

    # a wait longer than the client accepts is raised at once
    sleeps = Sleeps()
    async with client_of(router, sleep=sleeps, retry=RetryPolicy(
            max_retry_after_s=error.retry_after_s - 0.5)) as client:
        with pytest.raises(AdmissionRefused):
            await client.submit("a lighthouse", intent="final")
    assert sleeps.delays == []


def answering(*responses: httpx.Response) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A transport answering ``responses`` in turn; the requests it saw."""
    seen: list[httpx.Request] = []
    queue = list(responses)

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return queue.pop(0)

    return httpx.MockTransport(handle), seen


def error_response(status_code: int, code: str, *, retry_after: str | None = None
                   ) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after else {}
    body = {"error": {"code": code, "message": f"{code}!", "details": []}}
    return httpx.Response(status_code, json=body, headers=headers)


def test_a_503_is_retried_with_the_same_idempotency_key_and_codes_map_to_classes() -> None:
    job = {"id": "j_1", "status": "queued", "intent": "draft", "route": "r",
           "policy_version": "v", "stages": [], "verification": {"status": "skipped"},
           "created_at": "now", "tier": "standard", "seed": 1, "new_field": "tolerated"}
    transport, seen = answering(error_response(503, "no_engine", retry_after="5"),
                                error_response(503, "redis_unavailable", retry_after="1"),
                                httpx.Response(202, json=job))
    delays: list[float] = []
    with Client("http://laneway", transport=transport, sleep=delays.append) as client:
        assert client.submit("a lighthouse").id == "j_1"
    assert delays == [5, 1]
    keys = {request.headers["Idempotency-Key"] for request in seen}
    assert len(seen) == 3 and len(keys) == 1

    cases: list[tuple[httpx.Response, type[Exception], str]] = [
        (error_response(503, "no_engine", retry_after="5"), NoEngine, "no_engine"),
        (error_response(503, "redis_unavailable", retry_after="1"), RetryableError,
         "redis_unavailable"),
        (error_response(405, "method_not_allowed"), ClientError, "method_not_allowed"),
        (httpx.Response(502, text="bad gateway"), Exception, "http_error"),
    ]
    for response, cls, code in cases:
        transport, _ = answering(response)
        with Client("http://laneway", transport=transport, retry=RetryPolicy(attempts=1)
                    ) as client, pytest.raises(cls) as caught:
            client.job("j_1")
        assert getattr(caught.value, "code", None) == code
        assert getattr(caught.value, "status_code", None) == response.status_code


# -- event streams: reconnection ---------------------------------------------------------


def sse(*blocks: str) -> bytes:
    return "".join(f"{block}\r\n\r\n" for block in blocks).encode()


def test_a_stream_ended_with_retry_is_resumed_with_last_event_id() -> None:
    transport, seen = answering(
        httpx.Response(200, content=sse('event: state\r\ndata: {"status": "queued"}',
                                        ": keep-alive",
                                        'event: queued\r\ndata: {"tier": "standard"}'
                                        '\r\nid: 1-0',
                                        "retry: 10"),
                       headers={"content-type": "text/event-stream"}),
        httpx.Response(200, content=sse('event: state\r\ndata: {"status": "completed"}',
                                        'event: completed\r\ndata: {"status":\r\n'
                                        'data: "completed"}\r\nid: 2-0'),
                       headers={"content-type": "text/event-stream"}))
    delays: list[float] = []
    with Client("http://laneway", transport=transport, sleep=delays.append) as client:
        events = list(client.events("j_1"))
    assert [(e.event, e.id) for e in events] == [
        ("state", None), ("queued", "1-0"), ("state", None), ("completed", "2-0")]
    assert events[-1].data == {"status": "completed"}
    assert "last-event-id" not in seen[0].headers
    assert seen[1].headers["Last-Event-ID"] == "1-0" and delays == [0.01]


class DroppedStream(httpx.SyncByteStream):
    """A response body that breaks off after its first bytes."""

    def __init__(self, first: bytes) -> None:
        self.first = first

    def __iter__(self) -> Iterator[bytes]:
        yield self.first
        raise httpx.ReadError("connection reset")


def test_a_dropped_stream_is_resumed_and_a_stream_that_keeps_dropping_is_raised() -> None:
    first = httpx.Response(200, stream=DroppedStream(sse('event: queued\r\ndata: {}\r\nid: 1-0')))
    rest = httpx.Response(200, content=sse('event: completed\r\ndata: {}\r\nid: 2-0'))
    transport, seen = answering(first, rest)
    with Client("http://laneway", transport=transport, sleep=lambda _: None) as client:
        assert [e.event for e in client.events("j_1")] == ["queued", "completed"]
    assert seen[1].headers["Last-Event-ID"] == "1-0"

    drops = [httpx.Response(200, stream=DroppedStream(b": hello\r\n\r\n")) for _ in range(6)]
    transport, seen = answering(*drops)
    with Client("http://laneway", transport=transport, sleep=lambda _: None) as client, \
            pytest.raises(httpx.ReadError):
        list(client.events("j_1"))
    assert len(seen) == 6


# -- the models against the live answers and the OpenAPI document ------------------------


def strictly(model: type[BaseModel], response: httpx.Response) -> Any:
    """The answer parsed into ``model`` refusing unknown keys: drift fails here."""
    assert response.status_code < 300, response.text
    return model.model_validate_json(response.content, extra="forbid")


def register_fake_versions(registry_root: Path, tmp_path: Path, *versions: str) -> None:
    source = tmp_path / "weights"
    (source / "unet").mkdir(parents=True)
    (source / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    for version in versions:
        Registry(registry_root).register(MODEL, version, source, kind="sdxl")


async def test_the_client_models_validate_every_live_answer_strictly(
        router: Router, tmp_path: Path) -> None:
    http = router.http
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    idle = await http.get("/v1/status")
    assert idle.json()["workers"] == [] == strictly(StatusOut, idle).workers  # kept when []
    await router.start_worker("sim")
    queued = strictly(JobOut, await router.submit(intent="final"))
    done = strictly(JobOut, await router.submit(intent="draft", wait=30))
    assert done.status is JobStatus.completed and done.images
    assert done.model_dump(mode="json") == (await http.get(f"/v1/jobs/{done.id}")).json()
    strictly(JobOut, await http.get(f"/v1/jobs/{queued.id}"))
    strictly(JobOut, await http.delete(f"/v1/jobs/{queued.id}"))
    status = strictly(StatusOut, await http.get("/v1/status"))
    assert status.workers and status.workers[0].slots["sim"].total == 4
    strictly(RoutesOut, await http.get("/v1/routes"))
    strictly(HealthOut, await http.get("/healthz"))
    strictly(ReadyOut, await http.get("/readyz"))
    openai = strictly(OpenAIImagesOut, await http.post("/v1/images/generations", json={
        "prompt": "a lighthouse", "size": "64x64", "response_format": "b64_json"}))
    assert openai.data[0].b64_json and openai.data[0].url is None
    refusal = await router.submit(width=63)
    assert refusal.status_code == 422 and ErrorBody.model_validate_json(
        refusal.content, extra="forbid").error.details[0].field == "width"

    strictly(PolicyYamlOut, await http.get("/v1/admin/policy", headers=admin))
    changed = POLICY_YAML.replace("mean_ms: 20", "mean_ms: 25")
    applied = strictly(PolicyAppliedOut, await http.post(
        "/v1/admin/policy", content=changed, headers=admin, params={"reason": "slower"}))
    assert applied.changed
    strictly(PolicyAppliedOut, await http.post("/v1/admin/policy/rollback", json={},
                                               headers=admin))
    history = strictly_list(PolicyChangeOut, await http.get("/v1/admin/policy/history",
                                                            headers=admin))
    assert history[-1].current

    register_fake_versions(router.settings.registry, tmp_path, "1", "2")
    await DeploymentStore(router.redis).put(Deployment(model=MODEL, stable="1"))
    async with client_of(router, actor="alice") as client:
        started = await client.start_rollout(MODEL, "2", steps=[10, 100], interval_s=3600)
        assert started.weight == 10 and started.canary == "2"
        assert (await client.rollout_action(MODEL, "pause")).phase.value == "paused"
        status = strictly(StatusOut, await http.get("/v1/status"))
        assert status.deployments and status.deployments[MODEL].canary == "2"
        assert status.rollouts and status.rollouts[0].phase.value == "paused"
        strictly(RolloutOut, await http.get(f"/v1/admin/rollouts/{MODEL}", headers=admin))
        assert (await client.rollout_action(MODEL, "resume")).phase.value == "progressing"
        assert (await client.rollout_action(MODEL, "promote")).phase.value == "promoted"
        assert [r.model for r in await client.rollouts()] == [MODEL]
        strictly_list(RolloutOut, await http.get("/v1/admin/rollouts", headers=admin))
        back = strictly(ModelRollbackOut, await http.post(
            f"/v1/admin/models/{MODEL}/rollback", json={"reason": "bad hands"},
            headers=admin))
        assert (back.stable_before, back.stable_after) == ("2", "1")
        entries = await client.audit(target=MODEL)
        assert entries[0].action == "rollout.start" and entries[0].actor == "alice"
        assert len(entries) >= 5
        assert (await client.policy_history())[-1].current
    strictly_list(AuditEntryOut, await http.get("/v1/admin/audit", headers=admin))


def strictly_list(model: type[BaseModel], response: httpx.Response) -> list[Any]:
    assert response.status_code < 300, response.text
    return [model.model_validate(item, extra="forbid") for item in response.json()]


#: the model each operation answers (a list of it where marked), as the client reads it
SUCCESS_MODELS: dict[str, tuple[type[BaseModel], bool]] = {
    "submitImage": (JobOut, False), "getJob": (JobOut, False), "cancelJob": (JobOut, False),
    "getRoutes": (RoutesOut, False), "getStatus": (StatusOut, False),
    "healthz": (HealthOut, False), "readyz": (ReadyOut, False),
    "adminRecentJobs": (RecentJobOut, True),
    "adminGetPolicy": (PolicyYamlOut, False), "adminApplyPolicy": (PolicyAppliedOut, False),
    "adminRollbackPolicy": (PolicyAppliedOut, False),
    "adminPolicyHistory": (PolicyChangeOut, True), "adminStartRollout": (RolloutOut, False),
    "adminListRollouts": (RolloutOut, True), "adminGetRollout": (RolloutOut, False),
    "adminRolloutAction": (RolloutOut, False), "adminRollbackModel": (ModelRollbackOut, False),
    "adminListModels": (ModelVersionOut, True),
    "adminRegisterModel": (RegisteredModelOut, False), "adminAudit": (AuditEntryOut, True),
    "createImage": (OpenAIImagesOut, False),
}
#: operations whose errors are not ErrorBody: their status → the schema they document
OTHER_ERROR_SCHEMAS = {("readyz", "503"): "ReadyOut"}
NOT_JSON = {"getJobEvents": "text/event-stream", "getJobImage": "image/png",
            "adminJobImage": "image/png", "metrics": "text/plain"}


@pytest.fixture
async def openapi(router: Router) -> dict[str, Any]:
    response = await router.http.get("/schema/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def operations(document: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for methods in document["paths"].values():
        for method, operation in methods.items():
            if method in {"get", "post", "put", "patch", "delete"}:
                yield operation["operationId"], operation


def ref_name(schema: dict[str, Any]) -> str:
    return str(schema["$ref"]).rsplit("/", 1)[-1]


async def test_every_operation_documents_a_typed_answer_and_its_errors(
        openapi: dict[str, Any]) -> None:
    seen = set()
    for operation_id, operation in operations(openapi):
        seen.add(operation_id)
        responses = operation["responses"]
        for status, response in responses.items():
            content = response.get("content") or {}
            if status.startswith("2"):
                if operation_id in NOT_JSON:
                    assert list(content) and list(content)[0].startswith(
                        NOT_JSON[operation_id]), (operation_id, content)
                    continue
                schema = content["application/json"]["schema"]
                model, is_list = SUCCESS_MODELS[operation_id]
                if is_list:
                    assert schema["type"] == "array", (operation_id, schema)
                    schema = schema["items"]
                assert ref_name(schema) == model.__name__, (operation_id, status, schema)
            else:
                expected = OTHER_ERROR_SCHEMAS.get((operation_id, status), (
                    "OpenAIErrorBody" if operation_id == "createImage" else "ErrorBody"))
                schema = content["application/json"]["schema"]
                assert ref_name(schema) == expected, (operation_id, status, schema)
        errors = {s for s in responses if s[0] in "45"}
        assert "500" in errors and (operation_id == "healthz" or len(errors) >= 2), (
            operation_id, sorted(responses))
    assert set(SUCCESS_MODELS) | set(NOT_JSON) == seen
    for name, schema in openapi["components"]["schemas"].items():
        if schema.get("type") == "object" and name in {m.__name__ for m, _ in
                                                       SUCCESS_MODELS.values()}:
            assert schema.get("properties"), f"{name}: an object without properties"


STRUCTURAL = {"$ref", "anyOf", "oneOf", "enum", "type", "items", "properties",
              "additionalProperties"}


def shape(schema: Any) -> Any:
    """What a JSON schema says about a value, without titles, defaults or constraints:
    pydantic's and Litestar's spellings of the same type compare equal."""
    if schema is True or schema is None or not STRUCTURAL & set(schema):
        return "any"
    if "$ref" in schema:
        return ("ref", ref_name(schema))
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return frozenset(shape(s) for s in schema[key])
    if "enum" in schema:
        return ("enum", frozenset(schema["enum"]))
    kind = schema.get("type")
    if isinstance(kind, list):
        return frozenset(shape({**schema, "type": k}) for k in kind)
    if kind == "array":
        return ("array", shape(schema.get("items")))
    if kind == "object" and "properties" not in schema:
        return ("map", shape(schema.get("additionalProperties")))
    return kind


async def test_the_client_models_json_schemas_agree_with_the_openapi_components(
        openapi: dict[str, Any]) -> None:
    components = openapi["components"]["schemas"]
    models = {model for model, _ in SUCCESS_MODELS.values()} | {ErrorBody}
    compared = set()
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, part in {**schema.pop("$defs", {}), model.__name__: schema}.items():
            assert name in components, f"{name}: not in the OpenAPI document"
            documented = components[name]
            compared.add(name)
            if "enum" in part:
                assert set(part["enum"]) == set(documented["enum"]), name
                continue
            assert set(part["properties"]) == set(documented["properties"]), name
            assert set(part.get("required", [])) == set(documented.get("required", [])), name
            for field, field_schema in part["properties"].items():
                assert shape(field_schema) == shape(documented["properties"][field]), (
                    name, field, field_schema, documented["properties"][field])
    assert {"JobOut", "StageOut", "ImageOut", "VerificationOut", "StatusOut", "ErrorBody",
            "ErrorDetail", "Typography", "RolloutOut"} <= compared


async def test_a_tenant_key_gets_its_own_jobs_and_view_in_the_documented_shapes(
        redis_url: str, policy: Policy, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LW_TEST_ACME_KEY", "acme-secret")
    with_tenants = policy.model_copy(update={
        "tenants": {"acme": Tenant(api_key_env="LW_TEST_ACME_KEY")}})
    async with router_at(redis_url, with_tenants, tmp_path, admin_token=ADMIN_TOKEN) as router:
        async with AsyncClient(url_of(router), api_key="acme-secret") as acme:
            job = await acme.submit("a lighthouse", intent="draft")
            assert (await acme.job(job.id)).id == job.id
            view = await acme.status()
            assert view.workers is None and view.deployments is None and view.lanes
            assert set((await acme.routes()).tenants) == {"acme"}
        mine = await router.http.get("/v1/status",
                                     headers={"Authorization": "Bearer acme-secret"})
        assert set(mine.json()) == {"policy_version", "lanes", "deferred"}
        strictly(StatusOut, mine)
        strictly(RoutesOut, await router.http.get(
            "/v1/routes", headers={"Authorization": "Bearer acme-secret"}))
        async with AsyncClient(url_of(router)) as nobody:
            with pytest.raises(Unauthorized):
                await nobody.job(job.id)
