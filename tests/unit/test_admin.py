"""The admin API (/api/admin): its token, the session listing, ending a session, the summary.
On SQLite and PostgreSQL, with the queue replaced by a list."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from api.main import create_app
from api.routes.admin import BAD_CURSOR, DISABLED, INVALID_CREDENTIALS, MISSING_CREDENTIALS
from tests.fakes import RecordingBroker, insert_launch
from worker.broker import TEARDOWN_TASK
from worker.db import session_scope, utcnow
from worker.models import EndReason, Launch, Status
from worker.queries import Cursor, percentile
from worker.settings import Settings

TOKEN = "s3cret-admin-token-" + "x" * 24
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REPO = {"repo": "https://github.com/owner/repo", "ref": "main"}
ROUTES = [
    ("GET", "/api/admin/sessions"),
    ("GET", "/api/admin/summary"),
    ("GET", "/api/admin/pool"),
    ("DELETE", "/api/admin/sessions/some-id"),
]


@pytest.fixture
def admin_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"admin_token": SecretStr(TOKEN)})


@pytest.fixture
def broker(settings: Settings) -> RecordingBroker:
    return RecordingBroker(settings.database_url)


@pytest.fixture
def admin(admin_settings: Settings, broker: RecordingBroker) -> Iterator[TestClient]:
    with TestClient(create_app(admin_settings, broker=broker)) as client:
        yield client


def add(
    settings: Settings,
    spec: dict[str, Any],
    *,
    created: datetime,
    status: Status = Status.queued,
    ready_after: float | None = None,
    ended: datetime | None = None,
    **columns: Any,
) -> str:
    """A launch row as the state machine would have left it (test set-up writes columns)."""
    with session_scope(settings.database_url) as db:
        launch = insert_launch(db, spec, lifetime=600, now=created)
        launch.status = status
        if ready_after is not None:
            launch.ready_at = created + timedelta(seconds=ready_after)
            launch.expires_at = launch.ready_at + timedelta(seconds=600)
            launch.hub_user = f"hl-{launch.id[:16].lower()}"
        if ended is not None:
            launch.ended_at = ended
            launch.end_reason = EndReason.failed if status == Status.failed else EndReason.idle
        for name, value in columns.items():
            setattr(launch, name, value)
        return launch.id


# --- The token -----------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize("headers", [{}, AUTH, {"Authorization": "Bearer anything"}])
def test_without_a_token_setting_the_admin_api_is_disabled(
    settings: Settings, method: str, path: str, headers: dict[str, str]
) -> None:
    with TestClient(create_app(settings, broker=RecordingBroker(settings.database_url))) as c:
        response = c.request(method, path, headers=headers)
    assert response.status_code == 404
    assert response.json() == {"detail": DISABLED}


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_without_a_token_the_answer_is_401_with_a_challenge(
    admin: TestClient, method: str, path: str
) -> None:
    response = admin.request(method, path)
    assert response.status_code == 401
    assert response.json() == {"detail": MISSING_CREDENTIALS}
    assert response.headers["WWW-Authenticate"] == "Bearer"


WRONG = [
    {"Authorization": "Bearer wrong-token-9f8e7d"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Bearer {TOKEN[:-1]}"},
    {"Authorization": f"bearer {TOKEN.upper()}"},
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize("headers", WRONG, ids=["other", "longer", "shorter", "case"])
def test_a_wrong_token_is_401_and_never_echoed(
    admin: TestClient, method: str, path: str, headers: dict[str, str]
) -> None:
    response = admin.request(method, path, headers=headers)
    assert response.status_code == 401
    assert response.json() == {"detail": INVALID_CREDENTIALS}
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    sent = headers["Authorization"].split(" ", 1)[1]
    assert sent not in response.text and TOKEN not in response.text
    assert all(sent not in v and TOKEN not in v for v in response.headers.values())


@pytest.mark.parametrize(
    "value",
    [f"Basic {base64.b64encode(f'admin:{TOKEN}'.encode()).decode()}", TOKEN, f"Token {TOKEN}"],
    ids=["basic", "bare", "other-scheme"],
)
def test_another_scheme_is_401(admin: TestClient, value: str) -> None:
    response = admin.get("/api/admin/summary", headers={"Authorization": value})
    assert response.status_code == 401
    assert response.json() == {"detail": MISSING_CREDENTIALS}
    assert TOKEN not in response.text


def test_the_token_is_checked_before_the_parameters(admin: TestClient) -> None:
    # Nothing about the parameters is told to a caller without the token.
    assert admin.get("/api/admin/sessions?limit=0").status_code == 401
    assert admin.get("/api/admin/summary?window=1").status_code == 401


def test_the_right_token_is_let_in(admin: TestClient) -> None:
    response = admin.get("/api/admin/sessions", headers=AUTH)
    assert response.status_code == 200
    assert response.json() == {"items": [], "next": None, "next_url": None}


# --- Listing -------------------------------------------------------------------------------


def test_listing_shows_what_operators_need_and_never_the_token(
    admin: TestClient, admin_settings: Settings
) -> None:
    now = utcnow()
    launch_id = add(
        admin_settings,
        {"image": "default"},
        created=now - timedelta(seconds=30),
        status=Status.ready,
        ready_after=5,
        token_ciphertext="gAAAA-ciphertext",
    )
    items = admin.get("/api/admin/sessions", headers=AUTH).json()["items"]
    assert len(items) == 1
    item = items[0]
    assert set(item) == {
        "id",
        "status",
        "spec",
        "user",
        "created_at",
        "ready_at",
        "expires_at",
        "ended_at",
        "end_reason",
        "error",
    }
    assert item["id"] == launch_id and item["status"] == "ready"
    assert item["spec"] == {"image": "default"} and item["user"].startswith("hl-")
    created = datetime.fromisoformat(item["created_at"])
    assert created == now - timedelta(seconds=30)
    assert datetime.fromisoformat(item["ready_at"]) - created == timedelta(seconds=5)
    assert "ciphertext" not in str(items) and "token" not in str(items)


@pytest.fixture
def many(admin_settings: Settings) -> list[str]:
    """Eleven launches, newest first as the listing orders them: three share one creation time
    (their ids order them), so a cursor on time alone would lose or repeat some."""
    now = utcnow()
    rows: list[tuple[datetime, str]] = []
    for i in range(8):
        created = now - timedelta(minutes=i)
        status = [Status.ready, Status.failed, Status.ended, Status.queued][i % 4]
        spec = REPO if i % 3 == 0 else {"image": f"img{i % 2}"}
        rows.append((created, add(admin_settings, spec, created=created, status=status)))
    same = now - timedelta(seconds=90)
    for _ in range(3):
        rows.append((same, add(admin_settings, {"image": "img0"}, created=same)))
    rows.sort(reverse=True)
    return [launch_id for _, launch_id in rows]


def test_pages_continue_without_duplicates_or_gaps(admin: TestClient, many: list[str]) -> None:
    seen: list[str] = []
    url: str | None = "/api/admin/sessions?limit=2"
    pages = 0
    while url:
        body = admin.get(url, headers=AUTH).json()
        seen += [item["id"] for item in body["items"]]
        assert (body["next"] is None) == (body["next_url"] is None)
        url = body["next_url"]
        pages += 1
    assert seen == many
    assert pages == 6


@pytest.mark.parametrize("limit", [1, 3, 10, 11, 500])
def test_the_cursor_alone_pages_through_everything(
    admin: TestClient, many: list[str], limit: int
) -> None:
    seen: list[str] = []
    params: dict[str, Any] = {"limit": limit}
    while True:
        body = admin.get("/api/admin/sessions", params=params, headers=AUTH).json()
        assert len(body["items"]) <= limit
        seen += [item["id"] for item in body["items"]]
        if body["next"] is None:
            break
        params["before"] = body["next"]
    assert seen == many


def test_filters_by_status_and_spec(admin: TestClient, many: list[str]) -> None:
    def ids(params: list[tuple[str, str]]) -> list[str]:
        response = admin.get("/api/admin/sessions", params=params, headers=AUTH)
        assert response.status_code == 200, response.text
        return [item["id"] for item in response.json()["items"]]

    def statuses(params: list[tuple[str, str]]) -> set[str]:
        response = admin.get("/api/admin/sessions", params=params, headers=AUTH)
        return {item["status"] for item in response.json()["items"]}

    assert len(ids([("status", "ready")])) == 2
    assert statuses([("status", "ready"), ("status", "failed")]) == {"ready", "failed"}
    assert len(ids([("status", "ready"), ("status", "failed")])) == 4
    assert ids([("status", "launching")]) == []
    # Exact image or repository URL; results keep the listing's order.
    repo = ids([("spec", REPO["repo"])])
    assert len(repo) == 3 and repo == [i for i in many if i in repo]
    assert len(ids([("spec", "img0")])) == 5
    assert ids([("spec", "img")]) == [] and ids([("spec", "github.com")]) == []
    assert len(ids([("spec", "img1"), ("status", "failed")])) == 2
    # The filters carry over into the next page's URL.
    body = admin.get(
        "/api/admin/sessions", params={"spec": "img0", "limit": 2}, headers=AUTH
    ).json()
    assert "spec=img0" in body["next_url"] and "limit=2" in body["next_url"]
    assert body["next_url"].startswith("http://127.0.0.1:9999/api/admin/sessions?")


@pytest.mark.parametrize(
    "spec",
    [
        "' OR 1=1 --",
        "img0' OR '1'='1",
        '") OR 1=1; DROP TABLE launches; --',
        "%",
        "_",
        "$.image",
        "\u202eimg0",
        "img0 ",
    ],
)
def test_hostile_spec_strings_match_nothing(admin: TestClient, many: list[str], spec: str) -> None:
    response = admin.get("/api/admin/sessions", params={"spec": spec}, headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["items"] == []
    # The table is still there, whole.
    assert len(admin.get("/api/admin/sessions", headers=AUTH).json()["items"]) == len(many)


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=-1",
        "limit=501",
        "limit=99999999999999999999999999999999",
        "limit=ten",
        "limit=1.5",
        "status=running",
        "status=READY",
        "spec=" + "a" * 1025,
        "spec=img0%00",
        "spec=%0Aimg0",
    ],
)
def test_bad_parameters_are_422_with_a_sentence(admin: TestClient, query: str) -> None:
    response = admin.get(f"/api/admin/sessions?{query}", headers=AUTH)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and query.split("=")[0] in detail


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage",
        "!!!!",
        "=",
        "",
        _b64(b"not json"),
        _b64(b"{}"),
        _b64(b"[1]"),
        _b64(b"[1, 2, 3]"),
        _b64(b'["1", "abc"]'),
        _b64(b'[true, "abc"]'),
        _b64(b'[1, ""]'),
        _b64(b'[1, "' + b"a" * 33 + b'"]'),
        _b64(b'[1, "abc\\u0000"]'),
        _b64(b'[1, "abc\\"]'),
        _b64(b'[99999999999999999999999999, "abc"]'),
        _b64(b'[1e400, "abc"]'),
        _b64(b"\xff\xfe"),
        _b64(b"[" * 100),
    ],
)
def test_a_bad_cursor_is_422_never_500(admin: TestClient, cursor: str) -> None:
    response = admin.get("/api/admin/sessions", params={"before": cursor}, headers=AUTH)
    assert response.status_code == 422, response.text
    assert response.json() == {"detail": BAD_CURSOR}


def test_an_overlong_cursor_is_422(admin: TestClient) -> None:
    response = admin.get("/api/admin/sessions", params={"before": "a" * 5000}, headers=AUTH)
    assert response.status_code == 422
    assert "before" in response.json()["detail"]


def test_a_cursor_round_trips_to_the_microsecond() -> None:
    at = datetime(2026, 1, 1, 12, 0, 0, 123456).astimezone()
    cursor = Cursor(at, "abc_-DEF")
    assert Cursor.decode(cursor.encode()) == cursor


# --- Ending a session ----------------------------------------------------------------------


def test_delete_ends_a_ready_session_and_sends_its_teardown(
    admin: TestClient, admin_settings: Settings, broker: RecordingBroker
) -> None:
    launch_id = add(
        admin_settings,
        {"image": "default"},
        created=utcnow() - timedelta(seconds=60),
        status=Status.ready,
        ready_after=3,
        token_ciphertext="gAAAA-ciphertext",
    )
    response = admin.delete(f"/api/admin/sessions/{launch_id}", headers=AUTH)
    assert response.status_code == 202, response.text
    item = response.json()
    assert item["id"] == launch_id and "url" not in item and "ciphertext" not in response.text
    assert broker.arguments(TEARDOWN_TASK) == [launch_id]
    with session_scope(admin_settings.database_url) as db:
        launch = db.get(Launch, launch_id)
        assert launch is not None and launch.end_requested_at is not None


@pytest.mark.parametrize("launch_id", ["no-such-launch", "a%00b", "x" * 40, "%27%20OR%201=1"])
def test_delete_of_an_unknown_session_is_404(
    admin: TestClient, broker: RecordingBroker, launch_id: str
) -> None:
    response = admin.delete(f"/api/admin/sessions/{launch_id}", headers=AUTH)
    assert response.status_code == 404
    assert "No launch with this id" in response.json()["detail"]
    assert broker.sent == []


def test_delete_while_the_queue_is_down_is_503(
    admin: TestClient, admin_settings: Settings, broker: RecordingBroker
) -> None:
    launch_id = add(
        admin_settings,
        {"image": "default"},
        created=utcnow(),
        status=Status.ready,
        ready_after=1,
    )
    broker.down = True
    response = admin.delete(f"/api/admin/sessions/{launch_id}", headers=AUTH)
    assert response.status_code == 503
    assert "queue is unavailable" in response.json()["detail"]


# --- Summary -------------------------------------------------------------------------------


def test_summary_figures(admin: TestClient, admin_settings: Settings) -> None:
    s = admin_settings
    now = utcnow()

    def ago(seconds: float) -> datetime:
        return now - timedelta(seconds=seconds)

    # Five ready now, made 10 minutes ago and ready 10..50 s later.
    for spec, took in [
        ({"image": "default"}, 10),
        ({"image": "default"}, 20),
        ({"image": "default"}, 30),
        ({"image": "scipy"}, 40),
        (REPO, 50),
    ]:
        add(s, spec, created=ago(600), status=Status.ready, ready_after=took)
    # In the window: one launch failed, one still queued.
    add(s, {"image": "default"}, created=ago(500), status=Status.failed, ended=ago(400))
    add(s, {"image": "default"}, created=ago(100))
    # Made two hours ago, ended in the window: finished here, not launched here.
    for _ in range(3):
        add(
            s,
            {"image": "default"},
            created=ago(7200),
            status=Status.ended,
            ready_after=10,
            ended=ago(300),
        )
    # Entirely before the window.
    add(s, {"image": "default"}, created=ago(8000), status=Status.failed, ended=ago(7000))

    response = admin.get("/api/admin/summary", headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["window"] == 3600
    assert body["active"] == 5
    assert body["active_by_spec"] == [
        {"spec": "default", "count": 3},
        {"spec": "https://github.com/owner/repo@main", "count": 1},
        {"spec": "scipy", "count": 1},
    ]
    assert body["launches"] == 7
    assert body["launches_per_minute"] == pytest.approx(7 / 60)
    assert (body["finished"], body["failed"]) == (4, 1)
    assert body["failure_rate"] == pytest.approx(0.25)
    assert body["ready"] == 5
    assert body["time_to_ready_p50"] == pytest.approx(30)
    assert body["time_to_ready_p95"] == pytest.approx(48)

    # A 5-minute window holds only the queued launch and the three ends.
    body = admin.get("/api/admin/summary?window=350", headers=AUTH).json()
    assert (body["launches"], body["finished"], body["failed"]) == (1, 3, 0)
    assert body["failure_rate"] == 0
    assert body["ready"] == 0 and body["time_to_ready_p50"] is None
    assert body["time_to_ready_p95"] is None
    assert body["active"] == 5  # what runs now does not depend on the window


def test_summary_of_nothing(admin: TestClient) -> None:
    body = admin.get("/api/admin/summary", headers=AUTH).json()
    assert body["active"] == 0 and body["active_by_spec"] == []
    assert body["launches"] == 0 and body["launches_per_minute"] == 0
    assert body["failure_rate"] is None
    assert body["time_to_ready_p50"] is None and body["time_to_ready_p95"] is None


def test_summary_counts_specs_past_the_top_20_as_other(
    admin: TestClient, admin_settings: Settings
) -> None:
    created = utcnow() - timedelta(seconds=60)
    for i in range(22):
        for _ in range(2 if i == 21 else 1):
            add(
                admin_settings,
                {"image": f"img{i:02d}"},
                created=created,
                status=Status.ready,
                ready_after=1,
            )
    by_spec = admin.get("/api/admin/summary", headers=AUTH).json()["active_by_spec"]
    assert by_spec[0] == {"spec": "img21", "count": 2}
    assert [s["spec"] for s in by_spec[1:20]] == [f"img{i:02d}" for i in range(19)]
    assert by_spec[20] == {"spec": "other", "count": 2}
    assert sum(s["count"] for s in by_spec) == 23


@pytest.mark.parametrize("window", ["59", "0", "-60", "604801", "9" * 40, "1h"])
def test_summary_window_bounds(admin: TestClient, window: str) -> None:
    response = admin.get(f"/api/admin/summary?window={window}", headers=AUTH)
    assert response.status_code == 422
    assert "window" in response.json()["detail"]


@pytest.mark.parametrize("window", [60, 604800])
def test_summary_window_limits_are_allowed(admin: TestClient, window: int) -> None:
    assert admin.get(f"/api/admin/summary?window={window}", headers=AUTH).status_code == 200


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 95) == 7.0
    assert percentile([10, 20, 30, 40, 50], 50) == 30
    assert percentile([50, 10, 40, 20, 30], 95) == pytest.approx(48)
    assert percentile(list(range(101)), 95) == pytest.approx(95)


def test_the_pool_page_shows_each_pool_with_its_servers(
    admin_settings: Settings, broker: RecordingBroker
) -> None:
    settings = admin_settings.model_copy(update={"pool": "default=3,gh:owner/repo@main=1"})
    now = utcnow()
    add(settings, {"image": "default"}, created=now, status=Status.pooled, pool_key="image:default")
    add(
        settings,
        {"image": "default"},
        created=now,
        status=Status.launching,
        pool_key="image:default",
    )
    add(
        settings,
        {"image": "default"},
        created=now,
        status=Status.pooled,
        pool_key="image:default",
        end_requested_at=now,  # being drained: not counted
    )
    add(settings, {"image": "default"}, created=now, status=Status.ready)  # a visitor's
    with TestClient(create_app(settings, broker=broker)) as client:
        assert client.get("/api/admin/pool").status_code == 401
        page = client.get("/api/admin/pool", headers=AUTH).json()
        metrics = client.get("/metrics", headers=AUTH).text
    assert page == [
        {
            "pool": "image:default",
            "spec": {"image": "default"},
            "size": 3,
            "minimum": 3,
            "maximum": 3,
            "launches_in_window": None,
            "start_seconds": None,
            "ready": 1,
            "starting": 1,
        },
        {
            "pool": "repo:https://github.com/owner/repo@main",
            "spec": REPO,
            "size": 1,
            "minimum": 1,
            "maximum": 1,
            "launches_in_window": None,
            "start_seconds": None,
            "ready": 0,
            "starting": 0,
        },
    ]
    assert 'hublaunch_pool_servers{pool="image:default",state="wanted"} 3.0' in metrics
    assert 'hublaunch_pool_servers{pool="image:default",state="ready"} 1.0' in metrics


def test_a_pool_sized_by_demand_shows_its_size_now_and_what_it_was_read_from(
    admin_settings: Settings, broker: RecordingBroker
) -> None:
    settings = admin_settings.model_copy(update={"pool": "default=1..6"})
    now = utcnow()
    for _ in range(60):  # 0.1 launches a second over the 600 s window
        add(settings, {"image": "default"}, created=now - timedelta(seconds=30))
    # Its servers started in 8 s: 0.1 * 8 = 0.8 -> ceil(0.8 + 2 * 0.89) = 3.
    add(
        settings,
        {"image": "default"},
        created=now - timedelta(seconds=18),
        status=Status.pooled,
        pool_key="image:default",
        ready_at=now - timedelta(seconds=10),
    )
    with TestClient(create_app(settings, broker=broker)) as client:
        page = client.get("/api/admin/pool", headers=AUTH).json()
        metrics = client.get("/metrics", headers=AUTH).text
    assert page == [
        {
            "pool": "image:default",
            "spec": {"image": "default"},
            "size": 3,
            "minimum": 1,
            "maximum": 6,
            "launches_in_window": 60,
            "start_seconds": 8.0,
            "ready": 1,
            "starting": 0,
        }
    ]
    assert 'hublaunch_pool_servers{pool="image:default",state="wanted"} 3.0' in metrics
