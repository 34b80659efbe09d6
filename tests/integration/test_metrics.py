"""/metrics on a real stack: what the worker process and a cleanup pass in a process of its own
counted is on the app's page, once, and matches the database."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from hublaunch.stack import Stack
from tests.integration.conftest import expire_and_cull, read_events
from worker.db import session_scope
from worker.hub_client import HubClient
from worker.models import Launch

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_users")]

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]
# How often each process adds its counts to Redis (worker.metrics.Recorder's interval).
FLUSH_SECONDS = 0.5


def scrape(api: httpx.Client, stack: Stack) -> Samples:
    token = stack.config.env["HUBLAUNCH_ADMIN_TOKEN"]
    response = api.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    out: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def settled(api: httpx.Client, stack: Stack) -> Samples:
    """A scrape once what earlier tests did has reached Redis: each process adds its counts
    every FLUSH_SECONDS, so two scrapes that far apart and equal have nothing in flight."""

    def counts(samples: Samples) -> Samples:
        # Gauges (a queued launch's age) move by themselves; the counts are what must settle.
        suffixes = ("_total", "_count", "_sum", "_bucket")
        return {name: v for name, v in samples.items() if name.endswith(suffixes)}

    previous = scrape(api, stack)
    deadline = time.monotonic() + 30
    while True:
        time.sleep(FLUSH_SECONDS + 0.2)
        current = scrape(api, stack)
        if counts(current) == counts(previous):
            return current
        assert time.monotonic() < deadline, "the counters never settled"
        previous = current


def wait_until(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def launch(api: httpx.Client, image: str, **body: Any) -> tuple[str, str]:
    response = api.post("/api/launches", json={"image": image, **body})
    assert response.status_code == 202, response.text
    launch_id = response.json()["id"]
    return launch_id, read_events(api, launch_id)[-1]["phase"]


def test_counts_from_every_process_match_the_database(
    api: httpx.Client, stack: Stack, hub: HubClient
) -> None:
    assert api.get("/metrics").status_code == 401  # the stack sets an admin token
    before = settled(api, stack)

    ready = [launch(api, "default") for _ in range(2)]
    refused = launch(api, "no-such-image")
    assert [phase for _, phase in ready] == ["ready", "ready"] and refused[1] == "failed"
    ended_id = ready[0][0]
    assert api.delete(f"/api/launches/{ended_id}").status_code == 202
    wait_until(lambda: api.get(f"/api/launches/{ended_id}").json()["status"] == "ended", "the end")

    # A cleanup pass in a process of its own ends the other session, made expired.
    expire_and_cull(stack, ready[1][0])

    def delta(name: str, **labels: str) -> float:
        return value(scrape(api, stack), name, **labels) - value(before, name, **labels)

    # Counted after each commit, by the process that made it: the worker's last commit of a
    # teardown may land a moment after the status the test polled.
    wait_until(
        lambda: delta("hublaunch_sessions_ended_total", reason="expired") == 1,
        "the expired session to be counted",
    )
    after = scrape(api, stack)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("hublaunch_launches_created_total", provider="image") == 3
    assert (
        moved("hublaunch_launches_finished_total", provider="image", outcome="ready", reason="")
        == 2
    )
    assert (
        moved(
            "hublaunch_launches_finished_total",
            provider="image",
            outcome="failed",
            reason="hub_refused",
        )
        == 1
    )
    assert moved("hublaunch_sessions_ended_total", reason="requested") == 1
    assert moved("hublaunch_sessions_ended_total", reason="expired") == 1
    assert moved("hublaunch_cleanup_passes_total") >= 1  # beat may have run one too
    assert moved("hublaunch_cleanup_actions_total", category="expired", result="ended") == 1
    assert moved("hublaunch_launch_ready_seconds_count", provider="image") == 2
    assert (
        moved("hublaunch_hub_requests_total", hub="default", family="POST /users/:name", code="201")
        >= 3
    )

    # The same launches, as the database has them.
    ids = [ready[0][0], ready[1][0], refused[0]]
    with session_scope(stack.config.database_url) as db:
        rows = {
            r.id: (r.status, r.end_reason)
            for r in db.execute(
                select(Launch.id, Launch.status, Launch.end_reason).where(Launch.id.in_(ids))
            )
        }
    assert rows == {
        ready[0][0]: ("ended", "requested"),
        ready[1][0]: ("ended", "expired"),
        refused[0]: ("failed", "failed"),
    }
    assert value(after, "hublaunch_metrics_store_up") == 1
