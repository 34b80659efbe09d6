"""The launch suite against a real Hub (fake in-process servers), real Redis and a real Celery
worker, once on PostgreSQL and once on SQLite."""

from __future__ import annotations

import concurrent.futures
import re

import httpx
import pytest
from sqlalchemy import func, select

from hublaunch.stack import Stack
from tests.integration.conftest import (
    hub_user_names,
    launch_row,
    read_events,
    wait_for,
)
from worker.broker import LAUNCH_TASK
from worker.celery_app import create_celery
from worker.db import session_scope
from worker.hub_client import HubClient
from worker.models import Launch

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_users")]


def launch(api: httpx.Client, **body: object) -> str:
    response = api.post("/api/launches", json={"image": "default", **body})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def test_launch_reaches_ready_and_the_link_opens_the_server(
    api: httpx.Client, hub: HubClient, stack: Stack
) -> None:
    response = api.post("/api/launches", json={"image": "default", "lifetime": 300})
    assert response.status_code == 202
    accepted = response.json()
    assert response.headers["Location"] == accepted["status_url"]
    assert accepted["status_url"].startswith(stack.public_url)
    assert accepted["events_url"] == accepted["status_url"] + "/events"

    events = read_events(api, accepted["id"])

    assert [e["phase"] for e in events] == ["waiting", "built", "launching", "ready"]
    assert all(e["message"] for e in events)
    ready = events[-1]
    status = api.get(f"/api/launches/{accepted['id']}").json()
    assert status["status"] == "ready"
    name = status["user"]
    assert re.fullmatch(r"hl-[0-9a-f]{16}", name)
    assert ready["url"] == f"{stack.public_url}/user/{name}/"
    assert status["url"] == f"{ready['url']}?token={ready['token']}"
    assert status["error"] is None and status["ended_at"] is None
    assert status["ready_at"] is not None
    lifetime = _seconds(status["expires_at"]) - _seconds(status["ready_at"])
    assert lifetime == pytest.approx(300, abs=0.01)

    user = hub.get_user(name)
    assert user is not None and user.servers[""].ready
    # The proxy routes the user's path to its (fake, in-Hub) server.
    served = httpx.get(status["url"], timeout=10)
    assert served.status_code == 200 and served.json() == {"fake": True, "user": name}


def _seconds(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp).timestamp()


def test_a_late_watcher_gets_the_whole_history_and_can_resume(api: httpx.Client) -> None:
    launch_id = launch(api)
    first = read_events(api, launch_id)
    late = read_events(api, launch_id)
    assert late == first
    # A reconnecting EventSource sends the last id it saw and gets only what followed.
    resumed = read_events(api, launch_id, **{"Last-Event-ID": str(first[1]["id"])})
    assert resumed == first[2:]


def test_token_is_encrypted_at_rest(api: httpx.Client, stack: Stack) -> None:
    launch_id = launch(api)
    token = read_events(api, launch_id)[-1]["token"]
    row = launch_row(stack, launch_id)
    assert row.token_ciphertext and token not in row.token_ciphertext
    with session_scope(stack.config.database_url) as db:
        stored = " ".join(str(e.data) + e.message for e in row_events(db, launch_id))
    assert token not in stored


def row_events(db: object, launch_id: str) -> list:  # type: ignore[type-arg]
    from worker.queries import events_after

    return events_after(db, launch_id)  # type: ignore[arg-type]


def test_delete_stops_the_server_and_deletes_the_user(
    api: httpx.Client, hub: HubClient, stack: Stack
) -> None:
    launch_id = launch(api)
    read_events(api, launch_id)
    name = api.get(f"/api/launches/{launch_id}").json()["user"]
    assert hub.get_user(name) is not None

    response = api.delete(f"/api/launches/{launch_id}")
    assert response.status_code == 202

    ended = wait_for(
        lambda: (s := api.get(f"/api/launches/{launch_id}").json())["status"] == "ended" and s,
        what="status ended",
    )
    assert ended["url"] is None and ended["end_reason"] == "requested"
    assert ended["ended_at"] is not None
    assert hub.get_user(name) is None
    assert launch_row(stack, launch_id).token_ciphertext is None
    # Ending again is harmless.
    assert api.delete(f"/api/launches/{launch_id}").status_code == 202


def test_unknown_image_fails_clearly_and_leaves_no_hub_user(
    api: httpx.Client, hub: HubClient, stack: Stack
) -> None:
    before = hub_user_names(hub)
    launch_id = launch(api, image="no-such-image")

    events = read_events(api, launch_id)

    assert events[-1]["phase"] == "failed"
    status = api.get(f"/api/launches/{launch_id}").json()
    assert status["status"] == "failed"
    assert status["error"] == (
        "The server could not be started: Unknown image 'no-such-image'; this Hub can run: default"
    )
    assert status["url"] is None
    wait_for(lambda: launch_row(stack, launch_id).user_removed_at, what="user removal")
    assert hub_user_names(hub) == before


BAD_REQUESTS: list[tuple[dict[str, object], bytes | None, int]] = [
    ({"json": {}}, None, 422),
    ({"json": {"image": ""}}, None, 422),
    ({"json": {"image": "Not A Name"}}, None, 422),
    ({"json": {"image": "x" * 1000}}, None, 422),
    ({"json": {"image": "default", "extra": True}}, None, 422),
    ({"json": {"image": "default", "lifetime": -5}}, None, 422),
    ({"json": {"image": "default", "lifetime": 10**7}}, None, 422),
    ({"json": ["default"]}, None, 422),
    ({}, b'{"image": "default"', 400),
    ({}, b'{"image": "' + b"a" * 20000 + b'"}', 413),
]


@pytest.mark.parametrize(("kwargs", "content", "expected"), BAD_REQUESTS)
def test_bad_input_is_4xx_with_a_message_and_leaves_nothing(
    api: httpx.Client,
    hub: HubClient,
    stack: Stack,
    kwargs: dict[str, object],
    content: bytes | None,
    expected: int,
) -> None:
    rows_before = count_launches(stack)
    users_before = hub_user_names(hub)
    if content is not None:
        kwargs = {"content": content, "headers": {"Content-Type": "application/json"}}

    response = api.post("/api/launches", **kwargs)  # type: ignore[arg-type]

    assert response.status_code == expected
    assert response.json()["detail"]
    assert count_launches(stack) == rows_before
    assert hub_user_names(hub) == users_before


def count_launches(stack: Stack) -> int:
    with session_scope(stack.config.database_url) as db:
        return db.scalar(select(func.count()).select_from(Launch)) or 0


def test_concurrent_launches_each_get_their_own_user(api: httpx.Client, hub: HubClient) -> None:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda _: launch(api), range(8)))
        finals = list(pool.map(lambda i: read_events(api, i)[-1], ids))
    assert [e["phase"] for e in finals] == ["ready"] * 8
    users = {api.get(f"/api/launches/{i}").json()["user"] for i in ids}
    assert len(users) == 8
    assert users <= hub_user_names(hub)


def test_a_redelivered_task_changes_nothing(
    api: httpx.Client, hub: HubClient, stack: Stack
) -> None:
    launch_id = launch(api)
    read_events(api, launch_id)
    before = api.get(f"/api/launches/{launch_id}").json()
    users = hub_user_names(hub)

    # What a broker does after a worker dies mid-task: the same message, again.
    celery = create_celery(stack.settings())
    duplicates = [celery.send_task(LAUNCH_TASK, args=[launch_id]).id for _ in range(2)]
    # Wait until both have run to their end, as the worker reports each task it finished
    # (acknowledged late: the line is written after the run). Another launch finishing says
    # nothing about these: the worker runs many tasks at once, in any order.
    ends = wait_for(
        lambda: task_ends(stack, duplicates), timeout=60, what="both duplicates to finish"
    )

    assert ends == {task: "succeeded" for task in duplicates}
    after = api.get(f"/api/launches/{launch_id}").json()
    assert after == before
    assert hub_user_names(hub) == users


def task_ends(stack: Stack, task_ids: list[str]) -> dict[str, str] | None:
    """How each task ended (succeeded, raised, retry) as the worker logged it; None until all
    have ended."""
    log = (stack.logs / "worker.log").read_text(errors="replace")
    ends = {
        task: found.group(1)
        for task in task_ids
        if (
            found := re.search(rf"{re.escape(LAUNCH_TASK)}\[{task}\] (succeeded|raised|retry)", log)
        )
    }
    return ends if len(ends) == len(task_ids) else None


def test_health_reports_every_part(api: httpx.Client) -> None:
    response = api.get("/api/health")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "checks": {"database": "ok", "broker": "ok", "hub": "ok"},
    }
