"""Spawners for the Hub that hublaunch drives.

``SandboxSpawner`` (the default) runs a real ``jupyterhub-singleuser`` from a local Python
environment chosen by the launch's ``user_options["image"]``, inside a box (``sandbox``): its own
uid, namespaces, read-only system, private home and /tmp, no network but a path to the Hub API,
and cgroup limits. ``EnvironmentSpawner`` runs the same server unsandboxed, as the Hub's own user
(only for a trusted laptop where no box can be made). ``FakeSpawner`` answers HTTP in the Hub's
own process, for fast tests and benchmarks. All refuse images they do not know, with a message
the launch passes on to the user.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import sys
import time
from typing import Any, ClassVar

from jupyterhub.spawner import LocalProcessSpawner, Spawner
from tornado import web
from tornado.httpserver import HTTPServer
from traitlets import Dict, Float, Integer, List, Unicode
from traitlets.config import LoggingConfigurable

from hub.redact import redact
from sandbox import box as boxes
from sandbox.cgroups import Limits
from sandbox.egress import Destination, Proxy
from sandbox.netns import Bridge

BUILT_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,200}$")


class UnknownImage(web.HTTPError):
    """Raised by start(); the Hub reports its message as the spawn failure."""

    def __init__(self, image: str, known: list[str]) -> None:
        message = f"Unknown image {image!r}; this Hub can run: {', '.join(sorted(known))}"
        super().__init__(400, message, reason=message)
        self.jupyterhub_message = message


class ImageChoice(LoggingConfigurable):
    """Map ``user_options["image"]`` (``name`` or ``name:tag``) to a known environment."""

    environments = Dict(
        value_trait=Unicode(),
        default_value={"default": sys.prefix},
        help="Image name -> Python environment prefix holding jupyterhub-singleuser.",
    ).tag(config=True)

    image = Unicode("default", help="Set per launch from user_options['image'].").tag(config=True)

    environments_dir = Unicode(
        "", help="Folder of environments built by hublaunch's venv builder, one per name."
    ).tag(config=True)

    def chosen_environment(self) -> str:
        image = self.image or "default"
        name = image.split(":", 1)[0] if image.count(":") == 1 else image
        for candidate in (image, name):
            if candidate in self.environments:
                return str(self.environments[candidate])
        # Only names hublaunch built (a finished environment has the marker file).
        if self.environments_dir and BUILT_NAME.match(image):
            path = os.path.join(self.environments_dir, image)
            if os.path.isfile(os.path.join(path, ".hublaunch-env")):
                return path
        raise UnknownImage(image, list(self.environments))


def jupyter_environment() -> dict[str, str]:
    """A built environment is layered on the Hub's own: it finds the Jupyter server's modules
    through a .pth file, and its data and config (JupyterLab's assets) here."""
    return {
        "JUPYTER_PATH": os.path.join(sys.prefix, "share", "jupyter"),
        "JUPYTER_CONFIG_PATH": os.path.join(sys.prefix, "etc", "jupyter"),
        "JUPYTERLAB_DIR": os.path.join(sys.prefix, "share", "jupyter", "lab"),
    }


class EnvironmentSpawner(ImageChoice, LocalProcessSpawner):  # type: ignore[misc]
    """A local process running as the Hub's own user, with a throwaway working directory."""

    home_dir_template = Unicode(
        "homes/{username}", config=True, help="Working directory of each session's server."
    )

    def make_preexec_fn(self, name: str) -> None:
        return None  # no user switching: every session runs as the Hub's user

    def delete_forever(self) -> None:
        # The Hub calls this when the temporary user is deleted: its files go with it.
        shutil.rmtree(self.home_dir_template.format(username=self.user.name), ignore_errors=True)

    def user_env(self, env: dict[str, str]) -> dict[str, str]:
        env["USER"] = self.user.name
        home = self.home_dir_template.format(username=self.user.name)
        os.makedirs(home, mode=0o700, exist_ok=True)
        env["HOME"] = home
        return env

    async def start(self) -> Any:
        prefix = self.chosen_environment()
        # A built environment is layered on this one: it finds the Jupyter server's modules
        # through a .pth file, and its data and config (JupyterLab's assets) here.
        self.cmd = [os.path.join(prefix, "bin", "python"), "-m", "jupyterhub.singleuser"]
        self.environment.update(jupyter_environment())
        self.notebook_dir = self.home_dir_template.format(username=self.user.name)
        _copy_repository(prefix, self.notebook_dir)
        return await super().start()


def _copy_repository(prefix: str, home: str) -> None:
    """As on Binder, a session starts in a copy of the repository it was built from."""
    source = os.path.join(prefix, "repo")
    os.makedirs(home, mode=0o700, exist_ok=True)
    if os.path.isdir(source) and not os.listdir(home):
        shutil.copytree(source, home, dirs_exist_ok=True, symlinks=True)


OUT_OF_MEMORY = "out of memory"
# What a box's server runs as, still in the box: copy the repository into the (empty, private)
# home, then become the Jupyter server. Positional arguments only: no text of a visitor's.
START_SCRIPT = 'if [ -d "$1" ]; then cp -R "$1/." "$HOME/" 2>/dev/null; fi; shift; exec "$@"'


class SandboxSpawner(ImageChoice, Spawner):  # type: ignore[misc]
    """Each server in its own box; see the ``sandbox`` package for what a box is."""

    uid_min = Integer(
        60000, config=True, help="First uid handed to sessions; each running session has its own."
    )
    uid_max = Integer(60999, config=True, help="Last uid handed to sessions.")
    pids_limit = Integer(512, config=True, help="Processes and threads a session may run.")
    home_size = Integer(
        2**30,
        config=True,
        help="Bytes of the session's home (memory-backed, so it counts toward mem_limit too).",
    )
    home = Unicode("/home/jovyan", config=True, help="The home folder inside the box.")
    public_port = Integer(
        8000,
        config=True,
        help="The proxy's public port on the host's 127.0.0.1: the only host endpoint a box "
        "reaches (its server needs the Hub API, which the proxy serves under /hub/api/).",
    )
    inner_port = Integer(8888, help="The server's port inside its own network namespace.")
    inner_hub_port = Integer(8081, help="Where the box finds the Hub API, inside the box.")
    stop_grace = Float(5.0, config=True, help="Seconds between SIGTERM and SIGKILL on stop.")
    egress = List(
        Unicode(),
        [],
        config=True,
        help="host:port destinations a session may reach (HTTP proxy at 127.0.0.1:3128 in its "
        "box, set as http(s)_proxy). Empty (the default): no outbound traffic at all. Hosts "
        "that resolve to loopback or private addresses are refused whatever this says.",
    )
    egress_port = Integer(3128, help="The egress proxy's port inside the box.")

    _uids: ClassVar[set[int]] = set()  # uids of the boxes this Hub runs

    _box: boxes.Box | None = None
    _bridge: Bridge | None = None
    _ns_fd: int | None = None
    _output: asyncio.Task[None] | None = None  # the output relay (held so it is not collected)
    uid: int | None = None
    host_port: int = 0
    end_reason: str = ""

    @property
    def box_name(self) -> str:
        # The Hub's user names are unique; cgroup names must be too.
        return f"session-{self.user.name}"

    # -- state kept in the Hub's database: a Hub restart finds running boxes again -------------
    def get_state(self) -> dict[str, Any]:
        state: dict[str, Any] = super().get_state()
        if self._box is not None:
            state.update(
                pid=self._box.pid, netns=self._box.netns, uid=self.uid, port=self.host_port
            )
        if self.end_reason:
            state["end_reason"] = self.end_reason
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        if "pid" in state:
            self._box = boxes.Box(self.box_name, int(state["pid"]), int(state["netns"]))
            self.uid = int(state["uid"])
            self.host_port = int(state["port"])
            self._uids.add(self.uid)
        self.end_reason = state.get("end_reason", "")

    def clear_state(self) -> None:
        super().clear_state()
        self._box = None
        self.host_port = 0
        # end_reason stays: hublaunch reads it to tell the visitor why the session ended.

    def _allocate_uid(self) -> int:
        span = self.uid_max - self.uid_min + 1
        start = int(hashlib.sha256(self.user.name.encode()).hexdigest(), 16) % span
        for offset in range(span):
            uid = self.uid_min + (start + offset) % span
            if uid in self._uids:
                continue
            try:
                pwd.getpwuid(uid)  # an account of the machine's: never share its files
            except KeyError:
                self._uids.add(uid)
                return uid
        raise web.HTTPError(503, "No free sandbox uid; raise uid_max or end some sessions")

    def _release_uid(self) -> None:
        if self.uid is not None:
            self._uids.discard(self.uid)
            self.uid = None

    def spec(self, prefix: str, uid: int, env: dict[str, str]) -> boxes.BoxSpec:
        python = os.path.join(prefix, "bin", "python")
        mounts: list[str | tuple[str, str]] = list(
            dict.fromkeys((sys.base_prefix, sys.prefix, prefix))
        )
        return boxes.BoxSpec(
            name=self.box_name,
            uid=uid,
            command=[
                "/bin/sh",
                "-c",
                START_SCRIPT,
                "sh",
                os.path.join(prefix, "repo"),
                python,
                "-m",
                "jupyterhub.singleuser",
                *self.get_args(),
            ],
            env=env,
            cwd=self.home,
            read_only=mounts,
            home=self.home,
            home_size=self.home_size,
            hostname="jupyter",
            limits=Limits(
                memory=int(self.mem_limit or 0),
                pids=self.pids_limit,
                cpu=float(self.cpu_limit or 0),
            ),
        )

    def box_env(self, prefix: str) -> dict[str, str]:
        self.ip, self.port = "127.0.0.1", self.inner_port
        # Only what the server needs: get_env() is the Hub's JUPYTERHUB_* set (the server's own
        # token, nothing of the service's) plus Spawner.environment.
        env = {k: v for k, v in self.get_env().items() if k not in ("PATH", "PYTHONPATH")}
        env.update(jupyter_environment())
        env.update(
            HOME=self.home,
            USER="jovyan",
            SHELL="/bin/sh",
            LANG=env.get("LANG", "C.UTF-8"),
            PATH=f"{prefix}/bin:/usr/local/bin:/usr/bin:/bin",
            JUPYTERHUB_ROOT_DIR=self.home,
        )
        if self.egress:
            proxy = f"http://127.0.0.1:{self.egress_port}"
            for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
                env[name] = proxy
            # The Hub API is on the box's own loopback, never through the proxy.
            env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
        return env

    async def start(self) -> tuple[str, int]:
        prefix = self.chosen_environment()
        uid = self._allocate_uid()
        self.uid, self.end_reason = uid, ""
        # The Hub API, as the box sees it: its own 127.0.0.1, forwarded to the public proxy.
        self.hub_connect_url = f"http://127.0.0.1:{self.inner_hub_port}"
        try:
            spec = self.spec(prefix, uid, self.box_env(prefix))
            read_end, write_end = os.pipe()
            try:
                self._box = await asyncio.to_thread(boxes.start, spec, stdout=write_end)
            finally:
                os.close(write_end)
            self._output = asyncio.create_task(self._relay_output(read_end))
            await self._attach()
            self._box.release()
        except BaseException:
            await self._end()
            raise
        return ("127.0.0.1", self.host_port)

    async def _relay_output(self, fd: int) -> None:
        """Copy the box's output (the server's log, anything its processes print) into the
        Hub's log, line by line, with tokens masked: the server logs refused requests with
        their whole URL, ``?token=`` included."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2**20)
        pipe = os.fdopen(fd, "rb", buffering=0)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        try:
            while line := await reader.readline():
                sys.stderr.write(redact(line.decode(errors="replace")))
        except ValueError:  # a line past the limit: the rest of it is dropped
            pass
        finally:
            transport.close()

    async def _attach(self) -> None:
        """Open the box's forwarders: host port -> its server, its Hub port -> the proxy."""
        if self._box is None:
            raise RuntimeError("no box to attach to: start() or load_state() comes first")
        self._ns_fd = self._box.ns_fd()
        self._bridge = Bridge(self._ns_fd)
        self.host_port = await self._bridge.expose(self.inner_port, self.host_port)
        await self._bridge.provide(self.inner_hub_port, ("127.0.0.1", self.public_port))
        if self.egress:
            destinations = [Destination.parse(d) for d in self.egress]
            proxy = Proxy(destinations, label=f"session {self.user.name}")
            await self._bridge.serve_in(self.egress_port, proxy.handle)

    def _detach(self) -> None:
        if self._bridge is not None:
            self._bridge.close()
            self._bridge = None
        if self._ns_fd is not None:
            os.close(self._ns_fd)
            self._ns_fd = None

    async def _end(self) -> None:
        self._detach()
        if self._box is not None:
            await asyncio.to_thread(self._box.end)
            self._box = None
        self._release_uid()

    async def poll(self) -> int | None:
        if self._box is None:
            return 0
        if not self._box.alive():
            await self._end()
            return 1
        if self._box.group.oom_kills():
            # Past its memory: the whole session ends, and hublaunch tells the visitor why.
            self.log.warning("Session %s went past its memory limit; ending it", self.user.name)
            self.end_reason = OUT_OF_MEMORY
            await self._end()
            return 137
        if self._bridge is None:  # the Hub restarted: reopen the way to the running server
            try:
                await self._attach()
            except OSError as e:
                self.log.warning("Session %s cannot be reached again (%s)", self.user.name, e)
                await self._end()
                return 1
        return None

    async def stop(self, now: bool = False) -> None:
        if self._box is None:
            return
        if not now:
            self._box.signal_all(signal.SIGTERM)
            deadline = time.monotonic() + self.stop_grace
            # Nothing signals a cgroup's emptying in v1 short of a release agent: poll it.
            while self._box.group.pids() - {self._box.pid} and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        await self._end()


class _FakeServerHandler(web.RequestHandler):
    def get(self, *_args: Any) -> None:
        self.write({"fake": True, "user": self.settings["username"]})

    post = put = delete = get


class FakeSpawner(ImageChoice, Spawner):  # type: ignore[misc]
    """An HTTP server inside the Hub process: starts in milliseconds, runs nothing."""

    start_delay = Float(0.0, config=True, help="Seconds start() takes, to mimic a slow server.")
    failing_starts = Dict(
        value_trait=Integer(),
        config=True,
        help="Image -> how many of a user's servers of that image die while starting (fault "
        "tests: a server that fails a few times, or always); known to the fake spawner only.",
    )

    _http: HTTPServer | None = None
    _starts: ClassVar[dict[str, int]] = {}  # user -> servers started (this Hub process)

    async def start(self) -> tuple[str, int]:
        import asyncio

        failing = self.failing_starts.get(self.image)
        if failing is None:
            self.chosen_environment()
        if self.start_delay:
            await asyncio.sleep(self.start_delay)
        starts = self._starts[self.user.name] = self._starts.get(self.user.name, 0) + 1
        if failing is not None and starts <= failing:
            raise RuntimeError(f"the server died while starting (start {starts})")
        app = web.Application([(r"/(.*)", _FakeServerHandler)], username=self.user.name)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        sock.setblocking(False)
        self._http = HTTPServer(app)
        self._http.add_sockets([sock])
        return ("127.0.0.1", sock.getsockname()[1])

    async def poll(self) -> int | None:
        return None if self._http is not None else 0

    async def stop(self, now: bool = False) -> None:
        if self._http is not None:
            self._http.stop()
            self._http = None
