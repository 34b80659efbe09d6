"""HTML pages (Jinja2 templates with autoescaping) and the static files they use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
templates = Jinja2Templates(directory=HERE / "templates")


def page(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    settings = request.app.state.settings
    response = templates.TemplateResponse(
        request, name, {"public_url": settings.public_url, **context}, status_code=status_code
    )
    # Pages hold no secrets of their own, but never let a shared cache keep a launch page.
    response.headers["Cache-Control"] = "no-store"
    return response


def not_found(request: Request, message: str = "There is nothing here.") -> HTMLResponse:
    return page(request, "not_found.html", 404, message=message)
