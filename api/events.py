"""The launch event stream (Server-Sent Events), replayed from the database.

Stored events are the source of truth, so a late or reconnecting watcher (``Last-Event-ID``)
gets the whole history. Redis pub/sub only wakes the stream early; it also polls.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from sqlalchemy import select

from api.binder import ready_fields
from api.metrics import STREAMS
from worker import queries
from worker.crypto import reveal
from worker.db import reading
from worker.models import LaunchEvent, Phase, Status
from worker.notify import channel, redis_url
from worker.settings import Settings

KEEPALIVE_SECONDS = 15.0
# How often a stream reads the database when nothing rang its doorbell: every event rings it
# (after its commit), so with Redis this is only the safety net for a lost message. Without
# Redis, polling is all there is.
IDLE_POLL_SECONDS = 30.0
POLL_SECONDS = 1.0
# Streams read the database in worker threads of their own: a thousand open streams must not
# take every thread (and database connection) the intake's handlers need (measured: with 1,000
# streams on the shared thread pool, POST /api/launches fell from 230/s to 2/s).
STREAM_THREADS = 8
_limiters: dict[int, anyio.CapacityLimiter] = {}


def _stream_threads() -> anyio.CapacityLimiter:
    """The streams' thread limiter of the running event loop (one per loop: tests run many)."""
    import asyncio

    loop = id(asyncio.get_running_loop())
    if loop not in _limiters:
        _limiters[loop] = anyio.CapacityLimiter(STREAM_THREADS)
    return _limiters[loop]


FINAL_PHASES = frozenset({Phase.ready, Phase.failed})
# Event ids are row ids: 18 digits stay below 2**63, the largest integer SQLite and PostgreSQL
# compare a BIGINT with; a longer number would overflow mid-stream rather than mean anything.
MAX_EVENT_ID_DIGITS = 18


def parse_event_id(value: str | None) -> int | None:
    """The event id a client says it last saw (``Last-Event-ID``), or None when the value is no
    such id: only ASCII digits count (``str.isdigit`` also accepts "²", which ``int`` refuses),
    and at most ``MAX_EVENT_ID_DIGITS`` of them."""
    if value is None or not 0 < len(value) <= MAX_EVENT_ID_DIGITS:
        return None
    if not (value.isascii() and value.isdigit()):
        return None
    return int(value)


def _load(
    settings: Settings, launch_id: str, after_id: int, binder_fields: bool = False
) -> tuple[list[dict[str, Any]], bool]:
    with reading(settings.database_url) as db:
        launch = queries.get_launch(db, launch_id)
        if launch is None:
            return [], True
        out = []
        for event in queries.events_after(db, launch_id, after_id):
            payload = _payload(event)
            if event.phase == Phase.built:
                # BinderHub's built event names the image too (its JS client shows it).
                payload.setdefault("imageName", launch.spec.get("image") or launch.env_name)
            if event.phase == Phase.ready:
                # BinderHub's ready event names the image it launched.
                payload["image"] = launch.spec.get("image") or launch.env_name
                if launch.status == Status.ready:
                    token = reveal(settings, launch.token_ciphertext)
                    if token:
                        payload["token"] = token
                if binder_fields:
                    host = settings.public_url + "/"
                    payload.update(ready_fields(launch.spec, launch.commit, host))
            out.append(payload)
        return out, launch.is_terminal


def _already_finished(settings: Settings, launch_id: str, seen_id: int) -> bool:
    """Whether the client already saw the final event (an EventSource reconnects by itself
    after the stream closes; it must get a closed stream, not a stream that waits forever)."""
    if seen_id <= 0:
        return False
    with reading(settings.database_url) as db:
        seen = db.scalars(
            select(LaunchEvent.phase).where(
                LaunchEvent.launch_id == launch_id, LaunchEvent.id <= seen_id
            )
        )
        return any(phase in FINAL_PHASES for phase in seen)


def _payload(event: LaunchEvent) -> dict[str, Any]:
    return {"id": event.id, "phase": event.phase, "message": event.message, **(event.data or {})}


def format_event(payload: dict[str, Any], id_prefix: str = "") -> str:
    return f"id: {id_prefix}{payload['id']}\ndata: {json.dumps(payload)}\n\n"


async def event_stream(
    settings: Settings,
    launch_id: str,
    *,
    after_id: int,
    id_prefix: str = "",
    binder_fields: bool = False,
) -> AsyncIterator[str]:
    """Stored events after ``after_id``, then new ones as they come, until ready or failed.

    ``id_prefix`` goes before each event id; the /build stream uses it to tie a reconnecting
    EventSource (which sends the last id back as Last-Event-ID) to the same launch, and asks
    for BinderHub's fields on ``ready`` (``binder_fields``)."""
    threads = _stream_threads()
    if await anyio.to_thread.run_sync(
        _already_finished, settings, launch_id, after_id, limiter=threads
    ):
        return
    url = redis_url(settings)
    client = aioredis.Redis.from_url(url) if url else None
    pubsub = client.pubsub() if client else None
    STREAMS.opened()
    try:
        if pubsub is not None:
            try:
                await pubsub.subscribe(channel(launch_id))
            except RedisError:
                pubsub = None  # fall back to polling
        last_sent = time.monotonic()
        while True:
            events, terminal = await anyio.to_thread.run_sync(
                _load, settings, launch_id, after_id, binder_fields, limiter=threads
            )
            for payload in events:
                yield format_event(payload, id_prefix)
                last_sent = time.monotonic()
                after_id = payload["id"]
                if payload["phase"] in FINAL_PHASES:
                    return
            if terminal and not events:
                return
            if time.monotonic() - last_sent > KEEPALIVE_SECONDS:
                yield ": keepalive\n\n"
                last_sent = time.monotonic()
            await _wait(pubsub)
    finally:
        STREAMS.closed()
        if pubsub is not None:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
        if client is not None:
            await client.aclose()


async def _wait(pubsub: aioredis.client.PubSub | None) -> None:
    if pubsub is None:
        await anyio.sleep(0.25)
        return
    # Jittered (15-45 s, 30 on average): streams opened together (a class, a burst, a restart
    # that reconnects every watcher) would otherwise read the database together, and such a
    # burst on the streams' threads held up the intake's writer (bench.streams_load: p99 at
    # 20 POST/s 130-172 ms with 1,000 streams reading every 10 s).
    idle = IDLE_POLL_SECONDS * random.uniform(0.5, 1.5)  # noqa: S311 - timing, not security
    try:
        await pubsub.get_message(ignore_subscribe_messages=True, timeout=idle)
    except RedisError:
        await anyio.sleep(POLL_SECONDS)
