"""Keeps ``laneway serve``'s children alive: the workers, the verifier, the controller and
the bundled server.

A thread looks at them every 0.2 s. A child that died is started again after a backoff
(0.5 s, doubling with each death in the last ``GIVE_UP_WINDOW_S``); one that died
``GIVE_UP_AFTER`` times within that window is left down, logged as an error and
reported by :meth:`problems`, which ``/readyz`` shows. The bundled server is started
again on its port and data directory, so every client keeps its URL and the append-only
file replays the jobs::

    supervisor = Supervisor(settings, embedded)
    supervisor.start([Command(["worker", "--device", "cpu"]), Command(["verifier"])])
    ...
    supervisor.stop()   # children drain (SIGTERM), then the bundled server stops

Children are started and stopped by the supervisor's thread: Linux ties a child's
parent-death signal (``die_with_parent``) to the thread that started it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from controlplane.settings import Settings, child_environ
from laneway.child_process import die_with_parent, stop_process
from laneway.embedded_redis import EmbeddedRedis, EmbeddedServerError

log = logging.getLogger("laneway.serve")

CHECK_S = 0.2
BACKOFF_FIRST_S = 0.5
GIVE_UP_AFTER = 5
GIVE_UP_WINDOW_S = 120.0
DRAIN_S = 30.0


@dataclass
class _Watched:
    """One supervised thing: ``start()`` launches it, ``alive()`` says whether it runs."""

    name: str
    start: Callable[[], None]
    alive: Callable[[], bool]
    deaths: deque[float] = field(default_factory=deque)
    restart_at: float | None = None
    given_up: bool = False

    def died(self, now: float) -> None:
        """Count a death and plan the restart (or give up)."""
        self.deaths.append(now)
        while self.deaths and now - self.deaths[0] > GIVE_UP_WINDOW_S:
            self.deaths.popleft()
        if len(self.deaths) >= GIVE_UP_AFTER:
            self.given_up, self.restart_at = True, None
            log.error("%s died %d times in %.0f s; not starting it again", self.name,
                      len(self.deaths), GIVE_UP_WINDOW_S)
            return
        delay = BACKOFF_FIRST_S * 2 ** (len(self.deaths) - 1)
        self.restart_at = now + delay
        log.warning("%s died; starting it again in %.1f s", self.name, delay)


@dataclass(frozen=True)
class Command:
    """``laneway ARGS``, with ``environ`` on top of serve's environment (e.g. the
    ``CUDA_VISIBLE_DEVICES`` of a MIG slice)."""

    args: list[str]
    environ: Mapping[str, str] = field(default_factory=dict)


class _Child:
    """A command in a child process that loads serve's settings."""

    def __init__(self, settings: Settings, command: Command) -> None:
        self.settings, self.command = settings, command
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        shown = [f"{k}={v}" for k, v in self.command.environ.items()]
        return " ".join([*shown, "laneway", *self.command.args])

    def environ(self) -> dict[str, str]:
        """serve's environment with its settings, and the command's variables over both."""
        return child_environ(self.settings, os.environ) | dict(self.command.environ)

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "laneway.cli", *self.command.args], env=self.environ(),
            preexec_fn=die_with_parent)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Supervisor:
    def __init__(self, settings: Settings, embedded: EmbeddedRedis | None, *,
                 drain_s: float = DRAIN_S, clock: Callable[[], float] = time.monotonic,
                 problems_file: Path | None = None) -> None:
        """``problems_file``: where to write :meth:`problems` as JSON when they change, for
        API processes that do not share this one's memory (``--api-workers``)."""
        self.settings = settings
        self.embedded = embedded
        self.problems_file = problems_file
        self._written: list[str] | None = None
        self.drain_s = drain_s
        self._clock = clock
        self._children: list[_Child] = []
        self._watched: list[_Watched] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        if embedded is not None:
            self._watched.append(_Watched("the bundled server", self._restart_embedded,
                                          lambda: embedded.poll() is None))

    def start(self, commands: list[Command]) -> None:
        """Start each of ``commands`` and watch them (and the bundled server) from a
        thread."""
        for command in commands:
            child = _Child(self.settings, command)
            self._children.append(child)
            self._watched.append(_Watched(child.name, child.start, child.alive))
        self._thread = threading.Thread(target=self._run, name="laneway-supervisor",
                                        daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error

    def problems(self) -> list[str]:
        """What is down for good (``/readyz`` reports it)."""
        return [f"{w.name}: died {len(w.deaths)} times in {GIVE_UP_WINDOW_S:.0f} s; "
                "not started again (see the serve log)"
                for w in self._watched if w.given_up]

    def stop(self) -> None:
        """Stop the children (SIGTERM; they drain for up to ``drain_s``), then the bundled
        server."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        else:
            self._shutdown()

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            for child in self._children:
                child.start()
        except BaseException as exc:  # noqa: BLE001 - handed to start()'s caller
            self._start_error = exc
        self._started.set()
        try:
            while self._start_error is None and not self._stop.wait(CHECK_S):
                self._check()
                self._write_problems()
        finally:
            self._shutdown()

    def _check(self) -> None:
        now = self._clock()
        for watched in self._watched:
            if watched.given_up:
                continue
            if watched.restart_at is None:
                if not watched.alive():
                    watched.died(now)
                continue
            if now < watched.restart_at:
                continue
            watched.restart_at = None
            try:
                watched.start()
                log.info("%s started again", watched.name)
            except (OSError, EmbeddedServerError) as exc:
                log.error("%s did not start: %s", watched.name, exc)
                watched.died(self._clock())

    def _write_problems(self) -> None:
        problems = self.problems()
        if self.problems_file is None or problems == self._written:
            return
        tmp = self.problems_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(problems))
        tmp.replace(self.problems_file)  # readers never see half a file
        self._written = problems

    def _restart_embedded(self) -> None:
        assert self.embedded is not None
        self.embedded.restart()

    def _shutdown(self) -> None:
        running = [c.process for c in self._children if c.process is not None]
        for process in running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in running:  # they drain side by side
            stop_process(process, timeout_s=self.drain_s)
        if self.embedded is not None:
            self.embedded.stop()
