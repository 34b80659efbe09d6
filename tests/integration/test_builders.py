"""The builders on their own: the venv builder for real (git, venv, pip), repo2docker's command
line, log relay and registry check (against a plain HTTP stand-in for the registry v2 API)."""

from __future__ import annotations

import base64
import contextlib
import os
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
    assert_sealed(path)
    assert builder.remove(name) == size
    assert not builder.exists(name) and builder.remove(name) == 0


def assert_sealed(path: Path) -> None:
    """Built in a box as the build uid, the environment ends up root's: sessions (other uids)
    read it, and neither they nor a later build can change it."""
    for folder, dirs, files in os.walk(path):
        for entry in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
            info = os.lstat(entry)
            assert info.st_uid == 0 and info.st_gid == 0, entry
            if not stat.S_ISLNK(info.st_mode):
                assert info.st_mode & 0o7022 == 0, entry  # no write but root's, no set-id bits
                assert info.st_mode & 0o004, entry
                if stat.S_ISDIR(info.st_mode):
                    assert info.st_mode & 0o001, entry


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

    # A build backend of the repository's that never returns (and starts a daemon first):
    # the deadline ends the whole box, whatever runs in it.
    slow = git_server.commit(
        "limits",
        {
            "requirements.txt": ".\n",
            "pyproject.toml": (
                "[build-system]\nrequires = []\nbuild-backend = 'slow'\nbackend-path = ['.']\n"
            ),
            "slow.py": (
                "import os, subprocess, time\n"
                "def get_requires_for_build_wheel(config_settings=None):\n"
                "    subprocess.Popen(['sleep', '600'], start_new_session=True)\n"
                "    time.sleep(600)\n"
            ),
        },
    )
    hasty = VenvBuilder(venv_settings(tmp_path, build_timeout=6))
    started = time.monotonic()
    with pytest.raises(BuildFailed, match="took longer than allowed"):
        hasty.build("limits-hasty", url, slow, lambda _line: None)
    assert time.monotonic() - started < 20
    assert not hasty.exists("limits-hasty")
    assert not [p for p in hasty.root.iterdir() if p.name.startswith(".tmp-")]
    assert_nothing_left_running(hasty.settings.build_uid, "limits-hasty")


def assert_nothing_left_running(uid: int, name: str) -> None:
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError):
            uids = next(line for line in status.read_text().splitlines() if line[:4] == "Uid:")
            assert str(uid) not in uids.split()[1:], f"{status.parent} runs as the build uid"
    assert not list(Path("/sys/fs/cgroup").glob(f"*/hublaunch/build-{name}-*"))


def test_a_package_from_the_index_installs_through_the_egress_proxy(
    tmp_path: Path, git_server: GitServer
) -> None:
    # The box has no network but the proxy, which lets pip reach pypi.org and its files host.
    commit = git_server.commit("reach", {"requirements.txt": "cowsay==6.1\n"})
    builder = VenvBuilder(venv_settings(tmp_path))
    lines: list[str] = []
    builder.build("reach", git_server.url("reach"), commit, lines.append)

    path = builder.path("reach")
    cowsay = subprocess.run(
        [str(path / "bin" / "cowsay"), "-t", "boxed"], capture_output=True, text=True, check=True
    )
    assert "boxed" in cowsay.stdout  # its script points at the environment's final place
    assert any("cowsay-6.1" in line for line in lines)
    assert_sealed(path)
    assert_nothing_left_running(builder.settings.build_uid, "reach")


def test_where_no_sandbox_can_be_made_an_allowed_build_runs_as_the_worker(
    tmp_path: Path, git_server: GitServer
) -> None:
    # HUBLAUNCH_ALLOW_UNSANDBOXED_BUILDS (a trusted laptop): the old path, no box at all.
    commit = git_server.commit("unboxed", {"requirements.txt": ""})
    builder = VenvBuilder(
        venv_settings(tmp_path, allow_unsandboxed_builds=True),
        sandbox_missing=lambda: "no bwrap here",
    )
    lines: list[str] = []
    builder.build("unboxed", git_server.url("unboxed"), commit, lines.append)
    assert builder.exists("unboxed") and any("Fetching" in line for line in lines)
    assert_sealed(builder.path("unboxed"))


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
