"""Which launch task run is working on a starting launch, and how a dead run is noticed.

A launch task claims its launch before working on it: a conditional UPDATE that wins when the
launch is free or its holder's claim has expired. Its process's heartbeat thread extends every
claim the process holds, every third of the lease. When the run ends it lets go: for good when
the launch needs nothing more, or with "expect the retry by <when>" when it will run again
later (a Celery countdown, which a dying worker loses with it).

``recover`` runs every few seconds (beat): a starting launch whose claim expired (its worker
died, or its retry never came) or that nobody ever claimed (its message was lost) is sent
again, and the next free worker takes it over. So a launch whose worker died resumes within
the lease plus the sweep's interval, not after the broker's visibility timeout (an hour).

Two runs never work on one launch at once while the database answers the heartbeat. If it
does not for a whole lease, a second run may start; every step writes conditionally and names
the Hub user once, so even then the launch ends with one user, one server and one token.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, or_

from worker.broker import launch_message
from worker.db import bulk_update, rowcount, utcnow
from worker.models import Launch
from worker.outcome import Outcome
from worker.transitions import STARTING
from worker.unit_of_work import Units

log = logging.getLogger(__name__)

# A retry that a busy worker runs late is not taken for lost before this much extra time.
RETRY_SLACK = timedelta(seconds=15)


def _free(now: datetime) -> ColumnElement[bool]:
    return or_(
        Launch.claimed_by.is_(None),
        Launch.claim_expires_at.is_(None),
        Launch.claim_expires_at < now,
    )


def claim(units: Units, launch_id: str, *, lease: timedelta, now: datetime) -> str | None:
    """Take the launch for a new run; its run id, or None when a live run holds it."""
    run = secrets.token_hex(16)
    with units.begin() as uow:
        won = rowcount(
            uow.db,
            bulk_update(Launch)
            .where(Launch.id == launch_id, _free(now))
            .values(claimed_by=run, claim_expires_at=now + lease),
        )
    return run if won else None


def release(
    units: Units, launch_id: str, run: str, outcome: Outcome | None, *, now: datetime
) -> None:
    """Let go of the launch; when the run will retry, the sweep waits that long for it."""
    retry_in = outcome.retry_in if outcome is not None else None
    expires = now + timedelta(seconds=retry_in) + RETRY_SLACK if retry_in is not None else None
    with units.begin() as uow:
        uow.db.execute(
            bulk_update(Launch)
            .where(Launch.id == launch_id, Launch.claimed_by == run)
            .values(claimed_by=None, claim_expires_at=expires)
        )


class Heartbeat:
    """This process's held claims, extended by one UPDATE every ``lease / 3`` seconds from a
    thread started on first use (in each process: a forked child starts its own)."""

    def __init__(self) -> None:
        self._held: dict[str, str] = {}  # run id -> launch id
        self._lock = threading.Lock()
        self._pid = 0
        self._units: Units | None = None
        self._lease = timedelta(seconds=10)
        self._wake = threading.Event()

    @contextmanager
    def holding(self, units: Units, run: str, launch_id: str, lease: timedelta) -> Iterator[None]:
        with self._lock:
            self._units, self._lease = units, lease
            self._held[run] = launch_id
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="claims", daemon=True).start()
        try:
            yield
        finally:
            with self._lock:
                self._held.pop(run, None)

    def beat(self) -> int:
        """Extend every claim held here now; how many rows still carried this process's runs."""
        with self._lock:
            runs, units, lease = list(self._held), self._units, self._lease
        if not runs or units is None:
            return 0
        with units.begin() as uow:
            kept = rowcount(
                uow.db,
                bulk_update(Launch)
                .where(Launch.claimed_by.in_(runs))
                .values(claim_expires_at=utcnow() + lease),
            )
        if kept < len(runs):
            # Released in the meantime (a run ending as we read), or taken over after a stall.
            log.debug("heartbeat: %d of %d claims held", kept, len(runs))
        return kept

    def _run(self) -> None:
        while True:
            self._wake.wait(self._lease.total_seconds() / 3)
            try:
                self.beat()
            except Exception:  # the database is away: try again next beat, never die
                log.warning("heartbeat: could not extend claims", exc_info=True)


HEARTBEAT = Heartbeat()


class Run:
    """One launch task run: whether it holds the launch, and how it ended."""

    def __init__(self, *, held: bool) -> None:
        self.held = held
        self.outcome: Outcome | None = None

    def done(self, outcome: Outcome) -> None:
        self.outcome = outcome


@contextmanager
def running(
    units: Units, launch_id: str, *, lease: timedelta, clock: Callable[[], datetime]
) -> Iterator[Run]:
    """Hold the launch while the block runs; ``Run.held`` is False when another live run has it
    (the block should then do nothing). The block sets ``Run.outcome`` to say how it ended."""
    run_id = claim(units, launch_id, lease=lease, now=clock())
    current = Run(held=run_id is not None)
    if run_id is None:
        yield current
        return
    with HEARTBEAT.holding(units, run_id, launch_id, lease):
        try:
            yield current
        finally:
            # Only a run that will retry lets go (saying when to expect it): a finished launch
            # is no longer starting, so the sweep never looks at its claim again, and an
            # exception escaping the run (Celery retries or drops it) keeps the claim until it
            # expires, when the sweep sends the launch again if nothing else did.
            if current.outcome is not None and current.outcome.retry_in is not None:
                release(units, launch_id, run_id, current.outcome, now=clock())


def recover(units: Units, *, now: datetime, unclaimed_after: timedelta) -> list[str]:
    """Send again every starting launch whose claim expired, or that nobody claimed within
    ``unclaimed_after`` of its creation (its message may be lost, with a broker that restarted
    without persistence, or it waits behind a backlog: one more message is harmless, as only
    one run can hold the claim). The claim is pushed ahead by that much in the same UPDATE, so
    overlapping sweeps (two beats) send each launch once."""
    stale = and_(
        Launch.status.in_(STARTING),
        Launch.user_removed_at.is_(None),
        or_(
            Launch.claim_expires_at < now,
            and_(
                Launch.claim_expires_at.is_(None),
                Launch.claimed_by.is_(None),
                Launch.created_at < now - unclaimed_after,
            ),
        ),
    )
    with units.begin() as uow:
        rows = uow.db.execute(
            bulk_update(Launch)
            .where(stale)
            .values(claimed_by=None, claim_expires_at=now + unclaimed_after)
            .returning(Launch.id)
        )
        ids = [row.id for row in rows]
        for launch_id in ids:
            uow.send(launch_message(launch_id))
    if ids:
        log.warning("recover: sent %d launches again: %s", len(ids), ", ".join(ids))
    return ids
