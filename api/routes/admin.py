"""/api/admin: what operators see and do, behind the admin bearer token.

Off unless ``HUBLAUNCH_ADMIN_TOKEN`` is set: then every route answers 404 before looking at the
request. The token is compared in constant time and never logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api import intake
from api.deps import DbDep, SettingsDep, UnitsDep
from api.schemas import (
    AdminPool,
    AdminSession,
    AdminSessionPage,
    AdminSpecCount,
    AdminSummary,
    Problem,
)
from worker import queries
from worker.db import as_utc, as_utc_or_none, utcnow
from worker.models import Launch, Status
from worker.pool_config import pools
from worker.pool_demand import sizes

DISABLED = "The admin API is disabled; set HUBLAUNCH_ADMIN_TOKEN to enable it."
MISSING_CREDENTIALS = "The admin API needs the admin token: send 'Authorization: Bearer <token>'."
INVALID_CREDENTIALS = "The admin token is not valid."
BAD_CURSOR = (
    "before: not a cursor of this listing; pass the 'next' value of a previous page unchanged."
)
BAD_SPEC = "spec: must not contain control characters; give an image name or a repository URL."
MAX_LIMIT = 500
MAX_WINDOW = 7 * 24 * 3600

# auto_error=False: a missing header or another scheme is ours to answer (401, not 403).
bearer = HTTPBearer(auto_error=False, description="The operators' HUBLAUNCH_ADMIN_TOKEN.")


def require_admin(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    expected = settings.admin_token.get_secret_value()
    if not expected:
        # Before anything about the request is read: a disabled API answers alike for all.
        raise HTTPException(status.HTTP_404_NOT_FOUND, DISABLED)
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None or not credentials.credentials:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, MISSING_CREDENTIALS, headers=challenge)
    # Digests of equal length, so the comparison's time says nothing of the token's length.
    given = hashlib.sha256(credentials.credentials.encode()).digest()
    if not hmac.compare_digest(given, hashlib.sha256(expected.encode()).digest()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            INVALID_CREDENTIALS,
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )


RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "No admin token, or a wrong one."},
    404: {"model": Problem, "description": "The admin API is disabled (or no such session)."},
}

router = APIRouter(
    prefix="/api/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses=RESPONSES,
)


def admin_view(launch: Launch) -> AdminSession:
    return AdminSession(
        id=launch.id,
        status=launch.status,
        spec=launch.spec,
        user=launch.hub_user,
        created_at=as_utc(launch.created_at),
        ready_at=as_utc_or_none(launch.ready_at),
        expires_at=as_utc_or_none(launch.expires_at),
        ended_at=as_utc_or_none(launch.ended_at),
        end_reason=launch.end_reason,
        error=launch.error,
    )


@router.get(
    "/sessions",
    response_model=AdminSessionPage,
    responses={422: {"model": Problem, "description": "A filter, the limit or the cursor."}},
)
def list_sessions(
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    status_: Annotated[
        list[Status] | None,
        Query(alias="status", description="Only these statuses (repeat the parameter)."),
    ] = None,
    spec: Annotated[
        str | None,
        Query(max_length=1024, description="Only launches of this exact image or repo URL."),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    before: Annotated[
        str | None, Query(max_length=256, description="The `next` cursor of the previous page.")
    ] = None,
) -> AdminSessionPage:
    if spec is not None and any(ord(c) < 32 or ord(c) == 127 for c in spec):
        # PostgreSQL refuses NUL in text; no image or URL holds a control character anyway.
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, BAD_SPEC)
    try:
        cursor = queries.Cursor.decode(before) if before is not None else None
    except queries.BadCursor as e:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, BAD_CURSOR) from e
    rows, following = queries.list_launches(
        db, statuses=status_ or (), spec=spec, limit=limit, before=cursor
    )
    next_cursor = following.encode() if following is not None else None
    next_url = None
    if next_cursor is not None:
        params: list[tuple[str, str]] = [("status", s.value) for s in status_ or ()]
        if spec is not None:
            params.append(("spec", spec))
        params += [("limit", str(limit)), ("before", next_cursor)]
        path = request.app.url_path_for("list_sessions")
        next_url = f"{settings.public_url}{path}?{urlencode(params)}"
    return AdminSessionPage(
        items=[admin_view(r) for r in rows], next=next_cursor, next_url=next_url
    )


@router.delete(
    "/sessions/{launch_id}",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=AdminSession,
    responses={503: {"model": Problem, "description": "The queue is unavailable."}},
)
def end_session(launch_id: str, units: UnitsDep) -> AdminSession:
    not_found = HTTPException(status.HTTP_404_NOT_FOUND, "No launch with this id; check the id.")
    # Not an id at all (a NUL byte would even be an error on PostgreSQL): nothing to look up.
    if not queries.LAUNCH_ID_RE.fullmatch(launch_id):
        raise not_found
    try:
        launch = intake.end(units, launch_id)
    except intake.Refused as e:
        raise HTTPException(e.status, e.message) from e
    if launch is None:
        raise not_found
    return admin_view(launch)


@router.get("/pool", response_model=list[AdminPool])
def warm_pools(db: DbDep, settings: SettingsDep) -> list[AdminPool]:
    """The warm pools the settings ask for, with the servers each holds now."""
    counts = queries.pool_counts(db)
    configured = pools(settings)
    now = utcnow()
    size = sizes(db, configured, settings, now)
    return [
        AdminPool(
            pool=pool.key,
            spec=pool.spec,
            size=size[pool.key].wanted,
            minimum=pool.minimum,
            maximum=pool.maximum,
            launches_in_window=size[pool.key].launches if pool.by_demand else None,
            start_seconds=size[pool.key].start_seconds,
            ready=counts.get(pool.key, {}).get("ready", 0),
            starting=counts.get(pool.key, {}).get("starting", 0),
        )
        for pool in configured
    ]


@router.get("/summary", response_model=AdminSummary)
def summary(
    db: DbDep,
    window: Annotated[
        int, Query(ge=60, le=MAX_WINDOW, description="Seconds back from now (60 to 7 days).")
    ] = 3600,
) -> AdminSummary:
    figures = queries.summary(db, now=utcnow(), window=window)
    return AdminSummary(
        now=figures.now,
        window=figures.window,
        active=figures.active,
        active_by_spec=[AdminSpecCount(spec=s.spec, count=s.count) for s in figures.active_by_spec],
        launches=figures.launches,
        launches_per_minute=figures.launches_per_minute,
        finished=figures.finished,
        failed=figures.failed,
        failure_rate=figures.failure_rate,
        ready=figures.ready,
        time_to_ready_p50=figures.time_to_ready_percentile(50),
        time_to_ready_p95=figures.time_to_ready_percentile(95),
    )
