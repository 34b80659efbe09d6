"""Abuse limits on a real stack (JupyterHub + proxy + API + worker, Redis, PostgreSQL): the launch
rate per client, Idempotency-Key, and /build launches whose visitor left.

Every test speaks from a loopback address of its own (127.0.0.N; Linux routes all of 127/8 to
lo), so each has a fresh bucket. Through the Hub's proxy (a trusted proxy: 127.0.0.1) the app
sees that address in X-Forwarded-For; straight to the app's port, it is an untrusted peer.
"""

from __future__ import annotations

import json
import secrets
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import count
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import func, select

from api.ratelimit import Limiter, Rate
from hublaunch.stack import Stack
from tests.integration.conftest import launch_row, start_stack, wait_for
from worker.db import session_scope
from worker.hub_client import HubClient
from worker.models import EndReason, Launch, Status

RATE = 5  # launches per minute and client on this module's stack
GRACE = 1.0  # seconds a /build launch may go unwatched
START_DELAY = 4.0  # seconds the fake Hub takes to start a server: launches stay "launching"
FAILING = {"image": "no-such-image"}  # accepted, then refused by the spawner: cheap to start
_addresses = count(10)


@pytest.fixture(scope="module")
def limits_stack(
    tmp_path_factory: pytest.TempPathFactory,
    make_database: Callable[[str], str],
    redis_url: str,
) -> Iterator[Stack]:
    stack = start_stack(
        tmp_path_factory,
        "limits",
        make_database("limits"),
        redis_url,
        spawner="fake",
        env={
            "HUBLAUNCH_CLIENT_RATE": f"{RATE}/minute",
            "HUBLAUNCH_BUILD_WATCH_GRACE": str(GRACE),
            "HUBLAUNCH_FAKE_START_DELAY": str(START_DELAY),
        },
    )
    try:
        yield stack
    finally:
        stack.stop()
        keys = redis.Redis.from_url(redis_url)
        for key in keys.scan_iter(f"hublaunch:{stack.config.queue}:*"):
            keys.delete(key)


def client_from(base_url: str, address: str) -> httpx.Client:
    transport = httpx.HTTPTransport(local_address=address)
    return httpx.Client(base_url=base_url, transport=transport, timeout=30)


@pytest.fixture
def visitor(limits_stack: Stack) -> Iterator[httpx.Client]:
    """A client on an address of its own, through the proxy (as visitors come)."""
    with client_from(limits_stack.public_url, f"127.0.0.{next(_addresses)}") as client:
        yield client


@pytest.fixture
def hub(limits_stack: Stack) -> Iterator[HubClient]:
    client = HubClient(limits_stack.hub_api_url, limits_stack.hub_token)
    yield client
    client.close()


def launches(stack: Stack) -> int:
    with session_scope(stack.config.database_url) as db:
        return db.scalar(select(func.count()).select_from(Launch)) or 0


def first_event(client: httpx.Client, path: str, **headers: str) -> tuple[str, dict[str, Any]]:
    """Open a /build stream, read its first event, and close the stream (the visitor leaves)."""
    with client.stream("GET", path, headers=headers, timeout=30) as response:
        assert response.status_code == 200
        event_id = ""
        for line in response.iter_lines():
            if line.startswith("id:"):
                event_id = line[3:].strip()
            elif line.startswith("data:"):
                return event_id, json.loads(line[5:])
    raise AssertionError("the stream closed before its first event")


# -- the launch rate -----------------------------------------------------------------------------


def test_over_the_rate_is_a_429_with_retry_after(visitor: httpx.Client) -> None:
    answers = [visitor.post("/api/launches", json=FAILING) for _ in range(RATE + 1)]
    assert [a.status_code for a in answers] == [202] * RATE + [429]
    # Each counted launch says where the client stands, through the Hub's proxy.
    left = [int(a.headers["RateLimit-Remaining"]) for a in answers]
    assert left == [*range(RATE - 1, -1, -1), 0]
    assert {a.headers["RateLimit-Policy"] for a in answers} == {f"{RATE};w=60"}
    resets = [int(a.headers["RateLimit-Reset"]) for a in answers[:RATE]]
    assert all(12 * n - 2 <= reset <= 12 * n for n, reset in enumerate(resets, 1)), resets
    refused = answers[-1]
    wait = int(refused.headers["Retry-After"])
    assert 1 <= wait <= 60 // RATE
    assert f"wait {wait} s and try again" in refused.json()["detail"]
    reset = int(refused.headers["RateLimit-Reset"])
    assert wait <= reset <= 60
    assert refused.headers["RateLimit"] == f"limit={RATE}, remaining=0, reset={reset}"
    # Refused before the body is read: a flood of garbage costs the app one Redis call each.
    garbage = visitor.post("/api/launches", content=b"{not json", headers={"Content-Type": "x"})
    assert garbage.status_code == 429 and "Retry-After" in garbage.headers
    assert garbage.headers["RateLimit-Remaining"] == "0"

    # /build from the same client: the same limit, as BinderHub's failed event and a 429.
    with visitor.stream("GET", "/build/image/default") as build:
        assert build.status_code == 429
        assert int(build.headers["Retry-After"]) >= 1
        assert build.headers["RateLimit-Remaining"] == "0"
        assert build.headers["content-type"].startswith("text/event-stream")
        body = build.read().decode()
    event = json.loads(body.split("data:", 1)[1])
    assert event["phase"] == "failed" and "Too many launches" in event["message"]


def test_each_client_has_its_own_bucket(limits_stack: Stack) -> None:
    with (
        client_from(limits_stack.public_url, f"127.0.0.{next(_addresses)}") as one,
        client_from(limits_stack.public_url, f"127.0.0.{next(_addresses)}") as other,
    ):
        assert [one.post("/api/launches", json=FAILING).status_code for _ in range(RATE + 1)][
            -1
        ] == 429
        assert other.post("/api/launches", json=FAILING).status_code == 202


def test_a_spoofed_forwarded_for_through_the_proxy_gets_no_fresh_bucket(
    visitor: httpx.Client,
) -> None:
    codes = [
        visitor.post(
            "/api/launches", json=FAILING, headers={"X-Forwarded-For": f"198.51.100.{i}"}
        ).status_code
        for i in range(RATE + 3)
    ]
    assert codes == [202] * RATE + [429] * 3


def test_a_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored(limits_stack: Stack) -> None:
    # Straight to the app: the peer (127.0.0.N) is not the trusted proxy, so its header is noise.
    with client_from(limits_stack.app_url, f"127.0.0.{next(_addresses)}") as direct:
        codes = [
            direct.post(
                "/api/launches",
                json=FAILING,
                headers={"X-Forwarded-For": f"203.0.113.{i}, 127.0.0.1"},
            ).status_code
            for i in range(RATE + 2)
        ]
    assert codes == [202] * RATE + [429] * 2


def test_a_spoofed_forwarded_for_shows_the_spoofers_own_counter(limits_stack: Stack) -> None:
    victim = f"127.0.0.{next(_addresses)}"
    with client_from(limits_stack.public_url, victim) as visitor:
        codes = [visitor.post("/api/launches", json=FAILING).status_code for _ in range(RATE)]
    assert codes == [202] * RATE
    # Straight to the app, naming the victim: the peer's own fresh bucket, not the victim's.
    with client_from(limits_stack.app_url, f"127.0.0.{next(_addresses)}") as direct:
        spoofed = direct.post("/api/launches", json=FAILING, headers={"X-Forwarded-For": victim})
    assert spoofed.status_code == 202
    assert spoofed.headers["RateLimit-Remaining"] == str(RATE - 1)
    # And the victim's bucket is as the victim left it.
    with client_from(limits_stack.public_url, victim) as visitor:
        again = visitor.post("/api/launches", json=FAILING)
    assert again.status_code == 429 and again.headers["RateLimit-Remaining"] == "0"


def test_a_flood_is_refused_fast_and_starts_only_the_allowed_launches(
    limits_stack: Stack, visitor: httpx.Client
) -> None:
    before = launches(limits_stack)
    timings: list[tuple[int, float]] = []
    lock = threading.Lock()

    def one(_: int) -> None:
        started = time.perf_counter()
        status = visitor.post("/api/launches", json=FAILING).status_code
        with lock:
            timings.append((status, time.perf_counter() - started))

    with ThreadPoolExecutor(10) as pool:
        list(pool.map(one, range(100)))
    statuses = [status for status, _ in timings]
    assert statuses.count(202) == RATE and statuses.count(429) == 100 - RATE
    assert launches(limits_stack) == before + RATE
    refused = sorted(seconds for status, seconds in timings if status == 429)
    # Through the Hub's proxy, ten at once, on a shared machine: still a few ms each.
    assert statistics.median(refused) < 0.1, refused


def test_the_limiter_costs_one_fast_round_trip(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    prefix = f"hublaunch:bench-{secrets.token_hex(4)}:"
    limiter = Limiter(client, Rate(1_000_000, 60.0), prefix)
    limiter.check("192.0.2.1")  # loads the script
    try:
        started = time.perf_counter()
        verdicts = [limiter.check(f"192.0.2.{i % 200}") for i in range(1000)]
        mean = (time.perf_counter() - started) / 1000
    finally:
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)
    assert all(v.allowed for v in verdicts)
    assert mean < 0.001, f"{mean * 1000:.3f} ms per check"


def test_a_resumed_build_stream_is_neither_counted_nor_refused(
    limits_stack: Stack, visitor: httpx.Client
) -> None:
    event_id, _ = first_event(visitor, "/build/image/default")
    posts = [visitor.post("/api/launches", json=FAILING) for _ in range(RATE - 1)]
    assert [p.status_code for p in posts] == [202] * (RATE - 1)
    # The /build stream was counted: one launch fewer left.
    assert [int(p.headers["RateLimit-Remaining"]) for p in posts] == list(range(RATE - 2, -1, -1))
    assert visitor.post("/api/launches", json=FAILING).status_code == 429
    # The bucket is empty, yet the page's EventSource reconnecting gets its launch's stream.
    before = launches(limits_stack)
    with visitor.stream(
        "GET", "/build/image/default", headers={"Last-Event-ID": event_id}
    ) as resumed:
        assert resumed.status_code == 200
        # Not counted, so nothing to say of the bucket.
        assert not any(name.startswith("ratelimit") for name in resumed.headers)
        ids = [line for line in resumed.iter_lines() if line.startswith("id:")]
    assert ids and all(line[3:].strip().startswith(event_id.split(":")[0]) for line in ids)
    assert launches(limits_stack) == before


# -- Idempotency-Key ----------------------------------------------------------------------------


def test_fifty_requests_with_one_key_make_one_launch(
    limits_stack: Stack, visitor: httpx.Client
) -> None:
    before = launches(limits_stack)
    key = secrets.token_hex(16)
    barrier = threading.Barrier(50)

    def one(_: int) -> httpx.Response:
        barrier.wait()
        return visitor.post("/api/launches", json=FAILING, headers={"Idempotency-Key": key})

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(one, range(50)))
    assert [a.status_code for a in answers] == [202] * 50, [a.text for a in answers]
    ids = {a.json()["id"] for a in answers}
    assert len(ids) == 1
    assert launches(limits_stack) == before + 1
    assert sum(a.headers.get("Idempotent-Replayed") == "true" for a in answers) == 49
    assert {a.headers["Location"] for a in answers} == {answers[0].json()["status_url"]}


def test_the_same_key_with_another_body_is_refused(visitor: httpx.Client) -> None:
    key = secrets.token_hex(16)
    first = visitor.post("/api/launches", json=FAILING, headers={"Idempotency-Key": key})
    assert first.status_code == 202
    other = visitor.post(
        "/api/launches", json={"image": "default"}, headers={"Idempotency-Key": key}
    )
    assert other.status_code == 422
    assert "another request body" in other.json()["detail"]
    again = visitor.post("/api/launches", json=FAILING, headers={"Idempotency-Key": key})
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]


def test_a_refused_launch_releases_its_key(visitor: httpx.Client) -> None:
    key = secrets.token_hex(16)
    too_long = visitor.post(
        "/api/launches",
        json={**FAILING, "lifetime": 10**9},
        headers={"Idempotency-Key": key},
    )
    assert too_long.status_code == 422
    # Not "used with another body": the refused request left the key free.
    fixed = visitor.post("/api/launches", json=FAILING, headers={"Idempotency-Key": key})
    assert fixed.status_code == 202


def test_a_key_is_no_way_into_another_clients_launch(limits_stack: Stack) -> None:
    key = secrets.token_hex(16)
    ids = []
    for _ in range(2):
        with client_from(limits_stack.public_url, f"127.0.0.{next(_addresses)}") as client:
            answer = client.post("/api/launches", json=FAILING, headers={"Idempotency-Key": key})
            assert answer.status_code == 202
            ids.append(answer.json()["id"])
    assert ids[0] != ids[1]


@pytest.mark.parametrize("key", ["x" * 300, "two words", "tab\there", "<script>", ""])
def test_a_garbage_key_is_a_400_and_starts_nothing(
    limits_stack: Stack, visitor: httpx.Client, key: str
) -> None:
    before = launches(limits_stack)
    answer = visitor.post("/api/launches", json=FAILING, headers={"Idempotency-Key": key})
    assert answer.status_code == 400
    assert "Idempotency-Key must be 1 to 255 characters" in answer.json()["detail"]
    assert launches(limits_stack) == before


def test_a_non_ascii_key_is_a_400(limits_stack: Stack, visitor: httpx.Client) -> None:
    before = launches(limits_stack)
    answer = visitor.post(
        "/api/launches", json=FAILING, headers=[("Idempotency-Key", "clé".encode("latin-1"))]
    )
    assert answer.status_code == 400
    assert launches(limits_stack) == before


# -- abandoned /build launches ------------------------------------------------------------------


def test_an_abandoned_build_launch_is_ended_and_its_user_removed(
    limits_stack: Stack, visitor: httpx.Client, hub: HubClient
) -> None:
    event_id, event = first_event(visitor, "/build/image/default")
    assert event["phase"] == "waiting"
    launch_id = event_id.split(":")[0]
    # The Hub user exists while the (slow) server starts.
    user = wait_for(lambda: launch_row(limits_stack, launch_id).hub_user, 10, "a Hub user")
    ended = wait_for(
        lambda: (row := launch_row(limits_stack, launch_id)).status == Status.ended and row,
        GRACE + START_DELAY + 15,
        "the abandoned launch to end",
    )
    assert ended.end_reason == EndReason.abandoned
    assert ended.ready_at is None
    wait_for(lambda: hub.get_user(user) is None, 15, "its Hub user to be removed")
    assert wait_for(lambda: launch_row(limits_stack, launch_id).user_removed_at, 15, "removal")
    # The visitor can read why.
    view = visitor.get(f"/api/launches/{launch_id}").json()
    assert view["status"] == "ended" and view["end_reason"] == "abandoned"


def test_a_reconnect_within_the_grace_keeps_the_launch(
    limits_stack: Stack, visitor: httpx.Client
) -> None:
    event_id, _ = first_event(visitor, "/build/image/default")
    launch_id = event_id.split(":")[0]
    # The EventSource reconnects at once (its retry is about 3 s; well within a real grace).
    with visitor.stream(
        "GET", "/build/image/default", headers={"Last-Event-ID": event_id}, timeout=60
    ) as resumed:
        assert resumed.status_code == 200
        phases = [
            json.loads(line[5:])["phase"] for line in resumed.iter_lines() if line[:5] == "data:"
        ]
    assert phases[-1] == "ready"
    time.sleep(GRACE + 2)  # past the departure's check
    row = launch_row(limits_stack, launch_id)
    assert row.status == Status.ready and row.end_requested_at is None
    assert visitor.delete(f"/api/launches/{launch_id}").status_code == 202


def test_a_watcher_who_left_after_ready_leaves_the_session_alone(
    limits_stack: Stack, visitor: httpx.Client
) -> None:
    with visitor.stream("GET", "/build/image/default", timeout=60) as response:
        lines = [line for line in response.iter_lines() if line.startswith("id:")]
    launch_id = lines[0][3:].strip().split(":")[0]
    time.sleep(GRACE + 2)
    assert launch_row(limits_stack, launch_id).status == Status.ready
    assert visitor.delete(f"/api/launches/{launch_id}").status_code == 202
