"""The JupyterHubs launches are placed on (issue 14): ``HUBLAUNCH_HUBS``, or the single-Hub
settings as the shorthand for a one-element list.

Each Hub has a name (stored on every launch placed on it), its API URL and service token, the
public URL its proxy serves sessions at, and its capacity: the active sessions it may hold.
Read by the worker (clients, placement, cleanup) and by the app (a ready launch's URL is on its
Hub's public URL; health).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass

from worker.settings import Settings

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# The name of the Hub the single-Hub settings describe (and of launches placed before there
# were names: their column is NULL).
DEFAULT = "default"


class BadHubs(ValueError):
    """HUBLAUNCH_HUBS does not describe a list of Hubs; the message says what to fix."""


@dataclass(frozen=True)
class Hub:
    name: str
    api_url: str
    # The app's processes are given the list without tokens (they only ask whether a Hub
    # answers); the worker refuses to start without one (worker/context.py).
    api_token: str
    public_url: str
    # Active sessions it may hold; 0: only the service-wide caps apply.
    capacity: int = 0

    def __repr__(self) -> str:  # the token stays out of logs and tracebacks
        return f"Hub({self.name!r}, {self.api_url!r}, capacity={self.capacity})"


def hubs(settings: Settings) -> tuple[Hub, ...]:
    """The Hubs in order (the first takes launches of a NULL ``hub``: older rows)."""
    return parse(
        settings.hubs,
        settings.hub_api_url,
        settings.hub_api_token.get_secret_value(),
        settings.public_url,
    )


def by_name(settings: Settings) -> dict[str, Hub]:
    return {hub.name: hub for hub in hubs(settings)}


def hub_of(settings: Settings, name: str | None) -> Hub:
    """The Hub a launch was placed on (``None``, or a name no longer configured: the first)."""
    found = hubs(settings)
    return next((hub for hub in found if hub.name == name), found[0])


def per_hub_builds(settings: Settings) -> bool:
    """Local environments (the venv builder) with several Hubs: an environment is used by the
    spawner on its own machine, so each Hub's machine builds the environments of the launches
    placed on it, from a build queue of its own (images in a registry serve every Hub)."""
    return settings.builder == "venv" and len(hubs(settings)) > 1


def build_queue(settings: Settings, hub: str) -> str:
    """The queue of the builds for ``hub`` (served by a worker on that Hub's machine)."""
    return f"{settings.build_queue}.{hub}"


@functools.cache
def parse(text: str, api_url: str, token: str, public_url: str) -> tuple[Hub, ...]:
    if not text.strip():
        return (Hub(DEFAULT, api_url.rstrip("/"), token, public_url.rstrip("/")),)
    try:
        items = json.loads(text)
    except ValueError as e:
        raise BadHubs(f"HUBLAUNCH_HUBS must be a JSON list of objects: {e}") from e
    if not isinstance(items, list) or not items:
        raise BadHubs("HUBLAUNCH_HUBS must be a non-empty JSON list of objects")
    found: list[Hub] = []
    for index, item in enumerate(items):
        found.append(_hub(index, item))
    names = [hub.name for hub in found]
    if len(set(names)) != len(names):
        raise BadHubs(f"HUBLAUNCH_HUBS: names must be unique ({', '.join(names)})")
    return tuple(found)


def _hub(index: int, item: object) -> Hub:
    where = f"HUBLAUNCH_HUBS[{index}]"
    if not isinstance(item, dict):
        raise BadHubs(f"{where} must be an object with name, api_url, api_token, public_url")
    unknown = set(item) - {"name", "api_url", "api_token", "public_url", "capacity"}
    if unknown:
        raise BadHubs(f"{where}: unknown keys {sorted(unknown)}")
    values: dict[str, str] = {}
    for key in ("name", "api_url", "public_url"):
        value = item.get(key)
        if not isinstance(value, str) or not value:
            raise BadHubs(f"{where}: {key} must be a non-empty string")
        values[key] = value
    token = item.get("api_token", "")
    if not isinstance(token, str):
        raise BadHubs(f"{where}: api_token must be a string")
    values["api_token"] = token
    if not NAME_RE.match(values["name"]):
        raise BadHubs(f"{where}: name must be lower-case letters, digits and '-' (<= 63)")
    for key in ("api_url", "public_url"):
        if not values[key].startswith(("http://", "https://")):
            raise BadHubs(f"{where}: {key} must be an http(s) URL")
    capacity = item.get("capacity", 0)
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
        raise BadHubs(f"{where}: capacity must be a whole number >= 0")
    return Hub(
        name=values["name"],
        api_url=values["api_url"].rstrip("/"),
        api_token=values["api_token"],
        public_url=values["public_url"].rstrip("/"),
        capacity=capacity,
    )
