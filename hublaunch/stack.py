"""Run a whole hublaunch stack as child processes: JupyterHub (API-only, with its proxy), the
HTTP app, a Celery worker and beat. Used by ``hublaunch dev``, the integration tests and bench/.

Every child listens on 127.0.0.1 on a free port; secrets reach children through their
environment, never their command line.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from worker.settings import Settings

REPO = Path(__file__).resolve().parent.parent
HUB_CONFIG = REPO / "hub" / "jupyterhub_config.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_proxy() -> str:
    """configurable-http-proxy from PATH or the repo's node_modules."""
    local = REPO / "node_modules" / ".bin" / "configurable-http-proxy"
    found = shutil.which("configurable-http-proxy") or (str(local) if local.exists() else None)
    if found is None:
        raise RuntimeError(
            "configurable-http-proxy not found; run `npm install configurable-http-proxy` "
            "in the repository (make dev and make test do this)"
        )
    return found


def redis_answers(url: str) -> bool:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping()
    except (redis.RedisError, ValueError):
        return False
    return True


@dataclass
class StackConfig:
    data_dir: Path
    database_url: str
    broker_url: str
    public_port: int = 0
    spawner: str = "local"  # "local" (real jupyterhub-singleuser) or "fake" (in the Hub)
    queue: str = "launches"
    worker_concurrency: int = 16
    beat: bool = True
    hub: bool = True  # False: no Hub at all (tests of "Hub down")
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Stack:
    config: StackConfig
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    hub_token: str = field(default_factory=lambda: secrets.token_hex(32))
    proxy_token: str = field(default_factory=lambda: secrets.token_hex(32))

    def __post_init__(self) -> None:
        c = self.config
        c.data_dir = c.data_dir.resolve()
        c.data_dir.mkdir(parents=True, exist_ok=True)
        self.public_port = c.public_port or free_port()
        self.hub_port, self.proxy_api_port, self.app_port = free_port(), free_port(), free_port()
        self.public_url = f"http://127.0.0.1:{self.public_port}"
        self.app_url = f"http://127.0.0.1:{self.app_port}"
        self.hub_api_url = f"{self.public_url}/hub/api"
        self.logs = c.data_dir / "logs"
        self.logs.mkdir(exist_ok=True)

    def environ(self) -> dict[str, str]:
        c = self.config
        env = dict(os.environ)
        proxy_dir = str(Path(find_proxy()).parent) if c.hub else ""
        python_bin = str(Path(sys.executable).parent)
        env.update(
            {
                "PATH": os.pathsep.join(p for p in (python_bin, proxy_dir, env["PATH"]) if p),
                "HUBLAUNCH_DATABASE_URL": c.database_url,
                "HUBLAUNCH_BROKER_URL": c.broker_url,
                "HUBLAUNCH_HUB_API_URL": self.hub_api_url,
                "HUBLAUNCH_HUB_API_TOKEN": self.hub_token,
                "HUBLAUNCH_PUBLIC_URL": self.public_url,
                "HUBLAUNCH_SECRET_KEY_FILE": str(c.data_dir / "secret.key"),
                "HUBLAUNCH_BEAT_SCHEDULE_FILE": str(c.data_dir / "celerybeat-schedule"),
                "HUBLAUNCH_ENVS_DIR": str(c.data_dir / "envs"),
                # A local stack stops its sessions with it (production keeps them on restart).
                "HUBLAUNCH_HUB_CLEANUP_SERVERS": "1",
                "HUBLAUNCH_QUEUE": c.queue,
                "HUBLAUNCH_HUB_DATA_DIR": str(c.data_dir / "hub"),
                "HUBLAUNCH_HUB_SPAWNER": c.spawner,
                "HUBLAUNCH_HUB_PORT": str(self.hub_port),
                "HUBLAUNCH_PROXY_PORT": str(self.public_port),
                "HUBLAUNCH_PROXY_API_PORT": str(self.proxy_api_port),
                "HUBLAUNCH_APP_URL": self.app_url,
                "CONFIGPROXY_AUTH_TOKEN": self.proxy_token,
                "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
            }
        )
        env.update(c.env)
        return env

    def settings(self, **overrides: Any) -> Settings:
        """The settings the stack's children read from their environment, for code run in the
        calling process (tests, benchmarks)."""
        c = self.config
        return Settings(
            database_url=c.database_url,
            broker_url=c.broker_url,
            queue=c.queue,
            hub_api_url=self.hub_api_url,
            hub_api_token=self.hub_token,
            public_url=self.public_url,
            secret_key_file=c.data_dir / "secret.key",
            envs_dir=c.data_dir / "envs",
            **overrides,
        )

    def _spawn(self, name: str, args: list[str]) -> None:
        log = (self.logs / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            args,
            env=self.environ(),
            # The caller's directory, so relative paths in settings mean the same in every child.
            cwd=os.getcwd(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us; we stop the children in order
        )
        log.close()

    def start(self, timeout: float = 60.0) -> Stack:
        from worker.migrate import upgrade

        upgrade(self.config.database_url)
        hublaunch = [sys.executable, "-m", "hublaunch.cli"]
        if self.config.hub:
            self._spawn(
                "hub", [str(Path(sys.executable).parent / "jupyterhub"), "-f", str(HUB_CONFIG)]
            )
        self._spawn("api", [*hublaunch, "api", "--port", str(self.app_port)])
        self._spawn(
            "worker", [*hublaunch, "worker", "--concurrency", str(self.config.worker_concurrency)]
        )
        if self.config.beat:
            self._spawn("beat", [*hublaunch, "beat"])
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        urls = [f"{self.app_url}/api/openapi.json"]
        if self.config.hub:
            urls.append(f"{self.hub_api_url}/")
        with httpx.Client(timeout=2) as http:
            for url in urls:
                while True:
                    self._check_alive()
                    with contextlib.suppress(httpx.HTTPError):
                        if http.get(url).status_code == 200:
                            break
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"{url} did not answer within {timeout} s; see {self.logs}"
                        )
                    time.sleep(0.1)
        self._wait_worker(deadline)

    def _wait_worker(self, deadline: float) -> None:
        log = self.logs / "worker.log"
        while b"ready." not in (log.read_bytes() if log.exists() else b""):
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the worker did not start; see {log}")
            time.sleep(0.1)

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode}; see {self.logs}/{name}.log"
                )

    def stop(self, name: str | None = None, timeout: float = 15.0) -> None:
        """Stop one child, or all of them (the Hub last, so it can stop its servers)."""
        names = [name] if name else [n for n in ("beat", "api", "worker", "hub") if n in self.procs]
        for n in names:
            proc = self.procs.pop(n)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

    def restart(self, name: str) -> None:
        args = self.procs[name].args
        self.stop(name)
        self._spawn(name, list(args))  # type: ignore[arg-type]

    @contextlib.contextmanager
    def running(self) -> Iterator[Stack]:
        self.start()
        try:
            yield self
        finally:
            self.stop()
