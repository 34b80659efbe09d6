"""The waiting line against a real stack (real Hub with the fake spawner, PostgreSQL, Redis,
a Celery worker) capped at two active sessions: four launches, two start and two wait with
their place in line on the event stream; one session ends and the next in line starts."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from hublaunch.stack import Stack
from tests.integration.conftest import keep_logs, launch_row, read_events, start_stack, wait_for
from tests.integration.test_limits import client_from
from worker.db import session_scope
from worker.hub_client import HubClient
from worker.hub_users import remove_hub_user
from worker.models import LaunchEvent, Phase, Status

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def capped_stack(
    tmp_path_factory: pytest.TempPathFactory,
    make_database: Callable[[str], str],
    redis_url: str,
) -> Iterator[Stack]:
    stack = start_stack(
        tmp_path_factory,
        "waiting",
        make_database("waiting"),
        redis_url,
        spawner="fake",
        env={
            "HUBLAUNCH_MAX_ACTIVE": "2",
            # One image for all four: only the total cap applies.
            "HUBLAUNCH_MAX_ACTIVE_PER_SPEC": "2",
            "HUBLAUNCH_MAX_WAIT": "300",
        },
    )
    try:
        yield stack
    finally:
        stack.stop()
        keep_logs(stack, "waiting-line")


@pytest.fixture
def api(capped_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=capped_stack.public_url, timeout=30) as client:
        yield client


@pytest.fixture
def hub(capped_stack: Stack) -> Iterator[HubClient]:
    client = HubClient(capped_stack.hub_api_url, capped_stack.hub_token)
    yield client
    client.close()


def sessions(hub: HubClient) -> set[str]:
    return {u.name for u in hub.iter_users() if u.name.startswith("hl-") and u.name != "hl-admin"}


def events_until(
    api: httpx.Client, launch_id: str, stop: Callable[[dict[str, Any]], bool], timeout: float = 60
) -> list[dict[str, Any]]:
    """Follow the event stream of a launch that may not finish soon, until ``stop`` says so."""
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    with api.stream("GET", f"/api/launches/{launch_id}/events", timeout=timeout) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                if stop(events[-1]):
                    return events
            if time.monotonic() > deadline:
                break
    raise AssertionError(f"launch {launch_id}: no such event in {timeout} s: {events}")


def end_all(
    api: httpx.Client, stack: Stack, hub: HubClient, ids: list[str], before: set[str]
) -> None:
    """End every launch of a test and wait until none of its Hub users is left."""
    for launch_id in ids:
        api.delete(f"/api/launches/{launch_id}")
    wait_for(
        lambda: all(launch_row(stack, i).status == Status.ended for i in ids),
        60,
        "every launch ended",
    )
    for name in sessions(hub) - before:
        wait_for(lambda n=name: remove_hub_user(hub, n), 20, f"removal of {name}")
    assert sessions(hub) == before


def last_position(stack: Stack, launch_id: str) -> int | None:
    with session_scope(stack.config.database_url) as db:
        events = db.scalars(
            select(LaunchEvent)
            .where(LaunchEvent.launch_id == launch_id, LaunchEvent.phase == Phase.waiting)
            .order_by(LaunchEvent.id.desc())
        ).all()
        positions = [e.data["position"] for e in events if e.data and "position" in e.data]
        return positions[0] if positions else None


def test_over_the_cap_launches_wait_in_line_and_start_when_a_slot_frees(
    api: httpx.Client, hub: HubClient, capped_stack: Stack
) -> None:
    before = sessions(hub)
    ids: list[str] = []
    try:
        for _ in range(4):
            response = api.post("/api/launches", json={"image": "default"})
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])

        def split() -> tuple[list[str], list[str]] | None:
            rows = {i: launch_row(capped_stack, i) for i in ids}
            ready = [i for i in ids if rows[i].status == Status.ready]
            waiting = [i for i in ids if rows[i].status == Status.queued]
            # Both waiters settled in line: the earlier one first, the later one behind it.
            settled = [last_position(capped_stack, i) for i in waiting] == [0, 1]
            if len(ready) == 2 and len(waiting) == 2 and settled:
                return ready, waiting
            return None

        ready, waiting = wait_for(split, 60, "two ready sessions and two launches in line")
        assert len(sessions(hub) - before) == 2  # the line never reached the Hub

        # The visitor's stream says where each waiter stands.
        behind = events_until(api, waiting[1], lambda e: e.get("position") == 1)
        assert behind[-1]["phase"] == "waiting"
        assert behind[-1]["message"] == "Waiting for a free slot: 1 launch ahead of you"
        # Nothing more while nothing changes: polls do not repeat the place.
        time.sleep(5)
        with session_scope(capped_stack.config.database_url) as db:
            told = db.scalars(
                select(LaunchEvent.message).where(
                    LaunchEvent.launch_id == waiting[1],
                    LaunchEvent.message.startswith("Waiting for a free slot"),
                )
            ).all()
        assert len(told) <= 2, told  # perhaps "you are next" first, then "1 ahead"

        # One session ends: the first in line starts, the second moves up.
        assert api.delete(f"/api/launches/{ready[0]}").status_code == 202
        started = read_events(api, waiting[0])
        assert started[-1]["phase"] == "ready", started
        assert "Waiting for a free slot: you are next" in [e["message"] for e in started]
        moved = events_until(api, waiting[1], lambda e: e.get("position") == 0)
        assert moved[-1]["message"] == "Waiting for a free slot: you are next"
        assert launch_row(capped_stack, waiting[1]).status == Status.queued
        assert launch_row(capped_stack, ready[0]).status == Status.ended
        assert len(sessions(hub) - before) == 2
    finally:
        end_all(api, capped_stack, hub, ids, before)


def test_one_client_flooding_the_line_does_not_push_another_back(
    hub: HubClient, capped_stack: Stack
) -> None:
    """Hostile: one client (an address of its own, through the proxy) takes both slots and puts
    four more launches in line; a second client, holding no session, is next in line at once
    and gets the first slot that frees, before the flooder's four."""
    before = sessions(hub)
    url = capped_stack.public_url
    ids: list[str] = []
    with client_from(url, "127.0.0.201") as flooder, client_from(url, "127.0.0.202") as other:
        try:
            for _ in range(6):
                response = flooder.post("/api/launches", json={"image": "default"})
                assert response.status_code == 202, response.text
                ids.append(response.json()["id"])

            def settled() -> bool:
                ready = [i for i in ids if launch_row(capped_stack, i).status == Status.ready]
                waiting = [i for i in ids if i not in ready]
                return len(ready) == 2 and [last_position(capped_stack, i) for i in waiting] == [
                    0,
                    1,
                    2,
                    3,
                ]

            wait_for(settled, 60, "two sessions and the flooder's four launches in line")
            waiting = [i for i in ids if launch_row(capped_stack, i).status == Status.queued]
            response = other.post("/api/launches", json={"image": "default"})
            assert response.status_code == 202, response.text
            mine = response.json()["id"]
            ids.append(mine)
            # Next in line (first come, first served would put it behind 4).
            events_until(other, mine, lambda e: e.get("position") == 0)
            # The flooder's waiters moved back one each.
            wait_for(
                lambda: [last_position(capped_stack, i) for i in waiting] == [1, 2, 3, 4],
                30,
                "the flooder's launches behind the other client's",
            )
            ready = [i for i in ids if launch_row(capped_stack, i).status == Status.ready]
            assert flooder.delete(f"/api/launches/{ready[0]}").status_code == 202
            assert read_events(other, mine)[-1]["phase"] == "ready"
            assert [launch_row(capped_stack, i).status for i in waiting] == [Status.queued] * 4
            # Then the flooder's own, in its order.
            assert flooder.delete(f"/api/launches/{ready[1]}").status_code == 202
            assert read_events(flooder, waiting[0])[-1]["phase"] == "ready"
        finally:
            end_all(flooder, capped_stack, hub, ids, before)
