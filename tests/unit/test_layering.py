"""The architecture's rules, checked on the source: which package may import which module,
where Celery may appear, and that only the unit of work commits and sends."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Celery is imported where tasks are defined (tasks, celery_app) and sent (broker) only.
CELERY_MODULES = {"worker/celery_app.py", "worker/tasks.py", "worker/broker.py"}
# What the HTTP layer may use of the worker package: the domain's public modules. The task
# orchestration (starting, teardown, cull, builds, tasks, context, hub_users) is the worker's.
API_MAY_IMPORT = {
    "worker",
    # The watcher count of /build streams (the API counts, the abandon task reads).
    "worker.abandon",
    "worker.broker",
    "worker.crypto",
    "worker.db",
    "worker.hub_client",
    "worker.logs",
    "worker.metrics",
    "worker.models",
    "worker.notify",
    # Several Hubs: which there are, and the placement's counts (metrics, URLs, health).
    "worker.hubs",
    "worker.placement",
    # Which warm pools the settings ask for (metrics and the admin API show them).
    "worker.pool_config",
    "worker.pool_demand",  # each pool's size now, for the metrics and the admin API
    "worker.clients",  # who asked for a launch, as the intake records it
    "worker.queries",
    "worker.repos",
    "worker.settings",
    # What a repository spec points at (a git repository or a data record): intake and links.
    "worker.sources",
    "worker.transitions",
    "worker.unit_of_work",
}


def modules(path: Path) -> set[str]:
    """The modules a file imports: ``import a.b`` gives a.b, ``from a import b`` gives a, and
    a.b too when a is a package of ours (so ``from worker import cull`` counts as worker.cull)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            package = ROOT / node.module.replace(".", "/")
            for alias in node.names:
                if (package / f"{alias.name}.py").exists() or (package / alias.name).is_dir():
                    found.add(f"{node.module}.{alias.name}")
    return found


def roots(path: Path) -> set[str]:
    return {name.split(".")[0] for name in modules(path)}


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", sources("worker"), ids=relative)
def test_worker_never_imports_the_http_layer(path: Path) -> None:
    assert not roots(path) & {"api", "hublaunch", "fastapi", "starlette"}


@pytest.mark.parametrize("path", sources("api"), ids=relative)
def test_api_uses_only_the_domains_public_modules(path: Path) -> None:
    used = {m for m in modules(path) if m.split(".")[0] == "worker"}
    outside = used - API_MAY_IMPORT
    assert not outside, f"{relative(path)} reaches into the worker's internals: {sorted(outside)}"


@pytest.mark.parametrize("path", sources("api") + sources("worker") + sources("hub"), ids=relative)
def test_only_the_queue_modules_import_celery(path: Path) -> None:
    if relative(path) not in CELERY_MODULES:
        assert not roots(path) & {"celery", "kombu"}, relative(path)


def calls(path: Path, attribute: str) -> list[int]:
    """Lines where ``<anything>.<attribute>(...)`` is called."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == attribute
    ]


PRODUCTION = sources("api") + sources("worker") + sources("hublaunch")


@pytest.mark.parametrize("path", PRODUCTION, ids=relative)
def test_only_the_unit_of_work_commits(path: Path) -> None:
    # worker/db.py's session_scope is the transaction the unit of work wraps.
    if relative(path) not in {"worker/unit_of_work.py", "worker/db.py"}:
        assert calls(path, "commit") == [], f"{relative(path)} commits by hand"


@pytest.mark.parametrize("path", PRODUCTION, ids=relative)
def test_only_the_broker_sends_tasks(path: Path) -> None:
    if relative(path) != "worker/broker.py":
        assert calls(path, "send_task") == [], f"{relative(path)} sends a task by hand"


@pytest.mark.parametrize("path", PRODUCTION, ids=relative)
def test_the_service_writes_through_units_of_work(path: Path) -> None:
    # ``session_scope`` commits whatever its block did, with no outbox: only the unit of work
    # (and tests' and bench scripts' set-up) may use it.
    if relative(path) not in {"worker/db.py", "worker/unit_of_work.py"}:
        assert "worker.db.session_scope" not in modules(path), relative(path)


@pytest.mark.parametrize("path", PRODUCTION, ids=relative)
def test_only_the_state_machine_writes_a_status(path: Path) -> None:
    """Assignments to ``.status`` of a launch, or ``status=`` in an UPDATE of launches, appear
    in worker/transitions.py only (builds write their own table's status)."""
    if relative(path) in {"worker/transitions.py", "worker/builds.py"}:
        return
    tree = ast.parse(path.read_text())
    writes = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and any(
            isinstance(t, ast.Attribute)
            and t.attr == "status"
            and not (isinstance(t.value, ast.Name) and t.value.id == "self")
            for t in _targets(node)
        )
    ]
    writes += [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "values"
        and any(k.arg in {"status", "token_ciphertext", "ended_at"} for k in node.keywords)
    ]
    assert writes == [], f"{relative(path)} writes a launch's status at lines {writes}"


def _targets(node: ast.Assign) -> list[ast.expr]:
    out: list[ast.expr] = []
    for target in node.targets:
        out.extend(target.elts if isinstance(target, ast.Tuple) else [target])
    return out


def test_builds_write_no_launch_status() -> None:
    source = (ROOT / "worker/builds.py").read_text()
    assert not re.search(r"[Ll]aunch\.status = ", source)
    assert "bulk_update(Launch)" not in source


@pytest.mark.parametrize("path", sources("hub") + sources("sandbox"), ids=relative)
def test_the_hub_side_imports_nothing_of_ours_but_the_sandbox(path: Path) -> None:
    assert not roots(path) & {"api", "worker", "hublaunch"}


@pytest.mark.parametrize("path", sources("sandbox"), ids=relative)
def test_the_sandbox_stands_alone(path: Path) -> None:
    # The Hub and the worker both use it; it must not pull either in.
    assert not roots(path) & {"api", "worker", "hublaunch", "hub"}
