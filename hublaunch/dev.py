"""``hublaunch dev``: the whole stack on one machine, embedded defaults, no Docker."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

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
    try:
        for _ in range(50):
            if redis_answers(url):
                return url, proc
            time.sleep(0.1)
    except BaseException:  # Ctrl-C while it starts: it has its own session, so end it here
        proc.kill()
        proc.wait()
        raise
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


# Loggers of the dev process itself whose INFO lines, printed before the banner, read as
# errors to a newcomer: alembic names each plugin and migration step, httpx each request.
CHATTY_LOGGERS = ("alembic", "httpx")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop_on_signals() -> dict[signal.Signals, Any]:
    """Ctrl-C and SIGTERM both stop the stack cleanly. SIGINT is set explicitly: Python only
    turns it into KeyboardInterrupt when it was not ignored at exec, and a shell starts
    background jobs of a script with SIGINT ignored, so `kill -INT` would do nothing."""

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    return {signum: signal.signal(signum, interrupt) for signum in STOP_SIGNALS}


def run(*, port: int, spawner: str, verbose: bool = False) -> int:
    previous = _stop_on_signals()
    settings = get_settings()
    if not verbose and settings.log_level.upper() != "DEBUG":
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)  # their warnings still show
    data_dir = DATA_DIR.resolve()
    stack: Stack | None = None
    redis_proc: subprocess.Popen[bytes] | None = None
    try:
        broker, broker_note, redis_proc = choose_broker(settings.broker_url, data_dir)
        spawner, sandbox_note = choose_spawner(spawner)
        stack = Stack(
            StackConfig(
                data_dir=data_dir,
                database_url=settings.database_url,
                broker_url=broker,
                public_port=port,
                spawner=spawner,
                # One queue per public port: two dev stacks on one Redis never take each
                # other's work.
                queue=f"{settings.queue}-{port}",
                env={"HUBLAUNCH_ALLOW_UNSANDBOXED": "1"} if spawner == "local" else {},
            )
        )
        stack.start()
        print(f"hublaunch is running at {stack.public_url}/")
        print(f"  database: {masked(settings.database_url)}")
        print(f"  broker:   {broker_note}")
        lines = "JSON lines" if settings.log_format == "json" else "text"
        print(f"  logs:     {stack.logs}/ ({lines}; HUBLAUNCH_LOG_FORMAT=json|text)")
        print(f"  sessions: {sandbox_note}")
        print("Launch a session:")
        print(
            f"  curl -si -X POST {stack.public_url}/api/launches "
            "-H 'Content-Type: application/json' -d '{\"image\": \"default\"}'"
        )
        print("Ctrl-C stops everything.", flush=True)
        while True:
            stack.check_alive()
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"hublaunch dev: {e}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C must not cut the shutdown short and leave children running.
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        if stack is not None:
            stack.stop()
        if redis_proc is not None:
            redis_proc.terminate()
            try:
                redis_proc.wait(5)
            except subprocess.TimeoutExpired:
                redis_proc.kill()
                redis_proc.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
