"""Crafted input that once gave a 500 (issue 11): each is now a 4xx that says what to fix, or one
``failed`` event on the /build stream; and the OpenAPI document says what the API enforces."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import jsonschema
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api import binder
from api.events import parse_event_id
from api.main import create_app
from api.routes.binder import _resume
from tests.fakes import RecordingBroker
from worker import repos
from worker.db import session_scope
from worker.models import Launch
from worker.settings import Settings

# Each made urlsplit, or reading .port / .hostname, raise ValueError (a 500 before).
UNREADABLE_URLS = [
    "https://example.com:99999/x",
    "https://example.com:abc/x",
    "https://example.com:-1/x",
    "https://example.com:0/x",
    "https://[::1/x",
    "https://[zzz]/x",
    "https://[::1]:99999/x",
    "https://a]b/x",
]


@pytest.fixture
def broker(settings: Settings) -> RecordingBroker:
    return RecordingBroker(settings.database_url)


@pytest.fixture
def api(settings: Settings, broker: RecordingBroker) -> Iterator[TestClient]:
    with TestClient(create_app(settings, broker=broker)) as client:
        yield client


def launch_count(settings: Settings) -> int:
    with session_scope(settings.database_url) as db:
        return db.scalar(select(func.count()).select_from(Launch)) or 0


def stream_events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]


# -- repository URLs that urlsplit cannot read ---------------------------------------------


@pytest.mark.parametrize("url", UNREADABLE_URLS)
@pytest.mark.parametrize("allow_local", [False, True])
def test_every_repos_function_refuses_an_unreadable_url_as_a_spec_error(
    url: str, allow_local: bool
) -> None:
    settings = Settings(allow_local_repos=allow_local)
    with pytest.raises(repos.SpecError, match=r"repo URL .*https://host\[:port\]/owner/repo"):
        repos.normalize(url, None, settings)
    # The functions the worker calls on stored specs refuse them the same way.
    with pytest.raises(repos.SpecError):
        repos.check_host(url, settings)
    with pytest.raises(repos.SpecError):
        repos.git_options(url, ["93.184.216.34"], settings)


def test_a_readable_port_still_passes() -> None:
    spec = repos.normalize("https://example.com:8443/x", None, Settings())
    assert repos.split_url(spec.url).port == 8443


@pytest.mark.parametrize("url", UNREADABLE_URLS)
def test_an_unreadable_repo_url_is_a_422_that_says_what_to_fix(
    api: TestClient, settings: Settings, url: str
) -> None:
    response = api.post("/api/launches", json={"repo": url})
    assert response.status_code == 422, response.text
    assert "https://host[:port]/owner/repo" in response.json()["detail"]
    assert launch_count(settings) == 0


@pytest.mark.parametrize("url", UNREADABLE_URLS)
def test_an_unreadable_repo_url_on_build_is_one_failed_event(
    api: TestClient, settings: Settings, url: str
) -> None:
    response = api.get(f"/build/git/{quote(url, safe='')}/HEAD")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    [event] = stream_events(response.text)
    assert event["phase"] == "failed"
    assert "https://host[:port]/owner/repo" in event["message"]
    assert launch_count(settings) == 0


def test_a_resume_with_an_unreadable_spec_is_one_failed_event(
    api: TestClient, settings: Settings
) -> None:
    # A reconnect naming a real launch normalizes the link's spec to compare: that raised.
    launch_id = api.post("/api/launches", json={"image": "default"}).json()["id"]
    url = quote("https://example.com:99999/x", safe="")
    response = api.get(f"/build/git/{url}/HEAD", headers={"Last-Event-ID": f"{launch_id}:1"})
    assert response.status_code == 200
    [event] = stream_events(response.text)
    assert event["phase"] == "failed" and "port" in event["message"]
    assert launch_count(settings) == 1


# -- Last-Event-ID ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0),
        ("42", 42),
        ("9" * 18, 10**18 - 1),
        ("9" * 19, None),  # past a BIGINT: OverflowError in SQLite before
        ("1" * 23, None),
        ("²", None),  # str.isdigit() is True, int() refuses it
        ("\uff11\uff12", None),  # fullwidth digits: int() would read 12
        ("\u0663", None),  # ARABIC-INDIC DIGIT THREE
        ("-1", None),
        ("+1", None),
        (" 1", None),
        ("1_000", None),
        ("", None),
        (None, None),
    ],
)
def test_event_ids_are_ascii_digits_of_bounded_length(
    value: str | None, expected: int | None
) -> None:
    assert parse_event_id(value) == expected


@pytest.fixture
def failed_launch(
    api: TestClient, broker: RecordingBroker, settings: Settings
) -> tuple[str, list[dict[str, Any]]]:
    """A launch that failed (the queue refused it): its id and its two events, so that its
    stream ends instead of waiting."""
    broker.down = True
    assert api.post("/api/launches", json={"image": "default"}).status_code == 503
    broker.down = False
    with session_scope(settings.database_url) as db:
        launch_id = db.scalars(select(Launch.id)).one()
    events = stream_events(api.get(f"/api/launches/{launch_id}/events").text)
    assert [e["phase"] for e in events] == ["waiting", "failed"]
    return launch_id, events


# Header values reach the app as latin-1: b"\xb2" is "²" there.
CRAFTED_IDS = ["²", "¹³", "9" * 23, "-1", "x"]


@pytest.mark.parametrize("header", CRAFTED_IDS)
def test_a_crafted_last_event_id_replays_the_whole_stream(
    api: TestClient, failed_launch: tuple[str, list[dict[str, Any]]], header: str
) -> None:
    launch_id, events = failed_launch
    response = api.get(
        f"/api/launches/{launch_id}/events", headers={"Last-Event-ID": header.encode("latin-1")}
    )
    assert response.status_code == 200
    assert stream_events(response.text) == events


def test_a_valid_last_event_id_still_resumes(
    api: TestClient, failed_launch: tuple[str, list[dict[str, Any]]]
) -> None:
    launch_id, events = failed_launch
    first = str(events[0]["id"])
    response = api.get(f"/api/launches/{launch_id}/events", headers={"Last-Event-ID": first})
    assert stream_events(response.text) == events[1:]


@pytest.mark.parametrize("seen", [*CRAFTED_IDS, ""])
def test_build_resume_ignores_a_crafted_event_id(
    api: TestClient,
    broker: RecordingBroker,
    settings: Settings,
    failed_launch: tuple[str, list[dict[str, Any]]],
    seen: str,
) -> None:
    launch_id, _ = failed_launch
    spec = binder.BinderSpec("image", "default")
    assert _resume(settings, f"{launch_id}:{seen}", spec) == (None, 0)
    assert _resume(settings, f"{launch_id}:7", spec) == (launch_id, 7)
    # Through HTTP: a resume of the failed launch's stream, which is over: nothing more is sent.
    response = api.get("/build/image/default", headers={"Last-Event-ID": f"{launch_id}:7"})
    assert response.status_code == 200 and stream_events(response.text) == []
    # A crafted id is no resume: a new launch starts (here refused: the queue is down).
    broker.down = True
    crafted = f"{launch_id}:{seen}".encode("latin-1")
    response = api.get("/build/image/default", headers={"Last-Event-ID": crafted})
    [event] = stream_events(response.text)
    assert event["phase"] == "failed" and "queue is unavailable" in event["message"]


# -- the OpenAPI document says what the API enforces ------------------------------------------


@pytest.fixture
def document(api: TestClient) -> dict[str, Any]:
    return dict(api.get("/api/openapi.json").json())


def launch_request_validator(document: dict[str, Any]) -> jsonschema.Draft202012Validator:
    schema = {
        **document["components"]["schemas"]["LaunchRequest"],
        "$defs": document["components"]["schemas"],
    }
    text = json.dumps(schema).replace("#/components/schemas/", "#/$defs/")
    return jsonschema.Draft202012Validator(json.loads(text))


@pytest.mark.parametrize(
    "body",
    [
        {"image": "default"},
        {"image": "default", "lifetime": 60},
        {"image": "default", "repo": None, "ref": None},
        {"repo": "https://example.com:99999/x"},  # the schema cannot see the port; 422 later
        {"repo": "gh:a/b", "ref": "main"},
        {"repo": "gh:a/b", "image": None},
        {},
        {"image": "default", "repo": "gh:a/b"},
        {"image": "default", "ref": "main"},
        {"image": None, "repo": None},
        {"ref": "main"},
        {"image": 3},
        {"image": "default", "other": 1},
    ],
)
def test_the_schema_of_a_launch_request_says_which_bodies_the_api_takes(
    api: TestClient, document: dict[str, Any], body: dict[str, Any]
) -> None:
    valid_by_schema = launch_request_validator(document).is_valid(body)
    response = api.post("/api/launches", json=body)
    detail = response.json().get("detail", "")
    # A repo URL is checked beyond its schema (its host and port): only that may still refuse.
    accepted = response.status_code == 202 or detail.startswith("repo ")
    assert valid_by_schema == accepted, (body, response.status_code, detail)


def test_build_declares_its_parameters_and_statuses(document: dict[str, Any]) -> None:
    build = document["paths"]["/build/{provider}/{spec}"]["get"]
    parameters = {p["name"]: p for p in build["parameters"]}
    assert parameters["provider"]["schema"]["enum"] == list(binder.PROVIDERS)
    assert parameters["spec"]["in"] == "path" and parameters["spec"]["required"]
    assert parameters["Last-Event-ID"]["in"] == "header"
    assert {"200", "404", "429"} <= set(build["responses"])
    assert "text/event-stream" in build["responses"]["200"]["content"]


def test_every_status_the_launch_routes_send_is_declared(document: dict[str, Any]) -> None:
    paths = document["paths"]
    post = paths["/api/launches"]["post"]["responses"]
    assert {"202", "400", "403", "413", "422", "429", "503"} <= set(post)
    assert "Retry-After" in post["429"]["headers"]
    assert {"202", "404", "503"} <= set(paths["/api/launches/{launch_id}"]["delete"]["responses"])
    events = paths["/api/launches/{launch_id}/events"]["get"]
    assert "Last-Event-ID" in {p["name"] for p in events["parameters"]}


def test_validation_errors_are_documented_as_the_problem_the_app_sends(
    api: TestClient, document: dict[str, Any]
) -> None:
    assert "HTTPValidationError" not in json.dumps(document)
    for path in document["paths"].values():
        for operation in path.values():
            if "422" in operation["responses"]:
                schema = operation["responses"]["422"]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Problem"}
            if operation.get("security"):
                assert "401" in operation["responses"]
    # And that is what a body the app cannot read gets.
    assert isinstance(api.post("/api/launches", json={"image": 3}).json()["detail"], str)


def test_a_banned_spec_is_the_declared_403(settings: Settings) -> None:
    banned = Settings(**{**settings.model_dump(), "banned_specs": ["example\\.org"]})
    with TestClient(create_app(banned, broker=RecordingBroker(banned.database_url))) as client:
        response = client.post("/api/launches", json={"repo": "https://example.org/x"})
    assert response.status_code == 403


@pytest.mark.parametrize("method", ["OPTIONS", "PUT", "PATCH"])
def test_a_wrong_method_names_every_method_of_the_path(api: TestClient, method: str) -> None:
    response = api.request(method, "/api/launches/some-id")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, DELETE"
    assert api.request(method, "/api/launches").headers["allow"] == "POST"
