"""The Hub client's error mapping, over httpx's in-memory transport (no Hub needed)."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from worker.hub_client import (
    HubClient,
    HubConflict,
    HubNotFound,
    HubRequestError,
    HubSpawnFailed,
    HubUnavailable,
)

TOKEN = "service-token-secret-0123456789"


def client(handler: httpx.MockTransport) -> HubClient:
    return HubClient("http://127.0.0.1:1/hub/api", TOKEN, transport=handler)


def answer(status: int, body: object = None, headers: dict[str, str] | None = None) -> HubClient:
    def handle(request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"] == f"token {TOKEN}"
        return httpx.Response(status, json=body, headers=headers)

    return client(httpx.MockTransport(handle))


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors_are_transient(status: int) -> None:
    with pytest.raises(HubUnavailable) as info:
        answer(status, {"message": "oops"}).create_user("hl-x")
    assert info.value.status == status and info.value.detail == "oops"


def test_429_is_transient_and_carries_retry_after() -> None:
    with pytest.raises(HubUnavailable) as info:
        answer(429, {"message": "slow down"}, {"Retry-After": "7"}).create_user("hl-x")
    assert info.value.retry_after == 7.0


def test_connection_refused_is_transient() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(HubUnavailable, match="unreachable"):
        client(httpx.MockTransport(refuse)).create_user("hl-x")


def test_timeout_is_transient() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(HubUnavailable, match="timed out"):
        client(httpx.MockTransport(slow)).get_user("hl-x")


@pytest.mark.parametrize(
    ("status", "error"), [(400, HubRequestError), (403, HubRequestError), (404, HubNotFound)]
)
def test_client_errors_are_terminal(status: int, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        answer(status, {"status": status, "message": "no"}).start_server(
            "hl-x", {"image": "default"}
        )
    assert not isinstance(info.value, HubUnavailable)


def test_conflict_on_create_means_it_exists() -> None:
    assert answer(409, {"message": "User hl-x already exists"}).create_user("hl-x") is False
    assert answer(201, {"name": "hl-x"}).create_user("hl-x") is True


def test_conflict_elsewhere_is_raised() -> None:
    with pytest.raises(HubConflict):
        answer(409, {"message": "x"}).create_token("hl-x", scopes=[], expires_in=1, note="n")


def test_already_running_counts_as_started() -> None:
    hub = answer(400, {"message": "hl-x is already running"})
    assert hub.start_server("hl-x", {"image": "default"}) is True
    assert answer(202).start_server("hl-x", {"image": "default"}) is False


HUB_404 = {"status": 404, "message": "Not Found"}  # JupyterHub's API, as it answers


def test_missing_user_and_stopped_server_are_not_errors() -> None:
    assert answer(404, HUB_404).get_user("hl-x") is None
    assert answer(404, HUB_404).delete_user("hl-x") is False
    assert answer(404, HUB_404).stop_server("hl-x") is True
    assert answer(202).stop_server("hl-x") is False


def test_the_proxys_own_404_is_the_hub_away_not_a_missing_user() -> None:
    """configurable-http-proxy answers 404 (an HTML page) for /hub/api/ until the Hub has
    registered its route, as it does while a Hub restarts: a launch failed on it, and a
    deletion would have looked done."""

    def proxy_404(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, text="<html><body>404: Not Found</body></html>")

    hub = client(httpx.MockTransport(proxy_404))
    for call in (
        lambda: hub.create_user("hl-x"),
        lambda: hub.get_user("hl-x"),
        lambda: hub.delete_user("hl-x"),
        lambda: hub.stop_server("hl-x"),
        lambda: hub.start_server("hl-x", {"image": "default"}),
    ):
        with pytest.raises(HubUnavailable, match="not routed"):
            call()


def test_progress_stream_ready_and_failed() -> None:
    def stream(events: list[dict[str, object]]) -> HubClient:
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
        return client(
            httpx.MockTransport(
                lambda r: httpx.Response(
                    200, text=body, headers={"Content-Type": "text/event-stream"}
                )
            )
        )

    seen: list[str] = []
    hub = stream([{"progress": 50, "message": "pulling"}, {"ready": True, "url": "/user/hl-x/"}])
    assert hub.wait_ready("hl-x", timeout=5, on_progress=seen.append) == "/user/hl-x/"
    assert seen == ["pulling"]

    with pytest.raises(HubSpawnFailed) as info:
        stream([{"failed": True, "message": "Spawn failed: bad"}]).wait_ready("hl-x", timeout=5)
    assert info.value.detail == "Spawn failed: bad"

    with pytest.raises(HubUnavailable):
        stream([{"progress": 10, "message": "x"}]).wait_ready("hl-x", timeout=5)


def test_users_are_read_in_pages() -> None:
    pages = {
        0: {"items": [{"name": "a"}, {"name": "b"}], "_pagination": {"next": {"offset": 2}}},
        2: {"items": [{"name": "c"}], "_pagination": {"next": None}},
    }

    def handle(request: httpx.Request) -> httpx.Response:
        assert request.headers["Accept"] == "application/jupyterhub-pagination+json"
        return httpx.Response(200, json=pages[int(request.url.params["offset"])])

    names = [u.name for u in client(httpx.MockTransport(handle)).iter_users(page_size=2)]
    assert names == ["a", "b", "c"]


def test_tokens_are_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    issued = "user-token-abcdef0123456789"
    hub = answer(201, {"token": issued})
    assert hub.create_token("hl-x", scopes=["access:servers!user=hl-x"], expires_in=60, note="n")
    with pytest.raises(HubUnavailable):
        answer(500, {"message": "x"}).create_user("hl-x")
    assert TOKEN not in caplog.text and issued not in caplog.text


def test_a_stop_that_outlasts_the_request_is_still_stopping_not_an_outage() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        assert request.extensions["timeout"]["read"] >= 30  # longer than the Hub's 10 s wait
        raise httpx.ReadTimeout("slow stop", request=request)

    assert client(httpx.MockTransport(slow)).stop_server("hl-x") is False
