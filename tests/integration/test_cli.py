"""The `hublaunch` command as users run it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest
from sqlalchemy import create_engine, inspect

from hublaunch.stack import REPO, free_port
from tests.integration.conftest import RUN_ID, read_events, wait_for

pytestmark = pytest.mark.integration
HUBLAUNCH = [sys.executable, "-m", "hublaunch.cli"]
BANNER_END = "Ctrl-C stops everything."
# A shutdown stops each child in turn, each given up to 15 s; a clean one takes a few seconds.
STOP_WITHIN = 30


def test_migrate_creates_the_tables(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.sqlite'}"
    env = {**os.environ, "HUBLAUNCH_DATABASE_URL": url}
    result = subprocess.run(
        [*HUBLAUNCH, "migrate"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "latest migration" in result.stdout
    assert {"launches", "launch_events"} <= set(inspect(create_engine(url)).get_table_names())


class Output:
    """What a child prints, read by a thread, so a wait for a line has a deadline even when
    the child prints nothing more."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)


class Dev:
    """A running `hublaunch dev` and what it printed."""

    def __init__(self, proc: subprocess.Popen[str], output: Output, data: Path) -> None:
        self.proc, self.output, self.data = proc, output, data

    def wait_for_banner(self, timeout: float = 90) -> str:
        """What it printed up to the end of its banner."""
        wait_for(
            lambda: BANNER_END in self.output.text or self.proc.poll() is not None,
            timeout,
            "the banner of hublaunch dev",
        )
        printed = self.output.text
        assert BANNER_END in printed, f"exited with {self.proc.returncode}:\n{printed}"
        return printed

    def log(self, name: str) -> str:
        path = self.data / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextlib.contextmanager
def hublaunch_dev(
    cwd: Path, redis_url: str, env: dict[str, str] | None = None, **popen: object
) -> Iterator[Dev]:
    port = free_port()
    environ = {
        **os.environ,
        "HUBLAUNCH_BROKER_URL": redis_url,
        # `hublaunch dev` adds its port (test-<run>-dev-<port>): the run's cleanup finds its keys.
        "HUBLAUNCH_QUEUE": f"test-{RUN_ID}-dev",
        "PYTHONPATH": str(REPO),
    }
    environ.pop("HUBLAUNCH_DATABASE_URL", None)  # the embedded default: SQLite under ./.hublaunch
    proc = subprocess.Popen(
        [*HUBLAUNCH, "dev", "--port", str(port), "--spawner", "fake"],
        cwd=cwd,
        env={**environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **popen,  # type: ignore[call-overload]
    )
    assert proc.stdout is not None
    try:
        yield Dev(proc, Output(proc.stdout), cwd / ".hublaunch")
    finally:
        # Whatever the test did: nothing of this stack may outlive it.
        if proc.poll() is None:
            children = _descendants(proc.pid)
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(STOP_WITHIN)
            except subprocess.TimeoutExpired:
                for pid in [proc.pid, *children]:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                proc.wait()


def test_dev_runs_the_whole_stack_and_ctrl_c_stops_it(tmp_path: Path, redis_url: str) -> None:
    # A pass every second, so one runs while the test does: none may find the Hub down.
    with hublaunch_dev(tmp_path, redis_url, {"HUBLAUNCH_CULL_INTERVAL": "1"}) as dev:
        printed = dev.wait_for_banner()
        running = re.search(r"hublaunch is running at (http://127\.0\.0\.1:\d+)/", printed)
        assert running, printed
        public = running.group(1)
        assert "sqlite:///.hublaunch/hublaunch.sqlite" in printed
        curl = re.search(r"curl -si -X POST (\S+)", printed)
        assert curl and curl.group(1) == f"{public}/api/launches"
        # Nothing that reads as an error before the banner: no alembic chatter, no readiness
        # probe answered 404, neither printed nor in the Hub's (and its proxy's) log.
        before = printed[: printed.index("hublaunch is running at")]
        assert not re.search(r"\b404\b|\bINFO\b|alembic", before), before
        assert "404 GET" not in dev.log("hub"), dev.log("hub")

        with httpx.Client(base_url=public, timeout=30) as api:
            accepted = api.post("/api/launches", json={"image": "default"})
            assert accepted.status_code == 202
            launch = f"/api/launches/{accepted.json()['id']}"
            assert read_events(api, accepted.json()["id"])[-1]["phase"] == "ready"
            assert api.delete(launch).status_code == 202
            wait_for(lambda: api.get(launch).json()["status"] == "ended", 30, "the teardown")
        wait_for(
            lambda: re.search(r"hublaunch\.cull\[\S+\] succeeded", dev.log("worker")),
            30,
            "a cleanup pass",
        )
        assert "cannot list Hub users" not in dev.log("worker")
        children = _processes(_descendants(dev.proc.pid))
        assert len(children) >= 5, children  # hub, proxy, api, worker, beat

        dev.proc.send_signal(signal.SIGINT)
        assert dev.proc.wait(STOP_WITHIN) == 0
    assert "stopping..." in dev.output.text
    assert (tmp_path / ".hublaunch" / "hublaunch.sqlite").exists()
    _wait_all_gone(children)


def test_dev_stops_on_sigint_even_when_started_with_sigint_ignored(
    tmp_path: Path, redis_url: str
) -> None:
    """As a shell starts a script's background job: SIGINT ignored. `kill -INT` must still
    stop the whole stack."""

    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    with hublaunch_dev(tmp_path, redis_url, preexec_fn=ignore_sigint) as dev:
        dev.wait_for_banner()
        children = _processes(_descendants(dev.proc.pid))
        assert len(children) >= 5, children
        dev.proc.send_signal(signal.SIGINT)
        try:
            assert dev.proc.wait(STOP_WITHIN) == 0
        except subprocess.TimeoutExpired:
            pytest.fail(f"hublaunch dev ignored SIGINT for {STOP_WITHIN} s")
    assert "stopping..." in dev.output.text
    _wait_all_gone(children)


def _wait_all_gone(processes: dict[int, str], timeout: float = 10) -> None:
    """The Hub ends its proxy as it exits, without waiting for it: allow the proxy a moment."""

    def alive() -> list[int]:
        return [pid for pid, started in processes.items() if _started(pid) == started]

    with contextlib.suppress(AssertionError):
        wait_for(lambda: not alive(), timeout, "the stack's processes to end")
    assert alive() == [], f"still running after SIGINT: {alive()}"


def _processes(pids: list[int]) -> dict[int, str]:
    """Each process with its start time, so a reused pid is not mistaken for it."""
    return {pid: started for pid in pids if (started := _started(pid))}


def _started(pid: int) -> str:
    """The process's start time, or "" when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return ""
    return "" if fields[0] == "Z" else fields[19]


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
