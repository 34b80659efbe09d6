"""Request and response bodies of the JSON API."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from worker.models import Status

# Docker's reference grammar, simplified: lower-case path components, optional :tag, no digest.
IMAGE_RE = re.compile(
    r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?::[0-9]+)?"
    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$"
)
MAX_IMAGE_LENGTH = 255


class LaunchRequest(BaseModel):
    """Either ``image`` (a ready image) or ``repo`` + ``ref`` (built by hublaunch)."""

    # Strict: no coercion, so "lifetime": true or "60" is refused rather than read as 1 or 60,
    # and image/repo/ref must be JSON strings.
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, strict=True)

    image: str | None = Field(
        None, description="A ready image, `name[:tag]`, e.g. `default`.", examples=["default"]
    )
    repo: str | None = Field(
        None, description="A git repository URL, or `gh:owner/repo` / `gl:owner/repo`."
    )
    ref: str | None = Field(None, description="Branch, tag or commit of `repo` (default HEAD).")
    lifetime: int | None = Field(
        None, gt=0, description="Seconds the session may live; at most the service's maximum."
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
        if self.image is not None:
            return {"image": self.image}
        return {"repo": self.repo, "ref": self.ref or "HEAD"}


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
