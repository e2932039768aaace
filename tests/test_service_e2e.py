"""End to end through ``laneway serve``: routing, validation, caps, failures, traces."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from io import BytesIO

import pytest
from PIL import Image

from controlplane.registry import Registry
from tests.conftest import POLICIES
from tests.service import Service
from tests.span_collector import SpanCollector

SPINE_POLICY = POLICIES / "spine.yaml"


@pytest.fixture(scope="module")
def service(tiny_registry: Registry, tmp_path_factory: pytest.TempPathFactory,
            collector: SpanCollector) -> Iterator[Service]:
    broken = tiny_registry.root / "tiny-broken" / "1"
    if not broken.exists():
        tiny_registry.register("tiny-broken", "1", tiny_registry.verified_path("tiny-sdxl", "1"),
                               kind="sdxl", notes="weights tampered with by the test")
        weight = next(broken.rglob("*.safetensors"))
        weight.write_bytes(weight.read_bytes()[:-16] + b"\0" * 16)
    svc = Service(home=tmp_path_factory.mktemp("spine"), registry=tiny_registry.root,
                  policy=SPINE_POLICY, extra_env=collector.env())
    svc.start()
    yield svc
    svc.stop()


def submit(service: Service, **body: object) -> dict:
    with service.client() as client:
        response = client.post("/v1/images", json={"prompt": "a lighthouse", **body})
    assert response.status_code in (200, 202), response.text
    return response.json()


def test_draft_returns_an_image_of_the_requested_size(service: Service) -> None:
    job = submit(service, intent="draft", width=64, height=48, wait=30)
    assert job["status"] == "completed", job
    with service.client() as client:
        png = client.get(job["images"][0]["url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = Image.open(BytesIO(png.content))
    assert image.size == (64, 48)
    provenance = json.loads(image.text["laneway"])
    assert provenance["policy_version"] == job["policy_version"]
    assert provenance["seed"] == job["seed"] and provenance["job_id"] == job["id"]
    assert provenance["model_versions"] == {
        stage["engine"]: {"model": stage["model"], "version": stage["model_version"]}
        for stage in job["stages"]}


@pytest.mark.parametrize(("body", "route", "engine", "steps"), [
    ({"intent": "draft"}, "fast_draft", "turbo", 2),
    ({"intent": "final"}, "final_render", "base", 6),
    ({"intent": "auto", "prompt": 'a poster that says "OPEN"'}, "auto_text", "base", 3),
    ({"intent": "auto", "width": 128, "height": 128}, "auto_large", "base", 6),
    ({"intent": "auto"}, "auto_default", "turbo", 2),
])
def test_intent_picks_the_route_engine_and_steps(service: Service, body: dict, route: str,
                                                 engine: str, steps: int) -> None:
    job = submit(service, wait=30, **body)
    assert job["status"] == "completed", job
    assert job["route"] == route
    (stage,) = job["stages"]
    assert (stage["engine"], stage["steps"]) == (engine, steps)
    assert stage["model_version"] and job["policy_version"].startswith("sha256:")
    with service.client() as client:
        routes = client.get("/v1/routes").json()
    assert routes["policy_version"] == job["policy_version"]


def _max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                   key=lambda e: (e[0], e[1]))
    current = peak = 0
    for _, delta in edges:
        current += delta
        peak = max(peak, current)
    return peak


def test_concurrency_never_exceeds_the_engine_cap(service: Service) -> None:
    bodies = [{"intent": "draft", "n": 2}] * 12 + [{"intent": "final"}] * 4
    with ThreadPoolExecutor(max_workers=16) as pool:
        jobs = list(pool.map(lambda b: submit(service, wait=120, **b), bodies))
    per_engine: dict[tuple[str, str], list[tuple[datetime, datetime]]] = {}
    for job in jobs:
        assert job["status"] == "completed", job
        stage = job["stages"][0]
        per_engine.setdefault((stage["engine"], stage["worker"]), []).append(
            (datetime.fromisoformat(stage["started_at"]),
             datetime.fromisoformat(stage["finished_at"])))
    caps = {"turbo": 2, "base": 1}
    for (engine, _worker), intervals in per_engine.items():
        assert _max_overlap(intervals) <= caps[engine]
    # the cap is also reached: turbo really ran two stages side by side
    turbo = [iv for (engine, _), ivs in per_engine.items() if engine == "turbo" for iv in ivs]
    assert _max_overlap(turbo) == 2


@pytest.mark.parametrize(("body", "field"), [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x" * 201}, "prompt"),
    ({"width": 60}, "width"),
    ({"height": 0}, "height"),
    ({"width": 1024, "height": 1024}, "width"),
    ({"n": 0}, "n"),
    ({"n": 5}, "n"),
    ({"intent": "sketch"}, "intent"),
    ({"tier": "gold"}, "tier"),
    ({"mode": "outpaint"}, "mode"),
    ({"mode": "img2img"}, "image"),
    ({"colour": "red"}, "colour"),
    ({"width": "wide"}, "width"),
])
def test_invalid_requests_name_the_field(service: Service, body: dict, field: str) -> None:
    with service.client() as client:
        response = client.post("/v1/images", json={"prompt": "a lighthouse", **body})
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert field in [d["field"] for d in error["details"]]
    assert field in error["message"]


def test_unknown_job_is_404(service: Service) -> None:
    with service.client() as client:
        response = client.get("/v1/jobs/j_does_not_exist")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_a_stage_that_raises_fails_the_job_with_the_error(service: Service) -> None:
    job = submit(service, tier="doomed", wait=30)
    assert job["status"] == "failed"
    assert "checksum" in job["error"] or "sha256" in job["error"], job["error"]
    assert job["stages"][0]["status"] == "failed"
    assert job["stages"][0]["error"]


def test_one_trace_spans_the_api_and_the_worker(service: Service,
                                                collector: SpanCollector) -> None:
    job = submit(service, intent="draft", wait=30)
    assert job["status"] == "completed" and job["trace_id"]
    wanted = {"laneway.route", "laneway.enqueue", "laneway.stage"}
    for _ in range(150):  # spans of two processes arrive in their own time
        spans = [s for s in collector.spans if s["trace_id"] == job["trace_id"]]
        if wanted <= {s["name"] for s in spans} and any(not s["parent"] for s in spans):
            break
        threading.Event().wait(0.2)
    by_name = {s["name"]: s for s in spans}
    assert wanted <= set(by_name)
    assert by_name["laneway.stage"]["service"] == "laneway-worker"
    assert by_name["laneway.route"]["service"] == "laneway-router"
    http_spans = [s for s in spans if s["service"] == "laneway-router" and not s["parent"]]
    assert http_spans, "the HTTP request span is the trace's root"
    stage_ids = {s["span_id"] for s in spans if s["name"] == "laneway.stage"}
    redis_children = [s for s in spans if s["parent"] in stage_ids
                      and s["attributes"].get("db.system") == "redis"]
    assert redis_children, "the stage's Redis commands are its child spans"
    assert all(s["parent"] for s in collector.spans
               if s["attributes"].get("db.system") == "redis"), "no root Redis spans"


def test_openapi_schema_is_served(service: Service) -> None:
    with service.client() as client:
        schema = client.get("/schema/openapi.json").json()
    assert "/v1/images" in schema["paths"]
