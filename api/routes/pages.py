"""The launch form at / and what the proxy's default route shows for a session that is gone."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse
from sqlalchemy import select

from api.binder import link_for
from api.deps import DbDep, SettingsDep
from api.pages import not_found, page
from worker.models import Launch, Status

router = APIRouter(include_in_schema=False)

WHY = {
    "expired": "It reached the end of its lifetime.",
    "idle": "It was idle for too long.",
    "requested": "It was ended on request.",
    "failed": "It did not start.",
    "gone": "It stopped running.",
    "out_of_memory": "It ran out of memory: it used more than a session may, and was stopped.",
    "orphan": "It stopped running.",
}


@router.get("/", response_class=HTMLResponse)
def launch_form(request: Request, settings: SettingsDep) -> HTMLResponse:
    # Where /build needs a build token, the form goes to the launch page, which carries one.
    return page(request, "index.html", via_launch_page=settings.require_build_token)


@router.api_route("/user/{name}/{rest:path}", methods=["GET", "HEAD"], response_class=HTMLResponse)
@router.api_route("/user/{name}", methods=["GET", "HEAD"], response_class=HTMLResponse)
def session_gone(request: Request, name: str, db: DbDep) -> HTMLResponse:
    """The proxy sends /user/<name>/… here when no server runs for it (API-only mode)."""
    launch = db.scalars(select(Launch).where(Launch.hub_user == name.lower())).one_or_none()
    if launch is None:
        return not_found(request, "There is no session at this address.")
    if launch.status == Status.ready and launch.end_requested_at is None:
        why = "Its server is not answering right now; it may be restarting."
    else:
        why = WHY.get(launch.end_reason or "", "It is over.")
    return page(
        request,
        "ended.html",
        404,
        why=why,
        again=f"/v2/{link_for(launch.spec)}",
        what=launch.spec.get("image") or launch.spec.get("repo"),
    )


HUB_AWAY = "The Hub's API is not routed right now (the Hub is starting or stopped); try again."


@router.api_route(
    "/hub/api/{rest:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
)
def hub_api_away(rest: str) -> JSONResponse:
    """The proxy sends /hub/api/… to the Hub while the Hub's route is registered; here only
    while it is not (a Hub starting, restarting or gone, its proxy already up). A 503 says
    "try again" to the worker's Hub client; a 404 read as "no such user" failed launches."""
    return JSONResponse({"status": 503, "message": HUB_AWAY}, 503, headers={"Retry-After": "2"})
