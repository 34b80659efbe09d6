"""Spawners for the Hub that hublaunch drives.

``EnvironmentSpawner`` runs a real ``jupyterhub-singleuser`` from a local Python environment
chosen by the launch's ``user_options["image"]`` (no Docker). ``FakeSpawner`` answers HTTP in
the Hub's own process, for fast tests and benchmarks. Both refuse images they do not know, with
a message the launch passes on to the user.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
from typing import Any

from jupyterhub.spawner import LocalProcessSpawner, Spawner
from tornado import web
from tornado.httpserver import HTTPServer
from traitlets import Dict, Float, Unicode
from traitlets.config import LoggingConfigurable

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
        self.environment.update(
            {
                "JUPYTER_PATH": os.path.join(sys.prefix, "share", "jupyter"),
                "JUPYTER_CONFIG_PATH": os.path.join(sys.prefix, "etc", "jupyter"),
                "JUPYTERLAB_DIR": os.path.join(sys.prefix, "share", "jupyter", "lab"),
            }
        )
        self.notebook_dir = self.home_dir_template.format(username=self.user.name)
        _copy_repository(prefix, self.notebook_dir)
        return await super().start()


def _copy_repository(prefix: str, home: str) -> None:
    """As on Binder, a session starts in a copy of the repository it was built from."""
    source = os.path.join(prefix, "repo")
    os.makedirs(home, mode=0o700, exist_ok=True)
    if os.path.isdir(source) and not os.listdir(home):
        shutil.copytree(source, home, dirs_exist_ok=True, symlinks=True)


class _FakeServerHandler(web.RequestHandler):
    def get(self, *_args: Any) -> None:
        self.write({"fake": True, "user": self.settings["username"]})

    post = put = delete = get


class FakeSpawner(ImageChoice, Spawner):  # type: ignore[misc]
    """An HTTP server inside the Hub process: starts in milliseconds, runs nothing."""

    start_delay = Float(0.0, config=True, help="Seconds start() takes, to mimic a slow server.")

    _http: HTTPServer | None = None

    async def start(self) -> tuple[str, int]:
        import asyncio

        self.chosen_environment()
        if self.start_delay:
            await asyncio.sleep(self.start_delay)
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
