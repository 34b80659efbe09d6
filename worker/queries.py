"""Reading launches and their events (writes belong to ``worker.transitions``)."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import ColumnElement, and_, case, func, or_, select
from sqlalchemy.orm import Session

from worker.db import as_utc
from worker.models import TERMINAL, Launch, LaunchEvent, Phase, Status


def get_launch(db: Session, launch_id: str) -> Launch | None:
    # Ids come from URLs: one that no launch can have (a NUL byte, which PostgreSQL refuses in
    # text, or anything else) is simply not found, without asking the database.
    if not LAUNCH_ID_RE.fullmatch(launch_id):
        return None
    return db.scalars(select(Launch).where(Launch.id == launch_id)).one_or_none()


def events_after(db: Session, launch_id: str, after_id: int = 0) -> list[LaunchEvent]:
    stmt = (
        select(LaunchEvent)
        .where(LaunchEvent.launch_id == launch_id, LaunchEvent.id > after_id)
        .order_by(LaunchEvent.id)
    )
    return list(db.scalars(stmt))


def has_event(db: Session, launch_id: str, phase: Phase) -> bool:
    found = select(LaunchEvent.id).where(
        LaunchEvent.launch_id == launch_id, LaunchEvent.phase == phase
    )
    return db.scalars(found.limit(1)).first() is not None


def last_problem(db: Session, launch_id: str) -> str | None:
    """The last Hub problem a retrying launch recorded (told to the visitor if it times out)."""
    problems = [
        e.data["problem"] for e in events_after(db, launch_id) if e.data and "problem" in e.data
    ]
    return problems[-1] if problems else None


# --- The admin API's reads -------------------------------------------------------------------

# Sessions by spec in the summary: the most frequent ones, the rest counted together.
TOP_SPECS = 20
# Time-to-ready percentiles are computed in Python over at most this many of the window's most
# recent ready launches (a bounded read, the same on SQLite and PostgreSQL, which has
# percentile_cont but SQLite has nothing like it).
READY_SAMPLE = 10_000


# What launch ids are made of (``secrets.token_urlsafe``), within the column's 32 characters.
LAUNCH_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")


class BadCursor(ValueError):
    """A ``before`` cursor this module did not make (or one that was tampered with)."""


@dataclass(frozen=True)
class Cursor:
    """Where a page of the admin listing stops: the last row's creation time and id (newest
    first, the id breaking ties). Sent to clients as an opaque string."""

    created_at: datetime
    id: str

    def encode(self) -> str:
        micros = (as_utc(self.created_at) - _EPOCH) // timedelta(microseconds=1)
        raw = json.dumps([micros, self.id], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            micros, launch_id = json.loads(raw)
            if not isinstance(micros, int) or isinstance(micros, bool):
                raise TypeError("time")
            if not isinstance(launch_id, str) or not LAUNCH_ID_RE.fullmatch(launch_id):
                raise TypeError("id")
            return cls(_EPOCH + timedelta(microseconds=micros), launch_id)
        except (ValueError, TypeError, OverflowError) as e:  # binascii.Error is a ValueError
            raise BadCursor("not a cursor of this listing") from e


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _spec_part(key: str) -> ColumnElement[str]:
    """A top-level string of the launch's JSON spec (``image``, ``repo``, ``ref``): JSON_EXTRACT
    on SQLite, ``->>`` on PostgreSQL."""
    part: ColumnElement[str] = Launch.spec[key].as_string()
    return part


def list_launches(
    db: Session,
    *,
    statuses: Collection[Status] = (),
    spec: str | None = None,
    limit: int = 50,
    before: Cursor | None = None,
) -> tuple[list[Launch], Cursor | None]:
    """Launches newest first: those with one of ``statuses`` (any when empty), whose image or
    repository URL is exactly ``spec`` (any when None), older than ``before``. Returns the page
    and the cursor of the next one (None on the last page)."""
    stmt = select(Launch)
    if statuses:
        stmt = stmt.where(Launch.status.in_(list(statuses)))
    if spec is not None:
        stmt = stmt.where(or_(_spec_part("image") == spec, _spec_part("repo") == spec))
    if before is not None:
        # Stored timestamps are UTC on both backends (SQLite keeps their UTC text); the id
        # orders launches created in the same microsecond.
        at = as_utc(before.created_at)
        stmt = stmt.where(
            or_(Launch.created_at < at, and_(Launch.created_at == at, Launch.id < before.id))
        )
    stmt = stmt.order_by(Launch.created_at.desc(), Launch.id.desc()).limit(limit + 1)
    rows = list(db.scalars(stmt))
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, Cursor(as_utc(rows[-1].created_at), rows[-1].id)


@dataclass(frozen=True)
class SpecCount:
    spec: str
    count: int


@dataclass(frozen=True)
class Summary:
    """What happened over ``window`` seconds up to ``now``, and what is running now."""

    now: datetime
    window: int
    active: int
    active_by_spec: list[SpecCount]
    launches: int
    finished: int
    failed: int
    ready: int
    time_to_ready: list[float] = field(repr=False)

    @property
    def launches_per_minute(self) -> float:
        return self.launches / (self.window / 60)

    @property
    def failure_rate(self) -> float | None:
        return self.failed / self.finished if self.finished else None

    def time_to_ready_percentile(self, p: float) -> float | None:
        return percentile(self.time_to_ready, p)


def percentile(values: Sequence[float], p: float) -> float | None:
    """The ``p``-th percentile (0..100) with linear interpolation between the closest ranks
    (what PostgreSQL's percentile_cont computes); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def spec_label(image: str | None, repo: str | None, ref: str | None) -> str:
    if image is not None:
        return image
    return f"{repo}@{ref}" if ref else str(repo)


def summary(db: Session, *, now: datetime, window: int) -> Summary:
    """Figures over the ``window`` seconds up to ``now`` (both backends, plain SQL): ready
    sessions by spec, launches created, launches finished and failed, time-to-ready samples."""
    now = as_utc(now)
    since = now - timedelta(seconds=window)
    count = func.count(Launch.id)
    image, repo, ref = _spec_part("image"), _spec_part("repo"), _spec_part("ref")
    ready_now = Launch.status == Status.ready
    active = db.scalar(select(count).where(ready_now)) or 0
    by_spec = db.execute(
        select(image, repo, ref, count.label("n"))
        .where(ready_now)
        .group_by(image, repo, ref)
        # NULLs sort differently on the two backends: order by what is never NULL.
        .order_by(count.desc(), func.coalesce(image, repo, ""), func.coalesce(ref, ""))
        .limit(TOP_SPECS)
    ).all()
    top = [SpecCount(spec_label(i, r, f), n) for i, r, f, n in by_spec]
    other = active - sum(s.count for s in top)
    if other > 0:
        top.append(SpecCount("other", other))

    launches = db.scalar(select(count).where(Launch.created_at >= since, Launch.created_at <= now))
    finished_in_window = and_(
        Launch.status.in_(list(TERMINAL)), Launch.ended_at >= since, Launch.ended_at <= now
    )
    finished, failed = db.execute(
        select(count, func.count(case((Launch.status == Status.failed, 1)))).where(
            finished_in_window
        )
    ).one()
    ready_rows = db.execute(
        select(Launch.created_at, Launch.ready_at)
        .where(Launch.ready_at >= since, Launch.ready_at <= now)
        .order_by(Launch.ready_at.desc())
        .limit(READY_SAMPLE)
    ).all()
    durations = [
        (as_utc(ready_at) - as_utc(created_at)).total_seconds()
        for created_at, ready_at in ready_rows
        if ready_at is not None
    ]
    return Summary(
        now=now,
        window=window,
        active=active,
        active_by_spec=top,
        launches=launches or 0,
        finished=finished or 0,
        failed=failed or 0,
        ready=len(durations),
        time_to_ready=durations,
    )


def pool_counts(db: Session) -> dict[str, dict[str, int]]:
    """Warm-pool servers by pool key: ``starting`` (still launching) and ``ready`` (pooled),
    not counting those being drained."""
    rows = db.execute(
        select(Launch.pool_key, Launch.status, func.count())
        .where(
            Launch.pool_key.is_not(None),
            Launch.user_removed_at.is_(None),
            Launch.end_requested_at.is_(None),
            Launch.status.in_((Status.queued, Status.building, Status.launching, Status.pooled)),
        )
        .group_by(Launch.pool_key, Launch.status)
    ).all()
    counts: dict[str, dict[str, int]] = {}
    for key, state, count in rows:
        entry = counts.setdefault(str(key), {"starting": 0, "ready": 0})
        entry["ready" if state == Status.pooled else "starting"] += int(count)
    return counts
