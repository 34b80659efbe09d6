"""The HTTP intake with a SQLite database and the queue replaced by a list (no Hub here)."""

from __future__ import annotations

import html
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.main import MAX_BODY_BYTES, create_app
from api.routes.binder import cors_headers
from tests.fakes import RecordingBroker
from worker.broker import LAUNCH_TASK, Message
from worker.db import session_scope
from worker.hub_client import HubUnavailable, raise_for_status
from worker.models import Launch, LaunchEvent
from worker.settings import Settings


@pytest.fixture
def broker(settings: Settings) -> RecordingBroker:
    # Refuses (fails the test on) any message whose row is not committed yet.
    return RecordingBroker(settings.database_url)


@pytest.fixture
def sent(broker: RecordingBroker) -> list[Message]:
    return broker.sent


@pytest.fixture
def api(settings: Settings, broker: RecordingBroker) -> Iterator[TestClient]:
    with TestClient(create_app(settings, broker=broker)) as client:
        yield client


def count_rows(settings: Settings) -> tuple[int, int]:
    with session_scope(settings.database_url) as db:
        return (
            db.scalar(select(func.count()).select_from(Launch)) or 0,
            db.scalar(select(func.count()).select_from(LaunchEvent)) or 0,
        )


def test_accepted_launch_is_committed_then_sent(
    api: TestClient, settings: Settings, sent: list[Message]
) -> None:
    response = api.post("/api/launches", json={"image": "default", "lifetime": 60})

    assert response.status_code == 202
    body = response.json()
    assert set(body) == {"id", "status", "status_url", "events_url"}
    assert body["status"] == "queued"
    assert response.headers["Location"] == body["status_url"]
    assert body["status_url"].endswith(f"/api/launches/{body['id']}")
    assert len(body["id"]) >= 22  # 128 random bits, url-safe
    assert [(m.task, m.argument) for m in sent] == [(LAUNCH_TASK, body["id"])]
    launch = api.get(f"/api/launches/{body['id']}").json()
    assert launch["status"] == "queued" and launch["spec"] == {"image": "default"}
    assert launch["url"] is None and launch["user"] is None
    assert count_rows(settings) == (1, 1)


BAD_BODIES: list[tuple[object, int, str]] = [
    ({}, 422, "exactly one of 'image' or 'repo'"),
    ({"image": ""}, 422, "must not be empty"),
    ({"image": "   "}, 422, "must not be empty"),
    ({"image": "UPPER/Case"}, 422, "image must look like"),
    ({"image": "-rf"}, 422, "image must look like"),
    ({"image": "a" * 300}, 422, "at most 255"),
    ({"image": "default", "surprise": 1}, 422, "surprise: unknown field"),
    ({"image": 42}, 422, "image"),
    ({"image": "default", "lifetime": 0}, 422, "lifetime"),
    # Strict types: nothing is coerced (true would be 1 second, "60" would be 60).
    ({"image": "default", "lifetime": True}, 422, "lifetime: must be a JSON integer"),
    ({"image": "default", "lifetime": "60"}, 422, "lifetime: must be a JSON integer"),
    ({"image": "default", "lifetime": 60.5}, 422, "lifetime: must be a JSON integer"),
    ({"image": True}, 422, "image: must be a JSON string"),
    ({"image": ["default"]}, 422, "image: must be a JSON string"),
    ({"repo": {"url": "gh:o/r"}}, 422, "repo: must be a JSON string"),
    ({"repo": "gh:o/r", "ref": 1}, 422, "ref: must be a JSON string"),
    ({"image": "default", "lifetime": 10**9}, 422, "at most 21600"),
    ({"image": "default", "ref": "main"}, 422, "'ref' goes with 'repo'"),
    ({"image": "default", "repo": "https://example.org/x"}, 422, "exactly one"),
    ({"repo": "http://example.org/x"}, 422, "scheme must be one of: https"),
    ({"repo": "git://example.org/x"}, 422, "git:// URLs are not accepted"),
    ({"repo": "file:///etc"}, 422, "scheme must be one of"),
    ({"repo": "gh:not-a-pair"}, 422, "'gh:' takes owner/repo"),
    ({"repo": "-uhttps://x/y"}, 422, "must be a URL"),
    ({"repo": "https://127.0.0.1/x"}, 422, "not a public address"),
    ({"repo": "https://10.1.2.3/x"}, 422, "not a public address"),
    ({"repo": "https://169.254.169.254/latest"}, 422, "not a public address"),
    ({"repo": "https://[::1]/x"}, 422, "not a public address"),
    ({"repo": "https://[64:ff9b::a9fe:a9fe]/latest"}, 422, "not a public address"),  # NAT64
    ({"repo": "https://[2002:a00:1::1]/x"}, 422, "not a public address"),  # 6to4 -> 10.0.0.1
    ({"repo": "https://localhost/x"}, 422, "not a public address"),
    ({"repo": "https://u:p@127.0.0.1/x"}, 422, "credentials"),
    ({"repo": "https://127.0.0.1/x", "ref": "--upload-pack=touch /tmp/x"}, 422, "ref must"),
    ({"repo": "gh:o/r", "ref": "a b"}, 422, "ref must"),
    ([1, 2], 422, "JSON object"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_BODIES)
def test_bad_input_is_refused_and_leaves_no_row(
    api: TestClient,
    settings: Settings,
    sent: list[Message],
    body: object,
    status: int,
    message: str,
) -> None:
    response = api.post("/api/launches", json=body)
    assert response.status_code == status
    assert message in response.json()["detail"]
    assert count_rows(settings) == (0, 0) and sent == []


def test_malformed_json_is_400(api: TestClient, settings: Settings) -> None:
    response = api.post(
        "/api/launches", content=b'{"image": ', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json() == {"detail": "Request body is not valid JSON."}
    assert count_rows(settings) == (0, 0)


def test_oversized_body_is_413(api: TestClient, settings: Settings) -> None:
    big = b'{"image": "' + b"a" * MAX_BODY_BYTES + b'"}'
    response = api.post("/api/launches", content=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert "at most" in response.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        yield b'{"image": "'
        for _ in range(10):
            yield b"a" * 4096
        yield b'"}'

    response = api.post(
        "/api/launches", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert count_rows(settings) == (0, 0)


def test_queue_down_is_503_and_the_launch_is_marked_failed(
    api: TestClient, settings: Settings, broker: RecordingBroker
) -> None:
    broker.down = True
    response = api.post("/api/launches", json={"image": "default"})
    assert response.status_code == 503
    assert "queue is unavailable" in response.json()["detail"]
    with session_scope(settings.database_url) as db:
        [launch] = db.scalars(select(Launch))
        assert launch.status == "failed" and launch.user_removed_at is not None


def test_unknown_launch_is_404(api: TestClient) -> None:
    for method in ("GET", "DELETE"):
        response = api.request(method, "/api/launches/nope")
        assert response.status_code == 404
        assert "No launch with this id" in response.json()["detail"]
    assert api.get("/api/launches/nope/events").status_code == 404


def test_openapi_is_served(api: TestClient) -> None:
    spec = api.get("/api/openapi.json").json()
    assert "/api/launches" in spec["paths"] and "/api/health" in spec["paths"]
    assert api.get("/api/docs").status_code == 200


def test_app_factory_connects_to_nothing() -> None:
    # Nothing listens on port 1: building the app must not try to connect anywhere.
    create_app(
        Settings(
            database_url="postgresql+psycopg://nobody@127.0.0.1:1/none",
            broker_url="redis://127.0.0.1:1/0",
            hub_api_url="http://127.0.0.1:1/hub/api",
        )
    )


def test_banned_specs_are_403(
    settings: Settings, broker: RecordingBroker, sent: list[Message]
) -> None:
    banned = settings.model_copy(update={"banned_specs": [r"^https://github\.com/evil/"]})
    with TestClient(create_app(banned, broker=broker)) as client:
        response = client.post("/api/launches", json={"repo": "gh:evil/miner", "ref": "main"})
    assert response.status_code == 403
    assert response.json()["detail"] == "This repository is not allowed on this service."
    assert count_rows(settings) == (0, 0) and sent == []


def test_generated_urls_are_on_the_public_url_whatever_the_host_header(
    api: TestClient, settings: Settings
) -> None:
    response = api.post(
        "/api/launches",
        json={"image": "default"},
        headers={"Host": "evil.example", "X-Forwarded-Host": "evil.example"},
    )
    assert response.status_code == 202
    body = response.json()
    base = f"{settings.public_url}/api/launches/{body['id']}"
    assert response.headers["Location"] == body["status_url"] == base
    assert body["events_url"] == f"{base}/events"
    # Starlette's slash redirect would write the Host header into Location; there is none.
    slash = api.get("/api/health/", headers={"Host": "evil.example"}, follow_redirects=False)
    assert slash.status_code == 404 and "location" not in slash.headers


V2 = "/v2/gh/binder-examples/requirements/master"


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("urlpath=../hl-other/lab", "urlpath must not contain '..' segments"),
        ("urlpath=lab/../../hl-other/", "'..' segments"),
        ("labpath=../../../hl-other/lab", "labpath must not contain '..' segments"),
        ("urlpath=%252e%252e/hl-other/", "escaped dots, slashes"),  # arrives as %2e%2e
        ("urlpath=.%252E/hl-other/", "escaped dots, slashes"),
        ("urlpath=lab%252f..%252f..%252fhl-other", "escaped dots, slashes"),
        ("labpath=x%255c..%255chl-other", "escaped dots, slashes"),
        ("urlpath=..%5Chl-other%5C", "backslashes"),  # arrives as ..\hl-other\
        ("urlpath=/user/hl-other/", "without a leading '/'"),
        ("urlpath=//evil.example/collect", "without a leading '/'"),
        ("urlpath=http://evil.example/", "not a URL"),
        ("urlpath=javascript:alert(document.cookie)", "not a URL"),
        ("urlpath=.%09./hl-other/", "control characters"),  # browsers drop the tab
        ("labpath=a%0A/b", "control characters"),
        ("urlpath=" + "a" * 2100, "at most 2048"),
    ],
)
def test_launch_page_refuses_paths_that_leave_the_sessions_server(
    api: TestClient, query: str, message: str
) -> None:
    response = api.get(f"{V2}?{query}")
    assert response.status_code == 400
    assert message in html.unescape(response.text)
    assert "HubLaunch.page(" not in response.text  # nothing would open a server with the token


@pytest.mark.parametrize(
    ("query", "rendered"),
    [
        ("urlpath=lab/tree/index.ipynb", '"lab/tree/index.ipynb"'),
        ("labpath=notebooks/my%20file.ipynb", '"notebooks/my file.ipynb"'),
        ("urlpath=voila/render/a.ipynb%23cell", '"voila/render/a.ipynb#cell"'),
        # nbgitpuller: escaped slashes in the query are fine, they cannot move the URL.
        (
            "urlpath=git-pull%3Frepo%3Dhttps%253A%252F%252Fgithub.com%252Fo%252Fr",
            '"git-pull?repo=https%3A%2F%2Fgithub.com%2Fo%2Fr"',
        ),
    ],
)
def test_launch_page_keeps_paths_inside_the_server(
    api: TestClient, query: str, rendered: str
) -> None:
    response = api.get(f"{V2}?{query}")
    assert response.status_code == 200
    assert rendered in response.text


def test_cors_allows_only_the_configured_origin(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HUBLAUNCH_CORS_ALLOW_ORIGIN", "https://docs.example.org")
    configured = Settings(**settings.model_dump(exclude={"cors_allow_origin"}))
    assert configured.cors_allow_origin == "https://docs.example.org"
    path = "/build/svn/x"  # refused spec: one failed event, nothing launched
    with TestClient(create_app(configured)) as client:
        allowed = client.get(path, headers={"Origin": "https://docs.example.org"})
        other = client.get(path, headers={"Origin": "https://evil.example"})
        none = client.get(path)
    assert allowed.headers["access-control-allow-origin"] == "https://docs.example.org"
    assert "origin" in allowed.headers["vary"].lower()
    assert "access-control-allow-origin" not in other.headers
    assert "access-control-allow-origin" not in none.headers
    assert "origin" in other.headers["vary"].lower()  # a cache must not reuse either answer


def test_cors_wildcard_by_default(api: TestClient) -> None:
    response = api.get("/build/svn/x", headers={"Origin": "https://anywhere.example"})
    assert response.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize(
    "configured", ["https://a.example", "https://b.example", "https://a.example, https://b.example"]
)
def test_cors_echoes_each_configured_origin_and_no_other(configured: str) -> None:
    settings = Settings(cors_allow_origin=configured)
    for origin in [o.strip() for o in configured.split(",")]:
        assert cors_headers(settings, origin) == {
            "Access-Control-Allow-Origin": origin,
            "Vary": "Origin",
        }
    for stranger in ("https://evil.example", "https://a.example.evil", "null", "", None):
        assert cors_headers(settings, stranger) == {"Vary": "Origin"}


def test_cors_origin_comes_from_the_settings_the_app_was_given(
    settings: Settings, broker: RecordingBroker
) -> None:
    for origin in ("https://a.example", "https://b.example"):
        configured = settings.model_copy(update={"cors_allow_origin": origin})
        with TestClient(create_app(configured, broker=broker)) as client:
            mine = client.get("/build/svn/x", headers={"Origin": origin})
            other = client.get("/build/svn/x", headers={"Origin": "https://c.example"})
        assert mine.headers["access-control-allow-origin"] == origin
        assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize("launch_id", ["a%00b", "..%2F..", "x" * 200, "%E2%80%8B"])
def test_ids_no_launch_can_have_are_404_on_every_route(api: TestClient, launch_id: str) -> None:
    # A NUL byte once reached PostgreSQL (which refuses it in text) and came back as a 500.
    for method, suffix in (("GET", ""), ("DELETE", ""), ("GET", "/events")):
        response = api.request(method, f"/api/launches/{launch_id}{suffix}")
        assert response.status_code == 404, (method, suffix, response.text)


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_hub_api_calls_reaching_the_app_say_the_hub_is_away(api: TestClient, method: str) -> None:
    # The proxy's default route is the app: while the Hub's own route is missing (the Hub is
    # starting), the worker's Hub calls land here. A 404 read as "no such user" failed a
    # launch in the Hub-restart fault test; a 503 is waited for.
    response = api.request(method, "/hub/api/users/hl-0123456789abcdef")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "2"
    with pytest.raises(HubUnavailable):
        raise_for_status(response)


@pytest.mark.parametrize(
    ("query", "rendered"),
    [
        # Older links: BinderHub opens the file as tree/<filepath>.
        ("filepath=notebooks/index.ipynb", '"tree/notebooks/index.ipynb"'),
        # urlpath (or labpath) wins over filepath.
        ("filepath=a.ipynb&urlpath=lab", '"lab"'),
    ],
)
def test_older_links_with_filepath_open_the_file(
    api: TestClient, query: str, rendered: str
) -> None:
    response = api.get(f"{V2}?{query}")
    assert response.status_code == 200
    assert rendered in response.text


def test_filepath_is_held_to_the_same_rules_as_urlpath(api: TestClient) -> None:
    response = api.get(f"{V2}?filepath=../hl-other/secret.ipynb")
    assert response.status_code == 400
    assert "filepath must not contain '..' segments" in html.unescape(response.text)
    assert "HubLaunch.page(" not in response.text


def test_binderhubs_versions_and_badges(api: TestClient) -> None:
    versions = api.get("/versions").json()
    assert versions["builder_info"]["builder"] == "venv"
    assert versions["binderhub"].startswith("hublaunch-") and versions["hublaunch"]
    for path in ("/badge.svg", "/badge_logo.svg"):
        badge = api.get(path)
        assert badge.status_code == 200
        assert badge.headers["content-type"].startswith("image/svg+xml")


def test_binderhubs_health_names_each_service(api: TestClient) -> None:
    response = api.get("/health")
    body = response.json()
    services = {check["service"]: check["ok"] for check in body["checks"]}
    assert set(services) == {"JupyterHub API", "Database", "Queue"}
    assert services["Database"] is True
    # No Hub answers in these tests: BinderHub's shape says so, with its status code.
    assert services["JupyterHub API"] is False and body["ok"] is False
    assert response.status_code == 503
