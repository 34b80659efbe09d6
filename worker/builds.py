"""Build deduplication: one build per environment name, however many launches ask at once.

The ``builds`` row keyed by the environment name is the lock. A launch either finds the
environment built (and goes on), finds a build running with a fresh heartbeat (and waits), or
claims the build with an INSERT ... ON CONFLICT DO NOTHING / a conditional UPDATE (and sends
the build task). A build whose heartbeat went stale (its worker died) is claimed again by the
next launch that looks. A failed build fails every launch that was waiting for it.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from worker import transitions
from worker.broker import launch_message
from worker.builders import Builder, BuildFailed
from worker.db import as_utc, bulk_update, rowcount
from worker.metrics import observation
from worker.models import Build, BuildStatus, Launch, Phase, Status
from worker.periodic import every
from worker.queries import has_event
from worker.transitions import printable
from worker.unit_of_work import UnitOfWork, Units

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 3.0
# A build whose heartbeat is older than this has lost its worker (five beats missed): the next
# launch that waits for it builds again, so a killed worker costs seconds, not minutes.
STALE_AFTER = timedelta(seconds=15)
# How often a waiting launch looks at its build (the build also re-sends it when done).
POLL_SECONDS = 3.0
LOG_FLUSH_SECONDS = 0.5


class Decision(enum.Enum):
    ready = "ready"  # built: launch it
    start = "start"  # this launch claimed the build: send the build task
    wait = "wait"  # another build is running
    failed = "failed"  # the build this launch waited for failed


def _insert_ignore(db: Session, values: dict[str, Any]) -> bool:
    dialect = postgresql if db.get_bind().dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(Build).values(**values).on_conflict_do_nothing(index_elements=["name"])
    return bool(rowcount(db, stmt))


def _claim(db: Session, build: Build, now: datetime) -> bool:
    """Take over a failed, evicted or abandoned build (only one claimer wins)."""
    stmt = (
        bulk_update(Build)
        .where(Build.name == build.name, Build.status == build.status)
        .values(
            status=BuildStatus.building,
            attempts=Build.attempts + 1,
            started_at=now,
            heartbeat_at=now,
            finished_at=None,
            log_tail=None,
        )
    )
    if build.status == BuildStatus.building:
        stmt = stmt.where(Build.heartbeat_at < now - STALE_AFTER)
    won = bool(rowcount(db, stmt))
    db.refresh(build)
    return won


class Unresolved(Exception):
    """``decide`` was asked about a launch whose ref was not resolved yet (a bug)."""


def decide(uow: UnitOfWork, launch: Launch, builder: Builder, now: datetime) -> Decision:
    """What a repository launch does about its environment; records the matching event once."""
    db = uow.db
    name = launch.env_name
    if name is None or launch.commit is None:
        raise Unresolved(launch.id)
    build = db.get(Build, name)
    if build is None:
        if builder.exists(name):
            _insert_ignore(
                db,
                {
                    "name": name,
                    "repo": launch.spec["repo"],
                    "commit": launch.commit,
                    "builder": builder.version,
                    "status": BuildStatus.built,
                    "attempts": 0,
                    "finished_at": now,
                    "last_used_at": now,
                },
            )
            return _ready(uow, launch, now, "Found a built environment")
        claimed = _insert_ignore(
            db,
            {
                "name": name,
                "repo": launch.spec["repo"],
                "commit": launch.commit,
                "builder": builder.version,
                "status": BuildStatus.building,
                "attempts": 1,
                "started_at": now,
                "heartbeat_at": now,
            },
        )
        if claimed:
            return _waiting(uow, launch, now, Decision.start, "Building the environment")
        build = db.get(Build, name)
        if build is None:  # the row that won the INSERT was deleted since: look again later
            return _waiting(uow, launch, now, Decision.wait, "Waiting for a build already running")
    db.refresh(build)
    if build.status == BuildStatus.built and builder.exists(name):
        build.last_used_at = now
        return _ready(uow, launch, now, "Found a built environment")
    if (
        build.status == BuildStatus.failed
        and build.finished_at is not None
        and as_utc(build.finished_at) >= as_utc(launch.created_at)
    ):
        return Decision.failed  # it failed while this launch was waiting for it
    if build.status == BuildStatus.building:
        heartbeat = as_utc(build.heartbeat_at) if build.heartbeat_at else now - 2 * STALE_AFTER
        if heartbeat >= now - STALE_AFTER or not _claim(db, build, now):
            return _waiting(uow, launch, now, Decision.wait, "Waiting for a build already running")
        log.warning("build %s lost its worker; building again", name)
        return _waiting(
            uow, launch, now, Decision.start, "The previous build stopped; building again"
        )
    if _claim(db, build, now):
        return _waiting(uow, launch, now, Decision.start, "Building the environment")
    return _waiting(uow, launch, now, Decision.wait, "Waiting for a build already running")


def _ready(uow: UnitOfWork, launch: Launch, now: datetime, message: str) -> Decision:
    if not has_event(uow.db, launch.id, Phase.built):
        transitions.note(uow, launch, Phase.built, message, now=now)
    return Decision.ready


def _waiting(
    uow: UnitOfWork, launch: Launch, now: datetime, decision: Decision, message: str
) -> Decision:
    # Polling a running build must not repeat the same line on every look.
    if decision == Decision.start or not has_event(uow.db, launch.id, Phase.building):
        transitions.note(uow, launch, Phase.building, message, now=now)
    return decision


def failure_message(build: Build | None) -> str:
    tail = (build.log_tail or "").strip() if build else ""
    return "The environment could not be built." + (
        f" The build ended with:\n{tail}" if tail else ""
    )


def run_build(
    units: Units, builder: Builder, name: str, *, clock: Callable[[], datetime]
) -> list[str]:
    """Build ``name`` if its row says a build is owed; the launches waiting for it are sent on
    (after the commit). Returns their ids."""
    with units.begin() as uow:
        build = uow.db.get(Build, name)
        if build is None or build.status != BuildStatus.building:
            return []
        repo, commit = build.repo, build.commit
    relay = _LogRelay(units, name, clock)
    started = time.monotonic()
    try:
        with (
            every(HEARTBEAT_SECONDS, lambda: _heartbeat(units, name, clock)),
            every(LOG_FLUSH_SECONDS, relay.flush),
        ):
            try:
                size = builder.build(name, repo, commit, relay.line)
            finally:
                relay.flush()
    except BuildFailed as e:
        log.warning("build %s failed: %s", name, e.message)
        _finish_failed(units, name, f"{e.message}\n{e.tail}".strip(), clock, started)
        return []
    except Exception:
        log.exception("build %s: unexpected error", name)
        _finish_failed(units, name, "internal error while building", clock, started)
        return []
    now = clock()
    with units.begin() as uow:
        uow.db.execute(
            bulk_update(Build)
            .where(Build.name == name)
            .values(
                status=BuildStatus.built,
                size_bytes=size,
                finished_at=now,
                last_used_at=now,
                heartbeat_at=now,
            )
        )
        waiting = list(uow.db.scalars(_waiting_launches(name)))
        for launch in waiting:
            transitions.note(uow, launch, Phase.built, "Built the environment", now=now)
            uow.send(launch_message(launch.id))
        _count_build(uow, "built", started)
    return [launch.id for launch in waiting]


def _waiting_launches(name: str) -> Any:
    return select(Launch).where(
        Launch.env_name == name, Launch.status == Status.building, Launch.user_removed_at.is_(None)
    )


def _count_build(uow: UnitOfWork, result: str, started: float) -> None:
    uow.observe(observation("hublaunch_builds", result=result))
    seconds = time.monotonic() - started
    uow.observe(observation("hublaunch_build_seconds", seconds, result=result))


def _finish_failed(
    units: Units, name: str, tail: str, clock: Callable[[], datetime], started: float
) -> None:
    now = clock()
    tail = printable("\n".join(tail.splitlines()[-40:]))
    with units.begin() as uow:
        uow.db.execute(
            bulk_update(Build)
            .where(Build.name == name)
            .values(status=BuildStatus.failed, log_tail=tail, finished_at=now)
        )
        message = failure_message(uow.db.get(Build, name))
        _count_build(uow, "failed", started)
        for launch in uow.db.scalars(_waiting_launches(name)):
            # Nothing exists on the Hub yet: builds come before the Hub user.
            transitions.mark_failed(
                uow,
                launch,
                message,
                reason=transitions.FailReason.build_failed,
                now=now,
                user_removed=True,
            )


def evict(units: Units, builder: Builder, budget: int, clock: Callable[[], datetime]) -> list[str]:
    """Remove least recently used environments no live session uses, until under budget."""
    sizes = builder.sizes()
    total = sum(sizes.values())
    if total <= budget:
        return []
    evicted = []
    with units.begin() as uow:
        in_use = set(
            uow.db.scalars(
                select(Launch.env_name).where(
                    Launch.user_removed_at.is_(None), Launch.env_name.is_not(None)
                )
            )
        )
        candidates = uow.db.scalars(
            select(Build)
            .where(Build.status == BuildStatus.built)
            .order_by(Build.last_used_at.asc().nulls_first())
        )
        for build in candidates:
            if total <= budget:
                break
            if build.name in in_use or build.name not in sizes:
                continue
            total -= builder.remove(build.name)
            build.status = BuildStatus.evicted
            build.finished_at = clock()
            evicted.append(build.name)
    for name in evicted:
        log.info("evicted environment %s (disk budget %d bytes)", name, budget)
    return evicted


def _heartbeat(units: Units, name: str, clock: Callable[[], datetime]) -> None:
    try:
        with units.begin() as uow:
            uow.db.execute(
                bulk_update(Build)
                .where(Build.name == name, Build.status == BuildStatus.building)
                .values(heartbeat_at=clock())
            )
    except Exception:  # a missed heartbeat only risks a duplicate build
        log.exception("build %s: heartbeat failed", name)


class _LogRelay:
    """Build output becomes `building` events of every launch waiting for this build."""

    def __init__(self, units: Units, name: str, clock: Callable[[], datetime]) -> None:
        self._units, self._name, self._clock = units, name, clock
        self._lines: list[str] = []
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        with self._lock:
            self._lines.append(text[:2000])

    def flush(self) -> None:
        with self._lock:
            lines, self._lines = self._lines, []
        if not lines:
            return
        try:
            with self._units.begin() as uow:
                now = self._clock()
                for launch in uow.db.scalars(_waiting_launches(self._name)):
                    for text in lines:
                        transitions.note(uow, launch, Phase.building, text, now=now)
        except Exception:
            log.exception("build %s: could not record build output", self._name)
