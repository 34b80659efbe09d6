"""Accepting a launch: check the request, record it, commit, then send it to the queue.

Shared by the JSON API and the BinderHub-compatible /build stream; each maps ``Refused`` to its
own way of saying no (an HTTP status, or a ``failed`` event).
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from api.schemas import LaunchRequest
from worker import launches, repos
from worker.enqueue import QueueUnavailable, send_launch
from worker.models import EndReason, Launch, Phase, Status
from worker.settings import Settings

log = logging.getLogger(__name__)


class Refused(Exception):
    """The launch was not accepted; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def accept(db: Session, settings: Settings, body: LaunchRequest) -> Launch:
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
    launch = launches.create_launch(db, spec, lifetime=lifetime, timeout=settings.launch_timeout)
    # The task names a committed row, never one that might still roll back.
    db.commit()
    try:
        send_launch(launch.id)
    except QueueUnavailable as e:
        log.error("launch %s: queue unavailable: %s", launch.id, e)
        launch.status = Status.failed
        launch.error = "The launch queue is unavailable; nothing was started. Try again shortly."
        launch.end_reason = EndReason.failed
        launch.ended_at = launch.user_removed_at = launch.updated_at
        launches.record_event(db, launch, Phase.failed, launch.error)
        db.commit()
        raise Refused(503, launch.error) from e
    return launch
