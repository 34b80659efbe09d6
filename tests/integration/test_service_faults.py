"""The services under hublaunch failing for real (issue 11): its Redis stopped and started
again (with and without append-only persistence), its Hub stopped for 30 s, its database
connections killed, two beat schedulers at once — all mid-launch.

Each test stops only what it started itself: its own ``redis-server`` on a free port, its own
stack's Hub, ``pg_terminate_backend`` on its own database's connections only. After each,
every launch is ready (each fault passed within the deadline), no launch had two Hub users,
and a cleanup pass leaves nothing behind.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from hublaunch.stack import Stack, free_port
from tests.integration.conftest import (
    PG_ADMIN_URL,
    keep_logs,
    read_events,
    start_stack,
    wait_for,
)
from tests.integration.test_faults import (
    assert_one_hub_user_each,
    end_all_and_check_nothing_is_left,
    launch,
    phases_with_failures,
    rows,
    statuses,
)
from worker.db import session_scope
from worker.hub_client import HubClient
from worker.models import LaunchEvent, Status

START_DELAY = 2.0


class RedisServer:
    """A redis-server of this test's own, on a free loopback port."""

    def __init__(self, folder: Path, *, append_only: bool) -> None:
        self.port = free_port()
        self.folder = folder
        self.append_only = append_only
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server must be installed (.ci/run installs it)"
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.append_only else "no",
                "--appendfsync",
                "always",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        wait_for(lambda: _answers(client), 10, f"redis-server on {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # a clean stop: the AOF, if any, is kept
            self.proc.wait(timeout=20)
        self.proc = None


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def own_redis(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, append_only=request.param)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def fault_stack(
    tmp_path_factory: pytest.TempPathFactory,
    make_database: Callable[[str], str],
    broker_url: str,
    label: str,
    env_extra: dict[str, str] | None = None,
    **options: Any,
) -> Stack:
    return start_stack(
        tmp_path_factory,
        label,
        make_database(label),
        broker_url,
        spawner="fake",
        beat=True,
        env={
            "HUBLAUNCH_FAKE_START_DELAY": str(START_DELAY),
            "HUBLAUNCH_LAUNCH_LEASE": "3",
            "HUBLAUNCH_RECOVER_INTERVAL": "1",
            "HUBLAUNCH_REDISPATCH_AFTER": "10",
            "HUBLAUNCH_CLIENT_RATE": "0",
            **(env_extra or {}),
        },
        **options,
    )


def wait_all_ready(stack: Stack, ids: list[str], timeout: float, what: str) -> float:
    started = time.monotonic()
    try:
        wait_for(lambda: statuses(stack, ids) == [Status.ready] * len(ids), timeout, what)
    except AssertionError as e:
        # Say where each launch stood, and keep the stack's logs (CI's artifacts).
        keep_logs(stack, f"not-ready-{time.strftime('%H%M%S')}")
        raise AssertionError(f"{e}; where each launch stood: {_last_events(stack, ids)}") from e
    return time.monotonic() - started


def _last_events(stack: Stack, ids: list[str]) -> dict[str, list[str]]:
    with session_scope(stack.config.database_url) as db:
        events = db.scalars(
            select(LaunchEvent)
            .where(LaunchEvent.launch_id.in_(ids))
            .order_by(LaunchEvent.launch_id, LaunchEvent.id)
        )
        found: dict[str, list[str]] = {launch_id: [] for launch_id in ids}
        for event in events:
            found[event.launch_id].append(f"{event.phase}: {event.message}")
        return {launch_id: lines[-4:] for launch_id, lines in found.items()}


def check_after(stack: Stack, ids: list[str]) -> None:
    assert phases_with_failures(stack, ids) == []
    hub = HubClient(stack.hub_api_url, stack.hub_token)
    try:
        with httpx.Client(base_url=stack.public_url, timeout=30) as client:
            assert_one_hub_user_each(stack, hub, ids)
            end_all_and_check_nothing_is_left(stack, client, hub, ids)
    finally:
        hub.close()


@pytest.mark.parametrize("own_redis", [False, True], ids=["no-aof", "aof"], indirect=True)
def test_redis_stopped_with_launches_queued_and_in_flight(
    tmp_path_factory: pytest.TempPathFactory,
    make_database: Callable[[str], str],
    own_redis: RedisServer,
) -> None:
    label = f"redis-{'aof' if own_redis.append_only else 'noaof'}"
    # One worker thread: two launches spawn one after the other, the rest wait in the queue.
    stack = fault_stack(tmp_path_factory, make_database, own_redis.url, label, worker_concurrency=1)
    try:
        with httpx.Client(base_url=stack.public_url, timeout=30) as client:
            ids = [launch(client) for _ in range(4)]
            wait_for(
                lambda: Status.launching in statuses(stack, ids), 20, "the first launch spawning"
            )
            own_redis.stop()  # queued messages die with it, unless it keeps an AOF
            time.sleep(3)
            refused = client.post("/api/launches", json={"image": "default"})
            # The intake says the queue is down and starts nothing; it never answers 500.
            assert refused.status_code == 503, refused.text
            own_redis.start()
            took = wait_all_ready(stack, ids, 60, "every launch ready after Redis came back")
            print(f"{label}: all 4 ready {took:.1f} s after Redis came back")
        check_after(stack, ids)
    finally:
        stack.stop()


def test_hub_stopped_for_30_seconds_mid_launch(
    tmp_path_factory: pytest.TempPathFactory,
    make_database: Callable[[str], str],
    redis_url: str,
) -> None:
    stack = fault_stack(tmp_path_factory, make_database, redis_url, "hub-down")
    try:
        with httpx.Client(base_url=stack.public_url, timeout=30) as client:
            ids = [launch(client) for _ in range(3)]
            wait_for(lambda: statuses(stack, ids) == [Status.launching] * 3, 20, "three spawning")
            stack.stop("hub")  # the proxy stops with it: the public address answers nothing
            time.sleep(30)
            stack.start_child("hub")
            took = wait_all_ready(stack, ids, 60, "every launch ready after the Hub came back")
            print(f"hub down 30 s: all 3 ready {took:.1f} s after it came back")
        check_after(stack, ids)
    finally:
        stack.stop()


def test_database_connections_dropped_mid_launch(
    tmp_path_factory: pytest.TempPathFactory,
    make_database: Callable[[str], str],
    redis_url: str,
) -> None:
    stack = fault_stack(tmp_path_factory, make_database, redis_url, "pg-drop")
    database = make_url(stack.config.database_url).database
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with httpx.Client(base_url=stack.public_url, timeout=30) as client:
            ids = [launch(client) for _ in range(3)]
            killed = 0
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:  # again and again, through every step
                with admin.connect() as conn:
                    killed += conn.execute(
                        text(
                            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE datname = :db AND pid <> pg_backend_pid()"
                        ),
                        {"db": database},
                    ).scalar_one()
                time.sleep(0.3)
            assert killed > 0
            took = wait_all_ready(stack, ids, 40, "every launch ready")
            print(f"pg_terminate_backend: {killed} connections dropped; ready {took:.1f} s after")
        check_after(stack, ids)
    finally:
        admin.dispose()
        stack.stop()


def test_two_beats_and_a_killed_worker(
    tmp_path_factory: pytest.TempPathFactory,
    make_database: Callable[[str], str],
    redis_url: str,
) -> None:
    stack = fault_stack(tmp_path_factory, make_database, redis_url, "two-beats")
    second = subprocess.Popen(
        [*_hublaunch(), "beat"],
        env={
            **stack.environ("beat"),
            "HUBLAUNCH_BEAT_SCHEDULE_FILE": str(stack.config.data_dir / "second-schedule"),
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        with httpx.Client(base_url=stack.public_url, timeout=30) as client:
            ids = [launch(client) for _ in range(3)]
            wait_for(lambda: statuses(stack, ids) == [Status.launching] * 3, 20, "three spawning")
            stack.kill("worker")
            stack.start_child("worker")
            wait_all_ready(stack, ids, 30, "every launch ready")
        # Both beats' sweeps ran; each dead run's launch was sent again once.
        sent = _log_lines(stack, "recover: sent")
        for launch_id in ids:
            assert sum(launch_id in line for line in sent) == 1, sent
        check_after(stack, ids)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=20)
        stack.stop()


def _hublaunch() -> list[str]:
    return [sys.executable, "-m", "hublaunch.cli"]


def _log_lines(stack: Stack, marker: str) -> list[str]:
    text_ = (stack.logs / "worker.log").read_text(errors="replace")
    return [line for line in text_.splitlines() if marker in line]


def test_a_launch_whose_deadline_passes_while_its_server_starts(
    tmp_path_factory: pytest.TempPathFactory,
    make_database: Callable[[str], str],
    redis_url: str,
) -> None:
    """The launch timeout (4 s) runs out while the Hub still starts the server (6 s), with a
    cleanup pass every second racing the launch task: the visitor gets one failed event
    that says why, the Hub user goes, and nothing is left."""
    stack = start_stack(
        tmp_path_factory,
        "deadline",
        make_database("deadline"),
        redis_url,
        spawner="fake",
        beat=True,
        env={
            "HUBLAUNCH_FAKE_START_DELAY": "6",
            "HUBLAUNCH_LAUNCH_TIMEOUT": "4",
            "HUBLAUNCH_CULL_INTERVAL": "1",
            "HUBLAUNCH_CLIENT_RATE": "0",
        },
    )
    try:
        with httpx.Client(base_url=stack.public_url, timeout=30) as client:
            launch_id = launch(client)
            events = read_events(client, launch_id)
            assert [e["phase"] for e in events].count("failed") == 1
            assert events[-1]["phase"] == "failed"
            assert "within 4 s" in events[-1]["message"], events[-1]["message"]
            wait_for(
                lambda: (
                    statuses(stack, [launch_id]) == [Status.failed] and _removed(stack, launch_id)
                ),
                30,
                "the user of the failed launch removed",
            )
        hub = HubClient(stack.hub_api_url, stack.hub_token)
        try:
            assert not [
                u.name for u in hub.iter_users() if u.name.startswith("hl-") and not u.admin
            ]
        finally:
            hub.close()
    finally:
        stack.stop()


def _removed(stack: Stack, launch_id: str) -> bool:
    return rows(stack, [launch_id])[launch_id].user_removed_at is not None


def test_the_hubs_spawn_limit_is_waited_out_and_never_shown(
    tmp_path_factory: pytest.TempPathFactory,
    make_database: Callable[[str], str],
    redis_url: str,
) -> None:
    """A real Hub starting one server at a time (``concurrent_spawn_limit`` 1) answers the
    others' starts with 429: every launch is ready, and no visitor reads a status code."""
    stack = fault_stack(
        tmp_path_factory,
        make_database,
        redis_url,
        "spawn-limit",
        env_extra={"HUBLAUNCH_HUB_CONCURRENT_SPAWN_LIMIT": "1"},
    )
    try:
        with httpx.Client(base_url=stack.public_url, timeout=30) as client:
            ids = [launch(client) for _ in range(4)]
            wait_all_ready(stack, ids, 90, "every launch ready")
            messages = [e["message"] for i in ids for e in read_events(client, i)]
        assert any(m.startswith("The Hub is busy starting other servers") for m in messages)
        assert not any("429" in m for m in messages)
        check_after(stack, ids)
    finally:
        stack.stop()
