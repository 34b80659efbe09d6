"""The launch rate limit (api/ratelimit.py): its setting, the GCRA bucket (in fakeredis, whose
Lua runs the same script) and the client's address behind a proxy."""

from __future__ import annotations

import logging
import time

import fakeredis
import pytest
import redis
from pydantic import ValidationError
from starlette.requests import Request

from api import ratelimit
from api.ratelimit import Limiter, Rate, client_address
from worker.settings import Settings


@pytest.fixture
def store() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


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


def test_redis_down_lets_launches_through_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    limiter = Limiter(dead, Rate(1, 60.0), "hublaunch:t:")
    with caplog.at_level(logging.WARNING, logger="api.ratelimit"):
        verdicts = [limiter.check("192.0.2.1") for _ in range(3)]
    assert all(v.allowed for v in verdicts)
    warnings = [r for r in caplog.records if "rate limit not checked" in r.getMessage()]
    assert len(warnings) == 1


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
