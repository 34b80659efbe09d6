"""Intake rate (issue 11): ``POST /api/launches`` accepted per second, against a bare endpoint.

Four servers, each one uvicorn process with the same options (``hublaunch api``'s), on
PostgreSQL and Redis, with no worker:

* bare: a FastAPI app whose one route validates the same ``LaunchRequest`` body and answers 202,
  a plain ``def`` as the issue measured it (the baseline of its target);
* bare-async: the same route as ``async def``, with no thread-pool hop (a stricter baseline,
  printed beside it: the app's route is asynchronous now);
* hublaunch: the real app (limits lifted: the rate limit off, no Idempotency-Key sent);
* hublaunch limited: the real app with the rate limit on but never reached (a million a
  second), so each launch also pays its Redis check and RateLimit headers, as in production;
* hublaunch refusing: the real app with a rate limit of 1 an hour, so every POST after the first
  is a 429 (what a flood gets).

wrk (Debian's package) drives each with ``--connections`` connections for ``--seconds`` s, in the
order bare, bare-async, hublaunch, limited, refusing, then again, so drift shows; rates are
compared in the same run. Each run also reads the CPU time per request of the server process
and of the database's backends, which drifts less than rates on a shared machine. The launches
made are left in a throwaway database; their queues are deleted.

    .venv/bin/python -m bench.intake_rate     # needs /usr/bin/wrk (apt-get install wrk)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import sqlalchemy as sa

from bench.common import BROKER_URL, bench_database, forget_queue, machine_info, print_info
from hublaunch.stack import free_port
from worker.migrate import upgrade

BARE_APP = """
from fastapi import FastAPI
from api.schemas import LaunchRequest

app = FastAPI()


@app.post("/api/launches", status_code=202)
def create(body: LaunchRequest) -> dict[str, str]:
    return {"id": "x", "status": "queued"}


# The same, asynchronous: no thread-pool hop (a plain ``def`` route's hand-off to a thread
# costs more than the rest of it). The stricter baseline, printed beside the issue's.
bare_async = FastAPI()


@bare_async.post("/api/launches", status_code=202)
async def create_async(body: LaunchRequest) -> dict[str, str]:
    return {"id": "x", "status": "queued"}
"""

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{"image": "default"}'
wrk.headers["Content-Type"] = "application/json"
"""

TARGET_RATIO = 0.5
TARGET_P99_MS = 50.0
TARGET_REFUSING_RATIO = 0.8


@dataclass
class Result:
    label: str
    rate: float
    p50_ms: float
    p99_ms: float
    statuses: str
    cpu_us: float = 0.0  # the server process's CPU time per request (µs): steadier than rates
    db_cpu_us: float = 0.0  # the database's backends' CPU time per request (µs)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far (Linux /proc); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class DatabaseCPU:
    """The CPU time of the PostgreSQL backends serving the bench's database (the server runs on
    this machine): what the intake's statements cost the database, beside the app's own."""

    def __init__(self, url: str) -> None:
        self._engine = sa.create_engine(url, poolclass=sa.pool.NullPool)

    def seconds(self) -> dict[int, float]:
        with self._engine.connect() as conn:
            pids = conn.scalars(
                sa.text(
                    "SELECT pid FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).all()
        return {pid: cpu_seconds(pid) for pid in pids}

    def since(self, before: dict[int, float]) -> float:
        after = self.seconds()
        # A backend that ended meanwhile loses its time; the apps' pooled ones stay.
        return sum(now - before.get(pid, 0.0) for pid, now in after.items())


def _ms(value: str) -> float:
    number, unit = re.match(r"([\d.]+)(\w+)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(
    url: str,
    label: str,
    args: argparse.Namespace,
    script: Path,
    pid: int | None = None,
    database: DatabaseCPU | None = None,
) -> Result:
    cpu_before = cpu_seconds(pid) if pid else 0.0
    db_before = database.seconds() if database else {}
    out = subprocess.run(
        [
            "wrk",
            f"--threads={args.threads}",
            f"--connections={args.connections}",
            f"--duration={args.seconds}s",
            "--latency",
            "--script",
            str(script),
            f"{url}/api/launches",
        ],
        capture_output=True,
        text=True,
        timeout=args.seconds + 60,
        check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    cpu_us = (cpu_seconds(pid) - cpu_before) * 1e6 / done if pid and done else 0.0
    db_us = database.since(db_before) * 1e6 / done if database and done else 0.0
    statuses = f"non-2xx {bad.group(1)}" if bad else "all 2xx"
    return Result(label, rate, p50, p99, statuses, cpu_us, db_us)


def app_env(database_url: str, queue: str, tmp: Path) -> dict[str, str]:
    """The environment of an app process with no worker: its own database and queue, quiet logs
    (a log line per request would be part of what is measured)."""
    return {
        **os.environ,
        "HUBLAUNCH_DATABASE_URL": database_url,
        "HUBLAUNCH_BROKER_URL": BROKER_URL,
        "HUBLAUNCH_QUEUE": queue,
        "HUBLAUNCH_SECRET_KEY_FILE": str(tmp / "secret.key"),
        "HUBLAUNCH_LOG_LEVEL": "WARNING",
    }


def serve(
    app: str, port: int, env: dict[str, str], log: Path, factory: bool
) -> subprocess.Popen[bytes]:
    code = (
        "import uvicorn; from hublaunch.cli import uvicorn_options; "
        "from worker.settings import get_settings; "
        f"uvicorn.run({app!r}, factory={factory}, host='127.0.0.1', port={port}, "
        "**uvicorn_options(get_settings()))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/docs", timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{app} did not start; see {log}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="hublaunch-bench-intake-"))
    queue = f"bench-intake-{os.getpid()}"
    script = tmp / "post.lua"
    script.write_text(WRK_SCRIPT)
    (tmp / "bare_app.py").write_text(BARE_APP)
    procs: list[subprocess.Popen[bytes]] = []
    results: list[Result] = []
    try:
        with bench_database() as db:
            upgrade(db.url)
            base_env = {
                **app_env(db.url, queue, tmp),
                "PYTHONPATH": os.pathsep.join([str(tmp), str(Path.cwd())]),
            }
            ports = {
                "bare": free_port(),
                "bare-async": free_port(),
                "hublaunch": free_port(),
                "limited": free_port(),
                "refusing": free_port(),
            }
            procs.append(serve("bare_app:app", ports["bare"], base_env, tmp / "bare.log", False))
            procs.append(
                serve(
                    "bare_app:bare_async",
                    ports["bare-async"],
                    base_env,
                    tmp / "bare-async.log",
                    False,
                )
            )
            procs.append(
                serve(
                    "api.main:create_app",
                    ports["hublaunch"],
                    {**base_env, "HUBLAUNCH_CLIENT_RATE": "0"},
                    tmp / "hublaunch.log",
                    True,
                )
            )
            procs.append(
                serve(
                    "api.main:create_app",
                    ports["limited"],
                    {
                        **base_env,
                        "HUBLAUNCH_CLIENT_RATE": "1000000/second",
                        # Its own bucket: the refusing app's (same client) is empty for an hour.
                        "HUBLAUNCH_QUEUE": f"{queue}-limited",
                    },
                    tmp / "limited.log",
                    True,
                )
            )
            procs.append(
                serve(
                    "api.main:create_app",
                    ports["refusing"],
                    {**base_env, "HUBLAUNCH_CLIENT_RATE": "1/hour"},
                    tmp / "refusing.log",
                    True,
                )
            )
            pids = dict(zip(ports, (proc.pid for proc in procs), strict=True))
            database = DatabaseCPU(db.url) if db.kind.startswith("PostgreSQL") else None
            for _ in range(2):
                for label in ports:
                    url = f"http://127.0.0.1:{ports[label]}"
                    result = run_wrk(url, label, args, script, pids[label], database)
                    results.append(result)
                    print(
                        f"  {label:<10} {result.rate:8.0f}/s  p50 {result.p50_ms:6.1f} ms  "
                        f"p99 {result.p99_ms:6.1f} ms  CPU {result.cpu_us:5.0f} µs/request  "
                        f"database {result.db_cpu_us:4.0f} µs  ({result.statuses})",
                        flush=True,
                    )
            print()
            print_info(
                machine_info(
                    ("database", db.kind),
                    ("load", f"wrk, {args.connections} connections, {args.seconds} s a run"),
                )
            )
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=20)
        forget_queue(queue)  # and the limited app's, which names it
        shutil.rmtree(tmp, ignore_errors=True)

    def best(label: str) -> Result:
        return max((r for r in results if r.label == label), key=lambda r: r.rate)

    bare, accepted, refusing = best("bare"), best("hublaunch"), best("refusing")
    ratio, refusing_ratio = accepted.rate / bare.rate, refusing.rate / bare.rate
    print(f"\naccepted/bare: {ratio:.3f} (target >= {TARGET_RATIO})")
    print(f"accepted/bare-async: {accepted.rate / best('bare-async').rate:.3f} (no target)")
    limited = best("limited")
    print(
        f"accepted with the limit on/bare: {limited.rate / bare.rate:.3f}, "
        f"p99 {limited.p99_ms:.1f} ms (no target: the issue lifts the limit)"
    )
    print(f"accepted p99: {accepted.p99_ms:.1f} ms (target <= {TARGET_P99_MS:.0f} ms)")
    cpu = {label: min(r.cpu_us for r in results if r.label == label) for label in ports}
    db_cpu = min(r.db_cpu_us for r in results if r.label == "hublaunch")
    print(f"database CPU per accepted launch (least of 2): {db_cpu:.0f} µs")
    print(
        f"server CPU per request (least of 2): accepted {cpu['hublaunch']:.0f} µs, "
        f"with the limit on {cpu['limited']:.0f} µs, bare {cpu['bare']:.0f} µs, "
        f"refused {cpu['refusing']:.0f} µs; "
        f"accepted/bare {cpu['hublaunch'] / cpu['bare']:.2f}"
    )
    print(f"refused (429)/bare: {refusing_ratio:.3f} (target >= {TARGET_REFUSING_RATIO})")
    print(json.dumps({r.label + str(i): r.rate for i, r in enumerate(results)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
