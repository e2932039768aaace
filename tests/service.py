"""Start and stop real ``laneway serve`` process trees for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

READY_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class Service:
    """One ``laneway serve`` with its own home, registry, artifacts and port."""

    home: Path
    registry: Path
    policy: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    ready_path: str = "/readyz"
    #: ready also means at least one live worker (``/readyz`` does not wait for workers)
    wait_for_worker: bool = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("LANEWAY_", "OTEL_"))}
        env.update({
            "LANEWAY_HOME": str(self.home), "LANEWAY_REGISTRY": str(self.registry),
            "LANEWAY_ARTIFACTS": str(self.home / "artifacts"), "PYTHONUNBUFFERED": "1",
        })
        env.update(self.extra_env)
        return env

    def start(self) -> Service:
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_path = self.home / f"serve-{self.port}.log"
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "laneway.cli", "serve", "--policy", str(self.policy),
             "--port", str(self.port), *self.extra_args],
            env=self.env(), stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            self.wait_ready()
        except BaseException:  # a service that never became ready is stopped, not leaked
            self.stop(timeout_s=30)
            raise
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"laneway serve exited {self.process.returncode}:\n"
                                   f"{self.log()}")
            try:
                if (httpx.get(f"{self.url}{self.ready_path}", timeout=1).status_code == 200
                        and (not self.wait_for_worker or self.live_workers())):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"laneway serve not ready in {READY_TIMEOUT_S}s:\n{self.log()}")

    def live_workers(self) -> list[dict[str, object]]:
        workers: list[dict[str, object]] = httpx.get(f"{self.url}/v1/status",
                                                     timeout=1).json()["workers"]
        return workers

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path else ""

    def client(self, timeout_s: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout_s)

    def stop(self, *, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        """Signal the serve process, wait for it, and return its exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for pid in descendants(self.process.pid):
                os.kill(pid, signal.SIGKILL)
            self.process.kill()
            raise


def bundled_redis_url(home: Path) -> str:
    """The URL of the bundled server a Service started under ``home``."""
    import json

    state = json.loads((home / "valkey" / "server.json").read_text())
    return f"redis://127.0.0.1:{state['port']}/0"


@dataclass
class WorkerProcess:
    """A ``laneway worker`` subprocess against a service's Redis."""

    service: Service
    engines: str
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        env = self.service.env()
        url = self.extra_env.get("LANEWAY_REDIS_URL") or bundled_redis_url(self.service.home)
        env.update({"LANEWAY_REDIS_URL": url, **self.extra_env})
        log = (self.service.home / "workers.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "laneway.cli", "worker", "--engines", self.engines],
            env=env, stdout=log, stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout_s)
