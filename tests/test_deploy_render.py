"""``laneway deploy render`` and the base manifests in deploy/k8s.

The rendered lanes are checked three ways: against ``keys.engine_stream`` of every device
engine and tier, against the streams the worker's own lane reader opens on a real server,
and through ``kubectl kustomize`` (which also builds the base they include).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml
from typer.testing import CliRunner

from controlplane import keys
from controlplane.policy import DEVICE_KINDS, DIFFUSERS_KINDS, Policy
from controlplane.policy_loader import load_policy
from controlplane.settings import Settings, setting_names, unknown_variables
from engines.lanes import LaneReader
from laneway.cli import app
from laneway.deploy_render import GENERATED_MARK, NAMESPACE, PROBE_PORT
from tests.conftest import REPO

DEFAULT_POLICY = REPO / "policies" / "default.yaml"
BASE = REPO / "deploy" / "k8s"
GPU = "nvidia.com/gpu"
DEFAULT_ENGINES = {"sdxl-turbo", "sdxl-base", "sdxl-refine", "sdxl-inpaint", "x2-upscaler",
                   "resize"}

MIXED_POLICY = """
version: 1
tiers: {interactive: {weight: 3}, bulk: {weight: 1, deferrable: true}}
default_tier: interactive
engines:
  base: {kind: diffusers.text2image, model: sdxl-base, max_concurrency: 2}
  upscaler: {kind: diffusers.latent_upscale, model: up, max_batch: 4}
  resize: {kind: resize}
  hosted-a: {kind: http.openai_images, base_url: "https://provider.invalid/v1", model: m}
  hosted-b: {kind: http.openai_images, base_url: "https://provider.invalid/v1", model: m}
  sim-gpu: {kind: sim, sim: {mean_ms: 100}}
routes:
  - {name: local, match: {intent: final}, stages: [{engine: base}, {engine: upscaler}]}
  - {name: hosted, stages: [{engine: hosted-a, fallback: [hosted-b]}]}
"""


def render(*args: str) -> Any:
    return CliRunner().invoke(app, ["deploy", "render", "--base", str(BASE), *args])


def documents(folder: Path) -> list[dict[str, Any]]:
    """Every object in the folder's worker files."""
    return [doc for path in sorted(folder.glob("worker-*.yaml"))
            for doc in yaml.safe_load_all(path.read_text())]


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def device_engines(policy: Policy) -> list[str]:
    return [name for name, spec in policy.engines.items() if spec.kind in DEVICE_KINDS]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def env_of(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(deployment).get("env", [])}


def kustomize(folder: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize` cannot build the manifests")
    built = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True,
                           text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


def pod_templates(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(o["metadata"]["name"], o["spec"]["template"]["spec"])
            for o in objects if o["kind"] == "Deployment"]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rendered")
    result = render("--policy", str(DEFAULT_POLICY), "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


# -- the default policy ------------------------------------------------------------------

def test_default_policy_gives_a_deployment_and_a_scaled_object_per_device_engine(
        rendered: Path) -> None:
    policy = load_policy(DEFAULT_POLICY)
    assert set(device_engines(policy)) == DEFAULT_ENGINES
    objects = documents(rendered)
    expected = {f"laneway-worker-{engine}" for engine in DEFAULT_ENGINES}
    assert sorted(o["kind"] for o in objects) == ["Deployment"] * 6 + ["ScaledObject"] * 6
    assert set(by_kind(objects, "Deployment")) == expected
    assert set(by_kind(objects, "ScaledObject")) == expected
    assert sorted(p.name for p in rendered.iterdir()) == sorted(
        [f"worker-{e}.yaml" for e in DEFAULT_ENGINES] + ["kustomization.yaml", "policy.yaml"])
    assert (rendered / "policy.yaml").read_text() == DEFAULT_POLICY.read_text()


def test_trigger_streams_are_exactly_the_lane_streams_of_device_engines(
        rendered: Path) -> None:
    policy = load_policy(DEFAULT_POLICY)
    triggers = [(name, t) for name, so in by_kind(documents(rendered), "ScaledObject").items()
                for t in so["spec"]["triggers"]]
    streams = [t["metadata"]["stream"] for _, t in triggers]
    expected = {keys.engine_stream(e, tier) for e in device_engines(policy)
                for tier in policy.tiers}
    assert len(streams) == len(expected) == 18
    assert set(streams) == expected
    for name, trigger in triggers:  # each pool scales on its own engine's lanes only
        engine = name.removeprefix("laneway-worker-")
        assert trigger["metadata"]["stream"] in {keys.engine_stream(engine, t)
                                                  for t in policy.tiers}
        assert trigger["type"] == "redis-streams"
        assert trigger["metadata"]["consumerGroup"] == keys.ENGINE_GROUP
        assert trigger["metadata"]["address"] == "redis.laneway.svc:6379"
        spec = policy.engines[engine]
        assert trigger["metadata"]["lagCount"] == str(spec.max_concurrency * spec.max_batch)
        assert int(trigger["metadata"]["activationLagCount"]) >= 1


async def test_the_worker_lane_reader_opens_exactly_the_rendered_streams(
        rendered: Path, redis_url: str) -> None:
    """The streams and groups a worker's reader makes on a real server (weights from the
    policy's tiers, as the worker builds them) are the rendered triggers' streams."""
    policy = load_policy(DEFAULT_POLICY)
    client = aioredis.Redis.from_url(redis_url)
    try:
        reader = LaneReader(client, "probe")
        weights = {tier: t.weight for tier, t in policy.tiers.items()}
        for engine in device_engines(policy):
            assert await reader.take(engine, weights, block=False) == []
        opened = {k.decode() async for k in client.scan_iter(match=keys.engine_stream("*", "*"))}
        groups = {g["name"].decode() for stream in opened
                  for g in await client.xinfo_groups(stream)}
    finally:
        await client.aclose()
    triggered = {t["metadata"]["stream"]
                 for so in by_kind(documents(rendered), "ScaledObject").values()
                 for t in so["spec"]["triggers"]}
    assert opened == triggered
    assert groups == {keys.ENGINE_GROUP}


def test_worker_deployments_run_one_engine_on_its_device(rendered: Path) -> None:
    policy = load_policy(DEFAULT_POLICY)
    for name, deployment in by_kind(documents(rendered), "Deployment").items():
        engine = name.removeprefix("laneway-worker-")
        gpu = policy.engines[engine].kind in DIFFUSERS_KINDS
        worker = container(deployment)
        assert worker["args"] == ["worker", "--engines", engine,
                                  "--device", "cuda:0" if gpu else "cpu",
                                  "--probe-port", str(PROBE_PORT), "--probe-host", "0.0.0.0"]
        limits = worker.get("resources", {}).get("limits", {})
        assert limits == ({GPU: 1} if gpu else {}), name
        assert "replicas" not in deployment["spec"]  # KEDA's HPA owns it
        pod = deployment["spec"]["template"]["spec"]
        drain_s = float(env_of(deployment)["LANEWAY_DRAIN_TIMEOUT_S"]["value"])
        assert drain_s == Settings().drain_timeout_s
        assert pod["terminationGracePeriodSeconds"] > drain_s


def test_scaled_objects_keep_one_replica_and_target_their_deployment(rendered: Path) -> None:
    objects = documents(rendered)
    deployments = by_kind(objects, "Deployment")
    for name, so in by_kind(objects, "ScaledObject").items():
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        assert so["spec"]["scaleTargetRef"] == {"name": name}
        assert name in deployments
        assert so["spec"]["minReplicaCount"] == 1
        assert so["spec"]["maxReplicaCount"] == 4
    text = (rendered / "worker-sdxl-turbo.yaml").read_text()
    assert text.startswith(GENERATED_MARK)
    assert "minReplicaCount is 1" in text  # the reason, in a YAML comment


def test_rendered_output_builds_with_the_base_and_the_rendered_policy(
        rendered: Path) -> None:
    objects = kustomize(rendered)
    names = sorted((o["kind"], o["metadata"]["name"]) for o in objects
                   if not o["metadata"]["name"].startswith("laneway-policy"))
    workers = [f"laneway-worker-{e}" for e in sorted(DEFAULT_ENGINES)]
    assert names == sorted(
        [("Namespace", NAMESPACE), ("ConfigMap", "laneway-config"),
         ("PersistentVolumeClaim", "laneway-registry"),
         ("PersistentVolumeClaim", "laneway-artifacts"),
         ("Deployment", "laneway-api"), ("Service", "laneway-api"),
         ("PodDisruptionBudget", "laneway-api"), ("Deployment", "laneway-verifier"),
         ("Deployment", "laneway-controller")]
        + [("Deployment", w) for w in workers] + [("ScaledObject", w) for w in workers])
    assert all(o["metadata"].get("namespace") == NAMESPACE
               for o in objects if o["kind"] != "Namespace")
    (policy_map,) = [o for o in objects if o["metadata"]["name"].startswith("laneway-policy")]
    assert policy_map["data"] == {"policy.yaml": DEFAULT_POLICY.read_text()}
    api = by_kind(objects, "Deployment")["laneway-api"]
    volumes = {v["name"]: v for v in api["spec"]["template"]["spec"]["volumes"]}
    assert volumes["policy"]["configMap"]["name"] == policy_map["metadata"]["name"]


def test_every_pod_gets_only_settings_and_a_name_of_its_own(rendered: Path) -> None:
    """Unknown LANEWAY_* variables stop a process at start, and worker names (consumer
    names) start with LANEWAY_NODE_NAME: both checked on every pod, base included."""
    objects = documents(rendered) + base_objects()
    templates = pod_templates(objects)
    assert len(templates) == 6 + 3
    for name, pod in templates:
        assert pod["enableServiceLinks"] is False, name
        (worker,) = pod["containers"]
        env = {e["name"]: e for e in worker.get("env", [])}
        assert env["LANEWAY_NODE_NAME"]["valueFrom"] == {
            "fieldRef": {"fieldPath": "metadata.name"}}, name
        assert unknown_variables(dict.fromkeys(env, "x")) == [], name
        sources = [next(iter(s.values()))["name"] for s in worker["envFrom"]]
        assert sources == ["laneway-config", "laneway-secrets"], name


def test_workers_and_the_verifier_are_probed_on_their_own_probe_port(
        rendered: Path) -> None:
    deployments = by_kind(documents(rendered) + base_objects(), "Deployment")
    probed = {n: d for n, d in deployments.items() if n.startswith("laneway-worker-")}
    assert len(probed) == 6
    probed["laneway-verifier"] = deployments["laneway-verifier"]
    runner = CliRunner()
    for name, deployment in probed.items():
        pod = container(deployment)
        args = pod["args"]
        port = int(args[args.index("--probe-port") + 1])
        assert args[args.index("--probe-host") + 1] == "0.0.0.0", name  # the kubelet's way in
        assert pod["ports"] == [{"name": "probe", "containerPort": port}], name
        paths = {kind: pod[kind]["httpGet"] for kind in
                 ("startupProbe", "livenessProbe", "readinessProbe")}
        assert paths == {"startupProbe": {"path": "/livez", "port": "probe"},
                         "livenessProbe": {"path": "/livez", "port": "probe"},
                         "readinessProbe": {"path": "/readyz", "port": "probe"}}, name
        # above the probe's PING timeout, so a stopped Redis reads as 503, not a timeout
        assert pod["readinessProbe"]["timeoutSeconds"] > 0.5, name
        # the command line parses: the command gets as far as asking for Redis
        result = runner.invoke(app, args, env={"LANEWAY_REDIS_URL": None})
        assert result.exit_code == 2 and "needs --redis-url" in result.output, result.output


# -- other policies, bad input -----------------------------------------------------------

def test_remote_engines_share_one_fixed_pool_and_sim_engines_get_none(tmp_path: Path) -> None:
    policy_file = tmp_path / "mixed.yaml"
    policy_file.write_text(MIXED_POLICY)
    out = tmp_path / "out"
    result = render("--policy", str(policy_file), "--out", str(out), "--image", "img:7",
                    "--redis-address", "valkey.data.svc:6380", "--max-replicas", "9")
    assert result.exit_code == 0, result.output
    assert "no pool for simulated engines (kind: sim): sim-gpu" in result.output
    objects = documents(out)
    deployments = by_kind(objects, "Deployment")
    assert set(deployments) == {"laneway-worker-base", "laneway-worker-upscaler",
                                "laneway-worker-resize", "laneway-worker-remote"}
    assert set(by_kind(objects, "ScaledObject")) == {
        "laneway-worker-base", "laneway-worker-upscaler", "laneway-worker-resize"}
    remote = deployments["laneway-worker-remote"]
    assert container(remote)["args"][:5] == ["worker", "--engines", "hosted-a,hosted-b",
                                             "--device", "none"]
    assert container(remote)["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert remote["spec"]["replicas"] == 1
    assert "resources" not in container(remote)
    assert {container(d)["image"] for d in deployments.values()} == {"img:7"}
    upscaler = by_kind(objects, "ScaledObject")["laneway-worker-upscaler"]
    assert {t["metadata"]["stream"] for t in upscaler["spec"]["triggers"]} == {
        keys.engine_stream("upscaler", "interactive"), keys.engine_stream("upscaler", "bulk")}
    assert {t["metadata"]["lagCount"] for t in upscaler["spec"]["triggers"]} == {"4"}
    assert {t["metadata"]["address"] for t in upscaler["spec"]["triggers"]} == {
        "valkey.data.svc:6380"}
    assert upscaler["spec"]["maxReplicaCount"] == 9
    kustomize(out)


def test_a_later_render_removes_pools_that_are_gone_and_keeps_other_files(
        tmp_path: Path) -> None:
    assert render("--policy", str(DEFAULT_POLICY), "--out", str(tmp_path)).exit_code == 0
    own = tmp_path / "worker-mine.yaml"
    own.write_text("# written by hand\n")
    policy_file = tmp_path / "mixed.yaml"
    policy_file.write_text(MIXED_POLICY)
    assert render("--policy", str(policy_file), "--out", str(tmp_path)).exit_code == 0
    assert sorted(p.name for p in tmp_path.glob("worker-*.yaml")) == [
        "worker-base.yaml", "worker-mine.yaml", "worker-remote.yaml", "worker-resize.yaml",
        "worker-upscaler.yaml"]


def test_engines_that_would_share_a_pool_name_are_refused(tmp_path: Path) -> None:
    policy_file = tmp_path / "clash.yaml"
    policy_file.write_text(MIXED_POLICY.replace("  resize: {kind: resize}",
                                                "  Base: {kind: resize}"))
    result = render("--policy", str(policy_file), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert "engines.Base: its pool name 'laneway-worker-base' is already that of 'base'" \
        in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("address", ["redis", "redis:0", "redis:port", "redis://r:6379"])
def test_a_bad_redis_address_is_a_usage_error(tmp_path: Path, address: str) -> None:
    result = render("--policy", str(DEFAULT_POLICY), "--out", str(tmp_path),
                    "--redis-address", address)
    assert result.exit_code == 2
    assert "expected HOST:PORT" in result.output
    assert not any(tmp_path.iterdir())


def test_a_missing_base_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["deploy", "render", "--policy", str(DEFAULT_POLICY),
                                      "--out", str(tmp_path), "--base", str(tmp_path)])
    assert result.exit_code == 2
    assert "no kustomization.yaml" in result.output


# -- the base ----------------------------------------------------------------------------

def base_objects() -> list[dict[str, Any]]:
    return [d for p in sorted(BASE.glob("*.yaml")) if p.name not in (
        "kustomization.yaml", "policy.yaml") for d in yaml.safe_load_all(p.read_text()) if d]


def test_the_base_builds_and_holds_the_api_verifier_and_controller() -> None:
    objects = kustomize(BASE)
    kinds = sorted((o["kind"], o["metadata"]["name"].split("-")[0]
                    if o["metadata"]["name"].startswith("laneway-policy")
                    else o["metadata"]["name"]) for o in objects)
    assert kinds == sorted([
        ("Namespace", NAMESPACE), ("ConfigMap", "laneway-config"), ("ConfigMap", "laneway"),
        ("PersistentVolumeClaim", "laneway-registry"),
        ("PersistentVolumeClaim", "laneway-artifacts"), ("Deployment", "laneway-api"),
        ("Service", "laneway-api"), ("PodDisruptionBudget", "laneway-api"),
        ("Deployment", "laneway-verifier"), ("Deployment", "laneway-controller")])
    deployments = by_kind(objects, "Deployment")
    assert container(deployments["laneway-verifier"])["args"][0] == "verifier"
    assert container(deployments["laneway-controller"])["args"] == ["controller"]
    assert deployments["laneway-controller"]["spec"]["replicas"] == 1


def test_the_base_policy_is_the_default_policy() -> None:
    assert (BASE / "policy.yaml").read_text() == DEFAULT_POLICY.read_text()


def test_the_api_serves_without_workers_and_is_probed_on_health_and_readiness() -> None:
    objects = base_objects()
    api = by_kind(objects, "Deployment")["laneway-api"]
    serve = container(api)
    assert serve["args"][:2] == ["serve", "--no-workers"]
    assert serve["args"][2:] == ["--policy", "/etc/laneway/policy.yaml"]
    assert serve["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert serve["readinessProbe"]["httpGet"]["path"] == "/readyz"
    pod_labels = api["spec"]["template"]["metadata"]["labels"]
    service = by_kind(objects, "Service")["laneway-api"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    budget = by_kind(objects, "PodDisruptionBudget")["laneway-api"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert budget["spec"]["minAvailable"] < api["spec"]["replicas"]


def test_the_shared_config_holds_only_settings() -> None:
    config = by_kind(base_objects(), "ConfigMap")["laneway-config"]
    assert set(config["data"]) <= set(setting_names())
    assert "LANEWAY_REDIS_URL" in config["data"]
    Settings.model_validate({k.removeprefix("LANEWAY_").lower(): v
                             for k, v in config["data"].items()})

