"""Logging of the HTTP app: no token in any line, and JSON lines like every other process's.

The app is the proxy's default route, so it sees ``/user/<gone>/?token=…`` when a visitor opens
a session that has ended, and uvicorn's access log prints the whole path with its query.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from uvicorn.config import LOGGING_CONFIG

from hub.redact import install
from worker.logs import LogFormat

REDACT = "hub.redact.RedactTokens"
CONTEXT = "worker.logs.LogContext"
JSON = "worker.logs.JsonFormatter"


def uvicorn_log_config(log_format: LogFormat = "text", process: str = "api") -> dict[str, Any]:
    """uvicorn's own logging setup with the redacting filter (and the launch's context) on each
    of its handlers. ``json``: its lines, the access log's included, are JSON lines as well;
    ``text``: uvicorn's own formats."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {
        **config.get("filters", {}),
        "redact_tokens": {"()": REDACT},
        "launch_context": {"()": CONTEXT},
    }
    for handler in config["handlers"].values():
        handler["filters"] = [*handler.get("filters", []), "redact_tokens", "launch_context"]
    if log_format == "json":
        config["formatters"] = {
            name: {"()": JSON, "process": process} for name in config["formatters"]
        }
    return config


def install_everywhere() -> None:
    """The root logger's handlers, and every record made in this process from now on."""
    install(logging.getLogger())
