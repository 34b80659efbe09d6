"""Which Hub a launch goes to (issue 14): the healthy Hub with the most free capacity.

Read inside the admission's lock (worker/admission.py), from the database: the active sessions
per Hub, and each Hub's last health check (worker/hub_health.py). A Hub whose check is older
than ``STALE_AFTER`` health intervals counts as healthy again: a stopped health task must not
keep a Hub out for ever.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from worker.db import as_utc
from worker.hubs import Hub, hubs
from worker.models import ACTIVE, HubHealth, Launch
from worker.settings import Settings

STALE_AFTER = 3


def free(hub: Hub, active: int) -> float:
    """Sessions the Hub may still take (capacity 0: no cap of its own)."""
    return math.inf if hub.capacity == 0 else max(hub.capacity - active, 0)


def choose(candidates: Iterable[Hub], active: Mapping[str, int]) -> Hub | None:
    """The Hub with the most free capacity; ties go to the one with fewer active sessions, then
    to the first configured. None when none has room."""
    best: tuple[float, int, int] | None = None
    chosen = None
    for order, hub in enumerate(candidates):
        room = free(hub, active.get(hub.name, 0))
        if room <= 0:
            continue
        rank = (-room, active.get(hub.name, 0), order)
        if best is None or rank < best:
            best, chosen = rank, hub
    return chosen


def room(candidates: Iterable[Hub], active: Mapping[str, int]) -> float:
    """Free capacity on the given Hubs, all together."""
    return sum(free(hub, active.get(hub.name, 0)) for hub in candidates)


def active_per_hub(db: Session, first: str) -> dict[str, int]:
    """Active sessions by Hub (rows of no Hub are the first Hub's: placed before names)."""
    live = and_(Launch.status.in_(ACTIVE), Launch.user_removed_at.is_(None))
    counts: dict[str, int] = {}
    for name, count in db.execute(
        select(Launch.hub, func.count()).where(live).group_by(Launch.hub)
    ):
        key = name or first
        counts[key] = counts.get(key, 0) + count
    return counts


def answering(db: Session, settings: Settings, now: datetime) -> list[Hub]:
    """The configured Hubs not known to be down (every read of placement starts here)."""
    return healthy(db, hubs(settings), now, settings.hub_health_interval)


def healthy(db: Session, configured: Iterable[Hub], now: datetime, interval: float) -> list[Hub]:
    """The configured Hubs not known to be down."""
    stale = now - timedelta(seconds=interval * STALE_AFTER)
    down = {
        row.name
        for row in db.scalars(select(HubHealth).where(HubHealth.healthy.is_(False)))
        if as_utc(row.checked_at) >= stale
    }
    return [hub for hub in configured if hub.name not in down]
