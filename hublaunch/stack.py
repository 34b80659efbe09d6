"""Run a whole hublaunch stack as child processes: JupyterHub (API-only, with its proxy), the
HTTP app, a Celery worker and beat. Used by ``hublaunch dev``, the integration tests and bench/.

Every child listens on 127.0.0.1 on a free port. Secrets reach children through their
environment, never their command line, and each child gets only the ones it uses
(``SECRET_VARIABLES``). The data directory is the service's own: its folders 0700, its files
0600 (the children run with umask 077).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import redis
from sqlalchemy.engine import make_url

from worker.settings import Settings

REPO = Path(__file__).resolve().parent.parent
HUB_CONFIG = REPO / "hub" / "jupyterhub_config.py"

# Variables that carry a secret (or say where one is kept), and the children that use each; any
# other child never sees it, whether the stack set it or the caller's environment holds it.
SECRET_VARIABLES: dict[str, frozenset[str]] = {
    # The Hub's service token: the Hub registers it, the worker drives the Hub with it. (The
    # API's health check asks only whether the Hub answers, with no token.)
    "HUBLAUNCH_HUB_API_TOKEN": frozenset({"hub", "worker"}),
    # Between the Hub and the proxy it starts; nothing of hublaunch's talks to the proxy's API.
    "CONFIGPROXY_AUTH_TOKEN": frozenset({"hub"}),
    # The operators' token: only the app checks it (admin API, /metrics).
    "HUBLAUNCH_ADMIN_TOKEN": frozenset({"api"}),
    # The Hub's own database, when it is not the SQLite file in its data folder.
    "HUBLAUNCH_HUB_DB_URL": frozenset({"hub"}),
    # hublaunch's database: the API and the worker read and write launches; beat never connects.
    "HUBLAUNCH_DATABASE_URL": frozenset({"api", "worker"}),
    # The queue (its URL carries Redis's password): the API and beat send, the worker takes.
    "HUBLAUNCH_BROKER_URL": frozenset({"api", "worker", "beat"}),
    # Every Hub with its service token: only the worker drives the Hubs (the app and beat get
    # the list without the tokens, below).
    "HUBLAUNCH_HUBS": frozenset({"worker"}),
    # The key of the tokens at rest: the worker encrypts them, the API decrypts them.
    "HUBLAUNCH_SECRET_KEY": frozenset({"api", "worker"}),
    "HUBLAUNCH_SECRET_KEY_FILE": frozenset({"api", "worker"}),
}
# Files a child creates are its owner's only (0600, folders 0700). The environments the worker
# builds, which sessions running as other uids read, get their modes explicitly when a build
# seals them (worker/builders/venv.py), whatever the umask.
CHILD_UMASK = 0o077


_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def free_port() -> int:
    """A port free on 127.0.0.1 now, never one this process was given before: the socket is
    closed at once, and the kernel may hand the same port out again (a stack's Hub was once
    given its proxy's port, and did not start)."""
    with _handed_out_lock:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port


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


def masked(url: str) -> str:
    """The URL with its password, if any, replaced by ***: what may be printed or logged."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def private_folder(folder: Path) -> None:
    """The folder, made if missing, 0700; the regular files directly in it that we own, 0600.
    Nothing below is touched: session homes and built environments keep the modes their owners
    gave them (sandboxed sessions run as other uids)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    for entry in folder.iterdir():
        info = entry.lstat()
        if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and info.st_mode & 0o077:
            entry.chmod(0o600)


def _private_sqlite(url: str) -> None:
    """Create hublaunch's SQLite file 0600 before the migrations do with the default mode
    (SQLite gives its journal and WAL files the database file's mode)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return
    path = Path(parsed.database)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))


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
    spawner: str = "sandbox"  # "sandbox" (real servers, boxed), "local" (unboxed) or "fake"
    queue: str = "launches"
    worker_concurrency: int = 16
    worker_pool: str = "threads"  # "prefork": tasks run in child processes (fault tests)
    beat: bool = True
    hub: bool = True  # False: no Hub at all (tests of "Hub down")
    env: dict[str, str] = field(default_factory=dict)
    # More Hubs beside the first (issue 14): each its own JupyterHub and proxy, children
    # "hub-2", "hub-3", ...; HUBLAUNCH_HUBS then names them all. Each gets its own spawner
    # (``extra_spawners``, in order; "fake" where none is given) and session uid range, so no
    # two Hubs' sessions share a uid.
    extra_hubs: int = 0
    extra_spawners: tuple[str, ...] = ()
    hub_capacity: int = 0


@dataclass
class ExtraHub:
    """One more Hub of a stack: its ports, tokens and data folder."""

    name: str
    data_dir: Path
    public_port: int = field(default_factory=free_port)
    hub_port: int = field(default_factory=free_port)
    proxy_api_port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    proxy_token: str = field(default_factory=lambda: secrets.token_hex(32))

    @property
    def public_url(self) -> str:
        return f"http://127.0.0.1:{self.public_port}"

    @property
    def api_url(self) -> str:
        return f"{self.public_url}/hub/api"


@dataclass
class Stack:
    config: StackConfig
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    hub_token: str = field(default_factory=lambda: secrets.token_hex(32))
    proxy_token: str = field(default_factory=lambda: secrets.token_hex(32))
    # Where each child's output starts in its log: a log is appended to across runs, so a line
    # of an earlier run must not pass for this run's.
    log_starts: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        c = self.config
        c.data_dir = c.data_dir.resolve()
        # The service's own files (databases, key, the Hub's cookie secret, logs, schedule, pid
        # files): 0700 folders, 0600 files, an existing data directory included.
        for folder in (c.data_dir, c.data_dir / "logs", c.data_dir / "hub"):
            private_folder(folder)
        self.public_port = c.public_port or free_port()
        self.hub_port, self.proxy_api_port, self.app_port = free_port(), free_port(), free_port()
        self.public_url = f"http://127.0.0.1:{self.public_port}"
        self.app_url = f"http://127.0.0.1:{self.app_port}"
        self.hub_api_url = f"{self.public_url}/hub/api"
        self.logs = c.data_dir / "logs"
        self.extra: dict[str, ExtraHub] = {}
        for number in range(2, 2 + c.extra_hubs):
            name = f"hub-{number}"
            self.extra[name] = ExtraHub(name, c.data_dir / name)
            private_folder(c.data_dir / name)

    def hubs_json(self, *, tokens: bool) -> str:
        """HUBLAUNCH_HUBS naming every Hub (the first is "hub-1"); without the tokens for the
        children that only ask whether a Hub answers."""
        capacity = self.config.hub_capacity
        entries = [
            {
                "name": "hub-1",
                "api_url": self.hub_api_url,
                "public_url": self.public_url,
                "capacity": capacity,
                **({"api_token": self.hub_token} if tokens else {}),
            }
        ]
        for extra in self.extra.values():
            entries.append(
                {
                    "name": extra.name,
                    "api_url": extra.api_url,
                    "public_url": extra.public_url,
                    "capacity": capacity,
                    **({"api_token": extra.token} if tokens else {}),
                }
            )
        return json.dumps(entries)

    def _extra_environ(self, extra: ExtraHub, number: int) -> dict[str, str]:
        env = self.environ("hub")
        env.update(
            {
                "HUBLAUNCH_HUB_API_TOKEN": extra.token,
                "CONFIGPROXY_AUTH_TOKEN": extra.proxy_token,
                "HUBLAUNCH_HUB_DATA_DIR": str(extra.data_dir),
                "HUBLAUNCH_HUB_SPAWNER": (self.config.extra_spawners[number - 2 :] or ("fake",))[0],
                "HUBLAUNCH_HUB_PORT": str(extra.hub_port),
                "HUBLAUNCH_PROXY_PORT": str(extra.public_port),
                "HUBLAUNCH_PROXY_API_PORT": str(extra.proxy_api_port),
                # Sessions of different Hubs never share a uid (the first Hub's: the default).
                "HUBLAUNCH_SESSION_UID_MIN": str(60000 + 1000 * (number - 1)),
                "HUBLAUNCH_SESSION_UID_MAX": str(60999 + 1000 * (number - 1)),
            }
        )
        return env

    def environ(self, child: str = "worker") -> dict[str, str]:
        """The environment of one child (``hub``, ``api``, ``worker``, ``beat``), holding only
        the secrets it uses. The worker's is also what one-off commands (``hublaunch cull``)
        need."""
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
        if self.extra:
            env["HUBLAUNCH_HUBS"] = self.hubs_json(tokens=True)
        env.update(c.env)
        # The stack knows a child is up from its INFO lines ("ready.", "beat: Starting..."),
        # so its children log at INFO at least; their logs are files, not the console.
        if env.get("HUBLAUNCH_LOG_LEVEL", "INFO").upper() not in ("DEBUG", "INFO"):
            env["HUBLAUNCH_LOG_LEVEL"] = "INFO"
        for name, readers in SECRET_VARIABLES.items():
            if child not in readers:
                env.pop(name, None)
        if self.extra and child in ("api", "beat"):
            # They ask which Hubs there are and whether each answers: no token.
            env["HUBLAUNCH_HUBS"] = self.hubs_json(tokens=False)
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

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        path = self.logs / f"{name}.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)  # a log from before the data directory was made private
        self.log_starts[name] = os.fstat(fd).st_size
        log = os.fdopen(fd, "ab")
        self.procs[name] = subprocess.Popen(
            args,
            env=env if env is not None else self.environ(name),
            umask=CHILD_UMASK,
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

        _private_sqlite(self.config.database_url)
        upgrade(self.config.database_url)
        hublaunch = [sys.executable, "-m", "hublaunch.cli"]
        if self.config.hub:
            self._spawn(
                "hub", [str(Path(sys.executable).parent / "jupyterhub"), "-f", str(HUB_CONFIG)]
            )
        for name in self.extra:
            self._spawn_extra(name)
        self._spawn("api", [*hublaunch, "api", "--port", str(self.app_port)])
        self._spawn("worker", [*hublaunch, "worker", *self._worker_options()])
        deadline = time.monotonic() + timeout
        try:
            self.wait_ready(timeout)
            # Only now: a pass that is due (a schedule file from an earlier run) is sent the
            # moment beat starts, and before the Hub answers it could only log that it cannot
            # list the Hub's users.
            if self.config.beat:
                self._spawn("beat", [*hublaunch, "beat"])
                # Logged just before it reads (or makes) its schedule and ticks.
                self._wait_log("beat", b"beat: Starting...", deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        """Return once the app, the Hub (through the proxy, with its routes) and the worker
        answer.

        Nothing is asked before it can answer: the proxy logs each request it has no route for
        as an error (``404 GET /hub/api/``), which a newcomer reads as a failure. So the Hub is
        asked on its own port first, then the proxy for its routing table, and only then the
        Hub through the proxy; a refused connection before a child listens logs nothing.
        """
        deadline = time.monotonic() + timeout

        def poll(what: str, ready: Callable[[], bool]) -> None:
            while True:
                self.check_alive()
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    if ready():
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{what} did not answer within {timeout} s; see {self.logs}")
                time.sleep(0.1)

        with httpx.Client(timeout=2) as http:

            def answers(url: str) -> bool:
                return http.get(url).status_code == 200

            poll("the app", lambda: answers(f"{self.app_url}/api/openapi.json"))
            if self.config.hub:
                poll("the Hub", lambda: answers(f"http://127.0.0.1:{self.hub_port}/hub/api/"))
                poll("the proxy's routing table", lambda: self._routed(http))
                poll("the Hub through the proxy", lambda: answers(f"{self.hub_api_url}/"))
            for extra in self.extra.values():
                if extra.name in self.procs:
                    self._wait_extra(extra, http, poll)
        self._wait_log("worker", b"ready.", deadline)

    def _spawn_extra(self, name: str) -> None:
        extra = self.extra[name]
        number = int(name.rpartition("-")[2])
        jupyterhub = str(Path(sys.executable).parent / "jupyterhub")
        self._spawn(name, [jupyterhub, "-f", str(HUB_CONFIG)], self._extra_environ(extra, number))

    def _wait_extra(
        self, extra: ExtraHub, http: httpx.Client, poll: Callable[[str, Callable[[], bool]], None]
    ) -> None:
        def routed() -> bool:
            response = http.get(
                f"http://127.0.0.1:{extra.proxy_api_port}/api/routes",
                headers={"Authorization": f"token {extra.proxy_token}"},
            )
            return response.status_code == 200 and {"/", "/hub/api"} <= set(response.json())

        poll(
            f"{extra.name}",
            lambda: http.get(f"http://127.0.0.1:{extra.hub_port}/hub/api/").status_code == 200,
        )
        poll(f"{extra.name}'s proxy routes", routed)

    def _routed(self, http: httpx.Client) -> bool:
        """Whether the proxy routes both the Hub's API and everything else (to the app)."""
        response = http.get(
            f"http://127.0.0.1:{self.proxy_api_port}/api/routes",
            headers={"Authorization": f"token {self.proxy_token}"},
        )
        # The proxy keeps route specs without their trailing slash.
        wanted = {"/", urlsplit(self.hub_api_url).path.rstrip("/")}
        return response.status_code == 200 and wanted <= set(response.json())

    def _wait_log(self, name: str, marker: bytes, deadline: float) -> None:
        """Wait until this run of child ``name`` has logged ``marker``."""
        log = self.logs / f"{name}.log"
        while True:
            self.check_alive()
            with log.open("rb") as f:
                f.seek(self.log_starts.get(name, 0))
                if marker in f.read():
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not start; see {log}")
            time.sleep(0.1)

    def check_alive(self) -> None:
        """Raise RuntimeError naming the first child that has exited."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode}; see {self.logs}/{name}.log"
                )

    def stop(self, name: str | None = None, timeout: float = 15.0) -> None:
        """Stop one child, or all of them (the Hub last, so it can stop its servers)."""
        order = ("beat", "api", "worker", *self.extra, "hub")
        names = [name] if name else [n for n in order if n in self.procs]
        for n in names:
            proc = self.procs[n]
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            # Forgotten only once gone: a stop that is interrupted leaves it for the next stop.
            del self.procs[n]

    def _worker_options(self) -> list[str]:
        c = self.config
        return ["--concurrency", str(c.worker_concurrency), "--pool", c.worker_pool]

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send ``sig`` to child ``name`` and every process of its group (no clean shutdown),
        and wait until the child is gone; ``start_child`` runs it again."""
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(timeout=30)

    def start_child(self, name: str) -> None:
        """Run child ``name`` again after ``kill`` or ``stop(name)``, and wait until it is up."""
        hublaunch = [sys.executable, "-m", "hublaunch.cli"]
        deadline = time.monotonic() + 60
        if name == "worker":
            self._spawn("worker", [*hublaunch, "worker", *self._worker_options()])
            self._wait_log("worker", b"ready.", deadline)
        elif name == "beat":
            self._spawn("beat", [*hublaunch, "beat"])
            self._wait_log("beat", b"beat: Starting...", deadline)
        elif name == "hub":
            self._spawn(
                "hub", [str(Path(sys.executable).parent / "jupyterhub"), "-f", str(HUB_CONFIG)]
            )
            self.wait_ready(60)
        elif name in self.extra:
            self._spawn_extra(name)
            self.wait_ready(60)
        else:
            raise ValueError(f"start_child runs the worker, beat or the Hub, not {name!r}")

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
