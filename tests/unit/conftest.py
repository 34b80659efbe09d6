from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import create_engine, text

from tests.fakes import FakeHub, RecordingBroker
from worker.context import WorkerContext
from worker.db import dispose_all
from worker.migrate import upgrade
from worker.settings import Settings
from worker.unit_of_work import Units

# A server that trusts local connections; each session makes a database of its own there.
PG_SERVER_URL = os.environ.get(
    "HUBLAUNCH_UNIT_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
# Every table the migrations make except alembic_version, emptied between tests.
TABLES = ("launch_events", "launches", "builds", "hub_health")


class Clock:
    """Time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this session, dropped at its end. A server
    that does not answer fails the tests that need it: they are never skipped."""
    try:
        admin = create_engine(PG_SERVER_URL, isolation_level="AUTOCOMMIT")
        admin.connect().close()
    except Exception as e:
        pytest.fail(f"PostgreSQL must answer at {PG_SERVER_URL}: {e}", pytrace=False)
    name = f"hublaunch_unit_{secrets.token_hex(4)}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_SERVER_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        dispose_all()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each database test runs on both backends: SQLite (a new file per test) and PostgreSQL
    (one database per session, emptied before each test)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'unit.sqlite'}"
        upgrade(url)
    else:
        url = request.getfixturevalue("postgres_url")
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
        engine.dispose()
    yield url
    dispose_all()


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        secret_key=Fernet.generate_key().decode(),
        public_url="http://127.0.0.1:9999",
        launch_timeout=60,
        broker_url="memory://",
        # The derived cap depends on the machine; tests of the waiting line set their own.
        max_active=1000,
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def hub() -> FakeHub:
    return FakeHub()


@pytest.fixture
def broker(settings: Settings) -> RecordingBroker:
    return RecordingBroker(settings.database_url)


@pytest.fixture
def ctx(settings: Settings, hub: FakeHub, clock: Clock, broker: RecordingBroker) -> WorkerContext:
    notified: list[str] = []
    context = WorkerContext(
        settings=settings,
        hub=hub,  # type: ignore[arg-type]
        cipher=Fernet(settings.secret_key.get_secret_value().encode()),
        units=Units(settings.database_url, broker, notified.append),
        clock=clock,
    )
    context.notified = notified  # type: ignore[attr-defined]
    return context
