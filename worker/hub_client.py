"""A typed client for the JupyterHub REST API, with its own errors.

Exception tree (nothing else escapes; no httpx error is raised to callers)::

    HubError                 base class
    ├── HubUnavailable       transient: connection refused/reset, timeout, 5xx, 429.
    │                        Safe to retry; ``retry_after`` (s) is set when the Hub said so.
    └── HubRequestError      terminal: the Hub understood and refused (4xx).
        ├── HubNotFound      404
        ├── HubConflict      409 (e.g. the user already exists)
        └── HubSpawnFailed   the server failed to start (progress said "failed")

The service token is sent only in the Authorization header; it is never logged and never
part of a URL. Tokens the Hub creates for users are returned to the caller and never logged.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

import httpx

from worker.metrics import Observation, observation

log = logging.getLogger(__name__)

PAGINATION_MEDIA_TYPE = "application/jupyterhub-pagination+json"
# Longer than JupyterHub's slow_stop_timeout (10 s), after which it answers a stop with 202.
STOP_REQUEST_TIMEOUT = 30.0


class HubError(Exception):
    """Any failure talking to the Hub."""

    def __init__(self, message: str, *, status: int | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        # The Hub's own words, without our framing: safe to show to the person launching.
        self.detail = detail or message


class HubUnavailable(HubError):
    """Transient trouble; the same call may succeed later."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        detail: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, detail=detail)
        self.retry_after = retry_after


class HubRequestError(HubError):
    """The Hub refused the request; repeating it will not help."""


class HubNotFound(HubRequestError):
    pass


class HubConflict(HubRequestError):
    pass


class HubSpawnFailed(HubRequestError):
    pass


@dataclass(frozen=True)
class ServerState:
    ready: bool
    pending: str | None
    url: str | None
    last_activity: datetime | None


@dataclass(frozen=True)
class HubUser:
    name: str
    admin: bool
    servers: dict[str, ServerState]
    last_activity: datetime | None
    created: datetime | None = None


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _parse_user(model: dict[str, Any]) -> HubUser:
    servers = {
        name: ServerState(
            ready=bool(s.get("ready")),
            pending=s.get("pending"),
            url=s.get("url"),
            last_activity=_parse_time(s.get("last_activity")),
        )
        for name, s in (model.get("servers") or {}).items()
    }
    return HubUser(
        name=model["name"],
        admin=bool(model.get("admin")),
        servers=servers,
        last_activity=_parse_time(model.get("last_activity")),
        created=_parse_time(model.get("created")),
    )


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return response.reason_phrase


def raise_for_status(response: httpx.Response) -> None:
    """Map a Hub response to the exception tree (no-op on 2xx)."""
    status = response.status_code
    if status < 400:
        return
    detail = _message(response)
    message = f"Hub answered {status}: {detail}"
    if status == 429 or status >= 500:
        raise HubUnavailable(
            message, status=status, detail=detail, retry_after=_retry_after(response)
        )
    if status == 404 and not _from_the_hub(response):
        # configurable-http-proxy's own 404: it has no route for /hub/api/ yet (it starts
        # before the Hub registers one). Read as "no such user", it failed launches and would
        # make a deletion look done; it is the Hub being away.
        raise HubUnavailable(
            f"Hub not routed yet (the proxy answered {status})", status=503, detail=NOT_ROUTED
        )
    error = {404: HubNotFound, 409: HubConflict}.get(status, HubRequestError)
    raise error(message, status=status, detail=detail)


NOT_ROUTED = "the Hub is starting"


def _from_the_hub(response: httpx.Response) -> bool:
    """JupyterHub's API answers errors as JSON ``{"status": ..., "message": ...}``."""
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("status") == response.status_code


class HubClient:
    """Synchronous client; one per process (httpx pools connections and is thread-safe)."""

    def __init__(
        self,
        api_url: str,
        token: str,
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        observe: Callable[[list[Observation]], None] | None = None,
        name: str = "default",
    ) -> None:
        self.name = name  # the Hub's name (worker/hubs.py): its metrics' label
        # Each request's endpoint family, status code and latency go here (the worker's metrics).
        self._observe = observe
        self._http = httpx.Client(
            base_url=api_url.rstrip("/") + "/",
            # No token: only what the Hub answers anyone (the API's health check).
            headers={"Authorization": f"token {token}"} if token else {},
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        started = time.perf_counter()
        code = "error"
        try:
            response = self._http.request(method, path, **kwargs)
            code = str(response.status_code)
        except httpx.TimeoutException as e:
            code = "timeout"
            raise HubUnavailable(f"Hub timed out on {method} /{_path_only(path)}") from e
        except httpx.TransportError as e:
            raise HubUnavailable(f"Hub unreachable: {type(e).__name__}") from e
        finally:
            if self._observe is not None:
                family = endpoint_family(method, path)
                self._observe(
                    [
                        observation(
                            "hublaunch_hub_requests", hub=self.name, family=family, code=code
                        ),
                        observation(
                            "hublaunch_hub_request_seconds",
                            time.perf_counter() - started,
                            hub=self.name,
                            family=family,
                        ),
                    ]
                )
        raise_for_status(response)
        return response

    # -- users ---------------------------------------------------------------

    def get_user(self, name: str) -> HubUser | None:
        try:
            return _parse_user(self._request("GET", f"users/{quote(name)}").json())
        except HubNotFound:
            return None

    def create_user(self, name: str) -> bool:
        """Create the user; False if it already existed (a retry after a lost answer)."""
        try:
            self._request("POST", f"users/{quote(name)}")
        except HubConflict:
            return False
        return True

    def delete_user(self, name: str) -> bool:
        """Delete the user; False if it was already gone."""
        try:
            # Deleting a user with a running server stops it first (same wait as a stop).
            self._request("DELETE", f"users/{quote(name)}", timeout=STOP_REQUEST_TIMEOUT)
        except HubNotFound:
            return False
        return True

    def iter_users(self, *, name_filter: str = "", page_size: int = 200) -> Iterator[HubUser]:
        """All users (whose name contains ``name_filter``), read in pages.

        Without the pagination media type the Hub silently stops at its page limit (200).
        """
        offset = 0
        while True:
            params: dict[str, str | int] = {"offset": offset, "limit": page_size}
            if name_filter:
                params["name_filter"] = name_filter
            response = self._request(
                "GET", "users", params=params, headers={"Accept": PAGINATION_MEDIA_TYPE}
            )
            body = response.json()
            for item in body["items"]:
                yield _parse_user(item)
            next_page = body.get("_pagination", {}).get("next")
            if not next_page:
                return
            offset = int(next_page["offset"])

    def stopped_reason(self, name: str) -> str:
        """Why the user's default server stopped, as its spawner recorded it ('' if unknown).

        Stopped servers' spawner state is shown only with ``include_stopped_servers`` and to
        holders of the ``admin:server_state`` scope.
        """
        try:
            response = self._request(
                "GET", f"users/{quote(name)}", params={"include_stopped_servers": "1"}
            )
        except HubNotFound:
            return ""
        server = (response.json().get("servers") or {}).get("") or {}
        return str((server.get("state") or {}).get("end_reason") or "")

    # -- servers -------------------------------------------------------------

    def start_server(self, name: str, user_options: dict[str, Any]) -> bool:
        """Ask for the default server. True when it is ready already, False when pending.

        "already running" on a retry counts as ready; "pending spawn" (a run that died while
        the Hub was starting it, sent again) as pending; "pending stop" (the last try's server
        still stopping) as a Hub to wait for.
        """
        try:
            response = self._request(
                "POST", f"users/{quote(name)}/server", json={"user_options": user_options}
            )
        except HubRequestError as e:
            if e.status == 400 and "already running" in e.detail:
                return True
            if e.status == 400 and "is pending spawn" in e.detail:
                return False
            if e.status == 400 and "is pending stop" in e.detail:
                raise HubUnavailable(e.message, status=e.status, detail=e.detail) from e
            raise
        return response.status_code == 201

    def stop_server(self, name: str, server_name: str = "") -> bool:
        """Stop a server; True when stopped (or already gone), False while it is stopping."""
        path = (
            f"users/{quote(name)}/servers/{quote(server_name)}"
            if server_name
            else (f"users/{quote(name)}/server")
        )
        try:
            # The Hub waits up to its slow_stop_timeout (10 s) before answering 202: give it
            # longer than that, and read a timeout as "still stopping", not as an outage.
            response = self._request("DELETE", path, timeout=STOP_REQUEST_TIMEOUT)
        except HubNotFound:
            return True
        except HubUnavailable as e:
            if isinstance(e.__cause__, httpx.TimeoutException):
                return False
            raise
        return response.status_code != 202

    def wait_ready(
        self,
        name: str,
        *,
        timeout: float,
        on_progress: Callable[[str], None] | None = None,
    ) -> str:
        """Follow the Hub's progress stream until the server is ready; return its URL path."""
        deadline = time.monotonic() + timeout
        try:
            with self._http.stream(
                "GET",
                f"users/{quote(name)}/server/progress",
                headers={"Accept": "text/event-stream"},
                timeout=httpx.Timeout(self._http.timeout.connect, read=max(timeout, 1.0)),
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise_for_status(response)
                for line in response.iter_lines():
                    if time.monotonic() > deadline:
                        break
                    if not line.startswith("data:"):
                        continue
                    event = json.loads(line[5:])
                    if event.get("failed"):
                        detail = str(event.get("message") or "Spawn failed")
                        raise HubSpawnFailed(f"progress: {detail}", detail=detail)
                    if event.get("ready"):
                        return str(event["url"])
                    if on_progress and event.get("message"):
                        on_progress(str(event["message"]))
        except httpx.TimeoutException as e:
            raise HubUnavailable("Server did not become ready in time") from e
        except httpx.TransportError as e:
            raise HubUnavailable(f"Hub unreachable: {type(e).__name__}") from e
        raise HubUnavailable("Progress stream ended before the server was ready")

    # -- tokens and health ---------------------------------------------------

    def create_token(self, name: str, *, scopes: list[str], expires_in: int, note: str) -> str:
        """Issue a token for the user; the plaintext is returned once and never logged."""
        response = self._request(
            "POST",
            f"users/{quote(name)}/tokens",
            json={"scopes": scopes, "expires_in": expires_in, "note": note},
        )
        return str(response.json()["token"])

    def record_activity(self, name: str, when: datetime, server: str = "") -> None:
        """Report activity for a user's server (what a running server does by itself)."""
        stamp = when.isoformat().replace("+00:00", "Z")
        self._request(
            "POST",
            f"users/{quote(name)}/activity",
            json={"last_activity": stamp, "servers": {server: {"last_activity": stamp}}},
        )

    def ping(self) -> None:
        """Raise HubError unless the Hub API answers and accepts our token."""
        self._request("GET", "user")

    def answers(self) -> None:
        """Raise HubError unless the Hub API answers (``GET /hub/api/``, open to anyone)."""
        self._request("GET", "")


def endpoint_family(method: str, path: str) -> str:
    """A request's endpoint as the metrics name it: the method and the path's shape, never a
    user name (``POST users/{name}/tokens`` -> ``POST /users/:name/tokens``)."""
    parts = _path_only(path).strip("/").split("/")
    if parts[0] == "users" and len(parts) > 1:
        parts[1] = ":name"
        if len(parts) > 3 and parts[2] == "servers":
            parts[3] = ":server"
    return f"{method} /{'/'.join(parts[:5])}"


def _path_only(path: str) -> str:
    return path.split("?", 1)[0]
