"""The app factory: ``create_app()`` builds the FastAPI app from settings, connecting to nothing."""

from __future__ import annotations

import gc
import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import ratelimit
from api.group_commit import LaunchWriter
from api.metrics import HublaunchCollector
from api.pages import STATIC_DIR, not_found
from api.ratelimit import LimitLaunchStarts
from api.routes import admin, binder, health, launches, metrics, pages
from worker.broker import Broker, make_broker
from worker.hub_client import HubClient
from worker.hubs import hubs
from worker.metrics import Recorder
from worker.notify import redis_url
from worker.settings import Settings, get_settings
from worker.unit_of_work import Units

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024
# What a 405's Allow header may name (OPTIONS is answered by no route).
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


class BodyLimit:
    """Refuse request bodies over a limit, whether or not they declare a Content-Length.

    Bodies here are small, so the body is read (up to the limit) before the app sees it.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _too_large(self.limit)(scope, receive, send)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                await _too_large(self.limit)(scope, receive, send)
                return
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"detail": f"Request body must be at most {limit} bytes."}, 413)


# What to send instead, for the type errors of the strict launch request.
TYPE_HINTS = {
    "int_type": "must be a JSON integer such as 3600 (not a string, a fraction or true/false)",
    "string_type": "must be a JSON string",
    "extra_forbidden": "unknown field; allowed fields are image, repo, ref, lifetime",
}


def _describe(errors: list[Any]) -> str:
    parts = []
    for error in errors:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        message = TYPE_HINTS.get(str(error.get("type")), message)
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestValidationError):
        raise TypeError(f"registered for RequestValidationError, got {type(exc).__name__}")
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        return JSONResponse({"detail": "Request body is not valid JSON."}, 400)
    if any(e.get("type") in ("model_attributes_type", "dict_type", "missing") for e in errors):
        return JSONResponse(
            {"detail": 'Send a JSON object, e.g. {"image": "default"}, as application/json.'},
            422,
        )
    return JSONResponse({"detail": _describe(errors)}, 422)


async def _http_error(request: Request, exc: Exception) -> Response:
    """JSON under /api/ (what scripts read); a plain page elsewhere (what people see)."""
    if not isinstance(exc, StarletteHTTPException):
        raise TypeError(f"registered for HTTPException, got {type(exc).__name__}")
    if exc.status_code == 404 and not request.url.path.startswith("/api/"):
        return not_found(request)
    headers = dict(exc.headers or {})
    if exc.status_code == 405 and (allowed := _allowed_methods(request)):
        headers["Allow"] = ", ".join(allowed)
    return JSONResponse({"detail": exc.detail}, exc.status_code, headers=headers or None)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path. Starlette's 405 names only the methods of
    the first route whose path matched (GET of /api/launches/{id}, not its DELETE)."""
    return [
        method
        for method in METHODS
        if any(
            not isinstance(route, Mount)
            and route.matches({**request.scope, "method": method})[0] == Match.FULL
            for route in request.app.router.routes
        )
    ]


def _document(app: FastAPI) -> None:
    """Make the OpenAPI document say what the app answers where FastAPI's defaults do not:
    a validation error is a ``Problem`` (one sentence, from ``_validation_error``), not
    FastAPI's list of errors, and a route behind the admin bearer also answers 401."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = generate()
        problem = {"$ref": "#/components/schemas/Problem"}
        for path in document.get("paths", {}).values():
            for operation in path.values():
                answers = operation.get("responses", {})
                invalid = answers.get("422", {}).get("content", {}).get("application/json", {})
                if invalid.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                    invalid["schema"] = problem
                if operation.get("security") and "401" not in answers:
                    answers["401"] = {
                        "description": "No admin token, or a wrong one.",
                        "content": {"application/json": {"schema": problem}},
                    }
        schemas = document.get("components", {}).get("schemas", {})
        if "HTTPValidationError" not in json.dumps(document.get("paths", {})):
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]


_frozen_in = 0  # the pid that froze its startup objects


def _freeze_startup_objects() -> None:
    """Objects made while starting (modules, the app, its routes) live as long as the process:
    keep them out of the collector's full passes, whose pauses were most of the intake's p99
    (bench.intake_rate: 149 and 120 ms, 89 and 80 ms frozen). Once a process."""
    global _frozen_in
    if _frozen_in != os.getpid():
        _frozen_in = os.getpid()
        gc.collect()
        gc.freeze()


def create_app(settings: Settings | None = None, *, broker: Broker | None = None) -> FastAPI:
    """``broker`` defaults to Celery on the settings' broker URL (built on first send)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _freeze_startup_objects()
        # Without the service token: the visitor-facing process only asks whether the Hub
        # answers; the worker alone drives it.
        app.state.hubs = {
            hub.name: HubClient(hub.api_url, "", timeout=3.0, name=hub.name)
            for hub in hubs(settings)
        }
        # One pooled client for health checks (nothing connects until the first check).
        url = redis_url(settings)
        app.state.broker = (
            redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2) if url else None
        )
        yield
        for client in app.state.hubs.values():
            client.close()
        if app.state.broker is not None:
            app.state.broker.close()
        await ratelimit.close_async_limiters()

    app = FastAPI(
        title="hublaunch",
        summary="Launch temporary Jupyter sessions on a JupyterHub in API-only mode.",
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
        lifespan=lifespan,
        # Starlette's slash redirects write an absolute Location from the Host header, which
        # any visitor controls; a wrong slash is a plain 404 instead.
        redirect_slashes=False,
    )
    app.state.settings = settings
    # Writes commit, then send, through these; the doorbell is the worker's business.
    store = redis_url(settings)
    # What this process counts goes to Redis after each commit; /metrics reads every process's
    # counts back from there (clients connect on first use, not here).
    app.state.units = Units(
        settings.database_url,
        broker or make_broker(settings),
        recorder=Recorder(store, settings.queue),
    )
    # Launches are created in batches, one transaction and one publish for all that arrive at
    # once (api.group_commit).
    app.state.writer = LaunchWriter(app.state.units, settings.launch_timeout)
    app.state.metrics = CollectorRegistry(auto_describe=False)
    app.state.metrics.register(
        HublaunchCollector(
            settings,
            redis.Redis.from_url(store, socket_timeout=2, socket_connect_timeout=2)
            if store
            else None,
        )
    )
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.include_router(launches.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(admin.router)
    app.include_router(binder.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    # Outermost: a refused launch start is answered before anything else runs.
    app.add_middleware(LimitLaunchStarts, settings=settings)
    _document(app)
    return app
