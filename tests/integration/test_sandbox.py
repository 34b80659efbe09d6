"""Hostile code in real sessions: every attack of issue 8, run from a real kernel in a sandboxed
server, must fail, and the service must go on launching. Each attack has a positive control
(the same kind of action on something the session may use) so a broken probe cannot pass.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from hublaunch.stack import Stack
from tests.fakes import RecordingBroker
from tests.integration.conftest import read_events, wait_for
from tests.integration.kernel import run_code
from worker.context import WorkerContext
from worker.crypto import cipher
from worker.cull import cull_pass
from worker.hub_client import HubClient
from worker.unit_of_work import Units

pytestmark = pytest.mark.integration

CGROUPS = Path("/sys/fs/cgroup")

# Runs in the kernel: each probe prints OK:<what it got> or DENIED:<exception name>.
PROBES = """
import json, os, socket
results = {}
def probe(name, fn):
    try:
        results[name] = "OK:" + str(fn())[:300]
    except BaseException as e:
        results[name] = "DENIED:" + type(e).__name__
def read(path):
    with open(path, "rb") as f:
        return f.read(200)
def connect(port, host="127.0.0.1"):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.settimeout(3)
        s.connect((host, port))
        return "connected"
def write(path):
    with open(path, "w") as f:
        f.write("x")
    return "written"
"""


def probe(session: dict[str, Any], body: str) -> dict[str, str]:
    code = PROBES + textwrap.dedent(body) + "\nprint(json.dumps(results))\n"
    output = run_code(session["server"], session["token"], code)
    # ipykernel also forwards what its processes write to fd 1 and 2: take the probe's line.
    line = next(x for x in reversed(output.splitlines()) if x.startswith("{"))
    return dict(json.loads(line))


def launch(api: httpx.Client) -> dict[str, Any]:
    response = api.post("/api/launches", json={"image": "default"})
    assert response.status_code == 202, response.text
    launch_id = response.json()["id"]
    events = read_events(api, launch_id)
    assert events[-1]["phase"] == "ready", events
    status = api.get(f"/api/launches/{launch_id}").json()
    server, token = status["url"].split("?token=")
    return {"id": launch_id, "user": status["user"], "server": server, "token": token}


@pytest.fixture(scope="module")
def api(real_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=real_stack.public_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def sessions(api: httpx.Client) -> Iterator[list[dict[str, Any]]]:
    started = [launch(api), launch(api)]
    yield started
    for session in started:
        api.delete(f"/api/launches/{session['id']}")


def routes(stack: Stack) -> dict[str, Any]:
    response = httpx.get(
        f"http://127.0.0.1:{stack.proxy_api_port}/api/routes",
        headers={"Authorization": f"token {stack.proxy_token}"},
    )
    response.raise_for_status()
    return dict(response.json())


def service_files(stack: Stack) -> list[Path]:
    data = stack.config.data_dir
    files = [
        data / "secret.key",
        data / "hub" / "jupyterhub.sqlite",
        data / "hub" / "jupyterhub_cookie_secret",
        data / "logs" / "worker.log",
    ]
    for path in files:
        assert path.exists(), f"{path} should exist for the attack to mean anything"
    return files


def secrets_of(stack: Stack) -> list[str]:
    key = (stack.config.data_dir / "secret.key").read_text().strip()
    return [stack.hub_token, stack.proxy_token, key]


def test_a_session_is_its_own_unprivileged_user_with_nothing_of_the_service(
    real_stack: Stack, sessions: list[dict[str, Any]]
) -> None:
    first, second = sessions
    body = """
    status = dict(l.split(":\\t", 1) for l in open("/proc/self/status").read().splitlines()
                  if ":\\t" in l)
    results["uid"] = "OK:%d" % os.getuid()
    results["groups"] = "OK:%s" % os.getgroups()
    results["caps"] = "OK:" + status["CapEff"] + "/" + status["CapBnd"]
    results["nnp"] = "OK:" + status["NoNewPrivs"]
    results["pids"] = "OK:%d" % len([p for p in os.listdir("/proc") if p.isdigit()])
    results["env"] = "OK:" + json.dumps(dict(os.environ))
    envs = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                envs.append(read("/proc/%s/environ" % p).decode(errors="replace"))
            except OSError:
                pass
    results["environs"] = "OK:" + "|".join(envs)
    results["ns"] = "OK:" + json.dumps(
        {k: os.stat("/proc/self/ns/" + k).st_ino for k in ("ipc", "uts", "mnt", "pid", "net")})
    results["hostname"] = "OK:" + socket.gethostname()
    st = os.statvfs(os.path.expanduser("~"))
    results["home bytes"] = "OK:%d" % (st.f_blocks * st.f_frsize)
    """
    one, two = probe(first, body), probe(second, body)
    uids = {int(r["uid"][3:]) for r in (one, two)}
    assert len(uids) == 2 and 0 not in uids and os.getuid() not in uids
    for r in (one, two):
        assert r["groups"] == "OK:[]"
        assert r["caps"] == "OK:0000000000000000/0000000000000000"
        assert r["nnp"].strip() == "OK:1"
        # Its own PID namespace: the reaper, the server, the kernel (and a few children).
        assert int(r["pids"][3:]) < 10
        env = json.loads(r["env"][3:])
        assert not [k for k in env if k.startswith(("HUBLAUNCH_", "CONFIGPROXY"))], env.keys()
        for secret in secrets_of(real_stack):
            assert secret not in r["env"] and secret not in r["environs"]
        # Its own IPC, UTS, mount, PID and network namespaces: none shared with the host (this
        # test runs on the host) or with the other session.
        ours = {
            k: os.stat(f"/proc/self/ns/{k}").st_ino for k in ("ipc", "uts", "mnt", "pid", "net")
        }
        theirs = json.loads(r["ns"][3:])
        assert all(theirs[k] != ours[k] for k in ours), theirs
        assert r["hostname"] == "OK:jupyter"
        assert int(r["home bytes"][3:]) == 2**30  # HUBLAUNCH_SESSION_HOME_BYTES' default
    first_ns, second_ns = json.loads(one["ns"][3:]), json.loads(two["ns"][3:])
    assert all(first_ns[k] != second_ns[k] for k in first_ns)
    # Its limits, as the host's cgroups hold them (this stack: 1 GiB, 512 processes, 1 CPU).
    for session in sessions:
        group = f"hublaunch/session-{session['user']}"
        assert (CGROUPS / "memory" / group / "memory.limit_in_bytes").read_text().strip() == str(
            2**30
        )
        assert (CGROUPS / "pids" / group / "pids.max").read_text().strip() == "512"
        cpu = CGROUPS / "cpu" / group
        quota = int((cpu / "cpu.cfs_quota_us").read_text())
        assert quota == int((cpu / "cpu.cfs_period_us").read_text())  # one CPU's time


def test_a_session_cannot_read_the_services_files_or_processes(
    real_stack: Stack, sessions: list[dict[str, Any]]
) -> None:
    files = service_files(real_stack)
    host_pids = [p.pid for p in real_stack.procs.values()]
    config = Path.cwd() / "hub" / "jupyterhub_config.py"
    body = f"""
    probe("control: own home", lambda: write(os.path.expanduser("~/mine")) and read("mine"))
    probe("control: the environment", lambda: read(os.__file__))
    for path in {[str(f) for f in files]!r}:
        probe("read " + path, lambda: read(path))
    probe("list the data folder", lambda: os.listdir({str(real_stack.config.data_dir)!r}))
    probe("the repository's config", lambda: read({str(config)!r}))
    probe("the repository's .hublaunch", lambda: os.listdir({str(Path.cwd() / ".hublaunch")!r}))
    results["listed: repository"] = "OK:" + json.dumps(os.listdir({str(Path.cwd())!r}))
    results["listed: /root"] = "OK:" + json.dumps(os.listdir("/root"))
    for pid in {host_pids!r}:
        probe("environ of %d" % pid, lambda: read("/proc/%d/environ" % pid))
    probe("environ of the reaper", lambda: read("/proc/1/environ"))
    probe("root of the reaper", lambda: os.listdir("/proc/1/root"))
    probe("/etc/shadow", lambda: read("/etc/shadow"))
    """
    results = probe(sessions[0], body)
    assert results.pop("control: own home").startswith("OK:")
    assert results.pop("control: the environment").startswith("OK:")
    # Folders above the environments it runs are there only as the way to them.
    assert json.loads(results.pop("listed: repository")[3:]) in ([], [".venv"])
    assert json.loads(results.pop("listed: /root")[3:]) in ([], [".pyenv"])
    leaked = {k: v for k, v in results.items() if not v.startswith("DENIED:")}
    assert not leaked, leaked


def test_a_session_reaches_no_service_port_and_no_other_session(
    real_stack: Stack, sessions: list[dict[str, Any]]
) -> None:
    first, second = sessions
    other = routes(real_stack)[f"/user/{second['user']}"]["target"]
    other_port = int(other.rsplit(":", 1)[1])
    ports = {
        "redis": 6379,
        "postgresql": 5432,
        "hub internal port": real_stack.hub_port,
        "proxy api": real_stack.proxy_api_port,
        "app": real_stack.app_port,
        "public proxy (directly)": real_stack.public_port,
        "another session's server": other_port,
    }
    body = f"""
    # The one way out: the Hub API through the proxy, as the server itself uses it.
    import urllib.request
    probe("control: hub api", lambda: urllib.request.urlopen(
        os.environ["JUPYTERHUB_API_URL"] + "/", timeout=5).status)
    for name, port in {ports!r}.items():
        probe(name, lambda: connect(port))
        probe(name + " v6", lambda: connect(port, "::1"))
    probe("redis on its address", lambda: connect(6379, "127.0.0.2"))
    """
    results = probe(first, body)
    assert results.pop("control: hub api") == "OK:200"
    leaked = {k: v for k, v in results.items() if not v.startswith("DENIED:")}
    assert not leaked, leaked
    # The proxy still reaches both servers from the host.
    for session in sessions:
        response = httpx.get(
            f"{session['server']}api/status", headers={"Authorization": f"token {session['token']}"}
        )
        assert response.status_code == 200


def test_a_session_writes_only_its_home_and_tmp_and_sees_no_other_home(
    real_stack: Stack, sessions: list[dict[str, Any]]
) -> None:
    first, second = sessions
    probe(
        first,
        'probe("mark", lambda: write(os.path.expanduser("~/first-was-here")))\n'
        'probe("mark tmp", lambda: write("/tmp/first-was-here"))',
    )
    prefix = os.path.dirname(os.path.dirname(os.__file__))
    body = f"""
    probe("control: home", lambda: write(os.path.expanduser("~/ok")))
    probe("control: tmp", lambda: write("/tmp/ok"))
    for path in ["/usr/evil", "/etc/evil", "/evil", {prefix + "/evil"!r},
                 {str(real_stack.config.data_dir / "evil")!r}, "/home/evil"]:
        probe("write " + path, lambda: write(path))
    probe("the other home", lambda: read(os.path.expanduser("~/first-was-here")))
    probe("the other /tmp", lambda: read("/tmp/first-was-here"))
    found = []
    for top in ["/home", "/tmp", "/work", "/root"]:
        for root, dirs, names in os.walk(top):
            found += [os.path.join(root, n) for n in names if n == "first-was-here"]
    results["search"] = "DENIED:none" if not found else "OK:" + repr(found)
    """
    results = probe(second, body)
    assert results.pop("control: home").startswith("OK:")
    assert results.pop("control: tmp").startswith("OK:")
    leaked = {k: v for k, v in results.items() if not v.startswith("DENIED:")}
    assert not leaked, leaked


def test_a_fork_bomb_stops_at_the_process_limit_and_the_service_goes_on(
    real_stack: Stack, sessions: list[dict[str, Any]], api: httpx.Client
) -> None:
    body = """
    import time
    children, error = [], "none"
    for _ in range(2000):
        try:
            pid = os.fork()
        except OSError as e:
            error = type(e).__name__
            break
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.kill(pid, 9)
    for pid in children:
        os.waitpid(pid, 0)
    results["forked"] = "OK:%d" % len(children)
    results["stopped by"] = "OK:" + error
    """
    results = probe(sessions[1], body)
    assert results["stopped by"] == "OK:BlockingIOError", results
    assert int(results["forked"][3:]) < 512
    hub = HubClient(real_stack.hub_api_url, real_stack.hub_token)
    assert hub.get_user(sessions[0]["user"]) is not None
    hub.close()
    extra = launch(api)
    api.delete(f"/api/launches/{extra['id']}")


def leftovers(box: str, uid: int, netns: int) -> list[str]:
    """What a box left on the machine: its cgroups, processes of its uid or in its namespace."""
    found = [
        str(path)
        for c in ("memory", "pids", "cpu")
        if (path := CGROUPS / c / "hublaunch" / box).exists()
    ]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            status = (proc / "status").read_text()
            ns = os.stat(proc / "ns" / "net").st_ino
        except OSError:
            continue
        uids = next(line for line in status.splitlines() if line.startswith("Uid:"))
        if str(uid) in uids.split()[1:] or ns == netns:
            found.append(f"process {proc.name}")
    return found


IDENTITY = """
results["netns"] = "OK:%d" % os.stat("/proc/self/ns/net").st_ino
results["uid"] = "OK:%d" % os.getuid()
"""


def identity(session: dict[str, Any]) -> tuple[str, int, int]:
    inside = probe(session, IDENTITY)
    box = f"session-{session['user']}"
    assert all((CGROUPS / c / "hublaunch" / box).is_dir() for c in ("memory", "pids", "cpu"))
    return box, int(inside["uid"][3:]), int(inside["netns"][3:])


def test_an_ended_session_leaves_nothing(real_stack: Stack, api: httpx.Client) -> None:
    session = launch(api)
    box, uid, netns = identity(session)
    assert leftovers(box, uid, netns)  # the probe sees a running box
    assert api.delete(f"/api/launches/{session['id']}").status_code == 202
    wait_for(
        lambda: api.get(f"/api/launches/{session['id']}").json()["status"] == "ended", 40, "end"
    )
    wait_for(lambda: not leftovers(box, uid, netns), 20, "the session's processes and cgroups")


def test_a_session_past_its_memory_is_ended_as_out_of_memory_and_leaves_nothing(
    real_stack: Stack, api: httpx.Client
) -> None:
    session = launch(api)
    name, uid, netns = identity(session)

    # The stack gives sessions 1 GiB (tests/integration/conftest.py); ask for 3.
    with pytest.raises(Exception):  # noqa: B017 - the kernel dies under the request
        run_code(session["server"], session["token"], "x = bytearray(3 * 2**30)", timeout=20)
    hub = HubClient(real_stack.hub_api_url, real_stack.hub_token)
    try:
        wait_for(
            lambda: not (user := hub.get_user(session["user"])) or "" not in user.servers,
            40,
            "the Hub to notice the session ended",
        )
        settings = real_stack.settings()
        ctx = WorkerContext(
            settings=settings,
            hub=hub,
            cipher=cipher(settings),
            units=Units(settings.database_url, RecordingBroker(settings.database_url)),
            clock=lambda: datetime.now(UTC),
        )
        cull_pass(ctx)
    finally:
        hub.close()
    status = api.get(f"/api/launches/{session['id']}").json()
    assert status["end_reason"] == "out_of_memory", status
    page = api.get(f"/user/{session['user']}/lab")
    assert "ran out of memory" in page.text

    # Nothing left: processes of its uid, its cgroups, its network namespace.
    wait_for(lambda: not leftovers(name, uid, netns), 20, "the session's processes and cgroups")

    # And the service goes on.
    after = launch(api)
    api.delete(f"/api/launches/{after['id']}")


def test_no_token_reaches_a_log(
    real_stack: Stack, sessions: list[dict[str, Any]], api: httpx.Client
) -> None:
    first, second = sessions
    # Refused requests are logged with their URL: the servers' 403s, the Hub's, the app's.
    with httpx.Client(timeout=30, follow_redirects=False) as browser:
        assert browser.get(f"{second['server']}api/status?token={first['token']}").status_code
        browser.get(f"{first['server']}api/contents?token={first['token']}")
        for path in ("", "lab", "api/kernels", "files/x"):
            browser.get(f"{second['server']}{path}?token={first['token']}")
        browser.get(f"{real_stack.hub_api_url}/users/nobody?token={first['token']}")
        browser.get(f"{real_stack.public_url}/user/hl-gone/?token={first['token']}")
    own = probe(first, 'results["own"] = "OK:" + os.environ["JUPYTERHUB_API_TOKEN"]')["own"][3:]
    tokens = [first["token"], second["token"], own, *secrets_of(real_stack)]
    for log in real_stack.logs.glob("*.log"):
        text = log.read_text(errors="replace")
        leaked = [t[:6] for t in tokens if t in text]
        assert not leaked, f"{log.name} holds tokens starting {leaked}"


def test_outbound_traffic_only_to_what_the_operator_allows(
    real_stack: Stack, sessions: list[dict[str, Any]]
) -> None:
    # This stack allows pypi.org:443 (HUBLAUNCH_SESSION_EGRESS); the default allows nothing
    # (test_hub_restart's production stack checks that).
    body = """
    import urllib.request
    probe("control: the allowed index", lambda: urllib.request.urlopen(
        "https://pypi.org/simple/pip/", timeout=30).status)
    for url in ["http://127.0.0.1:6379/", "https://example.org/", "http://pypi.org/",
                "http://localhost:5432/"]:
        probe("through the proxy: " + url, lambda: urllib.request.urlopen(url, timeout=10).status)
    probe("direct: the index", lambda: connect(443, "203.0.113.80"))
    """
    results = probe(sessions[0], body)
    assert results.pop("control: the allowed index") == "OK:200"
    leaked = {k: v for k, v in results.items() if not v.startswith("DENIED:")}
    assert not leaked, leaked
