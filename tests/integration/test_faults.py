"""Faults done for real (issue 11): workers SIGKILLed at each launch step, servers that die
while starting. Each test asserts what a visitor sees within a deadline, that no launch ever
had two Hub users, and that one cleanup pass afterwards finds nothing left behind.

The stack is this module's own (its Hub, worker, beat, database and queue), so killing its
worker touches nothing else. Its fake spawner takes 3 s to start a server, which holds every
launch in "spawn requested" long enough to kill a worker there; its leases are short (3 s,
swept every second) so the tests wait seconds, not the production defaults' 15.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from hublaunch.stack import Stack
from tests.integration.conftest import (
    LOCAL_REPOS,
    read_events,
    run_cull,
    start_stack,
    wait_for,
)
from tests.integration.gitserver import GitServer
from worker.db import session_scope
from worker.hub_client import HubClient
from worker.models import Build, BuildStatus, Launch, LaunchEvent, Status

# What a visitor may wait, after the worker died, for the launch to be ready again.
RECOVERY_DEADLINE = 30.0
START_DELAY = 3.0


@pytest.fixture(scope="module")
def fault_stack(
    tmp_path_factory: pytest.TempPathFactory, make_database: Any, redis_url: str
) -> Iterator[Stack]:
    stack = start_stack(
        tmp_path_factory,
        "faults",
        make_database("faults"),
        redis_url,
        spawner="fake",
        beat=True,
        worker_concurrency=8,
        env={
            "HUBLAUNCH_FAKE_START_DELAY": str(START_DELAY),
            "HUBLAUNCH_FAKE_FAILING_STARTS": "flaky:2,broken:1000",
            "HUBLAUNCH_LAUNCH_LEASE": "3",
            "HUBLAUNCH_RECOVER_INTERVAL": "1",
            "HUBLAUNCH_CLIENT_RATE": "0",
            **LOCAL_REPOS,
        },
    )
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def client(fault_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fault_stack.public_url, timeout=30) as http:
        yield http


@pytest.fixture
def hub(fault_stack: Stack) -> Iterator[HubClient]:
    http = HubClient(fault_stack.hub_api_url, fault_stack.hub_token)
    yield http
    http.close()


def launch(client: httpx.Client, image: str = "default") -> str:
    response = client.post("/api/launches", json={"image": image})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def rows(stack: Stack, ids: list[str]) -> dict[str, Launch]:
    with session_scope(stack.config.database_url) as db:
        return {r.id: r for r in db.scalars(select(Launch).where(Launch.id.in_(ids)))}


def statuses(stack: Stack, ids: list[str]) -> list[Status]:
    found = rows(stack, ids)
    return [found[i].status for i in ids]


def phases_with_failures(stack: Stack, ids: list[str]) -> list[str]:
    with session_scope(stack.config.database_url) as db:
        return list(
            db.scalars(
                select(LaunchEvent.launch_id).where(
                    LaunchEvent.launch_id.in_(ids), LaunchEvent.phase == "failed"
                )
            )
        )


def end_all_and_check_nothing_is_left(
    stack: Stack, client: httpx.Client, hub: HubClient, ids: list[str]
) -> None:
    """DELETE every launch; once they are ended, one cleanup pass finds no orphan and the Hub
    holds none of their users."""
    for launch_id in ids:
        assert client.delete(f"/api/launches/{launch_id}").status_code == 202
    wait_for(
        lambda: all(r.user_removed_at is not None for r in rows(stack, ids).values()),
        60,
        "every launch's Hub user removed",
    )
    printed = run_cull(stack)
    assert "orphan" not in printed, printed
    left = {u.name for u in hub.iter_users()} & {r.hub_user for r in rows(stack, ids).values()}
    assert left == set()


def assert_one_hub_user_each(stack: Stack, hub: HubClient, ids: list[str]) -> None:
    """Every launch has one Hub user, and the Hub has no other user of this stack's making."""
    found = rows(stack, ids)
    names = {r.hub_user for r in found.values()}
    assert None not in names and len(names) == len(ids)
    on_hub = {u.name for u in hub.iter_users() if u.name.startswith("hl-") and not u.admin}
    assert on_hub <= names | _others(stack, ids), on_hub - names


def _others(stack: Stack, ids: list[str]) -> set[str]:
    """Hub users of this stack's other launches (earlier tests of the module)."""
    with session_scope(stack.config.database_url) as db:
        return {
            name
            for name in db.scalars(select(Launch.hub_user).where(Launch.id.not_in(ids)))
            if name
        }


def test_launches_in_flight_resume_within_seconds_after_the_worker_is_killed(
    fault_stack: Stack, client: httpx.Client, hub: HubClient
) -> None:
    ids = [launch(client) for _ in range(3)]
    # All three are in the Hub's hands (user created, spawn requested) and will be for 3 s.
    wait_for(
        lambda: all(r.status == Status.launching for r in rows(fault_stack, ids).values()),
        20,
        "three launches spawning",
    )
    fault_stack.kill("worker")
    killed = time.monotonic()
    fault_stack.start_child("worker")

    wait_for(
        lambda: statuses(fault_stack, ids) == [Status.ready] * 3,
        RECOVERY_DEADLINE,
        "the three launches ready on the new worker",
    )
    recovered = time.monotonic() - killed
    print(f"recovered 3 in-flight launches {recovered:.1f} s after the SIGKILL")
    assert phases_with_failures(fault_stack, ids) == []
    assert_one_hub_user_each(fault_stack, hub, ids)
    # The visitor's stream: ready, with a working URL.
    ready = read_events(client, ids[0])[-1]
    assert ready["phase"] == "ready" and "token" in ready
    end_all_and_check_nothing_is_left(fault_stack, client, hub, ids)


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_the_worker_killed_at_random_steps_again_and_again(
    fault_stack: Stack, client: httpx.Client, hub: HubClient, pool: str
) -> None:
    """Five rounds: a launch, then the worker (or, with prefork, the child running tasks)
    killed 0-4 s later (queued, user created, spawn requested, token issued, ready), and a
    new one started at once. Every launch ends ready."""
    if fault_stack.config.worker_pool != pool:
        fault_stack.kill("worker")
        fault_stack.config.worker_pool = pool
        fault_stack.start_child("worker")
    rng = random.Random(11)
    ids: list[str] = []
    seen: list[str] = []
    if pool == "threads":
        # Queued: the only worker dies before it takes the message.
        fault_stack.kill("worker")
        ids.append(launch(client))
        seen.append(str(rows(fault_stack, ids)[ids[0]].status))
        fault_stack.start_child("worker")
    for _ in range(5):
        ids.append(launch(client))
        time.sleep(rng.uniform(0, START_DELAY + 1.0))
        seen.append(str(rows(fault_stack, ids[-1:])[ids[-1]].status))
        if pool == "prefork":
            _kill_pool_children(fault_stack)
        else:
            fault_stack.kill("worker")
            fault_stack.start_child("worker")
    print(f"statuses when killed ({pool}): {seen}")
    wait_for(
        lambda: statuses(fault_stack, ids) == [Status.ready] * len(ids),
        RECOVERY_DEADLINE + 10,
        "every launch ready",
    )
    assert phases_with_failures(fault_stack, ids) == []
    assert_one_hub_user_each(fault_stack, hub, ids)
    end_all_and_check_nothing_is_left(fault_stack, client, hub, ids)


def _kill_pool_children(stack: Stack) -> None:
    """SIGKILL the prefork pool's child processes (Celery starts new ones by itself)."""
    parent = stack.procs["worker"].pid
    children = [
        int(pid)
        for pid in subprocess.run(
            ["pgrep", "-P", str(parent)], capture_output=True, text=True
        ).stdout.split()
    ]
    assert children, "the prefork worker has no child processes"
    for pid in children:
        with contextlib.suppress(ProcessLookupError):  # it may have exited meanwhile
            os.kill(pid, signal.SIGKILL)


def test_a_server_that_dies_while_starting_is_replaced(
    fault_stack: Stack, client: httpx.Client, hub: HubClient
) -> None:
    launch_id = launch(client, image="flaky")  # its first two servers die
    events = read_events(client, launch_id)
    assert events[-1]["phase"] == "ready"
    tries = [e["message"] for e in events if "starting a fresh one" in e["message"]]
    assert [t.rsplit("(", 1)[1] for t in tries] == ["try 2 of 4)", "try 3 of 4)"]
    assert rows(fault_stack, [launch_id])[launch_id].spawn_failures == 2
    end_all_and_check_nothing_is_left(fault_stack, client, hub, [launch_id])


def test_a_server_that_always_dies_fails_with_a_reason_after_the_last_try(
    fault_stack: Stack, client: httpx.Client, hub: HubClient
) -> None:
    launch_id = launch(client, image="broken")
    events = read_events(client, launch_id)
    assert events[-1]["phase"] == "failed"
    assert events[-1]["message"].startswith("The server could not be started (4 times): ")
    row = rows(fault_stack, [launch_id])[launch_id]
    assert row.status == Status.failed and row.spawn_failures == 4
    wait_for(
        lambda: rows(fault_stack, [launch_id])[launch_id].user_removed_at is not None,
        30,
        "the failed launch's user removed",
    )
    assert row.hub_user not in {u.name for u in hub.iter_users()}


# An in-tree build backend (no download) whose wheel takes a few seconds to build: a window to
# kill the worker while the build runs in its box.
SLOW_BACKEND = """
import base64, hashlib, os, time, zipfile

def get_requires_for_build_wheel(config_settings=None):
    return []

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    time.sleep(6)
    name = "slowpkg-1-py3-none-any.whl"
    files = {
        "slowpkg.py": "X = 1\\n",
        "slowpkg-1.dist-info/METADATA": "Metadata-Version: 2.1\\nName: slowpkg\\nVersion: 1\\n",
        "slowpkg-1.dist-info/WHEEL": (
            "Wheel-Version: 1.0\\nGenerator: test\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"
        ),
    }
    record = []
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as wheel:
        for path, text in files.items():
            data = text.encode()
            wheel.writestr(path, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append("%s,sha256=%s,%d" % (path, digest.decode(), len(data)))
        record.append("slowpkg-1.dist-info/RECORD,,")
        wheel.writestr("slowpkg-1.dist-info/RECORD", "\\n".join(record) + "\\n")
    return name
"""


def test_the_worker_killed_while_a_repository_builds(
    fault_stack: Stack, client: httpx.Client, hub: HubClient, git_server: GitServer
) -> None:
    """The build's box dies with its worker; the next worker builds again once the build's
    heartbeat is stale (15 s), and the launch that waited for it is ready."""
    git_server.commit(
        "slow-build",
        {
            "requirements.txt": "./pkg\n",
            "pkg/pyproject.toml": (
                "[build-system]\nrequires = []\nbuild-backend = 'slow_backend'\n"
                "backend-path = ['.']\n"
            ),
            "pkg/slow_backend.py": SLOW_BACKEND,
        },
    )
    body = {"repo": git_server.url("slow-build"), "ref": "main"}
    response = client.post("/api/launches", json=body)
    assert response.status_code == 202, response.text
    launch_id = response.json()["id"]
    wait_for(
        lambda: _building(fault_stack) or rows(fault_stack, [launch_id])[launch_id].is_terminal,
        60,
        "the build running",
    )
    assert _building(fault_stack), read_events(client, launch_id)
    time.sleep(2)  # inside pip, inside the box
    fault_stack.kill("worker")
    fault_stack.start_child("worker")

    events = read_events(client, launch_id)
    assert events[-1]["phase"] == "ready", events[-1]
    with session_scope(fault_stack.config.database_url) as db:
        [build] = [b for b in db.scalars(select(Build)) if "slow-build" in b.repo]
        assert build.status == BuildStatus.built and build.attempts == 2
    end_all_and_check_nothing_is_left(fault_stack, client, hub, [launch_id])


def _building(stack: Stack) -> bool:
    with session_scope(stack.config.database_url) as db:
        return any(
            b.status == BuildStatus.building and "slow-build" in b.repo
            for b in db.scalars(select(Build))
        )
