"""``laneway serve`` keeps what it started running: the bundled server and the workers come
back by themselves after a ``kill -9``, and no accepted job is lost (sim engines: this is
about the processes, not the models)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import POLICIES
from tests.service import Service, descendants, pid_alive

#: issue 12: the bundled server killed with -9 is back within this long by itself
VALKEY_BACK_S = 5.0
ADMIN_TOKEN = "only-the-api-checks-this"


def eventually(check: Callable[[], Any], *, timeout_s: float, what: str) -> Any:
    """``check()``'s first truthy value (errors count as not yet), polled until the
    deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = check()
            if value:
                return value
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.05)


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def sim_worker(service: Service) -> int | None:
    """The pid of serve's worker for the simulated engines."""
    assert service.process is not None
    for pid in descendants(service.process.pid):
        args = cmdline(pid)
        if "worker" in args and "sim" in args and pid_alive(pid):
            return pid
    return None


def full_log(service: Service) -> str:
    assert service.log_path is not None
    return service.log_path.read_text(errors="replace")


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    svc = Service(home=tmp_path / "home", registry=tmp_path / "registry",
                  policy=POLICIES / "sim_serve.yaml",
                  extra_env={"LANEWAY_ADMIN_TOKEN": ADMIN_TOKEN})
    svc.start()
    yield svc
    svc.stop()


def environ(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_a_sim_only_policy_is_served_by_children_without_the_admin_token(
        service: Service) -> None:
    with service.client() as client:
        job = client.post("/v1/images", json={"prompt": "a kite", "wait": 30}).json()
        assert job["status"] == "completed", job
        status = client.get("/v1/status").json()
    assert "SIMULATED" in full_log(service)
    assert any("sim-draft" in w["slots"] for w in status["workers"]), status["workers"]
    assert service.process is not None
    assert ADMIN_TOKEN in environ(service.process.pid)  # the API has it
    children = [p for p in descendants(service.process.pid) if "laneway.cli" in cmdline(p)]
    assert len(children) >= 3  # workers, verifier, controller
    assert not [p for p in children if ADMIN_TOKEN in environ(p)]


def test_the_bundled_server_killed_comes_back_with_every_job(service: Service) -> None:
    state_path = service.home / "valkey" / "server.json"
    first = json.loads(state_path.read_text())
    with service.client() as client:
        accepted = [client.post("/v1/images", json={"prompt": f"kite {i}"}).json()["id"]
                    for i in range(3)]
        os.kill(first["pid"], signal.SIGKILL)

        def back() -> bool:
            now = json.loads(state_path.read_text())
            return (now["pid"] != first["pid"] and pid_alive(now["pid"])
                    and client.get("/readyz").status_code == 200)

        eventually(back, timeout_s=VALKEY_BACK_S, what="the bundled server back")
        assert json.loads(state_path.read_text())["port"] == first["port"]
        # every accepted job is still there, and all of them end
        for job_id in accepted:
            eventually(lambda j=job_id: client.get(f"/v1/jobs/{j}").json()["status"]
                       == "completed", timeout_s=60, what=f"job {job_id} completed")
        # waiters follow the channel again: a waiting request gets its finished job
        job = client.post("/v1/images", json={"prompt": "after", "wait": 30}).json()
        assert job["status"] == "completed", job


def test_a_killed_worker_is_restarted_and_its_job_completes(service: Service) -> None:
    with service.client() as client:
        job_id = client.post("/v1/images", json={"prompt": "a kite"}).json()["id"]
        eventually(lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "running",
                   timeout_s=30, what="the job running")
        dead = sim_worker(service)
        assert dead is not None
        os.kill(dead, signal.SIGKILL)
        restarted = eventually(lambda: (pid := sim_worker(service)) != dead and pid,
                               timeout_s=30, what="the worker started again")
        assert restarted != dead
        # the new worker claims the entry the dead one left, after claim_idle_ms (2 s)
        eventually(lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "completed",
                   timeout_s=60, what="the dead worker's job completed")
        assert "died; starting it again" in full_log(service)
        assert client.get("/readyz").json()["problems"] == []
