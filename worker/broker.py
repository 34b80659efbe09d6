"""Task messages and the broker that carries them.

Nothing here is called by hand: a unit of work (``worker.unit_of_work``) buffers the messages
its transaction asks for and gives them to a ``Broker`` after the commit.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from worker.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

LAUNCH_TASK = "hublaunch.launch"
TEARDOWN_TASK = "hublaunch.teardown"
CULL_TASK = "hublaunch.cull"
RECOVER_TASK = "hublaunch.recover"
BUILD_TASK = "hublaunch.build"


class QueueUnavailable(Exception):
    """The broker did not take the message."""


@dataclass(frozen=True)
class Message:
    """One task to send: its name, the id it acts on, and when to run it."""

    task: str
    argument: str
    countdown: float | None = None


def launch_message(launch_id: str) -> Message:
    return Message(LAUNCH_TASK, launch_id)


def teardown_message(launch_id: str, *, countdown: float | None = None) -> Message:
    return Message(TEARDOWN_TASK, launch_id, countdown)


def build_message(name: str) -> Message:
    return Message(BUILD_TASK, name)


class Broker(Protocol):
    def send(self, message: Message) -> None:
        """Hand the message to the queue, or raise ``QueueUnavailable``."""


class CeleryBroker:
    """Sends through a Celery app built from the settings it is given (not the process's
    environment), made on first use so building it connects to nothing."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._app: Celery | None = None
        self._lock = threading.Lock()

    def _celery(self) -> Celery:
        with self._lock:
            if self._app is None:
                from worker.celery_app import create_celery

                self._app = create_celery(self._settings)
            return self._app

    def send(self, message: Message) -> None:
        from kombu.exceptions import OperationalError

        # Builds have their own queue: a launch of a built spec never waits behind a build.
        queue = self._settings.build_queue if message.task == BUILD_TASK else None
        try:
            self._celery().send_task(
                message.task,
                args=[message.argument],
                countdown=message.countdown,
                retry=False,
                queue=queue,
            )
        except (OperationalError, ConnectionError, OSError) as e:
            raise QueueUnavailable(str(e)) from e


# -- abandoned /build launches (worker/abandon.py) ----------------------------------------------

ABANDON_TASK = "hublaunch.abandon"


def abandon_message(launch_id: str, *, countdown: float) -> Message:
    """End the launch after ``countdown`` s if no one watches it again by then."""
    return Message(ABANDON_TASK, launch_id, countdown)
