"""Send tasks by name. Call these only after the rows they name are committed."""

from __future__ import annotations

LAUNCH_TASK = "hublaunch.launch"
TEARDOWN_TASK = "hublaunch.teardown"
CULL_TASK = "hublaunch.cull"


class QueueUnavailable(Exception):
    """The broker did not take the message."""


def _send(name: str, launch_id: str, countdown: float | None = None) -> None:
    from kombu.exceptions import OperationalError

    from worker.celery_app import app

    try:
        app.send_task(name, args=[launch_id], countdown=countdown, retry=False)
    except (OperationalError, ConnectionError, OSError) as e:
        raise QueueUnavailable(str(e)) from e


def send_launch(launch_id: str) -> None:
    _send(LAUNCH_TASK, launch_id)


def send_teardown(launch_id: str, *, countdown: float | None = None) -> None:
    _send(TEARDOWN_TASK, launch_id, countdown)
