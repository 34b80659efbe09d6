"""Builders turn (repository, commit) into something the Hub's spawner can run.

``venv`` builds a Python environment on this machine (no Docker); ``repo2docker`` builds and
pushes an image. Both name what they build with ``environment_name``, a deterministic function
of (repo, commit, builder version): the cache key that makes a second launch skip the build.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Protocol
from urllib.parse import urlsplit

from worker.settings import Settings

Log = Callable[[str], None]
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,200}$")


class BuildFailed(Exception):
    """The build ran and failed; ``tail`` holds the last lines of its output."""

    def __init__(self, message: str, tail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.tail = tail


class Builder(Protocol):
    version: str

    def exists(self, name: str) -> bool:
        """Whether a finished environment/image of this name is available."""

    def image(self, name: str) -> str:
        """What the spawner's ``user_options["image"]`` gets for this environment."""

    def build(self, name: str, repo: str, commit: str, log: Log) -> int:
        """Build it (raising BuildFailed); returns its size in bytes (0 if unknown)."""

    def remove(self, name: str) -> int:
        """Delete a built environment; returns the bytes freed."""

    def sizes(self) -> dict[str, int]:
        """Sizes of the environments present, by name (empty where not measurable)."""


def environment_name(
    repo: str, commit: str, builder_version: str, *, hub: str | None = None
) -> str:
    """``<slug>-<repo hash>-<commit>-<builder version>[-<hub>]``: lower-case [a-z0-9-], safe as
    a directory name and as an image repository name. ``hub``: built on that Hub's machine,
    for it alone (per-Hub builds, worker/hubs.py)."""
    path = urlsplit(repo).path.rstrip("/").removesuffix(".git")
    slug = re.sub(r"[^a-z0-9]+", "-", path.rsplit("/", 2)[-1].lower()).strip("-")[:40] or "repo"
    digest = hashlib.sha256(repo.encode()).hexdigest()[:10]
    version = re.sub(r"[^a-z0-9]+", "-", builder_version.lower())
    return f"{slug}-{digest}-{commit.lower()}-{version}" + (f"-{hub}" if hub else "")


def make_builder(settings: Settings) -> Builder:
    if settings.builder == "repo2docker":
        from worker.builders.repo2docker import Repo2DockerBuilder

        return Repo2DockerBuilder(settings)
    from worker.builders.venv import VenvBuilder

    return VenvBuilder(settings)
