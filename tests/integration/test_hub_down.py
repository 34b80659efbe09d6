"""When the Hub cannot be reached, launches are retried with backoff and then fail clearly."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest

from hublaunch.stack import Stack
from tests.integration.conftest import launch_row, read_events, start_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def hubless_stack(
    tmp_path_factory: pytest.TempPathFactory, make_database: Callable[[str], str], redis_url: str
) -> Iterator[Stack]:
    # No Hub process at all: every Hub call is refused. Short launch timeout to keep the test fast.
    stack = start_stack(
        tmp_path_factory,
        "hubless",
        make_database("hubless"),
        redis_url,
        hub=False,
        env={"HUBLAUNCH_LAUNCH_TIMEOUT": "4"},
    )
    yield stack
    stack.stop()


def test_launch_retries_then_fails_with_a_clear_error(hubless_stack: Stack) -> None:
    with httpx.Client(base_url=hubless_stack.app_url, timeout=30) as api:
        health = api.get("/api/health")
        assert health.status_code == 503
        assert health.json()["checks"] == {"database": "ok", "broker": "ok", "hub": "down"}

        response = api.post("/api/launches", json={"image": "default"})
        assert response.status_code == 202
        launch_id = response.json()["id"]

        events = read_events(api, launch_id)

        assert events[-1]["phase"] == "failed"
        status = api.get(f"/api/launches/{launch_id}").json()
        assert status["status"] == "failed"
        assert status["error"].startswith("The server did not start within 4 s")
        assert "Hub unreachable" in status["error"]
    retries = (hubless_stack.logs / "worker.log").read_text().count(f"launch {launch_id}: Hub")
    assert retries >= 2, "the launch was not retried"
    # The row keeps saying that the Hub user may still need removing; it is never forgotten.
    assert launch_row(hubless_stack, launch_id).user_removed_at is None
