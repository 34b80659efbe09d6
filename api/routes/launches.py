"""/api/launches: create, watch, inspect and end launches."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Request, Response, status
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api import idempotency, intake, ratelimit
from api.context import bind_path_launch
from api.deps import DbDep, SettingsDep, UnitsDep, WriterDep
from api.events import event_stream, parse_event_id
from api.schemas import (
    BANNED,
    QUEUE_DOWN,
    RATE_LIMITED,
    LaunchAccepted,
    LaunchRequest,
    LaunchView,
    Problem,
    event_stream_response,
)
from worker import queries
from worker.crypto import reveal
from worker.db import as_utc, as_utc_or_none, reading
from worker.hubs import hub_of
from worker.logs import bind_launch
from worker.models import Launch, Status
from worker.settings import Settings

log = logging.getLogger(__name__)
# A request for /{launch_id}... logs with that launch's id on every line.
router = APIRouter(
    prefix="/api/launches", tags=["launches"], dependencies=[Depends(bind_path_launch)]
)

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "No launch with this id."}
}


def _not_found() -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, "No launch with this id; check the id.")


def _url_with_token(settings: Settings, launch: Launch) -> str | None:
    token = reveal(settings, launch.token_ciphertext) if launch.status == Status.ready else None
    if not token:
        return None
    # The server is on its Hub's public URL (worker/hubs.py; one Hub: the service's).
    return f"{launch.server_url(hub_of(settings, launch.hub).public_url)}?token={token}"


def view(settings: Settings, launch: Launch) -> LaunchView:
    return LaunchView(
        id=launch.id,
        status=launch.status,
        spec=launch.spec,
        user=launch.hub_user,
        url=_url_with_token(settings, launch),
        error=launch.error,
        end_reason=launch.end_reason,
        created_at=as_utc(launch.created_at),
        ready_at=as_utc_or_none(launch.ready_at),
        expires_at=as_utc_or_none(launch.expires_at),
        ended_at=as_utc_or_none(launch.ended_at),
    )


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=LaunchAccepted,
    responses={
        # Counted launches say where the client stands (api/ratelimit.py); a replay does not.
        202: {"headers": ratelimit.OPENAPI_HEADERS},
        400: {
            "model": Problem,
            "description": "The body is not valid JSON, or the Idempotency-Key is malformed.",
        },
        **BANNED,
        409: {
            "model": Problem,
            "description": "A request with this Idempotency-Key is still being processed; "
            "retry in a few seconds to get its answer.",
        },
        413: {"model": Problem, "description": "The body is too large."},
        422: {
            "model": Problem,
            "description": "The launch request is invalid, or its Idempotency-Key was used "
            "with another body.",
        },
        429: {
            **RATE_LIMITED[429],
            "headers": {**RATE_LIMITED[429]["headers"], **ratelimit.OPENAPI_HEADERS},
        },
        503: {
            "model": Problem,
            "description": "The queue or the database is unavailable; nothing was started.",
        },
    },
)
async def create_launch(
    body: LaunchRequest,
    request: Request,
    response: Response,
    writer: WriterDep,
    settings: SettingsDep,
    key: Annotated[
        str | None,
        Header(
            alias=idempotency.HEADER,
            description="Makes a retried POST safe: the same key and body give the same "
            "launch (for 24 h, per client address); 1-255 characters of A-Z a-z 0-9 "
            "- _ . ~ : + / =, e.g. a UUID.",
        ),
    ] = None,
) -> LaunchAccepted:
    # Asynchronous, so a launch waiting for its batch (api.group_commit) holds no thread; what
    # blocks (Redis for the key and the rate, DNS for a repository) runs in one.
    # Nothing below touches the database before the rate check: a flood is answered from Redis.
    client = ratelimit.client_address(request, settings)
    claim: idempotency.Claim | None = None
    if key is not None:
        found = await run_in_threadpool(_claim_key, settings, client, key, body)
        if isinstance(found, idempotency.Replay):
            accepted = LaunchAccepted.model_validate(found.answer)
            response.headers["Location"] = accepted.status_url
            response.headers["Idempotent-Replayed"] = "true"
            return accepted
        claim = found
    try:
        # A replay above starts nothing, so only a request that would start a launch counts;
        # one without a key was counted already, before its body was read (LimitLaunchStarts).
        if not getattr(request.state, ratelimit.CHECKED, False):
            verdict, rate = await ratelimit.count_async(request, settings, client)
            if not verdict.allowed and rate is not None:
                raise HTTPException(
                    status.HTTP_429_TOO_MANY_REQUESTS,
                    verdict.message(rate),
                    headers={"Retry-After": str(verdict.retry_after)},
                )
        launch_id = await intake.accept_async(writer, settings, body, client)
    except intake.Refused as e:
        if claim is not None:
            await run_in_threadpool(claim.release)
        raise HTTPException(e.status, e.message) from e
    except BaseException:
        if claim is not None:
            claim.release()  # refused or broken: a retry with the key may try again
        raise
    with bind_launch(launch_id):
        log.info("launch %s accepted (%s)", launch_id, "repo" if body.repo else "image")
    # On the public address, never the request's Host header: any visitor can send one, and a
    # poisoned Location or status_url would send its readers elsewhere.
    status_url = f"{settings.public_url}{router.prefix}/{launch_id}"
    response.headers["Location"] = status_url
    accepted = LaunchAccepted(
        id=launch_id,
        status=Status.queued,
        status_url=status_url,
        events_url=f"{status_url}/events",
    )
    if claim is not None:
        await run_in_threadpool(claim.complete, accepted.model_dump(mode="json"))
    return accepted


def _claim_key(
    settings: Settings, client: str, key: str, body: LaunchRequest
) -> idempotency.Claim | idempotency.Replay | None:
    """Hold ``key`` for this request, or find its answer; None when there is no Redis to keep
    keys in (the embedded dev queue: the key is checked, not kept)."""
    try:
        idempotency.check_key(key)
        store = ratelimit.shared_redis(settings)
        if store is None:
            return None
        return idempotency.claim(
            store, ratelimit.key_prefix(settings), client, key, body.model_dump(mode="json")
        )
    except idempotency.KeyProblem as e:
        raise HTTPException(e.status, e.message) from e


@router.get("/{launch_id}", response_model=LaunchView, responses=NOT_FOUND)
def get_launch(launch_id: str, db: DbDep, settings: SettingsDep) -> LaunchView:
    launch = queries.get_launch(db, launch_id)
    if launch is None:
        raise _not_found()
    return view(settings, launch)


@router.get(
    "/{launch_id}/events",
    response_class=StreamingResponse,
    responses={
        200: event_stream_response(
            "The launch's events, after Last-Event-ID, until ready or failed."
        ),
        **NOT_FOUND,
    },
)
def launch_events(
    launch_id: str,
    settings: SettingsDep,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            description="The id of the last event seen: the stream resumes after it. "
            "Anything but a number of up to 18 digits counts as none.",
        ),
    ] = None,
) -> Response:
    # A short session of its own: a request-scoped one would stay open as long as the stream.
    with reading(settings.database_url) as db:
        if queries.get_launch(db, launch_id) is None:
            raise _not_found()
    after = parse_event_id(last_event_id) or 0
    return StreamingResponse(
        event_stream(settings, launch_id, after_id=after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.delete(
    "/{launch_id}",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=LaunchView,
    responses={**NOT_FOUND, **QUEUE_DOWN},
)
def end_launch(launch_id: str, units: UnitsDep, settings: SettingsDep) -> LaunchView:
    try:
        launch = intake.end(units, launch_id)
    except intake.Refused as e:
        raise HTTPException(e.status, e.message) from e
    if launch is None:
        raise _not_found()
    log.info("launch %s: end requested (%s)", launch_id, launch.status)
    return view(settings, launch)
