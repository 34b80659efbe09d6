"""Per-process resources for the tasks: the Hub client, the token cipher, the event notifier."""

from __future__ import annotations

import functools
import logging
import os

from worker.builders import make_builder
from worker.crypto import cipher
from worker.hub_client import HubClient
from worker.launcher import LaunchContext
from worker.notify import Notifier
from worker.settings import get_settings

log = logging.getLogger(__name__)


@functools.cache
def _context(pid: int) -> LaunchContext:
    settings = get_settings()
    hub = HubClient(
        settings.hub_api_url,
        settings.hub_api_token.get_secret_value(),
        timeout=settings.hub_request_timeout,
    )
    return LaunchContext(
        settings=settings,
        hub=hub,
        cipher=cipher(settings),
        notify=Notifier(settings).publish,
        builder=make_builder(settings),
    )


def launch_context() -> LaunchContext:
    # Keyed by pid: a forked child never reuses its parent's sockets.
    return _context(os.getpid())
