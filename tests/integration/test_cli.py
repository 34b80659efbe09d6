"""The `hublaunch` command as users run it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, inspect

from hublaunch.stack import REPO, free_port
from tests.integration.conftest import read_events

pytestmark = pytest.mark.integration
HUBLAUNCH = [sys.executable, "-m", "hublaunch.cli"]


def test_migrate_creates_the_tables(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.sqlite'}"
    env = {**os.environ, "HUBLAUNCH_DATABASE_URL": url}
    result = subprocess.run(
        [*HUBLAUNCH, "migrate"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "latest migration" in result.stdout
    assert {"launches", "launch_events"} <= set(inspect(create_engine(url)).get_table_names())


def test_dev_runs_the_whole_stack_and_ctrl_c_stops_it(tmp_path: Path, redis_url: str) -> None:
    port = free_port()
    env = {**os.environ, "HUBLAUNCH_BROKER_URL": redis_url}
    env.pop("HUBLAUNCH_DATABASE_URL", None)  # the embedded default: SQLite under ./.hublaunch
    proc = subprocess.Popen(
        [*HUBLAUNCH, "dev", "--port", str(port), "--spawner", "fake"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            output.append(line)
            if "Ctrl-C" in line or not line:
                break
        printed = "".join(output)
        assert f"hublaunch is running at http://127.0.0.1:{port}/" in printed, printed
        assert "sqlite:///.hublaunch/hublaunch.sqlite" in printed
        curl = re.search(r"curl -si -X POST (\S+)", printed)
        assert curl and curl.group(1) == f"http://127.0.0.1:{port}/api/launches"

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as api:
            accepted = api.post("/api/launches", json={"image": "default"})
            assert accepted.status_code == 202
            assert read_events(api, accepted.json()["id"])[-1]["phase"] == "ready"
            assert api.delete(f"/api/launches/{accepted.json()['id']}").status_code == 202
            time.sleep(1)
        children = _descendants(proc.pid)
        assert len(children) >= 4  # hub, proxy, api, worker, beat
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    assert (tmp_path / ".hublaunch" / "hublaunch.sqlite").exists()
    time.sleep(1)
    alive = [pid for pid in children if _alive(pid)]
    assert alive == [], f"still running after Ctrl-C: {alive}"


def _descendants(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            child = int(status.parent.name)
            found += [child, *_descendants(child)]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
