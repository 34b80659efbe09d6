"""/build (BinderHub's event stream), /v2 (launch pages) and the launch badge."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import AsyncIterator
from importlib.metadata import version as package_version
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from api import binder, build_tokens, intake, ratelimit
from api.deps import SettingsDep, UnitsDep, WriterDep
from api.events import event_stream, parse_event_id
from api.pages import page
from api.routes.health import down, run_checks
from api.schemas import RATE_LIMITED_STREAM, event_stream_response
from worker import abandon, queries, repos, sources
from worker.db import reading
from worker.settings import Settings

router = APIRouter(tags=["binder"])

BADGE = """<svg xmlns="http://www.w3.org/2000/svg" width="110" height="20" role="img"
aria-label="launch: hublaunch"><title>launch: hublaunch</title>
<rect width="48" height="20" fill="#555"/><rect x="48" width="62" height="20" fill="#e66581"/>
<g fill="#fff" text-anchor="middle" font-family="Verdana,DejaVu Sans,sans-serif" font-size="11">
<text x="24" y="14">launch</text><text x="78" y="14">hublaunch</text></g></svg>"""

# The same, with a logo (a ring, as Jupyter's) before the words.
BADGE_LOGO = """<svg xmlns="http://www.w3.org/2000/svg" width="124" height="20" role="img"
 aria-label="launch: hublaunch"><title>launch: hublaunch</title>
<rect width="62" height="20" fill="#555"/><rect x="62" width="62" height="20" fill="#e66581"/>
<circle cx="10" cy="10" r="5" fill="none" stroke="#f37726" stroke-width="2"/>
<g fill="#fff" text-anchor="middle" font-family="Verdana,DejaVu Sans,sans-serif" font-size="11">
<text x="38" y="14">launch</text><text x="92" y="14">hublaunch</text></g></svg>"""

# ?urlpath= and ?labpath= say where to land in the session's server, and the visitor's token
# goes with that URL: nothing may make it resolve outside /user/<name>/ (another session's
# server, another host). Browsers read %2e as a dot and "\" as "/" and drop tabs and newlines,
# so those count too. Escapes are checked in the path only: a query (nbgitpuller's
# git-pull?repo=https%3A%2F%2F...) cannot move the URL.
MAX_SERVER_PATH = 2048
PATH_ESCAPES = re.compile(r"%(2e|2f|5c|25)", re.IGNORECASE)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class BadServerPath(ValueError):
    """The path would leave the session's own server; the message says what to fix."""


def server_path(name: str, value: str) -> str:
    """``value`` (a path relative to the session's server) if it stays inside that server."""
    path = re.split(r"[?#]", value, maxsplit=1)[0]
    if len(value) > MAX_SERVER_PATH:
        problem = f"must be at most {MAX_SERVER_PATH} characters"
    elif any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        problem = "must not contain control characters"
    elif "\\" in value:
        problem = "must not contain backslashes; use '/'"
    elif value.startswith("/"):
        problem = "must be relative to the session's server, without a leading '/'"
    elif SCHEME.match(value):
        problem = "must be a path in the session's server, not a URL"
    elif PATH_ESCAPES.search(path):
        problem = "must not contain escaped dots, slashes or percent signs (%2e, %2f, %5c, %25)"
    elif ".." in path.split("/"):
        problem = "must not contain '..' segments"
    else:
        return value
    raise BadServerPath(f"{name} {problem}, e.g. {name}=lab/tree/index.ipynb")


def cors_headers(settings: Settings, origin: str | None) -> dict[str, str]:
    """Access-Control-Allow-Origin for the /build stream: "*", or the request's origin when it
    is one of the configured ones (comma-separated); other origins get none."""
    allowed = {o.strip() for o in settings.cors_allow_origin.split(",") if o.strip()}
    if "*" in allowed:
        return {"Access-Control-Allow-Origin": "*"}
    # The answer depends on Origin: a shared cache must not serve one origin's to another.
    if origin is not None and origin in allowed:
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    return {"Vary": "Origin"}


@router.get(
    "/build/{provider}/{spec:path}",
    response_class=StreamingResponse,
    responses={
        200: event_stream_response(
            "The launch's events until `ready` or `failed`; a spec that cannot be launched, or "
            "a launch refused, is one `failed` event."
        ),
        404: {
            "description": "The path holds a line break, which no spec can: the not-found page.",
            "content": {"text/html": {"schema": {"type": "string"}}},
        },
        **RATE_LIMITED_STREAM,
    },
    summary="BinderHub-compatible launch event stream",
    # The handler reads the spec from the raw path (escaped slashes belong to it), so FastAPI
    # cannot see these parameters; they are declared here.
    openapi_extra={"parameters": binder.BUILD_PARAMETERS},
)
def build(request: Request, settings: SettingsDep, units: UnitsDep, writer: WriterDep) -> Response:
    """Start a launch (or, for a reconnecting EventSource, resume its own) and stream its events
    in BinderHub's shape. Errors arrive as one ``failed`` event, as BinderHub sends them."""
    headers = {
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
        **cors_headers(settings, request.headers.get("Origin")),
    }
    build_only = request.query_params.get("build_only", "").lower() == "true"
    try:
        spec = binder.from_raw_path(request.scope.get("raw_path", b""), "/build/")
        launch_id, after = _resume(settings, request.headers.get("Last-Event-ID", ""), spec)
        if launch_id is None:
            # BinderHub's status codes, with its one ``failed`` event as the body: a bad or
            # missing build token is a 403, a build-only run the service does not allow a 400.
            try:
                build_tokens.check(settings, request.query_params.get("build_token"), spec.path)
            except build_tokens.BadBuildToken as e:
                return _refused(403, str(e), headers)
            if build_only and not settings.allow_build_only:
                return _refused(400, intake.BUILD_ONLY_REFUSED, headers)
            # Only a request that starts a launch is counted; a resumed stream (above) never is.
            address = ratelimit.client_address(request, settings)
            verdict, rate = ratelimit.count(request, settings, address)
            if not verdict.allowed and rate is not None:
                # 429 + Retry-After, and the body still BinderHub's one ``failed`` event:
                # fetch-based clients (binderhub-client's fetch-event-source) read a body of
                # type text/event-stream whatever the status and show the sentence; a browser
                # EventSource fails on a non-200 *without reconnecting*, which is what a
                # refused launch needs (a 200 would end the stream and make it reconnect, and
                # be refused, again and again); proxies, crawlers and scripts see the 429.
                return StreamingResponse(
                    _one_failure(verdict.message(rate)),
                    status_code=429,
                    media_type="text/event-stream",
                    headers={**headers, "Retry-After": str(verdict.retry_after)},
                )
            request_body = spec.request(build_only=build_only)
            launch_id, after = intake.accept(writer, settings, request_body, address), 0
    except (binder.BadSpec, intake.Refused) as e:
        message = e.message if isinstance(e, intake.Refused) else str(e)
        return StreamingResponse(
            _one_failure(message), media_type="text/event-stream", headers=headers
        )
    stream = event_stream(
        settings, launch_id, after_id=after, id_prefix=f"{launch_id}:", binder_fields=True
    )
    watched_id = launch_id

    async def watched() -> AsyncIterator[str]:
        """The stream, counted as a watcher of the launch (worker/abandon.py): a launch whose
        last watcher left before the end is ended after the grace period."""
        counted = await anyio.to_thread.run_sync(abandon.joined, settings, watched_id)
        finished = False
        try:
            async for chunk in stream:
                yield chunk
            finished = True
        finally:
            # Shielded: a visitor who leaves cancels this task, and the count must still drop.
            with anyio.CancelScope(shield=True):
                close = getattr(stream, "aclose", None)  # typed as an iterator; it is a generator
                if close is not None:
                    await close()
                if counted:
                    leave = functools.partial(
                        abandon.left, settings, units, watched_id, finished=finished
                    )
                    await anyio.to_thread.run_sync(leave)

    return StreamingResponse(watched(), media_type="text/event-stream", headers=headers)


def _resume(
    settings: Settings, last_event_id: str, spec: binder.BinderSpec
) -> tuple[str | None, int]:
    """A reconnect carries ``<launch id>:<event id>``: continue that launch, never start another
    (BinderHub once launched twice here). Anything else starts a new launch."""
    launch_id, _, seen = last_event_id.partition(":")
    after = parse_event_id(seen)
    if not launch_id or after is None:
        return None, 0
    try:
        wanted = binder.link_for(_normalized(settings, spec))
    except repos.SpecError:
        return None, 0  # a new launch, refused with the spec's own message
    with reading(settings.database_url) as db:
        launch = queries.get_launch(db, launch_id)
        if launch is None or binder.link_for(launch.spec) != wanted:
            return None, 0
    return launch_id, after


def _normalized(settings: Settings, spec: binder.BinderSpec) -> dict[str, Any]:
    request = spec.request()
    if request.repo is None:
        return request.spec()
    return sources.normalize(request.repo, request.ref, settings).as_dict()


async def _one_failure(message: str, status_code: int | None = None) -> AsyncIterator[str]:
    event: dict[str, Any] = {"phase": "failed", "message": message}
    if status_code is not None:
        event["status_code"] = status_code
    yield f"data: {json.dumps(event)}\n\n"


def _refused(status: int, message: str, headers: dict[str, str]) -> StreamingResponse:
    return StreamingResponse(
        _one_failure(message, status),
        status_code=status,
        media_type="text/event-stream",
        headers=headers,
    )


@router.get("/v2/{provider}/{spec:path}", response_class=HTMLResponse, include_in_schema=False)
def launch_page(request: Request, settings: SettingsDep) -> HTMLResponse:
    """What a Binder link opens: progress, the build log, then the running server."""
    try:
        spec = binder.from_raw_path(request.scope.get("raw_path", b""), "/v2/")
        spec.request()
    except binder.BadSpec as e:
        return page(request, "not_found.html", 404, message=f"This launch link is not valid: {e}")
    try:
        urlpath = server_path("urlpath", request.query_params.get("urlpath", ""))
        labpath = server_path("labpath", request.query_params.get("labpath", ""))
        # Older Binder links name a file to open; BinderHub opens it as tree/<filepath>.
        filepath = server_path("filepath", request.query_params.get("filepath", ""))
        if filepath and not (urlpath or labpath):
            urlpath = f"tree/{filepath}"
    except BadServerPath as e:
        return page(request, "bad_link.html", 400, message=str(e))
    # The page's own /build request carries a build token for this spec, when the service
    # signs them (api/build_tokens.py: no secret of a session; it starts only this launch).
    token = build_tokens.issue(settings, spec.path)
    build_path = f"/build/{spec.path}" + (f"?build_token={token}" if token else "")
    return page(
        request,
        "launch.html",
        build_path=build_path,
        link=f"/v2/{spec.path}",
        urlpath=urlpath,
        labpath=labpath,
    )


@router.get("/badge.svg", include_in_schema=False)
def badge() -> Response:
    return Response(BADGE, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})


@router.get("/badge_logo.svg", include_in_schema=False)
def badge_logo() -> Response:
    """BinderHub's second badge, with a logo before the words."""
    return Response(
        BADGE_LOGO, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"}
    )


@router.get("/versions", include_in_schema=False)
def versions(settings: SettingsDep) -> JSONResponse:
    """BinderHub's /versions: what builds environments, and the service's version (BinderHub
    names its own; this is hublaunch's, under both keys so Binder tools find one)."""
    version = package_version("hublaunch")
    return JSONResponse(
        {
            "builder_info": {"builder": settings.builder, "hublaunch": version},
            "binderhub": f"hublaunch-{version}",
            "hublaunch": version,
        }
    )


# What BinderHub's /_config says of each provider its form offers: the form's labels, and
# whether the provider takes a ref. The same providers as /build, in the same order.
_REF = "Git ref (branch, tag, or commit)"
_RECORD = {"tag_text": "", "ref_prop_disabled": True, "label_prop_disabled": True}
PROVIDER_CONFIG: dict[str, dict[str, Any]] = {
    "gh": {"display_name": "GitHub", "text": "GitHub repository name or URL", "tag_text": _REF},
    "gl": {"display_name": "GitLab.com", "text": "GitLab.com repository or URL", "tag_text": _REF},
    "git": {
        "display_name": "Git repository",
        "text": "Arbitrary git repository URL (https)",
        "tag_text": _REF,
    },
    "gist": {
        "display_name": "Gist",
        "text": "Gist ID (username/gistId) or URL",
        "tag_text": "Git commit SHA",
    },
    "zenodo": {
        "display_name": "Zenodo DOI",
        "text": "Zenodo DOI (10.5281/zenodo.3242074)",
        **_RECORD,
    },
    "figshare": {
        "display_name": "Figshare DOI",
        "text": "Figshare DOI (10.6084/m9.figshare.9782777.v1)",
        **_RECORD,
    },
    "dataverse": {
        "display_name": "Dataverse DOI",
        "text": "Dataverse DOI (10.7910/DVN/TJCLKP)",
        **_RECORD,
    },
    "hydroshare": {
        "display_name": "HydroShare resource",
        "text": "HydroShare resource id or URL",
        **_RECORD,
    },
    "ckan": {"display_name": "CKAN dataset", "text": "CKAN dataset URL", **_RECORD},
    "image": {"display_name": "Image", "text": "Name of a ready image", **_RECORD},
}


@router.get("/_config", include_in_schema=False)
def binderhub_config() -> JSONResponse:
    """BinderHub's /_config: the providers a Binder form may offer, with its labels."""
    return JSONResponse(
        {
            prefix: {"ref_prop_disabled": False, "label_prop_disabled": False, **config}
            for prefix, config in PROVIDER_CONFIG.items()
        }
    )


@router.get("/health", include_in_schema=False)
def binderhub_health(request: Request, settings: SettingsDep) -> JSONResponse:
    """BinderHub's /health shape (``ok`` and a check per service; 503 when one is down), from
    the same checks as ``/api/health``."""
    checks = run_checks(request, settings)
    services = {"hub": "JupyterHub API", "database": "Database", "broker": "Queue"}
    ok = not down(checks)
    body = {
        "ok": ok,
        "checks": [
            {"service": services[name], "ok": state == "ok"}
            for name, state in checks.items()
            if name in services
        ],
    }
    return JSONResponse(body, status_code=200 if ok else 503)
