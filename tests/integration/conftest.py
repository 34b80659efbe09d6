"""Real parts, started once per run: PostgreSQL databases made fresh for this run, Redis (a db
number and queue names of our own), and whole hublaunch stacks (JupyterHub + proxy + API +
Celery worker) as subprocesses. A missing service fails the run loudly; nothing is skipped.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import create_engine, text

from bench.common import forget_keys
from hublaunch.stack import Stack, StackConfig
from tests.integration.gitserver import GitServer
from tests.standins.providers import Standin, serve
from worker.db import session_scope
from worker.hub_client import HubClient
from worker.hub_users import remove_hub_user
from worker.models import Launch

PG_ADMIN_URL = os.environ.get(
    "HUBLAUNCH_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("HUBLAUNCH_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")
RUN_ID = secrets.token_hex(4)
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
# The PostgreSQL and real-server stacks may launch repositories served on 127.0.0.1; the SQLite
# stack keeps the production default, which refuses them.
LOCAL_REPOS = {"HUBLAUNCH_ALLOW_LOCAL_REPOS": "1"}


@pytest.fixture(scope="session")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitServer]:
    server = GitServer(tmp_path_factory.mktemp("git"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as e:
        pytest.fail(f"Redis must answer at {REDIS_URL} (.ci/run starts it): {e}")
    yield REDIS_URL
    # Every key this run's stacks made names its queue (test-<run>-<label>...): the queues and
    # kombu's bindings, the metrics, the rate and watcher counters; so do its entries in kombu's
    # shared keys. None outlives the run.
    forget_keys(client, f"test-{RUN_ID}-")


@pytest.fixture(scope="session")
def make_database() -> Iterator[Callable[[str], str]]:
    """Create a fresh PostgreSQL database for this run; all are dropped at the end."""
    try:
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        admin.connect().close()
    except Exception as e:
        pytest.fail(f"PostgreSQL must answer at {PG_ADMIN_URL} (.ci/run starts it): {e}")
    made: list[str] = []

    def make(label: str) -> str:
        name = f"hublaunch_test_{RUN_ID}_{label}_{len(made)}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"

    yield make
    with admin.connect() as conn:
        for name in made:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def start_stack(
    tmp_path_factory: pytest.TempPathFactory,
    label: str,
    database_url: str,
    broker_url: str,
    **options: Any,
) -> Stack:
    data_dir = tmp_path_factory.mktemp(f"stack-{label}")
    options.setdefault("beat", False)
    # An operator's admin account with the prefix: cleanup must never touch it.
    options["env"] = {"HUBLAUNCH_HUB_ADMIN_USERS": "hl-admin", **options.get("env", {})}
    options["env"].setdefault("HUBLAUNCH_ADMIN_TOKEN", secrets.token_urlsafe(32))
    # Shared stacks hold many sessions across a run (no beat ends them): no waiting line there
    # unless a test asks for one (tests/integration/test_waiting_line.py).
    options["env"].setdefault("HUBLAUNCH_MAX_ACTIVE", "1000")
    # Tests launch many sessions from 127.0.0.1: no rate limit on the shared stacks unless a test
    # asks for one (tests/integration/test_limits.py).
    options["env"].setdefault("HUBLAUNCH_CLIENT_RATE", "100000/minute")
    stack = Stack(
        StackConfig(
            data_dir=data_dir,
            database_url=database_url,
            broker_url=broker_url,
            queue=f"test-{RUN_ID}-{label}",
            **options,
        )
    )
    return stack.start(timeout=90)


def keep_logs(stack: Stack, label: str) -> None:
    target = ARTIFACTS / "logs" / label
    target.mkdir(parents=True, exist_ok=True)
    for log in stack.logs.glob("*.log"):
        (target / log.name).write_bytes(log.read_bytes())


@pytest.fixture(scope="session")
def records() -> Iterator[Standin]:
    """Stand-ins of Zenodo, Figshare, Dataverse, HydroShare, CKAN and the DOI resolver, which
    the PostgreSQL stack's workers are pointed at; tests add records to its catalogue."""
    with serve() as standin:
        yield standin


def provider_env(url: str) -> dict[str, str]:
    return {
        "HUBLAUNCH_ZENODO_URL": url,
        "HUBLAUNCH_FIGSHARE_API_URL": f"{url}/v2",
        "HUBLAUNCH_DATAVERSE_URLS": url,
        "HUBLAUNCH_DOI_RESOLVER_URL": f"{url}/doi",
        "HUBLAUNCH_HYDROSHARE_URL": url,
    }


@pytest.fixture(scope="session")
def fake_stacks(
    tmp_path_factory: pytest.TempPathFactory,
    make_database: Callable[[str], str],
    redis_url: str,
    records: Standin,
) -> Iterator[dict[str, Stack]]:
    """One stack per database backend, each on its own Hub with the in-process fake spawner."""
    stacks: dict[str, Stack] = {}
    try:
        stacks["postgresql"] = start_stack(
            tmp_path_factory,
            "pg",
            make_database("fake"),
            redis_url,
            spawner="fake",
            env={**LOCAL_REPOS, **provider_env(records.url)},
        )
        stacks["sqlite"] = start_stack(
            tmp_path_factory,
            "sqlite",
            f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'hublaunch.sqlite'}",
            redis_url,
            spawner="fake",
        )
        yield stacks
    finally:
        for label, stack in stacks.items():
            stack.stop()
            keep_logs(stack, f"fake-{label}")


@pytest.fixture(scope="session", params=["postgresql", "sqlite"])
def stack(request: pytest.FixtureRequest, fake_stacks: dict[str, Stack]) -> Stack:
    return fake_stacks[request.param]


@pytest.fixture(scope="session")
def real_stack(
    tmp_path_factory: pytest.TempPathFactory, make_database: Callable[[str], str], redis_url: str
) -> Iterator[Stack]:
    """A stack whose Hub runs real jupyterhub-singleuser servers."""
    # Sandboxed, as shipped; 1 GiB per session so the out-of-memory test needs less memory.
    stack = start_stack(
        tmp_path_factory,
        "real",
        make_database("real"),
        redis_url,
        spawner="sandbox",
        # An operator who lets sessions reach the package index (off by default).
        env={
            **LOCAL_REPOS,
            "HUBLAUNCH_SESSION_MEMORY": "1G",
            "HUBLAUNCH_SESSION_EGRESS": "pypi.org:443",
        },
    )
    try:
        yield stack
    finally:
        stack.stop()
        keep_logs(stack, "real")


@pytest.fixture
def api(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.public_url, timeout=30) as client:
        yield client


@pytest.fixture
def hub(stack: Stack) -> Iterator[HubClient]:
    client = HubClient(stack.hub_api_url, stack.hub_token)
    yield client
    client.close()


def expire_and_cull(stack: Stack, launch_id: str) -> None:
    """Make a ready session expired, then run a cleanup pass in a process of its own."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    with session_scope(stack.config.database_url) as db:
        db.execute(
            update(Launch)
            .where(Launch.id == launch_id)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    run_cull(stack)


def run_cull(stack: Stack) -> str:
    """One cleanup pass in a process of its own (``hublaunch cull``); what it printed."""
    result = subprocess.run(
        [sys.executable, "-m", "hublaunch.cli", "cull"],
        env=stack.environ(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def hub_user_names(hub: HubClient) -> set[str]:
    return {user.name for user in hub.iter_users()}


def read_events(client: httpx.Client, launch_id: str, **headers: str) -> list[dict[str, Any]]:
    """Follow the event stream until it ends (it ends after ready or failed)."""
    import json

    events = []
    with client.stream(
        "GET", f"/api/launches/{launch_id}/events", headers=headers, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    return events


def wait_for(predicate: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def launch_row(stack: Stack, launch_id: str) -> Launch:
    with session_scope(stack.config.database_url) as db:
        launch = db.get(Launch, launch_id)
        assert launch is not None
        return launch


@pytest.fixture
def cleanup_users(stack: Stack, hub: HubClient) -> Iterator[None]:
    """Leave the Hub as we found it, whatever the test did."""
    before = hub_user_names(hub)
    yield
    leaked: list[str] = []
    for name in sorted(hub_user_names(hub) - before):
        try:
            wait_for(lambda n=name: remove_hub_user(hub, n), 20, f"removal of {name}")
        except Exception as e:  # every user is tried; the failures are reported together
            leaked.append(f"{name} ({type(e).__name__}: {e})")
    if leaked:
        pytest.fail(f"Hub users the test left behind could not be removed: {', '.join(leaked)}")
