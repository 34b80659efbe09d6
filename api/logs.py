"""Logging of the HTTP app: no token in any line.

The app is the proxy's default route, so it sees ``/user/<gone>/?token=…`` when a visitor opens
a session that has ended, and uvicorn's access log prints the whole path with its query.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from uvicorn.config import LOGGING_CONFIG

from hub.redact import install

REDACT = "hub.redact.RedactTokens"


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's own logging setup with the redacting filter on each of its handlers."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {**config.get("filters", {}), "redact_tokens": {"()": REDACT}}
    for handler in config["handlers"].values():
        handler["filters"] = [*handler.get("filters", []), "redact_tokens"]
    return config


def install_everywhere() -> None:
    """The root logger's handlers, and every record made in this process from now on."""
    install(logging.getLogger())
