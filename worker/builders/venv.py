"""Python environments built from a repository's requirements.txt, on this machine.

Each environment is a venv layered on a base environment that has the Jupyter server (a .pth
file puts the base's site-packages on its path), so an empty requirements file builds in about
a second. It is built in a temporary directory and renamed into place only when complete; a
marker file says it is finished. The Hub's EnvironmentSpawner runs servers from it by name.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from collections import deque
from pathlib import Path

from worker.builders import BuildFailed, Log
from worker.periodic import every
from worker.repos import check_host, git_env, git_options
from worker.settings import Settings

MARKER = ".hublaunch-env"
REPO_DIR = "repo"
TAIL_LINES = 40


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

    def __init__(self, settings: Settings, base_prefix: str | None = None) -> None:
        self.settings = settings
        self.root = settings.envs_dir.resolve()
        self.base_prefix = Path(base_prefix or sys.prefix)

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
        self.root.mkdir(parents=True, exist_ok=True)
        work = self.root / f".tmp-{name}-{secrets.token_hex(4)}"
        deadline = time.monotonic() + self.settings.build_timeout
        tail: deque[str] = deque(maxlen=TAIL_LINES)

        def emit(line: str) -> None:
            tail.append(line)
            log(line)

        try:
            work.mkdir()
            source = work / "src"
            self._fetch(repo, commit, source, emit, deadline)
            env = work / "env"
            self._make_env(env, emit, deadline)
            requirements = self._requirements(source)
            if requirements is None:
                emit("No requirements.txt: the base environment is used as it is.")
            else:
                emit(f"Installing {requirements.relative_to(source)}")
                self._run(
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
                    emit,
                    deadline,
                    cwd=source,
                    what="pip install",
                )
            # The repository's files go with the environment; each session starts with a copy.
            shutil.rmtree(source / ".git", ignore_errors=True)
            source.rename(env / REPO_DIR)
            (env / MARKER).write_text(
                json.dumps({"repo": repo, "commit": commit, "builder": self.version})
            )
            final = self.path(name)
            _fix_scripts(env, final)
            try:
                env.rename(final)
            except OSError:
                if not self.exists(name):  # anything but "another build finished first"
                    raise
            return _dir_size(final)
        except BuildFailed as e:
            e.tail = e.tail or "\n".join(tail)
            raise
        except subprocess.SubprocessError as e:
            raise BuildFailed(f"build failed: {e}", "\n".join(tail)) from e
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _fetch(self, repo: str, commit: str, source: Path, log: Log, deadline: float) -> None:
        addresses = check_host(repo, self.settings)  # again at fetch time: DNS may have changed
        git = ["git", *git_options(repo, addresses, self.settings)]
        log(f"Fetching {repo} at {commit}")
        self._run([*git, "init", "--quiet", str(source)], log, deadline, what="git init")
        self._run(
            [*git, "-C", str(source), "remote", "add", "origin", "--", repo],
            log,
            deadline,
            what="git remote",
        )
        guard = _SizeGuard(source, self.settings.clone_size_limit)
        fetch = [*git, "-C", str(source), "fetch", "--quiet"]
        try:
            with every(0.5, guard.check):
                try:
                    self._run(
                        [*fetch, "--depth", "1", "origin", commit], log, deadline, what="git fetch"
                    )
                except BuildFailed:
                    if guard.exceeded:
                        raise
                    # Servers that serve only advertised refs (or dumb HTTP) need a full fetch.
                    log("Shallow fetch of the commit refused; fetching the whole repository")
                    self._run([*fetch, "origin"], log, deadline, what="git fetch")
        except BuildFailed:
            if not guard.exceeded:
                raise
        guard.check()
        if guard.exceeded:
            raise BuildFailed(
                f"the repository is larger than {self.settings.clone_size_limit} bytes"
            )
        self._run(
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
            log,
            deadline,
            what="git checkout",
        )

    def _make_env(self, env: Path, log: Log, deadline: float) -> None:
        log("Creating the environment")
        python = str(self.base_prefix / "bin" / "python")
        self._run([python, "-m", "venv", "--without-pip", str(env)], log, deadline, what="venv")
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        site = env / "lib" / version / "site-packages"
        base_site = sysconfig.get_paths(
            vars={"base": str(self.base_prefix), "platbase": str(self.base_prefix)}
        )["purelib"]
        # The base environment (Jupyter server, kernel, pip) under the repository's packages.
        (site / "_hublaunch_base.pth").write_text(base_site + "\n")

    @staticmethod
    def _requirements(source: Path) -> Path | None:
        # As repo2docker does: a binder/ folder, when present, is the only place looked in.
        folder = source / "binder" if (source / "binder").is_dir() else source
        candidate = folder / "requirements.txt"
        return candidate if candidate.is_file() else None

    @staticmethod
    def _run(
        command: list[str], log: Log, deadline: float, *, what: str, cwd: Path | None = None
    ) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BuildFailed(f"the build took longer than allowed (during {what})")
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            env={
                **git_env(),
                "PIP_NO_INPUT": "1",
                "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                **_pip_env(),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        timer = threading.Timer(remaining, proc.kill)
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.strip():
                    log(line.rstrip())
            code = proc.wait()
        finally:
            timer.cancel()
        if time.monotonic() >= deadline:
            raise BuildFailed(f"the build took longer than allowed (during {what})")
        if code != 0:
            raise BuildFailed(f"{what} failed (exit {code})")


def _pip_env() -> dict[str, str]:
    # Pass through the machine's package-index settings (mirrors, certificates), nothing else.
    keep = (
        "PIP_INDEX_URL",
        "PIP_EXTRA_INDEX_URL",
        "PIP_FIND_LINKS",
        "PIP_CERT",
        "PIP_DEFAULT_TIMEOUT",
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "PIP_CONSTRAINT",
    )
    return {k: v for k, v in os.environ.items() if k in keep}


def _fix_scripts(env: Path, final: Path) -> None:
    """Console scripts pip wrote name the temporary path in their #! line; point them home."""
    old, new = str(env).encode(), str(final).encode()
    for script in (env / "bin").iterdir():
        if script.is_file() and not script.is_symlink():
            data = script.read_bytes()
            if data.startswith(b"#!") and old in data.split(b"\n", 1)[0]:
                script.write_bytes(data.replace(old, new, 1))


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
