"""Where no box can be made: hublaunch dev says so loudly; the shipped Hub config refuses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hublaunch import dev

REPO = Path(__file__).resolve().parents[2]
JUPYTERHUB = str(Path(sys.executable).parent / "jupyterhub")


def test_dev_runs_sandboxed_where_it_can(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dev, "unavailable", lambda: None)
    spawner, note = dev.choose_spawner("sandbox")
    assert spawner == "sandbox" and note.startswith("sandboxed")


def test_dev_falls_back_loudly_where_it_cannot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dev, "unavailable", lambda: "'bwrap' is not installed")
    spawner, note = dev.choose_spawner("sandbox")
    assert spawner == "local"
    assert note.startswith("NOT SANDBOXED ('bwrap' is not installed)")
    assert "secrets" in note


def test_an_explicit_local_spawner_is_announced_as_unsandboxed() -> None:
    assert dev.choose_spawner("local") == ("local", dev.UNSANDBOXED.format(why="--spawner local"))


def start_hub(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HUBLAUNCH_HUB_API_TOKEN": "x" * 32,
        "HUBLAUNCH_HUB_DATA_DIR": str(tmp_path / "hub"),
        **env,
    }
    return subprocess.run(
        [sys.executable, JUPYTERHUB, "-f", str(REPO / "hub" / "jupyterhub_config.py")],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


def test_the_shipped_config_refuses_the_unsandboxed_spawner_without_the_opt_out(
    tmp_path: Path,
) -> None:
    result = start_hub(tmp_path, HUBLAUNCH_HUB_SPAWNER="local")
    assert result.returncode != 0
    assert "HUBLAUNCH_ALLOW_UNSANDBOXED=1" in result.stderr + result.stdout


def test_the_shipped_config_refuses_to_start_where_no_box_can_be_made(tmp_path: Path) -> None:
    # No bubblewrap on the PATH: the sandbox cannot be made, and the Hub must not start.
    result = start_hub(tmp_path, PATH=str(Path(sys.executable).parent))
    assert result.returncode != 0
    assert "cannot sandbox sessions here: 'bwrap' is not installed" in result.stderr + result.stdout
