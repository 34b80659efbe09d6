"""Idempotency-Key (api/idempotency.py) on fakeredis: one key, one launch."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fakeredis
import pytest
import redis

from api.idempotency import (
    DONE_TTL,
    PENDING_TTL,
    Claim,
    KeyProblem,
    Replay,
    check_key,
    claim,
    storage_key,
)

PREFIX = "hublaunch:t:"
BODY = {"image": "default", "repo": None, "ref": None, "lifetime": None}
ANSWER = {"id": "abc", "status": "queued", "status_url": "u", "events_url": "e"}


@pytest.fixture
def store() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def first(store: redis.Redis, client: str = "192.0.2.1", key: str = "k-1", **kw: Any) -> Claim:
    found = claim(store, PREFIX, client, key, BODY, **kw)
    assert isinstance(found, Claim)
    return found


def test_same_key_and_body_get_the_first_answer(store: fakeredis.FakeRedis) -> None:
    first(store).complete(ANSWER)
    again = claim(store, PREFIX, "192.0.2.1", "k-1", dict(BODY))
    assert again == Replay(ANSWER)


def test_the_same_key_with_another_body_is_a_422(store: fakeredis.FakeRedis) -> None:
    first(store).complete(ANSWER)
    with pytest.raises(KeyProblem) as e:
        claim(store, PREFIX, "192.0.2.1", "k-1", {**BODY, "image": "other"})
    assert e.value.status == 422
    assert "another request body" in e.value.message


def test_another_body_while_the_first_runs_is_a_422_at_once(store: fakeredis.FakeRedis) -> None:
    first(store)
    with pytest.raises(KeyProblem) as e:
        claim(store, PREFIX, "192.0.2.1", "k-1", {**BODY, "lifetime": 60}, wait=5)
    assert e.value.status == 422


def test_a_key_still_running_after_the_wait_is_a_409(store: fakeredis.FakeRedis) -> None:
    first(store)
    with pytest.raises(KeyProblem) as e:
        claim(store, PREFIX, "192.0.2.1", "k-1", BODY, wait=0.2)
    assert e.value.status == 409
    assert "retry" in e.value.message


def test_a_follower_gets_the_answer_when_the_first_finishes(store: fakeredis.FakeRedis) -> None:
    leader = first(store)
    threading.Timer(0.2, leader.complete, args=(ANSWER,)).start()
    assert claim(store, PREFIX, "192.0.2.1", "k-1", BODY, wait=3) == Replay(ANSWER)


def test_a_released_key_can_be_claimed_again(store: fakeredis.FakeRedis) -> None:
    first(store).release()
    first(store)


def test_a_follower_takes_over_a_key_released_while_it_waits(store: fakeredis.FakeRedis) -> None:
    leader = first(store)
    threading.Timer(0.2, leader.release).start()
    assert isinstance(claim(store, PREFIX, "192.0.2.1", "k-1", BODY, wait=3), Claim)


def test_release_never_deletes_someone_elses_claim(store: fakeredis.FakeRedis) -> None:
    lost = first(store)
    store.delete(lost.key)  # its TTL ran out
    current = first(store)
    lost.release()
    assert store.get(current.key) == current.token.encode()


def test_keys_are_scoped_by_client(store: fakeredis.FakeRedis) -> None:
    first(store, client="192.0.2.1").complete(ANSWER)
    # Another client with the same key starts its own launch, never sees the first one's.
    assert isinstance(claim(store, PREFIX, "192.0.2.2", "k-1", BODY), Claim)


def test_claims_and_answers_expire(store: fakeredis.FakeRedis) -> None:
    running = first(store)
    assert 0 < store.ttl(running.key) <= PENDING_TTL
    running.complete(ANSWER)
    assert PENDING_TTL < store.ttl(running.key) <= DONE_TTL
    assert running.key.startswith(f"{PREFIX}idem:") and "k-1" not in running.key


def test_fifty_at_once_make_one_claim_and_fifty_answers(store: fakeredis.FakeRedis) -> None:
    claims: list[Claim] = []
    lock = threading.Lock()

    def one() -> dict[str, Any]:
        found = claim(store, PREFIX, "192.0.2.1", "k-50", BODY, wait=10)
        if isinstance(found, Claim):
            with lock:
                claims.append(found)
            threading.Event().wait(0.1)  # the launch being accepted
            found.complete(ANSWER)
            return ANSWER
        return found.answer

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(lambda _: one(), range(50)))
    assert len(claims) == 1
    assert answers == [ANSWER] * 50


@pytest.mark.parametrize(
    "key", ["", "x" * 256, "a b", "tab\there", "nul\x00", "new\nline", "é", "<script>"]
)
def test_a_malformed_key_is_a_400_that_says_what_fits(store: fakeredis.FakeRedis, key: str) -> None:
    with pytest.raises(KeyProblem) as e:
        claim(store, PREFIX, "192.0.2.1", key, BODY)
    assert e.value.status == 400
    assert "1 to 255 characters" in e.value.message
    assert store.keys("*") == []


@pytest.mark.parametrize("key", ["a", "x" * 255, "6f1c1f0e-3c1a-4b7e-9d7c-2f1e0b9a8c7d", "a.b:c~d"])
def test_well_formed_keys_pass(key: str) -> None:
    assert check_key(key) == key


def test_redis_down_is_a_503_nothing_started() -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    with pytest.raises(KeyProblem) as e:
        claim(dead, PREFIX, "192.0.2.1", "k-1", BODY)
    assert e.value.status == 503


def test_storage_keys_differ_by_client_and_key() -> None:
    keys = {storage_key(PREFIX, c, k) for c in ("a", "b") for k in ("1", "2")}
    assert len(keys) == 4
    # No way to make one (client, key) collide with another by moving the separator.
    assert storage_key(PREFIX, "a", "b:c") != storage_key(PREFIX, "a:b", "c")
