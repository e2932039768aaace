"""``laneway serve``: the embedded default in one process tree.

Starts (or adopts) the bundled server unless a Redis URL is given, applies the policy,
makes the tiny models when a tiny policy needs them, starts the workers, the verifier and
the controller as child processes under a supervisor that restarts them (and the bundled
server) when they die, and runs the API in this process. Ctrl-C / SIGTERM stops the API,
then the children (workers drain), then the bundled server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import uvicorn

from controlplane.errors import PolicyError
from controlplane.policy import EngineKind, Policy, RemoteRules, check_models
from controlplane.policy_changes import put_in_force
from controlplane.policy_loader import load_policy
from controlplane.registry import Registry
from controlplane.settings import Settings
from laneway.admin_token import ensure_token, token_path
from laneway.api_process import problems_path
from laneway.devices import CPU, WorkerDevice
from laneway.embedded_redis import EmbeddedRedis
from laneway.supervisor import Command, Supervisor

log = logging.getLogger("laneway.serve")


@dataclass
class ServeOptions:
    policy_path: Path
    workers: bool = True
    #: one worker each for the policy's device engines (``laneway/devices.py``)
    devices: list[WorkerDevice] = field(default_factory=lambda: [WorkerDevice(CPU)])
    watch: bool = False
    #: API processes on the port (1: the API runs in this process)
    api_workers: int = 1


def ensure_models(policy: Policy, registry: Registry) -> None:
    """Build the tiny models when the policy needs them and they are missing."""
    missing = check_models(policy, set(registry.models()))
    if not missing:
        return
    if all(str(e.value).startswith("tiny-") for e in missing):
        log.info("building tiny random-weight models in %s", registry.root)
        # in a child process: building them needs torch, which the API process never loads
        subprocess.run([sys.executable, "-m", "laneway.cli", "models", "make-tiny",
                        "--registry", str(registry.root)], check=True, stdout=subprocess.DEVNULL)
        missing = check_models(policy, set(registry.models()))
    if missing:
        raise PolicyError("the policy names models that are not in the registry "
                          f"{registry.root}", details=missing)


async def publish_policy(redis_url: str, policy: Policy, registry: Registry, *,
                         remote: RemoteRules) -> None:
    """Put the policy in force and give every model it uses a stable version."""
    redis = aioredis.Redis.from_url(redis_url)
    try:
        await put_in_force(redis, policy, registry, remote=remote, actor="serve",
                           reason="laneway serve start")
    finally:
        await redis.aclose()


def child_commands(policy: Policy, devices: list[WorkerDevice]) -> list[Command]:
    """The ``laneway`` sub-commands serve runs beside the API, one process each: a worker
    per local device, one with no device for remote engines (``http.openai_images``)
    and one for simulated engines (``sim``), the verifier and the controller."""
    commands = [Command(["worker", "--device", d.device], d.environ) for d in devices]
    commands += [Command(["verifier"]), Command(["controller"])]
    remote = [name for name, spec in policy.engines.items()
              if spec.kind is EngineKind.openai_images]
    if remote:
        commands.append(Command(["worker", "--engines", ",".join(remote), "--device", "none"]))
    simulated = [name for name, spec in policy.engines.items() if spec.kind is EngineKind.sim]
    if simulated:
        log.warning("engines %s are SIMULATED (kind: sim): they sleep instead of rendering "
                    "and return blank images; sim is for benchmarks and tests, never for "
                    "users", ", ".join(simulated))
        commands.append(Command(["worker", "--engines", ",".join(simulated), "--device", "sim"]))
    return commands


def run_api(settings: Settings, api_workers: int, supervisor: Supervisor) -> None:
    """The API: in this process, or ``api_workers`` processes on one port that build it
    from the environment (``laneway/api_process.py``)."""
    uvicorn_options: dict[str, Any] = {"host": settings.host, "port": settings.port,
                                       "log_level": "warning", "access_log": False}
    if api_workers == 1:
        from router.app import create_app

        # tenants' keys: the variables the policy names, read from this environment
        app = create_app(settings, secrets=os.environ, host_problems=supervisor.problems)
        uvicorn.run(app, **uvicorn_options)
        return
    problems_path(settings).unlink(missing_ok=True)
    os.environ.update(settings.as_environ())  # the bundled server's URL, the admin token
    uvicorn.run("laneway.api_process:app", factory=True, workers=api_workers,
                **uvicorn_options)


class _StopRequested(Exception):
    """Raised by our SIGTERM handler, which uvicorn calls again after its own shutdown."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _StopRequested(signal.Signals(signum).name)


def serve(settings: Settings, options: ServeOptions) -> None:
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        _serve(settings, options)
    except (_StopRequested, KeyboardInterrupt):
        log.info("stopped")


def _serve(settings: Settings, options: ServeOptions) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s serve %(levelname)s %(message)s")
    remote = RemoteRules.from_settings(settings)
    policy = load_policy(options.policy_path, remote=remote)
    registry = Registry(settings.registry)
    ensure_models(policy, registry)
    embedded = None
    if not settings.redis_url:
        embedded = EmbeddedRedis(settings.embedded_dir)
        url = embedded.start()
        log.info("bundled server %s at %s", "reused" if embedded.reused else "started", url)
        settings = settings.model_copy(update={"redis_url": url})
        if not settings.admin_token:
            token, created = ensure_token(settings.home)
            if created:
                log.info("admin token created in %s (mode 0600): the laneway CLI on this "
                         "machine uses it", token_path(settings.home))
            settings = settings.model_copy(update={"admin_token": token})
    assert settings.redis_url
    # children never see the admin token: only the API checks it
    supervisor = Supervisor(settings.model_copy(update={"admin_token": None}), embedded,
                            problems_file=problems_path(settings)
                            if options.api_workers > 1 else None)
    try:
        asyncio.run(publish_policy(settings.redis_url, policy, registry, remote=remote))
        commands = child_commands(policy, options.devices) if options.workers else []
        if options.workers:
            log.info("local workers on %s", ", ".join(map(str, options.devices)))
        if options.watch:
            commands.append(Command(["policy", "watch", str(options.policy_path),
                                     "--registry", str(settings.registry)]))
        supervisor.start(commands)
        log.info("API on http://%s:%d (policy %s, %d process%s)", settings.host,
                 settings.port, policy.version_id[:19], options.api_workers,
                 "es" if options.api_workers > 1 else "")
        run_api(settings, options.api_workers, supervisor)
    finally:
        supervisor.stop()  # children drain, then the bundled server stops
