"""Local git repositories served over plain (dumb) HTTP on 127.0.0.1, for repository launches."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

from hublaunch.stack import free_port

GIT_ENV = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "PATH": "/usr/bin:/bin",
}


def git(*args: str, cwd: Path) -> str:
    result = subprocess.run(
        ["git", *args], cwd=cwd, env=GIT_ENV, check=True, capture_output=True, text=True
    )
    return result.stdout.strip()


class GitServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.served = root / "served"
        self.served.mkdir(parents=True)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                str(self.port),
                "--directory",
                str(self.served),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.05)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}.git"

    def commit(self, name: str, files: dict[str, str], message: str = "change") -> str:
        """Commit files to repository ``name`` (created on first use) and publish; the sha."""
        work = self.root / "work" / name
        bare = self.served / f"{name}.git"
        if not work.exists():
            work.mkdir(parents=True)
            git("init", "-q", "-b", "main", cwd=work)
            git("init", "-q", "--bare", str(bare), cwd=work)
            git("remote", "add", "origin", str(bare), cwd=work)
        for path, text in files.items():
            target = work / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        git("add", "-A", cwd=work)
        git("commit", "-q", "--allow-empty", "-m", message, cwd=work)
        git("push", "-q", "origin", "main", cwd=work)
        git("update-server-info", cwd=bare)  # what dumb HTTP clients read
        return git("rev-parse", "HEAD", cwd=work)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
