"""``hublaunch dev``: the whole stack on one machine, embedded defaults, no Docker."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import FrameType

from hublaunch.stack import (
    Stack,
    StackConfig,
    free_port,
    masked,
    private_folder,
    redis_answers,
)
from sandbox.box import unavailable
from worker.settings import DATA_DIR, get_settings


def start_private_redis(server: str) -> tuple[str, subprocess.Popen[bytes]] | None:
    """A redis-server of our own on a free loopback port, with a password made for this run.

    The password reaches the server on its standard input (a command line is readable by every
    user of the machine, /proc/<pid>/cmdline) and the children only inside the broker URL in
    their environment; print ``masked(url)``, never the URL. None if it does not start.
    """
    password = secrets.token_urlsafe(32)
    port = free_port()
    config, feed = os.pipe()
    os.write(feed, f"requirepass {password}\n".encode())  # far below a pipe's buffer
    os.close(feed)
    try:
        proc = subprocess.Popen(
            # "-": read the configuration from stdin, then apply these (secret-free) options.
            [
                server,
                "-",
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdin=config,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            umask=0o077,
        )
    finally:
        os.close(config)
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    for _ in range(50):
        if redis_answers(url):
            return url, proc
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    return None


def choose_broker(
    configured: str, data_dir: Path
) -> tuple[str, str, subprocess.Popen[bytes] | None]:
    """The configured Redis if it answers, else a private redis-server, else a filesystem queue.
    Returns the broker URL (for the children's environment only), what to print, the server."""
    if redis_answers(configured):
        return configured, f"Redis at {masked(configured)}", None
    server = shutil.which("redis-server")
    if server and (private := start_private_redis(server)) is not None:
        url, proc = private
        return url, f"a private redis-server at {masked(url)}", proc
    folder = data_dir / "broker"
    private_folder(folder)
    return f"filesystem://{folder}", f"the embedded filesystem queue in {folder}", None


UNSANDBOXED = (
    "NOT SANDBOXED ({why}): every session runs as this user and can read this stack's "
    "secrets and files. Use it only on a trusted machine; nothing listens beyond 127.0.0.1."
)


def choose_spawner(requested: str) -> tuple[str, str]:
    """The spawner to run and a line for the banner. Sandboxed where a box can be made; else,
    said loudly, the unsandboxed spawner on loopback only."""
    if requested != "sandbox":
        why = "--spawner fake: stand-in servers, no code runs" if requested == "fake" else ""
        return requested, why or UNSANDBOXED.format(why="--spawner local")
    missing = unavailable()
    if missing is None:
        return "sandbox", "sandboxed (own uid, namespaces, no network but the Hub API, limits)"
    return "local", UNSANDBOXED.format(why=missing)


def run(*, port: int, spawner: str) -> int:
    settings = get_settings()
    data_dir = DATA_DIR.resolve()
    broker, broker_note, redis_proc = choose_broker(settings.broker_url, data_dir)
    spawner, sandbox_note = choose_spawner(spawner)
    stack = Stack(
        StackConfig(
            data_dir=data_dir,
            database_url=settings.database_url,
            broker_url=broker,
            public_port=port,
            spawner=spawner,
            # One queue per public port: two dev stacks on one Redis never take each other's work.
            queue=f"{settings.queue}-{port}",
            env={"HUBLAUNCH_ALLOW_UNSANDBOXED": "1"} if spawner == "local" else {},
        )
    )

    def _interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    # The readiness polls would bury the banner.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        stack.start()
        print(f"hublaunch is running at {stack.public_url}/")
        print(f"  database: {masked(settings.database_url)}")
        print(f"  broker:   {broker_note}")
        print(f"  logs:     {stack.logs}/")
        print(f"  sessions: {sandbox_note}")
        print("Launch a session:")
        print(
            f"  curl -si -X POST {stack.public_url}/api/launches "
            "-H 'Content-Type: application/json' -d '{\"image\": \"default\"}'"
        )
        print("Ctrl-C stops everything.")
        while True:
            stack._check_alive()
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopping...")
        return 0
    except RuntimeError as e:
        print(f"hublaunch dev: {e}")
        return 1
    finally:
        stack.stop()
        if redis_proc is not None:
            redis_proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                redis_proc.wait(5)
