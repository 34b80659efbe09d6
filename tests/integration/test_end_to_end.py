"""End to end with real jupyterhub-singleuser servers behind the real proxy."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from hublaunch.stack import Stack
from tests.integration.conftest import read_events, wait_for
from worker.hub_client import HubClient

pytestmark = pytest.mark.integration


@pytest.fixture
def public(real_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=real_stack.public_url, timeout=60) as client:
        yield client


def launch_ready(client: httpx.Client) -> dict[str, str]:
    response = client.post("/api/launches", json={"image": "default"})
    assert response.status_code == 202, response.text
    launch_id = response.json()["id"]
    events = read_events(client, launch_id)
    assert events[-1]["phase"] == "ready", events
    user = client.get(f"/api/launches/{launch_id}").json()["user"]
    return {**events[-1], "id": launch_id, "user": user}


def test_launch_open_isolate_and_end_a_real_server(public: httpx.Client, real_stack: Stack) -> None:
    hub = HubClient(real_stack.hub_api_url, real_stack.hub_token)
    first = launch_ready(public)
    second = launch_ready(public)

    # The link with the token lands in the user's real JupyterLab, through the proxy.
    status = public.get(f"/api/launches/{first['id']}").json()
    with httpx.Client(timeout=60, follow_redirects=True) as browser:
        page = browser.get(status["url"])
        assert page.status_code == 200
        assert str(page.url).startswith(f"{real_stack.public_url}/user/{first['user']}/lab")
        assert "JupyterLab" in page.text
    api_status = httpx.get(
        f"{first['url']}api/status", headers={"Authorization": f"token {first['token']}"}
    )
    assert api_status.status_code == 200 and "started" in api_status.json()

    # The same token is refused on another temporary user's server.
    other = httpx.get(
        f"{second['url']}api/status", headers={"Authorization": f"token {first['token']}"}
    )
    assert other.status_code == 403
    with httpx.Client(timeout=30, follow_redirects=False) as browser:
        via_link = browser.get(f"{second['url']}?token={first['token']}")
        assert via_link.status_code != 200

    # Ending the session stops the server and deletes the Hub user. Sandboxed homes live in
    # the box's memory: none is ever on the Hub's disk (test_sandbox checks what a box leaves).
    homes = real_stack.config.data_dir / "hub" / "homes"
    for launched in (first, second):
        assert public.delete(f"/api/launches/{launched['id']}").status_code == 202
    for launched in (first, second):
        wait_for(
            lambda i=launched["id"]: public.get(f"/api/launches/{i}").json()["status"] == "ended",
            timeout=60,
            what="status ended",
        )
        assert hub.get_user(launched["user"]) is None
        assert not (homes / launched["user"]).exists()
    gone = httpx.get(
        f"{first['url']}api/status", headers={"Authorization": f"token {first['token']}"}
    )
    assert gone.status_code == 404  # the proxy route is gone; the app's default route answers
    hub.close()
