"""``laneway serve --api-workers 2``: two API processes on one port, every one serving the
same state (jobs accepted by one are read, waited for and cancelled through the other)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import POLICIES
from tests.service import Service, descendants

pytestmark = pytest.mark.slow


def api_processes(service: Service) -> list[int]:
    assert service.process is not None
    found = []
    for pid in descendants(service.process.pid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        except OSError:
            continue
        if "multiprocessing" in args and "spawn_main" in args:
            found.append(pid)
    return found


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    svc = Service(home=tmp_path / "home", registry=tmp_path / "registry",
                  policy=POLICIES / "sim_serve.yaml", extra_args=["--api-workers", "2"])
    svc.start()
    yield svc
    svc.stop()


def test_two_api_processes_serve_the_same_state(service: Service) -> None:
    assert len(api_processes(service)) == 2
    jobs = []
    for i in range(12):  # fresh connections: the kernel spreads them over both processes
        with httpx.Client(base_url=service.url, timeout=60) as client:
            job = client.post("/v1/images", json={"prompt": f"kite {i}", "wait": 30}).json()
        assert job["status"] == "completed", job
        jobs.append(job["id"])
    for job_id in jobs:
        with httpx.Client(base_url=service.url, timeout=10) as client:
            assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "completed"
            assert client.get("/readyz").status_code == 200
