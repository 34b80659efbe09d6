"""JupyterHub in API-only mode for hublaunch.

The proxy sends only /hub/api/ to the Hub; every other path (the URL of a session that is
gone, too) goes to the hublaunch app (``extra_routes``). Ports, the app's
URL and the spawner are read from the environment so several stacks can run side by side.
Secrets come from the environment only: HUBLAUNCH_HUB_API_TOKEN (the service token) and
CONFIGPROXY_AUTH_TOKEN (read by the Hub and the proxy themselves).
"""

import json
import logging
import os
import shutil
from pathlib import Path
from urllib.parse import quote

from hub.redact import install as redact_tokens_in_logs

env = os.environ

# tornado's warnings print a refused request's whole URI, ?token= included (JupyterHub scrubs
# only its own request log): redact every log record of the Hub process. Sandboxed sessions'
# output reaches the Hub's log through the spawner, which redacts it the same way.
redact_tokens_in_logs(logging.getLogger("JupyterHub"))
data_dir = Path(env.get("HUBLAUNCH_HUB_DATA_DIR", ".hublaunch/hub")).resolve()
# The Hub's database, cookie secret and pid files: the service's alone.
data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
data_dir.chmod(0o700)

# -- network: everything on loopback -------------------------------------------
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = int(env.get("HUBLAUNCH_PROXY_PORT", "8000"))
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = int(env.get("HUBLAUNCH_HUB_PORT", "8081"))
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{env.get('HUBLAUNCH_PROXY_API_PORT', '8001')}"
c.ConfigurableHTTPProxy.pid_file = str(data_dir / "proxy.pid")
c.Spawner.ip = "127.0.0.1"

# -- the proxy: malformed escapes in paths ------------------------------------------
# configurable-http-proxy decodes a request's path (decodeURIComponent) to find its route, and a
# malformed escape (/build/image/%zz, or %ff, which is no UTF-8) makes that throw: the proxy
# answers 500 itself, whatever the app would have said (its --error-target only changes that
# page's body, never its status). So the proxy is started with a module loaded before it that
# looks such a path up still escaped: the request reaches its route (the app, which answers 404
# or one failed event) unchanged. Without node or the proxy's package (a proxy elsewhere),
# JupyterHub's own command is kept; docs/fuzzing.md has the nginx rule that does the same.
PROXY_LOOKUP_PATCH = """
import { ConfigurableProxy } from %s;
const lookup = ConfigurableProxy.prototype.targetForReq;
ConfigurableProxy.prototype.targetForReq = async function (req) {
  try {
    return await lookup.call(this, req);
  } catch (e) {
    if (!(e instanceof URIError)) throw e;
    const escaped = req.url.replaceAll("%%", "%%25");
    return lookup.call(this, Object.create(req, { url: { value: escaped } }));
  }
};
"""


def proxy_command() -> list[str] | None:
    found, node = shutil.which("configurable-http-proxy"), shutil.which("node")
    if found is None or node is None:
        return None
    script = Path(found).resolve()
    library = script.parent.parent / "lib" / "configproxy.js"
    if not library.is_file():
        return None
    patch = PROXY_LOOKUP_PATCH % json.dumps(library.as_uri())
    return [node, "--import", "data:text/javascript," + quote(patch), str(script)]


if (command := proxy_command()) is not None:
    c.ConfigurableHTTPProxy.command = command

# -- API-only mode ---------------------------------------------------------------
c.JupyterHub.hub_routespec = "/hub/api/"
c.Proxy.extra_routes = {"/": env.get("HUBLAUNCH_APP_URL", "http://127.0.0.1:8010")}
c.JupyterHub.authenticator_class = "null"
# Operators' own accounts; hublaunch's cleanup never touches an admin, prefix or not.
c.Authenticator.admin_users = {n for n in env.get("HUBLAUNCH_HUB_ADMIN_USERS", "").split(",") if n}
# hublaunch starts only default servers, but cleanup stops named ones too if anything made them.
c.JupyterHub.allow_named_servers = True

# -- the hublaunch service and the scopes it needs --------------------------------
# admin:users - create and delete the temporary users and read their servers' activity;
# servers     - start and stop their servers;
# tokens      - issue each user a token scoped to its own server;
# admin:server_state - read why a sandboxed server stopped (the spawner records "out of memory").
# Taken out of the Hub's environment once read: JupyterHub gives the proxy it starts a copy of
# that environment, and nothing the Hub starts needs the service's token.
c.JupyterHub.services = [{"name": "hublaunch", "api_token": env.pop("HUBLAUNCH_HUB_API_TOKEN")}]
c.JupyterHub.load_roles = [
    {
        "name": "hublaunch",
        "scopes": ["admin:users", "servers", "tokens", "admin:server_state"],
        "services": ["hublaunch"],
    }
]

# -- state ------------------------------------------------------------------------
c.JupyterHub.db_url = env.get("HUBLAUNCH_HUB_DB_URL", f"sqlite:///{data_dir / 'jupyterhub.sqlite'}")
c.JupyterHub.cookie_secret_file = str(data_dir / "jupyterhub_cookie_secret")
c.JupyterHub.pid_file = str(data_dir / "jupyterhub.pid")

# -- sessions survive a Hub restart ------------------------------------------------
# A restart (upgrade, crash) must not kill running sessions: the Hub reconnects to them.
# `hublaunch dev` and the tests set HUBLAUNCH_HUB_CLEANUP_SERVERS=1 so Ctrl-C leaves nothing behind.
c.JupyterHub.cleanup_servers = env.get("HUBLAUNCH_HUB_CLEANUP_SERVERS", "") == "1"
# Limits: spawns in flight at once (more get 429, which hublaunch retries with backoff) and
# running servers in all (0: no limit). Size them to the machine the sessions run on.
c.JupyterHub.concurrent_spawn_limit = int(env.get("HUBLAUNCH_HUB_CONCURRENT_SPAWN_LIMIT", "100"))
c.JupyterHub.active_server_limit = int(env.get("HUBLAUNCH_HUB_ACTIVE_SERVER_LIMIT", "0"))
# The Retry-After of those 429s: hublaunch (the Hub's only client) waits at least that long, so
# JupyterHub's default for browsers (30-60 s) would idle the Hub between spawns (measured: 200
# launches at a limit of 20 drained in 61 s where 5 s would do). About one spawn's time. Not a
# configurable trait in JupyterHub 6.1: it is read from the tornado settings (set below).
SPAWN_THROTTLE_RETRY_RANGE = (1, 4)

# -- spawning ---------------------------------------------------------------------
# "sandbox" (the default): every session in its own box (hub/spawners.py, sandbox/).
# "local": unsandboxed, as the Hub's own user: any visitor can read the service's secrets, so it
# only starts with HUBLAUNCH_ALLOW_UNSANDBOXED=1 (hublaunch dev sets it, loudly, where no box
# can be made). "fake": in-process stand-in servers for tests and benchmarks; runs no code.
spawner = env.get("HUBLAUNCH_HUB_SPAWNER", "sandbox")
c.JupyterHub.spawner_class = {
    "sandbox": "hub.spawners.SandboxSpawner",
    "local": "hub.spawners.EnvironmentSpawner",
    "fake": "hub.spawners.FakeSpawner",
    "docker": "dockerspawner.DockerSpawner",  # docker-compose.yml: see the end of this file
}[spawner]
if spawner == "fake":
    # Fault tests: a slow server, and images whose first N servers die while starting
    # (HUBLAUNCH_FAKE_FAILING_STARTS="flaky:2,broken:1000").
    c.FakeSpawner.start_delay = float(env.get("HUBLAUNCH_FAKE_START_DELAY", "0"))
    c.FakeSpawner.failing_starts = {
        image: int(count)
        for image, _, count in (
            item.partition(":") for item in env.get("HUBLAUNCH_FAKE_FAILING_STARTS", "").split(",")
        )
        if image and count.isdigit()
    }
if spawner == "sandbox":
    from sandbox.box import unavailable

    if (missing := unavailable()) is not None:
        raise SystemExit(f"hublaunch: cannot sandbox sessions here: {missing}")
elif spawner == "local" and env.get("HUBLAUNCH_ALLOW_UNSANDBOXED") != "1":
    raise SystemExit(
        "hublaunch: the 'local' spawner runs visitors' code as the Hub's own user; "
        "set HUBLAUNCH_ALLOW_UNSANDBOXED=1 to run it anyway (trusted machines only)"
    )
# Answer the start request within a second (202 while pending); hublaunch then follows the
# progress stream. JupyterHub reads this from tornado_settings, not as a JupyterHub trait.
c.JupyterHub.tornado_settings = {
    "slow_spawn_timeout": 1,
    "spawn_throttle_retry_range": SPAWN_THROTTLE_RETRY_RANGE,
}
# The launch's user_options carry only the image; it sets the spawner's `image` trait.
c.Spawner.apply_user_options = {"image": "image"}
c.Spawner.start_timeout = int(env.get("HUBLAUNCH_LAUNCH_TIMEOUT", "600"))
c.Spawner.http_timeout = 60
# JupyterHub 6 ignores ?token= in URLs unless the server allows it. hublaunch hands out
# links with a token scoped to one temporary user's server that expires with the session.
c.Spawner.environment = {"JUPYTERHUB_ALLOW_TOKEN_IN_URL": "1"}
c.Spawner.default_url = "/lab"
c.ImageChoice.environments_dir = str(
    Path(env.get("HUBLAUNCH_ENVS_DIR", ".hublaunch/envs")).resolve()
)
c.EnvironmentSpawner.home_dir_template = str(data_dir / "homes" / "{username}")
# Limits of each sandboxed session (mybinder.org gives 1-2 GB). Memory counts the home folder,
# which lives in memory; a session past its memory is ended with the reason "out of memory".
c.Spawner.mem_limit = env.get("HUBLAUNCH_SESSION_MEMORY", "2G")
c.Spawner.cpu_limit = float(env.get("HUBLAUNCH_SESSION_CPUS", "1"))
c.SandboxSpawner.pids_limit = int(env.get("HUBLAUNCH_SESSION_PIDS", "512"))
c.SandboxSpawner.home_size = int(env.get("HUBLAUNCH_SESSION_HOME_BYTES", str(2**30)))
c.SandboxSpawner.uid_min = int(env.get("HUBLAUNCH_SESSION_UID_MIN", "60000"))
c.SandboxSpawner.uid_max = int(env.get("HUBLAUNCH_SESSION_UID_MAX", "60999"))
c.SandboxSpawner.public_port = c.JupyterHub.port
# Outbound traffic of sessions: none unless the operator lists host:port destinations (e.g.
# "pypi.org:443,files.pythonhosted.org:443" so that %pip install works), reached through an
# allowlisting proxy in the box; loopback and private addresses are refused whatever it says.
c.SandboxSpawner.egress = [
    d.strip() for d in env.get("HUBLAUNCH_SESSION_EGRESS", "").split(",") if d.strip()
]
# Out-of-memory and dead boxes are noticed at the next poll.
c.Spawner.poll_interval = 10
# Binder clients on other sites (thebe, Jupyter Book) talk to the server from their own origin;
# every request still needs the session's token. Set to "" to allow the server's own origin only.
c.Spawner.args = [f"--ServerApp.allow_origin={env.get('HUBLAUNCH_SERVER_ALLOW_ORIGIN', '*')}"]
if spawner == "local" and os.geteuid() == 0:
    c.EnvironmentSpawner.args = [*c.Spawner.args, "--allow-root"]

# -- Docker deployments (docker-compose.yml) ---------------------------------------------------
# Each session is a container on a network of its own (HUBLAUNCH_DOCKER_NETWORK, internal) that
# holds only this Hub's container: a session reaches the Hub (its API, and the proxy as any
# visitor does) and nothing else of the service's.
if spawner == "docker":
    import re

    import jupyterhub

    # In its container: the sessions call the Hub API over their network.
    c.JupyterHub.hub_ip = "0.0.0.0"  # noqa: S104
    c.JupyterHub.hub_connect_ip = env.get("HUBLAUNCH_HUB_CONNECT_IP", "hub")
    c.DockerSpawner.network_name = env["HUBLAUNCH_DOCKER_NETWORK"]
    c.DockerSpawner.use_internal_ip = True  # the proxy reaches each server on that network
    # Inside the session's container (c.Spawner.ip above is the Hub's loopback).
    c.DockerSpawner.ip = "0.0.0.0"  # noqa: S104
    c.DockerSpawner.remove = True  # a session's container goes with it
    # repo2docker's images start a notebook server by default; the Hub needs its own server.
    c.DockerSpawner.cmd = ["jupyterhub-singleuser"]
    # user_options["image"] reaches an image only through this allowlist: `default`, and images
    # hublaunch built (<HUBLAUNCH_IMAGE_PREFIX><name>:latest). Any other name is refused (400).
    c.DockerSpawner.apply_user_options = lambda session, user_options: None  # start() reads it
    default_image = env.get("HUBLAUNCH_DOCKER_DEFAULT_IMAGE") or (
        "quay.io/jupyterhub/singleuser:{}.{}".format(*jupyterhub.version_info[:2])
    )
    image_prefix = env.get("HUBLAUNCH_IMAGE_PREFIX", "")
    built_image = re.compile(re.escape(image_prefix) + r"[a-z0-9][a-z0-9-]{0,200}:latest")

    def allowed_images(session):
        allowed = {"default": default_image}
        requested = session.user_options.get("image")
        if image_prefix and isinstance(requested, str) and built_image.fullmatch(requested):
            allowed[requested] = requested
        return allowed

    c.DockerSpawner.allowed_images = allowed_images
    # Visitors' code: no capabilities, no gain through set-uid files, bounded processes (memory
    # and CPUs: c.Spawner.mem_limit and cpu_limit above).
    c.DockerSpawner.extra_host_config = {
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "pids_limit": int(env.get("HUBLAUNCH_SESSION_PIDS", "512")),
    }
