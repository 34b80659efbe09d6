"""Engines and transactions; engines are made lazily per process (not at import or across fork)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import CursorResult, Engine, Executable, Update, create_engine, event, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

_factories: dict[tuple[int, str, bool], sessionmaker[Session]] = {}


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def as_utc_or_none(value: datetime | None) -> datetime | None:
    return as_utc(value) if value is not None else None


def make_engine(url: str, *, ping: bool = True) -> Engine:
    """``ping``: test each connection as it leaves the pool (a round trip), so one that dropped
    while idle is replaced before use; without, its caller must retry a dropped connection."""
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"pool_pre_ping": ping}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    engine = create_engine(url, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while a worker writes; foreign keys are off by default in SQLite.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def session_factory(url: str, *, ping: bool = True) -> sessionmaker[Session]:
    key = (os.getpid(), url, ping)
    factory = _factories.get(key)
    if factory is None:
        factory = sessionmaker(make_engine(url, ping=ping), expire_on_commit=False)
        _factories[key] = factory
    return factory


@contextmanager
def reading(url: str) -> Iterator[Session]:
    """A session for reads only: whatever it did is rolled back (writes go through a unit of
    work, ``worker.unit_of_work``, the one place that commits)."""
    db = session_factory(url)()
    try:
        yield db
    finally:
        db.rollback()
        db.close()


@contextmanager
def session_scope(url: str, *, one_statement: bool = False) -> Iterator[Session]:
    """One transaction: commit on success, roll back on error. The service writes through a
    unit of work (``worker.unit_of_work``), which wraps this and adds the outbox; tests and bench
    scripts use it directly to set up rows.

    ``one_statement``: the caller writes with a single statement (atomic by itself) and retries
    a dropped connection itself. On PostgreSQL the statement then runs in autocommit, one round
    trip instead of three (BEGIN, the statement, COMMIT), on a connection not pinged first.
    """
    db = session_factory(url, ping=not one_statement)()
    if one_statement and make_url(url).get_backend_name() == "postgresql":
        db.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
    try:
        yield db
        db.commit()
    except BaseException:
        db.rollback()
        raise
    finally:
        db.close()


def dispose_all() -> None:
    for key, factory in list(_factories.items()):
        if key[0] == os.getpid():
            factory.kw["bind"].dispose()
        del _factories[key]


def bulk_update(model: type[Any]) -> Update:
    """UPDATE without syncing objects in the session: callers re-read what they need, and the
    in-Python evaluation would compare SQLite's naive datetimes with aware ones."""
    return update(model).execution_options(synchronize_session=False)


def rowcount(db: Session, statement: Executable) -> int:
    """Execute an INSERT/UPDATE/DELETE and return how many rows it matched: the conditional
    writes decide who won a race by this count."""
    result = db.execute(statement)
    if not isinstance(result, CursorResult):
        raise TypeError(f"{type(statement).__name__} returns rows, not a row count")
    return result.rowcount
