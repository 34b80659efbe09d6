"""The token a visitor gets, as the real Hub holds it: it opens that one user's server and dies
with the session (read back with the service token, not taken from the worker's word)."""

from __future__ import annotations

from datetime import datetime

import httpx
import pytest

from hublaunch.stack import Stack
from tests.integration.conftest import launch_row, read_events
from worker.db import as_utc
from worker.hub_client import HubClient
from worker.starting import TOKEN_GRACE

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_users")]

LIFETIME = 900


def test_the_issued_token_is_scoped_to_its_server_and_expires_with_the_session(
    api: httpx.Client, hub: HubClient, stack: Stack
) -> None:
    response = api.post("/api/launches", json={"image": "default", "lifetime": LIFETIME})
    assert response.status_code == 202, response.text
    launch_id = response.json()["id"]
    events = read_events(api, launch_id)
    assert events[-1]["phase"] == "ready", events
    launch = launch_row(stack, launch_id)
    name, session_expires = launch.hub_user, launch.expires_at
    assert name is not None and session_expires is not None

    tokens = httpx.get(
        f"{stack.hub_api_url}/users/{name}/tokens",
        headers={"Authorization": f"token {stack.hub_token}"},
        timeout=10,
    )
    assert tokens.status_code == 200, tokens.text
    # The Hub gives the spawned server a token of its own; ours carries the launch's note.
    [issued] = [
        t for t in tokens.json()["api_tokens"] if t["note"] == f"hublaunch session {launch_id}"
    ]

    # Exactly what access:servers!user=<name> expands to in the Hub (it lists implied scopes);
    # "inherit" would bring the user's whole role (servers, tokens, read:users, ...).
    assert set(issued["scopes"]) == {
        f"access:servers!user={name}",
        f"read:users:name!user={name}",
        f"read:users:groups!user={name}",
    }
    assert issued["expires_at"] is not None
    token_expires = datetime.fromisoformat(issued["expires_at"].replace("Z", "+00:00"))
    # The session's end plus the worker's small grace for clock skew, not years away.
    late_by = (token_expires - as_utc(session_expires)).total_seconds()
    assert abs(late_by - TOKEN_GRACE) < 5, late_by

    assert api.delete(f"/api/launches/{launch_id}").status_code == 202
