"""Wake event-stream watchers when a launch has new events.

The database is the source of truth; this is only a doorbell over Redis pub/sub so watchers
need not poll quickly. Without Redis (the embedded dev broker), watchers fall back to polling.
"""

from __future__ import annotations

import logging
import os
import threading

import redis

from worker.settings import Settings

log = logging.getLogger(__name__)

CHANNEL_PREFIX = "hublaunch:launch:"


def channel(launch_id: str) -> str:
    return f"{CHANNEL_PREFIX}{launch_id}"


def redis_url(settings: Settings) -> str | None:
    url = settings.broker_url
    return url if url.startswith(("redis://", "rediss://", "unix://")) else None


_clients: dict[tuple[int, str, float], redis.Redis] = {}
_clients_lock = threading.Lock()


def shared_redis(settings: Settings, *, timeout: float = 2.0) -> redis.Redis | None:
    """One client (and connection pool) per process, broker URL and timeout, made on first use,
    never at import and never shared across a fork. None without Redis (the embedded dev
    broker). For the counters that live beside the queue (rate limits, watchers)."""
    url = redis_url(settings)
    if url is None:
        return None
    key = (os.getpid(), url, timeout)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = redis.Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout
            )
            _clients[key] = client
        return client


class Notifier:
    def __init__(self, settings: Settings) -> None:
        url = redis_url(settings)
        self._redis = redis.Redis.from_url(url, socket_timeout=2) if url else None

    def publish(self, launch_id: str) -> None:
        if self._redis is None:
            return
        try:
            self._redis.publish(channel(launch_id), "1")
        except redis.RedisError as e:
            # Losing a doorbell only delays a watcher until its next poll.
            log.warning("could not publish event notice: %s", e)
