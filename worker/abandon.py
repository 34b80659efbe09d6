"""Abandoned /build launches: who watches a launch, and ending one nobody came back to.

A /build launch exists for the page that opened its event stream. Each open stream counts as a
watcher in Redis (shared by every app process). When the last watcher of a launch that is not
ready yet goes without seeing the end, the app sends ``hublaunch.abandon`` with a countdown of
the grace period; the task ends the launch unless a watcher came back (an EventSource that
reconnects with Last-Event-ID) or left again later (the later departure's own message, or a
retry here, decides then). The database stays the source of truth of the launch itself.
"""

from __future__ import annotations

import logging
from datetime import datetime

import redis

from worker import transitions
from worker.broker import QueueUnavailable, abandon_message, teardown_message
from worker.notify import shared_redis
from worker.outcome import DONE, Outcome, backoff
from worker.settings import Settings
from worker.unit_of_work import Units

log = logging.getLogger(__name__)

# A count left behind by a process that died mid-stream stops counting after this long (the
# cleanup pass's launch timeout ends a launch stuck that way anyway).
COUNT_TTL = 24 * 3600

# KEYS[1] the watcher count, KEYS[2] the "left" mark; ARGV[1] the grace in ms. One watcher
# fewer; when none is left, the mark says so for the grace period. Returns the watchers left.
LEAVE = """
local left = redis.call('DECR', KEYS[1])
if left <= 0 then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], '1', 'PX', math.max(1, tonumber(ARGV[1])))
  return 0
end
return left
"""


def _redis(settings: Settings) -> redis.Redis | None:
    return shared_redis(settings)


def _keys(settings: Settings, launch_id: str) -> tuple[str, str]:
    base = f"hublaunch:{settings.queue}:watch:{launch_id}"
    return base, f"{base}:left"


def joined(settings: Settings, launch_id: str) -> bool:
    """A watcher opened the launch's stream. False when it could not be counted (no Redis):
    then its departure must not be counted either."""
    client = _redis(settings)
    if client is None:
        return False
    count, _ = _keys(settings, launch_id)
    try:
        pipe = client.pipeline(transaction=True)
        pipe.incr(count)
        pipe.expire(count, COUNT_TTL)
        pipe.execute()
    except redis.RedisError as e:
        # Without the count the launch is simply never taken as abandoned: it runs its course.
        log.warning("launch %s: watcher not counted: %s", launch_id, e)
        return False
    return True


def left(settings: Settings, units: Units, launch_id: str, *, finished: bool) -> None:
    """A watcher's stream closed; ``finished`` when it saw the end (ready or failed). The last
    watcher of an unfinished launch leaving schedules the check after the grace period."""
    client = _redis(settings)
    if client is None:
        return
    count, mark = _keys(settings, launch_id)
    grace = settings.build_watch_grace
    try:
        remaining = int(client.eval(LEAVE, 2, count, mark, int(grace * 1000)))
    except redis.RedisError as e:
        log.warning("launch %s: watcher departure not counted: %s", launch_id, e)
        return
    if remaining > 0 or finished:
        return
    try:
        with units.begin() as uow:
            uow.send(abandon_message(launch_id, countdown=grace))
    except QueueUnavailable as e:
        log.warning("launch %s: abandonment check not sent: %s", launch_id, e)


def end_if_abandoned(
    settings: Settings, units: Units, launch_id: str, *, now: datetime, attempt: int = 0
) -> Outcome:
    """End the launch (reason ``abandoned``) if it has no watcher, none left within the grace
    period, and it is still starting. Its Hub user goes as for any end: the running launch task
    sees the request and tears down, or the teardown task is sent here."""
    client = _redis(settings)
    if client is None:
        return DONE
    count, mark = _keys(settings, launch_id)
    try:
        watchers = int(client.get(count) or 0)
        wait_ms = int(client.pttl(mark))
    except redis.RedisError as e:
        log.warning("launch %s: watchers not read: %s", launch_id, e)
        return Outcome(retry_in=backoff(attempt, cap=10.0))
    if watchers > 0:
        return DONE  # a watcher came back; its departure will send another check
    if wait_ms > 0:
        # A later departure's grace is still running (or this message came early): look again
        # when it is over.
        return Outcome(retry_in=wait_ms / 1000 + 0.1)
    with units.begin() as uow:
        teardown_owed = transitions.request_abandoned_end(uow, launch_id, now=now)
        if teardown_owed is None:
            return DONE  # ready, over, or its end already requested
        log.info("launch %s: its /build stream closed and did not come back; ending", launch_id)
        if teardown_owed:
            uow.send(teardown_message(launch_id))
    return DONE
