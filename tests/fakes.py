"""In-memory stand-ins for the Hub and the broker, for unit tests of the domain only."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from worker import transitions
from worker.broker import BUILD_TASK, POOL_TASK, Message, QueueUnavailable
from worker.db import session_scope, utcnow
from worker.hub_client import (
    HubNotFound,
    HubRequestError,
    HubSpawnFailed,
    HubUnavailable,
    HubUser,
    ServerState,
)
from worker.models import Build, Launch
from worker.unit_of_work import UnitOfWork


@dataclass
class FakeHub:
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    name: str = "default"  # the Hub's name (worker/hubs.py), as HubClient has it
    calls: list[tuple[str, str]] = field(default_factory=list)
    # Set to make the next N calls fail as if the Hub were down.
    down_for: int = 0
    known_images: tuple[str, ...] = ("default",)
    start_pending: bool = False
    stop_pending_rounds: int = 0
    tokens: dict[str, str] = field(default_factory=dict)
    on_call: Callable[[str, str], None] | None = None

    def _call(self, what: str, name: str) -> None:
        self.calls.append((what, name))
        if self.on_call:
            self.on_call(what, name)
        if self.down_for:
            self.down_for -= 1
            raise HubUnavailable("Hub unreachable: ConnectError")

    def create_user(self, name: str) -> bool:
        self._call("create_user", name)
        if name in self.users:
            return False
        self.users[name] = {"servers": {}}
        return True

    def get_user(self, name: str) -> HubUser | None:
        self._call("get_user", name)
        user = self.users.get(name)
        if user is None:
            return None
        for s, state in list(user["servers"].items()):
            if state == "stopping" and not self.stop_pending_rounds:
                del user["servers"][s]
        if self.stop_pending_rounds:
            self.stop_pending_rounds -= 1
        servers = {
            s: ServerState(
                ready=state == "ready",
                pending="stop" if state == "stopping" else None,
                url=None,
                last_activity=None,
            )
            for s, state in user["servers"].items()
        }
        return HubUser(name=name, admin=False, servers=servers, last_activity=None)

    def start_server(self, name: str, user_options: dict[str, Any]) -> bool:
        self._call("start_server", name)
        if name not in self.users:
            raise HubNotFound("Hub answered 404", status=404)
        if user_options["image"] not in self.known_images:
            raise HubRequestError(
                "Hub answered 400", status=400, detail=f"Unknown image {user_options['image']!r}"
            )
        self.users[name]["servers"][""] = "pending" if self.start_pending else "ready"
        return not self.start_pending

    def wait_ready(
        self, name: str, *, timeout: float, on_progress: Callable[[str], None] | None = None
    ) -> str:
        self._call("wait_ready", name)
        if on_progress:
            on_progress("Server requested")
        if self.users[name]["servers"].get("") == "broken":
            raise HubSpawnFailed("progress: Spawn failed: boom", detail="Spawn failed: boom")
        self.users[name]["servers"][""] = "ready"
        return f"/user/{name}/"

    def create_token(self, name: str, *, scopes: list[str], expires_in: int, note: str) -> str:
        self._call("create_token", name)
        token = secrets.token_hex(16)
        self.tokens[token] = name
        return token

    def stop_server(self, name: str, server_name: str = "") -> bool:
        self._call("stop_server", name)
        if (
            self.stop_pending_rounds
            and server_name in self.users.get(name, {"servers": {}})["servers"]
        ):
            self.users[name]["servers"][server_name] = "stopping"
            return False
        self.users.get(name, {"servers": {}})["servers"].pop(server_name, None)
        return True

    def delete_user(self, name: str) -> bool:
        self._call("delete_user", name)
        if name not in self.users:
            return False
        if self.users[name]["servers"]:
            raise HubRequestError("Hub answered 400", status=400, detail="still stopping")
        del self.users[name]
        return True


class RecordingBroker:
    """Records the messages it is given instead of queueing them, and checks what the real
    queue relies on: each names a row that is already committed (read on a connection of its
    own, which cannot see an open transaction)."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.sent: list[Message] = []
        self.down = False

    def send(self, message: Message) -> None:
        if self.down:
            raise QueueUnavailable("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        model: type[Launch] | type[Build] = Build if message.task == BUILD_TASK else Launch
        with session_scope(self.database_url) as db:
            if message.task != POOL_TASK and db.get(model, message.argument) is None:
                raise AssertionError(f"{message.task} sent for {message.argument}, not committed")
        self.sent.append(message)

    def send_many(self, messages: Sequence[Message]) -> None:
        for message in messages:
            self.send(message)

    def arguments(self, task: str) -> list[str]:
        return [m.argument for m in self.sent if m.task == task]


def insert_launch(
    db: Session,
    spec: dict[str, Any],
    *,
    lifetime: int,
    now: datetime | None = None,
    timeout: int = 600,
) -> Launch:
    """A queued launch written as the intake writes it, in the caller's own transaction (test
    set-up: nothing is sent)."""
    uow = UnitOfWork(db)
    return transitions.create(uow, spec, lifetime=lifetime, timeout=timeout, now=now or utcnow())
