"""The builders on their own: the venv builder for real (git, venv, pip), repo2docker's command
line, log relay and registry check (against a plain HTTP stand-in for the registry v2 API)."""

from __future__ import annotations

import base64
import os
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from tests.integration.gitserver import GitServer
from worker.builders import BuildFailed, environment_name
from worker.builders.repo2docker import MANIFEST_TYPES, Repo2DockerBuilder
from worker.builders.venv import MARKER, VenvBuilder
from worker.settings import Settings

pytestmark = pytest.mark.integration


def venv_settings(tmp_path: Path, **overrides: object) -> Settings:
    return Settings(allow_local_repos=True, envs_dir=tmp_path / "envs", **overrides)  # type: ignore[arg-type]


def test_an_empty_requirements_file_builds_in_seconds_and_is_renamed_into_place(
    tmp_path: Path, git_server: GitServer
) -> None:
    commit = git_server.commit("empty", {"requirements.txt": ""})
    builder = VenvBuilder(venv_settings(tmp_path))
    name = environment_name(git_server.url("empty"), commit, builder.version)
    lines: list[str] = []

    size = builder.build(name, git_server.url("empty"), commit, lines.append)

    path = builder.path(name)
    assert builder.exists(name) and (path / MARKER).is_file() and size > 0
    assert [p.name for p in builder.root.iterdir()] == [name]  # the temporary folder is gone
    # The environment sees the base's Jupyter server through its .pth layer.
    probe = subprocess.run(
        [str(path / "bin" / "python"), "-c", "import sys, jupyterhub; print(sys.prefix)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == str(path)
    assert any("Fetching" in line for line in lines)
    assert builder.remove(name) == size
    assert not builder.exists(name) and builder.remove(name) == 0


def test_the_build_timeout_and_clone_size_limit_are_enforced(
    tmp_path: Path, git_server: GitServer
) -> None:
    commit = git_server.commit(
        "limits",
        {"requirements.txt": "cowsay\n", "big": base64.b64encode(os.urandom(150_000)).decode()},
    )
    url = git_server.url("limits")
    small = VenvBuilder(venv_settings(tmp_path, clone_size_limit=50_000))
    with pytest.raises(BuildFailed, match="larger than 50000 bytes"):
        small.build("limits-small", url, commit, lambda _line: None)

    # A package index that accepts connections and never answers: pip waits until killed.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        index = f"http://127.0.0.1:{silent.getsockname()[1]}/simple"
        slow = git_server.commit(
            "limits", {"requirements.txt": f"--index-url {index}\nhublaunch-never-there\n"}
        )
        hasty = VenvBuilder(venv_settings(tmp_path, build_timeout=3))
        started = time.monotonic()
        with pytest.raises(BuildFailed, match="took longer than allowed"):
            hasty.build("limits-hasty", url, slow, lambda _line: None)
        assert time.monotonic() - started < 15
    assert not hasty.exists("limits-hasty")
    assert not [p for p in hasty.root.iterdir() if p.name.startswith(".tmp-")]


def test_repo2docker_command_line() -> None:
    builder = Repo2DockerBuilder(
        Settings(builder="repo2docker", image_prefix="registry.example/hl/", registry_push=True)
    )
    commit = "a" * 40
    name = environment_name("https://github.com/o/r", commit, builder.version)
    assert builder.command(name, "https://github.com/o/r", commit) == [
        "repo2docker",
        "--no-run",
        "--json-logs",
        "--image-name",
        f"registry.example/hl/{name}:latest",
        "--ref",
        commit,
        "--push",
        "--",
        "https://github.com/o/r",
    ]


def test_repo2docker_json_logs_are_relayed_and_failures_keep_the_tail(tmp_path: Path) -> None:
    fake = tmp_path / "repo2docker"
    fake.write_text(
        "#!/bin/sh\n"
        'echo \'{"phase": "building", "message": "Step 1/3 : FROM buildpack-deps"}\'\n'
        'echo \'{"phase": "building", "message": "ERROR: bad requirement"}\'\n'
        "exit 3\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    builder = Repo2DockerBuilder(Settings(builder="repo2docker"), executable=str(fake))
    lines: list[str] = []
    with pytest.raises(BuildFailed) as info:
        builder.build("x", "https://github.com/o/r", "a" * 40, lines.append)
    assert lines == ["Step 1/3 : FROM buildpack-deps", "ERROR: bad requirement"]
    assert info.value.message == "repo2docker failed (exit 3)"
    assert info.value.tail.endswith("ERROR: bad requirement")


class _Registry(BaseHTTPRequestHandler):
    """Answers HEAD /v2/<name>/manifests/<tag> like a registry holding OCI images: 404 unless
    the client accepts the OCI manifest types."""

    images: ClassVar[set[tuple[str, str]]] = set()
    seen_accept: ClassVar[list[str]] = []

    def do_HEAD(self) -> None:
        self.seen_accept.append(self.headers.get("Accept", ""))
        parts = self.path.split("/")
        name, tag = "/".join(parts[2:-2]), parts[-1]
        accepts_oci = "application/vnd.oci.image.manifest.v1+json" in self.headers.get("Accept", "")
        self.send_response(200 if (name, tag) in self.images and accepts_oci else 404)
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def registry() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_registry_is_asked_with_oci_and_docker_manifest_types(registry: str) -> None:
    settings = Settings(builder="repo2docker", registry_url=registry, image_prefix="hl/")
    builder = Repo2DockerBuilder(settings)
    name = environment_name("https://github.com/o/r", "b" * 40, builder.version)
    assert builder.exists(name) is False
    _Registry.images.add((f"hl/{name}", "latest"))
    assert builder.exists(name) is True
    accept = _Registry.seen_accept[-1]
    for media_type in MANIFEST_TYPES.split(", "):
        assert media_type in accept
    assert "application/vnd.docker.distribution.manifest.v2+json" in accept
