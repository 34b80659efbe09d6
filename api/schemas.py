"""Request and response bodies of the JSON API."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from worker import repos
from worker.models import Phase, Status

# Docker's reference grammar, simplified: lower-case path components, optional :tag, no digest.
IMAGE_RE = re.compile(
    r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?::[0-9]+)?"
    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$"
)
MAX_IMAGE_LENGTH = 255
# What _one_kind enforces, said in the JSON schema so that clients (and schemathesis, which
# generates requests from it) know: a string image and no repo or ref, or a string repo and no
# image. A field given as null counts as absent, as the model reads it.
ONE_KIND: dict[str, Any] = {
    "oneOf": [
        {
            "title": "A ready image",
            "required": ["image"],
            "properties": {
                "image": {"type": "string"},
                "repo": {"type": "null"},
                "ref": {"type": "null"},
            },
        },
        {
            "title": "A repository, built by hublaunch",
            "required": ["repo"],
            "properties": {"repo": {"type": "string"}, "image": {"type": "null"}},
        },
    ]
}


class LaunchRequest(BaseModel):
    """Either ``image`` (a ready image) or ``repo`` + ``ref`` (built by hublaunch)."""

    # Strict: no coercion, so "lifetime": true or "60" is refused rather than read as 1 or 60,
    # and image/repo/ref must be JSON strings.
    model_config = ConfigDict(
        extra="forbid", str_strip_whitespace=True, strict=True, json_schema_extra=ONE_KIND
    )

    image: str | None = Field(
        None,
        description="A ready image, `name[:tag]`, e.g. `default`. Not with `repo` or `ref`.",
        examples=["default"],
        json_schema_extra={"maxLength": MAX_IMAGE_LENGTH, "pattern": IMAGE_RE.pattern},
    )
    repo: str | None = Field(
        None,
        description="A git repository URL, `gh:owner/repo`, `gl:owner/repo`, `gist:user/id`, "
        "or a data record: `zenodo:<DOI>`, `figshare:<DOI>`, `dataverse:<DOI>`, "
        "`hydroshare:<resource id>`, `ckan:<dataset URL>`. Not with `image`.",
        examples=["gh:binder-examples/requirements"],
        json_schema_extra={"maxLength": repos.MAX_URL},
    )
    ref: str | None = Field(
        None,
        description="Branch, tag or commit of `repo` (default HEAD); only with `repo`.",
        json_schema_extra={"maxLength": 255},
    )
    lifetime: int | None = Field(
        None, gt=0, description="Seconds the session may live; at most the service's maximum."
    )
    build_only: bool = Field(
        False,
        description="Build the environment (or find it built) and start no server: the launch "
        "ends with a `ready` event naming the image, without URL or token (pre-building from "
        "CI, as BinderHub's `?build_only=true`).",
    )

    @field_validator("image")
    @classmethod
    def _image_name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value:
            raise ValueError("image must not be empty; name a ready image such as 'default'")
        if len(value) > MAX_IMAGE_LENGTH:
            raise ValueError(f"image names are at most {MAX_IMAGE_LENGTH} characters")
        if not IMAGE_RE.match(value):
            raise ValueError(
                "image must look like 'name' or 'registry/name:tag' "
                "(lower-case letters, digits, '.', '_', '-', '/')"
            )
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> LaunchRequest:
        if (self.image is None) == (self.repo is None):
            raise ValueError("give exactly one of 'image' or 'repo'")
        if self.image is not None and self.ref is not None:
            raise ValueError("'ref' goes with 'repo', not with 'image'")
        return self

    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = (
            {"image": self.image}
            if self.image is not None
            else {"repo": self.repo, "ref": self.ref or "HEAD"}
        )
        return {**spec, "build_only": True} if self.build_only else spec


class LaunchAccepted(BaseModel):
    id: str
    status: Status
    status_url: str
    events_url: str


class LaunchView(BaseModel):
    id: str
    status: Status
    spec: dict[str, Any]
    user: str | None
    url: str | None = Field(None, description="The server URL with its token, while ready.")
    error: str | None
    end_reason: str | None
    created_at: datetime
    ready_at: datetime | None
    expires_at: datetime | None
    ended_at: datetime | None


class Problem(BaseModel):
    detail: str


# One Server-Sent Event of a launch's stream (OpenAPI 3.1: the media type's schema describes
# each event); its data is a JSON object with BinderHub's phase names.
EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "id": {"type": "string", "description": "Where to resume (send it as Last-Event-ID)."},
        "event": {"type": "string"},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {
                "type": "object",
                "required": ["phase"],
                "properties": {
                    "phase": {"type": "string", "enum": [p.value for p in Phase]},
                    "message": {"type": ["string", "null"]},
                },
            },
        },
    },
}


def event_stream_response(description: str) -> dict[str, Any]:
    """A ``responses=`` entry for a text/event-stream answer."""
    return {"description": description, "content": {"text/event-stream": {"schema": EVENT_SCHEMA}}}


# Statuses routes declare in their ``responses=`` (what they answer besides success), so that
# the OpenAPI document lists every status a client can get.
ResponsesDoc = dict[int | str, dict[str, Any]]
RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before the next request.",
        "schema": {"type": "integer", "minimum": 0},
    }
}
RATE_LIMITED: ResponsesDoc = {
    429: {
        "model": Problem,
        "description": "Too many requests from this client; try again after `Retry-After`.",
        "headers": RETRY_AFTER,
    }
}
# /build says no as BinderHub does, with one failed event, under the 429 status.
RATE_LIMITED_STREAM: ResponsesDoc = {
    429: {
        "description": "Too many launches from this client: one `failed` event; try again "
        "after `Retry-After`.",
        "headers": RETRY_AFTER,
        "content": {"text/event-stream": {"schema": EVENT_SCHEMA}},
    }
}
QUEUE_DOWN: ResponsesDoc = {
    503: {"model": Problem, "description": "The queue is unavailable; send the request again."}
}
BANNED: ResponsesDoc = {
    403: {"model": Problem, "description": "This repository is not allowed on this service."}
}


class Health(BaseModel):
    status: str
    checks: dict[str, str]


class AdminSession(BaseModel):
    """A launch as operators see it: never its token, nor the server URL that carries one."""

    id: str
    status: Status
    spec: dict[str, Any]
    user: str | None = Field(description="The Hub user name, once chosen.")
    created_at: datetime
    ready_at: datetime | None
    expires_at: datetime | None
    ended_at: datetime | None
    end_reason: str | None
    error: str | None


class AdminSessionPage(BaseModel):
    items: list[AdminSession]
    next: str | None = Field(
        description="The cursor of the next (older) page, for `before`; null on the last page."
    )
    next_url: str | None = Field(description="The next page's URL, with the same filters.")


class AdminSpecCount(BaseModel):
    spec: str = Field(description='The image, or "<repo URL>@<ref>"; "other" for the rest.')
    count: int


class AdminSummary(BaseModel):
    now: datetime
    window: int = Field(description="Seconds the figures below cover, up to `now`.")
    active: int = Field(description="Sessions ready now.")
    active_by_spec: list[AdminSpecCount] = Field(
        description='Ready sessions by spec: the 20 most frequent, then "other".'
    )
    launches: int = Field(description="Launches created in the window.")
    launches_per_minute: float
    finished: int = Field(description="Launches that failed or ended in the window.")
    failed: int
    failure_rate: float | None = Field(description="failed / finished; null when none finished.")
    ready: int = Field(description="Launches that became ready in the window (at most 10,000).")
    time_to_ready_p50: float | None = Field(description="Seconds from created to ready.")
    time_to_ready_p95: float | None


class AdminPool(BaseModel):
    """One warm pool (``HUBLAUNCH_POOL``): how many servers it keeps, and holds now."""

    pool: str = Field(description='What launches it serves: "image:<name>" or "repo:<url>@<ref>".')
    spec: dict[str, Any] = Field(description="The spec its servers are started with.")
    size: int = Field(
        description="Servers it keeps ready now: the setting's size, or for a pool sized by "
        "demand what its recent launches call for, between minimum and maximum."
    )
    minimum: int = Field(description="The setting's lower bound (its size, for a fixed pool).")
    maximum: int = Field(description="The setting's upper bound (its size, for a fixed pool).")
    launches_in_window: int | None = Field(
        description="A pool sized by demand: visitors' launches of its spec in the last "
        "HUBLAUNCH_POOL_DEMAND_WINDOW seconds. Null for a fixed pool."
    )
    start_seconds: float | None = Field(
        description="A pool sized by demand: the median time its servers took to start in that "
        "window (null when none started in it; the size then assumes 10 s)."
    )
    ready: int = Field(description="Servers running and never used, waiting for a launch.")
    starting: int = Field(description="Servers being started to refill it.")
