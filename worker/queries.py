"""Reading launches and their events (writes belong to ``worker.transitions``)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.models import Launch, LaunchEvent, Phase


def get_launch(db: Session, launch_id: str) -> Launch | None:
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
