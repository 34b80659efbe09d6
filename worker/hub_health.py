"""Every Hub checked on a schedule (beat, ``hub_health_interval``): one that does not answer
gets no new launch until it does again (worker/placement.py). A launch that finds its Hub gone
before its user exists records the failure at once (worker/starting.py), without waiting for
the next check."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from sqlalchemy.orm import Session

from worker.context import WorkerContext
from worker.hub_client import HubClient, HubError
from worker.models import HubHealth

log = logging.getLogger(__name__)


def record(db: Session, name: str, *, ok: bool, error: str | None, now: datetime) -> None:
    """Store one check's result; log when a Hub goes down or comes back."""
    row = db.get(HubHealth, name)
    if row is None:
        row = HubHealth(name=name, healthy=ok, checked_at=now)
        db.add(row)
        was = True
    else:
        was = row.healthy
    row.healthy, row.checked_at, row.error = ok, now, None if ok else error
    if ok:
        row.failing_since = None
    elif row.failing_since is None:
        row.failing_since = now
    if was and not ok:
        log.warning("Hub %s is down (%s): no new launch goes there", name, error)
    elif not was and ok:
        log.info("Hub %s answers again: launches go there again", name)


def _check(hub: HubClient) -> str | None:
    """None when the Hub's API answers; else what went wrong."""
    try:
        hub.ping()
    except HubError as e:
        return e.message
    return None


def check_all(ctx: WorkerContext) -> dict[str, bool]:
    """Check every Hub at once (a dead one costs its timeout, not the others'); returns each
    Hub's health by name."""
    clients = ctx.all_hubs()
    with ThreadPoolExecutor(max_workers=max(len(clients), 1)) as pool:
        errors = dict(zip(clients, pool.map(_check, clients.values()), strict=True))
    now = ctx.clock()
    with ctx.units.begin() as uow:
        for name, error in errors.items():
            record(uow.db, name, ok=error is None, error=error, now=now)
    return {name: error is None for name, error in errors.items()}
