"""The whole stack under generated and crafted requests, through its public address (the proxy):
never a 5xx, and every answer as the OpenAPI document says (bench/fuzz.py runs the long one)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator
from urllib.parse import quote, urlsplit

import pytest

from bench.fuzz import FUZZ_ENV, end_launches, fuzz, wait_for_no_hub_users
from hublaunch.stack import Stack
from tests.integration.conftest import keep_logs, start_stack

CASES = 150


@pytest.fixture(scope="module")
def fuzz_stack(
    tmp_path_factory: pytest.TempPathFactory, make_database: Callable[[str], str], redis_url: str
) -> Iterator[Stack]:
    """A stack of its own (PostgreSQL, Redis, a real Hub with the fake spawner), so that the
    run's launches and its rate limit touch no other test."""
    stack = start_stack(
        tmp_path_factory, "fuzz", make_database("fuzz"), redis_url, spawner="fake", env=FUZZ_ENV
    )
    try:
        yield stack
    finally:
        stack.stop()
        keep_logs(stack, "fuzz")


def raw_get(stack: Stack, path: str) -> tuple[int, str, str]:
    """GET with the path sent byte for byte (HTTP clients re-escape a malformed escape)."""
    address = urlsplit(stack.public_url)
    connection = http.client.HTTPConnection(address.hostname or "", address.port, timeout=30)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        body = response.read().decode("utf-8", "replace")
        return response.status, response.getheader("content-type") or "", body
    finally:
        connection.close()


def test_generated_requests_get_documented_answers_and_never_a_5xx(fuzz_stack: Stack) -> None:
    result = fuzz(
        fuzz_stack.public_url,
        cases=CASES,
        time_limit=60,
        admin_token=fuzz_stack.config.env["HUBLAUNCH_ADMIN_TOKEN"],
    )
    try:
        assert not result.failures, f"seed {result.seed}:\n" + "\n".join(result.failures[:10])
        assert result.cases >= CASES, f"only {result.cases} cases in {result.seconds:.0f} s"
        assert not any(status >= 500 for status in result.statuses)
        # Every documented operation was sent something.
        assert len(result.operations) >= 10, result.operations
    finally:
        assert end_launches(fuzz_stack.public_url, result.launches) == []
        assert wait_for_no_hub_users(fuzz_stack) == set()


@pytest.mark.parametrize(
    "path",
    [
        "/build/image/%zz",
        "/build/gh/owner/repo/%ff",
        "/api/launches/%zz",
        "/api/launches/%E2%82/events",
        "/v2/gh/%zz/x/HEAD",
        "/%",
        "/user/%zz/lab",
    ],
)
def test_malformed_escapes_reach_the_app_through_the_proxy(fuzz_stack: Stack, path: str) -> None:
    # configurable-http-proxy answered these with its own 500 (URIError in its route lookup);
    # hub/jupyterhub_config.py starts it with a lookup that keeps such paths escaped.
    status, content_type, body = raw_get(fuzz_stack, path)
    assert status < 500, (status, body[:300])
    if path.startswith("/build/"):
        assert status == 200 and content_type.startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in body.splitlines() if line.startswith("data:")]
        assert [e["phase"] for e in events] == ["failed"]
    elif path.startswith("/api/"):
        assert status == 404 and json.loads(body)["detail"].startswith("No launch with this id")
    else:
        # The app's pages (the launch page checks the spec when it starts the stream).
        assert status in (200, 404) and content_type.startswith("text/html")
        assert "hublaunch" in body


def test_an_unreadable_repo_url_through_the_stack(fuzz_stack: Stack) -> None:
    url = quote("https://example.com:99999/x", safe="")
    status, _, body = raw_get(fuzz_stack, f"/build/git/{url}/HEAD")
    events = [json.loads(line[5:]) for line in body.splitlines() if line.startswith("data:")]
    assert status == 200 and [e["phase"] for e in events] == ["failed"]
    assert "https://host[:port]/owner/repo" in events[0]["message"]
