"""Migrations apply to empty databases and agree with the models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect

from worker.migrate import alembic_config, check, upgrade

pytestmark = pytest.mark.integration


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_database(
    request: pytest.FixtureRequest, make_database: Callable[[str], str], tmp_path: Path
) -> str:
    if request.param == "postgresql":
        return make_database("migrations")
    return f"sqlite:///{tmp_path / 'migrations.sqlite'}"


def test_upgrade_head_matches_the_models_and_downgrades(empty_database: str) -> None:
    upgrade(empty_database)
    check(empty_database)  # raises if autogenerate would find a difference

    engine = create_engine(empty_database)
    assert {"launches", "launch_events"} <= set(inspect(engine).get_table_names())
    command.downgrade(alembic_config(empty_database), "base")
    assert "launches" not in inspect(engine).get_table_names()
    upgrade(empty_database)
    engine.dispose()
