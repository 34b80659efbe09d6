"""Request dependencies: settings, a read-only session, and the units of work for writes.

The ones that only read app state are ``async``: FastAPI runs a plain function dependency in
the thread pool, a hop that cost more than the rest of some requests (bench.intake_rate)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.group_commit import LaunchWriter
from worker.db import reading
from worker.settings import Settings
from worker.unit_of_work import Units


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_units(request: Request) -> Units:
    units: Units = request.app.state.units
    return units


async def get_writer(request: Request) -> LaunchWriter:
    writer: LaunchWriter = request.app.state.writer
    return writer


def get_db(settings: Annotated[Settings, Depends(get_settings)]) -> Iterator[Session]:
    with reading(settings.database_url) as db:
        yield db


SettingsDep = Annotated[Settings, Depends(get_settings)]
UnitsDep = Annotated[Units, Depends(get_units)]
WriterDep = Annotated[LaunchWriter, Depends(get_writer)]
# Reads only: handlers that change something go through ``api.intake`` and a unit of work.
DbDep = Annotated[Session, Depends(get_db)]
