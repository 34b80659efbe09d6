"""How many launches one client may start: a GCRA bucket per client address, in Redis.

One Lua script does the whole check in one round trip, atomically, on the Redis every app
process shares (the broker's), with Redis's own clock, so all processes count against the same
bucket; the same call says where the client stands, which every counted request is told in
RateLimit headers. Also: the client's address (the socket peer, or the proxy's X-Forwarded-For
when the peer is a trusted proxy) and the shared, lazily made Redis client.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import math
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker import notify
from worker.notify import redis_url
from worker.settings import Settings

log = logging.getLogger(__name__)

PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0}
# A check that takes longer than this is Redis in trouble: allow (see ``check``), do not queue.
REDIS_TIMEOUT = 0.25
WARN_EVERY = 30.0

# KEYS[1] the client's bucket; ARGV[1] emission interval (µs per launch), ARGV[2] burst (µs, =
# n intervals: n launches at once). The value is the theoretical arrival time (TAT) on Redis's
# clock, in ms as it always was (so processes of the previous version still read it during a
# rolling update); the sums are in whole µs, TIME's own unit, so the counts below are exact
# (in float ms, with the TAT stored to 0.1 ms, one back-to-back check in five was told 0 left
# and 41 s, not 1 and 40 s).
# Returns {1, launches left, µs until the bucket is full} when allowed, {0, µs until the next
# one is, µs until the bucket is full} when refused.
GCRA = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local stored = tonumber(redis.call('GET', KEYS[1]))
local tat = stored and math.floor(stored * 1000 + 0.5) or now
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - burst
if now < allow_at then
  return {0, allow_at - now, tat - now}
end
redis.call('SET', KEYS[1], string.format('%.3f', new_tat / 1000), 'PX',
  math.ceil((new_tat - now) / 1000))
return {1, math.floor((burst - (new_tat - now)) / interval), new_tat - now}
"""


@dataclass(frozen=True)
class Rate:
    count: int
    period: float  # seconds

    @classmethod
    def parse(cls, text: str) -> Rate | None:
        """``<n>/<second|minute|hour>`` (already checked by Settings); None when off."""
        if not text:
            return None
        count, _, period = text.partition("/")
        return cls(int(count), PERIODS[period]) if int(count) > 0 else None


@dataclass(frozen=True)
class Quota:
    """Where a client stands after a check, as the RateLimit headers say it."""

    limit: int  # launches in a window
    window: int  # seconds
    remaining: int  # launches it may start now
    reset: int  # whole seconds (rounded up) until the bucket is full again

    def headers(self) -> list[tuple[bytes, bytes]]:
        values = (
            f"{self.limit};w={self.window}",
            f"limit={self.limit}, remaining={self.remaining}, reset={self.reset}",
            str(self.limit),
            str(self.remaining),
            str(self.reset),
        )
        return [(n.lower().encode(), v.encode()) for n, v in zip(HEADERS, values, strict=True)]


# What every counted request is answered with: RateLimit-Policy and RateLimit as in
# draft-ietf-httpapi-ratelimit-headers-07, and the older trio of draft -06, which existing
# clients read. The same numbers in both.
HEADERS = (
    "RateLimit-Policy",
    "RateLimit",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
)
# A browser script on another origin reads only the headers CORS exposes (a 429's Retry-After too).
EXPOSED = ", ".join((*HEADERS, "Retry-After")).encode()
# For the OpenAPI document of the routes that count (api/routes/launches.py).
OPENAPI_HEADERS: dict[str, dict[str, Any]] = {
    "RateLimit-Policy": {
        "description": "The limit and its window: `<launches>;w=<seconds>`, e.g. `10;w=60`. "
        "The RateLimit headers come with every launch counted against the client; none when "
        "the limit is off or could not be checked.",
        "schema": {"type": "string"},
    },
    "RateLimit": {
        "description": "Where this client stands: `limit=<n>, remaining=<n>, reset=<seconds "
        "until the bucket is full again>`.",
        "schema": {"type": "string"},
    },
    "RateLimit-Limit": {
        "description": "Launches a client may start at once (and per window).",
        "schema": {"type": "integer", "minimum": 1},
    },
    "RateLimit-Remaining": {
        "description": "Launches this client may start now (0 when refused).",
        "schema": {"type": "integer", "minimum": 0},
    },
    "RateLimit-Reset": {
        "description": "Seconds until this client's bucket is full again (rounded up).",
        "schema": {"type": "integer", "minimum": 0},
    },
}


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after: int = 0  # whole seconds, at least 1 when refused
    quota: Quota | None = None  # None when nothing was counted (Redis down): no numbers to give

    def message(self, rate: Rate) -> str:
        return (
            f"Too many launches from your address (at most {rate.count} every "
            f"{_period_name(rate.period)}); wait {self.retry_after} s and try again, "
            "or end sessions you no longer use."
        )


ALLOWED = Verdict(True)


def _period_name(seconds: float) -> str:
    return next((name for name, s in PERIODS.items() if s == seconds), f"{seconds:g} s")


# -- the client's address ----------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _trusted(spec: str) -> tuple[bool, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]]:
    # Cached: parsing the setting on every request was a tenth of a launch's intake.
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    networks = []
    for entry in entries:
        if entry == "*":
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            log.warning("forwarded_allow_ips: %r is not an address or network; ignored", entry)
    return "*" in entries, tuple(networks)


@functools.lru_cache(maxsize=1024)  # bounded: the hops come from the visitor's header
def _is_trusted(host: str, trusted: tuple[bool, tuple[Any, ...]]) -> bool:
    everyone, networks = trusted
    if everyone:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a unix socket path or a name: never a proxy we know
    return any(address in network for network in networks)


def client_address(connection: HTTPConnection, settings: Settings) -> str:
    """The address a launch is counted against.

    The socket peer, unless it is a trusted proxy (``forwarded_allow_ips``): then the right-most
    X-Forwarded-For entry that is not a trusted proxy, since everything left of it was written by
    the visitor and can say anything. uvicorn (``hublaunch api``) already rewrote the peer this
    way with the same setting; doing it again gives the same answer, and covers other servers.
    """
    peer = connection.client.host if connection.client else ""
    trusted = _trusted(settings.forwarded_allow_ips)
    if not _is_trusted(peer, trusted):
        return peer
    hops = [
        hop.strip()
        for value in connection.headers.getlist("x-forwarded-for")
        for hop in value.split(",")
        if hop.strip()
    ]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            return hop[:64]
    # Every hop is a trusted proxy (or there is no header): the nearest one is the client.
    return (hops[0] if hops else peer)[:64]


# -- Redis ---------------------------------------------------------------------------------------


def shared_redis(settings: Settings) -> redis.Redis | None:
    """The process's client of the broker's Redis, with a short timeout: a slow Redis must not
    hold up a launch for long (the limit then fails open)."""
    return notify.shared_redis(settings, timeout=REDIS_TIMEOUT)


def key_prefix(settings: Settings) -> str:
    """Keys of this deployment: the queue name tells apart deployments sharing one Redis."""
    return f"hublaunch:{settings.queue}:"


class Bucket:
    """The launch rate of each client, counted under ``prefix``: the script's arguments and
    what its answer means, whichever client (blocking or asynchronous) runs it."""

    def __init__(self, rate: Rate, prefix: str) -> None:
        self._rate = rate
        self._prefix = prefix
        self._last_warning = -math.inf
        # Whole µs, the script's unit, rounded down so that n intervals fit in the period: a
        # full bucket never reads as a second more than the window (7/minute: 59.999996 s).
        self._interval = max(1, int(rate.period * 1_000_000) // rate.count)
        self._burst = self._interval * rate.count
        self._window = math.ceil(rate.period)

    @property
    def rate(self) -> Rate:
        return self._rate

    def _keys(self, address: str) -> list[str]:
        return [f"{self._prefix}rate:{address}"]

    def _args(self) -> list[int]:
        return [self._interval, self._burst]

    def _verdict(self, reply: list[int]) -> Verdict:
        allowed, left_or_wait, full_us = reply
        reset = _seconds(full_us)
        if allowed:
            left = int(left_or_wait)
            return Verdict(True, quota=Quota(self._rate.count, self._window, left, reset))
        quota = Quota(self._rate.count, self._window, 0, reset)
        return Verdict(False, max(1, _seconds(left_or_wait)), quota)

    def _unchecked(self, error: redis.RedisError) -> Verdict:
        """Redis unreachable or failing: allowed, with a warning (at most one per WARN_EVERY
        s), and no quota (nothing was counted; numbers made up here would mislead). The limit
        protects the Hub from floods; refusing every visitor because the counter is down would
        turn a Redis hiccup into a full outage, and the queue itself (the same Redis) then
        refuses launches with a 503 of its own anyway."""
        now = time.monotonic()
        if now - self._last_warning >= WARN_EVERY:
            self._last_warning = now
            log.warning("rate limit not checked (Redis: %s); launch allowed", error)
        return ALLOWED


class Limiter(Bucket):
    """A ``Bucket`` checked with a blocking client (for code on a thread)."""

    def __init__(self, client: redis.Redis, rate: Rate, prefix: str) -> None:
        super().__init__(rate, prefix)
        self._script = client.register_script(GCRA)

    def check(self, address: str) -> Verdict:
        """Count one launch for ``address``: allowed, or refused with the seconds to wait; with
        where the client stands, from the same script call (``Bucket._unchecked`` when Redis
        fails)."""
        try:
            return self._verdict(self._script(keys=self._keys(address), args=self._args()))
        except redis.RedisError as e:
            return self._unchecked(e)


class AsyncLimiter(Bucket):
    """A ``Bucket`` checked without blocking its event loop. A blocking call there stalled
    every request of the process for a round trip, and gave up the GIL to the launch writer
    (api.group_commit) each time, to wait for it back: the limit cost an accepted launch more
    than the rest of the app did."""

    def __init__(self, client: aioredis.Redis, rate: Rate, prefix: str) -> None:
        super().__init__(rate, prefix)
        self._client = client
        self._script = client.register_script(GCRA)

    async def close(self) -> None:
        await self._client.aclose()

    async def check(self, address: str) -> Verdict:
        """``Limiter.check``, awaited."""
        try:
            reply = await self._script(keys=self._keys(address), args=self._args())
        except redis.RedisError as e:
            return self._unchecked(e)
        return self._verdict(reply)


def _seconds(microseconds: int) -> int:
    return -(-int(microseconds) // 1_000_000)  # rounded up, in integers


_limiters: dict[tuple[int, str, str, str], Limiter] = {}
_limiters_lock = threading.Lock()
# An asynchronous client's connections belong to the loop that made them: one limiter per loop
# (uvicorn runs one; each test client its own), closed when the app stops on that loop.
_async_limiters: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[str, str, str], AsyncLimiter]
] = weakref.WeakKeyDictionary()
# Concurrent checks share this many connections, then wait for one (queueing, not Redis in
# trouble: it does not fail open until POOL_WAIT has passed).
POOL_SIZE = 32
POOL_WAIT = 2.0


def limiter(settings: Settings) -> Limiter | None:
    """This process's limiter for these settings; None when the limit is off or there is no
    Redis to count in."""
    rate = Rate.parse(settings.client_rate)
    client = shared_redis(settings) if rate else None
    if rate is None or client is None:
        return None
    key = (os.getpid(), str(redis_url(settings)), settings.client_rate, key_prefix(settings))
    with _limiters_lock:
        found = _limiters.get(key)
        if found is None:
            found = _limiters[key] = Limiter(client, rate, key_prefix(settings))
        return found


def async_limiter(settings: Settings) -> AsyncLimiter | None:
    """``limiter`` for the running event loop."""
    rate = Rate.parse(settings.client_rate)
    url = redis_url(settings) if rate else None
    if rate is None or url is None:
        return None
    per_loop = _async_limiters.setdefault(asyncio.get_running_loop(), {})
    key = (url, settings.client_rate, key_prefix(settings))
    found = per_loop.get(key)
    if found is None:
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=POOL_SIZE,
            timeout=POOL_WAIT,
            socket_timeout=REDIS_TIMEOUT,
            socket_connect_timeout=REDIS_TIMEOUT,
        )
        client = aioredis.Redis.from_pool(pool)  # closing it closes the pool
        found = per_loop[key] = AsyncLimiter(client, rate, key_prefix(settings))
    return found


async def close_async_limiters() -> None:
    """Close the running loop's limiters' connections (the app's shutdown)."""
    for found in _async_limiters.pop(asyncio.get_running_loop(), {}).values():
        await found.close()


def check(settings: Settings, address: str) -> tuple[Verdict, Rate | None]:
    """Count one launch for ``address`` under the settings' limit."""
    active = limiter(settings)
    if active is None:
        return ALLOWED, None
    return active.check(address), active.rate


def count(
    connection: HTTPConnection, settings: Settings, address: str
) -> tuple[Verdict, Rate | None]:
    """``check``, and keep the verdict on the request: LimitLaunchStarts answers with where
    the client stands (RateLimit headers) on whatever response the request then gets."""
    verdict, rate = check(settings, address)
    connection.scope.setdefault("state", {})[VERDICT] = verdict
    return verdict, rate


async def count_async(
    connection: HTTPConnection, settings: Settings, address: str
) -> tuple[Verdict, Rate | None]:
    """``count`` on the event loop, without blocking it."""
    active = async_limiter(settings)
    if active is None:
        return ALLOWED, None
    verdict = await active.check(address)
    connection.scope.setdefault("state", {})[VERDICT] = verdict
    return verdict, active.rate


# -- the flood path, and the headers -------------------------------------------------------------

LAUNCHES_PATH = "/api/launches"
BUILD_PREFIX = "/build/"
CHECKED = "hublaunch_rate_checked"  # set in the request's state once the middleware counted it
VERDICT = "hublaunch_rate_verdict"  # the verdict of a counted request (``count``)


class LimitLaunchStarts:
    """Count ``POST /api/launches`` before anything else runs (ASGI middleware): a refused
    request costs one Redis call, never a body parse, a dependency, a worker thread or the
    database — a flood must not starve the intake. A request with an ``Idempotency-Key`` is left
    to the route, which counts it only when it is not a replay; so is ``GET /build/...``, which
    counts only when it does not resume its own launch.

    Every response to a counted request carries the RateLimit headers of its verdict, added to
    the start message whoever counted it (here or the route), so a 429, a 202 and the start of
    a /build stream say the same. A request that was not counted gets none; neither does one
    counted while Redis was down."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._off = Rate.parse(settings.client_rate) is None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        launch = scope["method"] == "POST" and scope["path"] == LAUNCHES_PATH
        if not launch and not scope["path"].startswith(BUILD_PREFIX):
            await self.app(scope, receive, send)
            return
        # The routes' Request.state is this dict: what they record is read back at the start.
        state = scope.setdefault("state", {})
        if self._off:
            # Nothing is ever counted: no headers to add, and the route need not ask (a thread
            # hop each); a wrapped ``send`` would cost every launch for nothing.
            if launch:
                state[CHECKED] = True
            await self.app(scope, receive, send)
            return
        send = _with_quota(send, state)
        if launch and not any(name == b"idempotency-key" for name, _ in scope["headers"]):
            connection = HTTPConnection(scope)
            verdict, rate = await count_async(
                connection, self.settings, client_address(connection, self.settings)
            )
            if not verdict.allowed and rate is not None:
                refusal = JSONResponse(
                    {"detail": verdict.message(rate)},
                    status_code=429,
                    headers={"Retry-After": str(verdict.retry_after)},
                )
                await refusal(scope, receive, send)
                return
            state[CHECKED] = True
        await self.app(scope, receive, send)


def _with_quota(send: Send, state: dict[str, Any]) -> Send:
    """``send``, adding the RateLimit headers of the request's verdict (if it was counted, with
    numbers) to the response's start."""

    async def sending(message: Message) -> None:
        verdict = state.get(VERDICT)
        # No quota: not counted, or counted while Redis was down (no numbers to give).
        quota = verdict.quota if isinstance(verdict, Verdict) else None
        if message["type"] == "http.response.start" and quota is not None:
            headers = [*message.get("headers", ()), *quota.headers()]
            # /build answers other origins (CORS); their scripts read only exposed headers.
            if any(name == b"access-control-allow-origin" for name, _ in headers):
                headers.append((b"access-control-expose-headers", EXPOSED))
            message = {**message, "headers": headers}
        await send(message)

    return sending
