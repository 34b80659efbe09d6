from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from tests.fakes import FakeHub, RecordingBroker
from worker.context import WorkerContext
from worker.db import dispose_all
from worker.migrate import upgrade
from worker.settings import Settings
from worker.unit_of_work import Units


class Clock:
    """Time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    url = f"sqlite:///{tmp_path / 'unit.sqlite'}"
    upgrade(url)
    yield Settings(
        database_url=url,
        secret_key=Fernet.generate_key().decode(),
        public_url="http://127.0.0.1:9999",
        launch_timeout=60,
        broker_url="memory://",
    )
    dispose_all()


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
