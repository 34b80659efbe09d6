"""What people and Binder clients see, over HTTP: the /build stream, /v2 pages, the form, the
"session ended" page and plain 404s (browser tests are in test_browser.py)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy import func, select

from hublaunch.stack import Stack
from tests.integration.conftest import wait_for
from tests.integration.gitserver import GitServer
from tests.unit.test_binder_compat import binderhub_fields
from worker.db import session_scope
from worker.models import Launch

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_users")]


def stream(
    client: httpx.Client, path: str, headers: dict[str, str] | None = None
) -> tuple[httpx.Headers, list[tuple[str, dict[str, Any]]]]:
    """(response headers, [(event id, data)]) of a /build stream, read until it closes."""
    events: list[tuple[str, dict[str, Any]]] = []
    with client.stream("GET", path, headers=headers or {}, timeout=60) as response:
        assert response.status_code == 200
        event_id = ""
        for line in response.iter_lines():
            if line.startswith("id:"):
                event_id = line[3:].strip()
            elif line.startswith("data:"):
                events.append((event_id, json.loads(line[5:])))
        return response.headers, events


def launches_count(stack: Stack) -> int:
    with session_scope(stack.config.database_url) as db:
        return db.scalar(select(func.count()).select_from(Launch)) or 0


def test_build_stream_speaks_binderhub(api: httpx.Client, stack: Stack) -> None:
    headers, events = stream(api, "/build/image/default", {"Origin": "https://docs.example"})

    assert headers["content-type"].startswith("text/event-stream")
    assert headers["access-control-allow-origin"] == "*"
    phases = [data["phase"] for _, data in events]
    assert phases == ["waiting", "built", "launching", "ready"]
    ready = events[-1][1]
    assert ready["url"].startswith(f"{stack.public_url}/user/hl-") and ready["url"].endswith("/")
    assert ready["token"] and ready["image"] == "default" and ready["message"]
    # BinderHub's fields (tests/unit/test_binder_compat.py compares them with its own stream).
    assert ready["binder_launch_host"] == f"{stack.public_url}/"
    assert ready["binder_request"] == ready["binder_persistent_request"] == "v2/image/default"
    launch_id = events[0][0].split(":")[0]
    assert all(event_id.startswith(f"{launch_id}:") for event_id, _ in events)
    served = httpx.get(f"{ready['url']}?token={ready['token']}", timeout=10)
    assert served.status_code == 200


def test_a_reconnecting_eventsource_never_starts_a_second_launch(
    api: httpx.Client, stack: Stack
) -> None:
    before = launches_count(stack)
    _, first = stream(api, "/build/image/default")
    assert launches_count(stack) == before + 1

    # Reconnect mid-way (as after a dropped connection): the rest of the same launch.
    _, resumed = stream(api, "/build/image/default", {"Last-Event-ID": first[1][0]})
    assert [e for e in resumed] == first[2:]
    # Reconnect after the end (EventSource does that when the stream closes): nothing new.
    _, after_end = stream(api, "/build/image/default", {"Last-Event-ID": first[-1][0]})
    assert after_end == []
    assert launches_count(stack) == before + 1
    # An id from another spec's launch does not hijack it: a new launch starts.
    _, other = stream(api, "/build/image/no-such-image", {"Last-Event-ID": first[1][0]})
    assert other[-1][1]["phase"] == "failed"
    assert launches_count(stack) == before + 2


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/build/svn/x/y", "unknown provider 'svn'"),
        ("/build/gh/only-owner", "gh links read gh/<owner>/<repo>/<ref>"),
        ("/build/image/" + quote("Not An Image", safe=""), "image must look like"),
        ("/build/git/" + quote("http://127.0.0.1:1/x", safe="") + "/main", "scheme"),
    ],
)
def test_bad_specs_are_a_failed_event(
    fake_stacks: dict[str, Stack], path: str, message: str
) -> None:
    strict = fake_stacks["sqlite"]  # production defaults: local repositories refused
    with httpx.Client(base_url=strict.public_url, timeout=30) as client:
        before = launches_count(strict)
        _, events = stream(client, path)
    assert [data["phase"] for _, data in events] == ["failed"]
    assert message in events[0][1]["message"]
    assert launches_count(strict) == before


def test_v2_page_and_form_are_served(api: httpx.Client) -> None:
    page = api.get("/v2/gh/binder-examples/requirements/master?labpath=index.ipynb")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '"/build/gh/binder-examples/requirements/master"' in page.text
    assert '"index.ipynb"' in page.text
    form = api.get("/")
    assert form.status_code == 200 and 'id="launch-form"' in form.text
    assert api.get("/static/launch.js").status_code == 200
    assert api.get("/badge.svg").headers["content-type"].startswith("image/svg+xml")
    bad = api.get("/v2/svn/whatever")
    assert bad.status_code == 404 and "not valid" in bad.text


def test_an_ended_sessions_url_explains_and_offers_to_launch_again(
    api: httpx.Client, stack: Stack
) -> None:
    response = api.post("/api/launches", json={"image": "default"})
    launch_id = response.json()["id"]
    stream(api, f"/api/launches/{launch_id}/events")
    user = api.get(f"/api/launches/{launch_id}").json()["user"]
    api.delete(f"/api/launches/{launch_id}")
    wait_for(lambda: api.get(f"/api/launches/{launch_id}").json()["status"] == "ended")

    page = api.get(f"/user/{user}/lab/tree/index.ipynb")  # through the proxy's default route

    assert page.status_code == 404 and "text/html" in page.headers["content-type"]
    assert "This session has ended" in page.text and "It was ended on request." in page.text
    assert 'href="/v2/image/default"' in page.text
    assert "JupyterHub" not in page.text and "hub/api" not in page.text  # no Hub internals


def test_unknown_paths_get_plain_404s(api: httpx.Client) -> None:
    nobody = api.get("/user/hl-nobody/lab")
    assert nobody.status_code == 404 and "There is no session at this address." in nobody.text
    elsewhere = api.get("/some/where")
    assert elsewhere.status_code == 404 and "text/html" in elsewhere.headers["content-type"]
    assert "JupyterHub" not in elsewhere.text
    assert api.get("/api/nothing").json() == {"detail": "Not Found"}  # JSON under /api/


# The stack that may fetch local repositories; pinned (not looked up) so that the cleanup
# fixture watches the Hub this test launches on.
@pytest.mark.parametrize("stack", ["postgresql"], indirect=True)
def test_a_repository_build_streams_binderhubs_ready_fields(
    stack: Stack, git_server: GitServer
) -> None:
    commit = git_server.commit("binder-fields", {"requirements.txt": "# nothing\n"})
    url = git_server.url("binder-fields")
    with httpx.Client(base_url=stack.public_url, timeout=60) as client:
        _, events = stream(client, f"/build/git/{quote(url, safe='')}/main")
    ready = events[-1][1]
    assert ready["phase"] == "ready", events[-1]
    assert ready["repo_url"] == url and ready["binder_ref_url"] == url
    assert ready["binder_request"] == f"v2/git/{quote(url, safe='')}/main"
    assert ready["binder_persistent_request"] == f"v2/git/{quote(url, safe='')}/{commit}"
    assert ready["binder_launch_host"] == f"{stack.public_url}/"
    # Every phase BinderHub's captured stream has, ours carries its fields too (the built
    # event its imageName); waiting, fetching, building, built, launching and ready all occur.
    theirs = binderhub_fields()
    seen = {data["phase"] for _, data in events}
    assert {"waiting", "fetching", "building", "built", "launching", "ready"} <= seen
    for _, data in events:
        assert theirs.get(data["phase"], set()) <= set(data), data
