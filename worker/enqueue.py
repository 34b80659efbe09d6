"""Send tasks by name. Call these only after the rows they name are committed."""

from __future__ import annotations

LAUNCH_TASK = "hublaunch.launch"
TEARDOWN_TASK = "hublaunch.teardown"
CULL_TASK = "hublaunch.cull"
BUILD_TASK = "hublaunch.build"


class QueueUnavailable(Exception):
    """The broker did not take the message."""


def _send(
    name: str, argument: str, countdown: float | None = None, queue: str | None = None
) -> None:
    from kombu.exceptions import OperationalError

    from worker.celery_app import app

    try:
        app.send_task(name, args=[argument], countdown=countdown, retry=False, queue=queue)
    except (OperationalError, ConnectionError, OSError) as e:
        raise QueueUnavailable(str(e)) from e


def send_launch(launch_id: str) -> None:
    _send(LAUNCH_TASK, launch_id)


def send_teardown(launch_id: str, *, countdown: float | None = None) -> None:
    _send(TEARDOWN_TASK, launch_id, countdown)


def send_build(name: str) -> None:
    from worker.settings import get_settings

    # Builds have their own queue: a launch of a built spec never waits behind a build.
    _send(BUILD_TASK, name, queue=get_settings().build_queue)
