"""The HTTP intake with a SQLite database and the queue replaced by a list (no Hub here)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.main import MAX_BODY_BYTES, create_app
from worker.db import session_scope
from worker.enqueue import QueueUnavailable
from worker.models import Launch, LaunchEvent
from worker.settings import Settings


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    sent: list[str] = []
    monkeypatch.setattr("api.intake.send_launch", sent.append)
    return sent


@pytest.fixture
def api(settings: Settings, sent: list[str]) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def count_rows(settings: Settings) -> tuple[int, int]:
    with session_scope(settings.database_url) as db:
        return (
            db.scalar(select(func.count()).select_from(Launch)) or 0,
            db.scalar(select(func.count()).select_from(LaunchEvent)) or 0,
        )


def test_accepted_launch_is_committed_then_sent(
    api: TestClient, settings: Settings, sent: list[str]
) -> None:
    response = api.post("/api/launches", json={"image": "default", "lifetime": 60})

    assert response.status_code == 202
    body = response.json()
    assert set(body) == {"id", "status", "status_url", "events_url"}
    assert body["status"] == "queued"
    assert response.headers["Location"] == body["status_url"]
    assert body["status_url"].endswith(f"/api/launches/{body['id']}")
    assert len(body["id"]) >= 22  # 128 random bits, url-safe
    assert sent == [body["id"]]
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
    ({"image": "default", "lifetime": 10**9}, 422, "at most 21600"),
    ({"image": "default", "ref": "main"}, 422, "'ref' goes with 'repo'"),
    ({"image": "default", "repo": "https://example.org/x"}, 422, "exactly one"),
    ({"repo": "http://example.org/x"}, 422, "scheme must be one of: git, https"),
    ({"repo": "file:///etc"}, 422, "scheme must be one of"),
    ({"repo": "gh:not-a-pair"}, 422, "'gh:' takes owner/repo"),
    ({"repo": "-uhttps://x/y"}, 422, "must be a URL"),
    ({"repo": "https://127.0.0.1/x"}, 422, "not a public address"),
    ({"repo": "https://10.1.2.3/x"}, 422, "not a public address"),
    ({"repo": "https://169.254.169.254/latest"}, 422, "not a public address"),
    ({"repo": "https://[::1]/x"}, 422, "not a public address"),
    ({"repo": "https://localhost/x"}, 422, "not a public address"),
    ({"repo": "https://u:p@127.0.0.1/x"}, 422, "credentials"),
    ({"repo": "https://127.0.0.1/x", "ref": "--upload-pack=touch /tmp/x"}, 422, "ref must"),
    ({"repo": "gh:o/r", "ref": "a b"}, 422, "ref must"),
    ([1, 2], 422, "JSON object"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_BODIES)
def test_bad_input_is_refused_and_leaves_no_row(
    api: TestClient, settings: Settings, sent: list[str], body: object, status: int, message: str
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
    api: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(_launch_id: str) -> None:
        raise QueueUnavailable("connection refused")

    monkeypatch.setattr("api.intake.send_launch", down)
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


def test_banned_specs_are_403(settings: Settings, sent: list[str]) -> None:
    banned = settings.model_copy(update={"banned_specs": [r"^https://github\.com/evil/"]})
    with TestClient(create_app(banned)) as client:
        response = client.post("/api/launches", json={"repo": "gh:evil/miner", "ref": "main"})
    assert response.status_code == 403
    assert response.json()["detail"] == "This repository is not allowed on this service."
    assert count_rows(settings) == (0, 0) and sent == []
