"""Images built by repo2docker and pushed to a registry (Docker deployments)."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections import deque
from urllib.parse import quote

import httpx

from worker import sources
from worker.builders import BuildFailed, Log
from worker.settings import Settings

# Without these, a registry answers 404 for an image pushed as an OCI manifest (measured).
MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
TAIL_LINES = 40


class Repo2DockerBuilder:
    version = "r2d-1"

    def __init__(self, settings: Settings, executable: str = "repo2docker") -> None:
        self.settings = settings
        self.executable = executable

    def image(self, name: str) -> str:
        return f"{self.settings.image_prefix}{name}:latest"

    def command(self, name: str, repo: str, commit: str) -> list[str]:
        argv = [
            self.executable,
            "--no-run",
            "--json-logs",
            "--image-name",
            self.image(name),
            "--ref",
            commit,
        ]
        if self.settings.registry_push:
            argv.append("--push")
        return [*argv, "--", repo]

    def exists(self, name: str) -> bool:
        """Ask the registry (v2 API) whether the image's manifest is there."""
        if not self.settings.registry_url:
            return False
        reference = self.image(name)
        repository, _, tag = reference.rpartition(":")
        host_prefix = self.settings.image_prefix.split("/", 1)[0]
        if "." in host_prefix or ":" in host_prefix:  # the prefix names the registry host
            repository = repository.split("/", 1)[1]
        url = f"{self.settings.registry_url.rstrip('/')}/v2/{repository}/manifests/{quote(tag)}"
        try:
            response = httpx.head(url, headers={"Accept": MANIFEST_TYPES}, timeout=10)
        except httpx.HTTPError as e:
            raise BuildFailed(f"the registry did not answer: {type(e).__name__}") from e
        if response.status_code == 404:
            return False
        if response.status_code >= 400:
            raise BuildFailed(f"the registry answered {response.status_code} for {reference}")
        return True

    def build(self, name: str, repo: str, commit: str, log: Log) -> int:
        if shutil.which(self.executable) is None:
            raise BuildFailed(f"{self.executable} is not installed on this worker")
        if sources.is_record(repo):
            # repo2docker would fetch the record itself, past the SSRF rules and size limits
            # the venv builder's fetch holds it to.
            raise BuildFailed("data records are built by the venv builder only")
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        proc = subprocess.Popen(
            self.command(name, repo, commit),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        timer = threading.Timer(self.settings.build_timeout, proc.kill)
        started = time.monotonic()
        timer.start()
        try:
            for raw in proc.stdout or ():  # always a pipe: stdout=PIPE above
                line = _message(raw)
                if line:
                    tail.append(line)
                    log(line)
            code = proc.wait()
        finally:
            timer.cancel()
        if time.monotonic() - started >= self.settings.build_timeout:
            raise BuildFailed("the build took longer than allowed", "\n".join(tail))
        if code != 0:
            raise BuildFailed(f"repo2docker failed (exit {code})", "\n".join(tail))
        return 0

    def remove(self, name: str) -> int:
        return 0  # images live in the registry; its own retention policy applies

    def sizes(self) -> dict[str, int]:
        return {}


def _message(raw: str) -> str:
    """repo2docker --json-logs prints one JSON object per line; relay its message."""
    raw = raw.strip()
    if not raw:
        return ""
    try:
        event = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(event, dict):
        return str(event.get("message", "")).rstrip()
    return raw
