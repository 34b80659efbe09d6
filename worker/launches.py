"""Launch records: create, look up, read events, request an end.

Domain functions take a database session, add/flush and return; the caller commits.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.db import bulk_update, utcnow
from worker.models import TERMINAL, Launch, LaunchEvent, Phase, Status


def new_launch_id() -> str:
    return secrets.token_urlsafe(16)  # 128 bits: the capability to watch and end a launch


def new_hub_user_name(prefix: str) -> str:
    # Hub names are case-insensitive; hex keeps them lower-case and URL-safe. 64 bits of entropy.
    return f"{prefix}{secrets.token_hex(8)}"


def describe_spec(spec: dict[str, Any]) -> str:
    if "image" in spec:
        return f"image {spec['image']}"
    return f"{spec['repo']}@{spec.get('ref', 'HEAD')}"


def printable(text: str) -> str:
    """Text from a build's output as the database can store it: PostgreSQL refuses NUL in text,
    and a repository decides what its build prints."""
    return text.replace("\x00", "\ufffd")


def record_event(
    db: Session,
    launch: Launch,
    phase: Phase,
    message: str,
    *,
    data: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> LaunchEvent:
    event = LaunchEvent(
        launch_id=launch.id,
        phase=phase,
        message=printable(message),
        data=data,
        created_at=now or utcnow(),
    )
    db.add(event)
    return event


def create_launch(
    db: Session,
    spec: dict[str, Any],
    *,
    lifetime: int,
    timeout: int = 600,
    now: datetime | None = None,
) -> Launch:
    now = now or utcnow()
    launch = Launch(
        id=new_launch_id(),
        status=Status.queued,
        spec=spec,
        lifetime=lifetime,
        created_at=now,
        updated_at=now,
        deadline_at=now + timedelta(seconds=timeout),
    )
    db.add(launch)
    db.flush()
    record_event(db, launch, Phase.waiting, f"Launch of {describe_spec(spec)} queued", now=now)
    db.flush()
    return launch


def get_launch(db: Session, launch_id: str) -> Launch | None:
    return db.scalars(select(Launch).where(Launch.id == launch_id)).one_or_none()


def events_after(db: Session, launch_id: str, after_id: int = 0) -> list[LaunchEvent]:
    stmt = (
        select(LaunchEvent)
        .where(LaunchEvent.launch_id == launch_id, LaunchEvent.id > after_id)
        .order_by(LaunchEvent.id)
    )
    return list(db.scalars(stmt))


def request_end(db: Session, launch: Launch, *, now: datetime | None = None) -> bool:
    """Mark the launch as to be ended by its owner. True when the caller must send a teardown.

    The flag is set with one UPDATE, then the status is re-read: a launch task that is still
    running sees the flag (its final "ready" UPDATE is conditional on it) and tears down itself;
    otherwise nothing else is running for this launch and the caller sends the teardown task.
    """
    now = now or utcnow()
    db.execute(
        bulk_update(Launch)
        .where(Launch.id == launch.id, Launch.end_requested_at.is_(None))
        .values(end_requested_at=now, updated_at=now)
    )
    db.flush()
    db.refresh(launch)
    if launch.user_removed_at is not None and launch.status in TERMINAL:
        return False
    return launch.status in (Status.ready, Status.failed, Status.ended)
