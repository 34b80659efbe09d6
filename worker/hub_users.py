"""Removing a Hub user: stop every server, wait out slow stops, then delete the user."""

from __future__ import annotations

import time
from typing import Protocol

from worker.hub_client import HubRequestError, HubUser

# How often a removal re-reads a server that the Hub is still stopping.
STOP_POLL_SECONDS = 0.25
# How long one removal waits for servers to stop before handing over to a later attempt.
STOP_WAIT_SECONDS = 20.0


class UserHub(Protocol):
    """The part of ``HubClient`` a removal uses (the unit tests' in-memory Hub has it too)."""

    def get_user(self, name: str) -> HubUser | None: ...
    def stop_server(self, name: str, server_name: str = "") -> bool: ...
    def delete_user(self, name: str) -> bool: ...


def remove_hub_user(
    hub: UserHub, name: str, *, wait: float = 0.0, known: HubUser | None = None
) -> bool:
    """Stop every server of the user (named ones too), then delete the user.

    Returns False while a server is still stopping after ``wait`` seconds: the Hub answers a
    slow stop with 202 and refuses to delete a user whose server is stopping, so the caller
    tries again later. A user that is already gone counts as removed. ``known`` is the user as a
    listing just read it (saves a request per user in a cleanup pass).
    """
    deadline = time.monotonic() + wait
    user = known or hub.get_user(name)
    if user is None:
        return True
    pending = [server for server in user.servers if not hub.stop_server(name, server)]
    while True:
        if not pending:
            try:
                hub.delete_user(name)
                return True
            except HubRequestError as e:
                if e.status != 400:  # 400: "in the process of stopping, please wait"
                    raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(STOP_POLL_SECONDS)
        user = hub.get_user(name)
        if user is None:
            return True
        pending = [server for server, state in user.servers.items() if state.pending == "stop"]
