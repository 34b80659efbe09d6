"""The service's own state and secrets, on a whole running stack.

- Its files (databases, key file, the Hub's cookie secret, logs, beat's schedule, pid files) are
  0600 in 0700 folders, an existing, looser data directory included.
- Each child process holds only the secrets it uses (read from /proc/<pid>/environ, as root).
- No secret is on any command line or in any log.
- ``hublaunch dev``'s private redis-server requires a password that is on no command line, and
  Celery, kombu and redis-py all work with the ``redis://:password@host:port/0`` URL.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from kombu import Connection

from hublaunch.dev import choose_broker, start_private_redis
from hublaunch.stack import Stack, StackConfig, free_port, masked
from tests.integration.conftest import RUN_ID, keep_logs, read_events

pytestmark = pytest.mark.integration

HUB_TOKEN = "HUBLAUNCH_HUB_API_TOKEN"
PROXY_TOKEN = "CONFIGPROXY_AUTH_TOKEN"
DATABASE = "HUBLAUNCH_DATABASE_URL"
BROKER = "HUBLAUNCH_BROKER_URL"
KEY_FILE = "HUBLAUNCH_SECRET_KEY_FILE"
KEY = "HUBLAUNCH_SECRET_KEY"


@dataclass
class PrivateRedis:
    url: str
    password: str
    port: int
    proc: subprocess.Popen[bytes]


@dataclass
class Service:
    stack: Stack
    redis: PrivateRedis
    server_token: str  # the token handed to the visitor for the launched server


@pytest.fixture(scope="module")
def private_redis() -> Iterator[PrivateRedis]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server must be installed (.ci/run installs it)")
    started = start_private_redis(server)
    assert started is not None, "the private redis-server did not start"
    url, proc = started
    password = url.split("://:", 1)[1].split("@", 1)[0]
    port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    try:
        yield PrivateRedis(url, password, port, proc)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, private_redis: PrivateRedis
) -> Iterator[Service]:
    data_dir = tmp_path_factory.mktemp("service-files") / "data"
    # A data directory from before: loose modes everywhere the stack must tighten.
    (data_dir / "logs").mkdir(parents=True)
    (data_dir / "hub").mkdir()
    for folder in (data_dir, data_dir / "logs", data_dir / "hub"):
        folder.chmod(0o755)
    (data_dir / "logs" / "api.log").write_text("an old run\n")
    (data_dir / "logs" / "api.log").chmod(0o644)
    stack = Stack(
        StackConfig(
            data_dir=data_dir,
            database_url=f"sqlite:///{data_dir / 'hublaunch.sqlite'}",
            broker_url=private_redis.url,
            spawner="fake",
            beat=True,
            queue=f"test-{RUN_ID}-files",
        )
    )
    stack.start(timeout=90)
    try:
        with httpx.Client(base_url=stack.public_url, timeout=30) as api:
            accepted = api.post("/api/launches", json={"image": "default"})
            assert accepted.status_code == 202, accepted.text
            ready = read_events(api, accepted.json()["id"])[-1]
            assert ready["phase"] == "ready", ready
        yield Service(stack, private_redis, ready["token"])
    finally:
        stack.stop()
        keep_logs(stack, "service-files")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            if ppid == pid:
                found.append(int(entry.name))
    return found


def _descendants(pid: int) -> list[int]:
    out = []
    for child in _children(pid):
        out += [child, *_descendants(child)]
    return out


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode()
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def _processes(service: Service) -> dict[str, int]:
    """Each of the stack's children, and the proxy the Hub started, by name -> pid."""
    procs = {name: proc.pid for name, proc in service.stack.procs.items()}
    assert set(procs) == {"hub", "api", "worker", "beat"}
    proxies = [
        pid
        for pid in _descendants(procs["hub"])
        if b"configurable-http-proxy" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(proxies) == 1, proxies
    procs["proxy"] = proxies[0]
    return procs


def _secrets(service: Service) -> dict[str, str]:
    stack = service.stack
    return {
        "hub token": stack.hub_token,
        "proxy token": stack.proxy_token,
        "redis password": service.redis.password,
        "fernet key": (stack.config.data_dir / "secret.key").read_text().strip(),
        "server token": service.server_token,
    }


def test_the_data_directory_is_the_service_s_alone(service: Service) -> None:
    data_dir = service.stack.config.data_dir
    expected = [
        "secret.key",
        "hublaunch.sqlite",
        "hub/jupyterhub.sqlite",
        "hub/jupyterhub_cookie_secret",
        "hub/jupyterhub.pid",
        "hub/proxy.pid",
        "logs/hub.log",
        "logs/api.log",
        "logs/worker.log",
        "logs/beat.log",
    ]
    for name in expected:
        assert (data_dir / name).is_file(), f"{name} was not made; the test checks nothing"
    assert list(data_dir.glob("celerybeat-schedule*")), "beat wrote no schedule"

    seen = []
    for root, dirs, files in os.walk(data_dir):
        folder = Path(root)
        # Session homes and built environments are the sandbox's: their modes are its own.
        dirs[:] = [
            d for d in dirs if (folder / d) not in (data_dir / "hub/homes", data_dir / "envs")
        ]
        assert _mode(folder) == 0o700, f"{folder} is {oct(_mode(folder))}"
        for name in files:
            path = folder / name
            seen.append(str(path.relative_to(data_dir)))
            assert path.lstat().st_uid == os.geteuid(), f"{path} is not the service's"
            assert _mode(path) == 0o600, f"{path} is {oct(_mode(path))}"
    assert set(expected) <= set(seen)
    # The log of the old run was kept, and tightened.
    assert (data_dir / "logs/api.log").read_text().startswith("an old run")


def test_each_process_holds_only_the_secrets_it_uses(service: Service) -> None:
    procs = _processes(service)
    environ = {name: _environ(pid) for name, pid in procs.items()}
    holds = {
        # The Hub: its service token and its proxy's token; nothing of hublaunch's own.
        "hub": {HUB_TOKEN, PROXY_TOKEN},
        # The API: launches (database, queue, key to show tokens) and the Hub health check.
        "api": {DATABASE, BROKER, KEY_FILE},
        "worker": {DATABASE, BROKER, KEY_FILE, HUB_TOKEN},
        # Beat only sends the periodic cleanup task.
        "beat": {BROKER},
        # The proxy inherits the Hub's environment (JupyterHub copies os.environ for it), so it
        # has the Hub's service token too until the Hub's config takes it out of its environment.
        "proxy": {PROXY_TOKEN},
    }
    for name, variables in holds.items():
        held = {HUB_TOKEN, PROXY_TOKEN, DATABASE, BROKER, KEY_FILE, KEY} & set(environ[name])
        assert held == variables, f"{name} holds {sorted(held)}"

    # By value too, whatever a variable is called: who may hold each secret.
    values = _secrets(service)
    allowed = {
        "hub token": {"hub", "worker"},
        "proxy token": {"hub", "proxy"},
        "redis password": {"api", "worker", "beat"},
        "fernet key": set(),  # in its file only
        "server token": set(),
    }
    for secret, readers in allowed.items():
        holders = {
            name for name, env in environ.items() if values[secret] in "\0".join(env.values())
        }
        assert holders <= readers, f"the {secret} is in the environment of {sorted(holders)}"
    assert environ["api"][BROKER] == environ["beat"][BROKER] == service.redis.url


def test_no_secret_on_a_command_line_or_in_a_log(service: Service) -> None:
    values = _secrets(service)
    procs = _processes(service)
    pids = {*procs.values(), service.redis.proc.pid}
    for pid in list(pids):
        pids.update(_descendants(pid))
    for pid in pids:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        for secret, value in values.items():
            assert value not in cmdline, f"the {secret} is on the command line of {cmdline!r}"
    logs = list(service.stack.logs.glob("*.log"))
    assert {log.name for log in logs} >= {"hub.log", "api.log", "worker.log", "beat.log"}
    for log in logs:
        text = log.read_text(errors="replace")
        assert text, f"{log} is empty; the test would check nothing"
        for secret, value in values.items():
            assert value not in text, f"the {secret} is in {log.name}"
    # Celery did use the URL with the password (it prints it masked).
    worker_log = (service.stack.logs / "worker.log").read_text()
    assert f"redis://:**@127.0.0.1:{service.redis.port}/0" in worker_log


def test_the_private_redis_requires_its_password(private_redis: PrivateRedis) -> None:
    # Its argv as started (Redis then rewrites /proc/<pid>/cmdline into a title).
    assert private_redis.password not in " ".join(map(str, private_redis.proc.args))
    cmdline = Path(f"/proc/{private_redis.proc.pid}/cmdline").read_bytes()
    assert b"redis-server" in cmdline and private_redis.password.encode() not in cmdline
    assert (
        private_redis.password.encode()
        not in Path(f"/proc/{private_redis.proc.pid}/environ").read_bytes()
    )
    assert len(private_redis.password) >= 32

    anonymous = redis.Redis(host="127.0.0.1", port=private_redis.port, socket_timeout=5)
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(
            host="127.0.0.1", port=private_redis.port, password="guess", socket_timeout=5
        ).ping()
    # Bound to loopback only.
    assert redis.Redis.from_url(private_redis.url, socket_timeout=5).config_get("bind") == {
        "bind": "127.0.0.1"
    }

    # kombu (what Celery sends and receives through) with the same URL: a message round trip.
    with Connection(private_redis.url, connect_timeout=5) as conn:
        queue = conn.SimpleQueue(f"test-{RUN_ID}-kombu")
        queue.put({"hello": "redis"})
        message = queue.get(timeout=5)
        assert message.payload == {"hello": "redis"}
        message.ack()
        queue.close()


def test_dev_prints_broker_urls_masked(private_redis: PrivateRedis, tmp_path: Path) -> None:
    # A configured Redis with a password that answers: used, and printed masked.
    url, note, proc = choose_broker(private_redis.url, tmp_path)
    assert (url, proc) == (private_redis.url, None)
    assert note == f"Redis at redis://:***@127.0.0.1:{private_redis.port}/0"
    # A configured Redis that does not answer: a private redis-server with a fresh password.
    dead = f"redis://:wrong-{RUN_ID}@127.0.0.1:{free_port()}/0"
    url, note, proc = choose_broker(dead, tmp_path)
    assert proc is not None
    try:
        password = url.split("://:", 1)[1].split("@", 1)[0]
        assert len(password) >= 32 and password != private_redis.password
        assert password not in note and f"wrong-{RUN_ID}" not in note and "***" in note
        assert redis.Redis.from_url(url, socket_timeout=5).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(url.replace(password, ""), socket_timeout=5).ping()
    finally:
        proc.terminate()
        proc.wait(10)
    assert masked("postgresql+psycopg://hublaunch:s3cret@db:5432/hublaunch") == (
        "postgresql+psycopg://hublaunch:***@db:5432/hublaunch"
    )
    assert (
        masked("sqlite:///.hublaunch/hublaunch.sqlite") == "sqlite:///.hublaunch/hublaunch.sqlite"
    )
