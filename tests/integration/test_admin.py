"""The admin API against a whole stack: an operator finds a real session and ends it."""

from __future__ import annotations

import httpx
import pytest

from hublaunch.stack import Stack
from tests.integration.conftest import read_events, wait_for
from worker.hub_client import HubClient

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_users")]


def test_an_operator_lists_and_ends_a_real_session(
    api: httpx.Client, hub: HubClient, stack: Stack
) -> None:
    token = stack.config.env["HUBLAUNCH_ADMIN_TOKEN"]
    auth = {"Authorization": f"Bearer {token}"}
    assert api.get("/api/admin/sessions").status_code == 401
    wrong = api.get("/api/admin/sessions", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and token not in wrong.text

    response = api.post("/api/launches", json={"image": "default", "lifetime": 300})
    assert response.status_code == 202, response.text
    launch_id = response.json()["id"]
    assert read_events(api, launch_id)[-1]["phase"] == "ready"
    name = api.get(f"/api/launches/{launch_id}").json()["user"]
    assert hub.get_user(name) is not None

    listed = api.get(
        "/api/admin/sessions", params={"status": "ready", "spec": "default"}, headers=auth
    )
    assert listed.status_code == 200, listed.text
    items = {item["id"]: item for item in listed.json()["items"]}
    assert launch_id in items
    assert items[launch_id]["user"] == name and items[launch_id]["status"] == "ready"
    assert "token" not in listed.text and "url" not in items[launch_id]

    summary = api.get("/api/admin/summary", params={"window": 600}, headers=auth).json()
    assert summary["active"] >= 1 and summary["launches"] >= 1
    assert summary["time_to_ready_p50"] is not None

    ended = api.delete(f"/api/admin/sessions/{launch_id}", headers=auth)
    assert ended.status_code == 202, ended.text
    assert ended.json()["id"] == launch_id

    def status() -> str:
        params = {"status": "ended", "limit": 500}
        page = api.get("/api/admin/sessions", params=params, headers=auth).json()
        return next((i["end_reason"] for i in page["items"] if i["id"] == launch_id), "")

    assert wait_for(status, what="the session ended") == "requested"
    wait_for(lambda: hub.get_user(name) is None, what=f"Hub user {name} removed")
    assert api.delete("/api/admin/sessions/no-such-id", headers=auth).status_code == 404
