"""``hublaunch dev``: the whole stack on one machine, embedded defaults, no Docker."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import FrameType

from hublaunch.stack import Stack, StackConfig, free_port, redis_answers
from worker.settings import DATA_DIR, get_settings


def choose_broker(data_dir: Path) -> tuple[str, str, subprocess.Popen[bytes] | None]:
    """The configured Redis if it answers, else a private redis-server, else a filesystem queue."""
    configured = get_settings().broker_url
    if redis_answers(configured):
        return configured, f"Redis at {configured}", None
    server = shutil.which("redis-server")
    if server:
        port = free_port()
        proc = subprocess.Popen(
            [
                server,
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        url = f"redis://127.0.0.1:{port}/0"
        for _ in range(50):
            if redis_answers(url):
                return url, f"a private redis-server on port {port}", proc
            time.sleep(0.1)
        proc.kill()
    folder = data_dir / "broker"
    folder.mkdir(parents=True, exist_ok=True)
    return f"filesystem://{folder}", f"the embedded filesystem queue in {folder}", None


def run(*, port: int, spawner: str) -> int:
    settings = get_settings()
    data_dir = DATA_DIR.resolve()
    broker, broker_note, redis_proc = choose_broker(data_dir)
    stack = Stack(
        StackConfig(
            data_dir=data_dir,
            database_url=settings.database_url,
            broker_url=broker,
            public_port=port,
            spawner=spawner,
            # One queue per public port: two dev stacks on one Redis never take each other's work.
            queue=f"{settings.queue}-{port}",
        )
    )

    def _interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        stack.start()
        print(f"hublaunch is running at {stack.public_url}/")
        print(f"  database: {settings.database_url}")
        print(f"  broker:   {broker_note}")
        print(f"  logs:     {stack.logs}/")
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
