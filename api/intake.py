"""Accepting a launch: check the request, record it, and have it sent once it is committed.

Shared by the JSON API and the BinderHub-compatible /build stream; each maps ``Refused`` to its
own way of saying no (an HTTP status, or a ``failed`` event).
"""

from __future__ import annotations

import logging

from api.schemas import LaunchRequest
from worker import repos, transitions
from worker.broker import QueueUnavailable, launch_message, teardown_message
from worker.db import utcnow
from worker.models import Launch
from worker.queries import get_launch
from worker.settings import Settings
from worker.unit_of_work import Units

log = logging.getLogger(__name__)

QUEUE_DOWN = "The launch queue is unavailable; nothing was started. Try again shortly."
END_NOT_SENT = "The queue is unavailable; the end is recorded. Send DELETE again shortly."


class Refused(Exception):
    """The launch was not accepted; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def accept(units: Units, settings: Settings, body: LaunchRequest) -> Launch:
    spec = body.spec()
    if body.repo is not None:
        try:
            repo = repos.normalize(body.repo, body.ref, settings)
            repos.check_host(repo.url, settings)
        except repos.SpecBanned as e:
            raise Refused(403, str(e)) from e
        except repos.SpecError as e:
            raise Refused(422, str(e)) from e
        spec = repo.as_dict()
    lifetime = body.lifetime or settings.session_max_age
    if lifetime > settings.session_max_age:
        raise Refused(422, f"lifetime must be at most {settings.session_max_age} seconds")
    try:
        with units.begin() as uow:
            launch = transitions.create(
                uow, spec, lifetime=lifetime, timeout=settings.launch_timeout, now=utcnow()
            )
            uow.send(launch_message(launch.id))
    except QueueUnavailable as e:
        # The row is committed but no task will run it: say so on the row and to the caller.
        log.error("launch %s: queue unavailable: %s", launch.id, e)
        with units.begin() as uow:
            failed = get_launch(uow.db, launch.id)
            if failed is not None and not failed.is_terminal:
                transitions.mark_failed(
                    uow,
                    failed,
                    QUEUE_DOWN,
                    reason=transitions.FailReason.queue_unavailable,
                    now=utcnow(),
                    user_removed=True,
                )
        raise Refused(503, QUEUE_DOWN) from e
    return launch


def end(units: Units, launch_id: str) -> Launch | None:
    """The owner asks to end a launch: recorded, and the teardown sent when nothing else will
    do it. None when there is no such launch."""
    try:
        with units.begin() as uow:
            launch = get_launch(uow.db, launch_id)
            if launch is None:
                return None
            if transitions.request_end(uow, launch, now=utcnow()):
                uow.send(teardown_message(launch.id))
    except QueueUnavailable as e:
        raise Refused(503, END_NOT_SENT) from e
    return launch
