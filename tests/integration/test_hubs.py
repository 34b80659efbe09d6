"""Several Hubs behind one intake (issue 14), for real: three JupyterHubs, each with its own
proxy, on this machine (two with the fake spawner, the third starting real sandboxed
jupyterhub-singleuser servers), one app, one worker, one beat. Launches spread by free
capacity; a Hub killed mid-run gets no new launch and every launch placed after the kill is
ready on another Hub; its sessions are reported gone when it comes back without them; it is
used again; cleanup goes on over the Hubs that answer while one is down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from hublaunch.stack import Stack
from tests.integration.conftest import LOCAL_REPOS, run_cull, start_stack, wait_for
from tests.integration.gitserver import GitServer
from tests.integration.test_faults import launch
from worker.db import as_utc, session_scope
from worker.hub_client import HubClient
from worker.models import Build, HubHealth, Launch, Status

pytestmark = pytest.mark.integration

CAPACITY = 6


@pytest.fixture(scope="module")
def hubs_stack(
    tmp_path_factory: pytest.TempPathFactory,
    make_database: Callable[[str], str],
    redis_url: str,
) -> Iterator[Stack]:
    stack = start_stack(
        tmp_path_factory,
        "hubs",
        make_database("hubs"),
        redis_url,
        spawner="fake",
        beat=True,
        extra_hubs=2,
        extra_spawners=("fake", "sandbox"),
        hub_capacity=CAPACITY,
        env={
            "HUBLAUNCH_HUB_HEALTH_INTERVAL": "1",
            "HUBLAUNCH_FAKE_START_DELAY": "0.2",
            "HUBLAUNCH_MAX_ACTIVE": "1000",
            "HUBLAUNCH_CLIENT_RATE": "0",
            **LOCAL_REPOS,
        },
    )
    try:
        yield stack
    finally:
        stack.stop()


def placed(stack: Stack, ids: list[str]) -> dict[str, Launch]:
    with session_scope(stack.config.database_url) as db:
        found = {r.id: r for r in db.scalars(select(Launch).where(Launch.id.in_(ids)))}
        for row in found.values():
            db.expunge(row)
        return found


def ready_all(stack: Stack, ids: list[str], timeout: float = 60) -> dict[str, Launch]:
    def done() -> dict[str, Launch] | None:
        rows = placed(stack, ids)
        statuses = {r.status for r in rows.values()}
        assert Status.failed not in statuses, [r.error for r in rows.values()]
        return rows if statuses == {Status.ready} else None

    result: dict[str, Launch] = wait_for(done, timeout, f"{len(ids)} launches ready")
    return result


def public_urls(stack: Stack) -> dict[str, str]:
    return {"hub-1": stack.public_url, **{n: e.public_url for n, e in stack.extra.items()}}


def end_all(client: httpx.Client, ids: list[str]) -> None:
    for launch_id in ids:
        client.delete(f"/api/launches/{launch_id}")


def healthy(stack: Stack, name: str) -> bool | None:
    with session_scope(stack.config.database_url) as db:
        row = db.get(HubHealth, name)
        return None if row is None else row.healthy


def test_launches_spread_over_the_hubs_by_free_capacity(hubs_stack: Stack) -> None:
    stack = hubs_stack
    with httpx.Client(base_url=stack.app_url, timeout=30) as client:
        ids = [launch(client) for _ in range(6)]
        rows = ready_all(stack, ids)
        assert Counter(row.hub for row in rows.values()) == {"hub-1": 2, "hub-2": 2, "hub-3": 2}
        urls = public_urls(stack)
        for launch_id, row in rows.items():
            view = client.get(f"/api/launches/{launch_id}").json()
            # Each session is served by its own Hub's proxy, with its token.
            assert view["url"].startswith(f"{urls[str(row.hub)]}/user/{row.hub_user}/")
            assert httpx.get(view["url"], timeout=10, follow_redirects=True).status_code == 200
        end_all(client, ids)


def test_a_hub_that_dies_gets_no_new_launch_and_none_is_lost(hubs_stack: Stack) -> None:
    stack = hubs_stack
    with httpx.Client(base_url=stack.app_url, timeout=30) as client:
        before = [launch(client) for _ in range(3)]
        on_hub = ready_all(stack, before)
        victims = [i for i, row in on_hub.items() if row.hub == "hub-2"]
        assert victims
        stack.kill("hub-2")
        killed_at = datetime.now(UTC)
        # At once, before any health check noticed: a launch placed on the dead Hub finds it
        # gone before its user exists and is placed again elsewhere.
        after = [launch(client) for _ in range(6)]
        rows = ready_all(stack, after)
        assert all(row.hub in ("hub-1", "hub-3") for row in rows.values()), rows
        wait_for(lambda: healthy(stack, "hub-2") is False, 15, "hub-2 seen as down")
        with session_scope(stack.config.database_url) as db:
            row = db.get(HubHealth, "hub-2")
            assert row is not None and row.failing_since is not None
            noticed = (as_utc(row.failing_since) - killed_at).total_seconds()
        # Noticed by a launch placed there, or by the next check (every second here).
        assert noticed < 5, noticed
        print(f"hub-2 marked down {noticed:.1f} s after the kill")

        # A cleanup pass with hub-2 down: the others are covered; hub-2's sessions are not
        # taken for lost (their Hub cannot be asked).
        run_cull(stack)
        assert {r.status for r in placed(stack, victims).values()} == {Status.ready}

        # hub-2 comes back without its servers (they died with it): its sessions are reported
        # gone by the next pass, and it takes launches again.
        stack.start_child("hub-2")
        wait_for(lambda: healthy(stack, "hub-2") is True, 15, "hub-2 seen as up again")
        run_cull(stack)
        gone = placed(stack, victims)
        assert {(r.status, r.end_reason) for r in gone.values()} == {(Status.ended, "gone")}
        again = [launch(client) for _ in range(3)]
        back = ready_all(stack, again)
        assert "hub-2" in {row.hub for row in back.values()}
        end_all(client, before + after + again)


def test_per_hub_metrics_and_health(hubs_stack: Stack) -> None:
    stack = hubs_stack
    health = httpx.get(f"{stack.app_url}/api/health", timeout=10).json()
    assert {f"hub:{name}" for name in public_urls(stack)} <= set(health["checks"])
    token = stack.config.env["HUBLAUNCH_ADMIN_TOKEN"]

    def scrape() -> str:
        response = httpx.get(
            f"{stack.app_url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10
        )
        assert response.status_code == 200, response.text
        return response.text

    # Each Hub's requests are counted under its own name (its health checks at least; the
    # worker adds its counts to Redis every few seconds).
    checked = [f'family="GET /user",hub="{name}"' for name in public_urls(stack)]

    def counted() -> str | None:
        text = scrape()
        return text if all(c in text for c in checked) else None

    metrics: str = wait_for(counted, 30, "every Hub's health checks counted")
    for name in public_urls(stack):
        # Its gauges say it is up, its capacity and what it holds.
        assert f'hublaunch_hub_up{{hub="{name}"}} 1.0' in metrics, name
        assert f'hublaunch_hub_capacity{{hub="{name}"}} {float(CAPACITY)}' in metrics, name
        assert f'hublaunch_hub_sessions{{hub="{name}"}}' in metrics, name


def test_a_repository_is_built_for_the_hub_it_runs_on(
    hubs_stack: Stack, git_server: GitServer
) -> None:
    """Per-Hub builds (the venv builder): the environment is named for, and built from the
    build queue of, the Hub the launch is placed on; the session runs there."""
    stack = hubs_stack
    git_server.commit("per-hub", {"requirements.txt": "# nothing\n"})
    with httpx.Client(base_url=stack.app_url, timeout=30) as client:
        response = client.post(
            "/api/launches", json={"repo": git_server.url("per-hub"), "ref": "main"}
        )
        assert response.status_code == 202, response.text
        launch_id = response.json()["id"]
        [row] = ready_all(stack, [launch_id], timeout=120).values()
        assert row.hub and str(row.env_name).endswith(f"-{row.hub}")
        with session_scope(stack.config.database_url) as db:
            build = db.get(Build, str(row.env_name))
            assert build is not None and build.status == "built"
        end_all(client, [launch_id])


def test_every_hubs_proxy_shows_the_session_ended_page(hubs_stack: Stack) -> None:
    """Each Hub's proxy sends its default route to the app: a session that is gone, on any
    Hub, gets hublaunch's page (no Hub internals)."""
    for name, url in public_urls(hubs_stack).items():
        page = httpx.get(f"{url}/user/hl-no-such-session/lab", timeout=10)
        assert page.status_code == 404, name
        assert "There is no session at this address" in page.text, name
        assert "JupyterHub" not in page.text, name


def test_each_hub_holds_only_its_own_users(hubs_stack: Stack) -> None:
    """No user is made on two Hubs: each Hub's prefixed users are the launches placed on it."""
    stack = hubs_stack
    with httpx.Client(base_url=stack.app_url, timeout=30) as client:
        ids = [launch(client) for _ in range(3)]
        rows = ready_all(stack, ids)
        tokens = {"hub-1": stack.hub_token, **{n: e.token for n, e in stack.extra.items()}}
        apis = {"hub-1": stack.hub_api_url, **{n: e.api_url for n, e in stack.extra.items()}}
        for name, api in apis.items():
            hub = HubClient(api, tokens[name])
            try:
                users = {u.name for u in hub.iter_users() if u.name.startswith("hl-")}
            finally:
                hub.close()
            mine = {r.hub_user for r in rows.values() if r.hub == name}
            theirs = {r.hub_user for r in rows.values() if r.hub != name}
            assert mine <= users and not theirs & users, name
        end_all(client, ids)


def test_a_worker_needs_only_the_database_redis_and_the_hubs(
    hubs_stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Workers run anywhere: one started in an empty folder of its own, with nothing of the
    stack's data folder (its key given as a value, not a file), takes the launches while the
    stack's own worker is stopped, on every Hub."""
    stack = hubs_stack
    elsewhere = tmp_path_factory.mktemp("another-host")
    key = (stack.config.data_dir / "secret.key").read_text().strip()
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "HOME": str(elsewhere),
        "HUBLAUNCH_DATABASE_URL": stack.config.database_url,
        "HUBLAUNCH_BROKER_URL": stack.config.broker_url,
        "HUBLAUNCH_QUEUE": stack.config.queue,
        "HUBLAUNCH_HUBS": stack.hubs_json(tokens=True),
        "HUBLAUNCH_SECRET_KEY": key,
    }
    stack.stop("worker")
    log = (elsewhere / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "hublaunch.cli", "worker", "--queues", stack.config.queue],
        cwd=elsewhere,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        with httpx.Client(base_url=stack.app_url, timeout=30) as client:
            ids = [launch(client) for _ in range(3)]
            rows = ready_all(stack, ids, timeout=90)
            assert {row.hub for row in rows.values()} == {"hub-1", "hub-2", "hub-3"}
            for launch_id in ids:
                view = client.get(f"/api/launches/{launch_id}").json()
                assert httpx.get(view["url"], timeout=10, follow_redirects=True).status_code == 200
            end_all(client, ids)
        # It wrote nothing outside its own folder: there is nothing of the stack's to use.
        assert not (elsewhere / ".hublaunch" / "secret.key").exists()
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)
        log.close()
        stack.start_child("worker")
