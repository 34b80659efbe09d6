"""The logs of a real stack: one JSON object per line from the app and the worker, every line
about a launch carrying its id (and its Hub user once known), so one grep for the id tells the
launch's whole story; and no token or secret in any line of any process."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from hublaunch.stack import Stack
from tests.integration.conftest import launch_row, read_events, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_users")]


def this_run(stack: Stack, name: str) -> list[str]:
    """The lines child ``name`` wrote in this run of the stack."""
    with (stack.logs / f"{name}.log").open("rb") as f:
        f.seek(stack.log_starts.get(name, 0))
        return f.read().decode().splitlines()


def entries(stack: Stack, name: str) -> list[dict[str, Any]]:
    parsed = []
    for line in this_run(stack, name):
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"{name}.log holds a line that is not JSON: {line!r}")
        assert isinstance(entry, dict), line
        assert {"ts", "level", "logger", "process", "msg"} <= set(entry), line
        parsed.append(entry)
    return parsed


def test_a_launch_is_one_grep_of_json_lines_and_no_line_holds_a_token(
    api: httpx.Client, stack: Stack
) -> None:
    response = api.post("/api/launches", json={"image": "default", "lifetime": 300})
    assert response.status_code == 202, response.text
    launch_id = response.json()["id"]
    ready = read_events(api, launch_id)[-1]
    assert ready["phase"] == "ready"
    token = ready["token"]
    status = api.get(f"/api/launches/{launch_id}").json()
    assert status["url"].endswith(f"?token={token}")
    user = status["user"]
    assert api.delete(f"/api/launches/{launch_id}").status_code == 202
    wait_for(lambda: launch_row(stack, launch_id).user_removed_at is not None, 30, "removal")

    def teardown_logged() -> bool:
        return any(
            e.get("launch_id") == launch_id
            and "hublaunch.teardown[" in e["msg"]
            and "succeeded" in e["msg"]
            for e in entries(stack, "worker")
        )

    wait_for(teardown_logged, 15, "the teardown task's last line")

    api_lines, worker_lines = entries(stack, "api"), entries(stack, "worker")
    assert {e["process"] for e in api_lines} == {"api"}
    assert {e["process"] for e in worker_lines} == {"worker"}
    about = [e for e in api_lines + worker_lines if e.get("launch_id") == launch_id]
    messages = [e["msg"] for e in about]
    # The app: the acceptance, and each request for it (the access log included).
    assert any(m.startswith(f"launch {launch_id} accepted") for m in messages), messages
    assert any(f"GET /api/launches/{launch_id}/events" in m for m in messages), messages
    assert any(m.startswith(f"launch {launch_id}: end requested") for m in messages), messages
    # The worker: Celery's own lines for both tasks, and the domain's.
    for task in ("hublaunch.launch", "hublaunch.teardown"):
        assert any(m.startswith(f"Task {task}[") and m.endswith("received") for m in messages)
        assert any(m.startswith(f"Task {task}[") and " succeeded " in m for m in messages)
    [ready_line] = [e for e in about if e["msg"] == f"launch {launch_id} ready as {user}"]
    assert ready_line["hub_user"] == user and ready_line["logger"] == "worker.starting"
    # Once the Hub user is known, the launch's lines name it (the Hub's requests included).
    hub_requests = [e for e in about if e["logger"] == "httpx" and f"/users/{user}" in e["msg"]]
    assert hub_requests and all(e.get("hub_user") == user for e in hub_requests)
    secrets = {"the issued token": token, "the Hub's service token": stack.hub_token}
    secrets["the proxy's token"] = stack.proxy_token
    key_file = stack.config.data_dir / "secret.key"
    if key_file.exists():
        secrets["the key of tokens at rest"] = key_file.read_text().strip()
    for log in sorted(stack.logs.glob("*.log")):
        text = log.read_text(errors="replace")
        for what, value in secrets.items():
            assert value not in text, f"{what} is in {log.name}"
