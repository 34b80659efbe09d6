"""The shipped Hub config keeps sessions across a Hub restart (cleanup_servers = False): the
restarted Hub finds each sandboxed session's box again and reopens its way in."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest

from hublaunch.stack import Stack
from tests.integration.conftest import read_events, start_stack, wait_for
from tests.integration.kernel import run_code

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def production_hub(
    tmp_path_factory: pytest.TempPathFactory, make_database: Callable[[str], str], redis_url: str
) -> Iterator[Stack]:
    # The production default: no HUBLAUNCH_HUB_CLEANUP_SERVERS (the test stacks set it to 1).
    stack = start_stack(
        tmp_path_factory,
        "restart",
        make_database("restart"),
        redis_url,
        spawner="sandbox",
        env={"HUBLAUNCH_HUB_CLEANUP_SERVERS": ""},
    )
    yield stack
    stack.stop()


def test_a_session_survives_a_hub_restart(production_hub: Stack) -> None:
    with httpx.Client(base_url=production_hub.public_url, timeout=60) as api:
        launch_id = api.post("/api/launches", json={"image": "default"}).json()["id"]
        ready = read_events(api, launch_id)[-1]
        assert ready["phase"] == "ready"
        status_url = f"{ready['url']}api/status"
        auth = {"Authorization": f"token {ready['token']}"}
        started = httpx.get(status_url, headers=auth, timeout=10).json()["started"]

        # The shipped default: no outbound traffic at all, not even through a proxy.
        output = run_code(
            ready["url"],
            ready["token"],
            "import os, socket\n"
            "print(sorted(k for k in os.environ if 'proxy' in k.lower()))\n"
            "s = socket.socket()\n"
            "print(s.connect_ex(('127.0.0.1', 3128)) != 0)",
        )
        assert output.split() == ["[]", "True"], output

        production_hub.restart("hub")
        wait_for(lambda: _answers(f"{production_hub.hub_api_url}/"), 60, "the Hub to come back")

        # The same server process (same start time), still routed by the proxy, same token.
        again = wait_for(
            lambda: (r := httpx.get(status_url, headers=auth, timeout=10)).status_code == 200 and r,
            60,
            "the session through the restarted proxy",
        )
        assert again.json()["started"] == started
        assert api.get(f"/api/launches/{launch_id}").json()["status"] == "ready"
        # Leave nothing running: this Hub does not stop servers when it stops.
        assert api.delete(f"/api/launches/{launch_id}").status_code == 202
        wait_for(lambda: api.get(f"/api/launches/{launch_id}").json()["status"] == "ended", 60)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
