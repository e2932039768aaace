"""``laneway serve`` on a fresh machine: tiny models built, clean stop, crash recovery."""

from __future__ import annotations

import json
import signal
import time
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image

from laneway.devices import DRIVER_NODES
from tests.conftest import REPO
from tests.service import Service, descendants, pid_alive


def _draft_size(service: Service) -> tuple[int, int]:
    with service.client() as client:
        job = client.post("/v1/images", json={"prompt": "a red kite", "intent": "draft",
                                              "width": 56, "height": 64, "wait": 30}).json()
        assert job["status"] == "completed", job
        png = client.get(job["images"][0]["url"]).content
    return Image.open(BytesIO(png)).size


def _wait_gone(pids: list[int], timeout_s: float = 15) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if pid_alive(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return alive


def test_fresh_start_crash_and_clean_stop(tmp_path: Path) -> None:
    home, registry = tmp_path / "home", tmp_path / "registry"
    first = Service(home=home, registry=registry, policy=REPO / "policies" / "tiny.yaml")
    first.start()  # an empty registry: the tiny models are built on the way up
    assert (registry / "tiny-sdxl-turbo").is_dir()
    if not any(node.exists() for node in DRIVER_NODES):  # --devices auto without a GPU
        assert "local workers on cpu\n" in first.log()
    assert _draft_size(first) == (56, 64)

    # A crash of the serve process: its worker goes with it, the bundled server is orphaned.
    assert first.process is not None
    tree = descendants(first.process.pid)
    state = json.loads((home / "valkey" / "server.json").read_text())
    first.stop(sig=signal.SIGKILL)
    assert pid_alive(state["pid"]), "the bundled server outlives a crashed serve"
    assert _wait_gone([p for p in tree if p != state["pid"]]) == []

    # The next start finds the orphan through its state file and reuses it.
    second = Service(home=home, registry=registry, policy=REPO / "policies" / "tiny.yaml",
                     extra_args=["--devices", "cpu"])
    second.start()
    assert "bundled server reused" in second.log()
    assert "local workers on cpu\n" in second.log()
    assert [w["device"] for w in second.live_workers()] == ["cpu"]
    assert _draft_size(second) == (56, 64)

    assert second.process is not None
    tree = descendants(second.process.pid)
    assert state["pid"] in tree or pid_alive(state["pid"])
    assert second.stop(sig=signal.SIGTERM) == 0
    assert _wait_gone(tree + [state["pid"]]) == []
    assert not (home / "valkey" / "server.json").exists()


@pytest.mark.parametrize("bogus", [{"pid": 999999, "port": 1}, "not json"])
def test_a_stale_state_file_does_not_block_the_start(tmp_path: Path, bogus: object) -> None:
    from laneway.embedded_redis import EmbeddedRedis

    data = tmp_path / "valkey"
    data.mkdir()
    (data / "server.json").write_text(bogus if isinstance(bogus, str) else json.dumps(bogus))
    server = EmbeddedRedis(data, die_with_parent=True)
    url = server.start()
    try:
        assert not server.reused and url.startswith("redis://127.0.0.1:")
    finally:
        server.stop()
    assert server.pid is None
