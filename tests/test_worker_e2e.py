"""Worker behaviour through real processes: tier weights, the batched lane, crashes, drain."""

from __future__ import annotations

import base64
import io
import json
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import httpx
import pytest
import redis
from PIL import Image

from controlplane import keys
from controlplane.registry import Registry
from tests.conftest import POLICIES
from tests.service import Service, WorkerProcess, bundled_redis_url
from tests.span_collector import SpanCollector

POLICY = POLICIES / "worker.yaml"


def png_b64(size: tuple[int, int] = (16, 16)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def api(tiny_registry: Registry, tmp_path_factory: pytest.TempPathFactory,
        collector: SpanCollector) -> Iterator[Service]:
    """The API and bundled server only; each test starts the workers it needs (they inherit
    the service's environment, tracing to ``collector`` included)."""
    svc = Service(home=tmp_path_factory.mktemp("workers"), registry=tiny_registry.root,
                  policy=POLICY, extra_args=["--no-workers"], wait_for_worker=False,
                  extra_env=collector.env())
    svc.start()
    yield svc
    svc.stop()


def redis_of(api: Service) -> redis.Redis:
    return redis.Redis.from_url(bundled_redis_url(api.home))


def runs_in(worker_name: str, worker: WorkerProcess) -> bool:
    """Whether ``worker_name`` (``NODE/DEVICE/PID-RANDOM``) is that process's."""
    return worker_name.rsplit("/", 1)[-1].split("-", 1)[0] == str(worker.pid)


def wait_for_workers(api: Service, *workers: WorkerProcess, timeout_s: float = 60) -> None:
    client = redis_of(api)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        names = {n.decode() for n in client.smembers(keys.workers())}
        if all(any(runs_in(n, w) for n in names) for w in workers):
            return
        time.sleep(0.1)
    raise AssertionError(f"workers {[w.pid for w in workers]} never sent a heartbeat")


def submit(client: httpx.Client, **body: object) -> dict:
    response = client.post("/v1/images", json={"prompt": "a heron", **body})
    assert response.status_code in (200, 202), response.text
    return response.json()


def wait_final(client: httpx.Client, job_id: str, timeout_s: float = 90) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("completed", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def wait_running(client: httpx.Client, job_id: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["stages"][0]["status"] == "running":
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never started: {job}")


def test_tiers_share_one_slot_by_weight(api: Service) -> None:
    with api.client() as client:
        ids = []
        for i in range(30):  # queued before any worker exists
            for tier in ("premium", "batch"):
                ids.append(submit(client, mode="img2img", image=png_b64(), width=32,
                                  height=32, tier=tier, seed=i)["id"])
        worker = WorkerProcess(api, "shrink").start()
        try:
            jobs = [wait_final(client, job_id) for job_id in ids]
        finally:
            assert worker.stop() == 0
    assert all(j["status"] == "completed" and j["route"] == "shrink" for j in jobs)
    order = sorted(jobs, key=lambda j: datetime.fromisoformat(j["stages"][0]["started_at"]))
    first = [j["tier"] for j in order[:40]]
    # weights 3:1 → 30 premium in the first 40 (±20 %); the low tier still progresses
    assert 24 <= first.count("premium") <= 36
    assert first.count("batch") >= 6


def test_two_slots_of_one_engine_run_a_burst_of_drafts_without_a_failure(api: Service) -> None:
    # queued before the worker starts, so both slots of `turbo` always run at once; prompts
    # of different token lengths once met a tokenizer shared by the slots (issue 12)
    prompts = ["tree", "a cube", "a red cube on a table", "a small blue boat on a lake at dawn"]
    with api.client() as client:
        ids = [submit(client, intent="draft", prompt=prompts[i % len(prompts)], seed=i)["id"]
               for i in range(60)]
        worker = WorkerProcess(api, "turbo").start()
        try:
            jobs = [wait_final(client, job_id) for job_id in ids]
        finally:
            assert worker.stop() == 0
    failed = [(j["id"], j.get("error")) for j in jobs if j["status"] != "completed"]
    assert failed == []
    spans = sorted((datetime.fromisoformat(j["stages"][0]["started_at"]),
                    datetime.fromisoformat(j["stages"][0]["finished_at"])) for j in jobs)
    overlapping = sum(start < previous_end for (_, previous_end), (start, _)
                      in zip(spans, spans[1:], strict=False))
    assert overlapping >= len(jobs) // 2  # the two slots did run side by side


def test_upscale_lane_batches_under_load_and_alone(api: Service,
                                                    collector: SpanCollector) -> None:
    worker = WorkerProcess(api, "turbo,x2").start()
    try:
        wait_for_workers(api, worker)
        with api.client() as client, ThreadPoolExecutor(max_workers=12) as pool:
            jobs = list(pool.map(lambda i: submit(client, intent="final", seed=i, wait=60),
                                 range(12)))
            lone = submit(client, intent="final", seed=99, wait=60)
    finally:
        assert worker.stop() == 0  # flushes its spans
    sizes = [j["stages"][1]["batch_size"] for j in jobs]
    assert all(j["status"] == "completed" for j in jobs)
    assert max(sizes) > 1 and max(sizes) <= 4
    assert all(j["images"][0]["width"] == 128 for j in jobs)
    # a batch's span links the trace of every item in it
    batched = {j["trace_id"] for j in jobs if j["stages"][1]["batch_size"] > 1}
    batch_spans = [s for s in collector.spans if s["name"] == "laneway.stage"
                   and s["trace_id"] in batched
                   and int(s["attributes"]["laneway.batch_size"]) > 1]
    assert batch_spans
    for span in batch_spans:
        assert len(span["links"]) == int(span["attributes"]["laneway.batch_size"])
        assert set(span["links"]) <= batched
    upscale = lone["stages"][1]
    assert upscale["batch_size"] == 1
    # a lone item waits max_wait_ms (150) at most, plus one stage time and scheduling slack
    assert upscale["queued_ms"] <= 150 + upscale["run_ms"] + 250


def test_a_killed_worker_s_stage_completes_elsewhere(api: Service) -> None:
    first, second = WorkerProcess(api, "slow").start(), WorkerProcess(api, "slow").start()
    try:
        wait_for_workers(api, first, second)
        with api.client() as client:
            job = submit(client, intent="auto", prompt='a sign that says "OPEN"')
            running = wait_running(client, job["id"])
            victim = first if runs_in(running["stages"][0]["worker"], first) \
                else second
            survivor = second if victim is first else first
            victim.stop(sig=signal.SIGKILL)
            done = wait_final(client, job["id"])
    finally:
        survivor.stop()
    assert done["status"] == "completed", done
    stage = done["stages"][0]
    assert stage["attempts"] == 2
    assert runs_in(stage["worker"], survivor)


def test_attempts_exhausted_fail_with_the_cause_into_dead_letter(api: Service) -> None:
    first = WorkerProcess(api, "fragile").start()
    wait_for_workers(api, first)
    with api.client() as client:
        job = submit(client, intent="auto", tier="batch")
        running = wait_running(client, job["id"])
        first.stop(sig=signal.SIGKILL)
        second = WorkerProcess(api, "fragile").start()
        try:
            done = wait_final(client, job["id"])
        finally:
            second.stop()
    assert done["status"] == "failed"
    assert "gave up after 1 attempts" in done["error"]
    assert running["stages"][0]["worker"] in done["error"]
    dead = redis_of(api).xrange(keys.dead_letter_stream())
    assert any(fields[b"job"].decode() == job["id"] for _, fields in dead)


def test_sigterm_drains_and_hands_back_what_cannot_finish(api: Service) -> None:
    leaving = WorkerProcess(api, "slow", extra_env={"LANEWAY_DRAIN_TIMEOUT_S": "0.3"}).start()
    wait_for_workers(api, leaving)
    with api.client() as client:
        job = submit(client, intent="auto", prompt='a sign that says "SHUT"')
        wait_running(client, job["id"])
        assert leaving.stop(sig=signal.SIGTERM) == 0
        handed_back = client.get(f"/v1/jobs/{job['id']}").json()
        assert handed_back["status"] == "queued"
        assert "handed back" in handed_back["stages"][0]["error"]
        staying = WorkerProcess(api, "slow").start()
        try:
            done = wait_final(client, job["id"])
        finally:
            staying.stop()
    assert done["status"] == "completed"
    assert runs_in(done["stages"][0]["worker"], staying)


def sse_events(client: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    """Every (event, data) of a job's SSE stream, until the server ends it."""
    events, kind = [], ""
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((kind, json.loads(line.split(":", 1)[1])))
    return events


def test_cancel_stops_a_running_stage_and_frees_its_slot(api: Service) -> None:
    worker = WorkerProcess(api, "slow").start()
    try:
        wait_for_workers(api, worker)
        with api.client() as client:
            job = submit(client, intent="auto", prompt='a sign that says "STOP"')
            wait_running(client, job["id"])
            while not any(k == "progress" for k, _ in _events(api, job["id"])):
                time.sleep(0.02)
            first = client.delete(f"/v1/jobs/{job['id']}")
            second = client.delete(f"/v1/jobs/{job['id']}")
            assert first.status_code == second.status_code == 200
            assert first.json()["status"] == second.json()["status"] == "cancelled"
            events = sse_events(client, job["id"])
            kinds = [k for k, _ in events]
            after_cancel = kinds[kinds.index("cancelled"):]
            assert after_cancel.count("progress") <= 1  # stopped within one denoising step
            steps = [d["step"] for k, d in events if k == "progress"]
            assert max(steps) < 30
            assert kinds.count("cancelled") == 1
            # the slot is free again: the next job runs on the same worker
            done = submit(client, intent="auto", prompt='a sign that says "GO"', wait=90)
    finally:
        worker.stop()
    assert done["status"] == "completed"
    assert runs_in(done["stages"][0]["worker"], worker)


def _events(api: Service, job_id: str) -> list[tuple[str, dict]]:
    rows = redis_of(api).xrange(keys.job_events(job_id))
    return [(f[b"kind"].decode(), json.loads(f[b"data"])) for _, f in rows]


def test_sse_shows_the_job_s_life_in_order(api: Service) -> None:
    worker = WorkerProcess(api, "turbo,x2").start()
    try:
        wait_for_workers(api, worker)
        with api.client() as client:
            job = submit(client, intent="final")
            events = sse_events(client, job["id"])
    finally:
        worker.stop()
    kinds = [k for k, _ in events]
    assert kinds[0] == "state"
    lifecycle = [k for k in kinds[1:] if k != "progress"]
    assert lifecycle == ["queued", "dispatched", "stage_completed", "dispatched",
                         "stage_completed", "completed"]
    first_progress = kinds.index("progress")
    assert kinds.index("dispatched") < first_progress < kinds.index("stage_completed")
    steps = [d for k, d in events if k == "progress"]
    assert steps[0] == {"stage": 0, "step": 1, "steps": 1, "ts": steps[0]["ts"]}


def test_a_stage_past_the_route_timeout_stops_at_a_step_and_fails(api: Service) -> None:
    worker = WorkerProcess(api, "slow").start()
    try:
        wait_for_workers(api, worker)
        with api.client() as client:
            job = submit(client, intent="auto", tier="premium")
            done = wait_final(client, job["id"])
    finally:
        worker.stop()
    assert done["route"] == "timed" and done["status"] == "failed"
    assert "timeout_s=1.5" in done["error"]
    steps = [d["step"] for k, d in _events(api, job["id"]) if k == "progress"]
    assert steps and max(steps) < 300  # stopped part-way, at a denoising step
