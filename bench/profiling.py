"""py-spy flame graphs of a running Laneway (the overhead bench's ``--profile``).

Samples the API (``laneway serve`` itself, which serves the API in-process with one API
process) and the sim worker while a workload runs, from outside the processes. Without
py-spy nothing is recorded and the bench's per-phase timings (``queued_ms``, ``run_ms``
and the rest) are the whole account::

    profiler = PySpy.find(Path("bench/results/profiles"))
    profiler.attach(service)   # ... run the workload ...
    profiler.detach()
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.service import Service, descendants

RATE_HZ = 200


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def sim_worker_pid(service: Service) -> int | None:
    """The serve child that runs the simulated engines (``worker ... --device sim``)."""
    assert service.process is not None
    for pid in descendants(service.process.pid):
        args = _cmdline(pid)
        if "worker" in args and "--device" in args and "sim" in args:
            return pid
    return None


@dataclass
class PySpy:
    binary: Path | None
    out_dir: Path
    recorded: list[Path] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _running: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)

    @classmethod
    def find(cls, out_dir: Path) -> PySpy:
        """py-spy from PATH or beside this Python (None when neither has it)."""
        found = shutil.which("py-spy") or shutil.which("py-spy", path=str(
            Path(sys.executable).parent))
        return cls(Path(found) if found else None, out_dir)

    def attach(self, service: Service) -> None:
        if self.binary is None:
            return
        assert service.process is not None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        targets = {"api": service.process.pid, "sim-worker": sim_worker_pid(service)}
        for role, pid in targets.items():
            if pid is None:
                self.failures.append(f"{role}: process not found")
                continue
            svg = self.out_dir / f"{role}-{len(self.recorded) + len(self._running)}.svg"
            self._running.append((subprocess.Popen(
                [str(self.binary), "record", "--pid", str(pid), "--rate", str(RATE_HZ),
                 "--output", str(svg), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), svg))

    def detach(self) -> None:
        """Stop the recordings; py-spy writes each flame graph when interrupted."""
        for process, svg in self._running:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
            try:
                _, err = process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                _, err = process.communicate()
            if svg.exists():
                self.recorded.append(svg)
            else:
                self.failures.append(f"{svg.name}: {err.decode(errors='replace')[-300:]}")
        self._running.clear()

    def report(self) -> dict[str, object] | str:
        if self.binary is None:
            return "py-spy not installed; phases only (queued_ms, run_ms, rest)"
        return {"flame_graphs": [str(p) for p in self.recorded], "failures": self.failures}
