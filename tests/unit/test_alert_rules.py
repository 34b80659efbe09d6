"""deploy/: the alert rules load and their unit tests pass in promtool, the compose Prometheus
config is valid, and the Grafana dashboard is well formed (its queries run against a real
Prometheus in tests/integration/test_prometheus.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "hublaunch.json"
ALERTS = {
    "HublaunchLaunchFailureRatioHigh",
    "HublaunchTimeToReadySlow",
    "HublaunchQueueBacklog",
    "HublaunchHubUnreachable",
    "HublaunchCleanupNotRunning",
    "HublaunchSessionsPastMaxAge",
    "HublaunchMetricsStoreDown",
}


def promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("promtool")
    if executable is None:
        pytest.fail("promtool is required (apt-get install prometheus; .ci/run does)")
    return subprocess.run([executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_the_alert_rules_load() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_every_alert_is_named_documented_and_has_a_severity() -> None:
    assert {rule["alert"] for rule in rules()} == ALERTS
    documentation = (REPO / "docs" / "dashboards.md").read_text()
    for rule in rules():
        assert rule["labels"]["severity"] in {"page", "warn"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert rule["alert"] in documentation, f"{rule['alert']} is not in docs/dashboards.md"


def test_each_alert_fires_on_a_problem_and_stays_quiet_when_healthy() -> None:
    result = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    assert fires == ALERTS, sorted(ALERTS - fires)
    assert quiet == ALERTS, sorted(ALERTS - quiet)


def test_the_compose_prometheus_config_is_valid(tmp_path: Path) -> None:
    """promtool checks the files a config names exist: the copy points at temporary ones."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    token = tmp_path / "hublaunch_admin_token"
    token.write_text("placeholder\n")
    shutil.copy(RULES, tmp_path / "alerts.yml")
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    config["rule_files"] = [str(tmp_path / "alerts.yml")]
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "hublaunch"]
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"]["type"] == "Bearer"
    job["authorization"]["credentials_file"] = str(token)
    copy = tmp_path / "prometheus.yml"
    copy.write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(copy))
    assert result.returncode == 0, result.stdout + result.stderr


def dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # inside collapsed rows
    return panels


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "hublaunch" and dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    [variable] = dashboard["templating"]["list"]
    assert variable["name"] == "DS_PROMETHEUS" and variable["type"] == "datasource"
    assert variable["query"] == "prometheus"
    assert variable["current"]["value"] == "prometheus"  # the provisioned data source's uid
    panels = dashboard_panels()
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    graphs = [panel for panel in panels if panel["type"] != "row"]
    assert len(graphs) >= 15
    for panel in graphs:
        title = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, title
        assert panel.get("description"), title
        assert panel["targets"], title
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), title
        for target in panel["targets"]:
            assert target["expr"].strip(), title
            assert target["datasource"] == panel["datasource"], title
            assert "hublaunch_" in target["expr"], title
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24, title
    # What the issue asks the dashboard to show.
    expressions = "\n".join(t["expr"] for p in graphs for t in p["targets"])
    for series in (
        "hublaunch_launches_finished_total",
        "hublaunch_launch_ready_seconds_bucket",
        "hublaunch_sessions_active",
        "hublaunch_queue_depth",
        "hublaunch_queue_oldest_seconds",
        "hublaunch_launch_queue_seconds_bucket",
        "hublaunch_builds_total",
        "hublaunch_build_seconds_bucket",
        "hublaunch_cleanup_actions_total",
        "hublaunch_hub_requests_total",
        "hublaunch_hub_request_seconds_bucket",
    ):
        assert series in expressions, series
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(hublaunch_launch_ready" in (
            expressions
        )


def test_grafana_is_provisioned_with_the_data_source_and_the_dashboard() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["uid"] == "prometheus" and source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    [provider] = yaml.safe_load((provisioning / "dashboards" / "hublaunch.yml").read_text())[
        "providers"
    ]
    assert provider["options"]["path"] == "/etc/grafana/dashboards"
