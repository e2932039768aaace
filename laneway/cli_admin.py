"""On-call commands over the admin API: policy diff/apply/history/rollback, rollouts,
rollback, models register/list, audit, status, jobs show; plus the control loops serve runs
as children (``laneway controller``, ``laneway policy watch``).

Human tables by default, ``--json`` for scripts. Exit codes: 0 ok, 1 refused or invalid,
2 usage, 3 server unreachable.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from laneway.admin_client import AdminClient, AdminRefused, ServerUnreachable
from laneway.cli_settings import current_settings

EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3

rollout_app = typer.Typer(help="Canary rollouts of model versions.", no_args_is_help=True)
jobs_app = typer.Typer(help="Jobs.", no_args_is_help=True)

AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
Actor = Annotated[str | None, typer.Option(
    "--actor", help="Who is acting (recorded in the audit trail; default: the token's name).")]
Reason = Annotated[str, typer.Option("--reason", help="Why (recorded in the audit trail).")]


@contextmanager
def admin(actor: str | None = None) -> Iterator[AdminClient]:
    """An admin client; server errors become exit codes 1 (refused) and 3 (unreachable)."""
    try:
        with AdminClient.from_settings(current_settings(), actor=actor) as client:
            yield client
    except ServerUnreachable as exc:
        typer.echo(f"laneway: {exc} (set LANEWAY_URL)", err=True)
        raise typer.Exit(EXIT_UNREACHABLE) from None
    except AdminRefused as exc:
        for line in exc.lines:
            typer.echo(line, err=True)
        raise typer.Exit(EXIT_REFUSED) from None


def emit(data: Any, as_json: bool, human: Callable[[Any], None]) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    else:
        human(data)


def table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Left-aligned columns sized to their contents."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    typer.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def parse_duration_s(text: str) -> float:
    """``60s``, ``1.5s``, ``500ms``, ``2m`` or a bare number of seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text)
    if not match:
        raise typer.BadParameter(f"expected e.g. 60s, 500ms, 2m; got {text!r}")
    factor = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[match.group(2) or "s"]
    return float(match.group(1)) * factor


def parse_steps(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected weights like 10,25,50,100; got {text!r}") from None


# -- policy -------------------------------------------------------------------------------

def policy_diff(
    file: Annotated[Path, typer.Argument(help="Policy YAML file.")],
    as_json: AsJson = False,
) -> None:
    """Show what applying FILE would change against the policy in force (canonical YAML)."""
    from controlplane.errors import PolicyError
    from controlplane.policy_loader import load_policy
    from router.admin_api import canonical_yaml

    try:
        policy = load_policy(file)
    except PolicyError as exc:
        typer.echo(f"{file}: invalid policy", err=True)
        for detail in exc.details or []:
            typer.echo(f"  {detail.field}: {detail.message}", err=True)
        if not exc.details:
            typer.echo(f"  {exc.message}", err=True)
        raise typer.Exit(EXIT_REFUSED) from None
    with admin() as client:
        current = client.call("GET", "/v1/admin/policy")
    diff = list(difflib.unified_diff(
        current["yaml"].splitlines(keepends=True), canonical_yaml(policy).splitlines(True),
        fromfile=f"in force {current['version'][:19]}",
        tofile=f"{file} {policy.version_id[:19]}"))

    def human(_: Any) -> None:
        if not diff:
            typer.echo(f"no change: {file} is the policy in force ({current['version'][:19]})")
            return
        typer.echo("".join(diff), nl=False)

    emit({"in_force": current["version"], "file": policy.version_id, "changed": bool(diff),
          "diff": "".join(diff)}, as_json, human)


def policy_apply(
    file: Annotated[Path, typer.Argument(help="Policy YAML file.")],
    reason: Reason = "", actor: Actor = None, as_json: AsJson = False,
) -> None:
    """Validate FILE on the server and put it in force everywhere; exit 1 if refused."""
    try:
        text = file.read_text()
    except OSError as exc:
        typer.echo(f"{file}: {exc.strerror}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    with admin(actor) as client:
        result = client.call("POST", "/v1/admin/policy", content=text,
                             params={"reason": reason})
    emit(result, as_json, lambda r: typer.echo(
        f"applied {r['version'][:19]} (was {str(r['previous'])[:19]})" if r["changed"]
        else f"unchanged: {r['version'][:19]} is already in force"))


def policy_history(as_json: AsJson = False) -> None:
    """Every applied policy version, oldest first, with who and why."""
    with admin() as client:
        rows = client.call("GET", "/v1/admin/policy/history")
    emit(rows, as_json, lambda rs: table(
        [r | {"version": r["version"][:19], "current": "*" if r["current"] else ""}
         for r in rs], ["current", "version", "applied_at", "actor", "reason"]))


def policy_rollback(
    to: Annotated[str | None, typer.Option("--to", help="Policy version to restore.")] = None,
    reason: Reason = "", actor: Actor = None, as_json: AsJson = False,
) -> None:
    """Put the previous (or the --to) policy version back in force."""
    with admin(actor) as client:
        result = client.call("POST", "/v1/admin/policy/rollback",
                             json={"to": to, "reason": reason})
    emit(result, as_json, lambda r: typer.echo(
        f"policy {r['version'][:19]} in force (was {str(r['previous'])[:19]})"))


def policy_watch(
    file: Annotated[Path, typer.Argument(help="Policy YAML file to watch.")],
    registry: Annotated[Path | None, typer.Option(
        help="Model registry folder (default LANEWAY_REGISTRY, else ./registry).")] = None,
) -> None:
    """Re-apply FILE whenever it changes (serve --watch runs this)."""
    import asyncio
    import logging

    from controlplane.policy import RemoteRules
    from controlplane.policy_watch import run_policy_watch
    from controlplane.registry import Registry

    settings = current_settings(registry=registry)
    if not settings.redis_url:
        typer.echo("laneway policy watch needs LANEWAY_REDIS_URL", err=True)
        raise typer.Exit(EXIT_USAGE)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s watch %(levelname)s %(message)s")
    asyncio.run(run_policy_watch(settings.redis_url, file, Registry(settings.registry),
                                 remote=RemoteRules.from_settings(settings)))


# -- models -------------------------------------------------------------------------------

def models_register(
    name: Annotated[str, typer.Argument(help="Model name in the registry.")],
    version: Annotated[str, typer.Option("--version", help="Version label, e.g. 3.")],
    path: Annotated[Path, typer.Option("--path", help="diffusers folder (safetensors only).")],
    kind: Annotated[str | None, typer.Option(
        help="sdxl | sd-latent-upscale | sd-x4-upscale | lora (default: from the "
             "folder's laneway.json)")] = None,
    base_model: Annotated[str | None, typer.Option(help="Base model of a lora.")] = None,
    link: Annotated[bool, typer.Option(help="Symlink the files instead of copying.")] = False,
    notes: str = "", reason: Reason = "", actor: Actor = None, as_json: AsJson = False,
) -> None:
    """Copy a folder into the registry as NAME/VERSION; refuses pickles and tampered files."""
    body = {"name": name, "version": version, "path": str(path.resolve()), "kind": kind,
            "base_model": base_model, "link": link, "notes": notes, "reason": reason}
    with admin(actor) as client:
        manifest = client.call("POST", "/v1/admin/models", json=body)
    emit(manifest, as_json, lambda m: typer.echo(
        f"registered {m['name']} {m['version']} ({m['kind']}, {m['files']} files)"))


def models_list(
    registry: Annotated[Path | None, typer.Option(
        help="Read this registry folder directly (offline; no stable/canary roles).")] = None,
    as_json: AsJson = False,
) -> None:
    """Models and versions in the registry, with which is stable and which is canary."""
    if registry is not None:
        from controlplane.registry import Registry

        reg = Registry(registry)
        rows = [{"model": m, "version": v, "kind": reg.manifest(m, v).kind, "role": "",
                 "weight": 0.0} for m in reg.models() for v in reg.versions(m)]
    else:
        with admin() as client:
            rows = client.call("GET", "/v1/admin/models")
    emit(rows, as_json, lambda rs: table(
        [r | {"weight": f"{r['weight']:g}%" if r["role"] else ""} for r in rs],
        ["model", "version", "kind", "role", "weight"]))


# -- audit, status, jobs --------------------------------------------------------------------

def audit_cmd(
    limit: Annotated[int, typer.Option(help="Newest entries to show.")] = 50,
    target: Annotated[str | None, typer.Option(help="Only this model (or 'policy').")] = None,
    as_json: AsJson = False,
) -> None:
    """Who changed what, when and why."""
    params: dict[str, Any] = {"limit": limit} | ({"target": target} if target else {})
    with admin() as client:
        rows = client.call("GET", "/v1/admin/audit", params=params)
    emit(rows, as_json, lambda rs: table(rs, ["at", "actor", "action", "target", "reason"]))


def status_cmd(as_json: AsJson = False) -> None:
    """Policy in force, model versions in service and rollouts."""
    with admin() as client:
        body = {"policy_version": client.call("GET", "/v1/routes")["policy_version"],
                "models": [m for m in client.call("GET", "/v1/admin/models") if m["role"]],
                "rollouts": client.call("GET", "/v1/admin/rollouts")}

    def human(b: dict[str, Any]) -> None:
        typer.echo(f"policy {b['policy_version']}\n")
        table([m | {"weight": f"{m['weight']:g}%"} for m in b["models"]],
              ["model", "version", "role", "weight"])
        if b["rollouts"]:
            typer.echo("")
            rollout_table(b["rollouts"])

    emit(body, as_json, human)


@jobs_app.command("show")
def jobs_show(job_id: Annotated[str, typer.Argument(help="Job id (j_…).")],
              as_json: AsJson = False) -> None:
    """One job: status, route, policy version and each stage's model version."""
    with admin() as client:
        job = client.call("GET", f"/v1/jobs/{job_id}")

    def human(j: dict[str, Any]) -> None:
        typer.echo(f"{j['id']}  {j['status']}  route {j['route']}  "
                   f"policy {j['policy_version'][:19]}")
        if j.get("error"):
            typer.echo(f"error: {j['error']}")
        table([s | {"version": s.get("model_version") or ""} for s in j["stages"]],
              ["engine", "model", "version", "status", "run_ms", "worker"])

    emit(job, as_json, human)


# -- rollouts -------------------------------------------------------------------------------

def rollout_table(rows: list[dict[str, Any]]) -> None:
    table([r | {"weight": f"{r['weight']:g}%", "steps": ",".join(f"{s:g}" for s in r["steps"])}
           for r in rows], ["model", "stable", "canary", "phase", "weight", "steps", "message"])


@rollout_app.command("start")
def rollout_start(
    model: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Option("--version", help="Canary version.")],
    steps: Annotated[str, typer.Option(help="Canary weights in percent.")] = "10,25,50,100",
    interval: Annotated[str, typer.Option(help="Time between analyses, e.g. 60s.")] = "60s",
    min_samples: Annotated[int, typer.Option(help="Canary stages before judging.")] = 20,
    max_error_increase: Annotated[float, typer.Option(
        help="Abort above stable's error rate + this many points.")] = 5.0,
    max_p95_ratio: Annotated[float, typer.Option(
        help="Abort when canary p95 run time exceeds stable's times this.")] = 1.5,
    max_pass_drop: Annotated[float, typer.Option(
        help="Abort when the verifier pass rate drops more points than this.")] = 10.0,
    reason: Reason = "", actor: Actor = None, as_json: AsJson = False,
) -> None:
    """Start a canary of MODEL at VERSION, judged every interval against stable."""
    body = {"model": model, "version": version, "steps": parse_steps(steps),
            "interval_s": parse_duration_s(interval), "min_samples": min_samples,
            "reason": reason, "thresholds": {
                "max_error_rate_increase_pts": max_error_increase,
                "max_p95_ratio": max_p95_ratio, "max_pass_rate_drop_pts": max_pass_drop}}
    with admin(actor) as client:
        rollout = client.call("POST", "/v1/admin/rollouts", json=body)
    emit(rollout, as_json, lambda r: typer.echo(
        f"rollout of {r['model']}: {r['canary']} at {r['weight']:g}% (stable {r['stable']})"))


@rollout_app.command("status")
def rollout_status(model: Annotated[str | None, typer.Argument(help="Model name.")] = None,
                   as_json: AsJson = False) -> None:
    """Rollouts (current or last per model)."""
    with admin() as client:
        rows = ([client.call("GET", f"/v1/admin/rollouts/{model}")] if model
                else client.call("GET", "/v1/admin/rollouts"))
    emit(rows if model is None else rows[0], as_json,
         lambda _: rollout_table(rows))


def _rollout_action(action: str) -> Callable[..., None]:
    def command(model: Annotated[str, typer.Argument(help="Model name.")],
                reason: Reason = "", actor: Actor = None, as_json: AsJson = False) -> None:
        with admin(actor) as client:
            rollout = client.call("POST", f"/v1/admin/rollouts/{model}/{action}",
                                  json={"reason": reason})
        emit(rollout, as_json, lambda r: typer.echo(
            f"rollout of {r['model']}: {r['phase']} (stable {r['stable']}, canary "
            f"{r['canary']} at {r['weight']:g}%)"))

    command.__doc__ = {"promote": "Make the canary stable now.",
                       "pause": "Hold the canary at its weight.",
                       "resume": "Continue a paused rollout.",
                       "abort": "Send all traffic back to stable."}[action]
    return command


for _action in ("promote", "pause", "resume", "abort"):
    rollout_app.command(_action)(_rollout_action(_action))


def rollback_cmd(
    model: Annotated[str, typer.Argument(help="Model name.")],
    to: Annotated[str | None, typer.Option("--to", help="Version to make stable.")] = None,
    reason: Reason = "", actor: Actor = None, as_json: AsJson = False,
) -> None:
    """The on-call command: abort MODEL's rollout, or make the previous version stable.

    Safe to run again: with nothing left to undo it prints "already at VERSION" and
    changes nothing (exit 0).
    """
    with admin(actor) as client:
        result = client.call("POST", f"/v1/admin/models/{model}/rollback",
                             json={"to": to, "reason": reason})
    emit(result, as_json, lambda r: typer.echo(f"{r['model']}: {r['message']}"))


def controller_cmd() -> None:
    """Run the rollout reconcile loop and the artifact sweeper (one process at a time
    holds each one's lock)."""
    import asyncio
    import logging

    from controlplane.reconcile import run_controller

    settings = current_settings()
    if not settings.redis_url:
        typer.echo("laneway controller needs LANEWAY_REDIS_URL", err=True)
        raise typer.Exit(EXIT_USAGE)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s controller %(levelname)s %(message)s")
    asyncio.run(run_controller(settings))


def register(app: typer.Typer, policy_app: typer.Typer, models_app: typer.Typer) -> None:
    """Add these commands to the ``laneway`` app (called once by laneway/cli.py)."""
    policy_app.command("diff")(policy_diff)
    policy_app.command("apply")(policy_apply)
    policy_app.command("history")(policy_history)
    policy_app.command("rollback")(policy_rollback)
    policy_app.command("watch")(policy_watch)
    models_app.command("register")(models_register)
    models_app.command("list")(models_list)
    app.add_typer(rollout_app, name="rollout")
    app.add_typer(jobs_app, name="jobs")
    app.command("rollback")(rollback_cmd)
    app.command("audit")(audit_cmd)
    app.command("status")(status_cmd)
    app.command("controller")(controller_cmd)
