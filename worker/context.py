"""What the worker's steps need, built once per worker process from its settings."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography.fernet import Fernet

from worker import sources
from worker.broker import make_broker
from worker.builders import Builder, make_builder
from worker.crypto import cipher
from worker.db import as_utc, utcnow
from worker.hub_client import HubClient
from worker.hubs import hubs
from worker.metrics import Recorder
from worker.models import Launch
from worker.notify import Notifier, redis_url
from worker.repos import RepoSpec
from worker.settings import Settings, get_settings
from worker.unit_of_work import Units


class NoBuilder(Exception):
    """A repository launch reached a worker configured without a builder."""


@dataclass
class WorkerContext:
    settings: Settings
    # The first Hub's client; with several Hubs (worker/hubs.py) ``hubs`` holds each by name.
    hub: HubClient
    cipher: Fernet
    # Transactions, and the messages and doorbells that go out after they commit.
    units: Units
    clock: Callable[[], datetime] = field(default=utcnow)
    builder: Builder | None = None
    resolve: Callable[[RepoSpec, Settings], str] = sources.resolve
    hubs: dict[str, HubClient] = field(default_factory=dict)

    def hub_for(self, name: str | None) -> HubClient:
        """The client of the Hub a launch is on (``None``: the first, as for older rows)."""
        if name is None or not self.hubs:
            return self.hub
        return self.hubs.get(name, self.hub)

    def all_hubs(self) -> dict[str, HubClient]:
        return self.hubs or {self.hub.name: self.hub}

    def deadline(self, launch: Launch) -> datetime:
        if launch.deadline_at is not None:
            return as_utc(launch.deadline_at)
        return as_utc(launch.created_at) + timedelta(seconds=self.settings.launch_timeout)

    def need_builder(self) -> Builder:
        if self.builder is None:
            raise NoBuilder("repository launches need a builder (HUBLAUNCH_BUILDER)")
        return self.builder


def build_context(settings: Settings) -> WorkerContext:
    # Hub requests are counted as they happen and added to Redis with the next commit.
    recorder = Recorder(redis_url(settings), settings.queue)
    configured = hubs(settings)
    if len(configured) > 1 and not all(hub.api_token for hub in configured):
        raise ValueError("HUBLAUNCH_HUBS: the worker needs each Hub's api_token")
    clients = {
        hub.name: HubClient(
            hub.api_url,
            hub.api_token,
            timeout=settings.hub_request_timeout,
            observe=recorder.add,
            name=hub.name,
        )
        for hub in configured
    }
    units = Units(
        settings.database_url,
        make_broker(settings),
        Notifier(settings).publish,
        recorder=recorder,
    )
    return WorkerContext(
        settings=settings,
        hub=next(iter(clients.values())),
        hubs=clients,
        cipher=cipher(settings),
        units=units,
        builder=make_builder(settings),
    )


@functools.cache
def _context(pid: int) -> WorkerContext:
    return build_context(get_settings())


def worker_context() -> WorkerContext:
    # Keyed by pid: a forked child never reuses its parent's sockets.
    return _context(os.getpid())
