"""Imports go one way: api -> worker, hublaunch -> both, hub and worker -> sandbox; only three
modules import Celery."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CELERY_MODULES = {"worker/celery_app.py", "worker/tasks.py", "worker/enqueue.py"}


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", sources("worker"), ids=str)
def test_worker_never_imports_the_http_layer(path: Path) -> None:
    assert not imports(path) & {"api", "hublaunch", "fastapi", "starlette"}


@pytest.mark.parametrize("path", sources("api") + sources("worker") + sources("hub"), ids=str)
def test_only_the_queue_modules_import_celery(path: Path) -> None:
    relative = str(path.relative_to(ROOT))
    if relative not in CELERY_MODULES:
        assert not imports(path) & {"celery", "kombu"}, relative


@pytest.mark.parametrize("path", sources("hub") + sources("sandbox"), ids=str)
def test_the_hub_side_imports_nothing_of_ours_but_the_sandbox(path: Path) -> None:
    assert not imports(path) & {"api", "worker", "hublaunch"}


@pytest.mark.parametrize("path", sources("sandbox"), ids=str)
def test_the_sandbox_stands_alone(path: Path) -> None:
    # The Hub and the worker both use it; it must not pull either in.
    assert not imports(path) & {"api", "worker", "hublaunch", "hub"}
