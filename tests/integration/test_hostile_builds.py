"""Hostile repositories (issue 8): what a build runs cannot read, print or reach the service's
secrets, files or ports, and leaves nothing running.

Each repository attacks as the issue's attacker did: requirements files naming the key file and
the worker's /proc/<pid>/environ, an in-tree build backend and a setup.py that run code during
the build, an index URL on 127.0.0.1. Afterwards no secret (the Hub's service token, the proxy's
token, the key at rest) may appear in any event, launch view, database row or log, and the
test's own listener on 127.0.0.1 must have seen no connection.
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import MetaData, create_engine, select

from hublaunch.stack import Stack
from tests.integration.conftest import launch_row, read_events, wait_for
from tests.integration.gitserver import GitServer

pytestmark = pytest.mark.integration


class Listener:
    """A port on 127.0.0.1 that records every connection made to it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.accepted: list[tuple[str, int]] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, address = self.sock.accept()
            except OSError:
                return
            self.accepted.append(address)
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def pg(fake_stacks: dict[str, Stack]) -> Stack:
    return fake_stacks["postgresql"]  # local repositories allowed: the git server is on 127.0.0.1


@pytest.fixture(scope="module")
def api(pg: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=pg.public_url, timeout=60) as client:
        yield client


@pytest.fixture
def listener() -> Iterator[Listener]:
    found = Listener()
    yield found
    found.close()


def worker_pids(stack: Stack) -> list[int]:
    """The worker process and every process under it (a prefork pool's children)."""
    parents: dict[int, int] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:
            continue
        parents[int(stat.split("/")[2])] = int(text.rpartition(")")[2].split()[1])
    found = [stack.procs["worker"].pid]
    for pid in found:
        found += [child for child, parent in parents.items() if parent == pid]
    return found


@pytest.fixture(scope="module")
def secrets(pg: Stack, api: httpx.Client) -> dict[str, str]:
    """The values no build may leak, checked to be where an unsandboxed build found them."""
    key_file = pg.config.data_dir / "secret.key"
    # The key is made when it is first needed: a ready launch stores its token encrypted.
    launch_id = api.post("/api/launches", json={"image": "default"}).json()["id"]
    assert read_events(api, launch_id)[-1]["phase"] == "ready"
    api.delete(f"/api/launches/{launch_id}")
    key = wait_for(lambda: key_file.is_file() and key_file.read_text().strip(), 30, "the key")
    environ = Path(f"/proc/{pg.procs['worker'].pid}/environ").read_bytes().decode()
    assert pg.hub_token in environ  # what `-r /proc/<pid>/environ` used to print
    found = {"Hub service token": pg.hub_token, "proxy token": pg.proxy_token, "key": key}
    assert all(len(value) >= 32 for value in found.values())
    return found


def launch(api: httpx.Client, repo: str) -> tuple[str, list[dict[str, Any]]]:
    response = api.post("/api/launches", json={"repo": repo, "ref": "main"})
    assert response.status_code == 202, response.text
    launch_id = response.json()["id"]
    return launch_id, events_until_done(api, launch_id)


def events_until_done(api: httpx.Client, launch_id: str, timeout: float = 240) -> list[Any]:
    """The launch's events until it is ready or failed; fails the test (rather than hang in
    a worker thread) if that takes longer than ``timeout``. The keepalive comment every 15 s
    lets the deadline be checked while the stream is quiet."""
    deadline = time.monotonic() + timeout
    events = []
    with api.stream("GET", f"/api/launches/{launch_id}/events", timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
            if time.monotonic() > deadline:
                raise AssertionError(f"launch {launch_id} not done after {timeout} s: {events}")
    return events


def build_log(events: list[dict[str, Any]], api: httpx.Client, launch_id: str) -> str:
    """Everything the visitor sees of a build: its events and the launch's error."""
    messages = [str(e["message"]) for e in events]
    return "\n".join([*messages, str(api.get(f"/api/launches/{launch_id}").json()["error"])])


def assert_nothing_leaked(
    stack: Stack, api: httpx.Client, secrets: dict[str, str], launch_ids: list[str]
) -> None:
    texts: dict[str, str] = {}
    for launch_id in launch_ids:
        texts[f"the events of {launch_id}"] = json.dumps(read_events(api, launch_id))
        texts[f"GET /api/launches/{launch_id}"] = api.get(f"/api/launches/{launch_id}").text
    engine = create_engine(stack.config.database_url)
    try:
        tables = MetaData()
        tables.reflect(engine)
        with engine.connect() as db:
            for table in tables.sorted_tables:
                rows = db.execute(select(table)).all()
                texts[f"table {table.name}"] = "\n".join(repr(tuple(row)) for row in rows)
    finally:
        engine.dispose()
    assert {"table launches", "table launch_events", "table builds"} <= texts.keys()
    for log in stack.logs.glob("*.log"):
        texts[f"log {log.name}"] = log.read_text(errors="replace")
    for what, text in texts.items():
        for name, value in secrets.items():
            assert value not in text, f"the {name} is in {what}"


def build_uid_processes(uid: int) -> list[int]:
    found = []
    for status in glob.glob("/proc/[0-9]*/status"):
        try:
            lines = Path(status).read_text().splitlines()
        except OSError:
            continue
        uids = next((line.split()[1:] for line in lines if line.startswith("Uid:")), [])
        if str(uid) in uids:
            found.append(int(status.split("/")[2]))
    return found


def build_cgroups(env_name: str) -> list[str]:
    return glob.glob(f"/sys/fs/cgroup/*/hublaunch/build-{env_name}-*")


# Run by the repository's build code: everything it tries, printed (or written beside it).
PROBE = r"""
import os, socket, sys

def _probe(out):
    out("HOSTILE-RAN uid=%d" % os.getuid())
    out("ENV %r" % dict(os.environ))
    paths = [{key_file!r}, *("/proc/%d/environ" % p for p in {worker_pids!r})]
    paths += ["/proc/%s/environ" % p for p in os.listdir("/proc") if p.isdigit()]
    for path in paths:
        try:
            with open(path, "rb") as f:
                out("READ %s %r" % (path, f.read()[:3000]))
        except OSError as e:
            out("NOREAD %s %s" % (path, type(e).__name__))
    for port in {ports!r}:
        s = socket.socket()
        s.settimeout(3)
        try:
            s.connect(("127.0.0.1", port))
            out("CONNECTED %d" % port)
        except OSError as e:
            out("NOCONNECT %d %s" % (port, type(e).__name__))
        s.close()
    proxy = os.environ.get("HTTPS_PROXY", "").rpartition(":")[2]
    if proxy:
        s = socket.create_connection(("127.0.0.1", int(proxy)), timeout=10)
        # CR LF spelled out: setuptools rewrites the escape pair in a setup.py it runs.
        crlf = bytes((13, 10))
        s.sendall(b"CONNECT 127.0.0.1:{listener} HTTP/1.1" + crlf + crlf)
        out("PROXY %r" % s.recv(100).split(crlf)[0])
        s.close()
    for target in ({data_dir!r} + "/pwned", {envs!r} + "/pwned"):
        try:
            with open(target, "w") as f:
                f.write("x")
            out("WROTE " + target)
        except OSError as e:
            out("NOWRITE %s %s" % (target, type(e).__name__))
    # Try to outlive the build: a daemon in its own session, its output let go.
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            devnull = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            import time
            time.sleep(600)
        os._exit(0)
"""


def probe(stack: Stack, listener: Listener) -> str:
    return PROBE.format(
        key_file=str(stack.config.data_dir / "secret.key"),
        worker_pids=worker_pids(stack),
        ports=[6379, 5432, listener.port, stack.public_port, stack.hub_port, stack.app_port],
        listener=listener.port,
        data_dir=str(stack.config.data_dir),
        envs=str(stack.config.data_dir / "envs"),
    )


def assert_probe_was_contained(output: str, stack: Stack, listener: Listener) -> None:
    assert f"HOSTILE-RAN uid={stack.settings().build_uid}" in output  # it ran, as the build uid
    assert f"NOREAD {stack.config.data_dir / 'secret.key'} FileNotFoundError" in output
    for port in (6379, 5432, listener.port, stack.public_port):
        assert f"NOCONNECT {port} ConnectionRefusedError" in output
    assert "CONNECTED" not in output
    assert "PROXY b'HTTP/1.1 403 Forbidden'" in output
    assert "WROTE" not in output and output.count("NOWRITE") >= 2
    assert "HUBLAUNCH_" not in output  # nothing of the worker's settings reached the build
    assert listener.accepted == []
    assert not (stack.config.data_dir / "pwned").exists()
    assert not (stack.config.data_dir / "envs" / "pwned").exists()


def assert_box_left_nothing(stack: Stack, env_name: str) -> None:
    uid = stack.settings().build_uid
    wait_for(lambda: not build_uid_processes(uid), 10, "the build uid's processes to end")
    assert build_cgroups(env_name) == []


def test_requirements_naming_the_key_file_or_the_workers_environment_print_nothing_secret(
    pg: Stack, api: httpx.Client, git_server: GitServer, secrets: dict[str, str]
) -> None:
    targets = [
        str(pg.config.data_dir / "secret.key"),
        *(f"/proc/{pid}/environ" for pid in worker_pids(pg)),
        "/proc/self/environ",
        "/proc/1/environ",
    ]
    repos = []
    for i, target in enumerate(targets):
        git_server.commit(f"hostile-r-{i}", {"requirements.txt": f"-r {target}\n"})
        repos.append(git_server.url(f"hostile-r-{i}"))
    with concurrent.futures.ThreadPoolExecutor(len(repos)) as pool:
        results = list(pool.map(lambda repo: launch(api, repo), repos))

    assert_nothing_leaked(pg, api, secrets, [launch_id for launch_id, _ in results])
    for (launch_id, events), target in zip(results, targets, strict=True):
        assert events[-1]["phase"] == "failed", target
        log = build_log(events, api, launch_id)
        # pip tried, and the box showed it nothing of the service's.
        assert "ERROR" in log and "pip install failed" in log, log
        if target.endswith("secret.key"):
            assert "No such file or directory" in log


def test_an_in_tree_build_backend_runs_contained(
    pg: Stack,
    api: httpx.Client,
    git_server: GitServer,
    secrets: dict[str, str],
    listener: Listener,
) -> None:
    backend = probe(pg, listener) + (
        "\ndef get_requires_for_build_wheel(config_settings=None):\n"
        "    _probe(print)\n"
        "    sys.stdout.flush()\n"
        "    raise RuntimeError('the hostile backend is done')\n"
    )
    git_server.commit(
        "hostile-backend",
        {
            "requirements.txt": ".\n",
            "pyproject.toml": (
                "[build-system]\nrequires = []\nbuild-backend = 'hostile_backend'\n"
                "backend-path = ['.']\n"
                "[project]\nname = 'hostile'\nversion = '1'\n"
            ),
            "hostile_backend.py": backend,
        },
    )
    launch_id, events = launch(api, git_server.url("hostile-backend"))

    assert_nothing_leaked(pg, api, secrets, [launch_id])
    assert events[-1]["phase"] == "failed"
    output = build_log(events, api, launch_id)
    assert_probe_was_contained(output, pg, listener)
    assert_box_left_nothing(pg, str(launch_row(pg, launch_id).env_name))


def test_a_setup_py_runs_contained_and_the_built_environment_is_sealed(
    pg: Stack,
    api: httpx.Client,
    git_server: GitServer,
    secrets: dict[str, str],
    listener: Listener,
) -> None:
    # A build that succeeds hides its output: the probe writes it beside itself, into the
    # repository's copy that goes with the environment.
    setup = probe(pg, listener) + (
        "\nimport pathlib\n"
        "_lines = []\n"
        "_probe(_lines.append)\n"
        "pathlib.Path(__file__).with_name('probe.txt').write_text('\\n'.join(_lines))\n"
        "from setuptools import setup\n"
        "setup(name='hostile-setup', version='1', py_modules=[])\n"
    )
    commit = git_server.commit(
        "hostile-setup", {"requirements.txt": "./pkg\n", "pkg/setup.py": setup}
    )
    launch_id, events = launch(api, git_server.url("hostile-setup"))

    assert events[-1]["phase"] == "ready", build_log(events, api, launch_id)
    env_name = str(launch_row(pg, launch_id).env_name)
    env = pg.config.data_dir / "envs" / env_name
    assert commit in env_name
    output = (env / "repo" / "pkg" / "probe.txt").read_text()
    assert_probe_was_contained(output, pg, listener)
    assert_box_left_nothing(pg, env_name)
    # Sessions (other uids) read the environment; nothing but root may change it.
    for folder, dirs, files in os.walk(env):
        for entry in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
            info = os.lstat(entry)
            assert info.st_uid == 0, entry
            if not os.path.islink(entry):
                assert info.st_mode & 0o7022 == 0 and info.st_mode & 0o004, entry
    api.delete(f"/api/launches/{launch_id}")
    assert_nothing_leaked(pg, api, secrets, [launch_id])


def test_an_index_on_127_0_0_1_is_refused_by_the_egress_proxy(
    pg: Stack,
    api: httpx.Client,
    git_server: GitServer,
    secrets: dict[str, str],
    listener: Listener,
) -> None:
    local = f"http://127.0.0.1:{listener.port}"
    git_server.commit(
        "hostile-index",
        {
            "requirements.txt": (
                f"--index-url {local}/simple\n--extra-index-url {local}/extra\n"
                f"--find-links {local}/links\n--trusted-host 127.0.0.1\n"
                "hublaunch-never-there\n"
            )
        },
    )
    launch_id, events = launch(api, git_server.url("hostile-index"))

    assert events[-1]["phase"] == "failed"
    assert "No matching distribution found for hublaunch-never-there" in build_log(
        events, api, launch_id
    )
    assert listener.accepted == []
    worker_log = (pg.logs / "worker.log").read_text()
    assert f"refused 127.0.0.1:{listener.port}: not on this step's allowlist" in worker_log
    assert_nothing_leaked(pg, api, secrets, [launch_id])
