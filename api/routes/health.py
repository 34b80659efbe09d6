"""/api/health: is the database, the broker and the Hub reachable?"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import SettingsDep
from api.schemas import Health
from worker.db import reading
from worker.hub_client import HubClient, HubError
from worker.settings import Settings

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api", tags=["health"])


def _check_database(settings: Settings) -> str:
    try:
        with reading(settings.database_url) as db:
            db.execute(text("SELECT 1"))
    except Exception as e:  # any driver error means "down"; the type is logged
        log.warning("health: database: %s", type(e).__name__)
        return "down"
    return "ok"


def _check_broker(broker: redis.Redis | None) -> str:
    if broker is None:
        return "ok"  # the embedded filesystem broker has nothing to ping
    try:
        broker.ping()
    except redis.RedisError as e:
        log.warning("health: broker: %s", type(e).__name__)
        return "down"
    return "ok"


def _check_hub(hub: HubClient) -> str:
    try:
        hub.answers()
    except HubError as e:
        log.warning("health: hub: %s", e.message)
        return "down"
    return "ok"


def run_checks(request: Request, settings: Settings) -> dict[str, str]:
    """Each service's state, "ok" or "down" (also BinderHub's /health, api/routes/binder.py).
    "hub" is ok while any Hub answers (launches go to those); with several Hubs each is also
    reported as "hub:<name>"."""
    clients: dict[str, HubClient] = request.app.state.hubs
    with ThreadPoolExecutor(max_workers=len(clients)) as pool:
        states = dict(zip(clients, pool.map(_check_hub, clients.values()), strict=True))
    checks = {
        "database": _check_database(settings),
        "broker": _check_broker(request.app.state.broker),
        "hub": "ok" if "ok" in states.values() else "down",
    }
    if len(states) > 1:
        checks.update({f"hub:{name}": state for name, state in states.items()})
    return checks


def down(checks: dict[str, str]) -> list[str]:
    """What the service cannot work without (one Hub of several may be down)."""
    return [name for name, state in checks.items() if state != "ok" and ":" not in name]


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
def health(request: Request, settings: SettingsDep) -> JSONResponse:
    checks = run_checks(request, settings)
    missing = down(checks)
    body = Health(status="down: " + ", ".join(missing) if missing else "ok", checks=checks)
    return JSONResponse(body.model_dump(), status_code=503 if missing else 200)
