"""GET /metrics: Prometheus text, open while no admin token is set, else behind it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import SettingsDep
from api.routes.admin import bearer, require_admin

router = APIRouter(tags=["metrics"])


def metrics_access(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    # Without an admin token the service has no operator secret: the page is open, as
    # BinderHub's is; with one, a scraper sends it as a bearer like any operator.
    if settings.admin_token.get_secret_value():
        require_admin(settings, credentials)


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[Depends(metrics_access)],
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
    summary="Prometheus metrics",
)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)
