"""Issue 11, acceptance 1: a fleet on one machine — one Valkey, one SeaweedFS, an API
(``serve --no-workers``), two workers on different nodes with no shared local disk (their
own ``LANEWAY_HOME`` and registry copy), a verifier, images in ``s3://``. A worker killed
with -9 in the middle of a stage loses nothing: the other finishes the work, and the dead
worker's consumer leaves the lanes' groups."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from controlplane import keys
from controlplane.registry import Registry
from laneway.embedded_redis import EmbeddedRedis
from tests.conftest import POLICIES
from tests.s3 import SeaweedS3
from tests.service import Service, WorkerProcess

pytestmark = pytest.mark.slow

TIMEOUT_S = 90.0


def eventually(check: Callable[[], Any], what: str, timeout_s: float = TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return value


@dataclass
class Fleet:
    api: Service
    redis: redis.Redis
    workers: dict[str, WorkerProcess]
    verifier: subprocess.Popen[bytes]

    def consumers(self) -> set[str]:
        names: set[str] = set()
        for stream in (keys.engine_stream(e, "standard") for e in ("turbo", "sim-final")):
            for consumer in self.redis.xinfo_consumers(stream, keys.ENGINE_GROUP):
                names.add(consumer["name"].decode() if isinstance(consumer["name"], bytes)
                          else consumer["name"])
        return names


@pytest.fixture
def fleet(tmp_path: Path, tiny_registry: Registry, seaweed: SeaweedS3) -> Iterator[Fleet]:
    valkey = EmbeddedRedis(tmp_path / "valkey", die_with_parent=True)
    url = valkey.start()
    shared = {"LANEWAY_REDIS_URL": url, **seaweed.environ,
              "LANEWAY_ARTIFACTS": f"s3://{seaweed.bucket}/fleet-{secrets.token_hex(4)}"}
    api = Service(home=tmp_path / "api", registry=tiny_registry.root,
                  policy=POLICIES / "fleet.yaml", extra_args=["--no-workers"],
                  extra_env=shared, wait_for_worker=False)
    workers: dict[str, WorkerProcess] = {}
    verifier = None
    try:
        api.start()
        for node in ("node-a", "node-b"):
            home = tmp_path / node
            registry = home / "registry"  # a copy of its own: nothing local is shared
            shutil.copytree(tiny_registry.root, registry)
            workers[node] = WorkerProcess(api, "turbo,sim-final,sim-up", extra_env={
                **shared, "LANEWAY_HOME": str(home), "LANEWAY_NODE_NAME": node,
                "LANEWAY_REGISTRY": str(registry)}).start()
        env = {**api.env(), **shared, "LANEWAY_HOME": str(tmp_path / "verifier")}
        verifier = subprocess.Popen([sys.executable, "-m", "laneway.cli", "verifier"],
                                    env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(url)
        eventually(lambda: len(client.smembers(keys.workers())) == 2, "two workers beating")
        yield Fleet(api, client, workers, verifier)
        client.close()
    finally:
        for worker in workers.values():
            if worker.process is not None and worker.process.poll() is None:
                worker.stop()
        if verifier is not None:
            verifier.send_signal(signal.SIGTERM)
            verifier.wait(timeout=60)
        if api.process is not None:
            api.stop()
        valkey.stop()


def test_a_fleet_serves_from_s3_and_survives_a_killed_worker(fleet: Fleet) -> None:
    with fleet.api.client(timeout_s=120) as client:
        draft = client.post("/v1/images", json={"prompt": "a kite", "intent": "draft",
                                                "wait": 60}).json()
        assert draft["status"] == "completed", draft
        png = client.get(draft["images"][0]["url"])
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")

        final = client.post("/v1/images", json={"prompt": "a kite", "intent": "final"}).json()
        running = eventually(lambda: (job := client.get(f"/v1/jobs/{final['id']}").json())
                             ["stages"][0]["status"] == "running" and job, "final running")
        victim_name = running["stages"][0]["worker"]
        victim = fleet.workers[victim_name.split("/", 1)[0]]
        os.kill(victim.pid, signal.SIGKILL)
        victim.process.wait()  # type: ignore[union-attr]

        done = eventually(lambda: (job := client.get(f"/v1/jobs/{final['id']}").json())
                          ["status"] in ("completed", "failed") and job, "final ended")
        assert done["status"] == "completed", done
        assert done["stages"][0]["attempts"] == 2
        assert done["stages"][0]["worker"].split("/", 1)[0] != victim_name.split("/", 1)[0]
        verified = eventually(lambda: (job := client.get(f"/v1/jobs/{final['id']}").json())
                              ["verification"]["status"] != "pending" and job, "verdict")
        assert verified["verification"]["quality"] is not None  # read from S3
        image = client.get(done["images"][0]["url"])
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")

    # the dead worker's consumer leaves the groups once its entries are claimed
    eventually(lambda: victim_name not in fleet.consumers(), "dead consumer removed")
