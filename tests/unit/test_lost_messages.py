"""What happens when the broker refuses a message after its transaction committed: the state
stands, nothing is half-done, and the message is sent again later."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from tests.fakes import FakeHub, RecordingBroker
from tests.unit.conftest import Clock
from tests.unit.test_builds import FakeBuilder, repo_launch, status
from worker import builds, starting
from worker.broker import BUILD_TASK, TEARDOWN_TASK
from worker.context import WorkerContext
from worker.models import Status
from worker.settings import Settings


@pytest.fixture
def builder(ctx: WorkerContext) -> FakeBuilder:
    fake = FakeBuilder()
    ctx.builder = fake
    ctx.resolve = lambda spec, settings: "c" * 40
    return fake


def test_a_refused_build_message_leaves_the_claim_and_is_sent_again(
    ctx: WorkerContext, builder: FakeBuilder, broker: RecordingBroker, clock: Clock
) -> None:
    launch_id = repo_launch(ctx)
    broker.down = True

    outcome = starting.advance(ctx, launch_id)

    assert outcome.retry_in is not None  # tried again later, not failed
    assert status(ctx, launch_id) == Status.building
    assert broker.sent == []
    # Nobody builds it: once its heartbeat is stale, the next look claims it and sends it.
    broker.down = False
    clock.advance(builds.STALE_AFTER.total_seconds() + 1)
    starting.advance(ctx, launch_id)
    assert len(broker.arguments(BUILD_TASK)) == 1


@pytest.fixture
def api(settings: Settings, broker: RecordingBroker) -> Iterator[TestClient]:
    with TestClient(create_app(settings, broker=broker)) as client:
        yield client


def test_delete_with_the_queue_down_is_503_and_the_end_is_kept(
    api: TestClient, ctx: WorkerContext, hub: FakeHub, broker: RecordingBroker
) -> None:
    launch_id = api.post("/api/launches", json={"image": "default"}).json()["id"]
    starting.advance(ctx, launch_id)
    assert api.get(f"/api/launches/{launch_id}").json()["status"] == "ready"

    broker.down = True
    refused = api.delete(f"/api/launches/{launch_id}")
    assert refused.status_code == 503
    assert "the end is recorded" in refused.json()["detail"]

    # The end stands; asking again once the queue is back sends the teardown.
    broker.down = False
    again = api.delete(f"/api/launches/{launch_id}")
    assert again.status_code == 202
    assert broker.arguments(TEARDOWN_TASK) == [launch_id]
