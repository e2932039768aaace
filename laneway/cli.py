"""The ``laneway`` command line.

Exit codes (CONTRACT.md): 0 ok, 1 refused or invalid, 2 usage (an unknown or invalid
``LANEWAY_*`` variable included), 3 server unreachable. The settings are loaded once, before
any command runs (``laneway/cli_settings.py``); options given on the command line override
them.
"""

from __future__ import annotations

import json
import os
import sys
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from controlplane.errors import LanewayError, PolicyError
from controlplane.policy_loader import load_policy
from laneway import cli_admin, deploy_render
from laneway.cli_settings import current_settings, load_at_start
from laneway.devices import AUTO, count_cuda_devices, parse_devices, plan_workers

if TYPE_CHECKING:
    from controlplane.probes import ProbeAddress

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
#: the policy ``laneway serve`` applies when no ``--policy`` is given
DEFAULT_POLICY = "tiny.yaml"

app = typer.Typer(help="Laneway: an intent-routing control plane for image generation.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
policy_app = typer.Typer(help="Validate and manage routing policies.", no_args_is_help=True)
models_app = typer.Typer(help="The model registry.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")
app.add_typer(models_app, name="models")
cli_admin.register(app, policy_app, models_app)

RedisUrl = Annotated[str | None, typer.Option(
    "--redis-url", help="Redis/Valkey URL (default LANEWAY_REDIS_URL); without one `serve` "
                        "starts the bundled server.")]
RegistryDir = Annotated[Path | None, typer.Option(
    "--registry", help="Model registry folder (default LANEWAY_REGISTRY, else ./registry).")]
ProbePort = Annotated[int | None, typer.Option(
    min=1, max=65535, help="Answer GET /livez (the process runs) and /readyz (Redis "
                           "answers, ready to take work) on this port (default: no probe).")]
ProbeHost = Annotated[str, typer.Option(
    help="Interface of --probe-port (0.0.0.0 for the kubelet in a pod).")]
DEFAULT_PROBE_HOST = "127.0.0.1"


def _probe(port: int | None, host: str) -> ProbeAddress | None:
    from controlplane.probes import ProbeAddress

    return ProbeAddress(host, port) if port is not None else None


@app.callback()
def _load_settings() -> None:
    load_at_start()


def _fail(message: str, code: int = EXIT_REFUSED) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(code)


@app.command()
def serve(
    policy: Annotated[Path | None, typer.Option(
        help="Policy YAML to apply at start (default: the packaged tiny policy, "
             "policies/tiny.yaml).")] = None,
    redis_url: RedisUrl = None,
    host: Annotated[str | None, typer.Option(
        help="Interface of the HTTP API (default LANEWAY_HOST, else 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(
        help="Port of the HTTP API (default LANEWAY_PORT, else 8000).")] = None,
    no_workers: Annotated[bool, typer.Option(
        "--no-workers", help="Run the API only; workers run elsewhere.")] = False,
    watch: Annotated[bool, typer.Option(
        help="Re-apply the policy file whenever it changes.")] = False,
    api_workers: Annotated[int, typer.Option(
        min=1, help="API processes on the port, sharing all state through Redis (default "
                    "1: on one machine the cores are the workers').")] = 1,
    devices: Annotated[str, typer.Option(
        help="Devices of the local workers, one worker each: auto (every visible CUDA "
             "device, else the CPU), cpu, or cuda:0,cuda:1,... (indices among the visible "
             "devices; CUDA_VISIBLE_DEVICES may list GPU or MIG UUIDs).")] = AUTO,
    registry: RegistryDir = None,
) -> None:
    """Run the service: bundled server (unless --redis-url), API and local workers."""
    from laneway.embedded_redis import EmbeddedServerError
    from laneway.serve import ServeOptions
    from laneway.serve import serve as run_serve

    settings = current_settings(redis_url=redis_url, host=host, port=port, registry=registry)
    policy_path = policy or packaged_policy(DEFAULT_POLICY)
    try:
        choice = parse_devices(devices)
        local = plan_workers(choice, os.environ, count_cuda_devices) if not no_workers else []
    except ValueError as exc:
        raise _fail(f"laneway serve: --devices: {exc}", EXIT_USAGE) from None
    try:
        run_serve(settings, ServeOptions(policy_path=policy_path, workers=not no_workers,
                                         devices=local, watch=watch,
                                         api_workers=api_workers))
    except PolicyError as exc:
        _print_policy_errors(exc, str(policy_path))
        raise typer.Exit(EXIT_REFUSED) from None
    except (LanewayError, EmbeddedServerError) as exc:
        raise _fail(f"laneway serve: {exc}") from None


@app.command()
def worker(
    device: Annotated[str | None, typer.Option(
        help="Torch device: cpu, cuda:0, ... (default LANEWAY_DEVICE, else cpu).")] = None,
    engines: Annotated[str | None, typer.Option(
        help="Comma-separated engine names to serve (default: every local engine).")] = None,
    max_stages: Annotated[int | None, typer.Option(
        min=1, help="Stages at once on this device across its engines (default: the "
                    "policy's devices.max_concurrent_stages, else no device cap).")] = None,
    memory_gb: Annotated[float | None, typer.Option(
        min=0.1, help="Device memory for loaded engines (their memory_gb); the least "
                      "recently used idle engine is unloaded to make room (default: the "
                      "GPU's total memory on CUDA, unlimited on CPU).")] = None,
    redis_url: RedisUrl = None,
    registry: RegistryDir = None,
    probe_port: ProbePort = None,
    probe_host: ProbeHost = DEFAULT_PROBE_HOST,
) -> None:
    """Run a worker against a Redis/Valkey server; SIGTERM drains it."""
    from engines.worker_main import run_worker

    settings = current_settings(redis_url=redis_url, registry=registry, device=device)
    if not settings.redis_url:
        raise _fail("laneway worker needs --redis-url or LANEWAY_REDIS_URL", EXIT_USAGE)
    names = frozenset(n.strip() for n in engines.split(",") if n.strip()) if engines else None
    run_worker(settings, device=settings.device, engines=names, max_stages=max_stages,
               memory_gb=memory_gb, probe=_probe(probe_port, probe_host))


@app.command()
def verifier(redis_url: RedisUrl = None, probe_port: ProbePort = None,
             probe_host: ProbeHost = DEFAULT_PROBE_HOST) -> None:
    """Run a verifier (OCR and quality checks of completed jobs); SIGTERM stops it."""
    from verifier.verifier_main import run_verifier

    settings = current_settings(redis_url=redis_url)
    if not settings.redis_url:
        raise _fail("laneway verifier needs --redis-url or LANEWAY_REDIS_URL", EXIT_USAGE)
    run_verifier(settings, probe=_probe(probe_port, probe_host))


@app.command()
def verify(
    image: Annotated[Path, typer.Argument(help="Image file to check.")],
    text: Annotated[list[str] | None, typer.Option(
        "--text", help="Text the image must show (repeatable).")] = None,
    policy: Annotated[Path | None, typer.Option(
        help="Policy whose thresholds apply (default: the verifier's default thresholds).")
    ] = None,
    route: Annotated[str | None, typer.Option(
        help="Route of --policy whose verify block applies (default: the first route "
             "with one).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Run the verifier's checks on an image file; exit 0 passed, 1 failed, 2 unreadable."""
    from controlplane.policy import Verify
    from verifier.on_file import run
    from verifier.typography import set_ocr_threads

    set_ocr_threads(current_settings().ocr_threads)
    if policy is None:
        if route is not None:
            raise _fail(f"--route {route!r} needs --policy: the policy that names the route",
                        EXIT_USAGE)
        raise typer.Exit(run(image, texts=text or [], verify=Verify(), as_json=as_json))
    try:
        loaded = load_policy(policy)
    except PolicyError as exc:
        _print_policy_errors(exc, str(policy))
        raise typer.Exit(EXIT_USAGE) from None
    if route is not None:
        named = [r for r in loaded.routes if r.name == route]
        if not named:
            raise _fail(f"--route: no route {route!r} in {policy} "
                        f"(routes: {', '.join(r.name for r in loaded.routes)})", EXIT_USAGE)
        checks = named[0].verify or Verify()
    else:
        checks = next((r.verify for r in loaded.routes if r.verify is not None), Verify())
    raise typer.Exit(run(image, texts=text or [], verify=checks, as_json=as_json))


def packaged_policy(name: str) -> Path:
    """A policy shipped inside the package (``policies/NAME``), found from any directory."""
    return Path(str(resources.files("policies") / name))


def _print_policy_errors(exc: PolicyError, source: str) -> None:
    typer.echo(f"{source}: invalid policy", err=True)
    if not exc.details:
        typer.echo(f"  {exc.message}", err=True)
    for detail in exc.details:
        shown = f" (got {detail.value!r})" if detail.value is not None else ""
        typer.echo(f"  {detail.field}: {detail.message}{shown}", err=True)


@policy_app.command("validate")
def policy_validate(
    file: Annotated[Path, typer.Argument(help="Policy YAML file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Check a policy offline; print each error with its YAML path and line, exit 1.

    Remote engines are checked against this environment's LANEWAY_PROVIDER_KEY_PREFIXES
    and LANEWAY_REMOTE_HOSTS (set them as the servers have them)."""
    from controlplane.policy import RemoteRules

    try:
        policy = load_policy(file, remote=RemoteRules.from_settings(current_settings()))
    except PolicyError as exc:
        if as_json:
            typer.echo(json.dumps(exc.as_body()))
        else:
            _print_policy_errors(exc, str(file))
        raise typer.Exit(EXIT_REFUSED) from None
    if as_json:
        typer.echo(json.dumps({"valid": True, "version": policy.version_id}))
    else:
        typer.echo(f"{file}: valid, version {policy.version_id} "
                   f"({len(policy.routes)} routes, {len(policy.engines)} engines)")


@models_app.command("make-tiny")
def models_make_tiny(registry: RegistryDir = None) -> None:
    """Build tiny random-weight models (they draw noise) for offline runs and tests."""
    from controlplane.registry import Registry
    from engines.tiny_models import make_tiny

    root = current_settings(registry=registry).registry
    for manifest in make_tiny(Registry(root)):
        typer.echo(f"{manifest.name} {manifest.version} ({manifest.kind})")


deploy_app = typer.Typer(help="Kubernetes manifests for a fleet.", no_args_is_help=True)
app.add_typer(deploy_app, name="deploy")


def _redis_address(text: str) -> str:
    try:
        return deploy_render.parse_address(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@deploy_app.command("render")
def deploy_render_cmd(
    policy: Annotated[Path, typer.Option(help="Policy YAML whose engines get worker pools.")],
    out: Annotated[Path, typer.Option(
        help="Output folder: a kustomization over --base with the pools and the policy."
    )] = Path("deploy/rendered"),
    image: Annotated[str, typer.Option(help="Worker image.")] = deploy_render.DEFAULT_IMAGE,
    redis_address: Annotated[str, typer.Option(
        "--redis-address", callback=_redis_address,
        help="HOST:PORT of Redis as KEDA's operator reaches it.")
    ] = deploy_render.DEFAULT_REDIS_ADDRESS,
    max_replicas: Annotated[int, typer.Option(
        min=1, help="Most replicas of an autoscaled pool.")
    ] = deploy_render.DEFAULT_MAX_REPLICAS,
    base: Annotated[Path, typer.Option(
        help="The base manifests the output includes.")] = Path("deploy/k8s"),
) -> None:
    """Write a worker Deployment and a KEDA ScaledObject per device engine of a policy."""
    if not (base / "kustomization.yaml").is_file():
        raise _fail(f"--base: no kustomization.yaml in {base}", EXIT_USAGE)
    try:
        loaded = load_policy(policy)
        _pools, skipped = deploy_render.worker_pools(loaded)
        files = deploy_render.render(loaded, deploy_render.RenderOptions(
            image=image, redis_address=redis_address, max_replicas=max_replicas,
            drain_timeout_s=current_settings().drain_timeout_s))
    except PolicyError as exc:
        _print_policy_errors(exc, str(policy))
        raise typer.Exit(EXIT_REFUSED) from None
    if skipped:
        typer.echo(f"no pool for simulated engines (kind: sim): {', '.join(skipped)}",
                   err=True)
    for path in deploy_render.write(files, out_dir=out, base_dir=base,
                                    policy_text=policy.read_text(),
                                    policy_version=loaded.version_id):
        typer.echo(str(path))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
