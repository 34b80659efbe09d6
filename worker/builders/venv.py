"""Python environments built from a repository's requirements.txt, on this machine.

Each environment is a venv layered on a base environment that has the Jupyter server (a .pth
file puts the base's site-packages on its path), so an empty requirements file builds in about
a second. It is built in a temporary folder and renamed into place only when complete; a
marker file says it is finished. The Hub's spawners run servers from it by name.

A repository is hostile, and pip runs its code (a local build backend, a setup.py). So every
command of a build runs in a box (``sandbox``) as the unprivileged build uid: the system, the
base environment and the machine's local package folders read-only, the build's work folder
read-write (at its own path: a venv's paths are absolute), an environment made from scratch
(no secret of the worker's), and only loopback, where ``egress`` serves a proxy that lets the
fetch reach the repository's host and pip the package index. The worker itself only lays out
the work folder, hands the finished tree to root (readable by the sessions' uids, writable by no
one else), writes the marker and renames it into place: it never runs what the repository
brought, nor reads it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import shutil
import stat
import subprocess
import sys
import sysconfig
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from sandbox import box as boxes
from sandbox.egress import Destination, normalize_host
from worker import providers, sources
from worker.builders import BuildFailed, Log
from worker.builders.boxed import CERT_VARIABLES, SYSTEM_PATH, Steps
from worker.periodic import every
from worker.repos import check_host, git_env, git_options
from worker.settings import Settings

logger = logging.getLogger(__name__)

MARKER = ".hublaunch-env"
REPO_DIR = "repo"
TAIL_LINES = 40
# pip settings that name local folders or files a box's pip must see (read-only).
PIP_PATH_KEYS = ("find-links", "index-url", "extra-index-url", "constraint", "cert", "client-cert")

# Creates the venv and its layer over the base environment (run in the box, by the base Python).
MAKE_ENV = """
import sys, venv
env, pth, base_site = sys.argv[1:]
venv.EnvBuilder(with_pip=False, symlinks=True).create(env)
with open(pth, "w") as f:
    f.write(base_site + "\\n")
"""
# Console scripts pip wrote name the temporary path in their #! line; point them home. Run in
# the box: the scripts are the repository's to write.
FIX_SCRIPTS = """
import os, sys
folder, old, new = sys.argv[1], sys.argv[2].encode(), sys.argv[3].encode()
for entry in os.scandir(folder):
    if not entry.is_file(follow_symlinks=False):
        continue
    with open(entry.path, "rb") as f:
        data = f.read()
    first, sep, rest = data.partition(b"\\n")
    if first.startswith(b"#!") and old in first:
        with open(entry.path, "wb") as f:
            f.write(first.replace(old, new, 1) + sep + rest)
"""


def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


class VenvBuilder:
    version = "venv-1"

    def __init__(
        self,
        settings: Settings,
        base_prefix: str | None = None,
        sandbox_missing: Callable[[], str | None] = boxes.unavailable,
    ) -> None:
        self.settings = settings
        self.root = settings.envs_dir.resolve()
        self.base_prefix = Path(base_prefix or sys.prefix)
        self.sandbox_missing = sandbox_missing

    def path(self, name: str) -> Path:
        return self.root / name

    def exists(self, name: str) -> bool:
        return (self.path(name) / MARKER).is_file()

    def image(self, name: str) -> str:
        return name

    def sizes(self) -> dict[str, int]:
        if not self.root.is_dir():
            return {}
        return {p.name: _dir_size(p) for p in self.root.iterdir() if (p / MARKER).is_file()}

    def remove(self, name: str) -> int:
        path = self.path(name)
        if not path.exists():
            return 0
        size = _dir_size(path)
        # Move aside first so a half-deleted directory is never mistaken for an environment.
        trash = self.root / f".trash-{name}-{secrets.token_hex(4)}"
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
        return size

    def build(self, name: str, repo: str, commit: str, log: Log) -> int:
        missing = self.sandbox_missing()
        if missing is not None and not self.settings.allow_unsandboxed_builds:
            raise BuildFailed(f"Builds run in a sandbox, which this server cannot make: {missing}")
        if missing is not None:
            logger.warning("building %s with no sandbox (the settings allow it): %s", name, missing)
        self.root.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(4)
        work = self.root / f".tmp-{name}-{token}"
        tail: deque[str] = deque(maxlen=TAIL_LINES)

        def emit(line: str) -> None:
            tail.append(line)
            log(line)

        try:
            boxed = missing is None
            _lay_out(work, self.settings.build_uid if boxed else None)
            steps = Steps(
                self.settings,
                work,
                emit,
                time.monotonic() + self.settings.build_timeout,
                box_name=f"build-{name}-{token}",
                mounts=self._mounts() if boxed else None,
            )
            return self._build(name, repo, commit, work, steps, emit)
        except BuildFailed as e:
            e.tail = e.tail or "\n".join(tail)
            raise
        except subprocess.SubprocessError as e:
            raise BuildFailed(f"build failed: {e}", "\n".join(tail)) from e
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _build(self, name: str, repo: str, commit: str, work: Path, steps: Steps, emit: Log) -> int:
        source, env, final = work / "src", work / "env", self.path(name)
        if sources.is_record(repo):
            self._fetch_record(repo, commit, work / "download", source, steps)
        else:
            self._fetch(repo, commit, source, steps)
        self._make_env(env, steps)
        requirements = self._requirements(source)
        if requirements is None:
            emit("No requirements.txt: the base environment is used as it is.")
        else:
            emit(f"Installing {requirements.relative_to(source)}")
            index = [Destination.parse(entry) for entry in self.settings.package_index_hosts]
            pip_env = {
                **steps.base_env(),
                **_pip_settings(self._python()),
                "PATH": f"{env / 'bin'}:{SYSTEM_PATH}",
            }
            steps.run(
                [
                    str(env / "bin" / "python"),
                    "-m",
                    "pip",
                    "install",
                    "--no-input",
                    "--disable-pip-version-check",
                    "--progress-bar",
                    "off",
                    "-r",
                    str(requirements),
                ],
                env=pip_env,
                cwd=source,
                egress=index,
                what="pip install",
            )
            steps.run(
                [self._python(), "-I", "-c", FIX_SCRIPTS, str(env / "bin"), str(env), str(final)],
                env=steps.base_env(),
                what="scripts",
            )
        # Nothing runs in the work folder any more: from here on the worker may touch it.
        _seal(source)
        _seal(env)
        # The repository's files go with the environment; each session starts with a copy.
        _remove(source / ".git")
        _remove(env / REPO_DIR)
        source.rename(env / REPO_DIR)
        _remove(env / MARKER)
        _create(env / MARKER, json.dumps({"repo": repo, "commit": commit, "builder": self.version}))
        try:
            env.rename(final)
        except OSError:
            if not self.exists(name):  # anything but "another build finished first"
                raise
        return _dir_size(final)

    def _python(self) -> str:
        return str(self.base_prefix / "bin" / "python")

    def _mounts(self) -> list[str | tuple[str, str]]:
        """What a build's box sees read-only besides the system: the base environment (and the
        Python it was made from) and the local folders the machine's pip settings name."""
        python = self._python()
        wanted = [
            str(self.base_prefix),
            sys.prefix,
            sys.base_prefix,
            str(Path(os.path.realpath(python)).parent.parent),
            *_pip_folders(python),
            *(os.environ[v] for v in CERT_VARIABLES if os.environ.get(v, "").startswith("/")),
        ]
        private = [self.root, self.settings.secret_key_file.resolve()]
        mounts: list[str] = []
        for path in dict.fromkeys(os.path.normpath(p) for p in wanted):
            shown_anyway = any(_within(Path(path), Path(system)) for system in boxes.SYSTEM)
            if shown_anyway or not os.path.exists(path):
                continue
            if any(_within(secret, Path(path)) for secret in private):
                logger.warning("not showing %s to builds: it holds the service's files", path)
                continue
            mounts.append(path)
        # A folder inside another one already shown needs no mount of its own.
        shown: list[str | tuple[str, str]] = [
            m for m in mounts if not any(o != m and _within(Path(m), Path(o)) for o in mounts)
        ]
        return shown

    def _fetch(self, repo: str, commit: str, source: Path, steps: Steps) -> None:
        addresses = check_host(repo, self.settings)  # again at fetch time: DNS may have changed
        git = ["git", *git_options(repo, addresses, self.settings)]
        env = {**git_env(), **steps.base_env()}
        steps.log(f"Fetching {repo} at {commit}")
        steps.run([*git, "init", "--quiet", str(source)], env=env, what="git init")
        steps.run(
            [*git, "-C", str(source), "remote", "add", "origin", "--", repo],
            env=env,
            what="git remote",
        )
        # The fetch reaches the repository's host, at the addresses just checked, and nothing else.
        parts = urlsplit(repo)
        host = normalize_host(parts.hostname or "")
        egress = None
        if host is not None and parts.scheme in ("http", "https"):
            port = parts.port or (443 if parts.scheme == "https" else 80)
            egress = [Destination(host, port, tuple(addresses))]
        guard = _SizeGuard(source, self.settings.clone_size_limit)
        fetch = [*git, "-C", str(source), "fetch", "--quiet"]
        try:
            with every(0.5, guard.check):
                try:
                    steps.run(
                        [*fetch, "--depth", "1", "origin", commit],
                        env=env,
                        egress=egress,
                        what="git fetch",
                    )
                except BuildFailed:
                    if guard.exceeded:
                        raise
                    # Servers that serve only advertised refs (or dumb HTTP) need a full fetch.
                    steps.log("Shallow fetch of the commit refused; fetching the whole repository")
                    steps.run([*fetch, "origin"], env=env, egress=egress, what="git fetch")
        except BuildFailed:
            if not guard.exceeded:
                raise
        guard.check()
        if guard.exceeded:
            raise BuildFailed(
                f"the repository is larger than {self.settings.clone_size_limit} bytes"
            )
        steps.run(
            [
                *git,
                "-C",
                str(source),
                "-c",
                "advice.detachedHead=false",
                "checkout",
                "--quiet",
                commit,
                "--",
            ],
            env=env,
            what="git checkout",
        )

    def _fetch_record(
        self, repo: str, fingerprint: str, download: Path, source: Path, steps: Steps
    ) -> None:
        """A data record: its files fetched by the worker (only bytes: every connection held to
        the SSRF rules, sizes and checksums checked), then copied or unzipped into the source
        folder in a box, as the build uid (a zip is the visitor's)."""
        steps.log(f"Fetching {repo}")
        try:
            record = providers.resolve(repo, self.settings)
            if record.fingerprint() != fingerprint:
                # The launch resolved another version (a HydroShare or CKAN record changed).
                raise BuildFailed(f"{repo} changed since this launch looked it up; launch again")
            providers.download(record, download, self.settings, steps.log, ends=steps.deadline)
        except providers.RecordError as e:
            raise BuildFailed(str(e)) from e
        steps.run(
            [
                self._python(),
                "-I",
                "-c",
                providers.UNPACK_SCRIPT,
                str(download),
                str(source),
                str(self.settings.clone_size_limit),
            ],
            env=steps.base_env(),
            what="unpack",
        )

    def _make_env(self, env: Path, steps: Steps) -> None:
        steps.log("Creating the environment")
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        pth = env / "lib" / version / "site-packages" / "_hublaunch_base.pth"
        base_site = sysconfig.get_paths(
            vars={"base": str(self.base_prefix), "platbase": str(self.base_prefix)}
        )["purelib"]
        # The base environment (Jupyter server, kernel, pip) under the repository's packages.
        steps.run(
            [self._python(), "-I", "-c", MAKE_ENV, str(env), str(pth), base_site],
            env=steps.base_env(),
            what="venv",
        )

    @staticmethod
    def _requirements(source: Path) -> Path | None:
        # As repo2docker does: a binder/ folder, when present, is the only place looked in.
        folder = source / "binder" if (source / "binder").is_dir() else source
        candidate = folder / "requirements.txt"
        return candidate if candidate.is_file() else None


def _lay_out(work: Path, uid: int | None) -> None:
    """The work folder: the worker's own (so no box can replace what is in it), holding the
    folders a build's boxes write, theirs (``uid``; None: unsandboxed, the worker's)."""
    work.mkdir()
    work.chmod(0o711)
    for name, mode in (("src", 0o755), ("env", 0o755), ("home", 0o700), ("tmp", 0o700)):
        folder = work / name
        folder.mkdir()
        folder.chmod(mode)
        if uid is not None:
            os.chown(folder, uid, uid)


@functools.cache
def _pip_configuration(python: str) -> tuple[tuple[str, str], ...]:
    """The machine's pip settings, ``(section.key, value)``, as ``pip config list`` of the base
    Python sees them (its config files and the worker's PIP_* variables)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("PIP_") or k in CERT_VARIABLES}
    env.update(PATH=SYSTEM_PATH, HOME=os.environ.get("HOME", "/root"))
    try:
        result = subprocess.run(
            [python, "-I", "-m", "pip", "config", "list"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        logger.warning("could not read pip's configuration; builds use pip's defaults")
        return ()
    found = []
    for line in result.stdout.splitlines():
        key, sep, quoted = line.partition("=")
        if sep and len(quoted) >= 2 and quoted[0] == quoted[-1] and quoted[0] in "'\"":
            found.append((key, quoted[1:-1]))
    return tuple(found)


def _pip_settings(python: str) -> dict[str, str]:
    """The machine's pip settings as PIP_* variables for a box's pip, which has another home
    and prefix and so would not find a per-user or per-environment config file. Package
    indexes, mirrors and certificates, no secret of hublaunch's."""
    settings = {"PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    # Later sections win, as in pip: global, then the install command's, then PIP_* variables.
    for section in ("global", "install", ":env:"):
        for key, value in _pip_configuration(python):
            scope, _, name = key.rpartition(".")
            if scope == section:
                settings[f"PIP_{name.upper().replace('-', '_')}"] = value
    return settings


def _pip_folders(python: str) -> list[str]:
    """Local folders and files the pip settings name (``file://`` indexes, find-links,
    constraints, certificates)."""
    found = []
    for key, value in _pip_configuration(python):
        if key.rpartition(".")[2] not in PIP_PATH_KEYS:
            continue
        for entry in value.split():
            path = unquote(urlsplit(entry).path) if entry.startswith("file:") else entry
            if not path.startswith("/"):
                continue
            # A PEP 503 index folder links to its files relatively (../../files/...): show the
            # folder that holds it.
            if os.path.basename(path.rstrip("/")) == "simple":
                path = os.path.dirname(path.rstrip("/"))
            found.append(path)
    return found


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _seal(top: Path) -> None:
    """Hand a finished tree to root, readable by everyone and writable by root alone: sessions
    run as other uids, and no later build (the same build uid) may change it. Nothing runs in
    the build's boxes any more, so the tree holds still; links are never followed."""
    as_root = os.geteuid() == 0
    _seal_one(str(top), as_root)
    for folder, dirs, files in os.walk(top):
        for name in dirs + files:
            _seal_one(os.path.join(folder, name), as_root)


def _seal_one(path: str, as_root: bool) -> None:
    info = os.lstat(path)
    if as_root:
        os.lchown(path, 0, 0)
    if stat.S_ISLNK(info.st_mode):
        return
    # No set-uid, set-gid or sticky bits, no write but the owner's; read (and search) for all.
    mode = stat.S_IMODE(info.st_mode) & 0o755 | 0o444
    if stat.S_ISDIR(info.st_mode) or mode & 0o111:
        mode |= 0o111
    os.chmod(path, mode)


def _remove(path: Path) -> None:
    """Remove what is at ``path``, whatever it is; a link is removed, never followed."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _create(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    os.fchmod(fd, 0o644)  # readable by the sessions' uids, whatever the worker's umask
    with open(fd, "w") as f:
        f.write(text)


class _SizeGuard:
    """Stops a clone that grows past the limit (git has no size limit of its own)."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path, self.limit = path, limit
        self.exceeded = False

    def check(self) -> None:
        if not self.exceeded and _dir_size(self.path) > self.limit:
            self.exceeded = True
            # Make git fail: its objects directory disappears under it.
            shutil.rmtree(self.path / ".git" / "objects", ignore_errors=True)
