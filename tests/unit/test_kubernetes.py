"""deploy/kubernetes, checked offline: every manifest against the Kubernetes schemas
(kubernetes-validate, strict: no unknown field), the security findings of checkov on the
manifests and on the Dockerfile (no privileged pod, non-root, limits set, read-only root,
secrets as files), the kustomization's resources, and the JupyterHub chart values' API-only
settings."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
MANIFESTS = KUBE / "hublaunch"
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> list[Path]:
    return sorted(p for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")


def test_every_manifest_passes_the_kubernetes_schemas_strictly() -> None:
    validate = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent))
    assert validate, "kubernetes-validate is a test dependency (make install)"
    result = subprocess.run(
        [validate, "--strict", "--quiet", *map(str, manifests())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_kustomization_lists_every_manifest_and_only_those() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    # The example Secret is for reading, not for applying (real secrets come from elsewhere).
    assert listed == {p.name for p in manifests()} - {"secret.example.yaml"}
    assert kustomization["namespace"] == "hublaunch"


def checkov(*args: str) -> dict[str, Any]:
    if not CHECKOV.exists():
        pytest.fail(
            f"{CHECKOV} is missing: `make test` or `make test-unit` makes it", pytrace=False
        )
    result = subprocess.run(
        # --skip-download: checkov would ask Prisma Cloud for its guidelines; nothing here
        # may reach beyond this machine.
        [str(CHECKOV), *args, "--output", "json", "--quiet", "--skip-download"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", "BC_SKIP_MAPPING": "TRUE"},
    )
    assert result.stdout, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def failures(report: dict[str, Any]) -> list[str]:
    failed = report.get("results", {}).get("failed_checks", [])
    return [f"{c['check_id']} {c['resource']} ({c['file_path']})" for c in failed]


def test_checkov_finds_nothing_in_the_manifests() -> None:
    report = checkov("--directory", str(MANIFESTS), "--framework", "kubernetes")
    assert report["summary"]["passed"] > 200  # the checks ran on every resource
    assert failures(report) == []


def test_checkov_finds_nothing_in_the_image() -> None:
    report = checkov("--file", str(ROOT / "Dockerfile"), "--framework", "dockerfile")
    assert report["summary"]["passed"] > 30
    assert failures(report) == []


def containers(kind: str = "Deployment") -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    found = []
    for path in manifests():
        for doc in documents(path):
            if doc["kind"] == kind:
                pod = doc["spec"]["template"]["spec"]
                for container in pod.get("initContainers", []) + pod["containers"]:
                    found.append((doc["metadata"]["name"], pod, container))
    return found


def test_no_secret_is_in_any_environment_and_each_pod_gets_only_its_own() -> None:
    wanted = {
        "hublaunch-app": {"database-url", "broker-url", "secret-key", "admin-token", "hubs-public"},
        "hublaunch-worker": {"database-url", "broker-url", "secret-key", "hubs"},
        "hublaunch-beat": {"broker-url", "hubs-public"},
    }
    for name, pod, container in containers():
        assert not any("valueFrom" in env for env in container.get("env", [])), name
        keys = {
            item["key"]
            for volume in pod["volumes"]
            if "secret" in volume and container["name"] != "migrate"
            for item in volume["secret"]["items"]
            if volume["name"] in {m["name"] for m in container["volumeMounts"]}
        }
        if container["name"] != "migrate":
            assert keys == wanted[name], name
        # Only the workers hold the Hubs' service tokens.
        assert ("hubs" in keys) == (name == "hublaunch-worker"), name


def test_the_hub_values_are_api_only_and_keep_sessions_out_of_the_cluster() -> None:
    values = yaml.safe_load((KUBE / "jupyterhub" / "values.yaml").read_text())
    assert values["hub"]["config"]["JupyterHub"]["hub_routespec"] == "/hub/api/"
    extra = values["hub"]["extraConfig"]["hublaunch-api-only"]
    assert 'c.Proxy.extra_routes = {"/": "http://hublaunch-app.' in extra
    assert values["hub"]["loadRoles"]["hublaunch"]["scopes"] == ["admin:users", "servers", "tokens"]
    egress = values["singleuser"]["networkPolicy"]["egressAllowRules"]
    assert egress["privateIPs"] is False and egress["cloudMetadataServer"] is False
    assert values["singleuser"]["networkPolicy"]["enabled"] is True
    assert values["singleuser"]["automountServiceAccountToken"] is False
    assert values["singleuser"]["uid"] != 0
    assert values["singleuser"]["memory"]["limit"] and values["singleuser"]["cpu"]["limit"]


def test_settings_are_read_from_files_named_like_the_variables(tmp_path: Path) -> None:
    """HUBLAUNCH_SECRETS_DIR: how the pods above get their secrets (files, mode 0400)."""
    (tmp_path / "HUBLAUNCH_ADMIN_TOKEN").write_text("from-a-file\n")
    (tmp_path / "HUBLAUNCH_DATABASE_URL").write_text("sqlite:///from-a-file.sqlite")
    program = (
        "from worker.settings import Settings; s = Settings(); "
        "print(s.admin_token.get_secret_value(), s.database_url)"
    )
    result = subprocess.run(
        [sys.executable, "-c", program],
        env={"HUBLAUNCH_SECRETS_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.split() == ["from-a-file", "sqlite:///from-a-file.sqlite"]
