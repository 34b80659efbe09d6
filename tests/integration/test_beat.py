"""The beat schedule really fires cleanup passes: a real beat, a real worker, real time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest

from hublaunch.stack import Stack
from tests.integration.conftest import start_stack, wait_for
from tests.integration.test_cull import launch_ready, status
from worker.hub_client import HubClient

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def beat_stack(
    tmp_path_factory: pytest.TempPathFactory, make_database: Callable[[str], str], redis_url: str
) -> Iterator[Stack]:
    stack = start_stack(
        tmp_path_factory,
        "beat",
        make_database("beat"),
        redis_url,
        spawner="fake",
        beat=True,
        env={"HUBLAUNCH_CULL_INTERVAL": "1"},
    )
    yield stack
    stack.stop()


def test_the_beat_schedule_fires_passes(beat_stack: Stack) -> None:
    hub = HubClient(beat_stack.hub_api_url, beat_stack.hub_token)
    with httpx.Client(base_url=beat_stack.public_url, timeout=30) as api:
        launch_id, user = launch_ready(api, lifetime=2)
        ended = wait_for(
            lambda: (s := status(api, launch_id))["status"] == "ended" and s,
            timeout=30,
            what="the beat-driven pass to end the session",
        )
    assert ended["end_reason"] == "expired"
    assert hub.get_user(user) is None
    hub.close()
