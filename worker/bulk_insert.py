"""New launches and their first events, many at once, in as few statements as the database allows.

The intake writes launches in batches (``api.group_commit``); what a batch costs beyond its rows
is fixed per statement. On PostgreSQL one statement writes both tables from arrays (``unnest``),
one round trip and no per-row work in Python: the ORM's bulk insert (two ``executemany`` in
psycopg's pipeline mode) cost about twice the CPU for a batch of 4 to 16. SQLite's executemany
runs in C, so it keeps the ORM's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from worker.models import Launch, LaunchEvent, Phase, Status


@dataclass(frozen=True)
class NewRow:
    """One new launch, ``queued``, with its first event's message."""

    id: str
    spec: dict[str, Any]
    spec_key: str
    lifetime: int
    deadline_at: datetime
    message: str
    pool_key: str | None = None
    client: str | None = None


# The events' foreign key is checked at the end of the statement, when both tables are written.
_POSTGRESQL = """
WITH new_launch AS (
    INSERT INTO launches
        (id, status, spec, spec_key, lifetime, created_at, updated_at, deadline_at, pool_key,
         client)
    SELECT id, %(status)s, spec, spec_key, lifetime, %(now)s, %(now)s, deadline_at, pool_key,
           client
    FROM unnest(%(id)s::varchar[], %(spec)s::json[], %(spec_key)s::varchar[],
                %(lifetime)s::int[], %(deadline_at)s::timestamptz[], %(pool_key)s::varchar[],
                %(client)s::varchar[])
        AS t(id, spec, spec_key, lifetime, deadline_at, pool_key, client)
)
INSERT INTO launch_events (launch_id, phase, message, created_at)
SELECT id, %(phase)s, message, %(now)s
FROM unnest(%(id)s::varchar[], %(message)s::text[]) AS t(id, message)
"""


def insert_new(db: Session, rows: Sequence[NewRow], now: datetime) -> None:
    if db.get_bind().dialect.name == "postgresql":
        # Straight to the driver (no type processing), through SQLAlchemy's connection so its
        # errors are SQLAlchemy's and a dropped connection is invalidated.
        db.connection().exec_driver_sql(
            _POSTGRESQL,
            {
                "status": Status.queued.value,
                "phase": Phase.waiting.value,
                "now": now,
                "id": [row.id for row in rows],
                "spec": [json.dumps(row.spec) for row in rows],
                "spec_key": [row.spec_key for row in rows],
                "lifetime": [row.lifetime for row in rows],
                "deadline_at": [row.deadline_at for row in rows],
                "message": [row.message for row in rows],
                "pool_key": [row.pool_key for row in rows],
                "client": [row.client for row in rows],
            },
        )
        return
    db.execute(
        insert(Launch),
        [
            {
                "id": row.id,
                "status": Status.queued,
                "spec": row.spec,
                "spec_key": row.spec_key,
                "lifetime": row.lifetime,
                "created_at": now,
                "updated_at": now,
                "deadline_at": row.deadline_at,
                "pool_key": row.pool_key,
                "client": row.client,
            }
            for row in rows
        ],
    )
    db.execute(
        insert(LaunchEvent),
        [
            {"launch_id": row.id, "phase": Phase.waiting, "message": row.message, "created_at": now}
            for row in rows
        ],
    )
