"""deploy/observability: the alert rules pass promtool (syntax and their unit tests), the
dashboard's queries parse, and every metric either names is served by a live ``/metrics``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.policy_loader import load_policy
from controlplane.registry import Registry
from tests.conftest import POLICIES, REPO
from tests.router.conftest import running_router

OBSERVABILITY = REPO / "deploy" / "observability"
ALERTS = OBSERVABILITY / "laneway-alerts.yaml"
DASHBOARD = OBSERVABILITY / "laneway-dashboard.json"
METRIC_NAME = re.compile(r"\blaneway_[a-z_]+")
#: Grafana's variables, replaced by values PromQL accepts so promtool can parse the queries
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "1h", "$engine": ".*",
                     "$tier": ".*", "$route": ".*", "$model": ".*"}

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (apt-get install prometheus; .ci/run installs it)")


def promtool(*args: str | Path) -> None:
    done = subprocess.run(["promtool", *map(str, args)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and variable queries."""
    board = dashboard()
    exprs = [t["expr"] for p in panels(board) for t in p["targets"]]
    return exprs + [v["query"]["query"] for v in board["templating"]["list"]
                    if v["type"] == "query"]


def alert_exprs() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def metric_names(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in METRIC_NAME.findall(expr)}


@needs_promtool
def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    promtool("check", "rules", ALERTS)
    promtool("test", "rules", OBSERVABILITY / "laneway-alerts.test.yaml")


@needs_promtool
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    rules = []
    for n, expr in enumerate(q for q in dashboard_queries() if not q.startswith("label_values")):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"a Grafana variable promtool cannot parse is left: {expr}"
        rules.append({"record": f"dashboard:query_{n}", "expr": expr})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool("check", "rules", path)


def test_dashboard_uses_the_datasource_variable_and_unique_panel_ids() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 39
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"engine", "tier", "route", "model"} <= set(variables)
    for panel in panels(board):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


def exposed_names(text: str) -> set[str]:
    """Names a scrape serves: every ``# TYPE`` line's family (emitted even when it has no
    samples yet), with a histogram's ``_bucket``, ``_sum`` and ``_count`` series."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


async def test_every_metric_named_is_served_on_a_live_metrics(
        redis_url: str, tiny_registry: Registry, tmp_path: Path) -> None:
    used = metric_names(dashboard_queries()) | metric_names(alert_exprs())
    assert {"laneway_lane_oldest_age_seconds", "laneway_engine_live_slots",
            "laneway_rollout_phase", "laneway_dead_letter_entries",
            "laneway_version_stage_errors_total", "laneway_stage_run_seconds_bucket"} <= used
    async with running_router(redis_url, load_policy(POLICIES / "sim_lane.yaml"),
                              tiny_registry, tmp_path) as router:
        await router.start_worker("sim-draft")
        jobs = [(await router.submit()).json() for _ in range(2)]
        for job in jobs:
            await router.wait_job(job["id"], "completed")
        response = await router.http.get("/metrics")
    assert response.status_code == 200
    assert 'laneway_jobs_total{route="sim_draft",status="completed"} 2.0' in response.text
    missing = sorted(used - exposed_names(response.text))
    assert not missing, f"named by the dashboard or the alerts but not on /metrics: {missing}"
