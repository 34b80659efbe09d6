"""The dashboard and the alert rules against a real Prometheus scraping a real stack.

/usr/bin/prometheus (Debian's `prometheus` package; .ci/run installs it) runs as a subprocess
with a config this test writes: it scrapes the stack's public /metrics with the admin token
every second and loads deploy/prometheus/alerts.yml. After real launches (ready, failed, built
from a repository), an end and a cleanup pass, every target expression of the Grafana dashboard
must return data, and every alert group must have loaded healthy.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from hublaunch.stack import Stack
from tests.integration.conftest import expire_and_cull, read_events, wait_for
from tests.integration.gitserver import GitServer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_users")]

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = Path("/usr/bin/prometheus")
RULES = REPO / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "hublaunch.json"
# What Grafana puts in place of its variables for a recent, short time range.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "15s",
    "$__range": "5m",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def prometheus(stack: Stack, tmp_path: Path) -> Iterator[httpx.Client]:
    """A real Prometheus scraping the stack; its whole process group is stopped at the end."""
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.fail(f"{PROMETHEUS} is required (apt-get install prometheus; .ci/run does)")
    token = tmp_path / "admin-token"
    token.write_text(stack.config.env["HUBLAUNCH_ADMIN_TOKEN"])
    token.chmod(0o600)
    target = stack.public_url.removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "hublaunch",
                "metrics_path": "/metrics",
                "authorization": {"type": "Bearer", "credentials_file": str(token)},
                "static_configs": [{"targets": [target]}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            str(PROMETHEUS),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, stopped as one below
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    try:

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(
                    f"prometheus exited ({process.returncode}): "
                    + (tmp_path / "prometheus.log").read_text()[-2000:]
                )
            try:
                return client.get("/-/ready").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, 30, "Prometheus to be ready")
        # It starts scraping a few seconds after it is ready: have a sample from before the
        # launches, so that rates show what the test did.
        wait_for(lambda: query(client, "up == 1"), 30, "Prometheus's first scrape")
        yield client
    finally:
        client.close()
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
        except ProcessLookupError:
            pass
        log.close()


def query(prometheus: httpx.Client, expr: str) -> list[dict[str, Any]]:
    response = prometheus.get("/api/v1/query", params={"query": expr})
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def grafana(expr: str) -> str:
    """The query Grafana sends for a panel's expression."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def panel_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                expr = grafana(target["expr"])
                assert "$" not in expr, f"{inner['title']}: a variable is left in {expr}"
                found.append((inner["title"], expr))
    return found


def launch(api: httpx.Client, **body: Any) -> tuple[str, str]:
    response = api.post("/api/launches", json=body)
    assert response.status_code == 202, response.text
    launch_id = response.json()["id"]
    return launch_id, read_events(api, launch_id)[-1]["phase"]


def end(api: httpx.Client, launch_id: str) -> None:
    assert api.delete(f"/api/launches/{launch_id}").status_code == 202
    wait_for(
        lambda: api.get(f"/api/launches/{launch_id}").json()["status"] == "ended",
        30,
        f"launch {launch_id} to end",
    )


@pytest.mark.parametrize("stack", ["postgresql"], indirect=True)  # it may launch local repos
def test_every_dashboard_query_returns_data_and_the_rules_load(
    stack: Stack, api: httpx.Client, prometheus: httpx.Client, git_server: GitServer
) -> None:
    repo = git_server.url("prometheus-panels")
    git_server.commit("prometheus-panels", {"requirements.txt": ""})
    running: list[str] = []
    try:
        # Real launches: to ready, refused by the Hub, and built from a repository. Round one
        # makes every series exist and Prometheus scrapes them; round two (a new commit, so
        # another build) moves them, so that rates and quantiles show what the test did.
        for round_ in (1, 2):
            if round_ == 2:
                wait_for(
                    lambda: (
                        query(prometheus, "hublaunch_builds_total")
                        and query(prometheus, 'hublaunch_launches_finished_total{outcome="failed"}')
                    ),
                    30,
                    "Prometheus to scrape round one",
                )
                git_server.commit("prometheus-panels", {"README.md": "round two"})
            ready = [launch(api, image="default") for _ in range(round_)]
            refused = launch(api, image="no-such-image")
            built = launch(api, repo=repo, ref="main")
            running += [launch_id for launch_id, phase in [*ready, built] if phase == "ready"]
            assert [phase for _, phase in ready] == ["ready"] * round_
            assert refused[1] == "failed" and built[1] == "ready"
        check_the_dashboard_and_rules(stack, api, prometheus, running)
    finally:
        for launch_id in running:  # the sessions still running, if any
            api.delete(f"/api/launches/{launch_id}")


def check_the_dashboard_and_rules(
    stack: Stack, api: httpx.Client, prometheus: httpx.Client, running: list[str]
) -> None:
    ended, expired, *kept = running
    end(api, ended)
    # A cleanup pass in a process of its own ends a session made expired.
    expire_and_cull(stack, expired)
    wait_for(
        lambda: api.get(f"/api/launches/{expired}").json()["status"] == "ended",
        30,
        "the expired session to end",
    )
    # Prometheus has scraped what was counted, and at least twice since the last of it
    # (rate() needs two samples).
    done = time.time()
    wait_for(
        lambda: query(prometheus, "sum(hublaunch_launches_created_total) > 0"),
        30,
        "Prometheus to scrape the launches",
    )
    wait_for(
        lambda: query(
            prometheus,
            f"count_over_time(hublaunch_metrics_store_up[{max(1, int(time.time() - done))}s]) >= 2",
        ),
        30,
        "two scrapes after the last launch",
    )
    wait_for(
        lambda: query(prometheus, 'sum(hublaunch_cleanup_actions_total{category="expired"})'),
        30,
        "the cleanup action to be scraped",
    )

    empty: list[str] = []
    results: dict[str, list[dict[str, Any]]] = {}
    for title, expr in panel_expressions():
        results[expr] = query(prometheus, expr)
        if not results[expr]:
            empty.append(f"{title}: {expr}")
    print(json.dumps(results, indent=1))  # shown with -s, and on failure
    assert not empty, "panels without data:\n" + "\n".join(empty)

    # The data is what the run did, not only a vector(0) stand-in.
    def labels(expr_part: str, label: str) -> set[str]:
        [expr] = [e for e in results if expr_part in e]
        return {sample["metric"].get(label, "") for sample in results[expr]}

    assert "hub_refused" in labels('outcome="failed"', "reason")
    assert {"ready", "failed"} <= labels(
        "by (outcome) (rate(hublaunch_launches_finished_total", "outcome"
    )
    assert "expired" in labels("hublaunch_cleanup_actions_total", "category")
    assert "built" in labels("hublaunch_builds_total", "result")
    assert labels("sum by (spec) (hublaunch_sessions_active)", "spec")  # `kept` are ready

    # What the run did, in rates and quantiles (not only series standing still). Other tests
    # on this stack may have added other reasons and results: only this run's are looked at.
    def value(panel_expr: str, **labels: str) -> float:
        expr = grafana(panel_expr)
        [sample] = [s for s in results[expr] if labels.items() <= s["metric"].items()]
        return float(sample["value"][1])

    ready_p95 = value(
        "histogram_quantile(0.95, sum by (le) "
        "(rate(hublaunch_launch_ready_seconds_bucket[$__rate_interval])))"
    )
    assert 0 < ready_p95 < 3600, ready_p95  # a number: NaN compares False
    failed = (
        "sum by (reason) "
        '(rate(hublaunch_launches_finished_total{outcome="failed"}[$__rate_interval])) * 60'
    )
    assert value(failed, reason="hub_refused") > 0
    builds = "sum by (result) (rate(hublaunch_builds_total[$__rate_interval])) * 60"
    assert value(builds, result="built") > 0
    for launch_id in kept:
        end(api, launch_id)

    # Every alert group of alerts.yml loaded and evaluates without error.
    groups = prometheus.get("/api/v1/rules", params={"type": "alert"}).json()["data"]["groups"]
    expected = {g["name"] for g in yaml.safe_load(RULES.read_text())["groups"]}
    assert {g["name"] for g in groups} == expected
    alerts = {
        rule["name"]: rule
        for group in groups
        for rule in group["rules"]
        if rule["type"] == "alerting"
    }
    wait_for(
        lambda: all(
            r["health"] == "ok"
            for g in prometheus.get("/api/v1/rules").json()["data"]["groups"]
            for r in g["rules"]
        ),
        15,
        "every rule to be evaluated healthy",
    )
    assert set(alerts) == {
        rule["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for rule in g["rules"]
    }
    # Nothing is wrong with this stack: no alert fires (they all wait minutes anyway).
    alerts_now = prometheus.get("/api/v1/alerts").json()["data"]["alerts"]
    assert not [a for a in alerts_now if a["state"] == "firing"], alerts_now
