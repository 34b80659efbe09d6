"""How many launches one client may start: a GCRA bucket per client address, in Redis.

One Lua script does the whole check in one round trip, atomically, on the Redis every app
process shares (the broker's), with Redis's own clock, so all processes count against the same
bucket. Also: the client's address (the socket peer, or the proxy's X-Forwarded-For when the
peer is a trusted proxy) and the shared, lazily made Redis client.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from worker import notify
from worker.notify import redis_url
from worker.settings import Settings

log = logging.getLogger(__name__)

PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0}
# A check that takes longer than this is Redis in trouble: allow (see ``check``), do not queue.
REDIS_TIMEOUT = 0.25
WARN_EVERY = 30.0

# KEYS[1] the client's bucket; ARGV[1] emission interval (ms per launch), ARGV[2] burst (ms,
# = the period: n launches at once). The value is the theoretical arrival time (TAT, ms on
# Redis's clock). Returns {1, 0} when allowed, {0, ms until the next one is} when refused.
GCRA = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - burst
if now < allow_at then
  return {0, math.ceil(allow_at - now)}
end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(new_tat - now))
return {1, 0}
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
class Verdict:
    allowed: bool
    retry_after: int = 0  # whole seconds, at least 1 when refused

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


class Limiter:
    """The launch rate of each client, counted in ``client``'s Redis under ``prefix``."""

    def __init__(self, client: redis.Redis, rate: Rate, prefix: str) -> None:
        self._rate = rate
        self._prefix = prefix
        self._script = client.register_script(GCRA)
        self._last_warning = -math.inf

    @property
    def rate(self) -> Rate:
        return self._rate

    def check(self, address: str) -> Verdict:
        """Count one launch for ``address``: allowed, or refused with the seconds to wait.

        Redis unreachable or failing: allowed, with a warning (at most one per WARN_EVERY s).
        The limit protects the Hub from floods; refusing every visitor because the counter is
        down would turn a Redis hiccup into a full outage, and the queue itself (the same
        Redis) then refuses launches with a 503 of its own anyway.
        """
        interval = self._rate.period * 1000 / self._rate.count
        burst = self._rate.period * 1000
        try:
            allowed, wait_ms = self._script(
                keys=[f"{self._prefix}rate:{address}"], args=[interval, burst]
            )
        except redis.RedisError as e:
            now = time.monotonic()
            if now - self._last_warning >= WARN_EVERY:
                self._last_warning = now
                log.warning("rate limit not checked (Redis: %s); launch allowed", e)
            return ALLOWED
        if allowed:
            return ALLOWED
        return Verdict(False, max(1, math.ceil(int(wait_ms) / 1000)))


_limiters: dict[tuple[int, str, str, str], Limiter] = {}
_limiters_lock = threading.Lock()


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


def check(settings: Settings, address: str) -> tuple[Verdict, Rate | None]:
    """Count one launch for ``address`` under the settings' limit."""
    active = limiter(settings)
    if active is None:
        return ALLOWED, None
    return active.check(address), active.rate


# -- the flood path ----------------------------------------------------------------------------

LAUNCHES_PATH = "/api/launches"
CHECKED = "hublaunch_rate_checked"  # set in the request's state once the middleware counted it


class LimitLaunchStarts:
    """Count ``POST /api/launches`` before anything else runs (ASGI middleware): a refused
    request costs one Redis call, never a body parse, a dependency, a worker thread or the
    database — a flood must not starve the intake. A request with an ``Idempotency-Key`` is left
    to the route, which counts it only when it is not a replay."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] != LAUNCHES_PATH
            or any(name == b"idempotency-key" for name, _ in scope["headers"])
        ):
            await self.app(scope, receive, send)
            return
        verdict, rate = check(self.settings, client_address(HTTPConnection(scope), self.settings))
        if not verdict.allowed and rate is not None:
            refusal = JSONResponse(
                {"detail": verdict.message(rate)},
                status_code=429,
                headers={"Retry-After": str(verdict.retry_after)},
            )
            await refusal(scope, receive, send)
            return
        scope.setdefault("state", {})[CHECKED] = True
        await self.app(scope, receive, send)
