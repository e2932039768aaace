"""On-call flows end to end: `laneway` CLI → admin API → controller and worker processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from controlplane.registry import Registry
from tests.controlplane.rollout_fixtures import MODEL, POLICY_YAML, policy
from tests.service import Service

TOKEN = "s3cret-admin"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(tiny_registry: Registry, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Service]:
    home = tmp_path_factory.mktemp("controlplane")
    registry = home / "registry"
    (registry / MODEL).mkdir(parents=True)
    for version in ("1", "2"):
        (registry / MODEL / version).symlink_to(tiny_registry.root / MODEL / version)
    policy_file = home / "policy.yaml"
    policy_file.write_text(POLICY_YAML)
    svc = Service(home=home, registry=registry, policy=policy_file, extra_args=["--watch"],
                  extra_env={"LANEWAY_ADMIN_TOKEN": TOKEN})
    svc.start()
    yield svc
    svc.stop()


def cli(service: Service, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**service.env(), "LANEWAY_URL": service.url, "LANEWAY_ADMIN_TOKEN": TOKEN}
    return subprocess.run([sys.executable, "-m", "laneway.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def cli_json(service: Service, *args: str) -> object:
    done = cli(service, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def submit(service: Service, *, wait: float = 30) -> dict:
    with service.client() as client:
        response = client.post("/v1/images", json={"prompt": "a lighthouse", "wait": wait})
    assert response.status_code in (200, 202), response.text
    return response.json()


def admin_get(service: Service, path: str) -> object:
    with service.client() as client:
        response = client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    return response.json()


def run_until(service: Service, phase: str, *, limit_s: float = 45) -> dict:
    """Submit jobs one after another until the rollout reaches ``phase``."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        rollout = admin_get(service, f"/v1/admin/rollouts/{MODEL}")
        assert isinstance(rollout, dict)
        if rollout["phase"] == phase:
            return rollout
        submit(service)
    raise AssertionError(f"rollout not {phase} after {limit_s}s: {rollout}\n{service.log()}")


def test_admin_endpoints_refuse_requests_without_the_token(service: Service) -> None:
    with service.client() as client:
        assert client.get("/v1/admin/audit").status_code == 401
        wrong = client.post("/v1/admin/models/tiny-sdxl/rollback", json={},
                            headers={"Authorization": "Bearer guess"})
        assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden"
    env = {k: v for k, v in service.env().items() if k != "LANEWAY_ADMIN_TOKEN"}
    done = subprocess.run([sys.executable, "-m", "laneway.cli", "audit"],
                          env={**env, "LANEWAY_URL": service.url},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "401" in done.stderr


def test_the_registry_refuses_tampered_and_pickled_folders(
        service: Service, tiny_registry: Registry, tmp_path: Path) -> None:
    source = tiny_registry.root / MODEL / "1"
    tampered = tmp_path / "a" / MODEL / "1"
    shutil.copytree(source, tampered)
    weight = next(tampered.rglob("*.safetensors"))
    weight.write_bytes(weight.read_bytes()[:-8] + b"\0" * 8)
    done = cli(service, "models", "register", MODEL, "--version", "9", "--path", str(tampered))
    assert done.returncode == 1 and "checksum mismatch" in done.stderr, done.stderr

    pickled = tmp_path / "b" / MODEL / "1"
    shutil.copytree(source, pickled)
    (pickled / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    done = cli(service, "models", "register", MODEL, "--version", "9", "--path", str(pickled))
    assert done.returncode == 1 and "pickle" in done.stderr, done.stderr
    assert not (service.registry / MODEL / "9").exists()

    unreachable = subprocess.run(
        [sys.executable, "-m", "laneway.cli", "models", "list"],
        env={**service.env(), "LANEWAY_URL": "http://127.0.0.1:9"}, capture_output=True,
        text=True, timeout=60)
    assert unreachable.returncode == 3


def test_a_canary_whose_weights_do_not_load_is_aborted(
        service: Service, tiny_registry: Registry) -> None:
    source = str(tiny_registry.root / MODEL / "1")
    manifest = cli_json(service, "models", "register", MODEL, "--version", "4", "--path", source)
    assert manifest == manifest | {"name": MODEL, "version": "4", "kind": "sdxl"}
    weight = next((service.registry / MODEL / "4").rglob("*.safetensors"))
    weight.write_bytes(weight.read_bytes()[:-16] + b"\0" * 16)   # tampered after registering

    rollout = cli_json(service, "rollout", "start", MODEL, "--version", "4", "--steps", "50,100",
                       "--interval", "1s", "--min-samples", "4", "--reason", "broken build")
    assert isinstance(rollout, dict) and rollout["weight"] == 50
    aborted = run_until(service, "aborted")
    assert "error rate" in aborted["message"]
    versions = {submit(service, wait=0)["stages"][0]["model_version"] for _ in range(10)}
    assert versions == {"2"}
    entries = cli_json(service, "audit", "--target", MODEL)
    assert isinstance(entries, list)
    last = entries[-1]
    assert (last["actor"], last["action"]) == ("controller", "rollout.aborted")
    assert "FAILED" in last["reason"]


def test_a_healthy_canary_is_promoted_step_by_step(service: Service,
                                                   tiny_registry: Registry) -> None:
    cli_json(service, "models", "register", MODEL, "--version", "3", "--path",
             str(tiny_registry.root / MODEL / "1"))
    cli_json(service, "rollout", "start", MODEL, "--version", "3", "--steps", "50,100",
             "--interval", "1s", "--min-samples", "3", "--max-p95-ratio", "20")
    run_until(service, "promoted")
    rows = cli_json(service, "models", "list")
    assert isinstance(rows, list)
    roles = {r["version"]: r["role"] for r in rows if r["model"] == MODEL}
    assert roles == {"1": "", "2": "", "3": "stable", "4": ""}
    actions = [e["action"] for e in admin_get(service, f"/v1/admin/audit?target={MODEL}")]
    assert actions[-3:] == ["rollout.start", "rollout.step", "rollout.promoted"]


def test_rollback_during_a_rollout_sends_every_new_job_to_stable_within_a_second(
        service: Service) -> None:
    stable = cli_json(service, "status")["models"][0]["version"]  # type: ignore[index]
    cli_json(service, "rollout", "start", MODEL, "--version", "1", "--steps", "50",
             "--interval", "1h")
    running = [submit(service, wait=0) for _ in range(8)]
    assert {j["stages"][0]["model_version"] for j in running} == {stable, "1"}

    result = cli_json(service, "rollback", MODEL, "--reason", "pages firing")
    returned = time.monotonic()
    assert isinstance(result, dict) and result["aborted_canary"] == "1"
    first_stable_s = None
    versions = []
    for _ in range(20):
        version = submit(service, wait=0)["stages"][0]["model_version"]
        versions.append(version)
        if version == stable and first_stable_s is None:
            first_stable_s = time.monotonic() - returned
    assert set(versions) == {stable} and first_stable_s is not None and first_stable_s < 1.0

    with service.client() as client:        # jobs already routed finish on their version
        for job in running:
            for _ in range(300):
                current = client.get(f"/v1/jobs/{job['id']}").json()
                if current["status"] in ("completed", "failed"):
                    break
                time.sleep(0.1)
            assert current["status"] == "completed", current
            assert current["stages"][0]["model_version"] == job["stages"][0]["model_version"]


def test_policy_apply_watch_and_rollback_switch_every_process(
        service: Service, tmp_path: Path) -> None:
    def in_force() -> str:
        with service.client() as client:
            return client.get("/v1/routes").json()["policy_version"]

    before = in_force()
    bad = tmp_path / "bad.yaml"
    bad.write_text(POLICY_YAML.replace("match: {}", "match: {intent: doodle}"))
    done = cli(service, "policy", "apply", str(bad))
    assert done.returncode == 1 and "routes[0].match.intent" in done.stderr, done.stderr
    assert in_force() == before

    good = tmp_path / "good.yaml"
    good.write_text(POLICY_YAML.replace("steps: 1", "steps: 2"))
    diff = cli(service, "policy", "diff", str(good))
    assert diff.returncode == 0, diff.stderr
    assert "-    steps: 1" in diff.stdout and "+    steps: 2" in diff.stdout, diff.stdout
    cli_json(service, "policy", "apply", str(good), "--reason", "two steps")
    assert in_force() == policy(2).version_id
    assert submit(service)["stages"][0]["steps"] == 2            # the worker switched too

    service.policy.write_text(POLICY_YAML.replace("steps: 1", "steps: 3"))   # git-sync edit
    deadline = time.monotonic() + 10
    while in_force() != policy(3).version_id and time.monotonic() < deadline:
        time.sleep(0.1)
    assert in_force() == policy(3).version_id
    assert submit(service)["stages"][0]["steps"] == 3

    cli_json(service, "policy", "rollback", "--reason", "three is too slow")
    assert in_force() == policy(2).version_id
    job = submit(service)
    assert job["stages"][0]["steps"] == 2 and job["policy_version"] == policy(2).version_id
    history = cli_json(service, "policy", "history")
    assert isinstance(history, list)
    assert [h["reason"] for h in history][-3:] == [
        "two steps", "policy.yaml changed (file sha256 "
        + __import__("hashlib").sha256(service.policy.read_bytes()).hexdigest()[:12] + ")",
        "three is too slow"]
    assert history[-1]["current"] and history[-1]["actor"] == "admin"


def test_status_and_jobs_show_json_parse(service: Service) -> None:
    job = submit(service)
    shown = cli_json(service, "jobs", "show", job["id"])
    assert isinstance(shown, dict) and shown["id"] == job["id"]
    status = cli_json(service, "status")
    assert isinstance(status, dict) and status["policy_version"].startswith("sha256:")
    human = cli(service, "rollout", "status")
    assert human.returncode == 0 and "MODEL" in human.stdout and MODEL in human.stdout
    with httpx.Client() as client:
        assert client.get(f"{service.url}/healthz").status_code == 200
