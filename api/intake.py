"""Accepting a launch: check the request, record it, and have it sent once it is committed.

Shared by the JSON API and the BinderHub-compatible /build stream; each maps ``Refused`` to its
own way of saying no (an HTTP status, or a ``failed`` event).
"""

from __future__ import annotations

import logging

import anyio

from api.group_commit import DATABASE_DOWN, QUEUE_DOWN, DatabaseUnavailable, LaunchWriter
from api.schemas import LaunchRequest
from worker import clients, repos, sources, transitions
from worker.broker import QueueUnavailable, teardown_message
from worker.db import utcnow
from worker.models import Launch
from worker.queries import get_launch
from worker.settings import Settings
from worker.transitions import NewLaunch
from worker.unit_of_work import Units

log = logging.getLogger(__name__)

END_NOT_SENT = "The queue is unavailable; the end is recorded. Send DELETE again shortly."


class Refused(Exception):
    """The launch was not accepted; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


BUILD_ONLY_REFUSED = "Building without launching is not permitted on this service."


def prepare(settings: Settings, body: LaunchRequest, client: str) -> NewLaunch:
    """The launch ``body`` asks for, checked; or ``Refused``. ``client``: the visitor's address,
    kept as a keyed digest (``worker.clients``). Blocks on DNS for a repository (its host must
    resolve to public addresses)."""
    spec = body.spec()
    if body.repo is not None:
        try:
            repo = sources.normalize(body.repo, body.ref, settings)
            sources.check_host(repo, settings)
        except repos.SpecBanned as e:
            raise Refused(403, str(e)) from e
        except repos.SpecError as e:
            raise Refused(422, str(e)) from e
        spec = {**repo.as_dict(), **({"build_only": True} if body.build_only else {})}
    if body.build_only and not settings.allow_build_only:
        raise Refused(400, BUILD_ONLY_REFUSED)
    lifetime = body.lifetime or settings.session_max_age
    if lifetime > settings.session_max_age:
        raise Refused(422, f"lifetime must be at most {settings.session_max_age} seconds")
    return NewLaunch(spec, lifetime, client=clients.digest(settings, client))


def accept(writer: LaunchWriter, settings: Settings, body: LaunchRequest, client: str) -> str:
    """The id of the launch ``body`` asks for, committed and sent; or ``Refused``."""
    try:
        return writer.create(prepare(settings, body, client))
    except (QueueUnavailable, DatabaseUnavailable) as e:
        raise _refused(e) from e


async def accept_async(
    writer: LaunchWriter, settings: Settings, body: LaunchRequest, client: str
) -> str:
    """``accept`` for the event loop: only a repository's DNS check takes a thread."""
    if body.repo is None:
        new = prepare(settings, body, client)
    else:
        new = await anyio.to_thread.run_sync(prepare, settings, body, client)
    try:
        return await writer.create_async(new)
    except (QueueUnavailable, DatabaseUnavailable) as e:
        raise _refused(e) from e


def _refused(error: QueueUnavailable | DatabaseUnavailable) -> Refused:
    # The writer recorded an unsent launch as failed with this reason.
    return Refused(503, QUEUE_DOWN if isinstance(error, QueueUnavailable) else DATABASE_DOWN)


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
