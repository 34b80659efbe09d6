"""Cleanup passes against the real Hub, real Redis and the real databases, with time moved by
injecting the pass's clock instead of sleeping."""

from __future__ import annotations

import secrets
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from hublaunch.stack import Stack
from tests.fakes import RecordingBroker
from tests.fakes import insert_launch as create_launch
from tests.integration.conftest import launch_row, read_events
from worker.broker import LAUNCH_TASK
from worker.context import WorkerContext
from worker.crypto import cipher
from worker.cull import Action, cull_pass
from worker.db import session_scope
from worker.hub_client import HubClient, HubUnavailable
from worker.models import Launch, Status
from worker.unit_of_work import Units

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_users")]


@pytest.fixture
def run_pass(stack: Stack, hub: HubClient) -> Callable[..., list[Action]]:
    """Run one pass in this process as if the clock read now + ``later`` seconds."""

    def run(
        later: float = 0,
        *,
        dry_run: bool = False,
        hub_client: Any = None,
        broker: RecordingBroker | None = None,
    ) -> list[Action]:
        settings = stack.settings()
        moment = datetime.now(UTC) + timedelta(seconds=later)
        ctx = WorkerContext(
            settings=settings,
            hub=hub_client or hub,
            cipher=cipher(settings),
            units=Units(settings.database_url, broker or RecordingBroker(settings.database_url)),
            clock=lambda: moment,
        )
        return cull_pass(ctx, dry_run=dry_run)

    return run


def launch_ready(api: httpx.Client, **body: Any) -> tuple[str, str]:
    response = api.post("/api/launches", json={"image": "default", **body})
    assert response.status_code == 202, response.text
    launch_id = response.json()["id"]
    assert read_events(api, launch_id)[-1]["phase"] == "ready"
    return launch_id, api.get(f"/api/launches/{launch_id}").json()["user"]


def status(api: httpx.Client, launch_id: str) -> dict[str, Any]:
    return dict(api.get(f"/api/launches/{launch_id}").json())


def by_launch(actions: list[Action]) -> dict[str | None, Action]:
    return {a.launch_id: a for a in actions}


def test_expired_sessions_end_and_younger_ones_stay(
    api: httpx.Client, hub: HubClient, run_pass: Callable[..., list[Action]]
) -> None:
    short, short_user = launch_ready(api, lifetime=60)
    long, long_user = launch_ready(api, lifetime=3600)

    actions = by_launch(run_pass(later=120))

    assert actions[short] == Action("expired", short_user, short, "ended")
    assert long not in actions
    ended = status(api, short)
    assert ended["status"] == "ended" and ended["end_reason"] == "expired"
    assert hub.get_user(short_user) is None
    assert status(api, long)["status"] == "ready" and hub.get_user(long_user) is not None


def test_idle_sessions_end_and_active_ones_stay(
    api: httpx.Client, hub: HubClient, run_pass: Callable[..., list[Action]]
) -> None:
    idle, idle_user = launch_ready(api)
    busy, busy_user = launch_ready(api)
    # What a running server reports to the Hub while someone works in it.
    hub.record_activity(busy_user, datetime.now(UTC) + timedelta(seconds=650))

    actions = by_launch(run_pass(later=700))  # idle timeout 600 s

    assert actions[idle].category == "idle" and actions[idle].result == "ended"
    assert busy not in actions
    assert status(api, idle)["end_reason"] == "idle" and hub.get_user(idle_user) is None
    assert status(api, busy)["status"] == "ready" and hub.get_user(busy_user) is not None


def test_activity_is_read_past_the_hubs_page_limit(stack: Stack, hub: HubClient) -> None:
    prefix = f"hl-page{secrets.token_hex(2)}-"
    names = [f"{prefix}{i:03d}" for i in range(230)]
    created = httpx.post(
        f"{stack.hub_api_url}/users",
        json={"usernames": names},
        headers={"Authorization": f"token {stack.hub_token}"},
        timeout=60,
    )
    assert created.status_code == 201
    listed = [u.name for u in hub.iter_users(name_filter=prefix, page_size=100)]
    assert sorted(listed) == names  # 230 > the Hub's unpaginated limit of 200


def test_stuck_launches_fail_and_lost_ones_are_sent_again(
    api: httpx.Client, hub: HubClient, stack: Stack, run_pass: Callable[..., list[Action]]
) -> None:
    stuck_user = f"hl-stuck{secrets.token_hex(4)}"
    hub.create_user(stuck_user)
    hub.start_server(stuck_user, {"image": "default"})
    long_ago = datetime.now(UTC) - timedelta(seconds=700)
    with session_scope(stack.config.database_url) as db:
        stuck = create_launch(db, {"image": "default"}, lifetime=60, now=long_ago)
        stuck.status, stuck.hub_user = Status.launching, stuck_user
        # A launch whose message never reached the broker (a crash between commit and send).
        lost = create_launch(
            db, {"image": "default"}, lifetime=60, now=datetime.now(UTC) - timedelta(seconds=200)
        )
    broker = RecordingBroker(stack.config.database_url)

    actions = by_launch(run_pass(broker=broker))

    assert actions[stuck.id].category == "stuck" and actions[stuck.id].result == "failed"
    failed = status(api, stuck.id)
    assert failed["status"] == "failed"
    assert failed["error"] == "The server did not start within 600 s. Try again in a few minutes."
    assert hub.get_user(stuck_user) is None
    assert actions[lost.id] == Action("lost", None, lost.id, "re-sent")
    assert broker.arguments(LAUNCH_TASK) == [lost.id]
    # Sent for real, the lost launch goes on to become ready.
    run_pass(broker=broker)  # no second re-send: its clock was reset
    assert broker.arguments(LAUNCH_TASK) == [lost.id]
    from worker.celery_app import create_celery

    create_celery(stack.settings()).send_task(LAUNCH_TASK, args=[lost.id])
    assert read_events(api, lost.id)[-1]["phase"] == "ready"


def test_orphans_go_and_everything_else_stays(
    api: httpx.Client, hub: HubClient, stack: Stack, run_pass: Callable[..., list[Action]]
) -> None:
    tag = secrets.token_hex(3)
    orphan, stranger, in_flight = f"hl-orphan{tag}", f"someone{tag}", f"hl-flight{tag}"
    for name in (orphan, stranger, in_flight, "hl-admin"):
        hub.create_user(name)
        hub.start_server(name, {"image": "default"})
    # A named server too: every server is stopped before the user is deleted.
    named = httpx.post(
        f"{stack.hub_api_url}/users/{orphan}/servers/extra",
        json={"user_options": {"image": "default"}},
        headers={"Authorization": f"token {stack.hub_token}"},
    )
    assert named.status_code in (201, 202)
    with session_scope(stack.config.database_url) as db:
        launch = create_launch(db, {"image": "default"}, lifetime=60)
        launch.status, launch.hub_user = Status.launching, in_flight

    young = run_pass(later=0)
    assert orphan not in {a.user for a in young}  # inside the grace period

    actions = run_pass(later=310)  # orphan grace 300 s

    assert Action("orphan", orphan, None, "deleted") in actions
    assert hub.get_user(orphan) is None
    for survivor in (stranger, in_flight, "hl-admin"):
        assert hub.get_user(survivor) is not None, survivor
        assert survivor not in {a.user for a in actions if a.category == "orphan"}
    assert launch_row(stack, launch.id).status == Status.launching
    for name in (stranger, "hl-admin", in_flight):
        hub.delete_user(name)


def test_ghosts_are_marked_ended(
    api: httpx.Client, hub: HubClient, run_pass: Callable[..., list[Action]]
) -> None:
    launch_id, user = launch_ready(api)
    hub.delete_user(user)  # e.g. an operator removed it, or the Hub lost its database

    actions = by_launch(run_pass())

    assert actions[launch_id] == Action("ghost", user, launch_id, "marked ended")
    gone = status(api, launch_id)
    assert gone["status"] == "ended" and gone["end_reason"] == "gone" and gone["url"] is None


def test_two_passes_at_once_end_each_session_exactly_once(
    api: httpx.Client, hub: HubClient, run_pass: Callable[..., list[Action]]
) -> None:
    launched = dict(launch_ready(api, lifetime=60) for _ in range(6))
    results: list[list[Action]] = []
    start = threading.Barrier(2)

    def one_pass() -> None:
        start.wait()
        results.append(run_pass(later=120))

    threads = [threading.Thread(target=one_pass) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    expired = [a.launch_id for result in results for a in result if a.category == "expired"]
    assert sorted(expired) == sorted(launched)  # each one, once, by one of the two passes
    assert not [a for result in results for a in result if a.result.startswith("error")]
    for launch_id, user in launched.items():
        assert status(api, launch_id)["end_reason"] == "expired"
        assert hub.get_user(user) is None


def test_dry_run_changes_nothing(
    api: httpx.Client, hub: HubClient, stack: Stack, run_pass: Callable[..., list[Action]]
) -> None:
    launch_id, user = launch_ready(api, lifetime=60)
    before = launch_row(stack, launch_id)

    actions = by_launch(run_pass(later=120, dry_run=True))

    assert actions[launch_id] == Action("expired", user, launch_id, "would end")
    after = launch_row(stack, launch_id)
    assert (after.status, after.end_requested_at, after.lease_until, after.updated_at) == (
        before.status,
        before.end_requested_at,
        before.lease_until,
        before.updated_at,
    )
    assert hub.get_user(user) is not None


class BrokenForOne:
    """The real Hub client, except that one user's removal always fails."""

    def __init__(self, hub: HubClient, broken: str) -> None:
        self._hub, self._broken = hub, broken

    def __getattr__(self, name: str) -> Any:
        return getattr(self._hub, name)

    def stop_server(self, name: str, server_name: str = "") -> bool:
        if name == self._broken:
            raise HubUnavailable("Hub answered 500: boom", status=500)
        return self._hub.stop_server(name, server_name)


def test_one_broken_user_does_not_stop_the_pass(
    api: httpx.Client, hub: HubClient, run_pass: Callable[..., list[Action]]
) -> None:
    broken, broken_user = launch_ready(api, lifetime=60)
    fine, fine_user = launch_ready(api, lifetime=60)

    actions = by_launch(run_pass(later=120, hub_client=BrokenForOne(hub, broken_user)))

    assert actions[broken].result == "stopping; finished by a later pass"
    assert actions[fine].result == "ended" and hub.get_user(fine_user) is None
    assert hub.get_user(broken_user) is not None
    # The next pass (past the removal grace) finishes the job.
    retried = by_launch(run_pass(later=200))
    assert retried[broken] == Action("removal", broken_user, broken, "ended")
    assert hub.get_user(broken_user) is None


def test_cull_command_prints_what_it_would_do_then_does_it(
    api: httpx.Client, hub: HubClient, stack: Stack
) -> None:
    launch_id, user = launch_ready(api, lifetime=60)
    with session_scope(stack.config.database_url) as db:
        db.execute(
            update(Launch)
            .where(Launch.id == launch_id)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    env = {**stack.environ()}

    def cull(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "hublaunch.cli", "cull", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    dry = cull("--dry-run")
    assert f"expired   {user}  {launch_id}  would end" in dry and "dry run" in dry
    assert status(api, launch_id)["status"] == "ready"
    done = cull()
    assert f"{user}  {launch_id}  ended" in done
    assert status(api, launch_id)["status"] == "ended" and hub.get_user(user) is None


def test_sessions_whose_server_stopped_end_and_their_user_goes(
    api: httpx.Client, hub: HubClient, run_pass: Callable[..., list[Action]]
) -> None:
    launch_id, user = launch_ready(api)
    assert hub.stop_server(user)  # e.g. the server crashed, or a Hub restart cleaned it up

    actions = by_launch(run_pass())

    assert actions[launch_id] == Action("stopped", user, launch_id, "ended")
    assert status(api, launch_id)["end_reason"] == "gone"
    assert hub.get_user(user) is None
