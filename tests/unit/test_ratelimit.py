"""The launch rate limit (api/ratelimit.py): its setting, the GCRA bucket (in fakeredis, whose
Lua runs the same script, and in the real Redis), the client's address behind a proxy, and the
RateLimit headers the app answers with (over the app, counting in the real Redis)."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import fakeredis
import pytest
import redis
import redis.asyncio as aioredis
from cryptography.fernet import Fernet
from fastapi import FastAPI
from fastapi.testclient import TestClient
from httpx import Response
from pydantic import ValidationError
from sqlalchemy import select
from starlette.requests import Request

from api import ratelimit
from api.main import create_app
from api.ratelimit import AsyncLimiter, Limiter, Quota, Rate, Verdict, client_address
from tests.fakes import RecordingBroker
from worker.db import dispose_all, session_scope
from worker.migrate import upgrade
from worker.models import Launch
from worker.settings import Settings

# A db number of its own (integration: 11, benchmarks: 14) and a queue name per test below.
REDIS_URL = os.environ.get("HUBLAUNCH_UNIT_REDIS_URL", "redis://127.0.0.1:6379/12")


@pytest.fixture
def store() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


@pytest.fixture(scope="session")
def real_redis() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as e:
        pytest.fail(f"Redis must answer at {REDIS_URL}: {e}", pytrace=False)
    return client


@pytest.fixture
def prefix(real_redis: redis.Redis) -> Iterator[str]:
    """A key prefix (a queue name) of this test's own in the real Redis, emptied afterwards."""
    queue = f"unit-rate-{secrets.token_hex(4)}"
    yield queue
    for key in real_redis.scan_iter(f"*{queue}*"):
        real_redis.delete(key)


@pytest.fixture(params=["fakeredis", "redis"])
def any_store(request: pytest.FixtureRequest) -> redis.Redis:
    """The script's numbers, in fakeredis and in the Redis that runs it in production."""
    if request.param == "fakeredis":
        return fakeredis.FakeRedis()
    client: redis.Redis = request.getfixturevalue("real_redis")
    return client


# -- the setting ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "kept", "rate"),
    [
        ("10/minute", "10/minute", Rate(10, 60.0)),
        (" 3/Second ", "3/second", Rate(3, 1.0)),
        ("100/hour", "100/hour", Rate(100, 3600.0)),
        ("0", "", None),
        ("", "", None),
        ("0/minute", "", None),
    ],
)
def test_the_setting_reads_n_per_period(given: str, kept: str, rate: Rate | None) -> None:
    settings = Settings(client_rate=given)
    assert settings.client_rate == kept
    assert Rate.parse(settings.client_rate) == rate


@pytest.mark.parametrize("bad", ["ten/minute", "10/day", "10", "-1/minute", "10/", "/minute"])
def test_a_bad_setting_is_refused_with_the_format(bad: str) -> None:
    with pytest.raises(ValidationError, match=r"<n>/<second\|minute\|hour>"):
        Settings(client_rate=bad)


def test_the_default_is_ten_a_minute() -> None:
    assert Settings().client_rate == "10/minute"


# -- the bucket ----------------------------------------------------------------------------------


def test_n_launches_pass_then_the_next_waits_one_interval(store: fakeredis.FakeRedis) -> None:
    limiter = Limiter(store, Rate(5, 60.0), "hublaunch:t:")
    verdicts = [limiter.check("192.0.2.1") for _ in range(7)]
    assert [v.allowed for v in verdicts] == [True] * 5 + [False, False]
    # One launch every 12 s: the next is allowed in at most 12 s, never 0.
    assert 11 <= verdicts[5].retry_after <= 12
    assert "wait" in verdicts[5].message(limiter.rate)
    assert "at most 5 every minute" in verdicts[5].message(limiter.rate)


def test_each_address_has_its_own_bucket(store: fakeredis.FakeRedis) -> None:
    limiter = Limiter(store, Rate(2, 60.0), "hublaunch:t:")
    assert [limiter.check("192.0.2.1").allowed for _ in range(3)] == [True, True, False]
    assert limiter.check("192.0.2.2").allowed
    assert not limiter.check("192.0.2.1").allowed


def test_refused_attempts_do_not_push_the_wait_further(store: fakeredis.FakeRedis) -> None:
    limiter = Limiter(store, Rate(1, 60.0), "hublaunch:t:")
    assert limiter.check("192.0.2.1").allowed
    key = "hublaunch:t:rate:192.0.2.1"
    before = store.get(key)
    for _ in range(20):
        assert not limiter.check("192.0.2.1").allowed
    assert store.get(key) == before


def test_the_bucket_refills_at_the_rate(store: fakeredis.FakeRedis) -> None:
    limiter = Limiter(store, Rate(4, 1.0), "hublaunch:t:")  # one every 250 ms
    assert all(limiter.check("192.0.2.1").allowed for _ in range(4))
    assert not limiter.check("192.0.2.1").allowed
    time.sleep(0.3)
    assert limiter.check("192.0.2.1").allowed
    assert not limiter.check("192.0.2.1").allowed


def test_keys_have_the_prefix_and_expire(store: fakeredis.FakeRedis) -> None:
    limiter = Limiter(store, Rate(10, 60.0), "hublaunch:q1:")
    limiter.check("192.0.2.1")
    assert store.keys("*") == [b"hublaunch:q1:rate:192.0.2.1"]
    assert 0 < store.pttl("hublaunch:q1:rate:192.0.2.1") <= 6000  # one interval, not forever


def test_the_quota_counts_down_then_the_refusal_says_none_left(
    any_store: redis.Redis, prefix: str
) -> None:
    limiter = Limiter(any_store, Rate(3, 60.0), f"hublaunch:{prefix}:")
    allowed = [limiter.check("192.0.2.1") for _ in range(3)]
    assert all(v.allowed for v in allowed)
    quotas = [v.quota for v in allowed]
    assert all(q is not None and (q.limit, q.window) == (3, 60) for q in quotas)
    assert [q.remaining for q in quotas if q] == [2, 1, 0]
    # One launch every 20 s: the bucket is full again 20, 40, 60 s after each (rounded up; the
    # checks take far less than a second).
    assert [q.reset for q in quotas if q] == [20, 40, 60]
    refused = limiter.check("192.0.2.1")
    assert not refused.allowed and 19 <= refused.retry_after <= 20
    assert refused.quota == Quota(3, 60, 0, 60)
    # Another address has its own, full bucket.
    assert limiter.check("192.0.2.2").quota == Quota(3, 60, 2, 20)


def test_the_quota_grows_back_at_the_rate(store: fakeredis.FakeRedis) -> None:
    limiter = Limiter(store, Rate(4, 1.0), "hublaunch:t:")  # one every 250 ms
    burst = [limiter.check("192.0.2.1").quota for _ in range(4)]
    assert [q.remaining for q in burst if q] == [3, 2, 1, 0]
    time.sleep(0.52)  # two intervals (and less than three): two launches back, one used now
    again = limiter.check("192.0.2.1")
    assert again.allowed and again.quota is not None and again.quota.remaining == 1
    assert again.quota.reset == 1  # 0.7 s or so of debt, rounded up


def test_a_full_bucket_of_an_uneven_rate_resets_within_its_window(
    any_store: redis.Redis, prefix: str
) -> None:
    # 60 s / 7 is no whole number of µs; rounded up it would read 61 s after seven launches.
    limiter = Limiter(any_store, Rate(7, 60.0), f"hublaunch:{prefix}:")
    verdicts = [limiter.check("192.0.2.1") for _ in range(8)]
    assert [v.quota.remaining for v in verdicts if v.quota] == [6, 5, 4, 3, 2, 1, 0, 0]
    assert [v.allowed for v in verdicts] == [True] * 7 + [False]
    assert verdicts[6].quota is not None and verdicts[6].quota.reset == 60


def test_a_bucket_kept_by_the_previous_version_reads_the_same(
    real_redis: redis.Redis, prefix: str
) -> None:
    # The previous script kept the TAT in float ms (written with 14 digits); processes of both
    # versions count in the same key during a rolling update. Two of three launches used:
    limiter = Limiter(real_redis, Rate(3, 60.0), f"hublaunch:{prefix}:")
    seconds, micros = real_redis.time()
    now_ms = (seconds * 1_000_000 + micros) // 100 / 10  # to 0.1 ms, as it wrote, never later
    real_redis.set(f"hublaunch:{prefix}:rate:192.0.2.1", f"{now_ms + 40_000:.1f}")
    verdict = limiter.check("192.0.2.1")
    assert verdict.allowed and verdict.quota is not None
    assert verdict.quota.remaining == 0 and verdict.quota.reset == 60
    assert not limiter.check("192.0.2.1").allowed
    # And what this version writes is still ms, which the previous one reads.
    stored = float(real_redis.get(f"hublaunch:{prefix}:rate:192.0.2.1") or 0)
    assert stored - now_ms == pytest.approx(60_000, abs=1000)


def test_the_headers_say_the_quota_in_both_forms() -> None:
    assert dict(Quota(10, 60, 4, 36).headers()) == {
        b"ratelimit-policy": b"10;w=60",
        b"ratelimit": b"limit=10, remaining=4, reset=36",
        b"ratelimit-limit": b"10",
        b"ratelimit-remaining": b"4",
        b"ratelimit-reset": b"36",
    }


def test_redis_down_lets_launches_through_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    limiter = Limiter(dead, Rate(1, 60.0), "hublaunch:t:")
    with caplog.at_level(logging.WARNING, logger="api.ratelimit"):
        verdicts = [limiter.check("192.0.2.1") for _ in range(3)]
    assert all(v.allowed and v.quota is None for v in verdicts)  # nothing counted: no numbers
    warnings = [r for r in caplog.records if "rate limit not checked" in r.getMessage()]
    assert len(warnings) == 1


def test_the_event_loops_limiter_counts_in_the_same_bucket(
    real_redis: redis.Redis, prefix: str
) -> None:
    # The middleware's (asynchronous) and a thread's (blocking) checks of one client share one
    # bucket, with the same numbers.
    blocking = Limiter(real_redis, Rate(3, 60.0), f"hublaunch:{prefix}:")

    async def twice() -> list[Verdict]:
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            limiter = AsyncLimiter(client, Rate(3, 60.0), f"hublaunch:{prefix}:")
            return [await limiter.check("192.0.2.1"), await limiter.check("192.0.2.1")]
        finally:
            await client.aclose()

    first = blocking.check("192.0.2.1")
    second, third = asyncio.run(twice())
    assert [v.quota.remaining for v in (first, second, third) if v.quota] == [2, 1, 0]
    assert not blocking.check("192.0.2.1").allowed


def test_concurrent_checks_on_one_loop_never_pass_more_than_the_limit(prefix: str) -> None:
    # Fifty at once from one address, over the pool's 32 connections: the script is atomic,
    # so exactly the burst passes, whatever the interleaving.
    settings = Settings(broker_url=REDIS_URL, client_rate="10/minute", queue=prefix)

    async def flood() -> list[Verdict]:
        limiter = ratelimit.async_limiter(settings)
        assert limiter is not None
        return await asyncio.gather(*(limiter.check("192.0.2.9") for _ in range(50)))

    verdicts = asyncio.run(flood())
    assert sum(v.allowed for v in verdicts) == 10
    assert sorted(v.quota.remaining for v in verdicts if v.allowed and v.quota) == list(range(10))
    assert all(v.retry_after >= 1 for v in verdicts if not v.allowed)


def test_each_event_loop_has_its_own_limiter(prefix: str) -> None:
    # An asynchronous client's connections belong to one loop; a second loop (another test
    # client) must not be handed them.
    settings = Settings(broker_url=REDIS_URL, client_rate="10/minute", queue=prefix)

    async def mine() -> tuple[AsyncLimiter | None, bool]:
        limiter = ratelimit.async_limiter(settings)
        assert limiter is not None
        verdict = await limiter.check("192.0.2.3")
        return limiter, limiter is ratelimit.async_limiter(settings) and verdict.allowed

    first, same_within = asyncio.run(mine())
    second, _ = asyncio.run(mine())
    assert same_within and first is not second


def test_redis_down_lets_launches_through_on_the_event_loop_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def checks() -> list[Verdict]:
        dead = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
        limiter = AsyncLimiter(dead, Rate(1, 60.0), "hublaunch:t:")
        return [await limiter.check("192.0.2.1") for _ in range(3)]

    with caplog.at_level(logging.WARNING, logger="api.ratelimit"):
        verdicts = asyncio.run(checks())
    assert all(v.allowed and v.quota is None for v in verdicts)
    assert len([r for r in caplog.records if "rate limit not checked" in r.getMessage()]) == 1


def test_no_limiter_when_off_or_without_redis() -> None:
    assert ratelimit.limiter(Settings(client_rate="0")) is None
    assert ratelimit.limiter(Settings(broker_url="filesystem://", client_rate="5/minute")) is None
    verdict, rate = ratelimit.check(Settings(client_rate="0"), "192.0.2.1")
    assert verdict.allowed and rate is None


# -- the client's address ------------------------------------------------------------------------


def request(peer: str, *forwarded: str) -> Request:
    headers = [(b"x-forwarded-for", value.encode()) for value in forwarded]
    return Request(
        {"type": "http", "method": "GET", "path": "/", "headers": headers, "client": (peer, 1)}
    )


def settings(trusted: str) -> Settings:
    return Settings(forwarded_allow_ips=trusted)


def test_an_untrusted_peer_is_the_client_whatever_it_forwards() -> None:
    spoofed = request("203.0.113.9", "198.51.100.1")
    assert client_address(spoofed, settings("127.0.0.1")) == "203.0.113.9"


def test_behind_the_proxy_the_rightmost_untrusted_hop_counts() -> None:
    # The visitor wrote "1.1.1.1, 2.2.2.2"; the proxy appended the address it saw.
    forwarded = request("127.0.0.1", "1.1.1.1, 2.2.2.2, 203.0.113.9")
    assert client_address(forwarded, settings("127.0.0.1")) == "203.0.113.9"


def test_a_chain_of_trusted_proxies_is_skipped() -> None:
    chain = request("10.0.0.5", "198.51.100.7, 203.0.113.9, 10.0.0.4", "10.0.0.3")
    assert client_address(chain, settings("127.0.0.1, 10.0.0.0/8")) == "203.0.113.9"


def test_a_spoofed_trusted_address_does_not_reach_further_left() -> None:
    # A visitor at 203.0.113.9 claiming to be the proxy is still 203.0.113.9.
    sneaky = request("127.0.0.1", "1.1.1.1, 127.0.0.1, 203.0.113.9")
    assert client_address(sneaky, settings("127.0.0.1")) == "203.0.113.9"


def test_without_a_header_the_trusted_peer_is_the_client() -> None:
    assert client_address(request("127.0.0.1"), settings("127.0.0.1")) == "127.0.0.1"


def test_garbage_hops_are_capped_and_never_trusted() -> None:
    garbage = request("127.0.0.1", "x" * 500)
    assert client_address(garbage, settings("127.0.0.1, not-an-address")) == "x" * 64


def test_everyone_trusted_takes_the_rightmost_hop_left_of_the_proxy() -> None:
    # "*" (a proxy that is the only way in): every hop is trusted, the left-most is the client.
    assert client_address(request("10.0.0.1", "203.0.113.9"), settings("*")) == "203.0.113.9"


def test_ipv6_peers_and_networks() -> None:
    forwarded = request("::1", "2001:db8::7")
    assert client_address(forwarded, settings("::1")) == "2001:db8::7"
    assert client_address(request("2001:db8::8", "::1"), settings("::1")) == "2001:db8::8"


# -- the RateLimit headers, over the app (counting in the real Redis) ----------------------------

LAUNCH = {"image": "default"}
RATE_HEADERS = {name.lower() for name in ratelimit.HEADERS}


@pytest.fixture
def database(tmp_path: Path) -> Iterator[str]:
    # What the headers say is Redis's business, not the database's: SQLite alone is enough.
    url = f"sqlite:///{tmp_path / 'unit.sqlite'}"
    upgrade(url)
    yield url
    dispose_all()


MakeApp = Callable[..., tuple[FastAPI, RecordingBroker]]


@pytest.fixture
def make_app(database: str, prefix: str) -> Iterator[MakeApp]:
    """Apps counting 3 launches a minute in the real Redis, under this test's prefix."""
    made: list[FastAPI] = []

    def make(**changes: str) -> tuple[FastAPI, RecordingBroker]:
        settings = Settings(
            database_url=database,
            secret_key=Fernet.generate_key().decode(),
            public_url="http://127.0.0.1:9999",
            launch_timeout=60,
            max_active=1000,
            queue=prefix,
            **{"broker_url": REDIS_URL, "client_rate": "3/minute", **changes},
        )
        broker = RecordingBroker(database)
        made.append(create_app(settings, broker=broker))
        return made[-1], broker

    yield make
    for app in made:  # what the metrics thread has not written yet, before the keys go
        app.state.units.recorder.flush()


def client_at(app: FastAPI, address: str) -> TestClient:
    """A client whose requests come from ``address`` (the socket peer the app sees)."""
    return TestClient(app, client=(address, 50000))


def stands(response: Response) -> dict[str, str]:
    """The RateLimit headers of a response."""
    return {k: v for k, v in response.headers.items() if k in RATE_HEADERS}


def launch_ids(database: str) -> list[str]:
    with session_scope(database) as db:
        return list(db.scalars(select(Launch.id)))


def test_three_launches_count_down_and_the_fourth_is_refused_with_none_left(
    database: str, make_app: MakeApp
) -> None:
    app, _ = make_app()
    with client_at(app, "198.51.100.7") as client:
        accepted = [client.post("/api/launches", json=LAUNCH) for _ in range(3)]
        refused = client.post("/api/launches", json=LAUNCH)
        garbage = client.post("/api/launches", content=b"{not", headers={"Content-Type": "x"})
    assert [a.status_code for a in accepted] == [202] * 3
    assert [a.headers["RateLimit-Remaining"] for a in accepted] == ["2", "1", "0"]
    resets = [int(a.headers["RateLimit-Reset"]) for a in accepted]
    # Full again one interval (20 s) after each launch: 20, 40, 60 (a slow request: 1 s less).
    assert all(20 * n - 1 <= reset <= 20 * n for n, reset in enumerate(resets, 1)), resets
    for answer in accepted:
        left, reset = answer.headers["RateLimit-Remaining"], answer.headers["RateLimit-Reset"]
        assert stands(answer) == {
            "ratelimit-policy": "3;w=60",
            "ratelimit": f"limit=3, remaining={left}, reset={reset}",
            "ratelimit-limit": "3",
            "ratelimit-remaining": left,
            "ratelimit-reset": reset,
        }
    assert len(launch_ids(database)) == 3

    for answer in (refused, garbage):  # the garbage is refused before its body is read
        assert answer.status_code == 429
        wait, reset = int(answer.headers["Retry-After"]), int(answer.headers["RateLimit-Reset"])
        assert 1 <= wait <= 20 and 58 <= reset <= 60 and wait <= reset
        assert answer.headers["RateLimit-Remaining"] == "0"
        assert answer.headers["RateLimit"] == f"limit=3, remaining=0, reset={reset}"
        assert answer.headers["RateLimit-Policy"] == "3;w=60"
    assert f"wait {refused.headers['Retry-After']} s" in refused.json()["detail"]


def test_a_keyed_launch_is_counted_by_the_route_and_its_replay_says_nothing(
    make_app: MakeApp,
) -> None:
    app, _ = make_app()
    with client_at(app, "198.51.100.7") as client:
        first = client.post("/api/launches", json=LAUNCH, headers={"Idempotency-Key": "k-1"})
        replay = client.post("/api/launches", json=LAUNCH, headers={"Idempotency-Key": "k-1"})
        second = client.post("/api/launches", json=LAUNCH, headers={"Idempotency-Key": "k-2"})
    assert first.headers["RateLimit-Remaining"] == "2"
    # A replay starts nothing and is not counted: nothing to say.
    assert replay.headers["Idempotent-Replayed"] == "true" and stands(replay) == {}
    assert second.headers["RateLimit-Remaining"] == "1"


def test_a_build_stream_says_it_at_its_start_and_a_resumed_one_says_nothing(
    database: str, make_app: MakeApp
) -> None:
    app, broker = make_app()
    broker.down = True  # each launch fails at once: its stream ends
    with client_at(app, "198.51.100.8") as client:
        started = client.get("/build/image/default", headers={"Origin": "https://docs.example"})
        [launch_id] = launch_ids(database)
        resumed = client.get("/build/image/default", headers={"Last-Event-ID": f"{launch_id}:1"})
        unreadable = client.get("/build/svn/x")  # refused before it is counted
        queue_down = client.post("/api/launches", json=LAUNCH)
        client.post("/api/launches", json=LAUNCH)
        refused = client.get("/build/image/default", headers={"Origin": "https://docs.example"})
    assert started.status_code == 200 and "failed" in started.text
    assert started.headers["RateLimit-Remaining"] == "2"
    # The default CORS answers every origin: its scripts may read the numbers.
    assert started.headers["Access-Control-Allow-Origin"] == "*"
    exposed = {n.strip() for n in started.headers["Access-Control-Expose-Headers"].split(",")}
    assert exposed >= {"RateLimit", "RateLimit-Remaining", "RateLimit-Reset", "Retry-After"}
    # The EventSource reconnecting starts nothing, is not counted, and is told nothing.
    assert resumed.status_code == 200 and "failed" in resumed.text
    assert stands(resumed) == {} and "access-control-expose-headers" not in resumed.headers
    assert stands(unreadable) == {}
    # Neither counted: the next launch (the queue refuses it, but it was counted) has 1 left.
    assert queue_down.status_code == 503 and queue_down.headers["RateLimit-Remaining"] == "1"
    assert refused.status_code == 429 and refused.headers["content-type"].startswith(
        "text/event-stream"
    )
    assert refused.headers["RateLimit-Remaining"] == "0" and "Retry-After" in refused.headers
    assert "RateLimit-Remaining" in refused.headers["Access-Control-Expose-Headers"]


def test_a_spoofed_forwarded_for_shows_its_own_counter_never_the_victims(make_app: MakeApp) -> None:
    app, _ = make_app()
    victim = "198.51.100.7"
    with client_at(app, victim) as client:
        assert [client.post("/api/launches", json=LAUNCH).status_code for _ in range(4)] == [
            *[202] * 3,
            429,
        ]
    # From an untrusted peer, X-Forwarded-For is noise: the peer's own, fresh bucket counts.
    with client_at(app, "203.0.113.9") as attacker:
        spoofs = [
            attacker.post("/api/launches", json=LAUNCH, headers={"X-Forwarded-For": forwarded})
            for forwarded in (victim, f"{victim}, 127.0.0.1")
        ]
    assert [s.status_code for s in spoofs] == [202, 202]
    assert [s.headers["RateLimit-Remaining"] for s in spoofs] == ["2", "1"]
    assert [int(s.headers["RateLimit-Reset"]) for s in spoofs] == [20, 40]
    # Through the trusted proxy, what the visitor wrote left of the proxy's entry is ignored.
    with client_at(app, "127.0.0.1") as proxy:
        forwarded = proxy.post(
            "/api/launches", json=LAUNCH, headers={"X-Forwarded-For": f"{victim}, 203.0.113.10"}
        )
    assert forwarded.headers["RateLimit-Remaining"] == "2"
    # And the victim's bucket is as the victim left it: empty, not pushed further.
    with client_at(app, victim) as client:
        again = client.post("/api/launches", json=LAUNCH)
    assert again.status_code == 429 and again.headers["RateLimit-Remaining"] == "0"
    assert 55 <= int(again.headers["RateLimit-Reset"]) <= 60


@pytest.mark.parametrize(
    "changes",
    [{"client_rate": "0"}, {"broker_url": "redis://127.0.0.1:1/0"}],
    ids=["limit off", "redis down"],
)
def test_no_numbers_when_nothing_was_counted(make_app: MakeApp, changes: dict[str, str]) -> None:
    app, broker = make_app(**changes)
    with client_at(app, "198.51.100.9") as client:
        launched = client.post("/api/launches", json=LAUNCH)
        broker.down = True
        build = client.get("/build/image/default")
    assert launched.status_code == 202 and build.status_code == 200
    assert stands(launched) == {} and stands(build) == {}
    assert "access-control-expose-headers" not in build.headers


def test_the_launch_route_declares_the_headers() -> None:
    document = create_app(Settings()).openapi()
    answers = document["paths"]["/api/launches"]["post"]["responses"]
    assert set(ratelimit.HEADERS) <= set(answers["202"]["headers"])
    assert {*ratelimit.HEADERS, "Retry-After"} <= set(answers["429"]["headers"])
